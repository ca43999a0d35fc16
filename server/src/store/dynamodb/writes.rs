//! Conditional writes. Each domain write becomes one conditional request (a
//! transaction when a job count moves with it); a failed condition is an
//! outcome, and a write whose reply was lost is recognised on retry.

use std::time::Duration;

use aws_sdk_dynamodb::types::{Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem, Update};
use rand::Rng;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};

use super::errors::{classify, condition_failed, is_conflict_code};
use super::events::{head_in, Log};
use super::items::{
    compose, control_record_item, get_b, get_n, job_item, key_of, n, record_item, s, shard_of, CountKey, Item,
};
use super::DynamoStore;
use crate::domain::{Job, Pool};
use crate::store::codec::{encode, encode_log, priority_code};
use crate::store::{Activity, LogChunk, Record, StoreError, StoreResult, Transition, Write, WriteOutcome};

/// Tries of a write that meets another transaction on one of its items.
pub(super) const CONFLICT_TRIES: u32 = 12;
/// Tries of a write whose event shard's head another replica keeps moving:
/// each failed try learns the real head, so it only loses to writes that
/// committed meanwhile; the pauses are short and jittered so two replicas
/// writing one shard do not retry in lockstep.
pub(super) const HEAD_TRIES: u32 = 100;

/// What one try of a write came to.
enum Try<T> {
    Done(T),
    /// Another transaction held an item: try again after a pause.
    Conflict,
    /// The event shard's head had moved (another replica logged events in
    /// it) or was being moved by another transaction; the cache now holds
    /// the real head (or nothing, to read it): try again soon.
    StaleHead,
}

/// Runs `attempt` until it is not a conflict, with jittered exponential
/// backoff between tries.
async fn retry_conflicts<T, F, Fut>(what: &str, mut attempt: F) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = StoreResult<Try<T>>>,
{
    let (mut round, mut head_rounds) = (0, 0);
    while round < CONFLICT_TRIES && head_rounds < HEAD_TRIES {
        match attempt().await? {
            Try::Done(value) => return Ok(value),
            Try::StaleHead => {
                head_rounds += 1;
                metrics::counter!("tether_store_event_head_retries_total").increment(1);
                if head_rounds > 1 {
                    let pause = rand::rng().random_range(0..=u64::from(head_rounds.min(16)) * 500);
                    tokio::time::sleep(Duration::from_micros(pause)).await;
                }
            }
            Try::Conflict => {
                let ceiling = 2u64.saturating_pow(round.min(7)).saturating_mul(2);
                round += 1;
                let pause = rand::rng().random_range(1..=ceiling);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    }
    Err(StoreError::Unavailable(format!(
        "{what}: still conflicting after {round} tries ({head_rounds} on a moving event head)"
    )))
}

/// For writes whose failed condition means there is nothing left to do.
fn done_unless_error<T, E, R>(op: &str, result: Result<T, SdkError<E, R>>) -> StoreResult<WriteOutcome>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    match result {
        Err(e) if !condition_failed(&e) => Err(classify(op, e)),
        _ => Ok(WriteOutcome::Applied),
    }
}

pub(super) fn build_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Rejected(format!("building a DynamoDB request: {e}"))
}

pub(super) fn request_token() -> String {
    uuid::Uuid::now_v7().to_string()
}

impl DynamoStore {
    pub(super) async fn apply(&self, write: &Write) -> StoreResult<WriteOutcome> {
        match write {
            Write::CreateJob { job, events } => self.create_job(job, events).await,
            Write::UpdateJob { job, expected_version, events } => self.update_job(job, *expected_version, events).await,
            Write::PutAgent(agent) => self.put(&self.tables.agents, agent_item(agent)?).await,
            Write::CreatePool(pool) => self.create_pool(pool).await,
            Write::PutPool(pool) => {
                let body = encode(pool.as_ref())?;
                self.put(&self.tables.pools, record_item(&[("name", pool.name.clone())], body)).await
            }
            Write::DeletePool { name } => {
                self.client
                    .delete_item()
                    .table_name(&self.tables.pools)
                    .set_key(Some(key_of("name", name.clone())))
                    .send()
                    .await
                    .map_err(|e| classify("DeleteItem pool", e))?;
                Ok(WriteOutcome::Applied)
            }
            Write::AppendLog(chunk) => self.append_log(chunk).await,
            Write::RaiseCounter { name, value } => self.raise_counter(name, *value).await,
            Write::PutRecord { record, expected_version } => self.put_record(record, *expected_version).await,
            Write::Logged { write, activity } => self.logged(write, activity).await,
        }
    }

