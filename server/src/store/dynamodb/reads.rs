//! Reads. Single items are read strongly; listings merge the shards of the
//! state index (eventually consistent, as every DynamoDB index is) in `seq`
//! order, page by page, so a listing reads only what it returns.

use std::collections::{BTreeMap, HashMap, VecDeque};

use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};
use futures::future::try_join_all;

use super::errors::classify;
use super::items::{
    check_schema, compose, control_record_key, control_record_of, count_partition, get_b, get_i, get_n, get_s, key_of,
    n, s, state_partition, Item, SHARDS,
};
use super::tables::BY_STATE;
use super::DynamoStore;
use crate::domain::{Job, JobState};
use crate::store::codec::{decode, decode_job, priority_from_code, skip_corrupt, state_from_code};
use crate::store::{CountRow, Page, Record, RecordOrder, StoreError, StoreResult};

/// Which way a listing walks `seq`, and from where (exclusive).
#[derive(Debug, Clone, Copy)]
pub(super) enum Walk {
    NewestBefore(Option<u64>),
    OldestAfter(Option<u64>),
}

/// One state index partition read page by page.
struct Cursor {
    partition: String,
    items: VecDeque<(u64, Item)>,
    resume: Option<Item>,
    exhausted: bool,
}

pub(super) fn decode_job_item(item: &Item) -> StoreResult<Job> {
    check_schema(item)?;
    decode_job(get_b(item, "b")?)
}

pub(super) fn decode_record<T: serde::de::DeserializeOwned>(item: &Item) -> StoreResult<T> {
    check_schema(item)?;
    decode(get_b(item, "b")?)
}

/// Every item a query finds, strongly read, page after page.
async fn every_item(
    query: aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder,
    table: &str,
) -> StoreResult<Vec<Item>> {
    query
        .consistent_read(true)
        .into_paginator()
        .items()
        .send()
        .try_collect()
        .await
        .map_err(|e| classify(&format!("Query {table}"), e))
}

impl DynamoStore {
    /// A page of one state index partition.
    async fn fill(&self, cursor: &mut Cursor, walk: Walk, page: usize) -> StoreResult<()> {
        // A page may come back empty but not last; read on until one is not.
        while !cursor.exhausted && cursor.items.is_empty() {
            self.fill_once(cursor, walk, page).await?;
        }
        Ok(())
    }

    async fn fill_once(&self, cursor: &mut Cursor, walk: Walk, page: usize) -> StoreResult<()> {
        let mut query = self
            .client
            .query()
            .table_name(&self.tables.jobs)
            .index_name(BY_STATE)
            .expression_attribute_values(":p", s(cursor.partition.clone()))
            .limit(i32::try_from(page.clamp(1, 1000)).unwrap_or(1000))
            .set_exclusive_start_key(cursor.resume.take());
        query = match walk {
            Walk::NewestBefore(None) => query.key_condition_expression("sst = :p").scan_index_forward(false),
            Walk::NewestBefore(Some(before)) => query
                .key_condition_expression("sst = :p AND seq < :bound")
                .expression_attribute_values(":bound", n(before))
                .scan_index_forward(false),
            Walk::OldestAfter(None) => query.key_condition_expression("sst = :p"),
            Walk::OldestAfter(Some(after)) => query
                .key_condition_expression("sst = :p AND seq > :bound")
                .expression_attribute_values(":bound", n(after)),
        };
        let out = query.send().await.map_err(|e| classify("Query by_state", e))?;
        for item in out.items() {
            let seq = get_n(item, "seq")?;
            cursor.items.push_back((seq, item.clone()));
        }
        cursor.resume = out.last_evaluated_key().cloned();
        cursor.exhausted = cursor.resume.is_none();
        Ok(())
    }

    /// Up to `limit` jobs in `states`, in `walk` order, that pass `keep`.
    pub(super) async fn list_by_state(
        &self,
        states: &[JobState],
        walk: Walk,
        limit: usize,
        keep: impl Fn(&Job) -> bool,
    ) -> StoreResult<Page<Job>> {
        let mut cursors: Vec<Cursor> = states
            .iter()
            .flat_map(|state| (0..SHARDS).map(move |shard| state_partition(*state, shard)))
            .map(|partition| Cursor { partition, items: VecDeque::new(), resume: None, exhausted: false })
            .collect();
        let page = limit.saturating_add(1);
        let mut items = Vec::new();
        let mut last_seq = None;
        loop {
            // Refill every drained cursor at once: one round trip per round.
            if cursors.iter().any(|c| c.items.is_empty() && !c.exhausted) {
                try_join_all(cursors.iter_mut().map(|c| self.fill(c, walk, page))).await?;
            }
            let best =
                cursors.iter().enumerate().filter_map(|(i, c)| c.items.front().map(|(seq, _)| (i, *seq))).reduce(
                    |a, b| match walk {
                        Walk::NewestBefore(_) if b.1 > a.1 => b,
                        Walk::OldestAfter(_) if b.1 < a.1 => b,
                        _ => a,
                    },
                );
            let Some((i, seq)) = best else { break };
            let Some((_, item)) = cursors[i].items.pop_front() else { break };
            let Some(job) = skip_corrupt(format_args!("job at seq {seq}"), decode_job_item(&item))? else { continue };
            if !keep(&job) {
                continue;
            }
            if items.len() == limit {
                return Ok(Page { items, next: last_seq });
            }
            items.push(job);
            last_seq = Some(seq);
        }
        Ok(Page { items, next: None })
    }

