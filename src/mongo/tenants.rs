//! org_integrations and conversations: what the worker resolves, and what
//! operators add, change and remove (`herald org-integrations`,
//! `herald conversations`, `herald seed`).

use futures_util::TryStreamExt;
use mongodb::bson::{self, Bson, DateTime, Document, doc};

use super::{ConversationDoc, ConversationStatus, IntegrationStatus, OrgIntegrationDoc, Store, StoreError, is_duplicate_key};
use crate::job::{ConversationId, IntegrationId, OrganizationId, UserId};

/// Which conversations to list. Every field narrows.
#[derive(Debug, Clone, Default)]
pub struct ConversationFilter {
    pub organization_id: Option<String>,
    pub integration_id: Option<String>,
    pub status: Option<ConversationStatus>,
}

/// What `Store::seed` wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SeedReport {
    pub org_integrations_created: u64,
    pub org_integrations_updated: u64,
    pub conversations_created: u64,
    pub conversations_updated: u64,
}

fn encode<T: serde::Serialize>(value: &T, operation: &'static str) -> Result<Bson, StoreError> {
    bson::to_bson(value).map_err(|e| StoreError { operation, source: e.into() })
}

/// The statement that makes the stored org_integration equal `doc` in every
/// field the record owns: a field absent from `doc` (a secret source left
/// behind, a stale `cloud` or `authority`) is removed, not kept.
fn org_integration_statement(doc: &OrgIntegrationDoc) -> Result<Document, StoreError> {
    let mut set = doc! {
        "status": encode(&doc.status, "encode org_integration")?,
        "tenant_id": &doc.tenant_id,
        "kind": doc.kind.as_str(),
        "service_url": &doc.service_url,
    };
    let mut unset = Document::new();
    // The whole sub-documents: their fields are replaced together, and the
    // one a kind does not use is removed.
    match doc.bot.is_unset() {
        true => unset.insert("bot", ""),
        false => set.insert("bot", encode(&doc.bot, "encode org_integration")?),
    };
    match &doc.workflow {
        Some(workflow) => set.insert("workflow", encode(workflow, "encode org_integration")?),
        None => unset.insert("workflow", ""),
    };
    match &doc.cloud {
        Some(cloud) => {
            set.insert("cloud", cloud);
        }
        None => {
            unset.insert("cloud", "");
        }
    }
    let mut update = doc! {
        "$set": set,
        "$setOnInsert": { "created_at": DateTime::now() },
        "$currentDate": { "updated_at": true },
    };
    if !unset.is_empty() {
        update.insert("$unset", unset);
    }
    Ok(doc! {
        "q": { "organization_id": &doc.organization_id, "integration_id": &doc.integration_id },
        "u": update,
        "upsert": true,
    })
}

/// The statement that registers `doc`. An existing conversation keeps its
/// status and quarantine record unless `release` says to reset them, or the
/// new record is itself quarantined.
fn conversation_statement(doc: &ConversationDoc, release: bool) -> Result<Document, StoreError> {
    let mut set = doc! { "kind": encode(&doc.kind, "encode conversation")? };
    let mut unset = Document::new();
    let mut on_insert = doc! { "created_at": doc.created_at.unwrap_or_else(DateTime::now) };
    match &doc.user_id {
        Some(user) => {
            set.insert("user_id", user);
        }
        None => {
            unset.insert("user_id", "");
        }
    }
    match (doc.status, release) {
        (ConversationStatus::Quarantined, _) => {
            set.insert("status", "quarantined");
            set.insert("quarantine", encode(&doc.quarantine, "encode conversation")?);
        }
        (ConversationStatus::Active, true) => {
            set.insert("status", "active");
            unset.insert("quarantine", "");
        }
        (ConversationStatus::Active, false) => {
            on_insert.insert("status", "active");
        }
    }
    let mut update = doc! { "$set": set, "$setOnInsert": on_insert };
    if !unset.is_empty() {
        update.insert("$unset", unset);
    }
    Ok(doc! {
        "q": {
            "organization_id": &doc.organization_id, "integration_id": &doc.integration_id,
            "conversation_id": &doc.conversation_id,
        },
        "u": update,
        "upsert": true,
    })
}

impl Store {
    /// The org_integration of exactly this organization and integration.
    /// There is no other lookup: no "first of the integration", ever.
    pub async fn org_integration(
        &self,
        org: &OrganizationId,
        integration: &IntegrationId,
    ) -> Result<Option<OrgIntegrationDoc>, StoreError> {
        self.read();
        let collection = self.org_integrations();
        let find = collection.find_one(doc! { "organization_id": org.as_str(), "integration_id": integration.as_str() });
        super::bounded(self.command_timeout, find).await.map_err(StoreError::new("find org_integration"))
    }