    /// An agent or record put and its activity in one transaction with the
    /// activity shard's head, tried again while only the head moved.
    async fn logged(&self, write: &Write, activity: &[Activity]) -> StoreResult<WriteOutcome> {
        let subject = activity.first().map_or("", |a| a.subject.as_str());
        let partition = Log::Activity.partition(shard_of(subject));
        let put = match write {
            Write::PutAgent(agent) => {
                Put::builder().table_name(&self.tables.agents).set_item(Some(agent_item(agent)?)).build()
            }
            Write::PutRecord { record, expected_version } => {
                let put = Put::builder()
                    .table_name(&self.tables.records)
                    .set_item(Some(control_record_item(record)))
                    .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
                match expected_version {
                    0 => put
                        .condition_expression("attribute_not_exists(#c)")
                        .expression_attribute_names("#c", "collection"),
                    v => put.condition_expression("v = :expected").expression_attribute_values(":expected", n(*v)),
                }
                .build()
            }
            other => return Err(StoreError::Rejected(format!("a logged write cannot carry {other:?}"))),
        }
        .map_err(build_error)?;
        let put = TransactWriteItem::builder().put(put).build();
        retry_conflicts("logged write", || async {
            let mut head = self.heads.shard(partition).lock().await;
            let known = self.known_head(partition, &mut head).await?;
            let append = self.activity_items(activity, partition, known)?;
            let [group, advance] = append.items;
            let sent = self
                .client
                .transact_write_items()
                .set_transact_items(Some(vec![put.clone(), group, advance]))
                .client_request_token(request_token())
                .send()
                .await;
            let e = match sent {
                Ok(_) => {
                    *head = Some(append.new_head);
                    return Ok(Try::Done(WriteOutcome::Applied));
                }
                Err(e) => e,
            };
            const HEAD: usize = 2;
            match e.as_service_error() {
                Some(aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(c)) => {
                    let reasons = c.cancellation_reasons();
                    // The write's own condition decides first, as a job's does.
                    if reasons.first().and_then(|r| r.code()) == Some("ConditionalCheckFailed") {
                        return match write {
                            Write::PutRecord { record, expected_version } => Ok(Try::Done(record_refused(
                                record,
                                *expected_version,
                                reasons.first().and_then(|r| r.item()),
                            ))),
                            _ => Err(StoreError::Rejected(format!("an agent put failed a condition: {reasons:?}"))),
                        };
                    }
                    if reasons.get(HEAD).and_then(|r| r.code()) == Some("ConditionalCheckFailed") {
                        *head = head_in(reasons.get(HEAD).and_then(|r| r.item()));
                        return Ok(Try::StaleHead);
                    }
                    if head_busy(reasons, HEAD) {
                        *head = None;
                        return Ok(Try::StaleHead);
                    }
                    if reasons.iter().any(|r| is_conflict_code(r.code())) {
                        return Ok(Try::Conflict);
                    }
                    Err(StoreError::Rejected(format!("logged write of {subject}: transaction cancelled: {reasons:?}")))
                }
                Some(s) if s.is_transaction_in_progress_exception() => Ok(Try::Conflict),
                _ => Err(classify("TransactWriteItems logged write", e)),
            }
        })
        .await
    }

