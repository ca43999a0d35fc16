//! DashboardService: translates wire requests to engine calls and back.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use tether::v1 as pb;
use tether::v1::dashboard_service_server::DashboardService;

use super::convert;
use super::dashboard_convert::{self as dc, job_out};
use super::deploy_convert::{self as deploy_in, deployment_out, environment_out, event_out};
use super::job_logs::{self, LogCursor, LogRequest};
use super::page_token::{self, Listing};
use super::status::to_status;
use super::{summary_convert, watch_events};
use crate::deploy::{records, Deployments};
use crate::domain::dashboard::{self, DashboardSpec, JobListFilter, SecretRef, ShellCommand, DASHBOARD_QUEUE};
use crate::domain::{validate, waiting, DomainError, DomainResult, Job, JobSpec, JobState};
use crate::engine::EngineHandle;
use crate::secrets::{self, SecretsKey};
use crate::store::JobFilter;

/// Store pages one ListJobs call reads at most while its filters skip jobs:
/// a page may come back short, never the call slow.
const MAX_SCANNED_PAGES: usize = 10;

/// A ListJobs page stops growing past this many encoded bytes, well inside
/// the 4 MiB message limit (a job may hold a 64 KiB command, env and its
/// history).
const MAX_PAGE_BYTES: usize = 3 << 20;

/// The DashboardService of one engine.
pub struct DashboardApi {
    engine: EngineHandle,
    deployments: Deployments,
    /// Seals jobs' secrets; `None`: jobs with secrets are refused.
    secrets: Option<Arc<SecretsKey>>,
    /// Cancelled at shutdown, to end log streams.
    stopping: CancellationToken,
}

type LogStream = Pin<Box<dyn Stream<Item = Result<pb::StreamJobLogsResponse, Status>> + Send>>;
type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

impl DashboardApi {
    pub fn new(
        engine: EngineHandle,
        deployments: Deployments,
        secrets: Option<Arc<SecretsKey>>,
        stopping: CancellationToken,
    ) -> Self {
        DashboardApi { engine, deployments, secrets, stopping }
    }

    /// Seals `values` into their record and names it in the job's payload.
    async fn seal_secrets(&self, spec: &mut JobSpec, values: &BTreeMap<String, String>) -> DomainResult<()> {
        let Some(key) = &self.secrets else {
            return Err(DomainError::FailedPrecondition(
                "this server has no secrets key (--secrets-key-file), so it cannot store secrets".into(),
            ));
        };
        let reference = key.reference(spec.idempotency_key.as_deref().map(|k| (k, values)));
        let sealed = key.seal(&reference, values).map_err(|e| DomainError::Internal(e.to_string()))?;
        // A repeated idempotent request finds its record stored: the same
        // values, sealed before.
        records::put(self.engine.store().as_ref(), secrets::COLLECTION, &reference, &sealed, 0).await?;
        let mut command = ShellCommand::from_payload(&spec.payload);
        command.secrets = Some(SecretRef { reference, names: values.keys().cloned().collect() });
        spec.payload = command.to_payload().into();
        if spec.payload.len() > validate::MAX_PAYLOAD_BYTES {
            return Err(dc::too_large(spec.payload.len(), validate::MAX_PAYLOAD_BYTES));
        }
        Ok(())
    }

    /// A stored dashboard job; NOT_FOUND for a queued job that is not one.
    async fn dashboard_job(&self, id: &str) -> DomainResult<Job> {
        let job = self.engine.get_job(id).await?;
        if job.dashboard.is_none() {
            // A queued job of QueueService is not a dashboard job.
            return Err(DomainError::NotFound { kind: "dashboard job", id: id.to_string() });
        }
        Ok(job)
    }

    async fn create(&self, spec: JobSpec, dashboard: DashboardSpec) -> DomainResult<(Job, bool)> {
        self.engine.create_dashboard_job(spec, dashboard).await.map_err(|e| match e {
            // The store's payload limit (DynamoDB's is lower) is the command's.
            DomainError::InvalidArgument { field, reason } if field == "payload" => DomainError::InvalidArgument {
                field: "command".into(),
                reason: format!("with env and working_dir {reason}"),
            },
            other => other,
        })
    }
}

