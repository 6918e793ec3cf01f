//! The step: `Pipeline::process(incoming) -> Disposition`, the one place
//! where a job's outcome is decided. It never touches the broker; tests drive
//! it directly against the real MongoDB-protocol server and teams-sim.
//!
//! Order: decode → expiry → resolve the org_integration and the recipient →
//! pace (no claim, no slot held while waiting) → take a slot → claim the
//! ledger record → wait for the previous job of the lane to have posted →
//! send (quick retries) → record → classify the error once → decide (retry
//! budget included).

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::lanes::Handoff;
use super::pacing::{Paced, Pacing};
use super::resolve::{OrgIntegration, Resolver, Via, WORKFLOW_SENDER};
use super::{Acked, Disposition, Failure, History, Incoming};
use crate::job::{self, Job};
use crate::metrics::{JobOutcome, Metrics};
use crate::mongo::{AttemptRecord, Claim, DeliveryState, Lease, Store, StoreError};
use crate::outcome::{DeliveryError, Reason, Verdict, classify, quarantines, retry_tier};
use crate::settings::{LEASE_MARGIN, Settings};
use crate::teams::{Destination, Sent, Teams, card};
use crate::text::{self, error_chain};

/// The retry policy, from the settings.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub quick_attempts: usize,
    pub quick: ExponentialBuilder,
    pub max_in_process_wait: Duration,
    pub tiers: Vec<Duration>,
    pub max_hops: u32,
    /// Attempts that ended without an outcome (the worker died or lost
    /// MongoDB mid-send) before the job is dead-lettered
    /// `delivery_limit_exceeded` (`worker.delivery_limit`).
    pub crash_limit: u32,
}

impl RetryPolicy {
    pub fn from_settings(settings: &Settings) -> Self {
        let retry = &settings.retry;
        Self {
            quick_attempts: retry.quick_attempts.max(1),
            quick: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(retry.quick_min_delay_ms))
                .with_max_delay(Duration::from_millis(retry.quick_max_delay_ms))
                .without_max_times()
                .with_jitter(),
            max_in_process_wait: Duration::from_secs(retry.max_in_process_wait_secs),
            tiers: settings.retry_tiers(),
            max_hops: retry.max_hops,
            crash_limit: settings.worker.delivery_limit,
        }
    }
}

/// What a classified failure comes to, given the job's history: pure, so
/// that the retry budget is part of the decision and unit-tested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Retry {
        tier: Duration,
        reason: Reason,
        hops: u32,
    },
    DeadLetter {
        reason: Reason,
    },
    /// `retries_exhausted`: `last` failed again after `hops` delayed retries.
    Exhausted {
        last: Reason,
        hops: u32,
    },
}

pub fn decide(verdict: Verdict, hops: u32, policy: &RetryPolicy) -> Decision {
    match verdict {
        Verdict::DeadLetter(reason) => Decision::DeadLetter { reason },
        Verdict::Retry { reason, after, .. } => {
            let counts = reason.consumes_retry_budget();
            if counts && hops >= policy.max_hops {
                return Decision::Exhausted { last: reason, hops };
            }
            let tier = retry_tier(hops, after, &policy.tiers);
            Decision::Retry { tier, reason, hops: hops.saturating_add(u32::from(counts)) }
        }
    }
}

/// What happened during this delivery, for the record and the headers.
#[derive(Debug, Default)]
struct Attempt {
    lease: Option<Lease>,
    org_integration_id: Option<String>,
    bot_app_id: Option<String>,
    conversation_id: Option<String>,
    /// Connector requests made to post the activity.
    sends: u32,
    /// When the claim was taken.
    started: Option<Instant>,
    /// Each Connector request of this delivery (the ledger keeps the newest `MAX_HISTORY`).
    requests: Vec<Request>,
}

/// One Connector request, for the ledger's history.
#[derive(Debug)]
struct Request {
    at: mongodb::bson::DateTime,
    http_status: Option<u16>,
    teams_code: Option<String>,
    duration: Duration,
}

