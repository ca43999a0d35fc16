//! GetSummary: the figures of the aggregates on the wire.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tether::time::to_duration;
use tether::v1 as pb;

use super::convert::{health_out, priority_out};
use super::dashboard_convert::status_out;
use crate::domain::dashboard::DashboardStatus;
use crate::domain::deploy::ServiceMarks;
use crate::domain::summary::JobStats;
use crate::domain::{Health, JobState, Priority};

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Dashboard jobs per status, from the counts of their queue's states.
pub fn jobs_out(by_state: &[(JobState, u64)]) -> Vec<pb::JobStatusCount> {
    let mut counts: BTreeMap<i32, u64> = BTreeMap::new();
    for (state, n) in by_state {
        *counts.entry(status_out(DashboardStatus::of(*state)) as i32).or_default() += n;
    }
    DashboardStatus::ALL
        .iter()
        .map(|s| {
            let status = status_out(*s) as i32;
            pb::JobStatusCount { status, count: counts.get(&status).copied().unwrap_or(0) }
        })
        .collect()
}

/// Agents per health (every health, zeros included).
pub fn agents_out(counts: &[(Health, bool, u64)]) -> Vec<pb::AgentHealthCount> {
    let mut by: BTreeMap<i32, (u64, u64)> = BTreeMap::new();
    for (health, connected, n) in counts {
        let entry = by.entry(health_out(*health) as i32).or_default();
        entry.1 += n;
        if *connected {
            entry.0 += n;
        }
    }
    by.into_iter().map(|(health, (connected, total))| pb::AgentHealthCount { health, connected, total }).collect()
}

pub fn queue_depth_out(queued: &[(Priority, u64)]) -> Vec<pb::PriorityCount> {
    Priority::ALL
        .iter()
        .map(|p| pb::PriorityCount {
            priority: priority_out(*p) as i32,
            count: queued.iter().filter(|(q, _)| q == p).map(|(_, n)| n).sum(),
        })
        .collect()
}

pub fn window_out(stats: &JobStats, now: SystemTime) -> pb::JobWindow {
    let w = stats.window(now);
    let ended = w.succeeded + w.failed;
    pb::JobWindow {
        succeeded: w.succeeded,
        failed: w.failed,
        cancelled: w.cancelled,
        success_rate: (ended > 0).then(|| w.succeeded as f64 / ended as f64),
        started: w.started,
        queue_wait_p50: w.wait_p50.map(to_duration),
        queue_wait_p95: w.wait_p95.map(to_duration),
    }
}

pub fn service_out(name: &str, marks: &ServiceMarks, now: SystemTime) -> pb::ServiceSummary {
    let since = |d: Duration| now.checked_sub(d).unwrap_or(std::time::UNIX_EPOCH);
    pb::ServiceSummary {
        service: name.to_string(),
        deployments_last_24h: marks.deployments_since(since(DAY)),
        deployments_last_30d: marks.deployments_since(since(30 * DAY)),
        mean_time_to_restore: marks.mean_restore().map(to_duration),
        last_time_to_restore: marks.restores.last().copied().map(to_duration),
        restores: u32::try_from(marks.restores.len()).unwrap_or(u32::MAX),
        bad_versions: u32::try_from(marks.bad.len()).unwrap_or(u32::MAX),
    }
}
