//! Item layouts: how domain records become DynamoDB items and back. Bodies
//! are the same versioned postcard records the embedded store keeps; the
//! attributes beside them are only what keys, indexes and conditions need.

use std::collections::HashMap;

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;

use crate::domain::{Job, JobState, Priority};
use crate::store::codec::{encode_job_into, priority_code};
use crate::store::{Record, StoreError, StoreResult, Write};

pub type Item = HashMap<String, AttributeValue>;

/// The item schema version this release writes; an item with a higher one
/// was written by a newer release and is refused, not misread.
pub const SCHEMA_VERSION: u64 = 1;

/// Shards of the state index and of the job counts: a hot state (QUEUED)
/// or count spreads over this many partitions. Stored in keys, so fixed.
pub const SHARDS: u32 = 8;

/// DynamoDB refuses items over 400 KB; a job's record must fit with room
/// for its keys and index attributes.
pub const MAX_ITEM_BYTES: usize = 390 * 1024;

/// A composite key part by part, each length-prefixed, so no part's content
/// can be mistaken for a separator.
pub fn compose(parts: &[&str]) -> String {
    let mut out = String::new();
    for part in parts {
        out.push_str(&part.len().to_string());
        out.push(':');
        out.push_str(part);
    }
    out
}

/// A job's shard: FNV-1a of its id. Stored in keys, so it must never change.
pub fn shard_of(id: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % SHARDS
}

/// The state index partition of a state and shard.
pub fn state_partition(state: JobState, shard: u32) -> String {
    format!("{}#{shard}", state.code())
}

pub fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

pub fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

pub fn get_s<'a>(item: &'a Item, name: &str) -> StoreResult<&'a str> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Ok(v),
        _ => Err(StoreError::Corrupt(format!("item attribute {name} is missing or not a string"))),
    }
}

pub fn get_n(item: &Item, name: &str) -> StoreResult<u64> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => {
            v.parse().map_err(|_| StoreError::Corrupt(format!("item attribute {name} is not a u64: {v}")))
        }
        _ => Err(StoreError::Corrupt(format!("item attribute {name} is missing or not a number"))),
    }
}

/// A signed number (count deltas may leave a shard below zero).
pub fn get_i(item: &Item, name: &str) -> StoreResult<i64> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => {
            v.parse().map_err(|_| StoreError::Corrupt(format!("item attribute {name} is not an i64: {v}")))
        }
        _ => Err(StoreError::Corrupt(format!("item attribute {name} is missing or not a number"))),
    }
}

pub fn get_b<'a>(item: &'a Item, name: &str) -> StoreResult<&'a [u8]> {
    match item.get(name) {
        Some(AttributeValue::B(v)) => Ok(v.as_ref()),
        _ => Err(StoreError::Corrupt(format!("item attribute {name} is missing or not binary"))),
    }
}

/// Refuses an item a newer release wrote.
pub fn check_schema(item: &Item) -> StoreResult<()> {
    let version = get_n(item, "sv")?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "item schema version {version} is newer than this release reads ({SCHEMA_VERSION}); run a newer tether"
        )));
    }
    Ok(())
}

/// Where a job is counted: its count item's key within its shard.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountKey {
    pub queue: String,
    pub state: JobState,
    pub priority: Priority,
}

impl CountKey {
    pub fn of(job: &Job) -> CountKey {
        CountKey { queue: job.spec.queue.clone(), state: job.state, priority: job.spec.priority }
    }

    /// The (pk, sk) of this count in `shard`.
    pub fn item_key(&self, shard: u32) -> Item {
        let sk = compose(&[&self.queue, &self.state.code().to_string(), &priority_code(self.priority).to_string()]);
        HashMap::from([("pk".to_string(), s(count_partition(shard))), ("sk".to_string(), s(sk))])
    }
}

pub fn count_partition(shard: u32) -> String {
    format!("counts#{shard}")
}

