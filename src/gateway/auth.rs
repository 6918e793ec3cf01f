//! Authenticating a request to the messaging endpoint as the Bot Framework's
//! connector authentication requires: a JWT in `Authorization: Bearer`,
//! signed RS256 by a key from the OpenID metadata of the gateway's cloud,
//! issued by that cloud's token service, for a bot app id herald has an
//! org_integration for, valid now (with `gateway.clock_skew_secs` of
//! leeway), whose `serviceUrl` claim is the activity's, with a key endorsed
//! for the activity's channel. Any failure changes nothing.

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;

use crate::settings::is_loopback;

/// Why a request was refused: 401 (not authenticated) or 403 (authenticated,
/// but not for this activity).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("no bearer token")]
    NoToken,
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("the token is signed {0:?}; only RS256 is accepted")]
    Algorithm(String),
    #[error("the token's key id {0:?} is not in the cloud's OpenID metadata")]
    UnknownKey(String),
    #[error("the token does not verify: {0}")]
    Invalid(String),
    #[error("the token's audience {0:?} is no bot of a configured org_integration")]
    Audience(String),
    #[error("the token's serviceUrl claim is not the activity's serviceUrl")]
    ServiceUrl,
    #[error("the token's key is not endorsed for channel {0:?}")]
    Endorsement(String),
    #[error("the OpenID metadata could not be read: {0}")]
    Metadata(String),
}

impl AuthError {
    /// The HTTP status it answers.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::ServiceUrl | AuthError::Endorsement(_) => 403,
            AuthError::Metadata(_) => 503,
            _ => 401,
        }
    }
}

/// The claims herald reads; the others are checked by [`Validation`].
#[derive(Debug, Deserialize)]
pub struct Claims {
    pub aud: String,
    #[serde(rename = "serviceUrl", default)]
    pub service_url: Option<String>,
}

struct Key {
    decoding: DecodingKey,
    endorsements: Vec<String>,
}

#[derive(Default)]
struct Fetched {
    keys: HashMap<String, std::sync::Arc<Key>>,
    at: Option<Instant>,
    /// The last refresh made because a token named an unknown key.
    unknown_refresh: Option<Instant>,
}

/// One cloud's signing keys, from its OpenID metadata: fetched on first use,
/// again when older than `refresh`, and on a token naming an unknown key id
/// at most once per `unknown_refresh`.
pub struct Keys {
    http: reqwest::Client,
    metadata_url: String,
    issuer: String,
    refresh: Duration,
    unknown_refresh: Duration,
    skew: Duration,
    insecure_loopback_hosts: Vec<String>,
    fetched: Mutex<Fetched>,
}

/// The most of a metadata answer herald reads.
const MAX_METADATA_BYTES: usize = 256 * 1024;

#[derive(Deserialize)]
struct Metadata {
    jwks_uri: String,
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    #[serde(default)]
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    endorsements: Vec<String>,
}

