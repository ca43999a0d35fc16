//! The reference Tether agent: runs each job's payload as a shell command.
//!
//! SIGTERM or SIGINT drains (finish running jobs, then exit 0); a second
//! signal kills the running commands and exits at once.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use tether_agent_sdk::shell::{kill_all_process_groups, ShellHandler};
use tether_agent_sdk::{Agent, AgentConfig};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// Runs Tether jobs as shell commands.
#[derive(Debug, Parser)]
#[command(name = "tether-agent", version)]
struct Args {
    /// The Tether server.
    #[arg(long, env = "TETHER_SERVER", default_value = "http://127.0.0.1:50051")]
    server: String,
    /// The agent's name, unique within its pool [default: the host name].
    #[arg(long, env = "TETHER_AGENT_NAME")]
    name: Option<String>,
    /// The pool to serve.
    #[arg(long, env = "TETHER_AGENT_POOL", default_value = "default")]
    pool: String,
    /// A label `key=value`; repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Jobs run at once.
    #[arg(long, env = "TETHER_AGENT_SLOTS", default_value_t = 1)]
    slots: u32,
    /// Join token or agent token.
    #[arg(long, env = "TETHER_AGENT_CREDENTIAL", hide_env_values = true)]
    credential: Option<String>,
    /// Log output format.
    #[arg(long, value_enum, default_value = "human")]
    log_format: LogFormat,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("label {s:?} is not key=value")),
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

// mimalloc: the job path allocates many small objects; glibc malloc's
// consolidation showed up at ~10% of CPU in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(args.log_format);

    let name = args.name.or_else(sysinfo::System::host_name).unwrap_or_else(|| "tether-agent".to_owned());
    let config = AgentConfig {
        server: args.server,
        credential: args.credential,
        name,
        pool: args.pool,
        labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
        slots: args.slots,
        version: concat!("tether-agent/", env!("CARGO_PKG_VERSION")).to_owned(),
        ..AgentConfig::default()
    };
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let (first_signal, shutdown) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("signal received: draining (signal again to exit at once)");
        let _ = first_signal.send(());
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: killing running jobs and exiting");
        kill_all_process_groups();
        std::process::exit(130);
    });

    let agent = Agent::new(config, ShellHandler::default());
    match agent
        .run(async {
            let _ = shutdown.await;
        })
        .await
    {
        Ok(()) => {
            tracing::info!("drained; bye");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "agent stopped");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_defaults_parse() {
        let args = Args::try_parse_from(["tether-agent", "--label", "gpu=a100", "--label", "zone=eu=1"]).expect("args");
        assert_eq!(args.labels, vec![("gpu".into(), "a100".into()), ("zone".into(), "eu=1".into())]);
        assert_eq!(args.slots, 1);
        assert_eq!(args.pool, "default");
        assert!(Args::try_parse_from(["tether-agent", "--label", "novalue"]).is_err());
    }
}