impl Attempt {
    /// This delivery as the ledger's history keeps it: each request retried
    /// in process, then how the delivery ended (outcome, reason, duration).
    fn record(&self, outcome: &str, failure: Option<&Failure>) -> Vec<AttemptRecord> {
        let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let entry = |at, outcome: &str, http_status: Option<u16>, teams_code: Option<String>, duration| AttemptRecord {
            at,
            outcome: outcome.to_owned(),
            reason: None,
            http_status: http_status.map(i32::from),
            teams_code,
            bot_app_id: self.bot_app_id.clone(),
            conversation_id: self.conversation_id.clone(),
            sends: 1,
            duration_ms: millis(duration),
        };
        let retried = self.requests.len().saturating_sub(1);
        let mut records: Vec<AttemptRecord> = self.requests[..retried]
            .iter()
            .map(|r| AttemptRecord {
                reason: Some("retried_in_process".into()),
                ..entry(r.at, "retrying", r.http_status, r.teams_code.clone(), r.duration)
            })
            .collect();
        let last = self.requests.last();
        records.push(AttemptRecord {
            reason: failure.map(|f| f.reason.as_str().to_owned()),
            sends: i64::from(u32::from(last.is_some())),
            ..entry(
                mongodb::bson::DateTime::now(),
                outcome,
                failure.and_then(|f| f.http_status).or(last.and_then(|r| r.http_status)),
                failure.and_then(|f| f.teams_code.clone()),
                self.started.map_or(Duration::ZERO, |s| s.elapsed()),
            )
        });
        records
    }
}

/// How the delivery ended when nothing failed.
enum Done {
    Sent {
        sent: Sent,
        conversation_id: String,
    },
    AlreadySent,
    AlreadyUnconfirmed,
    /// Stopped before the claim (the worker gave up the job's queue): the
    /// job goes back to its queue untouched.
    Yielded,
}

/// A job resolved and admitted by the pacing, ready to claim and send.
struct Ready {
    integration: Arc<OrgIntegration>,
    /// The checked service URL of a bot; a webhook's URL is its own.
    service_url: Option<url::Url>,
    conversation_id: String,
    /// Teams' windows made it wait.
    paced: bool,
}

/// Why a job is not ready to send.
enum Prepared {
    Failed(DeliveryError),
    Stopped,
}

impl From<DeliveryError> for Prepared {
    fn from(err: DeliveryError) -> Self {
        Self::Failed(err)
    }
}

/// Everything `process` needs; shared by the worker's tasks.
pub struct Pipeline {
    pub store: Store,
    pub teams: Teams,
    pub resolver: Resolver,
    pub metrics: Arc<Metrics>,
    pacing: Option<Pacing>,
    /// Workflows webhooks' pacing (`teams.rate_limits.per_workflow`).
    workflow_pacing: Option<Pacing>,
    /// Jobs between their claim and their outcome at once (`worker.concurrency`).
    slots: Semaphore,
    policy: RetryPolicy,
    shutdown: CancellationToken,
}

impl Pipeline {
    pub fn new(settings: &Settings, store: Store, teams: Teams, metrics: Arc<Metrics>, shutdown: CancellationToken) -> Self {
        Self {
            store,
            teams,
            resolver: Resolver::new(
                settings.resolution_ttl(),
                crate::secrets::Secrets::new(&settings.secrets).expect("secrets.* are checked with the settings"),
            ),
            metrics,
            pacing: settings.teams.rate_limits.enabled.then(|| Pacing::new(settings)),
            workflow_pacing: settings.teams.rate_limits.enabled.then(|| Pacing::for_workflows(settings)),
            slots: Semaphore::new(settings.worker.concurrency),
            policy: RetryPolicy::from_settings(settings),
            shutdown,
        }
    }

    /// herald's own pacing, when on.
    pub(super) fn pacing(&self) -> Option<&Pacing> {
        self.pacing.as_ref()
    }

