//! Resolving a job's organization context: its org_integration, strictly by
//! `(organization_id, integration_id)`, and a recipient that belongs to that
//! organization (docs/contract.md §1). Never a fallback, never a guess.

use std::sync::Arc;
use std::time::Duration;

use super::cache::TtlCache;
use crate::job::{ConversationId, IntegrationId, Job, OrganizationId, UserId};
use crate::mongo::IntegrationKind;
use crate::mongo::{ConversationDoc, ConversationKind, ConversationStatus, IntegrationStatus, OrgIntegrationDoc, Store};
use crate::outcome::DeliveryError;
use crate::secrets::Secrets;
use crate::settings::DEFAULT_CLOUD;
use crate::teams::{BotCredentials, Teams, Workflow};

/// An active org_integration with its secret resolved.
#[derive(Debug, Clone)]
pub struct OrgIntegration {
    pub id: String,
    pub organization_id: OrganizationId,
    pub integration_id: IntegrationId,
    pub tenant_id: String,
    pub via: Via,
}

/// How an org_integration reaches Teams.
#[derive(Debug, Clone)]
pub enum Via {
    Bot {
        bot: BotCredentials,
        /// The record's `service_url` parsed and checked against the bot's
        /// cloud once, when the record was read, not for every job: the
        /// parsed URL, or why the token may not go there
        /// (`TeamsError::ServiceUrlNotAllowed`).
        checked_service_url: Result<url::Url, (String, String)>,
    },
    /// A Workflows webhook, its URL checked against its cloud's hosts.
    Workflow(Workflow),
}

/// What stands for the sender in logs and the ledger's `bot_app_id` when an
/// org_integration has no bot.
pub const WORKFLOW_SENDER: &str = "workflow_webhook";

impl OrgIntegration {
    /// The bot, for a bot record.
    pub fn bot(&self) -> Option<&BotCredentials> {
        match &self.via {
            Via::Bot { bot, .. } => Some(bot),
            Via::Workflow(_) => None,
        }
    }

    /// The bot app id, or [`WORKFLOW_SENDER`].
    pub fn sender(&self) -> &str {
        self.bot().map_or(WORKFLOW_SENDER, BotCredentials::app_id)
    }

    /// The service URL, if the bot's cloud allows sending its token there
    /// ([`Teams::check_service_url`], as of when the record was read). A
    /// webhook has none.
    pub fn checked_service_url(&self) -> Result<url::Url, crate::teams::TeamsError> {
        match &self.via {
            Via::Bot { checked_service_url, .. } => {
                checked_service_url.clone().map_err(|(url, why)| crate::teams::TeamsError::ServiceUrlNotAllowed { url, why })
            }
            Via::Workflow(workflow) => Err(crate::teams::TeamsError::ServiceUrlNotAllowed {
                url: workflow.shown().to_owned(),
                why: "a Workflows webhook has no service URL".into(),
            }),
        }
    }
}

/// What the cache remembers of a lookup, misses included, so that a storm of
/// jobs for a missing or disabled org_integration does not hit MongoDB either.
#[derive(Debug, Clone)]
enum Resolution {
    Active(Arc<OrgIntegration>),
    NotFound,
    Disabled,
    Misconfigured(String),
}

type Key = (OrganizationId, IntegrationId);

pub struct Resolver {
    secrets: Secrets,
    integrations: TtlCache<Key, Resolution>,
    // Shared, not copied, by every job that uses them.
    conversations: TtlCache<(Key, ConversationId), Option<Arc<ConversationDoc>>>,
    personal: TtlCache<(Key, UserId), Option<Arc<ConversationDoc>>>,
}

/// Where the job goes, and whether the recipient was corrected.
#[derive(Debug, Clone)]
pub struct Recipient {
    pub conversation_id: String,
    /// The stale conversation id the job named, when it was corrected.
    pub corrected_from: Option<String>,
}

/// Lookups whose ids together are longer than this bypass the caches: no real
/// id is that long, and a hostile job must not park its 150 KB id in memory
/// for a cache TTL (each such job is one MongoDB read instead).
const MAX_CACHED_ID_BYTES: usize = 512;

