//! The worker: a pure-ish step `Pipeline::process(message) -> Disposition`,
//! and a thin loop (`run`) that consumes, settles and shuts down cleanly.
//!
//! Only the worker knows every adapter (RabbitMQ, MongoDB, Teams).

pub mod cache;
pub mod resolve;
pub mod run;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::BasicProperties;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

pub use run::{Worker, run};

use crate::job::{Job, JobId};
use crate::metrics::Metrics;
use crate::mongo::{Claim, Store};
use crate::outcome::{DeliveryError, Reason, Verdict, classify, quarantines};
use crate::rabbitmq::headers;
use crate::settings::Settings;
use crate::teams::{Destination, Teams, card};
use resolve::Resolver;

/// A message taken from the work queue, independent of the broker client.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    pub redelivered: bool,
}

impl Incoming {
    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }
    /// Send attempts made before this delivery.
    pub fn attempts(&self) -> u32 {
        headers::get_u32(self.headers(), headers::ATTEMPTS).unwrap_or(0)
    }
    /// Delayed retries taken before this delivery.
    pub fn hops(&self) -> u32 {
        headers::get_u32(self.headers(), headers::HOPS).unwrap_or(0)
    }
    pub fn message_id(&self) -> Option<String> {
        self.properties.message_id().as_ref().map(|id| id.to_string())
    }
}

/// Why a job was not delivered, with everything the dead-letter headers need.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub reason: Reason,
    pub error: String,
    pub http_status: Option<u16>,
    pub teams_code: Option<String>,
    pub correlation_id: Option<String>,
    /// For a retry: how long Teams asked to wait.
    pub retry_after: Option<Duration>,
    /// Send attempts made while processing this delivery.
    pub attempts: u32,
    pub job_id: Option<JobId>,
    pub organization_id: Option<String>,
    pub org_integration_id: Option<String>,
}

/// The outcome of processing one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    Delivered {
        activity_id: String,
        conversation_id: String,
        attempts: u32,
    },
    /// The ledger says it was sent already: ack without a second post.
    AlreadySent,
    Retry(Failure),
    DeadLetter(Failure),
}

/// The error with its causes, for `x-herald-error` and logs.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// What the worker knows about one job while it processes it.
#[derive(Default)]
struct Progress {
    attempts: AtomicU32,
    org_integration_id: std::sync::Mutex<Option<String>>,
    conversation_id: std::sync::Mutex<Option<String>>,
}

