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

use bytes::Bytes;
use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::connector::{Connector, FORM};
use super::{BotCredentials, Cloud, TeamsError};

struct Cached {
    /// `Bearer <token>`, marked sensitive, made once per token: a post
    /// clones it (a reference count), instead of formatting and checking a
    /// kilobyte-long token per request.
    bearer: HeaderValue,
    /// When the cached token should be replaced (expiry less the margin).
    refresh_at: Instant,
}

type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// SHA-256 of (cloud, authority, bot app, secret), each part
/// length-prefixed so that no two credentials share a key: computed once per
/// credential ([`BotCredentials::new`]). A digest of the secret's value,
/// never the value itself, and it lives only in memory.
type Key = [u8; 32];

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

pub(super) fn key(cloud: &str, authority: &str, app_id: &str, secret: &SecretString) -> Key {
    let mut hash = Sha256::new();
    for part in [cloud, authority, app_id, secret.expose_secret()] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.finalize().into()
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

    fn slot(&self, bot: &BotCredentials) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.len() >= SWEEP_ABOVE && slots.len().is_power_of_two() {
            sweep(&mut slots);
        }
        slots.entry(bot.token_key).or_default().clone()
    }

    /// Forget the keys nobody is using whose token is gone or stale.
    pub fn sweep(&self) {
        sweep(&mut self.slots.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// A valid token for `bot`, as the `Authorization` header's value.
    /// Concurrent callers for the same credential wait for the one request
    /// in flight instead of each making their own.
    pub async fn get(&self, cloud: &Cloud, bot: &BotCredentials, timeout: Duration) -> Result<HeaderValue, TeamsError> {
        let slot = self.slot(bot);
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok(c.bearer.clone());
        }
        let fresh = self.fetch(cloud, bot, timeout).await?;
        let bearer = fresh.bearer.clone();
        *cached = Some(fresh);
        Ok(bearer)
    }

    /// After a 401 with `rejected`: drop it (unless another caller already
    /// replaced it) and return a fresh token.
    pub async fn refresh(
        &self,
        cloud: &Cloud,
        bot: &BotCredentials,
        rejected: &HeaderValue,
        timeout: Duration,
    ) -> Result<HeaderValue, TeamsError> {
        let slot = self.slot(bot);
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref()
            && c.bearer != rejected
            && Instant::now() < c.refresh_at
        {
            return Ok(c.bearer.clone());
        }
        let fresh = self.fetch(cloud, bot, timeout).await?;
        let bearer = fresh.bearer.clone();
        *cached = Some(fresh);
        Ok(bearer)
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
        let form = Bytes::copy_from_slice(form.expose_secret().as_bytes());
        let answer = self.http.post(uri, None, FORM, form, timeout).await.map_err(|err| match err {
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
            let bearer = super::connector::bearer(body.access_token.expose_secret())
                .map_err(|_| transport("the token answer's access_token is not a valid header value".into()))?;
            return Ok(Cached { bearer, refresh_at: started + (lifetime - margin) });
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

    fn bot(secret: &str) -> BotCredentials {
        BotCredentials::new("public", "app", SecretString::from(secret), "a")
    }

    #[test]
    fn a_different_secret_is_a_different_token() {
        assert_ne!(bot("right").token_key, bot("wrong").token_key);
        assert_eq!(bot("right").token_key, bot("right").token_key);
        assert!(!String::from_utf8_lossy(&bot("hunter2").token_key).contains("hunter2"));
    }

    #[test]
    fn every_part_of_the_credential_is_in_its_key_and_parts_cannot_run_together() {
        let secret = || SecretString::from("s");
        let base = BotCredentials::new("public", "app", secret(), "a").token_key;
        assert_ne!(base, BotCredentials::new("gcch", "app", secret(), "a").token_key);
        assert_ne!(base, BotCredentials::new("public", "app2", secret(), "a").token_key);
        assert_ne!(base, BotCredentials::new("public", "app", secret(), "b").token_key);
        // The same bytes split differently between the parts.
        assert_ne!(
            BotCredentials::new("public", "bc", secret(), "a").token_key,
            BotCredentials::new("public", "c", secret(), "ab").token_key
        );
        assert_ne!(key("public", "a", "b", &SecretString::from("cd")), key("public", "a", "bc", &SecretString::from("d")));
    }

    #[test]
    fn idle_expired_keys_are_swept() {
        let connector = Connector::new(Duration::from_secs(1), hyper_util::client::proxy::matcher::Matcher::builder().build());
        let tokens = Tokens::new(Arc::new(connector.expect("a client")), Duration::from_secs(300));
        for i in 0..(SWEEP_ABOVE * 4) {
            let _ = tokens.slot(&bot(&format!("s{i}")));
        }
        assert!(tokens.len() <= SWEEP_ABOVE + 1, "{} keys kept", tokens.len());
    }
}