fn cacheable(ids: &[&str]) -> bool {
    ids.iter().map(|id| id.len()).sum::<usize>() <= MAX_CACHED_ID_BYTES
}

impl Resolver {
    pub fn new(ttl: Duration, secrets: Secrets) -> Self {
        Self { secrets, integrations: TtlCache::new(ttl), conversations: TtlCache::new(ttl), personal: TtlCache::new(ttl) }
    }

    /// (hits, misses) of the org_integration cache.
    pub fn cache_stats(&self) -> (u64, u64) {
        self.integrations.stats()
    }

    /// Drop what expired (the worker's housekeeping calls it periodically).
    pub fn sweep(&self) {
        self.integrations.sweep();
        self.conversations.sweep();
        self.personal.sweep();
    }

    /// Entries held by the three caches.
    pub fn cached(&self) -> usize {
        self.integrations.len() + self.conversations.len() + self.personal.len()
    }

    pub async fn org_integration(&self, store: &Store, teams: &Teams, job: &Job) -> Result<Arc<OrgIntegration>, DeliveryError> {
        let key = (job.organization_id.clone(), job.integration_id.clone());
        let load = || async {
            Ok::<_, DeliveryError>(match store.org_integration(&key.0, &key.1).await? {
                None => Resolution::NotFound,
                Some(doc) if doc.status == IntegrationStatus::Disabled => Resolution::Disabled,
                Some(doc) => match active(doc, teams, &self.secrets).await {
                    Ok(integration) => Resolution::Active(Arc::new(integration)),
                    Err(problem) => Resolution::Misconfigured(problem),
                },
            })
        };
        let resolution = match cacheable(&[key.0.as_str(), key.1.as_str()]) {
            true => self.integrations.get_or_load(&key, load).await?,
            false => load().await?,
        };
        let ids = || (key.0.to_string(), key.1.to_string());
        match resolution {
            Resolution::Active(integration) => Ok(integration),
            Resolution::NotFound => {
                let (organization_id, integration_id) = ids();
                Err(DeliveryError::OrgIntegrationNotFound { organization_id, integration_id })
            }
            Resolution::Disabled => {
                let (organization_id, integration_id) = ids();
                Err(DeliveryError::OrgIntegrationDisabled { organization_id, integration_id })
            }
            Resolution::Misconfigured(problem) => Err(DeliveryError::OrgIntegrationMisconfigured(problem)),
        }
    }

    async fn conversation(&self, store: &Store, key: &Key, id: &ConversationId) -> Result<Option<Arc<ConversationDoc>>, DeliveryError> {
        let load = || async { Ok(store.conversation(&key.0, &key.1, id).await?.map(Arc::new)) };
        if !cacheable(&[key.0.as_str(), key.1.as_str(), id.as_str()]) {
            return load().await;
        }
        self.conversations.get_or_load(&(key.clone(), id.clone()), load).await
    }

    async fn personal(&self, store: &Store, key: &Key, user: &UserId) -> Result<Option<Arc<ConversationDoc>>, DeliveryError> {
        let cache_key = (key.clone(), user.clone());
        if let Some(found) = self.personal.get(&cache_key) {
            return Ok(found);
        }
        let mut found = store.personal_conversations(&key.0, &key.1, user).await?;
        if found.len() > 1 {
            return Err(DeliveryError::RecipientNotInOrganization(format!(
                "user {} has more than one personal conversation in organization {} (integration {}); refusing to guess",
                crate::text::clip(user.as_str(), 256),
                crate::text::clip(key.0.as_str(), 256),
                crate::text::clip(key.1.as_str(), 256)
            )));
        }
        let found = found.pop().map(Arc::new);
        if cacheable(&[key.0.as_str(), key.1.as_str(), user.as_str()]) {
            self.personal.insert(cache_key, found.clone());
        }
        Ok(found)
    }

