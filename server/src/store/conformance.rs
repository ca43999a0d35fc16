//! The storage conformance suite: every backend runs every case, one test
//! per case, through [`store_conformance_suite!`](crate::store_conformance_suite).
//! Each case gets a fresh, empty store.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::{
    AgentFilter, Event, EventCursor, EventRead, JobFilter, LogChunk, Record, RecordOrder, Store, StoreError,
    Transition, Write, WriteOutcome, COUNTER_FENCING,
};
use crate::domain::{Agent, Health, Job, JobSpec, JobState, Pool, Priority, Routing, SchedulingStatus};

fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

/// A version-1 queued job.
pub fn job(id: &str, seq: u64, queue: &str, key: Option<&str>) -> Job {
    let spec = JobSpec {
        queue: queue.to_string(),
        payload: Bytes::from(format!("payload of {id}")),
        priority: Priority::Normal,
        routing: Routing { pool: "default".into(), required_labels: [("os".to_string(), "linux".to_string())].into() },
        max_attempts: 3,
        lease_duration: Duration::from_secs(30),
        timeout: None,
        idempotency_key: key.map(str::to_string),
        not_before: None,
        retry: crate::domain::RetryPolicy { any_failure: false, exit_codes: [75].into() },
    };
    let mut job = Job::new(id.to_string(), seq, spec, t(seq));
    job.version = 1;
    job
}

fn next(job: &Job, state: JobState) -> Job {
    let mut n = job.clone();
    n.state = state;
    n.version += 1;
    n
}

async fn write_one<S: Store>(store: &S, write: Write) -> WriteOutcome {
    let mut outcomes = store.write(vec![write]).await.expect("write");
    assert_eq!(outcomes.len(), 1);
    outcomes.remove(0)
}

/// One `#[tokio::test]` per case for a backend, so a failure names its
/// case. `$fresh` is called with the case's name and returns a future of
/// `(store, guard)`: a fresh, empty store and whatever must outlive it.
///
/// ```text
/// store_conformance_suite!(|_case| async {
///     let dir = tempfile::tempdir().unwrap();
///     (EmbeddedStore::open(dir.path(), Default::default()).unwrap(), dir)
/// });
/// ```
#[macro_export]
macro_rules! store_conformance_suite {
    ($fresh:expr) => {
        $crate::store_conformance_suite!(@cases $fresh;
            create_and_get,
            jobs_read_in_a_batch,
            conditional_updates,
            idempotency_keys,
            listing_newest_first_with_filters,
            dead_letters_oldest_first,
            startup_scans,
            counts_follow_transitions,
            logs_are_deduplicated,
            agents,
            counters_only_rise,
            concurrent_claims_have_one_winner,
            pools,
            a_pool_is_created_once,
            events_are_logged_with_state_changes_only,
            failed_job_writes_log_no_events,
            a_batch_logs_the_events_of_exactly_its_applied_writes,
            reading_from_a_cursor_returns_exactly_the_later_events,
            event_cursors_of_another_layout_or_ahead_are_refused,
            trimmed_events_answer_expired_never_a_skip,
            a_record_is_inserted_once,
            records_are_replaced_only_from_their_stored_version,
            a_record_write_of_a_callers_bug_refuses_its_batch,
            records_list_by_id_within_their_collection_only,
            records_list_past_a_page_of_the_backend,
            a_batch_applies_writes_to_one_record_in_order,
            activity_is_logged_with_its_applied_write_only,
            activity_reads_from_a_cursor_in_order_per_subject,
            a_malformed_logged_write_refuses_its_batch,
            trimmed_activity_answers_expired);
    };
    (@cases $fresh:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (store, _keep) = ($fresh)(stringify!($case)).await;
                $crate::store::conformance::$case(store).await;
            }
        )*
    };
}

pub async fn create_and_get<S: Store>(store: S) {
    let j = job("a", 1, "q", None);
    assert_eq!(write_one(&store, Write::create(j.clone())).await, WriteOutcome::Applied);
    assert_eq!(store.get_job("a").await.expect("get"), Some(j.clone()));
    assert_eq!(store.get_job("missing").await.expect("get"), None);
    assert_eq!(write_one(&store, Write::create(j.clone())).await, WriteOutcome::IdExists);
    // A refused create leaves the stored job as it was.
    let impostor = job("a", 2, "other", None);
    assert_eq!(write_one(&store, Write::create(impostor)).await, WriteOutcome::IdExists);
    assert_eq!(store.get_job("a").await.expect("get"), Some(j));
}

pub async fn jobs_read_in_a_batch<S: Store>(store: S) {
    // More than one BatchGetItem request holds, with a repeated and a
    // missing id.
    let jobs: Vec<Job> = (0..130).map(|i| job(&format!("j{i:03}"), i + 1, "q", None)).collect();
    let outcomes = store.write(jobs.iter().cloned().map(Write::create).collect()).await.expect("create");
    assert!(outcomes.iter().all(|o| *o == WriteOutcome::Applied));
    let mut ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    ids.push("j000".into());
    ids.push("missing".into());
    let mut read = store.get_jobs(&ids).await.expect("batch read");
    read.sort_by(|a, b| a.id.cmp(&b.id));
    let names = |jobs: &[Job]| jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>();
    assert_eq!(names(&read), names(&jobs), "each existing job once");
    assert!(read == jobs, "the records as written");
    assert_eq!(store.get_jobs(&[]).await.expect("empty read"), Vec::<Job>::new());
}

pub async fn conditional_updates<S: Store>(store: S) {
    let j = job("a", 1, "q", None);
    write_one(&store, Write::create(j.clone())).await;
    let claimed = next(&j, JobState::Claimed);
    assert_eq!(write_one(&store, Write::update(claimed.clone(), 1)).await, WriteOutcome::Applied);
    // A second writer holding the old version loses.
    let stale = next(&j, JobState::Cancelled);
    assert_eq!(
        write_one(&store, Write::update(stale, 1)).await,
        WriteOutcome::VersionConflict { current_version: Some(2) }
    );
    let ghost = job("ghost", 9, "q", None);
    assert_eq!(
        write_one(&store, Write::update(ghost, 1)).await,
        WriteOutcome::VersionConflict { current_version: None }
    );
    assert_eq!(store.get_job("a").await.expect("get").map(|j| j.state), Some(JobState::Claimed));
    // Writes in one batch apply in order.
    let running = next(&claimed, JobState::Running);
    let done = next(&running, JobState::Succeeded);
    let outcomes = store.write(vec![Write::update(running, 2), Write::update(done, 3)]).await.expect("batch");
    assert_eq!(outcomes, vec![WriteOutcome::Applied, WriteOutcome::Applied]);
    assert_eq!(store.get_job("a").await.expect("get").map(|j| j.version), Some(4));
}