    /// org_integrations, optionally of one organization, sorted.
    pub async fn list_org_integrations(&self, org: Option<&str>, limit: i64) -> Result<Vec<OrgIntegrationDoc>, StoreError> {
        self.read();
        let filter = org.map(|o| doc! { "organization_id": o }).unwrap_or_default();
        self.org_integrations()
            .find(filter)
            .sort(doc! { "organization_id": 1, "integration_id": 1 })
            .limit(limit)
            .await
            .map_err(StoreError::new("list org_integrations"))?
            .try_collect()
            .await
            .map_err(StoreError::new("list org_integrations"))
    }

    /// Every org_integration (`herald org-integrations seal-secrets`).
    pub async fn all_org_integrations(&self) -> Result<Vec<OrgIntegrationDoc>, StoreError> {
        self.read();
        let operation = "read org_integrations";
        self.org_integrations()
            .find(doc! {})
            .await
            .map_err(StoreError::new(operation))?
            .try_collect()
            .await
            .map_err(StoreError::new(operation))
    }

    /// Replace the record's `bot` if it is still what `doc` read: `false`
    /// when someone changed it in between (nothing is written then).
    pub async fn replace_bot_if_unchanged(&self, doc: &OrgIntegrationDoc, bot: &super::BotDoc) -> Result<bool, StoreError> {
        self.write();
        let operation = "replace org_integration bot";
        // Field by field, not the whole sub-document: a document's equality
        // depends on field order, which other writers need not keep.
        let equal_or_absent = |value: &Option<String>| value.as_deref().map_or(Bson::Document(doc! { "$exists": false }), Bson::from);
        let mut unchanged = doc! {
            "organization_id": &doc.organization_id, "integration_id": &doc.integration_id,
            "bot.app_id": &doc.bot.app_id,
            "bot.authority": equal_or_absent(&doc.bot.authority),
            "bot.app_secret": equal_or_absent(&doc.bot.app_secret),
        };
        match &doc.bot.app_secret_sealed {
            Some(sealed) => unchanged.insert("bot.app_secret_sealed.ciphertext", &sealed.ciphertext),
            None => unchanged.insert("bot.app_secret_sealed", doc! { "$exists": false }),
        };
        let result = self
            .org_integrations()
            .update_one(unchanged, doc! { "$set": { "bot": encode(bot, operation)? }, "$currentDate": { "updated_at": true } })
            .await
            .map_err(StoreError::new(operation))?;
        Ok(result.modified_count == 1)
    }

    /// Replace the record's `workflow` if its sealed URL is still what `doc`
    /// read: `false` when someone changed it in between.
    pub async fn replace_workflow_if_unchanged(&self, doc: &OrgIntegrationDoc, workflow: &super::WorkflowDoc) -> Result<bool, StoreError> {
        self.write();
        let operation = "replace org_integration workflow";
        let Some(read) = &doc.workflow else { return Ok(false) };
        let unchanged = doc! {
            "organization_id": &doc.organization_id, "integration_id": &doc.integration_id,
            "workflow.url_sealed.ciphertext": &read.url_sealed.ciphertext,
        };
        let result = self
            .org_integrations()
            .update_one(unchanged, doc! { "$set": { "workflow": encode(workflow, operation)? }, "$currentDate": { "updated_at": true } })
            .await
            .map_err(StoreError::new(operation))?;
        Ok(result.modified_count == 1)
    }

    /// Create or replace an org_integration (see [`org_integration_statement`]).
    pub async fn put_org_integration(&self, doc: &OrgIntegrationDoc) -> Result<(), StoreError> {
        self.seed(std::slice::from_ref(doc), &[], false).await.map(drop)
    }

    /// Set `status`; `false` when there is no such org_integration.
    pub async fn set_org_integration_status(&self, org: &str, integration: &str, status: IntegrationStatus) -> Result<bool, StoreError> {
        self.write();
        let result = self
            .org_integrations()
            .update_one(
                doc! { "organization_id": org, "integration_id": integration },
                doc! { "$set": { "status": encode(&status, "encode status")? }, "$currentDate": { "updated_at": true } },
            )
            .await
            .map_err(StoreError::new("set org_integration status"))?;
        Ok(result.matched_count > 0)
    }

    /// Remove an org_integration and its conversations; the counts removed.
    pub async fn remove_org_integration(&self, org: &str, integration: &str) -> Result<(u64, u64), StoreError> {
        self.write();
        let filter = doc! { "organization_id": org, "integration_id": integration };
        let conversations =
            self.conversations().delete_many(filter.clone()).await.map_err(StoreError::new("remove conversations"))?.deleted_count;
        let integrations =
            self.org_integrations().delete_one(filter).await.map_err(StoreError::new("remove org_integration"))?.deleted_count;
        Ok((integrations, conversations))
    }

