//! Reading the dead-letter queue without changing it.
//!
//! Browsing takes messages with `basic.get` and never acks them; closing the
//! channel hands every one back to the queue, so a listing removes nothing and
//! duplicates nothing.

use std::collections::BTreeMap;

use lapin::Connection;
use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use serde::Serialize;

use crate::rabbitmq::{BrokerError, amqp, headers};

/// One dead letter as an operator sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetter {
    pub message_id: Option<String>,
    pub reason: Option<String>,
    pub organization_id: Option<String>,
    pub teams_code: Option<String>,
    /// Every header, as text.
    pub headers: BTreeMap<String, String>,
    /// The original body, unchanged (lossy UTF-8 for display).
    pub body: String,
}

fn text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// Up to `limit` messages of `queue`, left in place.
pub async fn browse(connection: &Connection, queue: &str, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
    let channel = connection.create_channel().await.map_err(amqp("open channel"))?;
    let mut letters = Vec::new();
    while letters.len() < limit {
        let Some(message) =
            channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await.map_err(amqp(format!("get from {queue}")))?
        else {
            break;
        };
        let table = message.delivery.properties.headers().as_ref();
        let all: BTreeMap<String, String> =
            table.map(|t| t.inner().iter().map(|(k, v)| (k.to_string(), text(v))).collect()).unwrap_or_default();
        letters.push(DeadLetter {
            message_id: message.delivery.properties.message_id().as_ref().map(|m| m.to_string()),
            reason: headers::get_str(table, headers::REASON),
            organization_id: headers::get_str(table, headers::ORGANIZATION_ID),
            teams_code: headers::get_str(table, headers::TEAMS_CODE),
            headers: all,
            body: String::from_utf8_lossy(&message.delivery.data).into_owned(),
        });
    }
    // Unacked: closing the channel returns every message to the queue.
    channel.close(200, "browse done".into()).await.map_err(amqp("close browse channel"))?;
    Ok(letters)
}
