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
//!   a batch to fill: a flusher takes what is queued now.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use futures_util::TryStreamExt;
use mongodb::Database;
use mongodb::bson::{Bson, Document, RawArrayBuf, RawBson, RawDocumentBuf, doc, rawdoc};
use mongodb::error::Error as MongoError;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{DELIVERIES, OpCounts, StoreError};

/// Statements per command; MongoDB allows far more, this bounds latency.
const MAX_BATCH: usize = 256;
/// Commands in flight at once.
const FLUSHERS: usize = 4;

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
    /// Start the flushers; every statement and read they send is counted in `counts`.
    pub fn start(db: Database, counts: Arc<OpCounts>) -> Self {
        let (tx, rx) = mpsc::channel::<Request>(4 * MAX_BATCH);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..FLUSHERS {
            tokio::spawn(flusher(db.clone(), rx.clone(), counts.clone()));
        }
        Self { tx }
    }

    pub async fn run(&self, operation: &'static str, op: Op) -> Result<Done, StoreError> {
        let (reply, answer) = oneshot::channel();
        let gone = || StoreError { operation, source: MongoError::custom("the ledger writer stopped") };
        self.tx.send(Request { op, reply }).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?.map_err(|source| StoreError { operation, source })
    }
}

async fn flusher(db: Database, rx: Arc<Mutex<mpsc::Receiver<Request>>>, counts: Arc<OpCounts>) {
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else { return };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            batch
        };
        let (requests, replies): (Vec<Op>, Vec<_>) = batch.into_iter().map(|r| (r.op, r.reply)).unzip();
        let results = flush(&db, &requests, &counts).await;
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

/// Values from outside (ids, tokens) enter a pipeline as literals: a string
/// starting with `$` would otherwise be read as a field path.
fn literal(value: &str) -> RawDocumentBuf {
    rawdoc! { "$literal": value }
}

/// `then` if the claim's first stage found the record free, else the field
/// as it was.
fn when(then: RawBson, otherwise: &str) -> RawDocumentBuf {
    rawdoc! { "$cond": ["$_claim", then, otherwise] }
}

/// The parts of a claim that are the same for every job, built once: the
/// pipeline's first stage (may the record be taken?), the fields of its
/// second stage that name no job, and the last stage.
static CLAIM_PARTS: LazyLock<(RawDocumentBuf, RawDocumentBuf, RawDocumentBuf)> = LazyLock::new(|| {
    let claimable = rawdoc! { "$and": [
        { "$not": [{ "$in": [{ "$ifNull": ["$state", "new"] }, ["sent", "unconfirmed"]] }] },
        { "$not": [{ "$gt": ["$lease_until", "$$NOW"] }] },
    ] };
    let constant = rawdoc! {
        "claimed_from": when(rawdoc! { "$ifNull": ["$state", "new"] }.into(), "$claimed_from"),
        "state": when("sending".into(), "$state"),
        "updated_at": when("$$NOW".into(), "$updated_at"),
        "attempts": { "$ifNull": ["$attempts", 0_i64] },
        "created_at": { "$ifNull": ["$created_at", "$$NOW"] },
    };
    (rawdoc! { "$set": { "_claim": claimable } }, constant, rawdoc! { "$unset": "_claim" })
});

/// A claim's statement, written straight to BSON bytes (`rawdoc!`):
/// building a `Document` per statement (an ordered map per nested object)
/// was most of the flusher's CPU in a profile.
///
/// One statement for a new job (an upsert) and for a known one: the pipeline
/// takes the record only when it is neither sent nor unconfirmed and no live
/// lease holds it, and leaves it untouched otherwise. Who holds it afterwards
/// is read back only for records that existed (rare: redeliveries, retries,
/// replays).
fn claim_statement(key: &str, job_id: &str, organization_id: &str, integration_id: &str, owner: &str, lease_ms: i64) -> RawDocumentBuf {
    let (first, constant, last) = &*CLAIM_PARTS;
    let lease_until = rawdoc! { "$dateAdd": { "startDate": "$$NOW", "unit": "millisecond", "amount": lease_ms } };
    let mut set = constant.clone();
    set.append("owner", when(literal(owner).into(), "$owner"));
    set.append("lease_until", when(lease_until.into(), "$lease_until"));
    set.append("job_id", literal(job_id));
    set.append("organization_id", literal(organization_id));
    set.append("integration_id", literal(integration_id));
    rawdoc! {
        "q": { "_id": key },
        "u": [first.clone(), { "$set": set }, last.clone()],
        "upsert": true,
    }
}

