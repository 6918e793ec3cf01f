//! Dead-letter operations: browse, filter, replay, purge, export, import.
//!
//! Every pass over the dead-letter queue takes messages with `basic.get` on
//! its own channel and keeps the ones it does not move unacked; closing the
//! channel hands those back. A message is acked (removed) only after what
//! replaces it was confirmed by the broker, so a crash at any point leaves
//! each message in the dead-letter queue, in the work queue, or (for the
//! in-flight window only) in both.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use serde::{Deserialize, Serialize};
use serde_json::Value;

mod export;

pub use export::{ExportError, Exported};

use crate::rabbitmq::headers::{self, Signer};
use crate::rabbitmq::{BrokerError, Publisher, ROUTING_KEY, Topology, amqp};

/// One dead letter as an operator sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeadLetter {
    pub message_id: Option<String>,
    pub reason: Option<String>,
    pub organization_id: Option<String>,
    pub teams_code: Option<String>,
    /// Every header herald may believe, as text: herald's own only when
    /// their signature verifies (see `rabbitmq::headers`).
    pub headers: BTreeMap<String, String>,
    /// The message carried `x-herald-*` headers that do not verify (they
    /// are left out of `headers` and of every filter).
    #[serde(default)]
    pub unverified_headers: bool,
    /// When it was dead-lettered: herald's header, or for a letter the broker
    /// dead-lettered itself, the time in its `x-death`.
    #[serde(default)]
    pub dead_lettered_at: Option<DateTime<Utc>>,
    /// The original body, unchanged (lossy UTF-8 for display).
    pub body: String,
}

impl DeadLetter {
    pub fn from_message(properties: &BasicProperties, data: &[u8], signer: &Signer) -> Self {
        let message_id = properties.message_id().as_ref().map(|m| m.to_string());
        let all = properties.headers().as_ref();
        let (trusted, unverified_headers) = signer.trusted(message_id.as_deref(), data, all);
        // The broker's own bookkeeping (x-death) is the broker's word, not a producer's.
        let mut shown = trusted;
        for key in headers::BROKER_BOOKKEEPING {
            if let Some(value) = all.and_then(|t| t.inner().get(key)) {
                shown.insert(key.into(), value.clone());
            }
        }
        let table = Some(&shown);
        let stamped = headers::get_str(table, headers::DEAD_LETTERED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc));
        let reason = headers::get_str(table, headers::REASON).or_else(|| broker_reason(table));
        let mut shown_headers: BTreeMap<String, String> = shown.inner().iter().map(|(k, v)| (k.to_string(), text(v))).collect();
        if headers::get_str(table, headers::REASON).is_none() && data.len() > crate::job::MAX_BODY_BYTES {
            // The router refused it unread (`broker_reason`): say why, as herald would have.
            shown_headers.insert(
                headers::ERROR.to_owned(),
                format!("body of {} bytes exceeds the limit of {} bytes; refused by the router", data.len(), crate::job::MAX_BODY_BYTES),
            );
        }
        DeadLetter {
            message_id,
            reason,
            // A letter the broker dead-lettered carries no herald verdict:
            // its organization is the one its body names.
            organization_id: headers::get_str(table, headers::ORGANIZATION_ID)
                .or_else(|| crate::job::Job::peek_organization(data).map(|o| crate::text::clip(&o, 256))),
            teams_code: headers::get_str(table, headers::TEAMS_CODE),
            headers: shown_headers,
            unverified_headers,
            dead_lettered_at: stamped.or_else(|| broker_time(table)),
            body: String::from_utf8_lossy(data).into_owned(),
        }
    }

    pub fn dead_lettered_at(&self) -> Option<DateTime<Utc>> {
        self.dead_lettered_at
    }

    pub fn replays(&self) -> u32 {
        self.headers.get(headers::REPLAYS).and_then(|r| r.parse().ok()).unwrap_or(0)
    }

    /// The job's integration id, read from the body (the headers name the record, not the integration).
    pub fn integration_id(&self) -> Option<String> {
        serde_json::from_str::<Value>(&self.body).ok()?.get("integration_id")?.as_str().map(str::to_owned)
    }

    /// The conversation the job was addressed to, read from the body.
    pub fn conversation_id(&self) -> Option<String> {
        serde_json::from_str::<Value>(&self.body).ok()?.pointer("/recipient/conversation_id")?.as_str().map(str::to_owned)
    }
}

