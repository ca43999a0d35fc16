//! `tether`: runs the control plane server (`tether server`) and the
//! operator CLI (`tether queue …`, `tether jobs …`, `tether agents …`, `tether pools …`).

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tether_server::capacity;
use tether_server::clock::SystemClock;
use tether_server::cluster::ClusterConfig;
use tether_server::config::{DynamoArgs, LogFormat, ServerArgs, StoreKind};
use tether_server::secrets::SecretsKey;
use tether_server::server::{serve, Operability, ServerParts};
use tether_server::store::dynamodb::{tables, DynamoStore};
use tether_server::store::embedded::EmbeddedStore;
use tether_server::store::membership::Membership;
use tether_server::store::{RecordOrder, Store};

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
    /// Run the control plane server (embedded store by default, or DynamoDB).
    Server(ServerArgs),
    /// Set up or remove the DynamoDB tables of `tether server --store dynamodb`.
    Dynamodb {
        #[command(subcommand)]
        command: DynamoCommand,
    },
    /// Print a shell completion script (e.g. `tether completions bash > /etc/bash_completion.d/tether`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    #[command(flatten)]
    Client(tether_cli::Command),
}

#[derive(Subcommand)]
enum DynamoCommand {
    /// Create every table the server needs (on-demand billing) and wait until
    /// they are active; tables that exist are left as they are.
    CreateTables(DynamoArgs),
    /// Delete every table under the prefix, with all their data.
    DeleteTables {
        #[command(flatten)]
        args: DynamoArgs,
        /// Confirm: the data cannot be recovered.
        #[arg(long)]
        yes: bool,
    },
}

async fn run_dynamodb(command: DynamoCommand) -> anyhow::Result<()> {
    match command {
        DynamoCommand::CreateTables(args) => {
            let client = DynamoStore::client(&args.dynamo_config()).await;
            let names = tables::TableNames::new(&args.dynamodb_table_prefix);
            let created = tables::create_tables(&client, &names).await?;
            for name in &created {
                println!("created {name}");
            }
            if created.is_empty() {
                println!("every table under prefix {:?} exists already", args.dynamodb_table_prefix);
            }
            Ok(())
        }
        DynamoCommand::DeleteTables { args, yes } => {
            if !yes {
                anyhow::bail!(
                    "this deletes every table under prefix {:?} and its data; pass --yes",
                    args.dynamodb_table_prefix
                );
            }
            let client = DynamoStore::client(&args.dynamo_config()).await;
            tables::delete_tables(&client, &tables::TableNames::new(&args.dynamodb_table_prefix)).await?;
            println!("deleted the tables under prefix {:?}", args.dynamodb_table_prefix);
            Ok(())
        }
    }
}

/// The server's store and, for a store replicas share, their membership.
type OpenedStore = (Arc<dyn Store>, Option<Arc<dyn Membership>>);

async fn open_store(args: &ServerArgs) -> anyhow::Result<OpenedStore> {
    match args.store {
        StoreKind::Embedded => {
            let store = EmbeddedStore::open(&args.data_dir, args.store_options())
                .with_context(|| format!("opening the store in {}", args.data_dir.display()))?;
            tracing::info!(path = %store.path().display(), "embedded store open");
            Ok((Arc::new(store), None))
        }
        StoreKind::Dynamodb => {
            let config = args.dynamodb.dynamo_config();
            let store = DynamoStore::connect(&config)
                .await
                .context("connecting to DynamoDB")?
                .with_event_retention(args.event_retention);
            // Shared: any number of replicas may serve from these tables.
            tracing::info!(prefix = %config.table_prefix, endpoint = ?config.endpoint, "DynamoDB store open (shared by replicas)");
            let store = Arc::new(store);
            Ok((store.clone(), Some(store)))
        }
    }
}

/// The secrets key: the file given, or the embedded store's own (made on
/// first start, never over a store that holds sealed secrets: they would
/// no longer open); none on DynamoDB unless given.
async fn secrets_key(args: &ServerArgs, store: &dyn Store) -> anyhow::Result<Option<Arc<SecretsKey>>> {
    let (path, create) = match (&args.secrets_key_file, args.store) {
        (Some(path), _) => (path.clone(), false),
        (None, StoreKind::Embedded) => (args.data_dir.join("secrets.key"), true),
        (None, StoreKind::Dynamodb) => {
            tracing::info!("no --secrets-key-file: jobs with secrets are refused");
            return Ok(None);
        }
    };
    if create && !path.exists() {
        let sealed = store
            .list_records(tether_server::secrets::COLLECTION, RecordOrder::Ascending, None, 1)
            .await
            .context("looking for sealed secrets")?;
        if !sealed.is_empty() {
            anyhow::bail!(
                "{} is missing but the store holds sealed secrets, which only that key opens: restore it (or name it \
                 with --secrets-key-file)",
                path.display()
            );
        }
    }
    Ok(Some(Arc::new(SecretsKey::load(&path, create)?)))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TETHER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: piped or collected logs get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Panics go to the log (JSON when asked), not only to stderr.
fn install_panic_log() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(%location, panic = %payload, "panic");
        default(info);
    }));
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
    if args.print_config {
        print!("{}", args.to_toml()?);
        return Ok(());
    }
    init_logging(args.log_format);
    install_panic_log();
    // Every agent holds one connection: take every descriptor allowed.
    let open_files = match tether_server::listener::raise_fd_limit() {
        Ok(limit) => Some(limit.soft),
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            tether_server::listener::fd_limit().map(|l| l.soft)
        }
    };
    let max_agent_streams = match args.max_agent_streams {
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => capacity::default_max_agent_streams(open_files, capacity::memory_bytes()),
    };
    tracing::info!(
        open_file_limit = ?open_files,
        max_agent_streams,
        "agent capacity (one connection and ~64 KiB each)"
    );
    let (store, membership) = open_store(&args).await?;
    let secrets = secrets_key(&args, store.as_ref()).await?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let metrics_listener = match args.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening for metrics on {addr}"))?,
        ),
        None => None,
    };
    let cluster = match membership {
        Some(membership) => Some(ClusterConfig::new(membership, args.advertise(listener.local_addr()?)?)),
        None => None,
    };
    let parts = ServerParts {
        store,
        clock: Arc::new(SystemClock),
        engine: args.engine_config(),
        max_agent_streams,
        ops: Operability { metrics_listener, cors_allow_origins: args.cors_allow_origins.clone() },
        cluster,
        secrets,
    };
    serve(listener, parts, shutdown_signal()).await
}

// mimalloc: the job path allocates many small objects; glibc malloc's
// consolidation showed up at ~10% of CPU in profiles.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Top::Server(_) => {
            let Some(server_matches) = matches.subcommand_matches("server") else {
                eprintln!("error: the server subcommand's arguments are missing");
                return ExitCode::FAILURE;
            };
            match tether_server::config::load(server_matches) {
                Ok(args) => match run_server(args).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        ExitCode::FAILURE
                    }
                },
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Top::Dynamodb { command } => {
            init_logging(LogFormat::Human);
            match run_dynamodb(command).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Top::Completions { shell } => {
            // Generated into memory: clap_complete panics on a failed write.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tether", &mut script);
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        }
        Top::Client(command) => match tether_cli::run(&cli.global, command).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
