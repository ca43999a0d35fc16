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
use std::collections::BTreeMap;

use super::FastMap;
use std::time::SystemTime;

use crate::domain::{Job, Priority, Routing};
use crate::store::QueuedEntry;

/// Dispatch order within a pool: higher priority first, then lower seq.
pub type ReadyKey = (Reverse<Priority>, u64);

/// A queued job. `body` is the full record when the engine has it in memory
/// (jobs enqueued or requeued since start-up); jobs loaded at start-up carry
/// only their routing and are read from the store when dispatched.
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

    fn key(&self) -> ReadyKey {
        (Reverse(self.priority), self.seq)
    }
}

#[derive(Debug, Clone)]
enum Location {
    /// Pool, required labels, key.
    Ready(String, Labels, ReadyKey),
    Delayed((SystemTime, u64)),
}

type Labels = BTreeMap<String, String>;

/// A pool's dispatchable jobs, grouped by the labels they require.
#[derive(Debug, Default)]
struct PoolReady {
    by_labels: BTreeMap<Labels, BTreeMap<ReadyKey, ReadyEntry>>,
    len: usize,
}

/// Every queued job the engine tracks.
#[derive(Debug, Default)]
pub struct ReadySet {
    pools: FastMap<String, PoolReady>,
    delayed: BTreeMap<(SystemTime, u64), ReadyEntry>,
    locations: FastMap<String, Location>,
}

impl ReadySet {
    /// Adds a job; it is dispatchable at once if its ready time has come.
    /// Returns true if it is dispatchable now.
    pub fn insert(&mut self, entry: ReadyEntry, now: SystemTime) -> bool {
        if entry.ready_time > now {
            let key = (entry.ready_time, entry.seq);
            self.locations.insert(entry.id.clone(), Location::Delayed(key));
            self.delayed.insert(key, entry);
            false
        } else {
            let key = entry.key();
            let pool = entry.routing.pool.clone();
            let labels = entry.routing.required_labels.clone();
            self.locations.insert(entry.id.clone(), Location::Ready(pool.clone(), labels.clone(), key));
            let ready = self.pools.entry(pool).or_default();
            if ready.by_labels.entry(labels).or_default().insert(key, entry).is_none() {
                ready.len += 1;
            }
            true
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.locations.contains_key(id)
    }

    pub fn get(&self, id: &str) -> Option<&ReadyEntry> {
        match self.locations.get(id)? {
            Location::Ready(pool, labels, key) => self.pools.get(pool)?.by_labels.get(labels)?.get(key),
            Location::Delayed(key) => self.delayed.get(key),
        }
    }

    pub fn remove(&mut self, id: &str) -> Option<ReadyEntry> {
        match self.locations.remove(id)? {
            Location::Ready(pool, labels, key) => {
                let ready = self.pools.get_mut(&pool)?;
                let jobs = ready.by_labels.get_mut(&labels)?;
                let entry = jobs.remove(&key);
                if entry.is_some() {
                    ready.len -= 1;
                }
                if jobs.is_empty() {
                    ready.by_labels.remove(&labels);
                }
                if ready.by_labels.is_empty() {
                    self.pools.remove(&pool);
                }
                entry
            }
            Location::Delayed(key) => self.delayed.remove(&key),
        }
    }

    /// Moves every delayed job whose time has come into its pool; returns
    /// the pools that gained jobs.
    pub fn promote_due(&mut self, now: SystemTime) -> Vec<String> {
        let mut pools = Vec::new();
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let entry = entry.remove();
            if !pools.contains(&entry.routing.pool) {
                pools.push(entry.routing.pool.clone());
            }
            self.insert(entry, now);
        }
        pools
    }

    /// When the next delayed job becomes dispatchable.
    pub fn next_due(&self) -> Option<SystemTime> {
        self.delayed.first_key_value().map(|((t, _), _)| *t)
    }

    /// The first dispatchable job of `pool` that an agent with `labels` may
    /// run (and, if given, of `queue`), in dispatch order.
    pub fn first_match(
        &self,
        pool: &str,
        labels: &BTreeMap<String, String>,
        queue: Option<&str>,
    ) -> Option<&ReadyEntry> {
        // The head of each group whose required labels the agent has.
        self.pools
            .get(pool)?
            .by_labels
            .iter()
            .filter(|(required, _)| required.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .filter_map(|(_, jobs)| jobs.values().find(|e| queue.is_none_or(|q| q == e.queue)))
            .min_by_key(|e| e.key())
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
        self.pools
            .values()
            .flat_map(|p| p.by_labels.values())
            .flat_map(|map| {
                Priority::ALL.into_iter().filter_map(move |p| {
                    map.range((Reverse(p), 0)..=(Reverse(p), u64::MAX))
                        .map(|(_, e)| e)
                        .find(|e| queue.is_none_or(|q| q == e.queue))
                        .map(|e| e.create_time)
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
    fn dispatch_order_is_priority_then_fifo() {
        let now = SystemTime::UNIX_EPOCH;
        let mut set = ReadySet::default();
        set.insert(entry("a", 1, Priority::Normal, 0, &[]), now);
        set.insert(entry("b", 2, Priority::Critical, 0, &[]), now);
        set.insert(entry("c", 3, Priority::Normal, 0, &[]), now);
        let labels = BTreeMap::new();
        let mut order = Vec::new();
        while let Some(e) = set.first_match("p", &labels, None) {
            let id = e.id.clone();
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
        assert_eq!(set.first_match("p", &BTreeMap::new(), None).map(|e| e.id.as_str()), Some("a"));
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
        assert_eq!(set.first_match("p", &plain, None).map(|e| e.id.as_str()), Some("plain"));
        // Priority first, then enqueue order, across label groups.
        assert_eq!(set.first_match("p", &all, None).map(|e| e.id.as_str()), Some("linux"));
        set.remove("linux");
        assert_eq!(set.first_match("p", &all, None).map(|e| e.id.as_str()), Some("gpu0"));
        set.remove("plain");
        assert_eq!(set.first_match("p", &plain, None).map(|e| e.id.as_str()), None);
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
        assert_eq!(set.first_match("p", &plain, None).map(|e| e.id.as_str()), Some("any"));
        assert_eq!(set.first_match("p", &gpu, None).map(|e| e.id.as_str()), Some("gpu"));
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
