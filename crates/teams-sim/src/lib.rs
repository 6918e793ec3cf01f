//! `teams-sim`: a local stand-in for the Microsoft identity token endpoint and
//! the Bot Framework Connector API, answering in Microsoft's formats.
//!
//! herald's tests, demo and benchmarks never reach Microsoft; they run against
//! this. See `docs/teams-sim.md` for the fixture format and the admin API.
//!
//! Layout:
//! - `world`: tenants, bots, users, conversations (the fixture);
//! - `teams_limits`: Microsoft's published limits, enforced here as Teams does;
//! - `faults`: injected statuses, hangs, resets and latency from a seed;
//! - `connector`: the token endpoint and the Connector routes;
//! - `signing`: the tokens Teams signs the activities it sends a bot with,
//!   and the OpenID metadata that publishes their key;
//! - `admin`: the inspection and admin API under `/_admin`;
//! - `client`: a typed Rust client of the admin API for herald's tests.

mod admin;
pub mod client;
mod connector;
pub mod faults;
pub mod signing;
pub mod world;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use admin::{ActivityFilter, ClockAdvance, IssuedToken, Throttling, TokenSettings};
pub use faults::{Action, Latency, Route, Rule};
pub use signing::SignRequest;
pub use teams_limits::{Limits, Window};
pub use world::{Bot, Conversation, ConversationKind, Tenant, User, Workflow, World};

/// Start-up options of the simulator (the world is separate).
#[derive(Debug, Clone)]
pub struct Options {
    /// Lifetime of issued tokens; Microsoft's is about an hour.
    pub token_ttl: Duration,
    /// Throttling as Microsoft publishes it; off for benchmarks.
    pub throttling: bool,
    /// Seed of every random choice (fault probabilities, latency).
    pub seed: u64,
    /// Recorded activities kept for inspection; the oldest are dropped past it
    /// (counts keep counting).
    pub max_records: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self { token_ttl: Duration::from_secs(3599), throttling: true, seed: 0, max_records: 1_000_000 }
    }
}

/// One activity the Connector accepted, with who sent it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ActivityRecord {
    pub seq: u64,
    pub route: Route,
    /// The id the Connector answered with (the new conversation's id for
    /// `create_conversation`).
    pub activity_id: String,
    /// The bot app whose token authenticated the request.
    pub app_id: String,
    /// The authority that issued that token.
    pub authority: String,
    /// The conversation's tenant.
    pub tenant_id: String,
    pub conversation_id: String,
    /// For replies and updates: the activity replied to or replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_activity_id: Option<String>,
    pub body: serde_json::Value,
    pub received_at: DateTime<Utc>,
}

/// Counters since start (or the last reset).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Every request to the token endpoint or the Connector, whatever its answer.
    pub requests_total: u64,
    pub responses_by_status: BTreeMap<u16, u64>,
    pub activities_total: u64,
    pub activities_by_app: BTreeMap<String, u64>,
    pub tokens_issued: BTreeMap<String, u64>,
    pub throttled_total: u64,
    pub connections_reset: u64,
    /// Requests for the signing keys (`/v1/.well-known/keys`).
    #[serde(default)]
    pub key_fetches: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct Grant {
    pub app_id: String,
    pub authority: String,
    pub expires_at: Instant,
}

pub(crate) struct State {
    pub world: world::Index,
    pub tokens: HashMap<String, Grant>,
    pub token_ttl: Duration,
    pub records: VecDeque<ActivityRecord>,
    pub max_records: usize,
    /// Activity id → conversation id, for replies and updates.
    pub activities: HashMap<String, String>,
    pub next_seq: u64,
    pub stats: Stats,
    pub throttle: teams_limits::Throttle,
    pub faults: faults::Faults,
    /// How far the admin API moved the simulator's clock forward.
    pub clock_offset: Duration,
}

impl State {
    pub fn now(&self) -> Instant {
        Instant::now() + self.clock_offset
    }

    pub fn record(&mut self, mut record: ActivityRecord) {
        self.next_seq += 1;
        record.seq = self.next_seq;
        self.stats.activities_total += 1;
        *self.stats.activities_by_app.entry(record.app_id.clone()).or_default() += 1;
        if record.route != Route::CreateConversation {
            self.activities.insert(record.activity_id.clone(), record.conversation_id.clone());
        }
        self.records.push_back(record);
        while self.records.len() > self.max_records {
            if let Some(old) = self.records.pop_front() {
                self.activities.remove(&old.activity_id);
            }
        }
    }
}

