//! The command-line surface: global flags and every subcommand's arguments.
//!
//! The `tether` binary flattens [`GlobalArgs`] into its own parser and nests
//! [`Command`] among its subcommands, so everything here is plain clap
//! derive types with no parser of their own.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand, ValueEnum};
use tether::v1::{AgentHealth, EventKind, JobStatus, Priority, QueuedJobState};

use crate::parse;

/// The server address used when neither `--server` nor `TETHER_SERVER` is set.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// Flags every client command understands. They are `global`, so they work
/// before or after the subcommand (`tether queue list --output json`).
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// The Tether server to talk to.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "TETHER_SERVER",
        default_value = DEFAULT_SERVER,
        value_name = "URL"
    )]
    pub server: String,

    /// How to print results: human tables, or canonical protobuf JSON of the
    /// response.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_enum,
        default_value_t = OutputFormat::Table
    )]
    pub output: OutputFormat,

    /// API token or session credential, sent as `authorization: Bearer …`.
    #[arg(long, global = true, help_heading = "Global options", env = "TETHER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl GlobalArgs {
    /// Global flags for talking to `server`, with table output and no token;
    /// handy for tests that call [`crate::run`] directly.
    pub fn new(server: impl Into<String>) -> Self {
        Self { server: server.into(), output: OutputFormat::Table, token: None }
    }
}

impl Default for GlobalArgs {
    fn default() -> Self {
        Self::new(DEFAULT_SERVER)
    }
}

/// How results are printed on stdout.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// Human-readable tables.
    #[default]
    Table,
    /// Canonical protobuf JSON of the response message, pretty-printed.
    Json,
}

/// The client commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Queue operations
    #[command(subcommand)]
    Queue(QueueCommand),
    /// CI/CD jobs: what to run, where, who asked, and their history
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Agent operations
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Agent pool operations
    #[command(subcommand)]
    Pools(PoolsCommand),
    /// Deployments: roll a service's version out to an environment, promote
    /// it to the next one, roll it back, and read the audit trail
    #[command(subcommand)]
    Deploy(DeployCommand),
    /// Environments deployments roll out to
    #[command(subcommand)]
    Envs(EnvsCommand),
    /// The dashboard's front page: jobs per status, the last 24 hours
    /// (success rate, queue wait), queued jobs, agents, and per service its
    /// deployments and time to restore
    Summary,
    /// Print dashboard job, deployment and agent changes as they happen, one
    /// line each, until interrupted (Ctrl-C) or the server ends the stream
    Watch(WatchArgs),
}

/// `tether queue …`
#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// Enqueue a job
    Enqueue(EnqueueArgs),
    /// Show one job
    Get {
        /// The job id.
        id: String,
    },
    /// List jobs, newest first
    List(ListJobsArgs),
    /// Cancel a job (a running job's agent is told to stop it)
    Cancel {
        /// The job id.
        id: String,
        /// Why; recorded as the job's last error.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Count jobs by state and priority
    Stats {
        /// Only this queue (default: all queues).
        #[arg(long)]
        queue: Option<String>,
    },
    /// List dead-lettered jobs, oldest first
    DeadLetters(DeadLettersArgs),
    /// Put a dead-lettered job back in its queue with fresh attempts
    Redrive {
        /// The job id.
        id: String,
    },
    /// Wait until a job finishes; exit code 0 only if it succeeded
    Wait {
        /// The job id.
        id: String,
    },
}

/// Arguments of `tether queue enqueue`.
#[derive(Args, Debug)]
#[command(group(
    clap::ArgGroup::new("payload_source")
        .required(true)
        .multiple(false)
        .args(["command", "payload", "payload_file"])
))]
pub struct EnqueueArgs {
    /// The queue to put the job in.
    #[arg(long, default_value = "default")]
    pub queue: String,

    /// A shell command for the reference agent; sent as the JSON payload
    /// {"command": "..."}.
    #[arg(long, value_name = "SHELL")]
    pub command: Option<String>,

    /// The payload, as given.
    #[arg(long, value_name = "STRING")]
    pub payload: Option<String>,

    /// Read the payload from a file (`-` for stdin).
    #[arg(long, value_name = "PATH")]
    pub payload_file: Option<PathBuf>,

    /// Dispatch priority: low, normal, high or critical [default: normal].
    #[arg(long, value_parser = parse::parse_priority)]
    pub priority: Option<Priority>,

    /// The agent pool that must run the job [default: the server's "default"].
    #[arg(long)]
    pub pool: Option<String>,

    /// A label the agent must carry, as key=value (repeatable).
    #[arg(long = "require-label", value_name = "KEY=VALUE", value_parser = parse::parse_label)]
    pub require_labels: Vec<(String, String)>,

    /// Attempts the job gets in all (1-100): retried failures and lost
    /// attempts (agent gone, lease expired) count; then it is dead-lettered
    /// [default: 3].
    #[arg(long)]
    pub max_attempts: Option<u32>,

    /// Retry a failed command: `any` (every failure) or the exit codes to
    /// retry (`75` or `2,75`) [default: none: a command that exits non-zero
    /// fails at once; lost attempts are always retried].
    #[arg(long, value_name = "WHEN", value_parser = parse::parse_retry)]
    pub retry: Option<tether::v1::RetryPolicy>,

    /// How long a claim lasts without renewal, e.g. 30s [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse::parse_duration)]
    pub lease: Option<Duration>,

    /// The longest one attempt may run, e.g. 10m [default: no limit].
    #[arg(long, value_name = "DURATION", value_parser = parse::parse_duration)]
    pub timeout: Option<Duration>,

    /// Enqueue at most once per key: repeating the same request returns the
    /// existing job.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,

    /// Do not dispatch before this time: RFC 3339 (2030-01-02T15:04:05Z) or
    /// relative (+5m).
    #[arg(long, value_name = "TIME", value_parser = parse::parse_time)]
    pub not_before: Option<SystemTime>,