pub async fn idempotency_keys<S: Store>(store: S) {
    write_one(&store, Write::create(job("a", 1, "q", Some("k")))).await;
    assert_eq!(
        write_one(&store, Write::create(job("b", 2, "q", Some("k")))).await,
        WriteOutcome::IdempotencyKeyTaken { existing_job_id: "a".into() }
    );
    // Keys are scoped to their queue.
    assert_eq!(write_one(&store, Write::create(job("c", 3, "other", Some("k")))).await, WriteOutcome::Applied);
    assert_eq!(store.find_by_idempotency_key("q", "k").await.expect("find").map(|j| j.id), Some("a".into()));
    assert_eq!(store.find_by_idempotency_key("q", "nope").await.expect("find"), None);
    assert_eq!(store.get_job("b").await.expect("get"), None);
}

pub async fn listing_newest_first_with_filters<S: Store>(store: S) {
    let mut writes = Vec::new();
    for i in 1..=25u64 {
        let queue = if i % 2 == 0 { "even" } else { "odd" };
        writes.push(Write::create(job(&format!("j{i:02}"), i, queue, None)));
    }
    store.write(writes).await.expect("create");
    // Move j05 and j10 to running.
    for (id, seq) in [("j05", 5), ("j10", 10)] {
        let j = store.get_job(id).await.expect("get").expect("exists");
        assert_eq!(seq, j.seq);
        write_one(&store, Write::update(next(&j, JobState::Running), 1)).await;
    }
    let all = JobFilter::default();
    let page = store.list_jobs(&all, None, 10).await.expect("list");
    let ids: Vec<_> = page.items.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, ["j25", "j24", "j23", "j22", "j21", "j20", "j19", "j18", "j17", "j16"]);
    let mut seen = ids.len();
    let mut cursor = page.next;
    while let Some(c) = cursor {
        let page = store.list_jobs(&all, Some(c), 10).await.expect("list");
        seen += page.items.len();
        cursor = page.next;
    }
    assert_eq!(seen, 25);

    let running = JobFilter { queue: None, states: vec![JobState::Running] };
    let ids: Vec<_> =
        store.list_jobs(&running, None, 10).await.expect("list").items.into_iter().map(|j| j.id).collect();
    assert_eq!(ids, ["j10", "j05"]);

    let odd_queued = JobFilter { queue: Some("odd".into()), states: vec![JobState::Queued] };
    let page = store.list_jobs(&odd_queued, None, 100).await.expect("list");
    assert_eq!(page.items.len(), 12); // 13 odd, j05 running
    assert!(page.next.is_none());
    assert!(page.items.iter().all(|j| j.spec.queue == "odd" && j.state == JobState::Queued));
}

pub async fn dead_letters_oldest_first<S: Store>(store: S) {
    for i in 1..=5u64 {
        let j = job(&format!("d{i}"), i, if i == 3 { "other" } else { "q" }, None);
        write_one(&store, Write::create(j.clone())).await;
        if i != 4 {
            write_one(&store, Write::update(next(&j, JobState::DeadLettered), 1)).await;
        }
    }
    let page = store.list_dead_letters(Some("q"), None, 2).await.expect("list");
    let ids: Vec<_> = page.items.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, ["d1", "d2"]);
    let rest = store.list_dead_letters(Some("q"), page.next, 2).await.expect("list");
    let ids: Vec<_> = rest.items.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, ["d5"]);
    assert_eq!(store.list_dead_letters(None, None, 10).await.expect("list").items.len(), 4);
}

pub async fn startup_scans<S: Store>(store: S) {
    for i in 1..=4u64 {
        write_one(&store, Write::create(job(&format!("s{i}"), i, "q", None))).await;
    }
    let s2 = store.get_job("s2").await.expect("get").expect("exists");
    write_one(&store, Write::update(next(&s2, JobState::Claimed), 1)).await;
    let s3 = store.get_job("s3").await.expect("get").expect("exists");
    write_one(&store, Write::update(next(&s3, JobState::Succeeded), 1)).await;
    let queued: Vec<_> = store.load_queued().await.expect("queued").into_iter().map(|e| e.id).collect();
    assert_eq!(queued, ["s1", "s4"]);
    let queued = store.load_queued().await.expect("queued");
    assert_eq!(queued[0].routing.required_labels.get("os").map(String::as_str), Some("linux"));
    let active: Vec<_> = store.load_active().await.expect("active").into_iter().map(|j| j.id).collect();
    assert_eq!(active, ["s2"]);
}

pub async fn counts_follow_transitions<S: Store>(store: S) {
    let a = job("a", 1, "q", None);
    let mut b = job("b", 2, "q", None);
    b.spec.priority = Priority::Critical;
    store.write(vec![Write::create(a.clone()), Write::create(b)]).await.expect("create");
    write_one(&store, Write::update(next(&a, JobState::Running), 1)).await;
    let mut counts = store.counts().await.expect("counts");
    counts.sort_by_key(|c| (c.state, c.priority));
    let rows: Vec<_> = counts.iter().map(|c| (c.queue.as_str(), c.state, c.priority, c.count)).collect();
    assert_eq!(rows, [("q", JobState::Queued, Priority::Critical, 1), ("q", JobState::Running, Priority::Normal, 1)]);
}

