//! The activity log: agent and deployment changes, written in the same
//! commit as the agent or record write that makes them
//! ([`super::Write::Logged`]), read back with a cursor.
//!
//! It is laid out as the job event log is ([`super::events`]): shards
//! numbered densely from one, one *group* per write keyed by its last
//! sequence number, a low-water mark raised by the retention task, a hole
//! or a cursor below the mark answered with `Expired`. It is a log of its
//! own, not more entries in the job log: readers of job events (WatchQueue,
//! the summary fold, replicas of the previous release during a rolling
//! deploy) never read past entries they do not know.
//!
//! Order: all entries of one subject (an agent, a deployment) are in one
//! shard, so per subject order holds; across subjects entries carry times.

use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::events::LogGroup;

/// What an activity entry is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ActivityKind {
    Agent,
    Deployment,
}

/// One change of an agent or a deployment, as the owning module encodes
/// it: the store keeps the body as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    pub kind: ActivityKind,
    /// The agent id or deployment id: it picks the shard.
    pub subject: String,
    pub time: SystemTime,
    pub body: Bytes,
}

/// One write's entries as stored, numbered from `first_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityGroup {
    pub first_seq: u64,
    pub entries: Vec<Activity>,
}

/// One entry as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityEvent {
    /// The shard's index in an activity cursor.
    pub shard: u32,
    pub seq: u64,
    pub activity: Activity,
}

impl LogGroup for ActivityGroup {
    type Event = ActivityEvent;

    fn first_seq(&self) -> u64 {
        self.first_seq
    }

    fn last_seq(&self) -> u64 {
        self.first_seq + self.entries.len().saturating_sub(1) as u64
    }

    fn time(&self) -> SystemTime {
        self.entries.iter().map(|e| e.time).max().unwrap_or(SystemTime::UNIX_EPOCH)
    }

    fn events_after(&self, shard: u32, after: u64, out: &mut Vec<ActivityEvent>) {
        for (i, activity) in self.entries.iter().enumerate() {
            let seq = self.first_seq + i as u64;
            if seq > after {
                out.push(ActivityEvent { shard, seq, activity: activity.clone() });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(subject: &str, secs: u64) -> Activity {
        Activity {
            kind: ActivityKind::Agent,
            subject: subject.into(),
            time: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs),
            body: Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn a_group_numbers_its_entries_and_is_as_old_as_its_newest() {
        let group = ActivityGroup { first_seq: 4, entries: vec![entry("a", 9), entry("a", 7), entry("a", 8)] };
        assert_eq!(group.last_seq(), 6);
        assert_eq!(group.time(), SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(9));
        let mut out = Vec::new();
        group.events_after(2, 4, &mut out);
        assert_eq!(out.iter().map(|e| (e.shard, e.seq)).collect::<Vec<_>>(), vec![(2, 5), (2, 6)]);
    }
}
