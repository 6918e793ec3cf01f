//! The RabbitMQ adapter: the topology (`topology`), herald's headers
//! (`headers`), and confirmed publishing on a channel that heals.

pub mod headers;
mod migrate;
mod topology;

use std::sync::Arc;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::Mutex;

pub use migrate::{Rebuilt, interrupted, queue_status, rebuild};
pub use topology::{Declared, QueueSpec, Topology, tier_label};

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
    #[error("not published to {exchange:?}: an earlier message of its batch could not be")]
    NotSent { exchange: String },
    #[error("{key}: cannot read {path}")]
    TlsFile {
        key: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("queue {queue} has {consumers} consumer(s): stop the workers before rebuilding it")]
    InUse { queue: String, consumers: u32 },
    #[error("queue {queue} still holds {messages} message(s) and {consumers} consumer(s) after it was drained; run the rebuild again")]
    NotDrained { queue: String, messages: u32, consumers: u32 },
    #[error("queue {queue} was declared again by someone else, with other arguments, during its rebuild")]
    Redeclared { queue: String },
}

/// Ack `delivery_tag` (with `multiple`, every delivery up to it) on
/// `channel` without waiting for lapin's I/O thread to write
/// it. The frame is queued at once, before anything queued on the channel
/// after it (its close included), so it goes out in order; only a channel
/// already closed refuses it, and that error is returned. Not waiting is
/// what makes it cheap: the delivery's `Acker` hands the ack to lapin's
/// internal task, which queues it and waits for the write, and the write's
/// completion wakes both again from the I/O thread; at one ack per job, those
/// wake-ups between threads were the largest cost of a job outside herald's
/// own code. A write that fails after this returns is a broken connection,
/// which returns the job to the queue anyway (the ledger acks the copy).
pub fn ack_queued(channel: &Channel, delivery_tag: u64, multiple: bool) -> Result<(), lapin::Error> {
    use futures_util::FutureExt;
    match channel.basic_ack(delivery_tag, lapin::options::BasicAckOptions { multiple }).now_or_never() {
        Some(Err(err)) => Err(err),
        Some(Ok(())) | None => Ok(()),
    }
}

/// The broker refused a declaration because the queue exists with other
/// arguments (406 PRECONDITION_FAILED).
pub(crate) fn precondition_failed(err: &lapin::Error) -> bool {
    soft_error(err, lapin::protocol::AMQPSoftError::PRECONDITIONFAILED)
}

/// The broker has no such queue or exchange (404 NOT_FOUND).
pub(crate) fn not_found(err: &lapin::Error) -> bool {
    soft_error(err, lapin::protocol::AMQPSoftError::NOTFOUND)
}

/// A publish the broker answered for good: the message reached no queue,
/// or the exchange does not exist or may not be written (404, 403).
/// Publishing it again changes nothing until the topology or the
/// permissions are fixed.
pub(crate) fn refused_for_good(err: &BrokerError) -> bool {
    match err {
        BrokerError::Unroutable { .. } => true,
        BrokerError::Amqp { source, .. } => not_found(source) || soft_error(source, lapin::protocol::AMQPSoftError::ACCESSREFUSED),
        _ => false,
    }
}

fn soft_error(err: &lapin::Error, which: lapin::protocol::AMQPSoftError) -> bool {
    matches!(err.kind(), lapin::ErrorKind::ProtocolError(e) if *e.kind() == lapin::protocol::AMQPErrorKind::Soft(which))
}

/// Reject `delivery_tag` without requeue (the broker dead-letters it), queued
/// on the channel without waiting, as [`ack_queued`] does.
pub fn reject_queued(channel: &Channel, delivery_tag: u64) -> Result<(), lapin::Error> {
    use futures_util::FutureExt;
    match channel.basic_reject(delivery_tag, lapin::options::BasicRejectOptions { requeue: false }).now_or_never() {
        Some(Err(err)) => Err(err),
        Some(Ok(())) | None => Ok(()),
    }
}

pub(crate) fn amqp(operation: impl Into<String>) -> impl FnOnce(lapin::Error) -> BrokerError {
    let operation = operation.into();
    amqp_with(move || operation)
}

/// [`amqp`] whose description is written only on error (per-message paths).
fn amqp_with(operation: impl FnOnce() -> String) -> impl FnOnce(lapin::Error) -> BrokerError {
    move |source| BrokerError::Amqp { operation: operation(), source }
}

pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, properties).await.map_err(amqp("connect"))
}

/// `host:port` of an AMQP URL (the scheme's port if it names none).
fn node_of(url: &str) -> String {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(uri) => format!("{}:{}", uri.authority.host, uri.authority.port),
        Err(_) => String::new(),
    }
}

/// Whether a broker node (`host:port`, from [`Broker::connect_node`])
/// accepts a TCP connection within a second: a node that crashed, stopped
/// or paused itself (pause_minority) does not.
pub async fn node_answers(node: &str) -> bool {
    let connecting = tokio::net::TcpStream::connect(node);
    matches!(tokio::time::timeout(std::time::Duration::from_secs(1), connecting).await, Ok(Ok(_)))
}

