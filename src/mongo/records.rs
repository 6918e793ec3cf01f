//! The documents herald stores (docs/contract.md §5), as typed records.

use mongodb::bson::{Bson, DateTime};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IntegrationStatus {
    Active,
    Disabled,
}

/// How an org_integration reaches Teams.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum IntegrationKind {
    /// A Bot Framework bot, through the Connector (`bot`, `service_url`).
    #[default]
    Bot,
    /// A Teams Workflows (Power Automate) webhook that posts a card where
    /// its flow says (`workflow`).
    WorkflowWebhook,
}

impl IntegrationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IntegrationKind::Bot => "bot",
            IntegrationKind::WorkflowWebhook => "workflow_webhook",
        }
    }
}

/// A Workflows webhook. Its URL carries the flow's own signature, so
/// whoever holds it can post: it is stored only sealed, like a bot secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkflowDoc {
    pub url_sealed: SealedSecret,
}

/// How an org_integration's bot authenticates. The secret is either stored
/// here, sealed (`app_secret_sealed`), or referenced so that it stays out of
/// the database (`crate::secrets` says which references are allowed).
/// Absent (all empty) on a `workflow_webhook` record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct BotDoc {
    pub app_id: String,
    /// A plaintext secret: accepted only while `secrets.accept_plaintext` is
    /// on, until `herald org-integrations seal-secrets` seals it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_secret_sealed: Option<SealedSecret>,
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

/// A bot secret sealed with AES-256-GCM under a key of `secrets.keys`, bound
/// to its record's organization, integration and bot app id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SealedSecret {
    /// The id of the key in `secrets.keys` that sealed it.
    pub key_id: String,
    /// Base64 of the 12-byte nonce.
    pub nonce: String,
    /// Base64 of the ciphertext and its 16-byte tag.
    pub ciphertext: String,
}

impl BotDoc {
    /// A bot whose secret is stored in the record in plaintext, as a record
    /// from before sealing has it (tests and the benchmark seal or accept it).
    pub fn with_secret(app_id: &str, secret: &str) -> Self {
        Self {
            app_id: app_id.to_owned(),
            app_secret: Some(secret.to_owned()),
            app_secret_sealed: None,
            app_secret_env: None,
            app_secret_file: None,
            authority: None,
        }
    }

    /// No field set: the record has no bot (a webhook's).
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }
}

/// One organization's use of a Teams integration (docs/contract.md §5).
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
    /// `bot` when absent (records written before webhooks existed).
    #[serde(default)]
    pub kind: IntegrationKind,
    /// The Connector's service URL of a bot; empty for a webhook.
    #[serde(default)]
    pub service_url: String,
    #[serde(default, skip_serializing_if = "BotDoc::is_unset")]
    pub bot: BotDoc,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<WorkflowDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime>,
}

impl OrgIntegrationDoc {
    /// An active record on the public cloud, not yet stored.
    pub fn active(organization_id: &str, integration_id: &str, tenant_id: &str, service_url: &str, bot: BotDoc) -> Self {
        Self {
            id: None,
            organization_id: organization_id.to_owned(),
            integration_id: integration_id.to_owned(),
            status: IntegrationStatus::Active,
            tenant_id: tenant_id.to_owned(),
            cloud: None,
            kind: IntegrationKind::Bot,
            service_url: service_url.to_owned(),
            bot,
            workflow: None,
            created_at: None,
            updated_at: None,
        }
    }

    /// An active Workflows-webhook record on the public cloud, its URL
    /// sealed already (`crate::secrets::Keyring::seal`), not yet stored.
    pub fn workflow_webhook(organization_id: &str, integration_id: &str, tenant_id: &str, url_sealed: SealedSecret) -> Self {
        Self {
            kind: IntegrationKind::WorkflowWebhook,
            service_url: String::new(),
            bot: BotDoc::default(),
            workflow: Some(WorkflowDoc { url_sealed }),
            ..Self::active(organization_id, integration_id, tenant_id, "", BotDoc::default())
        }
    }

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

impl ConversationDoc {
    /// An active channel (or group chat) registered for an org_integration.
    pub fn channel(organization_id: &str, integration_id: &str, conversation_id: &str) -> Self {
        Self {
            organization_id: organization_id.to_owned(),
            integration_id: integration_id.to_owned(),
            conversation_id: conversation_id.to_owned(),
            kind: ConversationKind::Channel,
            user_id: None,
            status: ConversationStatus::Active,
            quarantine: None,
            created_at: None,
        }
    }

