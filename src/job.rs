//! The notification job: the wire format of `schemas/notification-job.v1.json`
//! parsed at the edge into a validated [`Job`].
//!
//! A body that does not parse is a permanent outcome decided once, here: the
//! worker dead-letters it with the [`InvalidJob`] reason and detail.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Bodies larger than this are refused (docs/contract.md §4).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// The job format this worker reads.
pub const VERSION: u64 = 1;

macro_rules! id_newtype {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// A non-blank id, trimmed of nothing: ids are compared exactly.
            pub fn parse(value: impl Into<String>) -> Option<Self> {
                let value = value.into();
                (!value.trim().is_empty()).then_some(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_newtype!(
    /// The organization (tenant of herald's user) a job belongs to.
    OrganizationId
);
id_newtype!(
    /// The Teams integration (one bot registration) an organization uses.
    IntegrationId
);
id_newtype!(
    /// A Teams conversation id (`19:...@thread.tacv2`, `a:...`).
    ConversationId
);
id_newtype!(
    /// A Teams user id (`29:...`) or AAD object id.
    UserId
);

/// The job id: the producer's idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub Uuid);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Info,
    Warning,
    Error,
    Critical,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fact {
    pub name: String,
    pub value: String,
}

/// A message herald renders as an Adaptive Card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub title: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<url::Url>,
    #[serde(default)]
    pub severity: Severity,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub facts: Vec<Fact>,
}

/// Who receives the job. `conversation_id` addresses a channel or chat the
/// organization registered; `user_id` the user's personal chat with the bot.
/// Both may be given (the user's chat then corrects a stale conversation id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Recipient {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<ConversationId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<UserId>,
}

/// What to post: a message herald renders, or the producer's own card.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Message(Message),
    /// A ready Adaptive Card (the `content` of the attachment).
    Card(Value),
}

/// The job as it travels on the wire (version 1).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireJob {
    pub version: u64,
    #[serde(deserialize_with = "hyphenated_uuid")]
    pub job_id: Uuid,
    pub organization_id: String,
    pub integration_id: String,
    pub recipient: Recipient,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<Value>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// Only the canonical 36-character form, as the schema's `format: uuid` says
/// (the `uuid` crate alone would also take braced, URN and simple forms).
fn hyphenated_uuid<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Uuid, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text.len() != 36 {
        return Err(serde::de::Error::custom(format!("`job_id` {text:?} is not a UUID in its hyphenated form")));
    }
    Uuid::parse_str(&text).map_err(|err| serde::de::Error::custom(format!("`job_id` {text:?} is not a UUID: {err}")))
}

/// A validated job.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub organization_id: OrganizationId,
    pub integration_id: IntegrationId,
    pub recipient: Recipient,
    pub content: Content,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Why a body is not a job. `MissingOrganization` is its own reason so that an
/// operator can tell a producer bug that loses the tenant from other bad input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidJob {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    MissingOrganization(String),
}

/// A job's AMQP properties: its `content_type` is JSON (`application/json`,
/// parameters such as `charset=utf-8` allowed) or absent, and it has no
/// `content_encoding` (herald does not decompress).
pub fn check_properties(content_type: Option<&str>, content_encoding: Option<&str>) -> Result<(), InvalidJob> {
    if let Some(content_type) = content_type {
        let media = content_type.split(';').next().unwrap_or_default().trim();
        if !media.eq_ignore_ascii_case("application/json") {
            return Err(InvalidJob::Invalid(format!("content_type {content_type:?} is not application/json")));
        }
    }
    match content_encoding {
        Some(encoding) if !encoding.trim().is_empty() && !encoding.eq_ignore_ascii_case("identity") => {
            Err(InvalidJob::Invalid(format!("content_encoding {encoding:?} is not supported: publish the JSON itself")))
        }
        _ => Ok(()),
    }
}

