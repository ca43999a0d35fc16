//! `tether deploy …`: roll a service's versions out to environments,
//! promote and roll them back, and read their audit trail
//! (DashboardService).
//!
//! A deployment's rollout runs as a dashboard job that the server follows.
//! The server offers no stream of deployment changes, so `--wait` reads the
//! deployment with GetDeployment every [`POLL_EVERY`] until it ends.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tether::time::to_duration;
use tether::v1::{
    CreateDeploymentRequest, CreateDeploymentResponse, Deployment, DeploymentState, GetDeploymentRequest,
    GetDeploymentResponse, ListDeploymentEventsRequest, ListDeploymentEventsResponse, ListDeploymentsRequest,
    ListDeploymentsResponse, PromoteDeploymentRequest, PromoteDeploymentResponse, RollbackDeploymentRequest,
    RollbackDeploymentResponse, RolloutSpec,
};
use tonic::Status;

use crate::args::{
    CreateDeploymentArgs, DeployCommand, DeploymentHistoryArgs, ListDeploymentsArgs, OutputFormat, RollbackArgs,
};
use crate::client::{collect_pages, read_input_file, Clients, Ctx};
use crate::error::UsageError;
use crate::jobs::{env_var, resolve_requested_by};
use crate::output::{self, deployment_state_name, ProtoName};
use crate::parse::{env_to_map, labels_to_map};
use crate::wait::{backoff, is_transient, Spinner, MAX_TRANSIENT_FAILURES};

/// How often `--wait` reads the deployment.
pub(crate) const POLL_EVERY: Duration = Duration::from_millis(500);

/// Runs one `deploy` subcommand.
pub(crate) async fn run(command: DeployCommand, ctx: &mut Ctx<'_>) -> anyhow::Result<ExitCode> {
    match command {
        DeployCommand::Create(args) => create(args, ctx).await,
        DeployCommand::Get { id } => {
            let deployment = get_deployment(&ctx.clients, &id).await?;
            match ctx.format {
                OutputFormat::Json => {
                    output::write_json(ctx.out, &GetDeploymentResponse { deployment: Some(deployment) })?
                }
                OutputFormat::Table => output::write_deployment_details(ctx.out, &deployment, SystemTime::now())?,
            }
            Ok(ExitCode::SUCCESS)
        }
        DeployCommand::List(args) => list(args, ctx).await,
        DeployCommand::Promote { id, reason, requested_by, wait } => {
            let request = build_promote_request(id, reason, requested_by.as_deref(), env_var);
            let response = ctx.clients.dashboard.promote_deployment(ctx.clients.req(request)).await?.into_inner();
            let deployment = response.deployment.context("the server answered with no deployment")?;
            print_new_deployment(ctx, deployment, None, wait, |d| PromoteDeploymentResponse { deployment: Some(d) })
                .await
        }
        DeployCommand::Rollback(args) => {
            let request = build_rollback_request(&args, env_var);
            let response = ctx.clients.dashboard.rollback_deployment(ctx.clients.req(request)).await?.into_inner();
            let from = response.rolled_back_version;
            let deployment = response.deployment.context("the server answered with no deployment")?;
            let headline = format!(
                "{} in {}: rolled back from {from} to {} (deployment {})",
                deployment.service, deployment.environment, deployment.version, deployment.id
            );
            print_new_deployment(ctx, deployment, Some(headline), args.wait, |d| RollbackDeploymentResponse {
                deployment: Some(d),
                rolled_back_version: from.clone(),
            })
            .await
        }
        DeployCommand::History(args) => history(args, ctx).await,
    }
}

/// The rollout command from `--command` or `--script-file`; `None` when
/// neither is given (the release's stored rollout runs). An empty command
/// is refused: the server would read it as "no rollout given".
async fn rollout_command(args: &CreateDeploymentArgs) -> anyhow::Result<Option<String>> {
    let command = match (&args.command, &args.script_file) {
        (Some(command), _) => command.clone(),
        (None, Some(path)) => {
            let bytes = read_input_file(path, "script").await?;
            String::from_utf8(bytes)
                .map_err(|_| UsageError(format!("script file {} is not UTF-8 text", path.display())))?
        }
        (None, None) => return Ok(None),
    };
    if command.trim().is_empty() {
        return Err(
            UsageError("the rollout command is empty; give a command or a script that does something".into()).into()
        );
    }
    Ok(Some(command))
}

