//! `make demo`: two organizations share one Teams integration, each with its
//! own bot app. Starts teams-sim and a herald worker, seeds MongoDB, enqueues
//! sample alerts and prints who delivered what where, and each dead letter.
//!
//! Expects the services of `scripts/services.sh` and the `herald` and
//! `teams-sim` binaries built next to this example.

#[path = "support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use herald::dlq;
use herald::job::Job;
use herald::mongo::{BotDoc, ConversationDoc, OrgIntegrationDoc};
use herald::producer::Producer;
use herald::rabbitmq::{self, Topology};
use herald::secrets::Secrets;
use herald::settings::Settings;
use lapin::options::QueueDeleteOptions;
use serde_json::json;
use support::{Guard, binary};
use teams_sim::client::SimClient;
use teams_sim::{ActivityFilter, Route};

const PREFIX: &str = "herald-demo";
const DATABASE: &str = "herald_demo";
const INTEGRATION: &str = "teams-main";
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn org_integration(org: &str, tenant: &str, app: &str, secret: &str, service_url: &str) -> OrgIntegrationDoc {
    OrgIntegrationDoc::active(org, INTEGRATION, tenant, service_url, BotDoc::with_secret(app, secret))
}

fn registered_channel(org: &str, id: &str) -> ConversationDoc {
    ConversationDoc::channel(org, INTEGRATION, id)
}

