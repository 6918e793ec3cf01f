//! The consume loop: bounded concurrency, settle each disposition with a
//! confirmed publish before the ack, reconnect on broker failures, drain on
//! shutdown.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use secrecy::ExposeSecret;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{Disposition, Failure, Incoming, Pipeline};
use crate::metrics::JobOutcome;
use crate::mongo::{DeliveryState, Store};
use crate::outcome::{Reason, retry_tier};
use crate::rabbitmq::{self, BrokerError, Publisher, ROUTING_KEY, Topology, headers, tier_label};
use crate::settings::Settings;
use crate::teams::Teams;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Store(#[from] crate::mongo::StoreError),
    #[error("cannot build the HTTP client")]
    Http(#[from] reqwest::Error),
    #[error("cannot listen on {addr} (http.listen)")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// A worker process: the pipeline plus what it needs to settle outcomes.
pub struct Worker {
    pub pipeline: Arc<Pipeline>,
    pub topology: Topology,
    settings: Settings,
}

impl Worker {
    pub async fn build(settings: Settings, shutdown: CancellationToken) -> Result<Self, WorkerError> {
        let store = Store::connect(&settings).await?;
        let teams = Teams::new(&settings.teams)?;
        let topology = topology(&settings);
        let pipeline = Arc::new(Pipeline::new(&settings, store, teams, shutdown));
        Ok(Self { pipeline, topology, settings })
    }

    /// Declare the topology and indexes (what `herald setup` does).
    pub async fn setup(&self, connection: &Connection) -> Result<(), WorkerError> {
        self.topology.declare(connection).await?;
        self.pipeline.store.ensure_indexes().await?;
        Ok(())
    }

    /// Consume until `shutdown`; reconnect with backoff when the broker goes away.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        if !self.settings.http.listen.is_empty() {
            let addr = crate::http::serve(&self.settings.http.listen, self.pipeline.clone(), shutdown.clone())
                .await
                .map_err(|source| WorkerError::Listen { addr: self.settings.http.listen.clone(), source })?;
            info!(%addr, "serving /healthz, /readyz and /metrics");
        }
        let mut backoff = reconnect_backoff();
        loop {
            match self.session(&shutdown).await {
                Ok(()) => return Ok(()),
                Err(err) if shutdown.is_cancelled() => {
                    warn!(error = %super::error_chain(&err), "broker error during shutdown");
                    return Ok(());
                }
                Err(err) => {
                    let wait = backoff.next().unwrap_or(Duration::from_secs(30));
                    error!(error = %super::error_chain(&err), retry_in = ?wait, "lost the broker; reconnecting");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.cancelled() => return Ok(()),
                    }
                }
            }
        }
    }

    /// One connection's life: consume until shutdown or a broker failure.
    async fn session(&self, shutdown: &CancellationToken) -> Result<(), WorkerError> {
        let connection = rabbitmq::connect(self.settings.amqp_url.expose_secret(), "herald worker").await?;
        self.setup(&connection).await?;
        let publisher = Publisher::open(&connection).await?;
        let channel = connection.create_channel().await.map_err(rabbitmq::amqp("open consume channel"))?;
        channel.basic_qos(self.settings.worker.prefetch, BasicQosOptions::default()).await.map_err(rabbitmq::amqp("set prefetch"))?;
        let queue = self.topology.work_queue();
        // Manual acks (no_ack: false): a job is acked only once it is
        // delivered, or its retry or dead letter is confirmed by the broker.
        let mut consumer = channel
            .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(rabbitmq::amqp(format!("consume {queue}")))?;
        self.pipeline.metrics.consumer_active(true);
        info!(queue = %queue, prefetch = self.settings.worker.prefetch, concurrency = self.settings.worker.concurrency, "consuming");

        let concurrency = self.settings.worker.concurrency;
        let slots = Arc::new(Semaphore::new(concurrency));
        let settler = Arc::new(Settler {
            pipeline: self.pipeline.clone(),
            publisher: publisher.clone(),
            topology: self.topology.clone(),
            max_hops: self.settings.retry.max_hops,
        });
        let result = loop {
            let permit = tokio::select! {
                permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                () = shutdown.cancelled() => break Ok(()),
            };
            let delivery = tokio::select! {
                next = consumer.next() => next,
                () = shutdown.cancelled() => break Ok(()),
            };
            let delivery = match delivery {
                Some(Ok(delivery)) => delivery,
                Some(Err(err)) => {
                    break Err(BrokerError::Amqp { operation: "consume".into(), source: err }.into());
                }
                // The broker cancelled the consumer (queue deleted, node going down).
                None => break Err(BrokerError::ConsumerCancelled { queue: queue.clone() }.into()),
            };
            let settler = settler.clone();
            tokio::spawn(async move {
                settler.handle(delivery).await;
                drop(permit);
            });
        };

        self.pipeline.metrics.consumer_active(false);
        // Stop consuming, then give in-flight jobs the deadline to finish.
        // Deliveries not acked by then go back to the queue when the channel
        // closes: nothing is lost.
        let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
        let deadline = self.settings.shutdown_deadline();
        let drained = tokio::time::timeout(deadline, slots.acquire_many(concurrency as u32)).await.is_ok();
        if drained {
            info!("in-flight jobs finished");
        } else {
            warn!(deadline = ?deadline, in_flight = concurrency - slots.available_permits(), "shutdown deadline passed; unfinished jobs go back to the queue");
        }
        let _ = channel.close(200, "shutdown".into()).await;
        let _ = publisher.channel().close(200, "shutdown".into()).await;
        let _ = connection.close(200, "shutdown".into()).await;
        result
    }
}

