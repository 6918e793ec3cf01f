//! The Bot Framework Connector adapter: tokens, the service-URL allowlist,
//! sending activities and creating 1:1 conversations.
//!
//! A bearer token is only ever sent to an allow-listed host over https (plain
//! http only for configured loopback hosts), and redirects are never followed,
//! so a token cannot be led elsewhere. Every request ends by a caller's
//! deadline, and every answer is read up to a size limit (`answer`).

mod answer;
pub mod card;
mod cloud;
mod connector;
pub mod token;
mod workflow;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Uri};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;
use url::Url;

pub use cloud::{Cloud, ServiceUrlPolicy, redact};
pub use connector::SetupError;
use connector::{Answer, Connector};
pub use workflow::{Workflow, WorkflowPolicy};

use crate::settings::TeamsSettings;

/// Which bot signs a request, and where its token comes from. Built once
/// per org_integration read (not per job), with the token cache's key.
#[derive(Clone)]
pub struct BotCredentials {
    /// The Microsoft cloud (a key of `teams.clouds`).
    cloud: String,
    app_id: String,
    app_secret: SecretString,
    /// The cloud's multi-tenant authority, or the bot's tenant id.
    authority: String,
    /// The token cache's key (`token`): a digest of all four, computed here
    /// so that a job's token lookup hashes 32 bytes, nothing else.
    token_key: [u8; 32],
}

impl BotCredentials {
    pub fn new(cloud: impl Into<String>, app_id: impl Into<String>, app_secret: SecretString, authority: impl Into<String>) -> Self {
        let (cloud, app_id, authority) = (cloud.into(), app_id.into(), authority.into());
        let token_key = token::key(&cloud, &authority, &app_id, &app_secret);
        Self { cloud, app_id, app_secret, authority, token_key }
    }

    /// The Microsoft cloud (a key of `teams.clouds`).
    pub fn cloud(&self) -> &str {
        &self.cloud
    }

    pub fn app_id(&self) -> &str {
        &self.app_id
    }
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

#[derive(Debug, thiserror::Error)]
pub enum TeamsError {
    #[error("service URL {url} is not allowed: {why}")]
    ServiceUrlNotAllowed { url: String, why: String },
    #[error("activity of {bytes} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge { bytes: usize, limit: usize },
    #[error("token endpoint answered {status} {error}: {description}")]
    TokenRejected { status: u16, error: String, description: String },
    #[error("token request failed: {what}")]
    TokenTransport { what: String },
    #[error("Connector answered {status} {code}: {message}", code = code.as_deref().unwrap_or("-"))]
    Api { status: u16, code: Option<String>, message: String, correlation_id: Option<String>, retry_after: Option<Duration> },
    /// A Workflows webhook's error answer.
    #[error("the Workflows webhook answered {status} {code}: {message}", code = code.as_deref().unwrap_or("-"))]
    Workflow { status: u16, code: Option<String>, message: String, retry_after: Option<Duration> },
    /// Nothing reached the Connector: no connection, or no time left to try.
    #[error("Connector request not sent: {what}")]
    Unsent { what: String },
    /// The request may have reached the Connector, but its answer was lost
    /// (a timeout or reset after it was written, a 2xx that cannot be read).
    #[error("Connector request may have been delivered, but its answer was lost: {what}")]
    Ambiguous { what: String },
}

impl TeamsError {
    /// Microsoft's error code, e.g. `BotNotInConversationRoster`.
    pub fn code(&self) -> Option<&str> {
        match self {
            TeamsError::Api { code, .. } | TeamsError::Workflow { code, .. } => code.as_deref(),
            TeamsError::TokenRejected { error, .. } => Some(error),
            _ => None,
        }
    }