    /// An active personal chat of `user_id` with the org_integration's bot.
    pub fn personal(organization_id: &str, integration_id: &str, conversation_id: &str, user_id: &str) -> Self {
        Self {
            kind: ConversationKind::Personal,
            user_id: Some(user_id.to_owned()),
            ..Self::channel(organization_id, integration_id, conversation_id)
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    Sending,
    Retrying,
    Sent,
    DeadLettered,
    /// The request may have reached Teams, but its answer was lost: never
    /// resent automatically (docs/producers.md, "Idempotency").
    Unconfirmed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Sending => "sending",
            DeliveryState::Retrying => "retrying",
            DeliveryState::Sent => "sent",
            DeliveryState::DeadLettered => "dead_lettered",
            DeliveryState::Unconfirmed => "unconfirmed",
        }
    }
}

/// The ledger record of one job of one org_integration. Its `_id` is
/// [`delivery_key`]: the same job id in two organizations is two records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeliveryDoc {
    #[serde(rename = "_id")]
    pub key: String,
    /// Absent on records written before the ledger was scoped (their `_id`
    /// is the job id).
    #[serde(default)]
    pub job_id: String,
    pub organization_id: String,
    pub integration_id: String,
    pub state: DeliveryState,
    #[serde(default)]
    pub attempts: i64,
    /// Claims that took the record over from a delivery that ended without
    /// an outcome (its worker died or lost MongoDB mid-send).
    #[serde(default)]
    pub takeovers: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The claim's holder while `sending` (a token per claim, never reused: `ledger::Owners`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<DateTime>,
    /// The newest attempts, oldest first (at most [`MAX_HISTORY`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<AttemptRecord>,
    pub created_at: DateTime,
    pub updated_at: DateTime,
}

/// How many attempts a ledger record keeps (the newest).
pub const MAX_HISTORY: i32 = 20;

/// One delivery attempt of a job, as its ledger record keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttemptRecord {
    /// When the attempt ended (the worker's clock).
    pub at: DateTime,
    /// `sent`, `retrying`, `dead_lettered` or `unconfirmed`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teams_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_app_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    /// Connector requests this attempt made.
    pub sends: i64,
    pub duration_ms: i64,
}

/// The ledger key of a job: `<job id>/<organization>/<integration>`, with `%`
/// and `/` escaped in the two ids so that no two triples share a key. The job
/// id comes first, so that one job's records are one `_id` range.
pub fn delivery_key(job_id: &str, organization_id: &str, integration_id: &str) -> String {
    format!("{job_id}/{}/{}", escape(organization_id), escape(integration_id))
}

/// The `_id` range holding every record of `job_id` (any organization).
pub fn delivery_key_range(job_id: &str) -> (String, String) {
    // '0' is the character after '/'.
    (format!("{job_id}/"), format!("{job_id}0"))
}

fn escape(id: &str) -> String {
    id.replace('%', "%25").replace('/', "%2F")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_keys_never_collide_across_organizations() {
        assert_ne!(delivery_key("j", "a/b", "c"), delivery_key("j", "a", "b/c"));
        assert_ne!(delivery_key("j", "a%2Fb", "c"), delivery_key("j", "a/b", "c"));
        assert_eq!(delivery_key("j", "org-a", "int-1"), "j/org-a/int-1");
        let (low, high) = delivery_key_range("j");
        let key = delivery_key("j", "zzz/\u{10ffff}", "~");
        assert!(low.as_str() <= key.as_str() && key.as_str() < high.as_str());
        assert!(!(low.as_str() <= "j0/x" && "j0/x" < high.as_str()));
    }
}