impl Job {
    /// Parse and validate a message body. The error echoes at most
    /// `text::MAX_FIELD_BYTES` of the input.
    pub fn decode(body: &[u8]) -> Result<Self, InvalidJob> {
        Self::decode_unbounded(body).map_err(|err| match err {
            InvalidJob::Invalid(why) => InvalidJob::Invalid(crate::text::field(&why)),
            InvalidJob::MissingOrganization(why) => InvalidJob::MissingOrganization(crate::text::field(&why)),
        })
    }

    fn decode_unbounded(body: &[u8]) -> Result<Self, InvalidJob> {
        if body.len() > MAX_BODY_BYTES {
            return Err(InvalidJob::Invalid(format!("body of {} bytes exceeds the limit of {MAX_BODY_BYTES} bytes", body.len())));
        }
        // A well-formed job is read in one pass; anything else is read again
        // as a JSON value, for the precise reason.
        if let Ok(wire) = serde_json::from_slice::<WireJob>(body)
            && wire.version == VERSION
        {
            return Job::try_from(wire);
        }
        Self::decode_value(body)
    }

    /// Read `body` as a JSON value first: slower, but it tells a body that
    /// is not JSON, a missing or blank organization and a foreign version
    /// apart.
    fn decode_value(body: &[u8]) -> Result<Self, InvalidJob> {
        let value: Value = serde_json::from_slice(body).map_err(|err| InvalidJob::Invalid(format!("body is not JSON: {err}")))?;
        let Some(object) = value.as_object() else {
            return Err(InvalidJob::Invalid("body is not a JSON object".into()));
        };
        match object.get("version") {
            None => return Err(InvalidJob::Invalid("missing field `version`".into())),
            Some(v) if v.as_u64() == Some(VERSION) => {}
            Some(v) => {
                return Err(InvalidJob::Invalid(format!("unsupported version {v}: this worker reads version {VERSION}")));
            }
        }
        match object.get("organization_id") {
            Some(Value::String(org)) if !org.trim().is_empty() => {}
            Some(Value::String(_)) => {
                return Err(InvalidJob::MissingOrganization("`organization_id` is blank".into()));
            }
            Some(Value::Null) | None => {
                return Err(InvalidJob::MissingOrganization("missing field `organization_id`".into()));
            }
            Some(other) => {
                return Err(InvalidJob::MissingOrganization(format!("`organization_id` must be a string, got {other}")));
            }
        }
        let wire: WireJob = serde_json::from_value(value).map_err(|err| InvalidJob::Invalid(err.to_string()))?;
        Job::try_from(wire)
    }

    /// The organization id of a body, if one can be read at all (for the
    /// headers of a dead letter whose body did not parse).
    pub fn peek_organization(body: &[u8]) -> Option<String> {
        #[derive(Deserialize)]
        struct Peek {
            organization_id: Option<String>,
        }
        serde_json::from_slice::<Peek>(body).ok()?.organization_id.filter(|o| !o.trim().is_empty())
    }
}

impl TryFrom<WireJob> for Job {
    type Error = InvalidJob;

