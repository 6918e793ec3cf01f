//! Test environment: a random topology prefix and MongoDB database per test, an
//! in-process teams-sim on its own port (real HTTP), the real broker and the
//! real MongoDB-protocol server. Every wait has a timeout. Dropping the
//! environment deletes its queues, exchanges and database, whether the test
//! passed or failed.

#![allow(dead_code)]

use std::future::Future;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::Serialized;
use herald::dlq::{self, DeadLetter};
use herald::job::{Job, WireJob};
use herald::mongo::{BotDoc, ConversationDoc, ConversationKind, DeliveryDoc, DeliveryState, OrgIntegrationDoc, Store};
use herald::producer::Producer;
use herald::rabbitmq::headers::{self, Signer};
use herald::rabbitmq::{self, Publisher, ROUTING_KEY, Topology};
use herald::secrets::Secrets;
use herald::settings::Settings;
use herald::worker::Worker;
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use secrecy::ExposeSecret;
use serde_json::json;
use teams_sim::{self as sim, Bot, Conversation, Running, Tenant, World};
use tokio_util::sync::CancellationToken;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const INTEGRATION: &str = "int-shared";
pub const CONV_A: &str = "19:conv-a@thread.tacv2";
pub const CONV_B: &str = "19:conv-b@thread.tacv2";
/// The key ring of every test environment (`secrets.keys.it`): stored bot
/// secrets are sealed with it, as `herald` seals them.
pub const SEAL_KEY: &str = "dGVzdC1vbmx5LXNlYWwta2V5LTMyLWJ5dGVzLWxvbmc=";

/// Wait until `check` returns `Some`, or fail after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match within(timeout, check).await {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// [`eventually`] for a caller that explains a timeout itself: `None` once
/// `timeout` has passed without `check` returning `Some`.
pub async fn within<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where a test environment's `secrets.directory` is.
pub fn secrets_directory(id: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("herald-it-{id}-secrets"))
}

/// A bot of the simulator's world whose secret is `secret-<suffix of app>`.
pub fn bot(app: &str) -> Bot {
    Bot {
        app_id: app.into(),
        app_secret: format!("secret-{}", app.trim_start_matches("app-")),
        authority: "botframework.com".into(),
        disabled: false,
    }
}

/// A channel of the simulator's world with `app` in its roster.
pub fn channel(id: &str, tenant: &str, app: &str) -> Conversation {
    Conversation {
        id: id.into(),
        tenant_id: tenant.into(),
        kind: sim::ConversationKind::Channel,
        roster: [app.to_owned()].into(),
        blocked: false,
        user_id: None,
    }
}

/// The world of the incident: two organizations share one Teams integration,
/// each with its own bot app in its own tenant.
pub fn two_org_world() -> World {
    World {
        tenants: vec![Tenant { id: "tenant-a".into(), name: None }, Tenant { id: "tenant-b".into(), name: None }],
        bots: vec![bot("app-a"), bot("app-b")],
        users: vec![],
        conversations: vec![channel(CONV_A, "tenant-a", "app-a"), channel(CONV_B, "tenant-b", "app-b")],
        workflows: vec![],
    }
}

pub struct TestEnv {
    pub id: String,
    pub settings: Settings,
    pub sim: Running,
    pub store: Store,
    pub connection: Arc<Connection>,
    pub producer: Producer,
    pub topology: Topology,
    pub signer: Signer,
}

impl TestEnv {
    pub async fn new(world: World) -> Self {
        Self::with(world, sim::Options::default(), |f| f).await
    }

    /// The incident's world, seeded: org A and org B on the shared integration.
    pub async fn two_orgs() -> Self {
        let env = Self::new(two_org_world()).await;
        env.seed_two_orgs().await;
        env
    }

    /// [`TestEnv::two_orgs`] with one setting changed.
    pub async fn two_orgs_with_setting<V: serde::Serialize>(key: &str, value: V) -> Self {
        let env = Self::with(two_org_world(), sim::Options::default(), |f| f.merge(Serialized::default(key, value))).await;
        env.seed_two_orgs().await;
        env
    }