pub async fn logs_are_deduplicated<S: Store>(store: S) {
    let chunk = |seq: u64, text: &str| LogChunk {
        job_id: "a".into(),
        attempt: 1,
        sequence: seq,
        stderr: false,
        data: Bytes::from(text.to_string()),
        time: t(0),
        // Both kinds of chunk: with the agent's time and without.
        agent_time: (seq % 2 == 1).then(|| t(seq % 1000)),
    };
    store
        .write(vec![
            Write::AppendLog(chunk(1, "world")),
            Write::AppendLog(chunk(0, "hello ")),
            Write::AppendLog(chunk(1, "again")),
        ])
        .await
        .expect("logs");
    let text: Vec<u8> = store.logs("a", 1).await.expect("logs").iter().flat_map(|c| c.data.to_vec()).collect();
    assert_eq!(text, b"hello world");
    let times: Vec<_> = store.logs("a", 1).await.expect("logs").iter().map(|c| c.agent_time).collect();
    assert_eq!(times, [None, Some(t(1))], "the agent's time is kept when given");
    // A follower's range read: only what comes after a sequence.
    let after = |chunks: Vec<LogChunk>| chunks.iter().map(|c| c.sequence).collect::<Vec<_>>();
    store.write(vec![Write::AppendLog(chunk(u64::MAX, "end"))]).await.expect("log");
    assert_eq!(after(store.logs_after("a", 1, 0).await.expect("logs")), [1, u64::MAX]);
    assert_eq!(after(store.logs_after("a", 1, 1).await.expect("logs")), [u64::MAX]);
    assert!(store.logs_after("a", 1, u64::MAX).await.expect("logs").is_empty());
    assert!(store.logs_after("a", 2, 0).await.expect("logs").is_empty());
    assert!(store.logs("a", 2).await.expect("logs").is_empty());
}

pub async fn agents<S: Store>(store: S) {
    let agent = |id: &str, name: &str, pool: &str| Agent {
        id: id.into(),
        name: name.into(),
        pool: pool.into(),
        labels: [("os".to_string(), if pool == "gpu" { "windows" } else { "linux" }.to_string())].into(),
        slots: 4,
        health: Health::Registering,
        health_reason: String::new(),
        scheduling: SchedulingStatus::Active,
        version: "1".into(),
        create_time: t(0),
        last_seen_time: t(0),
        metrics: Default::default(),
    };
    store
        .write(vec![
            Write::PutAgent(Box::new(agent("a1", "one", "default"))),
            Write::PutAgent(Box::new(agent("a2", "two", "gpu"))),
            Write::PutAgent(Box::new(agent("a3", "three", "default"))),
        ])
        .await
        .expect("agents");
    assert_eq!(store.get_agent("a2").await.expect("get").map(|a| a.name), Some("two".into()));
    assert_eq!(store.find_agent_by_name("default", "three").await.expect("find").map(|a| a.id), Some("a3".into()));
    assert_eq!(store.find_agent_by_name("gpu", "three").await.expect("find"), None);
    let pool = AgentFilter { pool: Some("default".into()), ..Default::default() };
    let ids: Vec<_> = store.list_agents(&pool, None, 10).await.expect("list").into_iter().map(|a| a.id).collect();
    assert_eq!(ids, ["a1", "a3"]);
    let after: Vec<_> =
        store.list_agents(&pool, Some("a1"), 10).await.expect("list").into_iter().map(|a| a.id).collect();
    assert_eq!(after, ["a3"]);
    let windows = AgentFilter { labels: [("os".to_string(), "windows".to_string())].into(), ..Default::default() };
    let ids: Vec<_> = store.list_agents(&windows, None, 10).await.expect("list").into_iter().map(|a| a.id).collect();
    assert_eq!(ids, ["a2"]);
}

pub async fn counters_only_rise<S: Store>(store: S) {
    assert_eq!(store.counter(COUNTER_FENCING).await.expect("counter"), 0);
    write_one(&store, Write::RaiseCounter { name: COUNTER_FENCING, value: 10 }).await;
    write_one(&store, Write::RaiseCounter { name: COUNTER_FENCING, value: 7 }).await;
    assert_eq!(store.counter(COUNTER_FENCING).await.expect("counter"), 10);
}

pub async fn concurrent_claims_have_one_winner<S: Store>(store: S) {
    let j = job("contended", 1, "q", None);
    write_one(&store, Write::create(j.clone())).await;
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let store = store.clone();
        let mut claim = next(&j, JobState::Claimed);
        claim.worker_id = format!("w{worker}");
        tasks.push(tokio::spawn(async move { store.write(vec![Write::update(claim, 1)]).await }));
    }
    let mut winners = 0;
    for task in tasks {
        let outcomes = task.await.expect("join").expect("write");
        if outcomes[0] == WriteOutcome::Applied {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
}

pub async fn pools<S: Store>(store: S) {
    let pool = |name: &str, max: u32| Pool { name: name.into(), max_size: max, ..Pool::default_pool(t(0)) };
    store
        .write(vec![Write::PutPool(Box::new(pool("zeta", 5))), Write::PutPool(Box::new(pool("alpha", 3)))])
        .await
        .expect("pools");
    write_one(&store, Write::PutPool(Box::new(pool("zeta", 9)))).await;
    let pools = store.list_pools().await.expect("list");
    let rows: Vec<_> = pools.iter().map(|p| (p.name.as_str(), p.max_size)).collect();
    assert_eq!(rows, [("alpha", 3), ("zeta", 9)]);
    write_one(&store, Write::DeletePool { name: "alpha".into() }).await;
    write_one(&store, Write::DeletePool { name: "missing".into() }).await;
    let names: Vec<_> = store.list_pools().await.expect("list").into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["zeta"]);
}

pub async fn a_pool_is_created_once<S: Store>(store: S) {
    let pool = |max: u32, at: u64| Pool { name: "gpu".into(), max_size: max, ..Pool::default_pool(t(at)) };
    assert_eq!(write_one(&store, Write::CreatePool(Box::new(pool(4, 1)))).await, WriteOutcome::Applied);
    // A second create of the name (another replica's) is refused and
    // changes nothing; a put still replaces it.
    assert_eq!(write_one(&store, Write::CreatePool(Box::new(pool(8, 2)))).await, WriteOutcome::IdExists);
    let stored = |pools: Vec<Pool>| pools.into_iter().map(|p| (p.name, p.max_size)).collect::<Vec<_>>();
    assert_eq!(stored(store.list_pools().await.expect("list")), [("gpu".to_string(), 4)]);
    write_one(&store, Write::DeletePool { name: "gpu".into() }).await;
    assert_eq!(write_one(&store, Write::CreatePool(Box::new(pool(8, 3)))).await, WriteOutcome::Applied);
    assert_eq!(stored(store.list_pools().await.expect("list")), [("gpu".to_string(), 8)]);
}

/// A create that logs its event.
pub fn logged_create(job: &Job) -> Write {
    Write::CreateJob { job: Box::new(job.clone()), events: vec![Transition::of(job, None)] }
}

/// `job` moved to `state` at `at`, with the write that logs it.
pub fn logged_move(job: &Job, state: JobState, at: SystemTime) -> (Job, Write) {
    let mut n = next(job, state);
    n.update_time = at;
    let events = if state == job.state { Vec::new() } else { vec![Transition::of(&n, Some(job.state))] };
    let write = Write::UpdateJob { job: Box::new(n.clone()), expected_version: job.version, events };
    (n, write)
}

