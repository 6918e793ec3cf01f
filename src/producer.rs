//! The Rust producer API: publish a job with publisher confirms.

use std::sync::Arc;

use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};

use crate::job::{Job, JobId, WireJob};
use crate::rabbitmq::headers;
use crate::rabbitmq::{self, BrokerError, Publisher, ROUTING_KEY};

/// Publishes jobs to `P.jobs` with routing key `msteams`.
pub struct Producer {
    publisher: Publisher,
    exchange: String,
}

impl Producer {
    /// Connect to the broker and open a confirm-mode channel.
    pub async fn connect(amqp_url: &str, topology_prefix: &str) -> Result<Self, BrokerError> {
        let connection = Arc::new(rabbitmq::connect(amqp_url, "herald producer").await?);
        Self::on(&connection, topology_prefix).await
    }

    /// A producer on an existing connection.
    pub async fn on(connection: &Arc<Connection>, topology_prefix: &str) -> Result<Self, BrokerError> {
        let publisher = Publisher::open(connection.clone()).await?;
        Ok(Self { publisher, exchange: format!("{topology_prefix}.jobs") })
    }

    /// Publish a validated job with the current span's W3C `traceparent`;
    /// returns its id once the broker confirmed it.
    pub async fn publish(&self, job: &Job) -> Result<JobId, BrokerError> {
        let body = serde_json::to_vec(&WireJob::from(job)).expect("a job always serializes");
        let traceparent = crate::telemetry::current_traceparent();
        self.publish_raw(&body, &job.id.to_string(), traceparent.as_deref()).await?;
        Ok(job.id)
    }

    /// Close the publishing channel.
    pub async fn close(&self) {
        self.publisher.close().await;
    }

    /// Publish validated jobs together (their frames written as one batch,
    /// their confirms awaited together): one result per job, in order. A
    /// job whose result is an error may still have reached the queue (its
    /// confirm was lost with the connection): publish it again with the
    /// same id, which herald posts once.
    pub async fn publish_all(&self, jobs: &[Job]) -> Vec<Result<JobId, BrokerError>> {
        let traceparent = crate::telemetry::current_traceparent();
        let bodies: Vec<(Vec<u8>, BasicProperties)> = jobs
            .iter()
            .map(|job| {
                let body = serde_json::to_vec(&WireJob::from(job)).expect("a job always serializes");
                (body, properties(&job.id.to_string(), traceparent.as_deref()))
            })
            .collect();
        let key: Arc<str> = Arc::from(ROUTING_KEY);
        let sent = self
            .publisher
            .start_all(&self.exchange, bodies.iter().map(|(body, properties)| (key.clone(), body.as_slice(), properties.clone())))
            .await;
        let confirmed = sent.into_iter().zip(jobs).map(|(sent, job)| async move { sent?.confirmed().await.map(|()| job.id) });
        futures_util::future::join_all(confirmed).await
    }

    /// Publish bytes as they are (tests and the demo use it for bad input).
    pub async fn publish_raw(&self, body: &[u8], message_id: &str, traceparent: Option<&str>) -> Result<(), BrokerError> {
        self.publisher.publish(&self.exchange, ROUTING_KEY, body, properties(message_id, traceparent)).await
    }
}

/// A job's properties: JSON, its id as the message id, the time, the trace.
fn properties(message_id: &str, traceparent: Option<&str>) -> BasicProperties {
    let mut table = FieldTable::default();
    if let Some(traceparent) = traceparent {
        headers::set_str(&mut table, headers::TRACEPARENT, traceparent);
    }
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
        .with_timestamp(chrono::Utc::now().timestamp() as u64)
        .with_headers(table)
}
