//! The MongoDB adapter: org_integrations, conversations and the deliveries
//! ledger (contract §5). Only standard driver features, so that herald runs on
//! MongoDB 6+, Atlas, or any server speaking the wire protocol.

mod ledger;

use std::time::Duration;

use mongodb::bson::{self, Bson, DateTime, doc};
use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use crate::job::{ConversationId, IntegrationId, JobId, OrganizationId, UserId};
use crate::settings::Settings;

pub const ORG_INTEGRATIONS: &str = "org_integrations";
pub const CONVERSATIONS: &str = "conversations";
pub const DELIVERIES: &str = "deliveries";

#[derive(Debug, thiserror::Error)]
#[error("MongoDB {operation} failed")]
pub struct StoreError {
    pub operation: &'static str,
    #[source]
    pub source: MongoError,
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
        _ => false,
    }
}

fn is_duplicate_key(err: &MongoError) -> bool {
    match err.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(write)) => write.code == 11000,
        ErrorKind::Command(command) => command.code == 11000,
        _ => false,
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IntegrationStatus {
    Active,
    Disabled,
}

/// How an org_integration's bot authenticates. The secret is either stored
/// here (`app_secret`) or referenced so that it stays out of the database.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BotDoc {
    pub app_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_secret: Option<String>,
    /// Name of an environment variable of the worker holding the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_secret_env: Option<String>,
    /// Path of a file (e.g. a mounted Kubernetes secret) holding the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_secret_file: Option<String>,
    /// The tenant id of a single-tenant bot; absent for a multi-tenant bot
    /// (its cloud's multi-tenant authority, `botframework.com` in public).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

/// One organization's use of a Teams integration (contract §5).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OrgIntegrationDoc {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Bson>,
    pub organization_id: String,
    pub integration_id: String,
    pub status: IntegrationStatus,
    pub tenant_id: String,
    /// A key of `teams.clouds`; `public` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud: Option<String>,
    pub service_url: String,
    pub bot: BotDoc,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime>,
}

