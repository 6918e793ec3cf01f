//! The deliveries ledger (docs/contract.md §5): one record per job of one
//! org_integration, claimed with a lease before sending.
//!
//! - **Scoped**: the record's `_id` is `delivery_key(job, organization,
//!   integration)`, so one organization's job ids can never suppress,
//!   overwrite or read another organization's record.
//! - **Owned**: a claim writes an owner token no other claim has
//!   (`Owners`); only statements that name that token change the record
//!   afterwards. A copy that finds the job claimed by someone else writes
//!   nothing.
//! - **Server time**: the lease runs out at the server's `$$NOW` plus the
//!   lease, computed in an update pipeline; no worker's clock is compared
//!   with another's.
//! - **Group commit**: claims and "sent" marks of concurrent jobs share one
//!   `update` command (`ordered: false`), so a busy worker makes a few round
//!   trips per batch instead of one per job. Each claim is its own statement
//!   (an upsert); the marks of a batch, one or many, are one statement
//!   together (`multi`, each record's values picked by its owner token), so a
//!   delivered job costs one statement and a share of one. Nothing waits for
//!   a batch to fill: the flusher takes what is queued now, and while its
//!   command is in flight the next batch gathers (one command at a time;
//!   docs/benchmarks.md has the figures against four at a time).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_util::{FutureExt, TryStreamExt};
use mongodb::Database;
use mongodb::bson::{Bson, Document, RawDocumentBuf, doc, rawdoc};
use mongodb::error::{Error as MongoError, ErrorKind, WriteConcernError, WriteError, WriteFailure};
use tokio::sync::{mpsc, oneshot};

use super::writer::Writer;
use super::{DELIVERIES, OpCounts, StoreError, bounded};

/// Statements per command; MongoDB allows far more, this bounds latency.
const MAX_BATCH: usize = 256;

/// Owner tokens: 128 random bits drawn once per process, then a counter, so
/// no two claims anywhere share a token without a call to the operating
/// system's random source for every job.
#[derive(Debug)]
pub struct Owners {
    process: String,
    next: AtomicU64,
}

impl Default for Owners {
    fn default() -> Self {
        Self { process: uuid::Uuid::new_v4().simple().to_string(), next: AtomicU64::new(0) }
    }
}

impl Owners {
    pub fn next(&self) -> String {
        format!("{}-{:x}", self.process, self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// A claim this delivery holds: its record and its owner token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: String,
    pub owner: String,
    /// The record was `sending` under another owner whose lease ran out (a
    /// worker died, or lost MongoDB, mid-send): this send may be a second post.
    pub taken_over: bool,
    /// How many claims on this record ended that way, this one's included:
    /// the job's attempts that crashed or lost their worker. A job returned
    /// to its queue unstarted (a handover) never claimed, and is not counted.
    pub takeovers: u32,
}

/// What the ledger says about a job about to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Not sent yet, and now ours to send.
    Fresh(Lease),
    /// Already recorded `sent`: ack without a second post.
    AlreadySent,
    /// An earlier delivery's outcome was ambiguous; only an operator resends it.
    Unconfirmed,
    /// Another delivery of the same job holds a live lease: try again later.
    InProgress,
}

pub(super) enum Op {
    Claim { key: String, job_id: String, organization_id: String, integration_id: String, owner: String, lease_ms: i64 },
    Sent { key: String, owner: String, conversation_id: String, activity_id: String, attempts: i64, entries: Vec<RawDocumentBuf> },
}

/// What one statement of a batch came to.
pub(super) enum Done {
    Claimed(Claim),
    /// `false`: the lease was no longer ours (another delivery took it over).
    Marked(bool),
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Done, MongoError>>,
}

#[derive(Clone)]
pub(super) struct Ledger {
    tx: mpsc::Sender<Request>,
}

impl Ledger {
    /// Start the flusher; every statement and read it sends is counted in
    /// `counts`, and each command it sends fails after `timeout`.
    pub fn start(db: Database, counts: Arc<OpCounts>, timeout: Duration) -> Self {
        let (tx, rx) = mpsc::channel::<Request>(4 * MAX_BATCH);
        tokio::spawn(flusher(db, rx, counts, timeout));
        Self { tx }
    }