    /// Forget what is cached about a conversation (after a quarantine).
    pub fn forget_conversation(&self, job: &Job, conversation_id: &str) {
        let key = (job.organization_id.clone(), job.integration_id.clone());
        if let Some(id) = ConversationId::parse(conversation_id) {
            self.conversations.remove(&(key.clone(), id));
        }
        if let Some(user) = &job.recipient.user_id {
            self.personal.remove(&(key, user.clone()));
        }
    }

    /// The conversation of this organization the job goes to.
    ///
    /// - A `conversation_id` must be registered for the job's org_integration.
    /// - If it is not, but the job also names a user who has a personal
    ///   conversation here, the job is corrected to that conversation (the
    ///   stale-context case, logged and counted by the caller).
    /// - A `user_id` alone resolves to the user's personal conversation here,
    ///   created through the Connector in the org_integration's tenant when
    ///   none is stored yet.
    /// - Anything else is refused.
    pub async fn recipient(
        &self,
        store: &Store,
        teams: &Teams,
        job: &Job,
        integration: &OrgIntegration,
        until: tokio::time::Instant,
    ) -> Result<Recipient, DeliveryError> {
        let key = (job.organization_id.clone(), job.integration_id.clone());
        if let Some(conversation_id) = &job.recipient.conversation_id {
            if let Some(found) = self.conversation(store, &key, conversation_id).await? {
                return usable(&found).map(|id| Recipient { conversation_id: id, corrected_from: None });
            }
            if let Some(user) = &job.recipient.user_id
                && let Some(found) = self.personal(store, &key, user).await?
            {
                return usable(&found).map(|id| Recipient { conversation_id: id, corrected_from: Some(conversation_id.to_string()) });
            }
            return Err(DeliveryError::RecipientNotInOrganization(format!(
                "conversation {} is not registered for organization {} (integration {})",
                crate::text::clip(conversation_id.as_str(), 256),
                crate::text::clip(key.0.as_str(), 256),
                crate::text::clip(key.1.as_str(), 256)
            )));
        }
        let user = job.recipient.user_id.as_ref().expect("a validated job names a conversation or a user");
        if let Some(found) = self.personal(store, &key, user).await? {
            return usable(&found).map(|id| Recipient { conversation_id: id, corrected_from: None });
        }
        let Some(bot) = integration.bot() else {
            return Err(DeliveryError::RecipientNotInOrganization(format!(
                "user {} has no personal conversation in organization {} (integration {}), and a Workflows webhook cannot create one",
                crate::text::clip(user.as_str(), 256),
                crate::text::clip(key.0.as_str(), 256),
                crate::text::clip(key.1.as_str(), 256)
            )));
        };
        let service_url = integration.checked_service_url()?;
        let conversation_id = teams.create_personal_conversation(&service_url, bot, &integration.tenant_id, user.as_str(), until).await?;
        let doc = ConversationDoc {
            organization_id: key.0.to_string(),
            integration_id: key.1.to_string(),
            conversation_id: conversation_id.clone(),
            kind: ConversationKind::Personal,
            user_id: Some(user.to_string()),
            status: ConversationStatus::Active,
            quarantine: None,
            created_at: Some(mongodb::bson::DateTime::now()),
        };
        store.record_conversation(&doc).await?;
        self.personal.insert((key, user.clone()), Some(Arc::new(doc)));
        Ok(Recipient { conversation_id, corrected_from: None })
    }
}

fn usable(conversation: &ConversationDoc) -> Result<String, DeliveryError> {
    match conversation.status {
        ConversationStatus::Active => Ok(conversation.conversation_id.clone()),
        ConversationStatus::Quarantined => Err(DeliveryError::ConversationQuarantined {
            reason: conversation
                .quarantine
                .as_ref()
                .map(|q| q.teams_code.clone().unwrap_or_else(|| q.reason.clone()))
                .unwrap_or_else(|| "quarantined".into()),
            conversation_id: conversation.conversation_id.clone(),
        }),
    }
}

