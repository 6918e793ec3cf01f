//! `make bench`: herald against the broker's own limit, measured side by side
//! in one run on this machine. Writes `bench/results/latest.md` and prints it.
//!
//! `BENCH_SCALE=smoke` runs every phase at a small size (part of `make test`,
//! so the benchmark cannot rot); the default is the full run of issue 8.
//! `BENCH_PHASES=drain,naive` runs only the phases named (drain, naive,
//! floor, latency, mix, throttled, replay, soak, oversized, burst, cluster; naive and floor need
//! drain) and prints their rows without touching the report: for profiling
//! one phase. The `cluster` phase needs the local three-node cluster
//! (`scripts/services.sh --cluster`, which `make bench` runs).

mod fleet;
#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use figment::providers::Serialized;
use fleet::{conversation, percentile};
use futures_util::StreamExt;
use herald::dlq;
use herald::mongo::{DeliveryFilter, Store};
use herald::rabbitmq::{self, Publisher, ROUTING_KEY, Topology};
use herald::settings::Settings;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use support::{Guard, binary};
use teams_sim::client::SimClient;
use teams_sim::{self as sim, Action, Rule};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

struct Scale {
    name: &'static str,
    backlog: usize,
    orgs: usize,
    conversations_per_org: usize,
    latency_rate: u32,
    latency_secs: u64,
    mix_jobs: usize,
    throttled_jobs: usize,
    replay: usize,
    soak_jobs: usize,
    soak_rate: u32,
    burst_cold: usize,
    burst_hot: usize,
    /// Oversized messages waiting in the work queue when a worker starts, and
    /// the size of each in MiB (phase 6b).
    oversized: usize,
    oversized_mib: usize,
    /// Jobs of the node-loss phase, and the rate `herald enqueue` publishes them at.
    cluster_jobs: usize,
    cluster_rate: u32,
}

const FULL: Scale = Scale {
    name: "full",
    backlog: 50_000,
    orgs: 500,
    conversations_per_org: 4,
    latency_rate: 500,
    latency_secs: 60,
    mix_jobs: 10_000,
    throttled_jobs: 2_000,
    replay: 10_000,
    soak_jobs: 10_000,
    soak_rate: 400,
    burst_cold: 20_000,
    burst_hot: 1_000,
    oversized: 200,
    oversized_mib: 100,
    cluster_jobs: 20_000,
    cluster_rate: 800,
};
const SMOKE: Scale = Scale {
    name: "smoke",
    backlog: 2_000,
    orgs: 20,
    conversations_per_org: 4,
    latency_rate: 100,
    latency_secs: 3,
    mix_jobs: 500,
    throttled_jobs: 200,
    replay: 500,
    soak_jobs: 1_000,
    soak_rate: 200,
    burst_cold: 1_000,
    burst_hot: 150,
    oversized: 10,
    oversized_mib: 4,
    cluster_jobs: 1_000,
    cluster_rate: 200,
};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn shell(cmd: &str) -> String {
    Command::new("sh").args(["-c", cmd]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default()
}

/// (CPU seconds, peak RSS in MiB) of a process, from /proc.
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    (ticks / 100.0, hwm_kb / 1024.0)
}

/// CPU seconds so far of the services on this machine (the first process
/// whose command line matches), by name.
fn services_cpu() -> BTreeMap<&'static str, f64> {
    [("mongodb", "secantusd-rs"), ("rabbitmq", "beam.smp"), ("teams-sim", "teams-sim --listen")]
        .into_iter()
        .filter_map(|(name, pattern)| {
            let pid: u32 = shell(&format!("pgrep -o -f '{pattern}'")).parse().ok()?;
            Some((name, usage(pid).0))
        })
        .collect()
}

struct Env {
    prefix: String,
    database: String,
    sim_url: String,
    sim: SimClient,
    connection: Arc<lapin::Connection>,
    publisher: Publisher,
    topology: Topology,
    store: Store,
}

impl Env {
    /// The settings a worker of this run reads (from `worker_env`).
    fn settings(&self) -> anyhow::Result<Settings> {
        Ok(Settings::from_figment(
            Settings::defaults()
                .merge(Serialized::default("topology_prefix", &self.prefix))
                .merge(Serialized::default("mongodb_database", &self.database)),
        )?)
    }

    /// Delete the run's queues and database.
    async fn tear_down(&self) {
        let _ = self.purge_all().await;
        if let Ok(channel) = self.connection.create_channel().await {
            for queue in self.topology.queues() {
                let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
            }
        }
        let _ = self.store.drop_database().await;
    }

    fn worker_env(&self, http_port: u16) -> Vec<(String, String)> {
        let mut env = self.bench_worker_env(http_port);
        env.extend(tried_settings());
        env
    }

    fn bench_worker_env(&self, http_port: u16) -> Vec<(String, String)> {
        vec![
            ("HERALD_TOPOLOGY_PREFIX".into(), self.prefix.clone()),
            ("HERALD_MONGODB_DATABASE".into(), self.database.clone()),
            ("HERALD_TEAMS__CLOUDS__PUBLIC__TOKEN_ENDPOINT".into(), self.sim_url.clone()),
            ("HERALD_TEAMS__INSECURE_LOOPBACK_HOSTS".into(), "[\"127.0.0.1\"]".into()),
            ("HERALD_HTTP__LISTEN".into(), format!("127.0.0.1:{http_port}")),
            ("HERALD_RETRY__TIERS_SECS".into(), "[1,2]".into()),
            ("HERALD_WORKER__CONCURRENCY".into(), "64".into()),
            ("HERALD_WORKER__PREFETCH".into(), "128".into()),
            ("HERALD_LOG__FILTER".into(), "warn".into()),
            // Throughput is measured with teams-sim's throttling off, so herald's own pacing is off too.
            ("HERALD_TEAMS__RATE_LIMITS__ENABLED".into(), "false".into()),
            ("HERALD_LOG__FORMAT".into(), "json".into()),
            // The baselines (naive, floor) read the records' secrets as they
            // are stored, so the bench seeds them in plaintext and lets herald
            // accept that; sealing costs one decryption per resolution, not per job.
            ("HERALD_SECRETS__ACCEPT_PLAINTEXT".into(), "true".into()),
        ]
    }

    fn spawn_worker(&self, http_port: u16) -> anyhow::Result<Child> {
        Ok(Command::new(binary("herald")?).arg("worker").envs(self.worker_env(http_port)).stderr(Stdio::null()).spawn()?)
    }

    /// A worker with herald's own pacing on (the simulator's throttling on too).
    fn spawn_paced_worker(&self, http_port: u16) -> anyhow::Result<Child> {
        Ok(Command::new(binary("herald")?)
            .arg("worker")
            .envs(self.worker_env(http_port))
            .env("HERALD_TEAMS__RATE_LIMITS__ENABLED", "true")
            .stderr(Stdio::null())
            .spawn()?)
    }

    async fn queue_len(&self, queue: &str) -> anyhow::Result<u32> {
        let channel = self.connection.create_channel().await?;
        let q =
            channel.queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default()).await?;
        let _ = channel.close(200, "".into()).await;
        Ok(q.message_count())
    }

    async fn purge_all(&self) -> anyhow::Result<()> {
        let channel = self.connection.create_channel().await?;
        for queue in self.topology.queues() {
            channel.queue_purge(queue.as_str().into(), Default::default()).await?;
        }
        Ok(())
    }
}

