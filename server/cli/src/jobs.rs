//! `tether jobs …`: create, inspect, list, cancel and retry the jobs of the
//! dashboard (DashboardService).
//!
//! A job runs as the queued job with the same id in the queue `tether.jobs`,
//! so `--wait` follows that queued job the way `queue wait` does, then reads
//! the job once more for its final status, attempts and history.

use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context as _;
use tether::time::{to_duration, to_timestamp};
use tether::v1::{
    CancelJobRequest, CreateJobRequest, GetJobRequest, GetJobResponse, Job, JobStatus, ListJobsRequest,
    ListJobsResponse, LogStream, RetryJobRequest, Routing, StreamJobLogsRequest,
};
use tonic::Status;

use crate::args::{CreateJobArgs, JobsCommand, ListDashboardJobsArgs, OutputFormat};
use crate::client::{collect_pages, Clients, Ctx};
use crate::error::UsageError;
use crate::output::{self, job_status_name};
use crate::parse::{env_to_map, labels_to_map};
use crate::wait::{get_job, wait_for_job};

/// The environment variables `--requested-by` defaults to, in order.
const REQUESTER_VARS: [&str; 2] = ["TETHER_REQUESTED_BY", "USER"];

/// Runs one `jobs` subcommand.
pub(crate) async fn run(command: JobsCommand, ctx: &mut Ctx<'_>) -> anyhow::Result<ExitCode> {
    match command {
        JobsCommand::Create(args) => create(args, ctx).await,
        JobsCommand::Get { id } => {
            let job = get_dashboard_job(&ctx.clients, &id).await?;
            print_job(ctx, job)?;
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::List(args) => list(args, ctx).await,
        JobsCommand::Cancel { id, reason, requested_by } => {
            let request = CancelJobRequest {
                id,
                reason: reason.unwrap_or_default(),
                requested_by: resolve_requested_by(requested_by.as_deref(), env_var),
            };
            let response = ctx.clients.dashboard.cancel_job(ctx.clients.req(request)).await?.into_inner();
            match ctx.format {
                OutputFormat::Json => output::write_json(ctx.out, &response)?,
                OutputFormat::Table => {
                    let job = response.job.unwrap_or_default();
                    writeln!(ctx.out, "job {} {}", job.id, job_status_name(job.status))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Logs { id, follow, filter, cursor } => logs(ctx, id, follow, filter, cursor).await,
        JobsCommand::Retry { id, requested_by, idempotency_key, wait } => {
            let request = build_retry_request(id, requested_by.as_deref(), idempotency_key, env_var);
            let response = ctx.clients.dashboard.retry_job(ctx.clients.req(request)).await?.into_inner();
            let new = NewJob { job: response.job.as_ref(), created: response.created, what: "a retry" };
            print_new_job(ctx, &response, new, wait).await
        }
    }
}

/// Reads an environment variable of the process.
pub(crate) fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Who asks: the flag as given, else the first of `TETHER_REQUESTED_BY` and
/// `USER` that is set and not blank (looked up with `env`), else empty (the
/// server records "anonymous").
pub(crate) fn resolve_requested_by(flag: Option<&str>, env: impl Fn(&str) -> Option<String>) -> String {
    if let Some(who) = flag {
        return who.to_string();
    }
    REQUESTER_VARS
        .iter()
        .filter_map(|name| env(name))
        .map(|value| value.trim().to_string())
        .find(|value| !value.is_empty())
        .unwrap_or_default()
}

/// Builds the CreateJobRequest from the flags; `env` looks up the
/// environment variables `--requested-by` defaults to.
pub(crate) fn build_create_request(
    args: &CreateJobArgs,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<CreateJobRequest> {
    let vars = env_to_map(&args.env).map_err(UsageError)?;
    let required_labels = labels_to_map(&args.require_labels).map_err(UsageError)?;
    // Leave routing unset unless asked for, so the server's defaults apply.
    let routing = (args.pool.is_some() || !required_labels.is_empty())
        .then(|| Routing { pool: args.pool.clone().unwrap_or_default(), required_labels });
    Ok(CreateJobRequest {
        name: args.name.clone(),
        command: args.command.clone(),
        env: vars,
        working_dir: args.workdir.clone().unwrap_or_default(),
        routing,
        priority: args.priority.map_or(0, |p| p as i32),
        timeout: args.timeout.map(to_duration),
        max_attempts: args.max_attempts.unwrap_or(0),
        requested_by: resolve_requested_by(args.requested_by.as_deref(), &env),
        idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
        secrets: args
            .secrets
            .iter()
            .map(|name| {
                env(name).map(|value| (name.clone(), value)).ok_or_else(|| {
                    UsageError(format!("--secret {name}: set the environment variable {name} to the secret's value"))
                })
            })
            .collect::<Result<_, _>>()?,
    })
}

/// Builds the RetryJobRequest from the flags; `env` as for
/// [`build_create_request`].
pub(crate) fn build_retry_request(
    id: String,
    requested_by: Option<&str>,
    idempotency_key: Option<String>,
    env: impl Fn(&str) -> Option<String>,
) -> RetryJobRequest {
    RetryJobRequest {
        id,
        requested_by: resolve_requested_by(requested_by, env),
        idempotency_key: idempotency_key.unwrap_or_default(),
    }
}

/// Builds one page's ListJobsRequest from the flags.
pub(crate) fn build_list_request(args: &ListDashboardJobsArgs, page_token: String) -> ListJobsRequest {
    ListJobsRequest {
        statuses: args.statuses.iter().map(|s| *s as i32).collect(),
        pool: args.pool.clone().unwrap_or_default(),
        requested_by: args.requested_by.clone().unwrap_or_default(),
        create_time_after: args.created_after.map(to_timestamp),
        create_time_before: args.created_before.map(to_timestamp),
        page_size: args.page.limit.unwrap_or(0),
        page_token,
    }
}

async fn create(args: CreateJobArgs, ctx: &mut Ctx<'_>) -> anyhow::Result<ExitCode> {
    let request = build_create_request(&args, env_var)?;
    let response = ctx.clients.dashboard.create_job(ctx.clients.req(request)).await?.into_inner();
    let new = NewJob { job: response.job.as_ref(), created: response.created, what: "a job" };
    print_new_job(ctx, &response, new, args.wait).await
}

/// The job a create or retry answered with.
struct NewJob<'a> {
    job: Option<&'a Job>,
    /// False when the idempotency key matched an earlier call's job.
    created: bool,
    /// What was made, for the note ("a job", "a retry").
    what: &'static str,
}

/// What create and retry print: a note when the idempotency key was used
/// already, then with --wait the finished job (exit code from its outcome),
/// else the response in JSON or just the id, so `ID=$(tether jobs …)` works.
async fn print_new_job<M: output::ProtoName>(
    ctx: &mut Ctx<'_>,
    response: &M,
    new: NewJob<'_>,
    wait: bool,
) -> anyhow::Result<ExitCode> {
    if !new.created {
        writeln!(ctx.err, "note: {} with this idempotency key already exists; using it", new.what)?;
    }
    let id = new.job.map(|j| j.id.clone());
    if wait {
        let id = id.context("the server answered with no job")?;
        return wait_and_print(ctx, &id).await;
    }
    match ctx.format {
        OutputFormat::Json => output::write_json(ctx.out, response)?,
        OutputFormat::Table => writeln!(ctx.out, "{}", id.unwrap_or_default())?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits for the job's queued job to finish, prints the job, and maps its
/// status to the exit code: 0 for SUCCESS, 1 for anything else.
async fn wait_and_print(ctx: &mut Ctx<'_>, id: &str) -> anyhow::Result<ExitCode> {
    let waiting = || format!("waiting for job {id}");
    let queued = get_job(&ctx.clients, id).await.with_context(waiting)?;
    wait_for_job(&ctx.clients, queued, ctx.progress).await.with_context(waiting)?;
    // The job's record changes in the same write as its queued job, so this
    // read sees the end the wait saw.
    let job = get_dashboard_job(&ctx.clients, id).await?;
    let succeeded = job.status == JobStatus::Success as i32;
    print_job(ctx, job)?;
    Ok(if succeeded { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Prints a job's output: raw bytes, stderr chunks to stderr (table mode),
/// or one StreamJobLogsResponse per line (JSON). Following, the exit code
/// is the job's outcome.
async fn logs(
    ctx: &mut Ctx<'_>,
    id: String,
    follow: bool,
    filter: Option<String>,
    cursor: Option<String>,
) -> anyhow::Result<ExitCode> {
    let request = StreamJobLogsRequest {
        id: id.clone(),
        cursor: cursor.unwrap_or_default(),
        follow,
        filter: filter.unwrap_or_default(),
    };
    let mut stream = ctx.clients.dashboard.stream_job_logs(ctx.clients.req(request)).await?.into_inner();
    while let Some(chunk) = stream.message().await? {
        match ctx.format {
            OutputFormat::Json => writeln!(ctx.out, "{}", output::to_json_line(&chunk)?)?,
            OutputFormat::Table if chunk.stream == LogStream::Stderr as i32 => {
                ctx.err.write_all(&chunk.data)?;
                ctx.err.flush()?;
            }
            OutputFormat::Table => {
                ctx.out.write_all(&chunk.data)?;
                ctx.out.flush()?;
            }
        }
    }
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    // The stream ended with the job.
    let job = get_dashboard_job(&ctx.clients, &id).await?;
    Ok(if job.status == JobStatus::Success as i32 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Reads a job, failing with the server's status.
async fn get_dashboard_job(clients: &Clients, id: &str) -> Result<Job, Status> {
    let request = clients.req(GetJobRequest { id: id.to_string() });
    let response = clients.dashboard.clone().get_job(request).await?.into_inner();
    response.job.ok_or_else(|| Status::internal(format!("the server returned no job for id {id}")))
}

/// Prints one job: details, or a GetJobResponse in JSON so `get`,
/// `create --wait` and `retry --wait` all have the job at `.job`.
fn print_job(ctx: &mut Ctx<'_>, job: Job) -> anyhow::Result<()> {
    match ctx.format {
        OutputFormat::Json => output::write_json(ctx.out, &GetJobResponse { job: Some(job) })?,
        OutputFormat::Table => output::write_dashboard_job_details(ctx.out, &job, SystemTime::now())?,
    }
    Ok(())
}

async fn list(args: ListDashboardJobsArgs, ctx: &mut Ctx<'_>) -> anyhow::Result<ExitCode> {
    let clients = ctx.clients.clone();
    let (jobs, next_page_token) = collect_pages(&args.page, |page_token| {
        let request = clients.req(build_list_request(&args, page_token));
        let mut client = clients.dashboard.clone();
        async move {
            let r = client.list_jobs(request).await?.into_inner();
            Ok((r.jobs, r.next_page_token))
        }
    })
    .await?;
    let response = ListJobsResponse { jobs, next_page_token };
    match ctx.format {
        OutputFormat::Json => output::write_json(ctx.out, &response)?,
        OutputFormat::Table => {
            // The notes go to stderr so stdout holds only the table.
            if response.jobs.is_empty() {
                writeln!(ctx.err, "no jobs found")?;
            } else {
                output::write_dashboard_jobs_table(ctx.out, &response.jobs, SystemTime::now())?;
            }
            if !response.next_page_token.is_empty() {
                writeln!(ctx.err, "more jobs: add --page-token {} (or use --all)", response.next_page_token)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};
    use tether::v1::Priority;

    use crate::args::PageArgs;

    fn args() -> CreateJobArgs {
        CreateJobArgs {
            name: "build".into(),
            command: "make test".into(),
            env: Vec::new(),
            workdir: None,
            pool: None,
            require_labels: Vec::new(),
            priority: None,
            timeout: None,
            max_attempts: None,
            requested_by: None,
            idempotency_key: None,
            secrets: Vec::new(),
            wait: false,
        }
    }

    #[test]
    fn secrets_come_from_the_environment_never_the_command_line() {
        let with = CreateJobArgs { secrets: vec!["TOKEN".into()], ..args() };
        let req = build_create_request(&with, env(&[("TOKEN", "hunter2")])).expect("request");
        assert_eq!(req.secrets.get("TOKEN").map(String::as_str), Some("hunter2"));
        let missing = build_create_request(&with, env(&[])).expect_err("unset");
        assert!(missing.to_string().contains("set the environment variable TOKEN"), "{missing}");
    }

    /// An environment with only these variables.
    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn unset_flags_leave_the_server_defaults() {
        let r = build_create_request(&args(), env(&[])).expect("builds");
        assert_eq!((r.name.as_str(), r.command.as_str()), ("build", "make test"));
        assert!(r.env.is_empty());
        assert_eq!(r.working_dir, "");
        assert!(r.routing.is_none());
        assert_eq!(r.priority, 0);
        assert!(r.timeout.is_none());
        assert_eq!(r.max_attempts, 0);
        assert_eq!(r.requested_by, "");
        assert_eq!(r.idempotency_key, "");
    }

    #[test]
    fn flags_map_onto_the_request() {
        let mut a = args();
        a.env = vec![("CI".into(), "1".into()), ("OPTS".into(), "a=b".into())];
        a.workdir = Some("/src".into());
        a.pool = Some("linux".into());
        a.require_labels = vec![("arch".into(), "arm64".into())];
        a.priority = Some(Priority::High);
        a.timeout = Some(Duration::from_millis(1500));
        a.max_attempts = Some(5);
        a.requested_by = Some("ann".into());
        a.idempotency_key = Some("k1".into());
        let r = build_create_request(&a, env(&[("TETHER_REQUESTED_BY", "ci-bot")])).expect("builds");
        assert_eq!(r.env.len(), 2);
        assert_eq!(r.env["OPTS"], "a=b");
        assert_eq!(r.working_dir, "/src");
        let routing = r.routing.expect("routing");
        assert_eq!(routing.pool, "linux");
        assert_eq!(routing.required_labels["arch"], "arm64");
        assert_eq!(r.priority, Priority::High as i32);
        assert_eq!(r.timeout.map(|d| (d.seconds, d.nanos)), Some((1, 500_000_000)));
        assert_eq!(r.max_attempts, 5);
        assert_eq!(r.requested_by, "ann", "the flag beats the environment");
        assert_eq!(r.idempotency_key, "k1");

        // Labels alone route to the default pool.
        let mut a = args();
        a.require_labels = vec![("os".into(), "linux".into())];
        let routing = build_create_request(&a, env(&[])).expect("builds").routing.expect("routing");
        assert_eq!(routing.pool, "");
    }

    #[test]
    fn conflicting_env_vars_and_labels_are_usage_errors() {
        let mut a = args();
        a.env = vec![("A".into(), "1".into()), ("A".into(), "2".into())];
        let err = build_create_request(&a, env(&[])).expect_err("conflict");
        assert!(err.downcast_ref::<UsageError>().is_some(), "{err:#}");
        let mut a = args();
        a.require_labels = vec![("os".into(), "linux".into()), ("os".into(), "mac".into())];
        let err = build_create_request(&a, env(&[])).expect_err("conflict");
        assert!(err.downcast_ref::<UsageError>().is_some(), "{err:#}");
    }

    #[test]
    fn requested_by_falls_back_to_the_environment() {
        let both = env(&[("TETHER_REQUESTED_BY", "ci-bot"), ("USER", "ann")]);
        assert_eq!(resolve_requested_by(Some("bob"), &both), "bob");
        assert_eq!(resolve_requested_by(Some(""), &both), "", "an explicit empty flag stays empty");
        assert_eq!(resolve_requested_by(None, &both), "ci-bot");
        assert_eq!(resolve_requested_by(None, env(&[("USER", "ann")])), "ann");
        assert_eq!(resolve_requested_by(None, env(&[("TETHER_REQUESTED_BY", " "), ("USER", "ann")])), "ann");
        assert_eq!(resolve_requested_by(None, env(&[])), "");
        let mut a = args();
        a.requested_by = None;
        assert_eq!(build_create_request(&a, &both).expect("builds").requested_by, "ci-bot");
    }

    #[test]
    fn retry_requests_carry_the_requester_and_key() {
        let r = build_retry_request("j-1".into(), None, Some("k".into()), env(&[("USER", "ann")]));
        assert_eq!((r.id.as_str(), r.requested_by.as_str(), r.idempotency_key.as_str()), ("j-1", "ann", "k"));
        let r = build_retry_request("j-1".into(), Some("bob"), None, env(&[("USER", "ann")]));
        assert_eq!((r.requested_by.as_str(), r.idempotency_key.as_str()), ("bob", ""));
    }

    #[test]
    fn list_filters_map_onto_the_request() {
        let after = UNIX_EPOCH + Duration::from_secs(1_893_553_445);
        let args = ListDashboardJobsArgs {
            statuses: vec![JobStatus::Pending, JobStatus::Failed],
            pool: Some("gpu".into()),
            requested_by: Some("ann".into()),
            created_after: Some(after),
            created_before: None,
            page: PageArgs { limit: Some(5), ..Default::default() },
        };
        let r = build_list_request(&args, "tok".into());
        assert_eq!(r.statuses, [JobStatus::Pending as i32, JobStatus::Failed as i32]);
        assert_eq!((r.pool.as_str(), r.requested_by.as_str()), ("gpu", "ann"));
        assert_eq!(r.create_time_after.map(|t| t.seconds), Some(1_893_553_445));
        assert!(r.create_time_before.is_none());
        assert_eq!((r.page_size, r.page_token.as_str()), (5, "tok"));

        let bare = ListDashboardJobsArgs {
            statuses: Vec::new(),
            pool: None,
            requested_by: None,
            created_after: None,
            created_before: None,
            page: PageArgs::default(),
        };
        let r = build_list_request(&bare, String::new());
        assert_eq!(r, ListJobsRequest::default(), "no flags, no filters");
    }
}
