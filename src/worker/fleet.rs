//! The fleet: how workers share the queues so that each conversation and
//! each bot-and-tenant is paced, and kept in order, by one worker at a time
//! (docs/deploy.md, "Fleet-wide pacing").
//!
//! - **Router** (one worker at a time): takes jobs from the work queue in the
//!   order producers published them and republishes each, unchanged and
//!   confirmed, to the shard of its `(organization_id, integration_id)`.
//! - **Shards** (each consumed by one worker at a time): a worker holds about
//!   `shards / live workers` of them. Inside the worker, jobs of one lane
//!   (`lanes`) run in order.
//! - **Leases** in MongoDB (`fleet`) say who holds what; every heartbeat a
//!   worker renews its leases, counts the live workers, gives up what is
//!   above its share (after the jobs it started are settled; the others go
//!   back to the queue in order) and takes free units up to its share. A
//!   unit whose lease may have run out (no renewal in time) stops by itself.
//!   The shard queues' single-active-consumer flag keeps a worker that
//!   outlived its lease from consuming beside the new holder; the router
//!   starts only once the work queue has no consumer left.
//!
//! With `fleet.shards = 0` every worker consumes the work queue itself.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::lanes::{Lanes, lane_of, lane_of_job};
use super::settle::Settler;
use crate::job::{Job, MAX_BODY_BYTES};
use crate::mongo::{Paced, Store};
use crate::rabbitmq::headers::{self, ROUTED_SEQ, Signer};
use crate::rabbitmq::{self, BrokerError, Publisher, Topology};
use crate::settings::Settings;
use crate::text::error_chain;

/// The shard of a job: a stable hash of its organization and integration
/// (the same in every worker and every release). A body that is not a job
/// goes to shard 0, where it is dead-lettered.
pub fn shard_of(body: &[u8], shards: u16) -> u16 {
    // Borrowed from the body unless a value has escapes.
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        organization_id: Option<Cow<'a, str>>,
        #[serde(borrow)]
        integration_id: Option<Cow<'a, str>>,
    }
    if shards == 0 {
        return 0;
    }
    let Ok(head) = serde_json::from_slice::<Head>(body) else { return 0 };
    let mut hash = Sha256::new();
    hash.update(head.organization_id.as_deref().unwrap_or_default().as_bytes());
    hash.update([0]);
    hash.update(head.integration_id.as_deref().unwrap_or_default().as_bytes());
    let digest = hash.finalize();
    let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    (n % u64::from(shards)) as u16
}

const ROUTER: &str = "router";

fn shard_unit(n: u16) -> String {
    format!("shard/{n}")
}

/// What one session's queue consumers share.
pub(super) struct Consumers {
    pub connection: Arc<Connection>,
    /// The router opens its own connection with it (see `route`).
    pub broker: rabbitmq::Broker,
    pub settler: Arc<Settler>,
    pub lanes: Arc<Lanes>,
    pub topology: Topology,
    /// The prefetch of each shard's consumer.
    pub prefetch: u16,
    /// The prefetch of the work queue's consumer, whose messages no one has
    /// checked yet: bounded by the broker's largest message
    /// (`WorkerSettings::intake_prefetch`).
    pub intake_prefetch: u16,
    /// `worker.broker_max_message_bytes`.
    pub broker_max_message: usize,
    pub deadline: Duration,
}

/// A queue this worker consumes right now.
struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), BrokerError>>,
    /// Being given up: the task releases its lease as soon as it ended.
    leaving: Arc<AtomicBool>,
}

impl Running {
    fn leaving(&self) -> bool {
        self.leaving.load(Ordering::Relaxed)
    }
}

/// Consume the work queue (no shards) or take part in the fleet, until
/// `shutdown` or a broker failure.
pub(super) async fn run(
    consumers: Arc<Consumers>,
    store: Store,
    settings: &Settings,
    id: &str,
    shutdown: &CancellationToken,
) -> Result<(), BrokerError> {
    if settings.fleet.shards == 0 {
        let queue = consumers.topology.work_queue();
        let prefetch = consumers.intake_prefetch;
        return consume(consumers, queue, prefetch, shutdown.clone()).await;
    }
    let fleet = Fleet {
        id: id.to_owned(),
        store,
        shards: settings.fleet.shards,
        lease: settings.fleet.lease(),
        heartbeat: settings.fleet.heartbeat(),
        consumers,
        running: HashMap::new(),
        validity: tokio::sync::watch::Sender::new(Instant::now()),
        seen: false,
        wants: 0,
        unheld: Default::default(),
    };
    fleet.run(shutdown).await
}

