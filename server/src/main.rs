//! `tether`: runs the control plane server (`tether server`) and the
//! operator CLI (`tether queue …`, `tether agents …`, `tether pools …`).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tether_server::clock::SystemClock;
use tether_server::config::{LogFormat, ServerArgs};
use tether_server::server::{serve, ServerParts};
use tether_server::store::embedded::EmbeddedStore;

#[derive(Parser)]
#[command(name = "tether", version, about = "Tether: run jobs on a fleet of agents")]
struct Cli {
    #[command(flatten)]
    global: tether_cli::GlobalArgs,
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Run the control plane server on the embedded store.
    Server(ServerArgs),
    #[command(flatten)]
    Client(tether_cli::Command),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TETHER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn run_server(args: ServerArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let store = EmbeddedStore::open(&args.data_dir, args.store_options())
        .with_context(|| format!("opening the store in {}", args.data_dir.display()))?;
    tracing::info!(path = %store.path().display(), "embedded store open");
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let parts = ServerParts {
        store: Arc::new(store),
        clock: Arc::new(SystemClock),
        engine: args.engine_config(),
        max_agent_streams: args.max_agent_streams,
    };
    serve(listener, parts, shutdown_signal()).await
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Top::Server(args) => match run_server(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Top::Client(command) => match tether_cli::run(&cli.global, command).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
