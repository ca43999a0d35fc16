//! The queued jobs the engine knows: dispatchable ones per pool in dispatch
//! order (priority, then FIFO), and delayed ones (not-before or backoff) by
//! the time they become dispatchable.
//!
//! Within a pool, jobs are grouped by the labels they require: finding the
//! first job an agent may run looks at the head of each group whose labels
//! the agent has, instead of walking past every job waiting for a label it
//! lacks (20,000 jobs waiting for a GPU must not slow every CPU agent's
//! slot turnover).

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use super::job_key::JobKey;
use super::FastMap;
use crate::domain::{Job, Priority, Routing};
use crate::store::codec::{decode_job, encode_job_into};
use crate::store::QueuedEntry;

/// Dispatch order within a pool: higher priority first, then lower seq.
pub type ReadyKey = (Reverse<Priority>, u64);

/// A queued job, as handed to and taken from the set. `body` is the full
/// record when the engine has it in memory (jobs enqueued or requeued since
/// start-up); jobs loaded at start-up carry only their routing and are read
/// from the store when dispatched.
#[derive(Debug, Clone)]
pub struct ReadyEntry {
    pub id: String,
    pub seq: u64,
    pub queue: String,
    pub priority: Priority,
    pub routing: Routing,
    pub create_time: SystemTime,
    pub ready_time: SystemTime,
    pub body: Option<Box<Job>>,
}

impl ReadyEntry {
    pub fn from_job(job: Job) -> ReadyEntry {
        ReadyEntry {
            id: job.id.clone(),
            seq: job.seq,
            queue: job.spec.queue.clone(),
            priority: job.spec.priority,
            routing: job.spec.routing.clone(),
            create_time: job.create_time,
            ready_time: job.ready_time,
            body: Some(Box::new(job)),
        }
    }

    pub fn from_stored(entry: QueuedEntry) -> ReadyEntry {
        ReadyEntry {
            id: entry.id,
            seq: entry.seq,
            queue: entry.queue,
            priority: entry.priority,
            routing: entry.routing,
            create_time: entry.create_time,
            ready_time: entry.ready_time,
            body: None,
        }
    }
}

/// A queued job as the set keeps it: what dispatch order and the queue
/// filter need, and the record packed. Its pool and labels are its group's,
/// its priority and seq its key's, so a backlog costs no copy of them per
/// job (a job's `Job` is ~0.5 KiB in memory before its strings, its stored
/// encoding ~130 bytes plus the payload).
#[derive(Debug)]
pub struct Queued {
    id: JobKey,
    queue: Arc<str>,
    /// µs since the Unix epoch (see [`Micros`]): half a `SystemTime`.
    create_time: Micros,
    ready_time: Micros,
    body: Option<Body>,
}

/// A time kept to the microsecond in 8 bytes: times before the epoch are
/// the epoch, and the latest is in the year 586,912. The set's times only
/// order and age jobs (a delayed job's key keeps its exact ready time); a
/// job's record keeps its own.
#[derive(Debug, Clone, Copy)]
struct Micros(u64);

impl Micros {
    fn of(t: SystemTime) -> Micros {
        let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        Micros(u64::try_from(since.as_micros()).unwrap_or(u64::MAX))
    }

    fn time(self) -> SystemTime {
        tether::time::later(SystemTime::UNIX_EPOCH, std::time::Duration::from_micros(self.0))
    }
}

impl Queued {
    pub fn id(&self) -> String {
        self.id.to_id()
    }

    /// Whether the set holds the job's full record (else it must be read
    /// from the store before dispatch).
    pub fn has_body(&self) -> bool {
        self.body.is_some()
    }
}

/// A job's full record.
#[derive(Debug)]
enum Body {
    /// The record in the store's encoding.
    Packed(Box<[u8]>),
    /// The record itself, if it did not encode (never expected).
    Full(Box<Job>),
}

/// What a packed record leaves out because the set holds it already:
/// the job's id (its key), queue name (shared) and routing (its group's),
/// about a third of a typical record.
struct Known<'a> {
    id: &'a str,
    queue: &'a str,
    routing: &'a Routing,
}

