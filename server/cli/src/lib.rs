//! The client commands of the `tether` operator CLI: `tether queue …`,
//! `tether jobs …`, `tether agents …`, `tether pools …`, `tether deploy …`,
//! `tether envs …`, `tether summary` and `tether watch`.
//!
//! The `tether` binary owns the top-level parser and embeds this crate:
//!
//! ```text
//! #[derive(clap::Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     global: tether_cli::GlobalArgs,
//!     #[command(subcommand)]
//!     command: tether_cli::Command, // or nested beside `server`
//! }
//! let code = tether_cli::run(&cli.global, cli.command).await?;
//! ```
//!
//! [`run`] prints results on stdout and errors (`error: <CODE>: <message>`
//! plus a hint) on stderr, and returns the process exit code: 0 on success,
//! 1 on a failed call or a waited-for job or deployment that did not
//! succeed, 2 on bad usage. Tests can call [`run_with`] to capture both
//! streams.

pub mod args;
pub mod error;
pub mod output;
pub mod parse;

mod agents;
mod client;
mod deploy;
mod envs;
mod jobs;
mod pools;
mod queue;
mod summary;
mod wait;
mod watch;

use std::io::{IsTerminal as _, Write};
use std::process::ExitCode;

pub use args::{
    AgentsCommand, Command, CreateDeploymentArgs, CreateJobArgs, CreatePoolArgs, DeadLettersArgs, DeployCommand,
    DeploymentHistoryArgs, EnqueueArgs, EnvsCommand, GlobalArgs, JobsCommand, ListAgentsArgs, ListDashboardJobsArgs,
    ListDeploymentsArgs, ListJobsArgs, OutputFormat, PageArgs, PoolsCommand, PutEnvironmentArgs, QueueCommand,
    RollbackArgs, ScalingArgs, UpdatePoolArgs, WatchArgs, WatchKind, DEFAULT_SERVER,
};
pub use deploy::is_deployment_finished;
pub use wait::is_finished;

use client::{normalize_server, Clients, Ctx};
use error::{render_error, ErrorContext, Subject, UsageError};

/// Runs one client command against the server named in `global`, printing
/// results on stdout and errors on stderr; a spinner is drawn on stderr
/// while waiting, if stderr is a terminal, and `pools scaling --watch`
/// redraws the screen if stdout is one.
///
/// Failures are reported on stderr and turned into the exit code, so the
/// `Err` case is reserved for failures of the CLI itself; today there are
/// none, and callers can treat `Err` like exit code 1.
pub async fn run(global: &GlobalArgs, command: Command) -> anyhow::Result<ExitCode> {
    let terminal = Terminal { progress: std::io::stderr().is_terminal(), tty: std::io::stdout().is_terminal() };
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    Ok(execute(global, command, &mut out, &mut err, terminal).await)
}

/// Like [`run`], with results written to `out` and errors and notes to
/// `err`, no spinner and no screen redraws; for tests and for embedding.
pub async fn run_with(
    global: &GlobalArgs,
    command: Command,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    Ok(execute(global, command, out, err, Terminal::default()).await)
}

/// What of the terminal the CLI may use.
#[derive(Debug, Clone, Copy, Default)]
struct Terminal {
    /// Draw a spinner on stderr while waiting.
    progress: bool,
    /// Stdout is a terminal: `--watch` redraws the screen.
    tty: bool,
}

async fn execute(
    global: &GlobalArgs,
    command: Command,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
    terminal: Terminal,
) -> ExitCode {
    let context = ErrorContext {
        server: normalize_server(&global.server),
        subject: match &command {
            Command::Queue(_) => Subject::Job,
            Command::Jobs(_) => Subject::DashboardJob,
            Command::Agents(_) => Subject::Agent,
            Command::Pools(_) => Subject::Pool,
            Command::Deploy(_) => Subject::Deployment,
            Command::Envs(_) => Subject::Environment,
            Command::Summary | Command::Watch(_) => Subject::DashboardJob,
        },
    };
    let result = dispatch(global, command, &mut *out, &mut *err, terminal).await;
    let flushed = out.flush();
    match result.and_then(|code| flushed.map(|()| code).map_err(Into::into)) {
        Ok(code) => code,
        Err(e) => {
            // `tether queue list | head` closes stdout early: nothing to
            // report, and nothing useful to say.
            let broken_pipe = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if broken_pipe {
                return ExitCode::FAILURE;
            }
            let _ = writeln!(err, "{}", render_error(&e, &context));
            let usage = e.chain().any(|c| c.downcast_ref::<UsageError>().is_some());
            if usage {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn dispatch(
    global: &GlobalArgs,
    command: Command,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
    terminal: Terminal,
) -> anyhow::Result<ExitCode> {
    let Terminal { progress, tty } = terminal;
    let mut ctx = Ctx { clients: Clients::new(global)?, format: global.output, out, err, progress, tty };
    match command {
        Command::Queue(command) => queue::run(command, &mut ctx).await,
        Command::Jobs(command) => jobs::run(command, &mut ctx).await,
        Command::Agents(command) => agents::run(command, &mut ctx).await,
        Command::Pools(command) => pools::run(command, &mut ctx).await,
        Command::Deploy(command) => deploy::run(command, &mut ctx).await,
        Command::Envs(command) => envs::run(command, &mut ctx).await,
        Command::Summary => summary::run(&mut ctx).await,
        Command::Watch(args) => watch::run(args, &mut ctx).await,
    }
}
