//! `tether queue …`: enqueue, inspect, cancel, redrive and wait for jobs.

use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context as _;
use tether::time::{to_duration, to_timestamp};
use tether::v1::{
    CancelQueuedJobRequest, EnqueueJobRequest, GetQueueStatsRequest, GetQueuedJobResponse, ListDeadLettersRequest,
    ListDeadLettersResponse, ListQueuedJobsRequest, ListQueuedJobsResponse, QueuedJob, QueuedJobState,
    RedriveDeadLetterRequest, Routing,
};

use crate::args::{DeadLettersArgs, EnqueueArgs, ListJobsArgs, OutputFormat, QueueCommand};
use crate::client::{collect_pages, read_payload_file, Ctx};
use crate::error::UsageError;
use crate::output::{self, state_name};
use crate::parse::labels_to_map;
use crate::wait::{get_job, wait_for_job};

/// Runs one `queue` subcommand.
pub(crate) async fn run(command: QueueCommand, ctx: &mut Ctx<'_>) -> anyhow::Result<ExitCode> {
    match command {
        QueueCommand::Enqueue(args) => enqueue(args, ctx).await,
        QueueCommand::Get { id } => {
            let job = get_job(&ctx.clients, &id).await?;
            print_job(ctx, job)?;
            Ok(ExitCode::SUCCESS)
        }
        QueueCommand::List(args) => list(args, ctx).await,
        QueueCommand::Cancel { id, reason } => {
            let request = CancelQueuedJobRequest { id, reason: reason.unwrap_or_default() };
            let response = ctx.clients.queue.cancel_queued_job(ctx.clients.req(request)).await?.into_inner();
            match ctx.format {
                OutputFormat::Json => output::write_json(ctx.out, &response)?,
                OutputFormat::Table => {
                    let job = response.job.unwrap_or_default();
                    writeln!(ctx.out, "job {} {}", job.id, state_name(job.state))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        QueueCommand::Stats { queue } => {
            let request = GetQueueStatsRequest { queue: queue.unwrap_or_default() };
            let response = ctx.clients.queue.get_queue_stats(ctx.clients.req(request)).await?.into_inner();
            match ctx.format {
                OutputFormat::Json => output::write_json(ctx.out, &response)?,
                OutputFormat::Table => output::write_stats(ctx.out, &response)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        QueueCommand::DeadLetters(args) => dead_letters(args, ctx).await,
        QueueCommand::Redrive { id } => {
            let response = ctx
                .clients
                .queue
                .redrive_dead_letter(ctx.clients.req(RedriveDeadLetterRequest { id }))
                .await?
                .into_inner();
            match ctx.format {
                OutputFormat::Json => output::write_json(ctx.out, &response)?,
                OutputFormat::Table => {
                    let job = response.job.unwrap_or_default();
                    writeln!(
                        ctx.out,
                        "job {} {} again in queue {} with {} fresh attempts",
                        job.id,
                        state_name(job.state),
                        job.queue,
                        job.max_attempts
                    )?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        QueueCommand::Wait { id } => {
            let job = get_job(&ctx.clients, &id).await?;
            wait_and_print(ctx, job).await
        }
    }
}

/// Builds the EnqueueJobRequest from the flags; pure apart from reading a
/// payload file.
pub(crate) async fn build_enqueue_request(args: &EnqueueArgs) -> anyhow::Result<EnqueueJobRequest> {
    let payload = match (&args.command, &args.payload, &args.payload_file) {
        (Some(command), _, _) => serde_json::to_vec(&serde_json::json!({ "command": command }))
            .context("cannot encode the command as JSON")?,
        (_, Some(payload), _) => payload.clone().into_bytes(),
        (_, _, Some(path)) => read_payload_file(path).await?,
        // clap's ArgGroup makes one of them required; this keeps a direct
        // caller of `run` from getting an empty job by mistake.
        (None, None, None) => {
            return Err(UsageError("one of --command, --payload or --payload-file is required".into()).into())
        }
    };
    let required_labels = labels_to_map(&args.require_labels).map_err(UsageError)?;
    // Leave routing unset unless asked for, so the server's defaults apply.
    let routing = (args.pool.is_some() || !required_labels.is_empty())
        .then(|| Routing { pool: args.pool.clone().unwrap_or_default(), required_labels });
    Ok(EnqueueJobRequest {
        queue: args.queue.clone(),
        payload: payload.into(),
        priority: args.priority.map_or(0, |p| p as i32),
        routing,
        max_attempts: args.max_attempts.unwrap_or(0),
        lease_duration: args.lease.map(to_duration),
        timeout: args.timeout.map(to_duration),
        idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
        not_before: args.not_before.map(to_timestamp),
        retry_policy: args.retry.clone(),
    })
}

async fn enqueue(args: EnqueueArgs, ctx: &mut Ctx<'_>) -> anyhow::Result<ExitCode> {
    let request = build_enqueue_request(&args).await?;
    let response = ctx.clients.queue.enqueue_job(ctx.clients.req(request)).await?.into_inner();
    if !response.created {
        writeln!(ctx.err, "note: a job with this idempotency key already exists; using it")?;
    }
    if args.wait {
        let job = response.job.context("the server accepted the job but returned none")?;
        return wait_and_print(ctx, job).await;
    }
    match ctx.format {
        OutputFormat::Json => output::write_json(ctx.out, &response)?,
        // Just the id, so `ID=$(tether queue enqueue …)` works.
        OutputFormat::Table => {
            let id = response.job.map(|j| j.id).unwrap_or_default();
            writeln!(ctx.out, "{id}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits for `job` to finish, prints it, and maps its outcome to the exit
/// code: 0 for SUCCEEDED, 1 for anything else.
async fn wait_and_print(ctx: &mut Ctx<'_>, job: QueuedJob) -> anyhow::Result<ExitCode> {
    let id = job.id.clone();
    let job = wait_for_job(&ctx.clients, job, ctx.progress).await.with_context(|| format!("waiting for job {id}"))?;
    let succeeded = job.state == QueuedJobState::Succeeded as i32;
    print_job(ctx, job)?;
    Ok(if succeeded { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Prints one job: details table, or a GetQueuedJobResponse in JSON so
/// `get`, `wait` and `enqueue --wait` all have the job at `.job`.
fn print_job(ctx: &mut Ctx<'_>, job: QueuedJob) -> anyhow::Result<()> {
    match ctx.format {
        OutputFormat::Json => output::write_json(ctx.out, &GetQueuedJobResponse { job: Some(job) })?,
        OutputFormat::Table => output::write_job_details(ctx.out, &job, SystemTime::now())?,
    }
    Ok(())
}

async fn list(args: ListJobsArgs, ctx: &mut Ctx<'_>) -> anyhow::Result<ExitCode> {
    let clients = ctx.clients.clone();
    let (jobs, next_page_token) = collect_pages(&args.page, |page_token| {
        let request = clients.req(ListQueuedJobsRequest {
            queue: args.queue.clone().unwrap_or_default(),
            states: args.states.iter().map(|s| *s as i32).collect(),
            page_size: args.page.limit.unwrap_or(0),
            page_token,
        });
        let mut client = clients.queue.clone();
        async move {
            let r = client.list_queued_jobs(request).await?.into_inner();
            Ok((r.jobs, r.next_page_token))
        }
    })
    .await?;
    let response = ListQueuedJobsResponse { jobs, next_page_token };
    match ctx.format {
        OutputFormat::Json => output::write_json(ctx.out, &response)?,
        OutputFormat::Table => {
            print_job_list(ctx, &response.jobs, &response.next_page_token, "jobs")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn dead_letters(args: DeadLettersArgs, ctx: &mut Ctx<'_>) -> anyhow::Result<ExitCode> {
    let clients = ctx.clients.clone();
    let (jobs, next_page_token) = collect_pages(&args.page, |page_token| {
        let request = clients.req(ListDeadLettersRequest {
            queue: args.queue.clone().unwrap_or_default(),
            page_size: args.page.limit.unwrap_or(0),
            page_token,
        });
        let mut client = clients.queue.clone();
        async move {
            let r = client.list_dead_letters(request).await?.into_inner();
            Ok((r.jobs, r.next_page_token))
        }
    })
    .await?;
    let response = ListDeadLettersResponse { jobs, next_page_token };
    match ctx.format {
        OutputFormat::Json => output::write_json(ctx.out, &response)?,
        OutputFormat::Table => {
            print_job_list(ctx, &response.jobs, &response.next_page_token, "dead-lettered jobs")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a job table; the "nothing found" and "more pages" notes go to
/// stderr so stdout holds only the table.
fn print_job_list(ctx: &mut Ctx<'_>, jobs: &[QueuedJob], next_page_token: &str, what: &str) -> anyhow::Result<()> {
    if jobs.is_empty() {
        writeln!(ctx.err, "no {what} found")?;
    } else {
        output::write_jobs_table(ctx.out, jobs, SystemTime::now())?;
    }
    if !next_page_token.is_empty() {
        writeln!(ctx.err, "more {what}: add --page-token {next_page_token} (or use --all)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tether::v1::Priority;

    fn args() -> EnqueueArgs {
        EnqueueArgs {
            queue: "default".into(),
            command: None,
            payload: None,
            payload_file: None,
            priority: None,
            pool: None,
            require_labels: Vec::new(),
            max_attempts: None,
            retry: None,
            lease: None,
            timeout: None,
            idempotency_key: None,
            not_before: None,
            wait: false,
        }
    }

    #[tokio::test]
    async fn command_becomes_a_json_payload() {
        let mut a = args();
        a.command = Some(r#"echo "hi""#.into());
        let r = build_enqueue_request(&a).await.expect("builds");
        let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("json");
        assert_eq!(v, serde_json::json!({"command": "echo \"hi\""}));
        // Unset flags leave the server's defaults in charge.
        assert_eq!(r.priority, 0);
        assert!(r.routing.is_none());
        assert!(r.lease_duration.is_none());
        assert_eq!(r.max_attempts, 0);
    }

    #[tokio::test]
    async fn flags_map_onto_the_request() {
        let mut a = args();
        a.payload = Some("raw".into());
        a.priority = Some(Priority::Critical);
        a.require_labels = vec![("os".into(), "linux".into())];
        a.lease = Some(Duration::from_secs(45));
        a.timeout = Some(Duration::from_millis(1500));
        a.max_attempts = Some(5);
        a.idempotency_key = Some("k1".into());
        let r = build_enqueue_request(&a).await.expect("builds");
        assert_eq!(&r.payload[..], b"raw");
        assert_eq!(r.priority, Priority::Critical as i32);
        let routing = r.routing.expect("routing");
        assert_eq!(routing.pool, "");
        assert_eq!(routing.required_labels["os"], "linux");
        assert_eq!(r.lease_duration.map(|d| d.seconds), Some(45));
        assert_eq!(r.timeout.map(|d| (d.seconds, d.nanos)), Some((1, 500_000_000)));
        assert_eq!(r.max_attempts, 5);
        assert_eq!(r.idempotency_key, "k1");
    }

    #[tokio::test]
    async fn payload_file_errors_name_the_file() {
        let mut a = args();
        a.payload_file = Some("/nonexistent/tether-payload.bin".into());
        let err = build_enqueue_request(&a).await.expect_err("missing file");
        assert!(format!("{err:#}").contains("/nonexistent/tether-payload.bin"), "{err:#}");
        let mut a = args();
        a.payload = Some("x".into());
        a.require_labels = vec![("os".into(), "linux".into()), ("os".into(), "mac".into())];
        let err = build_enqueue_request(&a).await.expect_err("conflict");
        assert!(err.downcast_ref::<UsageError>().is_some());
        assert!(build_enqueue_request(&args()).await.is_err());
    }
}