/// A message the broker itself dead-lettered has no `x-herald-reason`; its
/// `x-death` says why: the delivery limit (a job that crashed workers), or
/// `rejected`, which herald does only to a body over the job limit (the
/// router refuses it without copying it: `invalid_job`).
fn broker_reason(table: Option<&FieldTable>) -> Option<String> {
    let deaths = table?.inner().get("x-death")?.as_array()?;
    let died_of = |reason: &[u8]| {
        deaths
            .as_slice()
            .iter()
            .filter_map(|death| death.as_field_table())
            .any(|death| matches!(death.inner().get("reason"), Some(AMQPValue::LongString(r)) if r.as_bytes() == reason))
    };
    let reason = match () {
        () if died_of(b"delivery_limit") => crate::outcome::Reason::DeliveryLimitExceeded,
        () if died_of(b"rejected") => crate::outcome::Reason::InvalidJob,
        () => return None,
    };
    Some(reason.as_str().to_owned())
}

/// When the broker dead-lettered the message (the newest `x-death` entry).
fn broker_time(table: Option<&FieldTable>) -> Option<DateTime<Utc>> {
    let deaths = table?.inner().get("x-death")?.as_array()?;
    deaths
        .as_slice()
        .iter()
        .filter_map(|death| match death.as_field_table()?.inner().get("time")? {
            AMQPValue::Timestamp(secs) => DateTime::from_timestamp(i64::try_from(*secs).ok()?, 0),
            _ => None,
        })
        .max()
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

/// Which dead letters an operation applies to. Every field narrows.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub organization_id: Option<String>,
    pub integration_id: Option<String>,
    /// The conversation the job was addressed to (from the body).
    pub conversation_id: Option<String>,
    pub reason: Option<String>,
    pub teams_code: Option<String>,
    pub job_id: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Dead-lettered longer ago than this.
    pub older_than: Option<Duration>,
}

impl Filter {
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        let at = letter.dead_lettered_at();
        let eq = |want: &Option<String>, got: Option<String>| want.as_ref().is_none_or(|w| Some(w) == got.as_ref());
        eq(&self.organization_id, letter.organization_id.clone())
            && eq(&self.reason, letter.reason.clone())
            && eq(&self.teams_code, letter.teams_code.clone())
            && eq(&self.job_id, letter.message_id.clone())
            && (self.integration_id.is_none() || eq(&self.integration_id, letter.integration_id()))
            && (self.conversation_id.is_none() || eq(&self.conversation_id, letter.conversation_id()))
            && self.since.is_none_or(|since| at.is_some_and(|at| at >= since))
            && self.until.is_none_or(|until| at.is_some_and(|at| at <= until))
            && self.older_than.is_none_or(|age| at.is_some_and(|at| Utc::now().signed_duration_since(at).to_std().is_ok_and(|d| d >= age)))
    }
}

/// A pass over the dead-letter queue: each message is offered once.
pub struct Pass {
    channel: lapin::Channel,
    queue: String,
    remaining: Option<u32>,
    signer: Signer,
    /// Letters whose x-herald-* headers verified with no key of the ring.
    unverified: usize,
}

/// A message taken by a pass; left in the queue unless acked.
pub struct Taken {
    pub letter: DeadLetter,
    pub properties: BasicProperties,
    pub data: Vec<u8>,
    acker: lapin::Acker,
}

impl Pass {
    pub async fn open(connection: &Connection, queue: &str, signer: &Signer) -> Result<Self, BrokerError> {
        let channel = connection.create_channel().await.map_err(amqp("open channel"))?;
        Ok(Self { channel, queue: queue.to_owned(), remaining: None, signer: signer.clone(), unverified: 0 })
    }