    /// Wait until the job finishes, then print it; exit code 0 only if it
    /// succeeded.
    #[arg(long)]
    pub wait: bool,
}

/// Paging flags shared by the list commands.
#[derive(Args, Debug, Clone, Default)]
pub struct PageArgs {
    /// At most this many results per page (1-1000) [default: the server's, 100].
    #[arg(long, visible_alias = "page-size", value_name = "N", value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub limit: Option<i32>,

    /// Continue a previous listing from this token.
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,

    /// Fetch every page, not just the first.
    #[arg(long, conflicts_with = "page_token")]
    pub all: bool,
}

/// Arguments of `tether queue list`.
#[derive(Args, Debug)]
pub struct ListJobsArgs {
    /// Only jobs of this queue (default: all queues).
    #[arg(long)]
    pub queue: Option<String>,

    /// Only jobs in these states (repeatable or comma-separated): queued,
    /// claimed, running, succeeded, failed, dead-lettered, cancelled.
    #[arg(long = "state", value_name = "STATE", value_delimiter = ',', value_parser = parse::parse_state)]
    pub states: Vec<QueuedJobState>,

    /// Paging.
    #[command(flatten)]
    pub page: PageArgs,
}

/// Arguments of `tether queue dead-letters`.
#[derive(Args, Debug)]
pub struct DeadLettersArgs {
    /// Only jobs of this queue (default: all queues).
    #[arg(long)]
    pub queue: Option<String>,

    /// Paging.
    #[command(flatten)]
    pub page: PageArgs,
}

/// `tether jobs …`: the jobs of the dashboard (DashboardService). Each runs
/// as a queued job with the same id in the queue `tether.jobs`.
#[derive(Subcommand, Debug)]
pub enum JobsCommand {
    /// Create a job; prints its id
    Create(CreateJobArgs),
    /// Show one job with why it waits, its attempts and its history
    Get {
        /// The job id.
        id: String,
    },
    /// List jobs, newest first
    List(ListDashboardJobsArgs),
    /// Cancel a pending or running job (a running job's agent is told to
    /// stop it)
    Cancel {
        /// The job id.
        id: String,
        /// Why; recorded in the job's history.
        #[arg(long)]
        reason: Option<String>,
        /// Who cancels [default: $TETHER_REQUESTED_BY, else $USER].
        #[arg(long, value_name = "WHO")]
        requested_by: Option<String>,
    },
    /// Print a job's output (stdout and stderr as the agent sent them);
    /// with --follow, keep printing until the job ends and exit with its
    /// outcome (0 only if it succeeded)
    Logs {
        /// The job id.
        id: String,
        /// Follow live output until the job ends.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only lines containing this text.
        #[arg(long, value_name = "TEXT")]
        filter: Option<String>,
        /// Start after this cursor (from a previous `--output json` line).
        #[arg(long, value_name = "CURSOR")]
        cursor: Option<String>,
    },
    /// Run an ended job again as a new job; prints the new id
    Retry {
        /// The id of the ended job.
        id: String,
        /// Who asks [default: $TETHER_REQUESTED_BY, else $USER].
        #[arg(long, value_name = "WHO")]
        requested_by: Option<String>,
        /// Retry at most once per key: repeating the same request returns
        /// the new job it created first.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        /// Wait until the new job ends, then print it; exit code 0 only if
        /// it succeeded.
        #[arg(long)]
        wait: bool,
    },
}

/// Arguments of `tether jobs create`.
#[derive(Args, Debug, Clone)]
pub struct CreateJobArgs {
    /// A display name.
    #[arg(long)]
    pub name: String,

    /// The shell command or script the agent runs.
    #[arg(long, value_name = "SHELL")]
    pub command: String,

    /// An environment variable for the command, as NAME=value (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse::parse_env_var)]
    pub env: Vec<(String, String)>,

    /// The command's working directory on the agent [default: the agent's].
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<String>,

    /// The agent pool that must run the job [default: the server's "default"].
    #[arg(long)]
    pub pool: Option<String>,

    /// A label the agent must carry, as key=value (repeatable).
    #[arg(long = "require-label", value_name = "KEY=VALUE", value_parser = parse::parse_label)]
    pub require_labels: Vec<(String, String)>,

    /// Dispatch priority: low, normal, high or critical [default: normal].
    #[arg(long, value_parser = parse::parse_priority)]
    pub priority: Option<Priority>,

    /// The longest one attempt may run, e.g. 10m [default: no limit].
    #[arg(long, value_name = "DURATION", value_parser = parse::parse_duration)]
    pub timeout: Option<Duration>,

    /// Attempts the job gets in all (1-100); only lost attempts (the agent
    /// went away) are retried, a command that fails or times out is not
    /// [default: 3].
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,

    /// Who asks [default: $TETHER_REQUESTED_BY, else $USER].
    #[arg(long, value_name = "WHO")]
    pub requested_by: Option<String>,

    /// Create at most once per key: repeating the same request returns the
    /// existing job.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// A secret for the command, read from this CLI's environment variable
    /// of the same name (never given on the command line, where process
    /// listings show it); repeatable. Stored encrypted, sent only to the
    /// agent that runs the job, masked in its output.
    #[arg(long = "secret", value_name = "NAME")]
    pub secrets: Vec<String>,

    /// Wait until the job ends, then print it; exit code 0 only if it
    /// succeeded.
    #[arg(long)]
    pub wait: bool,
}

/// Arguments of `tether jobs list`.
#[derive(Args, Debug, Clone)]
pub struct ListDashboardJobsArgs {
    /// Only jobs with these statuses (repeatable or comma-separated):
    /// pending, running, success, failed, cancelled.
    #[arg(long = "status", value_name = "STATUS", value_delimiter = ',', value_parser = parse::parse_job_status)]
    pub statuses: Vec<JobStatus>,

