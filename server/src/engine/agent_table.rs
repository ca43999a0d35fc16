//! The engine's agents, with an index of those that take work now.
//!
//! Placing a job must not scan the fleet: with 10,000 agents a scan per job
//! costs more than the rest of the dispatch. Every agent that takes work is
//! filed, by pool and by each of its labels, in sets ordered by how good a
//! choice it is (healthy before degraded, most free slots, least recently
//! given work). Picking is the first entry of the smallest set a job's
//! routing names.
//!
//! The index cannot drift from the entries: the only mutable access to an
//! entry is [`AgentMut`], which refiles the entry when it is dropped.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use super::core::AgentEntry;
use super::FastMap;
use crate::domain::{Health, Routing};

/// How good a choice an agent is: smaller is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Rank {
    degraded: bool,
    free_slots: Reverse<usize>,
    last_assigned: u64,
}

impl Rank {
    fn of(entry: &AgentEntry) -> Rank {
        Rank {
            degraded: entry.agent.health == Health::Degraded,
            free_slots: Reverse(entry.free_slots()),
            last_assigned: entry.last_assigned,
        }
    }
}

type Slot = (Rank, Arc<str>);

/// Where an entry is filed in the index: exactly what removing it needs,
/// even after the entry's pool or labels changed.
#[derive(Debug)]
pub(crate) struct Filed {
    rank: Rank,
    pool: String,
    labels: BTreeMap<String, String>,
}

#[derive(Default)]
struct PoolIndex {
    all: BTreeSet<Slot>,
    /// label key -> label value -> agents with that label.
    by_label: FastMap<String, FastMap<String, BTreeSet<Slot>>>,
}

impl PoolIndex {
    fn add(&mut self, labels: &BTreeMap<String, String>, slot: &Slot) {
        self.all.insert(slot.clone());
        for (key, value) in labels {
            let values = match self.by_label.get_mut(key.as_str()) {
                Some(values) => values,
                None => self.by_label.entry(key.clone()).or_default(),
            };
            let set = match values.get_mut(value.as_str()) {
                Some(set) => set,
                None => values.entry(value.clone()).or_default(),
            };
            set.insert(slot.clone());
        }
    }

    fn remove(&mut self, labels: &BTreeMap<String, String>, slot: &Slot) {
        self.all.remove(slot);
        for (key, value) in labels {
            let Some(values) = self.by_label.get_mut(key.as_str()) else { continue };
            if let Some(set) = values.get_mut(value.as_str()) {
                set.remove(slot);
                if set.is_empty() {
                    values.remove(value.as_str());
                }
            }
            if values.is_empty() {
                self.by_label.remove(key.as_str());
            }
        }
    }

    /// Moves one agent to a new rank in every set it is in, without
    /// emptying (and so freeing and reallocating) any of them.
    fn rerank(&mut self, labels: &BTreeMap<String, String>, id: &Arc<str>, from: Rank, to: Rank) {
        let old = (from, id.clone());
        let new = (to, id.clone());
        self.all.remove(&old);
        self.all.insert(new.clone());
        for (key, value) in labels {
            if let Some(set) = self.by_label.get_mut(key.as_str()).and_then(|v| v.get_mut(value.as_str())) {
                set.remove(&old);
                set.insert(new.clone());
            }
        }
    }
}

/// Agents that take work, by pool and label, best first.
#[derive(Default)]
struct FreeAgents {
    pools: FastMap<String, PoolIndex>,
}

