//! Why a queued job is still waiting, in words and in numbers: the answer
//! CI users ask of a pending job. Built from what the dispatcher sees (its
//! pool's agents and the job's place in the ready set), so it says the same
//! thing the dispatcher would decide.

use std::collections::BTreeMap;
use std::time::SystemTime;

use super::agent::{Health, SchedulingStatus};
use super::job::Job;

/// One agent of the job's pool, as the dispatcher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSeen {
    pub labels: BTreeMap<String, String>,
    pub health: Health,
    pub scheduling: SchedulingStatus,
    /// Holds a stream to this server.
    pub connected: bool,
    /// Draining, leaving, or not accepting work on its stream.
    pub stopping: bool,
    pub slots: u32,
    pub running: u32,
}

impl AgentSeen {
    fn is_live(&self) -> bool {
        self.connected && !matches!(self.health, Health::Offline | Health::Terminated)
    }

    fn is_unhealthy(&self) -> bool {
        matches!(self.health, Health::Unhealthy)
    }

    /// Takes work when a slot is free (the dispatcher's rule).
    fn is_available(&self) -> bool {
        !self.stopping && super::agent::schedulable(self.health, self.scheduling)
    }
}

/// Where a dispatchable job stands in its pool's line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Dispatchable jobs of the pool dispatched before it.
    pub ahead: u64,
    /// `ahead` stopped counting at its cap: at least that many.
    pub capped: bool,
}

/// What the dispatcher knows about a waiting job's chances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitFacts {
    /// The dispatcher's time when it looked.
    pub now: SystemTime,
    pub agents: Vec<AgentSeen>,
    /// `None` when the job is not dispatchable yet (or not held here).
    pub position: Option<Position>,
}

/// The main reason a job waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitKind {
    /// Its not-before time has not come.
    NotBefore,
    /// It waits out the backoff after a failed attempt.
    RetryBackoff,
    /// No agent of its pool is connected.
    NoAgentInPool,
    /// Agents of its pool are connected, none with its labels.
    NoAgentWithLabels,
    /// Matching agents are connected but take no work (cordoned, draining,
    /// unhealthy).
    AgentsUnavailable,
    /// Every matching agent's slots are in use.
    AgentsBusy,
    /// A matching agent has a free slot: it is being dispatched.
    Dispatching,
}

/// Why a job waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitReason {
    pub kind: WaitKind,
    /// One sentence for people.
    pub summary: String,
    /// For NotBefore and RetryBackoff.
    pub until: Option<SystemTime>,
    /// Required labels (key, value) that no live agent of the pool has.
    pub missing_labels: Vec<(String, String)>,
    /// Live agents of the pool.
    pub pool_agents: u32,
    /// Live agents of the pool with the job's labels.
    pub matching_agents: u32,
    /// Of the matching agents: how many are cordoned or out of service,
    /// draining or leaving, unhealthy.
    pub cordoned_agents: u32,
    pub draining_agents: u32,
    pub unhealthy_agents: u32,
    /// Slots of the matching agents that take work, and how many are in use.
    pub busy_slots: u32,
    pub total_slots: u32,
    pub position: Option<Position>,
}