    pub fn http_status(&self) -> Option<u16> {
        match self {
            TeamsError::Api { status, .. } | TeamsError::TokenRejected { status, .. } | TeamsError::Workflow { status, .. } => {
                Some(*status)
            }
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
    connector: Arc<Connector>,
    tokens: token::Tokens,
    clouds: HashMap<String, Cloud>,
    max_activity_bytes: usize,
    request_timeout: Duration,
    max_retry_after: Duration,
}

#[derive(Deserialize)]
struct IdBody {
    id: String,
}

impl Teams {
    /// The Connector's client, with the proxy settings of the environment
    /// (`HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`; see `connector`).
    pub fn new(settings: &TeamsSettings) -> Result<Self, SetupError> {
        let proxy = hyper_util::client::proxy::matcher::Matcher::from_env();
        let connector = Arc::new(Connector::new(Duration::from_secs(settings.connect_timeout_secs), proxy)?);
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
                    workflows: WorkflowPolicy::new(cloud.workflow_hosts.clone(), settings.insecure_loopback_hosts.clone()),
                };
                (name.clone(), cloud)
            })
            .collect();
        Ok(Self {
            tokens: token::Tokens::new(connector.clone(), Duration::from_secs(settings.token_refresh_margin_secs)),
            connector,
            clouds,
            max_activity_bytes: settings.max_activity_bytes,
            request_timeout: Duration::from_secs(settings.request_timeout_secs),
            max_retry_after: Duration::from_secs(settings.max_retry_after_secs),
        })
    }

    pub fn cloud(&self, name: &str) -> Option<&Cloud> {
        self.clouds.get(name)
    }

    /// The timeout of one request.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// The parsed service URL, if `bot`'s cloud allows sending its token there.
    pub fn check_service_url(&self, bot: &BotCredentials, service_url: &str) -> Result<Url, TeamsError> {
        let refuse = |why| TeamsError::ServiceUrlNotAllowed { url: redact(service_url), why };
        self.policy(bot).map_err(refuse)?.check(service_url)
    }

    /// [`Teams::check_service_url`] on a URL already parsed (no second parse
    /// per post): the bot's cloud, if it allows `url`.
    fn cloud_allowing(&self, bot: &BotCredentials, url: &Url) -> Result<&Cloud, TeamsError> {
        let refuse = |why: String| TeamsError::ServiceUrlNotAllowed { url: redact(url.as_str()), why };
        let cloud = self.clouds.get(&bot.cloud).ok_or_else(|| refuse(unknown_cloud(bot)))?;
        cloud.policy.allows(url).map_err(|why| refuse(why.to_owned()))?;
        Ok(cloud)
    }

    /// The service URL policy of the bot's cloud, or why there is none.
    fn policy(&self, bot: &BotCredentials) -> Result<&cloud::ServiceUrlPolicy, String> {
        self.clouds.get(&bot.cloud).map(|cloud| &cloud.policy).ok_or_else(|| unknown_cloud(bot))
    }

    pub fn token_requests(&self) -> u64 {
        self.tokens.requests()
    }

    /// Tokens cached right now (for the memory soak).
    pub fn cached_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Forget tokens that are stale and unused.
    pub fn sweep_tokens(&self) {
        self.tokens.sweep();
    }

    /// Fetch (or reuse) the bot's token from its cloud's token endpoint, as a
    /// send would: `Ok` when the identity platform accepts the credential.
    pub async fn fetch_token(&self, bot: &BotCredentials) -> Result<(), TeamsError> {
        let Some(cloud) = self.clouds.get(&bot.cloud) else {
            return Err(TeamsError::ServiceUrlNotAllowed { url: String::new(), why: unknown_cloud(bot) });
        };
        self.tokens.get(cloud, bot, self.request_timeout).await.map(drop)
    }

    /// Serialize `activity`, refusing it when it exceeds the size limit.
    /// The body is shared, not copied, by each request that posts it.
    pub fn encode(&self, activity: &card::Activity<'_>) -> Result<Bytes, TeamsError> {
        let body = serde_json::to_vec(activity).expect("an activity (strings and a producer's JSON) always serializes");
        if body.len() > self.max_activity_bytes {
            return Err(TeamsError::PayloadTooLarge { bytes: body.len(), limit: self.max_activity_bytes });
        }
        Ok(Bytes::from(body))
    }