    async fn put(&self, table: &str, item: Item) -> StoreResult<WriteOutcome> {
        retry_conflicts("PutItem", || async {
            match self.client.put_item().table_name(table).set_item(Some(item.clone())).send().await {
                Ok(_) => Ok(Try::Done(WriteOutcome::Applied)),
                Err(e) if e.as_service_error().is_some_and(|s| s.is_transaction_conflict_exception()) => {
                    Ok(Try::Conflict)
                }
                Err(e) => Err(classify("PutItem", e)),
            }
        })
        .await
    }

    /// A pool put on condition that its name is free. A refusal whose
    /// stored pool is this very one is this write, applied by a try whose
    /// reply was lost (a pool's record carries its creation time).
    async fn create_pool(&self, pool: &Pool) -> StoreResult<WriteOutcome> {
        let body = encode(pool)?;
        let item = record_item(&[("name", pool.name.clone())], body.clone());
        retry_conflicts("PutItem pool", || async {
            let sent = self
                .client
                .put_item()
                .table_name(&self.tables.pools)
                .set_item(Some(item.clone()))
                .condition_expression("attribute_not_exists(#n)")
                .expression_attribute_names("#n", "name")
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                .send()
                .await;
            match sent {
                Ok(_) => Ok(Try::Done(WriteOutcome::Applied)),
                Err(e) => match e.as_service_error() {
                    Some(aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(c)) => {
                        let ours = c.item().and_then(|stored| get_b(stored, "b").ok()) == Some(body.as_slice());
                        Ok(Try::Done(if ours { WriteOutcome::Applied } else { WriteOutcome::IdExists }))
                    }
                    Some(s) if s.is_transaction_conflict_exception() => Ok(Try::Conflict),
                    _ => Err(classify("PutItem pool", e)),
                },
            }
        })
        .await
    }

    /// A record put on condition that its key is free (`expected` 0) or
    /// that its stored version is `expected`. A refusal returns the stored
    /// item: one holding this very version and body is this write, applied
    /// by a try whose reply was lost.
    async fn put_record(&self, record: &Record, expected: u64) -> StoreResult<WriteOutcome> {
        let item = control_record_item(record);
        retry_conflicts("PutItem record", || async {
            let request = self
                .client
                .put_item()
                .table_name(&self.tables.records)
                .set_item(Some(item.clone()))
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
            // `collection` is a reserved word in expressions.
            let request = match expected {
                0 => request
                    .condition_expression("attribute_not_exists(#c)")
                    .expression_attribute_names("#c", "collection"),
                _ => {
                    request.condition_expression("v = :expected").expression_attribute_values(":expected", n(expected))
                }
            };
            match request.send().await {
                Ok(_) => Ok(Try::Done(WriteOutcome::Applied)),
                Err(e) => match e.as_service_error() {
                    Some(aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(c)) => {
                        Ok(Try::Done(record_refused(record, expected, c.item())))
                    }
                    Some(s) if s.is_transaction_conflict_exception() => Ok(Try::Conflict),
                    _ => Err(classify("PutItem record", e)),
                },
            }
        })
        .await
    }

    async fn append_log(&self, chunk: &LogChunk) -> StoreResult<WriteOutcome> {
        let mut item =
            record_item(&[("attempt", compose(&[&chunk.job_id, &chunk.attempt.to_string()]))], encode_log(chunk)?);
        item.insert("seq".to_string(), n(chunk.sequence));
        let result = self
            .client
            .put_item()
            .table_name(&self.tables.logs)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(seq)")
            .send()
            .await;
        // A chunk already stored is a retry or a duplicate: ignored.
        done_unless_error("PutItem log", result)
    }

    async fn raise_counter(&self, name: &str, value: u64) -> StoreResult<WriteOutcome> {
        let result = self
            .client
            .update_item()
            .table_name(&self.tables.meta)
            .key("pk", s("counter"))
            .key("sk", s(name))
            .update_expression("SET v = :v")
            .condition_expression("attribute_not_exists(v) OR v < :v")
            .expression_attribute_values(":v", n(value))
            .send()
            .await;
        // Not higher than the stored mark: nothing to raise.
        done_unless_error("UpdateItem counter", result)
    }

