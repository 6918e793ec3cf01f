//! `herald gateway`: the Bot Framework messaging endpoint (`POST
//! /api/messages`), so that Teams' own events keep the conversation
//! registry current (docs/gateway.md).
//!
//! Every request is authenticated first (`auth`); then the activity is
//! mapped to the one org_integration of its bot (the token's audience) in
//! its tenant. None or several: the activity is recorded as unclaimed for an
//! admin, never guessed. Removals quarantine the conversation for that
//! org_integration, a re-add lifts the quarantine, and every activity
//! refreshes the record's service URL.

pub mod auth;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::mongo::{OrgIntegrationDoc, Store, UnclaimedDoc};
use crate::settings::Settings;
use auth::{AuthError, Keys, same_service_url};

/// The quarantine reason of a conversation Teams said the bot left.
pub const REMOVED_BY_TEAMS: &str = "removed_by_teams";

/// The gateway's one metric, by activity type and outcome.
const ACTIVITIES_METRIC: &str = "herald_gateway_activities_total";

/// The activity types herald counts by name; others count as `other`.
const KNOWN_TYPES: &[&str] = &["message", "conversationUpdate", "installationUpdate", "messageReaction", "invoke", "event", "typing"];

/// The parts of an activity herald reads.
#[derive(Debug, Deserialize)]
struct Activity {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(rename = "serviceUrl", default)]
    service_url: String,
    #[serde(rename = "channelId", default)]
    channel_id: String,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    conversation: Option<Account>,
    #[serde(default)]
    recipient: Option<Account>,
    #[serde(rename = "membersAdded", default)]
    members_added: Vec<Account>,
    #[serde(rename = "membersRemoved", default)]
    members_removed: Vec<Account>,
    #[serde(rename = "channelData", default)]
    channel_data: Option<ChannelData>,
}

#[derive(Debug, Deserialize)]
struct Account {
    #[serde(default)]
    id: String,
    #[serde(rename = "tenantId", default)]
    tenant_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChannelData {
    #[serde(rename = "eventType", default)]
    event_type: Option<String>,
    #[serde(default)]
    tenant: Option<Account>,
}

/// What an event does to the conversation it names.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Change {
    Removed,
    Added,
    None,
}

pub struct Gateway {
    store: Store,
    keys: Keys,
    cloud: String,
    policy: crate::teams::ServiceUrlPolicy,
    /// (type, outcome) -> count, for `/metrics`.
    counts: Mutex<BTreeMap<(String, &'static str), u64>>,
}

impl Gateway {
    pub fn new(settings: &Settings, store: Store) -> anyhow::Result<Self> {
        let gateway = &settings.gateway;
        let cloud = settings
            .teams
            .clouds
            .get(&gateway.cloud)
            .ok_or_else(|| anyhow::anyhow!("gateway.cloud {:?} is not in teams.clouds", gateway.cloud))?;
        anyhow::ensure!(
            !cloud.openid_metadata.is_empty() && !cloud.token_issuer.is_empty(),
            "teams.clouds.{}.openid_metadata and token_issuer must be set for the gateway",
            gateway.cloud
        );
        let keys = Keys::new(
            &cloud.openid_metadata,
            &cloud.token_issuer,
            Duration::from_secs(gateway.key_refresh_hours * 3600),
            Duration::from_secs(gateway.unknown_key_refresh_secs),
            Duration::from_secs(gateway.clock_skew_secs),
            settings.teams.insecure_loopback_hosts.clone(),
        )?;
        let policy = crate::teams::ServiceUrlPolicy::new(cloud.service_hosts.clone(), settings.teams.insecure_loopback_hosts.clone());
        Ok(Self { store, keys, cloud: gateway.cloud.clone(), policy, counts: Mutex::new(BTreeMap::new()) })
    }

    fn count(&self, kind: &str, outcome: &'static str) {
        let kind = if KNOWN_TYPES.contains(&kind) { kind.to_owned() } else { "other".to_owned() };
        *self.counts.lock().unwrap_or_else(|p| p.into_inner()).entry((kind, outcome)).or_default() += 1;
    }

    fn render(&self) -> String {
        let mut page = format!(
            "# HELP {ACTIVITIES_METRIC} Activities the messaging endpoint received, by type and outcome.\n\
             # TYPE {ACTIVITIES_METRIC} counter\n"
        );
        for ((kind, outcome), n) in self.counts.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            page.push_str(&format!("{ACTIVITIES_METRIC}{{type=\"{kind}\",outcome=\"{outcome}\"}} {n}\n"));
        }
        page
    }

