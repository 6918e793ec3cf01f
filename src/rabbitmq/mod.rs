//! The RabbitMQ adapter: topology (contract §3), confirmed publishing, headers.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};

/// The routing key of Microsoft Teams jobs on the work exchange.
pub const ROUTING_KEY: &str = "msteams";

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("RabbitMQ {operation} failed")]
    Amqp {
        operation: String,
        #[source]
        source: lapin::Error,
    },
    #[error("the broker cancelled the consumer of {queue}")]
    ConsumerCancelled { queue: String },
    #[error("the broker refused the message published to {exchange:?} (nack)")]
    Nacked { exchange: String },
    #[error("the message published to {exchange:?} with routing key {routing_key:?} reached no queue (returned as unroutable)")]
    Unroutable { exchange: String, routing_key: String },
}

pub(crate) fn amqp(operation: impl Into<String>) -> impl FnOnce(lapin::Error) -> BrokerError {
    let operation = operation.into();
    move |source| BrokerError::Amqp { operation, source }
}

/// Names of every exchange and queue under one prefix.
#[derive(Debug, Clone)]
pub struct Topology {
    pub prefix: String,
    pub tiers: Vec<Duration>,
    pub delivery_limit: u32,
}

/// `5s`, `2m`, `1h`: the tier part of a retry queue's name.
pub fn tier_label(tier: Duration) -> String {
    let secs = tier.as_secs();
    if secs >= 3600 && secs % 3600 == 0 {
        format!("{}h", secs / 3600)
    } else if secs >= 60 && secs % 60 == 0 {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

impl Topology {
    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }
    pub fn work_queue(&self) -> String {
        format!("{}.msteams", self.prefix)
    }
    pub fn retry_exchange(&self) -> String {
        format!("{}.retry", self.prefix)
    }
    pub fn retry_queue(&self, tier: Duration) -> String {
        format!("{}.msteams.retry.{}", self.prefix, tier_label(tier))
    }
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    pub fn dead_queue(&self) -> String {
        format!("{}.msteams.dead", self.prefix)
    }

    /// Every queue of the topology (for tools and test clean-up).
    pub fn queues(&self) -> Vec<String> {
        let mut queues = vec![self.work_queue(), self.dead_queue()];
        queues.extend(self.tiers.iter().map(|t| self.retry_queue(*t)));
        queues
    }

    pub fn exchanges(&self) -> Vec<String> {
        vec![self.jobs_exchange(), self.retry_exchange(), self.dead_exchange()]
    }

    /// Declare everything; idempotent as long as the arguments are unchanged
    /// (RabbitMQ refuses to redeclare a queue with other arguments).
    pub async fn declare(&self, connection: &Connection) -> Result<(), BrokerError> {
        let channel = connection.create_channel().await.map_err(amqp("open channel"))?;
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        for exchange in self.exchanges() {
            channel
                .exchange_declare(exchange.as_str().into(), ExchangeKind::Direct, durable, FieldTable::default())
                .await
                .map_err(amqp(format!("declare exchange {exchange}")))?;
        }
        let queue = QueueDeclareOptions { durable: true, ..Default::default() };

        // The work queue: quorum for replication and delivery counting; the
        // delivery limit turns a job that crashes workers into a dead letter,
        // and at-least-once dead-lettering (which needs reject-publish
        // overflow) makes sure that dead letter is not lost on the way.
        let mut work = quorum_args();
        work.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(self.delivery_limit)));
        dead_letter_to(&mut work, &self.dead_exchange());
        self.declare_queue(&channel, &self.work_queue(), queue, work, &self.jobs_exchange(), ROUTING_KEY).await?;

        // Retry tiers: a fixed TTL each, then back to the work exchange.
        for tier in &self.tiers {
            let mut args = quorum_args();
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(tier.as_millis() as i64));
            dead_letter_to(&mut args, &self.jobs_exchange());
            let name = self.retry_queue(*tier);
            self.declare_queue(&channel, &name, queue, args, &self.retry_exchange(), &tier_label(*tier)).await?;
        }

        // The dead-letter queue: operators list and replay from here. No
        // delivery limit: browsing it must never make a dead letter vanish.
        // No x-delivery-limit argument: RabbitMQ 3.x then has no limit, and a
        // -1 there would drop a message at its first return (seen on 3.10).
        // Browsing returns messages by closing the channel, which RabbitMQ 4
        // does not count against its default limit (docs/operations.md).
        self.declare_queue(&channel, &self.dead_queue(), queue, quorum_args(), &self.dead_exchange(), ROUTING_KEY).await?;
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(())
    }

    async fn declare_queue(
        &self,
        channel: &Channel,
        name: &str,
        options: QueueDeclareOptions,
        args: FieldTable,
        exchange: &str,
        routing_key: &str,
    ) -> Result<(), BrokerError> {
        channel.queue_declare(name.into(), options, args).await.map_err(amqp(format!("declare queue {name}")))?;
        channel
            .queue_bind(name.into(), exchange.into(), routing_key.into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .map_err(amqp(format!("bind queue {name}")))?;
        Ok(())
    }
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args
}

