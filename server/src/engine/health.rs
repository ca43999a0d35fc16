//! The agent health state machine: REGISTERING → HEALTHY on the first
//! heartbeat; DEGRADED after one missed heartbeat or under resource
//! pressure; UNHEALTHY after several missed; OFFLINE past the reconnect
//! grace (see `agents.rs`); TERMINATED on deregistration. Missed heartbeats
//! are found by a per-agent deadline, not by polling.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use tether::time::later;

use super::core::Engine;
use crate::domain::{Health, Metrics};

impl Engine {
    /// Sets an agent's health and why; records the change (logged by `save_agent`).
    /// The reason is a `Cow` so that the common case, a heartbeat that
    /// changes nothing, allocates nothing.
    pub fn set_health(&mut self, agent_id: &str, health: Health, reason: Cow<'static, str>) -> bool {
        let Some(mut entry) = self.agents.get_mut(agent_id) else { return false };
        let from = entry.agent.health;
        if from == health && entry.agent.health_reason == reason {
            return false;
        }
        entry.agent.health = health;
        entry.agent.health_reason = reason.to_string();
        drop(entry);
        if from != health {
            tracing::info!(agent = %agent_id, ?from, to = ?health, %reason, "agent health changed");
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
    ///
    /// A heartbeat only moves the deadline later, so while a check is
    /// queued at or before the new deadline only the entry changes: the
    /// queued check finds the later deadline and requeues itself (see
    /// `check_heartbeats`). A beat costs no allocation and no set operation.
    pub fn arm_heartbeat_check(&mut self, agent_id: &str, at: SystemTime) {
        let Some(mut entry) = self.agents.get_mut(agent_id) else { return };
        entry.next_check = Some(at);
        match entry.queued_check {
            Some(queued) if queued <= at => {}
            queued => {
                entry.queued_check = Some(at);
                drop(entry);
                if let Some(old) = queued {
                    self.health_checks.remove(&(old, agent_id.to_string()));
                }
                self.health_checks.insert((at, agent_id.to_string()));
            }
        }
    }

    pub fn disarm_heartbeat_check(&mut self, agent_id: &str) {
        if let Some(mut entry) = self.agents.get_mut(agent_id) {
            entry.next_check = None;
            if let Some(old) = entry.queued_check.take() {
                drop(entry);
                self.health_checks.remove(&(old, agent_id.to_string()));
            }
        }
    }

    /// A heartbeat arrived: health follows the reported pressure.
    pub async fn observe_heartbeat(&mut self, agent_id: &str, metrics: Metrics) {
        let now = self.clock.now();
        let threshold = self.config.pressure_threshold;
        let Some(mut entry) = self.agents.get_mut(agent_id) else { return };
        if entry.agent.health == Health::Terminated {
            return;
        }
        entry.missed = 0;
        let (health, reason) = match pressure(&metrics, threshold) {
            Some(reason) => (Health::Degraded, Cow::Owned(reason)),
            None => (Health::Healthy, Cow::Borrowed("heartbeating on time")),
        };
        let was = entry.agent.health;
        drop(entry);
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
        while self.health_checks.first().is_some_and(|(t, _)| *t <= now) {
            let Some((t, id)) = self.health_checks.pop_first() else { break };
            let Some(mut entry) = self.agents.get_mut(&id) else { continue };
            if entry.queued_check != Some(t) {
                continue; // superseded by an earlier deadline
            }
            entry.queued_check = None;
            let deadline = match entry.next_check {
                None => continue,
                Some(deadline) if deadline > now => {
                    // Heartbeats moved the deadline on: check again then.
                    entry.queued_check = Some(deadline);
                    drop(entry);
                    self.health_checks.insert((deadline, id));
                    continue;
                }
                Some(deadline) => deadline,
            };
            entry.next_check = None;
            entry.missed += 1;
            let missed = entry.missed;
            drop(entry);
            let reason = format!("missed {missed} heartbeat{}", if missed == 1 { "" } else { "s" });
            if missed >= unhealthy_after {
                self.set_health(&id, Health::Unhealthy, reason.into());
            } else {
                self.set_health(&id, Health::Degraded, reason.into());
                self.arm_heartbeat_check(&id, later(deadline, interval));
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