impl Known<'_> {
    fn restore(&self, job: &mut Job) {
        job.id = self.id.to_string();
        job.spec.queue = self.queue.to_string();
        job.spec.routing = self.routing.clone();
    }
}

impl Body {
    /// Encodes `job`, less what the set holds already, through `scratch`,
    /// into an allocation of its exact size.
    fn pack(mut job: Box<Job>, scratch: &mut Vec<u8>) -> Body {
        let id = std::mem::take(&mut job.id);
        let queue = std::mem::take(&mut job.spec.queue);
        let routing = std::mem::take(&mut job.spec.routing);
        match encode_job_into(scratch, &job) {
            Ok(()) => Body::Packed(Box::from(scratch.as_slice())),
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "queued job kept unpacked");
                Known { id: &id, queue: &queue, routing: &routing }.restore(&mut job);
                Body::Full(job)
            }
        }
    }

    /// The record, or `None` (then it is read from the store) if it does
    /// not decode (never expected: the set encoded it).
    fn unpack(self, known: &Known<'_>) -> Option<Box<Job>> {
        match self {
            Body::Full(job) => Some(job),
            Body::Packed(bytes) => Self::decode(&bytes, known).map(Box::new),
        }
    }

    fn job(&self, known: &Known<'_>) -> Option<Job> {
        match self {
            Body::Full(job) => Some(Job::clone(job)),
            Body::Packed(bytes) => Self::decode(bytes, known),
        }
    }

    fn decode(bytes: &[u8], known: &Known<'_>) -> Option<Job> {
        match decode_job(bytes) {
            Ok(mut job) => {
                known.restore(&mut job);
                Some(job)
            }
            Err(e) => {
                tracing::error!(job = %known.id, error = %e, "queued job's packed record does not decode");
                None
            }
        }
    }
}

/// Largest encode buffer kept between jobs.
const SCRATCH_KEPT: usize = 64 << 10;

#[derive(Debug, Clone)]
enum Location {
    /// Group, key.
    Ready(u64, ReadyKey),
    Delayed((SystemTime, u64)),
}

type Labels = BTreeMap<String, String>;

/// The dispatchable jobs of one pool that require the same labels.
#[derive(Debug)]
struct Group {
    pool: String,
    labels: Labels,
    jobs: BTreeMap<ReadyKey, Queued>,
}

/// A pool's groups, by the labels their jobs require.
#[derive(Debug, Default)]
struct PoolReady {
    by_labels: BTreeMap<Labels, u64>,
    len: usize,
}

/// A job waiting for its ready time.
#[derive(Debug)]
struct DelayedJob {
    priority: Priority,
    routing: Routing,
    job: Queued,
}

/// Every queued job the engine tracks.
#[derive(Debug, Default)]
pub struct ReadySet {
    groups: FastMap<u64, Group>,
    next_group: u64,
    pools: FastMap<String, PoolReady>,
    delayed: BTreeMap<(SystemTime, u64), DelayedJob>,
    locations: FastMap<JobKey, Location>,
    /// One shared copy of each queue name jobs of the set are in.
    queues: HashSet<Arc<str>, ahash::RandomState>,
    /// Reused encode buffer.
    scratch: Vec<u8>,
}

impl ReadySet {
    /// Adds a job; it is dispatchable at once if its ready time has come.
    /// Returns true if it is dispatchable now.
    pub fn insert(&mut self, entry: ReadyEntry, now: SystemTime) -> bool {
        // A job is held once: a newer state of it replaces the older one
        // (an entry left behind would be found again and again).
        let key = JobKey::new(&entry.id);
        if self.locations.contains_key(&key) {
            self.remove_key(&key);
        }
        let ReadyEntry { id: _, seq, queue, priority, routing, create_time, ready_time, body } = entry;
        let id = key;
        let queue = self.intern(queue);
        let body = body.map(|job| Body::pack(job, &mut self.scratch));
        if self.scratch.capacity() > SCRATCH_KEPT {
            // A large payload passed through: do not hold its size.
            self.scratch = Vec::new();
        }
        let job = Queued { id, queue, create_time: Micros::of(create_time), ready_time: Micros::of(ready_time), body };
        if ready_time > now {
            let key = (ready_time, seq);
            self.locations.insert(job.id.clone(), Location::Delayed(key));
            if let Some(old) = self.delayed.insert(key, DelayedJob { priority, routing, job }) {
                self.release(old.job);
            }
            false
        } else {
            self.insert_ready(job, seq, priority, routing);
            true
        }
    }

