//! The Bot Framework Connector adapter: tokens, the service-URL allowlist,
//! sending activities and creating 1:1 conversations.
//!
//! A bearer token is only ever sent to an allow-listed host over https (plain
//! http only for configured loopback hosts), and redirects are never followed,
//! so a token cannot be led elsewhere.

pub mod card;
pub mod token;

use std::collections::HashMap;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use url::Url;

use crate::settings::{TeamsSettings, is_loopback};

/// Which bot signs a request, and where its token comes from.
#[derive(Clone)]
pub struct BotCredentials {
    /// The Microsoft cloud (a key of `teams.clouds`).
    pub cloud: String,
    pub app_id: String,
    pub app_secret: SecretString,
    /// The cloud's multi-tenant authority, or the bot's tenant id.
    pub authority: String,
}

impl std::fmt::Debug for BotCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BotCredentials")
            .field("cloud", &self.cloud)
            .field("app_id", &self.app_id)
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

/// One Microsoft cloud: its token endpoint and scope, and the only hosts its
/// tokens may be sent to.
#[derive(Debug, Clone)]
pub struct Cloud {
    pub name: String,
    pub token_endpoint: String,
    pub multi_tenant_authority: String,
    pub scope: String,
    pub policy: ServiceUrlPolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum TeamsError {
    #[error("service URL {url} is not allowed: {why}")]
    ServiceUrlNotAllowed { url: String, why: String },
    #[error("activity of {bytes} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge { bytes: usize, limit: usize },
    #[error("token endpoint answered {status} {error}: {description}")]
    TokenRejected { status: u16, error: String, description: String },
    #[error("token request failed")]
    TokenTransport {
        #[source]
        source: reqwest::Error,
    },
    #[error("Connector answered {status} {code}: {message}", code = code.as_deref().unwrap_or("-"))]
    Api { status: u16, code: Option<String>, message: String, correlation_id: Option<String>, retry_after: Option<Duration> },
    #[error("Connector request failed")]
    Transport {
        #[source]
        source: reqwest::Error,
    },
}

impl TeamsError {
    /// Microsoft's error code, e.g. `BotNotInConversationRoster`.
    pub fn code(&self) -> Option<&str> {
        match self {
            TeamsError::Api { code, .. } => code.as_deref(),
            TeamsError::TokenRejected { error, .. } => Some(error),
            _ => None,
        }
    }

    pub fn http_status(&self) -> Option<u16> {
        match self {
            TeamsError::Api { status, .. } | TeamsError::TokenRejected { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn correlation_id(&self) -> Option<&str> {
        match self {
            TeamsError::Api { correlation_id, .. } => correlation_id.as_deref(),
            _ => None,
        }
    }
}

/// Where bearer tokens may go (contract §1).
#[derive(Debug, Clone)]
pub struct ServiceUrlPolicy {
    allowed_hosts: Vec<String>,
    insecure_loopback_hosts: Vec<String>,
}

impl ServiceUrlPolicy {
    pub fn new(allowed_hosts: Vec<String>, insecure_loopback_hosts: Vec<String>) -> Self {
        let lower = |v: Vec<String>| v.into_iter().map(|h| h.to_ascii_lowercase()).collect();
        Self { allowed_hosts: lower(allowed_hosts), insecure_loopback_hosts: lower(insecure_loopback_hosts) }
    }

    /// The parsed service URL (with a trailing slash) if a token may be sent there.
    pub fn check(&self, service_url: &str) -> Result<Url, TeamsError> {
        let refuse = |why: &str| TeamsError::ServiceUrlNotAllowed { url: service_url.to_owned(), why: why.to_owned() };
        let mut url = Url::parse(service_url).map_err(|_| refuse("not a URL"))?;
        let host = url.host_str().ok_or_else(|| refuse("no host"))?.to_ascii_lowercase();
        if !url.username().is_empty() || url.password().is_some() {
            return Err(refuse("credentials in the URL"));
        }
        let allowed = match url.scheme() {
            "https" => self.allowed_hosts.contains(&host),
            "http" => self.insecure_loopback_hosts.contains(&host) && is_loopback(&host),
            _ => false,
        };
        if !allowed {
            return Err(refuse(if self.allowed_hosts.contains(&host) {
                "only https is allowed for this host"
            } else {
                "host is not on the allowlist"
            }));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(refuse("query or fragment in the URL"));
        }
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        Ok(url)
    }
}

/// Where an activity goes.
#[derive(Debug, Clone)]
pub struct Destination<'a> {
    pub service_url: &'a Url,
    pub conversation_id: &'a str,
    pub bot: &'a BotCredentials,
}

/// The Connector accepted the activity.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    pub activity_id: String,
    pub correlation_id: Option<String>,
}

pub struct Teams {
    http: reqwest::Client,
    tokens: token::Tokens,
    clouds: HashMap<String, Cloud>,
    max_activity_bytes: usize,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct IdBody {
    id: String,
}

impl Teams {
    pub fn new(settings: &TeamsSettings) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(settings.request_timeout_secs))
            .connect_timeout(Duration::from_secs(settings.connect_timeout_secs))
            // A redirect could carry the bearer token to another host.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let clouds = settings
            .clouds
            .iter()
            .map(|(name, cloud)| {
                let cloud = Cloud {
                    name: name.clone(),
                    token_endpoint: cloud.token_endpoint.trim_end_matches('/').to_owned(),
                    multi_tenant_authority: cloud.multi_tenant_authority.clone(),
                    scope: cloud.scope.clone(),
                    policy: ServiceUrlPolicy::new(cloud.service_hosts.clone(), settings.insecure_loopback_hosts.clone()),
                };
                (name.clone(), cloud)
            })
            .collect();
        Ok(Self {
            tokens: token::Tokens::new(http.clone(), Duration::from_secs(settings.token_refresh_margin_secs)),
            http,
            clouds,
            max_activity_bytes: settings.max_activity_bytes,
        })
    }