    /// Conversations and tenants the pacing tracks right now.
    pub fn paced_keys(&self) -> usize {
        self.pacing.as_ref().map_or(0, Pacing::tracked)
    }

    /// Give back what idle keys hold: expired resolutions and tokens, pacing
    /// windows that have passed.
    pub fn sweep(&self) {
        self.resolver.sweep();
        for pacing in self.pacing.iter().chain(&self.workflow_pacing) {
            pacing.sweep();
        }
        self.teams.sweep_tokens();
    }

    /// Decide what happens to one message. Never touches the broker; never
    /// panics on bad input.
    pub async fn process(&self, incoming: &Incoming) -> Disposition {
        self.process_until(incoming, None, &CancellationToken::new(), &Handoff::default()).await
    }

    /// A job turned away because its lane is full: a delayed retry
    /// (`rate_limited`, no budget used), without touching the ledger.
    pub fn lane_full(&self, incoming: &Incoming) -> Disposition {
        let tier = retry_tier(incoming.history.hops, None, &self.policy.tiers);
        let failure = Failure {
            reason: Reason::RateLimited,
            error: "too many jobs of this conversation are waiting in this worker (worker.max_lane)".into(),
            http_status: None,
            teams_code: None,
            correlation_id: None,
            organization_id: Job::peek_organization(&incoming.body).map(|o| text::clip(&o, 256)),
            org_integration_id: None,
        };
        Disposition::Retry { tier, history: incoming.history, failure }
    }

    /// `process`, unless `stop` comes while the job waits for its turn before
    /// its claim: then `Disposition::GiveBack`. `lane` orders the job's post
    /// after the previous one of its lane, and lets the next one claim once
    /// this one's request is counted and send once its post is made.
    /// `decoded` is `incoming`'s body decoded already, if it was.
    pub async fn process_until(&self, incoming: &Incoming, decoded: Option<Job>, stop: &CancellationToken, lane: &Handoff) -> Disposition {
        let checked = job::check_properties(incoming.content_type.as_deref(), incoming.content_encoding.as_deref());
        let job = match checked.and_then(|()| decoded.map_or_else(|| Job::decode(&incoming.body), Ok)) {
            Ok(job) => job,
            Err(invalid) => {
                let err = DeliveryError::Invalid(invalid);
                warn!(message_id = incoming.message_id.as_deref(), error = %error_chain(&err), "job refused");
                let organization_id = Job::peek_organization(&incoming.body).map(|o| text::clip(&o, 256));
                return self.conclude(None, incoming.history, Attempt::default(), organization_id, Err(err)).await;
            }
        };
        #[cfg(feature = "fault-injection")]
        if matches!(&job.content, crate::job::Content::Message(m) if m.title == "herald-fault: panic") {
            panic!("fault injection: a panic while processing job {}", job.id);
        }
        let span = info_span!(
            "job",
            otel.name = "msteams process",
            otel.kind = "consumer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "process",
            messaging.destination.name = "msteams",
            messaging.message.id = %job.id,
            job_id = %job.id,
            organization_id = %text::clip(job.organization_id.as_str(), 256),
            attempt = incoming.history.attempts.saturating_add(1),
            trace_id = tracing::field::Empty,
        );
        if let Some(trace_id) = crate::telemetry::continue_trace(&span, incoming.traceparent.as_deref()) {
            span.record("trace_id", trace_id);
        }
        if let Ok(age) = (chrono::Utc::now() - job.created_at).to_std() {
            self.metrics.job_age(age);
        }
        async {
            let mut attempt = Attempt::default();
            let result = self.deliver(&job, &mut attempt, stop, lane).await;
            let organization_id = Some(job.organization_id.to_string());
            let disposition = self.conclude(Some(&job), incoming.history, attempt, organization_id, result).await;
            let outcome = match &disposition {
                Disposition::GiveBack => return disposition,
                Disposition::Ack(Acked::Delivered { .. }) => JobOutcome::Delivered,
                Disposition::Ack(_) => JobOutcome::AlreadySent,
                Disposition::Retry { .. } => JobOutcome::Retried,
                Disposition::DeadLetter { .. } => JobOutcome::DeadLettered,
            };
            self.metrics.organization_outcome(Some(job.organization_id.as_str()), outcome);
            disposition
        }
        .instrument(span)
        .await
    }

