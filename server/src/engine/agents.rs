//! Agent operations of the engine: sessions (Hello, reconnect and resume),
//! credit-based dispatch, heartbeats, reports, drain and deregistration.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use tether::time::later;
use tokio::sync::mpsc;

use super::core::{AgentEntry, Engine, Session};
use super::ready::ReadyEntry;
use super::types::{
    AgentInbound, AgentPage, AgentPush, AgentView, HeartbeatAnswer, HelloInfo, MetricsSample, Outcome, WelcomeInfo,
};
use super::AgentListFilter;
use crate::domain::{
    Agent, AttemptRef, DomainError, DomainResult, Failure, Health, Job, JobState, Routing, SchedulingStatus,
};
use crate::store::Write;

impl Engine {
    /// The agent that should get a job with `routing` now: one that takes
    /// work and matches, healthy before degraded, most free slots first,
    /// then the one that got work least recently.
    /// Found in the free-agent index, not by scanning the pool.
    pub fn pick_agent(&self, routing: &Routing) -> Option<Arc<str>> {
        self.agents.pick(routing)
    }

    /// Gives an agent ready jobs until its slots are full. On a shared
    /// store, queued jobs whose records are not in memory are read for it
    /// in one task (`fetch.rs`) and offered when they come back.
    pub async fn fill_agent(&mut self, agent_id: &str) {
        let mut to_read = Vec::new();
        while let Some(entry) = self.agents.get(agent_id) {
            if !entry.takes_work() || entry.free_slots() <= self.fetches.reserved(agent_id) {
                break;
            }
            let Some(next) = self.ready.first_match(&entry.agent.pool, &entry.agent.labels, None) else { break };
            let id = next.id();
            if self.shared && !next.has_body() {
                if let Some(entry) = self.ready.remove(&id) {
                    self.fetches.start(entry, agent_id);
                    to_read.push(id);
                }
                continue;
            }
            match self.take_ready(&id).await {
                Ok(job) => self.assign(job, agent_id),
                // Taken by another replica since it was seen: a normal race.
                Err(DomainError::Conflict(reason)) => tracing::debug!(job = %id, %reason, "queued job gone"),
                // The store failed to answer (the job stays queued): trying
                // the next job now would fail the same way.
                Err(e @ (DomainError::Unavailable(_) | DomainError::NotFound { .. })) => {
                    tracing::warn!(job = %id, error = %e, "could not dispatch a queued job; trying again later");
                    break;
                }
                Err(e) => tracing::error!(job = %id, error = %e, "skipping unreadable queued job"),
            }
        }
        if !to_read.is_empty() {
            super::fetch::spawn(self.store.clone(), &self.commands, to_read);
        }
    }