    /// The `per_shard` oldest jobs after `after_seq` of each shard of
    /// `state`: one query per shard, all at once (eventually consistent: a
    /// proposal, never proof). Also where to resume: the least last seq of
    /// the shards that have more (everything up to it was seen in every
    /// shard), or `None` when none has.
    pub(super) async fn oldest_per_shard(
        &self,
        state: JobState,
        after_seq: u64,
        per_shard: usize,
    ) -> StoreResult<(Vec<Job>, Option<u64>)> {
        let walk = if after_seq == 0 { Walk::OldestAfter(None) } else { Walk::OldestAfter(Some(after_seq)) };
        let mut cursors: Vec<Cursor> = (0..SHARDS)
            .map(|shard| Cursor {
                partition: state_partition(state, shard),
                items: VecDeque::new(),
                resume: None,
                exhausted: false,
            })
            .collect();
        try_join_all(cursors.iter_mut().map(|c| self.fill_once(c, walk, per_shard))).await?;
        let next = cursors
            .iter()
            .filter(|c| !c.exhausted && c.items.len() >= per_shard)
            .filter_map(|c| c.items.back().map(|(seq, _)| *seq))
            .min();
        let mut jobs = Vec::new();
        for (seq, item) in cursors.into_iter().flat_map(|c| c.items) {
            if let Some(job) = skip_corrupt(format_args!("job at seq {seq}"), decode_job_item(&item))? {
                jobs.push(job);
            }
        }
        Ok((jobs, next))
    }

    /// Every job in `states`, oldest first (start-up scans).
    pub(super) async fn all_in_states(&self, states: &[JobState]) -> StoreResult<Vec<Job>> {
        Ok(self.list_by_state(states, Walk::OldestAfter(None), usize::MAX - 1, |_| true).await?.items)
    }

