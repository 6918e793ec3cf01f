//! The MongoDB adapter: org_integrations, conversations and the deliveries
//! ledger (docs/contract.md §5). Only standard driver features, so that
//! herald runs on MongoDB 6+, Atlas, or any server speaking the wire protocol.
//!
//! The collections are private: everything herald reads or writes goes
//! through an intent-named operation of [`Store`].

mod fleet;
mod inbound;
mod ledger;
mod records;
mod tenants;
mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::TryStreamExt;
use mongodb::bson::{DateTime, Document, doc};
use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};
use secrecy::ExposeSecret;

pub use fleet::{Paced, PacedBy};
pub use inbound::UnclaimedDoc;
pub use ledger::{Claim, Lease};
pub use records::*;
pub use tenants::{ConversationFilter, SeedReport};

use crate::job::{IntegrationId, JobId, OrganizationId};
use crate::settings::Settings;

const ORG_INTEGRATIONS: &str = "org_integrations";
const CONVERSATIONS: &str = "conversations";
const DELIVERIES: &str = "deliveries";
const KEYS: &str = "herald_keys";
const FLEET: &str = "fleet";

#[derive(Debug, thiserror::Error)]
#[error("MongoDB {operation} failed")]
pub struct StoreError {
    pub operation: &'static str,
    #[source]
    pub source: MongoError,
}

fn attempt_document(attempt: &AttemptRecord) -> Result<Document, StoreError> {
    mongodb::bson::to_document(attempt).map_err(|e| StoreError { operation: "encode attempt", source: e.into() })
}

/// The same, straight to BSON bytes (the group-committed `sent` mark).
fn attempt_raw(attempt: &AttemptRecord) -> Result<mongodb::bson::RawDocumentBuf, StoreError> {
    mongodb::bson::to_raw_document_buf(attempt).map_err(|e| StoreError { operation: "encode attempt", source: e.into() })
}

impl StoreError {
    fn new(operation: &'static str) -> impl FnOnce(MongoError) -> Self {
        move |source| Self { operation, source }
    }

    /// The server or the network failed, not the request: worth retrying.
    pub fn is_transient(&self) -> bool {
        is_transient(&self.source)
    }
}

/// `command`, or a timeout after `timeout`: an I/O error (`TimedOut`), so
/// that it is retried as a lost connection is. The command itself may still
/// apply; every command herald bounds this way is safe to apply again (a
/// claim finds its own owner token, a mark, an outcome or a lease matches
/// only its owner, a read is a read).
pub(crate) async fn bounded<T>(
    timeout: Duration,
    command: impl std::future::IntoFuture<Output = Result<T, MongoError>>,
) -> Result<T, MongoError> {
    match tokio::time::timeout(timeout, command.into_future()).await {
        Ok(result) => result,
        Err(_) => Err(timed_out(timeout)),
    }
}

fn timed_out(timeout: Duration) -> MongoError {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")).into()
}