    /// The next message, or `None` once every message that was in the queue
    /// when the pass began has been offered.
    pub async fn next(&mut self) -> Result<Option<Taken>, BrokerError> {
        if self.remaining == Some(0) {
            return Ok(None);
        }
        let got = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(amqp(format!("get from {}", self.queue)))?;
        let Some(message) = got else { return Ok(None) };
        // The count after the first get bounds the pass, so that letters
        // arriving meanwhile (or handed back) are not offered twice.
        self.remaining = Some(match self.remaining {
            None => message.message_count,
            Some(n) => n - 1,
        });
        let delivery = message.delivery;
        let letter = DeadLetter::from_message(&delivery.properties, &delivery.data, &self.signer);
        self.unverified += usize::from(letter.unverified_headers);
        Ok(Some(Taken { letter, properties: delivery.properties, data: delivery.data, acker: delivery.acker }))
    }

    /// Hand every unacked message back to the queue. Says so, loudly, when
    /// letters carried herald headers that no key of this process verifies:
    /// their counters and reasons were ignored, which is right for a
    /// producer's forgery and wrong when this process's keys are not the
    /// workers' (the replay guards would then be off).
    pub async fn close(self) -> Result<(), BrokerError> {
        if self.unverified > 0 {
            tracing::warn!(
                letters = self.unverified,
                queue = %self.queue,
                "dead letters carry x-herald-* headers that verify with no key of headers.signing_key, headers.previous_keys \
                 or the key kept in MongoDB: their replay counts and reasons are ignored. If herald wrote them, this \
                 tool's keys are not the workers'"
            );
        }
        self.channel.close(200, "pass done".into()).await.map_err(amqp("close pass channel"))
    }
}

impl Taken {
    /// Remove the message from the dead-letter queue.
    pub async fn remove(&self) -> Result<(), BrokerError> {
        self.acker.ack(BasicAckOptions::default()).await.map(drop).map_err(amqp("ack dead letter"))
    }
}

/// Up to `limit` dead letters matching `filter`, left in place.
pub async fn list(
    connection: &Connection,
    queue: &str,
    signer: &Signer,
    filter: &Filter,
    limit: usize,
) -> Result<Vec<DeadLetter>, BrokerError> {
    let mut pass = Pass::open(connection, queue, signer).await?;
    let mut letters = Vec::new();
    while letters.len() < limit {
        let Some(taken) = pass.next().await? else { break };
        if filter.matches(&taken.letter) {
            letters.push(taken.letter);
        }
    }
    pass.close().await?;
    Ok(letters)
}

/// What identifies a dead letter for `import`: its message id and a digest
/// of its body. Every letter in the queue now, left in place.
pub async fn fingerprints(
    connection: &Connection,
    queue: &str,
    signer: &Signer,
) -> Result<std::collections::HashSet<(Option<String>, [u8; 32])>, BrokerError> {
    use sha2::{Digest, Sha256};
    let mut pass = Pass::open(connection, queue, signer).await?;
    let mut seen = std::collections::HashSet::new();
    while let Some(taken) = pass.next().await? {
        seen.insert((taken.letter.message_id.clone(), Sha256::digest(&taken.data).into()));
    }
    pass.close().await?;
    Ok(seen)
}

/// Up to `limit` dead letters, left in place.
pub async fn browse(connection: &Connection, queue: &str, signer: &Signer, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
    list(connection, queue, signer, &Filter::default(), limit).await
}