    async fn deliver(&self, job: &Job, attempt: &mut Attempt, stop: &CancellationToken, lane: &Handoff) -> Result<Done, DeliveryError> {
        if let Some(expires_at) = job.expires_at
            && expires_at <= chrono::Utc::now()
        {
            return Err(DeliveryError::Expired(expires_at));
        }
        // Resolve and wait for Teams' limits before the claim: a job waiting
        // for its turn holds neither a claim nor a concurrency slot, and a
        // worker giving up its shard can hand it back untouched.
        let ready = match self.prepare(job, attempt, stop).await {
            Err(Prepared::Stopped) => return Ok(Done::Yielded),
            Err(Prepared::Failed(err)) => Err(err),
            Ok(ready) => Ok(ready),
        };
        // A job of a busy conversation (it waited for Teams' windows, or jobs
        // of its conversation wait behind it) takes no slot: its conversation
        // goes at Teams' pace one job at a time, and queueing each of its jobs
        // behind a backlog of other conversations' jobs would cut that pace
        // to a fraction. At most two jobs per conversation are past their
        // lane's turn at a time (one posting, the next claiming beside it),
        // so these are bounded by the lanes.
        let busy = lane.backlog() || ready.as_ref().is_ok_and(|r| r.paced);
        let slot = if busy { None } else { Some(self.slots.acquire().await.expect("the slots are never closed")) };
        // The deadline starts before the claim is sent, so it ends before the
        // lease the server computes from its own clock. Every outcome,
        // failures included, is decided under the claim: a job already sent
        // is acked whatever its org_integration says now.
        let claimed_at = Instant::now();
        let lease = match self.with_quick_retries(|| self.store.claim(job.id, &job.organization_id, &job.integration_id)).await? {
            Claim::Fresh(lease) => lease,
            Claim::AlreadySent => return Ok(Done::AlreadySent),
            Claim::Unconfirmed => return Ok(Done::AlreadyUnconfirmed),
            Claim::InProgress => return Err(DeliveryError::InProgress),
        };
        let crashed = lease.taken_over.then_some(lease.takeovers);
        attempt.lease = Some(lease);
        attempt.started = Some(claimed_at);
        if let Some(takeovers) = crashed {
            self.metrics.lease_taken_over();
            // herald counts the attempts that crashed, not the broker: on
            // RabbitMQ before 4.3 every return counts, handovers included.
            if takeovers >= self.policy.crash_limit {
                return Err(DeliveryError::CrashedTooOften(takeovers));
            }
            warn!(job_id = %job.id, takeovers, "another delivery's claim on this job ran out mid-send; sending again (it may have been posted already)");
        }
        let until = claimed_at + self.store.claim_lease().saturating_sub(LEASE_MARGIN);
        let Ready { integration, service_url, conversation_id, .. } = ready?;
        let body = self.teams.encode(&card::activity(&job.content))?;
        // The claim above ran beside the previous job's post; the post waits
        // for it (the previous job is counted, so this is short).
        lane.previous_posted().await;
        let sent = self.send(&integration, service_url.as_ref(), &conversation_id, &body, until, attempt, lane).await?;
        lane.posted();
        // A slot bounds jobs sending; recording the post is not sending, and
        // holding the slot through it would let the ledger's round trip
        // bound the worker's rate.
        drop(slot);
        self.record_sent(attempt, &sent).await;
        Ok(Done::Sent { sent, conversation_id })
    }