    /// `tweak` may override settings (e.g. retry tiers) on top of the test defaults.
    pub async fn with(world: World, options: sim::Options, tweak: impl FnOnce(figment::Figment) -> figment::Figment) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let sim = Running::start(world, options).await.expect("teams-sim starts");
        let figment = Settings::defaults()
            .merge(Serialized::default("topology_prefix", format!("it-{id}")))
            .merge(Serialized::default("mongodb_database", format!("it_{id}")))
            .merge(Serialized::default("teams.clouds.public.token_endpoint", sim.base_url()))
            .merge(Serialized::default("teams.insecure_loopback_hosts", ["127.0.0.1"]))
            .merge(Serialized::default("teams.request_timeout_secs", 2))
            .merge(Serialized::default("worker.claim_lease_secs", 15))
            .merge(Serialized::default("retry.tiers_secs", [1, 2]))
            .merge(Serialized::default("retry.quick_min_delay_ms", 10))
            .merge(Serialized::default("retry.quick_max_delay_ms", 50))
            .merge(Serialized::default("worker.shutdown_deadline_secs", 5))
            .merge(Serialized::default("http.listen", ""))
            // Tests drive many jobs into few conversations; pacing has its own test.
            .merge(Serialized::default("teams.rate_limits.enabled", false))
            .merge(Serialized::default("log.format", "pretty"))
            .merge(Serialized::default("secrets.keys", json!({ "it": SEAL_KEY })))
            .merge(Serialized::default("secrets.directory", secrets_directory(&id).display().to_string()));
        std::fs::create_dir_all(secrets_directory(&id)).expect("a secrets directory");
        let settings = Settings::from_figment(tweak(figment)).expect("test settings are valid");
        let store = Store::connect(&settings).await.expect("MongoDB answers (run `make services`)");
        let connection =
            Arc::new(rabbitmq::Broker::new(&settings).connect("herald it").await.expect("RabbitMQ answers (run `make services`)"));
        let topology = Topology::from(&settings);
        topology.declare(&connection).await.expect("topology declares");
        store.ensure_indexes().await.expect("indexes");
        let signer = herald::worker::signer(&settings, &store).await.expect("the header key");
        let producer = Producer::on(&connection, &settings.topology_prefix).await.expect("producer");
        Self { id, settings, sim, store, connection, producer, topology, signer }
    }

    /// A new broker connection and producer (after the broker, or the node
    /// connected to, restarted).
    pub async fn reconnect(&mut self) {
        self.connection = Arc::new(rabbitmq::Broker::new(&self.settings).connect("herald it").await.expect("RabbitMQ answers again"));
        self.producer = Producer::on(&self.connection, &self.settings.topology_prefix).await.expect("producer");
    }

    /// Environment variables that point a `herald` process at this environment.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        vec![
            ("HERALD_AMQP_URL".into(), self.settings.amqp_url.expose_secret().to_owned()),
            ("HERALD_TOPOLOGY_PREFIX".into(), self.settings.topology_prefix.clone()),
            ("HERALD_MONGODB_DATABASE".into(), self.settings.mongodb_database.clone()),
            ("HERALD_TEAMS__CLOUDS__PUBLIC__TOKEN_ENDPOINT".into(), self.sim.base_url()),
            ("HERALD_TEAMS__INSECURE_LOOPBACK_HOSTS".into(), "[\"127.0.0.1\"]".into()),
            ("HERALD_TEAMS__REQUEST_TIMEOUT_SECS".into(), "2".into()),
            ("HERALD_WORKER__CLAIM_LEASE_SECS".into(), "15".into()),
            ("HERALD_RETRY__TIERS_SECS".into(), "[1,2]".into()),
            ("HERALD_LOG__FORMAT".into(), "json".into()),
            ("HERALD_HTTP__LISTEN".into(), "127.0.0.1:0".into()),
            ("HERALD_TEAMS__RATE_LIMITS__ENABLED".into(), "false".into()),
            ("HERALD_SECRETS__KEYS__IT".into(), SEAL_KEY.into()),
            ("HERALD_SECRETS__DIRECTORY".into(), self.settings.secrets.directory.clone()),
        ]
    }

    /// Write `secret` where `secrets.directory` lets `org`'s records read it;
    /// the path to store in `bot.app_secret_file`.
    pub fn secret_file(&self, org: &str, name: &str, secret: &[u8]) -> String {
        let dir = secrets_directory(&self.id).join(org);
        std::fs::create_dir_all(&dir).expect("an organization's secrets directory");
        std::fs::write(dir.join(name), secret).expect("a secret file");
        dir.join(name).display().to_string()
    }

    /// A `herald` process of this environment, not yet started.
    pub fn herald_command(&self, args: &[&str]) -> tokio::process::Command {
        self.command_of(env!("CARGO_BIN_EXE_herald"), args)
    }

    fn command_of(&self, binary: &str, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(binary);
        command.args(args).envs(self.env_vars()).env("HERALD_LOG__FILTER", "warn").stdin(Stdio::null()).kill_on_drop(true);
        command
    }

    /// A `herald worker` process of this environment with `extra` settings,
    /// its output discarded, killed if dropped.
    pub fn worker_process(&self, extra: &[(&str, &str)]) -> tokio::process::Child {
        self.herald_command(&["worker"])
            .envs(extra.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("herald worker starts")
    }

    /// A `herald worker` process whose log (JSON lines) goes to a file and
    /// whose `/metrics` listens on a known port.
    pub fn observed_worker(&self, extra: &[(&str, &str)]) -> ObservedWorker {
        self.observed_worker_of(env!("CARGO_BIN_EXE_herald"), extra)
    }

    /// [`TestEnv::observed_worker`] of another build of `herald` (the release
    /// build, for the tests that measure the fleet against Teams' windows).
    pub fn observed_worker_of(&self, binary: &str, extra: &[(&str, &str)]) -> ObservedWorker {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("herald-it-{}-{port}.log", self.id));
        let process = self
            .command_of(binary, &["worker"])
            .env("HERALD_HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env("HERALD_LOG__FILTER", "info")
            .envs(extra.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("a log file"))
            .spawn()
            .expect("herald worker starts");
        ObservedWorker { process, port, log }
    }

    /// Run `herald args` to its end, whatever its exit status.
    pub async fn herald(&self, args: &[&str]) -> Output {
        self.herald_command(args).output().await.expect("herald runs")
    }

    /// Run `herald args` and require success.
    pub async fn herald_ok(&self, args: &[&str]) -> Output {
        let output = self.herald(args).await;
        assert!(output.status.success(), "herald {args:?} failed: {}{}", stdout(&output), stderr(&output));
        output
    }

    pub fn org_integration(&self, org: &str, app: &str, tenant: &str) -> OrgIntegrationDoc {
        let secret = format!("secret-{}", app.trim_start_matches("app-"));
        OrgIntegrationDoc::active(org, INTEGRATION, tenant, &self.sim.service_url(), BotDoc::with_secret(app, &secret))
    }

    /// Store `doc` as `herald` would: a plaintext `bot.app_secret` is sealed
    /// for the record first.
    pub async fn insert_org_integration(&self, doc: OrgIntegrationDoc) {
        self.seed(&[doc], &[]).await;
    }

    /// Store many records at once, as [`TestEnv::insert_org_integration`] does one.
    pub async fn seed(&self, integrations: &[OrgIntegrationDoc], conversations: &[ConversationDoc]) {
        let secrets = Secrets::new(&self.settings.secrets).expect("the test key ring");
        let sealed: Vec<OrgIntegrationDoc> = integrations
            .iter()
            .cloned()
            .map(|mut doc| {
                secrets.seal_plaintext(&mut doc).expect("sealed");
                doc
            })
            .collect();
        self.store.seed(&sealed, conversations, false).await.expect("seed");
    }

    /// Store `doc` exactly as given (a record from before sealing, an impostor's).
    pub async fn insert_raw_org_integration(&self, doc: OrgIntegrationDoc) {
        self.store.put_org_integration(&doc).await.expect("insert org_integration");
    }

    pub async fn insert_conversation(&self, org: &str, conversation_id: &str, kind: ConversationKind, user_id: Option<&str>) {
        let doc =
            ConversationDoc { kind, user_id: user_id.map(str::to_owned), ..ConversationDoc::channel(org, INTEGRATION, conversation_id) };
        self.store.put_conversation(&doc).await.expect("insert conversation");
    }

    /// Org A and org B on the shared integration, with one channel each.
    /// Org B's record is inserted first, so that "the first org_integration of
    /// the integration" is the wrong one for org A (the incident).
    pub async fn seed_two_orgs(&self) {
        self.insert_org_integration(self.org_integration("org-b", "app-b", "tenant-b")).await;
        self.insert_org_integration(self.org_integration("org-a", "app-a", "tenant-a")).await;
        self.insert_conversation("org-a", CONV_A, ConversationKind::Channel, None).await;
        self.insert_conversation("org-b", CONV_B, ConversationKind::Channel, None).await;
    }

    pub fn spawn_worker(&self) -> TestWorker {
        TestWorker::spawn(self.settings.clone())
    }

    pub async fn publish(&self, job: &Job) {
        self.producer.publish(job).await.expect("publish confirmed");
    }

    /// Publish `job` `n` times (as a producer retrying, or a redelivery).
    pub async fn publish_copies(&self, job: &Job, n: usize) {
        for _ in 0..n {
            self.publish(job).await;
        }
    }

    pub async fn publish_raw(&self, body: &[u8], message_id: &str) {
        self.producer.publish_raw(body, message_id, None).await.expect("publish confirmed");
    }

    /// Publish `body` to `exchange` with exactly these properties.
    pub async fn publish_with(&self, exchange: &str, body: &[u8], properties: BasicProperties) {
        let publisher = Publisher::open(self.connection.clone()).await.expect("publisher");
        publisher.publish(exchange, ROUTING_KEY, body, properties).await.expect("publish confirmed");
        publisher.close().await;
    }

    /// Put a dead letter straight into the dead-letter queue, with herald's
    /// headers signed as the worker signs them.
    pub async fn put_dead_letter(&self, job: &Job, mut table: FieldTable) {
        let id = job.id.to_string();
        let body = wire(job);
        self.signer.sign(Some(&id), &body, &mut table);
        let properties = BasicProperties::default().with_message_id(id.as_str().into()).with_headers(table);
        self.publish_with(&self.topology.dead_exchange(), &body, properties).await;
    }

    /// Wait until the dead-letter queue holds `n` messages, and return them.
    pub async fn dead_letters(&self, n: usize) -> Vec<DeadLetter> {
        let queue = self.topology.dead_queue();
        eventually(&format!("{n} dead letter(s)"), Duration::from_secs(30), || async {
            (self.queue_len(&queue).await >= n as u32).then_some(())
        })
        .await;
        dlq::browse(&self.connection, &queue, &self.signer, n + 10).await.expect("browse")
    }

    pub async fn queue_len(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.expect("channel");
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let count = channel.queue_declare(queue.into(), passive, Default::default()).await.expect("queue exists").message_count();
        let _ = channel.close(200, "".into()).await;
        count
    }

    /// Messages waiting in the work queue, the shard queues and every retry tier.
    pub async fn waiting(&self) -> u32 {
        let mut total = 0;
        for queue in self.topology.pending_queues() {
            total += self.queue_len(&queue).await;
        }
        for tier in &self.topology.tiers {
            total += self.queue_len(&self.topology.retry_queue(*tier)).await;
        }
        total
    }

    /// Wait until `queue` holds exactly `n` ready messages. Messages a tool
    /// looked at without acking return to a quorum queue shortly after its
    /// channel closed, so "nothing was removed" is a state to wait for.
    pub async fn settles_at(&self, queue: &str, n: u32) {
        let mut last = 0;
        let settled = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                last = self.queue_len(queue).await;
                if last == n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(settled.is_ok(), "{queue} holds {last} messages, not {n}");
    }

    /// Wait until the simulator recorded `n` activities.
    pub async fn activities(&self, n: usize) -> Vec<sim::ActivityRecord> {
        let client = self.sim.client();
        eventually(&format!("{n} activities in teams-sim"), Duration::from_secs(30), || async {
            let records = client.activities(&sim::ActivityFilter { route: Some(sim::Route::Send), ..Default::default() }).await.ok()?;
            (records.len() >= n).then_some(records)
        })
        .await
    }

    /// Wait until the ledger records `job_id` sent.
    pub async fn sent(&self, job_id: &str) -> DeliveryDoc {
        eventually("the ledger to say sent", Duration::from_secs(15), || async {
            self.store.delivery(job_id).await.unwrap().filter(|d| d.state == DeliveryState::Sent)
        })
        .await
    }

    /// Publish jobs (job id, body) as a producer does (JSON, message id =
    /// job id) and wait for every confirm.
    pub async fn publish_confirmed<'a>(&self, publisher: &Publisher, jobs: impl IntoIterator<Item = (&'a str, &'a [u8])>) {
        let mut pending = Vec::new();
        for (job_id, body) in jobs {
            let properties = BasicProperties::default().with_content_type("application/json".into()).with_message_id(job_id.into());
            pending.push(publisher.start(&self.topology.jobs_exchange(), ROUTING_KEY, body, properties).await.unwrap());
        }
        for confirm in pending {
            confirm.confirmed().await.unwrap();
        }
    }

    /// Wait until the work queue, the shard queues and every retry tier are empty.
    pub async fn drained(&self) {
        eventually("the work queue and retry tiers to drain", Duration::from_secs(30), || async {
            (self.waiting().await == 0).then_some(())
        })
        .await;
    }
}

