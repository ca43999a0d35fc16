//! AgentService: the Connect stream adapter and the agent registry calls.
//! The stream adapter only translates: it validates Hello, hands the session
//! to the engine, forwards the agent's messages and writes the engine's
//! pushes back to the wire.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::{Request, Response, Status, Streaming};

use tether::time::to_duration;
use tether::v1 as pb;
use tether::v1::agent_service_server::AgentService;
use tether::v1::{connect_request, connect_response};

use super::convert::{self, agent_out, job_ref_in, job_ref_out};
use super::page_token::{self, Listing};
use super::session_secrets::{SessionSecrets, Undeliverable};
use super::status::to_status;
use super::stream_messages::{hello_in, inbound_in, push_out};
use crate::domain::{validate, DomainResult, Failure};
use crate::engine::{AgentInbound, AgentListFilter, EngineHandle, HelloInfo};
use crate::secrets::SecretsKey;

/// How long a new stream may take to send its Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
pub use super::stream_messages::MAX_LOG_CHUNK;

/// The AgentService of one engine.
pub struct AgentApi {
    engine: EngineHandle,
    /// Opens jobs' secrets for their Assignments.
    secrets: Option<Arc<SecretsKey>>,
    /// One permit per open Connect stream.
    streams: Arc<Semaphore>,
    max_streams: usize,
}

/// Refused streams are logged at most every 10 s (they come in storms).
static STREAM_CAP_LOG: crate::log_limit::LogLimit = crate::log_limit::LogLimit::new(Duration::from_secs(10));

impl AgentApi {
    pub fn new(engine: EngineHandle, max_streams: usize, secrets: Option<Arc<SecretsKey>>) -> Self {
        let max_streams = max_streams.min(Semaphore::MAX_PERMITS);
        AgentApi { engine, secrets, streams: Arc::new(Semaphore::new(max_streams)), max_streams }
    }
}

type ConnectStream = Pin<Box<dyn Stream<Item = Result<pb::ConnectResponse, Status>> + Send>>;

/// The engine's pushes to one session, ending when the engine drops the
/// session or, with its status, when the reader finds a protocol violation.
fn session_pushes(
    pushed: mpsc::UnboundedReceiver<crate::engine::AgentPush>,
    fatal: oneshot::Receiver<Status>,
    secrets: Arc<SessionSecrets>,
    engine: EngineHandle,
) -> impl Stream<Item = Result<pb::ConnectResponse, Status>> {
    // The state is `None` once the fatal status was sent: nothing follows
    // it. The reader's channel is dropped once the reader ended without a
    // violation; pushes then go on until the engine drops the session.
    futures::stream::unfold(Some((pushed, Some(fatal), secrets, engine)), |state| async move {
        let (mut pushed, mut fatal, secrets, engine) = state?;
        loop {
            let push = match fatal.as_mut() {
                None => pushed.recv().await?,
                Some(reader) => tokio::select! {
                    biased;
                    status = reader => match status {
                        Ok(status) => return Some((Err(status), None)),
                        Err(_) => {
                            fatal = None;
                            continue;
                        }
                    },
                    push = pushed.recv() => push?,
                },
            };
            // A push that is not sent (a job failed for its secrets) is
            // skipped: the next one is waited for.
            if let Some(out) = delivered(push, &secrets, &engine).await {
                return Some((Ok(out), Some((pushed, fatal, secrets, engine))));
            }
        }
    })
}