    /// Resolve the org_integration and the recipient, then wait until Teams'
    /// limits let this job's first request go.
    async fn prepare(&self, job: &Job, attempt: &mut Attempt, stop: &CancellationToken) -> Result<Ready, Prepared> {
        let until = Instant::now() + self.store.claim_lease().saturating_sub(LEASE_MARGIN);
        let within = |what: &'static str| move |_| DeliveryError::OutOfTime(what);
        let integration = tokio::time::timeout_at(until, self.resolver.org_integration(&self.store, &self.teams, job))
            .await
            .map_err(within("the org_integration lookup"))??;
        attempt.org_integration_id = Some(integration.id.clone());
        attempt.bot_app_id = Some(integration.sender().to_owned());
        // Checked before any request (the recipient lookup may create a chat).
        let service_url = match &integration.via {
            Via::Bot { .. } => Some(integration.checked_service_url().map_err(DeliveryError::from)?),
            Via::Workflow(_) => None,
        };
        let recipient = tokio::time::timeout_at(until, self.resolver.recipient(&self.store, &self.teams, job, &integration, until))
            .await
            .map_err(within("the recipient lookup"))??;
        attempt.conversation_id = Some(recipient.conversation_id.clone());
        if let Some(stale) = &recipient.corrected_from {
            self.metrics.recipient_corrected();
            warn!(
                stale_conversation_id = %text::clip(stale, 256),
                conversation_id = %recipient.conversation_id,
                user_id = job.recipient.user_id.as_ref().map(|u| text::clip(u.as_str(), 256)),
                "stale recipient corrected to the user's conversation in this organization"
            );
        }
        let mut paced = false;
        if let Some((pacing, app, group, key)) = self.paced_by(&integration, &recipient.conversation_id) {
            match pacing.room(app, group, key, stop).await {
                Ok(waited) => paced = waited,
                Err(Paced::Later(wait)) => return Err(Prepared::Failed(DeliveryError::RateLimited(wait))),
                Err(Paced::Stopped) => return Err(Prepared::Stopped),
            }
        }
        Ok(Ready { integration, service_url, conversation_id: recipient.conversation_id, paced })
    }

