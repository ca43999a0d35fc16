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
use super::types::{AgentPage, AgentView};
use super::{AgentListFilter, Command};
use crate::domain::{Agent, DomainResult, Health, SchedulingStatus};
use crate::store::AgentFilter;

impl Engine {
    /// On a shared store, re-reads an agent this replica has not held the
    /// stream of since it started, so a command works on its current
    /// record (this replica's copy is only a cache of it). Returns whether
    /// it is such an agent.
    pub(super) async fn read_agent_held_elsewhere(&mut self, id: &str) -> bool {
        if !self.shared {
            return false;
        }
        let local = self.agents.get(id);
        if local.is_some_and(|e| e.held_here || !e.in_flight.is_empty()) || self.agent_write_pending(id) {
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
        // The replica that made the change logged it.
        if let Some(mut entry) = self.agents.get_mut(&id) {
            entry.logged = Some((stored.health, stored.scheduling));
        }
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

    /// ListAgents on a shared store: every replica lists the same agents,
    /// from the store, each as this replica sees it when it holds the
    /// agent's stream (connected, running attempts, metrics history) and as
    /// stored otherwise. Pages by agent id like the local listing.
    pub(super) async fn list_agents_shared(&self, filter: &AgentListFilter) -> DomainResult<AgentPage> {
        let stored_filter = AgentFilter { pool: filter.pool.clone(), labels: filter.labels.clone() };
        // One read: the DynamoDB listing scans the (small) agents table
        // whatever the limit, and health is filtered here.
        let stored = self
            .store
            .list_agents(&stored_filter, filter.after_id.as_deref(), usize::MAX)
            .await
            .map_err(super::store_error)?;
        let mut agents = Vec::new();
        for agent in stored {
            let view = match self.agents.get(&agent.id) {
                Some(e) if e.held_here => self.agent_view(&agent.id)?,
                _ => AgentView { agent, connected: false, running: Vec::new(), metrics_history: Vec::new() },
            };
            if filter.health.is_empty() || filter.health.contains(&view.agent.health) {
                agents.push(view);
                if agents.len() > filter.limit {
                    break;
                }
            }
        }
        let more = agents.len() > filter.limit;
        agents.truncate(filter.limit);
        let next_after = if more { agents.last().map(|a| a.agent.id.clone()) } else { None };
        Ok(AgentPage { agents, next_after })
    }

    /// Whether a write of this agent is waiting for the next commit (the
    /// stored record is then older than this replica's copy).
    fn agent_write_pending(&self, id: &str) -> bool {
        self.pending.writes.iter().any(|w| w.agent().is_some_and(|a| a.id == id))
    }
}
