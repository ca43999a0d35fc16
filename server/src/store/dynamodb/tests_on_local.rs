//! The DynamoDB store on DynamoDB Local: the conformance suite, writers on
//! two handles racing, and faults injected around the SDK client.

use std::sync::Arc;

use super::faults::{Fault, FaultLayer};
use super::{local, tables, DynamoStore, TableNames};
use crate::domain::{Job, JobState};
use crate::store::conformance::job;
use crate::store::{JobFilter, Store, StoreError, Write, WriteOutcome};

mod conformance_suite {
    crate::store_conformance_suite!(|case: &'static str| async move { (super::local::fresh_store(case).await, ()) });
}

fn next(job: &Job, state: JobState, worker: &str) -> Job {
    let mut n = job.clone();
    n.state = state;
    n.version += 1;
    n.worker_id = worker.to_string();
    n
}

async fn one(store: &DynamoStore, write: Write) -> WriteOutcome {
    let mut outcomes = store.write(vec![write]).await.expect("write");
    outcomes.remove(0)
}

/// A second handle on the same tables: another client, as another replica
/// would hold.
fn twin(store: &DynamoStore) -> DynamoStore {
    let prefix = store.tables().jobs.trim_end_matches(tables::JOBS).to_string();
    DynamoStore::with_client(local::client(), &prefix)
}

/// The counts agree with the jobs' stored states.
async fn assert_counts_match(store: &DynamoStore, jobs: usize) {
    let counts = store.counts().await.expect("counts");
    let total: u64 = counts.iter().map(|c| c.count).sum();
    assert_eq!(total, jobs as u64, "{counts:?}");
    for state in JobState::ALL {
        let filter = JobFilter { queue: None, states: vec![state] };
        let listed = store.list_jobs(&filter, None, 1000).await.expect("list").items.len() as u64;
        let counted: u64 = counts.iter().filter(|c| c.state == state).map(|c| c.count).sum();
        assert_eq!(listed, counted, "{state:?}: {counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handles_racing_claims_renewals_and_reaps_have_one_winner_each() {
    let a = Arc::new(local::fresh_store("race").await);
    let b = Arc::new(twin(&a));
    let jobs: Vec<Job> = (0..24u64).map(|i| job(&format!("r{i:02}"), i + 1, "q", None)).collect();
    a.write(jobs.iter().map(|j| Write::create(j.clone())).collect()).await.expect("create");
    let mut claims = Vec::new();
    for j in &jobs {
        for (store, worker) in [(a.clone(), "a"), (b.clone(), "b")] {
            let claim = next(j, JobState::Claimed, worker);
            claims.push(tokio::spawn(async move {
                let outcome = one(&store, Write::update(claim.clone(), 1)).await;
                (claim, outcome)
            }));
        }
    }
    let mut won = Vec::new();
    for pair in claims.chunks_mut(2) {
        let mut winners = Vec::new();
        for task in pair {
            let (claim, outcome) = task.await.expect("join");
            match outcome {
                WriteOutcome::Applied => winners.push(claim),
                WriteOutcome::VersionConflict { current_version: Some(2) } => {}
                other => panic!("a lost claim is a version conflict, not {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "exactly one claim of each job wins");
        won.push(winners.remove(0));
    }
    for claim in &won {
        let stored = a.get_job(&claim.id).await.expect("get").expect("stored");
        assert_eq!(stored.worker_id, claim.worker_id, "the stored claimer is the winner");
    }
    // The claimer renews (same state) while the other replica reaps
    // (back to QUEUED), both from version 2: one of the two wins.
    let mut races = Vec::new();
    for claim in won {
        let renewal = next(&claim, JobState::Claimed, &claim.worker_id);
        let reap = next(&claim, JobState::Queued, "");
        let (renewer, reaper) = if claim.worker_id == "a" { (a.clone(), b.clone()) } else { (b.clone(), a.clone()) };
        races.push(tokio::spawn(async move {
            let r = tokio::spawn(async move { one(&renewer, Write::update(renewal, 2)).await });
            let p = one(&reaper, Write::update(reap, 2)).await;
            (r.await.expect("join"), p)
        }));
    }
    for race in races {
        let (renewed, reaped) = race.await.expect("join");
        let wins = [&renewed, &reaped].iter().filter(|o| ***o == WriteOutcome::Applied).count();
        assert_eq!(wins, 1, "renewal {renewed:?}, reap {reaped:?}");
    }
    assert_counts_match(&a, jobs.len()).await;
}

/// A store whose client loses the reply of the next `operation` call.
fn faulty(store: &DynamoStore, operation: &'static str, fault: Fault) -> (DynamoStore, FaultLayer) {
    let layer = FaultLayer::new(operation, fault, 0);
    let client = aws_sdk_dynamodb::Client::from_conf(local::config().interceptor(layer.clone()).build());
    let prefix = store.tables().jobs.trim_end_matches(tables::JOBS).to_string();
    (DynamoStore::with_client(client, &prefix), layer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_whose_replies_were_lost_or_throttled_are_recognised_on_retry() {
    let clean = local::fresh_store("faults").await;
    let j = job("f", 1, "q", None);
    assert_eq!(one(&clean, Write::create(j.clone())).await, WriteOutcome::Applied);

    // A claim (state changes: a transaction with the count) applied, reply lost.
    let (store, layer) = faulty(&clean, "TransactWriteItems", Fault::LostReply);
    layer.arm(1);
    let claimed = next(&j, JobState::Claimed, "w");
    let outcome = one(&store, Write::update(claimed.clone(), 1)).await;
    assert_eq!(layer.injected(), 1);
    assert_eq!(outcome, WriteOutcome::Applied, "the retried claim is recognised as this claim");
    assert_eq!(clean.get_job("f").await.expect("get"), Some(claimed.clone()));

    // A renewal (same state: one conditional put), applied, reply lost and
    // then throttled.
    for (fault, worker) in [(Fault::LostReply, "w"), (Fault::Throttled, "w")] {
        let (store, layer) = faulty(&clean, "PutItem", fault);
        layer.arm(1);
        let current = clean.get_job("f").await.expect("get").expect("stored");
        let renewed = next(&current, JobState::Claimed, worker);
        let outcome = one(&store, Write::update(renewed.clone(), current.version)).await;
        assert_eq!(layer.injected(), 1, "{fault:?}");
        assert_eq!(outcome, WriteOutcome::Applied, "{fault:?}");
        assert_eq!(clean.get_job("f").await.expect("get"), Some(renewed));
    }
    // A different write from the same version is still a conflict.
    let stale = next(&claimed, JobState::Queued, "");
    assert!(matches!(
        one(&clean, Write::update(stale, 1)).await,
        WriteOutcome::VersionConflict { current_version: Some(4) }
    ));

    // A create whose reply was lost: applied once, counted once.
    let (store, layer) = faulty(&clean, "TransactWriteItems", Fault::LostReply);
    layer.arm(1);
    let fresh = job("g", 2, "q", Some("key-g"));
    let outcome = one(&store, Write::create(fresh.clone())).await;
    assert_eq!(layer.injected(), 1);
    assert_eq!(outcome, WriteOutcome::Applied, "the SDK's retry carries the same request token");
    assert_eq!(clean.find_by_idempotency_key("q", "key-g").await.expect("find").map(|j| j.id), Some("g".into()));
    assert_counts_match(&clean, 2).await;

    // A pool create whose reply was lost: the retry finds this very pool.
    let (store, layer) = faulty(&clean, "PutItem", Fault::LostReply);
    layer.arm(1);
    let pool =
        crate::domain::Pool { name: "gpu".into(), ..crate::domain::Pool::default_pool(std::time::SystemTime::now()) };
    let outcome = one(&store, Write::CreatePool(Box::new(pool.clone()))).await;
    assert_eq!(layer.injected(), 1);
    assert_eq!(outcome, WriteOutcome::Applied, "the retried create is recognised as this create");
    let other = crate::domain::Pool { max_size: 7, ..pool };
    assert_eq!(one(&clean, Write::CreatePool(Box::new(other))).await, WriteOutcome::IdExists);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_writes_whose_replies_were_lost_are_recognised_on_retry() {
    use crate::store::conformance::{put_record, record};
    let clean = local::fresh_store("record-faults").await;
    // An insert, then a replace, each applied with its reply lost or
    // throttled: the SDK's retry finds this very record stored.
    let writes = [
        (Fault::LostReply, record("env", "prod", 1, "created")),
        (Fault::Throttled, record("env", "prod", 2, "changed")),
    ];
    for (fault, written) in writes {
        let (store, layer) = faulty(&clean, "PutItem", fault);
        layer.arm(1);
        assert_eq!(one(&store, put_record(&written)).await, WriteOutcome::Applied, "{fault:?}");
        assert_eq!(layer.injected(), 1, "{fault:?}");
        assert_eq!(clean.get_record("env", "prod").await.expect("get"), Some(written));
    }
    // Another write from the same version is still a conflict.
    assert_eq!(
        one(&clean, put_record(&record("env", "prod", 2, "other"))).await,
        WriteOutcome::VersionConflict { current_version: Some(2) }
    );
    assert_eq!(one(&clean, put_record(&record("env", "prod", 1, "other"))).await, WriteOutcome::IdExists);
}

#[tokio::test]
async fn a_record_over_dynamodbs_limit_is_refused_precisely() {
    use crate::store::conformance::{put_record, record};
    let store = local::fresh_store("record-oversize").await;
    let small = record("env", "small", 1, "fits");
    let big = record("env", "big", 1, &"x".repeat(400 * 1024));
    let err = store.write(vec![put_record(&small), put_record(&big)]).await.expect_err("refused");
    assert!(matches!(&err, StoreError::Rejected(m) if m.contains("env/big") && m.contains("at most")), "{err}");
    // Refused whole: the record that fits was not written either.
    assert_eq!(store.get_record("env", "small").await.expect("get"), None);
    let fits = record("env", "big", 1, &"x".repeat(crate::store::dynamodb::MAX_ITEM_BYTES - 16));
    assert_eq!(one(&store, put_record(&fits)).await, WriteOutcome::Applied);
    assert_eq!(store.get_record("env", "big").await.expect("get"), Some(fits));
}

#[tokio::test]
async fn an_item_over_dynamodbs_limit_is_refused_precisely() {
    let store = local::fresh_store("oversize").await;
    let mut big = job("big", 1, "q", None);
    big.spec.payload = vec![7u8; 400 * 1024].into();
    let err = store.write(vec![Write::create(big)]).await.expect_err("refused");
    assert!(matches!(&err, StoreError::Rejected(m) if m.contains("job big") && m.contains("at most")), "{err}");
    assert!(!err.is_retryable());
    assert_eq!(store.get_job("big").await.expect("get"), None);
    // At the store's payload limit a job still fits.
    let mut fits = job("fits", 2, "q", None);
    fits.spec.payload = vec![7u8; store.limits().max_payload_bytes].into();
    fits.result = vec![8u8; store.limits().max_result_bytes].into();
    assert_eq!(one(&store, Write::create(fits)).await, WriteOutcome::Applied);
}

/// Passes every write through unchanged.
struct PassThrough;

#[async_trait::async_trait]
impl crate::store::hooked::WriteHook for PassThrough {
    async fn write(&self, inner: &dyn Store, batch: Vec<Write>) -> crate::store::StoreResult<Vec<WriteOutcome>> {
        inner.write(batch).await
    }
}

#[tokio::test]
async fn a_hooked_store_keeps_the_limits_of_the_store_it_wraps() {
    let store = local::fresh_store("hooked").await;
    let limits = store.limits();
    assert!(limits.max_payload_bytes < crate::domain::validate::MAX_PAYLOAD_BYTES);
    let hooked = crate::store::hooked::HookedStore { inner: store, hook: PassThrough };
    assert_eq!(hooked.limits(), limits);
}

#[tokio::test]
async fn missing_tables_are_a_clear_terminal_error() {
    let client = local::client();
    let store = DynamoStore::with_client(client.clone(), &local::unique_prefix("missing"));
    let err = store.check().await.expect_err("no tables");
    assert!(matches!(&err, StoreError::Rejected(m) if m.contains("tether dynamodb create-tables")), "{err}");
    let names = TableNames::new(store.tables().jobs.trim_end_matches(tables::JOBS));
    tables::create_tables(&client, &names).await.expect("create");
    store.check().await.expect("the tables exist now");
    // Creating again leaves them be.
    assert!(tables::create_tables(&client, &names).await.expect("again").is_empty());
    tables::delete_tables(&client, &names).await.expect("delete");
    assert!(store.check().await.is_err());
}

/// Two handles (two replicas' clients) log events into the same shards at
/// once while a reader follows with cursors: the reader sees every event
/// exactly once, none missed, each job's in order. Racing claims with
/// events have one winner, and only the winner's event is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handles_logging_events_at_once_lose_none_and_a_follower_sees_each_once() {
    use crate::store::conformance::{logged_create, logged_move};
    use crate::store::{EventCursor, EventRead};
    use std::collections::BTreeMap;

    let a = Arc::new(local::fresh_store("events_race").await);
    let b = Arc::new(twin(&a));
    let start = a.event_heads().await.expect("heads");

    // One job claimed by both handles at once: one claim and one event.
    let contended = job("contended", 1, "q", None);
    assert_eq!(one(&a, logged_create(&contended)).await, WriteOutcome::Applied);
    let (_, claim_a) = logged_move(&contended, JobState::Claimed, std::time::SystemTime::now());
    let (_, claim_b) = logged_move(&contended, JobState::Claimed, std::time::SystemTime::now());
    let (ra, rb) = tokio::join!(one(&a, claim_a), one(&b, claim_b));
    let mut outcomes = [ra, rb];
    outcomes.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(outcomes, [WriteOutcome::Applied, WriteOutcome::VersionConflict { current_version: Some(2) }]);

    // 20 jobs per handle, 10 transitions each: 2 x 200 transitions.
    const JOBS: usize = 20;
    const MOVES: usize = 10;
    let writers: Vec<_> = [(a.clone(), "a"), (b.clone(), "b")]
        .into_iter()
        .flat_map(|(store, name)| {
            (0..JOBS).map(move |i| {
                let store = store.clone();
                let mut j = job(&format!("{name}{i:02}"), i as u64 + 10, "q", None);
                tokio::spawn(async move {
                    assert_eq!(one(&store, logged_create(&j)).await, WriteOutcome::Applied);
                    for m in 0..MOVES {
                        let state = if m % 2 == 0 { JobState::Claimed } else { JobState::Queued };
                        let (n, w) = logged_move(&j, state, std::time::SystemTime::now());
                        assert_eq!(one(&store, w).await, WriteOutcome::Applied, "{} move {m}", n.id);
                        j = n;
                    }
                })
            })
        })
        .collect();

    // The follower reads while the writers write.
    let follower = {
        let reader = twin(&a);
        let mut cursor: EventCursor = start.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut quiet_after_done = 0;
            let expected = 2 + 2 * JOBS * (MOVES + 1);
            while seen.len() < expected || quiet_after_done < 1 {
                match reader.read_events(&cursor, 16).await.expect("read") {
                    EventRead::Events { events, next } => {
                        if events.is_empty() && seen.len() >= expected {
                            quiet_after_done += 1;
                        }
                        seen.extend(events);
                        cursor = next;
                    }
                    other => panic!("{other:?}"),
                }
                // A polling follower, as a watcher on another replica is.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            (seen, cursor)
        })
    };
    for w in writers {
        w.await.expect("writer");
    }
    let (seen, end) = tokio::time::timeout(std::time::Duration::from_secs(120), follower)
        .await
        .expect("the follower caught up")
        .expect("follower");
    assert_eq!(seen.len(), 2 + 2 * JOBS * (MOVES + 1), "every event, once");
    let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in &seen {
        versions.entry(e.job.id.clone()).or_default().push(e.job.version);
    }
    assert_eq!(versions.remove("contended"), Some(vec![1, 2]), "one claim logged");
    assert_eq!(versions.len(), 2 * JOBS);
    for (id, v) in &versions {
        assert_eq!(*v, (1..=(MOVES as u64 + 1)).collect::<Vec<_>>(), "{id}: in order, none missed, none twice");
    }
    // The cursor the follower ended on is the present, on both handles.
    assert_eq!(a.event_heads().await.expect("heads"), end);
    assert_eq!(b.event_heads().await.expect("heads"), end);
}
