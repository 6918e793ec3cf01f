//! Typed settings: embedded defaults (`config/default.toml`), an optional file,
//! then `HERALD_` environment variables; validated once at start.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// The documented defaults, embedded in the binary.
pub const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("invalid settings: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid setting `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub amqp_url: SecretString,
    pub amqp_tls: AmqpTlsSettings,
    pub mongodb_uri: SecretString,
    pub mongodb_database: String,
    /// The longest a command on a job's or the fleet's path may take.
    pub mongodb_command_timeout_ms: u64,
    pub topology_prefix: String,
    pub worker: WorkerSettings,
    pub fleet: FleetSettings,
    pub retry: RetrySettings,
    pub teams: TeamsSettings,
    pub http: HttpSettings,
    pub gateway: GatewaySettings,
    pub dlq: DlqSettings,
    pub ledger: LedgerSettings,
    pub metrics: MetricsSettings,
    pub headers: HeaderSettings,
    pub secrets: SecretSettings,
    pub telemetry: TelemetrySettings,
    pub log: LogSettings,
}

/// TLS to RabbitMQ beyond what an `amqps://` URL says: the CAs to trust and
/// a client certificate. Paths of PEM files; empty: not used.
#[derive(Debug, Clone, Deserialize)]
pub struct AmqpTlsSettings {
    /// The CAs that sign the broker's certificate (besides the system's).
    pub ca_file: String,
    /// A client certificate chain, for a broker that requires one, and its key.
    pub cert_file: String,
    pub key_file: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TelemetrySettings {
    pub otlp_endpoint: String,
    pub service_name: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DlqSettings {
    pub max_replays: u32,
}

/// What `/metrics` shows beyond the defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct MetricsSettings {
    /// Organizations whose job outcomes are counted by name
    /// (`herald_organization_jobs_total`); all others count as "other".
    pub organizations: Vec<String>,
    /// How often a worker polls the queues' depths.
    pub queue_poll_secs: u64,
}

impl MetricsSettings {
    pub fn queue_poll(&self) -> Duration {
        Duration::from_secs(self.queue_poll_secs.clamp(1, 3600))
    }
}

/// The `deliveries` ledger.
#[derive(Debug, Clone, Deserialize)]
pub struct LedgerSettings {
    /// Days a record is kept after its last change (a TTL index on
    /// `updated_at`); 0 keeps records forever.
    pub retention_days: u32,
}

/// The keys of herald's `x-herald-*` headers (see `rabbitmq::headers`).
#[derive(Debug, Clone, Deserialize)]
pub struct HeaderSettings {
    /// Any string; empty: a random key kept in MongoDB, shared by every
    /// worker and tool that uses the same database.
    pub signing_key: SecretString,
    /// Keys that signed before a rotation: accepted, never used to sign.
    pub previous_keys: Vec<SecretString>,
}

/// Where bot secrets may come from, and the keys that seal the stored ones
/// (see `crate::secrets`).
#[derive(Debug, Clone, Deserialize)]
pub struct SecretSettings {
    /// Key id -> base64 of a 32-byte AES-256-GCM key.
    pub keys: BTreeMap<String, SecretString>,
    /// The key id new seals use; empty: the only key of the ring.
    pub seal_with: String,
    pub accept_plaintext: bool,
    pub env_prefix: String,
    /// Empty: file references are refused.
    pub directory: String,
}

/// `herald gateway`, the messaging endpoint Teams sends its activities to
/// (docs/gateway.md).
#[derive(Debug, Clone, Deserialize)]
pub struct GatewaySettings {
    /// `host:port` it listens on (`POST /api/messages`, `/healthz`, `/metrics`).
    pub listen: String,
    /// The cloud (a key of `teams.clouds`) whose tokens it accepts.
    pub cloud: String,
    pub max_body_bytes: usize,
    /// Leeway on a token's validity times.
    pub clock_skew_secs: u64,
    /// The signing keys are fetched again after this long.
    pub key_refresh_hours: u64,
    /// At most this often when a token names a key not fetched yet.
    pub unknown_key_refresh_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpSettings {
    /// `host:port` of the health and metrics endpoint; empty disables it.
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSettings {
    /// The async runtime's threads: 1 runs the process on one thread (tokio's
    /// current-thread scheduler), 0 on one per CPU.
    pub threads: usize,
    /// Run the worker's threads under Linux's `SCHED_BATCH` policy (see
    /// `worker::sched`); elsewhere, and when the kernel refuses, it is ignored.
    pub batch_scheduling: bool,
    pub prefetch: u16,
    /// The most message bytes the work queue's consumer (the router, or
    /// every worker when `fleet.shards` is 0) may be sent at once, in MiB:
    /// its prefetch is this over `broker_max_message_bytes` (at most
    /// `prefetch`). Producers' bodies are unchecked until they arrive.
    pub intake_budget_mib: u64,
    /// The broker's `max_message_size`: the largest message RabbitMQ
    /// accepts, as configured there (`herald doctor` checks that it holds).
    pub broker_max_message_bytes: u64,
    pub concurrency: usize,
    pub shutdown_deadline_secs: u64,
    /// Attempts at a job that end without an outcome (the worker died or
    /// lost MongoDB mid-send, counted in its ledger record) before it is
    /// dead-lettered `delivery_limit_exceeded`.
    pub delivery_limit: u32,
    /// `x-delivery-limit` of the work queue and the shards: the broker's
    /// backstop for a job that kills workers before its claim. RabbitMQ
    /// before 4.3 counts every return, handovers between workers included.
    pub broker_delivery_limit: u32,
    pub resolution_cache_ttl_secs: u64,
    pub claim_lease_secs: u64,
    pub max_lane: usize,
}

/// The smallest `worker.broker_max_message_bytes`: a job at its limit with
/// its headers fits.
pub const MIN_BROKER_MESSAGE_BYTES: u64 = 512 * 1024;
/// RabbitMQ refuses a `max_message_size` above 512 MiB.
pub const MAX_BROKER_MESSAGE_BYTES: u64 = 512 << 20;

impl WorkerSettings {
    /// The prefetch of the work queue's consumer: as many of the broker's
    /// largest messages as `intake_budget_mib` holds, at most `prefetch`.
    pub fn intake_prefetch(&self) -> u16 {
        let fits = self.intake_budget_mib.saturating_mul(1 << 20) / self.broker_max_message_bytes.max(1);
        u16::try_from(fits).unwrap_or(u16::MAX).clamp(1, self.prefetch)
    }
}

/// How workers share the shard queues (docs/deploy.md, "Fleet-wide pacing").
#[derive(Debug, Clone, Deserialize)]
pub struct FleetSettings {
    /// Shard queues behind the work queue; 0: every worker consumes the work
    /// queue itself (no fleet-wide pacing, no order per conversation).
    pub shards: u16,
    /// How long a worker's hold on a shard (or the router) lasts without a
    /// heartbeat, by the MongoDB server's clock.
    pub lease_secs: u64,
    pub heartbeat_ms: u64,
}

impl FleetSettings {
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_secs)
    }
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct RetrySettings {
    pub quick_attempts: usize,
    pub quick_min_delay_ms: u64,
    pub quick_max_delay_ms: u64,
    pub max_in_process_wait_secs: u64,
    pub tiers_secs: Vec<u64>,
    pub max_hops: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TeamsSettings {
    pub token_refresh_margin_secs: u64,
    pub request_timeout_secs: u64,
    pub connect_timeout_secs: u64,
    pub insecure_loopback_hosts: Vec<String>,
    pub max_activity_bytes: usize,
    pub max_retry_after_secs: u64,
    pub rate_limits: RateLimitSettings,
    pub clouds: BTreeMap<String, CloudSettings>,
}

/// herald's own pacing by Teams' published limits.
#[derive(Debug, Clone, Deserialize)]
pub struct RateLimitSettings {
    pub enabled: bool,
    pub per_conversation: Vec<teams_limits::Window>,
    pub per_app_tenant: Vec<teams_limits::Window>,
    /// The windows of one Workflows webhook (each URL counted alone).
    pub per_workflow: Vec<teams_limits::Window>,
    pub max_in_process_wait_ms: u64,
    pub margin_ms: u64,
}

/// One Microsoft cloud: where tokens come from and where they may go.
#[derive(Debug, Clone, Deserialize)]
pub struct CloudSettings {
    pub token_endpoint: String,
    pub multi_tenant_authority: String,
    pub scope: String,
    pub service_hosts: Vec<String>,
    /// Hosts Workflows webhooks of this cloud may be on; an entry starting
    /// with `.` allows every host under that domain. Empty: no webhooks.
    #[serde(default)]
    pub workflow_hosts: Vec<String>,
    /// The OpenID metadata of the Bot Framework's tokens to bots (the
    /// messaging endpoint's keys), and their issuer.
    #[serde(default)]
    pub openid_metadata: String,
    #[serde(default)]
    pub token_issuer: String,
}

/// The cloud of an org_integration that names none.
pub const DEFAULT_CLOUD: &str = "public";

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub format: LogFormat,
    pub filter: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
    Auto,
}

impl Settings {
    /// Defaults, then `file` if given, then the `HERALD_` environment.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let mut figment = Figment::from(Toml::string(DEFAULTS));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        Self::from_figment(figment.merge(Env::prefixed("HERALD_").ignore(&["CONFIG"]).split("__")))
    }