/// Every event after `cursor`, read `limit` at a time, and the cursor after
/// them.
pub async fn read_all<S: Store + ?Sized>(
    store: &S,
    mut cursor: EventCursor,
    limit: usize,
) -> (Vec<Event>, EventCursor) {
    let mut all = Vec::new();
    loop {
        match store.read_events(&cursor, limit).await.expect("read events") {
            EventRead::Events { events, next } => {
                if events.is_empty() {
                    assert_eq!(next, cursor, "an empty read leaves the cursor");
                    return (all, cursor);
                }
                for e in &events {
                    assert!(e.seq > cursor.positions[e.shard as usize], "an event at or before the cursor came back");
                }
                all.extend(events);
                cursor = next;
            }
            other => panic!("reading from {cursor:?}: {other:?}"),
        }
    }
}

/// (job id, previous, state) of each event, per job in log order.
fn per_job(events: &[Event]) -> std::collections::BTreeMap<String, Vec<(Option<JobState>, JobState)>> {
    let mut out: std::collections::BTreeMap<String, Vec<(Option<JobState>, JobState)>> = Default::default();
    for e in events {
        out.entry(e.job.id.clone()).or_default().push((e.previous, e.job.state));
    }
    out
}

pub async fn events_are_logged_with_state_changes_only<S: Store>(store: S) {
    let start = store.event_heads().await.expect("heads");
    assert_eq!(start, EventCursor::start(store.event_shards()), "a new log is empty");
    let a = job("a", 1, "q", None);
    assert_eq!(write_one(&store, logged_create(&a)).await, WriteOutcome::Applied);
    let (claimed, w) = logged_move(&a, JobState::Claimed, t(10));
    assert_eq!(write_one(&store, w).await, WriteOutcome::Applied);
    // A renewal (same state) logs nothing.
    let (renewed, w) = logged_move(&claimed, JobState::Claimed, t(11));
    assert_eq!(write_one(&store, w).await, WriteOutcome::Applied);
    // Coalesced transitions of one write: running then succeeded.
    let (running, _) = logged_move(&renewed, JobState::Running, t(12));
    let (mut done, _) = logged_move(&running, JobState::Succeeded, t(13));
    done.result = Bytes::from_static(b"result bytes");
    let events =
        vec![Transition::of(&running, Some(JobState::Claimed)), Transition::of(&done, Some(JobState::Running))];
    let w = Write::UpdateJob { job: Box::new(done.clone()), expected_version: renewed.version, events };
    assert_eq!(write_one(&store, w).await, WriteOutcome::Applied);

    let (events, end) = read_all(&store, start.clone(), 100).await;
    let states: Vec<_> = events.iter().map(|e| (e.previous, e.job.state, e.job.version)).collect();
    assert_eq!(
        states,
        [
            (None, JobState::Queued, 1),
            (Some(JobState::Queued), JobState::Claimed, 2),
            (Some(JobState::Claimed), JobState::Running, 4),
            (Some(JobState::Running), JobState::Succeeded, 5),
        ]
    );
    // Dense numbers in one shard, the job's own shard.
    let seqs: Vec<_> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    assert!(events.iter().all(|e| e.shard == events[0].shard));
    // No payload or result in the log; the rest of the job is there.
    assert!(events.iter().all(|e| e.job.spec.payload.is_empty() && e.job.result.is_empty()));
    assert_eq!(events[3].job.update_time, t(13));
    assert_eq!(events[1].job.spec.routing, a.spec.routing);
    assert_eq!(store.event_heads().await.expect("heads"), end, "the heads are the cursor after the last event");
    assert_eq!(read_all(&store, end, 100).await.0, Vec::new());
}

pub async fn failed_job_writes_log_no_events<S: Store>(store: S) {
    let start = store.event_heads().await.expect("heads");
    let a = job("a", 1, "q", Some("k"));
    write_one(&store, logged_create(&a)).await;
    // An existing id, a taken key, a stale version: no event.
    assert_eq!(write_one(&store, logged_create(&job("a", 2, "q", None))).await, WriteOutcome::IdExists);
    assert!(matches!(
        write_one(&store, logged_create(&job("b", 3, "q", Some("k")))).await,
        WriteOutcome::IdempotencyKeyTaken { .. }
    ));
    let (claimed, w) = logged_move(&a, JobState::Claimed, t(5));
    write_one(&store, w).await;
    let (_, stale) = logged_move(&a, JobState::Cancelled, t(6));
    assert_eq!(write_one(&store, stale).await, WriteOutcome::VersionConflict { current_version: Some(2) });
    let (_, ghost) = logged_move(&job("ghost", 9, "q", None), JobState::Claimed, t(6));
    assert_eq!(write_one(&store, ghost).await, WriteOutcome::VersionConflict { current_version: None });
    let (events, _) = read_all(&store, start, 100).await;
    let got: Vec<_> = events.iter().map(|e| (e.job.id.as_str(), e.job.state)).collect();
    assert_eq!(got, [("a", JobState::Queued), ("a", JobState::Claimed)]);
    assert_eq!(store.get_job("a").await.expect("get"), Some(claimed));
}

pub async fn reading_from_a_cursor_returns_exactly_the_later_events<S: Store>(store: S) {
    let start = store.event_heads().await.expect("heads");
    let mut jobs: Vec<Job> = (0..12u64).map(|i| job(&format!("c{i:02}"), i + 1, "q", None)).collect();
    store.write(jobs.iter().map(logged_create).collect()).await.expect("create");
    let middle = store.event_heads().await.expect("heads");
    let mut expected_later = Vec::new();
    for (round, state) in [JobState::Claimed, JobState::Running, JobState::Succeeded].into_iter().enumerate() {
        let mut writes = Vec::new();
        for j in jobs.iter_mut() {
            let (n, w) = logged_move(j, state, t(100 + round as u64));
            expected_later.push((n.id.clone(), state));
            *j = n;
            writes.push(w);
        }
        assert!(store.write(writes).await.expect("write").iter().all(|o| *o == WriteOutcome::Applied));
    }
    // From the start, in small pages: every event once, per job in order.
    let (all, end) = read_all(&store, start, 5).await;
    assert_eq!(all.len(), 48);
    let lifecycle = vec![
        (None, JobState::Queued),
        (Some(JobState::Queued), JobState::Claimed),
        (Some(JobState::Claimed), JobState::Running),
        (Some(JobState::Running), JobState::Succeeded),
    ];
    let by_job = per_job(&all);
    assert_eq!(by_job.len(), 12);
    assert!(by_job.values().all(|v| *v == lifecycle), "{by_job:?}");
    let mut positions = std::collections::BTreeSet::new();
    assert!(all.iter().all(|e| positions.insert((e.shard, e.seq))), "no event twice");
    // From the middle: exactly the later ones.
    let (later, end_again) = read_all(&store, middle, 7).await;
    assert_eq!(end_again, end);
    let mut got: Vec<_> = later.iter().map(|e| (e.job.id.clone(), e.job.state)).collect();
    got.sort();
    expected_later.sort();
    assert_eq!(got, expected_later);
    // And nothing after the end.
    assert!(read_all(&store, end, 5).await.0.is_empty());
}