/// The kept header key's 64 hex digits as bytes.
fn decode_key(stored: &Document) -> Result<[u8; 32], StoreError> {
    let text = stored.get_str("key").unwrap_or_default();
    let bytes: Option<Vec<u8>> = (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect();
    bytes.and_then(|b| <[u8; 32]>::try_from(b).ok()).ok_or_else(|| StoreError {
        operation: "read the header signing key",
        source: MongoError::custom(format!("{KEYS}.header_signing_key is not 64 hex digits")),
    })
}

/// Classified by the driver's error kinds and labels, never by message text.
pub fn is_transient(err: &MongoError) -> bool {
    const RETRYABLE_CODES: [i32; 12] = [6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436];
    if err.contains_label(mongodb::error::RETRYABLE_WRITE_ERROR)
        || err.contains_label(mongodb::error::TRANSIENT_TRANSACTION_ERROR)
        || err.contains_label("RetryableError")
    {
        return true;
    }
    match err.kind.as_ref() {
        ErrorKind::Io(_) | ErrorKind::ServerSelection { .. } | ErrorKind::ConnectionPoolCleared { .. } => true,
        ErrorKind::Command(command) => RETRYABLE_CODES.contains(&command.code),
        // A statement's error or the write concern's, in an answer that was
        // itself ok (the ledger's batches): a primary stepping down shows here.
        ErrorKind::Write(WriteFailure::WriteError(write)) => RETRYABLE_CODES.contains(&write.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(concern)) => RETRYABLE_CODES.contains(&concern.code),
        _ => false,
    }
}

/// A counter's value however MongoDB stored the number (`$add` of int64s
/// stays int64; a record written by hand may hold an int32 or a double).
fn integer(value: Option<&mongodb::bson::Bson>) -> Option<i64> {
    use mongodb::bson::Bson;
    match value? {
        Bson::Int64(n) => Some(*n),
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Double(n) => Some(*n as i64),
        _ => None,
    }
}

fn is_duplicate_key(err: &MongoError) -> bool {
    match err.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(write)) => write.code == 11000,
        ErrorKind::Command(command) => command.code == 11000,
        _ => false,
    }
}

/// Which ledger records `Store::list_deliveries` returns; every field narrows.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub organization_id: Option<String>,
    pub integration_id: Option<String>,
    pub state: Option<DeliveryState>,
    /// Last changed at or after.
    pub since: Option<DateTime>,
    /// Last changed at or before.
    pub until: Option<DateTime>,
}

/// The TTL index of `deliveries` (`ledger.retention_days`).
const RETENTION_INDEX: &str = "deliveries_retention";

#[derive(Clone)]
pub struct Store {
    client: Client,
    db: Database,
    /// How long a claim keeps other deliveries of the job away.
    claim_lease: Duration,
    /// How long ledger records are kept after their last change (0: forever).
    retention: Duration,
    ops: Arc<OpCounts>,
    /// The longest a command on a job's or the fleet's path may take
    /// (`mongodb_command_timeout_ms`; see [`bounded`]).
    command_timeout: Duration,
    ledger: ledger::Ledger,
    owners: Arc<ledger::Owners>,
}

/// MongoDB operations made by this process (for metrics and the benchmark):
/// reads, and write statements (one entry of an `update` command's
/// `updates` is one, however many records it changes).
#[derive(Debug, Default)]
struct OpCounts {
    reads: AtomicU64,
    writes: AtomicU64,
}

impl Store {
    pub async fn connect(settings: &Settings) -> Result<Self, StoreError> {
        let mut options = ClientOptions::parse(settings.mongodb_uri.expose_secret()).await.map_err(StoreError::new("connect"))?;
        options.app_name.get_or_insert_with(|| "herald".into());
        // Fail a request within seconds when the server is gone, so that the
        // job is retried instead of holding a worker slot for 30 s.
        options.server_selection_timeout.get_or_insert(Duration::from_secs(5));
        options.connect_timeout.get_or_insert(Duration::from_secs(5));
        let client = Client::with_options(options).map_err(StoreError::new("connect"))?;
        let db = client.database(&settings.mongodb_database);
        let ops = Arc::new(OpCounts::default());
        Ok(Self {
            ledger: ledger::Ledger::start(db.clone(), ops.clone(), settings.mongodb_command_timeout()),
            command_timeout: settings.mongodb_command_timeout(),
            owners: Default::default(),
            client,
            db,
            ops,
            claim_lease: settings.claim_lease(),
            retention: Duration::from_secs(u64::from(settings.ledger.retention_days) * 86_400),
        })
    }

    /// Close the connections (so that a program can exit without the
    /// driver's background tasks failing under it).
    pub async fn shutdown(self) {
        self.client.shutdown().await;
    }

