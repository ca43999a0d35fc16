//! The state-changing job writes of one batch that fall in one event shard,
//! several per transaction behind one advance of the shard's head.
//!
//! A shard's head takes one transaction at a time (across replicas), so one
//! transaction per job write made the head the bottleneck of every replica's
//! commits (measured: three replicas on DynamoDB Local fell minutes behind
//! and let leases expire). Here up to [`MAX_JOBS`] job writes share one
//! `TransactWriteItems`: each job's conditional put (and, for a create, its
//! idempotency key), the jobs' count changes summed per count item (a
//! transaction may not touch one item twice), one event group per job, and
//! the head. A job whose condition fails gets its own outcome (exactly as a
//! lone write would) and the others are sent again without it.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem};
use futures::future::try_join_all;
use rand::Rng;

use super::errors::{classify, is_conflict_code};
use super::events::head_in;
use super::items::{compose, get_n, get_s, job_item, key_of, n, s, CountKey, Item};
use super::writes::{build_error, count_key_of, recognise, request_token, CONFLICT_TRIES, HEAD_TRIES};
use super::DynamoStore;
use crate::domain::Job;
use crate::store::{StoreError, StoreResult, Transition, Write, WriteOutcome};

/// Job writes per transaction: each takes up to three items (put, key,
/// group) besides the shared counts and head, within DynamoDB's 100.
const MAX_JOBS: usize = 24;
/// Record bytes per transaction, within DynamoDB's 4 MB per request (a
/// job's record and its group, which holds the record again).
const MAX_BYTES: usize = 1536 * 1024;

/// One job write ready to join a transaction.
struct Ready<'a> {
    index: usize,
    job: &'a Job,
    events: &'a [Transition],
    create: bool,
    /// The stored version an update expects.
    expected: u64,
    item: Item,
    body: Vec<u8>,
    /// Where the stored job is counted (`None` for a create).
    old_key: Option<CountKey>,
}

/// What an item of a transaction is, to read its cancellation reason.
#[derive(Clone, Copy)]
enum Role {
    Job(usize),
    Key(usize),
    Other,
    Head,
}

impl DynamoStore {
    /// Applies `writes` (job writes with events, all of `shard`, one per
    /// job) and returns each one's outcome with its index.
    pub(super) async fn apply_shard(
        &self,
        shard: u32,
        writes: Vec<(usize, &Write)>,
    ) -> StoreResult<Vec<(usize, WriteOutcome)>> {
        let mut outcomes = Vec::with_capacity(writes.len());
        // Updates read their stored job first, all at once: its version
        // decides at once, and its count key is the one the write moves.
        let reads = try_join_all(writes.iter().map(|(index, write)| self.prepare(*index, write))).await?;
        let mut pending = Vec::new();
        for read in reads {
            match read {
                Ok(ready) => pending.push(ready),
                Err(done) => outcomes.push(done),
            }
        }
        while !pending.is_empty() {
            let mut bytes = 0;
            let mut take = 0;
            // One item once per transaction: two creates of one idempotency
            // key go in different ones (the second then finds it taken).
            let mut keys = std::collections::HashSet::new();
            while take < pending.len() && take < MAX_JOBS {
                let r = &pending[take];
                bytes += 2 * r.body.len();
                let key = r.job.spec.idempotency_key.as_ref().filter(|_| r.create).map(|k| (&r.job.spec.queue, k));
                if take > 0 && (bytes > MAX_BYTES || key.is_some_and(|k| !keys.insert(k))) {
                    break;
                }
                take += 1;
            }
            let chunk: Vec<Ready<'_>> = pending.drain(..take).collect();
            outcomes.extend(self.commit_chunk(shard, chunk).await?);
        }
        Ok(outcomes)
    }