/// A worker's name in the fleet: host, process and a random part (several
/// workers may run in one process, as the tests do).
pub(super) fn worker_id() -> String {
    format!("{}-{}-{}", hostname(), std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8])
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "worker".into())
}

struct Fleet {
    id: String,
    store: Store,
    shards: u16,
    lease: Duration,
    heartbeat: Duration,
    consumers: Arc<Consumers>,
    running: HashMap<String, Running>,
    /// Until when (by this process's clock) the leases renewed last are surely
    /// still ours: the renewal was sent after this instant less the lease,
    /// and a second before. Every running unit stops by itself at this
    /// instant unless a renewal moved it (`start`), even while this loop
    /// waits on a slow MongoDB.
    validity: tokio::sync::watch::Sender<Instant>,
    /// A heartbeat has gone out (and the fleet seen) once.
    seen: bool,
    /// Shards this worker would take beyond what it holds (its heartbeat says so).
    wants: u32,
    /// Shards nobody held at the last rebalance.
    unheld: std::collections::HashSet<String>,
}

impl Fleet {
    async fn run(mut self, shutdown: &CancellationToken) -> Result<(), BrokerError> {
        info!(worker = %self.id, shards = self.shards, "joining the fleet");
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => break Ok(()),
            }
            if let Some(err) = self.reap().await {
                break Err(err);
            }
            if let Err(err) = self.rebalance().await {
                warn!(error = %error_chain(&err), "the fleet's leases could not be read or renewed; trying again");
            }
            self.report_held();
        };
        self.consumers.settler.pipeline.metrics.fleet_held(self.shards, false, 0);
        // Every job started is settled before the last requests are written,
        // and those are written before the units are free to take.
        let units = self.stop_all().await;
        if let Err(err) = self.store.fleet_leave(&self.id, paced(&self.consumers).as_ref()).await {
            warn!(error = %error_chain(&err), "could not leave the fleet; the others notice once the lease runs out");
        }
        for unit in units {
            let _ = self.store.fleet_release(&unit, &self.id).await;
        }
        result
    }

    /// Tell the metrics what this worker consumes now: units still running
    /// and neither stopping (a lease that may have run out) nor given up.
    fn report_held(&self) {
        let live = |unit: &&String| self.running.get(*unit).is_some_and(|r| !r.stop.is_cancelled() && !r.leaving());
        let router = self.running.keys().filter(live).any(|u| u == ROUTER);
        let shards = self.running.keys().filter(live).filter(|u| u.starts_with("shard/")).count();
        self.consumers.settler.pipeline.metrics.fleet_held(self.shards, router, shards);
    }

    /// Forget consumers that ended; release what was being given up. A
    /// consumer that failed (the broker went away) ends the session.
    async fn reap(&mut self) -> Option<BrokerError> {
        let ended: Vec<String> = self.running.iter().filter(|(_, r)| r.task.is_finished()).map(|(u, _)| u.clone()).collect();
        let mut failure = None;
        for unit in ended {
            let running = self.running.remove(&unit).expect("listed above");
            let leaving = running.leaving();
            let result = running.task.await.unwrap_or(Ok(()));
            if !leaving {
                let _ = self.store.fleet_release(&unit, &self.id).await;
            }
            if let Err(err) = result {
                failure.get_or_insert(err);
            }
        }
        failure
    }

    async fn rebalance(&mut self) -> Result<(), crate::mongo::StoreError> {
        let sent = Instant::now();
        let workers = self.store.fleet_heartbeat(&self.id, self.lease, self.wants, paced(&self.consumers).as_ref()).await?;
        let live = workers.len().max(1);
        let held = self.store.fleet_renew(&self.id, self.lease).await?;
        self.validity.send_replace(sent + self.lease.saturating_sub(Duration::from_secs(1)));
        // Lost (the lease ran out while MongoDB was unreachable, say): stop
        // at once, without releasing what another worker may hold now.
        let lost: Vec<String> = self.running.keys().filter(|u| !held.contains(u)).cloned().collect();
        for unit in lost {
            warn!(unit = %unit, "lease lost; stopping");
            if let Some(running) = self.running.get_mut(&unit) {
                running.stop.cancel();
            }
        }
        // Held under this worker's name but consumed by none of its tasks: a
        // lease from a session that ended without releasing it (the broker
        // went away while MongoDB did not answer). Free it, or nobody would
        // consume that unit while this worker renews it.
        for unit in held.iter().filter(|u| !self.running.contains_key(*u)) {
            info!(unit = %unit, "releasing a lease left from this worker's last session");
            self.store.fleet_release(unit, &self.id).await?;
        }
        if !std::mem::replace(&mut self.seen, true) {
            // Workers started together see each other only once each has
            // said it is alive: take nothing before the next heartbeat.
            return Ok(());
        }
        let share = usize::from(self.shards).div_ceil(live);
        let mine: Vec<String> =
            self.running.iter().filter(|(u, r)| u.starts_with("shard/") && !r.leaving()).map(|(u, _)| u.clone()).collect();
        // More than a fair share: give the rest up, but only to a worker that
        // said it wants one. The count of live workers comes from records
        // anyone can write; one that never asks for a shard (stale, foreign)
        // must not leave shards unheld.
        let someone_wants = workers.iter().any(|(worker, wants)| *worker != self.id && *wants > 0);
        if mine.len() > share && someone_wants {
            for unit in mine.iter().rev().take(mine.len() - share) {
                info!(unit = %unit, share, live, "giving up a shard to rebalance");
                let running = &self.running[unit];
                running.leaving.store(true, Ordering::Relaxed);
                running.stop.cancel();
            }
            self.wants = 0;
            return Ok(());
        }
        let holders = self.store.fleet_holders().await?;
        let mut wanted = share.saturating_sub(mine.len());
        let mut carried_over = false;
        let mut unheld = std::collections::HashSet::new();
        // Start at a place of this worker's own, so that workers joining
        // together do not all reach for the same shards.
        let offset = u16::from_be_bytes(Sha256::digest(self.id.as_bytes())[..2].try_into().expect("2 bytes")) % self.shards;
        for i in 0..self.shards {
            let unit = shard_unit((offset + i) % self.shards);
            if holders.contains_key(&unit) || self.running.contains_key(&unit) {
                continue;
            }
            // Beyond the share, a shard is taken only once it stayed unheld
            // from one heartbeat to the next: nobody else is taking it.
            let overflow = wanted == 0;
            if overflow && !self.unheld.contains(&unit) {
                unheld.insert(unit);
                continue;
            }
            if self.store.fleet_claim(&unit, &self.id, self.lease).await?.is_some() {
                if overflow {
                    warn!(unit = %unit, share, live, "took a shard beyond this worker's share: it stayed unheld (do the other live workers consume?)");
                } else {
                    info!(unit = %unit, share, live, "took a shard");
                }
                if !std::mem::replace(&mut carried_over, true) {
                    self.carry_over().await;
                }
                let queue = self.consumers.topology.shard_queue((offset + i) % self.shards);
                self.start(unit, |consumers, stop| {
                    let prefetch = consumers.prefetch;
                    consume(consumers, queue, prefetch, stop)
                });
                wanted = wanted.saturating_sub(1);
            }
        }
        self.unheld = unheld;
        self.wants = u32::try_from(wanted).unwrap_or(u32::MAX);
        if !self.running.contains_key(ROUTER)
            && !holders.contains_key(ROUTER)
            && let Some(claims) = self.store.fleet_claim(ROUTER, &self.id, self.lease).await?
        {
            info!(claims, "routing the work queue into the shards");
            self.start(ROUTER.into(), move |consumers, stop| route(consumers, stop, claims));
        }
        Ok(())
    }

    /// Count the recent requests the other workers wrote (the last holders
    /// of the shards just taken among them) in this worker's pacing, before
    /// it sends anything for those shards. A worker that died may have sent
    /// for up to a heartbeat after it wrote: counted as sent.
    async fn carry_over(&self) {
        let Some(pacing) = self.consumers.settler.pipeline.pacing() else { return };
        match self.store.fleet_paced(&self.id).await {
            Ok(others) => {
                let keys: usize = others.iter().map(|o| o.carried.len()).sum();
                for other in &others {
                    let unaccounted = if other.died { self.heartbeat } else { Duration::ZERO };
                    pacing.import(&other.worker, &other.carried, other.behind, unaccounted);
                }
                info!(workers = others.len(), keys, "counted the other workers' recent requests");
            }
            Err(err) => {
                warn!(error = %error_chain(&err), "could not read the other workers' recent requests; pacing from this worker's own")
            }
        }
    }

    fn start<F, Fut>(&mut self, unit: String, consumer: F)
    where
        F: FnOnce(Arc<Consumers>, CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), BrokerError>> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let leaving = Arc::new(AtomicBool::new(false));
        tokio::spawn(stop_when_lease_may_run_out(self.validity.subscribe(), stop.clone(), unit.clone()));
        let consuming = consumer(self.consumers.clone(), stop.clone());
        let (store, id, name, gone, consumers) =
            (self.store.clone(), self.id.clone(), unit.clone(), leaving.clone(), self.consumers.clone());
        let task = tokio::spawn(async move {
            let result = consuming.await;
            // Given up to rebalance: free at once (its last requests written
            // first), so another worker can take it at its next heartbeat.
            if gone.load(Ordering::Relaxed) {
                if let Some(paced) = paced(&consumers) {
                    if let Err(err) = store.fleet_pace(&id, &paced).await {
                        warn!(error = %error_chain(&err), "could not write this worker's recent requests; the next holder paces without them");
                    }
                }
                let _ = store.fleet_release(&name, &id).await;
                info!(unit = %name, "released");
            }
            result
        });
        self.running.insert(unit, Running { stop, task, leaving });
    }

    /// Stop every consumer and wait for them; the units they held (not
    /// released yet).
    async fn stop_all(&mut self) -> Vec<String> {
        for running in self.running.values() {
            running.stop.cancel();
        }
        let mut units = Vec::new();
        for (unit, running) in self.running.drain() {
            let _ = running.task.await;
            units.push(unit);
        }
        units
    }
}