/// Converts a page's deployments (each to what the response holds of it)
/// and cuts them where the response would pass [`MAX_PAGE_BYTES`] (a
/// rollout spec may hold 300 KB), with where the next page starts.
fn within_page_bytes<T: prost::Message>(
    page: crate::deploy::DeploymentPage,
    convert: impl Fn(&crate::domain::deploy::Deployment) -> Vec<T>,
) -> (Vec<T>, Option<String>) {
    let mut bytes = 0;
    let mut out = Vec::with_capacity(page.deployments.len());
    for (i, d) in page.deployments.iter().enumerate() {
        let wire = convert(d);
        bytes += wire.iter().map(prost::Message::encoded_len).sum::<usize>();
        if i > 0 && bytes > MAX_PAGE_BYTES {
            // Resume after the last one sent.
            let next = page.deployments[i - 1].id.split_once('/').map(|(_, unique)| unique.to_string());
            return (out, next);
        }
        out.extend(wire);
    }
    (out, page.next)
}

fn out(job: &Job) -> Result<pb::Job, Status> {
    job_out(job).ok_or_else(|| Status::internal(format!("job {} lost its dashboard record", job.id)))
}

#[tonic::async_trait]
impl DashboardService for DashboardApi {
    async fn create_job(
        &self,
        request: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::CreateJobResponse>, Status> {
        let (mut spec, dashboard) = dc::create_in(request.get_ref()).map_err(to_status)?;
        let secrets = dc::secrets_in(request.get_ref()).map_err(to_status)?;
        if !secrets.is_empty() {
            // Checked before anything is sealed and stored for it.
            self.engine.get_pool(spec.routing.pool.clone()).await.map_err(|e| match e {
                DomainError::NotFound { .. } => to_status(DomainError::NotFound {
                    kind: "pool",
                    id: format!("{} (in routing.pool; create it with CreateAgentPool)", spec.routing.pool),
                }),
                other => to_status(other),
            })?;
            self.seal_secrets(&mut spec, &secrets).await.map_err(to_status)?;
        }
        let (job, created) = self.create(spec, dashboard).await.map_err(to_status)?;
        if job.dashboard.is_none() {
            // The idempotency key belongs to a job enqueued into the
            // dashboard's queue through QueueService.
            return Err(to_status(DomainError::AlreadyExists(format!(
                "idempotency_key is already used by queued job {}, which is not a dashboard job",
                job.id
            ))));
        }
        Ok(Response::new(pb::CreateJobResponse { job: Some(out(&job)?), created }))
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::GetJobResponse>, Status> {
        let id = convert::required("id", &request.get_ref().id).map_err(to_status)?;
        let job = self.dashboard_job(&id).await.map_err(to_status)?;
        let mut wire = out(&job)?;
        if job.state == JobState::Queued {
            let facts =
                self.engine.wait_facts(job.id.clone(), job.spec.routing.pool.clone()).await.map_err(to_status)?;
            wire.pending_reason = Some(dc::pending_reason_out(&waiting::explain(&job, &facts)));
        }
        Ok(Response::new(pb::GetJobResponse { job: Some(wire) }))
    }

    async fn list_jobs(&self, request: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let req = request.get_ref();
        let states = dc::states_of("statuses", &req.statuses).map_err(to_status)?;
        let requested_by = if req.requested_by.is_empty() {
            None
        } else {
            Some(dc::requester_in("requested_by", &req.requested_by).map_err(to_status)?)
        };
        let matches = JobListFilter {
            pool: convert::name_filter("pool", &req.pool).map_err(to_status)?,
            requested_by,
            created_after: convert::timestamp_in_field("create_time_after", req.create_time_after.as_ref())
                .map_err(to_status)?,
            created_before: convert::timestamp_in_field("create_time_before", req.create_time_before.as_ref())
                .map_err(to_status)?,
        };
        let limit = validate::page_size("page_size", req.page_size).map_err(to_status)?;
        let mut cursor = page_token::decode_seq(Listing::DashboardJobs, &req.page_token).map_err(to_status)?;
        let filter = JobFilter { queue: Some(DASHBOARD_QUEUE.to_string()), states };
        let mut jobs = Vec::new();
        let mut bytes = 0;
        let mut next = None;
        'scan: for _ in 0..MAX_SCANNED_PAGES {
            let page = self.engine.list_jobs(&filter, cursor, limit).await.map_err(to_status)?;
            for job in &page.items {
                if matches.accepts(job) {
                    let wire = out(job)?;
                    bytes += wire.encoded_len();
                    jobs.push(wire);
                    if jobs.len() == limit || bytes >= MAX_PAGE_BYTES {
                        // Resume right after this job (newest first).
                        next = Some(job.seq);
                        break 'scan;
                    }
                }
            }
            match page.next {
                None => {
                    next = None;
                    break;
                }
                Some(seq) => {
                    cursor = Some(seq);
                    next = Some(seq);
                }
            }
        }
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            next_page_token: page_token::encode_seq(Listing::DashboardJobs, next),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let req = request.into_inner();
        let id = convert::required("id", &req.id).map_err(to_status)?;
        let reason = convert::text_in("reason", req.reason).map_err(to_status)?;
        let actor = dc::requester_in("requested_by", &req.requested_by).map_err(to_status)?;
        self.dashboard_job(&id).await.map_err(to_status)?;
        let reason =
            if reason.is_empty() { format!("cancelled by {}", dashboard::requester_actor(&actor)) } else { reason };
        let job = self.engine.cancel_as(id, reason, actor).await.map_err(to_status)?;
        Ok(Response::new(pb::CancelJobResponse { job: Some(out(&job)?) }))
    }

    type StreamJobLogsStream = LogStream;

    async fn stream_job_logs(
        &self,
        request: Request<pb::StreamJobLogsRequest>,
    ) -> Result<Response<Self::StreamJobLogsStream>, Status> {
        let req = request.into_inner();
        let id = convert::required("id", &req.id).map_err(to_status)?;
        let cursor = LogCursor::decode("cursor", &req.cursor).map_err(to_status)?;
        if req.filter.len() > dc::MAX_LOG_FILTER {
            return Err(to_status(DomainError::invalid(
                "filter",
                format!("must be at most {} bytes", dc::MAX_LOG_FILTER),
            )));
        }
        // Refused here, before the stream starts, with its own status.
        self.dashboard_job(&id).await.map_err(to_status)?;
        let request = LogRequest { job_id: id, cursor, follow: req.follow, filter: req.filter.into_bytes() };
        let responses = job_logs::spawn(self.engine.clone(), request, self.stopping.clone());
        Ok(Response::new(Box::pin(ReceiverStream::new(responses))))
    }

    async fn retry_job(&self, request: Request<pb::RetryJobRequest>) -> Result<Response<pb::RetryJobResponse>, Status> {
        let req = request.get_ref();
        let id = convert::required("id", &req.id).map_err(to_status)?;
        let requested_by = dc::requester_in("requested_by", &req.requested_by).map_err(to_status)?;
        let key = dc::idempotency_key_in("idempotency_key", &req.idempotency_key).map_err(to_status)?;
        let old = self.dashboard_job(&id).await.map_err(to_status)?;
        let (spec, dashboard) =
            dashboard::rerun(&old, requested_by, key).map_err(|e| to_status(DomainError::FailedPrecondition(e)))?;
        let (job, created) = self.create(spec, dashboard).await.map_err(to_status)?;
        Ok(Response::new(pb::RetryJobResponse { job: Some(out(&job)?), created }))
    }

    async fn put_environment(
        &self,
        request: Request<pb::PutEnvironmentRequest>,
    ) -> Result<Response<pb::PutEnvironmentResponse>, Status> {
        let req = request.get_ref();
        let name = convert::name_in("name", &req.name).map_err(to_status)?;
        let pool = convert::name_in("pool", &req.pool).map_err(to_status)?;
        let promote_to = convert::name_filter("promote_to", &req.promote_to).map_err(to_status)?;
        let (environment, created) =
            self.deployments.put_environment(name, pool, promote_to, req.auto_rollback).await.map_err(to_status)?;
        Ok(Response::new(pb::PutEnvironmentResponse { environment: Some(environment_out(&environment)), created }))
    }

    async fn list_environments(
        &self,
        _request: Request<pb::ListEnvironmentsRequest>,
    ) -> Result<Response<pb::ListEnvironmentsResponse>, Status> {
        let environments = self.deployments.list_environments().await.map_err(to_status)?;
        Ok(Response::new(pb::ListEnvironmentsResponse {
            environments: environments.iter().map(environment_out).collect(),
        }))
    }

    async fn create_deployment(
        &self,
        request: Request<pb::CreateDeploymentRequest>,
    ) -> Result<Response<pb::CreateDeploymentResponse>, Status> {
        let req = request.get_ref();
        let service = convert::name_in("service", &req.service).map_err(to_status)?;
        let version = convert::name_in("version", &req.version).map_err(to_status)?;
        let environment = convert::name_in("environment", &req.environment).map_err(to_status)?;
        let rollout = deploy_in::rollout_in(req.rollout.as_ref()).map_err(to_status)?;
        let requested_by = dc::requester_in("requested_by", &req.requested_by).map_err(to_status)?;
        let reason = deploy_in::reason_in("reason", &req.reason).map_err(to_status)?;
        let deployment = self
            .deployments
            .create(service, version, environment, rollout, requested_by, reason)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CreateDeploymentResponse { deployment: Some(deployment_out(&deployment)) }))
    }

    async fn get_deployment(
        &self,
        request: Request<pb::GetDeploymentRequest>,
    ) -> Result<Response<pb::GetDeploymentResponse>, Status> {
        let id = convert::required("id", &request.get_ref().id).map_err(to_status)?;
        let deployment = self.deployments.get(&id).await.map_err(to_status)?;
        Ok(Response::new(pb::GetDeploymentResponse { deployment: Some(deployment_out(&deployment)) }))
    }

    async fn list_deployments(
        &self,
        request: Request<pb::ListDeploymentsRequest>,
    ) -> Result<Response<pb::ListDeploymentsResponse>, Status> {
        let req = request.get_ref();
        let service = convert::name_in("service", &req.service).map_err(to_status)?;
        let environment = convert::name_filter("environment", &req.environment).map_err(to_status)?;
        let limit = validate::page_size("page_size", req.page_size).map_err(to_status)?;
        let after = page_token::decode(Listing::Deployments, &req.page_token).map_err(to_status)?;
        let page = self.deployments.list(&service, environment.as_deref(), after, limit).await.map_err(to_status)?;
        let (deployments, next) = within_page_bytes(page, |d| vec![deployment_out(d)]);
        Ok(Response::new(pb::ListDeploymentsResponse {
            deployments,
            next_page_token: page_token::encode(Listing::Deployments, next.as_deref()),
        }))
    }

    async fn promote_deployment(
        &self,
        request: Request<pb::PromoteDeploymentRequest>,
    ) -> Result<Response<pb::PromoteDeploymentResponse>, Status> {
        let req = request.get_ref();
        let id = convert::required("id", &req.id).map_err(to_status)?;
        let reason = deploy_in::reason_in("reason", &req.reason).map_err(to_status)?;
        let requested_by = dc::requester_in("requested_by", &req.requested_by).map_err(to_status)?;
        let deployment = self.deployments.promote(&id, requested_by, reason).await.map_err(to_status)?;
        Ok(Response::new(pb::PromoteDeploymentResponse { deployment: Some(deployment_out(&deployment)) }))
    }

    async fn rollback_deployment(
        &self,
        request: Request<pb::RollbackDeploymentRequest>,
    ) -> Result<Response<pb::RollbackDeploymentResponse>, Status> {
        let req = request.get_ref();
        let service = convert::name_in("service", &req.service).map_err(to_status)?;
        let environment = convert::name_in("environment", &req.environment).map_err(to_status)?;
        let version = convert::name_filter("version", &req.version).map_err(to_status)?;
        let reason = deploy_in::reason_in("reason", &req.reason).map_err(to_status)?;
        let requested_by = dc::requester_in("requested_by", &req.requested_by).map_err(to_status)?;
        let rolled_back = self
            .deployments
            .rollback(&service, &environment, version.as_deref(), requested_by, reason)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::RollbackDeploymentResponse {
            deployment: Some(deployment_out(&rolled_back.deployment)),
            rolled_back_version: rolled_back.from_version,
        }))
    }

    async fn list_deployment_events(
        &self,
        request: Request<pb::ListDeploymentEventsRequest>,
    ) -> Result<Response<pb::ListDeploymentEventsResponse>, Status> {
        let req = request.get_ref();
        let service = convert::name_in("service", &req.service).map_err(to_status)?;
        let environment = convert::name_filter("environment", &req.environment).map_err(to_status)?;
        if req.deployment_id.len() > convert::MAX_ID {
            return Err(to_status(DomainError::invalid(
                "deployment_id",
                format!("must be at most {} bytes", convert::MAX_ID),
            )));
        }
        let limit = validate::page_size("page_size", req.page_size).map_err(to_status)?;
        let after = page_token::decode(Listing::DeploymentEvents, &req.page_token).map_err(to_status)?;
        let events_of = |d: &crate::domain::deploy::Deployment| d.events.iter().map(|e| event_out(d, e)).collect();
        let (events, next) = if req.deployment_id.is_empty() {
            let page =
                self.deployments.list(&service, environment.as_deref(), after, limit).await.map_err(to_status)?;
            within_page_bytes(page, events_of)
        } else {
            let d = self.deployments.get(&req.deployment_id).await.map_err(to_status)?;
            if d.service != service || environment.as_ref().is_some_and(|e| *e != d.environment) {
                return Err(to_status(DomainError::NotFound {
                    kind: "deployment",
                    id: format!(
                        "{} (of {service}{})",
                        req.deployment_id,
                        environment.map(|e| format!(" in {e}")).unwrap_or_default()
                    ),
                }));
            }
            (events_of(&d), None)
        };
        Ok(Response::new(pb::ListDeploymentEventsResponse {
            events,
            next_page_token: page_token::encode(Listing::DeploymentEvents, next.as_deref()),
        }))
    }

    async fn get_summary(
        &self,
        _request: Request<pb::GetSummaryRequest>,
    ) -> Result<Response<pb::GetSummaryResponse>, Status> {
        let now = self.deployments.now();
        let dashboard = self.engine.stats(Some(DASHBOARD_QUEUE.to_string())).await.map_err(to_status)?;
        let all = self.engine.stats(None).await.map_err(to_status)?;
        let agents = self.engine.agent_counts().await.map_err(to_status)?;
        let stats = crate::summary::job_stats(&self.engine).await.map_err(to_status)?;
        let services = self.deployments.services().await.map_err(to_status)?;
        Ok(Response::new(pb::GetSummaryResponse {
            jobs: summary_convert::jobs_out(&dashboard.by_state),
            agents: summary_convert::agents_out(&agents),
            queue_depth: summary_convert::queue_depth_out(&all.queued_by_priority),
            last_24h: Some(summary_convert::window_out(&stats, now)),
            services: services.iter().map(|(name, marks)| summary_convert::service_out(name, marks, now)).collect(),
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let req = request.get_ref();
        let kinds = watch_events::Kinds::of("kinds", &req.kinds).map_err(to_status)?;
        let from =
            watch_events::Position::decode("cursor", &req.cursor, self.engine.store().as_ref()).map_err(to_status)?;
        // Refused here, before the stream starts, with its own status.
        let start = watch_events::start(&self.engine, kinds, from).await.map_err(to_status)?;
        let responses = watch_events::spawn(self.engine.clone(), start, self.stopping.clone());
        Ok(Response::new(Box::pin(ReceiverStream::new(responses))))
    }
}
