//! Assembles the gRPC server: services, health, reflection, gRPC-Web and
//! CORS, limits, the metrics endpoint and graceful shutdown.
//!
//! In two steps, as tokio-console's `Server::into_parts`: [`Tether::start`]
//! builds the services from their parts, and the caller serves them on a
//! transport it owns, so TLS, auth or rate-limit layers and further
//! services plug in without touching the rest. [`serve`] does both with
//! the default transport.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;
use tower_http::cors::{AllowOrigin, CorsLayer};

use tether::v1::agent_service_server::AgentServiceServer;
use tether::v1::dashboard_service_server::DashboardServiceServer;
use tether::v1::queue_service_server::QueueServiceServer;
use tether::v1::replica_service_server::ReplicaServiceServer;

use crate::clock::Clock;
use crate::engine::{EngineConfig, EngineHandle};
use crate::grpc::{AgentApi, DashboardApi, QueueApi, ReplicaApi};
use crate::store::Store;

/// Largest message the server decodes or encodes.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// How long shutdown waits for streams to end before closing connections.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long shutdown waits for agents told to reconnect elsewhere to close
/// their streams, before it drains (part of `SHUTDOWN_GRACE`).
pub const MOVE_WAIT: Duration = Duration::from_secs(5);

/// What the server is built from.
pub struct ServerParts {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub engine: EngineConfig,
    pub max_agent_streams: usize,
    /// Metrics endpoint and browser access.
    pub ops: Operability,
    /// Membership and wake-ups, for a replica sharing its store with peers.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// Seals and opens jobs' secrets; `None`: jobs with secrets are refused.
    pub secrets: Option<Arc<crate::secrets::SecretsKey>>,
}

/// Operator-facing extras; all off by default.
#[derive(Debug, Default)]
pub struct Operability {
    /// Serve Prometheus metrics (`GET /metrics`) on this listener.
    pub metrics_listener: Option<TcpListener>,
    /// Origins allowed to call the API from a browser (gRPC-Web). Empty:
    /// no CORS headers at all.
    pub cors_allow_origins: Vec<String>,
}

/// Serves on `listener` until `shutdown` resolves, then drains: health goes
/// NOT_SERVING, watch streams end, agents are told to reconnect elsewhere
/// (protocol 3) and given up to `MOVE_WAIT` to leave, the engine commits
/// what it holds and closes the remaining agent sessions, and the server
/// stops.
///
/// The two steps it takes are public, for a caller that owns the transport
/// (TLS, more layers, more services): [`Tether::start`] then
/// [`Tether::into_parts`] and [`Lifecycle::run`].
pub async fn serve(
    listener: TcpListener,
    parts: ServerParts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    let cors = cors_layer(&parts.ops.cors_allow_origins)?;
    let (routes, lifecycle) = Tether::start(parts).await?.into_parts();
    tracing::info!(%addr, "tether server listening");
    lifecycle
        .run(shutdown, move |graceful| {
            default_builder()
                .layer(tower::util::option_layer(cors))
                .layer(tonic_web::GrpcWebLayer::new())
                .add_routes(routes)
                .serve_with_incoming_shutdown(crate::listener::incoming(listener), graceful)
        })
        .await
}

/// The transport settings `serve` uses: no Nagle delay, HTTP/2 keepalive
/// pings that find dead peers, and a cap on streams per connection.
pub fn default_builder() -> Server {
    Server::builder()
        .accept_http1(true)
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(1024))
}

/// How often deployments are checked against their rollout jobs without a
/// wake-up (changes made through other replicas; a lost wake-up).
const DEPLOYMENT_POLL: Duration = Duration::from_secs(1);

/// Step one of serving: the engine runs (with its cluster membership and
/// metrics endpoint, if configured) and the gRPC services exist, but
/// nothing is served yet.
pub struct Tether {
    routes: Routes,
    lifecycle: Lifecycle,
}

/// What keeps a started server's engine and background tasks, and drains
/// them at shutdown.
pub struct Lifecycle {
    engine: EngineHandle,
    health: tonic_health::server::HealthReporter,
    /// Cancelled at shutdown: long-lived watch streams end.
    stopping: CancellationToken,
    supervisor: EngineSupervisor,
    cluster: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
    metrics: Option<(CancellationToken, Vec<tokio::task::JoinHandle<()>>)>,
}