fn dead_letter_to(args: &mut FieldTable, exchange: &str) {
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(exchange.into()));
    args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(ROUTING_KEY.into()));
    args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
    args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
}

pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let mut properties = ConnectionProperties::default();
    properties = properties.with_connection_name(name.into());
    Connection::connect(url, properties).await.map_err(amqp("connect"))
}

/// A channel in confirm mode: every publish waits for the broker's ack.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn open(connection: &Connection) -> Result<Self, BrokerError> {
        let channel = connection.create_channel().await.map_err(amqp("open publish channel"))?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(amqp("enable publisher confirms"))?;
        Ok(Self { channel })
    }

    /// Publish persistently with `mandatory` and wait for the confirm. An
    /// unroutable message or a nack is an error, never a silent drop.
    pub async fn publish(&self, exchange: &str, routing_key: &str, body: &[u8], properties: BasicProperties) -> Result<(), BrokerError> {
        let pending = self.start(exchange, routing_key, body, properties).await?;
        pending.confirmed().await
    }

    /// Send a message and return without waiting for its confirm, so that
    /// a batch can be confirmed together (`Pending::confirmed`).
    pub async fn start(&self, exchange: &str, routing_key: &str, body: &[u8], properties: BasicProperties) -> Result<Pending, BrokerError> {
        let properties = properties.with_delivery_mode(2);
        let confirm = self
            .channel
            .basic_publish(exchange.into(), routing_key.into(), BasicPublishOptions { mandatory: true, immediate: false }, body, properties)
            .await
            .map_err(amqp(format!("publish to {exchange}")))?;
        Ok(Pending { confirm, exchange: exchange.to_owned(), routing_key: routing_key.to_owned() })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }
}

/// A published message whose confirm has not been awaited yet.
pub struct Pending {
    confirm: lapin::PublisherConfirm,
    exchange: String,
    routing_key: String,
}

impl Pending {
    /// Wait for the broker: an ack of a routed message is success.
    pub async fn confirmed(self) -> Result<(), BrokerError> {
        let confirm = self.confirm.await.map_err(amqp(format!("confirm of publish to {}", self.exchange)))?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(BrokerError::Unroutable { exchange: self.exchange, routing_key: self.routing_key }),
            Confirmation::Nack(_) => Err(BrokerError::Nacked { exchange: self.exchange }),
            Confirmation::NotRequested => unreachable!("the channel is in confirm mode"),
        }
    }
}

/// Reading and writing the `x-herald-*` headers.
pub mod headers {
    use super::*;

    pub const REASON: &str = "x-herald-reason";
    pub const TEAMS_CODE: &str = "x-herald-teams-code";
    pub const HTTP_STATUS: &str = "x-herald-http-status";
    pub const CORRELATION_ID: &str = "x-herald-correlation-id";
    pub const ERROR: &str = "x-herald-error";
    pub const ATTEMPTS: &str = "x-herald-attempts";
    pub const ORGANIZATION_ID: &str = "x-herald-organization-id";
    pub const ORG_INTEGRATION_ID: &str = "x-herald-org-integration-id";
    pub const DEAD_LETTERED_AT: &str = "x-herald-dead-lettered-at";
    pub const REPLAYS: &str = "x-herald-replays";
    /// Delayed retries taken so far (selects the next tier).
    pub const HOPS: &str = "x-herald-retry-hops";
    /// The reason of the last failure, on a message in a retry tier.
    pub const LAST_REASON: &str = "x-herald-last-reason";
    pub const TRACEPARENT: &str = "traceparent";

