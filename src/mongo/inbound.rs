//! What the messaging endpoint (`crate::gateway`) reads and writes: the
//! org_integrations of a bot in a tenant, their service URLs, and the
//! activities that map to no single org_integration (`unclaimed`).

use futures_util::TryStreamExt;
use mongodb::bson::{DateTime, Document, doc};
use serde::{Deserialize, Serialize};

use super::{OrgIntegrationDoc, Store, StoreError};

const UNCLAIMED: &str = "unclaimed";

/// An activity from Teams that names no single org_integration: kept for an
/// admin, never guessed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UnclaimedDoc {
    /// The bot the activity was sent to (the token's audience).
    pub app_id: String,
    pub tenant_id: String,
    pub conversation_id: String,
    /// The activity's type, and its event (`channelData.eventType`) if any.
    pub activity_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// How many org_integrations matched (0, or more than one).
    pub matched: i64,
    pub at: DateTime,
}

impl Store {
    /// Whether any bot org_integration of `cloud` uses `app_id`.
    pub async fn bot_is_configured(&self, app_id: &str, cloud: &str) -> Result<bool, StoreError> {
        self.read();
        let mut filter = doc! { "bot.app_id": app_id, "kind": { "$ne": "workflow_webhook" } };
        filter.insert("$or", cloud_filter(cloud));
        let found = self
            .db
            .collection::<Document>("org_integrations")
            .find_one(filter)
            .projection(doc! { "_id": 1 })
            .await
            .map_err(StoreError::new("find the bot's org_integrations"))?;
        Ok(found.is_some())
    }

    /// The bot org_integrations of `app_id` in `tenant_id`, in `cloud`.
    pub async fn org_integrations_of_bot(&self, app_id: &str, tenant_id: &str, cloud: &str) -> Result<Vec<OrgIntegrationDoc>, StoreError> {
        self.read();
        let mut filter = doc! { "bot.app_id": app_id, "tenant_id": tenant_id, "kind": { "$ne": "workflow_webhook" } };
        filter.insert("$or", cloud_filter(cloud));
        let operation = "find the org_integrations of a bot in a tenant";
        self.org_integrations()
            .find(filter)
            .limit(2)
            .await
            .map_err(StoreError::new(operation))?
            .try_collect()
            .await
            .map_err(StoreError::new(operation))
    }

    /// Set an org_integration's service URL; `true` when it changed.
    pub async fn set_service_url(&self, org: &str, integration: &str, service_url: &str) -> Result<bool, StoreError> {
        self.write();
        let result = self
            .org_integrations()
            .update_one(
                doc! { "organization_id": org, "integration_id": integration, "service_url": { "$ne": service_url } },
                doc! { "$set": { "service_url": service_url }, "$currentDate": { "updated_at": true } },
            )
            .await
            .map_err(StoreError::new("refresh the service URL"))?;
        Ok(result.modified_count > 0)
    }

    pub async fn record_unclaimed(&self, unclaimed: &UnclaimedDoc) -> Result<(), StoreError> {
        self.write();
        self.db
            .collection::<UnclaimedDoc>(UNCLAIMED)
            .insert_one(unclaimed)
            .await
            .map(drop)
            .map_err(StoreError::new("record an unclaimed activity"))
    }

    /// Unclaimed activities, newest first.
    pub async fn unclaimed(&self, limit: i64) -> Result<Vec<UnclaimedDoc>, StoreError> {
        self.read();
        let operation = "read unclaimed activities";
        self.db
            .collection::<UnclaimedDoc>(UNCLAIMED)
            .find(doc! {})
            .sort(doc! { "at": -1 })
            .limit(limit)
            .await
            .map_err(StoreError::new(operation))?
            .try_collect()
            .await
            .map_err(StoreError::new(operation))
    }
}

impl Store {
    /// The unclaimed activities that name `conversation_id`.
    pub async fn unclaimed_of(&self, conversation_id: &str) -> Result<Vec<UnclaimedDoc>, StoreError> {
        self.read();
        let operation = "read unclaimed activities";
        self.db
            .collection::<UnclaimedDoc>(UNCLAIMED)
            .find(doc! { "conversation_id": conversation_id })
            .limit(100)
            .await
            .map_err(StoreError::new(operation))?
            .try_collect()
            .await
            .map_err(StoreError::new(operation))
    }

    /// Forget the unclaimed activities of `conversation_id`; how many.
    pub async fn clear_unclaimed(&self, conversation_id: &str) -> Result<u64, StoreError> {
        self.write();
        let result = self
            .db
            .collection::<UnclaimedDoc>(UNCLAIMED)
            .delete_many(doc! { "conversation_id": conversation_id })
            .await
            .map_err(StoreError::new("clear unclaimed activities"))?;
        Ok(result.deleted_count)
    }
}

/// Records of `cloud`: a record without `cloud` is on the public one.
fn cloud_filter(cloud: &str) -> Vec<Document> {
    let mut any = vec![doc! { "cloud": cloud }];
    if cloud == crate::settings::DEFAULT_CLOUD {
        any.push(doc! { "cloud": { "$exists": false } });
    }
    any
}