/// This worker's recent requests, when it paces itself.
fn paced(consumers: &Consumers) -> Option<Paced> {
    let pacing = consumers.settler.pipeline.pacing()?;
    Some(Paced { carried: pacing.export(), horizon: pacing.horizon() })
}

/// Cancel `stop` once `validity` has passed without a renewal moving it: the
/// lease may have run out in MongoDB, and another worker may take the unit.
/// Ends when `stop` is cancelled for any other reason.
async fn stop_when_lease_may_run_out(mut validity: tokio::sync::watch::Receiver<Instant>, stop: CancellationToken, unit: String) {
    loop {
        let until = *validity.borrow_and_update();
        tokio::select! {
            () = tokio::time::sleep_until(until) => break,
            changed = validity.changed() => if changed.is_err() { break },
            () = stop.cancelled() => return,
        }
    }
    if !stop.is_cancelled() {
        warn!(unit = %unit, "the fleet's leases could not be renewed in time; stopping");
        stop.cancel();
    }
}

/// Consume `queue` until `stop`: each job waits for its lane's turn, then is
/// handled; on `stop`, the jobs started are given `deadline` to finish, and
/// then the channel closes and RabbitMQ returns every job not settled, in
/// order. The consumer stays registered until then, so that the shard's
/// single-active-consumer flag keeps the next holder waiting until every job
/// this worker held is back in the queue.
async fn consume(consumers: Arc<Consumers>, queue: String, prefetch: u16, stop: CancellationToken) -> Result<(), BrokerError> {
    let channel = Arc::new(consumers.connection.create_channel().await.map_err(rabbitmq::amqp("open consume channel"))?);
    channel.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(rabbitmq::amqp("set prefetch"))?;
    // Manual acks (no_ack: false): a job is acked only once it is
    // delivered, or its retry or dead letter is confirmed by the broker.
    let mut consumer = channel
        .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(rabbitmq::amqp(format!("consume {queue}")))?;
    info!(queue = %queue, prefetch, "consuming");
    let mut jobs = JoinSet::new();
    // Redelivered jobs (given back, or held by a worker that died) come back
    // first, but not always in their order: a closed channel's unacked
    // messages return in an order the broker chooses. They are held until
    // the next fresh job (or a short quiet) and enter their lanes in the
    // order the router took them.
    let mut returned: Vec<Delivery> = Vec::new();
    let result = loop {
        let quiet = tokio::time::sleep(RETURNED_QUIET);
        let delivery = tokio::select! {
            next = consumer.next() => next,
            () = quiet, if !returned.is_empty() => {
                start_in_order(&consumers, &channel, &mut jobs, &stop, &mut returned);
                continue;
            }
            () = stop.cancelled() => break Ok(()),
        };
        let delivery = match delivery {
            Some(Ok(delivery)) => delivery,
            Some(Err(err)) => break Err(BrokerError::Amqp { operation: "consume".into(), source: err }),
            // The broker cancelled the consumer (queue deleted, node going down).
            None => break Err(BrokerError::ConsumerCancelled { queue: queue.clone() }),
        };
        while jobs.try_join_next().is_some() {}
        if delivery.redelivered {
            returned.push(delivery);
            continue;
        }
        start_in_order(&consumers, &channel, &mut jobs, &stop, &mut returned);
        start(&consumers, &channel, &mut jobs, &stop, delivery);
    };
    start_in_order(&consumers, &channel, &mut jobs, &stop, &mut returned);
    // Jobs not started are left unacked (`stop` is cancelled); those sending
    // get the deadline; whatever is still unacked after it returns to the
    // queue when the channel closes.
    stop.cancel();
    let in_flight = jobs.len();
    if tokio::time::timeout(consumers.deadline, async { while jobs.join_next().await.is_some() {} }).await.is_err() {
        warn!(queue = %queue, in_flight, deadline = ?consumers.deadline, "jobs did not finish by the deadline; they go back to the queue");
    }
    let _ = channel.close(200, "stopped".into()).await;
    result
}