    /// Only jobs routed to this pool (default: every pool).
    #[arg(long)]
    pub pool: Option<String>,

    /// Only jobs requested by exactly this requester (default: anyone).
    #[arg(long, value_name = "WHO")]
    pub requested_by: Option<String>,

    /// Only jobs created at or after this time: RFC 3339
    /// (2030-01-02T15:04:05Z) or relative (-1h for an hour ago).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, value_parser = parse::parse_filter_time)]
    pub created_after: Option<SystemTime>,

    /// Only jobs created before this time: RFC 3339 or relative (-30m).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, value_parser = parse::parse_filter_time)]
    pub created_before: Option<SystemTime>,

    /// Paging.
    #[command(flatten)]
    pub page: PageArgs,
}

/// `tether agents …`
#[derive(Subcommand, Debug)]
pub enum AgentsCommand {
    /// List agents
    List(ListAgentsArgs),
    /// Show one agent
    Get {
        /// The agent id.
        id: String,
    },
    /// Tell an agent to finish its running jobs, take no new ones, and leave
    Drain {
        /// The agent id.
        id: String,
        /// Why; sent to the agent.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Stop giving an agent new jobs (running jobs go on)
    Cordon {
        /// The agent id.
        id: String,
        /// Why, for the audit trail.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Let a cordoned or out-of-service agent take jobs again
    Uncordon {
        /// The agent id.
        id: String,
        /// Why, for the audit trail.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Remove an agent for good; its running jobs are requeued
    Deregister {
        /// The agent id.
        id: String,
    },
}

/// Arguments of `tether agents list`.
#[derive(Args, Debug)]
pub struct ListAgentsArgs {
    /// Only agents of this pool (default: every pool).
    #[arg(long)]
    pub pool: Option<String>,

    /// Only agents with these health states (repeatable or comma-separated):
    /// registering, healthy, degraded, unhealthy, offline, terminated.
    #[arg(long, value_name = "HEALTH", value_delimiter = ',', value_parser = parse::parse_health)]
    pub health: Vec<AgentHealth>,

    /// Only agents carrying this label, as key=value (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse::parse_label)]
    pub labels: Vec<(String, String)>,

    /// Paging.
    #[command(flatten)]
    pub page: PageArgs,
}

/// `tether pools …`
#[derive(Subcommand, Debug)]
pub enum PoolsCommand {
    /// Create an agent pool
    Create(CreatePoolArgs),
    /// Show one pool
    Get {
        /// The pool name.
        name: String,
    },
    /// List pools, by name
    List(PageArgs),
    /// Change a pool's description, size bounds or default labels (only the
    /// fields whose flags are given)
    Update(UpdatePoolArgs),
    /// Delete a pool that has no live agents and no queued jobs
    Delete {
        /// The pool name.
        name: String,
    },
    /// Show how many agents a pool needs now, and why
    Scaling(ScalingArgs),
}

/// Arguments of `tether pools create`.
#[derive(Args, Debug, Clone)]
pub struct CreatePoolArgs {
    /// The pool name: 1-128 characters of [A-Za-z0-9._-].
    pub name: String,

    /// What the pool is for.
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,

    /// Fewest agents the pool should have [default: 0].
    #[arg(long, value_name = "N")]
    pub min: Option<u32>,

    /// Most agents the pool may have [default: the server's, 100000].
    #[arg(long, value_name = "N")]
    pub max: Option<u32>,

    /// Agents wanted now, between --min and --max [default: --min].
    #[arg(long, value_name = "N")]
    pub desired: Option<u32>,

    /// A label every agent of the pool gets by default, as key=value
    /// (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse::parse_label)]
    pub labels: Vec<(String, String)>,
}

/// Arguments of `tether pools update`. At least one field flag is required;
/// the update mask names exactly the fields given.
#[derive(Args, Debug, Clone)]
#[command(group(
    clap::ArgGroup::new("fields")
        .required(true)
        .multiple(true)
        .args(["description", "min", "max", "desired", "labels", "clear_labels"])
))]
pub struct UpdatePoolArgs {
    /// The pool name.
    pub name: String,

    /// The new description (`""` clears it).
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,

    /// The new fewest agents.
    #[arg(long, value_name = "N")]
    pub min: Option<u32>,

    /// The new most agents.
    #[arg(long, value_name = "N")]
    pub max: Option<u32>,

    /// The new agents wanted now.
    #[arg(long, value_name = "N")]
    pub desired: Option<u32>,

    /// A default label, as key=value (repeatable). The labels given replace
    /// all of the pool's default labels.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse::parse_label)]
    pub labels: Vec<(String, String)>,

    /// Remove all of the pool's default labels.
    #[arg(long, conflicts_with = "labels")]
    pub clear_labels: bool,
}

/// Arguments of `tether pools scaling`.
#[derive(Args, Debug, Clone)]
pub struct ScalingArgs {
    /// The pool name.
    pub name: String,

    /// Keep re-querying and redraw until interrupted (Ctrl-C); with
    /// `--output json`, one JSON object per line.
    #[arg(long)]
    pub watch: bool,

    /// How often `--watch` re-queries.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse::parse_duration, requires = "watch")]
    pub interval: Duration,
}