pub fn topology(settings: &Settings) -> Topology {
    Topology { prefix: settings.topology_prefix.clone(), tiers: settings.retry_tiers(), delivery_limit: settings.worker.delivery_limit }
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .without_max_times()
        .with_jitter()
        .build()
}

/// Build the worker and run it until `shutdown` (what `herald worker` does).
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let worker = Worker::build(settings, shutdown.clone()).await?;
    worker.run(shutdown).await
}

/// Settles one delivery: publish (confirmed) what must be published, then ack.
struct Settler {
    pipeline: Arc<Pipeline>,
    publisher: Publisher,
    topology: Topology,
    max_hops: u32,
}

impl Settler {
    async fn handle(&self, delivery: Delivery) {
        let started = std::time::Instant::now();
        let metrics = &self.pipeline.metrics;
        metrics.job_started();
        let Delivery { data, properties, redelivered, acker, .. } = delivery;
        let incoming = Incoming { body: data, properties, redelivered };
        let disposition = self.pipeline.process(&incoming).await;
        match self.settle(&incoming, disposition).await {
            Ok(outcome) => {
                metrics.job_finished(outcome, started.elapsed());
                if let Err(err) = acker.ack(BasicAckOptions::default()).await {
                    // The channel is gone; the broker redelivers, the ledger
                    // keeps a sent job from being posted twice.
                    warn!(error = %err, "ack failed; the message will be redelivered");
                }
            }
            Err(err) => {
                metrics.job_finished(JobOutcome::Retried, started.elapsed());
                error!(error = %super::error_chain(&err), "could not publish the outcome; returning the message to the queue");
                // Requeue after a pause so that a broken exchange does not spin.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = acker.nack(BasicNackOptions { requeue: true, multiple: false }).await;
            }
        }
    }

