//! The agent: the reconnect loop around [`Session`], plus shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tether::v1::agent_service_client::AgentServiceClient;
use tonic::transport::Endpoint;

use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::connection::{Session, SessionEnd};
use crate::error::AgentError;
use crate::handle::AgentHandle;
use crate::handler::JobHandler;
use crate::metrics::start_sampler;
use crate::state::Shared;

/// HTTP/2 pings find a dead connection (e.g. a vanished server host) that
/// TCP alone would not notice for minutes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A Tether agent: holds one Connect stream (reconnecting with backoff),
/// runs assigned jobs with its [`JobHandler`], and drains on request.
///
/// ```no_run
/// # async fn demo() -> Result<(), tether_agent_sdk::AgentError> {
/// use tether_agent_sdk::{Agent, AgentConfig, JobContext, JobResult};
///
/// let config = AgentConfig::new("http://127.0.0.1:50051", "worker-1").with_slots(4);
/// let agent = Agent::new(config, |job: JobContext| async move {
///     JobResult::success(job.payload().clone())
/// });
/// agent.run(async { let _ = tokio::signal::ctrl_c().await; }).await
/// # }
/// ```
pub struct Agent {
    config: AgentConfig,
    handler: Arc<dyn JobHandler>,
    shared: Arc<Shared>,
}

impl Agent {
    /// An agent with `config` running jobs with `handler`. Nothing happens
    /// until [`run`](Self::run).
    pub fn new<H: JobHandler>(config: AgentConfig, handler: H) -> Self {
        let shared = Arc::new(Shared::new(config.slots, config.cancel_grace));
        Self { config, handler: Arc::new(handler), shared }
    }

    /// A handle to observe the agent and ask it to drain.
    pub fn handle(&self) -> AgentHandle {
        AgentHandle { shared: self.shared.clone() }
    }

    /// Runs until drained: after `shutdown` resolves, after
    /// [`AgentHandle::drain`], or after the server sends Drain, the agent
    /// takes no new work, finishes its jobs, has their results acknowledged,
    /// closes the stream and returns `Ok`.
    ///
    /// Transient failures reconnect with backoff; a refusal no retry can fix
    /// returns [`AgentError::Rejected`]. Dropping the future stops at once
    /// (running jobs are cancelled and their results lost).
    pub async fn run<F>(self, shutdown: F) -> Result<(), AgentError>
    where
        F: Future<Output = ()>,
    {
        let _stopped = StopGuard(&self.shared);
        self.config.validate()?;
        let endpoint = Endpoint::from_shared(self.config.server.clone())?
            .tcp_nodelay(true)
            .connect_timeout(self.config.handshake_timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        // One connection for the agent's life; tonic re-dials it underneath
        // when it breaks.
        let client = AgentServiceClient::new(endpoint.connect_lazy());
        let _sampler = AbortOnDrop(start_sampler(self.shared.clone()).await);

        let session = Session { shared: &self.shared, handler: &self.handler, config: &self.config };
        let mut backoff = Backoff::new(self.config.reconnect.clone());
        tokio::pin!(shutdown);
        let mut shutdown_seen = false;
        loop {
            let end = {
                let stream = session.run(client.clone());
                tokio::pin!(stream);
                loop {
                    tokio::select! {
                        end = &mut stream => break end,
                        _ = &mut shutdown, if !shutdown_seen => {
                            shutdown_seen = true;
                            self.shared.request_drain();
                        }
                    }
                }
            };
            let reason = match end {
                SessionEnd::Drained => return Ok(()),
                SessionEnd::Fatal(e) => {
                    tracing::error!(error = %e, "giving up");
                    return Err(e);
                }
                SessionEnd::Retry { welcomed, reason } => {
                    if welcomed {
                        backoff.reset();
                    }
                    reason
                }
            };
            // Nothing left to report: a draining agent need not come back.
            if self.shared.drain.is_cancelled() && self.shared.is_idle() {
                return Ok(());
            }
            let delay = backoff.next_delay();
            tracing::warn!(%reason, ?delay, "stream ended; reconnecting");
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    _ = &mut shutdown, if !shutdown_seen => {
                        shutdown_seen = true;
                        self.shared.request_drain();
                        if self.shared.is_idle() {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}

/// Marks the agent stopped and cancels whatever still runs, however `run`
/// ends: jobs of a stopped agent could report to no one.
struct StopGuard<'a>(&'a Shared);

impl Drop for StopGuard<'_> {
    fn drop(&mut self) {
        self.0.core().jobs.abandon_all();
        self.0.state.send_modify(|s| {
            s.connected = false;
            s.stopped = true;
        });
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
