//! Deployments, stored as records and arbitrated by the store's
//! conditional writes (so several replicas agree), outside the engine:
//! the engine only runs their rollout jobs, as dashboard jobs.
//!
//! Records (collection / id):
//! - `environments` / name: [`Environment`];
//! - `releases/<service>` / version: [`Release`], written once;
//! - `deployments/<service>` / UUIDv7: [`Deployment`] with its events;
//! - `rollouts` / `<service>/<environment>`: [`Rollout`], the slot that
//!   admits one rollout at a time, the waiting one, and what succeeded;
//! - `services` / service: [`ServiceMarks`], the versions marked bad.
//!
//! Each step is one conditional write, and [`Deployments::advance`] drives
//! a (service, environment) from whatever its records say to the next
//! stable state, so a step lost to a crash or a race is redone by the next
//! pass ([`follow`] runs passes on wake-ups and on an interval).

pub mod follow;
pub mod records;

use std::sync::Arc;

use tokio::sync::Notify;

use crate::clock::Clock;
use crate::domain::dashboard::{DashboardStatus, SYSTEM_ACTOR};
use crate::domain::deploy::{
    actor_of, current_version, deployment_id, plan_rollback, service_of, Deployment, DeploymentState, Environment,
    NewDeployment, Release, Rollout, RolloutSpec, ServiceMarks, Succeeded, Trigger,
};
use crate::domain::{DomainError, DomainResult};
use crate::engine::EngineHandle;
use crate::store::RecordOrder;
use records::{get, list, put, Put, Versioned};

const ENVIRONMENTS: &str = "environments";
const ROLLOUTS: &str = "rollouts";
const SERVICES: &str = "services";

fn releases(service: &str) -> String {
    format!("releases/{service}")
}

fn deployments(service: &str) -> String {
    format!("deployments/{service}")
}

/// How often one operation re-reads and retries after losing a race
/// before it gives up (ABORTED: the client may retry).
const MAX_RACES: usize = 20;
/// The longest chain of promotions followed when checking for a cycle.
const MAX_CHAIN: usize = 1000;
/// Records one ListDeployments call reads at most while its filter skips
/// deployments.
const MAX_SCANNED: usize = 5000;
/// The fewest records one read of a listing asks for.
const MIN_BATCH: usize = 50;

fn lost_races(what: &str) -> DomainError {
    DomainError::Conflict(format!("{what} kept changing under this request; try again"))
}

/// What a rollback did.
pub struct RolledBack {
    pub deployment: Deployment,
    pub from_version: String,
}

/// A page of deployments (or of their events' owners).
pub struct DeploymentPage {
    pub deployments: Vec<Deployment>,
    /// The unique part of the last deployment read, to resume after.
    pub next: Option<String>,
}

#[derive(Clone)]
pub struct Deployments {
    engine: EngineHandle,
    clock: Arc<dyn Clock>,
    /// Wakes the follower after a request changed a rollout.
    nudge: Arc<Notify>,
    /// Deployment ids: listings are newest first by id.
    ids: Arc<crate::ids::OrderedIds>,
}

impl Deployments {
    pub fn new(engine: EngineHandle, clock: Arc<dyn Clock>) -> Deployments {
        Deployments { engine, clock, nudge: Arc::new(Notify::new()), ids: Arc::default() }
    }

    fn store(&self) -> &dyn crate::store::Store {
        self.engine.store().as_ref()
    }

    // Environments.

    /// Creates or replaces an environment; `true` if it was created.
    pub async fn put_environment(
        &self,
        name: String,
        pool: String,
        promote_to: Option<String>,
        auto_rollback: bool,
    ) -> DomainResult<(Environment, bool)> {
        self.engine.get_pool(pool.clone()).await?;
        if let Some(next) = &promote_to {
            self.check_chain(&name, next).await?;
        }
        for _ in 0..MAX_RACES {
            let now = self.clock.now();
            let stored = get::<Environment>(self.store(), ENVIRONMENTS, &name).await?;
            let (create_time, version) = stored.as_ref().map_or((now, 0), |s| (s.value.create_time, s.version));
            let environment = Environment {
                name: name.clone(),
                pool: pool.clone(),
                promote_to: promote_to.clone(),
                auto_rollback,
                create_time,
                update_time: now,
            };
            if put(self.store(), ENVIRONMENTS, &name, &environment, version).await? == Put::Applied {
                return Ok((environment, version == 0));
            }
        }
        Err(lost_races("the environment"))
    }