/// The first place in the routing order of the router that took the router
/// unit for the `claims`-th time: every later router's places are above
/// every earlier router's, whatever their clocks say (up to 2^40 jobs per
/// router). The base keeps them above the microseconds since 1970 that
/// routers before this scheme stamped (until 2041).
pub(crate) fn first_routed_seq(claims: i64) -> i64 {
    const BASE: i64 = 1 << 11;
    (BASE + claims.clamp(0, (1 << 22) - 1)) << 40
}

/// The job's properties with its place in the routing order (`last` + 1,
/// from [`first_routed_seq`]). Headers over
/// `budget` (a producer's, which herald never checked) are cut to what herald
/// needs, so that the routed copy always fits a frame: herald's own headers
/// if they verify (a forged set is ignored downstream anyway), the broker's
/// bookkeeping and a short `traceparent`.
fn stamped(properties: lapin::BasicProperties, body: &[u8], signer: &Signer, budget: usize, last: &mut i64) -> lapin::BasicProperties {
    *last += 1;
    let mut headers = properties.headers().clone().unwrap_or_default();
    if headers::table_size(&headers) + ROUTED_SEQ.len() + 16 > budget {
        let message_id = properties.message_id().as_ref().map(|id| id.to_string());
        headers = headers::routable(&headers, message_id.as_deref(), body, signer, budget);
        warn!(
            message_id = message_id.as_deref(),
            budget, "a job's headers were over the budget: only herald's own and traceparent were routed"
        );
    }
    headers.insert(ROUTED_SEQ.into(), lapin::types::AMQPValue::LongLongInt(*last));
    properties.with_headers(headers)
}