    pub(super) fn count_update(&self, key: &CountKey, shard: u32, delta: i64) -> StoreResult<TransactWriteItem> {
        let update = Update::builder()
            .table_name(&self.tables.meta)
            .set_key(Some(key.item_key(shard)))
            .update_expression("ADD n :d SET q = :q, sc = :sc, pc = :pc")
            .expression_attribute_values(":d", n(delta))
            .expression_attribute_values(":q", s(key.queue.clone()))
            .expression_attribute_values(":sc", n(key.state.code()))
            .expression_attribute_values(":pc", n(priority_code(key.priority)))
            .build()
            .map_err(build_error)?;
        Ok(TransactWriteItem::builder().update(update).build())
    }

    /// One transaction: the job (if absent), its idempotency key (if any and
    /// free), its count, and its events with their shard's head.
    async fn create_job(&self, job: &Job, events: &[Transition]) -> StoreResult<WriteOutcome> {
        let (item, _) = job_item(job)?;
        let shard = shard_of(&job.id);
        let mut items = vec![TransactWriteItem::builder()
            .put(
                Put::builder()
                    .table_name(&self.tables.jobs)
                    .set_item(Some(item))
                    .condition_expression("attribute_not_exists(id)")
                    .build()
                    .map_err(build_error)?,
            )
            .build()];
        if let Some(key) = &job.spec.idempotency_key {
            let key_item = Item::from([
                ("key".to_string(), s(compose(&[&job.spec.queue, key]))),
                ("job_id".to_string(), s(job.id.clone())),
                ("sv".to_string(), n(super::items::SCHEMA_VERSION)),
            ]);
            items.push(
                TransactWriteItem::builder()
                    .put(
                        Put::builder()
                            .table_name(&self.tables.idempotency_keys)
                            .set_item(Some(key_item))
                            .condition_expression("attribute_not_exists(#k)")
                            .expression_attribute_names("#k", "key")
                            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                            .build()
                            .map_err(build_error)?,
                    )
                    .build(),
            );
        }
        items.push(self.count_update(&CountKey::of(job), shard, 1)?);
        let head_index = items.len() + 1;
        retry_conflicts("create job", || async {
            // Held until the transaction is answered: this handle's event
            // writes of one shard must not race on its head.
            let mut head = self.heads.shard(shard).lock().await;
            let mut items = items.clone();
            let new_head = self.append_events(&mut items, job, events, shard, &mut head).await?;
            let sent = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items))
                // The SDK's own retries reuse this token: a create whose
                // reply was lost is not applied twice.
                .client_request_token(request_token())
                .send()
                .await;
            let e = match sent {
                Ok(_) => {
                    if new_head.is_some() {
                        *head = new_head;
                    }
                    return Ok(Try::Done(WriteOutcome::Applied));
                }
                Err(e) => e,
            };
            let Some(reasons) =
                e.as_service_error().filter(|s| s.is_transaction_canceled_exception()).and_then(|s| match s {
                    aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(c) => {
                        Some(c.cancellation_reasons().to_vec())
                    }
                    _ => None,
                })
            else {
                if e.as_service_error().is_some_and(|s| s.is_transaction_in_progress_exception()) {
                    return Ok(Try::Conflict);
                }
                return Err(classify("TransactWriteItems create job", e));
            };
            let failed = |i: usize| reasons.get(i).and_then(|r| r.code()) == Some("ConditionalCheckFailed");
            if failed(0) {
                return Ok(Try::Done(WriteOutcome::IdExists));
            }
            if job.spec.idempotency_key.is_some() && failed(1) {
                let holder = reasons.get(1).and_then(|r| r.item()).and_then(|item| super::items::get_s(item, "job_id").ok());
                let existing_job_id = match holder {
                    Some(id) => id.to_string(),
                    None => self.idempotency_holder(job).await?.unwrap_or_default(),
                };
                return Ok(Try::Done(WriteOutcome::IdempotencyKeyTaken { existing_job_id }));
            }
            if new_head.is_some() && failed(head_index) {
                *head = head_in(reasons.get(head_index).and_then(|r| r.item()));
                return Ok(Try::StaleHead);
            }
            if new_head.is_some() && head_busy(&reasons, head_index) {
                *head = None;
                return Ok(Try::StaleHead);
            }
            if reasons.iter().any(|r| is_conflict_code(r.code())) {
                return Ok(Try::Conflict);
            }
            Err(StoreError::Rejected(format!("create job {}: transaction cancelled: {reasons:?}", job.id)))
        })
        .await
    }

    pub(super) async fn idempotency_holder(&self, job: &Job) -> StoreResult<Option<String>> {
        let Some(key) = &job.spec.idempotency_key else { return Ok(None) };
        let key = key_of("key", compose(&[&job.spec.queue, key]));
        let stored = self.get_item(&self.tables.idempotency_keys, key, "idempotency key").await?;
        Ok(stored.as_ref().and_then(|item| super::items::get_s(item, "job_id").ok()).map(str::to_string))
    }

    /// Replaces the job if its stored version is `expected`. When its count
    /// moves (state, queue or priority changed) the count moves in the same
    /// transaction, and so do its events, with their shard's head.
    async fn update_job(&self, job: &Job, expected: u64, events: &[Transition]) -> StoreResult<WriteOutcome> {
        let (item, body) = job_item(job)?;
        let shard = shard_of(&job.id);
        let new_key = CountKey::of(job);
        retry_conflicts("update job", || async {
            // The stored item, read strongly: the write below is conditional
            // on its version, so the count read here is the one replaced.
            // (A projection would not read fewer units.)
            let Some(stored) = self.get_item(&self.tables.jobs, key_of("id", job.id.clone()), "job").await? else {
                return Ok(Try::Done(WriteOutcome::VersionConflict { current_version: None }));
            };
            if get_n(&stored, "v")? != expected {
                // Possibly this very write, applied by a try whose reply was lost.
                return Ok(Try::Done(recognise(job, &body, Some(&stored))));
            }
            let old_key = count_key_of(&stored)?;
            if old_key == new_key && events.is_empty() {
                let sent = self
                    .client
                    .put_item()
                    .table_name(&self.tables.jobs)
                    .set_item(Some(item.clone()))
                    .condition_expression("v = :expected")
                    .expression_attribute_values(":expected", n(expected))
                    .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                    .send()
                    .await;
                return match sent {
                    Ok(_) => Ok(Try::Done(WriteOutcome::Applied)),
                    Err(e) => match e.as_service_error() {
                        Some(aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(c)) => {
                            Ok(Try::Done(recognise(job, &body, c.item())))
                        }
                        Some(s) if s.is_transaction_conflict_exception() => Ok(Try::Conflict),
                        _ => Err(classify("PutItem job", e)),
                    },
                };
            }
            let put = Put::builder()
                .table_name(&self.tables.jobs)
                .set_item(Some(item.clone()))
                .condition_expression("v = :expected")
                .expression_attribute_values(":expected", n(expected))
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                .build()
                .map_err(build_error)?;
            let mut items = vec![TransactWriteItem::builder().put(put).build()];
            if old_key != new_key {
                items.push(self.count_update(&old_key, shard, -1)?);
                items.push(self.count_update(&new_key, shard, 1)?);
            }
            let head_index = items.len() + 1;
            // Held until the transaction is answered (see create_job).
            let mut head = self.heads.shard(shard).lock().await;
            let new_head = self.append_events(&mut items, job, events, shard, &mut head).await?;
            let sent = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items))
                .client_request_token(request_token())
                .send()
                .await;
            let e = match sent {
                Ok(_) => {
                    if new_head.is_some() {
                        *head = new_head;
                    }
                    return Ok(Try::Done(WriteOutcome::Applied));
                }
                Err(e) => e,
            };
            match e.as_service_error() {
                Some(aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(c)) => {
                    let reasons = c.cancellation_reasons();
                    // The job's condition decides first: a lost race is the
                    // job's conflict even if the head had moved too.
                    if reasons.first().and_then(|r| r.code()) == Some("ConditionalCheckFailed") {
                        return Ok(Try::Done(recognise(job, &body, reasons.first().and_then(|r| r.item()))));
                    }
                    let head_failed = reasons.get(head_index).and_then(|r| r.code()) == Some("ConditionalCheckFailed");
                    if new_head.is_some() && head_failed {
                        *head = head_in(reasons.get(head_index).and_then(|r| r.item()));
                        return Ok(Try::StaleHead);
                    }
                    if new_head.is_some() && head_busy(reasons, head_index) {
                        *head = None;
                        return Ok(Try::StaleHead);
                    }
                    if reasons.iter().any(|r| is_conflict_code(r.code())) {
                        return Ok(Try::Conflict);
                    }
                    Err(StoreError::Rejected(format!("update job {}: transaction cancelled: {reasons:?}", job.id)))
                }
                Some(s) if s.is_transaction_in_progress_exception() => Ok(Try::Conflict),
                _ => Err(classify("TransactWriteItems update job", e)),
            }
        })
        .await
    }
}

