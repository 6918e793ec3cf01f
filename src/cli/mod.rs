//! The `herald` command line.

mod conversations;
mod deliveries;
mod dlq;
mod enqueue;
mod ops;
mod tenants;
mod tls_probe;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;
use crate::{telemetry, worker};

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
    /// The Bot Framework messaging endpoint (POST /api/messages on
    /// gateway.listen): Teams' signed activities keep the conversation
    /// registry current (docs/gateway.md).
    Gateway,
    /// Declare the RabbitMQ topology and the MongoDB indexes; safe to repeat.
    /// RabbitMQ fixes a queue's arguments when it is first declared: a queue
    /// declared by an earlier version or other settings (the delivery limit,
    /// say) is reported and used as it is until --migrate rebuilds it.
    Setup {
        /// Rebuild each queue whose arguments differ, keeping its messages in
        /// order; producers may go on publishing. Stop the workers first: a
        /// queue with consumers is refused. Safe to re-run after an
        /// interruption (it finishes the rebuild).
        #[arg(long)]
        migrate: bool,
    },
    /// Publish jobs with publisher confirms: one from flags, one from --file,
    /// or many from --stdin as JSON lines. Every job is validated first.
    Enqueue(Box<EnqueueArgs>),
    /// See, understand, replay, purge, export and import dead letters.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Onboard an organization's use of a Teams integration, rotate its bot
    /// secret, switch it off and on, remove it, and check that it works.
    #[command(subcommand)]
    OrgIntegrations(tenants::OrgIntegrationsCommand),
    /// Register, list, quarantine, release and remove conversations of org_integrations.
    #[command(subcommand)]
    Conversations(conversations::ConversationsCommand),
    /// Load org_integrations and conversations from a JSON file (see
    /// deploy/demo/seed.json). Each org_integration in the file replaces the
    /// stored one's fields (a secret source or cloud it leaves out is
    /// removed); conversations keep their quarantine unless
    /// --release-quarantined. Every record is checked first; nothing is
    /// written if one fails. Safe to repeat.
    Seed {
        /// {"org_integrations": [...], "conversations": [...]}
        #[arg(long)]
        file: PathBuf,
        /// Check the file; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Set every conversation in the file active, lifting quarantines.
        #[arg(long)]
        release_quarantined: bool,
        #[arg(long)]
        json: bool,
    },
    /// What happened to a job: its ledger record(s) and last attempts.
    #[command(subcommand)]
    Deliveries(deliveries::DeliveriesCommand),
    /// Check the settings, the connections to RabbitMQ and MongoDB, the
    /// topology and the indexes (exit 1 when a check fails).
    Doctor {
        /// The RabbitMQ management API with credentials (e.g.
        /// http://user:password@rabbitmq:15672/ for the default vhost), to check
        /// the dead-letter queue's policy (needed on RabbitMQ 4.x).
        #[arg(long)]
        management_url: Option<String>,
        #[arg(long)]
        json: bool,
    },
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

/// A progress bar for a long operation on `len` items (drawn only on a terminal).
fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// A command line that asks for something herald will not do as given (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// Some of what a command was asked to do was refused or skipped.
pub const EXIT_PARTIAL: u8 = 3;

/// The exit code for a failed command: 2 for a usage error, else 1.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    if err.downcast_ref::<Usage>().is_some() { ExitCode::from(2) } else { ExitCode::FAILURE }
}

/// What the process needs before its async runtime starts.
pub struct RuntimePlan {
    /// `worker.threads` (1 when the settings do not load: the command then
    /// reports why).
    pub threads: usize,
    /// A worker whose settings ask for `SCHED_BATCH` (`worker.batch_scheduling`).
    pub batch_scheduling: bool,
}

/// The plan from the settings `cli` names.
pub fn runtime_plan(cli: &Cli) -> RuntimePlan {
    match Settings::load(cli.config.as_deref()) {
        Ok(settings) => RuntimePlan {
            threads: settings.worker.threads,
            batch_scheduling: matches!(cli.command, Command::Worker) && settings.worker.batch_scheduling,
        },
        Err(_) => RuntimePlan { threads: 1, batch_scheduling: false },
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(cli.config.as_deref())?;
    let _telemetry = telemetry::init(&settings);
    match cli.command {
        Command::Worker => {
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
            worker::run(settings, shutdown).await?;
        }
        Command::Gateway => {
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
            crate::gateway::run(&settings, shutdown).await?;
        }
        Command::Setup { migrate } => return ops::setup(settings, migrate).await,
        Command::Enqueue(args) => enqueue::enqueue(&settings, *args).await?,
        Command::Dlq(command) => return dlq::run(&settings, command).await,
        Command::OrgIntegrations(command) => tenants::run(&settings, command).await?,
        Command::Conversations(command) => conversations::run(&settings, command).await?,
        Command::Seed { file, dry_run, release_quarantined, json } => {
            ops::seed(&settings, &file, dry_run, release_quarantined, json).await?
        }
        Command::Deliveries(command) => return deliveries::run(&settings, command).await,
        Command::Doctor { json, management_url } => return ops::doctor(&settings, json, management_url.as_deref()).await,
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