    /// Post an encoded activity to the conversation, finishing by `until`. A
    /// 401 gets one forced token refresh and one more try.
    pub async fn send(&self, to: &Destination<'_>, body: &Bytes, until: Instant) -> Result<Sent, TeamsError> {
        let url = activities_url(to.service_url, to.conversation_id);
        let answer = self.authorized_post(to.bot, &url, body, until).await?;
        let correlation_id = answer::correlation_id(&answer.headers);
        let id = read_id(answer)?;
        Ok(Sent { activity_id: id, correlation_id })
    }

    /// The webhook `url` of an org_integration of `cloud`, if herald may post
    /// to it (the cloud's `workflow_hosts`).
    pub fn workflow(&self, cloud: &str, url: &SecretString) -> Result<Workflow, TeamsError> {
        use secrecy::ExposeSecret;
        let refuse = |why: String| TeamsError::ServiceUrlNotAllowed { url: redact(url.expose_secret()), why };
        let policy = &self.clouds.get(cloud).ok_or_else(|| refuse(format!("unknown cloud {:?}", crate::text::clip(cloud, 64))))?.workflows;
        policy.check(url.expose_secret()).map_err(|why| refuse(why.to_owned()))
    }

    /// Post an encoded activity to a Workflows webhook, finishing by `until`.
    /// Workflows answers 202 once the flow's run is queued; its run id, when
    /// given, stands for the activity id.
    pub async fn post_workflow(&self, workflow: &Workflow, body: &Bytes, until: Instant) -> Result<Sent, TeamsError> {
        let timeout = self.time_left(until)?;
        let uri = Uri::try_from(workflow.url().as_str()).map_err(|err| TeamsError::Unsent { what: format!("POST: {err}") })?;
        let answer = self.connector.post(uri, None, connector::JSON, body.clone(), timeout).await?;
        let header = |name: &str| answer.headers.get(name).and_then(|v| v.to_str().ok()).map(|v| crate::text::clip(v, 128));
        if answer.status.is_success() {
            let activity_id = header("x-ms-workflow-run-id").unwrap_or_else(|| format!("workflow-{}", answer.status.as_u16()));
            return Ok(Sent { activity_id, correlation_id: header("x-ms-client-tracking-id") });
        }
        Err(match answer::api_error(answer, self.max_retry_after) {
            TeamsError::Api { status, code, message, retry_after, .. } => TeamsError::Workflow { status, code, message, retry_after },
            other => other,
        })
    }

    /// Create (or find) the 1:1 conversation of the bot and `user_id` in
    /// `tenant_id`, finishing by `until`. Creating is idempotent at Microsoft,
    /// so a lost answer is simply asked again.
    pub async fn create_personal_conversation(
        &self,
        service_url: &Url,
        bot: &BotCredentials,
        tenant_id: &str,
        user_id: &str,
        until: Instant,
    ) -> Result<String, TeamsError> {
        let url = service_url.join("v3/conversations").expect("a relative path joins");
        let params = json!({
            "bot": { "id": format!("28:{}", bot.app_id) },
            "members": [{ "id": user_id }],
            "isGroup": false,
            "tenantId": tenant_id,
            "channelData": { "tenant": { "id": tenant_id } },
        });
        let body = Bytes::from(serde_json::to_vec(&params).expect("a serde_json::Value always serializes"));
        let answer = self.authorized_post(bot, &url, &body, until).await?;
        read_id(answer).map_err(|err| match err {
            TeamsError::Ambiguous { what } => TeamsError::Unsent { what },
            other => other,
        })
    }

