//! `tether pools …`: create, inspect, change and delete agent pools, and
//! read (or watch) a pool's scaling signal.

use std::process::ExitCode;
use std::time::SystemTime;

use tether::v1::{
    AgentPool, CreateAgentPoolRequest, DeleteAgentPoolRequest, GetAgentPoolRequest, GetPoolScalingSignalRequest,
    GetPoolScalingSignalResponse, ListAgentPoolsRequest, ListAgentPoolsResponse, UpdateAgentPoolRequest,
};
use tonic::Status;

use crate::args::{CreatePoolArgs, OutputFormat, PageArgs, PoolsCommand, ScalingArgs, UpdatePoolArgs};
use crate::client::{collect_pages, Clients, Ctx};
use crate::error::{code_name, UsageError};
use crate::output::{self, ProtoName};
use crate::parse::labels_to_map;
use crate::wait::is_transient;

/// The update-mask paths, in the order they are sent.
pub const MASK_DESCRIPTION: &str = "description";
/// See [`MASK_DESCRIPTION`].
pub const MASK_MIN_SIZE: &str = "min_size";
/// See [`MASK_DESCRIPTION`].
pub const MASK_MAX_SIZE: &str = "max_size";
/// See [`MASK_DESCRIPTION`].
pub const MASK_DESIRED_SIZE: &str = "desired_size";
/// See [`MASK_DESCRIPTION`].
pub const MASK_DEFAULT_LABELS: &str = "default_labels";

/// ANSI: clear the screen and move the cursor home, for `--watch` on a
/// terminal.
const CLEAR_SCREEN: &str = "\x1b[2J\x1b[H";

