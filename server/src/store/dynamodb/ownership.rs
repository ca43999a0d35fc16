//! Exclusive ownership of a set of tables. Today's engine keeps its
//! scheduling state in memory and treats the store as its journal, so two
//! servers on one set of tables would each believe they own every job. Until
//! replicas share the tables through conditional claims alone, a server
//! holds an expiring lease on an owner item and refuses to start while
//! another server's lease runs; it stops if it loses its own.
//!
//! Leases compare wall-clock times written by different machines: a lease
//! of 30 s renewed every 10 s tolerates clock skew well under 20 s.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::errors::{classify, condition_failed};
use super::items::{get_n, get_s, n, s};
use super::DynamoStore;
use crate::clock::Clock;
use crate::store::{StoreError, StoreResult};

/// How long an owner's lease runs, and how often it is renewed.
pub const LEASE: Duration = Duration::from_secs(30);
pub const RENEW_EVERY: Duration = Duration::from_secs(10);

/// Who holds the tables, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub owner: String,
    pub until: SystemTime,
}

/// What trying to take the tables came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    Owned,
    /// Another server's lease has not run out.
    HeldBy(Holder),
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn owner_key() -> std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue> {
    std::collections::HashMap::from([("pk".to_string(), s("owner")), ("sk".to_string(), s("-"))])
}

impl DynamoStore {
    /// Takes the tables for `owner` until `now + lease`, unless another
    /// owner's lease is still running at `now`.
    pub async fn acquire(&self, owner: &str, now: SystemTime, lease: Duration) -> StoreResult<Acquired> {
        let until = now.checked_add(lease).unwrap_or(now);
        let result = self
            .client
            .put_item()
            .table_name(&self.tables.meta)
            .set_item(Some(owner_key()))
            .item("owner", s(owner))
            .item("until", n(millis(until)))
            .condition_expression("attribute_not_exists(pk) OR #until < :now OR #owner = :me")
            .expression_attribute_names("#until", "until")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":now", n(millis(now)))
            .expression_attribute_values(":me", s(owner))
            .return_values_on_condition_check_failure(
                aws_sdk_dynamodb::types::ReturnValuesOnConditionCheckFailure::AllOld,
            )
            .send()
            .await;
        match result {
            Ok(_) => Ok(Acquired::Owned),
            Err(e) => match e.as_service_error() {
                Some(aws_sdk_dynamodb::operation::put_item::PutItemError::ConditionalCheckFailedException(c)) => {
                    let item = c.item().ok_or_else(|| StoreError::Corrupt("owner item without attributes".into()))?;
                    let until = SystemTime::UNIX_EPOCH + Duration::from_millis(get_n(item, "until")?);
                    Ok(Acquired::HeldBy(Holder { owner: get_s(item, "owner")?.to_string(), until }))
                }
                _ => Err(classify("PutItem owner", e)),
            },
        }
    }

    /// Extends `owner`'s lease to `now + lease`; false if the tables are no
    /// longer `owner`'s (its lease ran out and another server took them).
    pub async fn renew(&self, owner: &str, now: SystemTime, lease: Duration) -> StoreResult<bool> {
        let until = now.checked_add(lease).unwrap_or(now);
        let result = self
            .client
            .update_item()
            .table_name(&self.tables.meta)
            .set_key(Some(owner_key()))
            .update_expression("SET #until = :until")
            .condition_expression("#owner = :me")
            .expression_attribute_names("#until", "until")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":until", n(millis(until)))
            .expression_attribute_values(":me", s(owner))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if condition_failed(&e) => Ok(false),
            Err(e) => Err(classify("UpdateItem owner", e)),
        }
    }

    /// Gives the tables up at a clean stop, so the next server need not
    /// wait for the lease to run out.
    pub async fn release(&self, owner: &str) -> StoreResult<()> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.tables.meta)
            .set_key(Some(owner_key()))
            .condition_expression("#owner = :me")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":me", s(owner))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if condition_failed(&e) => Ok(()),
            Err(e) => Err(classify("DeleteItem owner", e)),
        }
    }
}

/// Renews `owner`'s lease until it is lost; returns why. A renewal that
/// fails (DynamoDB unreachable) is retried at the next tick, but the owner
/// gives up before its lease can run out under it.
pub async fn keep(store: Arc<DynamoStore>, owner: String, clock: Arc<dyn Clock>) -> String {
    let mut held_until = clock.now().checked_add(LEASE).unwrap_or(SystemTime::UNIX_EPOCH);
    loop {
        let tick = clock.now().checked_add(RENEW_EVERY).unwrap_or(SystemTime::UNIX_EPOCH);
        clock.sleep_until(tick).await;
        let now = clock.now();
        match store.renew(&owner, now, LEASE).await {
            Ok(true) => held_until = now.checked_add(LEASE).unwrap_or(now),
            Ok(false) => return "another tether server took the DynamoDB tables".to_string(),
            Err(e) if now.checked_add(RENEW_EVERY).is_some_and(|next| next < held_until) => {
                tracing::warn!(error = %e, "renewing the DynamoDB ownership lease failed; trying again");
            }
            Err(e) => return format!("the DynamoDB ownership lease could not be renewed before it ran out: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_server_owns_the_tables_until_its_lease_runs_out() {
        let store = super::super::local::fresh_store("owner").await;
        let lease = Duration::from_secs(30);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(store.acquire("a", t0, lease).await.expect("acquire"), Acquired::Owned);
        // Taking it again is a restart of the same owner: fine.
        assert_eq!(store.acquire("a", t0, lease).await.expect("acquire"), Acquired::Owned);
        let refused = store.acquire("b", t0 + Duration::from_secs(29), lease).await.expect("acquire");
        assert_eq!(refused, Acquired::HeldBy(Holder { owner: "a".into(), until: t0 + lease }));
        assert!(store.renew("a", t0 + Duration::from_secs(10), lease).await.expect("renew"));
        let refused = store.acquire("b", t0 + Duration::from_secs(31), lease).await.expect("acquire");
        assert!(matches!(refused, Acquired::HeldBy(h) if h.until == t0 + Duration::from_secs(40)), "renewed");
        // Once the lease has run out another server may take the tables, and
        // the old owner learns it lost them at its next renewal.
        assert_eq!(store.acquire("b", t0 + Duration::from_secs(41), lease).await.expect("acquire"), Acquired::Owned);
        assert!(!store.renew("a", t0 + Duration::from_secs(42), lease).await.expect("renew"));
        // Releasing what is not yours changes nothing; the owner's release frees it.
        store.release("a").await.expect("release");
        assert!(matches!(
            store.acquire("c", t0 + Duration::from_secs(43), lease).await.expect("acquire"),
            Acquired::HeldBy(_)
        ));
        store.release("b").await.expect("release");
        assert_eq!(store.acquire("c", t0 + Duration::from_secs(43), lease).await.expect("acquire"), Acquired::Owned);
    }
}