    /// Write org_integrations and conversations in one command each
    /// (idempotent; see the two statement builders for what is replaced).
    pub async fn seed(
        &self,
        integrations: &[OrgIntegrationDoc],
        conversations: &[ConversationDoc],
        release_quarantined: bool,
    ) -> Result<SeedReport, StoreError> {
        let mut report = SeedReport::default();
        for chunk in integrations.chunks(1000) {
            let statements = chunk.iter().map(org_integration_statement).collect::<Result<Vec<_>, _>>()?;
            let (created, updated) = self.bulk_update("org_integrations", statements).await?;
            report.org_integrations_created += created;
            report.org_integrations_updated += updated;
        }
        for chunk in conversations.chunks(1000) {
            let statements = chunk.iter().map(|c| conversation_statement(c, release_quarantined)).collect::<Result<Vec<_>, _>>()?;
            let (created, updated) = self.bulk_update("conversations", statements).await?;
            report.conversations_created += created;
            report.conversations_updated += updated;
        }
        Ok(report)
    }

    /// One `update` command; (upserted, matched) counts.
    async fn bulk_update(&self, collection: &str, statements: Vec<Document>) -> Result<(u64, u64), StoreError> {
        self.write();
        let operation = "seed";
        let answer = self
            .db
            .run_command(doc! { "update": collection, "updates": statements, "ordered": true })
            .await
            .map_err(StoreError::new(operation))?;
        if let Ok(errors) = answer.get_array("writeErrors")
            && let Some(first) = errors.iter().filter_map(Bson::as_document).next()
        {
            let message = format!("write error: {}", first.get_str("errmsg").unwrap_or_default());
            return Err(StoreError { operation, source: mongodb::error::Error::custom(message) });
        }
        let upserted = answer.get_array("upserted").map(|a| a.len() as u64).unwrap_or(0);
        let n = u64::try_from(answer.get_i32("n").unwrap_or_default()).unwrap_or_default();
        Ok((upserted, n.saturating_sub(upserted)))
    }

    pub async fn conversation(
        &self,
        org: &OrganizationId,
        integration: &IntegrationId,
        conversation: &ConversationId,
    ) -> Result<Option<ConversationDoc>, StoreError> {
        self.read();
        let collection = self.conversations();
        let find = collection.find_one(doc! {
            "organization_id": org.as_str(), "integration_id": integration.as_str(), "conversation_id": conversation.as_str(),
        });
        super::bounded(self.command_timeout, find).await.map_err(StoreError::new("find conversation"))
    }

    /// The user's personal conversations in this org_integration (normally one).
    pub async fn personal_conversations(
        &self,
        org: &OrganizationId,
        integration: &IntegrationId,
        user: &UserId,
    ) -> Result<Vec<ConversationDoc>, StoreError> {
        self.read();
        self.bounded("find personal conversation", async {
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
        })
        .await
    }

    /// Registered conversations matching `filter`, at most `limit`.
    pub async fn list_conversations(&self, filter: &ConversationFilter, limit: i64) -> Result<Vec<ConversationDoc>, StoreError> {
        self.read();
        let mut query = Document::new();
        if let Some(org) = &filter.organization_id {
            query.insert("organization_id", org);
        }
        if let Some(integration) = &filter.integration_id {
            query.insert("integration_id", integration);
        }
        if let Some(status) = filter.status {
            query.insert("status", encode(&status, "encode status")?);
        }
        self.conversations()
            .find(query)
            .sort(doc! { "organization_id": 1, "integration_id": 1, "conversation_id": 1 })
            .limit(limit)
            .await
            .map_err(StoreError::new("list conversations"))?
            .try_collect()
            .await
            .map_err(StoreError::new("list conversations"))
    }

    /// Record a conversation the worker created through the Connector; an
    /// existing record is left as it is.
    pub async fn record_conversation(&self, conversation: &ConversationDoc) -> Result<(), StoreError> {
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

    /// Register (or update) a conversation; see [`conversation_statement`].
    pub async fn put_conversation(&self, conversation: &ConversationDoc) -> Result<(), StoreError> {
        self.seed(&[], std::slice::from_ref(conversation), false).await.map(drop)
    }

    /// Unregister a conversation; `false` when there was none.
    pub async fn remove_conversation(&self, org: &str, integration: &str, conversation: &str) -> Result<bool, StoreError> {
        self.write();
        let result = self
            .conversations()
            .delete_one(doc! { "organization_id": org, "integration_id": integration, "conversation_id": conversation })
            .await
            .map_err(StoreError::new("remove conversation"))?;
        Ok(result.deleted_count > 0)
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

    /// Lift a quarantine; the conversation as it was, `None` if there is none.
    pub async fn release(&self, org: &str, integration: &str, conversation: &str) -> Result<Option<ConversationDoc>, StoreError> {
        self.write();
        self.conversations()
            .find_one_and_update(
                doc! { "organization_id": org, "integration_id": integration, "conversation_id": conversation },
                doc! { "$set": { "status": "active" }, "$unset": { "quarantine": "" } },
            )
            .await
            .map_err(StoreError::new("release conversation"))
    }
}
