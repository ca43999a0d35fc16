//! Agents as stored: identity, pool, labels and operator-set status.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Operator-set scheduling status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SchedulingStatus {
    Active,
    Cordoned,
    Draining,
    OutOfService,
}

/// Whether an agent in this health and scheduling status may be given
/// work (when it has a free slot and an open stream): the dispatcher's rule.
pub fn schedulable(health: Health, scheduling: SchedulingStatus) -> bool {
    scheduling == SchedulingStatus::Active && matches!(health, Health::Registering | Health::Healthy | Health::Degraded)
}

/// Health as the server judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    Registering,
    Healthy,
    Degraded,
    Unhealthy,
    Offline,
    Terminated,
}

/// Resource use reported by an agent.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Metrics {
    pub cpu_percent: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
    pub running_jobs: u32,
}

/// An agent as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    pub id: String,
    pub name: String,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
    pub slots: u32,
    pub health: Health,
    /// Why it has that health.
    pub health_reason: String,
    pub scheduling: SchedulingStatus,
    pub version: String,
    pub create_time: SystemTime,
    pub last_seen_time: SystemTime,
    pub metrics: Metrics,
}