/// A job whose body is over [`MAX_BODY_BYTES`] never reaches a shard: it is
/// rejected without requeue, so the broker dead-letters it itself (its
/// `x-death` says `rejected`; `herald dlq` reads that as `invalid_job`)
/// without the worker copying the body into a publish. The reject is queued
/// on the channel, not waited for, and the body dropped at once: a run of
/// large messages is never held beside each other while rejects travel.
fn refuse_oversized(consumers: &Consumers, channel: &Channel, delivery: Delivery) -> Result<(), BrokerError> {
    let message_id = delivery.properties.message_id().as_ref().map(|id| id.to_string());
    if delivery.data.len() > consumers.broker_max_message {
        error!(
            message_id = message_id.as_deref(),
            bytes = delivery.data.len(),
            broker_max_message_bytes = consumers.broker_max_message,
            "the broker accepted a message larger than worker.broker_max_message_bytes, so the router's memory is not \
             bounded as configured: set max_message_size in rabbitmq.conf to that value (or raise the setting to the broker's)"
        );
    }
    warn!(
        message_id = message_id.as_deref(),
        bytes = delivery.data.len(),
        limit = MAX_BODY_BYTES,
        "job body over the limit: dead-lettered at the router"
    );
    consumers.settler.pipeline.metrics.job_dead_lettered(crate::outcome::Reason::InvalidJob);
    let tag = delivery.delivery_tag;
    drop(delivery);
    rabbitmq::reject_queued(channel, tag).map_err(rabbitmq::amqp("reject an oversized job"))
}

fn routed_seq(delivery: &Delivery) -> i64 {
    routed_seq_of(&delivery.properties)
}

fn routed_seq_of(properties: &lapin::BasicProperties) -> i64 {
    match properties.headers().as_ref().and_then(|h| h.inner().get(ROUTED_SEQ)) {
        Some(lapin::types::AMQPValue::LongLongInt(seq)) => *seq,
        _ => 0,
    }
}

/// Room the router keeps in a frame for the job's other properties and the
/// header it adds (`stamped`).
const ROUTED_HEADROOM: usize = 1024;

/// Bodies up to this size are decoded when they arrive (`start`).
const PREDECODE_MAX_BYTES: usize = 4096;