    pub fn get_str(table: Option<&FieldTable>, key: &str) -> Option<String> {
        match table?.inner().get(key)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        }
    }

    pub fn get_u32(table: Option<&FieldTable>, key: &str) -> Option<u32> {
        let value = table?.inner().get(key)?;
        let n: i64 = match value {
            AMQPValue::LongLongInt(n) => *n,
            AMQPValue::LongInt(n) => i64::from(*n),
            AMQPValue::LongUInt(n) => i64::from(*n),
            AMQPValue::ShortInt(n) => i64::from(*n),
            AMQPValue::ShortUInt(n) => i64::from(*n),
            AMQPValue::ShortShortInt(n) => i64::from(*n),
            AMQPValue::ShortShortUInt(n) => i64::from(*n),
            AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).parse().ok()?,
            _ => return None,
        };
        u32::try_from(n).ok()
    }

    pub fn set_str(table: &mut FieldTable, key: &str, value: &str) {
        table.insert(ShortString::from(key), AMQPValue::LongString(LongString::from(value)));
    }

    pub fn set_u32(table: &mut FieldTable, key: &str, value: u32) {
        table.insert(ShortString::from(key), AMQPValue::LongLongInt(i64::from(value)));
    }

    /// The broker's own bookkeeping, which a republished message must not carry.
    pub const BROKER_BOOKKEEPING: [&str; 5] =
        ["x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason", "x-delivery-count"];

    /// A copy of `table` without the broker's bookkeeping and the `drop` keys.
    pub fn copy_without(table: Option<&FieldTable>, drop: &[&str]) -> FieldTable {
        let mut out = FieldTable::default();
        if let Some(table) = table {
            for (key, value) in table.inner() {
                if !BROKER_BOOKKEEPING.contains(&key.as_str()) && !drop.contains(&key.as_str()) {
                    out.insert(key.clone(), value.clone());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let t = Topology {
            prefix: "herald".into(),
            tiers: vec![Duration::from_secs(5), Duration::from_secs(120), Duration::from_secs(3600)],
            delivery_limit: 20,
        };
        assert_eq!(t.jobs_exchange(), "herald.jobs");
        assert_eq!(t.work_queue(), "herald.msteams");
        assert_eq!(t.retry_exchange(), "herald.retry");
        assert_eq!(t.retry_queue(Duration::from_secs(5)), "herald.msteams.retry.5s");
        assert_eq!(t.retry_queue(Duration::from_secs(120)), "herald.msteams.retry.2m");
        assert_eq!(t.retry_queue(Duration::from_secs(3600)), "herald.msteams.retry.1h");
        assert_eq!(t.retry_queue(Duration::from_secs(90)), "herald.msteams.retry.90s");
        assert_eq!(t.dead_exchange(), "herald.dead");
        assert_eq!(t.dead_queue(), "herald.msteams.dead");
        assert_eq!(t.queues().len(), 5);
    }

    #[test]
    fn headers_round_trip_and_bookkeeping_is_dropped() {
        let mut table = FieldTable::default();
        headers::set_str(&mut table, headers::REASON, "teams_forbidden");
        headers::set_u32(&mut table, headers::ATTEMPTS, 3);
        table.insert("x-death".into(), AMQPValue::LongString("x".into()));
        assert_eq!(headers::get_str(Some(&table), headers::REASON).as_deref(), Some("teams_forbidden"));
        assert_eq!(headers::get_u32(Some(&table), headers::ATTEMPTS), Some(3));
        let clean = headers::copy_without(Some(&table), &[headers::ATTEMPTS]);
        assert!(!clean.contains_key("x-death"));
        assert!(!clean.contains_key(headers::ATTEMPTS));
        assert!(clean.contains_key(headers::REASON));
    }
}