/// The headers of a replayed job: only what verifies, the dead letter's
/// verdict and retry bookkeeping removed (the worker decides afresh), the
/// replay counted, and signed again.
pub fn replay_headers(properties: &BasicProperties, data: &[u8], signer: &Signer) -> FieldTable {
    let message_id = properties.message_id().as_ref().map(|m| m.to_string());
    let message_id = message_id.as_deref();
    let (trusted, _) = signer.trusted(message_id, data, properties.headers().as_ref());
    let drop = [
        headers::REASON,
        headers::ERROR,
        headers::TEAMS_CODE,
        headers::HTTP_STATUS,
        headers::CORRELATION_ID,
        headers::DEAD_LETTERED_AT,
        headers::HOPS,
        headers::LAST_REASON,
        headers::ORG_INTEGRATION_ID,
        headers::SIGNATURE,
    ];
    let replays = headers::get_u32(Some(&trusted), headers::REPLAYS).unwrap_or(0);
    let mut table = headers::copy_without(Some(&trusted), &drop);
    headers::set_u32(&mut table, headers::REPLAYS, replays.saturating_add(1));
    signer.sign(message_id, data, &mut table);
    table
}

/// Publish taken dead letters back to the work exchange, wait until the
/// broker confirmed every one, then remove them from the dead-letter queue.
/// On an error nothing of the batch is removed (the confirmed ones may then
/// exist twice; the ledger keeps a sent job from being posted again).
pub async fn replay(publisher: &Publisher, topology: &Topology, signer: &Signer, batch: &[Taken]) -> Result<(), BrokerError> {
    let mut pending = Vec::with_capacity(batch.len());
    for taken in batch {
        let properties = taken.properties.clone().with_headers(replay_headers(&taken.properties, &taken.data, signer));
        pending.push(publisher.start(&topology.jobs_exchange(), ROUTING_KEY, &taken.data, properties).await?);
    }
    for confirm in pending {
        confirm.confirmed().await?;
    }
    for taken in batch {
        taken.remove().await?;
    }
    Ok(())
}

/// Counts of the dead-letter queue.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Stats {
    pub total: usize,
    pub by_reason: BTreeMap<String, usize>,
    pub by_organization: BTreeMap<String, usize>,
    pub by_teams_code: BTreeMap<String, usize>,
    pub oldest: Option<DateTime<Utc>>,
    pub newest: Option<DateTime<Utc>>,
    /// Letters whose x-herald-* headers verify with no key (forged, or
    /// signed with a key this process does not hold).
    pub unverified_headers: usize,
}

