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
    /// The Tether server's URL. Give several replicas of one deployment
    /// (repeat the flag, or separate URLs with commas, also in the
    /// environment variable) to fail over between them: each reconnect goes
    /// to the next one, round robin, and running jobs resume there.
    #[arg(
        long = "server",
        value_name = "URL",
        env = "TETHER_SERVER",
        value_delimiter = ',',
        value_parser = parse_server,
        default_value = "http://127.0.0.1:50051"
    )]
    servers: Vec<String>,
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

fn parse_server(s: &str) -> Result<String, String> {
    match s.trim() {
        "" => Err("empty server URL".to_owned()),
        url => Ok(url.to_owned()),
    }
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
        credential: args.credential,
        name,
        pool: args.pool,
        labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
        slots: args.slots,
        version: concat!("tether-agent/", env!("CARGO_PKG_VERSION")).to_owned(),
        ..AgentConfig::default()
    }
    .with_servers(args.servers);
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

    #[test]
    fn servers_repeat_and_split_on_commas() {
        let parse = |argv: &[&str]| Args::try_parse_from(argv).map(|a| a.servers);
        assert_eq!(parse(&["tether-agent"]).expect("default"), ["http://127.0.0.1:50051"]);
        assert_eq!(
            parse(&["tether-agent", "--server", "http://a:1, http://b:1", "--server", "http://c:1"]).expect("list"),
            ["http://a:1", "http://b:1", "http://c:1"]
        );
        assert!(parse(&["tether-agent", "--server", "http://a:1,,http://b:1"]).is_err());
    }
}