/// Runs one `pools` subcommand.
pub(crate) async fn run(command: PoolsCommand, ctx: &mut Ctx<'_>) -> anyhow::Result<ExitCode> {
    match command {
        PoolsCommand::Create(args) => {
            let request = build_create_request(&args)?;
            let response = ctx.clients.agents.create_agent_pool(ctx.clients.req(request)).await?.into_inner();
            print_change(ctx, &response, response.pool.as_ref(), "created")?;
        }
        PoolsCommand::Get { name } => {
            let response =
                ctx.clients.agents.get_agent_pool(ctx.clients.req(GetAgentPoolRequest { name })).await?.into_inner();
            match ctx.format {
                OutputFormat::Json => output::write_json(ctx.out, &response)?,
                OutputFormat::Table => {
                    output::write_pool_details(ctx.out, &response.pool.unwrap_or_default(), SystemTime::now())?
                }
            }
        }
        PoolsCommand::List(page) => list(page, ctx).await?,
        PoolsCommand::Update(args) => {
            let request = build_update_request(&args)?;
            let paths = request.update_mask.as_ref().map(|m| m.paths.join(", ")).unwrap_or_default();
            let response = ctx.clients.agents.update_agent_pool(ctx.clients.req(request)).await?.into_inner();
            print_change(ctx, &response, response.pool.as_ref(), &format!("updated ({paths})"))?;
        }
        PoolsCommand::Delete { name } => {
            let response = ctx
                .clients
                .agents
                .delete_agent_pool(ctx.clients.req(DeleteAgentPoolRequest { name: name.clone() }))
                .await?
                .into_inner();
            match ctx.format {
                OutputFormat::Json => output::write_json(ctx.out, &response)?,
                OutputFormat::Table => writeln!(ctx.out, "pool {name} deleted")?,
            }
        }
        PoolsCommand::Scaling(args) => scaling(args, ctx).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses size flags that contradict each other (only among the flags
/// given; the server checks them against the pool's stored values too).
/// `max` of `None` means "not given" and also "server default" on create.
fn check_sizes(min: Option<u32>, desired: Option<u32>, max: Option<u32>) -> Result<(), UsageError> {
    if let (Some(min), Some(max)) = (min, max) {
        if min > max {
            return Err(UsageError(format!("--min {min} is greater than --max {max}")));
        }
    }
    if let (Some(min), Some(desired)) = (min, desired) {
        if desired < min {
            return Err(UsageError(format!("--desired {desired} is less than --min {min}")));
        }
    }
    if let (Some(desired), Some(max)) = (desired, max) {
        if desired > max {
            return Err(UsageError(format!("--desired {desired} is greater than --max {max}")));
        }
    }
    Ok(())
}

/// The pool carried by create and update requests: unset flags are 0 (the
/// server's default on create; left alone by the update mask).
fn pool_message(
    name: &str,
    description: &Option<String>,
    min: Option<u32>,
    max: Option<u32>,
    desired: Option<u32>,
    default_labels: std::collections::HashMap<String, String>,
) -> AgentPool {
    AgentPool {
        name: name.to_string(),
        description: description.clone().unwrap_or_default(),
        min_size: min.unwrap_or(0),
        max_size: max.unwrap_or(0),
        desired_size: desired.unwrap_or(0),
        default_labels,
        create_time: None,
        update_time: None,
    }
}

/// Builds the CreateAgentPoolRequest from the flags. Unset flags are sent
/// as 0 so the server's defaults apply (max 0 means the largest size,
/// desired below min means min).
pub fn build_create_request(args: &CreatePoolArgs) -> Result<CreateAgentPoolRequest, UsageError> {
    // `--max 0` asks for the server's default bound, so it bounds nothing
    // here.
    check_sizes(args.min, args.desired, args.max.filter(|m| *m != 0))?;
    let default_labels = labels_to_map(&args.labels).map_err(UsageError)?;
    Ok(CreateAgentPoolRequest {
        pool: Some(pool_message(&args.name, &args.description, args.min, args.max, args.desired, default_labels)),
    })
}

/// Builds the UpdateAgentPoolRequest: the pool carries the new values, and
/// the update mask names exactly the fields whose flags were given, so
/// nothing else changes. No field flag at all is a usage error (clap already
/// refuses it; this guards direct callers).
pub fn build_update_request(args: &UpdatePoolArgs) -> Result<UpdateAgentPoolRequest, UsageError> {
    check_sizes(args.min, args.desired, args.max)?;
    if args.clear_labels && !args.labels.is_empty() {
        return Err(UsageError("--clear-labels and --label cannot be used together".into()));
    }
    let default_labels = labels_to_map(&args.labels).map_err(UsageError)?;
    let mut paths = Vec::new();
    if args.description.is_some() {
        paths.push(MASK_DESCRIPTION);
    }
    if args.min.is_some() {
        paths.push(MASK_MIN_SIZE);
    }
    if args.max.is_some() {
        paths.push(MASK_MAX_SIZE);
    }
    if args.desired.is_some() {
        paths.push(MASK_DESIRED_SIZE);
    }
    if args.clear_labels || !args.labels.is_empty() {
        paths.push(MASK_DEFAULT_LABELS);
    }
    if paths.is_empty() {
        return Err(UsageError(
            "nothing to update; give at least one of --description, --min, --max, --desired, --label, \
             --clear-labels"
                .into(),
        ));
    }
    Ok(UpdateAgentPoolRequest {
        pool: Some(pool_message(&args.name, &args.description, args.min, args.max, args.desired, default_labels)),
        update_mask: Some(prost_types::FieldMask { paths: paths.into_iter().map(String::from).collect() }),
    })
}

/// Prints the result of a change to a pool: the response in JSON, or one
/// line naming the pool, what happened and its sizes now.
fn print_change<M: ProtoName>(
    ctx: &mut Ctx<'_>,
    response: &M,
    pool: Option<&AgentPool>,
    what: &str,
) -> anyhow::Result<()> {
    match ctx.format {
        OutputFormat::Json => output::write_json(ctx.out, response)?,
        OutputFormat::Table => {
            let default = AgentPool::default();
            let p = pool.unwrap_or(&default);
            writeln!(
                ctx.out,
                "pool {} {what}: min {}, desired {}, max {}",
                p.name, p.min_size, p.desired_size, p.max_size
            )?;
        }
    }
    Ok(())
}

async fn list(page: PageArgs, ctx: &mut Ctx<'_>) -> anyhow::Result<()> {
    let clients = ctx.clients.clone();
    let (pools, next_page_token) = collect_pages(&page, |page_token| {
        let request = clients.req(ListAgentPoolsRequest { page_size: page.limit.unwrap_or(0), page_token });
        let mut client = clients.agents.clone();
        async move {
            let r = client.list_agent_pools(request).await?.into_inner();
            Ok((r.pools, r.next_page_token))
        }
    })
    .await?;
    let response = ListAgentPoolsResponse { pools, next_page_token };
    match ctx.format {
        OutputFormat::Json => output::write_json(ctx.out, &response)?,
        OutputFormat::Table => {
            if response.pools.is_empty() {
                writeln!(ctx.err, "no pools found")?;
            } else {
                output::write_pools_table(ctx.out, &response.pools, SystemTime::now())?;
            }
            if !response.next_page_token.is_empty() {
                writeln!(ctx.err, "more pools: add --page-token {} (or use --all)", response.next_page_token)?;
            }
        }
    }
    Ok(())
}

async fn fetch_signal(clients: &Clients, name: &str) -> Result<GetPoolScalingSignalResponse, Status> {
    let request = clients.req(GetPoolScalingSignalRequest { name: name.to_string() });
    Ok(clients.agents.clone().get_pool_scaling_signal(request).await?.into_inner())
}

/// `pools scaling NAME [--watch]`. Without `--watch`, one query. With it,
/// a query every `--interval` until Ctrl-C: on a terminal the screen is
/// redrawn; otherwise each sample is appended (tables separated by a blank
/// line, or one JSON object per line). A failed refresh that may pass (the
/// server restarting) is noted on stderr and retried; any other failure, or
/// a failure of the first query, ends the command.
async fn scaling(args: ScalingArgs, ctx: &mut Ctx<'_>) -> anyhow::Result<()> {
    let first = fetch_signal(&ctx.clients, &args.name).await?;
    if !args.watch {
        return match ctx.format {
            OutputFormat::Json => output::write_json(ctx.out, &first),
            OutputFormat::Table => Ok(output::write_scaling(ctx.out, &args.name, &first, SystemTime::now())?),
        };
    }
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut sample = Some(first);
    let mut drawn = 0u64;
    loop {
        if let Some(signal) = sample.take() {
            draw_sample(ctx, &args, &signal, drawn)?;
            drawn += 1;
        }
        tokio::select! {
            // An error here means no signal handler could be installed;
            // there is then nothing to wait for but the next refresh.
            result = &mut interrupted => if result.is_ok() { return Ok(()) },
            () = tokio::time::sleep(args.interval) => {}
        }
        match fetch_signal(&ctx.clients, &args.name).await {
            Ok(signal) => sample = Some(signal),
            Err(status) if is_transient(&status) => {
                writeln!(ctx.err, "refresh failed ({}: {}); retrying", code_name(status.code()), status.message())?;
            }
            Err(status) => return Err(status.into()),
        }
    }
}

/// Writes one `--watch` sample and flushes it, so it shows at once.
fn draw_sample(
    ctx: &mut Ctx<'_>,
    args: &ScalingArgs,
    signal: &GetPoolScalingSignalResponse,
    drawn: u64,
) -> anyhow::Result<()> {
    match ctx.format {
        OutputFormat::Json => writeln!(ctx.out, "{}", output::to_json_line(signal)?)?,
        OutputFormat::Table => {
            let now = SystemTime::now();
            if ctx.tty {
                write!(ctx.out, "{CLEAR_SCREEN}")?;
                writeln!(
                    ctx.out,
                    "Every {}: tether pools scaling {} (Ctrl-C to stop)\n",
                    humantime::format_duration(args.interval),
                    args.name
                )?;
            } else if drawn > 0 {
                writeln!(ctx.out)?;
            }
            output::write_scaling(ctx.out, &args.name, signal, now)?;
        }
    }
    ctx.out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        command: crate::args::Command,
    }

    fn update_args(args: &[&str]) -> UpdatePoolArgs {
        let argv = ["tether", "pools", "update", "gpu"].into_iter().chain(args.iter().copied());
        match Cli::try_parse_from(argv).expect("parses").command {
            crate::args::Command::Pools(PoolsCommand::Update(a)) => a,
            other => panic!("not pools update: {other:?}"),
        }
    }

    fn create_args(args: &[&str]) -> CreatePoolArgs {
        let argv = ["tether", "pools", "create", "gpu"].into_iter().chain(args.iter().copied());
        match Cli::try_parse_from(argv).expect("parses").command {
            crate::args::Command::Pools(PoolsCommand::Create(a)) => a,
            other => panic!("not pools create: {other:?}"),
        }
    }

    fn mask(r: &UpdateAgentPoolRequest) -> Vec<&str> {
        r.update_mask.as_ref().expect("mask").paths.iter().map(String::as_str).collect()
    }

    #[test]
    fn update_mask_names_exactly_the_flags_given() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["--description", "new"], &["description"]),
            (&["--description", ""], &["description"]),
            (&["--min", "2"], &["min_size"]),
            (&["--max", "9"], &["max_size"]),
            (&["--desired", "0"], &["desired_size"]),
            (&["--label", "a=1"], &["default_labels"]),
            (&["--clear-labels"], &["default_labels"]),
            (
                &["--desired", "4", "--label", "a=1", "--max", "9", "--min", "1", "--description", "d"],
                &["description", "min_size", "max_size", "desired_size", "default_labels"],
            ),
        ];
        for (flags, want) in cases {
            let r = build_update_request(&update_args(flags)).expect("builds");
            assert_eq!(mask(&r), *want, "{flags:?}");
            assert_eq!(r.pool.as_ref().map(|p| p.name.as_str()), Some("gpu"));
        }
    }

    #[test]
    fn update_carries_the_new_values() {
        let r = build_update_request(&update_args(&["--min", "1", "--desired", "3", "--label", "gpu=a100"]))
            .expect("builds");
        let pool = r.pool.expect("pool");
        assert_eq!((pool.min_size, pool.desired_size), (1, 3));
        assert_eq!(pool.default_labels["gpu"], "a100");
        let r = build_update_request(&update_args(&["--clear-labels"])).expect("builds");
        assert!(r.pool.expect("pool").default_labels.is_empty());
    }

    #[test]
    fn update_refuses_contradictions() {
        for flags in [
            &["--min", "5", "--max", "2"][..],
            &["--min", "5", "--desired", "2"],
            &["--desired", "11", "--max", "10"],
            &["--label", "a=1", "--label", "a=2"],
        ] {
            assert!(build_update_request(&update_args(flags)).is_err(), "{flags:?}");
        }
        // Direct callers that bypass clap get the same refusals.
        let mut a = update_args(&["--min", "1"]);
        a.min = None;
        let err = build_update_request(&a).expect_err("no fields");
        assert!(err.0.contains("nothing to update"), "{err}");
        let mut a = update_args(&["--clear-labels"]);
        a.labels = vec![("a".into(), "1".into())];
        assert!(build_update_request(&a).is_err());
    }

    #[test]
    fn create_leaves_unset_sizes_to_the_server() {
        let r = build_create_request(&create_args(&[])).expect("builds");
        let pool = r.pool.expect("pool");
        assert_eq!(pool.name, "gpu");
        assert_eq!((pool.min_size, pool.desired_size, pool.max_size), (0, 0, 0));
        assert!(pool.description.is_empty() && pool.default_labels.is_empty());

        let r = build_create_request(&create_args(&[
            "--description",
            "CUDA",
            "--min",
            "1",
            "--max",
            "8",
            "--desired",
            "2",
            "--label",
            "gpu=a100",
            "--label",
            "arch=x86",
        ]))
        .expect("builds");
        let pool = r.pool.expect("pool");
        assert_eq!(pool.description, "CUDA");
        assert_eq!((pool.min_size, pool.desired_size, pool.max_size), (1, 2, 8));
        assert_eq!(pool.default_labels.len(), 2);
    }

    #[test]
    fn create_refuses_contradictions_but_max_0_means_default() {
        assert!(build_create_request(&create_args(&["--min", "3", "--max", "2"])).is_err());
        assert!(build_create_request(&create_args(&["--desired", "3", "--max", "2"])).is_err());
        assert!(build_create_request(&create_args(&["--min", "3", "--desired", "2"])).is_err());
        assert!(build_create_request(&create_args(&["--label", "a=1", "--label", "a=2"])).is_err());
        assert!(build_create_request(&create_args(&["--min", "3", "--max", "0"])).is_ok());
    }
}