impl OrgIntegrationDoc {
    /// The record's `_id` as text, for headers and logs.
    pub fn id_string(&self) -> String {
        match &self.id {
            Some(Bson::ObjectId(oid)) => oid.to_hex(),
            Some(Bson::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => format!("{}/{}", self.organization_id, self.integration_id),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConversationKind {
    Channel,
    Personal,
    Group,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConversationStatus {
    Active,
    Quarantined,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Quarantine {
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teams_code: Option<String>,
    pub at: DateTime,
}

/// A conversation registered for an org_integration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConversationDoc {
    pub organization_id: String,
    pub integration_id: String,
    pub conversation_id: String,
    pub kind: ConversationKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    pub status: ConversationStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<Quarantine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    Sending,
    Retrying,
    Sent,
    DeadLettered,
}

/// The ledger record of one job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeliveryDoc {
    #[serde(rename = "_id")]
    pub job_id: String,
    pub organization_id: String,
    pub integration_id: String,
    pub state: DeliveryState,
    #[serde(default)]
    pub attempts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub created_at: DateTime,
    pub updated_at: DateTime,
}

/// What the ledger says about a job about to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Not sent yet: go ahead.
    Fresh,
    /// Already recorded `sent`: ack without a second post.
    AlreadySent,
    /// Another delivery of the same job id is sending it right now (its
    /// claim is younger than the lease): try again later.
    InProgress,
}

#[derive(Clone)]
pub struct Store {
    db: Database,
    /// How long a `sending` claim keeps other deliveries of the job away.
    claim_lease: Duration,
    ops: std::sync::Arc<OpCounts>,
    ledger: ledger::Ledger,
}

/// MongoDB operations made by this process (for metrics and the benchmark).
#[derive(Debug, Default)]
pub struct OpCounts {
    reads: std::sync::atomic::AtomicU64,
    writes: std::sync::atomic::AtomicU64,
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
        Ok(Self { ledger: ledger::Ledger::start(db.clone()), db, ops: Default::default(), claim_lease: settings.claim_lease() })
    }

    fn read(&self) {
        self.ops.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn write(&self) {
        self.ops.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// (reads, writes) made through this store.
    pub fn op_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.ops.reads.load(Relaxed), self.ops.writes.load(Relaxed))
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    pub fn org_integrations(&self) -> Collection<OrgIntegrationDoc> {
        self.db.collection(ORG_INTEGRATIONS)
    }

    pub fn conversations(&self) -> Collection<ConversationDoc> {
        self.db.collection(CONVERSATIONS)
    }

    pub fn deliveries(&self) -> Collection<DeliveryDoc> {
        self.db.collection(DELIVERIES)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.run_command(doc! { "ping": 1 }).await.map(drop).map_err(StoreError::new("ping"))
    }

    /// Create the indexes herald relies on; idempotent.
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let unique = |name: &str| IndexOptions::builder().unique(true).name(name.to_owned()).build();
        let named = |name: &str| IndexOptions::builder().name(name.to_owned()).build();
        self.org_integrations()
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "organization_id": 1, "integration_id": 1 })
                    .options(unique("org_integration_unique"))
                    .build(),
            )
            .await
            .map_err(StoreError::new("create index on org_integrations"))?;
        let conversations = self.conversations();
        conversations
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "organization_id": 1, "integration_id": 1, "conversation_id": 1 })
                    .options(unique("conversation_unique"))
                    .build(),
            )
            .await
            .map_err(StoreError::new("create index on conversations"))?;
        conversations
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "organization_id": 1, "integration_id": 1, "user_id": 1 })
                    .options(named("conversation_by_user"))
                    .build(),
            )
            .await
            .map_err(StoreError::new("create index on conversations"))?;
        conversations
            .create_index(IndexModel::builder().keys(doc! { "conversation_id": 1 }).options(named("conversation_by_id")).build())
            .await
            .map_err(StoreError::new("create index on conversations"))?;
        // `deliveries` keeps only its `_id` index: every job writes it twice,
        // and a secondary index costs about 15% of that (make bench).
        Ok(())
    }

    /// The org_integration of exactly this organization and integration.
    /// There is no other lookup: no "first of the integration", ever.
    pub async fn org_integration(
        &self,
        org: &OrganizationId,
        integration: &IntegrationId,
    ) -> Result<Option<OrgIntegrationDoc>, StoreError> {
        self.read();
        self.org_integrations()
            .find_one(doc! { "organization_id": org.as_str(), "integration_id": integration.as_str() })
            .await
            .map_err(StoreError::new("find org_integration"))
    }

    pub async fn conversation(
        &self,
        org: &OrganizationId,
        integration: &IntegrationId,
        conversation: &ConversationId,
    ) -> Result<Option<ConversationDoc>, StoreError> {
        self.read();
        self.conversations()
            .find_one(doc! {
                "organization_id": org.as_str(), "integration_id": integration.as_str(), "conversation_id": conversation.as_str(),
            })
            .await
            .map_err(StoreError::new("find conversation"))
    }

    /// The user's personal conversations in this org_integration (normally one).
    pub async fn personal_conversations(
        &self,
        org: &OrganizationId,
        integration: &IntegrationId,
        user: &UserId,
    ) -> Result<Vec<ConversationDoc>, StoreError> {
        self.read();
        use futures_util::TryStreamExt;
        self.conversations()
            .find(doc! {
                "organization_id": org.as_str(), "integration_id": integration.as_str(), "user_id": user.as_str(), "kind": "personal",
            })
            .limit(2)
            .await
            .map_err(StoreError::new("find personal conversation"))?
            .try_collect()
            .await
            .map_err(StoreError::new("find personal conversation"))
    }

    /// Record a conversation (created through the Connector); idempotent.
    pub async fn upsert_conversation(&self, conversation: &ConversationDoc) -> Result<(), StoreError> {
        self.write();
        let filter = doc! {
            "organization_id": &conversation.organization_id,
            "integration_id": &conversation.integration_id,
            "conversation_id": &conversation.conversation_id,
        };
        let fields = bson::to_document(conversation).map_err(|e| StoreError { operation: "encode conversation", source: e.into() })?;
        match self.conversations().update_one(filter, doc! { "$setOnInsert": fields }).upsert(true).await {
            // A concurrent upsert of the same conversation inserted it first.
            Err(err) if is_duplicate_key(&err) => Ok(()),
            other => other.map(drop).map_err(StoreError::new("upsert conversation")),
        }
    }

    /// Mark a conversation quarantined for this org_integration.
    pub async fn quarantine(
        &self,
        org: &str,
        integration: &str,
        conversation: &str,
        reason: &str,
        teams_code: Option<&str>,
    ) -> Result<bool, StoreError> {
        self.write();
        let result = self
            .conversations()
            .update_one(
                doc! { "organization_id": org, "integration_id": integration, "conversation_id": conversation },
                doc! { "$set": {
                    "status": "quarantined",
                    "quarantine": { "reason": reason, "teams_code": teams_code, "at": DateTime::now() },
                } },
            )
            .await
            .map_err(StoreError::new("quarantine conversation"))?;
        Ok(result.matched_count > 0)
    }

    /// Lift a quarantine.
    pub async fn release(&self, org: &str, integration: &str, conversation: &str) -> Result<bool, StoreError> {
        self.write();
        let result = self
            .conversations()
            .update_one(
                doc! { "organization_id": org, "integration_id": integration, "conversation_id": conversation },
                doc! { "$set": { "status": "active" }, "$unset": { "quarantine": "" } },
            )
            .await
            .map_err(StoreError::new("release conversation"))?;
        Ok(result.matched_count > 0)
    }

    /// Record that `job` is about to be sent, unless it was sent already.
    /// Claims of concurrent jobs share one command (see `ledger`).
    pub async fn claim(&self, job: JobId, org: &OrganizationId, integration: &IntegrationId) -> Result<Claim, StoreError> {
        self.write();
        let op = ledger::Op::Claim {
            job: job.to_string(),
            organization_id: org.to_string(),
            integration_id: integration.to_string(),
            lease: self.claim_lease,
        };
        match self.ledger.run("claim delivery", op).await? {
            ledger::Done::Claimed(claim) => Ok(claim),
            ledger::Done::Marked => unreachable!("a claim answers with a claim"),
        }
    }

    pub async fn mark_sent(&self, job: JobId, conversation_id: &str, activity_id: &str, attempts: u32) -> Result<(), StoreError> {
        self.write();
        let op = ledger::Op::Sent {
            job: job.to_string(),
            conversation_id: conversation_id.to_owned(),
            activity_id: activity_id.to_owned(),
            attempts: i64::from(attempts),
        };
        self.ledger.run("mark delivery sent", op).await.map(drop)
    }

    /// Record a retry or a dead letter. A job that never got as far as a claim
    /// (invalid, expired) gets no record.
    pub async fn mark_failed(&self, job: JobId, state: DeliveryState, reason: &str, error: &str, attempts: u32) -> Result<(), StoreError> {
        self.write();
        let state = bson::to_bson(&state).map_err(|e| StoreError { operation: "encode delivery state", source: e.into() })?;
        self.deliveries()
            .update_one(
                doc! { "_id": job.to_string(), "state": { "$ne": "sent" } },
                doc! {
                    "$set": { "state": state, "reason": reason, "last_error": error, "updated_at": DateTime::now() },
                    "$inc": { "attempts": i64::from(attempts) },
                    "$unset": { "lease_until": "" },
                },
            )
            .await
            .map(drop)
            .map_err(StoreError::new("mark delivery failed"))
    }

    pub async fn delivery(&self, job: &str) -> Result<Option<DeliveryDoc>, StoreError> {
        self.read();
        self.deliveries().find_one(doc! { "_id": job }).await.map_err(StoreError::new("find delivery"))
    }
}