    /// Settings from the defaults plus explicit overrides (tests, tools).
    pub fn from_figment(figment: Figment) -> Result<Self, SettingsError> {
        let settings: Settings = figment.extract().map_err(Box::new)?;
        settings.validate()?;
        Ok(settings)
    }

    /// The embedded defaults as a figment, to merge overrides onto.
    pub fn defaults() -> Figment {
        Figment::from(Toml::string(DEFAULTS))
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |key: &str, problem: String| Err(SettingsError::Invalid { key: key.to_owned(), problem });
        let organizations = &self.metrics.organizations;
        if organizations.len() > 50 {
            return invalid("metrics.organizations", format!("{} names; at most 50 (each is a label value)", organizations.len()));
        }
        if let Some(bad) =
            organizations.iter().find(|o| o.is_empty() || o.len() > 128 || o.chars().any(|c| c.is_control() || c == '"' || c == '\\'))
        {
            return invalid("metrics.organizations", format!("{bad:?}: 1 to 128 characters, no quotes, backslashes or control characters"));
        }
        let prefix_ok =
            !self.topology_prefix.is_empty() && self.topology_prefix.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !prefix_ok {
            return invalid(
                "topology_prefix",
                format!("{:?} must be non-empty ASCII letters, digits, '-', '_' or '.'", self.topology_prefix),
            );
        }
        let urls = amqp_urls(&self.amqp_url);
        if urls.is_empty() || urls.iter().any(|u| !u.starts_with("amqp://") && !u.starts_with("amqps://")) {
            return invalid("amqp_url", "each URL (several are separated by commas) must start with amqp:// or amqps://".into());
        }
        let tls = &self.amqp_tls;
        if tls.cert_file.is_empty() != tls.key_file.is_empty() {
            return invalid("amqp_tls.cert_file", "a client certificate needs both amqp_tls.cert_file and amqp_tls.key_file".into());
        }
        let tls_set = !tls.ca_file.is_empty() || !tls.cert_file.is_empty();
        if tls_set && !urls.iter().all(|u| u.starts_with("amqps://")) {
            return invalid("amqp_tls.ca_file", "amqp_tls.* apply to an amqps:// amqp_url only".into());
        }
        if !self.mongodb_uri.expose_secret().starts_with("mongodb://") && !self.mongodb_uri.expose_secret().starts_with("mongodb+srv://") {
            return invalid("mongodb_uri", "must start with mongodb:// or mongodb+srv://".into());
        }
        if self.mongodb_database.is_empty() || self.mongodb_database.contains(['/', '.', ' ', '"', '$']) {
            return invalid("mongodb_database", format!("{:?} is not a valid database name", self.mongodb_database));
        }
        if self.worker.prefetch == 0 {
            return invalid("worker.prefetch", "must be at least 1".into());
        }
        let largest = self.worker.broker_max_message_bytes;
        if !(MIN_BROKER_MESSAGE_BYTES..=MAX_BROKER_MESSAGE_BYTES).contains(&largest) {
            return invalid(
                "worker.broker_max_message_bytes",
                format!(
                    "{largest}: between {MIN_BROKER_MESSAGE_BYTES} (a job and its headers) and {MAX_BROKER_MESSAGE_BYTES} (RabbitMQ's own ceiling)"
                ),
            );
        }
        if self.worker.intake_budget_mib.saturating_mul(1 << 20) < largest {
            return invalid(
                "worker.intake_budget_mib",
                format!(
                    "{} MiB cannot hold one message of worker.broker_max_message_bytes ({largest} bytes)",
                    self.worker.intake_budget_mib
                ),
            );
        }
        if self.worker.threads > 1024 {
            return invalid("worker.threads", "must be at most 1024 (0: one per CPU)".into());
        }
        if self.worker.concurrency == 0 {
            return invalid("worker.concurrency", "must be at least 1".into());
        }
        if self.worker.max_lane == 0 {
            return invalid("worker.max_lane", "must be at least 1".into());
        }
        if self.fleet.shards > 1024 {
            return invalid("fleet.shards", "at most 1024".into());
        }
        if self.fleet.lease_secs < 2 || self.fleet.lease_secs > 600 {
            return invalid("fleet.lease_secs", "must be between 2 and 600".into());
        }
        if self.fleet.heartbeat_ms < 100 || self.fleet.heartbeat_ms.saturating_mul(2) > self.fleet.lease_secs * 1000 {
            return invalid("fleet.heartbeat_ms", "must be at least 100 and at most half of fleet.lease_secs".into());
        }
        if !(100..=600_000).contains(&self.mongodb_command_timeout_ms) {
            return invalid("mongodb_command_timeout_ms", "must be between 100 and 600000".into());
        }
        if self.retry.quick_attempts == 0 {
            return invalid("retry.quick_attempts", "must be at least 1 (the first try)".into());
        }
        if self.retry.tiers_secs.is_empty() || self.retry.tiers_secs.contains(&0) {
            return invalid("retry.tiers_secs", "needs at least one tier, each longer than 0 s".into());
        }
        if !self.retry.tiers_secs.is_sorted() {
            return invalid("retry.tiers_secs", "must be in ascending order".into());
        }
        for host in &self.teams.insecure_loopback_hosts {
            if !is_loopback(host) {
                return invalid(
                    "teams.insecure_loopback_hosts",
                    format!("{host:?} is not a loopback host; plain http is only for 127.0.0.0/8, ::1 and localhost"),
                );
            }
        }
        if !self.teams.clouds.contains_key(DEFAULT_CLOUD) {
            return invalid("teams.clouds", format!("the `{DEFAULT_CLOUD}` cloud must be configured"));
        }
        for (name, cloud) in &self.teams.clouds {
            let key = format!("teams.clouds.{name}.token_endpoint");
            match url::Url::parse(&cloud.token_endpoint) {
                Ok(url) if url.scheme() == "https" => {}
                Ok(url)
                    if url.scheme() == "http"
                        && url.host_str().is_some_and(|h| self.teams.insecure_loopback_hosts.iter().any(|l| l == h)) => {}
                Ok(_) => return invalid(&key, "must be https (http only for a host in teams.insecure_loopback_hosts)".into()),
                Err(err) => return invalid(&key, err.to_string()),
            }
            if cloud.service_hosts.is_empty() {
                return invalid(&format!("teams.clouds.{name}.service_hosts"), "needs at least one host".into());
            }
        }
        if self.headers.previous_keys.iter().any(|key| key.expose_secret().is_empty()) {
            return invalid("headers.previous_keys", "an empty key: remove it".into());
        }
        crate::secrets::Keyring::from_settings(&self.secrets)
            .map_err(|err| SettingsError::Invalid { key: "secrets.keys".into(), problem: err.to_string() })?;
        let prefix = &self.secrets.env_prefix;
        if prefix.is_empty() || prefix.len() > 64 || !prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return invalid("secrets.env_prefix", format!("{prefix:?}: 1 to 64 ASCII letters, digits or '_'"));
        }
        if prefix.to_ascii_uppercase().starts_with("HERALD_") {
            return invalid("secrets.env_prefix", format!("{prefix:?} is under HERALD_, the settings' own variables"));
        }
        let directory = &self.secrets.directory;
        if !directory.is_empty() && (!directory.starts_with('/') || directory.split('/').any(|part| part == ".." || part == ".")) {
            return invalid("secrets.directory", format!("{directory:?} must be an absolute path without '.' or '..' (or empty)"));
        }
        if !self.http.listen.is_empty() && self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid("http.listen", format!("{:?} is not host:port (or empty to disable)", self.http.listen));
        }
        let windows = self.teams.rate_limits.per_conversation.iter().chain(&self.teams.rate_limits.per_app_tenant);
        if windows.clone().any(|w| w.limit == 0 || w.per_secs == 0) {
            return invalid("teams.rate_limits", "every window needs a limit and a duration above 0".into());
        }
        if self.teams.request_timeout_secs == 0 || self.teams.request_timeout_secs > 300 {
            return invalid("teams.request_timeout_secs", "must be between 1 and 300".into());
        }
        let least = 2 * self.teams.request_timeout_secs + LEASE_MARGIN.as_secs() + 1;
        if self.worker.claim_lease_secs < least || self.worker.claim_lease_secs > 24 * 3600 {
            return invalid(
                "worker.claim_lease_secs",
                format!("must be at least {least} (two requests of teams.request_timeout_secs plus a margin) and at most a day"),
            );
        }
        if self.retry.max_in_process_wait_secs > 3600 || self.teams.max_retry_after_secs > 7 * 24 * 3600 {
            return invalid("retry.max_in_process_wait_secs", "waits are capped at an hour in process and a week in a tier".into());
        }
        Ok(())
    }

    pub fn retry_tiers(&self) -> Vec<Duration> {
        self.retry.tiers_secs.iter().map(|s| Duration::from_secs(*s)).collect()
    }

    pub fn mongodb_command_timeout(&self) -> Duration {
        Duration::from_millis(self.mongodb_command_timeout_ms)
    }

    pub fn resolution_ttl(&self) -> Duration {
        Duration::from_secs(self.worker.resolution_cache_ttl_secs)
    }

    /// How long a claim keeps other deliveries of the job away, from the
    /// server's clock. A delivery finishes everything it does after the claim
    /// (token, chat creation, pacing, attempts and their waits) within it,
    /// less `LEASE_MARGIN` for recording the outcome.
    pub fn claim_lease(&self) -> Duration {
        Duration::from_secs(self.worker.claim_lease_secs)
    }

    pub fn shutdown_deadline(&self) -> Duration {
        Duration::from_secs(self.worker.shutdown_deadline_secs)
    }
}

