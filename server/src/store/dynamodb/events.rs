//! The job event log on DynamoDB (`docs/dynamodb.md`, "events").
//!
//! One partition per job shard ([`shard_of`](super::items::shard_of): all
//! events of a job are in one shard). Each shard has a *head item*
//! (`seq` = 0) holding `head`, the last sequence number used, and `lw`, the
//! low-water mark. Job writes that carry events commit in a transaction
//! with their event items (one group per job write, keyed by its last
//! sequence number) and the head, advanced on condition that it is still
//! what this replica believes (`shard_batch.rs` puts up to 24 job writes of
//! one shard in one such transaction; `writes.rs` sends a lone one). So a shard's head passes a group only when
//! the group commits, sequence order is commit order, and a strongly
//! consistent query after a cursor never misses a group committed later
//! with a lower number.
//!
//! Heads are cached per store handle behind one lock per shard: the
//! handle's writes of one shard are serialised (they would race on the
//! head), other shards' run concurrently. A stale cache (another replica
//! wrote the shard) fails the head's condition; the transaction's
//! cancellation reason carries the real head, and the write is tried again
//! at once. That is not a job conflict: a failed *job* condition is still
//! the job's `VersionConflict`.
//!
//! Retention: event items carry a TTL attribute (the later of the group's
//! time and the writer's clock, + retention + [`TTL_GRACE`]); the retention task raises each shard's `lw` past groups
//! older than the retention. DynamoDB deletes expired items lazily, so
//! readers decide from `lw` (and from holes in the dense numbering, which
//! catch deletions `lw` has not caught up with), never from what happens
//! to be missing.
//!
//! The activity log (`crate::store::activity`) lives in the same table, in
//! partitions of its own ([`ACTIVITY_PARTITIONS`] + shard), with the same
//! heads, groups, low-water marks and TTL. Readers of job events query
//! partitions 0..[`SHARDS`] only, so they never meet an activity group.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem, Update};
use futures::future::try_join_all;
use tokio::sync::Mutex;

use super::errors::classify;
use super::items::{check_schema, get_b, get_n, n, Item, SCHEMA_VERSION, SHARDS};
use super::DynamoStore;
use crate::domain::Job;
use crate::store::activity::{Activity, ActivityGroup};
use crate::store::codec::{decode, encode};
use crate::store::events::{EventGroup, LogGroup};
use crate::store::{EventCursor, LogRead, StoreError, StoreResult, Transition, Trimmed};

/// How long after the retention DynamoDB's TTL may delete a group: the
/// retention task (every minute) raises the low-water mark well before.
pub const TTL_GRACE: Duration = Duration::from_secs(3600);

/// Groups read per query page.
const PAGE: i32 = 100;

/// The first partition of the activity log in the events table: its shard
/// `i` is partition `ACTIVITY_PARTITIONS + i`.
pub const ACTIVITY_PARTITIONS: u32 = 1000;

/// Which log of the events table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Log {
    Jobs,
    Activity,
}

impl Log {
    /// The partition (`shard` attribute) of its shard `index`.
    pub fn partition(self, index: u32) -> u32 {
        match self {
            Log::Jobs => index,
            Log::Activity => ACTIVITY_PARTITIONS + index,
        }
    }
}

/// The cached head of every partition of both logs; each lock also
/// serialises this handle's writes of its partition.
#[derive(Debug)]
pub struct Heads {
    shards: Vec<Mutex<Option<u64>>>,
}

impl Default for Heads {
    fn default() -> Self {
        Heads { shards: (0..2 * SHARDS).map(|_| Mutex::new(None)).collect() }
    }
}

impl Heads {
    pub fn shard(&self, partition: u32) -> &Mutex<Option<u64>> {
        let slot = match partition.checked_sub(ACTIVITY_PARTITIONS) {
            Some(index) => SHARDS + index % SHARDS,
            None => partition % SHARDS,
        };
        &self.shards[slot as usize]
    }
}

pub fn shared_heads() -> Arc<Heads> {
    Arc::new(Heads::default())
}