    pub async fn run(&self, operation: &'static str, op: Op) -> Result<Done, StoreError> {
        let (reply, answer) = oneshot::channel();
        let gone = || StoreError { operation, source: MongoError::custom("the ledger writer stopped") };
        self.tx.send(Request { op, reply }).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?.map_err(|source| StoreError { operation, source })
    }
}

/// One command in flight at a time: the statements queued while it is out
/// go together in the next. A command's cost (building it, the driver's
/// round trip, the server's work, the wake-ups) is mostly per command, so
/// fewer, larger commands cost less CPU in the worker and in MongoDB than
/// several flushers each sending what was queued when it was free, at the
/// same publish-to-Teams latency (docs/benchmarks.md).
///
/// A batch that panics (a bug) fails its own requests, not the flusher: the
/// next batch goes out as usual, so one bad statement cannot stop every
/// ledger write of the worker.
async fn flusher(db: Database, mut rx: mpsc::Receiver<Request>, counts: Arc<OpCounts>, timeout: Duration) {
    loop {
        let Some(first) = rx.recv().await else { return };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let (requests, replies): (Vec<Op>, Vec<_>) = batch.into_iter().map(|r| (r.op, r.reply)).unzip();
        let results = match AssertUnwindSafe(flush(&db, &requests, &counts, timeout)).catch_unwind().await {
            Ok(results) => results,
            Err(_) => {
                tracing::error!(
                    statements = requests.len(),
                    "the ledger's batch panicked (a bug); its writes failed, the next batch goes on"
                );
                requests.iter().map(|_| Err(MongoError::custom("the ledger's batch failed unexpectedly"))).collect()
            }
        };
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

/// May a claim take the record: neither sent nor unconfirmed, and no live
/// lease on it. Built once; every claim carries it.
static CLAIMABLE: LazyLock<RawDocumentBuf> = LazyLock::new(|| {
    rawdoc! { "$and": [
        { "$not": [{ "$in": [{ "$ifNull": ["$state", "new"] }, ["sent", "unconfirmed"]] }] },
        { "$not": [{ "$gt": ["$lease_until", "$$NOW"] }] },
    ] }
});

/// A claim's statement. One statement for a new job (an upsert) and for a
/// known one, one stage: the record is replaced by itself merged with the
/// job's ids (and the defaults of a new record), and, only when it may be
/// taken (`CLAIMABLE`), with the lease: state `sending`, this claim's owner
/// token, the lease's end at the server's `$$NOW` plus `lease_ms`. A record
/// that may not be taken is left as it was. Who holds it afterwards is read
/// back only for records that existed (rare: redeliveries, retries, replays).
///
/// ```text
/// { q: { _id: key },
///   u: [{ $replaceWith: { $mergeObjects: [
///         "$$ROOT",
///         { attempts: { $ifNull: ["$attempts", 0] }, created_at: { $ifNull: ["$created_at", "$$NOW"] },
///           job_id: { $literal: job_id }, organization_id: { $literal: .. }, integration_id: { $literal: .. } },
///         { $cond: [CLAIMABLE,
///                   { claimed_from: { $ifNull: ["$state", "new"] }, state: "sending", updated_at: "$$NOW",
///                     takeovers: { $add: [{ $ifNull: ["$takeovers", 0] }, { $cond: [{ $eq: ["$state", "sending"] }, 1, 0] }] },
///                     owner: { $literal: owner },
///                     lease_until: { $dateAdd: { startDate: "$$NOW", unit: "millisecond", amount: lease_ms } } },
///                   {}] } ] } }],
///   upsert: true }
/// ```
///
/// Written into the batch's command (`Writer`): it is built for every job,
/// and `rawdoc!` spent several times as many instructions on it.
fn claim_statement(w: &mut Writer, key: &str, job_id: &str, organization_id: &str, integration_id: &str, owner: &str, lease_ms: i64) {
    w.doc("");
    w.doc("q").str("_id", key).end();
    w.array("u").doc("").doc("$replaceWith").array("$mergeObjects");
    w.str("", "$$ROOT");
    w.doc("");
    w.doc("attempts").array("$ifNull").str("", "$attempts").i64("", 0).end().end();
    w.doc("created_at").array("$ifNull").str("", "$created_at").str("", "$$NOW").end().end();
    w.literal("job_id", job_id).literal("organization_id", organization_id).literal("integration_id", integration_id);
    w.end();
    w.doc("").array("$cond").raw("", &CLAIMABLE).doc("");
    w.doc("claimed_from").array("$ifNull").str("", "$state").str("", "new").end().end();
    w.str("state", "sending").str("updated_at", "$$NOW");
    w.doc("takeovers").array("$add");
    w.doc("").array("$ifNull").str("", "$takeovers").i64("", 0).end().end();
    w.doc("").array("$cond").doc("").array("$eq").str("", "$state").str("", "sending").end().end().i64("", 1).i64("", 0).end().end();
    w.end().end();
    w.literal("owner", owner);
    w.doc("lease_until").doc("$dateAdd").str("startDate", "$$NOW").str("unit", "millisecond").i64("amount", lease_ms).end().end();
    w.end().doc("").end().end().end();
    w.end().end().end().end();
    w.bool("upsert", true);
    w.end();
}

/// The "sent" marks among `ops` as one statement: only the holder of a claim
/// may mark it, so every record that one of them still holds (its owner is
/// one of the batch's tokens) is updated, and each takes its own values from
/// the arrays by the index of its owner token. A token is written by one
/// claim on one record and never reused (`Owners`), so a record can only
/// match the mark made for it, and a mark whose claim was taken over matches
/// nothing.
///
/// ```text
/// { q: { _id: { $in: keys }, owner: { $in: owners } },
///   u: [{ $set: { _mark: { $indexOfArray: [{ $literal: owners }, "$owner"] } } },
///       { $set: { state: "sent", conversation_id: pick(conversations), activity_id: pick(activities),
///                 attempts: { $add: [{ $ifNull: ["$attempts", 0] }, pick(attempts)] },
///                 history: { $slice: [{ $concatArrays: [{ $ifNull: ["$history", []] }, pick(entries)] }, -MAX_HISTORY] },
///                 updated_at: "$$NOW" } },
///       { $unset: ["_mark", "last_error", "reason", "lease_until", "owner", "claimed_from"] }],
///   multi: true }
/// pick(values) = { $arrayElemAt: [{ $literal: values }, "$_mark"] }
/// ```
///
/// `$literal`: a value starting with `$` is data, not a field path. Written
/// into the batch's command (`Writer`), as the claims are.
fn marks_statement(w: &mut Writer, ops: &[Op]) {
    let marks: Vec<Mark> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Sent { key, owner, conversation_id, activity_id, attempts, entries } => {
                Some(Mark { key, owner, conversation_id, activity_id, attempts: *attempts, entries })
            }
            Op::Claim { .. } => None,
        })
        .collect();
    let strings = |w: &mut Writer, key: &str, field: for<'m> fn(&'m Mark<'m>) -> &'m str| {
        w.array(key);
        for mark in &marks {
            w.str("", field(mark));
        }
        w.end();
    };
    w.doc("");
    w.doc("q");
    w.doc("_id");
    strings(w, "$in", |m| m.key);
    w.end();
    w.doc("owner");
    strings(w, "$in", |m| m.owner);
    w.end();
    w.end();
    w.array("u");
    w.doc("").doc("$set").doc("_mark").array("$indexOfArray").doc("");
    strings(w, "$literal", |m| m.owner);
    w.end().str("", "$owner").end().end().end().end();
    w.doc("").doc("$set");
    w.str("state", "sent");
    w.doc("conversation_id").array("$arrayElemAt").doc("");
    strings(w, "$literal", |m| m.conversation_id);
    w.end().str("", "$_mark").end().end();
    w.doc("activity_id").array("$arrayElemAt").doc("");
    strings(w, "$literal", |m| m.activity_id);
    w.end().str("", "$_mark").end().end();
    w.doc("attempts").array("$add");
    w.doc("").array("$ifNull").str("", "$attempts").i64("", 0).end().end();
    w.doc("").array("$arrayElemAt").doc("").array("$literal");
    for mark in &marks {
        w.i64("", mark.attempts);
    }
    w.end().end().str("", "$_mark").end().end();
    w.end().end();
    w.doc("history").array("$slice").doc("").array("$concatArrays");
    w.doc("").array("$ifNull").str("", "$history").array("").end().end().end();
    w.doc("").array("$arrayElemAt").doc("").array("$literal");
    for mark in &marks {
        w.array("");
        for entry in mark.entries {
            w.raw("", entry);
        }
        w.end();
    }
    w.end().end().str("", "$_mark").end().end();
    w.end().end().i32("", -super::MAX_HISTORY).end().end();
    w.str("updated_at", "$$NOW");
    w.end().end();
    w.doc("").array("$unset");
    for field in ["_mark", "last_error", "reason", "lease_until", "owner", "claimed_from"] {
        w.str("", field);
    }
    w.end().end();
    w.end();
    w.bool("multi", true);
    w.end();
}

/// The batch's `update` command: a statement per claim, in the order of
/// `ops`, then the marks, if any, as one statement.
fn update_command(ops: &[Op]) -> RawDocumentBuf {
    let mut w = Writer::with_capacity(128 + 768 * ops.len());
    w.str("update", DELIVERIES).array("updates");
    for op in ops {
        if let Op::Claim { key, job_id, organization_id, integration_id, owner, lease_ms } = op {
            claim_statement(&mut w, key, job_id, organization_id, integration_id, owner, *lease_ms);
        }
    }
    if ops.iter().any(|op| matches!(op, Op::Sent { .. })) {
        marks_statement(&mut w, ops);
    }
    w.end().bool("ordered", false);
    w.finish()
}

/// One `sent` mark's values, borrowed from its `Op`.
struct Mark<'a> {
    key: &'a str,
    owner: &'a str,
    conversation_id: &'a str,
    activity_id: &'a str,
    attempts: i64,
    entries: &'a [RawDocumentBuf],
}