/// Part of the claim lease kept for recording a delivery's outcome after its
/// last request (see `Settings::claim_lease`).
pub const LEASE_MARGIN: Duration = Duration::from_secs(5);

/// `host` names the loopback interface.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A URL with its password replaced, for messages and `herald doctor`.
/// The broker URLs of `amqp_url`: one, or several separated by commas (the
/// nodes of a cluster).
pub fn amqp_urls(url: &SecretString) -> Vec<&str> {
    url.expose_secret().split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
}

/// Every URL of `amqp_url`, each with its password replaced (comma-separated).
pub fn redact_urls(url: &SecretString) -> String {
    amqp_urls(url).into_iter().map(|u| redact_url(&SecretString::from(u.to_owned()))).collect::<Vec<_>>().join(",")
}

pub fn redact_url(url: &SecretString) -> String {
    match url::Url::parse(url.expose_secret()) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparseable URL>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    fn with(key: &str, value: impl serde::Serialize) -> Result<Settings, SettingsError> {
        Settings::from_figment(Settings::defaults().merge(Serialized::default(key, value)))
    }

    #[test]
    fn the_work_queue_prefetch_is_what_the_intake_budget_holds_of_the_largest_message() {
        let worker = Settings::from_figment(Settings::defaults()).unwrap().worker;
        assert_eq!(worker.intake_prefetch(), 16, "256 MiB of 16 MiB messages");
        let small = with("worker.broker_max_message_bytes", 1 << 20).unwrap().worker;
        assert_eq!(small.intake_prefetch(), 256);
        let tiny = with("worker.broker_max_message_bytes", 512 * 1024).unwrap().worker;
        assert_eq!(tiny.intake_prefetch(), 512, "never above worker.prefetch");
        let err = with("worker.broker_max_message_bytes", 512 << 20).unwrap_err().to_string();
        assert!(err.contains("worker.intake_budget_mib") && err.contains("cannot hold one message"), "{err}");
        let err = with("worker.broker_max_message_bytes", 1024).unwrap_err().to_string();
        assert!(err.contains("worker.broker_max_message_bytes"), "{err}");
    }

    #[test]
    fn the_embedded_defaults_are_valid() {
        let settings = Settings::from_figment(Settings::defaults()).unwrap();
        assert_eq!(settings.topology_prefix, "herald");
        assert_eq!(settings.mongodb_database, "herald");
        assert_eq!(settings.retry_tiers()[0], Duration::from_secs(5));
        let clouds: Vec<&str> = settings.teams.clouds.keys().map(String::as_str).collect();
        assert_eq!(clouds, ["dod", "gcc", "gcch", "public"]);
        assert_eq!(settings.teams.clouds["gcch"].service_hosts, ["smba.infra.gov.teams.microsoft.us"]);
    }

    #[test]
    fn errors_name_the_bad_setting() {
        let err = with("worker.prefetch", 0).unwrap_err().to_string();
        assert!(err.contains("worker.prefetch"), "{err}");
        let err = with("retry.tiers_secs", [30, 5]).unwrap_err().to_string();
        assert!(err.contains("retry.tiers_secs") && err.contains("ascending"), "{err}");
        let err = with("teams.insecure_loopback_hosts", ["example.com"]).unwrap_err().to_string();
        assert!(err.contains("insecure_loopback_hosts"), "{err}");
        let err = with("fleet.heartbeat_ms", u64::MAX).unwrap_err().to_string();
        assert!(err.contains("fleet.heartbeat_ms"), "refused, not overflowed: {err}");
        let err = with("worker.threads", 5000).unwrap_err().to_string();
        assert!(err.contains("worker.threads"), "{err}");
        let err = with("worker.concurrency", "many").unwrap_err().to_string();
        assert!(err.contains("worker.concurrency"), "{err}");
        let err = with("teams.clouds.gcch.token_endpoint", "http://login.example.com").unwrap_err().to_string();
        assert!(err.contains("teams.clouds.gcch.token_endpoint"), "{err}");
    }

    #[test]
    fn several_broker_urls_are_each_checked_and_each_redacted() {
        let settings = with("amqp_url", "amqp://u:p1@rmq-0:5672/%2f, amqp://u:p2@rmq-1:5672/%2f").unwrap();
        assert_eq!(amqp_urls(&settings.amqp_url), ["amqp://u:p1@rmq-0:5672/%2f", "amqp://u:p2@rmq-1:5672/%2f"]);
        assert_eq!(redact_urls(&settings.amqp_url), "amqp://u:***@rmq-0:5672/%2f,amqp://u:***@rmq-1:5672/%2f");
        assert!(with("amqp_url", "amqp://rmq-0:5672/%2f,http://rmq-1").is_err());
        assert!(with("amqp_url", " , ").is_err());
    }

    #[test]
    fn secrets_are_not_in_debug_output_and_urls_are_redacted() {
        let settings = with("amqp_url", "amqp://user:hunter2@rabbit:5672/%2f").unwrap();
        assert!(!format!("{settings:?}").contains("hunter2"));
        assert_eq!(redact_url(&settings.amqp_url), "amqp://user:***@rabbit:5672/%2f");
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback("127.0.0.1") && is_loopback("localhost") && is_loopback("[::1]") && is_loopback("127.9.9.9"));
        assert!(!is_loopback("10.0.0.1") && !is_loopback("example.com"));
    }
}