/// An agent's item.
fn agent_item(agent: &crate::domain::Agent) -> StoreResult<super::items::Item> {
    let body = encode(agent)?;
    let keys = [("id", agent.id.clone()), ("pool_name", compose(&[&agent.pool, &agent.name]))];
    Ok(record_item(&keys, body))
}

/// Whether a transaction was cancelled only because another transaction
/// held its event shard's head (another replica logging in that shard):
/// head contention, not a conflict of the job.
fn head_busy(reasons: &[aws_sdk_dynamodb::types::CancellationReason], head_index: usize) -> bool {
    reasons.get(head_index).is_some_and(|r| is_conflict_code(r.code()))
        && reasons.iter().enumerate().all(|(i, r)| i == head_index || matches!(r.code(), None | Some("None")))
}

/// A failed condition whose stored item is exactly what this write stores
/// is this write, applied by an attempt whose reply was lost.
pub(super) fn recognise(job: &Job, body: &[u8], stored: Option<&Item>) -> WriteOutcome {
    let version = stored.and_then(|i| get_n(i, "v").ok());
    let ours = version == Some(job.version) && stored.and_then(|i| get_b(i, "b").ok()) == Some(body);
    if ours {
        WriteOutcome::Applied
    } else {
        WriteOutcome::VersionConflict { current_version: version }
    }
}

/// The outcome of a record put whose condition failed on `stored` (the old
/// item, if any): `Applied` if it holds exactly this write (a retry of a
/// try whose reply was lost), else the conflict.
fn record_refused(record: &Record, expected: u64, stored: Option<&Item>) -> WriteOutcome {
    let version = stored.and_then(|i| get_n(i, "v").ok());
    let ours = version == Some(record.version) && stored.and_then(|i| get_b(i, "b").ok()) == Some(&record.body[..]);
    match (ours, expected) {
        (true, _) => WriteOutcome::Applied,
        (false, 0) => WriteOutcome::IdExists,
        (false, _) => WriteOutcome::VersionConflict { current_version: version },
    }
}

/// Where a stored job item is counted.
pub(super) fn count_key_of(item: &Item) -> StoreResult<CountKey> {
    Ok(CountKey {
        queue: super::items::get_s(item, "q")?.to_string(),
        state: crate::store::codec::state_from_code(code(item, "sc")?)?,
        priority: crate::store::codec::priority_from_code(code(item, "pc")?)?,
    })
}

fn code(item: &Item, name: &str) -> StoreResult<u8> {
    u8::try_from(get_n(item, name)?).map_err(|_| StoreError::Corrupt(format!("item attribute {name} out of range")))
}