    fn intern(&mut self, queue: String) -> Arc<str> {
        match self.queues.get(queue.as_str()) {
            Some(shared) => shared.clone(),
            None => {
                let shared: Arc<str> = queue.into();
                self.queues.insert(shared.clone());
                shared
            }
        }
    }

    /// Drops a job the set no longer holds, and its queue name with the
    /// queue's last job.
    fn release(&mut self, job: Queued) -> (String, Arc<str>, SystemTime, SystemTime, Option<Body>) {
        let Queued { id, queue, create_time, ready_time, body } = job;
        // This one and the set's own.
        if Arc::strong_count(&queue) <= 2 {
            self.queues.remove(&*queue);
        }
        (id.to_id(), queue, create_time.time(), ready_time.time(), body)
    }

    fn insert_ready(&mut self, job: Queued, seq: u64, priority: Priority, routing: Routing) {
        let key = (Reverse(priority), seq);
        if !self.pools.contains_key(&routing.pool) {
            self.pools.insert(routing.pool.clone(), PoolReady::default());
        }
        let Some(ready) = self.pools.get_mut(&routing.pool) else { return };
        let group = match ready.by_labels.get(&routing.required_labels) {
            Some(&group) => group,
            None => {
                let group = self.next_group;
                self.next_group += 1;
                ready.by_labels.insert(routing.required_labels.clone(), group);
                let Routing { pool, required_labels } = routing;
                self.groups.insert(group, Group { pool, labels: required_labels, jobs: BTreeMap::new() });
                group
            }
        };
        self.locations.insert(job.id.clone(), Location::Ready(group, key));
        let Some(jobs) = self.groups.get_mut(&group).map(|g| &mut g.jobs) else { return };
        match jobs.insert(key, job) {
            None => ready.len += 1,
            Some(old) => {
                self.release(old);
            }
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.locations.contains_key(&JobKey::new(id))
    }

    /// How many dispatchable jobs of the job's pool come before it in
    /// dispatch order (whatever labels they require), counted up to `cap`
    /// (then `true`: at least that many); `None` unless it is dispatchable.
    pub fn ahead_of(&self, id: &str, cap: u64) -> Option<(u64, bool)> {
        let Some(Location::Ready(group, key)) = self.locations.get(&JobKey::new(id)) else { return None };
        let pool = &self.groups.get(group)?.pool;
        let mut ahead = 0;
        for group in self.pools.get(pool)?.by_labels.values().filter_map(|g| self.groups.get(g)) {
            for _ in group.jobs.range(..*key) {
                ahead += 1;
                if ahead >= cap {
                    return Some((ahead, true));
                }
            }
        }
        Some((ahead, false))
    }

    /// Whether the set holds the job with its full record (it does not
    /// for jobs loaded at start-up or found by a sweep).
    pub fn has_record(&self, id: &str) -> bool {
        let queued = match self.locations.get(&JobKey::new(id)) {
            Some(Location::Ready(group, key)) => self.groups.get(group).and_then(|g| g.jobs.get(key)),
            Some(Location::Delayed(key)) => self.delayed.get(key).map(|d| &d.job),
            None => None,
        };
        queued.is_some_and(Queued::has_body)
    }

    /// The job's full record, if the set holds it (not for jobs loaded at
    /// start-up).
    pub fn job(&self, id: &str) -> Option<Job> {
        let (queued, routing) = match self.locations.get(&JobKey::new(id))? {
            Location::Ready(group, key) => {
                let group = self.groups.get(group)?;
                let routing = Routing { pool: group.pool.clone(), required_labels: group.labels.clone() };
                (group.jobs.get(key)?, routing)
            }
            Location::Delayed(key) => {
                let delayed = self.delayed.get(key)?;
                (&delayed.job, delayed.routing.clone())
            }
        };
        queued.body.as_ref()?.job(&Known { id, queue: &queued.queue, routing: &routing })
    }

    pub fn remove(&mut self, id: &str) -> Option<ReadyEntry> {
        self.remove_key(&JobKey::new(id))
    }

    fn remove_key(&mut self, key: &JobKey) -> Option<ReadyEntry> {
        let (job, seq, priority, routing) = match self.locations.remove(key)? {
            Location::Ready(group_no, key) => {
                let group = self.groups.get_mut(&group_no)?;
                let job = group.jobs.remove(&key)?;
                let routing = Routing { pool: group.pool.clone(), required_labels: group.labels.clone() };
                if group.jobs.is_empty() {
                    self.groups.remove(&group_no);
                    if let Some(ready) = self.pools.get_mut(&routing.pool) {
                        ready.by_labels.remove(&routing.required_labels);
                        if ready.by_labels.is_empty() {
                            self.pools.remove(&routing.pool);
                        }
                    }
                }
                if let Some(ready) = self.pools.get_mut(&routing.pool) {
                    ready.len -= 1;
                }
                (job, key.1, key.0 .0, routing)
            }
            Location::Delayed(key) => {
                let DelayedJob { priority, routing, job } = self.delayed.remove(&key)?;
                (job, key.1, priority, routing)
            }
        };
        let (id, queue, create_time, ready_time, body) = self.release(job);
        let body = body.and_then(|b| b.unpack(&Known { id: &id, queue: &queue, routing: &routing }));
        Some(ReadyEntry { id, seq, queue: queue.to_string(), priority, routing, create_time, ready_time, body })
    }

    /// Moves every delayed job whose time has come into its pool; returns
    /// the pools that gained jobs.
    pub fn promote_due(&mut self, now: SystemTime) -> Vec<String> {
        let mut pools = Vec::new();
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let seq = entry.key().1;
            let DelayedJob { priority, routing, job } = entry.remove();
            if !pools.contains(&routing.pool) {
                pools.push(routing.pool.clone());
            }
            self.insert_ready(job, seq, priority, routing);
        }
        pools
    }

