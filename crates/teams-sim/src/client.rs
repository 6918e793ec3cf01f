//! A typed client of the simulator's admin API, for herald's tests, demo and bench.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    ActivityFilter, ActivityRecord, Bot, ClockAdvance, Conversation, IssuedToken, Latency, Rule, Stats, Throttling, TokenSettings, User,
    Workflow, World,
};

#[derive(Debug, thiserror::Error)]
pub enum SimClientError {
    #[error("teams-sim admin request {what} failed")]
    Http {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("teams-sim admin request {what} answered {status}: {body}")]
    Status { what: String, status: u16, body: String },
}

/// Talks to `/_admin` of a running simulator.
#[derive(Debug, Clone)]
pub struct SimClient {
    base: String,
    http: reqwest::Client,
}

type Result<T> = std::result::Result<T, SimClientError>;

/// Conversation ids carry `:`, `@` and `;`: one path segment each.
fn segment(id: &str) -> String {
    url::form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>().replace('+', "%20")
}

impl SimClient {
    /// `base` is the simulator's root, e.g. `http://127.0.0.1:3978`.
    pub fn new(base: &str) -> Self {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("a plain HTTP client builds");
        Self { base: base.trim_end_matches('/').to_owned(), http }
    }

    async fn send(&self, what: String, request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let response = request.send().await.map_err(|source| SimClientError::Http { what: what.clone(), source })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        Err(SimClientError::Status { what, status, body })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let what = format!("GET {path}");
        let response = self.send(what.clone(), self.http.get(format!("{}{path}", self.base))).await?;
        response.json().await.map_err(|source| SimClientError::Http { what, source })
    }

    async fn put<B: Serialize>(&self, path: &str, body: &B) -> Result<()> {
        self.send(format!("PUT {path}"), self.http.put(format!("{}{path}", self.base)).json(body)).await.map(drop)
    }

    async fn post<B: Serialize>(&self, path: &str, body: &B) -> Result<()> {
        self.send(format!("POST {path}"), self.http.post(format!("{}{path}", self.base)).json(body)).await.map(drop)
    }

    async fn post_json<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let what = format!("POST {path}");
        let response = self.send(what.clone(), self.http.post(format!("{}{path}", self.base)).json(body)).await?;
        response.json().await.map_err(|source| SimClientError::Http { what, source })
    }

    async fn delete(&self, path: &str) -> Result<()> {
        self.send(format!("DELETE {path}"), self.http.delete(format!("{}{path}", self.base))).await.map(drop)
    }

    pub async fn health(&self) -> Result<()> {
        self.send("GET /_admin/health".into(), self.http.get(format!("{}/_admin/health", self.base))).await.map(drop)
    }

    /// The activities received, oldest first, filtered.
    pub async fn activities(&self, filter: &ActivityFilter) -> Result<Vec<ActivityRecord>> {
        let query = serde_urlencoded_query(filter);
        self.get(&format!("/_admin/activities{query}")).await
    }

    pub async fn all_activities(&self) -> Result<Vec<ActivityRecord>> {
        self.activities(&ActivityFilter::default()).await
    }

    pub async fn stats(&self) -> Result<Stats> {
        self.get("/_admin/stats").await
    }

    /// Forget records, counters, throttle history, faults and latency.
    pub async fn reset(&self) -> Result<()> {
        self.post("/_admin/reset", &()).await
    }

    pub async fn world(&self) -> Result<World> {
        self.get("/_admin/world").await
    }

    pub async fn set_world(&self, world: &World) -> Result<()> {
        self.put("/_admin/world", world).await
    }

    pub async fn put_bot(&self, bot: &Bot) -> Result<()> {
        self.put(&format!("/_admin/bots/{}", segment(&bot.app_id)), bot).await
    }

    pub async fn put_workflow(&self, workflow: &Workflow) -> Result<()> {
        self.put(&format!("/_admin/workflows/{}", segment(&workflow.id)), workflow).await
    }

    /// Delete a workflow: its webhook answers 404 from then on.
    pub async fn delete_workflow(&self, id: &str) -> Result<()> {
        self.delete(&format!("/_admin/workflows/{}", segment(id))).await
    }

    /// A token Teams would send with an activity for `request.app_id`.
    pub async fn sign(&self, request: &super::SignRequest) -> Result<String> {
        #[derive(serde::Deserialize)]
        struct Signed {
            token: String,
        }
        let signed: Signed = self.post_json("/_admin/sign", request).await?;
        Ok(signed.token)
    }

    pub async fn put_user(&self, user: &User) -> Result<()> {
        self.put(&format!("/_admin/users/{}", segment(&user.id)), user).await
    }

    pub async fn put_conversation(&self, conversation: &Conversation) -> Result<()> {
        self.put(&format!("/_admin/conversations/{}", segment(&conversation.id)), conversation).await
    }

    pub async fn add_to_roster(&self, conversation_id: &str, app_id: &str) -> Result<()> {
        self.put(&format!("/_admin/conversations/{}/roster/{}", segment(conversation_id), segment(app_id)), &()).await
    }

    pub async fn remove_from_roster(&self, conversation_id: &str, app_id: &str) -> Result<()> {
        self.delete(&format!("/_admin/conversations/{}/roster/{}", segment(conversation_id), segment(app_id))).await
    }

    pub async fn add_fault(&self, rule: &Rule) -> Result<()> {
        self.post("/_admin/faults", rule).await
    }

    pub async fn faults(&self) -> Result<Vec<Rule>> {
        self.get("/_admin/faults").await
    }

    pub async fn clear_faults(&self) -> Result<()> {
        self.delete("/_admin/faults").await
    }

    pub async fn set_latency(&self, latency: Latency) -> Result<()> {
        self.put("/_admin/latency", &latency).await
    }

    pub async fn set_throttling(&self, throttling: &Throttling) -> Result<()> {
        self.put("/_admin/throttling", throttling).await
    }

    pub async fn set_token_ttl(&self, ttl: Duration) -> Result<()> {
        self.put("/_admin/tokens", &TokenSettings { ttl_secs: ttl.as_secs() }).await
    }

    /// Every token issued since start (revoked and expired ones included).
    pub async fn tokens(&self) -> Result<Vec<IssuedToken>> {
        self.get("/_admin/tokens").await
    }

    /// Every issued token answers 401 from now on.
    pub async fn revoke_tokens(&self) -> Result<()> {
        self.delete("/_admin/tokens").await
    }

    pub async fn advance_clock(&self, by: Duration) -> Result<()> {
        self.post("/_admin/clock", &ClockAdvance { advance_secs: by.as_secs() }).await
    }
}

fn serde_urlencoded_query(filter: &ActivityFilter) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    if let Some(c) = &filter.conversation_id {
        query.append_pair("conversation_id", c);
    }
    if let Some(a) = &filter.app_id {
        query.append_pair("app_id", a);
    }
    if let Some(r) = filter.route {
        let route = serde_json::to_value(r).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        query.append_pair("route", &route);
    }
    if let Some(seq) = filter.after_seq {
        query.append_pair("after_seq", &seq.to_string());
    }
    let query = query.finish();
    if query.is_empty() { query } else { format!("?{query}") }
}
