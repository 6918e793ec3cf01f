//! Test environment: a random topology prefix and MongoDB database per test, an
//! in-process teams-sim on its own port (real HTTP), the real broker and the
//! real MongoDB-protocol server. Every wait has a timeout.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use figment::providers::Serialized;
use herald::dlq::{self, DeadLetter};
use herald::job::{Job, WireJob};
use herald::mongo::{BotDoc, ConversationDoc, ConversationKind, ConversationStatus, IntegrationStatus, OrgIntegrationDoc, Store};
use herald::producer::Producer;
use herald::rabbitmq::{self, Topology};
use herald::settings::Settings;
use herald::sim::{self, Bot, Conversation, Running, Tenant, World};
use herald::worker::{Worker, run::topology};
use lapin::Connection;
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use secrecy::ExposeSecret;
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const INTEGRATION: &str = "int-shared";

/// Wait until `check` returns `Some`, or fail after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The world of the incident: two organizations share one Teams integration,
/// each with its own bot app in its own tenant.
pub fn two_org_world() -> World {
    World {
        tenants: vec![Tenant { id: "tenant-a".into(), name: None }, Tenant { id: "tenant-b".into(), name: None }],
        bots: vec![
            Bot { app_id: "app-a".into(), app_secret: "secret-a".into(), authority: "botframework.com".into(), disabled: false },
            Bot { app_id: "app-b".into(), app_secret: "secret-b".into(), authority: "botframework.com".into(), disabled: false },
        ],
        users: vec![],
        conversations: vec![
            Conversation {
                id: "19:conv-a@thread.tacv2".into(),
                tenant_id: "tenant-a".into(),
                kind: sim::ConversationKind::Channel,
                roster: ["app-a".to_owned()].into(),
                blocked: false,
                user_id: None,
            },
            Conversation {
                id: "19:conv-b@thread.tacv2".into(),
                tenant_id: "tenant-b".into(),
                kind: sim::ConversationKind::Channel,
                roster: ["app-b".to_owned()].into(),
                blocked: false,
                user_id: None,
            },
        ],
    }
}

pub struct TestEnv {
    pub id: String,
    pub settings: Settings,
    pub sim: Running,
    pub store: Store,
    pub connection: Connection,
    pub producer: Producer,
    pub topology: Topology,
}

impl TestEnv {
    pub async fn new(world: World) -> Self {
        Self::with(world, sim::Options::default(), |f| f).await
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
            .merge(Serialized::default("retry.tiers_secs", [1, 2]))
            .merge(Serialized::default("retry.quick_min_delay_ms", 10))
            .merge(Serialized::default("retry.quick_max_delay_ms", 50))
            .merge(Serialized::default("worker.shutdown_deadline_secs", 5))
            .merge(Serialized::default("http.listen", ""))
            // Tests drive many jobs into few conversations; pacing has its own test.
            .merge(Serialized::default("teams.rate_limits.enabled", false))
            .merge(Serialized::default("log.format", "pretty"));
        let settings = Settings::from_figment(tweak(figment)).expect("test settings are valid");
        let store = Store::connect(&settings).await.expect("MongoDB answers (run `make services`)");
        let connection =
            rabbitmq::connect(settings.amqp_url.expose_secret(), "herald it").await.expect("RabbitMQ answers (run `make services`)");
        let topology = topology(&settings);
        topology.declare(&connection).await.expect("topology declares");
        store.ensure_indexes().await.expect("indexes");
        let producer = Producer::on(&connection, &settings.topology_prefix).await.expect("producer");
        Self { id, settings, sim, store, connection, producer, topology }
    }

    /// A new broker connection and producer (after the broker restarted).
    pub async fn reconnect(&mut self) {
        self.connection = rabbitmq::connect(AMQP_URL, "herald it").await.expect("RabbitMQ answers again");
        self.producer = Producer::on(&self.connection, &self.settings.topology_prefix).await.expect("producer");
    }

