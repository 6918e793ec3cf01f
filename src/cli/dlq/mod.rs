//! `herald dlq`: see, understand, replay, purge, export and import dead
//! letters. One function per verb: `read` (stats, list, show), `change`
//! (replay, purge), `files` (export, import).
//!
//! Exit codes (docs/operations.md): 0 done, 1 error, 2 usage (a bad flag, a
//! replay or purge without a filter or `--all`, no confirmation), 3 partial
//! (some matching letters were refused or skipped).

mod change;
mod files;
mod read;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};

use super::{Usage, progress};
use crate::dlq::Filter;
use crate::mongo::Store;
use crate::outcome::Reason;
use crate::rabbitmq::headers::Signer;
use crate::rabbitmq::{self, Topology};
use crate::settings::Settings;

#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
    /// Only dead letters of this organization.
    #[arg(long)]
    org: Option<String>,
    /// Only jobs of this integration.
    #[arg(long)]
    integration: Option<String>,
    /// Only jobs addressed to this conversation.
    #[arg(long)]
    conversation: Option<String>,
    /// Only this x-herald-reason (one of docs/tenancy.md's reasons, e.g.
    /// teams_forbidden, conversation_quarantined, delivery_unconfirmed).
    #[arg(long, value_parser = parse_reason)]
    reason: Option<String>,
    /// Only this Teams error code (e.g. BotNotInConversationRoster).
    #[arg(long)]
    teams_code: Option<String>,
    /// Only the dead letter of this job id.
    #[arg(long)]
    job_id: Option<String>,
    /// Dead-lettered at or after this time (RFC 3339) or this long ago (30m, 2h, 7d).
    #[arg(long, value_parser = parse_instant)]
    since: Option<DateTime<Utc>>,
    /// Dead-lettered at or before this time (RFC 3339) or this long ago.
    #[arg(long, value_parser = parse_instant)]
    until: Option<DateTime<Utc>>,
}

impl FilterArgs {
    fn filter(&self) -> Filter {
        Filter {
            organization_id: self.org.clone(),
            integration_id: self.integration.clone(),
            conversation_id: self.conversation.clone(),
            reason: self.reason.clone(),
            teams_code: self.teams_code.clone(),
            job_id: self.job_id.clone(),
            since: self.since,
            until: self.until,
            older_than: None,
        }
    }
}

/// Which dead letters a replay or purge may touch: a filter, or `--all`.
#[derive(Debug, Clone, Args)]
pub struct Selection {
    #[command(flatten)]
    filter: FilterArgs,
    /// Every dead letter (instead of a filter).
    #[arg(long)]
    all: bool,
    /// Confirm: without it, an interactive terminal is asked, and a script
    /// is refused (exit 2).
    #[arg(long, short = 'y')]
    yes: bool,
}