pub async fn event_cursors_of_another_layout_or_ahead_are_refused<S: Store>(store: S) {
    let shards = store.event_shards();
    write_one(&store, logged_create(&job("a", 1, "q", None))).await;
    let other = EventCursor::start(if shards == 1 { 8 } else { 1 });
    assert!(store.read_events(&other, 10).await.is_err(), "a cursor of another shard count is refused");
    let empty = EventCursor { positions: Vec::new() };
    assert!(store.read_events(&empty, 10).await.is_err());
    let mut ahead = store.event_heads().await.expect("heads");
    for p in &mut ahead.positions {
        *p += 1000;
    }
    assert_eq!(store.read_events(&ahead, 10).await.expect("read"), EventRead::Unknown);
}

pub async fn trimmed_events_answer_expired_never_a_skip<S: Store>(store: S) {
    let start = store.event_heads().await.expect("heads");
    // Old events (times t(0..10)) and young ones (t(1000..)).
    let old: Vec<Job> = (0..6u64).map(|i| job(&format!("o{i}"), i + 1, "q", None)).collect();
    store.write(old.iter().map(logged_create).collect()).await.expect("create");
    let after_old = store.event_heads().await.expect("heads");
    let young: Vec<Job> = (0..6u64)
        .map(|i| {
            let mut j = job(&format!("y{i}"), 1000 + i, "q", None);
            j.update_time = t(1000 + i);
            j
        })
        .collect();
    store.write(young.iter().map(logged_create).collect()).await.expect("create");
    let (before_trim, _) = read_all(&store, start.clone(), 100).await;
    assert_eq!(before_trim.len(), 12);

    let mut trimmed = 0;
    loop {
        let pass = store.trim_events(t(500), 2).await.expect("trim");
        trimmed += pass.groups;
        if !pass.more {
            break;
        }
    }
    assert_eq!(trimmed, 6, "the old groups, and only those");
    // A cursor before the low-water mark is told so: never a silent skip.
    assert_eq!(store.read_events(&start, 100).await.expect("read"), EventRead::Expired);
    // From after the trimmed events, everything younger is still there.
    let (rest, _) = read_all(&store, after_old, 100).await;
    let mut ids: Vec<_> = rest.iter().map(|e| e.job.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["y0", "y1", "y2", "y3", "y4", "y5"]);
    // A second trim finds nothing more; the present still reads.
    assert_eq!(store.trim_events(t(500), 100).await.expect("trim").groups, 0);
    let heads = store.event_heads().await.expect("heads");
    assert!(read_all(&store, heads, 100).await.0.is_empty());
}

pub async fn a_batch_logs_the_events_of_exactly_its_applied_writes<S: Store>(store: S) {
    let jobs: Vec<Job> = (0..16u64).map(|i| job(&format!("b{i:02}"), i + 1, "q", None)).collect();
    store.write(jobs.iter().map(logged_create).collect()).await.expect("create");
    let after_creates = store.event_heads().await.expect("heads");
    // One batch: claims of the even jobs, stale claims of the odd ones, a
    // create of an existing id, new jobs two of which share a key.
    let mut writes = Vec::new();
    let mut expected = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        if i % 2 == 0 {
            let (n, w) = logged_move(j, JobState::Claimed, t(50));
            writes.push(w);
            expected.push(WriteOutcome::Applied);
            let _ = n;
        } else {
            let mut stale = j.clone();
            stale.version = 5;
            let (_, w) = logged_move(&stale, JobState::Claimed, t(50));
            writes.push(w);
            expected.push(WriteOutcome::VersionConflict { current_version: Some(1) });
        }
    }
    writes.push(logged_create(&job("b00", 99, "q", None)));
    expected.push(WriteOutcome::IdExists);
    for i in 0..6u64 {
        let key = if i < 2 { Some("shared") } else { None };
        writes.push(logged_create(&job(&format!("n{i}"), 100 + i, "q", key)));
        expected.push(WriteOutcome::Applied);
    }
    // n0 and n1 share a key: one of them gets it (writes to different
    // items of one batch may apply in any order), the other is told whose.
    let mut outcomes = store.write(writes).await.expect("batch");
    let n1 = outcomes.len() - 5;
    let (winner, loser) = match &outcomes[n1 - 1..=n1] {
        [WriteOutcome::Applied, WriteOutcome::IdempotencyKeyTaken { existing_job_id }] if existing_job_id == "n0" => {
            ("n0", n1)
        }
        [WriteOutcome::IdempotencyKeyTaken { existing_job_id }, WriteOutcome::Applied] if existing_job_id == "n1" => {
            ("n1", n1 - 1)
        }
        other => panic!("two creates of one key: {other:?}"),
    };
    outcomes[loser] = WriteOutcome::Applied;
    assert_eq!(outcomes, expected);
    let (events, _) = read_all(&store, after_creates, 100).await;
    let mut got: Vec<_> = events.iter().map(|e| (e.job.id.clone(), e.previous, e.job.state)).collect();
    got.sort();
    let mut want: Vec<_> = (0..16)
        .filter(|i| i % 2 == 0)
        .map(|i| (format!("b{i:02}"), Some(JobState::Queued), JobState::Claimed))
        .chain([winner, "n2", "n3", "n4", "n5"].map(|id| (id.to_string(), None, JobState::Queued)))
        .collect();
    want.sort();
    assert_eq!(got, want);
    // The counts moved with exactly the applied writes.
    let counts = store.counts().await.expect("counts");
    let count = |state| counts.iter().filter(|c| c.state == state).map(|c| c.count).sum::<u64>();
    assert_eq!((count(JobState::Queued), count(JobState::Claimed)), (8 + 5, 8));
}

