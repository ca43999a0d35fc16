//! A replica going away: its agents stop getting work and, if their protocol
//! allows it, are told to reconnect elsewhere before the replica drains.
//!
//! Their running jobs keep going: the agent lists them in its next Hello,
//! and the replica it reaches resumes them (on a shared store another
//! replica takes the attempts over; on an exclusive store the same server
//! does after its restart, within the grace period).

use tokio::sync::watch;

use super::core::Engine;
use super::types::AgentPush;

/// Why agents are told to move.
const REASON: &str = "this server is stopping; reconnect to another one";

impl Engine {
    /// Marks every session as moving (no new work), queues a Reconnect for
    /// each that understands it (after the pending writes are durable, so
    /// the replica it reaches reads its jobs' current state) and returns a
    /// count of those sessions still open. Idempotent.
    pub fn leave(&mut self) -> watch::Receiver<usize> {
        if let Some(open) = &self.leaving {
            return open.subscribe();
        }
        let ids: Vec<String> =
            self.agents.iter().filter(|(_, e)| e.session.is_some()).map(|(id, _)| id.clone()).collect();
        let mut told = 0;
        for id in &ids {
            let Some(mut entry) = self.agents.get_mut(id) else { continue };
            let Some(session) = entry.session.as_mut() else { continue };
            session.moving = true;
            let reconnects = session.reconnects;
            drop(entry);
            if reconnects {
                told += 1;
                self.push_after_commit(id, AgentPush::Reconnect { reason: REASON.into() });
            }
        }
        tracing::info!(sessions = ids.len(), told_to_reconnect = told, "leaving: agents get no new work");
        let (open, watcher) = watch::channel(told);
        self.leaving = Some(open);
        watcher
    }

    /// A session told to move has closed.
    pub(super) fn mover_left(&mut self) {
        if let Some(open) = &self.leaving {
            open.send_modify(|n| *n = n.saturating_sub(1));
        }
    }
}
