//! The `tether server` process itself: under a small open-file limit it
//! raises its soft limit to the hard one at start-up, and once more clients
//! connect than it has descriptors for, it backs off (logging it) instead
//! of spinning, and serves again as soon as descriptors are free; a second
//! server on the same data directory is refused with a clear error.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const WAIT: Duration = Duration::from_secs(60);

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines the server writes to stderr, as they come.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a line containing `needle`; returns it.
fn wait_line(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line with {needle:?}: {e}"),
        }
    }
}

async fn healthy(url: &str) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url.to_string()) else { return false };
    let Ok(channel) = endpoint.connect_timeout(Duration::from_secs(5)).timeout(Duration::from_secs(5)).connect().await
    else {
        return false;
    };
    HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.is_ok()
}

#[tokio::test]
async fn out_of_descriptors_the_server_backs_off_and_recovers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let addr = format!("127.0.0.1:{port}");
    let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
    command
        .args(["server", "--listen", &addr, "--max-agent-streams", "1000"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("TETHER_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the
    // child between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 40, rlim_max: 64 };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut server = Server(command.spawn().expect("start tether server"));
    let lines = lines_of(&mut server.0);
    let capacity = wait_line(&lines, "agent capacity");
    assert!(capacity.contains("open_file_limit=Some(64)"), "the soft limit is raised to the hard one: {capacity}");
    let url = format!("http://{addr}");
    wait_line(&lines, "tether server listening");
    assert!(healthy(&url).await, "serving before the flood");

    // More connections than descriptors: the kernel completes them (the
    // listen backlog), the server cannot accept them all.
    let mut flood = Vec::new();
    for _ in 0..100 {
        flood.push(tokio::net::TcpStream::connect(&addr).await.expect("connect"));
    }
    let warning = wait_line(&lines, "accepting connections failed; backing off");
    assert!(warning.contains("open_file_limit=Some(64)"), "{warning}");

    // Descriptors free again: the server accepts and serves.
    drop(flood);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !healthy(&url).await {
        assert!(tokio::time::Instant::now() < deadline, "the server never recovered");
    }
    assert!(server.0.try_wait().expect("status").is_none(), "the server is still running");
}

#[test]
fn a_second_server_on_one_data_directory_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let start = || {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["server", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.path())
            .env("TETHER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tether server")
    };
    let mut first = Server(start());
    let lines = lines_of(&mut first.0);
    wait_line(&lines, "tether server listening");
    let second = start().wait_with_output().expect("second server");
    assert!(!second.status.success(), "the second server must not start");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("is in use by another tether server"), "{stderr}");
    assert!(first.0.try_wait().expect("status").is_none(), "the first keeps running");
}