    /// Publish what the disposition needs (confirmed); the caller acks after.
    async fn settle(&self, incoming: &Incoming, disposition: Disposition) -> Result<JobOutcome, BrokerError> {
        match disposition {
            Disposition::Delivered { .. } => Ok(JobOutcome::Delivered),
            Disposition::AlreadySent => Ok(JobOutcome::AlreadySent),
            Disposition::DeadLetter(failure) => self.dead_letter(incoming, failure).await.map(|()| JobOutcome::DeadLettered),
            Disposition::Retry(failure) => {
                let hops = incoming.hops();
                let counts = failure.reason.consumes_retry_budget();
                if counts && hops >= self.max_hops {
                    let error = format!("{} after {} delayed retries: {}", failure.reason, hops, failure.error);
                    let exhausted = Failure { reason: Reason::RetriesExhausted, error, ..failure };
                    return self.dead_letter(incoming, exhausted).await.map(|()| JobOutcome::DeadLettered);
                }
                let tier = retry_tier(hops, failure.retry_after, &self.topology.tiers);
                let mut table = headers::copy_without(incoming.headers(), &[]);
                headers::set_u32(&mut table, headers::ATTEMPTS, incoming.attempts() + failure.attempts);
                headers::set_u32(&mut table, headers::HOPS, hops + u32::from(counts));
                headers::set_str(&mut table, headers::LAST_REASON, failure.reason.as_str());
                headers::set_str(&mut table, headers::ERROR, &failure.error);
                self.publisher
                    .publish(&self.topology.retry_exchange(), &tier_label(tier), &incoming.body, properties(incoming, table))
                    .await?;
                self.record(&failure, DeliveryState::Retrying).await;
                warn!(reason = %failure.reason, tier = %tier_label(tier), hop = hops + u32::from(counts), "job scheduled for a delayed retry");
                Ok(JobOutcome::Retried)
            }
        }
    }

    async fn dead_letter(&self, incoming: &Incoming, failure: Failure) -> Result<(), BrokerError> {
        // Retry bookkeeping and any earlier dead letter's details are replaced.
        let replaced = [
            headers::HOPS,
            headers::LAST_REASON,
            headers::TEAMS_CODE,
            headers::HTTP_STATUS,
            headers::CORRELATION_ID,
            headers::ORGANIZATION_ID,
            headers::ORG_INTEGRATION_ID,
        ];
        let mut table = headers::copy_without(incoming.headers(), &replaced);
        headers::set_str(&mut table, headers::REASON, failure.reason.as_str());
        headers::set_str(&mut table, headers::ERROR, &failure.error);
        headers::set_u32(&mut table, headers::ATTEMPTS, incoming.attempts() + failure.attempts);
        headers::set_str(&mut table, headers::DEAD_LETTERED_AT, &chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        if headers::get_u32(Some(&table), headers::REPLAYS).is_none() {
            headers::set_u32(&mut table, headers::REPLAYS, 0);
        }
        let optional = [
            (headers::TEAMS_CODE, failure.teams_code.clone()),
            (headers::HTTP_STATUS, failure.http_status.map(|s| s.to_string())),
            (headers::CORRELATION_ID, failure.correlation_id.clone()),
            (headers::ORGANIZATION_ID, failure.organization_id.clone()),
            (headers::ORG_INTEGRATION_ID, failure.org_integration_id.clone()),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                headers::set_str(&mut table, key, &value);
            }
        }
        self.publisher.publish(&self.topology.dead_exchange(), ROUTING_KEY, &incoming.body, properties(incoming, table)).await?;
        self.pipeline.metrics.job_dead_lettered(failure.reason);
        self.record(&failure, DeliveryState::DeadLettered).await;
        warn!(
            reason = %failure.reason, teams_code = failure.teams_code.as_deref(), http_status = failure.http_status,
            organization_id = failure.organization_id.as_deref(), job_id = failure.job_id.map(|j| j.to_string()),
            error = %failure.error, "job dead-lettered"
        );
        Ok(())
    }

    /// Best effort: the dead-letter queue, not the ledger, is the record of a
    /// failed job; a ledger outage must not block settling.
    async fn record(&self, failure: &Failure, state: DeliveryState) {
        let Some(job_id) = failure.job_id else { return };
        if let Err(err) = self.pipeline.store.mark_failed(job_id, state, failure.reason.as_str(), &failure.error, failure.attempts).await {
            warn!(error = %super::error_chain(&err), "could not record the failure in the ledger");
        }
    }
}

/// The original message's properties with new headers.
fn properties(incoming: &Incoming, headers: FieldTable) -> BasicProperties {
    let mut properties = BasicProperties::default().with_content_type("application/json".into()).with_headers(headers);
    if let Some(id) = incoming.properties.message_id() {
        properties = properties.with_message_id(id.clone());
    }
    if let Some(timestamp) = incoming.properties.timestamp() {
        properties = properties.with_timestamp(*timestamp);
    }
    properties
}