impl Progress {
    fn set_integration(&self, id: &str) {
        *self.org_integration_id.lock().unwrap_or_else(|p| p.into_inner()) = Some(id.to_owned());
    }
    fn set_conversation(&self, id: &str) {
        *self.conversation_id.lock().unwrap_or_else(|p| p.into_inner()) = Some(id.to_owned());
    }
    fn integration(&self) -> Option<String> {
        self.org_integration_id.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn conversation(&self) -> Option<String> {
        self.conversation_id.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// herald's own pacing by Teams' published limits (see `ratelimit`).
struct Pacing {
    windows: std::sync::Mutex<crate::ratelimit::Throttle>,
    max_wait: Duration,
    /// Jobs sleeping on the limit right now, and how many may.
    waiting: std::sync::atomic::AtomicUsize,
    max_waiting: usize,
}

impl Pacing {
    fn new(settings: &Settings) -> Self {
        let limits = &settings.teams.rate_limits;
        let windows =
            crate::ratelimit::Limits { per_conversation: limits.per_conversation.clone(), per_app_tenant: limits.per_app_tenant.clone() };
        Self {
            windows: std::sync::Mutex::new(
                crate::ratelimit::Throttle::new(true, windows).with_margin(Duration::from_millis(limits.margin_ms)),
            ),
            max_wait: Duration::from_millis(limits.max_in_process_wait_ms),
            waiting: Default::default(),
            max_waiting: (settings.worker.concurrency / 4).max(1),
        }
    }

    /// Wait for room in every window of this bot, tenant and conversation, or
    /// say how long that would take when it is too long to hold a slot for.
    async fn admit(&self, app: &str, tenant: &str, conversation: &str, shutdown: &CancellationToken) -> Result<(), DeliveryError> {
        loop {
            let verdict =
                self.windows.lock().unwrap_or_else(|p| p.into_inner()).admit(app, tenant, conversation, std::time::Instant::now());
            let wait = match verdict {
                Ok(()) => return Ok(()),
                Err(wait) => wait,
            };
            let claimed = self.waiting.fetch_add(1, Ordering::Relaxed) < self.max_waiting;
            let _release = WaitSlot(&self.waiting);
            if !claimed || wait > self.max_wait || shutdown.is_cancelled() {
                return Err(DeliveryError::RateLimited(wait));
            }
            tokio::time::sleep(wait).await;
        }
    }
}

struct WaitSlot<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for WaitSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Everything `process` needs; shared by the worker's tasks.
pub struct Pipeline {
    pub store: Store,
    pub teams: Teams,
    pub resolver: Resolver,
    pub metrics: Metrics,
    pacing: Option<Pacing>,
    quick: ExponentialBuilder,
    max_in_process_wait: Duration,
    shutdown: CancellationToken,
}

impl Pipeline {
    pub fn new(settings: &Settings, store: Store, teams: Teams, shutdown: CancellationToken) -> Self {
        let retry = &settings.retry;
        let quick = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(retry.quick_min_delay_ms))
            .with_max_delay(Duration::from_millis(retry.quick_max_delay_ms))
            .with_max_times(retry.quick_attempts.saturating_sub(1))
            .with_jitter();
        Self {
            store,
            teams,
            resolver: Resolver::new(settings.resolution_ttl()),
            metrics: Metrics::default(),
            pacing: settings.teams.rate_limits.enabled.then(|| Pacing::new(settings)),
            quick,
            max_in_process_wait: Duration::from_secs(retry.max_in_process_wait_secs),
            shutdown,
        }
    }

    /// Decide what happens to one message. Never panics on bad input; never
    /// touches the broker (the caller settles the disposition).
    pub async fn process(&self, message: &Incoming) -> Disposition {
        let job = match Job::decode(&message.body) {
            Ok(job) => job,
            Err(invalid) => {
                let err = DeliveryError::Invalid(invalid);
                let Verdict::DeadLetter(reason) = classify(&err, self.max_in_process_wait) else {
                    unreachable!("an invalid job is never retried")
                };
                warn!(reason = %reason, message_id = message.message_id().as_deref(), error = %err, "job refused");
                return Disposition::DeadLetter(Failure {
                    reason,
                    error: error_chain(&err),
                    http_status: None,
                    teams_code: None,
                    correlation_id: None,
                    retry_after: None,
                    attempts: 0,
                    job_id: None,
                    organization_id: Job::peek_organization(&message.body),
                    org_integration_id: None,
                });
            }
        };
        let span = info_span!(
            "job",
            otel.name = "msteams process",
            otel.kind = "consumer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "process",
            messaging.destination.name = "msteams",
            messaging.message.id = %job.id,
            job_id = %job.id,
            organization_id = %job.organization_id,
            attempt = message.attempts() + 1,
            trace_id = tracing::field::Empty,
        );
        let traceparent = headers::get_str(message.headers(), headers::TRACEPARENT);
        if let Some(trace_id) = crate::telemetry::continue_trace(&span, traceparent.as_deref()) {
            span.record("trace_id", trace_id);
        }
        self.process_job(&job, message).instrument(span).await
    }

    async fn process_job(&self, job: &Job, message: &Incoming) -> Disposition {
        let progress = Progress::default();
        match self.deliver(job, &progress).await {
            Ok(Some((activity_id, conversation_id))) => {
                Disposition::Delivered { activity_id, conversation_id, attempts: progress.attempts.load(Ordering::Relaxed) }
            }
            Ok(None) => {
                info!(redelivered = message.redelivered, "job was already sent; acking without a second post");
                Disposition::AlreadySent
            }
            Err(err) => self.failure(job, &progress, err).await,
        }
    }

    /// Deliver the job: `Some((activity id, conversation id))`, or `None` when
    /// the ledger says it was sent before.
    async fn deliver(&self, job: &Job, progress: &Progress) -> Result<Option<(String, String)>, DeliveryError> {
        if let Some(expires_at) = job.expires_at
            && expires_at <= chrono::Utc::now()
        {
            return Err(DeliveryError::Expired(expires_at));
        }
        let claim = (|| self.store.claim(job.id, &job.organization_id, &job.integration_id))
            .retry(self.quick)
            .when(|err| err.is_transient() && !self.shutdown.is_cancelled())
            .await?;
        match claim {
            Claim::AlreadySent => return Ok(None),
            Claim::InProgress => return Err(DeliveryError::InProgress),
            Claim::Fresh => {}
        }
        let integration = self.resolver.org_integration(&self.store, &self.teams, job).await?;
        progress.set_integration(&integration.id);
        // Checked before any request (the recipient lookup may create a chat).
        let service_url = self.teams.check_service_url(&integration.bot, &integration.service_url)?;
        let recipient = self.resolver.recipient(&self.store, &self.teams, job, &integration).await?;
        progress.set_conversation(&recipient.conversation_id);
        if let Some(stale) = &recipient.corrected_from {
            self.metrics.recipient_corrected();
            warn!(
                stale_conversation_id = %stale,
                conversation_id = %recipient.conversation_id,
                user_id = job.recipient.user_id.as_ref().map(|u| u.as_str()),
                "stale recipient corrected to the user's conversation in this organization"
            );
        }
        let body = self.teams.encode(&card::activity(&job.content))?;
        let destination = Destination { service_url: &service_url, conversation_id: &recipient.conversation_id, bot: &integration.bot };
        let send = || async {
            if let Some(pacing) = &self.pacing {
                pacing.admit(&integration.bot.app_id, &integration.tenant_id, &recipient.conversation_id, &self.shutdown).await?;
            }
            let attempt = progress.attempts.fetch_add(1, Ordering::Relaxed) + 1;
            let started = std::time::Instant::now();
            let result = self.teams.send(&destination, &body).await;
            let status = match &result {
                Ok(_) => Some(201),
                Err(err) => err.http_status(),
            };
            self.metrics.teams_request(status, started.elapsed());
            match &result {
                Ok(sent) => info!(
                    attempt, org_integration_id = %integration.id, bot_app_id = %integration.bot.app_id,
                    tenant_id = %integration.tenant_id, conversation_id = %recipient.conversation_id,
                    activity_id = %sent.activity_id, "delivered"
                ),
                Err(err) => warn!(
                    attempt, org_integration_id = %integration.id, bot_app_id = %integration.bot.app_id,
                    tenant_id = %integration.tenant_id, conversation_id = %recipient.conversation_id,
                    http_status = err.http_status(), teams_code = err.code(), error = %error_chain(err), "send failed"
                ),
            }
            result.map_err(DeliveryError::from)
        };
        let wait = self.max_in_process_wait;
        let sent = send
            .retry(self.quick)
            .when(|err| matches!(classify(err, wait), Verdict::Retry { quick: true, .. }) && !self.shutdown.is_cancelled())
            .adjust(|err, backoff| match classify(err, wait) {
                // Teams said how long to wait: wait that long, not the backoff.
                Verdict::Retry { after: Some(after), .. } => backoff.map(|_| after),
                _ => backoff,
            })
            .await?;
        let mark =
            || self.store.mark_sent(job.id, &recipient.conversation_id, &sent.activity_id, progress.attempts.load(Ordering::Relaxed));
        if let Err(err) = mark.retry(self.quick).when(|err| err.is_transient()).await {
            // Delivered all the same: ack it (nothing redelivers it). The
            // record stays `sending` until its lease runs out.
            warn!(error = %error_chain(&err), "delivered, but the ledger could not record it");
        }
        Ok(Some((sent.activity_id, recipient.conversation_id)))
    }

    async fn failure(&self, job: &Job, progress: &Progress, err: DeliveryError) -> Disposition {
        let (reason, retry_after, retry) = match classify(&err, self.max_in_process_wait) {
            Verdict::DeadLetter(reason) => (reason, None, false),
            Verdict::Retry { reason, after, .. } => (reason, after, true),
        };
        let (http_status, teams_code, correlation_id) = match &err {
            DeliveryError::Teams(teams) => {
                (teams.http_status(), teams.code().map(str::to_owned), teams.correlation_id().map(str::to_owned))
            }
            _ => (None, None, None),
        };
        if quarantines(&err)
            && let Some(conversation) = progress.conversation()
        {
            let (org, integration) = (job.organization_id.as_str(), job.integration_id.as_str());
            match self.store.quarantine(org, integration, &conversation, reason.as_str(), teams_code.as_deref()).await {
                Ok(_) => {
                    self.metrics.conversation_quarantined();
                    warn!(%conversation, org_integration_id = progress.integration(), teams_code = teams_code.as_deref(), "conversation quarantined for this org_integration");
                    self.resolver.forget_conversation(job, &conversation);
                }
                Err(store_err) => {
                    warn!(error = %error_chain(&store_err), "could not quarantine the conversation")
                }
            }
        }
        let failure = Failure {
            reason,
            error: error_chain(&err),
            http_status,
            teams_code,
            correlation_id,
            retry_after,
            attempts: progress.attempts.load(Ordering::Relaxed),
            job_id: Some(job.id),
            organization_id: Some(job.organization_id.to_string()),
            org_integration_id: progress.integration(),
        };
        if retry { Disposition::Retry(failure) } else { Disposition::DeadLetter(failure) }
    }
}