fn key_of(op: &Op) -> &str {
    match op {
        Op::Claim { key, .. } | Op::Sent { key, .. } => key,
    }
}

/// What a batch's statements came to, in order.
async fn flush(db: &Database, ops: &[Op], counts: &OpCounts, timeout: Duration) -> Vec<Result<Done, MongoError>> {
    // Each claim is a statement; the marks, if any, are one statement
    // together, the last. `statement_of[i]`: the statement that carries `ops[i]`.
    let claims = ops.iter().filter(|op| matches!(op, Op::Claim { .. })).count();
    let mut statement_of = Vec::with_capacity(ops.len());
    let mut claimed = 0;
    for op in ops {
        match op {
            Op::Claim { .. } => {
                statement_of.push(claimed);
                claimed += 1;
            }
            Op::Sent { .. } => statement_of.push(claims),
        }
    }
    let marked = claims < ops.len();
    counts.writes.fetch_add((claims + usize::from(marked)) as u64, Ordering::Relaxed);
    let answer = match bounded(timeout, db.run_raw_command(update_command(ops))).await {
        Ok(answer) => answer,
        Err(err) => return ops.iter().map(|_| Err(err.clone())).collect(),
    };
    if let Some(err) = write_concern_error(&answer) {
        return ops.iter().map(|_| Err(err.clone())).collect();
    }
    // Errors and upserts are reported by statement; each applies to the ops it carries.
    let by_statement = |name: &str| -> Vec<(usize, &mongodb::bson::Document)> {
        answer
            .get_array(name)
            .into_iter()
            .flatten()
            .filter_map(Bson::as_document)
            .filter_map(|entry| Some((usize::try_from(entry.get_i32("index").ok()?).ok()?, entry)))
            .collect()
    };
    let mut errors: Vec<Option<MongoError>> = vec![None; ops.len()];
    for (index, entry) in by_statement("writeErrors") {
        let err = write_error(entry);
        for (slot, _) in errors.iter_mut().zip(&statement_of).filter(|(_, s)| **s == index) {
            *slot = Some(err.clone());
        }
    }
    let mut upserted = vec![false; ops.len()];
    for (index, _) in by_statement("upserted") {
        for (slot, _) in upserted.iter_mut().zip(&statement_of).filter(|(_, s)| **s == index) {
            *slot = true;
        }
    }
    // Every claim statement matches or upserts one record; what `n` counts
    // beyond them are the marks that found their owner.
    let marks = ops.len() - claims;
    let matched = usize::try_from(answer.get_i32("n").unwrap_or_default()).unwrap_or_default();
    let all_marks_held = errors.iter().all(Option::is_none) && matched.saturating_sub(claims) == marks;
    // Read back the records whose outcome the counts do not tell.
    let unknown: Vec<&str> = ops
        .iter()
        .zip(&errors)
        .zip(&upserted)
        .filter(|((op, error), upserted)| error.is_none() && !**upserted && (matches!(op, Op::Claim { .. }) || !all_marks_held))
        .map(|((op, _), _)| key_of(op))
        .collect();
    if !unknown.is_empty() {
        counts.reads.fetch_add(1, Ordering::Relaxed);
    }
    let records = match bounded(timeout, read_back(db, &unknown)).await {
        Ok(records) => records,
        Err(err) => return ops.iter().map(|_| Err(err.clone())).collect(),
    };
    ops.iter()
        .zip(errors)
        .zip(upserted)
        .map(|((op, error), upserted)| {
            if let Some(err) = error {
                return Err(err);
            }
            let record = records.get(key_of(op));
            let field = |name: &str| record.and_then(|r| r.get_str(name).ok());
            Ok(match op {
                Op::Claim { key, owner, .. } if upserted => {
                    Done::Claimed(Claim::Fresh(Lease { key: key.clone(), owner: owner.clone(), taken_over: false, takeovers: 0 }))
                }
                Op::Claim { key, owner, .. } if field("owner") == Some(owner.as_str()) => Done::Claimed(Claim::Fresh(Lease {
                    key: key.clone(),
                    owner: owner.clone(),
                    taken_over: field("claimed_from") == Some("sending"),
                    takeovers: record.map_or(0, takeovers),
                })),
                Op::Claim { .. } => Done::Claimed(match field("state") {
                    Some("sent") => Claim::AlreadySent,
                    Some("unconfirmed") => Claim::Unconfirmed,
                    // `sending` under another delivery's live lease.
                    _ => Claim::InProgress,
                }),
                Op::Sent { .. } if all_marks_held => Done::Marked(true),
                Op::Sent { activity_id, .. } => {
                    Done::Marked(field("state") == Some("sent") && field("activity_id") == Some(activity_id.as_str()))
                }
            })
        })
        .collect()
}

