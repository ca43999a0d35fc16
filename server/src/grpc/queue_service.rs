//! QueueService: translates wire requests to engine calls and back.

use std::pin::Pin;

use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use tether::v1 as pb;
use tether::v1::queue_service_server::QueueService;

use super::convert::{self, job_out};
use super::page_token::{self, Listing};
use super::status::to_status;
use super::{event_cursor, watch};
use crate::domain::{validate, DomainError, DomainResult, Failure};
use crate::engine::{ClaimRequest, EngineHandle};
use crate::store::JobFilter;

/// The QueueService of one engine.
pub struct QueueApi {
    engine: EngineHandle,
    /// Cancelled at shutdown, to end watch streams.
    stopping: CancellationToken,
}

impl QueueApi {
    pub fn new(engine: EngineHandle, stopping: CancellationToken) -> Self {
        QueueApi { engine, stopping }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchQueueResponse, Status>> + Send>>;

fn states_in(field: &str, states: &[i32]) -> Result<Vec<crate::domain::JobState>, Status> {
    convert::distinct(field, states, crate::domain::JobState::ALL.len(), convert::state_in).map_err(to_status)
}

/// Queues named `tether.*` hold the server's own jobs (`tether.jobs`:
/// DashboardService jobs, whose payload may name sealed secrets and whose
/// idempotency keys name deployments): nobody enqueues into them by hand.
fn not_reserved(queue: &str) -> DomainResult<()> {
    if queue.starts_with("tether.") {
        return Err(DomainError::FailedPrecondition(format!(
            "queue {queue} is reserved for the server's own jobs (tether.jobs: create them with \
             DashboardService.CreateJob)"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl QueueService for QueueApi {
    async fn enqueue_job(
        &self,
        request: Request<pb::EnqueueJobRequest>,
    ) -> Result<Response<pb::EnqueueJobResponse>, Status> {
        let spec = convert::job_spec_in(request.get_ref()).map_err(to_status)?;
        not_reserved(&spec.queue).map_err(to_status)?;
        let mut jobs = self.engine.enqueue(vec![spec]).await.map_err(to_status)?;
        let (job, created) = jobs.pop().ok_or_else(|| Status::internal("enqueue returned no job"))?;
        Ok(Response::new(pb::EnqueueJobResponse { job: Some(job_out(&job)), created }))
    }

    async fn batch_enqueue_jobs(
        &self,
        request: Request<pb::BatchEnqueueJobsRequest>,
    ) -> Result<Response<pb::BatchEnqueueJobsResponse>, Status> {
        let requests = &request.get_ref().requests;
        if requests.is_empty() {
            return Err(to_status(DomainError::invalid("requests", "must hold at least one job")));
        }
        if requests.len() > validate::MAX_BATCH {
            return Err(to_status(DomainError::invalid(
                "requests",
                format!("holds {} jobs; the limit is {}", requests.len(), validate::MAX_BATCH),
            )));
        }
        let specs = requests
            .iter()
            .enumerate()
            .map(|(i, r)| convert::job_spec_in(r).map_err(|e| e.under(&format!("requests[{i}]."))))
            .collect::<Result<Vec<_>, _>>()
            .map_err(to_status)?;
        for (i, spec) in specs.iter().enumerate() {
            not_reserved(&spec.queue).map_err(|e| Status::failed_precondition(format!("requests[{i}].queue: {e}")))?;
        }
        let jobs = self.engine.enqueue(specs).await.map_err(to_status)?;
        Ok(Response::new(pb::BatchEnqueueJobsResponse {
            created: jobs.iter().map(|(_, c)| *c).collect(),
            jobs: jobs.iter().map(|(j, _)| job_out(j)).collect(),
        }))
    }

    async fn get_queued_job(
        &self,
        request: Request<pb::GetQueuedJobRequest>,
    ) -> Result<Response<pb::GetQueuedJobResponse>, Status> {
        let id = convert::required("id", &request.get_ref().id).map_err(to_status)?;
        let job = self.engine.get_job(&id).await.map_err(to_status)?;
        Ok(Response::new(pb::GetQueuedJobResponse { job: Some(job_out(&job)) }))
    }

    async fn list_queued_jobs(
        &self,
        request: Request<pb::ListQueuedJobsRequest>,
    ) -> Result<Response<pb::ListQueuedJobsResponse>, Status> {
        let req = request.get_ref();
        let queue = convert::name_filter("queue", &req.queue).map_err(to_status)?;
        let filter = JobFilter { queue, states: states_in("states", &req.states)? };
        let limit = validate::page_size("page_size", req.page_size).map_err(to_status)?;
        let before = page_token::decode_seq(Listing::Jobs, &req.page_token).map_err(to_status)?;
        let page = self.engine.list_jobs(&filter, before, limit).await.map_err(to_status)?;
        Ok(Response::new(pb::ListQueuedJobsResponse {
            jobs: page.items.iter().map(job_out).collect(),
            next_page_token: page_token::encode_seq(Listing::Jobs, page.next),
        }))
    }

    async fn cancel_queued_job(
        &self,
        request: Request<pb::CancelQueuedJobRequest>,
    ) -> Result<Response<pb::CancelQueuedJobResponse>, Status> {
        let req = request.into_inner();
        let id = convert::required("id", &req.id).map_err(to_status)?;
        let reason = convert::text_in("reason", req.reason).map_err(to_status)?;
        let job = self.engine.cancel(id, reason).await.map_err(to_status)?;
        Ok(Response::new(pb::CancelQueuedJobResponse { job: Some(job_out(&job)) }))
    }

    async fn claim_job(&self, request: Request<pb::ClaimJobRequest>) -> Result<Response<pb::ClaimJobResponse>, Status> {
        let req = request.get_ref();
        let worker_id = convert::required("worker_id", &req.worker_id).map_err(to_status)?;
        let claim = ClaimRequest {
            worker_id,
            queue: convert::name_filter("queue", &req.queue).map_err(to_status)?,
            pool: convert::pool_name_in("pool", &req.pool).map_err(to_status)?,
            labels: convert::labels_in("labels", &req.labels).map_err(to_status)?,
        };
        let job = self.engine.claim(claim).await.map_err(to_status)?;
        Ok(Response::new(pb::ClaimJobResponse { job: job.as_ref().map(job_out) }))
    }

    async fn start_job(&self, request: Request<pb::StartJobRequest>) -> Result<Response<pb::StartJobResponse>, Status> {
        let req = request.get_ref();
        let attempt = convert::attempt_in(&req.id, req.attempt, req.fencing_token).map_err(to_status)?;
        let job = self.engine.start_job(attempt).await.map_err(to_status)?;
        Ok(Response::new(pb::StartJobResponse { job: Some(job_out(&job)) }))
    }

    async fn complete_job(
        &self,
        request: Request<pb::CompleteJobRequest>,
    ) -> Result<Response<pb::CompleteJobResponse>, Status> {
        let req = request.into_inner();
        let attempt = convert::attempt_in(&req.id, req.attempt, req.fencing_token).map_err(to_status)?;
        if req.result.len() > validate::MAX_RESULT_BYTES {
            return Err(to_status(DomainError::invalid(
                "result",
                format!("is {} bytes; the limit is {} bytes", req.result.len(), validate::MAX_RESULT_BYTES),
            )));
        }
        let job = self.engine.complete(attempt, req.result).await.map_err(to_status)?;
        Ok(Response::new(pb::CompleteJobResponse { job: Some(job_out(&job)) }))
    }

    async fn fail_job(&self, request: Request<pb::FailJobRequest>) -> Result<Response<pb::FailJobResponse>, Status> {
        let req = request.into_inner();
        let attempt = convert::attempt_in(&req.id, req.attempt, req.fencing_token).map_err(to_status)?;
        let error = convert::text_in("error", req.error).map_err(to_status)?;
        let failure =
            Failure::Reported { retryable: req.retryable, exit_code: (req.exit_code != 0).then_some(req.exit_code) };
        let job = self.engine.fail(attempt, error, failure).await.map_err(to_status)?;
        Ok(Response::new(pb::FailJobResponse { job: Some(job_out(&job)) }))
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let req = request.get_ref();
        let attempt = convert::attempt_in(&req.id, req.attempt, req.fencing_token).map_err(to_status)?;
        let lease = match convert::duration_in("lease_duration", req.lease_duration.as_ref()).map_err(to_status)? {
            Some(d) if d < validate::MIN_LEASE || d > validate::MAX_LEASE => {
                return Err(to_status(DomainError::invalid("lease_duration", "must be between 1s and 1h")))
            }
            other => other,
        };
        let job = self.engine.renew(attempt, lease).await.map_err(to_status)?;
        Ok(Response::new(pb::RenewLeaseResponse { job: Some(job_out(&job)) }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let req = request.get_ref();
        let limit = validate::page_size("page_size", req.page_size).map_err(to_status)?;
        let after = page_token::decode_seq(Listing::DeadLetters, &req.page_token).map_err(to_status)?;
        let queue = convert::name_filter("queue", &req.queue).map_err(to_status)?;
        let page = self.engine.list_dead_letters(queue.as_deref(), after, limit).await.map_err(to_status)?;
        Ok(Response::new(pb::ListDeadLettersResponse {
            jobs: page.items.iter().map(job_out).collect(),
            next_page_token: page_token::encode_seq(Listing::DeadLetters, page.next),
        }))
    }

    async fn redrive_dead_letter(
        &self,
        request: Request<pb::RedriveDeadLetterRequest>,
    ) -> Result<Response<pb::RedriveDeadLetterResponse>, Status> {
        let id = convert::required("id", &request.get_ref().id).map_err(to_status)?;
        let job = self.engine.redrive(id).await.map_err(to_status)?;
        Ok(Response::new(pb::RedriveDeadLetterResponse { job: Some(job_out(&job)) }))
    }

    async fn get_queue_stats(
        &self,
        request: Request<pb::GetQueueStatsRequest>,
    ) -> Result<Response<pb::GetQueueStatsResponse>, Status> {
        let queue = convert::name_filter("queue", &request.get_ref().queue).map_err(to_status)?;
        let stats = self.engine.stats(queue).await.map_err(to_status)?;
        Ok(Response::new(convert::stats_out(&stats)))
    }

    type WatchQueueStream = WatchStream;

    async fn watch_queue(
        &self,
        request: Request<pb::WatchQueueRequest>,
    ) -> Result<Response<Self::WatchQueueStream>, Status> {
        let req = request.into_inner();
        let states = states_in("states", &req.states)?;
        let queue = convert::name_filter("queue", &req.queue).map_err(to_status)?;
        let cursor = event_cursor::decode("cursor", &req.cursor).map_err(to_status)?;
        let start = watch::start(&self.engine, cursor).await.map_err(to_status)?;
        let responses = watch::spawn(
            self.engine.clone(),
            watch::Filter { queue, states, skip_payload: req.skip_payload },
            start,
            self.stopping.clone(),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(responses))))
    }
}