impl FreeAgents {
    /// Files `entry` where its current state says, or takes it out.
    fn refile(&mut self, entry: &mut AgentEntry) {
        let wanted = entry.takes_work().then(|| Rank::of(entry));
        let same_place =
            entry.filed.as_ref().is_some_and(|f| f.pool == entry.agent.pool && f.labels == entry.agent.labels);
        match (entry.filed.as_mut(), wanted) {
            (Some(filed), Some(rank)) if same_place => {
                if filed.rank != rank {
                    if let Some(pool) = self.pools.get_mut(filed.pool.as_str()) {
                        pool.rerank(&filed.labels, &entry.key, filed.rank, rank);
                    }
                    filed.rank = rank;
                }
            }
            (_, wanted) => {
                if let Some(filed) = entry.filed.take() {
                    if let Some(pool) = self.pools.get_mut(filed.pool.as_str()) {
                        pool.remove(&filed.labels, &(filed.rank, entry.key.clone()));
                        if pool.all.is_empty() {
                            self.pools.remove(filed.pool.as_str());
                        }
                    }
                }
                if let Some(rank) = wanted {
                    let filed = Filed { rank, pool: entry.agent.pool.clone(), labels: entry.agent.labels.clone() };
                    self.pools.entry(filed.pool.clone()).or_default().add(&filed.labels, &(rank, entry.key.clone()));
                    entry.filed = Some(filed);
                }
            }
        }
    }

    /// Free agents of `pool` that may match `routing`, best first: all of
    /// the pool's, or those with the rarest of the required labels.
    fn candidates<'a>(&'a self, routing: &Routing) -> impl Iterator<Item = &'a Arc<str>> + 'a {
        let pool = self.pools.get(routing.pool.as_str());
        let mut smallest = pool.map(|p| &p.all);
        if let Some(p) = pool {
            for (key, value) in &routing.required_labels {
                // A label no free agent has: nobody can take the job now.
                let set = p.by_label.get(key.as_str()).and_then(|v| v.get(value.as_str()));
                match (set, smallest) {
                    (None, _) => smallest = None,
                    (Some(set), Some(current)) if set.len() < current.len() => smallest = Some(set),
                    _ => {}
                }
                if smallest.is_none() {
                    break;
                }
            }
        }
        smallest.into_iter().flatten().map(|(_, id)| id)
    }
}

/// Every agent the engine knows, by id.
#[derive(Default)]
pub(crate) struct AgentTable {
    entries: FastMap<String, AgentEntry>,
    free: FreeAgents,
}

impl AgentTable {
    pub fn get(&self, id: &str) -> Option<&AgentEntry> {
        self.entries.get(id)
    }

    /// Mutable access; the index follows the entry when the guard drops.
    pub fn get_mut(&mut self, id: &str) -> Option<AgentMut<'_>> {
        let entry = self.entries.get_mut(id)?;
        Some(AgentMut { entry, free: &mut self.free })
    }

    /// Adds (or replaces) the entry under its agent's id.
    pub fn insert(&mut self, mut entry: AgentEntry) {
        if let Some(mut old) = self.entries.remove(entry.agent.id.as_str()) {
            old.session = None;
            self.free.refile(&mut old);
        }
        self.free.refile(&mut entry);
        self.entries.insert(entry.agent.id.clone(), entry);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn values(&self) -> impl Iterator<Item = &AgentEntry> {
        self.entries.values()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &AgentEntry)> {
        self.entries.iter()
    }

    /// The agent that should get a job with `routing` now: one that takes
    /// work and matches, healthy before degraded, most free slots first,
    /// then the one that got work least recently.
    pub fn pick(&self, routing: &Routing) -> Option<Arc<str>> {
        self.free
            .candidates(routing)
            .find(|id| self.entries.get(&***id).is_some_and(|e| routing.matches(&e.agent.pool, &e.agent.labels)))
            .cloned()
    }

    /// The free agents of a pool, best first.
    pub fn free_in_pool(&self, pool: &str) -> Vec<Arc<str>> {
        let routing = Routing { pool: pool.to_string(), ..Default::default() };
        self.free.candidates(&routing).cloned().collect()
    }
}

/// An entry borrowed for change; dropping it refiles the entry.
pub(crate) struct AgentMut<'a> {
    entry: &'a mut AgentEntry,
    free: &'a mut FreeAgents,
}

impl Deref for AgentMut<'_> {
    type Target = AgentEntry;
    fn deref(&self) -> &AgentEntry {
        self.entry
    }
}

