//! The settler carries out a `Disposition`: publish the retry or dead letter
//! (confirmed), then ack. It decides nothing about the job.
//!
//! - A panic in the step becomes a dead letter `internal_error` (counted and
//!   logged), never a stranded delivery.
//! - A publish that fails is tried again on a healed channel (reopened, the
//!   topology declared again) while the delivery stays unacked, so a broken
//!   exchange does not count against the job's delivery limit; only after
//!   that does the delivery go back to the queue.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use lapin::message::Delivery;
use lapin::options::BasicNackOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::lanes::Handoff;
use super::step::Pipeline;
use super::{Acked, Disposition, Failure, History, Incoming};
use crate::job::Job;
use crate::metrics::JobOutcome;
use crate::outcome::Reason;
use crate::rabbitmq::headers::{self, Signer};
use crate::rabbitmq::{self, BrokerError, Publisher, ROUTING_KEY, Topology, tier_label};
use crate::text::error_chain;

/// Tries of one publish (with the channel healed in between) before the
/// delivery goes back to the queue.
const PUBLISH_TRIES: u32 = 5;

pub(super) struct Settler {
    pub pipeline: Arc<Pipeline>,
    pub publisher: Publisher,
    pub connection: Arc<Connection>,
    pub topology: Topology,
    pub signer: Signer,
}

impl Settler {
    /// Decide (the step) and settle one delivery; `stop` hands it back
    /// untouched while it waits for its turn.
    /// `channel` is the one the delivery came on (its ack goes there).
    /// `decoded`: the job, if the consumer decoded its body already.
    pub async fn handle(&self, delivery: Delivery, decoded: Option<Job>, channel: &Channel, stop: &CancellationToken, lane: &Handoff) {
        self.settle(delivery, channel, Some((decoded, stop, lane))).await;
    }

    /// Settle a delivery whose lane is full: a delayed retry.
    pub async fn lane_full(&self, delivery: Delivery, channel: &Channel) {
        self.settle(delivery, channel, None).await;
    }

    /// With `stop`: the step decides; without: the lane was full.
    async fn settle(&self, delivery: Delivery, channel: &Channel, stop: Option<(Option<Job>, &CancellationToken, &Handoff)>) {
        let started = std::time::Instant::now();
        let metrics = &self.pipeline.metrics;
        metrics.job_started();
        let Delivery { data, properties, redelivered, acker, delivery_tag, .. } = delivery;
        let message_id = properties.message_id().as_ref().map(|id| id.to_string());
        let table = properties.headers().as_ref();
        let history = self.signer.history(message_id.as_deref(), &data, table);
        if history.forged {
            metrics.forged_headers();
            warn!(message_id = message_id.as_deref(), "x-herald-* headers herald did not write were ignored");
        }
        let incoming = Incoming {
            traceparent: headers::get_str(table, headers::TRACEPARENT).map(|t| crate::text::clip(&t, 128)),
            content_type: properties.content_type().as_ref().map(|c| crate::text::clip(c.as_str(), 128)),
            content_encoding: properties.content_encoding().as_ref().map(|c| crate::text::clip(c.as_str(), 128)),
            body: data,
            message_id,
            history,
            redelivered,
        };
        let decided = async {
            match stop {
                Some((decoded, stop, lane)) => self.pipeline.process_until(&incoming, decoded, stop, lane).await,
                None => self.pipeline.lane_full(&incoming),
            }
        };
        let disposition = match std::panic::AssertUnwindSafe(decided).catch_unwind().await {
            Ok(disposition) => disposition,
            Err(panic) => {
                let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
                metrics.internal_error();
                error!(
                    message_id = incoming.message_id.as_deref(),
                    panic = what.as_deref().unwrap_or("-"),
                    "processing the job panicked; dead-lettering it as internal_error"
                );
                internal_error(&incoming, what)
            }
        };
        if disposition == Disposition::GiveBack {
            metrics.job_finished(JobOutcome::Retried, started.elapsed());
            let _ = acker.nack(BasicNackOptions { requeue: true, multiple: false }).await;
            return;
        }
        match self.carry_out(&incoming, &properties, &disposition).await {
            Ok(outcome) => {
                metrics.job_finished(outcome, started.elapsed());
                if let Err(err) = rabbitmq::ack_queued(channel, delivery_tag, false) {
                    // The channel is gone; the broker redelivers, the ledger
                    // keeps a sent job from being posted twice.
                    warn!(error = %err, "ack failed; the message will be redelivered");
                }
            }
            Err(err) => {
                metrics.job_finished(JobOutcome::Retried, started.elapsed());
                error!(error = %error_chain(&err), "could not publish the job's outcome; returning it to the queue");
                let _ = acker.nack(BasicNackOptions { requeue: true, multiple: false }).await;
            }
        }
    }