    /// Refuses a promote_to that does not exist or leads back to `name`.
    async fn check_chain(&self, name: &str, next: &str) -> DomainResult<()> {
        if next == name {
            return Err(DomainError::FailedPrecondition(format!("environment {name} cannot promote to itself")));
        }
        let mut at = next.to_string();
        for _ in 0..MAX_CHAIN {
            let env = self.environment(&at).await?;
            match env.promote_to {
                None => return Ok(()),
                Some(n) if n == name => {
                    return Err(DomainError::FailedPrecondition(format!(
                        "promote_to {next} would make a cycle: {at} promotes to {name}"
                    )))
                }
                Some(n) => at = n,
            }
        }
        Err(DomainError::FailedPrecondition(format!("the promotion chain from {next} is longer than {MAX_CHAIN}")))
    }

    pub async fn environment(&self, name: &str) -> DomainResult<Environment> {
        get::<Environment>(self.store(), ENVIRONMENTS, name)
            .await?
            .map(|v| v.value)
            .ok_or_else(|| DomainError::NotFound { kind: "environment", id: name.to_string() })
    }

    pub async fn list_environments(&self) -> DomainResult<Vec<Environment>> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page =
                list::<Environment>(self.store(), ENVIRONMENTS, RecordOrder::Ascending, after.as_deref(), 500).await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            all.extend(page.into_iter().map(|(_, v)| v.value));
        }
        Ok(all)
    }

    // Deployments.

    /// Deploys (service, version) to `environment`, storing the release the
    /// first time.
    pub async fn create(
        &self,
        service: String,
        version: String,
        environment: String,
        rollout: Option<RolloutSpec>,
        requested_by: String,
        reason: String,
    ) -> DomainResult<Deployment> {
        let env = self.environment(&environment).await?;
        self.refuse_bad(&service, &version).await?;
        let release = self.release(&service, &version, rollout).await?;
        let id = self.deploy(release, &env, Trigger::Create, requested_by, reason).await?;
        self.started(&id, &service, &env.name).await
    }

    /// Drives a new deployment's rollout as far as it goes now (the
    /// follower takes it from there) and returns it as stored.
    async fn started(&self, id: &str, service: &str, environment: &str) -> DomainResult<Deployment> {
        // The deployment is stored and in its rollout: what is left is the
        // follower's to finish if this pass cannot.
        if let Err(e) = self.advance(service, environment).await {
            tracing::warn!(deployment = %id, error = %e, "a new deployment's rollout did not advance yet");
        }
        self.nudge.notify_one();
        self.get(id).await
    }

    async fn refuse_bad(&self, service: &str, version: &str) -> DomainResult<()> {
        let marks = self.marks(service).await?.value;
        if let Some(bad) = marks.bad.get(version) {
            return Err(DomainError::FailedPrecondition(format!(
                "{service}@{version} is marked bad (rolled back by {}); deploy another version",
                bad.by
            )));
        }
        Ok(())
    }

    /// The stored release, or `rollout` stored as it: a release never
    /// changes.
    async fn release(&self, service: &str, version: &str, rollout: Option<RolloutSpec>) -> DomainResult<Release> {
        let collection = releases(service);
        for _ in 0..MAX_RACES {
            if let Some(stored) = get::<Release>(self.store(), &collection, version).await? {
                if rollout.as_ref().is_some_and(|r| *r != stored.value.rollout) {
                    return Err(DomainError::AlreadyExists(format!(
                        "release {service}@{version} exists with another rollout spec; a release never changes \
                         (leave rollout out to deploy it as stored, or use a new version)"
                    )));
                }
                return Ok(stored.value);
            }
            let Some(rollout) = rollout.clone().filter(|r| !r.command.is_empty()) else {
                // Valid on its own; what is stored decides (so not
                // INVALID_ARGUMENT).
                return Err(DomainError::FailedPrecondition(format!(
                    "{service}@{version} has not been deployed before: give its rollout (rollout.command) once"
                )));
            };
            let release = Release {
                service: service.to_string(),
                version: version.to_string(),
                rollout,
                create_time: self.clock.now(),
            };
            if put(self.store(), &collection, version, &release, 0).await? == Put::Applied {
                return Ok(release);
            }
        }
        Err(lost_races("the release"))
    }

    /// Stores a new deployment and enters it into its rollout as the
    /// active one if the slot is free, else as the waiting one
    /// (superseding the one waiting); returns its id.
    async fn deploy(
        &self,
        release: Release,
        env: &Environment,
        trigger: Trigger,
        requested_by: String,
        reason: String,
    ) -> DomainResult<String> {
        let unique = self.ids.next(self.clock.now());
        let id = deployment_id(&release.service, &unique);
        // Requests deploy; automatic rollbacks are made in `auto_rollback_of`.
        let actor = actor_of(Some(&requested_by));
        let new = NewDeployment {
            id: id.clone(),
            release,
            environment: env.name.clone(),
            trigger,
            requested_by,
            reason,
            actor,
        };
        let deployment = Deployment::new(new, self.clock.now());
        if self.put_deployment(&unique, &deployment, 0, None).await? != Put::Applied {
            return Err(DomainError::Internal(format!("deployment id {id} was taken")));
        }
        if let Err(e) = self.enter(&deployment).await {
            // Not in its rollout, it would never run: say so.
            let reason = format!("it could not join its rollout: {e}");
            if let Err(failed) = self.fail(&id, reason).await {
                tracing::error!(deployment = %id, error = %failed, "a deployment outside its rollout stays PENDING");
            }
            return Err(e);
        }
        Ok(id)
    }

    /// Makes `deployment` its rollout's active or waiting one.
    async fn enter(&self, deployment: &Deployment) -> DomainResult<()> {
        let key = Rollout::key(&deployment.service, &deployment.environment);
        for _ in 0..MAX_RACES {
            let mut rollout = self.rollout(&deployment.service, &deployment.environment).await?;
            let superseded = if rollout.value.active.is_none() {
                rollout.value.active = Some(deployment.id.clone());
                None
            } else {
                rollout.value.waiting.replace(deployment.id.clone())
            };
            if put(self.store(), ROLLOUTS, &key, &rollout.value, rollout.version).await? == Put::Applied {
                if let Some(old) = superseded {
                    let superseder = deployment.events.first().map_or_else(|| actor_of(None), |e| e.actor.clone());
                    let reason = format!("superseded by {} ({}) while it waited", deployment.id, deployment.version);
                    self.update(&old, |d| {
                        (d.state == DeploymentState::Pending)
                            .then(|| (DeploymentState::Superseded, superseder.clone(), reason.clone()))
                    })
                    .await?;
                }
                return Ok(());
            }
        }
        Err(lost_races("the rollout"))
    }

    /// Puts a deployment read at `version` (0: new) as `before`, its new
    /// audit events logged with it (activity log).
    async fn put_deployment(
        &self,
        unique: &str,
        deployment: &Deployment,
        version: u64,
        before: Option<&Deployment>,
    ) -> DomainResult<Put> {
        let activity = crate::activity::DeploymentChange::entries(before, deployment).map_err(records::store_error)?;
        let logs = !activity.is_empty();
        let put =
            records::put_logged(self.store(), &deployments(&deployment.service), unique, deployment, version, activity)
                .await?;
        if logs && put == Put::Applied {
            self.engine.activity_committed();
        }
        Ok(put)
    }

    async fn rollout(&self, service: &str, environment: &str) -> DomainResult<Versioned<Rollout>> {
        let key = Rollout::key(service, environment);
        Ok(get::<Rollout>(self.store(), ROLLOUTS, &key).await?.unwrap_or_else(|| Versioned {
            value: Rollout { service: service.to_string(), environment: environment.to_string(), ..Default::default() },
            version: 0,
        }))
    }

    async fn marks(&self, service: &str) -> DomainResult<Versioned<ServiceMarks>> {
        Ok(get::<ServiceMarks>(self.store(), SERVICES, service)
            .await?
            .unwrap_or(Versioned { value: ServiceMarks::default(), version: 0 }))
    }

    async fn mark_bad(&self, service: &str, version: &str, by: &str) -> DomainResult<()> {
        let now = self.clock.now();
        self.update_marks(service, |m| {
            let new = !m.is_bad(version);
            if new {
                m.mark(version, by, now);
            }
            new
        })
        .await
    }

    /// Applies `change` to the service's record, again after a lost race;
    /// `change` says whether it changed anything (nothing is written if not).
    async fn update_marks(&self, service: &str, change: impl Fn(&mut ServiceMarks) -> bool) -> DomainResult<()> {
        for _ in 0..MAX_RACES {
            let mut marks = self.marks(service).await?;
            if !change(&mut marks.value) {
                return Ok(());
            }
            if put(self.store(), SERVICES, service, &marks.value, marks.version).await? == Put::Applied {
                return Ok(());
            }
        }
        Err(lost_races("the service's record"))
    }

    /// Every service's record, by name (GetSummary).
    pub async fn services(&self) -> DomainResult<Vec<(String, ServiceMarks)>> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page =
                list::<ServiceMarks>(self.store(), SERVICES, RecordOrder::Ascending, after.as_deref(), 500).await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            all.extend(page.into_iter().map(|(name, v)| (name, v.value)));
        }
        Ok(all)
    }

    pub async fn get(&self, id: &str) -> DomainResult<Deployment> {
        self.read(id).await.map(|v| v.value)
    }

    async fn read(&self, id: &str) -> DomainResult<Versioned<Deployment>> {
        let not_found = || DomainError::NotFound { kind: "deployment", id: id.to_string() };
        let service = service_of(id).ok_or_else(not_found)?;
        let unique = &id[service.len() + 1..];
        get::<Deployment>(self.store(), &deployments(service), unique).await?.ok_or_else(not_found)
    }

    /// Applies the change `decide` picks (state, actor, reason) to the
    /// stored deployment, re-deciding after a lost race; `None` from
    /// `decide` leaves it as it is.
    async fn update(
        &self,
        id: &str,
        decide: impl Fn(&Deployment) -> Option<(DeploymentState, String, String)>,
    ) -> DomainResult<Deployment> {
        self.update_with(id, |d| {
            let (to, actor, reason) = decide(d)?;
            Some(Box::new(move |d: &mut Deployment, now| d.transition(to, actor, reason, now)))
        })
        .await
    }

    async fn update_with<F>(&self, id: &str, decide: F) -> DomainResult<Deployment>
    where
        F: Fn(&Deployment) -> Option<Box<dyn FnOnce(&mut Deployment, std::time::SystemTime) + Send>>,
    {
        let service = service_of(id).ok_or_else(|| DomainError::Internal(format!("malformed deployment id {id}")))?;
        let unique = id[service.len() + 1..].to_string();
        for _ in 0..MAX_RACES {
            let mut stored = self.read(id).await?;
            let Some(change) = decide(&stored.value) else { return Ok(stored.value) };
            let before = stored.value.clone();
            change(&mut stored.value, self.clock.now());
            if self.put_deployment(&unique, &stored.value, stored.version, Some(&before)).await? == Put::Applied {
                return Ok(stored.value);
            }
        }
        Err(lost_races("the deployment"))
    }

    /// A service's deployments, newest first, of one environment or all,
    /// after the unique part `after`.
    pub async fn list(
        &self,
        service: &str,
        environment: Option<&str>,
        after: Option<String>,
        limit: usize,
    ) -> DomainResult<DeploymentPage> {
        let collection = deployments(service);
        let mut found = Vec::new();
        let mut cursor = after;
        let mut scanned = 0;
        while scanned < MAX_SCANNED {
            // With a filter most may be skipped: read in batches worth a
            // store call.
            let batch = (limit - found.len()).max(MIN_BATCH);
            let page = list::<Deployment>(self.store(), &collection, RecordOrder::Descending, cursor.as_deref(), batch)
                .await?;
            let Some((last, _)) = page.last() else {
                return Ok(DeploymentPage { deployments: found, next: None });
            };
            cursor = Some(last.clone());
            scanned += page.len();
            let short = page.len() < batch;
            for (unique, d) in page {
                if environment.is_none_or(|e| e == d.value.environment) {
                    found.push(d.value);
                    if found.len() == limit {
                        return Ok(DeploymentPage { deployments: found, next: Some(unique) });
                    }
                }
            }
            if short {
                return Ok(DeploymentPage { deployments: found, next: None });
            }
        }
        Ok(DeploymentPage { deployments: found, next: cursor })
    }

    /// Deploys a succeeded deployment's version to the next environment.
    pub async fn promote(&self, id: &str, requested_by: String, reason: String) -> DomainResult<Deployment> {
        let from = self.get(id).await?;
        if from.state != DeploymentState::Succeeded {
            return Err(DomainError::FailedPrecondition(format!(
                "deployment {id} is {:?}; only a succeeded deployment is promoted",
                from.state
            )));
        }
        let env = self.environment(&from.environment).await?;
        let Some(next) = env.promote_to else {
            return Err(DomainError::FailedPrecondition(format!(
                "environment {} has no promote_to environment",
                env.name
            )));
        };
        let next = self.environment(&next).await.map_err(|_| {
            DomainError::FailedPrecondition(format!(
                "environment {} promotes to {next}, which no longer exists",
                env.name
            ))
        })?;
        self.refuse_bad(&from.service, &from.version).await?;
        let reason =
            if reason.is_empty() { format!("promoted from {} ({})", from.environment, from.id) } else { reason };
        let id = self
            .deploy(from.release(), &next, Trigger::Promote { from: from.id.clone() }, requested_by, reason)
            .await?;
        self.started(&id, &from.service, &next.name).await
    }

    /// Rolls (service, environment) back from its current version.
    pub async fn rollback(
        &self,
        service: &str,
        environment: &str,
        version: Option<&str>,
        requested_by: String,
        reason: String,
    ) -> DomainResult<RolledBack> {
        let env = self.environment(environment).await?;
        // Settles a rollout that just ended, so its version counts.
        self.advance(service, environment).await?;
        let rollout = self.rollout(service, environment).await?.value;
        let current = current_version(&rollout).map_err(DomainError::FailedPrecondition)?.clone();
        let marks = self.marks(service).await?.value;
        let target =
            plan_rollback(&rollout, &marks, &current.version, version).map_err(DomainError::FailedPrecondition)?;
        let id = self.roll_back_to(&env, &current, &target, requested_by, reason).await?;
        let deployment = self.started(&id, service, environment).await?;
        Ok(RolledBack { deployment, from_version: current.version })
    }

    /// Marks the current version bad and its deployment ROLLED_BACK, then
    /// deploys `target`'s release (trigger ROLLBACK). Returns the new
    /// deployment's id. A retry after a failure in between redoes each
    /// step (both marks are no-ops the second time).
    async fn roll_back_to(
        &self,
        env: &Environment,
        current: &Succeeded,
        target: &Succeeded,
        requested_by: String,
        reason: String,
    ) -> DomainResult<String> {
        let source = self.get(&target.deployment_id).await?;
        self.mark_bad(&source.service, &current.version, &current.deployment_id).await?;
        let actor = actor_of(Some(&requested_by));
        let why = if reason.is_empty() { format!("rolled back to {}", target.version) } else { reason.clone() };
        self.update(&current.deployment_id, |d| {
            matches!(d.state, DeploymentState::Succeeded | DeploymentState::Failed)
                .then(|| (DeploymentState::RolledBack, actor.clone(), why.clone()))
        })
        .await?;
        let trigger = Trigger::Rollback { of: current.deployment_id.clone() };
        let reason = if reason.is_empty() { format!("rollback from {}", current.version) } else { reason };
        self.deploy(source.release(), env, trigger, requested_by, reason).await
    }

    /// Every (service, environment) that has an active or waiting
    /// deployment.
    pub async fn busy_rollouts(&self) -> DomainResult<Vec<(String, String)>> {
        let mut busy = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = list::<Rollout>(self.store(), ROLLOUTS, RecordOrder::Ascending, after.as_deref(), 500).await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (_, r) in page {
                if r.value.active.is_some() || r.value.waiting.is_some() {
                    busy.push((r.value.service, r.value.environment));
                }
            }
        }
        Ok(busy)
    }

    /// The time by the clock deployments are stamped with.
    pub fn now(&self) -> std::time::SystemTime {
        self.clock.now()
    }

    pub fn nudged(&self) -> Arc<Notify> {
        self.nudge.clone()
    }

    /// Drives one (service, environment) as far as its records and its
    /// rollout job allow: starts the active deployment's job, follows it,
    /// frees the slot when it ends (rolling back automatically if the
    /// environment says so) and admits the waiting one. Every step is
    /// conditional, so passes on several replicas agree.
    pub async fn advance(&self, service: &str, environment: &str) -> DomainResult<()> {
        let key = Rollout::key(service, environment);
        for _ in 0..MAX_RACES {
            let mut rollout = self.rollout(service, environment).await?;
            let Some(active) = rollout.value.active.clone() else {
                let Some(waiting) = rollout.value.waiting.take() else { return Ok(()) };
                rollout.value.active = Some(waiting);
                put(self.store(), ROLLOUTS, &key, &rollout.value, rollout.version).await?;
                continue;
            };
            let deployment = match self.get(&active).await {
                Ok(d) => d,
                Err(DomainError::NotFound { .. }) => {
                    tracing::error!(deployment = %active, "a rollout names a missing deployment; freeing its slot");
                    rollout.value.active = None;
                    put(self.store(), ROLLOUTS, &key, &rollout.value, rollout.version).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match deployment.state {
                DeploymentState::Pending => {
                    self.start(&deployment).await?;
                }
                DeploymentState::Queued | DeploymentState::InProgress => {
                    if !self.follow_job(&deployment).await? {
                        return Ok(());
                    }
                }
                DeploymentState::Succeeded => {
                    let at = deployment.finish_time.unwrap_or(deployment.update_time);
                    self.update_marks(service, |m| m.succeeded(&deployment.id, environment, at)).await?;
                    if !rollout.value.succeeded.iter().any(|s| s.deployment_id == deployment.id) {
                        rollout.value.remember(Succeeded {
                            version: deployment.version.clone(),
                            deployment_id: deployment.id.clone(),
                            time: deployment.finish_time.unwrap_or(deployment.update_time),
                        });
                    }
                    rollout.value.active = None;
                    put(self.store(), ROLLOUTS, &key, &rollout.value, rollout.version).await?;
                }
                DeploymentState::Failed => {
                    let at = deployment.finish_time.unwrap_or(deployment.update_time);
                    self.update_marks(service, |m| m.failed(environment, at)).await?;
                    if rollout.value.waiting.is_none() {
                        self.after_failure(&deployment, rollout).await?;
                    } else {
                        rollout.value.active = None;
                        put(self.store(), ROLLOUTS, &key, &rollout.value, rollout.version).await?;
                    }
                }
                DeploymentState::RolledBack | DeploymentState::Superseded => {
                    rollout.value.active = None;
                    put(self.store(), ROLLOUTS, &key, &rollout.value, rollout.version).await?;
                }
            }
        }
        Err(lost_races("the rollout"))
    }

    /// Frees the slot of a failed rollout or, if its environment rolls
    /// back automatically and a good version succeeded there, hands the
    /// slot to a rollback deployment. That deployment's id is derived from
    /// the failed one, its record is written first, and the slot moves to
    /// it in one conditional write: a crash or a race at any point leaves
    /// either nothing or the same one rollback, never two or none.
    async fn after_failure(&self, failed: &Deployment, mut rollout: Versioned<Rollout>) -> DomainResult<()> {
        let key = Rollout::key(&failed.service, &failed.environment);
        let env = self.environment(&failed.environment).await.ok();
        let auto = env.as_ref().is_some_and(|e| e.auto_rollback);
        // A rollback that fails is not rolled back again.
        let is_rollback = matches!(failed.trigger, Trigger::AutoRollback { .. } | Trigger::Rollback { .. });
        if let (true, false, Some(env)) = (auto, is_rollback, env) {
            let marks = self.marks(&failed.service).await?.value;
            match plan_rollback(&rollout.value, &marks, &failed.version, None) {
                Ok(target) => {
                    let rollback = self.auto_rollback_of(failed, &env, &target).await?;
                    rollout.value.active = Some(rollback);
                    put(self.store(), ROLLOUTS, &key, &rollout.value, rollout.version).await?;
                    return Ok(());
                }
                Err(why) => tracing::warn!(deployment = %failed.id, %why, "no automatic rollback"),
            }
        }
        rollout.value.active = None;
        put(self.store(), ROLLOUTS, &key, &rollout.value, rollout.version).await?;
        Ok(())
    }

    /// The stored automatic rollback of `failed` (written now if it is not
    /// yet): its id.
    async fn auto_rollback_of(
        &self,
        failed: &Deployment,
        env: &Environment,
        target: &Succeeded,
    ) -> DomainResult<String> {
        // At least a millisecond after the failed deployment was made, so
        // the rollback lists after it (ids sort by their millisecond).
        let made_after =
            failed.create_time.checked_add(std::time::Duration::from_millis(1)).unwrap_or(failed.create_time);
        let at = failed.finish_time.unwrap_or(failed.update_time).max(made_after);
        let unique = crate::ids::derived_id(at, failed.id.as_bytes());
        let id = deployment_id(&failed.service, &unique);
        if get::<Deployment>(self.store(), &deployments(&failed.service), &unique).await?.is_some() {
            return Ok(id);
        }
        let source = self.get(&target.deployment_id).await?;
        let new = NewDeployment {
            id: id.clone(),
            release: source.release(),
            environment: env.name.clone(),
            trigger: Trigger::AutoRollback { of: failed.id.clone() },
            requested_by: failed.requested_by.clone(),
            reason: format!("automatic rollback: the rollout of {} failed", failed.version),
            actor: SYSTEM_ACTOR.to_string(),
        };
        let deployment = Deployment::new(new, self.clock.now());
        // Lost to another pass writing the same record: the same rollback.
        self.put_deployment(&unique, &deployment, 0, None).await?;
        Ok(id)
    }

    /// What a rollback deployment rolls back: its version is marked bad and
    /// its deployment ROLLED_BACK (again after a crash: both are no-ops the
    /// second time).
    async fn settle_rollback(&self, rollback: &Deployment) -> DomainResult<()> {
        let (Trigger::Rollback { of } | Trigger::AutoRollback { of }) = &rollback.trigger else { return Ok(()) };
        let from = match self.get(of).await {
            Ok(from) => from,
            Err(DomainError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.mark_bad(&from.service, &from.version, of).await?;
        let actor = rollback.events.first().map_or_else(|| SYSTEM_ACTOR.to_string(), |e| e.actor.clone());
        let why = format!("rolled back to {} by {}", rollback.version, rollback.id);
        self.update(of, |d| {
            matches!(d.state, DeploymentState::Succeeded | DeploymentState::Failed)
                .then(|| (DeploymentState::RolledBack, actor.clone(), why.clone()))
        })
        .await?;
        Ok(())
    }

    /// Creates the active deployment's rollout job (once: the job's
    /// idempotency key is the deployment's id) and marks it QUEUED; a job
    /// that cannot be created (its pool is gone) fails the deployment.
    async fn start(&self, deployment: &Deployment) -> DomainResult<()> {
        self.settle_rollback(deployment).await?;
        // Marked bad while it waited (a rollback of the same service).
        let marks = self.marks(&deployment.service).await?.value;
        if marks.is_bad(&deployment.version) {
            let reason = format!("{}@{} was marked bad while it waited", deployment.service, deployment.version);
            return self.fail(&deployment.id, reason).await;
        }
        let env = match self.environment(&deployment.environment).await {
            Ok(env) => env,
            Err(DomainError::NotFound { .. }) => {
                let reason = format!("environment {} no longer exists", deployment.environment);
                return self.fail(&deployment.id, reason).await;
            }
            Err(e) => return Err(e),
        };
        let (spec, dashboard) = deployment.rollout_job(&env.pool);
        let job = match self.engine.create_dashboard_job(spec, dashboard).await {
            Ok((job, _)) => job,
            Err(e @ (DomainError::Unavailable(_) | DomainError::Conflict(_) | DomainError::Internal(_))) => {
                return Err(e)
            }
            Err(e) => return self.fail(&deployment.id, format!("its rollout job could not be created: {e}")).await,
        };
        let job_id = job.id.clone();
        self.update_with(&deployment.id, |d| {
            let job_id = job_id.clone();
            (d.state == DeploymentState::Pending).then(|| -> Box<dyn FnOnce(&mut Deployment, _) + Send> {
                Box::new(move |d: &mut Deployment, now| {
                    d.job_id = Some(job_id.clone());
                    d.transition(
                        DeploymentState::Queued,
                        SYSTEM_ACTOR.into(),
                        format!("rollout job {job_id} queued"),
                        now,
                    )
                })
            })
        })
        .await?;
        Ok(())
    }

    async fn fail(&self, id: &str, reason: String) -> DomainResult<()> {
        self.update(id, |d| {
            (!d.state.is_finished()).then(|| (DeploymentState::Failed, SYSTEM_ACTOR.into(), reason.clone()))
        })
        .await
        .map(|_| ())
    }

    /// Moves the deployment along with its rollout job; `true` if it
    /// finished (the caller frees the slot).
    async fn follow_job(&self, deployment: &Deployment) -> DomainResult<bool> {
        let Some(job_id) = &deployment.job_id else {
            self.fail(&deployment.id, "its rollout job was lost".into()).await?;
            return Ok(true);
        };
        let job = match self.engine.get_job(job_id).await {
            Ok(job) => job,
            Err(DomainError::NotFound { .. }) => {
                self.fail(&deployment.id, format!("its rollout job {job_id} no longer exists")).await?;
                return Ok(true);
            }
            Err(e) => return Err(e),
        };
        let started = (DeploymentState::InProgress, format!("rollout job {job_id} started"));
        let end = match DashboardStatus::of(job.state) {
            DashboardStatus::Pending | DashboardStatus::Running => None,
            DashboardStatus::Success => Some((DeploymentState::Succeeded, format!("rollout job {job_id} succeeded"))),
            DashboardStatus::Failed => {
                Some((DeploymentState::Failed, format!("rollout job {job_id} failed: {}", job.last_error)))
            }
            DashboardStatus::Cancelled => {
                Some((DeploymentState::Failed, format!("rollout job {job_id} was cancelled: {}", job.last_error)))
            }
        };
        // A job that ran and ended between two passes still shows it ran:
        // both changes go into one write, in order.
        let ran = job.attempt > 0 || DashboardStatus::of(job.state) == DashboardStatus::Running;
        let updated = self
            .update_with(&deployment.id, |d| {
                let mut steps = Vec::new();
                if d.state == DeploymentState::Queued && ran {
                    steps.push(started.clone());
                }
                if d.state.is_rolling_out() {
                    steps.extend(end.clone());
                }
                (!steps.is_empty()).then(|| -> Box<dyn FnOnce(&mut Deployment, _) + Send> {
                    Box::new(move |d: &mut Deployment, now| {
                        for (to, reason) in steps {
                            d.transition(to, SYSTEM_ACTOR.into(), reason, now);
                        }
                    })
                })
            })
            .await?;
        Ok(updated.state.is_finished())
    }
}