/// `tether deploy …`: deployments (DashboardService). A deployment's
/// rollout runs as a dashboard job (`tether jobs get`, `tether jobs logs`)
/// on an agent of its environment's pool.
#[derive(Subcommand, Debug)]
pub enum DeployCommand {
    /// Roll a service's version out to an environment; prints the
    /// deployment's id
    Create(CreateDeploymentArgs),
    /// Show one deployment
    Get {
        /// The deployment id (`SERVICE/…`).
        id: String,
    },
    /// List a service's deployments, newest first
    List(ListDeploymentsArgs),
    /// Deploy the version of a succeeded deployment to the environment its
    /// environment promotes to; prints the new deployment's id
    Promote {
        /// The id of the succeeded deployment.
        id: String,
        /// Why; recorded with the deployment.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// Who asks [default: $TETHER_REQUESTED_BY, else $USER].
        #[arg(long, value_name = "WHO")]
        requested_by: Option<String>,
        /// Wait until the new deployment ends, then print it; exit code 0
        /// only if it succeeded.
        #[arg(long)]
        wait: bool,
    },
    /// Deploy again the last good version before the current one (or
    /// --to-version) and mark the current version bad; prints the version
    /// rolled back from
    Rollback(RollbackArgs),
    /// Show every state change of a service's deployments (newest
    /// deployment first, each one's changes oldest first)
    History(DeploymentHistoryArgs),
}

/// Arguments of `tether deploy create`.
#[derive(Args, Debug, Clone)]
#[command(group(
    clap::ArgGroup::new("rollout")
        .multiple(false)
        .args(["command", "script_file"])
))]
pub struct CreateDeploymentArgs {
    /// The service: 1-128 characters of [A-Za-z0-9._-].
    pub service: String,

    /// The version: 1-128 characters of [A-Za-z0-9._-].
    pub version: String,

    /// The environment to deploy to.
    #[arg(long = "env", short = 'e', visible_alias = "environment", value_name = "ENVIRONMENT")]
    pub environment: String,

    /// The shell command the rollout runs, with TETHER_DEPLOY_SERVICE,
    /// TETHER_DEPLOY_VERSION, TETHER_DEPLOY_ENVIRONMENT and TETHER_DEPLOY_ID
    /// set. Required the first time a version is deployed; leave it (and
    /// --script-file) out to run the version's stored rollout again.
    #[arg(long, value_name = "SHELL")]
    pub command: Option<String>,

    /// Read the rollout's shell script from a file (`-` for stdin), instead
    /// of --command.
    #[arg(long, value_name = "PATH")]
    pub script_file: Option<PathBuf>,

    /// An environment variable for the rollout, as NAME=value (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = parse::parse_env_var, requires = "rollout")]
    pub vars: Vec<(String, String)>,

    /// The rollout's working directory on the agent [default: the agent's].
    #[arg(long, value_name = "DIR", requires = "rollout")]
    pub workdir: Option<String>,

    /// A label the agent (of the environment's pool) must carry, as
    /// key=value (repeatable).
    #[arg(
        long = "label",
        visible_alias = "require-label",
        value_name = "KEY=VALUE",
        value_parser = parse::parse_label,
        requires = "rollout"
    )]
    pub labels: Vec<(String, String)>,

    /// The longest one rollout attempt may run, e.g. 10m [default: no limit].
    #[arg(long, value_name = "DURATION", value_parser = parse::parse_duration, requires = "rollout")]
    pub timeout: Option<Duration>,

    /// Attempts the rollout job gets in all (1-100); only lost attempts (the
    /// agent went away) are retried [default: 3].
    #[arg(long, value_name = "N", requires = "rollout")]
    pub max_attempts: Option<u32>,

    /// Who asks [default: $TETHER_REQUESTED_BY, else $USER].
    #[arg(long, value_name = "WHO")]
    pub requested_by: Option<String>,

    /// Why; recorded with the deployment.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,

    /// Wait until the deployment ends (succeeded, failed, rolled back or
    /// superseded), then print it; exit code 0 only if it succeeded.
    #[arg(long)]
    pub wait: bool,
}

/// Arguments of `tether deploy list`.
#[derive(Args, Debug, Clone)]
pub struct ListDeploymentsArgs {
    /// The service.
    pub service: String,

    /// Only deployments to this environment (default: every environment).
    #[arg(long = "env", short = 'e', visible_alias = "environment", value_name = "ENVIRONMENT")]
    pub environment: Option<String>,

    /// Paging.
    #[command(flatten)]
    pub page: PageArgs,
}

/// Arguments of `tether deploy rollback`.
#[derive(Args, Debug, Clone)]
pub struct RollbackArgs {
    /// The service.
    pub service: String,

    /// The environment to roll back.
    #[arg(long = "env", short = 'e', visible_alias = "environment", value_name = "ENVIRONMENT")]
    pub environment: String,

    /// The version to go back to; it must have succeeded in the environment
    /// [default: the last good version before the current one].
    #[arg(long, value_name = "VERSION")]
    pub to_version: Option<String>,

    /// Why; recorded with the deployment.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,

    /// Who asks [default: $TETHER_REQUESTED_BY, else $USER].
    #[arg(long, value_name = "WHO")]
    pub requested_by: Option<String>,

    /// Wait until the rollback's deployment ends, then print it; exit code
    /// 0 only if it succeeded.
    #[arg(long)]
    pub wait: bool,
}

/// Arguments of `tether deploy history`.
#[derive(Args, Debug, Clone)]
pub struct DeploymentHistoryArgs {
    /// The service.
    pub service: String,

    /// Only deployments to this environment (default: every environment).
    #[arg(long = "env", short = 'e', visible_alias = "environment", value_name = "ENVIRONMENT")]
    pub environment: Option<String>,

    /// Only this deployment of the service.
    #[arg(long, value_name = "ID")]
    pub deployment: Option<String>,

    /// Paging (a page holds the changes of up to --limit deployments).
    #[command(flatten)]
    pub page: PageArgs,
}

/// `tether envs …`: the environments deployments roll out to.
#[derive(Subcommand, Debug)]
pub enum EnvsCommand {
    /// Create or replace an environment (every setting is replaced: a flag
    /// left out is reset)
    Put(PutEnvironmentArgs),
    /// List every environment, by name
    List,
}

/// Arguments of `tether envs put`.
#[derive(Args, Debug, Clone)]
pub struct PutEnvironmentArgs {
    /// The environment name: 1-128 characters of [A-Za-z0-9._-].
    pub name: String,