/// A statement's entry of `writeErrors` as the driver's own error, its code
/// kept, so that `is_transient` can tell a stepped-down primary from a bad
/// statement.
fn write_error(entry: &Document) -> MongoError {
    match mongodb::bson::from_document::<WriteError>(entry.clone()) {
        Ok(write) => ErrorKind::Write(WriteFailure::WriteError(write)).into(),
        Err(_) => MongoError::custom(format!("an unreadable write error: {entry}")),
    }
}

/// The answer's `writeConcernError`, with its code and labels (servers put
/// the labels beside it, at the top of the answer), as the driver's own error.
fn write_concern_error(answer: &Document) -> Option<MongoError> {
    let mut concern = answer.get_document("writeConcernError").ok()?.clone();
    if let (false, Ok(labels)) = (concern.contains_key("errorLabels"), answer.get_array("errorLabels")) {
        concern.insert("errorLabels", labels.clone());
    }
    Some(match mongodb::bson::from_document::<WriteConcernError>(concern.clone()) {
        Ok(concern) => ErrorKind::Write(WriteFailure::WriteConcernError(concern)).into(),
        Err(_) => MongoError::custom(format!("an unreadable write concern error: {concern}")),
    })
}

/// A record's `takeovers`.
fn takeovers(record: &Document) -> u32 {
    u32::try_from(super::integer(record.get("takeovers")).unwrap_or(0).max(0)).unwrap_or(u32::MAX)
}

