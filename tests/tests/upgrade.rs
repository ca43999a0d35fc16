//! Upgrades keep data and clients: a data directory written by commit
//! 23acfb8 (`tests/fixtures/embedded-v23acfb8`, made with that release's CLI
//! and agent) opens with today's code, is migrated to the current store
//! schema version, and serves everything it held; a store stamped with a
//! newer schema version is refused, untouched, with both versions named.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{ReadableDatabase, TableDefinition};
use tether::v1 as pb;
use tether_agent_sdk::{Agent, AgentConfig, JobContext, JobResult};
use tether_server::store::embedded::{EmbeddedOptions, EmbeddedStore, SCHEMA_VERSION};
use tether_server::store::StoreError;
use tether_tests::{state, wait_until, DataDir, Options, TestServer, WAIT};

/// `store_meta`, whose layout never changes (see `store/embedded/schema.rs`).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("store_meta");

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/embedded-v23acfb8/tether.redb")
}

/// A copy of the fixture in a fresh data directory (the committed file is
/// never opened: opening migrates).
fn fixture_copy() -> DataDir {
    let dir = DataDir::new();
    std::fs::copy(fixture(), dir.path().join("tether.redb")).expect("copy the fixture");
    dir
}

fn stored_schema(dir: &Path) -> Option<(u64, String)> {
    let db = redb::Database::create(dir.join("tether.redb")).expect("open");
    let txn = db.begin_read().expect("txn");
    let meta = match txn.open_table(META) {
        Ok(meta) => meta,
        Err(redb::TableError::TableDoesNotExist(_)) => return None,
        Err(e) => panic!("store_meta: {e}"),
    };
    let version = meta.get("schema_version").expect("get").expect("a version");
    let version = u64::from_le_bytes(version.value().try_into().expect("8 bytes"));
    let written_by = meta.get("written_by").expect("get").expect("a writer");
    Some((version, String::from_utf8_lossy(written_by.value()).into_owned()))
}

/// One fixture job as 23acfb8 left it.
struct Stored {
    id: &'static str,
    queue: &'static str,
    state: pb::QueuedJobState,
    priority: pb::Priority,
    attempt: u32,
    max_attempts: u32,
    fencing_token: u64,
    idempotency_key: &'static str,
}

const SUCCEEDED: &str = "01a24fb4-a49e-76c4-b150-b979b16e34f4";
const FAILED: &str = "01a24fb4-a4b1-747a-82bf-e60b0a58163e";
const DEAD_ONE: &str = "01a24fb4-dfb2-7b7d-814b-5e10a68cbeaa";
const DEAD_TWO: &str = "01a24fb4-dfc8-7369-aa4f-2356756aef96";
const HIGH: &str = "01a24fb4-e395-723f-b4fd-c9ea29598509";
const LOW: &str = "01a24fb4-e3a1-7451-9781-9fb433a4483a";
const CRITICAL: &str = "01a24fb4-e3af-7e39-927a-a34f866cefb7";
const LATER: &str = "01a24fb4-e3cb-7c0b-87d6-74cfca357f86";
const GPU: &str = "01a24fb4-e3e3-716e-8f8f-5fc09f5db75f";
const CANCELLED: &str = "01a24fb4-e3f6-711b-83d3-2dce83863de1";
const AGENT_ID: &str = "01a24fb4-a458-74f9-bbed-efa5caaa4e17";
/// The highest fencing token the fixture holds.
const MAX_STORED_TOKEN: u64 = 4_294_967_300;

fn fixture_jobs() -> Vec<Stored> {
    use pb::Priority as P;
    use pb::QueuedJobState as S;
    let job = |id, queue, state, priority, attempt, max_attempts, fencing_token, idempotency_key| Stored {
        id,
        queue,
        state,
        priority,
        attempt,
        max_attempts,
        fencing_token,
        idempotency_key,
    };
    vec![
        job(SUCCEEDED, "default", S::Succeeded, P::Normal, 1, 3, 4_294_967_296, "fixture-succeeded"),
        job(FAILED, "default", S::Failed, P::Normal, 1, 3, 4_294_967_297, ""),
        job(DEAD_ONE, "default", S::DeadLettered, P::Normal, 1, 1, 4_294_967_298, ""),
        job(DEAD_TWO, "reports", S::DeadLettered, P::Normal, 2, 2, MAX_STORED_TOKEN, ""),
        job(HIGH, "default", S::Queued, P::High, 0, 3, 0, "fixture-key-1"),
        job(LOW, "default", S::Queued, P::Low, 0, 3, 0, ""),
        job(CRITICAL, "reports", S::Queued, P::Critical, 0, 5, 0, ""),
        job(LATER, "default", S::Queued, P::Normal, 0, 3, 0, ""),
        job(GPU, "reports", S::Queued, P::Normal, 0, 3, 0, ""),
        job(CANCELLED, "default", S::Cancelled, P::Normal, 0, 3, 0, ""),
    ]
}

