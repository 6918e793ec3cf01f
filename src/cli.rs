//! The `herald` command line.

use std::io::{BufRead, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use secrecy::ExposeSecret;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::job::{Fact, Job, Message, Recipient, Severity, WireJob};
use crate::mongo::{ConversationDoc, OrgIntegrationDoc, Store};
use crate::producer::Producer;
use crate::settings::{Settings, redact_url};
use crate::worker::{self, Worker};
use crate::{dlq, rabbitmq, telemetry};

/// herald: delivers notification jobs from RabbitMQ to Microsoft Teams, each
/// with its own organization's credentials, and dead-letters what cannot be
/// delivered with a reason an operator can act on.
///
/// Settings come from the embedded defaults, then `--config FILE` (or
/// HERALD_CONFIG), then HERALD_* environment variables (e.g. HERALD_AMQP_URL,
/// HERALD_MONGODB_URI, HERALD_MONGODB_DATABASE, HERALD_TOPOLOGY_PREFIX,
/// HERALD_WORKER__CONCURRENCY). See config/default.toml for every key.
#[derive(Debug, Parser)]
#[command(name = "herald", version)]
pub struct Cli {
    /// A TOML settings file, merged over the defaults.
    #[arg(long, global = true, env = "HERALD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume jobs and deliver them (declares the topology and indexes first).
    /// Stops on SIGTERM/SIGINT after finishing in-flight jobs.
    Worker,
    /// Declare the RabbitMQ topology and the MongoDB indexes; safe to repeat.
    Setup,
    /// Publish jobs with publisher confirms: one from flags, one from --file,
    /// or many from --stdin as JSON lines. Every job is validated first.
    Enqueue(Box<EnqueueArgs>),
    /// Inspect the dead-letter queue.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Load org_integrations and conversations from a JSON file (upsert).
    Seed {
        /// {"org_integrations": [...], "conversations": [...]}
        #[arg(long)]
        file: PathBuf,
    },
    /// Check the settings and the connections to RabbitMQ and MongoDB.
    Doctor,
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Organization the job belongs to.
    #[arg(long = "org")]
    pub organization_id: Option<String>,
    /// The Teams integration of that organization.
    #[arg(long = "integration")]
    pub integration_id: Option<String>,
    /// Recipient: a registered conversation id.
    #[arg(long)]
    pub conversation: Option<String>,
    /// Recipient: a user id (their personal chat with the bot).
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub title: Option<String>,
    #[arg(long)]
    pub text: Option<String>,
    /// info, warning, error or critical.
    #[arg(long, default_value = "info")]
    pub severity: String,
    #[arg(long)]
    pub url: Option<String>,
    /// A fact as NAME=VALUE (repeatable).
    #[arg(long = "fact")]
    pub facts: Vec<String>,
    /// The job expires this many seconds after creation.
    #[arg(long)]
    pub expires_in: Option<u64>,
    /// Publish the job in this JSON file instead.
    #[arg(long, conflicts_with = "stdin")]
    pub file: Option<PathBuf>,
    /// Publish one job per line of standard input (JSON lines).
    #[arg(long)]
    pub stdin: bool,
    /// At most this many jobs per second (for large batches).
    #[arg(long)]
    pub rate: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters without removing them.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(cli.config.as_deref())?;
    telemetry::init(&settings.log);
    match cli.command {
        Command::Worker => {
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
            worker::run(settings, shutdown).await?;
        }
        Command::Setup => {
            let connection = rabbitmq::connect(settings.amqp_url.expose_secret(), "herald setup").await?;
            let worker = Worker::build(settings, CancellationToken::new()).await?;
            worker.setup(&connection).await?;
            println!("topology {} declared, MongoDB indexes ensured", worker.topology.prefix);
        }
        Command::Enqueue(args) => enqueue(&settings, *args).await?,
        Command::Dlq(DlqCommand::List { limit, json }) => {
            let connection = rabbitmq::connect(settings.amqp_url.expose_secret(), "herald dlq").await?;
            let queue = worker::run::topology(&settings).dead_queue();
            let letters = dlq::browse(&connection, &queue, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else {
                println!("{:<38} {:<32} {:<18} TEAMS CODE", "JOB ID", "REASON", "ORGANIZATION");
                for l in &letters {
                    let dash = || "-".to_owned();
                    println!(
                        "{:<38} {:<32} {:<18} {}",
                        l.message_id.clone().unwrap_or_else(dash),
                        l.reason.clone().unwrap_or_else(dash),
                        l.organization_id.clone().unwrap_or_else(dash),
                        l.teams_code.clone().unwrap_or_else(dash)
                    );
                }
                println!("{} dead letter(s) in {queue}", letters.len());
            }
        }
        Command::Seed { file } => seed(&settings, &file).await?,
        Command::Doctor => return doctor(&settings).await,
    }
    Ok(ExitCode::SUCCESS)
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown signal received: finishing in-flight jobs");
        shutdown.cancel();
    });
}