/// Why `job` (queued) is still waiting.
pub fn explain(job: &Job, facts: &WaitFacts) -> WaitReason {
    let now = facts.now;
    let pool = &job.spec.routing.pool;
    let required = &job.spec.routing.required_labels;
    let live: Vec<&AgentSeen> = facts.agents.iter().filter(|a| a.is_live()).collect();
    let matching: Vec<&AgentSeen> =
        live.iter().copied().filter(|a| required.iter().all(|(k, v)| a.labels.get(k) == Some(v))).collect();
    let missing_labels: Vec<(String, String)> = required
        .iter()
        .filter(|(k, v)| !live.iter().any(|a| a.labels.get(*k) == Some(*v)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let count = |pred: &dyn Fn(&AgentSeen) -> bool| matching.iter().filter(|a| pred(a)).count() as u32;
    let cordoned_agents =
        count(&|a| a.scheduling == SchedulingStatus::Cordoned || a.scheduling == SchedulingStatus::OutOfService);
    let draining_agents = count(&|a| a.scheduling == SchedulingStatus::Draining || a.stopping);
    let unhealthy_agents = count(&|a| a.is_unhealthy());
    let available: Vec<&AgentSeen> = matching.iter().copied().filter(|a| a.is_available()).collect();
    let total_slots: u32 = available.iter().map(|a| a.slots).sum();
    let busy_slots: u32 = available.iter().map(|a| a.running.min(a.slots)).sum();
    let mut reason = WaitReason {
        kind: WaitKind::Dispatching,
        summary: String::new(),
        until: None,
        missing_labels,
        pool_agents: live.len() as u32,
        matching_agents: matching.len() as u32,
        cordoned_agents,
        draining_agents,
        unhealthy_agents,
        busy_slots,
        total_slots,
        position: facts.position,
    };
    let ahead = match facts.position {
        Some(Position { ahead: 0, .. }) | None => String::new(),
        Some(Position { ahead, capped: false }) => format!("; {ahead} jobs are ahead of it"),
        Some(Position { ahead, capped: true }) => format!("; at least {ahead} jobs are ahead of it"),
    };
    if job.ready_time > now {
        let (kind, what) = if job.attempt > 0 {
            (WaitKind::RetryBackoff, "waiting out the retry backoff after attempt")
        } else {
            (WaitKind::NotBefore, "not to start before")
        };
        reason.kind = kind;
        reason.until = Some(job.ready_time);
        reason.summary = match kind {
            WaitKind::RetryBackoff => format!("{what} {} until {}", job.attempt, rfc3339(job.ready_time)),
            _ => format!("{what} {}", rfc3339(job.ready_time)),
        };
    } else if live.is_empty() {
        reason.kind = WaitKind::NoAgentInPool;
        reason.summary = format!("no agent of pool {pool:?} is connected");
    } else if matching.is_empty() {
        reason.kind = WaitKind::NoAgentWithLabels;
        reason.summary = if reason.missing_labels.is_empty() {
            format!(
                "none of the {} connected agents of pool {pool:?} has all of the labels {}",
                live.len(),
                labels(required)
            )
        } else {
            let missing: BTreeMap<String, String> = reason.missing_labels.iter().cloned().collect();
            format!("no connected agent of pool {pool:?} has the labels {}", labels(&missing))
        };
    } else if available.is_empty() {
        reason.kind = WaitKind::AgentsUnavailable;
        let mut why = Vec::new();
        for (n, what) in [(cordoned_agents, "cordoned"), (draining_agents, "draining"), (unhealthy_agents, "unhealthy")]
        {
            if n > 0 {
                why.push(format!("{n} {what}"));
            }
        }
        reason.summary = format!("the {} matching agents take no work ({})", matching.len(), why.join(", "));
    } else if busy_slots >= total_slots {
        reason.kind = WaitKind::AgentsBusy;
        reason.summary = format!(
            "every slot of the {} matching agents is busy ({busy_slots} of {total_slots}){ahead}",
            available.len()
        );
    } else {
        reason.summary = format!("an agent has a free slot; the job is being dispatched{ahead}");
    }
    reason
}

fn labels(labels: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.join(", ")
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{JobSpec, Priority, RetryPolicy, Routing};
    use bytes::Bytes;
    use std::time::Duration;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn job(labels: &[(&str, &str)]) -> Job {
        let spec = JobSpec {
            queue: "q".into(),
            payload: Bytes::new(),
            priority: Priority::Normal,
            routing: Routing {
                pool: "linux".into(),
                required_labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            },
            max_attempts: 3,
            lease_duration: Duration::from_secs(30),
            timeout: None,
            idempotency_key: None,
            not_before: None,
            retry: RetryPolicy::default(),
        };
        Job::new("j".into(), 1, spec, now())
    }

    fn agent(labels: &[(&str, &str)], slots: u32, running: u32) -> AgentSeen {
        AgentSeen {
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            health: Health::Healthy,
            scheduling: SchedulingStatus::Active,
            connected: true,
            stopping: false,
            slots,
            running,
        }
    }

    fn facts(agents: Vec<AgentSeen>) -> WaitFacts {
        WaitFacts { now: now(), agents, position: Some(Position { ahead: 4, capped: false }) }
    }

    #[test]
    fn no_agent_in_the_pool() {
        let offline = AgentSeen { connected: false, ..agent(&[], 1, 0) };
        let r = explain(&job(&[]), &facts(vec![offline]));
        assert_eq!(r.kind, WaitKind::NoAgentInPool);
        assert_eq!(r.summary, "no agent of pool \"linux\" is connected");
    }

    #[test]
    fn the_labels_no_agent_has_are_named() {
        let agents = vec![agent(&[("os", "linux")], 1, 0), agent(&[("arch", "arm64")], 1, 0)];
        let r = explain(&job(&[("os", "linux"), ("gpu", "a100")]), &facts(agents.clone()));
        assert_eq!(r.kind, WaitKind::NoAgentWithLabels);
        assert_eq!(r.missing_labels, [("gpu".to_string(), "a100".to_string())]);
        assert!(r.summary.contains("gpu=a100") && !r.summary.contains("os=linux"), "{}", r.summary);
        // Each label exists, never together.
        let r = explain(&job(&[("os", "linux"), ("arch", "arm64")]), &facts(agents));
        assert_eq!(r.kind, WaitKind::NoAgentWithLabels);
        assert!(r.missing_labels.is_empty());
        assert!(r.summary.contains("has all of the labels arch=arm64, os=linux"), "{}", r.summary);
    }

    #[test]
    fn busy_agents_are_counted_with_the_jobs_ahead() {
        let agents = vec![agent(&[], 2, 2), agent(&[], 1, 1)];
        let r = explain(&job(&[]), &facts(agents));
        assert_eq!(r.kind, WaitKind::AgentsBusy);
        assert_eq!((r.matching_agents, r.busy_slots, r.total_slots), (2, 3, 3));
        assert_eq!(r.summary, "every slot of the 2 matching agents is busy (3 of 3); 4 jobs are ahead of it");
    }

    #[test]
    fn agents_that_take_no_work_say_why() {
        let agents = vec![
            AgentSeen { scheduling: SchedulingStatus::Cordoned, ..agent(&[], 1, 0) },
            AgentSeen { stopping: true, ..agent(&[], 1, 0) },
            AgentSeen { health: Health::Unhealthy, ..agent(&[], 1, 0) },
        ];
        let r = explain(&job(&[]), &facts(agents));
        assert_eq!(r.kind, WaitKind::AgentsUnavailable);
        assert_eq!((r.cordoned_agents, r.draining_agents, r.unhealthy_agents), (1, 1, 1));
        assert_eq!(r.summary, "the 3 matching agents take no work (1 cordoned, 1 draining, 1 unhealthy)");
    }

    #[test]
    fn backoff_and_not_before_name_the_time() {
        let mut j = job(&[]);
        j.ready_time = now() + Duration::from_secs(90);
        let r = explain(&j, &facts(vec![agent(&[], 1, 0)]));
        assert_eq!((r.kind, r.until), (WaitKind::NotBefore, Some(j.ready_time)));
        assert!(r.summary.starts_with("not to start before 2027-01-15T08:01:30Z"), "{}", r.summary);
        j.attempt = 2;
        let r = explain(&j, &facts(vec![agent(&[], 1, 0)]));
        assert_eq!(r.kind, WaitKind::RetryBackoff);
        assert!(r.summary.contains("after attempt 2 until"), "{}", r.summary);
    }

    #[test]
    fn a_free_slot_means_dispatching() {
        let capped = WaitFacts {
            now: now(),
            agents: vec![agent(&[], 2, 1)],
            position: Some(Position { ahead: 10_000, capped: true }),
        };
        let r = explain(&job(&[]), &capped);
        assert_eq!(r.kind, WaitKind::Dispatching);
        assert!(r.summary.ends_with("at least 10000 jobs are ahead of it"), "{}", r.summary);
    }
}