/// The most deliveries the router publishes as one batch.
const ROUTE_BATCH: usize = 64;

/// How long redelivered jobs are held for the rest of their batch.
const RETURNED_QUIET: Duration = Duration::from_millis(100);

/// Start the held redelivered jobs in the order the router took them.
fn start_in_order(
    consumers: &Arc<Consumers>,
    channel: &Arc<Channel>,
    jobs: &mut JoinSet<()>,
    stop: &CancellationToken,
    returned: &mut Vec<Delivery>,
) {
    returned.sort_by_key(routed_seq);
    for delivery in returned.drain(..) {
        start(consumers, channel, jobs, stop, delivery);
    }
}

/// Give a job its place in its lane and handle it when its turn comes.
fn start(consumers: &Arc<Consumers>, channel: &Arc<Channel>, jobs: &mut JoinSet<()>, stop: &CancellationToken, delivery: Delivery) {
    let settler = consumers.settler.clone();
    let channel = channel.clone();
    let stop = stop.clone();
    // A small job is decoded once, here, for its lane and for the step; a
    // larger one is read for its lane only and decoded when its turn comes,
    // so that jobs waiting in their lanes hold no second copy of a large body.
    let decoded = (delivery.data.len() <= PREDECODE_MAX_BYTES).then(|| Job::decode(&delivery.data).ok()).flatten();
    let lane = decoded.as_ref().map_or_else(|| lane_of(&delivery.data), lane_of_job);
    match consumers.lanes.enter(lane) {
        Ok(mut turn) => {
            jobs.spawn(async move {
                turn.wait().await;
                if stop.is_cancelled() {
                    // Left unacked: it returns with the others when the
                    // channel closes (a nack now would put it back at once,
                    // where a next holder could take it before the jobs
                    // still being sent here are settled).
                    drop(delivery);
                } else {
                    // Boxed: the step's state is kilobytes, and a task's
                    // future is copied whole each time tokio moves it
                    // (spawn, completion, join).
                    Box::pin(settler.handle(delivery, decoded, &channel, &stop, &turn.handoff())).await;
                }
            });
        }
        Err(_full) => {
            jobs.spawn(async move { settler.lane_full(delivery, &channel).await });
        }
    }
}

