//! The fleet's leases (docs/contract.md §5, collection `fleet`): which worker
//! holds the router and each shard, and which workers are alive. Every
//! expiry is the MongoDB server's `$$NOW` plus the lease, so no worker's
//! clock is compared with another's.
//!
//! Documents: `{_id: "worker/<id>", kind: "worker", expires_at}` for each
//! live worker, and `{_id: "<unit>", kind: "unit", owner, expires_at}` for
//! the router (`router`) and each shard (`shard/<n>`).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::TryStreamExt;
use mongodb::bson::{Document, doc};

use super::{FLEET, Store, StoreError, is_duplicate_key};

fn expires(lease: Duration) -> Document {
    let ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    doc! { "$dateAdd": { "startDate": "$$NOW", "unit": "millisecond", "amount": ms } }
}

fn live() -> Document {
    doc! { "$expr": { "$gt": ["$expires_at", "$$NOW"] } }
}

impl Store {
    fn fleet(&self) -> mongodb::Collection<Document> {
        self.db.collection(FLEET)
    }

    /// Say this worker is alive for `lease` more, and count the live workers
    /// (this one included).
    pub async fn fleet_heartbeat(&self, worker: &str, lease: Duration) -> Result<u64, StoreError> {
        let fleet = self.fleet();
        self.write();
        fleet
            .update_one(
                doc! { "_id": format!("worker/{worker}") },
                vec![doc! { "$set": { "kind": "worker", "expires_at": expires(lease) } }],
            )
            .upsert(true)
            .await
            .map_err(StoreError::new("fleet heartbeat"))?;
        self.read();
        let mut filter = live();
        filter.insert("kind", "worker");
        fleet.count_documents(filter).await.map_err(StoreError::new("count the fleet")).map(|n| n.max(1))
    }

    /// Extend every unit this worker still holds; returns them. A unit whose
    /// lease ran out (and may have been taken) is not extended.
    pub async fn fleet_renew(&self, worker: &str, lease: Duration) -> Result<Vec<String>, StoreError> {
        let fleet = self.fleet();
        let mut mine = live();
        mine.insert("owner", worker);
        self.write();
        fleet
            .update_many(mine.clone(), vec![doc! { "$set": { "expires_at": expires(lease) } }])
            .await
            .map_err(StoreError::new("renew the fleet's leases"))?;
        let held = self.fleet_find(mine, "read the fleet's leases").await?;
        Ok(held.iter().filter_map(|d| d.get_str("_id").ok().map(str::to_owned)).collect())
    }

    /// The units held right now, by owner.
    pub async fn fleet_holders(&self) -> Result<HashMap<String, String>, StoreError> {
        let mut filter = live();
        filter.insert("kind", "unit");
        let held = self.fleet_find(filter, "read the fleet").await?;
        Ok(held.iter().filter_map(|d| Some((d.get_str("_id").ok()?.to_owned(), d.get_str("owner").ok()?.to_owned()))).collect())
    }

    /// The `fleet` records matching `filter` (a handful: workers and units).
    async fn fleet_find(&self, filter: Document, operation: &'static str) -> Result<Vec<Document>, StoreError> {
        self.read();
        self.fleet().find(filter).await.map_err(StoreError::new(operation))?.try_collect().await.map_err(StoreError::new(operation))
    }

    /// Take `unit` for `lease` if nobody holds it; `false` if somebody does.
    pub async fn fleet_claim(&self, unit: &str, worker: &str, lease: Duration) -> Result<bool, StoreError> {
        let fleet = self.fleet();
        // MongoDB refuses `$expr` in an upsert's filter: the unit's record is
        // made (unheld) first, once, then taken by a plain update.
        for first in [true, false] {
            let free = doc! { "_id": unit, "$expr": { "$not": [{ "$gt": ["$expires_at", "$$NOW"] }] } };
            self.write();
            let taken = fleet
                .update_one(free, vec![doc! { "$set": { "kind": "unit", "owner": worker, "expires_at": expires(lease) } }])
                .await
                .map_err(StoreError::new("claim a fleet unit"))?;
            if taken.matched_count == 1 {
                return Ok(true);
            }
            if !first {
                break;
            }
            self.write();
            match fleet.insert_one(doc! { "_id": unit, "kind": "unit", "expires_at": mongodb::bson::DateTime::MIN }).await {
                Ok(_) => {}
                Err(err) if is_duplicate_key(&err) => return Ok(false),
                Err(err) => return Err(StoreError { operation: "create a fleet unit", source: err }),
            }
        }
        Ok(false)
    }

    /// Give `unit` up (only if this worker holds it).
    pub async fn fleet_release(&self, unit: &str, worker: &str) -> Result<(), StoreError> {
        self.write();
        self.fleet()
            .update_one(doc! { "_id": unit, "owner": worker }, doc! { "$unset": { "owner": "", "expires_at": "" } })
            .await
            .map(drop)
            .map_err(StoreError::new("release a fleet unit"))
    }

    /// This worker leaves the fleet: the others rebalance at once.
    pub async fn fleet_leave(&self, worker: &str) -> Result<(), StoreError> {
        self.write();
        self.fleet().delete_one(doc! { "_id": format!("worker/{worker}") }).await.map(drop).map_err(StoreError::new("leave the fleet"))
    }
}
