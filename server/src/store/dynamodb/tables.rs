//! The DynamoDB tables: their names under a prefix, their key schemas, and
//! creating them (for development) or checking that they exist (at start-up).
//! `docs/dynamodb.md` describes every access pattern they serve.

use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection, ProjectionType,
    ScalarAttributeType, TableStatus,
};
use aws_sdk_dynamodb::Client;

use super::errors::classify;
use crate::store::{StoreError, StoreResult};

/// Jobs by id; the `by_state` index finds them by (state, shard) in `seq` order.
pub const JOBS: &str = "jobs";
pub const BY_STATE: &str = "by_state";
/// (queue, idempotency key) -> job id.
pub const IDEMPOTENCY_KEYS: &str = "idempotency_keys";
/// Agents by id; the `by_name` index finds one by (pool, name).
pub const AGENTS: &str = "agents";
pub const BY_NAME: &str = "by_name";
pub const POOLS: &str = "pools";
/// Log chunks by (job, attempt) and sequence.
pub const LOGS: &str = "logs";
/// High-water counters and the sharded job counts.
pub const META: &str = "meta";
/// The job event log: (shard, seq) -> event group; seq 0 is the shard's head.
pub const EVENTS: &str = "events";
/// The event items' TTL attribute (epoch seconds).
pub const EVENTS_TTL: &str = "ttl";
/// Control-plane records by (collection, id).
pub const RECORDS: &str = "records";

/// Every table's full name under one prefix.
#[derive(Debug, Clone)]
pub struct TableNames {
    pub jobs: String,
    pub idempotency_keys: String,
    pub agents: String,
    pub pools: String,
    pub logs: String,
    pub meta: String,
    pub events: String,
    pub records: String,
}

impl TableNames {
    pub fn new(prefix: &str) -> TableNames {
        let name = |t: &str| format!("{prefix}{t}");
        TableNames {
            jobs: name(JOBS),
            idempotency_keys: name(IDEMPOTENCY_KEYS),
            agents: name(AGENTS),
            pools: name(POOLS),
            logs: name(LOGS),
            meta: name(META),
            events: name(EVENTS),
            records: name(RECORDS),
        }
    }

    fn all(&self) -> [&str; 8] {
        [
            &self.jobs,
            &self.idempotency_keys,
            &self.agents,
            &self.pools,
            &self.logs,
            &self.meta,
            &self.events,
            &self.records,
        ]
    }
}

fn key(name: &str, kind: KeyType) -> StoreResult<KeySchemaElement> {
    KeySchemaElement::builder().attribute_name(name).key_type(kind).build().map_err(build_error)
}

fn attribute(name: &str, kind: ScalarAttributeType) -> StoreResult<AttributeDefinition> {
    AttributeDefinition::builder().attribute_name(name).attribute_type(kind).build().map_err(build_error)
}

fn build_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Rejected(format!("building a DynamoDB request: {e}"))
}