fn head_key(shard: u32) -> Item {
    HashMap::from([("shard".to_string(), n(shard)), ("seq".to_string(), n(0))])
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The two transaction items that append a job write's events after
/// `head`: the group's item and the head's conditional advance. Also the
/// new head.
pub(super) struct Append {
    pub items: [TransactWriteItem; 2],
    pub new_head: u64,
}

/// The head a cancelled transaction's reason reports (its condition failed,
/// so the item exists); `None` if the reason carries no item: the head is
/// then read again.
pub(super) fn head_in(item: Option<&Item>) -> Option<u64> {
    item.and_then(|i| get_n(i, "head").ok())
}

impl DynamoStore {
    /// The head of `shard` as the table holds it now.
    async fn read_head_item(&self, shard: u32) -> StoreResult<(u64, u64)> {
        let item = self.get_item(&self.tables.events, head_key(shard), "event head").await?;
        let head = item.as_ref().and_then(|i| get_n(i, "head").ok()).unwrap_or(0);
        let low_water = item.as_ref().and_then(|i| get_n(i, "lw").ok()).unwrap_or(0);
        Ok((head, low_water))
    }

    /// The cached head of a locked shard, read if unknown.
    pub(super) async fn known_head(&self, shard: u32, cached: &mut Option<u64>) -> StoreResult<u64> {
        if let Some(head) = *cached {
            return Ok(head);
        }
        let (head, _) = self.read_head_item(shard).await?;
        *cached = Some(head);
        Ok(head)
    }

    /// Adds the items that log `events` behind the shard's head (read into
    /// `cached` if unknown) to a job write's transaction; returns the head
    /// it moves to, or `None` when there is nothing to log.
    pub(super) async fn append_events(
        &self,
        items: &mut Vec<TransactWriteItem>,
        job: &Job,
        events: &[Transition],
        shard: u32,
        cached: &mut Option<u64>,
    ) -> StoreResult<Option<u64>> {
        if events.is_empty() {
            return Ok(None);
        }
        let known = self.known_head(shard, cached).await?;
        Ok(self.append_items(job, events, shard, known)?.map(|append| {
            items.extend(append.items);
            append.new_head
        }))
    }

    pub(super) fn append_items(
        &self,
        job: &Job,
        events: &[Transition],
        shard: u32,
        head: u64,
    ) -> StoreResult<Option<Append>> {
        let Some((put, new_head)) = self.group_put(job, events, shard, head + 1)? else { return Ok(None) };
        Ok(Some(Append { items: [put, self.head_advance(shard, head, new_head)?], new_head }))
    }

    /// The put of a job write's event group numbered from `first_seq`, and
    /// its last number (`None` without events).
    pub(super) fn group_put(
        &self,
        job: &Job,
        events: &[Transition],
        shard: u32,
        first_seq: u64,
    ) -> StoreResult<Option<(TransactWriteItem, u64)>> {
        let Some(group) = EventGroup::of(job, events, first_seq) else { return Ok(None) };
        let what = format!("the events of one write of job {}", job.id);
        self.put_group(&group, &what, shard).map(Some)
    }

    /// The two transaction items that append a write's activity after the
    /// head of its shard (`partition`), and the new head.
    pub(super) fn activity_items(&self, activity: &[Activity], partition: u32, head: u64) -> StoreResult<Append> {
        let group = ActivityGroup { first_seq: head + 1, entries: activity.to_vec() };
        let what = format!("the activity of one write of {}", activity.first().map_or("", |a| a.subject.as_str()));
        let (put, new_head) = self.put_group(&group, &what, partition)?;
        Ok(Append { items: [put, self.head_advance(partition, head, new_head)?], new_head })
    }

    /// The put of a group into `partition`, on condition that its key is
    /// free, and its last number.
    fn put_group<G: LogGroup + serde::Serialize>(
        &self,
        group: &G,
        what: &str,
        partition: u32,
    ) -> StoreResult<(TransactWriteItem, u64)> {
        let body = encode(group)?;
        if body.len() > super::MAX_ITEM_BYTES {
            return Err(StoreError::Rejected(format!(
                "{what} are {} bytes; an event item holds at most {} bytes",
                body.len(),
                super::MAX_ITEM_BYTES
            )));
        }
        let shard = partition;
        let last = group.last_seq();
        // From the later of the group's time and now: a replica whose clock
        // runs behind (or a test's manual clock) never writes an item that
        // DynamoDB may delete before the low-water mark passes it.
        let written = millis(group.time().max(SystemTime::now())) / 1000;
        let expires = written + (self.event_ttl + TTL_GRACE).as_secs();
        let item = HashMap::from([
            ("shard".to_string(), n(shard)),
            ("seq".to_string(), n(last)),
            ("first".to_string(), n(group.first_seq())),
            ("gt".to_string(), n(millis(group.time()))),
            ("ttl".to_string(), n(expires)),
            ("sv".to_string(), n(SCHEMA_VERSION)),
            ("b".to_string(), AttributeValue::B(Blob::new(body))),
        ]);
        let put = Put::builder()
            .table_name(&self.tables.events)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(seq)")
            .build()
            .map_err(build_error)?;
        Ok((TransactWriteItem::builder().put(put).build(), last))
    }

    /// Moves the shard's head from `head` to `new_head`, on condition that it
    /// is still `head` (returning the item when it is not).
    pub(super) fn head_advance(&self, shard: u32, head: u64, new_head: u64) -> StoreResult<TransactWriteItem> {
        let condition = if head == 0 { "attribute_not_exists(head) OR head = :old" } else { "head = :old" };
        let advance = Update::builder()
            .table_name(&self.tables.events)
            .set_key(Some(head_key(shard)))
            .update_expression("SET head = :new")
            .condition_expression(condition)
            .expression_attribute_values(":old", n(head))
            .expression_attribute_values(":new", n(new_head))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(build_error)?;
        Ok(TransactWriteItem::builder().update(advance).build())
    }

    pub(super) async fn heads(&self, log: Log) -> StoreResult<EventCursor> {
        let heads = try_join_all((0..SHARDS).map(|shard| self.read_head_item(log.partition(shard)))).await?;
        Ok(EventCursor { positions: heads.into_iter().map(|(head, _)| head).collect() })
    }

    pub(super) async fn events_after<G: LogGroup>(
        &self,
        log: Log,
        after: &EventCursor,
        limit: usize,
    ) -> StoreResult<LogRead<G::Event>> {
        after.check_shards(SHARDS)?;
        let reads = try_join_all(
            after.positions.iter().enumerate().map(|(shard, p)| self.shard_after::<G>(log, shard as u32, *p, limit)),
        )
        .await?;
        let mut events = Vec::new();
        let mut next = EventCursor::start(SHARDS);
        for (shard, read) in reads.into_iter().enumerate() {
            match read {
                ShardRead::Events(mut shard_events, position) => {
                    events.append(&mut shard_events);
                    next.positions[shard] = position;
                }
                ShardRead::Expired => return Ok(LogRead::Expired),
                ShardRead::Unknown => return Ok(LogRead::Unknown),
            }
        }
        Ok(LogRead::Events { events, next })
    }

    /// The groups of one shard after `after`, about `limit` events.
    async fn shard_after<G: LogGroup>(
        &self,
        log: Log,
        shard: u32,
        after: u64,
        limit: usize,
    ) -> StoreResult<ShardRead<G::Event>> {
        let partition = log.partition(shard);
        // The head first: every group up to it is committed, so a consistent
        // query must return it unless it was deleted.
        let (head, low_water) = self.read_head_item(partition).await?;
        if after > head {
            return Ok(ShardRead::Unknown);
        }
        if after < low_water {
            return Ok(ShardRead::Expired);
        }
        if after == head {
            // Nothing new in this shard: no query (an idle watcher's read
            // costs the heads only).
            return Ok(ShardRead::Events(Vec::new(), after));
        }
        let mut events = Vec::new();
        let mut position = after;
        let mut resume: Option<Item> = None;
        loop {
            let out = self
                .groups_after(partition, after)
                .consistent_read(true)
                .limit(PAGE)
                .set_exclusive_start_key(resume.take())
                .send()
                .await
                .map_err(|e| classify("Query events", e))?;
            for item in out.items() {
                check_schema(item)?;
                let group: G = decode(get_b(item, "b")?)?;
                // Numbers are dense: a hole is a group DynamoDB's TTL deleted
                // before the low-water mark passed it.
                if group.first_seq() > position + 1 {
                    return Ok(ShardRead::Expired);
                }
                group.events_after(shard, position, &mut events);
                position = position.max(group.last_seq());
                if events.len() >= limit.max(1) {
                    return Ok(ShardRead::Events(events, position));
                }
            }
            resume = out.last_evaluated_key().cloned();
            if resume.is_none() {
                break;
            }
        }
        if position < head {
            // Groups up to the head are committed but gone.
            return Ok(ShardRead::Expired);
        }
        Ok(ShardRead::Events(events, position))
    }

    /// A query of one shard's event groups after position `after`.
    fn groups_after(&self, shard: u32, after: u64) -> aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder {
        self.client
            .query()
            .table_name(&self.tables.events)
            .key_condition_expression("#s = :s AND #q > :after")
            .expression_attribute_names("#s", "shard")
            .expression_attribute_names("#q", "seq")
            .expression_attribute_values(":s", n(shard))
            .expression_attribute_values(":after", n(after))
    }

    /// Raises each shard's low-water mark past its groups older than
    /// `before` (DynamoDB's TTL deletes them later).
    pub(super) async fn trim_shards(&self, before: SystemTime, limit: usize) -> StoreResult<Trimmed> {
        let per_shard = limit.div_ceil(SHARDS as usize).max(1);
        let partitions = (0..SHARDS).flat_map(|shard| [Log::Jobs.partition(shard), Log::Activity.partition(shard)]);
        let trims = try_join_all(partitions.map(|partition| self.trim_shard(partition, before, per_shard))).await?;
        Ok(trims.into_iter().fold(Trimmed::default(), Trimmed::and))
    }

    async fn trim_shard(&self, shard: u32, before: SystemTime, limit: usize) -> StoreResult<Trimmed> {
        let (_, low_water) = self.read_head_item(shard).await?;
        let cutoff = millis(before);
        let mut trimmed = Trimmed::default();
        let mut new_low = low_water;
        let mut resume: Option<Item> = None;
        'pages: loop {
            let out = self
                .groups_after(shard, low_water)
                .expression_attribute_names("#t", "gt")
                .projection_expression("#q, #t")
                .consistent_read(true)
                .limit(PAGE)
                .set_exclusive_start_key(resume.take())
                .send()
                .await
                .map_err(|e| classify("Query events", e))?;
            for item in out.items() {
                if trimmed.groups as usize >= limit {
                    trimmed.more = true;
                    break 'pages;
                }
                if get_n(item, "gt")? >= cutoff {
                    break 'pages;
                }
                new_low = get_n(item, "seq")?;
                trimmed.groups += 1;
            }
            resume = out.last_evaluated_key().cloned();
            if resume.is_none() {
                break;
            }
        }
        if new_low > low_water {
            let raised = self
                .client
                .update_item()
                .table_name(&self.tables.events)
                .set_key(Some(head_key(shard)))
                .update_expression("SET lw = :v")
                .condition_expression("attribute_not_exists(lw) OR lw < :v")
                .expression_attribute_values(":v", n(new_low))
                .send()
                .await;
            if let Err(e) = raised {
                // Another replica's trim raised it first: nothing to do.
                if !super::errors::condition_failed(&e) {
                    return Err(classify("UpdateItem event low-water mark", e));
                }
            }
        }
        Ok(trimmed)
    }
}

enum ShardRead<E> {
    Events(Vec<E>, u64),
    Expired,
    Unknown,
}

fn build_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Rejected(format!("building a DynamoDB request: {e}"))
}