    pub fn cloud(&self, name: &str) -> Option<&Cloud> {
        self.clouds.get(name)
    }

    /// The parsed service URL, if `bot`'s cloud allows sending its token there.
    pub fn check_service_url(&self, bot: &BotCredentials, service_url: &str) -> Result<Url, TeamsError> {
        match self.clouds.get(&bot.cloud) {
            Some(cloud) => cloud.policy.check(service_url),
            None => Err(TeamsError::ServiceUrlNotAllowed { url: service_url.to_owned(), why: format!("unknown cloud {:?}", bot.cloud) }),
        }
    }

    pub fn token_requests(&self) -> u64 {
        self.tokens.requests()
    }

    /// Serialize `activity`, refusing it when it exceeds the size limit.
    pub fn encode(&self, activity: &Value) -> Result<Vec<u8>, TeamsError> {
        let body = serde_json::to_vec(activity).expect("a serde_json::Value always serializes");
        if body.len() > self.max_activity_bytes {
            return Err(TeamsError::PayloadTooLarge { bytes: body.len(), limit: self.max_activity_bytes });
        }
        Ok(body)
    }

    /// Post an encoded activity to the conversation. A 401 gets one forced
    /// token refresh and one more try.
    pub async fn send(&self, to: &Destination<'_>, body: &[u8]) -> Result<Sent, TeamsError> {
        let mut url = to.service_url.join("v3/conversations/").expect("a relative path joins");
        url.path_segments_mut().expect("http URLs have paths").pop_if_empty().push(to.conversation_id).push("activities");
        let response = self.authorized_post(to.bot, &url, body).await?;
        let correlation_id = correlation_id(&response);
        let id: IdBody = response.json().await.map_err(|source| TeamsError::Transport { source })?;
        Ok(Sent { activity_id: id.id, correlation_id })
    }

    /// Create (or find) the 1:1 conversation of the bot and `user_id` in `tenant_id`.
    pub async fn create_personal_conversation(
        &self,
        service_url: &Url,
        bot: &BotCredentials,
        tenant_id: &str,
        user_id: &str,
    ) -> Result<String, TeamsError> {
        let url = service_url.join("v3/conversations").expect("a relative path joins");
        let params = json!({
            "bot": { "id": format!("28:{}", bot.app_id) },
            "members": [{ "id": user_id }],
            "isGroup": false,
            "tenantId": tenant_id,
            "channelData": { "tenant": { "id": tenant_id } },
        });
        let body = serde_json::to_vec(&params).expect("a serde_json::Value always serializes");
        let response = self.authorized_post(bot, &url, &body).await?;
        let id: IdBody = response.json().await.map_err(|source| TeamsError::Transport { source })?;
        Ok(id.id)
    }

    async fn authorized_post(&self, bot: &BotCredentials, url: &Url, body: &[u8]) -> Result<reqwest::Response, TeamsError> {
        // Checked here too, so that no caller can skip it.
        self.check_service_url(bot, url.as_str())?;
        let cloud = &self.clouds[&bot.cloud];
        let token = self.tokens.get(cloud, bot).await?;
        match self.post(url, &token, body).await {
            Err(TeamsError::Api { status: 401, .. }) => {
                let fresh = self.tokens.refresh(cloud, bot, &token).await?;
                self.post(url, &fresh, body).await
            }
            other => other,
        }
    }