/// The state, owner and activity of `keys`, one read for the whole batch.
async fn read_back(db: &Database, keys: &[&str]) -> Result<HashMap<String, Document>, MongoError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let found: Vec<Document> = db
        .collection::<Document>(DELIVERIES)
        .find(doc! { "_id": { "$in": keys } })
        .projection(doc! { "state": 1, "owner": 1, "claimed_from": 1, "activity_id": 1, "takeovers": 1 })
        .await?
        .try_collect()
        .await?;
    Ok(found.into_iter().filter_map(|d| Some((d.get_str("_id").ok()?.to_owned(), d))).collect())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use mongodb::bson::rawdoc;

    use mongodb::bson::{RawArrayBuf, RawDocumentBuf};

    use super::{CLAIMABLE, DELIVERIES, Op, Owners, update_command, write_concern_error, write_error};
    use crate::mongo::is_transient;

    /// A primary that steps down answers a batch `ok: 1` with the failure in
    /// `writeErrors` or `writeConcernError`: the error keeps its code (and
    /// labels), so the ledger's callers retry it instead of giving up on a
    /// posted job's "sent" mark.
    #[test]
    fn a_batchs_write_and_write_concern_errors_keep_their_kind() {
        use mongodb::bson::doc;
        let stepped_down = doc! { "index": 0, "code": 10107, "errmsg": "not primary" };
        assert!(is_transient(&write_error(&stepped_down)));
        let duplicate = doc! { "index": 0, "code": 11000, "errmsg": "E11000 duplicate key" };
        assert!(!is_transient(&write_error(&duplicate)), "a bad statement is not retried");

        let election =
            doc! { "ok": 1, "n": 1, "writeConcernError": { "code": 189, "codeName": "PrimarySteppedDown", "errmsg": "stepped down" } };
        assert!(is_transient(&write_concern_error(&election).expect("a write concern error")));
        let labelled = doc! {
            "ok": 1, "n": 1, "errorLabels": ["RetryableWriteError"],
            "writeConcernError": { "code": 64, "codeName": "WriteConcernFailed", "errmsg": "waiting for replication timed out" },
        };
        let err = write_concern_error(&labelled).expect("a write concern error");
        assert!(err.contains_label("RetryableWriteError") && is_transient(&err), "{err:?}");
        let unlabelled = doc! { "ok": 1, "writeConcernError": { "code": 100, "errmsg": "unsatisfiable" } };
        assert!(!is_transient(&write_concern_error(&unlabelled).unwrap()));
        assert!(write_concern_error(&doc! { "ok": 1, "n": 3 }).is_none());
    }

    /// A command that does not answer within the timeout fails as a lost
    /// connection does (and is retried like one), instead of holding the
    /// batch's claims for as long as the socket lives.
    #[tokio::test(start_paused = true)]
    async fn a_command_that_never_answers_fails_as_transient_after_the_timeout() {
        let stalled = std::future::pending::<Result<(), mongodb::error::Error>>();
        let err = crate::mongo::bounded(std::time::Duration::from_secs(10), stalled).await.unwrap_err();
        assert!(is_transient(&err), "{err:?}");
    }

    /// The documented claim statement, built the slow, plain way (`rawdoc!`).
    fn claim_as_rawdoc(op: &Op) -> RawDocumentBuf {
        let Op::Claim { key, job_id, organization_id, integration_id, owner, lease_ms } = op else { panic!("a claim") };
        let (key, job_id, organization_id, integration_id, owner) =
            (key.as_str(), job_id.as_str(), organization_id.as_str(), integration_id.as_str(), owner.as_str());
        rawdoc! {
            "q": { "_id": key },
            "u": [{ "$replaceWith": { "$mergeObjects": [
                "$$ROOT",
                {
                    "attempts": { "$ifNull": ["$attempts", 0_i64] },
                    "created_at": { "$ifNull": ["$created_at", "$$NOW"] },
                    "job_id": { "$literal": job_id },
                    "organization_id": { "$literal": organization_id },
                    "integration_id": { "$literal": integration_id },
                },
                { "$cond": [CLAIMABLE.clone(), {
                    "claimed_from": { "$ifNull": ["$state", "new"] },
                    "state": "sending",
                    "updated_at": "$$NOW",
                    "takeovers": { "$add": [{ "$ifNull": ["$takeovers", 0_i64] }, { "$cond": [{ "$eq": ["$state", "sending"] }, 1_i64, 0_i64] }] },
                    "owner": { "$literal": owner },
                    "lease_until": { "$dateAdd": { "startDate": "$$NOW", "unit": "millisecond", "amount": *lease_ms } },
                }, {}] },
            ] } }],
            "upsert": true,
        }
    }

    /// The documented marks statement, built the slow, plain way.
    fn marks_as_rawdoc(ops: &[Op]) -> RawDocumentBuf {
        let (mut keys, mut owners, mut conversations, mut activities, mut attempts, mut entries) =
            (RawArrayBuf::new(), RawArrayBuf::new(), RawArrayBuf::new(), RawArrayBuf::new(), RawArrayBuf::new(), RawArrayBuf::new());
        for op in ops {
            let Op::Sent { key, owner, conversation_id, activity_id, attempts: sends, entries: each } = op else { continue };
            keys.push(key.as_str());
            owners.push(owner.as_str());
            conversations.push(conversation_id.as_str());
            activities.push(activity_id.as_str());
            attempts.push(*sends);
            let mut list = RawArrayBuf::new();
            for entry in each {
                list.push(entry.clone());
            }
            entries.push(list);
        }
        let pick = |values: RawArrayBuf| rawdoc! { "$arrayElemAt": [{ "$literal": values }, "$_mark"] };
        rawdoc! {
            "q": { "_id": { "$in": keys }, "owner": { "$in": owners.clone() } },
            "u": [
                { "$set": { "_mark": { "$indexOfArray": [{ "$literal": owners }, "$owner"] } } },
                { "$set": {
                    "state": "sent",
                    "conversation_id": pick(conversations),
                    "activity_id": pick(activities),
                    "attempts": { "$add": [{ "$ifNull": ["$attempts", 0_i64] }, pick(attempts)] },
                    "history": { "$slice": [
                        { "$concatArrays": [{ "$ifNull": ["$history", []] }, pick(entries)] },
                        -crate::mongo::MAX_HISTORY,
                    ] },
                    "updated_at": "$$NOW",
                } },
                { "$unset": ["_mark", "last_error", "reason", "lease_until", "owner", "claimed_from"] },
            ],
            "multi": true,
        }
    }

    /// The documented command: each claim in order, then the marks as one.
    fn command_as_rawdoc(ops: &[Op]) -> RawDocumentBuf {
        let mut updates = RawArrayBuf::new();
        for op in ops.iter().filter(|op| matches!(op, Op::Claim { .. })) {
            updates.push(claim_as_rawdoc(op));
        }
        if ops.iter().any(|op| matches!(op, Op::Sent { .. })) {
            updates.push(marks_as_rawdoc(ops));
        }
        rawdoc! { "update": DELIVERIES, "updates": updates, "ordered": false }
    }

    fn claim(i: usize, [key, job_id, organization_id, integration_id, owner]: [&str; 5]) -> Op {
        Op::Claim {
            key: format!("{key}{i}"),
            job_id: job_id.into(),
            organization_id: organization_id.into(),
            integration_id: integration_id.into(),
            owner: format!("{owner}{i}"),
            lease_ms: 90_000 + i as i64,
        }
    }

    fn mark(i: usize, entries: usize) -> Op {
        Op::Sent {
            key: format!("key-{i}"),
            owner: format!("$owner-{i}"),
            conversation_id: format!("19:conv-{i}@thread.tacv2"),
            activity_id: format!("$activity-{i}"),
            attempts: i as i64 + 1,
            entries: (0..entries).map(|n| rawdoc! { "at": n as i64, "outcome": "sent", "detail": "é \u{0}" }).collect(),
        }
    }

    #[test]
    fn a_batch_s_command_is_the_documented_pipelines_byte_for_byte() {
        let odd = ["$key", "$$NOW", "org \u{0} é", "", "$owner"];
        let plain = ["k", "j", "o", "i", "t"];
        let batches: Vec<Vec<Op>> = vec![
            vec![claim(0, plain)],
            vec![claim(0, odd)],
            vec![mark(0, 1)],
            vec![mark(0, 0), claim(1, odd), mark(1, 3), claim(2, plain)],
            (0..25).map(|i| if i % 3 == 0 { claim(i, plain) } else { mark(i, i % 4) }).collect(),
        ];
        for ops in batches {
            assert_eq!(update_command(&ops).as_bytes(), command_as_rawdoc(&ops).as_bytes(), "{} ops", ops.len());
        }
    }

    #[test]
    fn owner_tokens_are_never_repeated_within_a_process_or_across_processes() {
        let (one, other) = (Owners::default(), Owners::default());
        let tokens: HashSet<String> = (0..1_000).flat_map(|_| [one.next(), other.next()]).collect();
        assert_eq!(tokens.len(), 2_000);
        assert!(tokens.iter().all(|t| t.len() > 32), "each token keeps the 128 random bits of its process");
    }
}
