//! The consume loop: bounded concurrency, each delivery settled by the
//! settler, reconnect on broker failures, housekeeping, drain on shutdown.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::Connection;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::fleet::{self, Consumers};
use super::lanes::Lanes;
use super::settle::Settler;
use super::step::Pipeline;
use crate::http::Health;
use crate::metrics::{Gauges, Metrics};
use crate::mongo::{Store, StoreError};
use crate::rabbitmq::headers::Signer;
use crate::rabbitmq::{BrokerError, Publisher, Topology};
use crate::settings::Settings;
use crate::teams::Teams;
use crate::text::error_chain;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot build the Connector's HTTP client")]
    Http(#[from] crate::teams::SetupError),
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
    /// Order per conversation across sessions (reconnects).
    lanes: Arc<Lanes>,
    /// This worker's name in the fleet, the same across sessions: its own
    /// record (and the requests it wrote there) stays its own after a
    /// reconnect, never another worker's to count.
    fleet_id: String,
}

impl Worker {
    pub async fn build(settings: Settings, shutdown: CancellationToken) -> Result<Self, WorkerError> {
        let store = Store::connect(&settings).await?;
        let signer = super::signer(&settings, &store).await?;
        let teams = Teams::new(&settings.teams)?;
        let metrics = Arc::new(Metrics::with_organizations(&settings.metrics.organizations));
        let pipeline = Arc::new(Pipeline::new(&settings, store, teams, metrics, shutdown));
        let lanes = Lanes::new(settings.worker.max_lane);
        Ok(Self { pipeline, topology: Topology::from(&settings), signer, settings, lanes, fleet_id: fleet::worker_id() })
    }

    /// Declare the topology and indexes (what `herald setup` does).
    pub async fn setup(&self, connection: &Connection) -> Result<crate::rabbitmq::Declared, WorkerError> {
        let declared = self.topology.declare(connection).await?;
        self.pipeline.store.ensure_indexes().await?;
        Ok(declared)
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
        super::sched::log_outcome();
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
        let connection = Arc::new(crate::rabbitmq::Broker::new(&self.settings).connect("herald worker").await?);
        self.setup(&connection).await?;
        let publisher = Publisher::open(connection.clone()).await?;
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
        info!(
            shards = self.settings.fleet.shards,
            prefetch = self.settings.worker.prefetch,
            intake_prefetch = self.settings.worker.intake_prefetch(),
            concurrency = self.settings.worker.concurrency,
            "starting"
        );
        let settler = Arc::new(Settler {
            pipeline: self.pipeline.clone(),
            publisher: publisher.clone(),
            connection: connection.clone(),
            topology: self.topology.clone(),
            signer: self.signer.clone(),
        });
        let consumers = Arc::new(Consumers {
            connection: connection.clone(),
            broker: crate::rabbitmq::Broker::new(&self.settings),
            settler,
            lanes: self.lanes.clone(),
            topology: self.topology.clone(),
            prefetch: self.settings.worker.prefetch,
            intake_prefetch: self.settings.worker.intake_prefetch(),
            broker_max_message: usize::try_from(self.settings.worker.broker_max_message_bytes).unwrap_or(usize::MAX),
            deadline: self.settings.shutdown_deadline(),
        });
        // Stops consuming on shutdown, hands back what has not started and
        // gives the jobs started the deadline to finish.
        let result = fleet::run(consumers, self.pipeline.store.clone(), &self.settings, &self.fleet_id, shutdown).await;
        self.pipeline.metrics.consumer_active(false);
        publisher.close().await;
        let _ = connection.close(200, "shutdown".into()).await;
        result.map_err(WorkerError::from)
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
        let mut work = Some(0u32);
        for queue in topology.pending_queues() {
            work = match (work, depth(queue).await) {
                (Some(sum), Some(n)) => Some(sum.saturating_add(n)),
                _ => None,
            };
        }
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
