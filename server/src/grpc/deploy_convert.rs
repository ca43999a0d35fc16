//! Translation between DashboardService deployment messages and domain
//! types.

use tether::time::{to_duration, to_timestamp};
use tether::v1 as pb;

use super::dashboard_convert::{self as dc};
use crate::domain::deploy::{Deployment, DeploymentEvent, DeploymentState, Environment, RolloutSpec, Trigger};
use crate::domain::{validate, DomainError, DomainResult};

/// Longest reason a deployment request gives.
pub const MAX_REASON: usize = crate::domain::deploy::MAX_REASON;
/// The most environment variables a rollout sets: four more are the
/// deployment's own (TETHER_DEPLOY_*), within a job's 64.
pub const MAX_ROLLOUT_ENV: usize = dc::MAX_ENV - 4;

/// A reason, at most [`MAX_REASON`] bytes.
pub fn reason_in(field: &str, value: &str) -> DomainResult<String> {
    if value.len() > MAX_REASON {
        return Err(DomainError::invalid(field, format!("must be at most {MAX_REASON} bytes")));
    }
    Ok(value.to_string())
}

/// A rollout spec; `None` when it is unset or empty (a deployment of a
/// stored release). A spec with other fields but no command is kept: it
/// is compared with the stored one (a release never changes) or refused
/// for a new release.
pub fn rollout_in(spec: Option<&pb::RolloutSpec>) -> DomainResult<Option<RolloutSpec>> {
    let Some(spec) = spec else { return Ok(None) };
    if spec.env.len() > MAX_ROLLOUT_ENV {
        return Err(DomainError::invalid(
            "rollout.env",
            format!("holds {} variables; the limit is {MAX_ROLLOUT_ENV}", spec.env.len()),
        ));
    }
    validate::labels("rollout.labels", spec.labels.iter())?;
    // A dashboard job's own checks (command, env, working_dir, timeout,
    // max_attempts), under this message's field names.
    let job = pb::CreateJobRequest {
        name: "rollout".into(),
        command: if spec.command.is_empty() { "-".into() } else { spec.command.clone() },
        env: spec.env.clone(),
        working_dir: spec.working_dir.clone(),
        timeout: spec.timeout,
        max_attempts: spec.max_attempts,
        ..Default::default()
    };
    let (job, _) = dc::create_in(&job).map_err(|e| e.under("rollout."))?;
    for key in spec.env.keys() {
        if key.starts_with("TETHER_DEPLOY_") {
            return Err(DomainError::invalid(
                validate::entry_field("rollout.env", key),
                "TETHER_DEPLOY_* variables are set by the server",
            ));
        }
    }
    if *spec == pb::RolloutSpec::default() {
        return Ok(None);
    }
    Ok(Some(RolloutSpec {
        command: spec.command.clone(),
        env: spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        workdir: spec.working_dir.clone(),
        labels: spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        timeout: job.timeout,
        max_attempts: job.max_attempts,
    }))
}

pub fn rollout_out(spec: &RolloutSpec) -> pb::RolloutSpec {
    pb::RolloutSpec {
        command: spec.command.clone(),
        env: spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        working_dir: spec.workdir.clone(),
        labels: spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        timeout: spec.timeout.map(to_duration),
        max_attempts: spec.max_attempts,
    }
}

pub fn environment_out(env: &Environment) -> pb::Environment {
    pb::Environment {
        name: env.name.clone(),
        pool: env.pool.clone(),
        promote_to: env.promote_to.clone().unwrap_or_default(),
        auto_rollback: env.auto_rollback,
        create_time: Some(to_timestamp(env.create_time)),
        update_time: Some(to_timestamp(env.update_time)),
    }
}

pub fn state_out(state: DeploymentState) -> pb::DeploymentState {
    match state {
        DeploymentState::Pending => pb::DeploymentState::Pending,
        DeploymentState::Queued => pb::DeploymentState::Queued,
        DeploymentState::InProgress => pb::DeploymentState::InProgress,
        DeploymentState::Succeeded => pb::DeploymentState::Succeeded,
        DeploymentState::Failed => pb::DeploymentState::Failed,
        DeploymentState::RolledBack => pb::DeploymentState::RolledBack,
        DeploymentState::Superseded => pb::DeploymentState::Superseded,
    }
}