    fn try_from(wire: WireJob) -> Result<Self, InvalidJob> {
        let invalid = |msg: &str| InvalidJob::Invalid(msg.to_owned());
        let organization_id = OrganizationId::parse(wire.organization_id)
            .ok_or_else(|| InvalidJob::MissingOrganization("`organization_id` is blank".into()))?;
        let integration_id = IntegrationId::parse(wire.integration_id).ok_or_else(|| invalid("`integration_id` is blank"))?;
        let recipient = wire.recipient;
        if recipient.conversation_id.is_none() && recipient.user_id.is_none() {
            return Err(invalid("`recipient` needs `conversation_id` or `user_id`"));
        }
        if recipient.conversation_id.as_ref().is_some_and(|c| c.as_str().trim().is_empty())
            || recipient.user_id.as_ref().is_some_and(|u| u.as_str().trim().is_empty())
        {
            return Err(invalid("`recipient` ids must not be blank"));
        }
        let content = match (wire.message, wire.card) {
            (Some(message), None) => {
                if message.title.trim().is_empty() && message.text.trim().is_empty() {
                    return Err(invalid("`message` needs a `title` or a `text`"));
                }
                Content::Message(message)
            }
            (None, Some(card)) => {
                if card.get("type").and_then(Value::as_str) != Some("AdaptiveCard") {
                    return Err(invalid("`card` must be an Adaptive Card (`\"type\": \"AdaptiveCard\"`)"));
                }
                if card.get("version").and_then(Value::as_str).is_none() {
                    return Err(invalid("`card` needs a `version`"));
                }
                Content::Card(card)
            }
            (Some(_), Some(_)) => return Err(invalid("give either `message` or `card`, not both")),
            (None, None) => return Err(invalid("missing `message` (or `card`)")),
        };
        Ok(Job {
            id: JobId(wire.job_id),
            organization_id,
            integration_id,
            recipient,
            content,
            created_at: wire.created_at,
            expires_at: wire.expires_at,
        })
    }
}

