//! Replica membership in the meta table: one item per replica
//! (`pk = "replica"`, `sk = id`) with its address and expiry in epoch
//! milliseconds. Reads are strongly consistent; a replica that died without
//! leaving stays listed until its expiry passes (its peers skip it then).

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;

use super::errors::classify;
use super::items::{get_n, get_s, n, s};
use super::DynamoStore;
use crate::store::membership::{Membership, Replica};
use crate::store::StoreResult;

const PARTITION: &str = "replica";

fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn key(id: &str) -> std::collections::HashMap<String, AttributeValue> {
    std::collections::HashMap::from([("pk".to_string(), s(PARTITION)), ("sk".to_string(), s(id))])
}

#[async_trait]
impl Membership for DynamoStore {
    async fn announce(&self, replica: &Replica) -> StoreResult<()> {
        let mut item = key(&replica.id);
        item.insert("address".into(), s(replica.address.clone()));
        item.insert("expires".into(), n(millis(replica.expires)));
        self.client
            .put_item()
            .table_name(&self.tables.meta)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| classify("PutItem replica", e))?;
        Ok(())
    }

    async fn leave(&self, id: &str) -> StoreResult<()> {
        self.client
            .delete_item()
            .table_name(&self.tables.meta)
            .set_key(Some(key(id)))
            .send()
            .await
            .map_err(|e| classify("DeleteItem replica", e))?;
        Ok(())
    }

    async fn replicas(&self) -> StoreResult<Vec<Replica>> {
        let items = self.query_partition(&self.tables.meta, "pk", s(PARTITION)).await?;
        items
            .iter()
            .map(|item| {
                Ok(Replica {
                    id: get_s(item, "sk")?.to_string(),
                    address: get_s(item, "address")?.to_string(),
                    expires: SystemTime::UNIX_EPOCH + Duration::from_millis(get_n(item, "expires")?),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replicas_announce_renew_and_leave() {
        let store = super::super::local::fresh_store("members").await;
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let a = Replica { id: "a".into(), address: "http://127.0.0.1:1".into(), expires: t0 };
        let b = Replica { id: "b".into(), address: "http://127.0.0.1:2".into(), expires: t0 };
        store.announce(&a).await.expect("announce a");
        store.announce(&b).await.expect("announce b");
        let renewed = Replica { expires: t0 + Duration::from_secs(20), ..a.clone() };
        store.announce(&renewed).await.expect("renew a");
        let mut seen = store.replicas().await.expect("list");
        seen.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(seen, vec![renewed, b.clone()]);
        store.leave("a").await.expect("leave");
        assert_eq!(store.replicas().await.expect("list"), vec![b]);
        // Leaving twice is fine.
        store.leave("a").await.expect("leave again");
    }
}
