//! `herald dlq`: see, understand, replay, purge, export and import dead letters.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use secrecy::ExposeSecret;

use crate::dlq::{self, DeadLetter, Exported, Filter, Pass, Stats, Taken};
use crate::mongo::Store;
use crate::rabbitmq::{self, Publisher, ROUTING_KEY, Topology};
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
    /// Only this x-herald-reason (e.g. teams_forbidden, conversation_quarantined).
    #[arg(long)]
    reason: Option<String>,
    /// Only this Teams error code (e.g. BotNotInConversationRoster).
    #[arg(long)]
    teams_code: Option<String>,
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
            job_id: None,
            since: self.since,
            until: self.until,
            older_than: None,
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
    /// One dead letter: body, headers and the job's `deliveries` record.
    Show {
        job_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Send matching dead letters back to the work queue. The worker resolves
    /// the org_integration afresh, so a fixed configuration is used. Messages
    /// that do not match stay in the dead-letter queue.
    Replay {
        #[command(flatten)]
        filter: FilterArgs,
        /// Show what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many messages per second.
        #[arg(long)]
        rate: Option<u32>,
        /// At most this many messages.
        #[arg(long)]
        limit: Option<usize>,
        /// Replay jobs replayed more than `dlq.max_replays` times too.
        #[arg(long)]
        force: bool,
    },
    /// Remove matching dead letters for good (prints what it removed).
    Purge {
        #[command(flatten)]
        filter: FilterArgs,
        /// Only dead letters older than this (30m, 2h, 7d).
        #[arg(long, value_parser = parse_duration)]
        older_than: Option<Duration>,
        #[arg(long)]
        limit: Option<usize>,
        /// Really remove them (without it, purge only says what it would remove).
        #[arg(long)]
        yes: bool,
    },
    /// Write matching dead letters (body and headers) to a JSON-lines file; removes nothing.
    Export {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Publish the dead letters of an export file back into the dead-letter queue.
    Import { file: PathBuf },
}

/// `30s`, `15m`, `2h`, `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 30s, 15m, 2h or 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

fn parse_instant(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    let ago = parse_duration(text).map_err(|_| format!("{text:?} is neither an RFC 3339 time nor a duration like 2h"))?;
    Ok(Utc::now() - chrono::Duration::from_std(ago).map_err(|e| e.to_string())?)
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

struct Session {
    connection: std::sync::Arc<lapin::Connection>,
    topology: Topology,
    store: Store,
    signer: crate::rabbitmq::headers::Signer,
}

impl Session {
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
    let connection = std::sync::Arc::new(rabbitmq::connect(settings.amqp_url.expose_secret(), "herald dlq").await?);
    let store = Store::connect(settings).await?;
    let signer = crate::worker::signer(settings, &store).await?;
    let ctx = Session { connection, topology: Topology::from(settings), store, signer };
    let queue = ctx.topology.dead_queue();
    match command {
        DlqCommand::Stats { json } => {
            let mut stats = Stats::default();
            for letter in dlq::browse(&ctx.connection, &queue, &ctx.signer, usize::MAX).await? {
                stats.add(&letter);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print_stats(&queue, &stats);
            }
        }
        DlqCommand::List { filter, limit, json } => {
            let letters = dlq::list(&ctx.connection, &queue, &ctx.signer, &filter.filter(), limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else {
                print_table(&letters);
                println!("{} dead letter(s) listed from {queue}", letters.len());
            }
        }
        DlqCommand::Show { job_id, json } => {
            let filter = Filter { job_id: Some(job_id.clone()), ..Default::default() };
            let Some(letter) = dlq::list(&ctx.connection, &queue, &ctx.signer, &filter, 1).await?.pop() else {
                eprintln!("no dead letter with job id {job_id} in {queue}");
                return Ok(ExitCode::FAILURE);
            };
            let delivery = ctx.store.delivery(&job_id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "dead_letter": letter, "delivery": delivery }))?);
            } else {
                println!("job {job_id}\n\nheaders:");
                for (key, value) in &letter.headers {
                    println!("  {key}: {value}");
                }
                let body = serde_json::from_str::<serde_json::Value>(&letter.body)
                    .map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
                    .unwrap_or(letter.body.clone());
                println!("\nbody:\n{body}\n\ndelivery record:");
                match delivery {
                    Some(d) => println!("{}", serde_json::to_string_pretty(&d)?),
                    None => println!("  none (the job never got as far as the ledger: invalid, expired, or refused before sending)"),
                }
            }
        }
        DlqCommand::Replay { filter, dry_run, rate, limit, force } => {
            replay(&ctx, filter.filter(), dry_run, rate, limit, force, settings.dlq.max_replays).await?;
        }
        DlqCommand::Purge { filter, older_than, limit, yes } => {
            let filter = Filter { older_than, ..filter.filter() };
            purge(&ctx, filter, limit, yes).await?;
        }
        DlqCommand::Export { filter, out } => {
            let filter = filter.filter();
            let mut file = std::io::BufWriter::new(std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?);
            let bar = progress(ctx.dead_letters_now().await?, "exporting");
            let mut pass = Pass::open(&ctx.connection, &queue, &ctx.signer).await?;
            let mut written = 0;
            while let Some(taken) = pass.next().await? {
                bar.inc(1);
                if filter.matches(&taken.letter) {
                    serde_json::to_writer(&mut file, &Exported::from_taken(&taken))?;
                    file.write_all(b"\n")?;
                    written += 1;
                }
            }
            pass.close().await?;
            file.flush()?;
            bar.finish_and_clear();
            println!("exported {written} dead letter(s) to {} (nothing removed)", out.display());
        }
        DlqCommand::Import { file } => {
            let reader = std::io::BufReader::new(std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?);
            let mut messages = Vec::new();
            for (n, line) in reader.lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                let exported: Exported =
                    serde_json::from_str(&line).with_context(|| format!("{}:{}: not an export line", file.display(), n + 1))?;
                messages.push(exported.to_message().map_err(|e| anyhow::anyhow!("{}:{}: {e}", file.display(), n + 1))?);
            }
            let publisher = Publisher::open(ctx.connection.clone()).await?;
            let bar = progress(messages.len() as u64, "importing");
            for chunk in messages.chunks(256) {
                let mut pending = Vec::with_capacity(chunk.len());
                for (data, properties) in chunk {
                    pending.push(publisher.start(&ctx.topology.dead_exchange(), ROUTING_KEY, data, properties.clone()).await?);
                }
                for confirm in pending {
                    confirm.confirmed().await?;
                    bar.inc(1);
                }
            }
            bar.finish_and_clear();
            println!("imported {} dead letter(s) into {queue}", messages.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn replay(
    ctx: &Session,
    filter: Filter,
    dry_run: bool,
    rate: Option<u32>,
    limit: Option<usize>,
    force: bool,
    max_replays: u32,
) -> anyhow::Result<()> {
    if rate == Some(0) {
        bail!("--rate must be at least 1");
    }
    let publisher = Publisher::open(ctx.connection.clone()).await?;
    let bar = progress(ctx.dead_letters_now().await?, if dry_run { "checking" } else { "replaying" });
    // A batch is confirmed together; with a rate, a batch is one second's worth.
    let batch_size = rate.map_or(256, |r| (r as usize).clamp(1, 256));
    let mut pace = rate.map(|r| tokio::time::interval(Duration::from_secs_f64(batch_size as f64 / f64::from(r))));
    let mut pass = Pass::open(&ctx.connection, &ctx.topology.dead_queue(), &ctx.signer).await?;
    let (mut replayed, mut refused, mut kept) = (0usize, Vec::new(), 0usize);
    let mut batch: Vec<Taken> = Vec::with_capacity(batch_size);
    loop {
        let next = if limit.is_some_and(|l| replayed + batch.len() >= l) { None } else { pass.next().await? };
        let done = next.is_none();
        if let Some(taken) = next {
            bar.inc(1);
            if !filter.matches(&taken.letter) {
                kept += 1;
            } else if taken.letter.replays() >= max_replays && !force {
                refused.push(taken.letter.message_id.clone().unwrap_or_default());
            } else if dry_run {
                println!(
                    "would replay {} ({})",
                    taken.letter.message_id.as_deref().unwrap_or("-"),
                    taken.letter.reason.as_deref().unwrap_or("-")
                );
                replayed += 1;
            } else {
                batch.push(taken);
            }
        }
        if !batch.is_empty() && (batch.len() >= batch_size || done) {
            if let Some(pace) = pace.as_mut() {
                pace.tick().await;
            }
            dlq::replay(&publisher, &ctx.topology, &ctx.signer, &batch).await?;
            replayed += batch.len();
            batch.clear();
        }
        if done {
            break;
        }
    }
    pass.close().await?;
    bar.finish_and_clear();
    let verb = if dry_run { "would replay" } else { "replayed" };
    println!(
        "{verb} {replayed} dead letter(s) to {}; {kept} did not match and stay in {}",
        ctx.topology.work_queue(),
        ctx.topology.dead_queue()
    );
    if !refused.is_empty() {
        println!(
            "{} matching dead letter(s) were already replayed {max_replays} times (dlq.max_replays) and stay; --force replays them:",
            refused.len()
        );
        for id in refused.iter().take(20) {
            println!("  {id}");
        }
    }
    Ok(())
}

async fn purge(ctx: &Session, filter: Filter, limit: Option<usize>, yes: bool) -> anyhow::Result<()> {
    let bar = progress(ctx.dead_letters_now().await?, if yes { "purging" } else { "checking" });
    let mut pass = Pass::open(&ctx.connection, &ctx.topology.dead_queue(), &ctx.signer).await?;
    let mut removed = Vec::new();
    while limit.is_none_or(|l| removed.len() < l) {
        let Some(taken) = pass.next().await? else { break };
        bar.inc(1);
        if filter.matches(&taken.letter) {
            if yes {
                taken.remove().await?;
            }
            removed.push(taken.letter);
        }
    }
    pass.close().await?;
    bar.finish_and_clear();
    for letter in &removed {
        let verb = if yes { "removed" } else { "would remove" };
        println!(
            "{verb} {} ({}, {})",
            letter.message_id.as_deref().unwrap_or("-"),
            letter.reason.as_deref().unwrap_or("-"),
            letter.organization_id.as_deref().unwrap_or("-")
        );
    }
    if yes {
        println!("removed {} dead letter(s) from {}", removed.len(), ctx.topology.dead_queue());
    } else {
        println!("{} dead letter(s) match; nothing removed. Add --yes to remove them.", removed.len());
    }
    Ok(())
}

fn print_table(letters: &[DeadLetter]) {
    println!("{:<38} {:<30} {:<16} {:<28} DEAD-LETTERED AT", "JOB ID", "REASON", "ORGANIZATION", "TEAMS CODE");
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    for l in letters {
        let at = l.dead_lettered_at().map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)).unwrap_or_else(|| "-".into());
        println!("{:<38} {:<30} {:<16} {:<28} {at}", dash(&l.message_id), dash(&l.reason), dash(&l.organization_id), dash(&l.teams_code));
    }
}

fn print_stats(queue: &str, stats: &Stats) {
    println!("{queue}: {} dead letter(s)", stats.total);
    let at = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)).unwrap_or_else(|| "-".into());
    println!("oldest {}   newest {}", at(stats.oldest), at(stats.newest));
    for (title, counts) in
        [("by reason", &stats.by_reason), ("by organization", &stats.by_organization), ("by Teams code", &stats.by_teams_code)]
    {
        println!("\n{title}:");
        let mut rows: Vec<_> = counts.iter().collect();
        rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (key, n) in rows {
            println!("  {n:>8}  {key}");
        }
    }
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
}
