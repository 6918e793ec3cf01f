//! The worker: one step that decides what happens to a job
//! (`step::Pipeline::process(incoming) -> Disposition`), a settler that only
//! carries that decision out (`settle`), and a thin loop (`run`).
//!
//! One job's path, top to bottom:
//!
//! ```text
//! run::Worker::session   connect, declare, then the fleet
//!   fleet                the router (one worker) and the shards this worker
//!                        holds; each delivery takes its place in its lane
//!   lanes                one conversation's jobs one after the other
//!   settle::Settler      read the trusted history from the headers, then
//!     step::Pipeline     decode → resolve → wait for Teams' windows → slot
//!                        → claim → count and send → record → classify once
//!                        → Disposition
//!   settle::Settler      publish the retry or dead letter (confirmed), ack
//! ```
//!
//! Only the worker knows every adapter (RabbitMQ, MongoDB, Teams).

mod cache;
mod fleet;
mod lanes;
mod pacing;
pub mod resolve;
pub mod run;
pub mod sched;
mod settle;
pub mod step;

use std::time::Duration;

use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

pub use crate::rabbitmq::headers::History;
pub use crate::text::error_chain;
pub use fleet::shard_of;
pub use lanes::Handoff;
pub use run::{Worker, WorkerError, run};
pub use step::Pipeline;

use crate::mongo::{Store, StoreError};
use crate::outcome::Reason;
use crate::rabbitmq::headers::Signer;
use crate::settings::Settings;

/// A message taken from the work queue, in herald's terms (no broker types).
#[derive(Debug, Clone, Default)]
pub struct Incoming {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    /// What herald's own, verified headers say of earlier deliveries.
    pub history: History,
    /// The producer's W3C trace context, if any.
    pub traceparent: Option<String>,
    /// The AMQP `content_type` and `content_encoding` properties, if set.
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub redelivered: bool,
}

/// Why a job was not delivered, with what its dead-letter headers say. Every
/// text is bounded (`text::MAX_FIELD_BYTES`).
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub reason: Reason,
    pub error: String,
    pub http_status: Option<u16>,
    pub teams_code: Option<String>,
    pub correlation_id: Option<String>,
    pub organization_id: Option<String>,
    pub org_integration_id: Option<String>,
}

/// Settled without publishing anything.
#[derive(Debug, Clone, PartialEq)]
pub enum Acked {
    Delivered {
        activity_id: String,
        conversation_id: String,
    },
    /// The ledger says this job was sent already: no second post.
    AlreadySent,
    /// An earlier delivery of this job ended unconfirmed; that one's dead
    /// letter is where an operator decides. No second post.
    AlreadyUnconfirmed,
}

/// The one decision about a message. The settler only carries it out.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    Ack(Acked),
    /// Publish the job to the retry tier `tier` with its new `history`, then ack.
    Retry {
        tier: Duration,
        history: History,
        failure: Failure,
    },
    /// Publish the job to the dead-letter exchange, then ack.
    DeadLetter {
        history: History,
        failure: Failure,
    },
    /// Not started (the worker gave up the job's queue while the job waited
    /// for its turn): back to the queue, in its place, untouched.
    GiveBack,
}

/// The keys of herald's headers for a worker (and `herald setup`): as
/// [`tool_signer`], but the key kept in MongoDB is created if the settings
/// name none and the database holds none yet.
pub async fn signer(settings: &Settings, store: &Store) -> Result<Signer, StoreError> {
    Ok(match configured_key(settings) {
        Some(key) => Signer::ring(key, previous_keys(settings).chain(store.header_key(false).await?)),
        None => Signer::ring(store.header_key(true).await?.expect("created if missing"), previous_keys(settings)),
    })
}

/// The keys of herald's headers for a tool (`herald dlq`): signs with
/// `headers.signing_key` if set, else with the key kept in MongoDB;
/// verifies with those, `headers.previous_keys` and the kept key. Never
/// creates a key: a tool pointed at the wrong database would otherwise read
/// every letter's headers as forged, silently disabling the replay guards.
pub async fn tool_signer(settings: &Settings, store: &Store) -> Result<Signer, NoHeaderKey> {
    let stored = store.header_key(false).await?;
    match (configured_key(settings), stored) {
        (Some(key), stored) => Ok(Signer::ring(key, previous_keys(settings).chain(stored))),
        (None, Some(stored)) => Ok(Signer::ring(stored, previous_keys(settings))),
        (None, None) => Err(NoHeaderKey::Missing { database: settings.mongodb_database.clone() }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NoHeaderKey {
    #[error(
        "no header signing key: headers.signing_key is empty and database {database:?} holds none (herald setup or a worker creates it). Point this tool at the workers' database, or give it their headers.signing_key"
    )]
    Missing { database: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn configured_key(settings: &Settings) -> Option<[u8; 32]> {
    let configured = settings.headers.signing_key.expose_secret();
    (!configured.is_empty()).then(|| Sha256::digest(configured.as_bytes()).into())
}

fn previous_keys(settings: &Settings) -> impl Iterator<Item = [u8; 32]> + '_ {
    settings.headers.previous_keys.iter().map(|key| Sha256::digest(key.expose_secret().as_bytes()).into())
}