/// A push on the wire; an Assignment gets its job's secrets. An attempt
/// whose secrets cannot be delivered is failed instead of run without them
/// (`None`: nothing is sent): for good if they cannot be opened, retryably
/// if only this agent is too old for them.
async fn delivered(
    push: crate::engine::AgentPush,
    secrets: &SessionSecrets,
    engine: &EngineHandle,
) -> Option<pb::ConnectResponse> {
    let values = match &push {
        crate::engine::AgentPush::Assign(job) => match secrets.for_assignment(job).await {
            Ok(values) => values,
            Err(undeliverable) => {
                let retryable = matches!(undeliverable, Undeliverable::AgentTooOld { .. });
                let error = undeliverable.to_string();
                if retryable {
                    tracing::warn!(job = %job.id, %error, "failing an attempt instead of running it without its secrets");
                } else {
                    tracing::error!(job = %job.id, %error, "failing a job instead of running it without its secrets");
                }
                let failure = Failure::Reported { retryable, exit_code: None };
                if let Err(e) = engine.fail(job.attempt_ref(), error, failure).await {
                    tracing::warn!(job = %job.id, error = %e, "could not fail the job");
                }
                return None;
            }
        },
        _ => Default::default(),
    };
    let mut out = push_out(push);
    if let Some(connect_response::Message::Assignment(assignment)) = out.message.as_mut() {
        assignment.secrets = values.into_iter().collect();
    }
    Some(out)
}

/// Messages forwarded to the engine in one command at most.
const INBOUND_BATCH: usize = 64;

/// How reading a session's stream ended.
enum ReadEnd {
    /// The agent closed its side or the stream broke.
    Closed,
    /// The stream must end with this status.
    Fatal(Status),
}

async fn read_session(
    engine: EngineHandle,
    secrets: Arc<SessionSecrets>,
    agent_id: String,
    session_id: u64,
    protocol: u32,
    mut inbound: Streaming<pb::ConnectRequest>,
    fatal: oneshot::Sender<Status>,
) {
    let mut batch = Vec::new();
    let end = loop {
        // Wait for one message, then take every one already received
        // (without waiting), so a burst costs the engine one command.
        let mut end = read_one(&mut inbound, protocol, &agent_id, &mut batch).await;
        while end.is_none() && batch.len() < INBOUND_BATCH {
            match futures::FutureExt::now_or_never(read_one(&mut inbound, protocol, &agent_id, &mut batch)) {
                Some(next) => end = next,
                None => break,
            }
        }
        secrets.mask(&mut batch).await;
        if !batch.is_empty() && engine.inbound(agent_id.clone(), session_id, std::mem::take(&mut batch)).await.is_err()
        {
            break ReadEnd::Fatal(Status::unavailable("the server is shutting down; reconnect"));
        }
        if let Some(end) = end {
            break end;
        }
    };
    if let ReadEnd::Fatal(status) = end {
        let _ = fatal.send(status);
    }
    engine.disconnected(agent_id, session_id).await;
}

/// Reads one message into `batch`; `Some` once the stream is over.
async fn read_one(
    inbound: &mut Streaming<pb::ConnectRequest>,
    protocol: u32,
    agent_id: &str,
    batch: &mut Vec<AgentInbound>,
) -> Option<ReadEnd> {
    match inbound.message().await {
        Ok(Some(pb::ConnectRequest { message: Some(message) })) => match inbound_in(message, protocol) {
            Ok(message) => {
                batch.push(message);
                None
            }
            Err(e) => {
                tracing::warn!(agent = %agent_id, error = %e, "closing stream after a protocol violation");
                Some(ReadEnd::Fatal(to_status(e)))
            }
        },
        Ok(Some(pb::ConnectRequest { message: None })) => {
            Some(ReadEnd::Fatal(Status::invalid_argument("invalid message: a ConnectRequest must set one message")))
        }
        Ok(None) => Some(ReadEnd::Closed),
        Err(status) => match decode_failure(status) {
            Ok(status) => {
                tracing::warn!(agent = %agent_id, %status, "closing stream after an undecodable message");
                Some(ReadEnd::Fatal(status))
            }
            Err(status) => {
                tracing::debug!(agent = %agent_id, %status, "agent stream broke");
                Some(ReadEnd::Closed)
            }
        },
    }
}