/// Version `version` of a record, as a write expecting the version before.
pub fn record(collection: &str, id: &str, version: u64, body: &str) -> Record {
    Record { collection: collection.into(), id: id.into(), version, body: Bytes::from(body.to_string()) }
}

/// A write of `record` expecting the version before its own.
pub fn put_record(record: &Record) -> Write {
    Write::PutRecord { record: record.clone(), expected_version: record.version.saturating_sub(1) }
}

pub async fn a_record_is_inserted_once<S: Store>(store: S) {
    let first = record("env", "prod", 1, "first");
    assert_eq!(store.get_record("env", "prod").await.expect("get"), None);
    assert_eq!(write_one(&store, put_record(&first)).await, WriteOutcome::Applied);
    assert_eq!(store.get_record("env", "prod").await.expect("get"), Some(first.clone()));
    // A second insert of the key is refused and changes nothing. One of
    // exactly the stored record may pass for a retry of the first (see
    // `Write::PutRecord`), and changes nothing either.
    assert_eq!(write_one(&store, put_record(&record("env", "prod", 1, "second"))).await, WriteOutcome::IdExists);
    let same = write_one(&store, put_record(&first)).await;
    assert!(matches!(same, WriteOutcome::IdExists | WriteOutcome::Applied), "{same:?}");
    assert_eq!(store.get_record("env", "prod").await.expect("get"), Some(first));
    // The same id in another collection is another record; an empty body
    // is a body.
    assert_eq!(store.get_record("release", "prod").await.expect("get"), None);
    let empty = record("release", "prod", 1, "");
    assert_eq!(write_one(&store, put_record(&empty)).await, WriteOutcome::Applied);
    assert_eq!(store.get_record("release", "prod").await.expect("get"), Some(empty));
    assert_eq!(store.get_record("env", "missing").await.expect("get"), None);
}

pub async fn records_are_replaced_only_from_their_stored_version<S: Store>(store: S) {
    write_one(&store, put_record(&record("env", "prod", 1, "v1"))).await;
    let second = record("env", "prod", 2, "v2");
    assert_eq!(write_one(&store, put_record(&second)).await, WriteOutcome::Applied);
    assert_eq!(store.get_record("env", "prod").await.expect("get"), Some(second.clone()));
    // A second writer holding version 1 loses, and is told the version.
    let stale = record("env", "prod", 2, "stale");
    assert_eq!(write_one(&store, put_record(&stale)).await, WriteOutcome::VersionConflict { current_version: Some(2) });
    let ahead = record("env", "prod", 5, "ahead");
    assert_eq!(write_one(&store, put_record(&ahead)).await, WriteOutcome::VersionConflict { current_version: Some(2) });
    // An insert of an existing key is IdExists, a replace of a missing one
    // a conflict with no version.
    assert_eq!(write_one(&store, put_record(&record("env", "prod", 1, "again"))).await, WriteOutcome::IdExists);
    assert_eq!(
        write_one(&store, put_record(&record("env", "ghost", 3, "x"))).await,
        WriteOutcome::VersionConflict { current_version: None }
    );
    assert_eq!(store.get_record("env", "ghost").await.expect("get"), None);
    assert_eq!(store.get_record("env", "prod").await.expect("get"), Some(second));
}

pub async fn a_record_write_of_a_callers_bug_refuses_its_batch<S: Store>(store: S) {
    let fine = record("env", "a", 1, "fine");
    for (version, expected_version) in [(1, 1), (3, 1), (0, 0), (0, u64::MAX)] {
        let bad = Write::PutRecord { record: record("env", "b", version, "bad"), expected_version };
        let err = store.write(vec![put_record(&fine), bad]).await.expect_err("refused");
        assert!(matches!(&err, StoreError::Rejected(m) if m.contains("env/b")), "{err:?}");
        assert!(!err.is_retryable());
    }
    // Nor may its collection or id be empty.
    for (collection, id) in [("", "b"), ("env", "")] {
        let err = store.write(vec![put_record(&fine), put_record(&record(collection, id, 1, "x"))]).await;
        assert!(matches!(&err, Err(StoreError::Rejected(m)) if m.contains("empty")), "{err:?}");
    }
    // Nothing of those batches was written.
    assert_eq!(store.get_record("env", "a").await.expect("get"), None);
    assert_eq!(store.get_record("env", "b").await.expect("get"), None);
}

/// The ids of a listing.
fn record_ids(records: &[Record]) -> Vec<&str> {
    records.iter().map(|r| r.id.as_str()).collect()
}

pub async fn records_list_by_id_within_their_collection_only<S: Store>(store: S) {
    // Bytewise order: upper case before lower, a multi-byte character last.
    let ids = ["b", "Z", "\u{e9}t\u{e9}", "a", "ab", "c"];
    let mut writes: Vec<Write> = ids.iter().map(|id| put_record(&record("env", id, 1, id))).collect();
    // Neighbours: collections that extend or prefix "env", whose keys run
    // together with theirs ("en" + "va" = "env" + "a"), ids that start with
    // the collection's name, and a record of "env" at version 2.
    for (collection, id) in [("en", "va"), ("en", "vz"), ("envy", "a"), ("e", "nva"), ("env\u{0}", "a")] {
        writes.push(put_record(&record(collection, id, 1, "neighbour")));
    }
    writes.push(put_record(&record("env", "env", 1, "own name")));
    let outcomes = store.write(writes).await.expect("write");
    assert!(outcomes.iter().all(|o| *o == WriteOutcome::Applied), "{outcomes:?}");
    write_one(&store, put_record(&record("env", "c", 2, "c again"))).await;

    let list = |order, after: Option<&'static str>, limit| {
        let store = &store;
        async move { store.list_records("env", order, after, limit).await.expect("list") }
    };
    use RecordOrder::{Ascending, Descending};
    let all = list(Ascending, None, 100).await;
    assert_eq!(record_ids(&all), ["Z", "a", "ab", "b", "c", "env", "\u{e9}t\u{e9}"]);
    assert!(all.iter().all(|r| r.collection == "env"));
    let c = all.iter().find(|r| r.id == "c").expect("c");
    assert_eq!((c.version, &c.body[..]), (2, &b"c again"[..]), "records as stored");
    assert_eq!(record_ids(&list(Descending, None, 100).await), ["\u{e9}t\u{e9}", "env", "c", "b", "ab", "a", "Z"]);
    // Limits, and resuming after an id (exclusive), present or not.
    assert_eq!(record_ids(&list(Ascending, None, 2).await), ["Z", "a"]);
    assert_eq!(record_ids(&list(Ascending, Some("a"), 2).await), ["ab", "b"]);
    assert_eq!(record_ids(&list(Ascending, Some("aa"), 2).await), ["ab", "b"]);
    assert_eq!(record_ids(&list(Ascending, Some("env"), 5).await), ["\u{e9}t\u{e9}"]);
    assert_eq!(record_ids(&list(Ascending, Some("\u{e9}t\u{e9}"), 5).await), Vec::<&str>::new());
    assert_eq!(record_ids(&list(Descending, Some("b"), 2).await), ["ab", "a"]);
    assert_eq!(record_ids(&list(Descending, Some("bb"), 1).await), ["b"]);
    assert_eq!(record_ids(&list(Descending, Some("Z"), 5).await), Vec::<&str>::new());
    assert_eq!(record_ids(&list(Descending, Some("zzz"), 2).await), ["env", "c"]);
    assert!(list(Ascending, None, 0).await.is_empty());
    // The neighbours list as their own collections.
    let of = |collection: &'static str| {
        let store = &store;
        async move { store.list_records(collection, Ascending, None, 100).await.expect("list") }
    };
    assert_eq!(record_ids(&of("en").await), ["va", "vz"]);
    assert_eq!(record_ids(&of("e").await), ["nva"]);
    assert_eq!(record_ids(&of("envy").await), ["a"]);
    assert!(of("missing").await.is_empty());
    assert!(of("envx").await.is_empty());
}

