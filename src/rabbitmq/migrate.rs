//! Rebuild a queue whose arguments changed (RabbitMQ fixes them at a queue's
//! first declare) without losing a message or stopping producers.
//!
//! For queue `Q`, bound to exchange `E` with key `K`:
//!
//! 1. `Q.migrating` is bound to `E`/`K`, then `Q` unbound: what producers
//!    (and the retry tiers) publish from now on waits there.
//! 2. `Q`'s messages move to `Q.held`, in order; `Q` is deleted and declared
//!    again with the new arguments.
//! 3. `Q.held`'s messages move back into `Q`, then `Q.migrating`'s; `Q` is
//!    bound again and `Q.migrating` unbound once it was found empty, and what
//!    reached it in that instant follows.
//!
//! Each move publishes a copy with confirms and acks the original only then:
//! a failure at any step leaves every message in one of the three queues,
//! and running the rebuild again finishes it. A message published while a
//! binding moves can be routed to both queues; the deliveries ledger keeps
//! the second copy from being posted. Only a message published in the instant
//! of the last binding change can overtake older ones of its conversation.
//! Nothing may consume `Q` meanwhile: the rebuild refuses while it has consumers.

use std::sync::Arc;

use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};

use super::topology::QueueSpec;
use super::{BrokerError, Publisher, amqp};

/// Messages moved per round of confirms.
const MOVE_BATCH: usize = 256;

/// What a rebuild did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    /// Messages the queue held, moved out and back.
    pub held: u64,
    /// Messages published during the rebuild, moved in after them.
    pub arrived: u64,
}

/// Rebuild `spec.name` with `spec.args` (see the module's description);
/// `progress` is told the moves made so far (a message the queue held
/// moves twice: out, then back).
pub async fn rebuild(connection: Arc<Connection>, spec: &QueueSpec, progress: &(dyn Fn(u64) + Sync)) -> Result<Rebuilt, BrokerError> {
    let channel = connection.create_channel().await.map_err(amqp("open channel"))?;
    let queue = spec.name.as_str();
    let (waiting, held) = (format!("{queue}.migrating"), format!("{queue}.held"));
    let publisher = Publisher::open(connection.clone()).await?;
    let mut moved = 0_u64;
    let mut tick = |n: u64| {
        moved += n;
        progress(moved);
    };

    // A rebuild interrupted after step 2 left `Q` declared already (with
    // the new arguments): then only step 3 remains.
    let found = queue_status(&connection, queue).await?;
    if let Some(consumers) = found.filter(|&(_, consumers)| consumers > 0).map(|(_, c)| c) {
        return Err(BrokerError::InUse { queue: queue.to_owned(), consumers });
    }
    for name in [&waiting, &held] {
        channel
            .queue_declare(name.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, holding_args())
            .await
            .map_err(amqp(format!("declare {name}")))?;
    }
    bind(&channel, &waiting, spec).await?;

    let mut rebuilt = Rebuilt::default();
    let mut fresh = spec.declare(&connection, &mut connection.create_channel().await.map_err(amqp("open channel"))?).await?;
    let _ = channel.close(200, "holding queues ready".into()).await;
    if !fresh {
        // Step 1 and 2.
        let channel = connection.create_channel().await.map_err(amqp("open channel"))?;
        unbind(&channel, queue, spec).await?;
        drain(&connection, &publisher, queue, &held, &mut tick).await?;
        delete_drained(&connection, &channel, queue).await?;
        fresh = spec.declare(&connection, &mut connection.create_channel().await.map_err(amqp("open channel"))?).await?;
        if !fresh {
            return Err(BrokerError::Redeclared { queue: queue.to_owned() });
        }
    }
    // Step 3.
    let channel = connection.create_channel().await.map_err(amqp("open channel"))?;
    rebuilt.held += drain(&connection, &publisher, &held, queue, &mut tick).await?;
    rebuilt.arrived += drain(&connection, &publisher, &waiting, queue, &mut tick).await?;
    spec.bind(&channel).await?;
    unbind(&channel, &waiting, spec).await?;
    rebuilt.arrived += drain(&connection, &publisher, &waiting, queue, &mut tick).await?;
    for name in [&held, &waiting] {
        delete_drained(&connection, &channel, name).await?;
    }
    publisher.close().await;
    let _ = channel.close(200, "rebuilt".into()).await;
    Ok(rebuilt)
}

/// Delete `queue`, drained and bound nowhere (so nothing reaches it any
/// more). Quorum queues refuse `if-empty`: the count is checked first.
async fn delete_drained(connection: &Connection, channel: &Channel, queue: &str) -> Result<(), BrokerError> {
    match queue_status(connection, queue).await? {
        None => return Ok(()),
        Some((0, 0)) => {}
        Some((messages, consumers)) => return Err(BrokerError::NotDrained { queue: queue.to_owned(), messages, consumers }),
    }
    channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await.map_err(amqp(format!("delete {queue}")))?;
    Ok(())
}

