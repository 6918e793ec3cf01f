//! Bot Framework access tokens: client credentials per (bot app, authority),
//! cached, refreshed before expiry, one request in flight per key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{BotCredentials, Cloud, TeamsError};

struct Cached {
    token: SecretString,
    /// When the cached token should be replaced (expiry less the margin).
    refresh_at: Instant,
}

type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// (cloud, bot app, authority)
type Key = (String, String, String);

pub struct Tokens {
    http: reqwest::Client,
    margin: Duration,
    slots: Mutex<HashMap<Key, Slot>>,
    requests: AtomicU64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: SecretString,
    expires_in: u64,
}

#[derive(Deserialize, Default)]
struct AadError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

impl Tokens {
    pub fn new(http: reqwest::Client, margin: Duration) -> Self {
        Self { http, margin, slots: Mutex::new(HashMap::new()), requests: AtomicU64::new(0) }
    }

    /// Token requests made so far (for metrics and the benchmark).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn slot(&self, bot: &BotCredentials) -> Slot {
        let key = (bot.cloud.clone(), bot.app_id.clone(), bot.authority.clone());
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(key).or_default().clone()
    }

    /// A valid token for `bot`. Concurrent callers for the same key wait for
    /// the one request in flight instead of each making their own.
    pub async fn get(&self, cloud: &Cloud, bot: &BotCredentials) -> Result<SecretString, TeamsError> {
        let slot = self.slot(bot);
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok(c.token.clone());
        }
        let fresh = self.fetch(cloud, bot).await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    /// After a 401 with `rejected`: drop it (unless another caller already
    /// replaced it) and return a fresh token.
    pub async fn refresh(&self, cloud: &Cloud, bot: &BotCredentials, rejected: &SecretString) -> Result<SecretString, TeamsError> {
        let slot = self.slot(bot);
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref()
            && c.token.expose_secret() != rejected.expose_secret()
            && Instant::now() < c.refresh_at
        {
            return Ok(c.token.clone());
        }
        let fresh = self.fetch(cloud, bot).await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    async fn fetch(&self, cloud: &Cloud, bot: &BotCredentials) -> Result<Cached, TeamsError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let url = format!("{}/{}/oauth2/v2.0/token", cloud.token_endpoint, bot.authority);
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", bot.app_id.as_str()),
            ("client_secret", bot.app_secret.expose_secret()),
            ("scope", cloud.scope.as_str()),
        ];
        let started = Instant::now();
        let response = self.http.post(&url).form(&form).send().await.map_err(|source| TeamsError::TokenTransport { source })?;
        let status = response.status().as_u16();
        if response.status().is_success() {
            let body: TokenResponse = response.json().await.map_err(|source| TeamsError::TokenTransport { source })?;
            let lifetime = Duration::from_secs(body.expires_in);
            // Short-lived tokens (tests) refresh at half their life instead.
            let margin = self.margin.min(lifetime / 2);
            return Ok(Cached { token: body.access_token, refresh_at: started + lifetime - margin });
        }
        let aad: AadError = response.json().await.unwrap_or_default();
        // The description starts "AADSTS7000215: ..."; keep that first sentence.
        let description = aad.error_description.split(" Trace ID:").next().unwrap_or_default().trim().to_owned();
        Err(TeamsError::TokenRejected { status, error: aad.error, description })
    }
}
