//! DashboardService: translates wire requests to engine calls and back.

use tonic::{Request, Response, Status};

use tether::v1 as pb;
use tether::v1::dashboard_service_server::DashboardService;

use super::convert;
use super::dashboard_convert::{self as dc, job_out};
use super::page_token::{self, Listing};
use super::status::to_status;
use crate::domain::dashboard::{DashboardSpec, DASHBOARD_QUEUE};
use crate::domain::{validate, DomainError, DomainResult, Job, JobSpec};
use crate::engine::EngineHandle;
use crate::store::JobFilter;

/// Store pages one ListJobs call reads at most while its filters skip jobs:
/// a page may come back short, never the call slow.
const MAX_SCANNED_PAGES: usize = 10;

/// The DashboardService of one engine.
pub struct DashboardApi {
    engine: EngineHandle,
}

impl DashboardApi {
    pub fn new(engine: EngineHandle) -> Self {
        DashboardApi { engine }
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

fn out(job: &Job) -> Result<pb::Job, Status> {
    job_out(job).ok_or_else(|| Status::internal(format!("job {} lost its dashboard record", job.id)))
}

/// Whether a job passes ListJobs' filters beyond queue and state.
struct Matches {
    pool: Option<String>,
    requested_by: Option<String>,
    after: Option<std::time::SystemTime>,
    before: Option<std::time::SystemTime>,
}

impl Matches {
    fn accepts(&self, job: &Job) -> bool {
        let Some(d) = job.dashboard.as_deref() else { return false };
        self.pool.as_ref().is_none_or(|p| *p == job.spec.routing.pool)
            && self.requested_by.as_ref().is_none_or(|r| *r == d.spec.requested_by)
            && self.after.is_none_or(|t| job.create_time >= t)
            && self.before.is_none_or(|t| job.create_time < t)
    }
}

#[tonic::async_trait]
impl DashboardService for DashboardApi {
    async fn create_job(
        &self,
        request: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::CreateJobResponse>, Status> {
        let (spec, dashboard) = dc::create_in(request.get_ref()).map_err(to_status)?;
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
        Ok(Response::new(pb::GetJobResponse { job: Some(out(&job)?) }))
    }

    async fn list_jobs(&self, request: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let req = request.get_ref();
        let states = dc::states_of("statuses", &req.statuses).map_err(to_status)?;
        let requested_by = if req.requested_by.is_empty() {
            None
        } else {
            Some(dc::requester_in("requested_by", &req.requested_by).map_err(to_status)?)
        };
        let matches = Matches {
            pool: convert::name_filter("pool", &req.pool).map_err(to_status)?,
            requested_by,
            after: convert::timestamp_in_field("create_time_after", req.create_time_after.as_ref())
                .map_err(to_status)?,
            before: convert::timestamp_in_field("create_time_before", req.create_time_before.as_ref())
                .map_err(to_status)?,
        };
        let limit = validate::page_size("page_size", req.page_size).map_err(to_status)?;
        let mut cursor = page_token::decode_seq(Listing::DashboardJobs, &req.page_token).map_err(to_status)?;
        let filter = JobFilter { queue: Some(DASHBOARD_QUEUE.to_string()), states };
        let mut jobs = Vec::new();
        let mut next = None;
        'scan: for _ in 0..MAX_SCANNED_PAGES {
            let page = self.engine.list_jobs(&filter, cursor, limit).await.map_err(to_status)?;
            for job in &page.items {
                if matches.accepts(job) {
                    jobs.push(out(job)?);
                    if jobs.len() == limit {
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
        let reason = if reason.is_empty() { format!("cancelled by {actor}") } else { reason };
        let job = self.engine.cancel_as(id, reason, actor).await.map_err(to_status)?;
        Ok(Response::new(pb::CancelJobResponse { job: Some(out(&job)?) }))
    }

    async fn retry_job(&self, request: Request<pb::RetryJobRequest>) -> Result<Response<pb::RetryJobResponse>, Status> {
        let req = request.get_ref();
        let id = convert::required("id", &req.id).map_err(to_status)?;
        let requested_by = dc::requester_in("requested_by", &req.requested_by).map_err(to_status)?;
        let old = self.dashboard_job(&id).await.map_err(to_status)?;
        if !old.state.is_terminal() && old.state != crate::domain::JobState::DeadLettered {
            return Err(to_status(DomainError::FailedPrecondition(format!(
                "job {id} has not ended; cancel it first or wait for it"
            ))));
        }
        let name = old.dashboard.as_deref().map(|d| d.spec.name.clone()).unwrap_or_default();
        let spec = JobSpec { idempotency_key: None, not_before: None, ..old.spec };
        let dashboard = DashboardSpec { name, requested_by, retry_of: Some(id) };
        let (job, _) = self.create(spec, dashboard).await.map_err(to_status)?;
        Ok(Response::new(pb::RetryJobResponse { job: Some(out(&job)?) }))
    }
}