impl DerefMut for AgentMut<'_> {
    fn deref_mut(&mut self) -> &mut AgentEntry {
        self.entry
    }
}

impl Drop for AgentMut<'_> {
    fn drop(&mut self) {
        self.free.refile(self.entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Agent, SchedulingStatus};
    use crate::engine::core::{InFlight, Session};
    use proptest::prelude::*;
    use std::time::SystemTime;

    fn agent(id: &str, pool: &str, labels: &[(&str, &str)], slots: u32) -> AgentEntry {
        let agent = Agent {
            id: id.to_string(),
            name: id.to_string(),
            pool: pool.to_string(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            slots,
            health: Health::Healthy,
            health_reason: String::new(),
            scheduling: SchedulingStatus::Active,
            version: String::new(),
            create_time: SystemTime::UNIX_EPOCH,
            last_seen_time: SystemTime::UNIX_EPOCH,
            metrics: Default::default(),
        };
        let mut entry = AgentEntry::new(agent);
        let (pushes, _) = tokio::sync::mpsc::unbounded_channel();
        entry.session = Some(Session { id: 1, pushes, answer_starts: false, reconnects: false, moving: false });
        entry
    }

    fn routing(pool: &str, labels: &[(&str, &str)]) -> Routing {
        Routing {
            pool: pool.to_string(),
            required_labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    /// What the index must agree with: the scan it replaced.
    fn scan(table: &AgentTable, routing: &Routing) -> Option<String> {
        table
            .values()
            .filter(|a| a.takes_work() && routing.matches(&a.agent.pool, &a.agent.labels))
            .min_by_key(|a| (Rank::of(a), a.key.clone()))
            .map(|a| a.agent.id.clone())
    }

    fn occupy(entry: &mut AgentEntry, token: u64) {
        entry.in_flight.insert(format!("j{token}"), InFlight { attempt: 1, token, acked: false });
    }

    #[test]
    fn picks_the_freest_then_least_recently_assigned_agent() {
        let mut table = AgentTable::default();
        table.insert(agent("a", "p", &[], 2));
        table.insert(agent("b", "p", &[], 2));
        table.get_mut("a").expect("a").last_assigned = 5;
        assert_eq!(table.pick(&routing("p", &[])).as_deref(), Some("b"));
        occupy(&mut table.get_mut("b").expect("b"), 1);
        assert_eq!(table.pick(&routing("p", &[])).as_deref(), Some("a"), "more free slots wins");
        table.get_mut("a").expect("a").agent.health = Health::Degraded;
        assert_eq!(table.pick(&routing("p", &[])).as_deref(), Some("b"), "healthy before degraded");
        assert_eq!(table.pick(&routing("other", &[])), None);
    }

    #[test]
    fn an_agent_that_stops_taking_work_leaves_the_index() {
        let mut table = AgentTable::default();
        table.insert(agent("a", "p", &[("os", "linux")], 1));
        occupy(&mut table.get_mut("a").expect("a"), 1);
        assert_eq!(table.pick(&routing("p", &[])), None, "no free slot");
        table.get_mut("a").expect("a").in_flight.clear();
        assert_eq!(table.pick(&routing("p", &[("os", "linux")])).as_deref(), Some("a"));
        table.get_mut("a").expect("a").draining = true;
        assert_eq!(table.pick(&routing("p", &[])), None, "draining");
        table.get_mut("a").expect("a").draining = false;
        table.get_mut("a").expect("a").session = None;
        assert_eq!(table.pick(&routing("p", &[])), None, "disconnected");
        assert!(table.free.pools.is_empty(), "nothing left behind: {:?}", table.free.pools.keys().collect::<Vec<_>>());
    }

    #[test]
    fn changed_labels_refile_the_agent() {
        let mut table = AgentTable::default();
        table.insert(agent("a", "p", &[("os", "linux")], 1));
        {
            let mut a = table.get_mut("a").expect("a");
            a.agent.labels.clear();
            a.agent.labels.insert("os".into(), "mac".into());
        }
        assert_eq!(table.pick(&routing("p", &[("os", "linux")])), None);
        assert_eq!(table.pick(&routing("p", &[("os", "mac")])).as_deref(), Some("a"));
        assert_eq!(table.pick(&routing("p", &[("os", "mac"), ("gpu", "yes")])), None, "a label nobody has");
    }

    /// One change to one agent of a small fleet.
    #[derive(Debug, Clone)]
    enum Change {
        Occupy(usize),
        Free(usize),
        Assigned(usize, u64),
        Health(usize, bool),
        Draining(usize, bool),
        Connected(usize, bool),
        Labels(usize, u8),
        Slots(usize, u32),
    }

    fn change() -> impl Strategy<Value = Change> {
        let i = 0usize..6;
        prop_oneof![
            i.clone().prop_map(Change::Occupy),
            i.clone().prop_map(Change::Free),
            (i.clone(), 0u64..4).prop_map(|(i, t)| Change::Assigned(i, t)),
            (i.clone(), any::<bool>()).prop_map(|(i, d)| Change::Health(i, d)),
            (i.clone(), any::<bool>()).prop_map(|(i, d)| Change::Draining(i, d)),
            (i.clone(), any::<bool>()).prop_map(|(i, c)| Change::Connected(i, c)),
            (i.clone(), 0u8..4).prop_map(|(i, l)| Change::Labels(i, l)),
            (i, 0u32..3).prop_map(|(i, s)| Change::Slots(i, s)),
        ]
    }

    fn labels(code: u8) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        if code & 1 != 0 {
            labels.insert("os".to_string(), "linux".to_string());
        }
        if code & 2 != 0 {
            labels.insert("gpu".to_string(), "yes".to_string());
        }
        labels
    }

    proptest! {
        /// After any sequence of changes, picking from the index agrees
        /// with scanning every agent, for every routing.
        #[test]
        fn the_index_agrees_with_a_scan(changes in proptest::collection::vec(change(), 0..60)) {
            let mut table = AgentTable::default();
            for i in 0..6 {
                let pool = if i % 3 == 0 { "q" } else { "p" };
                table.insert(agent(&format!("a{i}"), pool, &[], 2));
            }
            let mut token = 0;
            for c in changes {
                let id = |i: usize| format!("a{i}");
                match c {
                    Change::Occupy(i) => {
                        token += 1;
                        occupy(&mut table.get_mut(&id(i)).expect("agent"), token);
                    }
                    Change::Free(i) => {
                        let mut a = table.get_mut(&id(i)).expect("agent");
                        if let Some(t) = a.in_flight.keys().next().cloned() {
                            a.in_flight.remove(&t);
                        }
                    }
                    Change::Assigned(i, t) => table.get_mut(&id(i)).expect("agent").last_assigned = t,
                    Change::Health(i, degraded) => {
                        table.get_mut(&id(i)).expect("agent").agent.health =
                            if degraded { Health::Degraded } else { Health::Healthy };
                    }
                    Change::Draining(i, d) => table.get_mut(&id(i)).expect("agent").draining = d,
                    Change::Connected(i, c) => {
                        let mut a = table.get_mut(&id(i)).expect("agent");
                        a.session = c.then(|| {
                            let (pushes, _) = tokio::sync::mpsc::unbounded_channel();
                            Session { id: 1, pushes, answer_starts: false, reconnects: false, moving: false }
                        });
                    }
                    Change::Labels(i, l) => table.get_mut(&id(i)).expect("agent").agent.labels = labels(l),
                    Change::Slots(i, s) => table.get_mut(&id(i)).expect("agent").agent.slots = s,
                }
                for pool in ["p", "q"] {
                    for code in 0..4 {
                        let r = Routing { pool: pool.to_string(), required_labels: labels(code) };
                        let picked = table.pick(&r).map(|id| id.to_string());
                        let expected = scan(&table, &r);
                        // Equal ranks may tie between agents; the index
                        // breaks ties by id as the scan here does.
                        prop_assert_eq!(picked, expected, "routing {:?}", r);
                    }
                }
            }
        }
    }
}
