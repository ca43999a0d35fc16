//! Typed access to the store's records: each deployment type in its
//! collection, encoded as the store encodes its other records, replaced
//! only if nobody changed it since it was read.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::domain::{DomainError, DomainResult};
use crate::store::codec::{decode, encode};
use crate::store::{Activity, Record, RecordOrder, Store, StoreError, Write, WriteOutcome};

/// A value as read, with the version a replacement must name.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub value: T,
    /// 0 for a value not stored yet.
    pub version: u64,
}

/// What a conditional put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Applied,
    /// Someone else wrote first: read again and decide again.
    Lost,
}

pub fn store_error(e: StoreError) -> DomainError {
    match e {
        StoreError::Io(m) | StoreError::Unavailable(m) => DomainError::Unavailable(m),
        StoreError::Closed => DomainError::Unavailable("the store is closed".into()),
        other => DomainError::Internal(other.to_string()),
    }
}

fn decoded<T: DeserializeOwned>(record: &Record) -> DomainResult<T> {
    decode(&record.body)
        .map_err(|e| DomainError::Internal(format!("record {}/{} does not decode: {e}", record.collection, record.id)))
}

pub async fn get<T: DeserializeOwned>(
    store: &dyn Store,
    collection: &str,
    id: &str,
) -> DomainResult<Option<Versioned<T>>> {
    let Some(record) = store.get_record(collection, id).await.map_err(store_error)? else { return Ok(None) };
    Ok(Some(Versioned { value: decoded(&record)?, version: record.version }))
}

/// Puts `value` if the stored version is still `read.version` (0: absent).
pub async fn put<T: Serialize>(
    store: &dyn Store,
    collection: &str,
    id: &str,
    value: &T,
    version: u64,
) -> DomainResult<Put> {
    put_logged(store, collection, id, value, version, Vec::new()).await
}

/// [`put`], logging `activity` (if any) in the same write.
pub async fn put_logged<T: Serialize>(
    store: &dyn Store,
    collection: &str,
    id: &str,
    value: &T,
    version: u64,
    activity: Vec<Activity>,
) -> DomainResult<Put> {
    let body = encode(value).map_err(store_error)?;
    let record =
        Record { collection: collection.to_string(), id: id.to_string(), version: version + 1, body: body.into() };
    let mut write = Write::PutRecord { record, expected_version: version };
    if !activity.is_empty() {
        write = Write::Logged { write: Box::new(write), activity };
    }
    let outcomes = store.write(vec![write]).await.map_err(store_error)?;
    match outcomes.first() {
        Some(WriteOutcome::Applied) => Ok(Put::Applied),
        Some(WriteOutcome::IdExists | WriteOutcome::VersionConflict { .. }) => Ok(Put::Lost),
        other => Err(DomainError::Internal(format!("a record put answered {other:?}"))),
    }
}

/// Up to `limit` values of a collection in `order`, after `start_after`,
/// each with its id.
pub async fn list<T: DeserializeOwned>(
    store: &dyn Store,
    collection: &str,
    order: RecordOrder,
    start_after: Option<&str>,
    limit: usize,
) -> DomainResult<Vec<(String, Versioned<T>)>> {
    let records = store.list_records(collection, order, start_after, limit).await.map_err(store_error)?;
    let mut values = Vec::with_capacity(records.len());
    for record in &records {
        match decoded(record) {
            Ok(value) => values.push((record.id.clone(), Versioned { value, version: record.version })),
            // One bad record must not hide the others.
            Err(e) => tracing::error!(error = %e, "skipping a record"),
        }
    }
    Ok(values)
}