/// The "sent" marks among `ops` as one statement: only the holder of a claim
/// may mark it, so every record that one of them still holds (its owner is
/// one of the batch's tokens) is updated, and each takes its own values from
/// the arrays by the index of its owner token. A token is written by one
/// claim on one record and never reused (`Owners`), so a record can only
/// match the mark made for it, and a mark whose claim was taken over matches
/// nothing.
fn marks_statement(ops: &[Op]) -> RawDocumentBuf {
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
    // `$literal`: a value starting with `$` is data, not a field path.
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
                    -super::MAX_HISTORY,
                ] },
                "updated_at": "$$NOW",
            } },
            { "$unset": ["_mark", "last_error", "reason", "lease_until", "owner", "claimed_from"] },
        ],
        "multi": true,
    }
}

fn key_of(op: &Op) -> &str {
    match op {
        Op::Claim { key, .. } | Op::Sent { key, .. } => key,
    }
}

/// What a batch's statements came to, in order.
async fn flush(db: &Database, ops: &[Op], counts: &OpCounts) -> Vec<Result<Done, MongoError>> {
    // Each claim is a statement; the marks, if any, are one statement
    // together, the last. `statement_of[i]`: the statement that carries `ops[i]`.
    let claims = ops.iter().filter(|op| matches!(op, Op::Claim { .. })).count();
    let mut updates = RawArrayBuf::new();
    let mut statement_of = Vec::with_capacity(ops.len());
    let mut claimed = 0;
    for op in ops {
        match op {
            Op::Claim { key, job_id, organization_id, integration_id, owner, lease_ms } => {
                updates.push(claim_statement(key, job_id, organization_id, integration_id, owner, *lease_ms));
                statement_of.push(claimed);
                claimed += 1;
            }
            Op::Sent { .. } => statement_of.push(claims),
        }
    }
    let marked = claims < ops.len();
    if marked {
        updates.push(marks_statement(ops));
    }
    counts.writes.fetch_add((claims + usize::from(marked)) as u64, Ordering::Relaxed);
    let command = rawdoc! { "update": DELIVERIES, "updates": updates, "ordered": false };
    let answer = match db.run_raw_command(command).await {
        Ok(answer) => answer,
        Err(err) => return ops.iter().map(|_| Err(err.clone())).collect(),
    };
    if let Ok(concern) = answer.get_document("writeConcernError") {
        let message = format!("write concern: {}", concern.get_str("errmsg").unwrap_or("write concern error"));
        return ops.iter().map(|_| Err(MongoError::custom(message.clone()))).collect();
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
    let mut errors: Vec<Option<String>> = vec![None; ops.len()];
    for (index, entry) in by_statement("writeErrors") {
        let message = format!("write error {}: {}", entry.get_i32("code").unwrap_or_default(), entry.get_str("errmsg").unwrap_or_default());
        for (slot, _) in errors.iter_mut().zip(&statement_of).filter(|(_, s)| **s == index) {
            *slot = Some(message.clone());
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
    let records = match read_back(db, &unknown).await {
        Ok(records) => records,
        Err(err) => return ops.iter().map(|_| Err(err.clone())).collect(),
    };
    ops.iter()
        .zip(errors)
        .zip(upserted)
        .map(|((op, error), upserted)| {
            if let Some(message) = error {
                return Err(MongoError::custom(message));
            }
            let record = records.get(key_of(op));
            let field = |name: &str| record.and_then(|r| r.get_str(name).ok());
            Ok(match op {
                Op::Claim { key, owner, .. } if upserted => {
                    Done::Claimed(Claim::Fresh(Lease { key: key.clone(), owner: owner.clone(), taken_over: false }))
                }
                Op::Claim { key, owner, .. } if field("owner") == Some(owner.as_str()) => Done::Claimed(Claim::Fresh(Lease {
                    key: key.clone(),
                    owner: owner.clone(),
                    taken_over: field("claimed_from") == Some("sending"),
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

/// The state, owner and activity of `keys`, one read for the whole batch.
async fn read_back(db: &Database, keys: &[&str]) -> Result<HashMap<String, Document>, MongoError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let found: Vec<Document> = db
        .collection::<Document>(DELIVERIES)
        .find(doc! { "_id": { "$in": keys } })
        .projection(doc! { "state": 1, "owner": 1, "claimed_from": 1, "activity_id": 1 })
        .await?
        .try_collect()
        .await?;
    Ok(found.into_iter().filter_map(|d| Some((d.get_str("_id").ok()?.to_owned(), d))).collect())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::Owners;

    #[test]
    fn owner_tokens_are_never_repeated_within_a_process_or_across_processes() {
        let (one, other) = (Owners::default(), Owners::default());
        let tokens: HashSet<String> = (0..1_000).flat_map(|_| [one.next(), other.next()]).collect();
        assert_eq!(tokens.len(), 2_000);
        assert!(tokens.iter().all(|t| t.len() > 32), "each token keeps the 128 random bits of its process");
    }
}