    async fn post(&self, url: &Url, token: &SecretString, body: &[u8]) -> Result<reqwest::Response, TeamsError> {
        let response = self
            .http
            .post(url.clone())
            .bearer_auth(token.expose_secret())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .send()
            .await
            .map_err(|source| TeamsError::Transport { source })?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(api_error(response).await)
    }
}

fn correlation_id(response: &reqwest::Response) -> Option<String> {
    response.headers().get("x-correlating-operationid").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// Microsoft's error answer, with its code, correlation id and `Retry-After`.
async fn api_error(response: reqwest::Response) -> TeamsError {
    let status = response.status().as_u16();
    let correlation_id = correlation_id(&response);
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let text = response.text().await.unwrap_or_default();
    let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => (body.error.code, body.error.message.unwrap_or_default()),
        Err(_) => (None, text.chars().take(200).collect()),
    };
    TeamsError::Api { status, code, message, correlation_id, retry_after }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ServiceUrlPolicy {
        ServiceUrlPolicy::new(vec!["smba.trafficmanager.net".into()], vec!["127.0.0.1".into()])
    }

    #[test]
    fn only_allow_listed_https_hosts_and_configured_loopback_http() {
        let p = policy();
        assert_eq!(p.check("https://smba.trafficmanager.net/amer").unwrap().as_str(), "https://smba.trafficmanager.net/amer/");
        assert!(p.check("https://SMBA.trafficmanager.net/teams/").is_ok());
        assert!(p.check("http://127.0.0.1:3978/teams/").is_ok());
        for bad in [
            "http://smba.trafficmanager.net/teams/",
            "https://smba.trafficmanager.net.evil.com/teams/",
            "https://evil.com/teams/",
            "http://localhost:3978/teams/",
            "https://127.0.0.1/teams/",
            "https://user:pw@smba.trafficmanager.net/teams/",
            "https://smba.trafficmanager.net/teams/?x=1",
            "ftp://smba.trafficmanager.net/",
            "not a url",
        ] {
            assert!(matches!(p.check(bad), Err(TeamsError::ServiceUrlNotAllowed { .. })), "{bad} must be refused");
        }
    }

    #[test]
    fn each_cloud_sends_tokens_only_to_its_own_hosts() {
        let mut settings = crate::settings::Settings::from_figment(crate::settings::Settings::defaults()).unwrap().teams;
        settings.insecure_loopback_hosts.clear();
        let teams = Teams::new(&settings).unwrap();
        let bot = |cloud: &str| BotCredentials {
            cloud: cloud.into(),
            app_id: "a".into(),
            app_secret: SecretString::from("s"),
            authority: "botframework.com".into(),
        };
        assert!(teams.check_service_url(&bot("public"), "https://smba.trafficmanager.net/teams/").is_ok());
        assert!(teams.check_service_url(&bot("gcch"), "https://smba.infra.gov.teams.microsoft.us/teams").is_ok());
        assert!(teams.check_service_url(&bot("dod"), "https://smba.infra.dod.teams.microsoft.us/teams").is_ok());
        assert!(teams.check_service_url(&bot("gcc"), "https://smba.infra.gcc.teams.microsoft.com/teams").is_ok());
        // A government bot's token never goes to the public cloud, and back.
        assert!(teams.check_service_url(&bot("gcch"), "https://smba.trafficmanager.net/teams/").is_err());
        assert!(teams.check_service_url(&bot("public"), "https://smba.infra.gov.teams.microsoft.us/teams").is_err());
        assert!(teams.check_service_url(&bot("mars"), "https://smba.trafficmanager.net/teams/").is_err());
    }

    #[test]
    fn conversation_ids_are_one_path_segment() {
        let base = Url::parse("https://smba.trafficmanager.net/teams/").unwrap();
        let mut url = base.join("v3/conversations/").unwrap();
        url.path_segments_mut().unwrap().pop_if_empty().push("19:a/b@thread.tacv2;messageid=1").push("activities");
        assert_eq!(url.as_str(), "https://smba.trafficmanager.net/teams/v3/conversations/19:a%2Fb@thread.tacv2;messageid=1/activities");
    }

    #[test]
    fn credentials_never_show_their_secret() {
        let bot = BotCredentials {
            cloud: "public".into(),
            app_id: "app".into(),
            app_secret: SecretString::from("hunter2"),
            authority: "botframework.com".into(),
        };
        assert!(!format!("{bot:?}").contains("hunter2"));
    }
}