    /// Post with quick retries. Every wait (pacing, backoff, `Retry-After`)
    /// and every request ends before `until`; what does not fit goes to a
    /// delayed-retry tier instead.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        integration: &OrgIntegration,
        service_url: Option<&url::Url>,
        conversation_id: &str,
        body: &bytes::Bytes,
        until: Instant,
        attempt: &mut Attempt,
        lane: &Handoff,
    ) -> Result<Sent, DeliveryError> {
        let request = self.teams.request_timeout();
        let mut backoff = self.policy.quick.build();
        loop {
            // Counted now, just before the request: the job waited for room
            // before its claim, so this rarely waits.
            if let Some((pacing, app, group, key)) = self.paced_by(integration, conversation_id) {
                let deadline = Some((until, request));
                pacing.admit(app, group, key, deadline, &self.shutdown).await.map(drop).map_err(|paced| match paced {
                    Paced::Later(wait) => DeliveryError::RateLimited(wait),
                    Paced::Stopped => DeliveryError::RateLimited(Duration::ZERO),
                })?;
            }
            // The next job of the lane may take its room and claim now.
            lane.counted();
            attempt.sends += 1;
            let started = std::time::Instant::now();
            let result = match (&integration.via, service_url) {
                (Via::Bot { bot, .. }, Some(service_url)) => {
                    self.teams.send(&Destination { service_url, conversation_id, bot }, body, until).await
                }
                (Via::Workflow(workflow), _) => self.teams.post_workflow(workflow, body, until).await,
                (Via::Bot { .. }, None) => unreachable!("a bot's job is prepared with its checked service URL"),
            };
            let status = result.as_ref().err().map_or(Some(201), |e| e.http_status());
            self.metrics.teams_request(status, started.elapsed());
            attempt.requests.push(Request {
                at: mongodb::bson::DateTime::now(),
                http_status: status,
                teams_code: result.as_ref().err().and_then(|e| e.code()).map(|c| text::clip(c, 128)),
                duration: started.elapsed(),
            });
            let err = match result {
                Ok(sent) => {
                    info!(
                        attempt = attempt.sends, org_integration_id = %integration.id, bot_app_id = %integration.sender(),
                        tenant_id = %integration.tenant_id, conversation_id = %conversation_id,
                        activity_id = %sent.activity_id, "delivered"
                    );
                    return Ok(sent);
                }
                Err(err) => DeliveryError::Teams(err),
            };
            warn!(
                attempt = attempt.sends, org_integration_id = %integration.id, bot_app_id = %integration.sender(),
                tenant_id = %integration.tenant_id, conversation_id = %conversation_id,
                http_status = http_status(&err), teams_code = teams_code(&err), error = %error_chain(&err), "send failed"
            );
            // Classified here only to choose between another quick try and
            // leaving; `conclude` classifies the error that leaves, once.
            let verdict = classify(&err, self.policy.max_in_process_wait);
            if let (Some((pacing, app, group, key)), Verdict::Retry { reason: Reason::TeamsThrottled, after: Some(after), .. }) =
                (self.paced_by(integration, conversation_id), &verdict)
            {
                // Teams counted more than this worker did (another worker
                // sent into this conversation a moment ago): hold it back.
                pacing.hold(app, group, key, *after);
            }
            let Verdict::Retry { quick: true, after, .. } = verdict else { return Err(err) };
            let wait = after.unwrap_or_else(|| backoff.next().unwrap_or(Duration::from_secs(1)));
            let fits = Instant::now().checked_add(wait + request).is_some_and(|end| end <= until);
            if attempt.sends as usize >= self.policy.quick_attempts || !fits || self.shutdown.is_cancelled() {
                return Err(err);
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// The pacing of a job's posts and its keys there, when pacing is on: a
    /// bot's app, tenant and conversation; a webhook's own key (the
    /// conversation registered for it names the webhook's channel only).
    fn paced_by<'a>(
        &'a self,
        integration: &'a OrgIntegration,
        conversation_id: &'a str,
    ) -> Option<(&'a Pacing, &'a str, &'a str, &'a str)> {
        match &integration.via {
            Via::Bot { bot, .. } => Some((self.pacing.as_ref()?, bot.app_id(), integration.tenant_id.as_str(), conversation_id)),
            Via::Workflow(workflow) => Some((self.workflow_pacing.as_ref()?, WORKFLOW_SENDER, integration.id.as_str(), workflow.key())),
        }
    }

    /// Record the job sent. Teams has it, so the delivery is acked whatever
    /// happens here; while MongoDB does not answer, the mark is retried (the
    /// job's claim keeps other copies away meanwhile, and a copy cannot claim
    /// without MongoDB either), until it lands or the worker shuts down.
    async fn record_sent(&self, attempt: &Attempt, sent: &Sent) {
        let Some(lease) = &attempt.lease else { return };
        let record = attempt.record("sent", None);
        let mut backoff = self.policy.quick.build();
        loop {
            match self.store.mark_sent(lease, &sent.activity_id, &record).await {
                Ok(true) => return,
                Ok(false) => {
                    self.metrics.lease_lost();
                    warn!("delivered, but another delivery had taken over this job's claim: it may be posted twice");
                    return;
                }
                Err(err) if err.is_transient() && !self.shutdown.is_cancelled() => {
                    warn!(error = %error_chain(&err), "delivered, but the ledger cannot record it yet; retrying");
                    tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(1)).min(Duration::from_secs(1))).await;
                }
                Err(err) => {
                    self.metrics.ledger_write_failed();
                    warn!(error = %error_chain(&err), "delivered, but the ledger could not record it");
                    return;
                }
            }
        }
    }

    /// Run a store operation with the quick retries, while the error is transient.
    async fn with_quick_retries<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut backoff = self.policy.quick.build();
        let mut tries = 1;
        loop {
            match op().await {
                Err(err) if err.is_transient() && tries < self.policy.quick_attempts && !self.shutdown.is_cancelled() => {
                    tries += 1;
                    tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(1))).await;
                }
                other => return other,
            }
        }
    }

    /// Turn the delivery's result into its one disposition: classify once,
    /// quarantine what Teams refused for good, record the outcome in the
    /// ledger (as the claim's holder), and apply the retry budget.
    async fn conclude(
        &self,
        job: Option<&Job>,
        history: History,
        attempt: Attempt,
        organization_id: Option<String>,
        result: Result<Done, DeliveryError>,
    ) -> Disposition {
        let err = match result {
            Ok(Done::Sent { sent, conversation_id }) => {
                return Disposition::Ack(Acked::Delivered { activity_id: sent.activity_id, conversation_id });
            }
            Ok(Done::AlreadySent) => {
                info!("job was already sent; acking without a second post");
                return Disposition::Ack(Acked::AlreadySent);
            }
            Ok(Done::Yielded) => return Disposition::GiveBack,
            Ok(Done::AlreadyUnconfirmed) => {
                info!("an earlier delivery of this job is unconfirmed; acking without a second post (see its dead letter)");
                return Disposition::Ack(Acked::AlreadyUnconfirmed);
            }
            Err(err) => err,
        };
        let verdict = classify(&err, self.policy.max_in_process_wait);
        if let Some(job) = job {
            self.quarantine_if_refused(job, &attempt, &err).await;
        }
        let attempts = history.attempts.saturating_add(attempt.sends);
        let decision = decide(verdict, history.hops, &self.policy);
        let (reason, error) = match decision {
            Decision::Exhausted { last, hops } => {
                (Reason::RetriesExhausted, text::field(&format!("{last} after {hops} delayed retries: {}", error_chain(&err))))
            }
            Decision::DeadLetter { reason } | Decision::Retry { reason, .. } => (reason, error_chain(&err)),
        };
        let failure = Failure {
            reason,
            error,
            http_status: http_status(&err),
            teams_code: teams_code(&err).map(|c| text::clip(c, 128)),
            correlation_id: correlation_id(&err).map(str::to_owned),
            organization_id,
            org_integration_id: attempt.org_integration_id.clone(),
        };
        let state = match decision {
            Decision::Retry { .. } => DeliveryState::Retrying,
            Decision::DeadLetter { reason: Reason::DeliveryUnconfirmed } => DeliveryState::Unconfirmed,
            Decision::DeadLetter { .. } | Decision::Exhausted { .. } => DeliveryState::DeadLettered,
        };
        if state == DeliveryState::Unconfirmed {
            self.metrics.delivery_unconfirmed();
        }
        self.record_outcome(&attempt, state, &failure).await;
        match decision {
            Decision::Retry { tier, hops, .. } => Disposition::Retry { tier, history: History { attempts, hops, ..history }, failure },
            Decision::DeadLetter { .. } | Decision::Exhausted { .. } => {
                Disposition::DeadLetter { history: History { attempts, ..history }, failure }
            }
        }
    }

    async fn quarantine_if_refused(&self, job: &Job, attempt: &Attempt, err: &DeliveryError) {
        let Some(conversation) = attempt.conversation_id.as_deref().filter(|_| quarantines(err)) else { return };
        let (org, integration) = (job.organization_id.as_str(), job.integration_id.as_str());
        let code = teams_code(err);
        match self.store.quarantine(org, integration, conversation, Reason::TeamsForbidden.as_str(), code).await {
            Ok(_) => {
                self.metrics.conversation_quarantined();
                warn!(%conversation, org_integration_id = attempt.org_integration_id.as_deref(), teams_code = code, "conversation quarantined for this org_integration");
                self.resolver.forget_conversation(job, conversation);
            }
            Err(store_err) => warn!(error = %error_chain(&store_err), "could not quarantine the conversation"),
        }
    }

    /// Only by the holder of the claim, and retried while MongoDB fails
    /// transiently until the claim runs out (after that another copy may
    /// take the job, and the record is its to write): an `unconfirmed` that
    /// is not recorded would let a later copy post the job again. Then the
    /// delivery settles anyway: the dead-letter queue, not the ledger, is the
    /// record of a failed job. A delivery without a claim (invalid, expired,
    /// or another copy in progress) writes nothing.
    async fn record_outcome(&self, attempt: &Attempt, state: DeliveryState, failure: &Failure) {
        let Some(lease) = &attempt.lease else { return };
        let record = attempt.record(state.as_str(), Some(failure));
        let claim_ends = attempt.started.map_or_else(Instant::now, |claimed| claimed + self.store.claim_lease());
        let mut backoff = self.policy.quick.build();
        loop {
            let err = match self.store.release_claim(lease, state, &failure.error, &record).await {
                Ok(true) => return,
                Ok(false) => {
                    warn!("another delivery had taken over this job's claim; its record is left to it");
                    return;
                }
                Err(err) => err,
            };
            let wait = backoff.next().unwrap_or(Duration::from_secs(1)).min(Duration::from_secs(1));
            if !err.is_transient() || self.shutdown.is_cancelled() || Instant::now() + wait >= claim_ends {
                self.metrics.ledger_write_failed();
                warn!(error = %error_chain(&err), state = state.as_str(), "could not record the outcome in the ledger");
                return;
            }
            warn!(error = %error_chain(&err), state = state.as_str(), "the ledger cannot record the outcome yet; retrying");
            tokio::time::sleep(wait).await;
        }
    }
}