/// Where a rebuild keeps messages for a while: durable, replicated, and
/// without a delivery limit (nothing consumes it but the rebuild).
fn holding_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args
}

/// Whether a rebuild of `spec` was interrupted: one of its holding queues
/// is still there.
pub async fn interrupted(connection: &Connection, spec: &QueueSpec) -> Result<bool, BrokerError> {
    for suffix in ["held", "migrating"] {
        if queue_status(connection, &format!("{}.{suffix}", spec.name)).await?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `(messages, consumers)` of `queue`, `None` if it does not exist.
pub async fn queue_status(connection: &Connection, queue: &str) -> Result<Option<(u32, u32)>, BrokerError> {
    let channel = connection.create_channel().await.map_err(amqp("open channel"))?;
    let options = QueueDeclareOptions { passive: true, ..Default::default() };
    match channel.queue_declare(queue.into(), options, FieldTable::default()).await {
        Ok(q) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(Some((q.message_count(), q.consumer_count())))
        }
        Err(err) if super::not_found(&err) => Ok(None),
        Err(err) => Err(amqp(format!("find {queue}"))(err)),
    }
}

async fn bind(channel: &Channel, queue: &str, spec: &QueueSpec) -> Result<(), BrokerError> {
    let other = QueueSpec { name: queue.to_owned(), ..spec.clone() };
    other.bind(channel).await
}

async fn unbind(channel: &Channel, queue: &str, spec: &QueueSpec) -> Result<(), BrokerError> {
    channel
        .queue_unbind(queue.into(), spec.exchange.as_str().into(), spec.routing_key.as_str().into(), FieldTable::default())
        .await
        .map_err(amqp(format!("unbind {queue}")))
}

/// Move every message of `from` to `to` (through the default exchange), in
/// order, until `from` is found empty; each original is acked only once its
/// copy is confirmed. A consumer, not `basic.get`: quorum queues with a
/// single active consumer refuse `basic.get`.
async fn drain(
    connection: &Connection,
    publisher: &Publisher,
    from: &str,
    to: &str,
    tick: &mut impl FnMut(u64),
) -> Result<u64, BrokerError> {
    let channel = connection.create_channel().await.map_err(amqp("open channel"))?;
    channel.basic_qos(MOVE_BATCH as u16, BasicQosOptions::default()).await.map_err(amqp("set prefetch"))?;
    let mut consumer = channel
        .basic_consume(from.into(), "herald-migrate".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(amqp(format!("consume {from}")))?;
    let key: Arc<str> = Arc::from(to);
    let mut moved = 0;
    let mut cancelled = false;
    loop {
        let mut batch = Vec::new();
        let wait = if cancelled { Duration::from_secs(2) } else { Duration::from_millis(300) };
        let mut ended = false;
        match tokio::time::timeout(wait, consumer.next()).await {
            Ok(Some(delivery)) => batch.push(delivery.map_err(amqp(format!("consume {from}")))?),
            Ok(None) => ended = true,
            Err(_) => {}
        }
        while !ended && batch.len() < MOVE_BATCH {
            match consumer.next().now_or_never() {
                Some(Some(delivery)) => batch.push(delivery.map_err(amqp(format!("consume {from}")))?),
                Some(None) => ended = true,
                None => break,
            }
        }
        if let Some(last) = batch.last().map(|d| d.delivery_tag) {
            let sent = publisher
                .start_all("", batch.iter().map(|d| (key.clone(), d.data.as_slice(), without_delivery_count(&d.properties))))
                .await;
            for pending in sent {
                pending?.confirmed().await?;
            }
            channel.basic_ack(last, BasicAckOptions { multiple: true }).await.map_err(amqp(format!("ack moved messages of {from}")))?;
            moved += batch.len() as u64;
            tick(batch.len() as u64);
            continue;
        }
        // Nothing came: stop consuming once the queue says it is empty, and
        // move what was on its way before the cancel took effect.
        if cancelled || ended {
            break;
        }
        if queue_status(connection, from).await?.is_none_or(|(messages, _)| messages == 0) {
            channel.basic_cancel("herald-migrate".into(), BasicCancelOptions::default()).await.map_err(amqp(format!("cancel {from}")))?;
            cancelled = true;
        }
    }
    let _ = channel.close(200, "drained".into()).await;
    Ok(moved)
}

/// The message's properties without the broker's count of its deliveries
/// from the old queue (the copy starts anew).
fn without_delivery_count(properties: &lapin::BasicProperties) -> lapin::BasicProperties {
    let mut properties = properties.clone();
    if let Some(headers) = properties.headers().as_ref().filter(|h| h.contains_key("x-delivery-count")) {
        let kept: std::collections::BTreeMap<_, _> =
            headers.inner().iter().filter(|(k, _)| k.as_str() != "x-delivery-count").map(|(k, v)| (k.clone(), v.clone())).collect();
        properties = properties.with_headers(kept.into());
    }
    properties
}
