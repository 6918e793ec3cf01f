//! herald's own headers (`x-herald-*`, docs/contract.md §6): reading them
//! once into a [`History`], writing them bounded, and the trust boundary.
//!
//! **Trust**: a producer can set any header. herald only believes the
//! `x-herald-*` headers it wrote itself: every message it publishes carries
//! `x-herald-signature`, an HMAC-SHA256 (key: [`Signer`]) over the message id,
//! a digest of the body and each `x-herald-*` value. A message whose herald
//! headers are unsigned or do not verify is read as if it had none (a job's
//! first delivery), and they are dropped from whatever herald publishes for
//! it. See docs/producers.md, "Headers".
//!
//! **Size**: every value herald writes is cut to `text::MAX_FIELD_BYTES`, and
//! a producer's own headers are carried along only while they fit a budget
//! well inside the negotiated frame size, so a dead letter or retry can
//! always be published, whatever the input.

use hmac::{Hmac, Mac};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use sha2::{Digest, Sha256};

use crate::text;

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
/// What was left out of the producer's own headers to fit the size budget.
pub const DROPPED_HEADERS: &str = "x-herald-dropped-headers";
/// The HMAC over the other herald headers (see the module docs).
pub const SIGNATURE: &str = "x-herald-signature";
pub const TRACEPARENT: &str = "traceparent";

/// The prefix of every header herald owns.
pub const PREFIX: &str = "x-herald-";

/// The job's place in the order the router took jobs (docs/deploy.md,
/// "Fleet-wide pacing"); set again at every routing.
pub const ROUTED_SEQ: &str = "herald-routed-seq";

/// The broker's own bookkeeping (and the router's), which a republished
/// message must not carry.
pub const BROKER_BOOKKEEPING: [&str; 6] =
    ["x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason", "x-delivery-count", ROUTED_SEQ];

/// The most of a producer's own headers (their encoded size, in bytes) that
/// herald carries into a retry or dead letter; the rest is dropped and noted.
pub const MAX_CARRIED_BYTES: usize = 16 * 1024;

/// What herald knows of a job's history, from headers it can trust.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct History {
    /// Send attempts made before this delivery.
    pub attempts: u32,
    /// Delayed retries taken before this delivery.
    pub hops: u32,
    /// Times an operator replayed the job from the dead-letter queue.
    pub replays: u32,
    /// The message carried `x-herald-*` headers that herald did not write
    /// (or that were changed): they were ignored.
    pub forged: bool,
}

/// Signs and verifies herald's headers with keys every worker and tool of a
/// deployment shares (`headers.signing_key` and `headers.previous_keys`, or
/// one kept in MongoDB): signs with the first, verifies with any, so that
/// the key can rotate while letters signed with the old one wait in a queue.
#[derive(Clone)]
pub struct Signer {
    keys: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    pub fn new(key: [u8; 32]) -> Self {
        Self { keys: vec![key] }
    }

    /// Sign with `signing`; accept what any of `also` signed as well.
    pub fn ring(signing: [u8; 32], also: impl IntoIterator<Item = [u8; 32]>) -> Self {
        let mut keys = vec![signing];
        keys.extend(also.into_iter().filter(|key| *key != signing));
        Self { keys }
    }