    /// Environment variables that point a `herald` process at this environment.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        vec![
            ("HERALD_TOPOLOGY_PREFIX".into(), self.settings.topology_prefix.clone()),
            ("HERALD_MONGODB_DATABASE".into(), self.settings.mongodb_database.clone()),
            ("HERALD_TEAMS__CLOUDS__PUBLIC__TOKEN_ENDPOINT".into(), self.sim.base_url()),
            ("HERALD_TEAMS__INSECURE_LOOPBACK_HOSTS".into(), "[\"127.0.0.1\"]".into()),
            ("HERALD_RETRY__TIERS_SECS".into(), "[1,2]".into()),
            ("HERALD_LOG__FORMAT".into(), "json".into()),
            ("HERALD_HTTP__LISTEN".into(), "127.0.0.1:0".into()),
            ("HERALD_TEAMS__RATE_LIMITS__ENABLED".into(), "false".into()),
        ]
    }

    pub fn org_integration(&self, org: &str, app: &str, tenant: &str) -> OrgIntegrationDoc {
        OrgIntegrationDoc {
            id: None,
            organization_id: org.into(),
            integration_id: INTEGRATION.into(),
            status: IntegrationStatus::Active,
            tenant_id: tenant.into(),
            cloud: None,
            service_url: self.sim.service_url(),
            bot: BotDoc {
                app_id: app.into(),
                app_secret: Some(format!("secret-{}", app.trim_start_matches("app-"))),
                app_secret_env: None,
                app_secret_file: None,
                authority: None,
            },
            created_at: None,
            updated_at: None,
        }
    }

    pub async fn insert_org_integration(&self, doc: OrgIntegrationDoc) {
        self.store.org_integrations().insert_one(doc).await.expect("insert org_integration");
    }

    pub async fn insert_conversation(&self, org: &str, conversation_id: &str, kind: ConversationKind, user_id: Option<&str>) {
        let doc = ConversationDoc {
            organization_id: org.into(),
            integration_id: INTEGRATION.into(),
            conversation_id: conversation_id.into(),
            kind,
            user_id: user_id.map(str::to_owned),
            status: ConversationStatus::Active,
            quarantine: None,
            created_at: None,
        };
        self.store.conversations().insert_one(doc).await.expect("insert conversation");
    }

    /// Org A and org B on the shared integration, with one channel each.
    /// Org B's record is inserted first, so that "the first org_integration of
    /// the integration" is the wrong one for org A (the incident).
    pub async fn seed_two_orgs(&self) {
        self.insert_org_integration(self.org_integration("org-b", "app-b", "tenant-b")).await;
        self.insert_org_integration(self.org_integration("org-a", "app-a", "tenant-a")).await;
        self.insert_conversation("org-a", "19:conv-a@thread.tacv2", ConversationKind::Channel, None).await;
        self.insert_conversation("org-b", "19:conv-b@thread.tacv2", ConversationKind::Channel, None).await;
    }

    pub fn spawn_worker(&self) -> TestWorker {
        TestWorker::spawn(self.settings.clone())
    }

    pub async fn publish(&self, job: &Job) {
        self.producer.publish(job).await.expect("publish confirmed");
    }

    pub async fn publish_raw(&self, body: &[u8], message_id: &str) {
        self.producer.publish_raw(body, message_id, None).await.expect("publish confirmed");
    }

    /// Wait until the dead-letter queue holds `n` messages, and return them.
    pub async fn dead_letters(&self, n: usize) -> Vec<DeadLetter> {
        let queue = self.topology.dead_queue();
        eventually(&format!("{n} dead letter(s)"), Duration::from_secs(30), || async {
            (self.queue_len(&queue).await >= n as u32).then_some(())
        })
        .await;
        dlq::browse(&self.connection, &queue, n + 10).await.expect("browse")
    }

    pub async fn queue_len_owned(&self, queue: String) -> u32 {
        self.queue_len(&queue).await
    }

    pub async fn queue_len(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.expect("channel");
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let count = channel.queue_declare(queue.into(), passive, Default::default()).await.expect("queue exists").message_count();
        let _ = channel.close(200, "".into()).await;
        count
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

    /// Wait until every queue of the topology is empty and nothing is unacked.
    pub async fn drained(&self) {
        let queue = self.topology.work_queue();
        eventually("the work queue to drain", Duration::from_secs(30), || async { (self.queue_len(&queue).await == 0).then_some(()) })
            .await;
    }

    /// Delete this test's queues, exchanges and database.
    pub async fn teardown(self) {
        let channel = self.connection.create_channel().await.expect("channel");
        for queue in self.topology.queues() {
            let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
        }
        for exchange in self.topology.exchanges() {
            let _ = channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
        }
        let _ = self.store.database().drop().await;
        let _ = self.connection.close(200, "".into()).await;
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A job as a producer would build it.
pub fn job(org: &str, conversation: &str, title: &str) -> Job {
    job_json(json!({
        "version": 1,
        "job_id": uuid::Uuid::new_v4(),
        "organization_id": org,
        "integration_id": INTEGRATION,
        "recipient": {"conversation_id": conversation},
        "message": {"title": title, "text": "details", "severity": "error"},
        "created_at": chrono::Utc::now(),
    }))
}

pub fn job_json(value: serde_json::Value) -> Job {
    Job::decode(&serde_json::to_vec(&value).unwrap()).expect("test job is valid")
}

pub fn wire(job: &Job) -> Vec<u8> {
    serde_json::to_vec(&WireJob::from(job)).unwrap()
}

/// The worker running in this process, on its own task.
pub struct TestWorker {
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl TestWorker {
    pub fn spawn(settings: Settings) -> Self {
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let handle = tokio::spawn(async move {
            let worker = Worker::build(settings, token.clone()).await.expect("worker builds");
            worker.run(token).await.expect("worker runs");
        });
        Self { shutdown, handle }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.handle).await.expect("worker stops within 15 s").expect("worker task");
    }
}