    /// `op`, failing as a lost connection does after
    /// `mongodb_command_timeout_ms` (see [`bounded`]).
    async fn bounded<T>(&self, operation: &'static str, op: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.command_timeout, op).await {
            Ok(result) => result,
            Err(_) => Err(StoreError { operation, source: timed_out(self.command_timeout) }),
        }
    }

    fn read(&self) {
        self.ops.reads.fetch_add(1, Ordering::Relaxed);
    }

    fn write(&self) {
        self.ops.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// (reads, writes) made through this store.
    pub fn op_counts(&self) -> (u64, u64) {
        (self.ops.reads.load(Ordering::Relaxed), self.ops.writes.load(Ordering::Relaxed))
    }

    /// How long a claim is honoured (from the server's clock).
    pub fn claim_lease(&self) -> Duration {
        self.claim_lease
    }

    fn org_integrations(&self) -> Collection<OrgIntegrationDoc> {
        self.db.collection(ORG_INTEGRATIONS)
    }

    fn conversations(&self) -> Collection<ConversationDoc> {
        self.db.collection(CONVERSATIONS)
    }

    fn deliveries(&self) -> Collection<DeliveryDoc> {
        self.db.collection(DELIVERIES)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.run_command(doc! { "ping": 1 }).await.map(drop).map_err(StoreError::new("ping"))
    }

    /// Drop the whole database (test environments clean up with it).
    pub async fn drop_database(&self) -> Result<(), StoreError> {
        self.db.drop().await.map_err(StoreError::new("drop database"))
    }

    /// The key that signs herald's headers when the settings give none:
    /// created once (when `create`), at random, and shared through the
    /// database by every worker and tool of a deployment. `None`: there is
    /// none and `create` is false.
    pub async fn header_key(&self, create: bool) -> Result<Option<[u8; 32]>, StoreError> {
        let operation = "read the header signing key";
        if !create {
            let stored = self.db.collection::<Document>(KEYS).find_one(doc! { "_id": "header_signing_key" }).await;
            return match stored.map_err(StoreError::new(operation))? {
                Some(stored) => decode_key(&stored).map(Some),
                None => Ok(None),
            };
        }
        let mut fresh = [0_u8; 32];
        fresh[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        fresh[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        let hex: String = fresh.iter().map(|b| format!("{b:02x}")).collect();
        let keys = self.db.collection::<Document>(KEYS);
        let stored = keys
            .find_one_and_update(doc! { "_id": "header_signing_key" }, doc! { "$setOnInsert": { "key": hex } })
            .upsert(true)
            .return_document(mongodb::options::ReturnDocument::After)
            .await;
        let stored = match stored {
            // Two processes created it at once: the other one's is the key.
            Err(err) if is_duplicate_key(&err) => keys.find_one(doc! { "_id": "header_signing_key" }).await,
            other => other,
        }
        .map_err(StoreError::new(operation))?;
        decode_key(&stored.unwrap_or_default()).map(Some)
    }

    /// Create the indexes herald relies on; idempotent.
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let unique = |name: &str| IndexOptions::builder().unique(true).name(name.to_owned()).build();
        let named = |name: &str| IndexOptions::builder().name(name.to_owned()).build();
        let index = |keys: Document, options| IndexModel::builder().keys(keys).options(options).build();
        self.org_integrations()
            .create_index(index(doc! { "organization_id": 1, "integration_id": 1 }, unique("org_integration_unique")))
            .await
            .map_err(StoreError::new("create index on org_integrations"))?;
        let conversations = self.conversations();
        for model in [
            index(doc! { "organization_id": 1, "integration_id": 1, "conversation_id": 1 }, unique("conversation_unique")),
            index(doc! { "organization_id": 1, "integration_id": 1, "user_id": 1 }, named("conversation_by_user")),
            index(doc! { "conversation_id": 1 }, named("conversation_by_id")),
        ] {
            conversations.create_index(model).await.map_err(StoreError::new("create index on conversations"))?;
        }
        // Besides `_id` (it starts with the job id, so one job's records are
        // a range), `deliveries` has only the retention index: every job
        // writes the ledger, and each secondary index costs (make bench).
        let deliveries = self.deliveries();
        if self.retention.is_zero() {
            let _ = deliveries.drop_index(RETENTION_INDEX).await;
        } else {
            let options = IndexOptions::builder().name(RETENTION_INDEX.to_owned()).expire_after(self.retention).build();
            let model = index(doc! { "updated_at": 1 }, options);
            if let Err(err) = deliveries.create_index(model.clone()).await {
                // Another retention: the index is replaced.
                let _ = deliveries.drop_index(RETENTION_INDEX).await;
                deliveries
                    .create_index(model)
                    .await
                    .map_err(|_| StoreError { operation: "create the ledger's retention index", source: err })?;
            }
        }
        Ok(())
    }

    /// The indexes `ensure_indexes` makes that the database lacks (for
    /// `herald doctor`): "collection.index" names.
    pub async fn missing_indexes(&self) -> Result<Vec<String>, StoreError> {
        let mut expected = vec![
            (ORG_INTEGRATIONS, "org_integration_unique"),
            (CONVERSATIONS, "conversation_unique"),
            (CONVERSATIONS, "conversation_by_user"),
            (CONVERSATIONS, "conversation_by_id"),
        ];
        if !self.retention.is_zero() {
            expected.push((DELIVERIES, RETENTION_INDEX));
        }
        let mut missing = Vec::new();
        for (collection, index) in expected {
            let names = self.db.collection::<Document>(collection).list_index_names().await.unwrap_or_default();
            if !names.iter().any(|n| n == index) {
                missing.push(format!("{collection}.{index}"));
            }
        }
        Ok(missing)
    }

    /// Record that this delivery is about to send `job` of this
    /// org_integration, unless it was sent already or another delivery holds
    /// it. Claims of concurrent jobs share one command (see `ledger`).
    pub async fn claim(&self, job: JobId, org: &OrganizationId, integration: &IntegrationId) -> Result<Claim, StoreError> {
        let job_id = job.to_string();
        let op = ledger::Op::Claim {
            key: delivery_key(&job_id, org.as_str(), integration.as_str()),
            job_id,
            organization_id: org.to_string(),
            integration_id: integration.to_string(),
            owner: self.owners.next(),
            lease_ms: i64::try_from(self.claim_lease.as_millis()).unwrap_or(i64::MAX),
        };
        match self.ledger.run("claim delivery", op).await? {
            ledger::Done::Claimed(claim) => Ok(claim),
            ledger::Done::Marked(_) => {
                Err(StoreError { operation: "claim delivery", source: MongoError::custom("a claim answered as a mark") })
            }
        }
    }

    /// Record the job sent. `false` when the claim was no longer this
    /// delivery's (its lease ran out and another delivery took the job).
    /// The marks of concurrent jobs are one statement (see `ledger`).
    pub async fn mark_sent(&self, lease: &Lease, activity_id: &str, attempts: &[AttemptRecord]) -> Result<bool, StoreError> {
        let op = ledger::Op::Sent {
            key: lease.key.clone(),
            owner: lease.owner.clone(),
            conversation_id: attempts.last().and_then(|a| a.conversation_id.clone()).unwrap_or_default(),
            activity_id: activity_id.to_owned(),
            attempts: attempts.iter().map(|a| a.sends).sum(),
            entries: attempts.iter().map(attempt_raw).collect::<Result<_, _>>()?,
        };
        match self.ledger.run("mark delivery sent", op).await? {
            ledger::Done::Marked(held) => Ok(held),
            ledger::Done::Claimed(_) => {
                Err(StoreError { operation: "mark delivery sent", source: MongoError::custom("a mark answered as a claim") })
            }
        }
    }

    /// Record how this delivery ended when it did not send (a retry, a dead
    /// letter, an unconfirmed send), and give up the claim. Only the holder of
    /// the claim changes the record; `false` when it no longer holds it.
    pub async fn release_claim(
        &self,
        lease: &Lease,
        state: DeliveryState,
        error: &str,
        attempts: &[AttemptRecord],
    ) -> Result<bool, StoreError> {
        self.write();
        let entries: Vec<Document> = attempts.iter().map(attempt_document).collect::<Result<_, _>>()?;
        let reason = attempts.last().and_then(|a| a.reason.as_deref());
        let deliveries = self.deliveries();
        let update = deliveries.update_one(
            doc! { "_id": &lease.key, "owner": &lease.owner },
            doc! {
                "$set": { "state": state.as_str(), "reason": reason, "last_error": error },
                "$inc": { "attempts": attempts.iter().map(|a| a.sends).sum::<i64>() },
                "$push": { "history": { "$each": entries, "$slice": -MAX_HISTORY } },
                "$unset": { "lease_until": "", "owner": "", "claimed_from": "" },
                "$currentDate": { "updated_at": true },
            },
        );
        let result = bounded(self.command_timeout, update).await.map_err(StoreError::new("record delivery outcome"))?;
        Ok(result.matched_count > 0)
    }

    /// Let an operator resend a job whose delivery is `unconfirmed` (after
    /// checking that it did not reach the conversation): the record of exactly
    /// this job of this org_integration becomes `retrying`, so the next
    /// delivery of the job may claim it; another organization's or
    /// integration's record of the same job id is never touched. Returns the
    /// number of records changed (0 or 1).
    pub async fn allow_resend(&self, job_id: &str, organization_id: &str, integration_id: &str) -> Result<u64, StoreError> {
        self.write();
        let filter = doc! { "_id": delivery_key(job_id, organization_id, integration_id), "state": "unconfirmed" };
        let result = self
            .deliveries()
            .update_one(filter, doc! { "$set": { "state": "retrying" }, "$currentDate": { "updated_at": true } })
            .await
            .map_err(StoreError::new("allow resend"))?;
        Ok(result.modified_count)
    }

    /// Every ledger record of `job_id`: one per org_integration that received
    /// a job with this id (and a record from before the ledger was scoped).
    pub async fn deliveries_of(&self, job_id: &str) -> Result<Vec<DeliveryDoc>, StoreError> {
        self.read();
        let (low, high) = delivery_key_range(job_id);
        self.deliveries()
            .find(doc! { "$or": [{ "_id": { "$gte": low, "$lt": high } }, { "_id": job_id }] })
            .await
            .map_err(StoreError::new("find delivery"))?
            .try_collect()
            .await
            .map_err(StoreError::new("find delivery"))
    }

    /// The one ledger record of `job_id` (tests and tools; `None` if there is
    /// none, the first if organizations reused the id).
    pub async fn delivery(&self, job_id: &str) -> Result<Option<DeliveryDoc>, StoreError> {
        Ok(self.deliveries_of(job_id).await?.into_iter().next())
    }

    /// Ledger records matching `filter`, newest first, at most `limit`.
    pub async fn list_deliveries(&self, filter: &DeliveryFilter, limit: i64) -> Result<Vec<DeliveryDoc>, StoreError> {
        self.read();
        let mut query = Document::new();
        if let Some(org) = &filter.organization_id {
            query.insert("organization_id", org);
        }
        if let Some(integration) = &filter.integration_id {
            query.insert("integration_id", integration);
        }
        if let Some(state) = filter.state {
            query.insert("state", state.as_str());
        }
        let mut updated = Document::new();
        if let Some(since) = filter.since {
            updated.insert("$gte", since);
        }
        if let Some(until) = filter.until {
            updated.insert("$lte", until);
        }
        if !updated.is_empty() {
            query.insert("updated_at", updated);
        }
        self.deliveries()
            .find(query)
            .sort(doc! { "updated_at": -1 })
            .limit(limit)
            .await
            .map_err(StoreError::new("list deliveries"))?
            .try_collect()
            .await
            .map_err(StoreError::new("list deliveries"))
    }
}
