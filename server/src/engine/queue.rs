//! Queue operations of the engine: enqueue, claim, fenced transitions,
//! retries with backoff, expiry, cancel, redrive and statistics.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rand::Rng;

use super::core::Engine;
use super::ready::ReadyEntry;
use super::types::{AgentPush, ClaimRequest, QueueStats};
use super::NewJob;
use tether::time::later;

use crate::domain::dashboard::{Actor, DashboardJob};
use crate::domain::{AttemptRef, DomainError, DomainResult, Failure, Job, JobSpec, JobState, Priority};

impl Engine {
    pub async fn enqueue(&mut self, jobs: Vec<NewJob>) -> DomainResult<Vec<(Job, bool)>> {
        let (specs, dashboards): (Vec<JobSpec>, Vec<_>) = jobs.into_iter().map(|j| (j.spec, j.dashboard)).unzip();
        let limit = self.store.limits().max_payload_bytes;
        for spec in &specs {
            self.know_pool(&spec.routing.pool).await;
        }
        for (i, spec) in specs.iter().enumerate() {
            if spec.payload.len() > limit {
                let field = if specs.len() == 1 { "payload".to_string() } else { format!("requests[{i}].payload") };
                return Err(DomainError::invalid(
                    &field,
                    format!(
                        "is {} bytes; this server's store holds payloads of at most {limit} bytes",
                        spec.payload.len()
                    ),
                ));
            }
            if !self.pools.contains_key(&spec.routing.pool) {
                let field =
                    if specs.len() == 1 { "routing.pool".to_string() } else { format!("requests[{i}].routing.pool") };
                self.require_pool(&field, &spec.routing.pool)?;
            }
        }
        // First resolve every idempotency key, so that a conflict refuses the
        // whole batch before anything is written; the second pass cannot fail.
        let mut plan = Vec::with_capacity(specs.len());
        let mut first_use: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, spec) in specs.iter().enumerate() {
            let Some(key) = &spec.idempotency_key else {
                plan.push(Planned::New);
                continue;
            };
            // A key repeated within the batch must repeat the same request.
            let first = *first_use.entry((spec.queue.as_str(), key.as_str())).or_insert(i);
            if first != i {
                if specs[first] != *spec || dashboards[first] != dashboards[i] {
                    return Err(DomainError::AlreadyExists(format!(
                        "requests[{i}].idempotency_key {key:?} is also used by requests[{first}] with a different request"
                    )));
                }
                plan.push(Planned::SameAs(first));
                continue;
            }
            match self.find_by_key(&spec.queue, key).await? {
                Some(job)
                    if job.spec != *spec || job.dashboard.as_ref().map(|d| &d.spec) != dashboards[i].as_deref() =>
                {
                    return Err(DomainError::AlreadyExists(format!(
                        "requests[{i}].idempotency_key {key:?} is already used in queue {:?} by job {} with a different request",
                        spec.queue, job.id
                    )));
                }
                Some(job) => plan.push(Planned::Existing(Box::new(job))),
                None => plan.push(Planned::New),
            }
        }
        let now = self.clock.now();
        let mut out: Vec<(Job, bool)> = Vec::with_capacity(specs.len());
        for ((spec, dashboard), planned) in specs.into_iter().zip(dashboards).zip(plan) {
            match planned {
                Planned::Existing(job) => out.push((*job, false)),
                Planned::SameAs(first) => {
                    let job = out[first].0.clone();
                    out.push((job, false));
                }
                Planned::New => {
                    let seq = self.new_seq(now);
                    let mut job = Job::new(crate::ids::new_id(now), seq, spec, now);
                    job.dashboard = dashboard.map(|d| Box::new(DashboardJob::new(*d)));
                    self.persist(&mut job, None);
                    if let Some(key) = &job.spec.idempotency_key {
                        self.uncommitted_keys
                            .insert((job.spec.queue.clone(), key.clone()), (Box::new(job.clone()), self.batch_no));
                    }
                    out.push((job.clone(), true));
                    self.place(job).await;
                }
            }
        }
        Ok(out)
    }

    /// The job holding an idempotency key, committed or not.
    async fn find_by_key(&self, queue: &str, key: &str) -> DomainResult<Option<Job>> {
        if let Some((created, _)) = self.uncommitted_keys.get(&(queue.to_string(), key.to_string())) {
            // Its latest state if the engine still holds it; else (finished
            // within the uncommitted window) the job as created.
            return Ok(Some(self.job_in_memory(&created.id).unwrap_or_else(|| (**created).clone())));
        }
        self.store.find_by_idempotency_key(queue, key).await.map_err(super::store_error)
    }

    fn job_in_memory(&self, id: &str) -> Option<Job> {
        if let Some(job) = self.active.get(id) {
            return Some(job.clone());
        }
        self.ready.job(id)
    }

    /// Dispatches a queued job to a free agent at once, or keeps it ready
    /// (and, on a shared store, tells peers that may have a free agent).
    pub async fn place(&mut self, job: Job) {
        let now = self.clock.now();
        if job.ready_time <= now {
            if let Some(agent_id) = self.pick_agent(&job.spec.routing) {
                self.assign(job, &agent_id);
                return;
            }
            self.wake_peers_after_commit(&job);
        }
        self.ready.insert(ReadyEntry::from_job(job), now);
    }

    /// Removes a queued job from the ready set and returns its full record.
    /// A stored job that cannot be handled is quarantined instead
    /// (dead-lettered with the reason) and reported as an error.
    pub async fn take_ready(&mut self, id: &str) -> DomainResult<Job> {
        let job = self.take_ready_record(id).await?;
        match job.defect() {
            None => Ok(job),
            Some(reason) => {
                self.quarantine(job, reason.clone());
                Err(DomainError::Internal(format!("job {id} {reason}")))
            }
        }
    }

    /// Removes a queued job from the ready set and returns its full record,
    /// whatever it holds.
    async fn take_ready_record(&mut self, id: &str) -> DomainResult<Job> {
        let entry = self.ready.remove(id).ok_or_else(|| DomainError::job_not_found(id))?;
        if let Some(body) = entry.body {
            return Ok(*body);
        }
        match self.store.get_job(id).await {
            Ok(Some(job)) if job.state == JobState::Queued => Ok(job),
            Ok(Some(job)) if self.shared => {
                // Another replica took it since this one last looked.
                Err(DomainError::Conflict(format!("job {id} is {:?} now (changed by another replica)", job.state)))
            }
            Ok(None) if self.shared => Err(DomainError::Conflict(format!("job {id} is gone"))),
            Ok(Some(job)) => {
                Err(DomainError::Internal(format!("job {id} was indexed as queued but is {:?}", job.state)))
            }
            Ok(None) => Err(DomainError::Internal(format!("job {id} was indexed as queued but is missing"))),
            Err(e) => {
                // A failed read leaves the job queued, to be tried again.
                let now = self.clock.now();
                self.ready.insert(entry, now);
                Err(super::store_error(e))
            }
        }
    }

    /// Quarantines the queued or active job `id` if it is defective (a
    /// reader saw it so in the store).
    pub async fn inspect(&mut self, id: &str) {
        if self.check_writable().is_err() {
            return;
        }
        if self.ready.contains(id) {
            if let Ok(job) = self.take_ready_record(id).await {
                match job.defect() {
                    Some(reason) => self.quarantine(job, reason),
                    None => {
                        let now = self.clock.now();
                        self.ready.insert(ReadyEntry::from_job(job), now);
                    }
                }
            }
        } else if self.active.get(id).is_some_and(|j| j.defect().is_some()) {
            if let Some(job) = self.take_active(id) {
                let reason = job.defect().unwrap_or_default();
                let attempt = job.attempt_ref();
                let worker = job.worker_id.clone();
                self.quarantine(job, reason.clone());
                self.push_after_commit(&worker, AgentPush::Cancel { job: attempt, reason });
            }
        }
    }

    /// Dead-letters a stored job the engine cannot handle, with the reason,
    /// so an operator can see it (and fix or cancel it) instead of the
    /// engine failing on it again and again.
    pub fn quarantine(&mut self, mut job: Job, reason: String) {
        tracing::error!(job = %job.id, %reason, "stored job quarantined");
        let previous = job.state;
        job.last_error = reason;
        job.finish(JobState::DeadLettered, self.clock.now());
        let actor = std::mem::replace(&mut self.actor, Actor::System);
        self.persist(&mut job, Some(previous));
        self.actor = actor;
    }

    /// Leases a queued job to a worker as a new attempt.
    pub fn claim(&mut self, mut job: Job, worker_id: &str) -> Job {
        let now = self.clock.now();
        job.state = JobState::Claimed;
        job.attempt += 1;
        // Per job, increasing with every claim (see `Engine::load`).
        job.fencing_token = job.fencing_token.saturating_add(1).max(self.token_floor);
        job.worker_id = worker_id.to_string();
        job.lease_expire_time = Some(later(now, job.spec.lease_duration));
        job.run_deadline = job.spec.timeout.map(|t| later(now, t));
        self.persist(&mut job, Some(JobState::Queued));
        self.track_deadline(&job, None);
        self.active.insert(job.id.clone(), job.clone());
        job
    }

    /// Claims a job for a connected agent and pushes the assignment at once.
    ///
    /// The push does not wait for the claim to be durable: only
    /// acknowledgements do. If the server crashes before the claim commits,
    /// the agent's attempt is unknown after restart (or the job is queued
    /// again): its reports are refused and its reconnect abandons the job,
    /// and fencing tokens are never reused (see `Engine::load`). Waiting for
    /// the sync here would put a disk flush into every dispatch and every
    /// slot turnover.
    pub fn assign(&mut self, job: Job, agent_id: &str) {
        // The dispatcher's claim is no part of the operation that freed the
        // slot or made the job ready: if it loses a race, that operation's
        // answer stands.
        let touched = self.touched.len();
        let actor = std::mem::replace(&mut self.actor, Actor::System);
        let job = self.claim(job, agent_id);
        self.actor = actor;
        self.touched.truncate(touched);
        self.assignments += 1;
        if let Some(mut entry) = self.agents.get_mut(agent_id) {
            entry.last_assigned = self.assignments;
            entry.in_flight.insert(
                job.id.clone(),
                super::core::InFlight { attempt: job.attempt, token: job.fencing_token, acked: false },
            );
        }
        if self.shared {
            // Only a claim that applied may reach the agent: another
            // replica may have claimed the job first.
            let needs = vec![job.seq];
            self.push_after_commit_needing(agent_id, AgentPush::Assign(Box::new(job)), needs);
        } else {
            self.push_soon(agent_id, AgentPush::Assign(Box::new(job)));
        }
    }

    pub async fn claim_unary(&mut self, request: ClaimRequest) -> DomainResult<Option<Job>> {
        self.know_pool(&request.pool).await;
        self.require_pool("pool", &request.pool)?;
        // Jobs whose time came but whose timer has not run yet are due too.
        let now = self.clock.now();
        self.ready.promote_due(now);
        loop {
            let Some(id) =
                self.ready.first_match(&request.pool, &request.labels, request.queue.as_deref()).map(|e| e.id())
            else {
                return Ok(None);
            };
            match self.take_ready(&id).await {
                Ok(job) => return Ok(Some(self.claim(job, &request.worker_id))),
                Err(e) => tracing::error!(job = %id, error = %e, "skipping a queued job that cannot be dispatched"),
            }
        }
    }

    /// The active job named by `r`, if `r` is its current attempt.
    fn current(&self, r: &AttemptRef) -> DomainResult<&Job> {
        match self.active.get(&r.job_id) {
            Some(job) if job.is_current(r) => Ok(job),
            Some(job) => Err(stale(r, job)),
            None => Err(DomainError::FailedPrecondition(format!(
                "job {} attempt {} (fencing token {}) is not claimed or running; the attempt is over or the job does not exist",
                r.job_id, r.attempt, r.fencing_token
            ))),
        }
    }

    /// Removes an active job from the active set and its deadline.
    pub fn take_active(&mut self, id: &str) -> Option<Job> {
        let job = self.active.remove(id)?;
        if let Some(t) = job.next_deadline() {
            self.deadlines.remove(&(t, job.id.clone()));
        }
        Some(job)
    }

    pub fn start_attempt(&mut self, r: &AttemptRef) -> DomainResult<Job> {
        self.mark_running(r)?;
        self.active.get(&r.job_id).cloned().ok_or_else(|| DomainError::job_not_found(&r.job_id))
    }

    /// Marks the current attempt running (idempotent), without copying the
    /// job for a reply: the stream path only needs the outcome.
    pub fn mark_running(&mut self, r: &AttemptRef) -> DomainResult<()> {
        if self.current(r)?.state == JobState::Running {
            return Ok(());
        }
        let Some(mut job) = self.active.remove(&r.job_id) else {
            return Err(DomainError::job_not_found(&r.job_id));
        };
        job.state = JobState::Running;
        self.persist(&mut job, Some(JobState::Claimed));
        self.active.insert(r.job_id.clone(), job);
        Ok(())
    }

    pub fn complete_attempt(&mut self, r: &AttemptRef, result: Bytes) -> DomainResult<Job> {
        let (mut job, previous) = self.succeed(r, result)?;
        self.persist(&mut job, Some(previous));
        Ok(job)
    }

    /// [`Engine::complete_attempt`] without a copy of the job for a reply
    /// (the stream path).
    pub fn complete_reported(&mut self, r: &AttemptRef, result: Bytes) -> DomainResult<()> {
        let (job, previous) = self.succeed(r, result)?;
        self.persist_last(job, previous);
        Ok(())
    }

    /// Takes the current attempt's job out of the active set, succeeded;
    /// returns it with its state before.
    fn succeed(&mut self, r: &AttemptRef, result: Bytes) -> DomainResult<(Job, JobState)> {
        self.current(r)?;
        let limit = self.store.limits().max_result_bytes;
        if result.len() > limit {
            return Err(DomainError::invalid(
                "result",
                format!("is {} bytes; this server's store holds results of at most {limit} bytes", result.len()),
            ));
        }
        let Some(mut job) = self.take_active(&r.job_id) else {
            return Err(DomainError::job_not_found(&r.job_id));
        };
        let previous = job.state;
        job.result = result;
        job.finish(JobState::Succeeded, self.clock.now());
        Ok((job, previous))
    }

    pub fn fail_reported(&mut self, r: &AttemptRef, error: String, failure: Failure) -> DomainResult<Job> {
        self.current(r)?;
        let Some(job) = self.take_active(&r.job_id) else {
            return Err(DomainError::job_not_found(&r.job_id));
        };
        Ok(self.fail_attempt(job, error, failure))
    }

    /// Ends an attempt that failed. If the job's retry policy retries this
    /// failure, the job is requeued after a backoff while attempts remain
    /// and dead-lettered once they are spent; otherwise it is FAILED.
    pub fn fail_attempt(&mut self, mut job: Job, error: String, failure: Failure) -> Job {
        let now = self.clock.now();
        let previous = job.state;
        job.last_error = error;
        if let Failure::Reported { exit_code, .. } = failure {
            self.exit_code = exit_code;
        }
        if !job.spec.retry.retries(failure) {
            job.finish(JobState::Failed, now);
            self.persist(&mut job, Some(previous));
        } else if job.attempt < job.spec.max_attempts {
            job.requeue(later(now, self.backoff(job.attempt)));
            self.persist(&mut job, Some(previous));
            self.ready.insert(ReadyEntry::from_job(job.clone()), now);
        } else {
            job.finish(JobState::DeadLettered, now);
            self.persist(&mut job, Some(previous));
        }
        job
    }

    /// Exponential backoff with jitter: uniform in [d/2, d] where
    /// d = base * 2^(attempt-1), capped.
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let full = self.config.backoff_base.saturating_mul(1u32 << exp).min(self.config.backoff_max);
        let half = full / 2;
        let jitter_nanos = rand::rng().random_range(0..=half.as_nanos().min(u128::from(u64::MAX)) as u64);
        half + Duration::from_nanos(jitter_nanos)
    }

    pub fn renew(&mut self, r: &AttemptRef, lease: Option<Duration>) -> DomainResult<Job> {
        self.current(r)?;
        let Some(mut job) = self.take_active(&r.job_id) else {
            return Err(DomainError::job_not_found(&r.job_id));
        };
        let state = job.state;
        job.lease_expire_time = Some(later(self.clock.now(), lease.unwrap_or(job.spec.lease_duration)));
        self.persist(&mut job, Some(state));
        self.track_deadline(&job, None);
        self.active.insert(job.id.clone(), job.clone());
        Ok(job)
    }

    /// Fails every attempt whose lease or timeout has run out.
    pub async fn expire_deadlines(&mut self, now: SystemTime) {
        while let Some((t, id)) = self.deadlines.first().cloned() {
            if t > now {
                break;
            }
            self.deadlines.remove(&(t, id.clone()));
            let Some(job) = self.take_active(&id) else { continue };
            let (reason, failure) = expiry(&job, now);
            tracing::info!(job = %job.id, %reason, "attempt expired");
            let attempt = job.attempt_ref();
            let worker = job.worker_id.clone();
            let seq = job.seq;
            self.fail_attempt(job, reason.clone(), failure);
            self.push_after_commit_needing(&worker, AgentPush::Cancel { job: attempt, reason }, vec![seq]);
        }
    }

    /// Takes in what a sweep of a shared store found: queued jobs this
    /// replica did not know are offered to its agents; active jobs of
    /// other replicas whose lease or timeout had ended more than the clock
    /// skew tolerance before the sweep read them are failed as lost
    /// (conditionally: a replica that renewed meanwhile wins).
    ///
    /// The age is judged at `read_at`, not now: a sweep handled late (a
    /// busy loop) holds an old snapshot, and judging it by the present
    /// would reap a lease that was alive when read and may have been
    /// renewed since by a holder that is just as busy.
    pub async fn sweep(
        &mut self,
        queued: Vec<crate::store::QueuedEntry>,
        active: Vec<Job>,
        pools: Vec<crate::domain::Pool>,
        read_at: std::time::SystemTime,
    ) {
        if self.check_writable().is_err() {
            return;
        }
        self.learn_pools(pools);
        let now = self.clock.now();
        let mut pools: Vec<String> = Vec::new();
        for entry in queued {
            let known = self.ready.contains(&entry.id)
                || self.active.contains_key(&entry.id)
                || self.fetches.contains(&entry.id);
            if known || self.write_in_flight(entry.seq) || entry.ready_time > tether::time::latest() {
                continue;
            }
            if !pools.contains(&entry.routing.pool) {
                pools.push(entry.routing.pool.clone());
            }
            self.ready.insert(ReadyEntry::from_stored(entry), now);
        }
        let horizon = read_at.min(now).checked_sub(self.config.clock_skew_tolerance).unwrap_or(std::time::UNIX_EPOCH);
        // Attempts held here that the store no longer lists as active may
        // have been cancelled or reaped through another replica: read them.
        let listed: std::collections::HashSet<&str> = active.iter().map(|j| j.id.as_str()).collect();
        let gone: Vec<String> = self
            .active
            .values()
            .filter(|j| !listed.contains(j.id.as_str()) && !self.write_in_flight(j.seq))
            .map(|j| j.id.clone())
            .collect();
        for id in gone {
            self.refresh(id);
        }
        for job in active {
            if self.active.contains_key(&job.id) || self.write_in_flight(job.seq) {
                continue;
            }
            let Some(deadline) = job.next_deadline() else { continue };
            if deadline > horizon {
                continue;
            }
            self.touched.clear();
            let (reason, failure) = expiry(&job, horizon);
            tracing::info!(job = %job.id, %reason, "attempt of another replica reaped");
            let requeued = self.fail_attempt(job, reason, failure);
            if requeued.state == JobState::Queued && !pools.contains(&requeued.spec.routing.pool) {
                pools.push(requeued.spec.routing.pool.clone());
            }
        }
        // Every pool with ready jobs, not only those that gained some: a
        // job whose read for dispatch failed waits for this.
        for pool in self.ready.pools() {
            if !pools.contains(&pool) {
                pools.push(pool);
            }
        }
        for pool in pools {
            self.dispatch_pool(&pool).await;
        }
    }

    /// Whether this replica holds `id` queued, as far as it knows for
    /// sure. On a shared store an entry without its record came from a
    /// sweep, whose snapshot may predate a change made here since (a sweep
    /// handled after this replica dead-lettered the job brings it back as
    /// queued): it is dropped, and the caller reads the store instead. If
    /// the job is in fact queued, the next sweep finds it again.
    fn holds_queued(&mut self, id: &str) -> bool {
        if !self.ready.contains(id) {
            return false;
        }
        if self.shared && !self.ready.has_record(id) {
            self.ready.remove(id);
            return false;
        }
        true
    }

    pub async fn cancel(&mut self, id: String, reason: String) -> DomainResult<Job> {
        let reason = if reason.is_empty() { "cancelled by operator".to_string() } else { reason };
        // Held by another replica's agent: that replica is told at once.
        let mut held_elsewhere = false;
        let mut job = if self.holds_queued(&id) {
            self.take_ready_record(&id).await?
        } else if let Some(job) = self.take_active(&id) {
            self.push_after_commit(
                &job.worker_id.clone(),
                AgentPush::Cancel { job: job.attempt_ref(), reason: reason.clone() },
            );
            job
        } else {
            match self.store.get_job(&id).await.map_err(super::store_error)? {
                None => return Err(DomainError::job_not_found(&id)),
                Some(job) if self.write_in_flight(job.seq) => {
                    return Err(DomainError::Unavailable(format!("job {id} is changing state; retry")))
                }
                // A dashboard job that was dead-lettered has ended FAILED.
                Some(job) if job.state == JobState::DeadLettered && job.dashboard.is_some() => {
                    return Err(DomainError::FailedPrecondition(format!(
                        "job {id} already ended (FAILED: its attempts are spent); re-run it with RetryJob"
                    )))
                }
                Some(job) if job.state == JobState::DeadLettered => job,
                // Queued or held by another replica: cancelled
                // conditionally; a replica holding it learns it from a
                // wake-up sent once the cancel is durable (or, if that is
                // lost, its next write or sweep) and tells its agent to stop.
                Some(job) if self.shared && (job.state.is_active() || job.state == JobState::Queued) => {
                    held_elsewhere = job.state.is_active();
                    job
                }
                Some(job) if job.state.is_terminal() => {
                    return Err(DomainError::FailedPrecondition(format!(
                        "job {id} already finished ({:?}); only queued, claimed, running or dead-lettered jobs can be cancelled",
                        job.state
                    )))
                }
                Some(_) => return Err(DomainError::Unavailable(format!("job {id} is changing state; retry"))),
            }
        };
        let previous = job.state;
        job.last_error = reason;
        job.finish(JobState::Cancelled, self.clock.now());
        self.persist(&mut job, Some(previous));
        if held_elsewhere {
            self.wake_peers_after_commit(&job);
        }
        Ok(job)
    }

    pub async fn redrive(&mut self, id: String) -> DomainResult<Job> {
        if self.fetches.contains(&id) {
            return Err(DomainError::Unavailable(format!("job {id} is being read for dispatch; retry")));
        }
        if self.holds_queued(&id) || self.active.contains_key(&id) {
            return Err(DomainError::FailedPrecondition(format!("job {id} is not dead-lettered")));
        }
        let mut job = self
            .store
            .get_job(&id)
            .await
            .map_err(super::store_error)?
            .ok_or_else(|| DomainError::job_not_found(&id))?;
        if self.write_in_flight(job.seq) {
            // The stored state is stale (e.g. it was redriven and finished
            // moments ago); writing from it would undo that.
            return Err(DomainError::Unavailable(format!("job {id} is changing state; retry")));
        }
        if job.state != JobState::DeadLettered {
            return Err(DomainError::FailedPrecondition(format!("job {id} is {:?}, not dead-lettered", job.state)));
        }
        if job.dashboard.is_some() {
            // It has ended FAILED on the dashboard; a re-run is a new job
            // (RetryJob), so a job and its retry never both run.
            return Err(DomainError::FailedPrecondition(format!(
                "job {id} is a dashboard job that ended FAILED; re-run it with DashboardService.RetryJob"
            )));
        }
        if let Some(reason) = job.defect() {
            return Err(DomainError::FailedPrecondition(format!(
                "job {id} cannot be redriven: {reason}; cancel it and enqueue a corrected job"
            )));
        }
        job.attempt = 0;
        job.requeue(self.clock.now());
        self.persist(&mut job, Some(JobState::DeadLettered));
        let out = job.clone();
        self.place(job).await;
        Ok(out)
    }

    /// Job counts by state and by priority, from the engine's counts or,
    /// on a shared store, from the store's (`rows`).
    pub fn stats(&self, queue: Option<&str>, rows: Option<Vec<crate::store::CountRow>>) -> QueueStats {
        let now = self.clock.now();
        let mut by_state: Vec<(JobState, u64)> = JobState::ALL.iter().map(|s| (*s, 0)).collect();
        let mut by_priority: Vec<(Priority, u64)> = Priority::ALL.iter().map(|p| (*p, 0)).collect();
        let counted: Vec<((JobState, Priority), u64)> = match rows {
            Some(rows) => rows
                .into_iter()
                .filter(|r| queue.is_none_or(|want| want == r.queue))
                .map(|r| ((r.state, r.priority), r.count))
                .collect(),
            None => self
                .counts
                .iter()
                .filter(|(q, _)| queue.is_none_or(|want| want == q.as_str()))
                .flat_map(|(_, per_queue)| per_queue.iter().map(|(k, n)| (*k, *n)))
                .collect(),
        };
        for ((state, priority), n) in &counted {
            if let Some(slot) = by_state.iter_mut().find(|(s, _)| s == state) {
                slot.1 += n;
            }
            if *state == JobState::Queued {
                if let Some(slot) = by_priority.iter_mut().find(|(p, _)| p == priority) {
                    slot.1 += n;
                }
            }
        }
        let oldest_queued_age =
            self.ready.oldest_ready(queue).map_or(Duration::ZERO, |t| now.duration_since(t).unwrap_or(Duration::ZERO));
        QueueStats { by_state, queued_by_priority: by_priority, oldest_queued_age }
    }
}

/// What an enqueue request of a batch resolves to.
enum Planned {
    New,
    Existing(Box<Job>),
    /// The same key and request as an earlier entry of the batch.
    SameAs(usize),
}

/// Why an attempt whose deadline passed by `at` ends: its run timed out,
/// or its lease ran out.
fn expiry(job: &Job, at: SystemTime) -> (String, Failure) {
    match (job.run_deadline, job.spec.timeout) {
        (Some(deadline), Some(timeout)) if deadline <= at => {
            (format!("attempt {} timed out after {:?}", job.attempt, timeout), Failure::TimedOut)
        }
        _ => (
            format!("attempt {} lease expired (worker {} stopped renewing it)", job.attempt, job.worker_id),
            Failure::Lost,
        ),
    }
}

fn stale(r: &AttemptRef, job: &Job) -> DomainError {
    DomainError::FailedPrecondition(format!(
        "stale attempt: job {} is at attempt {} (fencing token {}), not attempt {} (fencing token {})",
        job.id, job.attempt, job.fencing_token, r.attempt, r.fencing_token
    ))
}
