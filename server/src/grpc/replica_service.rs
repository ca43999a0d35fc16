//! ReplicaService: wake-ups between the replicas of one cluster, translated
//! to engine calls.

use tonic::{Request, Response, Status};

use tether::v1 as pb;
use tether::v1::replica_service_server::ReplicaService;

use super::status::to_status;
use crate::domain::{validate, DomainError, DEFAULT_POOL};
use crate::engine::{EngineHandle, WakeJob};

/// The ReplicaService of one engine.
pub struct ReplicaApi {
    engine: EngineHandle,
}

impl ReplicaApi {
    pub fn new(engine: EngineHandle) -> Self {
        ReplicaApi { engine }
    }
}

/// The jobs of a wake-up, checked by the documented input rules.
fn wake_jobs_in(request: &pb::WakeRequest) -> Result<Vec<WakeJob>, DomainError> {
    if request.replica_id.len() > 128 {
        return Err(DomainError::invalid("replica_id", "must be at most 128 bytes"));
    }
    if request.jobs.len() > validate::MAX_BATCH {
        return Err(DomainError::invalid("jobs", format!("at most {} jobs", validate::MAX_BATCH)));
    }
    request
        .jobs
        .iter()
        .enumerate()
        .map(|(i, job)| {
            if job.id.is_empty() {
                return Err(DomainError::invalid(format!("jobs[{i}].id"), "must not be empty"));
            }
            if job.id.len() > validate::MAX_IDEMPOTENCY_KEY {
                return Err(DomainError::invalid(format!("jobs[{i}].id"), "must be at most 256 bytes"));
            }
            let pool = if job.pool.is_empty() {
                DEFAULT_POOL.to_string()
            } else {
                validate::name("", &job.pool, validate::MAX_NAME).map_err(|e| e.under(&format!("jobs[{i}].pool")))?;
                job.pool.clone()
            };
            Ok(WakeJob { id: job.id.clone(), pool })
        })
        .collect()
}

/// The agents of a wake-up, checked by the documented input rules.
fn wake_agents_in(request: &pb::WakeRequest) -> Result<Vec<String>, DomainError> {
    if request.agents.len() > validate::MAX_BATCH {
        return Err(DomainError::invalid("agents", format!("at most {} agents", validate::MAX_BATCH)));
    }
    for (i, id) in request.agents.iter().enumerate() {
        if id.is_empty() {
            return Err(DomainError::invalid(format!("agents[{i}]"), "must not be empty"));
        }
        if id.len() > validate::MAX_IDEMPOTENCY_KEY {
            return Err(DomainError::invalid(format!("agents[{i}]"), "must be at most 256 bytes"));
        }
    }
    Ok(request.agents.clone())
}

#[tonic::async_trait]
impl ReplicaService for ReplicaApi {
    async fn wake(&self, request: Request<pb::WakeRequest>) -> Result<Response<pb::WakeResponse>, Status> {
        let jobs = wake_jobs_in(request.get_ref()).map_err(to_status)?;
        let agents = wake_agents_in(request.get_ref()).map_err(to_status)?;
        let accepted = self.engine.wake(jobs, agents).await.map_err(to_status)?;
        Ok(Response::new(pb::WakeResponse { accepted }))
    }
}