fn teams_error(err: &DeliveryError) -> Option<&crate::teams::TeamsError> {
    match err {
        DeliveryError::Teams(teams) => Some(teams),
        _ => None,
    }
}

fn http_status(err: &DeliveryError) -> Option<u16> {
    teams_error(err).and_then(|e| e.http_status())
}

fn teams_code(err: &DeliveryError) -> Option<&str> {
    teams_error(err).and_then(|e| e.code())
}

fn correlation_id(err: &DeliveryError) -> Option<&str> {
    teams_error(err).and_then(|e| e.correlation_id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            quick_attempts: 3,
            quick: ExponentialBuilder::default(),
            max_in_process_wait: Duration::from_secs(5),
            tiers: [5, 30, 120].map(Duration::from_secs).to_vec(),
            max_hops: 2,
            crash_limit: 20,
        }
    }

    fn retry(reason: Reason, after: Option<u64>) -> Verdict {
        Verdict::Retry { reason, quick: false, after: after.map(Duration::from_secs) }
    }

    #[test]
    fn the_retry_budget_is_part_of_the_decision() {
        let p = policy();
        assert_eq!(
            decide(retry(Reason::TeamsUnavailable, None), 0, &p),
            Decision::Retry { tier: Duration::from_secs(5), reason: Reason::TeamsUnavailable, hops: 1 }
        );
        assert_eq!(
            decide(retry(Reason::TeamsThrottled, Some(60)), 1, &p),
            Decision::Retry { tier: Duration::from_secs(120), reason: Reason::TeamsThrottled, hops: 2 }
        );
        assert_eq!(decide(retry(Reason::TeamsUnavailable, None), 2, &p), Decision::Exhausted { last: Reason::TeamsUnavailable, hops: 2 });
        assert_eq!(decide(Verdict::DeadLetter(Reason::TeamsForbidden), 0, &p), Decision::DeadLetter { reason: Reason::TeamsForbidden });
    }

    #[test]
    fn waits_that_are_no_fault_of_the_job_never_use_up_its_budget() {
        let p = policy();
        for reason in [Reason::StoreUnavailable, Reason::RateLimited, Reason::InProgress] {
            assert_eq!(
                decide(retry(reason, None), u32::MAX, &p),
                Decision::Retry { tier: Duration::from_secs(120), reason, hops: u32::MAX },
                "{reason}"
            );
        }
    }
}