    /// POST with the bot's token; a 2xx answer, or the error it comes to.
    async fn authorized_post(&self, bot: &BotCredentials, url: &Url, body: &Bytes, until: Instant) -> Result<Answer, TeamsError> {
        // Checked here too, so that no caller can skip it.
        let cloud = self.cloud_allowing(bot, url)?;
        let bearer = self.tokens.get(cloud, bot, self.time_left(until)?).await?;
        match self.post(url, &bearer, body, until).await {
            Err(TeamsError::Api { status: 401, .. }) => {
                let fresh = self.tokens.refresh(cloud, bot, &bearer, self.time_left(until)?).await?;
                self.post(url, &fresh, body, until).await
            }
            other => other,
        }
    }

    /// The timeout for a request that must end by `until`; an error when
    /// there is no time left to start one.
    fn time_left(&self, until: Instant) -> Result<Duration, TeamsError> {
        let left = until.saturating_duration_since(Instant::now()).min(self.request_timeout);
        if left < Duration::from_millis(100) {
            return Err(TeamsError::Unsent { what: "no time left before the delivery's deadline".into() });
        }
        Ok(left)
    }

    async fn post(&self, url: &Url, bearer: &HeaderValue, body: &Bytes, until: Instant) -> Result<Answer, TeamsError> {
        let timeout = self.time_left(until)?;
        let uri = Uri::try_from(url.as_str()).map_err(|err| TeamsError::Unsent { what: format!("POST: {err}") })?;
        let answer = self.connector.post(uri, Some(bearer.clone()), connector::JSON, body.clone(), timeout).await?;
        if answer.status.is_success() {
            return Ok(answer);
        }
        Err(answer::api_error(answer, self.max_retry_after))
    }
}

fn unknown_cloud(bot: &BotCredentials) -> String {
    format!("unknown cloud {:?}", crate::text::clip(&bot.cloud, 64))
}

/// The `id` of a 2xx answer. The Connector accepted the request, so an
/// answer that cannot be read leaves the outcome unknown.
fn read_id(answer: Answer) -> Result<String, TeamsError> {
    let status = answer.status.as_u16();
    let ambiguous = |why: String| TeamsError::Ambiguous { what: format!("answered {status}, but {why}") };
    let body = answer.body.map_err(|err| ambiguous(err.to_string()))?;
    let parsed: IdBody = serde_json::from_slice(&body).map_err(|err| ambiguous(format!("the body is not an id: {err}")))?;
    if parsed.id.is_empty() || parsed.id.len() > 1024 {
        return Err(ambiguous(format!("the id is {} bytes long", parsed.id.len())));
    }
    Ok(parsed.id)
}

/// `{service_url}v3/conversations/{conversation_id}/activities`, the id one
/// percent-encoded path segment, built on the checked service URL without
/// parsing it again.
fn activities_url(service_url: &Url, conversation_id: &str) -> Url {
    let mut url = service_url.clone();
    url.path_segments_mut().expect("http URLs have paths").pop_if_empty().extend(["v3", "conversations", conversation_id, "activities"]);
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cloud_sends_tokens_only_to_its_own_hosts() {
        let mut settings = crate::settings::Settings::from_figment(crate::settings::Settings::defaults()).unwrap().teams;
        settings.insecure_loopback_hosts.clear();
        let teams = Teams::new(&settings).unwrap();
        let bot = |cloud: &str| BotCredentials::new(cloud, "a", SecretString::from("s"), "botframework.com");
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
        for base in ["https://smba.trafficmanager.net/teams/", "https://smba.trafficmanager.net/teams"] {
            let url = activities_url(&Url::parse(base).unwrap(), "19:a/b@thread.tacv2;messageid=1");
            assert_eq!(url.as_str(), "https://smba.trafficmanager.net/teams/v3/conversations/19:a%2Fb@thread.tacv2;messageid=1/activities");
        }
        let root = activities_url(&Url::parse("http://127.0.0.1:3978/").unwrap(), "a:1");
        assert_eq!(root.as_str(), "http://127.0.0.1:3978/v3/conversations/a:1/activities");
    }

    #[test]
    fn credentials_never_show_their_secret() {
        let bot = BotCredentials::new("public", "app", SecretString::from("hunter2"), "botframework.com");
        assert!(!format!("{bot:?}").contains("hunter2"));
    }
}
