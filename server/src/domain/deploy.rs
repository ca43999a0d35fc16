//! Deployments: a release (service, version and the job that rolls it
//! out) deployed to an environment, as a dashboard job on an agent of the
//! environment's pool. The types and rules here are pure; `crate::deploy`
//! stores them and follows the rollout jobs.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::dashboard::{requester_actor, DashboardSpec, ShellCommand, DASHBOARD_QUEUE, SYSTEM_ACTOR};
use super::job::{JobSpec, Priority, RetryPolicy, Routing};
use super::validate;

/// The most succeeded deployments a rollout remembers (rollback targets).
pub const MAX_HISTORY: usize = 100;
/// The most versions a service keeps marked bad; the oldest marks go first.
pub const MAX_BAD_VERSIONS: usize = 1000;
/// The most events a deployment keeps: it changes state a handful of times.
pub const MAX_EVENTS: usize = 32;
/// The longest reason an event keeps.
pub const MAX_REASON: usize = 1024;

/// Where deployments go: a pool and the environment promotions go to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Environment {
    pub name: String,
    pub pool: String,
    pub promote_to: Option<String>,
    /// Deploy the last good version again when a rollout fails.
    pub auto_rollback: bool,
    pub create_time: SystemTime,
    pub update_time: SystemTime,
}

/// What a release's rollout job runs. (Its own fields, not a
/// [`ShellCommand`]: that one's JSON shape skips empty fields, which the
/// store's encoding cannot.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub command: String,
    pub env: BTreeMap<String, String>,
    pub workdir: String,
    pub labels: BTreeMap<String, String>,
    pub timeout: Option<Duration>,
    pub max_attempts: u32,
}

/// An immutable (service, version) and what rolls it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub service: String,
    pub version: String,
    pub rollout: RolloutSpec,
    pub create_time: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeploymentState {
    /// Waits for the rollout before it in its (service, environment).
    Pending,
    Queued,
    InProgress,
    Succeeded,
    Failed,
    RolledBack,
    Superseded,
}

impl DeploymentState {
    /// Whether it holds its (service, environment)'s rollout slot.
    pub fn is_rolling_out(self) -> bool {
        matches!(self, DeploymentState::Queued | DeploymentState::InProgress)
    }

    /// Whether its rollout is over (a later rollback may still mark a
    /// succeeded one rolled back).
    pub fn is_finished(self) -> bool {
        !matches!(self, DeploymentState::Pending | DeploymentState::Queued | DeploymentState::InProgress)
    }
}

/// Why a deployment was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trigger {
    Create,
    Promote { from: String },
    Rollback { of: String },
    AutoRollback { of: String },
}

/// One state change of a deployment, kept in its record: written in the
/// same store write as the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentEvent {
    pub time: SystemTime,
    pub actor: String,
    pub from: Option<DeploymentState>,
    pub to: DeploymentState,
    pub job_id: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// `<service>/<unique id>`: the service names its record's collection.
    pub id: String,
    pub service: String,
    pub version: String,
    pub environment: String,
    pub state: DeploymentState,
    pub trigger: Trigger,
    pub job_id: Option<String>,
    pub requested_by: String,
    pub reason: String,
    pub rollout: RolloutSpec,
    pub create_time: SystemTime,
    pub update_time: SystemTime,
    pub finish_time: Option<SystemTime>,
    pub error: String,
    pub events: Vec<DeploymentEvent>,
}

/// Who asked for a change: a requester (never mistaken for the server) or
/// the server itself.
pub fn actor_of(requested_by: Option<&str>) -> String {
    requested_by.map_or_else(|| SYSTEM_ACTOR.to_string(), requester_actor)
}

/// A deployment's id: its service, then a unique, time-ordered part.
pub fn deployment_id(service: &str, unique: &str) -> String {
    format!("{service}/{unique}")
}

/// The service a deployment id names (`None` for a malformed id).
pub fn service_of(id: &str) -> Option<&str> {
    let (service, unique) = id.split_once('/')?;
    (validate::name("", service, validate::MAX_NAME).is_ok() && !service.is_empty() && !unique.is_empty())
        .then_some(service)
}

