//! The deliveries ledger with group commit: claims and "sent" marks from
//! concurrent jobs share one `update` command (standard since MongoDB 2.6:
//! one command, many statements, `ordered: false`), so a busy worker makes a
//! few round trips per batch instead of one per job. Nothing waits for a
//! batch to fill: a flusher takes what is queued right now and goes.

use std::sync::Arc;

use mongodb::Database;
use mongodb::bson::{Bson, DateTime, Document, doc};
use mongodb::error::Error as MongoError;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Claim, StoreError};

/// Statements per command; MongoDB allows far more, this bounds latency.
const MAX_BATCH: usize = 256;
/// Commands in flight at once.
const FLUSHERS: usize = 4;

pub(super) enum Op {
    /// `lease`: how long a `sending` claim by another delivery is honoured.
    Claim {
        job: String,
        organization_id: String,
        integration_id: String,
        lease: std::time::Duration,
    },
    Sent {
        job: String,
        conversation_id: String,
        activity_id: String,
        attempts: i64,
    },
}

/// What one statement of a batch came to.
pub(super) enum Done {
    Claimed(Claim),
    Marked,
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
    pub fn start(db: Database) -> Self {
        let (tx, rx) = mpsc::channel::<Request>(4 * MAX_BATCH);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..FLUSHERS {
            tokio::spawn(flusher(db.clone(), rx.clone()));
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

async fn flusher(db: Database, rx: Arc<Mutex<mpsc::Receiver<Request>>>) {
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
        flush(&db, batch).await;
    }
}

fn statement(op: &Op, now: DateTime) -> Document {
    match op {
        // The filter excludes a `sent` record and one whose lease (another
        // delivery sending it right now) has not run out, so either makes the
        // upsert collide with its own `_id` (E11000); `resolve_collisions`
        // then tells the two apart. (`$not: {$gt}` rather than `$or`, which
        // some servers cannot answer from the `_id` index.)
        Op::Claim { job, organization_id, integration_id, lease } => doc! {
            "q": { "_id": job, "state": { "$ne": "sent" }, "lease_until": { "$not": { "$gt": now } } },
            "u": {
                "$set": {
                    "state": "sending", "updated_at": now,
                    "lease_until": DateTime::from_millis(now.timestamp_millis() + lease.as_millis() as i64),
                },
                "$setOnInsert": {
                    "organization_id": organization_id, "integration_id": integration_id,
                    "attempts": 0_i64, "created_at": now,
                },
            },
            "upsert": true,
        },
        Op::Sent { job, conversation_id, activity_id, attempts } => doc! {
            "q": { "_id": job },
            "u": {
                "$set": { "state": "sent", "conversation_id": conversation_id, "activity_id": activity_id, "updated_at": now },
                "$inc": { "attempts": attempts },
                "$unset": { "last_error": "", "reason": "", "lease_until": "" },
            },
        },
    }
}

/// The states of the jobs whose claim collided: one read, only for duplicates.
async fn resolve_collisions(db: &Database, jobs: &[&str]) -> Result<std::collections::HashMap<String, String>, MongoError> {
    use futures_util::TryStreamExt;
    if jobs.is_empty() {
        return Ok(Default::default());
    }
    let found: Vec<Document> = db
        .collection::<Document>(super::DELIVERIES)
        .find(doc! { "_id": { "$in": jobs } })
        .projection(doc! { "state": 1 })
        .await?
        .try_collect()
        .await?;
    Ok(found.into_iter().filter_map(|d| Some((d.get_str("_id").ok()?.to_owned(), d.get_str("state").ok()?.to_owned()))).collect())
}

async fn flush(db: &Database, batch: Vec<Request>) {
    let now = DateTime::now();
    let updates: Vec<Document> = batch.iter().map(|r| statement(&r.op, now)).collect();
    let command = doc! { "update": super::DELIVERIES, "updates": updates, "ordered": false };
    match db.run_command(command).await {
        Err(err) => {
            for request in batch {
                let _ = request.reply.send(Err(err.clone()));
            }
        }
        Ok(answer) => {
            let mut errors: Vec<Option<(i32, String)>> = vec![None; batch.len()];
            if let Ok(list) = answer.get_array("writeErrors") {
                for entry in list.iter().filter_map(Bson::as_document) {
                    let index = entry.get_i32("index").ok().and_then(|i| usize::try_from(i).ok());
                    let code = entry.get_i32("code").unwrap_or_default();
                    let message = entry.get_str("errmsg").unwrap_or_default().to_owned();
                    if let Some(slot) = index.and_then(|i| errors.get_mut(i)) {
                        *slot = Some((code, message));
                    }
                }
            }
            let concern =
                answer.get_document("writeConcernError").ok().map(|e| e.get_str("errmsg").unwrap_or("write concern error").to_owned());
            let collided: Vec<&str> = batch
                .iter()
                .zip(&errors)
                .filter_map(|(r, e)| match (&r.op, e) {
                    (Op::Claim { job, .. }, Some((11000, _))) => Some(job.as_str()),
                    _ => None,
                })
                .collect();
            let states = match resolve_collisions(db, &collided).await {
                Ok(states) => states,
                Err(err) => {
                    for request in batch {
                        let _ = request.reply.send(Err(err.clone()));
                    }
                    return;
                }
            };
            for (request, error) in batch.into_iter().zip(errors) {
                let result = match (&request.op, error, &concern) {
                    (_, _, Some(concern)) => Err(MongoError::custom(format!("write concern: {concern}"))),
                    (Op::Claim { .. }, None, _) => Ok(Done::Claimed(Claim::Fresh)),
                    (Op::Claim { job, .. }, Some((11000, _)), _) => Ok(Done::Claimed(match states.get(job).map(String::as_str) {
                        Some("sent") => Claim::AlreadySent,
                        // `sending` under another delivery's lease (or gone meanwhile): come back later.
                        _ => Claim::InProgress,
                    })),
                    (Op::Sent { .. }, None, _) => Ok(Done::Marked),
                    (_, Some((code, message)), _) => Err(MongoError::custom(format!("write error {code}: {message}"))),
                };
                let _ = request.reply.send(result);
            }
        }
    }
}
