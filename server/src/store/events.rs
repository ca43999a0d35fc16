//! The job event log: every state change of a job, written in the same
//! commit as the job write that makes it, read back with a cursor.
//!
//! Layout (both backends): the log is split into shards (one on the
//! embedded store, [`super::dynamodb`]'s job shards on DynamoDB: all events
//! of one job are in one shard). Each shard numbers its events densely,
//! from one. One job write that carries events stores one *group*: the job
//! (without payload and result) and its transitions, which take the
//! consecutive sequence numbers `first..=last`; the group is keyed by
//! `last`, so "every group after position p" is a range read from `p + 1`.
//!
//! Order: per shard, sequence order is commit order (a shard's head only
//! moves past a group once the group is committed), so per job order holds
//! always; there is no order across shards (events carry their times).
//!
//! Retention: old groups are trimmed from the front of each shard and the
//! shard's *low-water mark* (the last trimmed sequence number) is raised. A
//! cursor before a shard's low-water mark, or one that finds a hole in a
//! shard's dense numbering, is answered with [`EventRead::Expired`], never
//! with a silent skip.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{StoreError, StoreResult};
use crate::domain::{Job, JobState};

/// The longest `last_error` a transition keeps (the group's job keeps the
/// whole error of its last state): keeps a group of many coalesced
/// transitions small.
pub const MAX_TRANSITION_ERROR: usize = 1024;

/// One state change of a job, as a job write carries it. What changes
/// between states; the rest of the job is the group's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// `None` for a created job.
    pub previous: Option<JobState>,
    pub state: JobState,
    /// The job's version after this change.
    pub version: u64,
    pub time: SystemTime,
    pub attempt: u32,
    pub fencing_token: u64,
    pub worker_id: String,
    pub ready_time: SystemTime,
    pub lease_expire_time: Option<SystemTime>,
    pub finish_time: Option<SystemTime>,
    /// At most [`MAX_TRANSITION_ERROR`] bytes.
    pub last_error: String,
}

impl Transition {
    /// The change that left `job` as it is, from `previous`.
    pub fn of(job: &Job, previous: Option<JobState>) -> Transition {
        Transition {
            previous,
            state: job.state,
            version: job.version,
            time: job.update_time,
            attempt: job.attempt,
            fencing_token: job.fencing_token,
            worker_id: job.worker_id.clone(),
            ready_time: job.ready_time,
            lease_expire_time: job.lease_expire_time,
            finish_time: job.finish_time,
            last_error: truncated(&job.last_error, MAX_TRANSITION_ERROR).to_string(),
        }
    }
}

fn truncated(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// One job write's events as stored: the job after the write, without its
/// payload, result and dashboard part, and the transitions, numbered from
/// `first_seq`. The job keeps job format 2's layout (`job_v2_inline`), so
/// groups read the same in every release since the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventGroup {
    pub first_seq: u64,
    #[serde(with = "super::legacy::job_v2_inline")]
    pub job: Job,
    pub transitions: Vec<Transition>,
}

impl EventGroup {
    /// The group of a job write (`None` if it carries no transition).
    pub fn of(job: &Job, transitions: &[Transition], first_seq: u64) -> Option<EventGroup> {
        if transitions.is_empty() {
            return None;
        }
        let mut job = Job { dashboard: None, ..job.clone() };
        job.spec.payload = bytes::Bytes::new();
        job.result = bytes::Bytes::new();
        Some(EventGroup { first_seq, job, transitions: transitions.to_vec() })
    }