/// Sorts an error of the inbound stream: `Ok` with the status to end the
/// stream with when the agent sent something the server cannot take (a
/// message over the size limit: RESOURCE_EXHAUSTED; a frame that does not
/// decode: INTERNAL, as gRPC's status table says), `Err` when the transport
/// broke (nobody is left to tell).
fn decode_failure(status: Status) -> Result<Status, Status> {
    // Transport failures (h2 resets, hyper errors) carry their cause; the
    // decoder's own statuses do not.
    if std::error::Error::source(&status).is_some() {
        return Err(status);
    }
    match status.code() {
        // tonic reports an oversize message as OUT_OF_RANGE.
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => Ok(Status::resource_exhausted(format!(
            "message too large: {}; the limit is {} bytes per message",
            status.message(),
            crate::server::MAX_MESSAGE_BYTES
        ))),
        tonic::Code::Internal => Ok(Status::internal(format!("undecodable message: {}", status.message()))),
        _ => Err(status),
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type ConnectStream = ConnectStream;

    async fn connect(
        &self,
        request: Request<Streaming<pb::ConnectRequest>>,
    ) -> Result<Response<ConnectStream>, Status> {
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!(crate::telemetry::AGENT_STREAMS_REFUSED).increment(1);
            if let Some(suppressed) = STREAM_CAP_LOG.check(std::time::Instant::now()) {
                tracing::warn!(
                    max_agent_streams = self.max_streams,
                    suppressed,
                    "refused an agent stream: the server holds its maximum (raise --max-agent-streams or add a replica)"
                );
            }
            Status::resource_exhausted(format!(
                "the server holds its maximum of {} agent streams; retry later or connect to another replica",
                self.max_streams
            ))
        })?;
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Err(_) => return Err(Status::deadline_exceeded(format!("no hello within {HELLO_TIMEOUT:?}"))),
            Ok(Err(status)) => return Err(decode_failure(status).unwrap_or_else(|s| s)),
            Ok(Ok(None)) => return Err(Status::cancelled("the stream closed before its hello")),
            Ok(Ok(Some(first))) => first,
        };
        let Some(connect_request::Message::Hello(hello)) = first.message else {
            return Err(Status::invalid_argument("invalid hello: the first message on the stream must be a hello"));
        };
        let (hello, protocol_version) = hello_in(&hello).map_err(to_status)?;
        let (pushes, pushed) = mpsc::unbounded_channel();
        let welcome = self.engine.connect(hello, pushes).await.map_err(to_status)?;
        let (fatal_tx, fatal_rx) = oneshot::channel();
        let secrets = Arc::new(SessionSecrets::new(self.secrets.clone(), self.engine.clone(), protocol_version));
        tokio::spawn(read_session(
            self.engine.clone(),
            secrets.clone(),
            welcome.agent_id.clone(),
            welcome.session_id,
            protocol_version,
            inbound,
            fatal_tx,
        ));

        let welcome = pb::ConnectResponse {
            message: Some(connect_response::Message::Welcome(pb::Welcome {
                agent_id: welcome.agent_id,
                protocol_version,
                heartbeat_interval: Some(to_duration(welcome.heartbeat_interval)),
                lease_duration: Some(to_duration(welcome.lease_duration)),
                reconnect_grace: Some(to_duration(welcome.reconnect_grace)),
                resumed_jobs: welcome.resumed.iter().map(job_ref_out).collect(),
                abandoned_jobs: welcome.abandoned.iter().map(job_ref_out).collect(),
            })),
        };
        // The welcome goes first; then the engine's pushes, until the engine
        // drops the session (the stream then ends cleanly: e.g. the server
        // stopped) or the reader reports a protocol violation (which ends
        // the stream with that status).
        let counted = crate::telemetry::AgentStreamGuard::open();
        let held = (permit, counted); // released when the stream is dropped
        let pushes = session_pushes(pushed, fatal_rx, secrets, self.engine.clone()).map(move |p| {
            let _held = &held;
            p
        });
        let stream = futures::stream::once(async { Ok(welcome) }).chain(pushes);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn register_agent(
        &self,
        request: Request<pb::RegisterAgentRequest>,
    ) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        let req = request.get_ref();
        let hello = (|| -> DomainResult<HelloInfo> {
            validate::name("name", &req.name, validate::MAX_NAME)?;
            Ok(HelloInfo {
                name: req.name.clone(),
                pool: convert::pool_name_in("pool", &req.pool)?,
                labels: convert::labels_in("labels", &req.labels)?,
                slots: convert::slots_in("slots", req.slots)?,
                version: String::new(),
                running: Vec::new(),
                answer_starts: true,
                reconnects: false,
            })
        })()
        .map_err(to_status)?;
        let (view, created) = self.engine.register_agent(hello).await.map_err(to_status)?;
        Ok(Response::new(pb::RegisterAgentResponse { agent: Some(agent_out(&view)), created }))
    }

    async fn get_agent(&self, request: Request<pb::GetAgentRequest>) -> Result<Response<pb::GetAgentResponse>, Status> {
        let id = convert::required("id", &request.get_ref().id).map_err(to_status)?;
        let view = self.engine.get_agent(id).await.map_err(to_status)?;
        Ok(Response::new(pb::GetAgentResponse { agent: Some(agent_out(&view)) }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let req = request.get_ref();
        let filter = (|| -> DomainResult<AgentListFilter> {
            Ok(AgentListFilter {
                pool: convert::name_filter("pool", &req.pool)?,
                health: convert::health_filter_in("health", &req.health)?,
                labels: convert::labels_in("labels", &req.labels)?,
                after_id: page_token::decode(Listing::Agents, &req.page_token)?,
                limit: validate::page_size("page_size", req.page_size)?,
            })
        })()
        .map_err(to_status)?;
        let page = self.engine.list_agents(filter).await.map_err(to_status)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: page.agents.iter().map(agent_out).collect(),
            next_page_token: page_token::encode(Listing::Agents, page.next_after.as_deref()),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = request.get_ref();
        let agent_id = convert::required("agent_id", &req.agent_id).map_err(to_status)?;
        let running = req
            .running_jobs
            .iter()
            .enumerate()
            .map(|(i, r)| job_ref_in(&format!("running_jobs[{i}]"), Some(r)))
            .collect::<DomainResult<Vec<_>>>()
            .map_err(to_status)?;
        let metrics = convert::metrics_in(req.metrics.as_ref());
        let answer = self.engine.heartbeat(agent_id, metrics, running).await.map_err(to_status)?;
        Ok(Response::new(pb::HeartbeatResponse {
            heartbeat_interval: Some(to_duration(answer.heartbeat_interval)),
            abandoned_jobs: answer.abandoned.iter().map(job_ref_out).collect(),
            drain: answer.drain,
        }))
    }

    async fn update_agent_status(
        &self,
        request: Request<pb::UpdateAgentStatusRequest>,
    ) -> Result<Response<pb::UpdateAgentStatusResponse>, Status> {
        let req = request.into_inner();
        let id = convert::required("id", &req.id).map_err(to_status)?;
        let status = convert::scheduling_in("scheduling_status", req.scheduling_status).map_err(to_status)?;
        let reason = convert::text_in("reason", req.reason).map_err(to_status)?;
        let view = self.engine.update_status(id, status, reason).await.map_err(to_status)?;
        Ok(Response::new(pb::UpdateAgentStatusResponse { agent: Some(agent_out(&view)) }))
    }

    async fn drain_agent(
        &self,
        request: Request<pb::DrainAgentRequest>,
    ) -> Result<Response<pb::DrainAgentResponse>, Status> {
        let req = request.into_inner();
        let id = convert::required("id", &req.id).map_err(to_status)?;
        let reason = convert::text_in("reason", req.reason).map_err(to_status)?;
        let view = self.engine.drain_agent(id, reason).await.map_err(to_status)?;
        Ok(Response::new(pb::DrainAgentResponse { agent: Some(agent_out(&view)) }))
    }

    async fn deregister_agent(
        &self,
        request: Request<pb::DeregisterAgentRequest>,
    ) -> Result<Response<pb::DeregisterAgentResponse>, Status> {
        let id = convert::required("id", &request.get_ref().id).map_err(to_status)?;
        let view = self.engine.deregister_agent(id).await.map_err(to_status)?;
        Ok(Response::new(pb::DeregisterAgentResponse { agent: Some(agent_out(&view)) }))
    }

    async fn create_agent_pool(
        &self,
        request: Request<pb::CreateAgentPoolRequest>,
    ) -> Result<Response<pb::CreateAgentPoolResponse>, Status> {
        let pool = convert::pool_in("pool", request.get_ref().pool.as_ref(), true).map_err(to_status)?;
        let pool = self.engine.create_pool(pool).await.map_err(to_status)?;
        Ok(Response::new(pb::CreateAgentPoolResponse { pool: Some(convert::pool_out(&pool)) }))
    }

    async fn get_agent_pool(
        &self,
        request: Request<pb::GetAgentPoolRequest>,
    ) -> Result<Response<pb::GetAgentPoolResponse>, Status> {
        let name = convert::name_in("name", &request.get_ref().name).map_err(to_status)?;
        let pool = self.engine.get_pool(name).await.map_err(to_status)?;
        Ok(Response::new(pb::GetAgentPoolResponse { pool: Some(convert::pool_out(&pool)) }))
    }

    async fn list_agent_pools(
        &self,
        request: Request<pb::ListAgentPoolsRequest>,
    ) -> Result<Response<pb::ListAgentPoolsResponse>, Status> {
        let req = request.get_ref();
        let limit = validate::page_size("page_size", req.page_size).map_err(to_status)?;
        let after = page_token::decode(Listing::Pools, &req.page_token).map_err(to_status)?;
        let (pools, next) = self.engine.list_pools(after, limit).await.map_err(to_status)?;
        Ok(Response::new(pb::ListAgentPoolsResponse {
            pools: pools.iter().map(convert::pool_out).collect(),
            next_page_token: page_token::encode(Listing::Pools, next.as_deref()),
        }))
    }

    async fn update_agent_pool(
        &self,
        request: Request<pb::UpdateAgentPoolRequest>,
    ) -> Result<Response<pb::UpdateAgentPoolResponse>, Status> {
        let req = request.get_ref();
        let fields = convert::pool_fields_in(req.update_mask.as_ref()).map_err(to_status)?;
        let pool = convert::pool_in("pool", req.pool.as_ref(), false).map_err(to_status)?;
        let pool = self.engine.update_pool(pool, fields).await.map_err(to_status)?;
        Ok(Response::new(pb::UpdateAgentPoolResponse { pool: Some(convert::pool_out(&pool)) }))
    }

    async fn delete_agent_pool(
        &self,
        request: Request<pb::DeleteAgentPoolRequest>,
    ) -> Result<Response<pb::DeleteAgentPoolResponse>, Status> {
        let name = convert::name_in("name", &request.get_ref().name).map_err(to_status)?;
        let pool = self.engine.delete_pool(name).await.map_err(to_status)?;
        Ok(Response::new(pb::DeleteAgentPoolResponse { pool: Some(convert::pool_out(&pool)) }))
    }

    async fn get_pool_scaling_signal(
        &self,
        request: Request<pb::GetPoolScalingSignalRequest>,
    ) -> Result<Response<pb::GetPoolScalingSignalResponse>, Status> {
        let name = convert::name_in("name", &request.get_ref().name).map_err(to_status)?;
        let signal = self.engine.scaling_signal(name).await.map_err(to_status)?;
        Ok(Response::new(convert::scaling_out(&signal, std::time::SystemTime::now())))
    }
}