impl Drop for TestEnv {
    /// Delete this test's queues, exchanges and database, on a thread of its
    /// own (Drop cannot wait on the test's runtime, which may be unwinding).
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(secrets_directory(&self.id));
        let topology = self.topology.clone();
        let settings = self.settings.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            runtime.block_on(async move {
                if let Ok(connection) = rabbitmq::Broker::new(&settings).connect("herald it cleanup").await
                    && let Ok(channel) = connection.create_channel().await
                {
                    for queue in topology.queues() {
                        let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
                    }
                    for exchange in topology.exchanges() {
                        let _ = channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
                    }
                    let _ = connection.close(200, "".into()).await;
                }
                if let Ok(store) = Store::connect(&settings).await {
                    let _ = store.drop_database().await;
                    store.shutdown().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// A worker process with its log file and metrics port.
pub struct ObservedWorker {
    pub process: tokio::process::Child,
    pub port: u16,
    pub log: std::path::PathBuf,
}

impl ObservedWorker {
    /// The metrics page (waits until the endpoint answers).
    pub async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.port);
        eventually("the metrics endpoint", Duration::from_secs(15), || async {
            reqwest::get(&url).await.ok()?.error_for_status().ok()?.text().await.ok()
        })
        .await
    }

    /// The sum of every series of `name` on the metrics page.
    pub async fn metric(&self, name: &str) -> f64 {
        metric(&self.metrics().await, name)
    }

    /// What a failed test says of this worker: its process id, whether it
    /// has exited (and how), and the last lines of its log.
    pub fn report(&mut self) -> String {
        let state = match self.process.try_wait() {
            Ok(Some(status)) => format!("exited ({status})"),
            Ok(None) => "running".to_owned(),
            Err(err) => format!("unknown ({err})"),
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n  ");
        format!("worker pid {:?} on port {}: {state}; last lines of its log:\n  {tail}", self.process.id(), self.port)
    }

    /// SIGTERM; require a clean exit; the log.
    pub async fn stop(self) -> String {
        assert!(terminate(self.process).await.success(), "the worker exits cleanly on SIGTERM");
        let log = std::fs::read_to_string(&self.log).expect("the worker log");
        let _ = std::fs::remove_file(&self.log);
        log
    }
}

/// The sum of every series of `name` in a Prometheus text page.
pub fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Send SIGTERM to a process and wait (at most 15 s) for its exit.
pub async fn terminate(mut process: tokio::process::Child) -> std::process::ExitStatus {
    let pid = process.id().expect("running").to_string();
    let _ = std::process::Command::new("kill").args(["-TERM", &pid]).status();
    tokio::time::timeout(Duration::from_secs(15), process.wait()).await.expect("exits within 15 s").expect("exit status")
}

/// SIGKILL a process.
pub fn kill(process: &tokio::process::Child) {
    let pid = process.id().expect("running").to_string();
    let status = std::process::Command::new("kill").args(["-KILL", &pid]).status().unwrap();
    assert!(status.success(), "kill -KILL {pid}");
}

/// The settings that make a process see its wall clock `offset` off (for
/// example "-30s") through libfaketime, its monotonic clock untouched.
pub fn skewed_clock(offset: &'static str) -> [(&'static str, &'static str); 3] {
    [("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"), ("FAKETIME", offset), ("FAKETIME_DONT_FAKE_MONOTONIC", "1")]
}

/// The title of a posted activity (the first text block of its card).
pub fn title(record: &sim::ActivityRecord) -> String {
    record.body["attachments"][0]["content"]["body"][0]["text"].as_str().unwrap_or_default().to_owned()
}

/// How often each title was posted.
pub fn posts_by_title(records: &[sim::ActivityRecord]) -> std::collections::HashMap<String, usize> {
    let mut posts = std::collections::HashMap::new();
    for record in records {
        *posts.entry(title(record)).or_insert(0) += 1;
    }
    posts
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A command's standard output as JSON (its `--json` answer).
pub fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| panic!("not JSON ({err}): {}", stdout(output)))
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A job as a producer would build it.
pub fn job(org: &str, conversation: &str, title: &str) -> Job {
    job_json(job_value(org, conversation, title))
}

/// The wire form of [`job`], to change before decoding or publishing.
pub fn job_value(org: &str, conversation: &str, title: &str) -> serde_json::Value {
    json!({
        "version": 1,
        "job_id": uuid::Uuid::new_v4(),
        "organization_id": org,
        "integration_id": INTEGRATION,
        "recipient": {"conversation_id": conversation},
        "message": {"title": title, "text": "details", "severity": "error"},
        "created_at": chrono::Utc::now(),
    })
}

pub fn job_json(value: serde_json::Value) -> Job {
    Job::decode(&serde_json::to_vec(&value).unwrap()).expect("test job is valid")
}

pub fn wire(job: &Job) -> Vec<u8> {
    serde_json::to_vec(&WireJob::from(job)).unwrap()
}

/// Headers of a dead letter as the worker writes them (before signing).
pub fn dead_letter_headers(job: &Job, reason: &str, code: Option<&str>, at: &str, replays: u32) -> FieldTable {
    let mut table = FieldTable::default();
    headers::set_str(&mut table, headers::REASON, reason);
    headers::set_str(&mut table, headers::ORGANIZATION_ID, job.organization_id.as_str());
    headers::set_str(&mut table, headers::DEAD_LETTERED_AT, at);
    headers::set_u32(&mut table, headers::REPLAYS, replays);
    if let Some(code) = code {
        headers::set_str(&mut table, headers::TEAMS_CODE, code);
    }
    table
}

/// The worker running in this process, on its own task; stopped on drop.
pub struct TestWorker {
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl TestWorker {
    pub fn spawn(settings: Settings) -> Self {
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let handle = tokio::spawn(async move {
            let worker = Worker::build(settings, token.clone()).await.expect("worker builds");
            worker.run(token).await.expect("worker runs");
        });
        Self { shutdown, handle: Some(handle) }
    }

    /// Stop, and require that the worker stops within 15 s.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let handle = self.handle.take().expect("a running worker");
        tokio::time::timeout(Duration::from_secs(15), handle).await.expect("worker stops within 15 s").expect("worker task");
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A TCP proxy in front of a server whose connections can be stalled: bytes
/// stop flowing both ways, as on a half-open socket or a stuck middlebox.
/// A stall takes every connection open at the time, and every connection
/// opened during the window that follows; later ones pass.
pub struct StallProxy {
    pub port: u16,
    /// Connections numbered below this are stalled.
    stalled_below: Arc<std::sync::atomic::AtomicU64>,
    opened: Arc<std::sync::atomic::AtomicU64>,
    /// New connections stall until then.
    window_end: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl StallProxy {
    pub async fn start(target: &'static str) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a port for the proxy");
        let port = listener.local_addr().unwrap().port();
        let (stalled_below, opened) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let window_end = Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
        let (below, count, window) = (stalled_below.clone(), opened.clone(), window_end.clone());
        let accept = tokio::spawn(async move {
            // Dropped with the accept loop: every connection task ends with it.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let number = count.fetch_add(1, Ordering::SeqCst);
                let in_window = window.lock().unwrap().is_some_and(|end| std::time::Instant::now() < end);
                let born_stalled = Arc::new(AtomicBool::new(in_window));
                let below = below.clone();
                connections.spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else { return };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let pass = |mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf| {
                        let (below, born_stalled) = (below.clone(), born_stalled.clone());
                        async move {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let mut buffer = vec![0u8; 64 * 1024];
                            loop {
                                let Ok(n) = from.read(&mut buffer).await else { return };
                                if n == 0 {
                                    return;
                                }
                                if number < below.load(Ordering::SeqCst) || born_stalled.load(Ordering::SeqCst) {
                                    std::future::pending::<()>().await;
                                }
                                if to.write_all(&buffer[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    };
                    tokio::join!(pass(client_read, server_write), pass(server_read, client_write));
                });
            }
        });
        Self { port, stalled_below, opened, window_end, accept }
    }

    /// A MongoDB URI through the proxy.
    pub fn mongodb_uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// Stall every connection open now, and those opened within `window`.
    pub fn stall(&self, window: Duration) {
        use std::sync::atomic::Ordering;
        *self.window_end.lock().unwrap() = Some(std::time::Instant::now() + window);
        self.stalled_below.store(self.opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