/// The worker's own checks of a stored record, before anything is written
/// (`herald seed`, `herald org-integrations add`): everything [`active`]
/// checks except reading the secret, plus the service-URL allowlist of the
/// record's cloud.
pub fn check_record(doc: &OrgIntegrationDoc, teams: &Teams, secrets: &Secrets) -> Result<(), String> {
    let cloud = structure(doc, teams, secrets)?;
    match doc.kind {
        IntegrationKind::Bot => {
            cloud.policy.check(&doc.service_url).map(drop).map_err(|err| format!("org_integration {}: {err}", doc.id_string()))
        }
        // The URL is sealed: checking its host needs the key, as the worker has.
        IntegrationKind::WorkflowWebhook => {
            let url = secrets.workflow_url(doc).map_err(|err| format!("org_integration {}: {err}", doc.id_string()))?;
            teams.workflow(&cloud.name, &url).map(drop).map_err(|err| format!("org_integration {}: {err}", doc.id_string()))
        }
    }
}

/// What every record needs: non-blank ids and tenant, a configured cloud,
/// exactly one secret source, and that one this organization's own.
fn structure<'a>(doc: &OrgIntegrationDoc, teams: &'a Teams, secrets: &Secrets) -> Result<&'a crate::teams::Cloud, String> {
    let id = doc.id_string();
    let blank = |value: &str| value.trim().is_empty();
    if blank(&doc.organization_id) || blank(&doc.integration_id) {
        return Err(format!("org_integration {id}: blank organization_id or integration_id"));
    }
    if blank(&doc.tenant_id) {
        return Err(format!("org_integration {id}: blank tenant_id"));
    }
    if doc.kind == IntegrationKind::Bot && blank(&doc.bot.app_id) {
        return Err(format!("org_integration {id}: blank bot.app_id"));
    }
    let cloud_name = doc.cloud.as_deref().unwrap_or(DEFAULT_CLOUD);
    let Some(cloud) = teams.cloud(cloud_name) else {
        return Err(format!("org_integration {id}: cloud {cloud_name:?} is not configured (teams.clouds)"));
    };
    secrets.check(doc).map_err(|err| format!("org_integration {id}: {err}"))?;
    Ok(cloud)
}

/// A stored record as the worker would use it, its secret read (for
/// `herald org-integrations check`): the same code path as a job's.
pub async fn credentials(doc: OrgIntegrationDoc, teams: &Teams, secrets: &Secrets) -> Result<OrgIntegration, String> {
    active(doc, teams, secrets).await
}

/// The record with its bot's secret read by [`Secrets::read`]'s rules, or
/// its webhook URL opened and checked against its cloud's hosts.
async fn active(doc: OrgIntegrationDoc, teams: &Teams, secrets: &Secrets) -> Result<OrgIntegration, String> {
    let cloud = structure(&doc, teams, secrets)?;
    let id = doc.id_string();
    let via = match doc.kind {
        IntegrationKind::Bot => {
            let secret = secrets.read(&doc).await.map_err(|err| format!("org_integration {id}: {err}"))?;
            let authority = doc.bot.authority.clone().unwrap_or_else(|| cloud.multi_tenant_authority.clone());
            let bot = BotCredentials::new(cloud.name.clone(), doc.bot.app_id.clone(), secret, authority);
            let checked_service_url = teams.check_service_url(&bot, &doc.service_url).map_err(|refused| match refused {
                crate::teams::TeamsError::ServiceUrlNotAllowed { url, why } => (url, why),
                other => (crate::teams::redact(&doc.service_url), other.to_string()),
            });
            Via::Bot { bot, checked_service_url }
        }
        IntegrationKind::WorkflowWebhook => {
            let url = secrets.workflow_url(&doc).map_err(|err| format!("org_integration {id}: {err}"))?;
            Via::Workflow(teams.workflow(&cloud.name, &url).map_err(|err| format!("org_integration {id}: {err}"))?)
        }
    };
    let (Some(organization_id), Some(integration_id)) =
        (OrganizationId::parse(doc.organization_id), IntegrationId::parse(doc.integration_id))
    else {
        return Err(format!("org_integration {id}: blank organization_id or integration_id"));
    };
    Ok(OrgIntegration { id, organization_id, integration_id, tenant_id: doc.tenant_id, via })
}
