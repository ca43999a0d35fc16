//! Reading queued jobs' records for the dispatcher on a shared store,
//! off the engine's loop.
//!
//! A queued job another replica enqueued is known here only by its routing
//! (from a sweep). Before an agent here can be given it, its record must be
//! read, and by then another replica has often claimed it. Reading on the
//! loop made every command wait a store round trip per such job (tens of
//! seconds behind a swept backlog under load, long enough for leases held
//! here to look dead to other replicas). So the dispatcher takes such
//! entries out of the ready set, reads them in one batched read as a task,
//! and gets them back as `Command::Fetched`. While read, each entry counts
//! against the free slots of the agent it was read for, so a busy loop
//! does not read more jobs than its agents can take.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::ready::ReadyEntry;
use super::{Command, FastMap};
use crate::store::Store;

/// Entries being read, by job id, with the agent each is read for.
#[derive(Default)]
pub(crate) struct Fetches {
    entries: FastMap<String, (ReadyEntry, String)>,
    per_agent: FastMap<String, usize>,
}

impl Fetches {
    pub fn contains(&self, id: &str) -> bool {
        self.entries.contains_key(id)
    }

    /// Slots of `agent` that jobs being read for it will fill.
    pub fn reserved(&self, agent: &str) -> usize {
        self.per_agent.get(agent).copied().unwrap_or(0)
    }

    pub fn start(&mut self, entry: ReadyEntry, agent: &str) {
        *self.per_agent.entry(agent.to_string()).or_insert(0) += 1;
        self.entries.insert(entry.id.clone(), (entry, agent.to_string()));
    }

    /// The entry and agent of a read that came back.
    pub fn finish(&mut self, id: &str) -> Option<(ReadyEntry, String)> {
        let (entry, agent) = self.entries.remove(id)?;
        if let Some(n) = self.per_agent.get_mut(&agent) {
            *n -= 1;
            if *n == 0 {
                self.per_agent.remove(&agent);
            }
        }
        Some((entry, agent))
    }
}

/// Reads `ids` in a task and hands the result back to the engine.
pub(crate) fn spawn(store: Arc<dyn Store>, commands: &mpsc::WeakSender<Command>, ids: Vec<String>) {
    let Some(commands) = commands.upgrade() else { return };
    tokio::spawn(async move {
        let jobs = store.get_jobs(&ids).await;
        let _ = commands.send(Command::Fetched { ids, jobs }).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Priority, Routing};
    use std::time::SystemTime;

    fn entry(id: &str) -> ReadyEntry {
        ReadyEntry {
            id: id.into(),
            seq: 1,
            queue: "q".into(),
            priority: Priority::Normal,
            routing: Routing { pool: "default".into(), required_labels: Default::default() },
            create_time: SystemTime::UNIX_EPOCH,
            ready_time: SystemTime::UNIX_EPOCH,
            body: None,
        }
    }

    #[test]
    fn reads_count_against_their_agent_until_they_come_back() {
        let mut fetches = Fetches::default();
        fetches.start(entry("a"), "agent-1");
        fetches.start(entry("b"), "agent-1");
        fetches.start(entry("c"), "agent-2");
        assert_eq!((fetches.reserved("agent-1"), fetches.reserved("agent-2")), (2, 1));
        assert!(fetches.contains("a"));
        let (back, agent) = fetches.finish("a").expect("being read");
        assert_eq!((back.id.as_str(), agent.as_str()), ("a", "agent-1"));
        assert!(!fetches.contains("a"));
        assert!(fetches.finish("a").is_none(), "a read comes back once");
        assert_eq!(fetches.reserved("agent-1"), 1);
        fetches.finish("b");
        fetches.finish("c");
        assert_eq!((fetches.reserved("agent-1"), fetches.reserved("agent-2")), (0, 0));
        assert!(fetches.per_agent.is_empty());
    }
}