impl Keys {
    pub fn new(
        metadata_url: &str,
        issuer: &str,
        refresh: Duration,
        unknown_refresh: Duration,
        skew: Duration,
        insecure_loopback_hosts: Vec<String>,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).redirect(reqwest::redirect::Policy::none()).build()?;
        Ok(Self {
            http,
            metadata_url: metadata_url.to_owned(),
            issuer: issuer.to_owned(),
            refresh,
            unknown_refresh,
            skew,
            insecure_loopback_hosts,
            fetched: Mutex::new(Fetched::default()),
        })
    }

    /// Verify `token`'s signature, issuer and times, and return its claims
    /// and the channels its key is endorsed for.
    pub async fn verify(&self, token: &str) -> Result<(Claims, Vec<String>), AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|err| AuthError::Malformed(err.to_string()))?;
        if header.alg != Algorithm::RS256 {
            return Err(AuthError::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.ok_or_else(|| AuthError::Malformed("no key id (kid)".into()))?;
        let key = self.key(&kid).await?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[&self.issuer]);
        validation.leeway = self.skew.as_secs();
        validation.validate_nbf = true;
        // The audience is checked against the org_integrations by the caller.
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation).map_err(|err| AuthError::Invalid(err.to_string()))?;
        Ok((data.claims, key.endorsements.clone()))
    }

    async fn key(&self, kid: &str) -> Result<std::sync::Arc<Key>, AuthError> {
        let mut fetched = self.fetched.lock().await;
        let stale = fetched.at.is_none_or(|at| at.elapsed() >= self.refresh);
        let unknown = !fetched.keys.contains_key(kid);
        let may_refresh_unknown = fetched.unknown_refresh.is_none_or(|at| at.elapsed() >= self.unknown_refresh);
        if stale || (unknown && may_refresh_unknown) {
            if unknown && !stale {
                fetched.unknown_refresh = Some(Instant::now());
            }
            match self.fetch().await {
                Ok(keys) => {
                    fetched.keys = keys;
                    fetched.at = Some(Instant::now());
                }
                // Keys fetched before stay in use while the metadata is away.
                Err(err) if fetched.keys.is_empty() => return Err(err),
                Err(err) => tracing::warn!(error = %err, "the OpenID metadata could not be refreshed; using the keys fetched before"),
            }
        }
        fetched.keys.get(kid).cloned().ok_or_else(|| AuthError::UnknownKey(crate::text::clip(kid, 128)))
    }

    fn allowed(&self, url: &str) -> Result<Url, AuthError> {
        let parsed = Url::parse(url).map_err(|_| AuthError::Metadata(format!("{} is not a URL", crate::teams::redact(url))))?;
        let host = parsed.host_str().unwrap_or_default().to_ascii_lowercase();
        let ok = match parsed.scheme() {
            "https" => true,
            "http" => self.insecure_loopback_hosts.contains(&host) && is_loopback(&host),
            _ => false,
        };
        if !ok {
            return Err(AuthError::Metadata(format!("{} is not https", crate::teams::redact(url))));
        }
        Ok(parsed)
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, AuthError> {
        let url = self.allowed(url)?;
        let fail = |err: reqwest::Error| AuthError::Metadata(crate::text::error_chain(&err));
        let mut response = self.http.get(url).send().await.map_err(fail)?;
        if !response.status().is_success() {
            return Err(AuthError::Metadata(format!("answered {}", response.status())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(fail)? {
            if body.len() + chunk.len() > MAX_METADATA_BYTES {
                return Err(AuthError::Metadata(format!("an answer over {MAX_METADATA_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    async fn fetch(&self) -> Result<HashMap<String, std::sync::Arc<Key>>, AuthError> {
        let metadata: Metadata =
            serde_json::from_slice(&self.get(&self.metadata_url).await?).map_err(|err| AuthError::Metadata(err.to_string()))?;
        let set: JwkSet =
            serde_json::from_slice(&self.get(&metadata.jwks_uri).await?).map_err(|err| AuthError::Metadata(err.to_string()))?;
        let mut keys = HashMap::new();
        for jwk in set.keys {
            let (Some(kid), Some(n), Some(e)) = (jwk.kid, jwk.n, jwk.e) else { continue };
            if jwk.kty != "RSA" {
                continue;
            }
            let Ok(decoding) = DecodingKey::from_rsa_components(&n, &e) else { continue };
            keys.insert(kid, std::sync::Arc::new(Key { decoding, endorsements: jwk.endorsements }));
        }
        tracing::info!(keys = keys.len(), metadata = %crate::teams::redact(&self.metadata_url), "signing keys fetched");
        Ok(keys)
    }
}

/// `activity`'s `serviceUrl` and the token's claim name the same URL
/// (compared without a trailing slash, case-insensitively in the host).
pub fn same_service_url(claim: Option<&str>, activity: &str) -> bool {
    let normal = |url: &str| Url::parse(url).ok().map(|u| u.as_str().trim_end_matches('/').to_owned());
    match (claim.and_then(normal), normal(activity)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_urls_compare_as_urls() {
        assert!(same_service_url(Some("https://smba.trafficmanager.net/amer/"), "https://SMBA.trafficmanager.net/amer"));
        assert!(!same_service_url(Some("https://smba.trafficmanager.net/amer/"), "https://smba.trafficmanager.net/emea/"));
        assert!(!same_service_url(None, "https://smba.trafficmanager.net/amer/"));
        assert!(!same_service_url(Some("not a url"), "not a url"));
    }

    #[test]
    fn refusals_answer_401_or_403() {
        assert_eq!(AuthError::NoToken.status(), 401);
        assert_eq!(AuthError::Audience("x".into()).status(), 401);
        assert_eq!(AuthError::ServiceUrl.status(), 403);
        assert_eq!(AuthError::Endorsement("msteams".into()).status(), 403);
    }
}