/// A job as an item. The body is checked against DynamoDB's item limit
/// here, with a precise error, rather than refused by the service.
pub fn job_item(job: &Job) -> StoreResult<(Item, Vec<u8>)> {
    let mut body = Vec::new();
    encode_job_into(&mut body, job)?;
    if body.len() > MAX_ITEM_BYTES {
        return Err(StoreError::Rejected(format!(
            "job {} is {} bytes stored; a DynamoDB item holds at most {MAX_ITEM_BYTES} bytes of record",
            job.id,
            body.len()
        )));
    }
    let item = HashMap::from([
        ("id".to_string(), s(job.id.clone())),
        ("sv".to_string(), n(SCHEMA_VERSION)),
        ("v".to_string(), n(job.version)),
        ("seq".to_string(), n(job.seq)),
        ("sst".to_string(), s(state_partition(job.state, shard_of(&job.id)))),
        ("q".to_string(), s(job.spec.queue.clone())),
        ("sc".to_string(), n(job.state.code())),
        ("pc".to_string(), n(priority_code(job.spec.priority))),
        ("b".to_string(), AttributeValue::B(Blob::new(body.clone()))),
    ]);
    Ok((item, body))
}

/// A record item (agents, pools): key attributes plus a versioned body.
pub fn record_item(keys: &[(&str, String)], body: Vec<u8>) -> Item {
    let mut item: Item = keys.iter().map(|(k, v)| ((*k).to_string(), s(v.clone()))).collect();
    item.insert("sv".to_string(), n(SCHEMA_VERSION));
    item.insert("b".to_string(), AttributeValue::B(Blob::new(body)));
    item
}

/// A control-plane record as an item: its key, version (`v`, the write
/// condition's attribute) and body (`b`, as the caller encoded it).
pub fn control_record_item(record: &Record) -> Item {
    HashMap::from([
        ("collection".to_string(), s(record.collection.clone())),
        ("id".to_string(), s(record.id.clone())),
        ("sv".to_string(), n(SCHEMA_VERSION)),
        ("v".to_string(), n(record.version)),
        ("b".to_string(), AttributeValue::B(Blob::new(record.body.to_vec()))),
    ])
}

/// The key of a control-plane record's item.
pub fn control_record_key(collection: &str, id: &str) -> Item {
    HashMap::from([("collection".to_string(), s(collection)), ("id".to_string(), s(id))])
}

/// A control-plane record from its item.
pub fn control_record_of(item: &Item) -> StoreResult<Record> {
    check_schema(item)?;
    Ok(Record {
        collection: get_s(item, "collection")?.to_string(),
        id: get_s(item, "id")?.to_string(),
        version: get_n(item, "v")?,
        body: bytes::Bytes::copy_from_slice(get_b(item, "b")?),
    })
}

/// Refuses a batch holding a record too large for an item, with a precise
/// error and before anything of the batch is written.
pub fn check_record_sizes(batch: &[Write]) -> StoreResult<()> {
    for write in batch {
        let write = match write {
            Write::Logged { write, activity } => {
                // The group's item holds the entries (and little else).
                let size: usize = activity.iter().map(|a| a.subject.len() + a.body.len() + 32).sum();
                if size > MAX_ITEM_BYTES {
                    return Err(StoreError::Rejected(format!(
                        "the activity of one write is about {size} bytes; an event item holds at most \
                         {MAX_ITEM_BYTES} bytes"
                    )));
                }
                write.as_ref()
            }
            other => other,
        };
        if let Write::PutRecord { record, .. } = write {
            let size = record.collection.len() + record.id.len() + record.body.len();
            if size > MAX_ITEM_BYTES {
                return Err(StoreError::Rejected(format!(
                    "record {}/{} is {size} bytes with its key; a DynamoDB item holds at most {MAX_ITEM_BYTES} \
                     bytes of record",
                    record.collection, record.id
                )));
            }
        }
    }
    Ok(())
}

pub fn key_of(name: &str, value: impl Into<String>) -> Item {
    HashMap::from([(name.to_string(), s(value))])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composed_keys_do_not_collide() {
        assert_ne!(compose(&["a:b", "c"]), compose(&["a", "b:c"]));
        assert_ne!(compose(&["1:", ""]), compose(&["", "1:"]));
        assert_eq!(compose(&["q", "k"]), "1:q1:k");
    }

    #[test]
    fn shards_are_stable_and_in_range() {
        // Shards are stored in keys: these values must never change.
        assert_eq!(shard_of(""), 0x811c_9dc5 % SHARDS);
        assert_eq!(shard_of("a"), 0xe40c_292c % SHARDS);
        for i in 0..1000 {
            assert!(shard_of(&format!("job-{i}")) < SHARDS);
        }
    }
}