    fn mac(key: &[u8; 32], message_id: Option<&str>, body: &[u8], table: &FieldTable) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
        mac.update(b"herald-headers-v1\n");
        mac.update(message_id.unwrap_or_default().as_bytes());
        mac.update(b"\n");
        mac.update(&Sha256::digest(body));
        // BTreeMap order: the same headers always hash the same way.
        for (key, value) in table.inner() {
            if key.as_str().starts_with(PREFIX) && key.as_str() != SIGNATURE {
                mac.update(key.as_str().as_bytes());
                mac.update(b"=");
                mac.update(canonical(value).as_bytes());
                mac.update(b"\n");
            }
        }
        mac
    }

    /// Add `x-herald-signature` over `table`'s herald headers.
    pub fn sign(&self, message_id: Option<&str>, body: &[u8], table: &mut FieldTable) {
        let tag = Self::mac(&self.keys[0], message_id, body, table).finalize().into_bytes();
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        set_str(table, SIGNATURE, &hex);
    }

    /// Whether `table`'s herald headers are exactly the ones herald signed,
    /// with any key of the ring.
    pub fn verify(&self, message_id: Option<&str>, body: &[u8], table: &FieldTable) -> bool {
        let Some(hex) = get_str(Some(table), SIGNATURE) else { return false };
        let Some(tag) = decode_hex(&hex) else { return false };
        self.keys.iter().any(|key| Self::mac(key, message_id, body, table).verify_slice(&tag).is_ok())
    }

    /// The herald headers of `table` if they verify, else none of them: what
    /// herald may believe of this message.
    pub fn trusted(&self, message_id: Option<&str>, body: &[u8], table: Option<&FieldTable>) -> (FieldTable, bool) {
        let Some(table) = table else { return (FieldTable::default(), false) };
        let has_herald = table.inner().keys().any(|k| k.as_str().starts_with(PREFIX));
        if !has_herald || self.verify(message_id, body, table) {
            return (table.clone(), false);
        }
        (copy_without_herald(Some(table)), true)
    }

    /// The job's history: herald's counters if the headers verify, else a
    /// first delivery (with `forged` set when herald headers were present).
    /// What [`Signer::trusted`] keeps, read in place: the counters are
    /// herald headers, so headers that do not verify count as none.
    pub fn history(&self, message_id: Option<&str>, body: &[u8], table: Option<&FieldTable>) -> History {
        let has_herald = table.is_some_and(|t| t.inner().keys().any(|k| k.as_str().starts_with(PREFIX)));
        let forged = has_herald && !table.is_some_and(|t| self.verify(message_id, body, t));
        let count = |key| if forged { 0 } else { get_u32(table, key).unwrap_or(0) };
        History { attempts: count(ATTEMPTS), hops: count(HOPS), replays: count(REPLAYS), forged }
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || text.len() > 128 {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// One value as the signature sees it: its type and its text.
fn canonical(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => format!("s:{}", String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ShortString(s) => format!("s:{}", s.as_str()),
        AMQPValue::LongLongInt(n) => format!("i:{n}"),
        AMQPValue::LongInt(n) => format!("i:{n}"),
        AMQPValue::LongUInt(n) => format!("i:{n}"),
        other => format!("?:{other:?}"),
    }
}

pub fn get_str(table: Option<&FieldTable>, key: &str) -> Option<String> {
    match table?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// A counter header; absent, negative, not a number or beyond `u32` is `None`.
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

/// Set a string header, cut to `text::MAX_FIELD_BYTES`.
pub fn set_str(table: &mut FieldTable, key: &str, value: &str) {
    table.insert(ShortString::from(key), AMQPValue::LongString(LongString::from(text::field(value))));
}

pub fn set_u32(table: &mut FieldTable, key: &str, value: u32) {
    table.insert(ShortString::from(key), AMQPValue::LongLongInt(i64::from(value)));
}

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

/// A copy of `table` without herald's headers (and the broker's bookkeeping).
pub fn copy_without_herald(table: Option<&FieldTable>) -> FieldTable {
    let mut out = FieldTable::default();
    for (key, value) in table.map(FieldTable::inner).into_iter().flatten() {
        if !key.as_str().starts_with(PREFIX) && !BROKER_BOOKKEEPING.contains(&key.as_str()) {
            out.insert(key.clone(), value.clone());
        }
    }
    out
}

/// About how many bytes `value` takes on the wire (AMQP 0-9-1 field encoding).
pub fn encoded_size(value: &AMQPValue) -> usize {
    1 + match value {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(encoded_size).sum::<usize>(),
        AMQPValue::FieldTable(t) => table_size(t),
        AMQPValue::Void => 0,
    }
}

/// About how many bytes `table` takes on the wire.
pub fn table_size(table: &FieldTable) -> usize {
    4 + table.inner().iter().map(|(k, v)| 1 + k.as_str().len() + encoded_size(v)).sum::<usize>()
}

/// What the router forwards of headers over its `budget`: herald's own if
/// they verify (herald wrote them within budget), the broker's bookkeeping
/// while it fits, and `traceparent` if it is short. A producer's other
/// headers, and herald headers that do not verify, are dropped.
pub fn routable(table: &FieldTable, message_id: Option<&str>, body: &[u8], signer: &Signer, budget: usize) -> FieldTable {
    let herald = signer.verify(message_id, body, table);
    let keep = |with_bookkeeping: bool| {
        let mut out = FieldTable::default();
        for (key, value) in table.inner() {
            let key = key.as_str();
            if (herald && key.starts_with(PREFIX)) || (with_bookkeeping && BROKER_BOOKKEEPING.contains(&key)) {
                out.insert(key.into(), value.clone());
            }
        }
        if let Some(trace) = short_traceparent(table) {
            set_str(&mut out, TRACEPARENT, &trace);
        }
        out
    };
    // The bookkeeping is the broker's, but a producer can set it too.
    let out = keep(true);
    if table_size(&out) <= budget { out } else { keep(false) }
}

/// `traceparent`, if it is short enough to be one.
fn short_traceparent(table: &FieldTable) -> Option<String> {
    get_str(Some(table), TRACEPARENT).filter(|t| t.len() <= 128)
}

/// The producer's own headers to carry into something herald publishes:
/// without herald's headers and the broker's bookkeeping, and, when they
/// exceed `budget` bytes, only `traceparent` (if it is short) plus a note of
/// what was dropped.
pub fn carried(table: Option<&FieldTable>, budget: usize) -> FieldTable {
    let own = copy_without_herald(table);
    let size = table_size(&own);
    if size <= budget {
        return own;
    }
    let mut out = FieldTable::default();
    if let Some(traceparent) = short_traceparent(&own) {
        set_str(&mut out, TRACEPARENT, &traceparent);
    }
    set_str(&mut out, DROPPED_HEADERS, &format!("{} header(s), {size} bytes, over the {budget}-byte budget", own.inner().len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        Signer::new([7; 32])
    }

    /// Over the router's budget, a job keeps herald's own headers when they
    /// verify, a short traceparent and the broker's bookkeeping, and fits.
    #[test]
    fn the_router_cuts_a_producers_headers_to_what_herald_needs() {
        let body = b"{}";
        let mut table = FieldTable::default();
        for i in 0..100 {
            table.insert(format!("x-producer-{i}").as_str().into(), AMQPValue::LongString("y".repeat(1000).into()));
        }
        set_str(&mut table, TRACEPARENT, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        set_u32(&mut table, ATTEMPTS, 4);
        table.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        signer().sign(Some("id-1"), body, &mut table);
        let routed = routable(&table, Some("id-1"), body, &signer(), MAX_CARRIED_BYTES);
        assert!(table_size(&routed) <= MAX_CARRIED_BYTES, "{}", table_size(&routed));
        assert!(signer().verify(Some("id-1"), body, &routed), "herald's headers still verify");
        assert_eq!(signer().history(Some("id-1"), body, Some(&routed)).attempts, 4);
        assert!(get_str(Some(&routed), TRACEPARENT).is_some() && routed.inner().contains_key("x-death"));
        assert!(!routed.inner().keys().any(|k| k.as_str().starts_with("x-producer")));
        // Headers that do not verify are a producer's: dropped with the rest.
        let forged = routable(&table, Some("id-1"), body, &Signer::new([8; 32]), MAX_CARRIED_BYTES);
        assert!(get_str(Some(&forged), ATTEMPTS).is_none() && get_str(Some(&forged), TRACEPARENT).is_some());
    }

    #[test]
    fn headers_round_trip_and_bookkeeping_is_dropped() {
        let mut table = FieldTable::default();
        set_str(&mut table, REASON, "teams_forbidden");
        set_u32(&mut table, ATTEMPTS, 3);
        table.insert("x-death".into(), AMQPValue::LongString("x".into()));
        assert_eq!(get_str(Some(&table), REASON).as_deref(), Some("teams_forbidden"));
        assert_eq!(get_u32(Some(&table), ATTEMPTS), Some(3));
        let clean = copy_without(Some(&table), &[ATTEMPTS]);
        assert!(!clean.contains_key("x-death"));
        assert!(!clean.contains_key(ATTEMPTS));
        assert!(clean.contains_key(REASON));
    }

    #[test]
    fn counters_out_of_range_are_not_counters() {
        let mut table = FieldTable::default();
        table.insert(ATTEMPTS.into(), AMQPValue::LongLongInt(i64::MAX));
        table.insert(HOPS.into(), AMQPValue::LongLongInt(-1));
        table.insert(REPLAYS.into(), AMQPValue::LongString("99999999999999999999".into()));
        assert_eq!(get_u32(Some(&table), ATTEMPTS), None);
        assert_eq!(get_u32(Some(&table), HOPS), None);
        assert_eq!(get_u32(Some(&table), REPLAYS), None);
    }

    #[test]
    fn values_are_cut_to_the_field_limit() {
        let mut table = FieldTable::default();
        set_str(&mut table, ERROR, &"x".repeat(150_000));
        assert_eq!(get_str(Some(&table), ERROR).unwrap().len(), text::MAX_FIELD_BYTES);
    }

    #[test]
    fn only_headers_herald_signed_are_believed() {
        let body = br#"{"job": 1}"#;
        let mut table = FieldTable::default();
        set_u32(&mut table, HOPS, 3);
        set_u32(&mut table, ATTEMPTS, 5);
        set_str(&mut table, TRACEPARENT, "00-abc-def-01");
        signer().sign(Some("id-1"), body, &mut table);
        assert_eq!(signer().history(Some("id-1"), body, Some(&table)), History { attempts: 5, hops: 3, replays: 0, forged: false });

        // A producer's own counters (no signature) are ignored.
        let mut forged = FieldTable::default();
        set_u32(&mut forged, HOPS, 99);
        set_u32(&mut forged, ATTEMPTS, u32::MAX);
        assert_eq!(signer().history(Some("id-1"), body, Some(&forged)), History { forged: true, ..Default::default() });

        // Changing a signed value, the body, the message id or the key breaks it.
        let mut changed = table.clone();
        set_u32(&mut changed, HOPS, 0);
        assert!(!signer().verify(Some("id-1"), body, &changed));
        assert!(!signer().verify(Some("id-1"), b"{}", &table));
        assert!(!signer().verify(Some("id-2"), body, &table));
        assert!(!Signer::new([8; 32]).verify(Some("id-1"), body, &table));
        // A signed message copied under a new header is not believed either.
        let mut added = table.clone();
        set_str(&mut added, REASON, "teams_forbidden");
        assert!(signer().history(Some("id-1"), body, Some(&added)).forged);
        // Headers that are not herald's do not need a signature.
        let (kept, forged) = signer().trusted(Some("id-1"), body, Some(&forged));
        assert!(forged && kept.inner().is_empty());
    }

    #[test]
    fn oversized_producer_headers_are_dropped_with_a_note() {
        let mut table = FieldTable::default();
        set_str(&mut table, TRACEPARENT, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        for i in 0..40 {
            table.insert(format!("x-big-{i}").as_str().into(), AMQPValue::LongString("y".repeat(1000).into()));
        }
        let out = carried(Some(&table), MAX_CARRIED_BYTES);
        assert!(table_size(&out) < 1024, "{}", table_size(&out));
        assert!(get_str(Some(&out), TRACEPARENT).is_some());
        assert!(get_str(Some(&out), DROPPED_HEADERS).unwrap().contains("41 header(s)"));
        let small = carried(Some(&out), MAX_CARRIED_BYTES);
        assert_eq!(small.inner().len(), 1, "herald's own note is not carried again: {small:?}");
    }
}
