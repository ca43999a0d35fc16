//! Observing and steering a running agent from outside.

use std::sync::Arc;

use tokio::sync::watch;

use crate::error::AgentError;
use crate::state::Shared;

/// The agent's connection state, published on every change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentState {
    /// A stream is open and the server has sent Welcome.
    pub connected: bool,
    /// The id from the latest Welcome.
    pub agent_id: Option<String>,
    /// The URL of the server that sent the latest Welcome (one of
    /// [`AgentConfig::servers`](crate::AgentConfig::servers)).
    pub server: Option<String>,
    /// How many Welcomes the agent has had (1 after the first connect,
    /// 2 after the first reconnect, ...).
    pub sessions: u64,
    /// The agent is draining: no new work, leaving once its jobs are done.
    pub draining: bool,
    /// [`Agent::run`](crate::Agent::run) has returned.
    pub stopped: bool,
}

/// A cheap, cloneable handle to a running [`Agent`](crate::Agent).
#[derive(Clone)]
pub struct AgentHandle {
    pub(crate) shared: Arc<Shared>,
}

impl AgentHandle {
    /// Asks the agent to drain: it tells the server, accepts no new work,
    /// finishes its running jobs, waits for their results to be
    /// acknowledged, closes the stream and `run` returns `Ok`.
    pub fn drain(&self) {
        self.shared.request_drain();
    }

    /// The current state.
    pub fn state(&self) -> AgentState {
        self.shared.state.borrow().clone()
    }

    /// A receiver of state changes, e.g. for `wait_for`.
    pub fn subscribe(&self) -> watch::Receiver<AgentState> {
        self.shared.state.subscribe()
    }

    /// The agent id of the latest Welcome.
    pub fn agent_id(&self) -> Option<String> {
        self.shared.state.borrow().agent_id.clone()
    }

    /// The URL of the server that sent the latest Welcome.
    pub fn server(&self) -> Option<String> {
        self.shared.state.borrow().server.clone()
    }

    /// Jobs running now.
    pub fn running_jobs(&self) -> usize {
        self.shared.core().jobs.running_len()
    }

    /// Waits until the agent holds a welcomed stream and returns its id;
    /// [`AgentError::Stopped`] if `run` returns first.
    pub async fn wait_connected(&self) -> Result<String, AgentError> {
        self.wait_sessions(1).await
    }

    /// Waits until the agent is connected on its `n`-th stream (or later),
    /// e.g. `wait_sessions(2)` to see a reconnect; returns the agent id.
    pub async fn wait_sessions(&self, n: u64) -> Result<String, AgentError> {
        let mut rx = self.subscribe();
        let state =
            rx.wait_for(|s| (s.connected && s.sessions >= n) || s.stopped).await.map_err(|_| AgentError::Stopped)?;
        match (&state.agent_id, state.stopped) {
            (Some(id), false) => Ok(id.clone()),
            _ => Err(AgentError::Stopped),
        }
    }

    /// Waits until `run` has returned.
    pub async fn wait_stopped(&self) {
        let mut rx = self.subscribe();
        // The sender lives in `Shared`, which this handle keeps alive, so
        // the wait ends only by the predicate.
        let _ = rx.wait_for(|s| s.stopped).await;
    }
}
