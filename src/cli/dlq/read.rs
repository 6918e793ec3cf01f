//! `herald dlq stats`, `list` and `show`: read, change nothing.

use std::process::ExitCode;

use chrono::{DateTime, Utc};

use super::{Session, print_json, progress};
use crate::dlq::{DeadLetter, Filter, Pass, Stats};

pub(super) async fn stats(session: &Session, json: bool) -> anyhow::Result<ExitCode> {
    let queue = session.topology.dead_queue();
    let bar = progress(session.dead_letters_now().await?, "counting");
    let mut stats = Stats::default();
    let mut pass = Pass::open(&session.connection, &queue, &session.signer).await?;
    while let Some(taken) = pass.next().await? {
        bar.inc(1);
        stats.add(&taken.letter);
    }
    pass.close().await?;
    bar.finish_and_clear();
    if json {
        print_json(&stats)?;
    } else {
        print_stats(&queue, &stats);
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn list(session: &Session, filter: &Filter, limit: usize, json: bool) -> anyhow::Result<ExitCode> {
    let queue = session.topology.dead_queue();
    let letters = crate::dlq::list(&session.connection, &queue, &session.signer, filter, limit).await?;
    if json {
        print_json(&letters)?;
    } else {
        print_table(&letters);
        println!("{} dead letter(s) listed from {queue}", letters.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// The dead letter of `job_id` if it is in the queue, and its ledger records
/// either way: what happened to one job.
pub(super) async fn show(session: &Session, job_id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let queue = session.topology.dead_queue();
    let filter = Filter { job_id: Some(job_id.to_owned()), ..Default::default() };
    let letter = crate::dlq::list(&session.connection, &queue, &session.signer, &filter, 1).await?.pop();
    let deliveries = session.store.deliveries_of(job_id).await?;
    if letter.is_none() && deliveries.is_empty() {
        eprintln!("no dead letter with job id {job_id} in {queue}, and no ledger record of it");
        return Ok(ExitCode::FAILURE);
    }
    if json {
        print_json(&serde_json::json!({ "dead_letter": letter, "delivery": deliveries.first(), "deliveries": deliveries }))?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("job {job_id}");
    match &letter {
        Some(letter) => {
            println!("\ndead letter in {queue}:");
            if letter.unverified_headers {
                println!("  (x-herald-* headers that herald did not write were ignored)");
            }
            for (key, value) in &letter.headers {
                println!("  {key}: {value}");
            }
            let body = serde_json::from_str::<serde_json::Value>(&letter.body)
                .map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
                .unwrap_or(letter.body.clone());
            println!("\nbody:\n{body}");
        }
        None => println!("\nnot in {queue} (never dead-lettered, or replayed since)"),
    }
    println!("\ndelivery record(s):");
    if deliveries.is_empty() {
        println!("  none (the job never got as far as the ledger: invalid, expired, or refused before sending)");
    }
    for delivery in &deliveries {
        println!("{}", serde_json::to_string_pretty(delivery)?);
    }
    Ok(ExitCode::SUCCESS)
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
    if stats.unverified_headers > 0 {
        println!(
            "{} with x-herald-* headers that no key of this tool verifies (forged, or signed with a key it does not hold)",
            stats.unverified_headers
        );
    }
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