    /// Authenticate `headers` for `activity`: the bot app id it was sent to.
    async fn authenticate(&self, headers: &HeaderMap, activity: &Activity) -> Result<String, AuthError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(AuthError::NoToken)?;
        let (claims, endorsements) = self.keys.verify(token.trim()).await?;
        let configured = self.store.bot_is_configured(&claims.aud, &self.cloud).await.map_err(|e| AuthError::Metadata(e.to_string()))?;
        if !configured {
            return Err(AuthError::Audience(crate::text::clip(&claims.aud, 128)));
        }
        if !same_service_url(claims.service_url.as_deref(), &activity.service_url) {
            return Err(AuthError::ServiceUrl);
        }
        if !endorsements.contains(&activity.channel_id) {
            return Err(AuthError::Endorsement(crate::text::clip(&activity.channel_id, 64)));
        }
        Ok(claims.aud)
    }

    /// Apply an authenticated activity; the outcome counted.
    async fn apply(&self, app_id: &str, activity: &Activity) -> Result<&'static str, crate::mongo::StoreError> {
        let tenant = activity
            .channel_data
            .as_ref()
            .and_then(|d| d.tenant.as_ref())
            .map(|t| t.id.clone())
            .or_else(|| activity.conversation.as_ref().and_then(|c| c.tenant_id.clone()))
            .unwrap_or_default();
        let conversation_id = activity.conversation.as_ref().map(|c| conversation_key(&c.id)).unwrap_or_default();
        let matches = self.store.org_integrations_of_bot(app_id, &tenant, &self.cloud).await?;
        let [integration] = matches.as_slice() else {
            let event = activity.channel_data.as_ref().and_then(|d| d.event_type.clone());
            self.store
                .record_unclaimed(&UnclaimedDoc {
                    app_id: app_id.to_owned(),
                    tenant_id: crate::text::clip(&tenant, 128),
                    conversation_id: crate::text::clip(&conversation_id, 512),
                    activity_type: crate::text::clip(&activity.kind, 64),
                    event,
                    matched: matches.len() as i64,
                    at: mongodb::bson::DateTime::now(),
                })
                .await?;
            warn!(app_id, tenant_id = %tenant, matched = matches.len(), "an activity names no single org_integration: recorded as unclaimed");
            return Ok("unclaimed");
        };
        self.refresh_service_url(integration, &activity.service_url).await?;
        let (org, int) = (&integration.organization_id, &integration.integration_id);
        match change(app_id, activity) {
            Change::Removed if !conversation_id.is_empty() => {
                let event = event_name(activity);
                if self.store.quarantine(org, int, &conversation_id, REMOVED_BY_TEAMS, Some(event.as_str())).await? {
                    info!(organization_id = %org, conversation_id = %conversation_id, event = %event, "Teams removed the bot: conversation quarantined");
                }
                Ok("quarantined")
            }
            Change::Added if !conversation_id.is_empty() => {
                if let Some(was) = self.store.release(org, int, &conversation_id).await?
                    && was.status == crate::mongo::ConversationStatus::Quarantined
                {
                    info!(organization_id = %org, conversation_id = %conversation_id, "Teams added the bot again: quarantine lifted");
                }
                Ok("released")
            }
            _ => Ok("applied"),
        }
    }

    /// The record's service URL follows Teams', within its cloud's hosts.
    async fn refresh_service_url(&self, integration: &OrgIntegrationDoc, service_url: &str) -> Result<(), crate::mongo::StoreError> {
        let Ok(checked) = self.policy.check(service_url) else {
            warn!(service_url = %crate::teams::redact(service_url), "an activity's serviceUrl is off the cloud's service_hosts: not stored");
            return Ok(());
        };
        if self.store.set_service_url(&integration.organization_id, &integration.integration_id, checked.as_str()).await? {
            info!(organization_id = %integration.organization_id, service_url = %checked, "service URL refreshed from Teams");
        }
        Ok(())
    }
}

/// A channel conversation id without the `;messageid=` of a thread.
fn conversation_key(id: &str) -> String {
    id.split(";messageid=").next().unwrap_or(id).to_owned()
}