/// `BENCH_WORKER_ENV="HERALD_WORKER__CONCURRENCY=256 HERALD_FLEET__SHARDS=0"`:
/// settings every herald worker of this run gets on top of the bench's own,
/// to try a setting without a rebuild (DEVELOPERS.md, "Profiling").
fn tried_settings() -> Vec<(String, String)> {
    let tried = std::env::var("BENCH_WORKER_ENV").unwrap_or_default();
    tried.split_whitespace().filter_map(|pair| pair.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

/// Publish `bodies` with pipelined confirms (windows of 500).
async fn publish_all(
    publisher: &Publisher,
    exchange: &str,
    routing_key: &str,
    bodies: Vec<(String, Vec<u8>)>,
    headers_of: impl Fn() -> FieldTable,
) -> anyhow::Result<()> {
    for chunk in bodies.chunks(500) {
        let mut pending = Vec::with_capacity(chunk.len());
        for (id, body) in chunk {
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_message_id(id.as_str().into())
                .with_headers(headers_of());
            pending.push(publisher.start(exchange, routing_key, body, properties).await?);
        }
        for p in pending {
            p.confirmed().await?;
        }
    }
    Ok(())
}

fn job_body(org: usize, conversation: &str, created_at: chrono::DateTime<chrono::Utc>) -> (String, Vec<u8>) {
    let id = uuid::Uuid::new_v4().to_string();
    let body = json!({
        "version": 1, "job_id": id, "organization_id": format!("org-{org}"), "integration_id": "teams-main",
        "recipient": {"conversation_id": conversation},
        "message": {"title": format!("alert {id}"), "text": "CPU above 95% for 5 minutes on db-7", "severity": "warning",
                    "facts": [{"name": "host", "value": "db-7"}, {"name": "region", "value": "eu-west-1"}]},
        "created_at": created_at,
    });
    (id, serde_json::to_vec(&body).unwrap())
}

/// `n` jobs, each to a random conversation of a random organization.
fn random_jobs(rng: &mut fastrand::Rng, scale: &Scale, n: usize) -> Vec<(String, Vec<u8>)> {
    let now = chrono::Utc::now();
    (0..n)
        .map(|_| {
            let org = rng.usize(..scale.orgs);
            job_body(org, &conversation(org, rng.usize(..scale.conversations_per_org)), now)
        })
        .collect()
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let started = Instant::now();
    loop {
        if check().await? {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metric(port: u16, line_prefix: &str) -> f64 {
    let text = match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => return f64::NAN,
    };
    text.lines().find(|l| l.starts_with(line_prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

/// The measures of one run: (what, result, target).
type Rows = Vec<(String, String, String)>;

/// `BENCH_PHASES=drain,naive` runs only the phases named (for profiling one
/// of them); unset, every phase runs and the report is written.
struct Phases(Option<Vec<String>>);

impl Phases {
    fn from_env() -> Self {
        Self(std::env::var("BENCH_PHASES").ok().map(|v| v.split(',').map(|p| p.trim().to_owned()).collect()))
    }

    fn wants(&self, phase: &str) -> bool {
        self.0.as_ref().is_none_or(|names| names.iter().any(|n| n == phase))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let scale = if std::env::var("BENCH_SCALE").as_deref() == Ok("smoke") { SMOKE } else { FULL };
    let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut rows = Rows::new();
    eprintln!(
        "bench ({} scale): backlog {}, {} orgs, {} conversations",
        scale.name,
        scale.backlog,
        scale.orgs,
        scale.orgs * scale.conversations_per_org
    );
    let connection = Arc::new(rabbitmq::connect(AMQP, "herald bench").await?);
    let publisher = Publisher::open(connection.clone()).await?;
    let bare_rate = bare_baseline(&connection, &publisher, &scale, &id).await?;
    rows.push(("bare lapin consumer (quorum queue, ack each)".into(), format!("{bare_rate:.0} msg/s"), "the broker's limit here".into()));

    let mut guard = Guard(Vec::new());
    let (env, world_path) = set_up(connection, publisher, &scale, &id, &mut guard).await?;
    let mut rng = fastrand::Rng::with_seed(42);
    let only = Phases::from_env();
    if only.wants("drain") {
        let herald = throughput(&env, &scale, &mut rng, bare_rate, &mut rows).await?;
        for worker in [Beside::Naive, Beside::Floor(None), Beside::Floor(Some(herald.0))] {
            if only.wants(worker.name()) {
                beside(&env, &scale, &mut rng, herald, worker, &mut rows).await?;
            }
        }
    }
    if only.wants("latency") {
        latency(&env, &scale, &mut guard, &mut rows).await?;
    }
    if only.wants("mix") {
        mix(&env, &scale, &mut rng, &mut guard, &mut rows).await?;
    }
    if only.wants("throttled") {
        throttled(&env, &scale, &mut guard, &mut rows).await?;
    }
    if only.wants("replay") {
        replay(&env, &scale, &mut rows).await?;
    }
    if only.wants("soak") {
        soak(&env, &scale, &mut guard, &mut rows).await?;
    }
    if only.wants("oversized") {
        oversized(&env, &scale, &mut guard, &mut rows).await?;
    }
    if only.wants("burst") {
        burst(&env, &scale, &mut rows).await?;
    }
    if only.wants("cluster") {
        cluster(&env, &scale, &mut rng, &mut guard, &mut rows).await?;
    }
    env.tear_down().await;
    let _ = std::fs::remove_file(&world_path);

    if only.0.is_some() {
        // A partial run prints its rows and leaves the report of the last full run alone.
        for (what, result, target) in &rows {
            println!("| {what} | {result} | {target} |");
        }
    } else {
        write_report(&scale, rows)?;
    }
    drop(guard);
    Ok(())
}

/// Phase 1: a bare lapin consumer on a quorum queue, the broker's limit here.
async fn bare_baseline(connection: &lapin::Connection, publisher: &Publisher, scale: &Scale, id: &str) -> anyhow::Result<f64> {
    let bare_queue = format!("bench-bare-{id}");
    let channel = connection.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    channel.queue_declare(bare_queue.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, args).await?;
    let now = chrono::Utc::now();
    let bodies: Vec<_> = (0..scale.backlog).map(|i| job_body(i % scale.orgs, &conversation(i % scale.orgs, 0), now)).collect();
    let started = Instant::now();
    // The default exchange routes by queue name.
    publish_all(publisher, "", &bare_queue, bodies, FieldTable::default).await?;
    let publish_rate = scale.backlog as f64 / started.elapsed().as_secs_f64();
    channel.basic_qos(128, BasicQosOptions::default()).await?;
    let mut consumer =
        channel.basic_consume(bare_queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    let started = Instant::now();
    for _ in 0..scale.backlog {
        let delivery = consumer.next().await.context("consumer ended")??;
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    let bare_rate = scale.backlog as f64 / started.elapsed().as_secs_f64();
    channel.queue_delete(bare_queue.as_str().into(), QueueDeleteOptions::default()).await?;
    eprintln!("bare consumer: {bare_rate:.0} msg/s (publish {publish_rate:.0}/s)");
    Ok(bare_rate)
}

/// The world every herald phase shares: teams-sim with `scale.orgs` bots and
/// tenants, the topology, and the org_integrations and conversations.
async fn set_up(
    connection: Arc<lapin::Connection>,
    publisher: Publisher,
    scale: &Scale,
    id: &str,
    guard: &mut Guard,
) -> anyhow::Result<(Env, std::path::PathBuf)> {
    let sim_port = free_port();
    let sim_url = format!("http://127.0.0.1:{sim_port}");
    let (world, integrations, conversations) = fleet::fleet(scale.orgs, scale.conversations_per_org, &format!("{sim_url}/teams/"));
    let world_path = std::env::temp_dir().join(format!("herald-bench-world-{id}.json"));
    std::fs::write(&world_path, serde_json::to_vec(&world)?)?;
    guard.0.push(
        Command::new(binary("teams-sim")?)
            .args(["--listen", &format!("127.0.0.1:{sim_port}"), "--no-throttle", "--max-records", "200000", "--world"])
            .arg(&world_path)
            .stdout(Stdio::null())
            .spawn()?,
    );
    let sim = SimClient::new(&sim_url);
    wait_for("teams-sim", Duration::from_secs(10), || async { Ok(sim.health().await.is_ok()) }).await?;

    let prefix = format!("bench-{id}");
    let database = format!("bench_{id}");
    let settings = Settings::from_figment(
        Settings::defaults()
            .merge(Serialized::default("topology_prefix", &prefix))
            .merge(Serialized::default("mongodb_database", &database))
            .merge(Serialized::default("retry.tiers_secs", [1, 2])),
    )?;
    let topology = Topology::from(&settings);
    topology.declare(&connection).await?;
    let store = Store::connect(&settings).await?;
    store.ensure_indexes().await?;
    store.seed(&integrations, &conversations, false).await?;
    Ok((Env { prefix, database, sim_url, sim, connection, publisher, topology, store }, world_path))
}

/// Phase 2: one worker drains a backlog; throughput, CPU, RSS, tokens, MongoDB.
async fn throughput(env: &Env, scale: &Scale, rng: &mut fastrand::Rng, bare_rate: f64, rows: &mut Rows) -> anyhow::Result<(f64, f64)> {
    let bodies = random_jobs(rng, scale, scale.backlog);
    publish_all(&env.publisher, &env.topology.jobs_exchange(), ROUTING_KEY, bodies, FieldTable::default).await?;
    let http_port = free_port();
    let services_before = services_cpu();
    let mut worker = env.spawn_worker(http_port)?;
    let pid = worker.id();
    let backlog = scale.backlog as u64;
    let took =
        wait_for("the backlog to drain", Duration::from_secs(1800), || async { Ok(env.sim.stats().await?.activities_total >= backlog) })
            .await?;
    let services_after = services_cpu();
    let herald_rate = scale.backlog as f64 / took.as_secs_f64();
    let reads = metric(http_port, "herald_mongodb_operations_total{kind=\"read\"}").await;
    let writes = metric(http_port, "herald_mongodb_operations_total{kind=\"write\"}").await;
    let (cpu, rss) = usage(pid);
    let stats = env.sim.stats().await?;
    let token_max = stats.tokens_issued.values().copied().max().unwrap_or(0);
    let token_apps = stats.tokens_issued.len();
    stop(&mut worker);
    let cpu_per_1000 = cpu / scale.backlog as f64 * 1000.0;
    eprintln!("herald: {herald_rate:.0} jobs/s, {cpu_per_1000:.3} CPU s per 1000 jobs, peak RSS {rss:.0} MiB");
    let ratio = herald_rate / bare_rate;
    rows.push((
        format!("herald draining {} jobs ({} orgs, {} conversations)", scale.backlog, scale.orgs, scale.orgs * scale.conversations_per_org),
        format!("{herald_rate:.0} jobs/s"),
        String::new(),
    ));
    rows.push(("herald / bare".into(), format!("{ratio:.2}"), verdict(ratio >= 0.5, "≥ 0.5")));
    rows.push((
        "worker CPU per 1,000 jobs".into(),
        format!("{cpu_per_1000:.3} s"),
        verdict(cpu_per_1000 <= 0.08, "≤ 0.08 s, issue 15; the floor of the stack at herald's rate: further down"),
    ));
    let per_1000 = |name: &str| {
        let (Some(before), Some(after)) = (services_before.get(name), services_after.get(name)) else { return "n/a".to_owned() };
        format!("{:.2} s", (after - before) / scale.backlog as f64 * 1000.0)
    };
    rows.push((
        "the services' CPU per 1,000 jobs during the drain".into(),
        format!("MongoDB-protocol server {}, RabbitMQ {}, teams-sim {}", per_1000("mongodb"), per_1000("rabbitmq"), per_1000("teams-sim")),
        String::new(),
    ));
    rows.push(("worker peak RSS (VmHWM)".into(), format!("{rss:.0} MiB"), verdict(rss <= 100.0, "≤ 100 MB")));
    rows.push((
        "token requests per bot app".into(),
        format!("max {token_max} over {token_apps} apps"),
        verdict(token_max == 1 && token_apps == scale.orgs, "1 per app per token lifetime"),
    ));
    // Every read is a resolution-cache fill: one per org_integration and per
    // conversation used, again once its entry is older than the cache's TTL
    // (a drain longer than the TTL fills twice), plus the fleet's heartbeat
    // (three small reads every `fleet.heartbeat_ms`).
    let keys = (scale.orgs + scale.orgs * scale.conversations_per_org) as f64;
    let ttl = env.settings()?.resolution_ttl().as_secs_f64();
    let fills = (took.as_secs_f64() / ttl).ceil().max(1.0);
    let statements = writes / scale.backlog as f64;
    rows.push((
        "MongoDB write statements per job".into(),
        format!("{statements:.2} (a ledger claim each; the `sent` marks of a batch one statement together; the fleet's heartbeats)"),
        verdict(statements <= 1.5, "≤ 1.5, issue 15"),
    ));
    rows.push((
        "MongoDB reads per job".into(),
        format!(
            "{reads:.0} reads in all = cache fill of {keys:.0} keys every {ttl:.0} s (the TTL) over a {:.0} s drain: {fills:.0} fill(s), {:.3} reads per job",
            took.as_secs_f64(),
            reads / scale.backlog as f64
        ),
        verdict(reads <= keys * fills * 1.2, "no read per job in steady state: ≤ 1.2 reads per key per TTL"),
    ));
    Ok((herald_rate, cpu_per_1000))
}

/// A worker beside herald's drain (phase 2b): on the same services, world
/// and backlog, measured the same way.
#[derive(Clone, Copy)]
enum Beside {
    /// The worker a team would write instead (examples/naive.rs).
    Naive,
    /// The least a worker on herald's crates does per job (examples/floor.rs),
    /// as fast as it can, or no faster than the jobs per second given
    /// (herald's own drain rate: fewer jobs share each wake-up).
    Floor(Option<f64>),
}

impl Beside {
    fn name(self) -> &'static str {
        match self {
            Self::Naive => "naive",
            Self::Floor(_) => "floor",
        }
    }

    fn label(self) -> String {
        match self {
            Self::Floor(Some(rate)) => format!("floor worker at herald's {rate:.0} jobs/s"),
            other => format!("{} worker", other.name()),
        }
    }

    fn what(self, backlog: usize) -> String {
        match self {
            Self::Naive => {
                format!("a naive worker draining the same {backlog} jobs (consume → look up → token → post → ack; no ledger, no checks)")
            }
            Self::Floor(None) => format!(
                "the floor of this stack, same {backlog} jobs (lapin consume → reqwest post of a fixed card → ack; integrations and tokens read once at start)"
            ),
            Self::Floor(Some(rate)) => format!("the same floor, held to herald's drain rate ({rate:.0} jobs/s)"),
        }
    }
}

/// Phase 2b: `beside` drains the same backlog herald drained.
async fn beside(
    env: &Env,
    scale: &Scale,
    rng: &mut fastrand::Rng,
    herald: (f64, f64),
    beside: Beside,
    rows: &mut Rows,
) -> anyhow::Result<()> {
    env.sim.reset().await?;
    env.purge_all().await?;
    let bodies = random_jobs(rng, scale, scale.backlog);
    publish_all(&env.publisher, &env.topology.jobs_exchange(), ROUTING_KEY, bodies, FieldTable::default).await?;
    let work_queue = env.topology.work_queue();
    let mut args = vec![AMQP, &work_queue, "mongodb://127.0.0.1:27017/?directConnection=true", &env.database, &env.sim_url];
    let rate_arg = if let Beside::Floor(Some(rate)) = beside { format!("{rate:.0}") } else { String::new() };
    if !rate_arg.is_empty() {
        args.push(&rate_arg);
    }
    let mut worker = Command::new(binary(&format!("examples/{}", beside.name()))?).args(args).stderr(Stdio::null()).spawn()?;
    let pid = worker.id();
    let backlog = scale.backlog as u64;
    let took = wait_for(&format!("the {} worker to drain", beside.name()), Duration::from_secs(1800), || async {
        Ok(env.sim.stats().await?.activities_total >= backlog)
    })
    .await?;
    let (cpu, rss) = usage(pid);
    stop(&mut worker);
    let (rate, cpu_per_1000) = (scale.backlog as f64 / took.as_secs_f64(), cpu / scale.backlog as f64 * 1000.0);
    eprintln!("{}: {rate:.0} jobs/s, {cpu_per_1000:.3} CPU s per 1000 jobs, peak RSS {rss:.0} MiB", beside.label());
    rows.push((
        beside.what(scale.backlog),
        format!("{rate:.0} jobs/s; {cpu_per_1000:.3} CPU s per 1,000 jobs; peak RSS {rss:.0} MiB"),
        String::new(),
    ));
    rows.push((
        format!("herald vs the {}", beside.label()),
        format!("throughput {:.2}×, CPU per job {:.2}×", herald.0 / rate, herald.1 / cpu_per_1000),
        String::new(),
    ));
    Ok(())
}

/// Phase 3: a steady rate against a simulator answering in 50 ms.
async fn latency(env: &Env, scale: &Scale, guard: &mut Guard, rows: &mut Rows) -> anyhow::Result<()> {
    env.sim.reset().await?;
    env.purge_all().await?;
    let http_port = free_port();
    let worker = env.spawn_worker(http_port)?;
    guard.0.push(worker);
    wait_for("the worker to be ready", Duration::from_secs(20), || async {
        Ok(reqwest::get(format!("http://127.0.0.1:{http_port}/readyz")).await.is_ok_and(|r| r.status().is_success()))
    })
    .await?;
    // Warm-up: one job per organization, so that tokens are cached as in steady state.
    let warm: Vec<_> = (0..scale.orgs).map(|org| job_body(org, &conversation(org, 0), chrono::Utc::now())).collect();
    publish_all(&env.publisher, &env.topology.jobs_exchange(), ROUTING_KEY, warm, FieldTable::default).await?;
    let orgs = scale.orgs as u64;
    wait_for("the warm-up", Duration::from_secs(60), || async { Ok(env.sim.stats().await?.activities_total >= orgs) }).await?;
    env.sim.reset().await?;
    env.sim.set_latency(sim::Latency::Fixed { ms: 50 }).await?;
    let total = scale.latency_rate as u64 * scale.latency_secs;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(scale.latency_rate)));
    let mut sent_at = BTreeMap::new();
    for i in 0..total {
        tick.tick().await;
        let org = (i as usize) % scale.orgs;
        let (mid, body) = job_body(org, &conversation(org, (i as usize / scale.orgs) % scale.conversations_per_org), chrono::Utc::now());
        sent_at.insert(format!("alert {mid}"), chrono::Utc::now());
        let properties = BasicProperties::default().with_content_type("application/json".into()).with_message_id(mid.as_str().into());
        env.publisher.publish(&env.topology.jobs_exchange(), ROUTING_KEY, &body, properties).await?;
    }
    wait_for("the latency jobs", Duration::from_secs(120), || async { Ok(env.sim.stats().await?.activities_total >= total) }).await?;
    // The simulator stamps `received_at` after its own 50 ms.
    let mut latencies: Vec<f64> = env
        .sim
        .all_activities()
        .await?
        .iter()
        .filter_map(|record| {
            let title = record.body["attachments"][0]["content"]["body"][0]["text"].as_str()?;
            let sent = sent_at.get(title)?;
            Some((record.received_at - *sent).num_microseconds()? as f64 / 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let (p50, p95, p99) = (percentile(&latencies, 0.50), percentile(&latencies, 0.95), percentile(&latencies, 0.99));
    eprintln!("latency: p50 {p50:.1} ms, p95 {p95:.1} ms, p99 {p99:.1} ms over {} jobs", latencies.len());
    rows.push((
        format!("publish → simulator receipt, {} jobs/s for {} s, simulator latency 50 ms", scale.latency_rate, scale.latency_secs),
        format!("p50 {p50:.1} / p95 {p95:.1} / p99 {p99:.1} ms"),
        String::new(),
    ));
    rows.push(("p99 overhead over the simulator's 50 ms".into(), format!("{:.1} ms", p99 - 50.0), verdict(p99 - 50.0 <= 10.0, "≤ 10 ms")));
    stop_last(guard);
    Ok(())
}

/// Phase 4: Microsoft's answers as they come in real life: some 429s, 503s, 403s.
async fn mix(env: &Env, scale: &Scale, rng: &mut fastrand::Rng, guard: &mut Guard, rows: &mut Rows) -> anyhow::Result<()> {
    env.sim.reset().await?;
    env.purge_all().await?;
    let fault = |probability: f64, status: u16, code: Option<&str>, retry_after: Option<u64>| Rule {
        route: sim::Route::Send,
        probability: Some(probability),
        action: Some(Action::Status { status, code: code.map(str::to_owned), retry_after }),
        ..Default::default()
    };
    // A generic 403 (not a quarantine code), so that every 403 is one dead letter.
    env.sim.add_fault(&fault(0.01, 403, Some("Forbidden"), None)).await?;
    env.sim.add_fault(&fault(0.02, 503, None, None)).await?;
    env.sim.add_fault(&fault(0.05, 429, Some("Throttled"), Some(1))).await?;
    let bodies = random_jobs(rng, scale, scale.mix_jobs);
    publish_all(&env.publisher, &env.topology.jobs_exchange(), ROUTING_KEY, bodies, FieldTable::default).await?;
    let http_port = free_port();
    guard.0.push(env.spawn_worker(http_port)?);
    let dead_queue = env.topology.dead_queue();
    let mix = scale.mix_jobs as u64;
    let took = wait_for("the mix to settle", Duration::from_secs(900), || async {
        Ok(env.sim.stats().await?.activities_total + u64::from(env.queue_len(&dead_queue).await?) >= mix)
    })
    .await?;
    let stats = env.sim.stats().await?;
    let signer = herald::worker::signer(&env.settings()?, &env.store).await?;
    let letters = dlq::browse(&env.connection, &dead_queue, &signer, scale.mix_jobs).await?;
    let forbidden = stats.responses_by_status.get(&403).copied().unwrap_or(0);
    let all_forbidden = letters.iter().all(|l| l.reason.as_deref() == Some("teams_forbidden"));
    let goodput = stats.activities_total as f64 / took.as_secs_f64();
    eprintln!("mix: goodput {goodput:.0}/s, {} dead letters, {forbidden} 403s", letters.len());
    rows.push((
        format!("real-world mix, {} jobs: 5% 429 (Retry-After 1 s), 2% 503, 1% 403", scale.mix_jobs),
        format!(
            "goodput {goodput:.0} jobs/s; {} delivered; 429s {}, 503s {}",
            stats.activities_total,
            stats.responses_by_status.get(&429).copied().unwrap_or(0),
            stats.responses_by_status.get(&503).copied().unwrap_or(0)
        ),
        String::new(),
    ));
    rows.push((
        "dead letters are exactly the 403s".into(),
        format!("{} dead letters, {forbidden} 403 answers, all `teams_forbidden`: {all_forbidden}", letters.len()),
        verdict(letters.len() as u64 == forbidden && all_forbidden, "equal"),
    ));
    stop_last(guard);
    Ok(())
}

/// Phase 4b: Teams' throttling on, herald's pacing on: how often Teams says 429.
async fn throttled(env: &Env, scale: &Scale, guard: &mut Guard, rows: &mut Rows) -> anyhow::Result<()> {
    env.sim.reset().await?;
    env.purge_all().await?;
    env.sim.set_throttling(&sim::Throttling { enabled: true, limits: None }).await?;
    let conversations_used = (scale.orgs / 5).max(1);
    let bodies: Vec<_> = (0..scale.throttled_jobs)
        .map(|i| {
            // A few hot conversations get half of the jobs.
            let org = if i % 2 == 0 { i % 4 } else { i % conversations_used };
            job_body(org, &conversation(org, 0), chrono::Utc::now())
        })
        .collect();
    publish_all(&env.publisher, &env.topology.jobs_exchange(), ROUTING_KEY, bodies, FieldTable::default).await?;
    let http_port = free_port();
    guard.0.push(env.spawn_paced_worker(http_port)?);
    let throttled_total = scale.throttled_jobs as u64;
    let took = wait_for("the throttled run", Duration::from_secs(900), || async {
        Ok(env.sim.stats().await?.activities_total >= throttled_total)
    })
    .await?;
    let stats = env.sim.stats().await?;
    let requests: u64 = stats.responses_by_status.values().sum::<u64>() - stats.tokens_issued.values().sum::<u64>();
    let too_many = stats.responses_by_status.get(&429).copied().unwrap_or(0);
    eprintln!("throttled: {too_many} 429s of {requests} requests in {:.1} s", took.as_secs_f64());
    rows.push((
        format!("Teams' throttling on, {} jobs, half into 4 hot conversations; herald's pacing on", scale.throttled_jobs),
        format!(
            "{too_many} of {requests} requests answered 429 ({:.2}%); done in {:.1} s",
            100.0 * too_many as f64 / requests.max(1) as f64,
            took.as_secs_f64()
        ),
        verdict((too_many as f64) <= 0.01 * requests as f64, "429 rate low (≤ 1%)"),
    ));
    env.sim.set_throttling(&sim::Throttling { enabled: false, limits: None }).await?;
    stop_last(guard);
    Ok(())
}

/// Phase 5: `herald dlq replay` of a full dead-letter queue.
async fn replay(env: &Env, scale: &Scale, rows: &mut Rows) -> anyhow::Result<()> {
    env.purge_all().await?;
    let now = chrono::Utc::now();
    let bodies: Vec<_> = (0..scale.replay).map(|i| job_body(i % scale.orgs, &conversation(i % scale.orgs, 0), now)).collect();
    publish_all(&env.publisher, &env.topology.dead_exchange(), ROUTING_KEY, bodies, FieldTable::default).await?;
    let started = Instant::now();
    let status = Command::new(binary("herald")?)
        .args(["dlq", "replay", "--all", "--yes"])
        .envs(env.worker_env(0))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let replay_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(status.success(), "herald dlq replay failed");
    let moved = env.queue_len(&env.topology.work_queue()).await?;
    anyhow::ensure!(moved as usize == scale.replay, "replay moved {moved} of {}", scale.replay);
    eprintln!("replay: {} dead letters in {replay_secs:.1} s", scale.replay);
    rows.push((
        format!("`herald dlq replay` of {} dead letters", scale.replay),
        format!("{replay_secs:.1} s ({:.0}/s)", scale.replay as f64 / replay_secs),
        verdict(replay_secs < 60.0, "well under a minute"),
    ));
    Ok(())
}

/// One soak run: `planned` published at `rate` per second into a fresh
/// worker; what it came to, the worker's peak RSS (MiB) and reconnects.
async fn soak_run(env: &Env, planned: &[fleet::Planned], rate: u32, guard: &mut Guard) -> anyhow::Result<(fleet::Verdict, f64, f64)> {
    env.sim.reset().await?;
    env.purge_all().await?;
    let started = mongodb::bson::DateTime::now();
    for rule in fleet::faults(3000) {
        env.sim.add_fault(&rule).await?;
    }
    let http_port = free_port();
    let worker = Command::new(binary("herald")?)
        .arg("worker")
        .envs(env.worker_env(http_port))
        .env("HERALD_TEAMS__REQUEST_TIMEOUT_SECS", "2")
        .stderr(Stdio::null())
        .spawn()?;
    let pid = worker.id();
    guard.0.push(worker);
    wait_for("the soak worker to be ready", Duration::from_secs(20), || async {
        Ok(reqwest::get(format!("http://127.0.0.1:{http_port}/readyz")).await.is_ok_and(|r| r.status().is_success()))
    })
    .await?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    let mut published_at = std::collections::HashMap::new();
    for job in planned {
        tick.tick().await;
        published_at.insert(job.message_id.clone(), chrono::Utc::now());
        env.publisher.publish(&env.topology.jobs_exchange(), ROUTING_KEY, &job.body, job.properties.clone()).await?;
    }
    let (jobs, dead_queue) = (planned.len() as u64, env.topology.dead_queue());
    wait_for("the soak to settle", Duration::from_secs(600), || async {
        let filter = DeliveryFilter { since: Some(started), ..Default::default() };
        let ledger = env.store.list_deliveries(&filter, 4 * jobs as i64).await?;
        let dead = env.queue_len(&dead_queue).await? as usize;
        Ok(fleet::settled(planned, &ledger, dead) && env.queue_len(&env.topology.work_queue()).await? == 0)
    })
    .await?;
    // Retries of the last jobs may still be in a tier.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reconnects = metric(http_port, "herald_broker_reconnects_total").await;
    let (_, rss) = usage(pid);
    stop_last(guard);
    let records = env.sim.all_activities().await?;
    let signer = herald::worker::signer(&env.settings()?, &env.store).await?;
    let letters = dlq::browse(&env.connection, &dead_queue, &signer, planned.len() + 10).await?;
    let ledger =
        env.store.list_deliveries(&DeliveryFilter { since: Some(started), ..Default::default() }, 4 * planned.len() as i64).await?;
    let ledger = ledger.into_iter().map(|d| (d.job_id, d.state)).collect();
    Ok((fleet::check(planned, &published_at, &records, &letters, &ledger), rss, reconnects))
}

/// Phase 6: the poison soak, against a run of the same good traffic without
/// hostile jobs: latency and memory must not suffer from the poison.
async fn soak(env: &Env, scale: &Scale, guard: &mut Guard, rows: &mut Rows) -> anyhow::Result<()> {
    let mut rng = fastrand::Rng::with_seed(7);
    let clean = fleet::plan(&mut rng, scale.soak_jobs, 0.0, scale.orgs, scale.conversations_per_org);
    let poisoned = fleet::plan(&mut rng, scale.soak_jobs, 0.10, scale.orgs, scale.conversations_per_org);
    let (clean, clean_rss, _) = soak_run(env, &clean, scale.soak_rate, guard).await?;
    let (poison, poison_rss, reconnects) = soak_run(env, &poisoned, scale.soak_rate, guard).await?;
    let (clean_p99, poison_p99) = (percentile(&clean.latencies_ms, 0.99), percentile(&poison.latencies_ms, 0.99));
    eprintln!(
        "soak: clean p99 {clean_p99:.0} ms, RSS {clean_rss:.0} MiB; poisoned p99 {poison_p99:.0} ms, RSS {poison_rss:.0} MiB; \
         {} problems, {reconnects} reconnects",
        clean.problems.len() + poison.problems.len()
    );
    for problem in clean.problems.iter().chain(&poison.problems).take(10) {
        eprintln!("soak problem: {problem}");
    }
    let jobs = scale.soak_jobs;
    rows.push((
        format!(
            "poison soak, {jobs} jobs at {}/s, 10% hostile; Connector: 2% 429 (HTTP-date), 2% 503, hangs, resets, broken 2xx",
            scale.soak_rate
        ),
        format!(
            "{} good posted once, {} unconfirmed, {} hostile dead-lettered once; {} broken rules; {reconnects} broker reconnects",
            poison.delivered,
            poison.unconfirmed,
            poison.hostile_dead_lettered,
            poison.problems.len()
        ),
        verdict(poison.problems.is_empty() && clean.problems.is_empty() && reconnects == 0.0, "every job settled once; 0 reconnects"),
    ));
    rows.push((
        "good-job p99 latency, poisoned run vs the same traffic without hostile jobs".into(),
        format!("{poison_p99:.0} ms vs {clean_p99:.0} ms ({:.2}×)", poison_p99 / clean_p99),
        verdict(poison_p99 <= 2.0 * clean_p99, "≤ 2×"),
    ));
    rows.push((
        "worker peak RSS, poisoned run vs clean run".into(),
        format!("{poison_rss:.0} MiB vs {clean_rss:.0} MiB ({:.2}×)", poison_rss / clean_rss),
        verdict(poison_rss <= 1.5 * clean_rss, "≤ 1.5×"),
    ));
    Ok(())
}

/// Phase 6b: a careless producer's oversized messages. `scale.oversized`
/// bodies of `scale.oversized_mib` MiB, each followed by a good job, wait in
/// the work queue (the worker down, say) when a worker starts: the router
/// refuses each unread and the broker dead-letters it. The broker's
/// `max_message_size` is raised to RabbitMQ 3.x's default (128 MiB) for the
/// phase, and the worker told so: its router then takes
/// `worker.intake_budget_mib / 128 MiB` messages at a time. The worker's peak
/// RSS against the same worker's after 500 good jobs alone, and every good
/// job delivered.
async fn oversized(env: &Env, scale: &Scale, guard: &mut Guard, rows: &mut Rows) -> anyhow::Result<()> {
    set_max_message_size(OVERSIZED_BROKER_LIMIT)?;
    let result = oversized_under_a_raised_limit(env, scale, guard, rows).await;
    set_max_message_size(TEST_BROKER_LIMIT)?;
    result
}

/// RabbitMQ 3.x's default `max_message_size`, for the oversized phase.
const OVERSIZED_BROKER_LIMIT: u64 = 128 << 20;
/// The local broker's `max_message_size` (scripts/services.sh).
const TEST_BROKER_LIMIT: u64 = 16 << 20;

/// Change the running broker's `max_message_size`; channels opened after
/// it take the new limit.
fn set_max_message_size(bytes: u64) -> anyhow::Result<()> {
    let status = Command::new("rabbitmqctl")
        .args(["-q", "eval", &format!("application:set_env(rabbit, max_message_size, {bytes}).")])
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "rabbitmqctl eval could not set max_message_size");
    Ok(())
}

async fn oversized_under_a_raised_limit(env: &Env, scale: &Scale, guard: &mut Guard, rows: &mut Rows) -> anyhow::Result<()> {
    env.sim.reset().await?;
    env.purge_all().await?;
    let exchange = env.topology.jobs_exchange();
    let mut rng = fastrand::Rng::with_seed(11);
    let http_port = free_port();
    let worker = env.spawn_worker(http_port)?;
    let pid = worker.id();
    guard.0.push(worker);
    publish_all(&env.publisher, &exchange, ROUTING_KEY, random_jobs(&mut rng, scale, 500), FieldTable::default).await?;
    wait_for("500 good jobs", Duration::from_secs(120), || async { Ok(env.sim.stats().await?.activities_total >= 500) }).await?;
    let (_, at_rest) = usage(pid);
    stop_last(guard);

    let big = vec![b'x'; scale.oversized_mib << 20];
    let good = random_jobs(&mut rng, scale, scale.oversized);
    let started = Instant::now();
    // A channel opened after the limit was raised.
    let publisher = Publisher::open(env.connection.clone()).await?;
    for (i, (id, body)) in good.iter().enumerate() {
        let properties = BasicProperties::default().with_message_id(format!("oversized-{i}").into());
        publisher.publish(&exchange, ROUTING_KEY, &big, properties).await?;
        let properties = BasicProperties::default().with_content_type("application/json".into()).with_message_id(id.as_str().into());
        publisher.publish(&exchange, ROUTING_KEY, body, properties).await?;
    }
    publisher.close().await;
    drop(big);
    eprintln!("oversized: {} × {} MiB published in {:.0?}", scale.oversized, scale.oversized_mib, started.elapsed());
    let http_port = free_port();
    let worker = Command::new(binary("herald")?)
        .arg("worker")
        .envs(env.worker_env(http_port))
        .env("HERALD_WORKER__BROKER_MAX_MESSAGE_BYTES", OVERSIZED_BROKER_LIMIT.to_string())
        .stderr(Stdio::null())
        .spawn()?;
    let budget = env.settings()?.worker.intake_budget_mib as f64;
    let pid = worker.id();
    guard.0.push(worker);
    let dead_queue = env.topology.dead_queue();
    let took = wait_for("the oversized messages dead-lettered and the good jobs posted", Duration::from_secs(3600), || async {
        Ok(env.sim.stats().await?.activities_total >= 500 + scale.oversized as u64
            && env.queue_len(&dead_queue).await? as usize >= scale.oversized)
    })
    .await?;
    let reconnects = metric(http_port, "herald_broker_reconnects_total").await;
    let (_, peak) = usage(pid);
    stop_last(guard);
    let dead = env.queue_len(&dead_queue).await?;
    env.purge_all().await?;
    eprintln!("oversized: peak RSS {peak:.0} MiB against {at_rest:.0} MiB at rest; settled in {took:.0?}; {dead} dead letters");
    rows.push((
        format!("{} oversized messages of {} MiB waiting amid good jobs when a worker starts", scale.oversized, scale.oversized_mib),
        format!(
            "peak RSS {peak:.0} MiB vs {at_rest:.0} MiB after 500 good jobs alone (+{:.1} bodies' worth); {} good jobs posted, \
             {dead} dead letters; {reconnects} broker reconnects",
            (peak - at_rest) / scale.oversized_mib as f64,
            scale.oversized
        ),
        verdict(
            peak - at_rest <= budget + scale.oversized_mib as f64 && dead as usize == scale.oversized && reconnects == 0.0,
            "at most worker.intake_budget_mib and the body being read; each refused once, 0 reconnects",
        ),
    ));
    Ok(())
}

/// Phase 7: the burst of `tests/it/fleetwide.rs` (examples/fleet/burst.rs)
/// with 1, 2 and 4 workers, Teams' throttling and herald's pacing on, fleet
/// sharding at its defaults: 429 share, each job once, order per
/// conversation, hot conversations against the earliest time Teams' windows
/// allow, throughput and CPU per job of the fleet.
async fn burst(env: &Env, scale: &Scale, rows: &mut Rows) -> anyhow::Result<()> {
    use fleet::burst;
    // The burst's 40 conversations per tenant, beyond the shared world's.
    let tenants = burst::TENANTS.min(scale.orgs);
    let mut docs = Vec::new();
    for org in 0..tenants {
        for c in scale.conversations_per_org..burst::PER_TENANT {
            let id = conversation(org, c);
            let roster = [format!("app-{org}")].into();
            let channel = sim::Conversation {
                id: id.clone(),
                tenant_id: format!("tenant-{org}"),
                kind: sim::ConversationKind::Channel,
                roster,
                blocked: false,
                user_id: None,
            };
            env.sim.put_conversation(&channel).await?;
            docs.push(herald::mongo::ConversationDoc::channel(&fleet::organization(org), fleet::INTEGRATION, &id));
        }
    }
    env.store.seed(&[], &docs, false).await?;
    let limits = teams_limits::Limits::default();
    let settings = env.settings()?;
    let fleet_records = mongodb::Client::with_uri_str(secrecy::ExposeSecret::expose_secret(&settings.mongodb_uri))
        .await?
        .database(&settings.mongodb_database)
        .collection::<mongodb::bson::Document>("fleet");
    for workers in [1_usize, 2, 4] {
        env.sim.reset().await?;
        // teams-sim forgets its windows between runs, and so must the fleet's
        // records of recent requests (the stopped workers' last ones): the
        // runs go one after the other into the same hot conversations, and a
        // run would otherwise wait for the one before it (at the smoke scale,
        // 30 posts each, 4 workers' first post came 11.5 s late).
        fleet_records.delete_many(mongodb::bson::doc! {}).await?;
        env.purge_all().await?;
        env.sim.set_throttling(&sim::Throttling { enabled: true, limits: None }).await?;
        let jobs = burst::plan(scale.burst_cold, scale.burst_hot, tenants, workers as u64);
        let since = mongodb::bson::DateTime::now();
        let mut fleet: Vec<Child> = Vec::new();
        for _ in 0..workers {
            fleet.push(env.spawn_paced_worker(free_port())?);
        }
        // The burst comes to a running fleet, as in the fleet test: the
        // router and every shard held, by every worker. Starting up is not
        // pacing; it is reported on its own.
        let units = usize::from(env.topology.shards) + 1;
        let sharing = wait_for("the fleet to share the shards", Duration::from_secs(120), || async {
            let holders = env.store.fleet_holders().await?;
            let owners: std::collections::HashSet<&String> = holders.values().collect();
            Ok(holders.len() == units && owners.len() == workers)
        })
        .await?;
        let started = chrono::Utc::now();
        let clock = Instant::now();
        let bodies: Vec<(String, Vec<u8>)> = jobs.iter().map(|j| (j.job_id.clone(), j.body.clone())).collect();
        publish_all(&env.publisher, &env.topology.jobs_exchange(), ROUTING_KEY, bodies, FieldTable::default).await?;
        let total = jobs.len() as u64;
        wait_for("the burst", Duration::from_secs(1800), || async { Ok(env.sim.stats().await?.activities_total >= total) }).await?;
        let took = clock.elapsed();
        let cpu: f64 = fleet.iter().map(|w| usage(w.id()).0).sum();
        for worker in &mut fleet {
            stop(worker);
        }
        let records = env.sim.all_activities().await?;
        let stats = env.sim.stats().await?;
        let filter = DeliveryFilter { since: Some(since), ..Default::default() };
        let ledger = env.store.list_deliveries(&filter, 3 * jobs.len() as i64).await?;
        let checked = burst::check(&jobs, started, &records, &stats, &ledger, &Default::default(), &limits);
        let broken = checked.broken();
        eprintln!(
            "burst, {workers} worker(s), sharing the shards {:.1} s after their start: {} in {:.1} s; broken: {broken:?}",
            sharing.as_secs_f64(),
            checked.summary(),
            took.as_secs_f64()
        );
        let cpu_per_1000 = cpu / jobs.len() as f64 * 1000.0;
        rows.push((
            format!(
                "burst with {workers} worker(s): {} jobs over {} conversations of {} tenants + {} into 5 hot conversations; throttling on",
                scale.burst_cold,
                tenants * burst::PER_TENANT - 5,
                tenants,
                scale.burst_hot
            ),
            format!(
                "{:.0} jobs/s, {cpu_per_1000:.2} CPU s per 1,000 jobs (all workers, start-up included); fleet sharing the shards {:.1} s after its start, then the burst published; {}",
                jobs.len() as f64 / took.as_secs_f64(),
                sharing.as_secs_f64(),
                checked.summary()
            ),
            verdict(broken.is_empty(), "429 ≤ 1%, each job once, in order, hot conversations within 20% of the earliest"),
        ));
        env.sim.set_throttling(&sim::Throttling { enabled: false, limits: None }).await?;
    }
    Ok(())
}

/// Phase 9: the loss of a RabbitMQ node (issue 35), on the local three-node
/// cluster (`scripts/cluster.sh`). Three workers, given the three nodes,
/// deliver jobs that `herald enqueue` publishes steadily; once a quarter are
/// posted, the node holding the work queue's leader is killed (SIGKILL) and
/// then started again. The pause: the longest time without a post after the
/// kill, until as many jobs again were posted.
async fn cluster(env: &Env, scale: &Scale, rng: &mut fastrand::Rng, guard: &mut Guard, rows: &mut Rows) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/cluster.sh");
    let cluster = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new("bash").arg(&script).args(args).output()?;
        anyhow::ensure!(out.status.success(), "cluster.sh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    cluster(&["up"])?;
    let urls = cluster(&["urls"])?;
    let prefix = format!("{}-cluster", env.prefix);
    let settings = Settings::from_figment(
        Settings::defaults()
            .merge(Serialized::default("amqp_url", &urls))
            .merge(Serialized::default("topology_prefix", &prefix))
            .merge(Serialized::default("mongodb_database", &env.database)),
    )?;
    let connection = rabbitmq::Broker::new(&settings).connect("herald bench").await?;
    let topology = Topology::from(&settings);
    topology.declare(&connection).await?;
    let _ = connection.close(200, "".into()).await;
    let on_cluster = [("HERALD_AMQP_URL", urls.as_str()), ("HERALD_TOPOLOGY_PREFIX", prefix.as_str())];

    let jobs = random_jobs(rng, scale, scale.cluster_jobs);
    let ids: std::collections::HashSet<String> = jobs.iter().map(|(id, _)| format!("alert {id}")).collect();
    let n = jobs.len() as u64;
    let before = env.sim.stats().await?.activities_total;
    let posted = || async { Ok::<_, anyhow::Error>(env.sim.stats().await?.activities_total - before) };
    let producer_log = std::env::temp_dir().join(format!("{prefix}-enqueue.log"));
    let mut producer = Command::new(binary("herald")?)
        .args(["enqueue", "--stdin", "--rate", &scale.cluster_rate.to_string()])
        .envs(env.worker_env(0))
        .envs(on_cluster)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&producer_log)?)
        .spawn()?;
    let mut stdin = producer.stdin.take().context("enqueue's stdin")?;
    let feeding = std::thread::spawn(move || {
        use std::io::Write as _;
        for (_, body) in &jobs {
            stdin.write_all(body)?;
            stdin.write_all(b"\n")?;
        }
        Ok::<_, std::io::Error>(())
    });
    // Their logs (warnings and errors) stay in the temporary directory if the phase fails.
    let logs: Vec<std::path::PathBuf> = (0..3).map(|i| std::env::temp_dir().join(format!("{prefix}-worker-{i}.log"))).collect();
    for log in &logs {
        let log = std::fs::File::create(log)?;
        let worker =
            Command::new(binary("herald")?).arg("worker").envs(env.worker_env(free_port())).envs(on_cluster).stderr(log).spawn()?;
        guard.0.push(worker);
    }
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let mut leader = None;
    for port in 15681..=15683 {
        let url = format!("http://127.0.0.1:{port}/api/queues/%2f/{}", topology.work_queue());
        if let Ok(answer) = http.get(url).basic_auth("guest", Some("guest")).send().await
            && let Ok(queue) = answer.json::<serde_json::Value>().await
            && let Some(node) = queue["leader"].as_str()
        {
            leader = node.strip_prefix("herald-").and_then(|n| n.split('@').next()).map(str::to_owned);
            break;
        }
    }
    let leader = leader.context("the work queue's leader, from the management API")?;
    let pid = cluster(&["pid", &leader])?;
    wait_for("a quarter of the jobs posted", Duration::from_secs(600), || async { Ok(posted().await? >= n / 4) }).await?;
    let at_kill = posted().await?;
    anyhow::ensure!(at_kill + n / 4 <= n, "{at_kill} of {n} jobs were posted before the kill: too few left to see a pause");
    let killed = chrono::Utc::now();
    anyhow::ensure!(Command::new("kill").args(["-KILL", &pid]).status()?.success(), "could not kill herald-{leader} (pid {pid})");
    wait_for("delivery to go on after the kill", Duration::from_secs(120), || async { Ok(posted().await? >= at_kill + n / 4) }).await?;
    let resumed = chrono::Utc::now();
    cluster(&["up"])?;
    wait_for("every job posted", Duration::from_secs(600), || async { Ok(posted().await? >= n) }).await?;
    feeding.join().map_err(|_| anyhow::anyhow!("the feeding thread panicked"))??;
    let produced = producer.wait()?;
    let said = std::fs::read_to_string(&producer_log).unwrap_or_default();
    anyhow::ensure!(produced.success(), "herald enqueue failed: {said}");
    let _ = std::fs::remove_file(&producer_log);
    let again = said.lines().find(|l| l.contains("published again")).map(str::to_owned);
    for _ in 0..3 {
        stop_last(guard);
    }
    for log in &logs {
        let _ = std::fs::remove_file(log);
    }

    let records = env.sim.all_activities().await?;
    let mut posts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut after: Vec<chrono::DateTime<chrono::Utc>> = Vec::new();
    for record in &records {
        let title = record.body["attachments"][0]["content"]["body"][0]["text"].as_str().unwrap_or_default();
        if ids.contains(title) {
            *posts.entry(title).or_default() += 1;
            if record.received_at > killed && record.received_at <= resumed {
                after.push(record.received_at);
            }
        }
    }
    after.sort();
    let mut last = killed;
    let mut pause = chrono::Duration::zero();
    for at in after {
        pause = pause.max(at - last);
        last = at;
    }
    let pause = pause.to_std().unwrap_or_default().as_secs_f64();
    let once = posts.len() == ids.len() && posts.values().all(|c| *c == 1);
    if let Ok(channel) = rabbitmq::Broker::new(&settings).connect("herald bench").await?.create_channel().await {
        for queue in topology.queues() {
            let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
        }
    }
    rows.push((
        format!(
            "the loss of a RabbitMQ node: 3-node cluster, 3 workers, {n} jobs published by `herald enqueue` at {}/s; the work queue leader's node (herald-{leader}) killed at {at_kill} posted, started again",
            scale.cluster_rate
        ),
        format!(
            "longest without a post after the kill {pause:.2} s; every job posted once: {}{}",
            if once { "yes" } else { "**no**" },
            again.map(|a| format!("; enqueue: {a}")).unwrap_or_default()
        ),
        verdict(pause < 15.0 && once, "delivery resumes within 15 s, nothing lost or doubled (issue 35)"),
    ));
    Ok(())
}

fn stop(worker: &mut Child) {
    let _ = Command::new("kill").args(["-TERM", &worker.id().to_string()]).status();
    let _ = worker.wait();
}

/// Stop the worker a phase started last.
fn stop_last(guard: &mut Guard) {
    if let Some(mut worker) = guard.0.pop() {
        stop(&mut worker);
    }
}

fn verdict(met: bool, target: &str) -> String {
    if met { format!("met ({target})") } else { format!("**missed** ({target})") }
}

fn write_report(scale: &Scale, rows: Vec<(String, String, String)>) -> anyhow::Result<()> {
    let mut md = String::new();
    let _ = writeln!(md, "# herald benchmark ({} scale)\n", scale.name);
    let _ = writeln!(
        md,
        "Run: {} (`make bench`, one run, every figure side by side on this machine)\n",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let _ = writeln!(md, "| machine | |\n|---|---|");
    let _ = writeln!(md, "| CPU | {} × {} |", shell("nproc"), shell("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"));
    let _ = writeln!(md, "| memory | {} |", shell("free -h | awk '/Mem:/{print $2}'"));
    let _ = writeln!(md, "| rustc | {} |", shell("rustc -V"));
    let _ = writeln!(md, "| RabbitMQ | {} |", shell("rabbitmqctl version 2>/dev/null"));
    let _ = writeln!(md, "| SecantusDB | {} |", shell("secantusd-rs --version | head -1"));
    let _ = writeln!(md, "| herald | {} |", shell("git rev-parse --short HEAD"));
    let _ = writeln!(md, "| settings | release build; worker concurrency 64, prefetch 128; teams-sim throttling off |\n");
    let _ = writeln!(md, "| measure | result | target |\n|---|---|---|");
    for (what, result, target) in rows {
        let _ = writeln!(md, "| {what} | {result} | {target} |");
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let file = if scale.name == "full" { "latest.md" } else { "smoke.md" };
    std::fs::write(dir.join(file), &md)?;
    println!("{md}");
    Ok(())
}