    /// The sequence number of its last transition (its key).
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.transitions.len().saturating_sub(1) as u64
    }

    /// The time of its last transition: a group is trimmed once it is older
    /// than the retention.
    pub fn time(&self) -> SystemTime {
        self.transitions.last().map_or(self.job.update_time, |t| t.time)
    }

    /// Its events after `after` (a shard position), in order.
    pub fn events_after(&self, shard: u32, after: u64, out: &mut Vec<Event>) {
        for (i, t) in self.transitions.iter().enumerate() {
            let seq = self.first_seq + i as u64;
            if seq <= after {
                continue;
            }
            let mut job = self.job.clone();
            job.state = t.state;
            job.version = t.version;
            job.update_time = t.time;
            job.attempt = t.attempt;
            job.fencing_token = t.fencing_token;
            job.worker_id.clone_from(&t.worker_id);
            job.ready_time = t.ready_time;
            job.lease_expire_time = t.lease_expire_time;
            job.finish_time = t.finish_time;
            if i + 1 < self.transitions.len() {
                // The group's job holds the last state's whole error.
                job.last_error.clone_from(&t.last_error);
                job.run_deadline = None;
            }
            out.push(Event { shard, seq, previous: t.previous, job });
        }
    }
}

/// One event as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub shard: u32,
    pub seq: u64,
    /// `None` for a created job.
    pub previous: Option<JobState>,
    /// The job after the change, without payload and result.
    pub job: Job,
}

/// A position in every shard of the log: per shard, the last sequence
/// number already read (0: none). Opaque to clients
/// (`grpc/event_cursor.rs` encodes it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventCursor {
    pub positions: Vec<u64>,
}

impl EventCursor {
    /// The start of a log of `shards` shards.
    pub fn start(shards: u32) -> EventCursor {
        EventCursor { positions: vec![0; shards as usize] }
    }

    /// Moves past `event`.
    pub fn advance(&mut self, event: &Event) {
        self.advance_to(event.shard, event.seq);
    }

    /// Moves past position `seq` of `shard`.
    pub fn advance_to(&mut self, shard: u32, seq: u64) {
        if let Some(p) = self.positions.get_mut(shard as usize) {
            *p = (*p).max(seq);
        }
    }

    /// Refuses a cursor of another log layout (another backend).
    pub fn check_shards(&self, shards: u32) -> StoreResult<()> {
        if self.positions.len() != shards as usize {
            return Err(StoreError::Rejected(format!(
                "the cursor names {} event shards; this store has {shards}",
                self.positions.len()
            )));
        }
        Ok(())
    }
}

/// A stored group of a log (the job log's [`EventGroup`], the activity
/// log's [`super::activity::ActivityGroup`]): what both backends' readers
/// and trims need of it.
pub trait LogGroup: serde::de::DeserializeOwned {
    type Event;
    fn first_seq(&self) -> u64;
    /// Its key.
    fn last_seq(&self) -> u64;
    /// It is trimmed once this is older than the retention.
    fn time(&self) -> SystemTime;
    /// Its events after `after` (a position in shard `shard`), in order.
    fn events_after(&self, shard: u32, after: u64, out: &mut Vec<Self::Event>);
}

impl LogGroup for EventGroup {
    type Event = Event;

    fn first_seq(&self) -> u64 {
        self.first_seq
    }

    fn last_seq(&self) -> u64 {
        EventGroup::last_seq(self)
    }

    fn time(&self) -> SystemTime {
        EventGroup::time(self)
    }

    fn events_after(&self, shard: u32, after: u64, out: &mut Vec<Event>) {
        EventGroup::events_after(self, shard, after, out);
    }
}

/// What a read of the job log from a cursor found.
pub type EventRead = LogRead<Event>;

/// What a read of a log from a cursor found.
#[derive(Debug, Clone, PartialEq)]
pub enum LogRead<E> {
    /// Events after the cursor, per shard in order (shards one after the
    /// other), and the cursor after them.
    Events { events: Vec<E>, next: EventCursor },
    /// Events after the cursor were trimmed (older than the retention): the
    /// reader must start again from the present ([`super::Store::event_heads`]).
    Expired,
    /// The cursor is ahead of the log: it was not issued by this store.
    Unknown,
}

/// What a trim of old events did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trimmed {
    /// Groups deleted (embedded) or released to the table's TTL (DynamoDB).
    pub groups: u64,
    /// Whether more remain to trim (the trim stopped at its bound).
    pub more: bool,
}