/// Route the work queue into the shards, in order, until `stop`: each job is
/// published unchanged (body, properties, headers) to its shard and acked
/// once the broker confirmed it.
async fn route(consumers: Arc<Consumers>, stop: CancellationToken, claims: i64) -> Result<(), BrokerError> {
    let topology = &consumers.topology;
    let queue = topology.work_queue();
    let exchange = topology.shard_exchange();
    // Its own connection: routing adds eight frames to every job (deliver,
    // publish, confirm, ack), and one connection's frames all go through one
    // I/O thread, which the shards' consumers share.
    let (connection, node) = consumers.broker.connect_node("herald router").await?;
    let connection = Arc::new(connection);
    let channel = connection.create_channel().await.map_err(rabbitmq::amqp("open routing channel"))?;
    channel.basic_qos(consumers.intake_prefetch, BasicQosOptions::default()).await.map_err(rabbitmq::amqp("set prefetch"))?;
    let store = &consumers.settler.pipeline.store;
    let previous = store.fleet_vias(ROUTER).await.unwrap_or_else(|err| {
        warn!(error = %error_chain(&err), "could not read the broker nodes of the last routers");
        Vec::new()
    });
    if !alone_on(&channel, &queue, &previous, &stop).await? {
        let _ = connection.close(200, "stopped".into()).await;
        return Ok(());
    }
    if let Err(err) = store.fleet_note_via(ROUTER, &node, true).await {
        warn!(error = %error_chain(&err), "could not note this router's broker node; if that node is lost, a next router waits for it to return");
    }
    let publisher = Publisher::open(connection.clone()).await?;
    let mut consumer = channel
        .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(rabbitmq::amqp(format!("consume {queue}")))?;
    info!(queue = %queue, exchange = %exchange, shards = topology.shards, prefetch = consumers.intake_prefetch, "routing");
    let mut last = first_routed_seq(claims);
    // The shards' routing keys, made once.
    let keys: Vec<Arc<str>> = (0..topology.shards.max(1)).map(|n| Arc::from(n.to_string())).collect();
    let mut confirms: Confirms = FuturesOrdered::new();
    let result = loop {
        tokio::select! {
            Some(first) = confirms.next(), if !confirms.is_empty() => {
                if let Err(err) = ack_confirmed(&channel, first, &mut confirms) {
                    break Err(err);
                }
            }
            next = consumer.next() => {
                // The deliveries already here go out as one batch.
                let mut batch = Vec::new();
                let mut next = Some(next);
                let ended = loop {
                    match next {
                        // A body over the job limit is refused as it comes,
                        // before it is copied into a publish or held beside
                        // the next.
                        Some(Some(Ok(delivery))) if delivery.data.len() > MAX_BODY_BYTES => {
                            if let Err(err) = refuse_oversized(&consumers, &channel, delivery) {
                                break Some(err);
                            }
                        }
                        Some(Some(Ok(delivery))) => batch.push(delivery),
                        Some(Some(Err(err))) => break Some(BrokerError::Amqp { operation: "consume".into(), source: err }),
                        Some(None) => break Some(BrokerError::ConsumerCancelled { queue: queue.clone() }),
                        None => break None,
                    }
                    if batch.len() >= ROUTE_BATCH {
                        break None;
                    }
                    next = consumer.next().now_or_never();
                };
                // The properties move to the publish (the deliveries are
                // kept only for their tags).
                // A producer's headers fit its own publish; the routed copy
                // adds one header, so only a table at the frame's edge is cut.
                let budget = publisher.frame_max().saturating_sub(ROUTED_HEADROOM);
                let signer = &consumers.settler.signer;
                let properties: Vec<_> =
                    batch.iter_mut().map(|d| stamped(std::mem::take(&mut d.properties), &d.data, signer, budget, &mut last)).collect();
                let routed: Vec<_> = batch
                    .iter()
                    .zip(properties)
                    .map(|(d, properties)| (keys[usize::from(shard_of(&d.data, topology.shards))].clone(), d.data.as_slice(), properties))
                    .collect();
                let sent = publisher.start_all(&exchange, routed).await;
                let mut failed = None;
                for (delivery, sent) in batch.into_iter().zip(sent) {
                    match sent {
                        Ok(pending) => {
                            let tag = delivery.delivery_tag;
                            confirms.push_back(Box::pin(async move { (tag, pending.confirmed().await) }));
                        }
                        // Left unacked, with every later one: they return,
                        // in order, when the channel closes.
                        Err(err) => {
                            failed = Some(err);
                            break;
                        }
                    }
                }
                if let Some(err) = failed.or(ended) {
                    break Err(err);
                }
            }
            () = stop.cancelled() => break Ok(()),
        }
    };
    // Confirms already asked for are awaited and acked, up to the first that
    // failed (none after a failure). The consumer stays registered until the
    // channel closes: then RabbitMQ returns every job not acked, in order,
    // before a next router can start (`alone_on`); those already in their
    // shard reach it twice, and the ledger keeps the copy from being posted
    // twice.
    if result.is_ok() {
        while let Some(first) = confirms.next().await {
            if ack_confirmed(&channel, first, &mut confirms).is_err() {
                break;
            }
        }
    }
    let _ = channel.close(200, "stopped".into()).await;
    publisher.close().await;
    // The broker answered the close: this router's consumer is gone from
    // its node, and a next router need not allow for it.
    if connection.close(200, "stopped".into()).await.is_ok()
        && let Err(err) = store.fleet_note_via(ROUTER, &node, false).await
    {
        warn!(error = %error_chain(&err), "could not note that this router stopped consuming");
    }
    result
}

/// Wait until `queue` has no consumer; false if `stop` came first. A router
/// that outlived its lease (a long pause, a slow MongoDB) stops by itself,
/// and the jobs it held return to the work queue only when its channel
/// closes: routing beside it, or before they are back, would route them
/// behind later jobs. (RabbitMQ's single-active-consumer flag would do this,
/// but it cannot be added to an existing queue, and `fleet.shards = 0`
/// needs every worker on the work queue.)
///
/// Consumers of earlier routers on lost broker nodes are not waited for. A
/// quorum queue still counts a consumer of a node that crashed until that
/// node is back (it may only be cut off), but has returned its jobs, in
/// order, at once: that consumer can take nothing more, and waiting for it
/// would stop every delivery until the node returns. `previous` are the
/// nodes earlier routers consumed through and did not close cleanly (one
/// such consumer each at most): as many consumers as of those nodes do not
/// answer are allowed for.
async fn alone_on(channel: &lapin::Channel, queue: &str, previous: &[String], stop: &CancellationToken) -> Result<bool, BrokerError> {
    const POLL: Duration = Duration::from_millis(250);
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    for polls in 0_u64.. {
        let declared = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .map_err(rabbitmq::amqp(format!("inspect {queue}")))?;
        let consumers = declared.consumer_count();
        if consumers == 0 {
            break;
        }
        // Once a second: an earlier router's node may be gone.
        if polls % 4 == 0 && !previous.is_empty() {
            let answers = futures_util::future::join_all(previous.iter().map(|node| rabbitmq::node_answers(node))).await;
            let lost: Vec<&str> = previous.iter().zip(answers).filter(|(_, answers)| !answers).map(|(node, _)| node.as_str()).collect();
            if consumers as usize <= lost.len() {
                warn!(queue = %queue, consumers, lost = ?lost, "the work queue's consumers are earlier routers', on broker nodes that do not answer; their jobs are back in the queue: routing");
                break;
            }
        }
        if polls % 40 == 0 {
            warn!(queue = %queue, consumers, "the work queue still has a consumer (a router that outlived its lease, or a worker with fleet.shards = 0); routing starts when it is gone");
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = stop.cancelled() => return Ok(false),
        }
    }
    Ok(true)
}