    /// When the next delayed job becomes dispatchable.
    pub fn next_due(&self) -> Option<SystemTime> {
        self.delayed.first_key_value().map(|((t, _), _)| *t)
    }

    /// The first dispatchable job of `pool` that an agent with `labels` may
    /// run (and, if given, of `queue`), in dispatch order.
    pub fn first_match(&self, pool: &str, labels: &BTreeMap<String, String>, queue: Option<&str>) -> Option<&Queued> {
        // The head of each group whose required labels the agent has.
        self.pools
            .get(pool)?
            .by_labels
            .iter()
            .filter(|(required, _)| required.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .filter_map(|(_, group)| self.groups.get(group))
            .filter_map(|group| group.jobs.iter().find(|(_, e)| queue.is_none_or(|q| q == &*e.queue)))
            .min_by_key(|(key, _)| **key)
            .map(|(_, e)| e)
    }

    /// The pools with dispatchable jobs.
    pub fn pools(&self) -> Vec<String> {
        self.pools.keys().cloned().collect()
    }

    /// Dispatchable jobs of `pool`.
    pub fn ready_in_pool(&self, pool: &str) -> usize {
        self.pools.get(pool).map_or(0, |p| p.len)
    }

    /// Create time of the oldest dispatchable job (of `queue`, if given).
    /// Within a priority, dispatch order is enqueue order, so each
    /// priority's first (matching) entry is its oldest.
    pub fn oldest_ready(&self, queue: Option<&str>) -> Option<SystemTime> {
        if self.is_empty() {
            return None;
        }
        self.groups
            .values()
            .flat_map(|group| {
                Priority::ALL.into_iter().filter_map(move |p| {
                    group
                        .jobs
                        .range((Reverse(p), 0)..=(Reverse(p), u64::MAX))
                        .map(|(_, e)| e)
                        .find(|e| queue.is_none_or(|q| q == &*e.queue))
                        .map(|e| e.create_time.time())
                })
            })
            .min()
    }

    pub fn len(&self) -> usize {
        self.locations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.locations.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(id: &str, seq: u64, priority: Priority, ready_in: u64, labels: &[(&str, &str)]) -> ReadyEntry {
        let t0 = SystemTime::UNIX_EPOCH;
        ReadyEntry {
            id: id.into(),
            seq,
            queue: "q".into(),
            priority,
            routing: Routing {
                pool: "p".into(),
                required_labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            },
            create_time: t0,
            ready_time: t0 + Duration::from_secs(ready_in),
            body: None,
        }
    }

    #[test]
    fn times_are_kept_to_the_microsecond() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(Micros::of(t).time(), SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_000));
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(Micros::of(before).time(), SystemTime::UNIX_EPOCH);
        let last = Micros::of(tether::time::latest()).time();
        assert!(last <= tether::time::latest() && last + Duration::from_micros(1) > tether::time::latest());
        assert_eq!(std::mem::size_of::<Micros>(), 8);
    }

