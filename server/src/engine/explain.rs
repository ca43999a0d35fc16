//! What the dispatcher knows about a waiting job's chances: its pool's
//! agents as the dispatcher sees them and the job's place in line. The
//! domain (`domain::waiting`) turns it into words.

use super::core::Engine;
use crate::domain::waiting::{AgentSeen, Position, WaitFacts};

/// Jobs ahead of a waiting job are counted up to this many, so a question
/// about one job in a huge backlog costs the dispatcher little.
pub const MAX_COUNTED_AHEAD: u64 = 10_000;

impl Engine {
    pub fn wait_facts(&self, id: &str, pool: &str) -> WaitFacts {
        let agents = self
            .pool_agents
            .get(pool)
            .into_iter()
            .flatten()
            .filter_map(|agent_id| self.agents.get(agent_id))
            .map(|entry| AgentSeen {
                labels: entry.agent.labels.clone(),
                health: entry.agent.health,
                scheduling: entry.agent.scheduling,
                connected: entry.session.is_some(),
                stopping: entry.draining || !entry.accepting || entry.session.as_ref().is_some_and(|s| s.moving),
                slots: entry.agent.slots,
                running: u32::try_from(entry.in_flight.len()).unwrap_or(u32::MAX),
            })
            .collect();
        let position = self.ready.ahead_of(id, MAX_COUNTED_AHEAD).map(|(ahead, capped)| Position { ahead, capped });
        WaitFacts { now: self.clock.now(), agents, position }
    }
}