/// What a new deployment is made of.
pub struct NewDeployment {
    pub id: String,
    pub release: Release,
    pub environment: String,
    pub trigger: Trigger,
    pub requested_by: String,
    pub reason: String,
    /// Who makes it: the requester, or the server (automatic rollback).
    pub actor: String,
}

impl Deployment {
    pub fn new(new: NewDeployment, now: SystemTime) -> Deployment {
        let NewDeployment { id, release, environment, trigger, requested_by, reason, actor } = new;
        let mut deployment = Deployment {
            id,
            service: release.service,
            version: release.version,
            environment,
            state: DeploymentState::Pending,
            trigger,
            job_id: None,
            requested_by,
            reason: cut(&reason).to_string(),
            rollout: release.rollout,
            create_time: now,
            update_time: now,
            finish_time: None,
            error: String::new(),
            events: Vec::new(),
        };
        deployment.record(None, actor, deployment.reason.clone(), now);
        deployment
    }

    /// Moves it to `to`, recording who and why; the caller has checked the
    /// move is allowed.
    pub fn transition(&mut self, to: DeploymentState, actor: String, reason: String, now: SystemTime) {
        let from = self.state;
        self.state = to;
        self.update_time = now;
        if to.is_finished() && self.finish_time.is_none() {
            self.finish_time = Some(now);
        }
        if matches!(to, DeploymentState::Failed | DeploymentState::RolledBack | DeploymentState::Superseded) {
            self.error = cut(&reason).to_string();
        }
        self.record(Some(from), actor, reason, now);
    }

    fn record(&mut self, from: Option<DeploymentState>, actor: String, reason: String, now: SystemTime) {
        if self.events.len() >= MAX_EVENTS {
            // Keep the creation; drop the oldest change after it.
            self.events.remove(1);
        }
        let reason = cut(&reason).to_string();
        self.events.push(DeploymentEvent {
            time: now,
            actor,
            from,
            to: self.state,
            job_id: self.job_id.clone(),
            reason,
        });
    }

    /// The release it deploys.
    pub fn release(&self) -> Release {
        Release {
            service: self.service.clone(),
            version: self.version.clone(),
            rollout: self.rollout.clone(),
            create_time: self.create_time,
        }
    }

    /// Its rollout job: a dashboard job in `pool`, keyed by the deployment
    /// id so starting it twice (two replicas, a retry after a crash)
    /// creates one job.
    pub fn rollout_job(&self, pool: &str) -> (JobSpec, DashboardSpec) {
        let mut command = ShellCommand {
            command: self.rollout.command.clone(),
            env: self.rollout.env.clone(),
            workdir: self.rollout.workdir.clone(),
            secrets: None,
        };
        for (key, value) in [
            ("TETHER_DEPLOY_SERVICE", &self.service),
            ("TETHER_DEPLOY_VERSION", &self.version),
            ("TETHER_DEPLOY_ENVIRONMENT", &self.environment),
            ("TETHER_DEPLOY_ID", &self.id),
        ] {
            command.env.insert(key.to_string(), value.clone());
        }
        let spec = JobSpec {
            queue: DASHBOARD_QUEUE.to_string(),
            payload: command.to_payload().into(),
            priority: Priority::High,
            routing: Routing { pool: pool.to_string(), required_labels: self.rollout.labels.clone() },
            max_attempts: self.rollout.max_attempts,
            lease_duration: validate::DEFAULT_LEASE,
            timeout: self.rollout.timeout,
            idempotency_key: Some(format!("deployment:{}", self.id)),
            not_before: None,
            retry: RetryPolicy::default(),
        };
        let dashboard = DashboardSpec {
            name: format!("deploy {}@{} to {}", self.service, self.version, self.environment),
            requested_by: self.requested_by.clone(),
            retry_of: None,
        };
        (spec, dashboard)
    }
}

