//! Operator commands on agents whose stream another replica holds (shared
//! store only).
//!
//! The replica that takes the command reads the agent's stored record
//! first (its own copy may be stale or missing), applies the change to it
//! and writes it, then tells its peers. The replica holding the agent's
//! stream reads the record again and applies the change there: it pushes
//! Drain, stops giving work to a cordoned agent, or releases the jobs of a
//! deregistered one. Agent records are written last-writer-wins, so a
//! change that races a write of the holder (a health change) can be
//! overwritten; the operator then sees the old status and repeats it.

use super::core::{AgentEntry, Effect, Engine};
use super::types::AgentView;
use super::Command;
use crate::domain::{Agent, DomainResult, Health, SchedulingStatus};

impl Engine {
    /// On a shared store, re-reads an agent this replica does not hold a
    /// stream of (nor any attempt of), so a command works on its current
    /// record. Returns whether it is such an agent.
    pub(super) async fn read_agent_held_elsewhere(&mut self, id: &str) -> bool {
        if !self.shared {
            return false;
        }
        let local = self.agents.get(id);
        if local.is_some_and(|e| e.session.is_some() || !e.in_flight.is_empty()) {
            return false;
        }
        match self.store.get_agent(id).await {
            Ok(Some(agent)) => {
                let terminated = agent.health == Health::Terminated;
                if local.is_some() || terminated {
                    self.agents.insert(AgentEntry::new(agent));
                } else {
                    self.track_agent(agent);
                }
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(agent = %id, error = %e, "could not read an agent; using this replica's copy");
                false
            }
        }
    }

    /// Tells peers that an operator changed an agent held elsewhere, once
    /// its record is written.
    pub(super) fn tell_holder(&mut self, elsewhere: bool, id: &str, result: &DomainResult<AgentView>) {
        if elsewhere && result.is_ok() && self.wakes_peers() {
            self.pending.effects.push(Effect::AgentChanged { id: id.to_string() });
        }
    }

    /// A peer changed these agents: those whose stream is held here are
    /// read again (as tasks) and the change applied.
    pub(super) fn agents_changed_elsewhere(&mut self, ids: Vec<String>) {
        for id in ids {
            if self.agents.get(&id).is_none_or(|e| e.session.is_none()) {
                continue;
            }
            let (Some(commands), store) = (self.commands.upgrade(), self.store.clone()) else { return };
            tokio::spawn(async move {
                match store.get_agent(&id).await {
                    Ok(Some(agent)) => {
                        let _ = commands.send(Command::AgentRefreshed { agent: Box::new(agent) }).await;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(agent = %id, error = %e, "could not read an agent a peer changed"),
                }
            });
        }
    }

    /// Applies an operator's change made through a peer to an agent whose
    /// stream is held here.
    pub(super) async fn agent_refreshed(&mut self, stored: Agent) {
        let Some(entry) = self.agents.get(&stored.id) else { return };
        if entry.session.is_none() || entry.agent.health == Health::Terminated {
            return;
        }
        let (draining, scheduling) = (entry.draining, entry.agent.scheduling);
        let id = stored.id.clone();
        let reason = "changed through another replica".to_string();
        let outcome = if stored.health == Health::Terminated {
            self.deregister(&id).map(drop)
        } else if stored.scheduling == SchedulingStatus::Draining {
            if draining {
                return;
            }
            self.drain(&id, reason).map(drop)
        } else if stored.scheduling != scheduling {
            self.update_status(&id, stored.scheduling, reason).await.map(drop)
        } else {
            return;
        };
        match outcome {
            Ok(()) => tracing::info!(agent = %id, "applied an agent change made through another replica"),
            Err(e) => tracing::warn!(agent = %id, error = %e, "could not apply an agent change made elsewhere"),
        }
    }
}
