//! The fleet's leases (docs/contract.md §5, collection `fleet`): which worker
//! holds the router and each shard, and which workers are alive. Every
//! expiry is the MongoDB server's `$$NOW` plus the lease, so no worker's
//! clock is compared with another's.
//!
//! Documents: `{_id: "worker/<id>", kind: "worker", expires_at}` for each
//! worker, and `{_id: "<unit>", kind: "unit", owner, expires_at}` for the
//! router (`router`) and each shard (`shard/<n>`); the router's also says
//! through which broker node its holder consumes (`via`, `host:port`). A worker's record also
//! carries its recent requests in its busiest conversations and tenants
//! (`paced`, written at `paced_at`, of use until `paced_until`), for the
//! worker that paces them next; it outlives the worker (a worker that stops
//! marks it `left`) until `paced_until`.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::TryStreamExt;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, Document, doc};
use teams_limits::{Carried, Scope};

use super::{FLEET, Store, StoreError, is_duplicate_key};

/// A worker's recent requests, as it writes them for the next holder of its
/// conversations and tenants.
pub struct Paced {
    pub carried: Vec<Carried>,
    /// How long they stay of use (the longest window).
    pub horizon: Duration,
}

/// Another worker's recent requests, as read back.
#[derive(Debug)]
pub struct PacedBy {
    pub worker: String,
    /// How long ago (by the MongoDB server's clock) it wrote them.
    pub behind: Duration,
    /// Gone without a last word (its lease ran out; it did not leave).
    pub died: bool,
    pub carried: Vec<Carried>,
}

fn encode(carried: &[Carried]) -> Bson {
    let keys = carried
        .iter()
        .map(|key| {
            let mut bytes = Vec::with_capacity(key.sends.len() * 8);
            for (age, count) in &key.sends {
                bytes.extend_from_slice(&age.to_le_bytes());
                bytes.extend_from_slice(&count.to_le_bytes());
            }
            let scope = match key.scope {
                Scope::Conversation => "c",
                Scope::Tenant => "t",
            };
            Bson::Document(doc! {
                "s": scope, "a": key.app_id.as_str(), "i": key.id.as_str(),
                "w": Binary { subtype: BinarySubtype::Generic, bytes },
            })
        })
        .collect();
    // Ids come from outside: a literal, so that none is read as a field path.
    Bson::Document(doc! { "$literal": Bson::Array(keys) })
}

/// The keys of one record; a key that does not read is skipped.
fn decode(keys: &[Bson]) -> Vec<Carried> {
    keys.iter()
        .filter_map(|key| {
            let key = key.as_document()?;
            let scope = match key.get_str("s").ok()? {
                "c" => Scope::Conversation,
                "t" => Scope::Tenant,
                _ => return None,
            };
            let bytes = &key.get_binary_generic("w").ok()?;
            let sends = bytes
                .chunks_exact(8)
                .map(|pair| (u32::from_le_bytes(pair[..4].try_into().expect("4")), u32::from_le_bytes(pair[4..].try_into().expect("4"))))
                .collect();
            Some(Carried { scope, app_id: key.get_str("a").ok()?.to_owned(), id: key.get_str("i").ok()?.to_owned(), sends })
        })
        .collect()
}