/// The simulator: cheap to clone, shared by every connection.
#[derive(Clone)]
pub struct Sim {
    state: Arc<Mutex<State>>,
    /// Counted outside the lock: every response passes through here.
    statuses: Arc<[AtomicU64]>,
}

impl Sim {
    pub fn new(world: World, options: Options) -> Self {
        let state = State {
            world: world::Index::from_world(world),
            tokens: HashMap::new(),
            token_ttl: options.token_ttl,
            records: VecDeque::new(),
            max_records: options.max_records,
            activities: HashMap::new(),
            next_seq: 0,
            stats: Stats::default(),
            throttle: teams_limits::Throttle::new(options.throttling, Limits::default()),
            faults: faults::Faults::new(options.seed),
            clock_offset: Duration::ZERO,
        };
        Self { state: Arc::new(Mutex::new(state)), statuses: (0..600).map(|_| AtomicU64::new(0)).collect() }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn count_response(&self, status: u16) {
        if let Some(counter) = self.statuses.get(status as usize) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> Stats {
        let mut stats = self.lock().stats.clone();
        for (status, counter) in self.statuses.iter().enumerate() {
            let n = counter.load(Ordering::Relaxed);
            if n > 0 {
                stats.responses_by_status.insert(status as u16, n);
                stats.requests_total += n;
            }
        }
        stats
    }

    pub(crate) fn reset_counters(&self) {
        for counter in self.statuses.iter() {
            counter.store(0, Ordering::Relaxed);
        }
    }

    /// The HTTP application: token endpoint, Connector and admin API.
    pub fn router(&self) -> Router {
        connector::router(self.clone()).merge(admin::router(self.clone()))
    }
}

/// The webhook URL of `workflow` on a simulator at `base_url`, in the form
/// Power Automate gives it.
pub fn workflow_url(base_url: &str, workflow: &Workflow) -> String {
    format!(
        "{}/powerautomate/automations/direct/workflows/{}/triggers/manual/paths/invoke?api-version=1&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig={}",
        base_url.trim_end_matches('/'),
        workflow.id,
        workflow.sig
    )
}

/// Lets a handler cut its own TCP connection (the `reset` fault).
#[derive(Clone)]
pub(crate) struct ConnectionKiller(Arc<Notify>);

impl ConnectionKiller {
    pub fn kill(&self) {
        self.0.notify_one();
    }
}

/// Serve `sim` on `listener` until `shutdown` is cancelled.
///
/// The accept loop is our own (not `axum::serve`) so that a fault can reset a
/// connection with a TCP RST, as a failing load balancer does.
pub async fn serve(listener: TcpListener, sim: Sim, shutdown: CancellationToken) -> std::io::Result<()> {
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    let app = sim.router();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors or similar: back off instead of spinning.
                Err(_) => { tokio::time::sleep(Duration::from_millis(10)).await; continue; }
            },
            () = shutdown.cancelled() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let socket = socket2::SockRef::from(&stream).try_clone()?;
        let kill = Arc::new(Notify::new());
        let killer = ConnectionKiller(kill.clone());
        let service = app.clone().map_request(move |mut request: axum::http::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(killer.clone());
            request
        });
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let connection =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
            tokio::select! {
                _ = connection => {}
                () = kill.notified() => {
                    // Linger 0 turns the close into a RST; the duplicate handle
                    // lets us set it after the stream moved into hyper.
                    let _ = socket.set_linger(Some(Duration::ZERO));
                }
                () = shutdown.cancelled() => {}
            }
        });
    }
}

/// A simulator running on a background task, for tests and the demo.
pub struct Running {
    pub addr: SocketAddr,
    pub sim: Sim,
    shutdown: CancellationToken,
}

impl Running {
    /// Bind `127.0.0.1:0` and serve `world` in the background.
    pub async fn start(world: World, options: Options) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sim = Sim::new(world, options);
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, sim.clone(), shutdown.clone()));
        Ok(Self { addr, sim, shutdown })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The service URL bots use with this simulator.
    pub fn service_url(&self) -> String {
        format!("http://{}/teams/", self.addr)
    }

    /// The webhook URL of `workflow` on this simulator, as Workflows gives it.
    pub fn workflow_url(&self, workflow: &Workflow) -> String {
        workflow_url(&self.base_url(), workflow)
    }

    pub fn client(&self) -> client::SimClient {
        client::SimClient::new(&self.base_url())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