struct TableSpec {
    name: String,
    keys: Vec<(&'static str, ScalarAttributeType, KeyType)>,
    index: Option<IndexSpec>,
}

/// A global secondary index: its name, partition key and optional sort key
/// (attribute, type); it projects every attribute.
struct IndexSpec {
    name: &'static str,
    hash: (&'static str, ScalarAttributeType),
    range: Option<(&'static str, ScalarAttributeType)>,
}

fn specs(names: &TableNames) -> Vec<TableSpec> {
    use ScalarAttributeType::{N, S};
    vec![
        TableSpec {
            name: names.jobs.clone(),
            keys: vec![("id", S, KeyType::Hash)],
            index: Some(IndexSpec { name: BY_STATE, hash: ("sst", S), range: Some(("seq", N)) }),
        },
        TableSpec { name: names.idempotency_keys.clone(), keys: vec![("key", S, KeyType::Hash)], index: None },
        TableSpec {
            name: names.agents.clone(),
            keys: vec![("id", S, KeyType::Hash)],
            index: Some(IndexSpec { name: BY_NAME, hash: ("pool_name", S), range: None }),
        },
        TableSpec { name: names.pools.clone(), keys: vec![("name", S, KeyType::Hash)], index: None },
        TableSpec {
            name: names.logs.clone(),
            keys: vec![("attempt", S, KeyType::Hash), ("seq", N, KeyType::Range)],
            index: None,
        },
        TableSpec {
            name: names.meta.clone(),
            keys: vec![("pk", S, KeyType::Hash), ("sk", S, KeyType::Range)],
            index: None,
        },
        TableSpec {
            name: names.events.clone(),
            keys: vec![("shard", N, KeyType::Hash), ("seq", N, KeyType::Range)],
            index: None,
        },
        TableSpec {
            name: names.records.clone(),
            keys: vec![("collection", S, KeyType::Hash), ("id", S, KeyType::Range)],
            index: None,
        },
    ]
}

/// Creates every missing table (on-demand billing) and waits until all are
/// active. Tables that exist are left as they are.
pub async fn create_tables(client: &Client, names: &TableNames) -> StoreResult<Vec<String>> {
    let mut created = Vec::new();
    for spec in specs(names) {
        let mut definitions = Vec::new();
        let mut request = client.create_table().table_name(&spec.name).billing_mode(BillingMode::PayPerRequest);
        for (attr, kind, key_type) in &spec.keys {
            definitions.push(attribute(attr, kind.clone())?);
            request = request.key_schema(key(attr, key_type.clone())?);
        }
        if let Some(IndexSpec { name: index, hash: (hash, hash_type), range }) = &spec.index {
            if !definitions.iter().any(|d| d.attribute_name() == *hash) {
                definitions.push(attribute(hash, hash_type.clone())?);
            }
            let mut gsi = GlobalSecondaryIndex::builder()
                .index_name(*index)
                .key_schema(key(hash, KeyType::Hash)?)
                .projection(Projection::builder().projection_type(ProjectionType::All).build());
            if let Some((range, range_type)) = range {
                if !definitions.iter().any(|d| d.attribute_name() == *range) {
                    definitions.push(attribute(range, range_type.clone())?);
                }
                gsi = gsi.key_schema(key(range, KeyType::Range)?);
            }
            request = request.global_secondary_indexes(gsi.build().map_err(build_error)?);
        }
        match request.set_attribute_definitions(Some(definitions)).send().await {
            Ok(_) => created.push(spec.name.clone()),
            Err(e) => {
                let exists = e.as_service_error().is_some_and(|s| s.is_resource_in_use_exception());
                if !exists {
                    return Err(classify(&format!("CreateTable {}", spec.name), e));
                }
            }
        }
    }
    for name in names.all() {
        wait_active(client, name).await?;
    }
    if created.contains(&names.events) {
        enable_ttl(client, &names.events).await?;
    }
    Ok(created)
}

/// Deletes every table under the prefix (tests and `tether dynamodb
/// delete-tables`); missing tables are fine.
pub async fn delete_tables(client: &Client, names: &TableNames) -> StoreResult<()> {
    for name in names.all() {
        if let Err(e) = client.delete_table().table_name(name).send().await {
            if !e.as_service_error().is_some_and(|s| s.is_resource_not_found_exception()) {
                return Err(classify(&format!("DeleteTable {name}"), e));
            }
        }
    }
    Ok(())
}

/// DynamoDB deletes event items once their TTL attribute has passed (lazily;
/// readers go by the low-water mark, see `events.rs`).
async fn enable_ttl(client: &Client, table: &str) -> StoreResult<()> {
    let spec = aws_sdk_dynamodb::types::TimeToLiveSpecification::builder()
        .attribute_name(EVENTS_TTL)
        .enabled(true)
        .build()
        .map_err(build_error)?;
    match client.update_time_to_live().table_name(table).time_to_live_specification(spec).send().await {
        Ok(_) => Ok(()),
        Err(e) if format!("{e:?}").contains("already enabled") => Ok(()),
        Err(e) => Err(classify(&format!("UpdateTimeToLive {table}"), e)),
    }
}

async fn wait_active(client: &Client, name: &str) -> StoreResult<()> {
    // New tables take seconds on AWS, none on DynamoDB Local.
    for _ in 0..600 {
        let table = client.describe_table().table_name(name).send().await.map_err(|e| classify("DescribeTable", e))?;
        let status = table.table().and_then(|t| t.table_status()).cloned();
        if status == Some(TableStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(StoreError::Unavailable(format!("table {name} did not become active in 2 minutes")))
}

/// The connectivity check: every table exists and is active. A missing
/// table is a clear, terminal error naming the command that creates it.
pub async fn check_tables(client: &Client, names: &TableNames) -> StoreResult<()> {
    for name in names.all() {
        match client.describe_table().table_name(name).send().await {
            Ok(out) => {
                let status = out.table().and_then(|t| t.table_status()).cloned();
                if status != Some(TableStatus::Active) && status != Some(TableStatus::Updating) {
                    return Err(StoreError::Unavailable(format!("table {name} is {status:?}, not active")));
                }
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_not_found_exception()) => {
                return Err(StoreError::Rejected(format!(
                    "DynamoDB table {name} does not exist; create the tables with `tether dynamodb create-tables` \
                     (same --dynamodb-endpoint and --dynamodb-table-prefix)"
                )));
            }
            Err(e) => return Err(classify(&format!("DescribeTable {name}"), e)),
        }
    }
    Ok(())
}
