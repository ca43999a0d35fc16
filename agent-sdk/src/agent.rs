//! The agent: the reconnect loop around [`Session`], plus shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tether::v1::agent_service_client::AgentServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::connection::{Session, SessionEnd};
use crate::endpoints::{Pause, Rotation};
use crate::error::AgentError;
use crate::handle::AgentHandle;
use crate::handler::JobHandler;
use crate::metrics::start_sampler;
use crate::state::Shared;

/// HTTP/2 pings find a dead connection (e.g. a vanished server host) that
/// TCP alone would not notice for minutes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A Tether agent: holds one Connect stream (reconnecting with backoff,
/// failing over between servers if it has several), runs assigned jobs with
/// its [`JobHandler`], and drains on request.
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
    ///
    /// # Several servers: failover
    ///
    /// With [fallback servers](AgentConfig::fallback_servers) (replicas of
    /// one deployment), every reconnect goes to the *next* endpoint, round
    /// robin, whether the stream broke or the connect failed. Its Hello lists
    /// the jobs still running and the results not yet acknowledged, so that
    /// server resumes them, exactly as on a reconnect to the same server.
    ///
    /// The [backoff](AgentConfig::reconnect) applies per *round*, one attempt
    /// at every endpoint starting after the one that failed:
    ///
    /// - at start, and after a failed connect or handshake, the next
    ///   endpoint of the round is tried at once, so a dead endpoint costs one
    ///   failed connect (at most [`AgentConfig::handshake_timeout`] for one
    ///   that does not answer at all), never a backoff delay;
    /// - once every endpoint of the round has failed, the agent waits the
    ///   backoff delay, which grows per failed round: no endpoint is tried
    ///   twice without a delay in between;
    /// - when a welcomed stream breaks, the backoff restarts and the agent
    ///   waits its first (short, jittered) delay before the next endpoint,
    ///   so the agents of a dead server do not all land on the next one in
    ///   lockstep.
    ///
    /// With a single server every round is one attempt, so this is the
    /// plain backoff between reconnects. A refusal no retry can fix (see
    /// [`is_retryable`](crate::is_retryable)) ends the agent whichever
    /// endpoint sent it: replicas share one store and would refuse alike.
    /// There is no preference for the first endpoint: the agent stays where
    /// it connected until that stream breaks.
    pub async fn run<F>(self, shutdown: F) -> Result<(), AgentError>
    where
        F: Future<Output = ()>,
    {
        let _stopped = StopGuard(&self.shared);
        self.config.validate()?;
        // One lazy connection per endpoint for the agent's life; tonic
        // re-dials it underneath when it breaks.
        let clients = self
            .config
            .servers()
            .map(|url| Ok((url, client(url, self.config.handshake_timeout)?)))
            .collect::<Result<Vec<_>, AgentError>>()?;
        let mut rotation =
            Rotation::new(clients).ok_or_else(|| AgentError::InvalidConfig("no server configured".into()))?;
        let _sampler = AbortOnDrop(start_sampler(self.shared.clone()).await);

        let session = Session { shared: &self.shared, handler: &self.handler, config: &self.config };
        let mut backoff = Backoff::new(self.config.reconnect.clone());
        tokio::pin!(shutdown);
        let mut shutdown_seen = false;
        loop {
            let (server, client) = rotation.current();
            let end = {
                let stream = session.run(server, client.clone());
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
            let (welcomed, moved, reason) = match end {
                SessionEnd::Drained => return Ok(()),
                SessionEnd::Fatal(e) => {
                    tracing::error!(error = %e, %server, "giving up");
                    return Err(e);
                }
                SessionEnd::Retry { welcomed, reason } => (welcomed, false, reason),
                SessionEnd::Moved { reason } => (true, true, reason),
            };
            if welcomed {
                backoff.reset();
            }
            // Nothing left to report: a draining agent need not come back.
            if self.shared.drain.is_cancelled() && self.shared.is_idle() {
                return Ok(());
            }
            let failed = *server;
            let pause = if moved { rotation.moved() } else { rotation.advance(welcomed) };
            let next = rotation.current().0;
            if pause == Pause::None {
                tracing::warn!(%reason, server = %failed, %next, "stream ended; trying the next server");
                continue;
            }
            let delay = backoff.next_delay();
            tracing::warn!(%reason, server = %failed, %next, ?delay, "stream ended; reconnecting");
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

/// A client of `url` over a lazy channel (nothing is dialled until the
/// first call).
fn client(url: &str, connect_timeout: Duration) -> Result<AgentServiceClient<Channel>, AgentError> {
    let endpoint = Endpoint::from_shared(url.to_owned())?
        .tcp_nodelay(true)
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok(AgentServiceClient::new(endpoint.connect_lazy()))
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