/// A job from the command-line flags, validated like any job on the wire.
fn job_from_flags(args: &EnqueueArgs) -> anyhow::Result<Job> {
    let severity: Severity = serde_json::from_value(serde_json::Value::String(args.severity.clone()))
        .map_err(|_| anyhow::anyhow!("--severity must be info, warning, error or critical, not {:?}", args.severity))?;
    let url = args.url.as_deref().map(url::Url::parse).transpose().context("--url is not a valid URL")?;
    let facts = args
        .facts
        .iter()
        .map(|f| match f.split_once('=') {
            Some((name, value)) => Ok(Fact { name: name.to_owned(), value: value.to_owned() }),
            None => bail!("--fact {f:?} must be NAME=VALUE"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let now = chrono::Utc::now();
    let wire = WireJob {
        version: crate::job::VERSION,
        job_id: uuid::Uuid::new_v4(),
        organization_id: args.organization_id.clone().context("--org is required (or use --file / --stdin)")?,
        integration_id: args.integration_id.clone().context("--integration is required")?,
        recipient: Recipient {
            conversation_id: args.conversation.clone().and_then(crate::job::ConversationId::parse),
            user_id: args.user.clone().and_then(crate::job::UserId::parse),
        },
        message: Some(Message {
            title: args.title.clone().unwrap_or_default(),
            text: args.text.clone().unwrap_or_default(),
            url,
            severity,
            facts,
        }),
        card: None,
        created_at: now,
        expires_at: args.expires_in.map(|s| now + chrono::Duration::seconds(s as i64)),
    };
    Job::try_from(wire).map_err(|err| anyhow::anyhow!("invalid job: {err}"))
}

async fn enqueue(settings: &Settings, args: EnqueueArgs) -> anyhow::Result<()> {
    let jobs: Vec<Job> = if args.stdin {
        let mut jobs = Vec::new();
        for (n, line) in std::io::stdin().lock().lines().enumerate() {
            let line = line.context("reading standard input")?;
            if line.trim().is_empty() {
                continue;
            }
            jobs.push(Job::decode(line.as_bytes()).map_err(|err| anyhow::anyhow!("line {}: invalid job: {err}", n + 1))?);
        }
        jobs
    } else if let Some(file) = &args.file {
        let mut body = Vec::new();
        std::fs::File::open(file).and_then(|mut f| f.read_to_end(&mut body)).with_context(|| format!("reading {}", file.display()))?;
        vec![Job::decode(&body).map_err(|err| anyhow::anyhow!("{}: invalid job: {err}", file.display()))?]
    } else {
        vec![job_from_flags(&args)?]
    };
    let producer = Producer::connect(settings.amqp_url.expose_secret(), &settings.topology_prefix).await?;
    let mut pace = args.rate.map(|r| tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(r.max(1)))));
    let total = jobs.len();
    let started = std::time::Instant::now();
    for (i, job) in jobs.iter().enumerate() {
        if let Some(pace) = pace.as_mut() {
            pace.tick().await;
        }
        let id = producer.publish(job).await.with_context(|| format!("publishing job {}", job.id))?;
        if total == 1 {
            println!("{id}");
        } else if (i + 1) % 1000 == 0 || i + 1 == total {
            eprintln!("enqueued {}/{total} ({:.0}/s)", i + 1, (i + 1) as f64 / started.elapsed().as_secs_f64().max(1e-3));
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct SeedFile {
    #[serde(default)]
    org_integrations: Vec<OrgIntegrationDoc>,
    #[serde(default)]
    conversations: Vec<ConversationDoc>,
}

async fn seed(settings: &Settings, file: &std::path::Path) -> anyhow::Result<()> {
    use mongodb::bson::{self, doc};
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let seed: SeedFile = serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let store = Store::connect(settings).await?;
    store.ensure_indexes().await?;
    for integration in &seed.org_integrations {
        let mut fields = bson::to_document(integration)?;
        fields.remove("_id");
        fields.insert("updated_at", bson::DateTime::now());
        store
            .org_integrations()
            .update_one(
                doc! { "organization_id": &integration.organization_id, "integration_id": &integration.integration_id },
                doc! { "$set": fields },
            )
            .upsert(true)
            .await?;
    }
    for conversation in &seed.conversations {
        let fields = bson::to_document(conversation)?;
        store
            .conversations()
            .update_one(
                doc! {
                    "organization_id": &conversation.organization_id, "integration_id": &conversation.integration_id,
                    "conversation_id": &conversation.conversation_id,
                },
                doc! { "$set": fields },
            )
            .upsert(true)
            .await?;
    }
    println!("seeded {} org_integration(s) and {} conversation(s)", seed.org_integrations.len(), seed.conversations.len());
    Ok(())
}

async fn doctor(settings: &Settings) -> anyhow::Result<ExitCode> {
    let mut ok = true;
    let mut check = |name: &str, result: Result<String, String>| match result {
        Ok(detail) => println!("ok    {name}: {detail}"),
        Err(detail) => {
            ok = false;
            println!("FAIL  {name}: {detail}");
        }
    };
    check("settings", Ok(format!("prefix {}, database {}", settings.topology_prefix, settings.mongodb_database)));
    let amqp = redact_url(&settings.amqp_url);
    match rabbitmq::connect(settings.amqp_url.expose_secret(), "herald doctor").await {
        Ok(connection) => {
            check("rabbitmq", Ok(format!("connected to {amqp}")));
            let topology = worker::run::topology(settings);
            for queue in topology.queues() {
                let channel = connection.create_channel().await?;
                let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
                let result = channel.queue_declare(queue.as_str().into(), passive, Default::default()).await;
                check(
                    &format!("queue {queue}"),
                    result
                        .map(|q| format!("{} message(s), {} consumer(s)", q.message_count(), q.consumer_count()))
                        .map_err(|_| "missing: run `herald setup`".into()),
                );
            }
        }
        Err(err) => check("rabbitmq", Err(format!("{amqp}: {}", worker::error_chain(&err)))),
    }
    let mongo = redact_url(&settings.mongodb_uri);
    match Store::connect(settings).await {
        Ok(store) => match store.ping().await {
            Ok(()) => check("mongodb", Ok(format!("{mongo} answers ping"))),
            Err(err) => check("mongodb", Err(format!("{mongo}: {}", worker::error_chain(&err)))),
        },
        Err(err) => check("mongodb", Err(format!("{mongo}: {}", worker::error_chain(&err)))),
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