fn cut(text: &str) -> &str {
    if text.len() <= MAX_REASON {
        return text;
    }
    let mut end = MAX_REASON;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A version that succeeded in an environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Succeeded {
    pub version: String,
    pub deployment_id: String,
    pub time: SystemTime,
}

/// The rollout slot and history of one (service, environment): the store's
/// conditional writes on it decide which deployment rolls out, on every
/// replica.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Rollout {
    pub service: String,
    pub environment: String,
    /// The deployment rolling out (QUEUED or IN_PROGRESS), or about to.
    pub active: Option<String>,
    /// The one deployment waiting for the slot.
    pub waiting: Option<String>,
    /// Succeeded deployments, oldest first, at most [`MAX_HISTORY`].
    pub succeeded: Vec<Succeeded>,
}

impl Rollout {
    /// The id of its record: one per (service, environment).
    pub fn key(service: &str, environment: &str) -> String {
        format!("{service}/{environment}")
    }

    pub fn remember(&mut self, success: Succeeded) {
        if self.succeeded.len() >= MAX_HISTORY {
            self.succeeded.remove(0);
        }
        self.succeeded.push(success);
    }
}

/// A service's own record: versions marked bad by rollbacks, and the
/// figures of its deployments kept as they happen (GetSummary).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ServiceMarks {
    pub bad: BTreeMap<String, BadVersion>,
    /// Succeeded deployments of the last [`super::summary::DEPLOY_WINDOW`],
    /// by id (counted once however often a pass sees them).
    pub deployed: BTreeMap<String, SystemTime>,
    /// Per environment: since when its rollouts have been failing.
    pub failing_since: BTreeMap<String, SystemTime>,
    /// Recent times to restore (failing to succeeding again), newest last.
    pub restores: Vec<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadVersion {
    pub time: SystemTime,
    /// The deployment whose rollback marked it.
    pub by: String,
}

impl ServiceMarks {
    pub fn is_bad(&self, version: &str) -> bool {
        self.bad.contains_key(version)
    }

    /// A rollout failed in `environment` at `at`; `false` if that was
    /// known (it has been failing since earlier).
    pub fn failed(&mut self, environment: &str, at: SystemTime) -> bool {
        if self.failing_since.contains_key(environment) {
            return false;
        }
        self.failing_since.insert(environment.to_string(), at);
        true
    }

    /// A deployment succeeded in `environment` at `at`: counted, and if
    /// the environment was failing, a restore; `false` if counted before.
    pub fn succeeded(&mut self, deployment_id: &str, environment: &str, at: SystemTime) -> bool {
        if self.deployed.contains_key(deployment_id) {
            return false;
        }
        let horizon = at.checked_sub(super::summary::DEPLOY_WINDOW).unwrap_or(std::time::UNIX_EPOCH);
        self.deployed.retain(|_, t| *t >= horizon);
        self.deployed.insert(deployment_id.to_string(), at);
        if let Some(since) = self.failing_since.remove(environment) {
            if self.restores.len() >= super::summary::MAX_RESTORES {
                self.restores.remove(0);
            }
            self.restores.push(at.duration_since(since).unwrap_or(Duration::ZERO));
        }
        true
    }

    /// Deployments that succeeded at or after `since`.
    pub fn deployments_since(&self, since: SystemTime) -> u64 {
        self.deployed.values().filter(|t| **t >= since).count() as u64
    }

    /// The mean of the remembered restores.
    pub fn mean_restore(&self) -> Option<Duration> {
        let n = u32::try_from(self.restores.len()).ok().filter(|n| *n > 0)?;
        Some(self.restores.iter().sum::<Duration>() / n)
    }

    pub fn mark(&mut self, version: &str, by: &str, now: SystemTime) {
        if self.bad.len() >= MAX_BAD_VERSIONS && !self.bad.contains_key(version) {
            let oldest = self.bad.iter().min_by_key(|(_, b)| b.time).map(|(v, _)| v.clone());
            if let Some(oldest) = oldest {
                self.bad.remove(&oldest);
            }
        }
        self.bad.insert(version.to_string(), BadVersion { time: now, by: by.to_string() });
    }
}

/// What a rollback deploys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPlan {
    /// The version rolled back from, to be marked bad.
    pub from_version: String,
    /// Its succeeded deployment (becomes ROLLED_BACK), if it succeeded.
    pub from_deployment: Option<String>,
    /// The succeeded deployment whose release runs again.
    pub target: Succeeded,
}

