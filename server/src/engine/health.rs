//! The agent health state machine: REGISTERING → HEALTHY on the first
//! heartbeat; DEGRADED after one missed heartbeat or under resource
//! pressure; UNHEALTHY after several missed; OFFLINE past the reconnect
//! grace (see `agents.rs`); TERMINATED on deregistration. Missed heartbeats
//! are found by a per-agent deadline, not by polling.

use std::time::{Duration, SystemTime};

use tether::time::later;

use super::core::Engine;
use super::types::AgentEvent;
use crate::domain::{Health, Metrics};

impl Engine {
    /// Sets an agent's health and why; records and publishes the change.
    pub fn set_health(&mut self, agent_id: &str, health: Health, reason: String) -> bool {
        let now = self.clock.now();
        let Some(entry) = self.agents.get_mut(agent_id) else { return false };
        let from = entry.agent.health;
        if from == health && entry.agent.health_reason == reason {
            return false;
        }
        entry.agent.health = health;
        entry.agent.health_reason = reason.clone();
        if from != health {
            tracing::info!(agent = %agent_id, ?from, to = ?health, %reason, "agent health changed");
            if self.agent_events.receiver_count() > 0 {
                let _ = self.agent_events.send(AgentEvent {
                    agent_id: agent_id.to_string(),
                    from,
                    to: health,
                    reason,
                    time: now,
                });
            }
        }
        self.save_agent(agent_id);
        from != health
    }

    /// The margin after the heartbeat interval before a heartbeat counts as
    /// missed (network jitter).
    fn heartbeat_deadline(&self, from: SystemTime) -> SystemTime {
        later(from, self.config.heartbeat_interval.saturating_add(self.config.heartbeat_interval / 2))
    }

    /// (Re)arms the missed-heartbeat deadline of an agent.
    pub fn arm_heartbeat_check(&mut self, agent_id: &str, at: SystemTime) {
        let Some(entry) = self.agents.get_mut(agent_id) else { return };
        if let Some(old) = entry.next_check.take() {
            self.health_checks.remove(&(old, agent_id.to_string()));
        }
        entry.next_check = Some(at);
        self.health_checks.insert((at, agent_id.to_string()));
    }

    pub fn disarm_heartbeat_check(&mut self, agent_id: &str) {
        if let Some(entry) = self.agents.get_mut(agent_id) {
            if let Some(old) = entry.next_check.take() {
                self.health_checks.remove(&(old, agent_id.to_string()));
            }
        }
    }

    /// A heartbeat arrived: health follows the reported pressure.
    pub async fn observe_heartbeat(&mut self, agent_id: &str, metrics: Metrics) {
        let now = self.clock.now();
        let threshold = self.config.pressure_threshold;
        let Some(entry) = self.agents.get_mut(agent_id) else { return };
        if entry.agent.health == Health::Terminated {
            return;
        }
        entry.missed = 0;
        let (health, reason) = match pressure(&metrics, threshold) {
            Some(reason) => (Health::Degraded, reason),
            None => (Health::Healthy, "heartbeating on time".to_string()),
        };
        let was = entry.agent.health;
        self.set_health(agent_id, health, reason);
        self.arm_heartbeat_check(agent_id, self.heartbeat_deadline(now));
        if was != Health::Healthy && health == Health::Healthy || was == Health::Unhealthy {
            self.fill_agent(agent_id).await;
        }
    }

    /// Missed-heartbeat deadlines that passed degrade their agents.
    pub fn check_heartbeats(&mut self, now: SystemTime) {
        let unhealthy_after = self.config.unhealthy_after_missed.max(1);
        let interval = self.config.heartbeat_interval.max(Duration::from_millis(1));
        while let Some((t, id)) = self.health_checks.first().cloned() {
            if t > now {
                break;
            }
            self.health_checks.remove(&(t, id.clone()));
            let Some(entry) = self.agents.get_mut(&id) else { continue };
            if entry.next_check != Some(t) {
                continue;
            }
            entry.next_check = None;
            entry.missed += 1;
            let missed = entry.missed;
            let reason = format!("missed {missed} heartbeat{}", if missed == 1 { "" } else { "s" });
            if missed >= unhealthy_after {
                self.set_health(&id, Health::Unhealthy, reason);
            } else {
                self.set_health(&id, Health::Degraded, reason);
                self.arm_heartbeat_check(&id, later(t, interval));
            }
        }
    }
}

/// Why the reported metrics count as pressure, if they do.
fn pressure(m: &Metrics, threshold: f64) -> Option<String> {
    let share = |used: u64, total: u64| if total == 0 { 0.0 } else { used as f64 / total as f64 };
    let memory = share(m.memory_used_bytes, m.memory_total_bytes);
    let disk = share(m.disk_used_bytes, m.disk_total_bytes);
    if memory > threshold {
        Some(format!("memory {:.0}% used", memory * 100.0))
    } else if disk > threshold {
        Some(format!("disk {:.0}% used", disk * 100.0))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_is_memory_or_disk_above_the_threshold() {
        let calm = Metrics {
            memory_used_bytes: 5,
            memory_total_bytes: 10,
            disk_used_bytes: 1,
            disk_total_bytes: 10,
            ..Default::default()
        };
        assert_eq!(pressure(&calm, 0.9), None);
        let full_disk = Metrics { disk_used_bytes: 99, disk_total_bytes: 100, ..calm };
        assert_eq!(pressure(&full_disk, 0.9).as_deref(), Some("disk 99% used"));
        let unknown = Metrics::default();
        assert_eq!(pressure(&unknown, 0.9), None);
    }
}