    pub(super) async fn get_item(&self, table: &str, key: Item, what: &str) -> StoreResult<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(table)
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify(&format!("GetItem {what}"), e))?;
        Ok(out.item().cloned())
    }

    pub(super) async fn read_job(&self, id: &str) -> StoreResult<Option<Job>> {
        match self.get_item(&self.tables.jobs, key_of("id", id), "job").await? {
            Some(item) => decode_job_item(&item).map(Some),
            None => Ok(None),
        }
    }

    /// Jobs by id with BatchGetItem, strongly read, up to 100 keys a
    /// request. Keys DynamoDB leaves unprocessed (throttling) are asked
    /// again a few times after a short pause, then the read fails as
    /// retryable.
    pub(super) async fn read_jobs(&self, ids: &[String]) -> StoreResult<Vec<Job>> {
        const PER_REQUEST: usize = 100;
        const ROUNDS: u32 = 5;
        let mut unique: Vec<&String> = ids.iter().collect();
        unique.sort();
        unique.dedup();
        let mut jobs = Vec::with_capacity(unique.len());
        for chunk in unique.chunks(PER_REQUEST) {
            let keys = KeysAndAttributes::builder()
                .set_keys(Some(chunk.iter().map(|id| key_of("id", id.as_str())).collect()))
                .consistent_read(true)
                .build()
                .map_err(|e| StoreError::Rejected(format!("building a DynamoDB request: {e}")))?;
            let mut wanted = Some(HashMap::from([(self.tables.jobs.clone(), keys)]));
            let mut round = 0;
            while let Some(request) = wanted.take().filter(|w| !w.is_empty()) {
                if round == ROUNDS {
                    return Err(StoreError::Unavailable(format!(
                        "BatchGetItem jobs: keys still unprocessed after {ROUNDS} rounds (throttled)"
                    )));
                }
                if round > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(20 << round)).await;
                }
                round += 1;
                let out = self
                    .client
                    .batch_get_item()
                    .set_request_items(Some(request))
                    .send()
                    .await
                    .map_err(|e| classify("BatchGetItem jobs", e))?;
                if let Some(items) = out.responses().and_then(|r| r.get(&self.tables.jobs)) {
                    for item in items {
                        let id = get_s(item, "id").unwrap_or("?");
                        if let Some(job) = skip_corrupt(format_args!("job {id}"), decode_job_item(item))? {
                            jobs.push(job);
                        }
                    }
                }
                wanted = out.unprocessed_keys().cloned();
            }
        }
        Ok(jobs)
    }

    pub(super) async fn job_by_key(&self, queue: &str, key: &str) -> StoreResult<Option<Job>> {
        let Some(item) = self
            .get_item(&self.tables.idempotency_keys, key_of("key", compose(&[queue, key])), "idempotency key")
            .await?
        else {
            return Ok(None);
        };
        self.read_job(get_s(&item, "job_id")?).await
    }

    /// Every item of a table, strongly read (agents and pools: small tables
    /// read at start-up and by operators).
    pub(super) async fn scan_all(&self, table: &str) -> StoreResult<Vec<Item>> {
        self.client
            .scan()
            .table_name(table)
            .consistent_read(true)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| classify(&format!("Scan {table}"), e))
    }

    /// Every item of one partition, strongly read, in sort key order.
    pub(super) async fn query_partition(
        &self,
        table: &str,
        key: &str,
        value: AttributeValue,
    ) -> StoreResult<Vec<Item>> {
        let query = self
            .client
            .query()
            .table_name(table)
            .key_condition_expression("#k = :v")
            .expression_attribute_names("#k", key)
            .expression_attribute_values(":v", value);
        every_item(query, table).await
    }

    /// One attempt's log items after sequence `after`: a range of its
    /// partition, strongly read.
    pub(super) async fn query_logs_after(&self, job_id: &str, attempt: u32, after: u64) -> StoreResult<Vec<Item>> {
        let table = &self.tables.logs;
        let query = self
            .client
            .query()
            .table_name(table)
            .key_condition_expression("#k = :v AND #s > :after")
            .expression_attribute_names("#k", "attempt")
            .expression_attribute_names("#s", "seq")
            .expression_attribute_values(":v", s(compose(&[job_id, &attempt.to_string()])))
            .expression_attribute_values(":after", n(after));
        every_item(query, table).await
    }

    pub(super) async fn read_control_record(&self, collection: &str, id: &str) -> StoreResult<Option<Record>> {
        let key = control_record_key(collection, id);
        match self.get_item(&self.tables.records, key, "record").await? {
            Some(item) => control_record_of(&item).map(Some),
            None => Ok(None),
        }
    }

    /// Up to `limit` records of `collection` after `start_after` in `order`:
    /// one partition, strongly read, page after page until `limit` records
    /// or its end (a page stops at 1 MB, and skipped records count in it).
    pub(super) async fn query_control_records(
        &self,
        collection: &str,
        order: RecordOrder,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<Record>> {
        let mut records = Vec::new();
        // The start key need not exist: it is only a position in the partition.
        let mut resume = start_after.map(|id| control_record_key(collection, id));
        while records.len() < limit {
            let out = self
                .client
                .query()
                .table_name(&self.tables.records)
                // `collection` is a reserved word in expressions.
                .key_condition_expression("#c = :c")
                .expression_attribute_names("#c", "collection")
                .expression_attribute_values(":c", s(collection))
                .scan_index_forward(order == RecordOrder::Ascending)
                .consistent_read(true)
                .limit(i32::try_from(limit - records.len()).unwrap_or(i32::MAX))
                .set_exclusive_start_key(resume.take())
                .send()
                .await
                .map_err(|e| classify("Query records", e))?;
            for item in out.items() {
                let id = get_s(item, "id").unwrap_or("?");
                if let Some(record) = skip_corrupt(format_args!("record {collection}/{id}"), control_record_of(item))? {
                    records.push(record);
                }
            }
            resume = out.last_evaluated_key().cloned();
            if resume.is_none() {
                break;
            }
        }
        Ok(records)
    }

    /// The job counts: every count shard summed.
    pub(super) async fn sum_counts(&self) -> StoreResult<Vec<CountRow>> {
        let shards = try_join_all(
            (0..SHARDS).map(|shard| self.query_partition(&self.tables.meta, "pk", s(count_partition(shard)))),
        )
        .await?;
        let mut totals: BTreeMap<(String, u8, u8), i64> = BTreeMap::new();
        for item in shards.iter().flatten() {
            let code = |name: &str| {
                get_n(item, name).and_then(|v| {
                    u8::try_from(v).map_err(|_| StoreError::Corrupt(format!("count attribute {name} out of range")))
                })
            };
            let key = (get_s(item, "q")?.to_string(), code("sc")?, code("pc")?);
            *totals.entry(key).or_default() += get_i(item, "n")?;
        }
        let mut rows = Vec::new();
        for ((queue, state, priority), count) in totals {
            if let Ok(count @ 1..) = u64::try_from(count) {
                rows.push(CountRow {
                    queue,
                    state: state_from_code(state)?,
                    priority: priority_from_code(priority)?,
                    count,
                });
            }
        }
        Ok(rows)
    }
}