impl Selection {
    /// The filter, once the selection is explicit.
    fn checked(&self, older_than: Option<Duration>, verb: &str) -> Result<Filter, Usage> {
        let filter = Filter { older_than, ..self.filter.filter() };
        let narrowed = filter.organization_id.is_some()
            || filter.integration_id.is_some()
            || filter.conversation_id.is_some()
            || filter.reason.is_some()
            || filter.teams_code.is_some()
            || filter.job_id.is_some()
            || filter.since.is_some()
            || filter.until.is_some()
            || filter.older_than.is_some();
        match (narrowed, self.all) {
            (false, false) => Err(Usage(format!(
                "{verb} needs a filter (--org, --integration, --conversation, --reason, --teams-code, --job-id, --since, --until) or --all"
            ))),
            (true, true) => Err(Usage(format!("{verb}: give a filter or --all, not both"))),
            _ => Ok(filter),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Counts by reason, organization and Teams code; oldest and newest.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// List dead letters. Removes nothing, duplicates nothing.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// One job: its dead letter (body and headers) and its `deliveries`
    /// record. A job no longer in the queue (replayed, delivered) is shown
    /// from the ledger alone.
    Show {
        job_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Send matching dead letters back to the work queue. The worker resolves
    /// the org_integration afresh, so a fixed configuration is used. Letters
    /// that do not match stay. Needs a filter or --all, and --yes.
    Replay {
        #[command(flatten)]
        selection: Selection,
        /// Show what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many messages per second.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        rate: Option<u32>,
        /// At most this many messages.
        #[arg(long)]
        limit: Option<usize>,
        /// Replay jobs replayed more than `dlq.max_replays` times too.
        #[arg(long)]
        force: bool,
        /// Also replay `delivery_unconfirmed` letters: their ledger record is
        /// reset so that they are sent again. Only after checking in Teams
        /// that the alert did not arrive (docs/operations.md).
        #[arg(long)]
        resend_unconfirmed: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove matching dead letters for good. Needs a filter or --all;
    /// without --yes it only says what it would remove.
    Purge {
        #[command(flatten)]
        selection: Selection,
        /// Only dead letters older than this (30m, 2h, 7d).
        #[arg(long, value_parser = parse_duration)]
        older_than: Option<Duration>,
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Write matching dead letters (body and every header, x-death included)
    /// to a JSON-lines file; removes nothing.
    Export {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Publish the dead letters of an export file back into the dead-letter
    /// queue. Every line is checked first; letters already in the queue are
    /// skipped, so a re-run after a failure adds only what is missing.
    Import {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// A `--reason` must be one of herald's reasons.
fn parse_reason(text: &str) -> Result<String, String> {
    match Reason::parse(text) {
        Some(reason) => Ok(reason.as_str().to_owned()),
        None => {
            let known: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
            Err(format!("{text:?} is not a reason herald writes; one of: {}", known.join(", ")))
        }
    }
}

/// `30s`, `15m`, `2h`, `7d` (at most about 100 years).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 30s, 15m, 2h or 7d"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    let secs = n.checked_mul(scale).filter(|s| *s <= 100 * 365 * 86400).ok_or_else(|| format!("{text:?} is too long"))?;
    Ok(Duration::from_secs(secs))
}

pub(super) fn parse_instant(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let looks_like_a_duration = text.trim().starts_with(|c: char| c.is_ascii_digit()) && !text.contains(['-', ':']);
    let ago = parse_duration(text).map_err(|why| match looks_like_a_duration {
        true => why,
        false => format!("{text:?} is neither an RFC 3339 time nor a duration like 2h"),
    })?;
    chrono::Duration::from_std(ago)
        .ok()
        .and_then(|ago| Utc::now().checked_sub_signed(ago))
        .ok_or_else(|| format!("{text:?} is too long ago"))
}

/// Ask on a terminal; a script must say `--yes`.
fn confirmed(yes: bool, question: &str) -> Result<bool, Usage> {
    use std::io::{BufRead, IsTerminal, Write};
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        return Err(Usage(format!("{question} Add --yes to confirm (or --dry-run to look first).")));
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

/// Print `value` as JSON.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// What every verb works with.
struct Session {
    connection: Arc<lapin::Connection>,
    topology: Topology,
    store: Store,
    signer: Signer,
    max_replays: u32,
}

impl Session {
    async fn open(settings: &Settings) -> anyhow::Result<Self> {
        let connection = Arc::new(rabbitmq::Broker::new(settings).connect("herald dlq").await?);
        let store = Store::connect(settings).await?;
        let signer = crate::worker::tool_signer(settings, &store).await?;
        Ok(Self { connection, topology: Topology::from(settings), store, signer, max_replays: settings.dlq.max_replays })
    }

    async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
        self.store.shutdown().await;
    }

    /// Messages in the dead-letter queue right now (for progress bars).
    async fn dead_letters_now(&self) -> anyhow::Result<u64> {
        let channel = self.connection.create_channel().await?;
        let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let queue = channel
            .queue_declare(self.topology.dead_queue().as_str().into(), passive, Default::default())
            .await
            .context("the dead-letter queue is missing: run `herald setup`")?;
        let _ = channel.close(200, "".into()).await;
        Ok(u64::from(queue.message_count()))
    }
}

pub async fn run(settings: &Settings, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let session = Session::open(settings).await?;
    let result = match command {
        DlqCommand::Stats { json } => read::stats(&session, json).await,
        DlqCommand::List { filter, limit, json } => read::list(&session, &filter.filter(), limit, json).await,
        DlqCommand::Show { job_id, json } => read::show(&session, &job_id, json).await,
        DlqCommand::Replay { selection, dry_run, rate, limit, force, resend_unconfirmed, json } => {
            let options = change::ReplayOptions { dry_run, rate, limit, force, resend_unconfirmed, json };
            change::replay(&session, &selection, options).await
        }
        DlqCommand::Purge { selection, older_than, limit, json } => change::purge(&session, &selection, older_than, limit, json).await,
        DlqCommand::Export { filter, out, json } => files::export(&session, &filter.filter(), &out, json).await,
        DlqCommand::Import { file, json } => files::import(&session, &file, json).await,
    };
    session.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_instants() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_instant("2026-11-22T10:00:00Z").is_ok());
        assert!(parse_instant("30m").unwrap() < Utc::now());
        assert!(parse_instant("yesterday").is_err());
    }

    #[test]
    fn absurd_durations_are_refused_not_overflowed() {
        assert!(parse_duration("18446744073709551615d").unwrap_err().contains("too long"));
        assert!(parse_duration("99999999999999999999999s").is_err());
        assert!(parse_instant("1000000000d").is_err());
        assert!(parse_instant("36500d").is_ok());
    }

    #[test]
    fn reasons_are_checked() {
        assert_eq!(parse_reason("teams_forbidden").as_deref(), Ok("teams_forbidden"));
        let err = parse_reason("teams_forbiden").unwrap_err();
        assert!(err.contains("not a reason") && err.contains("teams_forbidden"), "{err}");
    }
}