fn event_name(activity: &Activity) -> String {
    activity
        .channel_data
        .as_ref()
        .and_then(|d| d.event_type.clone())
        .or_else(|| activity.action.clone().map(|a| format!("installationUpdate/{a}")))
        .unwrap_or_else(|| activity.kind.clone())
}

fn change(app_id: &str, activity: &Activity) -> Change {
    let bot = format!("28:{app_id}");
    let is_bot = |a: &Account| a.id == bot || activity.recipient.as_ref().is_some_and(|r| !r.id.is_empty() && r.id == a.id);
    let event = activity.channel_data.as_ref().and_then(|d| d.event_type.as_deref());
    match activity.kind.as_str() {
        "installationUpdate" => match activity.action.as_deref() {
            Some("remove") => Change::Removed,
            Some("add") => Change::Added,
            _ => Change::None,
        },
        "conversationUpdate" if matches!(event, Some("teamDeleted" | "channelDeleted")) => Change::Removed,
        "conversationUpdate" if activity.members_removed.iter().any(is_bot) => Change::Removed,
        "conversationUpdate" if activity.members_added.iter().any(is_bot) => Change::Added,
        _ => Change::None,
    }
}

async fn messages(State(gateway): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    let activity: Activity = match serde_json::from_slice(&body) {
        Ok(activity) => activity,
        Err(err) => {
            gateway.count("other", "malformed");
            return (StatusCode::BAD_REQUEST, format!("not an activity: {err}")).into_response();
        }
    };
    let app_id = match gateway.authenticate(&headers, &activity).await {
        Ok(app_id) => app_id,
        Err(err) => {
            gateway.count(&activity.kind, "refused");
            warn!(error = %err, "messaging endpoint: request refused");
            let status = StatusCode::from_u16(err.status()).unwrap_or(StatusCode::UNAUTHORIZED);
            return (status, err.to_string()).into_response();
        }
    };
    match gateway.apply(&app_id, &activity).await {
        Ok(outcome) => {
            gateway.count(&activity.kind, outcome);
            StatusCode::OK.into_response()
        }
        Err(err) => {
            gateway.count(&activity.kind, "failed");
            warn!(error = %crate::text::error_chain(&err), "messaging endpoint: MongoDB failed; Teams will retry");
            (StatusCode::SERVICE_UNAVAILABLE, "the registry is unavailable").into_response()
        }
    }
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], gateway.render())
}

/// Serve the messaging endpoint on `gateway.listen` until `shutdown`.
pub async fn run(settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = Store::connect(settings).await?;
    let gateway = Arc::new(Gateway::new(settings, store.clone())?);
    let listener = tokio::net::TcpListener::bind(&settings.gateway.listen).await?;
    info!(addr = %listener.local_addr()?, cloud = %settings.gateway.cloud, "messaging endpoint listening on /api/messages");
    let app = Router::new()
        .route("/api/messages", post(messages))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(settings.gateway.max_body_bytes))
        .with_state(gateway);
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    store.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn activity(json: serde_json::Value) -> Activity {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn events_that_remove_or_add_the_bot() {
        let removed = activity(
            serde_json::json!({"type": "conversationUpdate", "recipient": {"id": "28:app"}, "membersRemoved": [{"id": "28:app"}]}),
        );
        assert_eq!(change("app", &removed), Change::Removed);
        let someone_else = activity(
            serde_json::json!({"type": "conversationUpdate", "recipient": {"id": "28:app"}, "membersRemoved": [{"id": "29:user"}]}),
        );
        assert_eq!(change("app", &someone_else), Change::None);
        let added = activity(serde_json::json!({"type": "conversationUpdate", "membersAdded": [{"id": "28:app"}]}));
        assert_eq!(change("app", &added), Change::Added);
        let deleted = activity(serde_json::json!({"type": "conversationUpdate", "channelData": {"eventType": "channelDeleted"}}));
        assert_eq!(change("app", &deleted), Change::Removed);
        let uninstalled = activity(serde_json::json!({"type": "installationUpdate", "action": "remove"}));
        assert_eq!(change("app", &uninstalled), Change::Removed);
        let renamed = activity(serde_json::json!({"type": "conversationUpdate", "channelData": {"eventType": "channelRenamed"}}));
        assert_eq!(change("app", &renamed), Change::None);
        assert_eq!(conversation_key("19:abc@thread.tacv2;messageid=1712"), "19:abc@thread.tacv2");
    }
}