    /// The agent pool whose agents run the environment's rollouts; it must
    /// exist.
    #[arg(long, value_name = "POOL")]
    pub pool: String,

    /// The environment `tether deploy promote` sends a succeeded deployment
    /// here to; it must exist [default: none, the last stage].
    #[arg(long, value_name = "ENVIRONMENT")]
    pub promote_to: Option<String>,

    /// When a rollout here fails, deploy the last good version again at
    /// once (and mark the failed version bad).
    #[arg(long)]
    pub auto_rollback: bool,
}

/// What `tether watch --kind` names.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchKind {
    /// State changes of dashboard jobs.
    Job,
    /// State changes of deployments.
    Deployment,
    /// Agents registering, or changing health or scheduling status.
    Agent,
}

impl WatchKind {
    /// The kind as WatchEventsRequest names it.
    pub fn event_kind(self) -> EventKind {
        match self {
            WatchKind::Job => EventKind::Job,
            WatchKind::Deployment => EventKind::Deployment,
            WatchKind::Agent => EventKind::Agent,
        }
    }
}

/// Arguments of `tether watch`.
#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    /// Only changes of these kinds (repeatable or comma-separated)
    /// [default: every kind].
    #[arg(long = "kind", value_name = "KIND", value_enum, value_delimiter = ',')]
    pub kinds: Vec<WatchKind>,

    /// Resume after this cursor (from a `--show-cursor` or `--output json`
    /// line): nothing is missed and nothing repeated [default: from now].
    #[arg(long, value_name = "CURSOR")]
    pub cursor: Option<String>,

    /// End each line with ` cursor=CURSOR`, to resume from with --cursor
    /// (`--output json` lines always carry it).
    #[arg(long)]
    pub show_cursor: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Mirrors how the `tether` binary embeds these types.
    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        global: GlobalArgs,
        #[command(subcommand)]
        command: Command,
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tether").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let cli = parse(&["queue", "list", "--output", "json", "--server", "http://example:1"]).expect("parses");
        assert_eq!(cli.global.output, OutputFormat::Json);
        assert_eq!(cli.global.server, "http://example:1");
    }

    #[test]
    fn enqueue_parses_every_flag() {
        let cli = parse(&[
            "queue",
            "enqueue",
            "--command",
            "echo hi",
            "--priority",
            "high",
            "--require-label",
            "os=linux",
            "--require-label",
            "arch=arm64",
            "--lease",
            "45s",
            "--timeout",
            "10m",
            "--not-before",
            "+5m",
            "--max-attempts",
            "5",
            "--wait",
        ])
        .expect("parses");
        let Command::Queue(QueueCommand::Enqueue(e)) = cli.command else {
            panic!("not enqueue: {:?}", cli.command);
        };
        assert_eq!(e.queue, "default");
        assert_eq!(e.command.as_deref(), Some("echo hi"));
        assert_eq!(e.priority, Some(Priority::High));
        assert_eq!(e.require_labels.len(), 2);
        assert_eq!(e.lease, Some(Duration::from_secs(45)));
        assert_eq!(e.timeout, Some(Duration::from_secs(600)));
        assert_eq!(e.max_attempts, Some(5));
        assert!(e.not_before.is_some());
        assert!(e.wait);
    }

    #[test]
    fn enqueue_needs_exactly_one_payload_source() {
        assert!(parse(&["queue", "enqueue"]).is_err());
        assert!(parse(&["queue", "enqueue", "--command", "a", "--payload", "b"]).is_err());
        assert!(parse(&["queue", "enqueue", "--payload-file", "x"]).is_ok());
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["queue", "enqueue", "--payload", "x", "--priority", "urgent"][..],
            &["queue", "enqueue", "--payload", "x", "--lease", "30"],
            &["queue", "enqueue", "--payload", "x", "--not-before", "tomorrow"],
            &["queue", "enqueue", "--payload", "x", "--require-label", "linux"],
            &["queue", "list", "--state", "done"],
            &["queue", "list", "--limit", "0"],
            &["queue", "list", "--all", "--page-token", "t"],
            &["agents", "list", "--health", "sick"],
            &["queue", "get"],
            &["--output", "yaml", "queue", "get", "x"],
            &["pools", "create"],
            &["pools", "create", "p", "--min", "-1"],
            &["pools", "create", "p", "--max", "many"],
            &["pools", "create", "p", "--desired", "4294967296"],
            &["pools", "create", "p", "--label", "gpu"],
            &["pools", "update", "p"],
            &["pools", "update", "p", "--min", "x"],
            &["pools", "update", "p", "--label", "=v"],
            &["pools", "update", "p", "--label", "a=1", "--clear-labels"],
            &["pools", "update", "p", "--size", "3"],
            &["pools", "list", "--limit", "1001"],
            &["pools", "list", "--all", "--page-token", "t"],
            &["pools", "get"],
            &["pools", "delete"],
            &["pools", "scaling", "p", "--interval", "2s"],
            &["pools", "scaling", "p", "--watch", "--interval", "0s"],
            &["pools", "scaling"],
            &["jobs", "create", "--name", "n"],
            &["jobs", "create", "--command", "true"],
            &["jobs", "create", "--name", "n", "--command", "true", "--env", "NOVALUE"],
            &["jobs", "create", "--name", "n", "--command", "true", "--timeout", "10"],
            &["jobs", "create", "--name", "n", "--command", "true", "--priority", "urgent"],
            &["jobs", "create", "--name", "n", "--command", "true", "--max-attempts", "-1"],
            &["jobs", "list", "--status", "done"],
            &["jobs", "list", "--status", "queued"],
            &["jobs", "list", "--created-after", "yesterday"],
            &["jobs", "list", "--all", "--page-token", "t"],
            &["jobs", "get"],
            &["jobs", "cancel"],
            &["jobs", "retry"],
            &["deploy", "create", "api", "v1"],
            &["deploy", "create", "api", "--env", "staging"],
            &["deploy", "create", "api", "v1", "--env", "staging", "--var", "A=1"],
            &["deploy", "create", "api", "v1", "--env", "staging", "--workdir", "/"],
            &["deploy", "create", "api", "v1", "--env", "staging", "--label", "os=linux"],
            &["deploy", "create", "api", "v1", "--env", "staging", "--timeout", "1m"],
            &["deploy", "create", "api", "v1", "--env", "staging", "--max-attempts", "2"],
            &["deploy", "create", "api", "v1", "--env", "s", "--command", "x", "--script-file", "f"],
            &["deploy", "create", "api", "v1", "--env", "s", "--command", "x", "--var", "NOVALUE"],
            &["deploy", "create", "api", "v1", "--env", "s", "--command", "x", "--label", "=v"],
            &["deploy", "create", "api", "v1", "--env", "s", "--command", "x", "--timeout", "10"],
            &["deploy", "create", "api", "v1", "--env", "s", "--command", "x", "--max-attempts", "-1"],
            &["deploy", "create", "api", "v1", "--env", "s", "--command", "x", "--env-var", "A=1"],
            &["deploy", "create", "api", "v1", "-e"],
            &["deploy", "get"],
            &["deploy", "list"],
            &["deploy", "list", "api", "--page-size", "0"],
            &["deploy", "list", "api", "--all", "--page-token", "t"],
            &["deploy", "promote"],
            &["deploy", "promote", "api/1", "--to", "production"],
            &["deploy", "rollback", "api"],
            &["deploy", "rollback", "--env", "production"],
            &["deploy", "history"],
            &["deploy", "history", "api", "--limit", "1001"],
            &["deploy", "status", "api"],
            &["envs", "put", "staging"],
            &["envs", "put", "--pool", "linux"],
            &["envs", "put", "staging", "--pool", "linux", "--auto-rollback", "yes"],
            &["envs", "list", "extra"],
            &["watch", "--kind", "pool"],
            &["watch", "--kind", "job,jobs"],
            &["watch", "--kind"],
            &["watch", "--cursor"],
            &["watch", "--show-cursor", "yes"],
            &["watch", "extra"],
        ] {
            let err = parse(args).expect_err(&format!("{args:?} should fail"));
            // Exit code 2 is how clap reports bad usage.
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn pools_create_parses_every_flag() {
        let cli = parse(&[
            "pools",
            "create",
            "gpu",
            "--description",
            "CUDA runners",
            "--min",
            "1",
            "--max",
            "10",
            "--desired",
            "3",
            "--label",
            "gpu=a100",
            "--label",
            "arch=x86",
        ])
        .expect("parses");
        let Command::Pools(PoolsCommand::Create(c)) = cli.command else {
            panic!("not pools create: {:?}", cli.command);
        };
        assert_eq!(c.name, "gpu");
        assert_eq!(c.description.as_deref(), Some("CUDA runners"));
        assert_eq!((c.min, c.max, c.desired), (Some(1), Some(10), Some(3)));
        assert_eq!(c.labels, [("gpu".into(), "a100".into()), ("arch".into(), "x86".into())]);

        let cli = parse(&["pools", "create", "bare"]).expect("parses");
        let Command::Pools(PoolsCommand::Create(c)) = cli.command else {
            panic!("not pools create");
        };
        assert_eq!((c.description, c.min, c.max, c.desired), (None, None, None, None));
        assert!(c.labels.is_empty());
    }

    #[test]
    fn pools_update_needs_at_least_one_field_flag() {
        let err = parse(&["pools", "update", "gpu"]).expect_err("no fields");
        assert_eq!(err.exit_code(), 2);
        for flags in [
            &["--description", ""][..],
            &["--min", "0"],
            &["--max", "5"],
            &["--desired", "2"],
            &["--label", "a=b"],
            &["--clear-labels"],
        ] {
            let args: Vec<&str> = ["pools", "update", "gpu"].iter().chain(flags).copied().collect();
            let cli = parse(&args).unwrap_or_else(|e| panic!("{flags:?}: {e}"));
            assert!(matches!(cli.command, Command::Pools(PoolsCommand::Update(_))), "{flags:?}");
        }
    }

    #[test]
    fn pools_list_get_delete_and_scaling_parse() {
        let cli = parse(&["pools", "list", "--limit", "5", "--all"]).expect("parses");
        let Command::Pools(PoolsCommand::List(page)) = cli.command else {
            panic!("not pools list");
        };
        assert_eq!((page.limit, page.all), (Some(5), true));
        let cli = parse(&["pools", "get", "gpu", "--output", "json"]).expect("parses");
        assert!(matches!(cli.command, Command::Pools(PoolsCommand::Get { ref name }) if name == "gpu"));
        assert_eq!(cli.global.output, OutputFormat::Json);
        let cli = parse(&["pools", "delete", "gpu"]).expect("parses");
        assert!(matches!(cli.command, Command::Pools(PoolsCommand::Delete { ref name }) if name == "gpu"));

        let cli = parse(&["pools", "scaling", "gpu"]).expect("parses");
        let Command::Pools(PoolsCommand::Scaling(s)) = cli.command else {
            panic!("not pools scaling");
        };
        assert!(!s.watch);
        assert_eq!(s.interval, Duration::from_secs(2));
        let cli = parse(&["pools", "scaling", "gpu", "--watch", "--interval", "500ms"]).expect("parses");
        let Command::Pools(PoolsCommand::Scaling(s)) = cli.command else {
            panic!("not pools scaling");
        };
        assert!(s.watch);
        assert_eq!(s.interval, Duration::from_millis(500));
    }

    #[test]
    fn agents_commands_parse() {
        for args in [
            &["agents", "get", "a-1"][..],
            &["agents", "cordon", "a-1", "--reason", "disk"],
            &["agents", "uncordon", "a-1"],
            &["agents", "drain", "a-1", "--reason", "upgrade"],
            &["agents", "deregister", "a-1"],
            &["agents", "list", "--pool", "gpu", "--health", "degraded,unhealthy", "--label", "os=linux"],
        ] {
            let cli = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert!(matches!(cli.command, Command::Agents(_)), "{args:?}");
        }
    }

    #[test]
    fn jobs_create_parses_every_flag() {
        let cli = parse(&[
            "jobs",
            "create",
            "--name",
            "build",
            "--command",
            "make test",
            "--env",
            "CI=1",
            "--env",
            "OPTS=a=b",
            "--workdir",
            "/src",
            "--pool",
            "linux",
            "--require-label",
            "arch=arm64",
            "--priority",
            "high",
            "--timeout",
            "10m",
            "--max-attempts",
            "5",
            "--requested-by",
            "ann",
            "--idempotency-key",
            "k1",
            "--wait",
        ])
        .expect("parses");
        let Command::Jobs(JobsCommand::Create(c)) = cli.command else {
            panic!("not jobs create: {:?}", cli.command);
        };
        assert_eq!((c.name.as_str(), c.command.as_str()), ("build", "make test"));
        assert_eq!(c.env, [("CI".into(), "1".into()), ("OPTS".into(), "a=b".into())]);
        assert_eq!(c.workdir.as_deref(), Some("/src"));
        assert_eq!(c.pool.as_deref(), Some("linux"));
        assert_eq!(c.require_labels, [("arch".into(), "arm64".into())]);
        assert_eq!(c.priority, Some(Priority::High));
        assert_eq!(c.timeout, Some(Duration::from_secs(600)));
        assert_eq!(c.max_attempts, Some(5));
        assert_eq!(c.requested_by.as_deref(), Some("ann"));
        assert_eq!(c.idempotency_key.as_deref(), Some("k1"));
        assert!(c.wait);
    }

    #[test]
    fn jobs_list_cancel_and_retry_parse() {
        let cli = parse(&[
            "jobs",
            "list",
            "--status",
            "pending,running",
            "--status",
            "success",
            "--pool",
            "gpu",
            "--requested-by",
            "ann",
            "--created-after",
            "-1h",
            "--created-before",
            "2030-01-02T03:04:05Z",
            "--limit",
            "5",
            "--all",
        ])
        .expect("parses");
        let Command::Jobs(JobsCommand::List(l)) = cli.command else {
            panic!("not jobs list");
        };
        assert_eq!(l.statuses, [JobStatus::Pending, JobStatus::Running, JobStatus::Success]);
        assert_eq!((l.pool.as_deref(), l.requested_by.as_deref()), (Some("gpu"), Some("ann")));
        assert!(l.created_after.is_some_and(|t| t < SystemTime::now()));
        assert!(l.created_before.is_some());
        assert_eq!((l.page.limit, l.page.all), (Some(5), true));

        let cli =
            parse(&["jobs", "cancel", "j-1", "--reason", "wrong branch", "--requested-by", "bob"]).expect("parses");
        let Command::Jobs(JobsCommand::Cancel { id, reason, requested_by }) = cli.command else {
            panic!("not jobs cancel");
        };
        assert_eq!(
            (id.as_str(), reason.as_deref(), requested_by.as_deref()),
            ("j-1", Some("wrong branch"), Some("bob"))
        );
        let cli = parse(&["jobs", "retry", "j-1", "--wait", "--idempotency-key", "k"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Jobs(JobsCommand::Retry { ref id, requested_by: None, idempotency_key: Some(ref key), wait: true })
                if id == "j-1" && key == "k"
        ));
        let cli = parse(&["jobs", "get", "j-1", "--output", "json"]).expect("parses");
        assert!(matches!(cli.command, Command::Jobs(JobsCommand::Get { ref id }) if id == "j-1"));
    }

    #[test]
    fn deploy_create_parses_every_flag() {
        let cli = parse(&[
            "deploy",
            "create",
            "api",
            "v1.2.3",
            "--env",
            "staging",
            "--command",
            "./deploy.sh",
            "--var",
            "REGION=eu",
            "--var",
            "OPTS=a=b",
            "--workdir",
            "/srv",
            "--label",
            "arch=arm64",
            "--timeout",
            "10m",
            "--max-attempts",
            "2",
            "--requested-by",
            "ann",
            "--reason",
            "release train",
            "--wait",
        ])
        .expect("parses");
        let Command::Deploy(DeployCommand::Create(c)) = cli.command else {
            panic!("not deploy create: {:?}", cli.command);
        };
        assert_eq!((c.service.as_str(), c.version.as_str(), c.environment.as_str()), ("api", "v1.2.3", "staging"));
        assert_eq!((c.command.as_deref(), c.script_file), (Some("./deploy.sh"), None));
        assert_eq!(c.vars, [("REGION".into(), "eu".into()), ("OPTS".into(), "a=b".into())]);
        assert_eq!(c.workdir.as_deref(), Some("/srv"));
        assert_eq!(c.labels, [("arch".into(), "arm64".into())]);
        assert_eq!(c.timeout, Some(Duration::from_secs(600)));
        assert_eq!(c.max_attempts, Some(2));
        assert_eq!((c.requested_by.as_deref(), c.reason.as_deref()), (Some("ann"), Some("release train")));
        assert!(c.wait);

        // A stored release: no rollout flags; -e and --environment name the
        // environment too; a script file instead of a command.
        for env_flag in ["--env", "-e", "--environment"] {
            let cli = parse(&["deploy", "create", "api", "v1", env_flag, "prod"]).expect("parses");
            let Command::Deploy(DeployCommand::Create(c)) = cli.command else {
                panic!("not deploy create");
            };
            assert_eq!(c.environment, "prod", "{env_flag}");
            assert!(c.command.is_none() && c.script_file.is_none() && c.vars.is_empty() && !c.wait);
        }
        let cli = parse(&["deploy", "create", "api", "v1", "--env", "prod", "--script-file", "-", "--var", "A=1"])
            .expect("parses");
        let Command::Deploy(DeployCommand::Create(c)) = cli.command else {
            panic!("not deploy create");
        };
        assert_eq!(c.script_file.as_deref(), Some(std::path::Path::new("-")));
        assert_eq!(c.vars.len(), 1);
    }

    #[test]
    fn deploy_and_envs_commands_parse() {
        let cli = parse(&["deploy", "get", "api/0192", "--output", "json"]).expect("parses");
        assert!(matches!(cli.command, Command::Deploy(DeployCommand::Get { ref id }) if id == "api/0192"));
        assert_eq!(cli.global.output, OutputFormat::Json);

        let cli = parse(&["deploy", "list", "api", "--env", "staging", "--page-size", "5", "--page-token", "t"])
            .expect("parses");
        let Command::Deploy(DeployCommand::List(l)) = cli.command else {
            panic!("not deploy list");
        };
        assert_eq!((l.service.as_str(), l.environment.as_deref()), ("api", Some("staging")));
        assert_eq!((l.page.limit, l.page.page_token.as_deref(), l.page.all), (Some(5), Some("t"), false));
        let cli = parse(&["deploy", "list", "api", "--limit", "7", "--all"]).expect("parses");
        let Command::Deploy(DeployCommand::List(l)) = cli.command else {
            panic!("not deploy list");
        };
        assert_eq!((l.environment, l.page.limit, l.page.all), (None, Some(7), true));

        let cli = parse(&["deploy", "promote", "api/1", "--reason", "green", "--requested-by", "bob", "--wait"])
            .expect("parses");
        let Command::Deploy(DeployCommand::Promote { id, reason, requested_by, wait }) = cli.command else {
            panic!("not deploy promote");
        };
        assert_eq!(
            (id.as_str(), reason.as_deref(), requested_by.as_deref(), wait),
            ("api/1", Some("green"), Some("bob"), true)
        );

        let cli = parse(&[
            "deploy",
            "rollback",
            "api",
            "--env",
            "production",
            "--to-version",
            "v1",
            "--reason",
            "errors",
            "--requested-by",
            "ann",
            "--wait",
        ])
        .expect("parses");
        let Command::Deploy(DeployCommand::Rollback(r)) = cli.command else {
            panic!("not deploy rollback");
        };
        assert_eq!(
            (r.service.as_str(), r.environment.as_str(), r.to_version.as_deref()),
            ("api", "production", Some("v1"))
        );
        assert_eq!((r.reason.as_deref(), r.requested_by.as_deref(), r.wait), (Some("errors"), Some("ann"), true));

        let cli = parse(&["deploy", "history", "api", "-e", "staging", "--deployment", "api/1"]).expect("parses");
        let Command::Deploy(DeployCommand::History(h)) = cli.command else {
            panic!("not deploy history");
        };
        assert_eq!(
            (h.service.as_str(), h.environment.as_deref(), h.deployment.as_deref()),
            ("api", Some("staging"), Some("api/1"))
        );
        let cli = parse(&["deploy", "history", "api"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Deploy(DeployCommand::History(DeploymentHistoryArgs { environment: None, deployment: None, .. }))
        ));

        let cli =
            parse(&["envs", "put", "staging", "--pool", "linux", "--promote-to", "production", "--auto-rollback"])
                .expect("parses");
        let Command::Envs(EnvsCommand::Put(p)) = cli.command else {
            panic!("not envs put");
        };
        assert_eq!(
            (p.name.as_str(), p.pool.as_str(), p.promote_to.as_deref()),
            ("staging", "linux", Some("production"))
        );
        assert!(p.auto_rollback);
        let cli = parse(&["envs", "put", "production", "--pool", "linux"]).expect("parses");
        let Command::Envs(EnvsCommand::Put(p)) = cli.command else {
            panic!("not envs put");
        };
        assert_eq!((p.promote_to, p.auto_rollback), (None, false));
        let cli = parse(&["envs", "list", "--output", "json"]).expect("parses");
        assert!(matches!(cli.command, Command::Envs(EnvsCommand::List)));
    }

    #[test]
    fn watch_parses_kinds_cursor_and_show_cursor() {
        let cli = parse(&["watch", "--kind", "job", "--kind", "agent,deployment", "--cursor", "c1", "--show-cursor"])
            .expect("parses");
        let Command::Watch(w) = cli.command else {
            panic!("not watch: {:?}", cli.command);
        };
        assert_eq!(w.kinds, [WatchKind::Job, WatchKind::Agent, WatchKind::Deployment]);
        assert_eq!((w.cursor.as_deref(), w.show_cursor), (Some("c1"), true));

        let cli = parse(&["watch", "--output", "json"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Watch(WatchArgs { ref kinds, cursor: None, show_cursor: false }) if kinds.is_empty()
        ));
        assert_eq!(cli.global.output, OutputFormat::Json);
    }

    #[test]
    fn a_bad_watch_kind_names_the_possible_values() {
        let err = parse(&["watch", "--kind", "pool"]).expect_err("not a kind");
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
        let text = err.to_string();
        assert!(text.contains("'pool'") && text.contains("job, deployment, agent"), "{text}");
    }

    #[test]
    fn states_accept_commas_and_repeats() {
        let cli = parse(&["queue", "list", "--state", "queued,running", "--state", "dead-lettered"]).expect("parses");
        let Command::Queue(QueueCommand::List(l)) = cli.command else {
            panic!("not list");
        };
        assert_eq!(l.states, vec![QueuedJobState::Queued, QueuedJobState::Running, QueuedJobState::DeadLettered]);
    }
}