impl Tether {
    /// Starts the engine and builds every service: the API (queue, agents),
    /// the replica-to-replica service, health and reflection.
    pub async fn start(parts: ServerParts) -> anyhow::Result<Tether> {
        let metrics_handle = match parts.ops.metrics_listener {
            Some(_) => Some(crate::telemetry::install()?),
            None => None,
        };
        let (wakes, woken) = match parts.cluster {
            Some(_) => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let (engine, engine_task) =
            EngineHandle::start_with_peers(parts.store, parts.clock.clone(), parts.engine, wakes).await?;
        let cluster = match (parts.cluster, woken) {
            (Some(cluster), Some(woken)) => {
                tracing::info!(replica = %cluster.replica_id, advertise = %cluster.advertise, "joining the cluster");
                let stop = CancellationToken::new();
                let task = crate::cluster::spawn(cluster, parts.clock.clone(), woken, stop.clone());
                Some((stop, task))
            }
            _ => None,
        };
        let supervisor = EngineSupervisor::watch(engine_task);
        let metrics = match (parts.ops.metrics_listener, metrics_handle) {
            (Some(listener), Some(handle)) => {
                let stop = CancellationToken::new();
                let mut tasks = vec![crate::telemetry::spawn_job_metrics(&engine)];
                let server = crate::telemetry::serve_metrics(listener, engine.clone(), handle, stop.clone());
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = server.await {
                        tracing::error!(error = %e, "metrics endpoint failed");
                    }
                }));
                Some((stop, tasks))
            }
            _ => None,
        };

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<QueueServiceServer<QueueApi>>().await;
        health.set_serving::<AgentServiceServer<AgentApi>>().await;
        health.set_serving::<DashboardServiceServer<DashboardApi>>().await;
        health.set_serving::<ReplicaServiceServer<ReplicaApi>>().await;
        health.set_service_status("", tonic_health::ServingStatus::Serving).await;
        follow_engine_health(&engine, &health, supervisor.died.clone());

        let stopping = CancellationToken::new();
        let queue = QueueServiceServer::new(QueueApi::new(engine.clone(), stopping.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let agents =
            AgentServiceServer::new(AgentApi::new(engine.clone(), parts.max_agent_streams, parts.secrets.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let deployments = crate::deploy::Deployments::new(engine.clone(), parts.clock.clone());
        // Its task ends at shutdown, with the streams.
        crate::deploy::follow::spawn(deployments.clone(), DEPLOYMENT_POLL, stopping.clone());
        crate::summary::spawn(engine.clone(), DEPLOYMENT_POLL, stopping.clone());
        let dashboard = DashboardServiceServer::new(DashboardApi::new(
            engine.clone(),
            deployments,
            parts.secrets.clone(),
            stopping.clone(),
        ))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let replicas = ReplicaServiceServer::new(ReplicaApi::new(engine.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let routes = Routes::new(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(queue)
            .add_service(agents)
            .add_service(dashboard)
            .add_service(replicas);
        Ok(Tether { routes, lifecycle: Lifecycle { engine, health, stopping, supervisor, cluster, metrics } })
    }

    /// Step two is the caller's: add the routes to a transport it owns
    /// (`Server::builder().layer(..).add_routes(routes)`) and hand that
    /// to [`Lifecycle::run`].
    pub fn into_parts(self) -> (Routes, Lifecycle) {
        (self.routes, self.lifecycle)
    }
}

impl Lifecycle {
    /// Runs the transport `serve` builds (given the graceful-shutdown
    /// signal to pass to tonic) until `shutdown` resolves, then drains, as
    /// [`serve`] describes. An engine that dies (a panic) ends it at once
    /// with an error, so the process exits non-zero and its supervisor
    /// restarts it, instead of a zombie that answers UNAVAILABLE forever.
    pub async fn run<S, F>(self, shutdown: impl Future<Output = ()> + Send + 'static, serve: S) -> anyhow::Result<()>
    where
        S: FnOnce(BoxFuture<'static, ()>) -> F,
        F: Future<Output = Result<(), tonic::transport::Error>>,
    {
        let Lifecycle { engine, health, stopping, supervisor, cluster, metrics } = self;
        let (drain_engine, drain_health, drain_stopping) = (engine.clone(), health.clone(), stopping.clone());
        let graceful = async move {
            shutdown.await;
            tracing::info!("shutting down: moving agents, draining streams and flushing the store");
            set_not_serving(&drain_health).await;
            drain_stopping.cancel();
            // Agents move to other replicas while this one still answers
            // their results; then it drains what is left.
            let stayed = drain_engine.leave(MOVE_WAIT).await;
            if stayed > 0 {
                tracing::warn!(agents = stayed, "agents told to reconnect elsewhere had not left; draining anyway");
            }
            drain_engine.shutdown().await;
        };
        let server = serve(Box::pin(graceful));
        // Streams that outlive the grace period are cut.
        let result = tokio::select! {
            r = server => r.map_err(anyhow::Error::from),
            () = async { stopping.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => Ok(()),
            () = supervisor.died.cancelled() => {
                set_not_serving(&health).await;
                Err(anyhow::anyhow!("the engine stopped unexpectedly: {}", supervisor.cause()))
            }
        };
        engine.shutdown().await;
        let died = supervisor.died.clone();
        let cause = supervisor.cause.clone();
        supervisor.finished().await;
        // The engine may also die while it flushes after the grace period.
        let result = match result {
            Ok(()) if died.is_cancelled() => {
                let cause = cause.lock().unwrap_or_else(|p| p.into_inner()).clone();
                Err(anyhow::anyhow!("the engine stopped unexpectedly: {cause}"))
            }
            other => other,
        };
        if let Some((stop, task)) = cluster {
            stop.cancel();
            let _ = task.await;
        }
        if let Some((stop, tasks)) = metrics {
            stop.cancel();
            for task in tasks {
                task.abort();
                let _ = task.await;
            }
        }
        tracing::info!("tether server stopped");
        result
    }
}

/// Health follows the engine: NOT_SERVING once its store failed or the
/// engine died.
fn follow_engine_health(engine: &EngineHandle, health: &tonic_health::server::HealthReporter, died: CancellationToken) {
    let mut serving = engine.serving();
    let health = health.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = serving.changed() => {
                    if changed.is_err() || !*serving.borrow() {
                        break;
                    }
                }
                () = died.cancelled() => break,
            }
        }
        set_not_serving(&health).await;
    });
}

/// Watches the engine task: when it panics, records why and cancels
/// `died`.
struct EngineSupervisor {
    died: CancellationToken,
    cause: Arc<std::sync::Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl EngineSupervisor {
    fn watch(engine: tokio::task::JoinHandle<()>) -> EngineSupervisor {
        let died = CancellationToken::new();
        let cause = Arc::new(std::sync::Mutex::new(String::new()));
        let (died_tx, cause_tx) = (died.clone(), cause.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = engine.await {
                let why = if e.is_panic() { panic_message(e.into_panic()) } else { e.to_string() };
                tracing::error!(cause = %why, "the engine task died; the server stops");
                *cause_tx.lock().unwrap_or_else(|p| p.into_inner()) = why;
                died_tx.cancel();
            }
        });
        EngineSupervisor { died, cause, task }
    }

    fn cause(&self) -> String {
        self.cause.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until the engine task has ended (either way).
    async fn finished(self) {
        let _ = self.task.await;
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => format!("panic: {s}"),
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => format!("panic: {s}"),
            Err(_) => "panic".to_string(),
        },
    }
}

/// CORS for gRPC-Web callers from `origins`; none (no CORS headers at all)
/// when the list is empty.
fn cors_layer(origins: &[String]) -> anyhow::Result<Option<CorsLayer>> {
    if origins.is_empty() {
        return Ok(None);
    }
    let origins = origins
        .iter()
        .map(|o| http::HeaderValue::from_str(o).map_err(|_| anyhow::anyhow!("invalid CORS origin {o:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let header = http::HeaderName::from_static;
    Ok(Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([http::Method::POST, http::Method::OPTIONS])
            .allow_headers([
                http::header::CONTENT_TYPE,
                header("x-grpc-web"),
                header("x-user-agent"),
                header("grpc-timeout"),
            ])
            .expose_headers([header("grpc-status"), header("grpc-message"), header("grpc-status-details-bin")])
            .max_age(Duration::from_secs(24 * 3600)),
    ))
}

/// Reflection knows every service served, both reflection versions
/// included, so `grpcurl list` shows them whichever version it speaks.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tether::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
}

async fn set_not_serving(health: &tonic_health::server::HealthReporter) {
    health.set_not_serving::<QueueServiceServer<QueueApi>>().await;
    health.set_not_serving::<AgentServiceServer<AgentApi>>().await;
    health.set_not_serving::<DashboardServiceServer<DashboardApi>>().await;
    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
}