impl From<&Job> for WireJob {
    fn from(job: &Job) -> Self {
        let (message, card) = match &job.content {
            Content::Message(m) => (Some(m.clone()), None),
            Content::Card(c) => (None, Some(c.clone())),
        };
        WireJob {
            version: VERSION,
            job_id: job.id.0,
            organization_id: job.organization_id.to_string(),
            integration_id: job.integration_id.to_string(),
            recipient: job.recipient.clone(),
            message,
            card,
            created_at: job.created_at,
            expires_at: job.expires_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_json_content_types_and_no_encoding_are_taken() {
        for ok in [None, Some("application/json"), Some("application/json; charset=utf-8"), Some("Application/JSON")] {
            assert_eq!(check_properties(ok, None), Ok(()), "{ok:?}");
        }
        assert_eq!(check_properties(None, Some("identity")), Ok(()));
        for bad in ["text/plain", "application/x-protobuf", "application/jsonx", ""] {
            assert!(check_properties(Some(bad), None).is_err(), "{bad:?}");
        }
        let gzip = check_properties(Some("application/json"), Some("gzip")).unwrap_err();
        assert!(gzip.to_string().contains("gzip"), "{gzip}");
    }
    use serde_json::json;

    fn valid() -> Value {
        json!({
            "version": 1,
            "job_id": "6f1c1f7e-2a52-4a0e-9a57-0b7f0d5f6a10",
            "organization_id": "org-a",
            "integration_id": "int-1",
            "recipient": {"conversation_id": "19:abc@thread.tacv2"},
            "message": {"title": "Disk full", "text": "/var is at 99%", "severity": "critical"},
            "created_at": "2026-11-22T10:00:00Z"
        })
    }

    fn decode(value: &Value) -> Result<Job, InvalidJob> {
        Job::decode(&serde_json::to_vec(value).unwrap())
    }

    #[test]
    fn a_valid_job_decodes() {
        let job = decode(&valid()).unwrap();
        assert_eq!(job.organization_id.as_str(), "org-a");
        assert!(matches!(job.content, Content::Message(ref m) if m.severity == Severity::Critical));
        // and survives the round trip to the wire
        let wire = serde_json::to_value(WireJob::from(&job)).unwrap();
        assert_eq!(decode(&wire).unwrap(), job);
    }

    #[test]
    fn missing_or_blank_organization_is_its_own_reason() {
        for org in [Value::Null, json!(""), json!("  "), json!(42)] {
            let mut v = valid();
            v["organization_id"] = org;
            assert!(matches!(decode(&v), Err(InvalidJob::MissingOrganization(_))), "{v}");
        }
        let mut v = valid();
        v.as_object_mut().unwrap().remove("organization_id");
        assert!(matches!(decode(&v), Err(InvalidJob::MissingOrganization(_))));
    }

    #[test]
    fn bad_bodies_are_invalid_with_a_reason() {
        assert!(matches!(Job::decode(b"{not json"), Err(InvalidJob::Invalid(m)) if m.contains("not JSON")));
        assert!(matches!(Job::decode(b"[1]"), Err(InvalidJob::Invalid(_))));
        let mut v = valid();
        v["version"] = json!(2);
        assert!(matches!(decode(&v), Err(InvalidJob::Invalid(m)) if m.contains("unsupported version 2")));
        let mut v = valid();
        v.as_object_mut().unwrap().remove("recipient");
        assert!(matches!(decode(&v), Err(InvalidJob::Invalid(m)) if m.contains("recipient")));
        let mut v = valid();
        v["recipient"] = json!({});
        assert!(matches!(decode(&v), Err(InvalidJob::Invalid(_))));
        let mut v = valid();
        v["job_id"] = json!("not-a-uuid");
        assert!(matches!(decode(&v), Err(InvalidJob::Invalid(_))));
        let mut v = valid();
        v["card"] = json!({"type": "AdaptiveCard", "version": "1.4"});
        assert!(matches!(decode(&v), Err(InvalidJob::Invalid(m)) if m.contains("not both")));
        let mut v = valid();
        v["mesage"] = json!("typo");
        assert!(matches!(decode(&v), Err(InvalidJob::Invalid(m)) if m.contains("mesage")));
    }

    /// The one-pass read of a well-formed job decides exactly as the read
    /// through a JSON value, for good bodies and for every near miss.
    #[test]
    fn the_one_pass_read_agrees_with_the_value_read() {
        let v = valid();
        let mut bodies: Vec<String> = vec![
            v.to_string(),
            v.to_string().replacen("\"version\":1", "\"version\":1.0", 1),
            v.to_string().replacen("\"version\":1", "\"version\":2", 1),
            v.to_string().replacen("{", "{\"organization_id\":\"org-b\",", 1),
            format!("{v} "),
            format!("{v}x"),
            String::new(),
            "null".into(),
        ];
        let mut variants = vec![
            ("organization_id", json!("  ")),
            ("organization_id", json!(null)),
            ("integration_id", json!(" ")),
            ("recipient", json!({"user_id": "29:u"})),
            ("recipient", json!({"conversation_id": "19:a", "user_id": "29:u"})),
            ("recipient", json!({"conversation_id": ""})),
            ("recipient", json!({"conversation_id": "19:a", "extra": 1})),
            ("expires_at", json!("2026-11-22T11:00:00+01:00")),
            ("expires_at", json!("tomorrow")),
            ("created_at", json!(7)),
            ("job_id", json!("{6f1c1f7e-2a52-4a0e-9a57-0b7f0d5f6a10}")),
            ("message", json!({"title": " ", "text": ""})),
            ("message", json!({"title": "t", "severity": "loud"})),
            ("card", json!({"type": "AdaptiveCard", "version": "1.5", "body": [{"n": 1.5e300}]})),
        ];
        variants.push(("version", json!(18446744073709551615_u64)));
        for (field, value) in variants {
            let mut body = valid();
            body[field] = value;
            if field == "card" {
                body.as_object_mut().unwrap().remove("message");
            }
            bodies.push(body.to_string());
        }
        for body in bodies {
            assert_eq!(Job::decode_unbounded(body.as_bytes()), Job::decode_value(body.as_bytes()), "{body}");
        }
    }

    #[test]
    fn oversized_bodies_are_refused_before_parsing() {
        let body = vec![b' '; MAX_BODY_BYTES + 1];
        assert!(matches!(Job::decode(&body), Err(InvalidJob::Invalid(m)) if m.contains("exceeds")));
    }

    #[test]
    fn the_organization_can_be_peeked_from_an_invalid_body() {
        assert_eq!(Job::peek_organization(br#"{"organization_id": "org-a", "version": 9}"#).as_deref(), Some("org-a"));
        assert_eq!(Job::peek_organization(b"garbage"), None);
    }
}