async fn get(server: &TestServer, id: &str) -> pb::QueuedJob {
    let mut q = server.queue().await;
    q.get_queued_job(pb::GetQueuedJobRequest { id: id.into() }).await.expect("get").into_inner().job.expect("job")
}

fn spawn_agent(config: AgentConfig) -> tether_agent_sdk::AgentHandle {
    let agent = Agent::new(config, |_ctx: JobContext| async { JobResult::success("after the upgrade") });
    let handle = agent.handle();
    tokio::spawn(agent.run(futures::future::pending()));
    handle
}

#[tokio::test]
async fn a_store_written_by_23acfb8_opens_migrated_and_serves_everything_it_held() {
    let dir = fixture_copy();
    assert_eq!(stored_schema(dir.path()), None, "the fixture predates schema versions");
    let store = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).expect("the old store opens");
    let server = TestServer::start(&dir, Options { store: Some(Arc::new(store)), ..Options::default() }).await;
    let mut q = server.queue().await;

    // Every job, as it was.
    for want in fixture_jobs() {
        let got = get(&server, want.id).await;
        assert_eq!(got.queue, want.queue, "{}", want.id);
        assert_eq!(state(&got), want.state, "{}", want.id);
        assert_eq!(got.priority, want.priority as i32, "{}", want.id);
        assert_eq!((got.attempt, got.max_attempts), (want.attempt, want.max_attempts), "{}", want.id);
        assert_eq!(got.fencing_token, want.fencing_token, "{}", want.id);
        assert_eq!(got.idempotency_key, want.idempotency_key, "{}", want.id);
    }
    let succeeded = get(&server, SUCCEEDED).await;
    assert_eq!(String::from_utf8_lossy(&succeeded.result).trim(), "done");
    assert_eq!(get(&server, FAILED).await.last_error, "exited with code 3");
    assert_eq!(get(&server, DEAD_TWO).await.retry_policy.map(|r| r.exit_codes), Some(vec![75]));
    let gpu = get(&server, GPU).await;
    let routing = gpu.routing.clone().expect("routing");
    assert_eq!(routing.pool, "gpu");
    assert_eq!(routing.required_labels.get("accel").map(String::as_str), Some("a100"));

    // Idempotency keys still hold: the same request returns the stored job.
    let high = get(&server, HIGH).await;
    let again = pb::EnqueueJobRequest {
        queue: high.queue.clone(),
        payload: high.payload.clone(),
        priority: high.priority,
        routing: high.routing.clone(),
        max_attempts: high.max_attempts,
        lease_duration: high.lease_duration,
        timeout: high.timeout,
        idempotency_key: "fixture-key-1".into(),
        not_before: None,
        retry_policy: high.retry_policy.clone(),
    };
    assert_eq!(again.payload.as_ref(), br#"{"command":"echo high"}"#);
    let repeated = q.enqueue_job(again).await.expect("re-enqueue").into_inner();
    assert!(!repeated.created);
    assert_eq!(repeated.job.expect("job").id, HIGH);

    // Counts.
    let stats = q.get_queue_stats(pb::GetQueueStatsRequest::default()).await.expect("stats").into_inner();
    let count = |s: pb::QueuedJobState| stats.by_state.iter().find(|c| c.state == s as i32).map_or(0, |c| c.count);
    use pb::QueuedJobState as S;
    assert_eq!(
        [S::Queued, S::Claimed, S::Running, S::Succeeded, S::Failed, S::DeadLettered, S::Cancelled].map(count),
        [5, 0, 0, 1, 1, 2, 1]
    );
    let by_priority =
        |p: pb::Priority| stats.queued_by_priority.iter().find(|c| c.priority == p as i32).map_or(0, |c| c.count);
    use pb::Priority as P;
    assert_eq!([P::Critical, P::High, P::Normal, P::Low].map(by_priority), [1, 1, 2, 1]);
    let dead = q.list_dead_letters(pb::ListDeadLettersRequest::default()).await.expect("dead letters").into_inner();
    assert_eq!(dead.jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), [DEAD_ONE, DEAD_TWO]);

    // The pool and the agent.
    let mut agents = server.agents().await;
    let pools = agents.list_agent_pools(pb::ListAgentPoolsRequest::default()).await.expect("pools").into_inner();
    let pool = pools.pools.iter().find(|p| p.name == "gpu").expect("the gpu pool");
    assert_eq!((pool.description.as_str(), pool.min_size, pool.max_size), ("fixture pool", 0, 4));
    assert_eq!(pool.default_labels.get("accel").map(String::as_str), Some("a100"));
    assert!(pools.pools.iter().any(|p| p.name == "default"));
    let agent = agents.get_agent(pb::GetAgentRequest { id: AGENT_ID.into() }).await.expect("agent").into_inner();
    let agent = agent.agent.expect("the fixture agent");
    assert_eq!((agent.name.as_str(), agent.pool.as_str(), agent.slots), ("fixture-agent", "default", 2));
    assert_eq!(agent.labels.get("os").map(String::as_str), Some("linux"));
    assert!(!agent.connected);

    // New agents run the queued jobs (all but the one held until 2099), with
    // fencing tokens above every stored one.
    let default_agent = spawn_agent(AgentConfig::new(server.url.clone(), "after-upgrade").with_slots(2));
    let gpu_agent = spawn_agent(
        AgentConfig::new(server.url.clone(), "after-upgrade-gpu").with_pool("gpu").with_label("accel", "a100"),
    );
    for handle in [&default_agent, &gpu_agent] {
        tokio::time::timeout(WAIT, handle.wait_connected()).await.expect("in time").expect("connected");
    }
    for id in [HIGH, LOW, CRITICAL, GPU] {
        wait_until(&format!("{id} to succeed"), || async {
            state(&get(&server, id).await) == pb::QueuedJobState::Succeeded
        })
        .await;
        let done = get(&server, id).await;
        assert_eq!(done.attempt, 1, "{id}");
        assert!(done.fencing_token > MAX_STORED_TOKEN, "{id}: token {} after {MAX_STORED_TOKEN}", done.fencing_token);
        assert_eq!(done.result.as_ref(), b"after the upgrade");
    }
    assert_eq!(state(&get(&server, LATER).await), pb::QueuedJobState::Queued);
    let stats = q.get_queue_stats(pb::GetQueueStatsRequest::default()).await.expect("stats").into_inner();
    let count = |s: pb::QueuedJobState| stats.by_state.iter().find(|c| c.state == s as i32).map_or(0, |c| c.count);
    assert_eq!([S::Queued, S::Succeeded].map(count), [1, 5]);

    server.stop().await;
    let (version, written_by) = stored_schema(dir.path()).expect("stamped");
    assert_eq!(version, SCHEMA_VERSION);
    assert_eq!(written_by, tether_server::store::embedded::RELEASE);
}

#[test]
fn a_store_of_a_newer_schema_version_is_refused_through_the_rust_api() {
    let dir = fixture_copy();
    {
        let db = redb::Database::create(dir.path().join("tether.redb")).expect("open");
        let txn = db.begin_write().expect("txn");
        {
            let mut meta = txn.open_table(META).expect("meta");
            meta.insert("schema_version", (SCHEMA_VERSION + 1).to_le_bytes().as_slice()).expect("insert");
            meta.insert("written_by", b"tether 99.0.0".as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let err = EmbeddedStore::open(dir.path(), EmbeddedOptions::default()).err().expect("refused");
    assert!(
        matches!(&err, StoreError::NewerSchema { found, supported, .. } if *found == SCHEMA_VERSION + 1 && *supported == SCHEMA_VERSION),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains(&format!("holds store schema version {}", SCHEMA_VERSION + 1)), "{message}");
    assert!(message.contains(&format!("up to {SCHEMA_VERSION}")), "{message}");
    assert!(message.contains("tether 99.0.0") && message.contains("run a newer tether"), "{message}");
    assert_eq!(stored_schema(dir.path()), Some((SCHEMA_VERSION + 1, "tether 99.0.0".into())), "left as it was");
}