/// Where a process starts in the list of broker URLs.
static START: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Where and how to connect: the URL and, for `amqps://`, the TLS settings
/// (`amqp_tls.*`: a CA bundle, a client certificate and key, PEM files read
/// at each connection, so that rotated files are picked up on reconnect).
#[derive(Clone)]
pub struct Broker {
    url: secrecy::SecretString,
    tls: crate::settings::AmqpTlsSettings,
}

impl Broker {
    pub fn new(settings: &crate::settings::Settings) -> Self {
        Self { url: settings.amqp_url.clone(), tls: settings.amqp_tls.clone() }
    }

    /// Connect, naming the connection `name` (shown in RabbitMQ's management
    /// UI). With several URLs (a cluster's nodes), each is tried in turn from
    /// a place of this process's own, so that a fleet spreads over the
    /// nodes, and the first that answers is used; a reconnect tries them
    /// all again, so a node's loss moves the worker to another.
    pub async fn connect(&self, name: &str) -> Result<Connection, BrokerError> {
        self.connect_node(name).await.map(|(connection, _)| connection)
    }

    /// [`Broker::connect`], and the node connected to, as `host:port` (of
    /// the URL that answered: a load balancer's address if the URL is one).
    pub async fn connect_node(&self, name: &str) -> Result<(Connection, String), BrokerError> {
        let urls = crate::settings::amqp_urls(&self.url);
        let start = START.get_or_init(|| usize::from(uuid::Uuid::new_v4().as_bytes()[0]));
        let mut last = None;
        for i in 0..urls.len() {
            let url = urls[(start + i) % urls.len()];
            let properties = ConnectionProperties::default().with_connection_name(name.into());
            let connected = lapin::DefaultConnectionBuilder::new()
                .map_err(amqp("start the connection's runtime"))?
                .with_uri_str(url.to_owned())
                .with_properties(properties)
                .with_tls_config(self.tls_config()?)
                .connect()
                .await;
            match connected {
                Ok(connection) => return Ok((connection, node_of(url))),
                Err(err) => {
                    if urls.len() > 1 {
                        let shown = crate::settings::redact_url(&secrecy::SecretString::from(url.to_owned()));
                        tracing::warn!(url = %shown, error = %crate::text::error_chain(&err), "a broker node did not answer; trying the next");
                    }
                    last = Some(err);
                }
            }
        }
        Err(amqp("connect")(last.expect("amqp_url holds at least one URL (checked with the settings)")))
    }

    fn tls_config(&self) -> Result<lapin::tcp::OwnedTLSConfig, BrokerError> {
        let read = |key: &'static str, path: &str| {
            std::fs::read(path).map_err(|source| BrokerError::TlsFile { key, path: path.to_owned(), source })
        };
        let mut config = lapin::tcp::OwnedTLSConfig::default();
        if !self.tls.ca_file.is_empty() {
            let pem = read("amqp_tls.ca_file", &self.tls.ca_file)?;
            config.cert_chain = Some(String::from_utf8_lossy(&pem).into_owned());
        }
        if !self.tls.cert_file.is_empty() {
            let pem = read("amqp_tls.cert_file", &self.tls.cert_file)?;
            let key = read("amqp_tls.key_file", &self.tls.key_file)?;
            config.identity = Some(lapin::tcp::OwnedIdentity::PKCS8 { pem, key });
        }
        Ok(config)
    }

    /// The TLS settings, for `herald doctor`'s own handshake.
    pub fn tls(&self) -> &crate::settings::AmqpTlsSettings {
        &self.tls
    }
}

/// A channel in confirm mode: every publish waits for the broker's ack.
///
/// A channel the broker closed (a publish to a deleted exchange, a channel
/// exception) is replaced by a new one on the same connection at the next
/// publish, so one message's failure does not stop the others.
#[derive(Clone)]
pub struct Publisher {
    connection: Arc<Connection>,
    channel: Arc<Mutex<Channel>>,
    reopened: Arc<std::sync::atomic::AtomicU64>,
}

impl Publisher {
    pub async fn open(connection: Arc<Connection>) -> Result<Self, BrokerError> {
        let channel = Self::confirm_channel(&connection).await?;
        Ok(Self { connection, channel: Arc::new(Mutex::new(channel)), reopened: Default::default() })
    }