pub async fn records_list_past_a_page_of_the_backend<S: Store>(store: S) {
    // 12 records of 200 KiB: more than one 1 MB page of a DynamoDB query.
    let body = "x".repeat(200 << 10);
    for i in 0..12 {
        write_one(&store, put_record(&record("big", &format!("r{i:02}"), 1, &body))).await;
    }
    let all = store.list_records("big", RecordOrder::Ascending, None, 100).await.expect("list");
    assert_eq!(all.len(), 12);
    assert!(all.iter().all(|r| r.body.len() == body.len()));
    let down = store.list_records("big", RecordOrder::Descending, Some("r10"), 7).await.expect("list");
    assert_eq!(record_ids(&down), ["r09", "r08", "r07", "r06", "r05", "r04", "r03"]);
}

pub async fn a_batch_applies_writes_to_one_record_in_order<S: Store>(store: S) {
    let v1 = record("rollout", "r1", 1, "started");
    let v2 = record("rollout", "r1", 2, "halfway");
    let other = record("rollout", "r2", 1, "other");
    let outcomes = store.write(vec![put_record(&v1), put_record(&v2), put_record(&other)]).await.expect("write");
    assert_eq!(outcomes, vec![WriteOutcome::Applied; 3]);
    assert_eq!(store.get_record("rollout", "r1").await.expect("get"), Some(v2));
    // Two writers' replacements of one version in one batch: the first wins.
    let done = record("rollout", "r1", 3, "done");
    let undone = record("rollout", "r1", 3, "rolled back");
    let outcomes = store.write(vec![put_record(&done), put_record(&undone)]).await.expect("write");
    assert_eq!(outcomes, [WriteOutcome::Applied, WriteOutcome::VersionConflict { current_version: Some(3) }]);
    // An insert after the record is there, in the same batch as a replace.
    let v4 = record("rollout", "r1", 4, "final");
    let outcomes = store.write(vec![put_record(&v4), put_record(&v1)]).await.expect("write");
    assert_eq!(outcomes, [WriteOutcome::Applied, WriteOutcome::IdExists]);
    assert_eq!(store.get_record("rollout", "r1").await.expect("get"), Some(v4));
}

fn sample_agent(id: &str) -> Agent {
    Agent {
        id: id.into(),
        name: format!("n-{id}"),
        pool: "p".into(),
        labels: Default::default(),
        slots: 1,
        health: Health::Healthy,
        health_reason: String::new(),
        scheduling: SchedulingStatus::Active,
        version: "1".into(),
        create_time: t(0),
        last_seen_time: t(0),
        metrics: Default::default(),
    }
}

/// An activity entry of `subject` at `at` whose body names it.
pub fn activity(kind: crate::store::ActivityKind, subject: &str, at: SystemTime, body: &str) -> crate::store::Activity {
    crate::store::Activity { kind, subject: subject.into(), time: at, body: bytes::Bytes::from(body.to_string()) }
}

/// Every activity entry after `cursor`, `limit` at a time, and the cursor
/// after them.
pub async fn read_all_activity<S: Store + ?Sized>(
    store: &S,
    mut cursor: EventCursor,
    limit: usize,
) -> (Vec<crate::store::ActivityEvent>, EventCursor) {
    let mut all = Vec::new();
    loop {
        match store.read_activity(&cursor, limit).await.expect("read activity") {
            crate::store::LogRead::Events { events, next } => {
                if events.is_empty() {
                    assert_eq!(next, cursor, "an empty read leaves the cursor");
                    return (all, cursor);
                }
                for e in &events {
                    assert!(e.seq > cursor.positions[e.shard as usize], "an entry at or before the cursor came back");
                }
                all.extend(events);
                cursor = next;
            }
            other => panic!("reading activity from {cursor:?}: {other:?}"),
        }
    }
}

fn bodies(events: &[crate::store::ActivityEvent]) -> Vec<String> {
    events.iter().map(|e| String::from_utf8_lossy(&e.activity.body).into_owned()).collect()
}

