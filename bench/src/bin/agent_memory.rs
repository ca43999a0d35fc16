//! How much server memory one connected agent costs: starts a `tether
//! server` process, connects N agents (one TCP connection and one Connect
//! stream each, as real agents hold), and reads the server's resident set
//! size before and after. Prints one JSON object per run and the median.
//!
//! `cargo run --release -p tether-bench --bin tether-agent-memory-bench -- --agents 2000 --runs 3`

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::Parser;
use tether::v1 as pb;
use tether::v1::agent_service_client::AgentServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

#[derive(Parser)]
struct Args {
    /// The `tether` binary to measure [default: next to this one].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Agents to connect per run.
    #[arg(long, default_value_t = 2000)]
    agents: usize,
    /// Runs; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading /proc status")?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or_else(|| anyhow!("no VmRSS"))?;
    let kib: u64 = line.split_whitespace().nth(1).ok_or_else(|| anyhow!("bad VmRSS"))?.parse()?;
    Ok(kib * 1024)
}

struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn start_server(bin: &PathBuf, agents: usize) -> anyhow::Result<Server> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let child = Command::new(bin)
        .args(["server", "--listen", &format!("127.0.0.1:{port}"), "--max-agent-streams", &(agents + 10).to_string()])
        .arg("--data-dir")
        .arg(dir.path())
        .env("TETHER_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let server = Server { child, url: format!("http://127.0.0.1:{port}"), _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = Endpoint::from_shared(server.url.clone())?.connect().await {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            if health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.is_ok() {
                return Ok(server);
            }
        }
        if Instant::now() > deadline {
            bail!("the server did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One connected agent: its outbound sender and inbound stream, kept open.
type Held = (mpsc::Sender<pb::ConnectRequest>, tonic::Streaming<pb::ConnectResponse>);

async fn connect_agent(url: &str, i: usize) -> anyhow::Result<Held> {
    let channel = Endpoint::from_shared(url.to_string())?.connect().await?;
    let (tx, rx) = mpsc::channel(4);
    let hello = pb::Hello {
        name: format!("mem-{i}"),
        pool: "default".into(),
        slots: 4,
        version: "bench".into(),
        min_protocol_version: 1,
        max_protocol_version: 2,
        ..Default::default()
    };
    tx.send(pb::ConnectRequest { message: Some(pb::connect_request::Message::Hello(hello)) }).await?;
    let mut inbound = AgentServiceClient::new(channel).connect(ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await?.and_then(|m| m.message) {
        Some(pb::connect_response::Message::Welcome(_)) => Ok((tx, inbound)),
        other => bail!("expected a welcome, got {other:?}"),
    }
}

async fn run(bin: &PathBuf, agents: usize) -> anyhow::Result<(u64, u64)> {
    let server = start_server(bin, agents).await?;
    let pid = server.child.id();
    // One agent first, so what every process pays once (the first
    // connection's buffers, the agent table) is in the baseline.
    let first = connect_agent(&server.url, usize::MAX).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_bytes(pid)?;
    let mut held = Vec::with_capacity(agents);
    for chunk in (0..agents).collect::<Vec<_>>().chunks(100) {
        let connects = chunk.iter().map(|&i| connect_agent(&server.url, i));
        for agent in futures::future::join_all(connects).await {
            held.push(agent?);
        }
    }
    // Let the server settle (welcomes written, first heartbeat checks armed).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes(pid)?;
    drop((held, first));
    Ok((before, after))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = match args.server_bin {
        Some(bin) => bin,
        None => std::env::current_exe()?.with_file_name("tether"),
    };
    // The bench holds one connection per agent too.
    let _ = tether_server::listener::raise_fd_limit();
    let mut per_agent = Vec::new();
    for run_no in 0..args.runs {
        let (before, after) = run(&bin, args.agents).await?;
        let bytes = after.saturating_sub(before) / args.agents as u64;
        println!(
            "{}",
            serde_json::json!({ "run": run_no, "agents": args.agents, "rss_before": before, "rss_after": after, "bytes_per_agent": bytes })
        );
        per_agent.push(bytes);
    }
    per_agent.sort_unstable();
    let median = per_agent[per_agent.len() / 2];
    println!("{}", serde_json::json!({ "agents": args.agents, "runs": args.runs, "median_bytes_per_agent": median }));
    Ok(())
}