pub fn deployment_out(d: &Deployment) -> pb::Deployment {
    let (trigger, promoted_from, rollback_of) = match &d.trigger {
        Trigger::Create => (pb::DeploymentTrigger::Create, String::new(), String::new()),
        Trigger::Promote { from } => (pb::DeploymentTrigger::Promote, from.clone(), String::new()),
        Trigger::Rollback { of } => (pb::DeploymentTrigger::Rollback, String::new(), of.clone()),
        Trigger::AutoRollback { of } => (pb::DeploymentTrigger::AutoRollback, String::new(), of.clone()),
    };
    pb::Deployment {
        id: d.id.clone(),
        service: d.service.clone(),
        version: d.version.clone(),
        environment: d.environment.clone(),
        state: state_out(d.state) as i32,
        trigger: trigger as i32,
        job_id: d.job_id.clone().unwrap_or_default(),
        requested_by: d.requested_by.clone(),
        reason: d.reason.clone(),
        promoted_from,
        rollback_of,
        rollout: Some(rollout_out(&d.rollout)),
        create_time: Some(to_timestamp(d.create_time)),
        update_time: Some(to_timestamp(d.update_time)),
        finish_time: d.finish_time.map(to_timestamp),
        error: d.error.clone(),
    }
}

pub fn event_out(d: &Deployment, e: &DeploymentEvent) -> pb::DeploymentEvent {
    pb::DeploymentEvent {
        deployment_id: d.id.clone(),
        service: d.service.clone(),
        environment: d.environment.clone(),
        version: d.version.clone(),
        time: Some(to_timestamp(e.time)),
        actor: e.actor.clone(),
        from_state: e.from.map_or(pb::DeploymentState::Unspecified, state_out) as i32,
        to_state: state_out(e.to) as i32,
        job_id: e.job_id.clone().unwrap_or_default(),
        reason: e.reason.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(command: &str) -> pb::RolloutSpec {
        pb::RolloutSpec { command: command.into(), ..Default::default() }
    }

    fn field_of(e: DomainError) -> String {
        match e {
            DomainError::InvalidArgument { field, .. } => field,
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn rollout_specs_are_checked_under_their_own_field_names() {
        assert_eq!(rollout_in(None).ok(), Some(None));
        assert_eq!(rollout_in(Some(&spec(""))).ok(), Some(None), "an empty spec: the stored release");
        let partial = pb::RolloutSpec { max_attempts: 7, ..Default::default() };
        let kept = rollout_in(Some(&partial)).ok().flatten().map(|r| (r.command, r.max_attempts));
        assert_eq!(kept, Some((String::new(), 7)), "a partial spec is compared, not dropped");
        let ok = rollout_in(Some(&spec("deploy.sh"))).ok().flatten().map(|r| r.max_attempts);
        assert_eq!(ok, Some(validate::DEFAULT_MAX_ATTEMPTS));
        let mut bad = spec("x");
        bad.max_attempts = 101;
        assert_eq!(rollout_in(Some(&bad)).map_err(field_of).err().as_deref(), Some("rollout.max_attempts"));
        let mut nul = spec("a\0b");
        assert_eq!(rollout_in(Some(&nul)).map_err(field_of).err().as_deref(), Some("rollout.command"));
        nul.command = "x".into();
        nul.env.insert("TETHER_DEPLOY_VERSION".into(), "v".into());
        assert!(rollout_in(Some(&nul)).map_err(field_of).err().is_some_and(|f| f.starts_with("rollout.env[")));
        let mut many = spec("x");
        for i in 0..=MAX_ROLLOUT_ENV {
            many.env.insert(format!("V{i}"), "v".into());
        }
        assert_eq!(rollout_in(Some(&many)).map_err(field_of).err().as_deref(), Some("rollout.env"));
        let mut labels = spec("x");
        labels.labels.insert("bad key".into(), "v".into());
        assert!(rollout_in(Some(&labels)).map_err(field_of).err().is_some_and(|f| f.starts_with("rollout.labels[")));
        assert_eq!(reason_in("reason", &"r".repeat(MAX_REASON + 1)).map_err(field_of).err().as_deref(), Some("reason"));
    }
}