    async fn prepare<'a>(
        &self,
        index: usize,
        write: &'a Write,
    ) -> StoreResult<Result<Ready<'a>, (usize, WriteOutcome)>> {
        let (job, events, expected) = match write {
            Write::CreateJob { job, events } => (job.as_ref(), events.as_slice(), None),
            Write::UpdateJob { job, expected_version, events } => {
                (job.as_ref(), events.as_slice(), Some(*expected_version))
            }
            _ => return Err(StoreError::Rejected("only job writes are batched per event shard".into())),
        };
        let (item, body) = job_item(job)?;
        let mut old_key = None;
        if let Some(expected) = expected {
            let Some(stored) = self.get_item(&self.tables.jobs, key_of("id", job.id.clone()), "job").await? else {
                return Ok(Err((index, WriteOutcome::VersionConflict { current_version: None })));
            };
            if get_n(&stored, "v")? != expected {
                // Possibly this very write, applied by a try whose reply was lost.
                return Ok(Err((index, recognise(job, &body, Some(&stored)))));
            }
            old_key = Some(count_key_of(&stored)?);
        }
        Ok(Ok(Ready {
            index,
            job,
            events,
            create: expected.is_none(),
            expected: expected.unwrap_or(0),
            item,
            body,
            old_key,
        }))
    }

    /// One transaction for `chunk`, sent again without the jobs whose
    /// condition failed until the rest applies.
    async fn commit_chunk(&self, shard: u32, mut chunk: Vec<Ready<'_>>) -> StoreResult<Vec<(usize, WriteOutcome)>> {
        let mut outcomes = Vec::new();
        let (mut conflicts, mut head_rounds) = (0u32, 0u32);
        loop {
            if chunk.is_empty() {
                return Ok(outcomes);
            }
            if conflicts >= CONFLICT_TRIES || head_rounds >= HEAD_TRIES {
                return Err(StoreError::Unavailable(format!(
                    "job writes of event shard {shard}: still conflicting after {conflicts} tries ({head_rounds} on a \
                     moving event head)"
                )));
            }
            let mut head = self.heads.shard(shard).lock().await;
            let known = self.known_head(shard, &mut head).await?;
            let (items, roles, new_head) = self.chunk_items(shard, &chunk, known)?;
            let sent = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items))
                // The SDK's own retries reuse it: a transaction whose reply
                // was lost is not applied (and its groups not logged) twice.
                .client_request_token(request_token())
                .send()
                .await;
            let e = match sent {
                Ok(_) => {
                    *head = Some(new_head);
                    outcomes.extend(chunk.iter().map(|r| (r.index, WriteOutcome::Applied)));
                    return Ok(outcomes);
                }
                Err(e) => e,
            };
            let reasons = match e.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(c)) => c.cancellation_reasons().to_vec(),
                Some(s) if s.is_transaction_in_progress_exception() => Vec::new(),
                _ => return Err(classify("TransactWriteItems job writes", e)),
            };
            let failed = |r: &aws_sdk_dynamodb::types::CancellationReason| r.code() == Some("ConditionalCheckFailed");
            // The jobs' own conditions decide first: each failed one gets the
            // outcome a lone write would, and leaves the chunk.
            let mut settled: BTreeMap<usize, WriteOutcome> = BTreeMap::new();
            for (reason, role) in reasons.iter().zip(&roles) {
                if !failed(reason) {
                    continue;
                }
                match *role {
                    Role::Job(i) => {
                        let r = &chunk[i];
                        let outcome =
                            if r.create { WriteOutcome::IdExists } else { recognise(r.job, &r.body, reason.item()) };
                        settled.insert(i, outcome);
                    }
                    Role::Key(i) => {
                        if settled.contains_key(&i) {
                            continue;
                        }
                        let holder = reason.item().and_then(|item| get_s(item, "job_id").ok()).map(str::to_string);
                        let existing_job_id = match holder {
                            Some(id) => id,
                            None => self.idempotency_holder(chunk[i].job).await?.unwrap_or_default(),
                        };
                        settled.insert(i, WriteOutcome::IdempotencyKeyTaken { existing_job_id });
                    }
                    Role::Head | Role::Other => {}
                }
            }
            if !settled.is_empty() {
                drop(head);
                let mut i = 0;
                chunk.retain(|r| {
                    let keep = !settled.contains_key(&i);
                    if !keep {
                        outcomes.push((r.index, settled[&i].clone()));
                    }
                    i += 1;
                    keep
                });
                continue;
            }
            let head_index = roles.iter().position(|r| matches!(r, Role::Head));
            let head_reason = head_index.and_then(|i| reasons.get(i));
            if head_reason.is_some_and(failed) {
                *head = head_in(head_reason.and_then(|r| r.item()));
                drop(head);
                head_rounds += 1;
                metrics::counter!("tether_store_event_head_retries_total").increment(1);
                pause_after_stale_head(head_rounds).await;
                continue;
            }
            let only_head_busy = head_reason.is_some_and(|r| is_conflict_code(r.code()))
                && reasons
                    .iter()
                    .enumerate()
                    .all(|(i, r)| Some(i) == head_index || matches!(r.code(), None | Some("None")));
            if only_head_busy {
                *head = None;
                drop(head);
                head_rounds += 1;
                metrics::counter!("tether_store_event_head_retries_total").increment(1);
                pause_after_stale_head(head_rounds).await;
                continue;
            }
            if reasons.is_empty() || reasons.iter().any(|r| is_conflict_code(r.code())) {
                drop(head);
                let ceiling = 2u64.saturating_pow(conflicts.min(7)).saturating_mul(2);
                conflicts += 1;
                let pause = rand::rng().random_range(1..=ceiling);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                continue;
            }
            return Err(StoreError::Rejected(format!(
                "job writes of event shard {shard}: transaction cancelled: {reasons:?}"
            )));
        }
    }

    /// The items of one transaction for `chunk` after `head`, what each is,
    /// and the head after it.
    fn chunk_items(
        &self,
        shard: u32,
        chunk: &[Ready<'_>],
        head: u64,
    ) -> StoreResult<(Vec<TransactWriteItem>, Vec<Role>, u64)> {
        let mut items = Vec::new();
        let mut roles = Vec::new();
        let mut counts: BTreeMap<CountKey, i64> = BTreeMap::new();
        for (i, r) in chunk.iter().enumerate() {
            let mut put = Put::builder().table_name(&self.tables.jobs).set_item(Some(r.item.clone()));
            put = match r.create {
                true => put.condition_expression("attribute_not_exists(id)"),
                false => {
                    put.condition_expression("v = :expected").expression_attribute_values(":expected", n(r.expected))
                }
            };
            let put = put
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                .build()
                .map_err(build_error)?;
            items.push(TransactWriteItem::builder().put(put).build());
            roles.push(Role::Job(i));
            if let (true, Some(key)) = (r.create, &r.job.spec.idempotency_key) {
                let key_item = Item::from([
                    ("key".to_string(), s(compose(&[&r.job.spec.queue, key]))),
                    ("job_id".to_string(), s(r.job.id.clone())),
                    ("sv".to_string(), n(super::items::SCHEMA_VERSION)),
                ]);
                let put = Put::builder()
                    .table_name(&self.tables.idempotency_keys)
                    .set_item(Some(key_item))
                    .condition_expression("attribute_not_exists(#k)")
                    .expression_attribute_names("#k", "key")
                    .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
                    .build()
                    .map_err(build_error)?;
                items.push(TransactWriteItem::builder().put(put).build());
                roles.push(Role::Key(i));
            }
            let new_key = CountKey::of(r.job);
            match &r.old_key {
                None => *counts.entry(new_key).or_default() += 1,
                Some(old) if *old != new_key => {
                    *counts.entry(old.clone()).or_default() -= 1;
                    *counts.entry(new_key).or_default() += 1;
                }
                Some(_) => {}
            }
        }
        for (key, delta) in counts.into_iter().filter(|(_, d)| *d != 0) {
            items.push(self.count_update(&key, shard, delta)?);
            roles.push(Role::Other);
        }
        let mut next = head;
        for r in chunk {
            if let Some((put, last)) = self.group_put(r.job, r.events, shard, next + 1)? {
                items.push(put);
                roles.push(Role::Other);
                next = last;
            }
        }
        items.push(self.head_advance(shard, head, next)?);
        roles.push(Role::Head);
        Ok((items, roles, next))
    }
}

/// After a stale head: at once the first time, then short jittered pauses
/// so replicas writing one shard do not retry in lockstep.
async fn pause_after_stale_head(round: u32) {
    if round > 1 {
        let pause = rand::rng().random_range(0..=u64::from(round.min(16)) * 500);
        tokio::time::sleep(Duration::from_micros(pause)).await;
    }
}