impl Trimmed {
    /// Both trims' work.
    pub fn and(self, other: Trimmed) -> Trimmed {
        Trimmed { groups: self.groups + other.groups, more: self.more || other.more }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group is stored as every release since the event log wrote it:
    /// the job inline in job format 2's layout, whatever the job holds.
    #[test]
    fn a_group_keeps_the_layout_of_earlier_releases_and_leaves_the_dashboard_part_out() {
        #[derive(Serialize)]
        struct GroupV1 {
            first_seq: u64,
            job: crate::store::legacy::JobV2,
            transitions: Vec<Transition>,
        }
        let mut job = crate::store::conformance::job("j", 1, "tether.jobs", None);
        let created = Transition::of(&job, None);
        let plain = EventGroup::of(&job, std::slice::from_ref(&created), 5).expect("group");
        let spec =
            crate::domain::dashboard::DashboardSpec { name: "n".into(), requested_by: "r".into(), retry_of: None };
        job.dashboard = Some(Box::new(crate::domain::dashboard::DashboardJob::new(spec)));
        let group = EventGroup::of(&job, std::slice::from_ref(&created), 5).expect("group");
        assert_eq!(group, plain);
        let old = GroupV1 { first_seq: 5, job: (&plain.job).into(), transitions: vec![created] };
        let encoded = crate::store::codec::encode(&group).expect("encode");
        assert_eq!(encoded, crate::store::codec::encode(&old).expect("encode"), "byte for byte");
        assert_eq!(crate::store::codec::decode::<EventGroup>(&encoded).expect("decode"), plain);
    }

    #[test]
    fn transitions_keep_at_most_a_kibibyte_of_error_on_a_char_boundary() {
        let mut job = crate::store::conformance::job("j", 1, "q", None);
        job.last_error = "é".repeat(MAX_TRANSITION_ERROR);
        let t = Transition::of(&job, None);
        assert!(t.last_error.len() <= MAX_TRANSITION_ERROR);
        assert!(t.last_error.chars().all(|c| c == 'é'));
    }

    /// The write cost in docs/dynamodb.md: a group of a typical job (UUID
    /// ids, a label, a worker) with its one or two transitions stays within
    /// one DynamoDB write unit (1 KB, with the item's other attributes).
    #[test]
    fn a_typical_group_fits_one_write_unit() {
        let mut job = crate::store::conformance::job("0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", 1, "builds", None);
        job.spec.payload = bytes::Bytes::from(vec![7u8; 4096]);
        let created = Transition::of(&job, None);
        job.state = JobState::Claimed;
        job.version = 2;
        job.attempt = 1;
        job.fencing_token = 1 << 33;
        job.worker_id = "0193a1b2-c3d4-7e5f-8a9b-aaaaaaaaaaaa".into();
        job.lease_expire_time = Some(job.update_time);
        let claimed = Transition::of(&job, Some(JobState::Queued));
        let one = crate::store::codec::encode(&EventGroup::of(&job, std::slice::from_ref(&claimed), 1).expect("group"))
            .expect("encode");
        let two =
            crate::store::codec::encode(&EventGroup::of(&job, &[created, claimed], 1).expect("group")).expect("encode");
        // Item attributes besides the body: names and numbers, under 100 bytes.
        assert!(one.len() + 100 <= 1024 && two.len() + 100 <= 1024, "{} / {} bytes", one.len(), two.len());
    }

    #[test]
    fn a_group_strips_payload_and_result_and_numbers_its_events() {
        let mut job = crate::store::conformance::job("j", 1, "q", None);
        job.result = bytes::Bytes::from_static(b"out");
        let created = Transition::of(&job, None);
        job.state = JobState::Claimed;
        job.version += 1;
        let claimed = Transition::of(&job, Some(JobState::Queued));
        let group = EventGroup::of(&job, &[created, claimed], 7).expect("group");
        assert!(group.job.spec.payload.is_empty() && group.job.result.is_empty());
        assert_eq!(group.last_seq(), 8);
        let mut events = Vec::new();
        group.events_after(3, 7, &mut events);
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].shard, events[0].seq, events[0].previous), (3, 8, Some(JobState::Queued)));
        assert!(EventGroup::of(&job, &[], 1).is_none());
    }
}