    async fn confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
        let channel = connection.create_channel().await.map_err(amqp("open publish channel"))?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(amqp("enable publisher confirms"))?;
        Ok(channel)
    }

    /// The publishing channel, reopened first if the broker closed it.
    async fn channel(&self) -> Result<Channel, BrokerError> {
        let mut channel = self.channel.lock().await;
        if !channel.status().connected() && self.connection.status().connected() {
            *channel = Self::confirm_channel(&self.connection).await?;
            self.reopened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!("the publishing channel was closed by the broker; opened a new one");
        }
        Ok(channel.clone())
    }

    /// How many times the channel was replaced.
    pub fn reopened(&self) -> u64 {
        self.reopened.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The largest frame the connection accepts (headers must fit in one).
    pub fn frame_max(&self) -> usize {
        usize::try_from(self.connection.configuration().frame_max()).unwrap_or(usize::MAX)
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
        let mut sent = self.start_all(exchange, [(Arc::from(routing_key), body, properties)]).await;
        sent.pop().expect("one result per message")
    }

    /// Send messages in order without waiting for each one's frames to be
    /// written before queueing the next: lapin's I/O thread writes the batch
    /// together, where one `start` after another costs a round trip between
    /// tokio's threads and lapin's per message. The results come in the
    /// order given, one per message; after the first message that could not
    /// be queued, nothing later is sent (its result and the later ones are
    /// errors). Routing keys are shared (`Arc<str>`): the router sends every
    /// job with one of a few fixed keys.
    pub async fn start_all<'a>(
        &self,
        exchange: &str,
        messages: impl IntoIterator<Item = (Arc<str>, &'a [u8], BasicProperties)>,
    ) -> Vec<Result<Pending, BrokerError>> {
        use std::future::Future;
        use std::task::Poll;
        let messages = messages.into_iter();
        let exchange: Arc<str> = Arc::from(exchange);
        let channel = match self.channel().await {
            Ok(channel) => channel,
            Err(err) => {
                let mut results: Vec<_> = messages.map(|_| Err(not_sent(&exchange))).collect();
                if let Some(first) = results.first_mut() {
                    *first = Err(err);
                }
                return results;
            }
        };
        let options = BasicPublishOptions { mandatory: true, immediate: false };
        let mut sends = Vec::with_capacity(messages.size_hint().0);
        let mut stopped = false;
        for (routing_key, body, properties) in messages {
            if stopped {
                sends.push((routing_key, None));
                continue;
            }
            let properties = properties.with_delivery_mode(2);
            let mut send =
                Box::pin(channel.basic_publish(exchange.as_ref().into(), routing_key.as_ref().into(), options, body, properties));
            // lapin queues a message's frames on the first poll, before its
            // first await: polling each once here keeps the batch in order.
            let first = std::future::poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await;
            stopped = matches!(first, Poll::Ready(Err(_)));
            sends.push((routing_key, Some((first, send))));
        }
        let exchange = &exchange;
        futures_util::future::join_all(sends.into_iter().map(|(routing_key, send)| async move {
            let confirm = match send {
                None => return Err(not_sent(exchange)),
                Some((Poll::Ready(result), _)) => result,
                Some((Poll::Pending, send)) => send.await,
            };
            let confirm = confirm.map_err(amqp_with(|| format!("publish to {exchange}")))?;
            Ok(Pending { confirm, exchange: exchange.clone(), routing_key })
        }))
        .await
    }

    pub async fn close(&self) {
        let _ = self.channel.lock().await.close(200, "done".into()).await;
    }
}

/// A message of a batch not sent because an earlier one could not be.
fn not_sent(exchange: &str) -> BrokerError {
    BrokerError::NotSent { exchange: exchange.to_owned() }
}

/// A published message whose confirm has not been awaited yet.
pub struct Pending {
    confirm: lapin::PublisherConfirm,
    exchange: Arc<str>,
    routing_key: Arc<str>,
}

impl Pending {
    /// Wait for the broker: an ack of a routed message is success.
    pub async fn confirmed(self) -> Result<(), BrokerError> {
        let Self { confirm, exchange, routing_key } = self;
        let confirm = confirm.await.map_err(amqp_with(|| format!("confirm of publish to {exchange}")))?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => {
                Err(BrokerError::Unroutable { exchange: exchange.to_string(), routing_key: routing_key.to_string() })
            }
            Confirmation::Nack(_) => Err(BrokerError::Nacked { exchange: exchange.to_string() }),
            // The channel was opened in confirm mode; a confirm that never
            // came is a failed publish, not a reason to stop the worker.
            Confirmation::NotRequested => Err(BrokerError::Nacked { exchange: exchange.to_string() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_the_host_and_port_of_its_url() {
        assert_eq!(node_of("amqp://guest:guest@127.0.0.1:5682/%2f"), "127.0.0.1:5682");
        assert_eq!(node_of("amqps://herald:pw@rmq-0.rmq.svc/%2f"), "rmq-0.rmq.svc:5671");
        assert_eq!(node_of("amqp://rmq-1"), "rmq-1:5672");
        assert_eq!(node_of("http://not-amqp"), "");
    }

    #[tokio::test]
    async fn a_node_that_refuses_connections_does_not_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap().to_string();
        assert!(node_answers(&open).await);
        drop(listener);
        assert!(!node_answers(&open).await, "nothing listens on {open} any more");
    }
}
