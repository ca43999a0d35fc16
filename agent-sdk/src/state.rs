//! State shared by the reconnect loop, the current stream and the job tasks.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tether::v1::{connect_request, AgentMetrics, ConnectRequest};
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::handle::AgentState;
use crate::jobs::JobTable;

/// Bytes of log and progress data queued for the stream at most; a handler
/// that logs faster than the stream drains waits instead of growing memory.
pub(crate) const OUTPUT_BUDGET: usize = 4 << 20;

/// One queued outbound message. The permit, if any, returns its share of
/// [`OUTPUT_BUDGET`] once the transport has taken the message.
pub(crate) struct Outbound {
    pub(crate) msg: ConnectRequest,
    pub(crate) _permit: Option<OwnedSemaphorePermit>,
}

/// What the lock protects: the job table and the current stream's sender,
/// together, so "finish a job" and "install a new stream and re-send the
/// pending results" cannot interleave and lose a result.
#[derive(Default)]
pub(crate) struct Core {
    pub(crate) jobs: JobTable,
    tx: Option<mpsc::UnboundedSender<Outbound>>,
}

impl Core {
    /// Queues a message on the current stream; false when there is none
    /// (between streams, or before the Welcome).
    pub(crate) fn send(&self, message: connect_request::Message) -> bool {
        self.send_with_permit(message, None)
    }

    pub(crate) fn send_with_permit(
        &self,
        message: connect_request::Message,
        permit: Option<OwnedSemaphorePermit>,
    ) -> bool {
        let Some(tx) = &self.tx else { return false };
        let msg = ConnectRequest { message: Some(message) };
        tx.send(Outbound { msg, _permit: permit }).is_ok()
    }

    pub(crate) fn connected(&self) -> bool {
        self.tx.is_some()
    }

    pub(crate) fn set_stream(&mut self, tx: Option<mpsc::UnboundedSender<Outbound>>) {
        self.tx = tx;
    }
}

/// Everything an agent's tasks share.
pub(crate) struct Shared {
    core: Mutex<Core>,
    /// Public connection state.
    pub(crate) state: watch::Sender<AgentState>,
    /// Cancelled once the agent should drain (shutdown, handle, or server).
    pub(crate) drain: CancellationToken,
    /// Poked whenever the job table may have become idle.
    pub(crate) idle: Notify,
    /// Bounds queued log/progress bytes, see [`OUTPUT_BUDGET`].
    pub(crate) output_budget: Arc<Semaphore>,
    /// The latest resource sample, refreshed off the hot path.
    pub(crate) metrics: Mutex<AgentMetrics>,
    pub(crate) slots: u32,
    pub(crate) cancel_grace: Duration,
}

impl Shared {
    pub(crate) fn new(slots: u32, cancel_grace: Duration) -> Self {
        Self {
            core: Mutex::new(Core::default()),
            state: watch::Sender::new(AgentState::default()),
            drain: CancellationToken::new(),
            idle: Notify::new(),
            output_budget: Arc::new(Semaphore::new(OUTPUT_BUDGET)),
            metrics: Mutex::new(AgentMetrics::default()),
            slots,
            cancel_grace,
        }
    }

    /// Locks the core. A panic while holding the lock leaves plain data
    /// behind, never a broken invariant worth dying for, so poison is ignored.
    pub(crate) fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts draining (idempotent); the stream tells the server.
    pub(crate) fn request_drain(&self) {
        self.drain.cancel();
        self.state.send_if_modified(|s| !std::mem::replace(&mut s.draining, true));
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.core().jobs.is_idle()
    }

    /// Called after removing anything from the job table.
    pub(crate) fn poke_if_idle(&self, core: &Core) {
        if core.jobs.is_idle() {
            self.idle.notify_one();
        }
    }

    /// A copy of the latest metrics sample with the live job count.
    pub(crate) fn metrics_now(&self, running: usize) -> AgentMetrics {
        let mut m = *self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
        m.running_jobs = u32::try_from(running).unwrap_or(u32::MAX);
        m
    }
}