fn alert(org: &str, conversation: &str, title: &str, text: &str) -> anyhow::Result<Job> {
    let value = json!({
        "version": 1, "job_id": uuid::Uuid::new_v4(), "organization_id": org, "integration_id": INTEGRATION,
        "recipient": {"conversation_id": conversation},
        "message": {"title": title, "text": text, "severity": "critical", "facts": [{"name": "organization", "value": org}]},
        "created_at": chrono::Utc::now(),
    });
    Job::decode(&serde_json::to_vec(&value)?).map_err(|e| anyhow::anyhow!("{e}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let port = free_port()?;
    let sim_url = format!("http://127.0.0.1:{port}");
    let service_url = format!("{sim_url}/teams/");
    let env = [
        ("HERALD_TOPOLOGY_PREFIX", PREFIX.to_owned()),
        ("HERALD_MONGODB_DATABASE", DATABASE.to_owned()),
        ("HERALD_TEAMS__CLOUDS__PUBLIC__TOKEN_ENDPOINT", sim_url.clone()),
        ("HERALD_TEAMS__INSECURE_LOOPBACK_HOSTS", "[\"127.0.0.1\"]".to_owned()),
        ("HERALD_LOG__FORMAT", "json".to_owned()),
        // Any free port: the demo must not depend on 9090 being free.
        ("HERALD_HTTP__LISTEN", "127.0.0.1:0".to_owned()),
        // The key that seals the demo's bot secrets in MongoDB. A real
        // deployment's comes from its secret store (docs/tenancy.md, "Secrets").
        ("HERALD_SECRETS__KEYS__DEMO", "ZGVtby1vbmx5LWtleS1uZXZlci11c2UtaW4tcHJvZCE=".to_owned()),
    ];
    for (key, value) in &env {
        // SAFETY: set before any other thread of this program reads the environment.
        unsafe { std::env::set_var(key, value) };
    }
    let settings = Settings::load(None)?;

    println!("== herald demo ==");
    println!("starting teams-sim on {sim_url} with deploy/demo/world.json");
    let mut guard = Guard(Vec::new());
    guard.0.push(
        Command::new(binary("teams-sim")?)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--world"])
            .arg(root.join("deploy/demo/world.json"))
            .stdout(Stdio::null())
            .spawn()
            .context("starting teams-sim")?,
    );
    let sim = SimClient::new(&sim_url);
    let started = Instant::now();
    while sim.health().await.is_err() {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("teams-sim did not answer on {sim_url}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A clean slate: the demo's own queues and database.
    let connection = rabbitmq::connect(AMQP, "herald demo").await?;
    let topology = Topology::from(&settings);
    let channel = connection.create_channel().await?;
    for queue in topology.queues() {
        let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    }
    let store = herald::mongo::Store::connect(&settings).await?;
    store.drop_database().await?;
    store.ensure_indexes().await?;

    println!(
        "seeding MongoDB `{DATABASE}`: organizations acme and globex share the Teams integration `{INTEGRATION}` with their \
         bots; initech uses it through a Teams Workflows webhook"
    );
    let integrations = [
        // Globex's record first: "the first org_integration of the integration" is the wrong one for Acme.
        org_integration("globex", "22222222-bbbb-4bbb-8bbb-222222222222", "globex-bot-app", "globex-demo-secret", &service_url),
        org_integration("acme", "11111111-aaaa-4aaa-8aaa-111111111111", "acme-bot-app", "acme-demo-secret", &service_url),
    ];
    let conversations = [
        registered_channel("acme", "19:acme-alerts@thread.tacv2"),
        registered_channel("globex", "19:globex-alerts@thread.tacv2"),
        registered_channel("globex", "19:globex-ops@thread.tacv2"),
        registered_channel("initech", "19:initech-alerts@thread.tacv2"),
    ];
    // Sealed for their own records, as `herald seed` and `herald org-integrations` store them.
    let secrets = Secrets::new(&settings.secrets)?;
    let mut integrations = integrations.to_vec();
    for doc in &mut integrations {
        secrets.seal_plaintext(doc)?;
    }
    // Initech's flow (deploy/demo/world.json): its URL, signature included, sealed.
    let flow = sim.world().await?.workflows.into_iter().next().context("the demo world has a Workflows flow")?;
    let url = teams_sim::workflow_url(&sim_url, &flow).into();
    let sealed = secrets.seal_workflow_url("initech", INTEGRATION, &url)?;
    integrations.push(OrgIntegrationDoc::workflow_webhook("initech", INTEGRATION, "33333333-cccc-4ccc-8ccc-333333333333", sealed));
    store.seed(&integrations, &conversations, false).await?;
    let signer = herald::worker::signer(&settings, &store).await?;

    println!("starting `herald worker` (topology prefix {PREFIX})");
    guard.0.push(
        Command::new(binary("herald")?)
            .arg("worker")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stderr(std::fs::File::create(root.join("target/demo-worker.log"))?)
            .spawn()
            .context("starting herald worker")?,
    );

    // Wait for the worker to declare the topology before publishing (the
    // dead-letter queue is declared last).
    let started = Instant::now();
    loop {
        let probe = connection.create_channel().await?;
        let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        if probe.queue_declare(topology.dead_queue().as_str().into(), passive, Default::default()).await.is_ok() {
            break;
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("the worker did not declare its queues; see target/demo-worker.log");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let producer = Producer::connect(AMQP, PREFIX).await?;
    let jobs = [
        alert("acme", "19:acme-alerts@thread.tacv2", "Acme: checkout latency p99 > 2s", "Region eu-west-1, since 10:02 UTC")?,
        alert("globex", "19:globex-alerts@thread.tacv2", "Globex: disk 95% on db-7", "Mount /var/lib/postgresql")?,
        alert("globex", "19:globex-ops@thread.tacv2", "Globex: backup failed", "The bot was removed from this channel")?,
        alert("initech", "19:initech-alerts@thread.tacv2", "Initech: TPS reports late", "Through the channel's Workflows webhook")?,
    ];
    println!("enqueueing {} alerts and one malformed job", jobs.len());
    for job in &jobs {
        producer.publish(job).await?;
    }
    producer.publish_raw(b"{\"version\": 1, \"organization_id\": \"acme\", \"recipient\": ", "malformed-demo-job", None).await?;

    let started = Instant::now();
    let (delivered, letters) = loop {
        let mut delivered = sim.activities(&ActivityFilter { route: Some(Route::Send), ..Default::default() }).await?;
        delivered.extend(sim.activities(&ActivityFilter { route: Some(Route::Workflow), ..Default::default() }).await?);
        let letters = dlq::browse(&connection, &topology.dead_queue(), &signer, 100).await?;
        if delivered.len() >= 3 && letters.len() >= 2 {
            break (delivered, letters);
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("timed out: {} delivered, {} dead-lettered; see target/demo-worker.log", delivered.len(), letters.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    println!("\nDelivered (as recorded by teams-sim):");
    for record in &delivered {
        let title = record.body["attachments"][0]["content"]["body"][0]["text"].as_str().unwrap_or("?");
        let by = match record.route {
            Route::Workflow => "Workflows webhook".to_owned(),
            _ => format!("bot app {}", record.app_id),
        };
        println!("  {:<32} by {by:<24} tenant {}  \"{title}\"", record.conversation_id, record.tenant_id);
    }
    println!("\nDead letters ({}):", topology.dead_queue());
    for letter in &letters {
        let header = |k: &str| letter.headers.get(k).cloned().unwrap_or_else(|| "-".into());
        println!(
            "  {:<38} reason {:<26} org {:<7} teams code {}\n      error: {}",
            letter.message_id.clone().unwrap_or_default(),
            header("x-herald-reason"),
            header("x-herald-organization-id"),
            header("x-herald-teams-code"),
            header("x-herald-error"),
        );
    }
    let tokens = sim.stats().await?.tokens_issued;
    println!("\nToken requests per bot app: {tokens:?}");
    println!("Worker log: target/demo-worker.log. Try `HERALD_TOPOLOGY_PREFIX={PREFIX} cargo run -q -- dlq list`.");
    drop(guard);
    // Close every client before the runtime ends, so nothing fails under it.
    producer.close().await;
    let _ = connection.close(200, "demo done".into()).await;
    store.shutdown().await;
    Ok(())
}