/// Builds the CreateDeploymentRequest from the flags and the rollout
/// command (see [`rollout_command`]); `env` looks up the environment
/// variables `--requested-by` defaults to.
pub(crate) fn build_create_request(
    args: &CreateDeploymentArgs,
    command: Option<String>,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<CreateDeploymentRequest> {
    let vars = env_to_map(&args.vars).map_err(UsageError)?;
    let labels = labels_to_map(&args.labels).map_err(UsageError)?;
    let spec_flags = !vars.is_empty()
        || !labels.is_empty()
        || args.workdir.is_some()
        || args.timeout.is_some()
        || args.max_attempts.is_some();
    let rollout = match command {
        Some(command) => Some(RolloutSpec {
            command,
            env: vars,
            working_dir: args.workdir.clone().unwrap_or_default(),
            labels,
            timeout: args.timeout.map(to_duration),
            max_attempts: args.max_attempts.unwrap_or(0),
        }),
        // The server would ignore them: a release's spec is stored once.
        None if spec_flags => {
            return Err(UsageError(
                "--var, --workdir, --label, --timeout and --max-attempts describe the rollout; \
                 give them with --command or --script-file"
                    .into(),
            )
            .into())
        }
        None => None,
    };
    Ok(CreateDeploymentRequest {
        service: args.service.clone(),
        version: args.version.clone(),
        environment: args.environment.clone(),
        rollout,
        requested_by: resolve_requested_by(args.requested_by.as_deref(), env),
        reason: args.reason.clone().unwrap_or_default(),
    })
}

/// Builds the PromoteDeploymentRequest; `env` as for
/// [`build_create_request`].
pub(crate) fn build_promote_request(
    id: String,
    reason: Option<String>,
    requested_by: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> PromoteDeploymentRequest {
    PromoteDeploymentRequest {
        id,
        reason: reason.unwrap_or_default(),
        requested_by: resolve_requested_by(requested_by, env),
    }
}

/// Builds the RollbackDeploymentRequest; `env` as for
/// [`build_create_request`].
pub(crate) fn build_rollback_request(
    args: &RollbackArgs,
    env: impl Fn(&str) -> Option<String>,
) -> RollbackDeploymentRequest {
    RollbackDeploymentRequest {
        service: args.service.clone(),
        environment: args.environment.clone(),
        version: args.to_version.clone().unwrap_or_default(),
        reason: args.reason.clone().unwrap_or_default(),
        requested_by: resolve_requested_by(args.requested_by.as_deref(), env),
    }
}

async fn create(args: CreateDeploymentArgs, ctx: &mut Ctx<'_>) -> anyhow::Result<ExitCode> {
    let command = rollout_command(&args).await?;
    let request = build_create_request(&args, command, env_var)?;
    let response = ctx.clients.dashboard.create_deployment(ctx.clients.req(request)).await?.into_inner();
    let deployment = response.deployment.context("the server answered with no deployment")?;
    print_new_deployment(ctx, deployment, None, args.wait, |d| CreateDeploymentResponse { deployment: Some(d) }).await
}

/// What create, promote and rollback print. Without `--wait`: the
/// response in JSON, or `headline` (which names the deployment) if any,
/// else the new deployment's id, so `ID=$(tether deploy create …)` works. With `--wait`: the deployment
/// once it ended, in the command's own response message (JSON, built by
/// `response`) or as details, and exit code 0 only if it succeeded.
async fn print_new_deployment<M: ProtoName>(
    ctx: &mut Ctx<'_>,
    deployment: Deployment,
    headline: Option<String>,
    wait: bool,
    response: impl FnOnce(Deployment) -> M,
) -> anyhow::Result<ExitCode> {
    let deployment = if wait {
        let id = deployment.id.clone();
        wait_for_deployment(&ctx.clients, deployment, ctx.progress)
            .await
            .with_context(|| format!("waiting for deployment {id}"))?
    } else {
        deployment
    };
    let succeeded = deployment.state == DeploymentState::Succeeded as i32;
    match ctx.format {
        OutputFormat::Json => output::write_json(ctx.out, &response(deployment))?,
        OutputFormat::Table => {
            match headline {
                // It names the deployment.
                Some(line) => writeln!(ctx.out, "{line}")?,
                None if !wait => writeln!(ctx.out, "{}", deployment.id)?,
                None => {}
            }
            if wait {
                output::write_deployment_details(ctx.out, &deployment, SystemTime::now())?;
            }
        }
    }
    Ok(if !wait || succeeded { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Whether a deployment in this state will not move again on its own:
/// SUCCEEDED, FAILED, ROLLED_BACK or SUPERSEDED. (A later rollback may
/// still turn a succeeded or failed one ROLLED_BACK.)
pub fn is_deployment_finished(state: i32) -> bool {
    matches!(
        DeploymentState::try_from(state),
        Ok(DeploymentState::Succeeded
            | DeploymentState::Failed
            | DeploymentState::RolledBack
            | DeploymentState::Superseded)
    )
}

/// What the spinner says about a deployment being waited for.
fn progress_line(d: &Deployment) -> String {
    let mut line = format!(
        "deployment {}: {}@{} to {}: {}",
        d.id,
        d.service,
        d.version,
        d.environment,
        deployment_state_name(d.state)
    );
    if !d.job_id.is_empty() {
        line.push_str(&format!(" (job {})", d.job_id));
    }
    line
}

/// Reads the deployment every [`POLL_EVERY`] until it is finished (see
/// [`is_deployment_finished`]) and returns its final form. Transient
/// failures (a restarting server) are retried with backoff, a refusal is
/// returned. `progress` draws a spinner on stderr.
async fn wait_for_deployment(clients: &Clients, deployment: Deployment, progress: bool) -> Result<Deployment, Status> {
    let spinner = Spinner::new(progress);
    let mut current = deployment;
    let mut failures = 0u32;
    loop {
        if is_deployment_finished(current.state) {
            return Ok(current);
        }
        spinner.note(progress_line(&current));
        tokio::time::sleep(POLL_EVERY).await;
        match get_deployment(clients, &current.id).await {
            Ok(deployment) => {
                current = deployment;
                failures = 0;
            }
            Err(status) if is_transient(&status) => {
                failures += 1;
                if failures > MAX_TRANSIENT_FAILURES {
                    return Err(status);
                }
                let delay = backoff(failures);
                spinner.note(format!(
                    "deployment {}: lost the server ({}); retrying in {}",
                    current.id,
                    status.message(),
                    humantime::format_duration(delay)
                ));
                tokio::time::sleep(delay).await;
            }
            Err(status) => return Err(status),
        }
    }
}

/// Reads a deployment, failing with the server's status.
async fn get_deployment(clients: &Clients, id: &str) -> Result<Deployment, Status> {
    let request = clients.req(GetDeploymentRequest { id: id.to_string() });
    let response = clients.dashboard.clone().get_deployment(request).await?.into_inner();
    response.deployment.ok_or_else(|| Status::internal(format!("the server returned no deployment for id {id}")))
}

/// Builds one page's ListDeploymentsRequest from the flags.
pub(crate) fn build_list_request(args: &ListDeploymentsArgs, page_token: String) -> ListDeploymentsRequest {
    ListDeploymentsRequest {
        service: args.service.clone(),
        environment: args.environment.clone().unwrap_or_default(),
        page_size: args.page.limit.unwrap_or(0),
        page_token,
    }
}

async fn list(args: ListDeploymentsArgs, ctx: &mut Ctx<'_>) -> anyhow::Result<ExitCode> {
    let clients = ctx.clients.clone();
    let (deployments, next_page_token) = collect_pages(&args.page, |page_token| {
        let request = clients.req(build_list_request(&args, page_token));
        let mut client = clients.dashboard.clone();
        async move {
            let r = client.list_deployments(request).await?.into_inner();
            Ok((r.deployments, r.next_page_token))
        }
    })
    .await?;
    let response = ListDeploymentsResponse { deployments, next_page_token };
    match ctx.format {
        OutputFormat::Json => output::write_json(ctx.out, &response)?,
        OutputFormat::Table => {
            // The notes go to stderr so stdout holds only the table.
            if response.deployments.is_empty() {
                writeln!(ctx.err, "no deployments found")?;
            } else {
                output::write_deployments_table(ctx.out, &response.deployments, SystemTime::now())?;
            }
            if !response.next_page_token.is_empty() {
                writeln!(ctx.err, "more deployments: add --page-token {} (or use --all)", response.next_page_token)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Builds one page's ListDeploymentEventsRequest from the flags.
pub(crate) fn build_history_request(args: &DeploymentHistoryArgs, page_token: String) -> ListDeploymentEventsRequest {
    ListDeploymentEventsRequest {
        service: args.service.clone(),
        environment: args.environment.clone().unwrap_or_default(),
        deployment_id: args.deployment.clone().unwrap_or_default(),
        page_size: args.page.limit.unwrap_or(0),
        page_token,
    }
}

async fn history(args: DeploymentHistoryArgs, ctx: &mut Ctx<'_>) -> anyhow::Result<ExitCode> {
    let clients = ctx.clients.clone();
    let (events, next_page_token) = collect_pages(&args.page, |page_token| {
        let request = clients.req(build_history_request(&args, page_token));
        let mut client = clients.dashboard.clone();
        async move {
            let r = client.list_deployment_events(request).await?.into_inner();
            Ok((r.events, r.next_page_token))
        }
    })
    .await?;
    let response = ListDeploymentEventsResponse { events, next_page_token };
    match ctx.format {
        OutputFormat::Json => output::write_json(ctx.out, &response)?,
        OutputFormat::Table => {
            if response.events.is_empty() {
                writeln!(ctx.err, "no deployments found")?;
            } else {
                output::write_deployment_events_table(ctx.out, &response.events)?;
            }
            if !response.next_page_token.is_empty() {
                writeln!(ctx.err, "more deployments: add --page-token {} (or use --all)", response.next_page_token)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::PageArgs;

    fn args() -> CreateDeploymentArgs {
        CreateDeploymentArgs {
            service: "api".into(),
            version: "v1".into(),
            environment: "staging".into(),
            command: None,
            script_file: None,
            vars: Vec::new(),
            workdir: None,
            labels: Vec::new(),
            timeout: None,
            max_attempts: None,
            requested_by: None,
            reason: None,
            wait: false,
        }
    }

    /// An environment with only these variables.
    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn a_stored_release_is_deployed_without_a_rollout() {
        let r = build_create_request(&args(), None, env(&[])).expect("builds");
        assert_eq!((r.service.as_str(), r.version.as_str(), r.environment.as_str()), ("api", "v1", "staging"));
        assert!(r.rollout.is_none());
        assert_eq!((r.requested_by.as_str(), r.reason.as_str()), ("", ""));
    }

    #[test]
    fn rollout_flags_map_onto_the_spec() {
        let mut a = args();
        a.vars = vec![("REGION".into(), "eu".into()), ("OPTS".into(), "a=b".into())];
        a.workdir = Some("/srv".into());
        a.labels = vec![("arch".into(), "arm64".into())];
        a.timeout = Some(Duration::from_secs(600));
        a.max_attempts = Some(2);
        a.reason = Some("release train".into());
        let r = build_create_request(&a, Some("./deploy.sh".into()), env(&[("USER", "ann")])).expect("builds");
        let spec = r.rollout.expect("rollout");
        assert_eq!(spec.command, "./deploy.sh");
        assert_eq!(spec.env.len(), 2);
        assert_eq!(spec.env["OPTS"], "a=b");
        assert_eq!(spec.working_dir, "/srv");
        assert_eq!(spec.labels["arch"], "arm64");
        assert_eq!(spec.timeout.map(|d| d.seconds), Some(600));
        assert_eq!(spec.max_attempts, 2);
        assert_eq!((r.requested_by.as_str(), r.reason.as_str()), ("ann", "release train"));

        let bare = build_create_request(&args(), Some("true".into()), env(&[])).expect("builds");
        let spec = bare.rollout.expect("rollout");
        assert_eq!((spec.working_dir.as_str(), spec.timeout, spec.max_attempts), ("", None, 0), "server defaults");
    }

    #[test]
    fn rollout_flags_without_a_command_and_conflicts_are_usage_errors() {
        for change in [
            (|a: &mut CreateDeploymentArgs| a.vars = vec![("A".into(), "1".into())]) as fn(&mut CreateDeploymentArgs),
            |a| a.workdir = Some("/".into()),
            |a| a.labels = vec![("os".into(), "linux".into())],
            |a| a.timeout = Some(Duration::from_secs(1)),
            |a| a.max_attempts = Some(1),
        ] {
            let mut a = args();
            change(&mut a);
            let err = build_create_request(&a, None, env(&[])).expect_err("no command");
            assert!(err.downcast_ref::<UsageError>().is_some(), "{err:#}");
        }
        let mut a = args();
        a.vars = vec![("A".into(), "1".into()), ("A".into(), "2".into())];
        let err = build_create_request(&a, Some("x".into()), env(&[])).expect_err("conflict");
        assert!(err.downcast_ref::<UsageError>().is_some(), "{err:#}");
    }

    #[tokio::test]
    async fn the_rollout_comes_from_the_command_or_a_script_file() {
        let mut a = args();
        assert_eq!(rollout_command(&a).await.expect("none"), None);
        a.command = Some("echo hi".into());
        assert_eq!(rollout_command(&a).await.expect("command").as_deref(), Some("echo hi"));
        a.command = Some("  ".into());
        let err = rollout_command(&a).await.expect_err("blank");
        assert!(err.downcast_ref::<UsageError>().is_some(), "{err:#}");

        let dir = std::env::temp_dir().join(format!("tether-cli-deploy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let script = dir.join("deploy.sh");
        std::fs::write(&script, "#!/bin/sh\necho deploying\n").expect("write");
        let binary = dir.join("binary");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).expect("write");
        let mut a = args();
        a.script_file = Some(script);
        assert_eq!(rollout_command(&a).await.expect("script").as_deref(), Some("#!/bin/sh\necho deploying\n"));
        a.script_file = Some(binary);
        let err = rollout_command(&a).await.expect_err("not text");
        assert!(err.downcast_ref::<UsageError>().is_some(), "{err:#}");
        a.script_file = Some(dir.join("missing.sh"));
        let err = rollout_command(&a).await.expect_err("missing");
        assert!(format!("{err:#}").contains("cannot read script file"), "{err:#}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn promote_and_rollback_requests_carry_the_requester() {
        let r = build_promote_request("api/1".into(), None, None, env(&[("TETHER_REQUESTED_BY", "ci")]));
        assert_eq!((r.id.as_str(), r.reason.as_str(), r.requested_by.as_str()), ("api/1", "", "ci"));
        let r = build_promote_request("api/1".into(), Some("green".into()), Some("bob"), env(&[("USER", "ann")]));
        assert_eq!((r.reason.as_str(), r.requested_by.as_str()), ("green", "bob"));

        let args = RollbackArgs {
            service: "api".into(),
            environment: "production".into(),
            to_version: Some("v1".into()),
            reason: Some("errors up".into()),
            requested_by: None,
            wait: false,
        };
        let r = build_rollback_request(&args, env(&[("USER", "ann")]));
        assert_eq!(
            (r.service.as_str(), r.environment.as_str(), r.version.as_str(), r.reason.as_str()),
            ("api", "production", "v1", "errors up")
        );
        assert_eq!(r.requested_by, "ann");
        let r = build_rollback_request(&RollbackArgs { to_version: None, reason: None, ..args }, env(&[]));
        assert_eq!((r.version.as_str(), r.reason.as_str(), r.requested_by.as_str()), ("", "", ""));
    }

    #[test]
    fn list_and_history_filters_map_onto_the_requests() {
        let args = ListDeploymentsArgs {
            service: "api".into(),
            environment: Some("staging".into()),
            page: PageArgs { limit: Some(5), ..Default::default() },
        };
        let r = build_list_request(&args, "tok".into());
        assert_eq!((r.service.as_str(), r.environment.as_str()), ("api", "staging"));
        assert_eq!((r.page_size, r.page_token.as_str()), (5, "tok"));
        let r = build_list_request(
            &ListDeploymentsArgs { environment: None, page: PageArgs::default(), ..args },
            "".into(),
        );
        assert_eq!(r, ListDeploymentsRequest { service: "api".into(), ..Default::default() }, "no filters");

        let args = DeploymentHistoryArgs {
            service: "api".into(),
            environment: None,
            deployment: Some("api/1".into()),
            page: PageArgs::default(),
        };
        let r = build_history_request(&args, String::new());
        assert_eq!((r.service.as_str(), r.environment.as_str(), r.deployment_id.as_str()), ("api", "", "api/1"));
        assert_eq!((r.page_size, r.page_token.as_str()), (0, ""));
    }

    #[test]
    fn finished_deployment_states() {
        use DeploymentState::*;
        for s in [Succeeded, Failed, RolledBack, Superseded] {
            assert!(is_deployment_finished(s as i32), "{s:?}");
        }
        for s in [Unspecified, Pending, Queued, InProgress] {
            assert!(!is_deployment_finished(s as i32), "{s:?}");
        }
        assert!(!is_deployment_finished(99), "an unknown state is waited on");
    }
}