pub async fn activity_is_logged_with_its_applied_write_only<S: Store>(store: S) {
    use crate::store::ActivityKind::{Agent as A, Deployment as D};
    let start = store.activity_heads().await.expect("heads");
    assert_eq!(start, EventCursor::start(store.activity_shards()), "a new log is empty");
    // The job log is another log: job events do not show here, nor the
    // other way round.
    let before_jobs = store.event_heads().await.expect("heads");
    let agent = sample_agent("a1");
    let logged = Write::Logged {
        write: Box::new(Write::PutAgent(Box::new(agent.clone()))),
        activity: vec![activity(A, "a1", t(5), "a1 healthy")],
    };
    assert_eq!(write_one(&store, logged).await, WriteOutcome::Applied);
    assert_eq!(store.get_agent("a1").await.expect("get"), Some(agent));
    assert_eq!(store.event_heads().await.expect("heads"), before_jobs);
    // A record write that applies logs its entries; one that loses its
    // condition logs none.
    let v1 = record("deployments/svc", "d1", 1, "v1");
    let logged = |r: &Record, body: &str| Write::Logged {
        write: Box::new(put_record(r)),
        activity: vec![activity(D, "svc/d1", t(6), body), activity(D, "svc/d1", t(6), &format!("{body}+"))],
    };
    assert_eq!(write_one(&store, logged(&v1, "created")).await, WriteOutcome::Applied);
    let other = record("deployments/svc", "d1", 1, "another body");
    assert_eq!(write_one(&store, logged(&other, "again")).await, WriteOutcome::IdExists);
    let stale = record("deployments/svc", "d1", 3, "v3");
    assert!(matches!(write_one(&store, logged(&stale, "stale")).await, WriteOutcome::VersionConflict { .. }));
    let v2 = record("deployments/svc", "d1", 2, "v2");
    assert_eq!(write_one(&store, logged(&v2, "queued")).await, WriteOutcome::Applied);
    assert_eq!(store.get_record("deployments/svc", "d1").await.expect("get"), Some(v2));
    let (events, end) = read_all_activity(&store, start, 100).await;
    let mut seen = bodies(&events);
    seen.sort();
    assert_eq!(seen, ["a1 healthy", "created", "created+", "queued", "queued+"]);
    assert_eq!(store.activity_heads().await.expect("heads"), end);
    let (jobs, _) = read_all(&store, before_jobs, 100).await;
    assert!(jobs.is_empty(), "activity is not in the job log: {jobs:?}");
}

pub async fn activity_reads_from_a_cursor_in_order_per_subject<S: Store>(store: S) {
    use crate::store::ActivityKind::Agent as A;
    let start = store.activity_heads().await.expect("heads");
    // Three subjects, five changes each, written one batch per change.
    for step in 0..5u64 {
        let writes = ["x", "y", "z"]
            .iter()
            .map(|id| Write::Logged {
                write: Box::new(Write::PutAgent(Box::new(sample_agent(id)))),
                activity: vec![activity(A, id, t(step), &format!("{id}{step}"))],
            })
            .collect();
        store.write(writes).await.expect("write");
    }
    // Read two at a time: every entry once, each subject's in order.
    let (events, end) = read_all_activity(&store, start.clone(), 2).await;
    assert_eq!(events.len(), 15);
    for id in ["x", "y", "z"] {
        let of: Vec<String> = bodies(&events).into_iter().filter(|b| b.starts_with(id)).collect();
        assert_eq!(of, (0..5).map(|s| format!("{id}{s}")).collect::<Vec<_>>());
    }
    // From a cursor in the middle, exactly the rest.
    let (first, middle) = {
        let crate::store::LogRead::Events { events, next } = store.read_activity(&start, 4).await.expect("read") else {
            panic!("expected events")
        };
        (events, next)
    };
    let (rest, _) = read_all_activity(&store, middle, 100).await;
    let mut all = bodies(&first);
    all.extend(bodies(&rest));
    all.sort();
    let mut want = bodies(&events);
    want.sort();
    assert_eq!(all, want);
    // A cursor ahead of the log, or of another layout, is refused.
    let mut ahead = end.clone();
    ahead.positions[0] += 100;
    assert_eq!(store.read_activity(&ahead, 10).await.expect("read"), crate::store::LogRead::Unknown);
    let wrong = EventCursor { positions: vec![0; store.activity_shards() as usize + 1] };
    assert!(matches!(store.read_activity(&wrong, 10).await, Err(StoreError::Rejected(_))));
}

pub async fn a_malformed_logged_write_refuses_its_batch<S: Store>(store: S) {
    use crate::store::ActivityKind::Agent as A;
    let ok = Write::PutAgent(Box::new(sample_agent("fine")));
    let cases = [
        // A job write cannot carry activity (it logs job events).
        Write::Logged {
            write: Box::new(Write::create(job("j", 1, "q", None))),
            activity: vec![activity(A, "j", t(1), "x")],
        },
        // Nothing to log.
        Write::Logged { write: Box::new(Write::PutAgent(Box::new(sample_agent("m")))), activity: Vec::new() },
        // Two subjects in one write.
        Write::Logged {
            write: Box::new(Write::PutAgent(Box::new(sample_agent("m")))),
            activity: vec![activity(A, "m", t(1), "x"), activity(A, "other", t(1), "y")],
        },
        // An unnamed subject.
        Write::Logged {
            write: Box::new(Write::PutAgent(Box::new(sample_agent("m")))),
            activity: vec![activity(A, "", t(1), "x")],
        },
    ];
    let start = store.activity_heads().await.expect("heads");
    for case in cases {
        let refused = store.write(vec![ok.clone(), case]).await;
        assert!(matches!(refused, Err(StoreError::Rejected(_))), "{refused:?}");
    }
    assert_eq!(store.get_agent("fine").await.expect("get"), None, "nothing of a refused batch is written");
    assert_eq!(store.get_job("j").await.expect("get"), None);
    assert_eq!(store.activity_heads().await.expect("heads"), start);
}

pub async fn trimmed_activity_answers_expired<S: Store>(store: S) {
    use crate::store::ActivityKind::Agent as A;
    let start = store.activity_heads().await.expect("heads");
    let log = |id: &str, at: u64| Write::Logged {
        write: Box::new(Write::PutAgent(Box::new(sample_agent(id)))),
        activity: vec![activity(A, id, t(at), id)],
    };
    store.write((0..4u64).map(|i| log(&format!("old{i}"), i)).collect()).await.expect("write");
    let after_old = store.activity_heads().await.expect("heads");
    store.write((0..4u64).map(|i| log(&format!("young{i}"), 1000 + i)).collect()).await.expect("write");
    let mut trimmed = 0;
    loop {
        let pass = store.trim_events(t(500), 1).await.expect("trim");
        trimmed += pass.groups;
        if !pass.more {
            break;
        }
    }
    assert_eq!(trimmed, 4, "the old groups, and only those");
    assert_eq!(store.read_activity(&start, 100).await.expect("read"), crate::store::LogRead::Expired);
    let (rest, _) = read_all_activity(&store, after_old, 100).await;
    let mut seen = bodies(&rest);
    seen.sort();
    assert_eq!(seen, ["young0", "young1", "young2", "young3"]);
}