/// Routed jobs waiting for their publish confirms, in the order consumed.
type Confirms = FuturesOrdered<futures_util::future::BoxFuture<'static, (u64, Result<(), BrokerError>)>>;

/// Ack `first` and every routed job whose confirm is already in, with one
/// `multiple` ack up to the newest (they come in the order consumed, so
/// every older job is settled already): one frame per burst instead of one
/// per job. A failed confirm acks those before it and leaves its own job
/// unacked, to return to the work queue with every later one. The ack is
/// queued, not waited for (`rabbitmq::ack_queued`).
fn ack_confirmed(channel: &Channel, first: (u64, Result<(), BrokerError>), confirms: &mut Confirms) -> Result<(), BrokerError> {
    let mut newest: Option<u64> = None;
    let mut next = Some(first);
    while let Some((tag, confirmed)) = next {
        if let Err(err) = confirmed {
            if let Some(newest) = newest {
                let _ = rabbitmq::ack_queued(channel, newest, true);
            }
            return Err(err);
        }
        newest = Some(tag);
        next = confirms.next().now_or_never().flatten();
    }
    if let Some(newest) = newest {
        let _ = rabbitmq::ack_queued(channel, newest, true);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Routers used to stamp their wall clock: a router that took over with
    /// a clock behind its predecessor's placed its jobs before the
    /// predecessor's, and a shard that got both back (a handover) started
    /// them out of order. Places now come from the router unit's claim count.
    #[test]
    fn a_later_router_places_its_jobs_after_every_earlier_routers_whatever_the_clocks() {
        let signer = Signer::new([7; 32]);
        let place = |last: &mut i64| routed_seq_of(&stamped(lapin::BasicProperties::default(), b"{}", &signer, 4096, last));
        let mut first = first_routed_seq(41);
        let earlier: Vec<i64> = (0..1000).map(|_| place(&mut first)).collect();
        let mut second = first_routed_seq(42);
        let later: Vec<i64> = (0..3).map(|_| place(&mut second)).collect();
        assert!(earlier.windows(2).all(|w| w[0] < w[1]), "strictly increasing within a router");
        assert!(later.iter().all(|l| earlier.iter().all(|e| e < l)), "every later router's places come after");
        // Above what routers of earlier versions stamped (microseconds since 1970), until 2041.
        let stamped_in_2040 = chrono::DateTime::parse_from_rfc3339("2040-12-31T00:00:00Z").unwrap().timestamp_micros();
        assert!(first_routed_seq(1) > stamped_in_2040);
    }

    #[test]
    fn a_job_s_shard_depends_only_on_its_organization_and_integration() {
        let job = |org: &str, integration: &str, conversation: &str| {
            format!(r#"{{"organization_id":"{org}","integration_id":"{integration}","recipient":{{"conversation_id":"{conversation}"}}}}"#)
        };
        let a = shard_of(job("org-a", "teams", "19:1").as_bytes(), 16);
        assert_eq!(a, shard_of(job("org-a", "teams", "19:2").as_bytes(), 16));
        assert!(a < 16);
        let spread: std::collections::HashSet<u16> =
            (0..200).map(|i| shard_of(job(&format!("org-{i}"), "teams", "c").as_bytes(), 16)).collect();
        assert_eq!(spread.len(), 16, "200 organizations reach every shard");
        assert_eq!(shard_of(b"not a job", 16), 0);
        // Fixed: a release that hashed differently would re-route every conversation.
        assert_eq!(shard_of(job("org-a", "teams", "19:1").as_bytes(), 1024), shard_of(job("org-a", "teams", "x").as_bytes(), 1024));
    }
}