    /// Records read for the dispatcher (see `fetch.rs`): a job still queued
    /// goes back into the ready set with its record and is offered first
    /// to the agent it was read for; one claimed, finished or deleted
    /// meanwhile (through another replica) is dropped. After a failed read
    /// the entries go back as they were and are read again at the next
    /// dispatch (at the latest the next sweep's), not at once: a failing
    /// store would be asked in a loop.
    pub async fn fetched(&mut self, ids: Vec<String>, jobs: crate::store::StoreResult<Vec<Job>>) {
        let now = self.clock.now();
        let mut found: super::FastMap<String, Job> = match jobs {
            Ok(jobs) => jobs.into_iter().map(|j| (j.id.clone(), j)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, jobs = ids.len(), "could not read queued jobs to dispatch; trying again later");
                for id in &ids {
                    if let Some((entry, _)) = self.fetches.finish(id) {
                        self.ready.insert(entry, now);
                    }
                }
                return;
            }
        };
        let (mut agents, mut pools): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
        for id in ids {
            let Some((_, agent)) = self.fetches.finish(&id) else { continue };
            if !agents.contains(&agent) {
                agents.push(agent);
            }
            let known = self.active.contains_key(&id) || self.ready.contains(&id);
            match found.remove(&id) {
                Some(job) if job.state == JobState::Queued && !known && !self.write_in_flight(job.seq) => {
                    if !pools.contains(&job.spec.routing.pool) {
                        pools.push(job.spec.routing.pool.clone());
                    }
                    self.ready.insert(ReadyEntry::from_job(job), now);
                }
                Some(job) => tracing::debug!(job = %id, state = ?job.state, "queued job gone"),
                None => tracing::debug!(job = %id, "queued job gone"),
            }
        }
        for agent in agents {
            self.fill_agent(&agent).await;
        }
        for pool in pools {
            self.dispatch_pool(&pool).await;
        }
    }

    /// Offers a pool's ready jobs to its agents.
    pub async fn dispatch_pool(&mut self, pool: &str) {
        for id in self.agents.free_in_pool(pool) {
            if self.ready.ready_in_pool(pool) == 0 {
                return;
            }
            self.fill_agent(&id).await;
        }
    }

    fn new_agent(&mut self, hello: &HelloInfo) -> String {
        let now = self.clock.now();
        let agent = Agent {
            id: crate::ids::new_id(now),
            name: hello.name.clone(),
            pool: hello.pool.clone(),
            labels: hello.labels.clone(),
            slots: hello.slots,
            health: Health::Registering,
            health_reason: String::new(),
            scheduling: SchedulingStatus::Active,
            version: hello.version.clone(),
            create_time: now,
            last_seen_time: now,
            metrics: Default::default(),
        };
        let id = self.track_agent(agent);
        // Registered here: this replica's copy is its truth (see agent_sync.rs).
        if let Some(mut entry) = self.agents.get_mut(&id) {
            entry.held_here = true;
            entry.logged = None;
        }
        id
    }

    /// Stores the agent; a registration or a change of health or
    /// scheduling status is logged with it (activity log).
    pub(crate) fn save_agent(&mut self, id: &str) {
        let Some(mut entry) = self.agents.get_mut(id) else { return };
        let put = Write::PutAgent(Box::new(entry.agent.clone()));
        let now = (entry.agent.health, entry.agent.scheduling);
        if entry.logged == Some(now) {
            drop(entry);
            self.persist_other(put);
            return;
        }
        let change = crate::activity::AgentChange { agent: entry.agent.clone(), previous: entry.logged };
        entry.logged = Some(now);
        drop(entry);
        let write = match change.activity(self.clock.now()) {
            Ok(activity) => Write::Logged { write: Box::new(put), activity: vec![activity] },
            Err(e) => {
                tracing::error!(agent = %id, error = %e, "an agent change does not encode; stored unlogged");
                put
            }
        };
        self.persist_other(write);
    }

    pub fn register(&mut self, mut hello: HelloInfo) -> DomainResult<(AgentView, bool)> {
        hello.labels = self.labels_with_pool_defaults("pool", &hello.pool, hello.labels)?;
        let existing = self.agent_names.get(&(hello.pool.clone(), hello.name.clone())).cloned();
        let (id, created) = match existing {
            Some(id) => (id, false),
            None => (self.new_agent(&hello), true),
        };
        if created {
            self.save_agent(&id);
        }
        Ok((self.agent_view(&id)?, created))
    }

    /// An agent's labels: its pool's default labels, overridden by its own.
    fn labels_with_pool_defaults(
        &self,
        field: &str,
        pool: &str,
        labels: std::collections::BTreeMap<String, String>,
    ) -> DomainResult<std::collections::BTreeMap<String, String>> {
        let pool = self.require_pool(field, pool)?;
        let mut merged = pool.default_labels.clone();
        merged.extend(labels);
        Ok(merged)
    }

    pub async fn connect(
        &mut self,
        hello: HelloInfo,
        pushes: mpsc::UnboundedSender<AgentPush>,
    ) -> DomainResult<WelcomeInfo> {
        if self.leaving.is_some() {
            // Its agents are moving away; a new one would be told to move at
            // once (or, on an older protocol, cut off soon).
            return Err(DomainError::Unavailable("this server is stopping; connect to another one".into()));
        }
        let now = self.clock.now();
        let mut hello = hello;
        self.know_pool(&hello.pool).await;
        hello.labels = self.labels_with_pool_defaults("hello.pool", &hello.pool, hello.labels)?;
        let id = match self.agent_names.get(&(hello.pool.clone(), hello.name.clone())) {
            Some(id) => id.clone(),
            None => match self.stored_agent(&hello.pool, &hello.name).await? {
                Some(id) => id,
                None => self.new_agent(&hello),
            },
        };
        let session_id = self.next_session;
        self.next_session += 1;
        let grace = self.config.reconnect_grace;
        let Some(mut entry) = self.agents.get_mut(&id) else {
            return Err(DomainError::Internal(format!("agent {id} vanished")));
        };
        if let Some(at) = entry.disconnected_at.take() {
            self.grace.remove(&(later(at, grace), id.clone()));
        }
        entry.agent.labels = hello.labels.clone();
        entry.agent.slots = hello.slots;
        entry.agent.version = hello.version.clone();
        entry.agent.last_seen_time = now;
        entry.missed = 0;
        let replaced_mover = entry.session.as_ref().is_some_and(|s| s.moving && s.reconnects);
        entry.session = Some(Session {
            id: session_id,
            pushes,
            answer_starts: hello.answer_starts,
            reconnects: hello.reconnects,
            moving: false,
        });
        entry.accepting = true;
        entry.held_here = true;
        if entry.agent.scheduling == SchedulingStatus::Draining && hello.running.is_empty() {
            // A drained agent that comes back with nothing running starts over.
            entry.agent.scheduling = SchedulingStatus::Active;
        }
        entry.draining = entry.agent.scheduling == SchedulingStatus::Draining;
        let draining = entry.draining;

        // Reconcile what the agent says it runs with what it holds.
        let mut resumed = Vec::new();
        let mut abandoned = Vec::new();
        // Attempts another replica gave this agent (it reconnected here).
        let mut elsewhere = Vec::new();
        for r in &hello.running {
            let held = entry.holds(r);
            let current = self.active.get(&r.job_id).is_some_and(|j| j.is_current(r) && j.worker_id == id);
            if held && current {
                resumed.push(r.clone());
            } else if self.shared && !held && !self.active.contains_key(&r.job_id) {
                elsewhere.push(r.clone());
            } else {
                abandoned.push(r.clone());
                if held {
                    entry.in_flight.remove(&r.job_id);
                }
            }
        }
        // Only what resumed counts as listed: a listed reference that named
        // another attempt must not shield the entry it collides with.
        let listed: HashSet<&str> = resumed.iter().map(|r: &AttemptRef| r.job_id.as_str()).collect();
        let mut resend = Vec::new();
        let mut lost = Vec::new();
        for (job_id, f) in &entry.in_flight {
            if listed.contains(job_id.as_str()) {
                continue;
            }
            let claimed =
                self.active.get(job_id).is_some_and(|j| j.fencing_token == f.token && j.state == JobState::Claimed);
            if !f.acked && claimed {
                resend.push(job_id.clone());
            } else {
                lost.push(job_id.clone());
            }
        }
        for r in &resumed {
            if let Some(f) = entry.in_flight.get_mut(&r.job_id) {
                f.acked = true;
            }
        }
        drop(entry);
        for job_id in lost {
            self.release(&id, &job_id, "the agent reconnected without this job".into());
        }
        for job_id in resend {
            if let Some(job) = self.active.get(&job_id).cloned() {
                // Only if the claim applied (it may still be committing).
                let needs = vec![job.seq];
                self.push_after_commit_needing(&id, AgentPush::Assign(Box::new(job)), needs);
            }
        }
        for r in &resumed {
            self.renew_for_agent(r);
        }
        // The Welcome depends on the take-overs alone: a release or renewal
        // above that lost a race is settled by its own conflict.
        self.touched.clear();
        for r in elsewhere {
            if self.take_over(&id, &r).await {
                resumed.push(r);
            } else {
                abandoned.push(r);
            }
        }
        self.set_health(&id, Health::Registering, "connected; waiting for its first heartbeat".into());
        let deadline = later(now, self.config.heartbeat_interval.saturating_add(self.config.heartbeat_interval / 2));
        self.arm_heartbeat_check(&id, deadline);
        self.save_agent(&id);
        if draining {
            self.push_after_commit(&id, AgentPush::Drain { reason: "the agent is draining".into() });
        }
        if replaced_mover {
            self.mover_left();
        }
        // The Welcome depends on the take-overs above, not on the claims
        // of the first assignments.
        let touched = std::mem::take(&mut self.touched);
        self.fill_agent(&id).await;
        self.touched = touched;
        tracing::info!(agent = %id, name = %hello.name, pool = %hello.pool, resumed = resumed.len(), abandoned = abandoned.len(), "agent connected");
        Ok(WelcomeInfo {
            agent_id: id,
            session_id,
            heartbeat_interval: self.config.heartbeat_interval,
            lease_duration: crate::domain::validate::DEFAULT_LEASE,
            reconnect_grace: grace,
            resumed,
            abandoned,
        })
    }

    /// On a shared store: the id of an agent another replica registered
    /// (the engine then tracks it too), if it exists and is not terminated.
    async fn stored_agent(&mut self, pool: &str, name: &str) -> DomainResult<Option<String>> {
        if !self.shared {
            return Ok(None);
        }
        let Some(agent) = self.store.find_agent_by_name(pool, name).await.map_err(super::store_error)? else {
            return Ok(None);
        };
        if agent.health == Health::Terminated {
            return Ok(None);
        }
        Ok(Some(self.track_agent(agent)))
    }

    /// Starts tracking a live agent: by id, by (pool, name) and in its pool.
    pub(super) fn track_agent(&mut self, agent: Agent) -> String {
        let id = agent.id.clone();
        self.agent_names.insert((agent.pool.clone(), agent.name.clone()), id.clone());
        self.pool_agents.entry(agent.pool.clone()).or_default().push(id.clone());
        self.agents.insert(AgentEntry::new(agent));
        id
    }

    /// On a shared store: takes over an attempt another replica assigned to
    /// this agent, which reconnected here (that replica stopped, or the
    /// agent's connection moved). Conditional on the job's version, so the
    /// old replica's late writes lose; true if the attempt is current.
    async fn take_over(&mut self, agent_id: &str, r: &AttemptRef) -> bool {
        let job = match self.store.get_job(&r.job_id).await {
            Ok(Some(job)) => job,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(job = %r.job_id, error = %e, "could not read a job to resume it");
                return false;
            }
        };
        if !job.is_current(r) || !job.state.is_active() || job.worker_id != agent_id || self.write_in_flight(job.seq) {
            return false;
        }
        // A stale entry from when it was queued must not be dispatched again.
        self.ready.remove(&job.id);
        let mut job = job;
        let state = job.state;
        job.lease_expire_time = Some(later(self.clock.now(), job.spec.lease_duration));
        self.persist(&mut job, Some(state));
        self.track_deadline(&job, None);
        if let Some(mut entry) = self.agents.get_mut(agent_id) {
            entry.in_flight.insert(
                job.id.clone(),
                super::core::InFlight { attempt: job.attempt, token: job.fencing_token, acked: true },
            );
        }
        tracing::info!(job = %job.id, agent = %agent_id, attempt = job.attempt, "attempt resumed from another replica");
        self.active.insert(job.id.clone(), job);
        true
    }

    /// Renews the lease of a current attempt the agent reports running.
    /// On a shared store a renewal is a store write, so it is written only
    /// once half the lease has passed, not on every heartbeat.
    fn renew_for_agent(&mut self, r: &AttemptRef) {
        if self.shared {
            let now = self.clock.now();
            let fresh = self
                .active
                .get(&r.job_id)
                .is_some_and(|j| j.lease_expire_time.is_some_and(|end| end > later(now, j.spec.lease_duration / 2)));
            if fresh {
                return;
            }
        }
        if self.active.get(&r.job_id).is_some_and(|j| j.is_current(r)) {
            if let Err(e) = self.renew(r, None) {
                tracing::debug!(job = %r.job_id, error = %e, "lease not renewed");
            }
        }
    }

    /// Frees an agent's slot for an attempt it no longer runs; a still
    /// current attempt fails (retryably).
    fn release(&mut self, agent_id: &str, job_id: &str, reason: String) {
        let Some(f) = self.agents.get_mut(agent_id).and_then(|mut a| a.in_flight.remove(job_id)) else {
            return;
        };
        if self.active.get(job_id).is_some_and(|j| j.fencing_token == f.token && j.attempt == f.attempt) {
            if let Some(job) = self.take_active(job_id) {
                self.fail_attempt(job, reason, Failure::Lost);
            }
        }
    }

    pub async fn inbound(&mut self, agent_id: &str, session_id: u64, message: AgentInbound) {
        let Some(mut entry) = self.agents.get_mut(agent_id) else { return };
        if entry.session.as_ref().map(|s| s.id) != Some(session_id) {
            return; // a message from a replaced session
        }
        let now = self.clock.now();
        entry.agent.last_seen_time = now;
        match message {
            AgentInbound::Heartbeat { metrics, running, draining } => {
                entry.agent.metrics = metrics;
                entry.history.push_back(MetricsSample { time: now, metrics });
                while entry.history.len() > self.config.metrics_history {
                    entry.history.pop_front();
                }
                let mut changed = false;
                if draining && !entry.draining {
                    entry.draining = true;
                    entry.agent.scheduling = SchedulingStatus::Draining;
                    changed = true;
                }
                let was_accepting = std::mem::replace(&mut entry.accepting, true);
                let owned: Vec<AttemptRef> = running.into_iter().filter(|r| entry.holds(r)).collect();
                drop(entry);
                for r in &owned {
                    self.renew_for_agent(r);
                }
                if changed {
                    self.save_agent(agent_id);
                }
                self.observe_heartbeat(agent_id, metrics).await;
                if !was_accepting {
                    self.fill_agent(agent_id).await;
                }
            }
            AgentInbound::AssignmentAck { job, accepted, started, reason } => {
                if !entry.holds(&job) {
                    drop(entry);
                    // Not this agent's assignment (stale, or another agent's
                    // job): it must neither start nor requeue it. A start
                    // riding on the ack is refused as any start would be.
                    tracing::debug!(agent = %agent_id, job = %job.job_id, "ignoring an ack for an attempt the agent does not hold");
                    if accepted && started {
                        self.started(agent_id, job).await;
                    }
                    return;
                }
                if accepted {
                    if let Some(f) = entry.in_flight.get_mut(&job.job_id) {
                        f.acked = true;
                    }
                    drop(entry);
                    if started {
                        self.started(agent_id, job).await;
                    }
                    return;
                }
                entry.in_flight.remove(&job.job_id);
                entry.accepting = false;
                drop(entry);
                let claimed_here = self
                    .active
                    .get(&job.job_id)
                    .is_some_and(|j| j.is_current(&job) && j.state == JobState::Claimed && j.worker_id == agent_id);
                if claimed_here {
                    if let Some(mut claimed) = self.take_active(&job.job_id) {
                        // A rejection does not use up an attempt.
                        claimed.attempt = claimed.attempt.saturating_sub(1);
                        claimed.requeue(now);
                        claimed.last_error = format!("rejected by agent {agent_id}: {reason}");
                        self.persist(&mut claimed, Some(JobState::Claimed));
                        self.place(claimed).await;
                    }
                } else if self.active.get(&job.job_id).is_some_and(|j| j.is_current(&job)) {
                    // Refusing a job it already started is giving it up:
                    // a lost attempt, retried as such.
                    if let Some(running) = self.take_active(&job.job_id) {
                        let error = format!("agent {agent_id} gave the attempt up after starting it: {reason}");
                        self.fail_attempt(running, error, Failure::Lost);
                    }
                }
                self.fill_agent(agent_id).await;
            }
            AgentInbound::Started { job } => {
                drop(entry);
                self.started(agent_id, job).await
            }
            AgentInbound::Progress { job, percent, message } => {
                if entry.holds(&job) {
                    tracing::debug!(job = %job.job_id, percent, %message, "job progress");
                }
            }
            AgentInbound::Log { job, stderr, data, sequence, agent_time } => {
                if entry.holds(&job) {
                    drop(entry);
                    self.store_output(job, super::output::AgentChunk { stderr, data, sequence, agent_time }, now);
                }
            }
            AgentInbound::Finished { job, outcome, result, error, exit_code } => {
                let held = entry.holds(&job);
                if held {
                    entry.in_flight.remove(&job.job_id);
                }
                drop(entry);
                let current = held && self.active.get(&job.job_id).is_some_and(|j| j.is_current(&job));
                let ack = if current {
                    match outcome {
                        Outcome::Succeeded => self.complete_reported(&job, result),
                        Outcome::FailedRetryable => self
                            .fail_reported(&job, error, Failure::Reported { retryable: true, exit_code })
                            .map(|_| ()),
                        Outcome::FailedPermanent => self
                            .fail_reported(&job, error, Failure::Reported { retryable: false, exit_code })
                            .map(|_| ()),
                        Outcome::Cancelled => self
                            .fail_reported(&job, format!("cancelled by the agent: {error}"), Failure::Lost)
                            .map(|_| ()),
                    }
                } else {
                    self.check_finished_duplicate(agent_id, &job, outcome).await
                };
                self.ack(agent_id, job, ack);
                if held {
                    self.fill_agent(agent_id).await;
                }
            }
        }
    }

    /// A result for an attempt that is no longer active: accepted if it is a
    /// re-send of the success already recorded or the report owed after a
    /// Cancel, refused otherwise.
    async fn check_finished_duplicate(&self, agent_id: &str, r: &AttemptRef, outcome: Outcome) -> DomainResult<()> {
        let job = match self.active.get(&r.job_id) {
            Some(job) => job.clone(),
            None => match self.store.get_job(&r.job_id).await {
                Ok(Some(job)) => job,
                Ok(None) => return Err(DomainError::job_not_found(&r.job_id)),
                Err(e) => return Err(super::store_error(e)),
            },
        };
        let same_attempt = job.fencing_token == r.fencing_token && job.attempt == r.attempt;
        if !same_attempt || job.worker_id != agent_id {
            return Err(DomainError::FailedPrecondition(format!(
                "job {} attempt {} (fencing token {}) is not assigned to this agent",
                r.job_id, r.attempt, r.fencing_token
            )));
        }
        match job.state {
            // A re-send of the success already recorded.
            JobState::Succeeded if outcome == Outcome::Succeeded => Ok(()),
            // The report an agent owes after a Cancel: acknowledged, ignored.
            JobState::Cancelled => Ok(()),
            state => Err(DomainError::FailedPrecondition(format!(
                "attempt {} (fencing token {}) is no longer current: the job is {state:?}",
                r.attempt, r.fencing_token
            ))),
        }
    }

    /// An agent reports that an attempt began running.
    async fn started(&mut self, agent_id: &str, job: AttemptRef) {
        let Some(entry) = self.agents.get(agent_id) else { return };
        let answer_accepted = entry.session.as_ref().is_some_and(|s| s.answer_starts);
        let held = entry.holds(&job);
        let result = if held {
            self.mark_running(&job)
        } else {
            Err(DomainError::FailedPrecondition("the attempt is not assigned to this agent".into()))
        };
        let refused = result.is_err();
        let job_id = job.job_id.clone();
        // The start is still written with the batch; only its answer is
        // skipped, and nothing unanswered was promised durable.
        if refused || answer_accepted {
            self.ack(agent_id, job, result);
        }
        if refused && held {
            // The attempt ended before it started (cancelled or expired):
            // the agent stops it on the refusal and reports nothing more,
            // so its slot is free now.
            if let Some(mut entry) = self.agents.get_mut(agent_id) {
                entry.in_flight.remove(&job_id);
            }
            self.fill_agent(agent_id).await;
        }
    }

    fn ack(&mut self, agent_id: &str, job: AttemptRef, result: DomainResult<()>) {
        let (accepted, reason) = match result {
            Ok(()) => (true, String::new()),
            Err(e) => (false, e.to_string()),
        };
        self.push_after_commit(agent_id, AgentPush::UpdateAck { job, accepted, reason });
    }

    pub fn disconnected(&mut self, agent_id: &str, session_id: u64) {
        let now = self.clock.now();
        let grace = self.config.reconnect_grace;
        let Some(mut entry) = self.agents.get_mut(agent_id) else { return };
        if entry.session.as_ref().map(|s| s.id) != Some(session_id) {
            return;
        }
        let was_moving = entry.session.take().is_some_and(|s| s.moving && s.reconnects);
        entry.disconnected_at = Some(now);
        entry.agent.last_seen_time = now;
        tracing::info!(agent = %agent_id, running = entry.in_flight.len(), "agent stream closed; grace period started");
        drop(entry);
        self.grace.insert((later(now, grace), agent_id.to_string()));
        self.disarm_heartbeat_check(agent_id);
        if was_moving {
            self.mover_left();
        }
    }

    /// Agents gone longer than the grace period lose their jobs and go
    /// offline.
    pub async fn expire_grace(&mut self, now: SystemTime) {
        let grace = self.config.reconnect_grace;
        while let Some((t, id)) = self.grace.first().cloned() {
            if t > now {
                break;
            }
            self.grace.remove(&(t, id.clone()));
            let Some(mut entry) = self.agents.get_mut(&id) else { continue };
            let expired = entry.session.is_none() && entry.disconnected_at.is_some_and(|d| later(d, grace) <= now);
            if !expired {
                continue;
            }
            entry.disconnected_at = None;
            let terminated = entry.agent.health == Health::Terminated;
            let jobs: Vec<String> = entry.in_flight.keys().cloned().collect();
            let name = entry.agent.name.clone();
            drop(entry);
            for job_id in jobs {
                self.release(
                    &id,
                    &job_id,
                    format!("agent {name} lost: its stream closed and it did not return within {grace:?}"),
                );
            }
            if !terminated {
                self.set_health(&id, Health::Offline, format!("stream closed and not back within {grace:?}").into());
            }
            self.save_agent(&id);
        }
    }

    /// A heartbeat over the unary call, for agents without a stream: same
    /// effect on health and leases as a stream heartbeat.
    pub async fn unary_heartbeat(
        &mut self,
        agent_id: &str,
        metrics: crate::domain::Metrics,
        running: Vec<AttemptRef>,
    ) -> DomainResult<HeartbeatAnswer> {
        let now = self.clock.now();
        let mut entry = self.agents.get_mut(agent_id).ok_or_else(|| DomainError::agent_not_found(agent_id))?;
        if entry.agent.health == Health::Terminated {
            return Err(DomainError::FailedPrecondition(format!("agent {agent_id} is deregistered")));
        }
        entry.agent.last_seen_time = now;
        entry.agent.metrics = metrics;
        // A unary heartbeat makes this replica the agent's holder, as a
        // stream would.
        entry.held_here = true;
        entry.history.push_back(MetricsSample { time: now, metrics });
        while entry.history.len() > self.config.metrics_history {
            entry.history.pop_front();
        }
        let drain = entry.agent.scheduling == SchedulingStatus::Draining;
        drop(entry);
        let mut abandoned = Vec::new();
        for r in running {
            let owned = self.active.get(&r.job_id).is_some_and(|j| j.is_current(&r) && j.worker_id == agent_id);
            if owned {
                self.renew_for_agent(&r);
            } else {
                abandoned.push(r);
            }
        }
        self.observe_heartbeat(agent_id, metrics).await;
        Ok(HeartbeatAnswer { heartbeat_interval: self.config.heartbeat_interval, abandoned, drain })
    }

    /// Operator scheduling changes: cordon, uncordon, out of service, drain.
    pub async fn update_status(
        &mut self,
        id: &str,
        status: SchedulingStatus,
        reason: String,
    ) -> DomainResult<AgentView> {
        if status == SchedulingStatus::Draining {
            return self.drain(id, reason);
        }
        let mut entry = self.agents.get_mut(id).ok_or_else(|| DomainError::agent_not_found(id))?;
        if entry.agent.health == Health::Terminated {
            return Err(DomainError::FailedPrecondition(format!("agent {id} is deregistered")));
        }
        tracing::info!(agent = %id, from = ?entry.agent.scheduling, to = ?status, %reason, "agent scheduling status changed");
        entry.agent.scheduling = status;
        entry.draining = false;
        drop(entry);
        self.save_agent(id);
        if status == SchedulingStatus::Active {
            self.fill_agent(id).await;
        }
        self.agent_view(id)
    }

    pub fn agent_view(&self, id: &str) -> DomainResult<AgentView> {
        let entry = self.agents.get(id).ok_or_else(|| DomainError::agent_not_found(id))?;
        let mut running: Vec<AttemptRef> = entry
            .in_flight
            .iter()
            .map(|(job_id, f)| AttemptRef { job_id: job_id.clone(), attempt: f.attempt, fencing_token: f.token })
            .collect();
        running.sort();
        Ok(AgentView {
            agent: entry.agent.clone(),
            connected: entry.session.is_some(),
            running,
            metrics_history: entry.history.iter().cloned().collect(),
        })
    }

    pub fn list_agents(&self, filter: &AgentListFilter) -> AgentPage {
        let mut ids: Vec<&String> = self
            .agents
            .iter()
            .filter(|(id, e)| {
                filter.after_id.as_ref().is_none_or(|a| *id > a)
                    && filter.pool.as_ref().is_none_or(|p| *p == e.agent.pool)
                    && (filter.health.is_empty() || filter.health.contains(&e.agent.health))
                    && filter.labels.iter().all(|(k, v)| e.agent.labels.get(k) == Some(v))
            })
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        let more = ids.len() > filter.limit;
        ids.truncate(filter.limit);
        let agents: Vec<AgentView> = ids.iter().filter_map(|id| self.agent_view(id).ok()).collect();
        let next_after = if more { agents.last().map(|a| a.agent.id.clone()) } else { None };
        AgentPage { agents, next_after }
    }

    /// Agents tallied by (health, connected): one pass, nothing cloned, so a
    /// metrics scrape costs the engine microseconds even with a large fleet.
    pub fn agent_counts(&self) -> Vec<(Health, bool, u64)> {
        let mut tally: Vec<(Health, bool, u64)> = Vec::new();
        for entry in self.agents.values() {
            let key = (entry.agent.health, entry.session.is_some());
            match tally.iter_mut().find(|(h, c, _)| (*h, *c) == key) {
                Some(slot) => slot.2 += 1,
                None => tally.push((key.0, key.1, 1)),
            }
        }
        tally
    }

    pub fn drain(&mut self, id: &str, reason: String) -> DomainResult<AgentView> {
        let mut entry = self.agents.get_mut(id).ok_or_else(|| DomainError::agent_not_found(id))?;
        if entry.agent.health == Health::Terminated {
            return Err(DomainError::FailedPrecondition(format!("agent {id} is deregistered")));
        }
        entry.agent.scheduling = SchedulingStatus::Draining;
        entry.draining = true;
        drop(entry);
        let reason = if reason.is_empty() { "drained by operator".to_string() } else { reason };
        self.save_agent(id);
        self.push_after_commit(id, AgentPush::Drain { reason });
        self.agent_view(id)
    }

    pub fn deregister(&mut self, id: &str) -> DomainResult<AgentView> {
        let mut entry = self.agents.get_mut(id).ok_or_else(|| DomainError::agent_not_found(id))?;
        if entry.agent.health == Health::Terminated {
            drop(entry);
            return self.agent_view(id);
        }
        entry.draining = true;
        let mut was_moving = false;
        if let Some(session) = entry.session.take() {
            was_moving = session.moving && session.reconnects;
            let _ = session.pushes.send(AgentPush::Drain { reason: "the agent was deregistered".into() });
        }
        let (pool, name) = (entry.agent.pool.clone(), entry.agent.name.clone());
        let jobs: Vec<String> = entry.in_flight.keys().cloned().collect();
        drop(entry);
        for job_id in jobs {
            self.release(id, &job_id, "the agent was deregistered".into());
        }
        self.agent_names.remove(&(pool.clone(), name));
        self.disarm_heartbeat_check(id);
        if was_moving {
            self.mover_left();
        }
        self.set_health(id, Health::Terminated, "deregistered".into());
        if let Some(ids) = self.pool_agents.get_mut(&pool) {
            ids.retain(|a| a != id);
        }
        self.save_agent(id);
        self.agent_view(id)
    }
}
