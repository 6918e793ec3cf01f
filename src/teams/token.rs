//! Bot Framework access tokens: client credentials, cached per credential,
//! refreshed before expiry, one request in flight per key.
//!
//! A token is cached under the credential it was fetched with: the cloud, the
//! authority, the bot app id **and a digest of the secret**. An
//! org_integration that names another organization's bot app with a wrong
//! secret never gets that organization's token: it asks the identity
//! platform, which refuses it. A rotated secret is a new key, so it fetches a
//! new token at its first use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::connector::{Connector, FORM};
use super::{BotCredentials, Cloud, TeamsError};

struct Cached {
    token: SecretString,
    /// When the cached token should be replaced (expiry less the margin).
    refresh_at: Instant,
}

type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// (cloud, authority, bot app, SHA-256 of the secret). The digest is of the
/// secret's value, never the value itself, and lives only in memory.
type Key = (String, String, String, [u8; 32]);

/// A token's lifetime is trusted within these bounds whatever `expires_in`
/// says: an absurd value neither overflows nor pins a token for years, and a
/// tiny one does not make every job fetch a token (at most one fetch per
/// second per credential).
const MIN_LIFETIME: Duration = Duration::from_secs(2);
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Keys beyond this many are swept of expired tokens.
const SWEEP_ABOVE: usize = 1024;

pub struct Tokens {
    http: Arc<Connector>,
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

fn key(cloud: &Cloud, bot: &BotCredentials) -> Key {
    let digest = Sha256::digest(bot.app_secret.expose_secret().as_bytes());
    (cloud.name.clone(), bot.authority.clone(), bot.app_id.clone(), digest.into())
}

impl Tokens {
    pub fn new(http: Arc<Connector>, margin: Duration) -> Self {
        Self { http, margin, slots: Mutex::new(HashMap::new()), requests: AtomicU64::new(0) }
    }

    /// Token requests made so far (for metrics and the benchmark).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Keys cached right now.
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slot(&self, cloud: &Cloud, bot: &BotCredentials) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.len() >= SWEEP_ABOVE && slots.len().is_power_of_two() {
            sweep(&mut slots);
        }
        slots.entry(key(cloud, bot)).or_default().clone()
    }

    /// Forget the keys nobody is using whose token is gone or stale.
    pub fn sweep(&self) {
        sweep(&mut self.slots.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// A valid token for `bot`. Concurrent callers for the same credential
    /// wait for the one request in flight instead of each making their own.
    pub async fn get(&self, cloud: &Cloud, bot: &BotCredentials, timeout: Duration) -> Result<SecretString, TeamsError> {
        let slot = self.slot(cloud, bot);
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok(c.token.clone());
        }
        let fresh = self.fetch(cloud, bot, timeout).await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    /// After a 401 with `rejected`: drop it (unless another caller already
    /// replaced it) and return a fresh token.
    pub async fn refresh(
        &self,
        cloud: &Cloud,
        bot: &BotCredentials,
        rejected: &SecretString,
        timeout: Duration,
    ) -> Result<SecretString, TeamsError> {
        let slot = self.slot(cloud, bot);
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref()
            && c.token.expose_secret() != rejected.expose_secret()
            && Instant::now() < c.refresh_at
        {
            return Ok(c.token.clone());
        }
        let fresh = self.fetch(cloud, bot, timeout).await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    async fn fetch(&self, cloud: &Cloud, bot: &BotCredentials, timeout: Duration) -> Result<Cached, TeamsError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let transport = |what: String| TeamsError::TokenTransport { what };
        let url = format!("{}/{}/oauth2/v2.0/token", cloud.token_endpoint, bot.authority);
        let uri = http::Uri::try_from(url).map_err(|err| transport(format!("the token endpoint is not a URL: {err}")))?;
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            .append_pair("client_id", &bot.app_id)
            .append_pair("client_secret", bot.app_secret.expose_secret())
            .append_pair("scope", &cloud.scope)
            .finish();
        let form = SecretString::from(form);
        let started = Instant::now();
        let answer = self.http.post(uri, None, FORM, form.expose_secret().as_bytes(), timeout).await.map_err(|err| match err {
            TeamsError::Unsent { what } | TeamsError::Ambiguous { what } => transport(what),
            other => transport(other.to_string()),
        })?;
        let status = answer.status.as_u16();
        let success = answer.status.is_success();
        let body = answer.body.map_err(|err| transport(err.to_string()))?;
        if success {
            let body: TokenResponse =
                serde_json::from_slice(&body).map_err(|err| transport(format!("the token answer cannot be read: {err}")))?;
            let lifetime = Duration::from_secs(body.expires_in).clamp(MIN_LIFETIME, MAX_LIFETIME);
            // Short-lived tokens (tests) refresh at half their life instead.
            let margin = self.margin.min(lifetime / 2);
            return Ok(Cached { token: body.access_token, refresh_at: started + (lifetime - margin) });
        }
        let aad: AadError = serde_json::from_slice(&body).unwrap_or_default();
        // The description starts "AADSTS7000215: ..."; keep that first sentence.
        let description = aad.error_description.split(" Trace ID:").next().unwrap_or_default().trim();
        Err(TeamsError::TokenRejected {
            status,
            error: crate::text::clip(&aad.error, 128),
            description: crate::text::clip(description, 512),
        })
    }
}

fn sweep(slots: &mut HashMap<Key, Slot>) {
    let now = Instant::now();
    slots.retain(|_, slot| Arc::strong_count(slot) > 1 || slot.try_lock().map_or(true, |c| c.as_ref().is_some_and(|c| now < c.refresh_at)));
    slots.shrink_to_fit();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cloud() -> Cloud {
        Cloud {
            name: "public".into(),
            token_endpoint: "https://login.example".into(),
            multi_tenant_authority: "botframework.com".into(),
            scope: "s".into(),
            policy: super::super::ServiceUrlPolicy::new(vec![], vec![]),
        }
    }

    fn bot(secret: &str) -> BotCredentials {
        BotCredentials { cloud: "public".into(), app_id: "app".into(), app_secret: SecretString::from(secret), authority: "a".into() }
    }

    #[test]
    fn a_different_secret_is_a_different_token() {
        assert_ne!(key(&cloud(), &bot("right")), key(&cloud(), &bot("wrong")));
        assert_eq!(key(&cloud(), &bot("right")), key(&cloud(), &bot("right")));
        let (_, _, _, digest) = key(&cloud(), &bot("hunter2"));
        assert!(!String::from_utf8_lossy(&digest).contains("hunter2"));
    }

    #[test]
    fn idle_expired_keys_are_swept() {
        let connector = Connector::new(Duration::from_secs(1), hyper_util::client::proxy::matcher::Matcher::builder().build());
        let tokens = Tokens::new(Arc::new(connector.expect("a client")), Duration::from_secs(300));
        for i in 0..(SWEEP_ABOVE * 4) {
            let _ = tokens.slot(&cloud(), &bot(&format!("s{i}")));
        }
        assert!(tokens.len() <= SWEEP_ABOVE + 1, "{} keys kept", tokens.len());
    }
}
