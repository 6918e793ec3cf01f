//! The RabbitMQ topology (docs/contract.md §3): names, arguments, and its
//! declaration. Built from the settings where the broker adapter lives.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

use super::{BrokerError, ROUTING_KEY, amqp};
use crate::settings::Settings;

/// Names of every exchange and queue under one prefix.
#[derive(Debug, Clone)]
pub struct Topology {
    pub prefix: String,
    pub tiers: Vec<Duration>,
    pub delivery_limit: u32,
    /// Shard queues behind the work queue (`fleet.shards`); 0: none.
    pub shards: u16,
}

impl From<&Settings> for Topology {
    fn from(settings: &Settings) -> Self {
        Self {
            prefix: settings.topology_prefix.clone(),
            tiers: settings.retry_tiers(),
            delivery_limit: settings.worker.broker_delivery_limit,
            shards: settings.fleet.shards,
        }
    }
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
    /// Where the router publishes each job, routing key = its shard's number.
    pub fn shard_exchange(&self) -> String {
        format!("{}.shards", self.prefix)
    }
    pub fn shard_queue(&self, shard: u16) -> String {
        format!("{}.msteams.shard.{shard}", self.prefix)
    }
    /// The queues jobs wait in before they are processed: the work queue and
    /// every shard queue.
    pub fn pending_queues(&self) -> Vec<String> {
        let mut queues = vec![self.work_queue()];
        queues.extend((0..self.shards).map(|s| self.shard_queue(s)));
        queues
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
        let mut queues = self.pending_queues();
        queues.push(self.dead_queue());
        queues.extend(self.tiers.iter().map(|t| self.retry_queue(*t)));
        queues
    }

    pub fn exchanges(&self) -> Vec<String> {
        let mut exchanges = vec![self.jobs_exchange(), self.retry_exchange(), self.dead_exchange()];
        if self.shards > 0 {
            exchanges.push(self.shard_exchange());
        }
        exchanges
    }

    /// Every queue with its arguments and its binding, in declaration order.
    pub fn specs(&self) -> Vec<QueueSpec> {
        let mut specs = Vec::new();
        // The work queue: quorum for replication and delivery counting; the
        // broker's delivery limit is a backstop for a job that kills workers
        // before herald claims it (herald counts the attempts that crash
        // after their claim itself, `worker.delivery_limit`: RabbitMQ before
        // 4.3 also counts every handover between workers). At-least-once
        // dead-lettering (which needs reject-publish overflow) makes sure
        // that dead letter is not lost on the way.
        let mut work = quorum_args();
        work.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(self.delivery_limit)));
        dead_letter_to(&mut work, &self.dead_exchange());
        specs.push(QueueSpec::new(self.work_queue(), work.clone(), self.jobs_exchange(), ROUTING_KEY));

        // Shard queues: the same arguments, plus a single active consumer, so
        // that even a worker that outlived its lease cannot consume a shard
        // beside the one that took it over.
        let mut shard = work;
        shard.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        for n in 0..self.shards {
            specs.push(QueueSpec::new(self.shard_queue(n), shard.clone(), self.shard_exchange(), &n.to_string()));
        }

        // Retry tiers: a fixed TTL each, then back to the work exchange.
        for tier in &self.tiers {
            let mut args = quorum_args();
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(tier.as_millis() as i64));
            dead_letter_to(&mut args, &self.jobs_exchange());
            specs.push(QueueSpec::new(self.retry_queue(*tier), args, self.retry_exchange(), &tier_label(*tier)));
        }

        // The dead-letter queue: operators list and replay from here. No
        // delivery limit: browsing it must never make a dead letter vanish.
        // No x-delivery-limit argument: RabbitMQ 3.x then has no limit, and a
        // -1 there would drop a message at its first return (seen on 3.10).
        // Browsing returns messages by closing the channel, which RabbitMQ 4
        // does not count against its default limit (docs/operations.md).
        specs.push(QueueSpec::new(self.dead_queue(), quorum_args(), self.dead_exchange(), ROUTING_KEY));
        specs
    }

    /// Declare everything; idempotent. A queue that exists with other
    /// arguments (RabbitMQ fixes them at the first declare) is used as it is,
    /// with a warning, and named in the result: `herald setup --migrate`
    /// rebuilds it (docs/upgrading.md).
    pub async fn declare(&self, connection: &Connection) -> Result<Declared, BrokerError> {
        let mut channel = connection.create_channel().await.map_err(amqp("open channel"))?;
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        for exchange in self.exchanges() {
            channel
                .exchange_declare(exchange.as_str().into(), ExchangeKind::Direct, durable, FieldTable::default())
                .await
                .map_err(amqp(format!("declare exchange {exchange}")))?;
        }
        let mut declared = Declared::default();
        for spec in self.specs() {
            if !spec.declare(connection, &mut channel).await? {
                tracing::warn!(
                    queue = %spec.name,
                    "the queue exists with other arguments than these settings give it; it is used as it is \
                     (stop the workers and run `herald setup --migrate` to rebuild it: docs/upgrading.md)"
                );
                declared.kept.push(spec.name.clone());
            }
            spec.bind(&channel).await?;
        }
        let _ = channel.close(200, "topology declared".into()).await;
        Ok(declared)
    }
}

/// What [`Topology::declare`] found.
#[derive(Debug, Default)]
pub struct Declared {
    /// Queues that exist with other arguments than the settings give them.
    pub kept: Vec<String>,
}

/// One queue: its name, its arguments and where it is bound.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub name: String,
    pub args: FieldTable,
    pub exchange: String,
    pub routing_key: String,
}

impl QueueSpec {
    fn new(name: String, args: FieldTable, exchange: String, routing_key: &str) -> Self {
        Self { name, args, exchange, routing_key: routing_key.to_owned() }
    }

    /// Declare the queue; `false` if it exists with other arguments (the
    /// broker then closed `channel`, which is replaced by a new one after
    /// checking that the queue exists).
    pub async fn declare(&self, connection: &Connection, channel: &mut Channel) -> Result<bool, BrokerError> {
        let options = QueueDeclareOptions { durable: true, ..Default::default() };
        match channel.queue_declare(self.name.as_str().into(), options, self.args.clone()).await {
            Ok(_) => Ok(true),
            Err(err) if super::precondition_failed(&err) => {
                *channel = connection.create_channel().await.map_err(amqp("open channel"))?;
                let passive = QueueDeclareOptions { passive: true, ..Default::default() };
                channel
                    .queue_declare(self.name.as_str().into(), passive, FieldTable::default())
                    .await
                    .map_err(amqp(format!("find queue {}", self.name)))?;
                Ok(false)
            }
            Err(err) => Err(amqp(format!("declare queue {}", self.name))(err)),
        }
    }

    pub async fn bind(&self, channel: &Channel) -> Result<(), BrokerError> {
        channel
            .queue_bind(
                self.name.as_str().into(),
                self.exchange.as_str().into(),
                self.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp(format!("bind queue {}", self.name)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let t = Topology {
            prefix: "herald".into(),
            tiers: vec![Duration::from_secs(5), Duration::from_secs(120), Duration::from_secs(3600)],
            delivery_limit: 20,
            shards: 2,
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
        assert_eq!(t.shard_exchange(), "herald.shards");
        assert_eq!(t.shard_queue(1), "herald.msteams.shard.1");
        assert_eq!(t.pending_queues(), ["herald.msteams", "herald.msteams.shard.0", "herald.msteams.shard.1"]);
        assert_eq!(t.queues().len(), 7);
    }
}