    #[test]
    fn full_records_come_back_whole() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut set = ReadySet::default();
        let ready = crate::store::conformance::job("ready", 1, "q", Some("key"));
        let mut delayed = crate::store::conformance::job("delayed", 2, "q", None);
        delayed.ready_time = now + Duration::from_secs(5);
        set.insert(ReadyEntry::from_job(ready.clone()), now);
        set.insert(ReadyEntry::from_job(delayed.clone()), now);
        assert_eq!(set.job("ready"), Some(ready.clone()));
        assert_eq!(set.job("delayed"), Some(delayed.clone()));
        assert!(matches!(set.remove("ready"), Some(ReadyEntry { body: Some(b), .. }) if *b == ready));
        set.promote_due(now + Duration::from_secs(5));
        let back = set.remove("delayed");
        assert!(matches!(back, Some(ReadyEntry { body: Some(ref b), .. }) if **b == delayed));
        assert_eq!(back.map(|e| e.routing), Some(delayed.spec.routing));
        // Jobs loaded at start-up have no record in memory.
        set.insert(ReadyEntry::from_stored(QueuedEntry::of(&ready)), now);
        assert_eq!(set.job("ready"), None);
    }

    #[test]
    fn a_backlog_keeps_one_copy_of_its_routing_and_queue_name() {
        let now = SystemTime::UNIX_EPOCH;
        let mut set = ReadySet::default();
        for i in 0..100 {
            set.insert(entry(&format!("j{i}"), i, Priority::Normal, 0, &[("gpu", "true")]), now);
        }
        assert_eq!(set.groups.len(), 1, "one group per pool and labels");
        assert_eq!(set.queues.len(), 1);
        let queue = set.queues.iter().next().cloned();
        assert_eq!(queue.as_ref().map(Arc::strong_count), Some(102), "every job shares the set's copy");
        drop(queue);
        let removed = set.remove("j0");
        assert_eq!(
            removed.map(|e| (e.queue, e.routing.pool, e.routing.required_labels.len())),
            Some(("q".into(), "p".into(), 1))
        );
        for i in 1..100 {
            assert!(set.remove(&format!("j{i}")).is_some());
        }
        assert!(set.is_empty());
        assert!(set.groups.is_empty() && set.pools.is_empty(), "no empty groups left behind");
        assert!(set.queues.is_empty(), "no queue name kept without jobs");
    }

    #[test]
    fn dispatch_order_is_priority_then_fifo() {
        let now = SystemTime::UNIX_EPOCH;
        let mut set = ReadySet::default();
        set.insert(entry("a", 1, Priority::Normal, 0, &[]), now);
        set.insert(entry("b", 2, Priority::Critical, 0, &[]), now);
        set.insert(entry("c", 3, Priority::Normal, 0, &[]), now);
        let labels = BTreeMap::new();
        let mut order = Vec::new();
        while let Some(e) = set.first_match("p", &labels, None) {
            let id = e.id();
            set.remove(&id);
            order.push(id);
        }
        assert_eq!(order, ["b", "a", "c"]);
        assert!(set.is_empty());
    }

    #[test]
    fn delayed_jobs_become_ready_when_due() {
        let now = SystemTime::UNIX_EPOCH;
        let mut set = ReadySet::default();
        assert!(!set.insert(entry("a", 1, Priority::Normal, 10, &[]), now));
        assert!(set.first_match("p", &BTreeMap::new(), None).is_none());
        assert_eq!(set.next_due(), Some(now + Duration::from_secs(10)));
        assert!(set.promote_due(now + Duration::from_secs(9)).is_empty());
        assert_eq!(set.promote_due(now + Duration::from_secs(10)), vec!["p".to_string()]);
        assert_eq!(set.first_match("p", &BTreeMap::new(), None).map(|e| e.id()).as_deref(), Some("a"));
    }

    #[test]
    fn jobs_waiting_for_a_label_do_not_hide_later_jobs_or_reorder_them() {
        let now = SystemTime::UNIX_EPOCH;
        let mut set = ReadySet::default();
        for i in 0..1000 {
            set.insert(entry(&format!("gpu{i}"), i, Priority::Normal, 0, &[("gpu", "true")]), now);
        }
        set.insert(entry("plain", 1000, Priority::Normal, 0, &[]), now);
        set.insert(entry("linux", 1001, Priority::High, 0, &[("os", "linux")]), now);
        assert_eq!(set.ready_in_pool("p"), 1002);
        let plain = BTreeMap::new();
        let all: BTreeMap<String, String> =
            [("gpu".to_string(), "true".to_string()), ("os".to_string(), "linux".to_string())].into();
        assert_eq!(set.first_match("p", &plain, None).map(|e| e.id()).as_deref(), Some("plain"));
        // Priority first, then enqueue order, across label groups.
        assert_eq!(set.first_match("p", &all, None).map(|e| e.id()).as_deref(), Some("linux"));
        set.remove("linux");
        assert_eq!(set.first_match("p", &all, None).map(|e| e.id()).as_deref(), Some("gpu0"));
        set.remove("plain");
        assert_eq!(set.first_match("p", &plain, None).map(|e| e.id()).as_deref(), None);
        assert_eq!(set.ready_in_pool("p"), 1000);
        for i in 0..1000 {
            assert!(set.remove(&format!("gpu{i}")).is_some());
        }
        assert!(set.is_empty());
        assert!(set.pools.is_empty(), "no empty groups left behind");
    }

    #[test]
    fn labels_route_jobs() {
        let now = SystemTime::UNIX_EPOCH;
        let mut set = ReadySet::default();
        set.insert(entry("gpu", 1, Priority::Normal, 0, &[("gpu", "true")]), now);
        set.insert(entry("any", 2, Priority::Normal, 0, &[]), now);
        let plain = BTreeMap::new();
        let gpu: BTreeMap<String, String> = [("gpu".to_string(), "true".to_string())].into();
        assert_eq!(set.first_match("p", &plain, None).map(|e| e.id()).as_deref(), Some("any"));
        assert_eq!(set.first_match("p", &gpu, None).map(|e| e.id()).as_deref(), Some("gpu"));
    }

    #[test]
    fn oldest_ready_looks_across_priorities_and_queues() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let mut set = ReadySet::default();
        {
            let mut at = |id: &str, seq: u64, priority: Priority, queue: &str, created: u64| {
                let mut e = entry(id, seq, priority, 0, &[]);
                e.queue = queue.into();
                e.create_time = SystemTime::UNIX_EPOCH + Duration::from_secs(created);
                set.insert(e, now);
            };
            at("a", 1, Priority::Low, "q", 10);
            at("b", 2, Priority::Critical, "r", 20);
            at("c", 3, Priority::Critical, "q", 30);
        }
        let secs =
            |t: Option<SystemTime>| t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_secs());
        assert_eq!(secs(set.oldest_ready(None)), Some(10));
        assert_eq!(secs(set.oldest_ready(Some("r"))), Some(20));
        assert_eq!(secs(set.oldest_ready(Some("q"))), Some(10));
        set.remove("a");
        assert_eq!(secs(set.oldest_ready(Some("q"))), Some(30));
        assert_eq!(secs(set.oldest_ready(Some("none"))), None);
    }
}
