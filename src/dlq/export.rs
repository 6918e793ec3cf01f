//! The `herald dlq export` line format: one dead letter per JSON line, every
//! header kept (the broker's `x-death` included, so that a broker dead
//! letter keeps its reason), values typed losslessly.
//!
//! ```json
//! {"message_id": "6f1c…", "headers": {"x-herald-reason": "teams_forbidden", "x-herald-attempts": 1,
//!  "x-death": [{"reason": "delivery_limit", "count": 1, "time": {"$timestamp": 1795000000}}]},
//!  "body": "{\"version\": 1, …}"}
//! ```
//!
//! Strings, integers, booleans, arrays and tables map to their JSON kinds;
//! `{"$timestamp": n}` is an AMQP timestamp and `{"$bytes_hex": "…"}` a byte
//! array. A body that is not UTF-8 is `body_hex` instead of `body`.

use std::collections::BTreeMap;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, ByteArray, FieldArray, FieldTable, LongString, ShortString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Taken;
use crate::rabbitmq::headers;

/// The most a line's headers may take (their encoded size).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// AMQP short strings (header names, message ids) hold at most this many bytes.
const MAX_SHORT: usize = 255;

/// One line of `herald dlq export`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Exported {
    pub message_id: Option<String>,
    pub headers: BTreeMap<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_hex: Option<String>,
}

/// Why a line cannot be imported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("not an export line: {0}")]
    Json(String),
    #[error("a line needs exactly one of `body` and `body_hex`")]
    Body,
    #[error("`body_hex` is not hex")]
    Hex,
    #[error("the message id is {0} bytes long; AMQP allows {MAX_SHORT}")]
    MessageId(usize),
    #[error("header name of {0} bytes; AMQP allows {MAX_SHORT}")]
    HeaderName(usize),
    #[error("header {0:?}: {1}")]
    HeaderValue(String, String),
    #[error("the headers take {0} bytes; at most {MAX_HEADER_BYTES} are imported")]
    Headers(usize),
}

fn to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(f) => Value::from(*f),
        AMQPValue::Double(f) => Value::from(*f),
        AMQPValue::DecimalValue(d) => Value::String(format!("{d:?}")),
        AMQPValue::ShortString(s) => Value::String(s.to_string()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(to_json).collect()),
        AMQPValue::Timestamp(t) => serde_json::json!({ "$timestamp": t }),
        AMQPValue::FieldTable(t) => Value::Object(t.inner().iter().map(|(k, v)| (k.to_string(), to_json(v))).collect()),
        AMQPValue::ByteArray(b) => serde_json::json!({ "$bytes_hex": hex(b.as_slice()) }),
        AMQPValue::Void => Value::Null,
    }
}

fn from_json(value: &Value) -> Result<AMQPValue, String> {
    Ok(match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(f)) if n.is_f64() => AMQPValue::Double(f),
            _ => return Err(format!("the number {n} does not fit a signed 64-bit integer")),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(items.iter().map(from_json).collect::<Result<Vec<_>, _>>()?)),
        Value::Object(map) => match tagged(map) {
            Some(("$timestamp", Value::Number(n))) => AMQPValue::Timestamp(n.as_u64().ok_or("`$timestamp` must be an unsigned integer")?),
            Some(("$bytes_hex", Value::String(h))) => AMQPValue::ByteArray(ByteArray::from(unhex(h).ok_or("`$bytes_hex` is not hex")?)),
            Some((tag, _)) => return Err(format!("`{tag}` has the wrong kind of value")),
            None => AMQPValue::FieldTable(table(map)?),
        },
    })
}

fn tagged(map: &Map<String, Value>) -> Option<(&str, &Value)> {
    let (key, value) = map.iter().next()?;
    (map.len() == 1 && matches!(key.as_str(), "$timestamp" | "$bytes_hex")).then_some((key.as_str(), value))
}

