//! The consume loop: bounded concurrency, each delivery settled by the
//! settler, reconnect on broker failures, housekeeping, drain on shutdown.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use lapin::Connection;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use secrecy::ExposeSecret;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::settle::Settler;
use super::step::Pipeline;
use crate::http::Health;
use crate::metrics::{Gauges, Metrics};
use crate::mongo::{Store, StoreError};
use crate::rabbitmq::headers::Signer;
use crate::rabbitmq::{self, BrokerError, Publisher, Topology};
use crate::settings::Settings;
use crate::teams::Teams;
use crate::text::error_chain;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Store(#[from] StoreError),
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
    signer: Signer,
    settings: Settings,
}

impl Worker {
    pub async fn build(settings: Settings, shutdown: CancellationToken) -> Result<Self, WorkerError> {
        let store = Store::connect(&settings).await?;
        let signer = super::signer(&settings, &store).await?;
        let teams = Teams::new(&settings.teams)?;
        let metrics = Arc::new(Metrics::with_organizations(&settings.metrics.organizations));
        let pipeline = Arc::new(Pipeline::new(&settings, store, teams, metrics, shutdown));
        Ok(Self { pipeline, topology: Topology::from(&settings), signer, settings })
    }

    /// Declare the topology and indexes (what `herald setup` does).
    pub async fn setup(&self, connection: &Connection) -> Result<(), WorkerError> {
        self.topology.declare(connection).await?;
        self.pipeline.store.ensure_indexes().await?;
        Ok(())
    }

    /// What `/readyz` and `/metrics` read.
    pub fn health(&self) -> Health {
        let pipeline = self.pipeline.clone();
        Health {
            metrics: self.pipeline.metrics.clone(),
            store: self.pipeline.store.clone(),
            gauges: Arc::new(move || {
                let (cache_hits, cache_misses) = pipeline.resolver.cache_stats();
                let (mongodb_reads, mongodb_writes) = pipeline.store.op_counts();
                Gauges { token_requests: pipeline.teams.token_requests(), cache_hits, cache_misses, mongodb_reads, mongodb_writes }
            }),
        }
    }

    /// Consume until `shutdown`; reconnect with backoff when the broker goes away.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        if !self.settings.http.listen.is_empty() {
            let addr = crate::http::serve(&self.settings.http.listen, self.health(), shutdown.clone())
                .await
                .map_err(|source| WorkerError::Listen { addr: self.settings.http.listen.clone(), source })?;
            info!(%addr, "serving /healthz, /readyz and /metrics");
        }
        tokio::spawn(housekeeping(self.pipeline.clone(), self.settings.resolution_ttl(), shutdown.clone()));
        let mut backoff = reconnect_backoff();
        loop {
            match self.session(&shutdown).await {
                Ok(()) => return Ok(()),
                Err(err) if shutdown.is_cancelled() => {
                    warn!(error = %error_chain(&err), "broker error during shutdown");
                    return Ok(());
                }
                Err(err) => {
                    let wait = backoff.next().unwrap_or(Duration::from_secs(30));
                    self.pipeline.metrics.broker_reconnect();
                    error!(error = %error_chain(&err), retry_in = ?wait, "lost the broker; reconnecting");
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
        let connection = Arc::new(rabbitmq::connect(self.settings.amqp_url.expose_secret(), "herald worker").await?);
        self.setup(&connection).await?;
        let publisher = Publisher::open(connection.clone()).await?;
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
        let polling = shutdown.child_token();
        tokio::spawn(poll_queues(
            connection.clone(),
            self.topology.clone(),
            self.pipeline.metrics.clone(),
            self.settings.metrics.queue_poll(),
            polling.clone(),
        ));
        let _stop_polling = polling.drop_guard();
        info!(queue = %queue, prefetch = self.settings.worker.prefetch, concurrency = self.settings.worker.concurrency, "consuming");

        let concurrency = self.settings.worker.concurrency;
        let slots = Arc::new(Semaphore::new(concurrency));
        let settler = Arc::new(Settler {
            pipeline: self.pipeline.clone(),
            publisher: publisher.clone(),
            connection: connection.clone(),
            topology: self.topology.clone(),
            signer: self.signer.clone(),
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
                Some(Err(err)) => break Err(BrokerError::Amqp { operation: "consume".into(), source: err }.into()),
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
        publisher.close().await;
        let _ = connection.close(200, "shutdown".into()).await;
        result
    }
}

/// Give back the memory of idle keys: expired resolutions and tokens, pacing
/// windows that have passed.
async fn housekeeping(pipeline: Arc<Pipeline>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every.clamp(Duration::from_secs(1), Duration::from_secs(60)));
    loop {
        tokio::select! {
            _ = tick.tick() => pipeline.sweep(),
            () = shutdown.cancelled() => return,
        }
    }
}

/// Poll the depth of the work queue, the retry tiers and the dead-letter
/// queue (a passive declare each: nothing is taken), and close the window of
/// the oldest job taken, for the metrics.
async fn poll_queues(connection: Arc<Connection>, topology: Topology, metrics: Arc<Metrics>, every: Duration, stop: CancellationToken) {
    use crate::metrics::QueueKind;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let Ok(channel) = connection.create_channel().await else { continue };
        let depth = |queue: String| {
            let channel = &channel;
            async move {
                let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
                channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await.ok().map(|q| q.message_count())
            }
        };
        let work = depth(topology.work_queue()).await;
        let mut retry = Some(0u32);
        for tier in &topology.tiers {
            retry = match (retry, depth(topology.retry_queue(*tier)).await) {
                (Some(sum), Some(n)) => Some(sum.saturating_add(n)),
                _ => None,
            };
        }
        let dead = depth(topology.dead_queue()).await;
        let _ = channel.close(200, "".into()).await;
        metrics.queue_polled([(QueueKind::Work, work), (QueueKind::Retry, retry), (QueueKind::Dead, dead)]);
    }
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
    let result = worker.run(shutdown).await;
    worker.pipeline.store.clone().shutdown().await;
    result
}