impl Stats {
    pub fn add(&mut self, letter: &DeadLetter) {
        let key = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        self.total += 1;
        self.unverified_headers += usize::from(letter.unverified_headers);
        *self.by_reason.entry(key(&letter.reason)).or_default() += 1;
        *self.by_organization.entry(key(&letter.organization_id)).or_default() += 1;
        *self.by_teams_code.entry(key(&letter.teams_code)).or_default() += 1;
        if let Some(at) = letter.dead_lettered_at() {
            self.oldest = Some(self.oldest.map_or(at, |o| o.min(at)));
            self.newest = Some(self.newest.map_or(at, |n| n.max(at)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(reason: &str, org: &str, at: &str) -> DeadLetter {
        let mut headers = BTreeMap::new();
        headers.insert(headers::DEAD_LETTERED_AT.to_owned(), at.to_owned());
        DeadLetter {
            message_id: Some("j1".into()),
            reason: Some(reason.into()),
            organization_id: Some(org.into()),
            teams_code: None,
            headers,
            unverified_headers: false,
            dead_lettered_at: DateTime::parse_from_rfc3339(at).ok().map(|t| t.with_timezone(&Utc)),
            body: r#"{"integration_id": "int-1"}"#.into(),
        }
    }

    #[test]
    fn filters_narrow() {
        let l = letter("teams_forbidden", "org-a", "2026-11-20T10:00:00Z");
        assert!(Filter::default().matches(&l));
        assert!(Filter { reason: Some("teams_forbidden".into()), organization_id: Some("org-a".into()), ..Default::default() }.matches(&l));
        assert!(!Filter { reason: Some("invalid_job".into()), ..Default::default() }.matches(&l));
        assert!(Filter { integration_id: Some("int-1".into()), ..Default::default() }.matches(&l));
        assert!(!Filter { integration_id: Some("int-2".into()), ..Default::default() }.matches(&l));
        let since = DateTime::parse_from_rfc3339("2026-11-21T00:00:00Z").unwrap().with_timezone(&Utc);
        assert!(!Filter { since: Some(since), ..Default::default() }.matches(&l));
        assert!(Filter { until: Some(since), ..Default::default() }.matches(&l));
        assert!(Filter { older_than: Some(Duration::from_secs(3600)), ..Default::default() }.matches(&l));
    }

    #[test]
    fn replay_headers_count_the_replay_and_drop_the_verdict() {
        let mut table = FieldTable::default();
        headers::set_str(&mut table, headers::REASON, "teams_forbidden");
        headers::set_u32(&mut table, headers::REPLAYS, 2);
        headers::set_u32(&mut table, headers::ATTEMPTS, 4);
        headers::set_str(&mut table, headers::TRACEPARENT, "00-abc-def-01");
        let signer = Signer::new([1; 32]);
        let body = b"{}";
        signer.sign(Some("j1"), body, &mut table);
        let properties = BasicProperties::default().with_message_id("j1".into()).with_headers(table.clone());
        let out = replay_headers(&properties, body, &signer);
        assert_eq!(headers::get_u32(Some(&out), headers::REPLAYS), Some(3));
        assert_eq!(headers::get_u32(Some(&out), headers::ATTEMPTS), Some(4));
        assert_eq!(headers::get_str(Some(&out), headers::TRACEPARENT).as_deref(), Some("00-abc-def-01"));
        assert!(!out.contains_key(headers::REASON));
        assert!(signer.verify(Some("j1"), body, &out), "the replayed headers are signed");
        // A producer's forged replay count is not believed.
        let mut forged = FieldTable::default();
        headers::set_u32(&mut forged, headers::REPLAYS, 40);
        let out = replay_headers(&properties.clone().with_headers(forged), body, &signer);
        assert_eq!(headers::get_u32(Some(&out), headers::REPLAYS), Some(1));
    }

    #[test]
    fn a_message_the_broker_dead_lettered_at_its_delivery_limit_is_named_so() {
        let mut death = FieldTable::default();
        death.insert("reason".into(), AMQPValue::LongString("delivery_limit".into()));
        death.insert("queue".into(), AMQPValue::LongString("herald.msteams".into()));
        death.insert("time".into(), AMQPValue::Timestamp(1_795_000_000));
        let mut table = FieldTable::default();
        table.insert("x-death".into(), AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()));
        assert_eq!(broker_reason(Some(&table)).as_deref(), Some("delivery_limit_exceeded"));
        assert_eq!(broker_reason(Some(&FieldTable::default())), None);
        let properties = BasicProperties::default().with_message_id("j1".into()).with_headers(table);
        let letter = DeadLetter::from_message(&properties, br#"{"organization_id": "org-a"}"#, &Signer::new([0; 32]));
        assert_eq!(letter.reason.as_deref(), Some("delivery_limit_exceeded"));
        assert_eq!(letter.organization_id.as_deref(), Some("org-a"), "from the body");
        assert_eq!(letter.dead_lettered_at.unwrap().timestamp(), 1_795_000_000, "from x-death");
    }

    #[test]
    fn stats_count_and_span() {
        let mut stats = Stats::default();
        stats.add(&letter("teams_forbidden", "org-a", "2026-11-20T10:00:00Z"));
        stats.add(&letter("teams_forbidden", "org-b", "2026-11-21T10:00:00Z"));
        stats.add(&letter("invalid_job", "org-a", "2026-11-19T10:00:00Z"));
        assert_eq!(stats.total, 3);
        assert_eq!(stats.by_reason["teams_forbidden"], 2);
        assert_eq!(stats.by_organization["org-a"], 2);
        assert_eq!(stats.oldest.unwrap().to_rfc3339(), "2026-11-19T10:00:00+00:00");
        assert_eq!(stats.newest.unwrap().to_rfc3339(), "2026-11-21T10:00:00+00:00");
    }
}