fn table(map: &Map<String, Value>) -> Result<FieldTable, String> {
    let mut out = FieldTable::default();
    for (key, value) in map {
        if key.len() > MAX_SHORT {
            return Err(format!("a nested name of {} bytes; AMQP allows {MAX_SHORT}", key.len()));
        }
        out.insert(ShortString::from(key.as_str()), from_json(value)?);
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

impl Exported {
    /// The line for a dead letter, every header included.
    pub fn from_taken(taken: &Taken) -> Self {
        let headers = taken
            .properties
            .headers()
            .as_ref()
            .map(|t| t.inner().iter().map(|(k, v)| (k.to_string(), to_json(v))).collect())
            .unwrap_or_default();
        let (body, body_hex) = match std::str::from_utf8(&taken.data) {
            Ok(text) => (Some(text.to_owned()), None),
            Err(_) => (None, Some(hex(&taken.data))),
        };
        Self { message_id: taken.letter.message_id.clone(), headers, body, body_hex }
    }

    /// Parse one line of an export file.
    pub fn parse(line: &str) -> Result<Self, ExportError> {
        serde_json::from_str(line).map_err(|err| ExportError::Json(crate::text::clip(&err.to_string(), 200)))
    }

    /// The message to publish back into the dead-letter queue, checked to be
    /// one the broker accepts.
    pub fn to_message(&self) -> Result<(Vec<u8>, BasicProperties), ExportError> {
        let data = match (&self.body, &self.body_hex) {
            (Some(text), None) => text.as_bytes().to_vec(),
            (None, Some(hex)) => unhex(hex).ok_or(ExportError::Hex)?,
            _ => return Err(ExportError::Body),
        };
        let mut table = FieldTable::default();
        for (key, value) in &self.headers {
            if key.len() > MAX_SHORT {
                return Err(ExportError::HeaderName(key.len()));
            }
            let value = from_json(value).map_err(|why| ExportError::HeaderValue(crate::text::clip(key, 64), why))?;
            table.insert(ShortString::from(key.as_str()), value);
        }
        let size = headers::table_size(&table);
        if size > MAX_HEADER_BYTES {
            return Err(ExportError::Headers(size));
        }
        let mut properties = BasicProperties::default().with_content_type("application/json".into()).with_headers(table);
        if let Some(id) = &self.message_id {
            if id.len() > MAX_SHORT {
                return Err(ExportError::MessageId(id.len()));
            }
            properties = properties.with_message_id(id.as_str().into());
        }
        Ok((data, properties))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_header_round_trips_x_death_included() {
        let line = r#"{"message_id":"m1","headers":{"x-herald-reason":"teams_forbidden","x-herald-attempts":3,
            "x-death":[{"reason":"delivery_limit","count":2,"time":{"$timestamp":1795000000},"queue":"herald.msteams"}],
            "flag":true,"raw":{"$bytes_hex":"00ff"},"ratio":0.5},"body":"{}"}"#;
        let exported = Exported::parse(line).unwrap();
        let (data, properties) = exported.to_message().unwrap();
        assert_eq!(data, b"{}");
        let table = properties.headers().clone().unwrap();
        let deaths = table.inner()["x-death"].as_array().unwrap().as_slice()[0].as_field_table().unwrap().clone();
        assert_eq!(deaths.inner()["time"], AMQPValue::Timestamp(1_795_000_000));
        assert_eq!(table.inner()["x-herald-attempts"], AMQPValue::LongLongInt(3));
        let back: BTreeMap<String, Value> = table.inner().iter().map(|(k, v)| (k.to_string(), to_json(v))).collect();
        assert_eq!(back, exported.headers);
    }

    #[test]
    fn bad_lines_are_refused_with_the_reason() {
        let long = "k".repeat(300);
        for (line, want) in [
            ("{not json".to_owned(), "not an export line"),
            (r#"{"message_id":"m","headers":{}}"#.to_owned(), "exactly one of"),
            (r#"{"message_id":"m","headers":{},"body_hex":"zz"}"#.to_owned(), "not hex"),
            (format!(r#"{{"message_id":"m","headers":{{"{long}":"v"}},"body":""}}"#), "header name of 300 bytes"),
            (format!(r#"{{"message_id":"{long}","headers":{{}},"body":""}}"#), "message id is 300 bytes"),
            (r#"{"message_id":"m","headers":{"n":18446744073709551615},"body":""}"#.to_owned(), "does not fit"),
            (format!(r#"{{"message_id":"m","headers":{{"big":"{}"}},"body":""}}"#, "x".repeat(70_000)), "at most 65536"),
            (r#"{"message_id":"m","headers":{},"body":"","extra":1}"#.to_owned(), "unknown field"),
        ] {
            let err = Exported::parse(&line).and_then(|e| e.to_message().map(drop)).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
            assert!(err.len() < 400, "the error is bounded: {} bytes", err.len());
        }
    }
}