/// The fields of a worker's record that carry `paced`.
fn paced_fields(set: &mut Document, paced: &Paced) {
    set.insert("paced", encode(&paced.carried));
    set.insert("paced_at", "$$NOW");
    // Nothing carried: of no use from now on (the record of a worker gone
    // can be deleted at once).
    let until = if paced.carried.is_empty() { Duration::ZERO } else { paced.horizon };
    set.insert("paced_until", expires(until));
}

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

    /// Say this worker is alive for `lease` more, and how many more shards
    /// it would take (`wants`; with its recent requests, when it paces).
    /// The live workers (this one included) with what each wants: a record
    /// that never says it wants a shard (a stale or foreign one) never makes
    /// another worker give one up.
    pub async fn fleet_heartbeat(
        &self,
        worker: &str,
        lease: Duration,
        wants: u32,
        paced: Option<&Paced>,
    ) -> Result<Vec<(String, u32)>, StoreError> {
        self.bounded("fleet heartbeat", async {
            let fleet = self.fleet();
            // `left` is cleared: a worker back after a reconnect is alive again.
            let mut set = doc! { "kind": "worker", "expires_at": expires(lease), "left": false, "wants": i64::from(wants) };
            if let Some(paced) = paced {
                paced_fields(&mut set, paced);
            }
            self.write();
            fleet
                .update_one(doc! { "_id": format!("worker/{worker}") }, vec![doc! { "$set": set }])
                .upsert(true)
                .await
                .map_err(StoreError::new("fleet heartbeat"))?;
            let mut filter = live();
            filter.insert("kind", "worker");
            let live = self.fleet_find(filter, "read the fleet").await?;
            Ok(live
                .iter()
                .filter_map(|d| {
                    let id = d.get_str("_id").ok()?.strip_prefix("worker/")?.to_owned();
                    let wants = super::integer(d.get("wants")).and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
                    Some((id, wants))
                })
                .collect())
        })
        .await
    }

    /// Extend every unit this worker still holds; returns them. A unit whose
    /// lease ran out (and may have been taken) is not extended.
    pub async fn fleet_renew(&self, worker: &str, lease: Duration) -> Result<Vec<String>, StoreError> {
        self.bounded("fleet renew", async {
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
        })
        .await
    }

    /// The units held right now, by owner.
    pub async fn fleet_holders(&self) -> Result<HashMap<String, String>, StoreError> {
        self.bounded("fleet holders", async {
            let mut filter = live();
            filter.insert("kind", "unit");
            let held = self.fleet_find(filter, "read the fleet").await?;
            Ok(held.iter().filter_map(|d| Some((d.get_str("_id").ok()?.to_owned(), d.get_str("owner").ok()?.to_owned()))).collect())
        })
        .await
    }

    /// The `fleet` records matching `filter` (a handful: workers and units).
    async fn fleet_find(&self, filter: Document, operation: &'static str) -> Result<Vec<Document>, StoreError> {
        self.read();
        self.fleet().find(filter).await.map_err(StoreError::new(operation))?.try_collect().await.map_err(StoreError::new(operation))
    }

    /// Take `unit` for `lease` if nobody holds it: how many times it was
    /// taken, this time included (a number no earlier holder had); `None` if
    /// somebody holds it.
    pub async fn fleet_claim(&self, unit: &str, worker: &str, lease: Duration) -> Result<Option<i64>, StoreError> {
        self.bounded("fleet claim", async {
            let fleet = self.fleet();
            // MongoDB refuses `$expr` in an upsert's filter: the unit's record is
            // made (unheld) first, once, then taken by a plain update.
            for first in [true, false] {
                let free = doc! { "_id": unit, "$expr": { "$not": [{ "$gt": ["$expires_at", "$$NOW"] }] } };
                self.write();
                let claims = doc! { "$add": [{ "$ifNull": ["$claims", 0_i64] }, 1_i64] };
                let taken = fleet
                    .find_one_and_update(
                        free,
                        vec![doc! { "$set": { "kind": "unit", "owner": worker, "expires_at": expires(lease), "claims": claims } }],
                    )
                    .return_document(mongodb::options::ReturnDocument::After)
                    .projection(doc! { "claims": 1 })
                    .await
                    .map_err(StoreError::new("claim a fleet unit"))?;
                if let Some(taken) = taken {
                    return Ok(Some(super::integer(taken.get("claims")).unwrap_or(1)));
                }
                if !first {
                    break;
                }
                self.write();
                match fleet.insert_one(doc! { "_id": unit, "kind": "unit", "expires_at": mongodb::bson::DateTime::MIN }).await {
                    Ok(_) => {}
                    Err(err) if is_duplicate_key(&err) => return Ok(None),
                    Err(err) => return Err(StoreError { operation: "create a fleet unit", source: err }),
                }
            }
            Ok(None)
        })
        .await
    }

    /// The broker nodes (`host:port`) through which holders of `unit`
    /// consumed and did not say they stopped (`vias`): a holder's consumer
    /// may still be counted there, by a node that lost it.
    pub async fn fleet_vias(&self, unit: &str) -> Result<Vec<String>, StoreError> {
        self.bounded("fleet vias", async {
            self.read();
            let found = self
                .fleet()
                .find_one(doc! { "_id": unit })
                .projection(doc! { "vias": 1 })
                .await
                .map_err(StoreError::new("read a fleet unit"))?;
            let vias = found.as_ref().and_then(|d| d.get_array("vias").ok());
            Ok(vias.into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        })
        .await
    }

    /// Note that a holder of `unit` consumes through broker node `via`
    /// (`consuming`), or that its consumer there is gone (not `consuming`).
    pub async fn fleet_note_via(&self, unit: &str, via: &str, consuming: bool) -> Result<(), StoreError> {
        self.bounded("fleet vias", async {
            self.write();
            let update = if consuming {
                doc! { "$addToSet": { "vias": via } }
            } else {
                doc! { "$pull": { "vias": via } }
            };
            self.fleet()
                .update_one(doc! { "_id": unit }, update)
                .await
                .map(drop)
                .map_err(StoreError::new("note a fleet unit's broker node"))
        })
        .await
    }

    /// Give `unit` up (only if this worker holds it).
    pub async fn fleet_release(&self, unit: &str, worker: &str) -> Result<(), StoreError> {
        self.bounded("fleet release", async {
            self.write();
            self.fleet()
                .update_one(doc! { "_id": unit, "owner": worker }, doc! { "$unset": { "owner": "", "expires_at": "" } })
                .await
                .map(drop)
                .map_err(StoreError::new("release a fleet unit"))
        })
        .await
    }

    /// Write this worker's recent requests now (before it gives conversations
    /// up).
    pub async fn fleet_pace(&self, worker: &str, paced: &Paced) -> Result<(), StoreError> {
        self.bounded("fleet pace", async {
            let mut set = Document::new();
            paced_fields(&mut set, paced);
            self.write();
            self.fleet()
                .update_one(doc! { "_id": format!("worker/{worker}") }, vec![doc! { "$set": set }])
                .await
                .map(drop)
                .map_err(StoreError::new("write the fleet's pacing"))
        })
        .await
    }

    /// This worker leaves the fleet: the others rebalance at once. Its record
    /// stays, with its last requests (`paced`), until they are of no use.
    pub async fn fleet_leave(&self, worker: &str, paced: Option<&Paced>) -> Result<(), StoreError> {
        self.bounded("fleet leave", async {
            let id = format!("worker/{worker}");
            self.write();
            let Some(paced) = paced else {
                return self.fleet().delete_one(doc! { "_id": id }).await.map(drop).map_err(StoreError::new("leave the fleet"));
            };
            let mut set = doc! { "left": true, "expires_at": "$$NOW" };
            paced_fields(&mut set, paced);
            self.fleet()
                .update_one(doc! { "_id": id }, vec![doc! { "$set": set }])
                .await
                .map(drop)
                .map_err(StoreError::new("leave the fleet"))
        })
        .await
    }

    /// The recent requests the other workers (live, left or dead) wrote and
    /// that are still of use; the records of workers gone and of no more use
    /// are deleted.
    pub async fn fleet_paced(&self, worker: &str) -> Result<Vec<PacedBy>, StoreError> {
        self.bounded("fleet paced", async {
            let fleet = self.fleet();
            let me = format!("worker/{worker}");
            // The server's clock now (every time below is the server's), read
            // back from this worker's own record.
            self.write();
            let now = fleet
                .find_one_and_update(doc! { "_id": me.as_str() }, vec![doc! { "$set": { "read_at": "$$NOW" } }])
                .return_document(mongodb::options::ReturnDocument::After)
                .projection(doc! { "read_at": 1 })
                .await
                .map_err(StoreError::new("read the server's clock"))?
                .and_then(|record| record.get_datetime("read_at").ok().copied())
                .ok_or_else(|| StoreError {
                    operation: "read the server's clock",
                    source: mongodb::error::Error::custom("no worker record"),
                })?;
            let filter = doc! { "kind": "worker", "_id": { "$ne": me.as_str() }, "paced_until": { "$gt": now } };
            let records = self.fleet_find(filter, "read the fleet's pacing").await?;
            self.write();
            fleet
                .delete_many(doc! { "kind": "worker", "expires_at": { "$lte": now }, "$or": [
                    { "paced_until": { "$exists": false } },
                    { "paced_until": { "$lte": now } },
                ] })
                .await
                .map_err(StoreError::new("forget workers gone"))?;
            let since = |field: &str, record: &Document| {
                record
                    .get_datetime(field)
                    .ok()
                    .map(|at| Duration::from_millis(u64::try_from(now.timestamp_millis() - at.timestamp_millis()).unwrap_or(0)))
            };
            Ok(records
                .iter()
                .filter_map(|record| {
                    let worker = record.get_str("_id").ok()?.strip_prefix("worker/")?.to_owned();
                    let died = !record.get_bool("left").unwrap_or(false) && record.get_datetime("expires_at").is_ok_and(|at| *at <= now);
                    Some(PacedBy { worker, behind: since("paced_at", record)?, died, carried: decode(record.get_array("paced").ok()?) })
                })
                .collect())
        })
        .await
    }
}