    /// Publish what the disposition needs (confirmed); the caller acks after.
    async fn carry_out(
        &self,
        incoming: &Incoming,
        properties: &BasicProperties,
        disposition: &Disposition,
    ) -> Result<JobOutcome, BrokerError> {
        let metrics = &self.pipeline.metrics;
        match disposition {
            Disposition::Ack(Acked::Delivered { .. }) => Ok(JobOutcome::Delivered),
            Disposition::Ack(Acked::AlreadySent | Acked::AlreadyUnconfirmed) | Disposition::GiveBack => Ok(JobOutcome::AlreadySent),
            Disposition::Retry { tier, history, failure } => {
                let mut table = self.carried(properties);
                history_headers(&mut table, history);
                headers::set_str(&mut table, headers::LAST_REASON, failure.reason.as_str());
                headers::set_str(&mut table, headers::ERROR, &failure.error);
                self.publish(incoming, properties, table, &self.topology.retry_exchange(), &tier_label(*tier)).await?;
                warn!(reason = %failure.reason, tier = %tier_label(*tier), hop = history.hops, "job scheduled for a delayed retry");
                Ok(JobOutcome::Retried)
            }
            Disposition::DeadLetter { history, failure } => {
                let mut table = self.carried(properties);
                history_headers(&mut table, history);
                failure_headers(&mut table, failure);
                headers::set_str(
                    &mut table,
                    headers::DEAD_LETTERED_AT,
                    &chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                );
                self.publish(incoming, properties, table, &self.topology.dead_exchange(), ROUTING_KEY).await?;
                metrics.job_dead_lettered(failure.reason);
                warn!(
                    reason = %failure.reason, teams_code = failure.teams_code.as_deref(), http_status = failure.http_status,
                    organization_id = failure.organization_id.as_deref(), error = %failure.error, "job dead-lettered"
                );
                Ok(JobOutcome::DeadLettered)
            }
        }
    }

    /// The producer's own headers that travel with the job, within budget.
    fn carried(&self, properties: &BasicProperties) -> FieldTable {
        let budget = headers::MAX_CARRIED_BYTES.min(self.publisher.frame_max() / 4);
        headers::carried(properties.headers().as_ref(), budget)
    }

    /// Sign and publish; on failure heal the channel and the topology and
    /// try again, a few times, before giving up.
    async fn publish(
        &self,
        incoming: &Incoming,
        original: &BasicProperties,
        mut table: FieldTable,
        exchange: &str,
        routing_key: &str,
    ) -> Result<(), BrokerError> {
        self.signer.sign(incoming.message_id.as_deref(), &incoming.body, &mut table);
        let properties = republished(original, table);
        let mut wait = Duration::from_millis(200);
        let mut tries = 1;
        loop {
            match self.publisher.publish(exchange, routing_key, &incoming.body, properties.clone()).await {
                Ok(()) => return Ok(()),
                Err(err) if tries < PUBLISH_TRIES && self.connection.status().connected() => {
                    self.pipeline.metrics.publish_retried();
                    error!(error = %error_chain(&err), exchange, try_ = tries, "publishing the job's outcome failed; declaring the topology again and retrying");
                    tokio::time::sleep(wait).await;
                    if let Err(declare) = self.topology.declare(&self.connection).await {
                        warn!(error = %error_chain(&declare), "could not declare the topology");
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                    tries += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// A dead letter for a job whose processing panicked.
fn internal_error(incoming: &Incoming, what: Option<String>) -> Disposition {
    Disposition::DeadLetter {
        history: incoming.history,
        failure: Failure {
            reason: Reason::InternalError,
            error: crate::text::field(&format!("herald panicked while processing the job: {}", what.as_deref().unwrap_or("-"))),
            http_status: None,
            teams_code: None,
            correlation_id: None,
            organization_id: crate::job::Job::peek_organization(&incoming.body).map(|o| crate::text::clip(&o, 256)),
            org_integration_id: None,
        },
    }
}

fn history_headers(table: &mut FieldTable, history: &History) {
    headers::set_u32(table, headers::ATTEMPTS, history.attempts);
    headers::set_u32(table, headers::HOPS, history.hops);
    headers::set_u32(table, headers::REPLAYS, history.replays);
}

fn failure_headers(table: &mut FieldTable, failure: &Failure) {
    headers::set_str(table, headers::REASON, failure.reason.as_str());
    headers::set_str(table, headers::ERROR, &failure.error);
    let optional = [
        (headers::TEAMS_CODE, failure.teams_code.clone()),
        (headers::HTTP_STATUS, failure.http_status.map(|s| s.to_string())),
        (headers::CORRELATION_ID, failure.correlation_id.clone()),
        (headers::ORGANIZATION_ID, failure.organization_id.clone()),
        (headers::ORG_INTEGRATION_ID, failure.org_integration_id.clone()),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            headers::set_str(table, key, &value);
        }
    }
}

/// The original message's properties with new headers.
fn republished(original: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut properties = BasicProperties::default().with_content_type("application/json".into()).with_headers(headers);
    if let Some(id) = original.message_id() {
        properties = properties.with_message_id(id.clone());
    }
    if let Some(timestamp) = original.timestamp() {
        properties = properties.with_timestamp(*timestamp);
    }
    properties
}