/// Plans a rollback away from `from_version` (the environment's current
/// version, or a failed one), to `named` or else the newest other good
/// version that succeeded there.
pub fn plan_rollback(
    rollout: &Rollout,
    marks: &ServiceMarks,
    from_version: &str,
    named: Option<&str>,
) -> Result<Succeeded, String> {
    let good = |s: &&Succeeded| s.version != from_version && !marks.is_bad(&s.version);
    match named {
        Some(version) if version == from_version => Err(format!("version {version} is the one being rolled back from")),
        Some(version) if marks.is_bad(version) => {
            Err(format!("version {version} is marked bad by an earlier rollback"))
        }
        Some(version) => rollout.succeeded.iter().rev().find(|s| s.version == version).cloned().ok_or_else(|| {
            format!(
                "version {version} never succeeded in {} (or is older than the last {MAX_HISTORY})",
                rollout.environment
            )
        }),
        None => rollout.succeeded.iter().rev().find(good).cloned().ok_or_else(|| {
            format!(
                "no good version succeeded in {} before {from_version}: nothing to roll back to",
                rollout.environment
            )
        }),
    }
}

/// The version rolled back from by a manual rollback: the newest that
/// succeeded in the environment.
pub fn current_version(rollout: &Rollout) -> Result<&Succeeded, String> {
    rollout
        .succeeded
        .last()
        .ok_or_else(|| format!("nothing has succeeded in {} yet: nothing to roll back", rollout.environment))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn rollout(versions: &[&str]) -> Rollout {
        let mut r = Rollout { service: "api".into(), environment: "prod".into(), ..Default::default() };
        for (i, v) in versions.iter().enumerate() {
            r.remember(Succeeded { version: v.to_string(), deployment_id: format!("api/{i}"), time: at(i as u64) });
        }
        r
    }

    #[test]
    fn a_rollback_goes_to_the_newest_other_good_version() {
        let r = rollout(&["v1", "v2", "v3"]);
        let mut marks = ServiceMarks::default();
        assert_eq!(plan_rollback(&r, &marks, "v3", None).map(|s| s.version), Ok("v2".into()));
        marks.mark("v2", "api/x", at(9));
        assert_eq!(plan_rollback(&r, &marks, "v3", None).map(|s| s.version), Ok("v1".into()));
        assert_eq!(plan_rollback(&r, &marks, "v3", Some("v1")).map(|s| s.deployment_id), Ok("api/0".into()));
        assert!(plan_rollback(&r, &marks, "v3", Some("v2")).is_err_and(|e| e.contains("marked bad")));
        assert!(plan_rollback(&r, &marks, "v3", Some("v3")).is_err_and(|e| e.contains("rolled back from")));
        assert!(plan_rollback(&r, &marks, "v3", Some("v9")).is_err_and(|e| e.contains("never succeeded")));
        marks.mark("v1", "api/y", at(10));
        assert!(plan_rollback(&r, &marks, "v3", None).is_err_and(|e| e.contains("nothing to roll back to")));
    }

    #[test]
    fn a_version_that_ran_again_after_a_rollback_is_still_skipped_once_bad() {
        // v1, v2, then a rollback to v1 succeeded: v2 is bad, v1 current.
        let r = rollout(&["v1", "v2", "v1"]);
        let mut marks = ServiceMarks::default();
        marks.mark("v2", "api/2", at(5));
        assert_eq!(current_version(&r).map(|s| s.version.clone()), Ok("v1".into()));
        assert!(plan_rollback(&r, &marks, "v1", None).is_err());
        assert!(current_version(&rollout(&[])).is_err());
    }

    #[test]
    fn history_and_marks_are_bounded() {
        let mut r = rollout(&[]);
        for i in 0..(MAX_HISTORY + 5) {
            r.remember(Succeeded { version: format!("v{i}"), deployment_id: format!("api/{i}"), time: at(i as u64) });
        }
        assert_eq!(r.succeeded.len(), MAX_HISTORY);
        assert_eq!(r.succeeded[0].version, "v5");
        let mut marks = ServiceMarks::default();
        for i in 0..(MAX_BAD_VERSIONS + 1) {
            marks.mark(&format!("v{i}"), "api/x", at(i as u64));
        }
        assert_eq!(marks.bad.len(), MAX_BAD_VERSIONS);
        assert!(!marks.is_bad("v0"), "the oldest mark went first");
    }

    #[test]
    fn every_record_round_trips_through_the_store_encoding() {
        let d = sample(Trigger::Promote { from: "api/0".into() });
        let bytes = crate::store::codec::encode(&d).expect("encode");
        assert_eq!(crate::store::codec::decode::<Deployment>(&bytes).ok(), Some(d.clone()));
        let mut r = rollout(&["v1"]);
        r.active = Some("api/1".into());
        let bytes = crate::store::codec::encode(&r).expect("encode");
        assert_eq!(crate::store::codec::decode::<Rollout>(&bytes).ok(), Some(r));
        let mut marks = ServiceMarks::default();
        marks.mark("v1", "api/1", at(3));
        let bytes = crate::store::codec::encode(&marks).expect("encode");
        assert_eq!(crate::store::codec::decode::<ServiceMarks>(&bytes).ok(), Some(marks));
        let release = d.release();
        let bytes = crate::store::codec::encode(&release).expect("encode");
        assert_eq!(crate::store::codec::decode::<Release>(&bytes).ok(), Some(release));
        let env = Environment {
            name: "prod".into(),
            pool: "p".into(),
            promote_to: None,
            auto_rollback: true,
            create_time: at(1),
            update_time: at(2),
        };
        let bytes = crate::store::codec::encode(&env).expect("encode");
        assert_eq!(crate::store::codec::decode::<Environment>(&bytes).ok(), Some(env));
    }

    fn sample(trigger: Trigger) -> Deployment {
        let release = Release {
            service: "api".into(),
            version: "v1".into(),
            rollout: RolloutSpec {
                command: "true".into(),
                env: [("A".to_string(), String::new())].into(),
                workdir: String::new(),
                labels: BTreeMap::new(),
                timeout: Some(Duration::from_secs(5)),
                max_attempts: 1,
            },
            create_time: at(0),
        };
        let new = NewDeployment {
            id: "api/1".into(),
            release,
            environment: "prod".into(),
            trigger,
            requested_by: "ann".into(),
            reason: String::new(),
            actor: actor_of(None),
        };
        Deployment::new(new, at(1))
    }

    #[test]
    fn ids_name_their_service_and_events_stay_bounded() {
        assert_eq!(service_of("api/0190"), Some("api"));
        for bad in ["api", "/x", "api/", "a b/x", ""] {
            assert_eq!(service_of(bad), None, "{bad:?}");
        }
        let release = Release {
            service: "api".into(),
            version: "v1".into(),
            rollout: RolloutSpec {
                command: "true".into(),
                env: BTreeMap::new(),
                workdir: String::new(),
                labels: BTreeMap::new(),
                timeout: None,
                max_attempts: 1,
            },
            create_time: at(0),
        };
        let new = NewDeployment {
            id: "api/1".into(),
            release,
            environment: "prod".into(),
            trigger: Trigger::Create,
            requested_by: "ann".into(),
            reason: "x".repeat(5000),
            actor: actor_of(Some("ann")),
        };
        let mut d = Deployment::new(new, at(1));
        assert_eq!(d.reason.len(), MAX_REASON);
        assert_eq!(d.events[0].actor, "user:ann");
        for i in 0..100 {
            d.transition(DeploymentState::Queued, SYSTEM_ACTOR.into(), format!("{i}"), at(2));
        }
        assert_eq!(d.events.len(), MAX_EVENTS);
        assert_eq!(d.events[0].from, None, "the creation is kept");
        let (spec, dashboard) = d.rollout_job("prod-pool");
        assert_eq!(spec.routing.pool, "prod-pool");
        assert_eq!(spec.idempotency_key.as_deref(), Some("deployment:api/1"));
        assert_eq!(dashboard.name, "deploy api@v1 to prod");
        let command = ShellCommand::from_payload(&spec.payload);
        assert_eq!(command.env.get("TETHER_DEPLOY_VERSION").map(String::as_str), Some("v1"));
    }
}
