//! `herald dlq replay` and `purge`: the verbs that move or remove letters.
//! Both need a filter or `--all`, and a confirmation.

use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use super::{Selection, Session, confirmed, print_json, progress};
use crate::cli::EXIT_PARTIAL;
use crate::dlq::{Pass, Taken};
use crate::outcome::Reason;
use crate::rabbitmq::Publisher;

pub(super) struct ReplayOptions {
    pub dry_run: bool,
    pub rate: Option<u32>,
    pub limit: Option<usize>,
    pub force: bool,
    pub resend_unconfirmed: bool,
    pub json: bool,
}

/// What a replay did, for `--json` and the summary.
#[derive(Debug, Default, Serialize)]
struct Replayed {
    dry_run: bool,
    replayed: usize,
    /// Letters that did not match and stay.
    kept: usize,
    /// Matching letters replayed `dlq.max_replays` times already.
    refused: Vec<String>,
    /// Matching `delivery_unconfirmed` letters left for `--resend-unconfirmed`.
    unconfirmed: Vec<String>,
}

pub(super) async fn replay(session: &Session, selection: &Selection, options: ReplayOptions) -> anyhow::Result<ExitCode> {
    let filter = selection.checked(None, "replay")?;
    if !options.dry_run && !confirmed(selection.yes, "Replay the matching dead letters to the work queue?")? {
        eprintln!("nothing replayed");
        return Ok(ExitCode::SUCCESS);
    }
    let publisher = Publisher::open(session.connection.clone()).await?;
    let bar = progress(session.dead_letters_now().await?, if options.dry_run { "checking" } else { "replaying" });
    // A batch is confirmed together; with a rate, a batch is one second's worth.
    let batch_size = options.rate.map_or(256, |r| (r as usize).clamp(1, 256));
    let mut pace = options.rate.map(|r| tokio::time::interval(Duration::from_secs_f64(batch_size as f64 / f64::from(r))));
    let mut pass = Pass::open(&session.connection, &session.topology.dead_queue(), &session.signer).await?;
    let mut done = Replayed { dry_run: options.dry_run, ..Default::default() };
    let mut batch: Vec<Taken> = Vec::with_capacity(batch_size);
    loop {
        let full = options.limit.is_some_and(|l| done.replayed + batch.len() >= l);
        let next = if full { None } else { pass.next().await? };
        let finished = next.is_none();
        if let Some(taken) = next {
            bar.inc(1);
            let id = taken.letter.message_id.clone().unwrap_or_default();
            let unconfirmed = taken.letter.reason.as_deref() == Some(Reason::DeliveryUnconfirmed.as_str());
            if !filter.matches(&taken.letter) {
                done.kept += 1;
            } else if taken.letter.replays() >= session.max_replays && !options.force {
                done.refused.push(id);
            } else if unconfirmed
                && (!options.resend_unconfirmed || taken.letter.organization_id.is_none() || taken.letter.integration_id().is_none())
            {
                // Without its organization and integration the record to
                // reopen is not known exactly: left for the operator.
                done.unconfirmed.push(id);
            } else if options.dry_run {
                if !options.json {
                    println!("would replay {id} ({})", taken.letter.reason.as_deref().unwrap_or("-"));
                }
                done.replayed += 1;
            } else {
                if unconfirmed {
                    // The operator checked Teams: let the next delivery claim it.
                    let org = taken.letter.organization_id.clone().unwrap_or_default();
                    let integration = taken.letter.integration_id().unwrap_or_default();
                    session.store.allow_resend(&id, &org, &integration).await?;
                }
                batch.push(taken);
            }
        }
        if !batch.is_empty() && (batch.len() >= batch_size || finished) {
            if let Some(pace) = pace.as_mut() {
                pace.tick().await;
            }
            crate::dlq::replay(&publisher, &session.topology, &session.signer, &batch).await?;
            done.replayed += batch.len();
            batch.clear();
        }
        if finished {
            break;
        }
    }
    pass.close().await?;
    publisher.close().await;
    bar.finish_and_clear();
    if options.json {
        print_json(&done)?;
    } else {
        summarize(session, &done);
    }
    let partial = !options.dry_run && (!done.refused.is_empty() || !done.unconfirmed.is_empty());
    Ok(if partial { ExitCode::from(EXIT_PARTIAL) } else { ExitCode::SUCCESS })
}

fn summarize(session: &Session, done: &Replayed) {
    let verb = if done.dry_run { "would replay" } else { "replayed" };
    println!(
        "{verb} {} dead letter(s) to {}; {} did not match and stay in {}",
        done.replayed,
        session.topology.work_queue(),
        done.kept,
        session.topology.dead_queue()
    );
    let lists = [
        (&done.refused, format!("were already replayed {} times (dlq.max_replays) and stay; --force replays them", session.max_replays)),
        (
            &done.unconfirmed,
            "are delivery_unconfirmed and stay: check in Teams that they did not arrive, then --resend-unconfirmed".to_owned(),
        ),
    ];
    for (ids, what) in lists {
        if !ids.is_empty() {
            println!("{} matching dead letter(s) {what}:", ids.len());
            for id in ids.iter().take(20) {
                println!("  {id}");
            }
        }
    }
}

/// What a purge removed (or would remove).
#[derive(Debug, Serialize)]
struct Purged {
    removed: bool,
    letters: Vec<crate::dlq::DeadLetter>,
}

pub(super) async fn purge(
    session: &Session,
    selection: &Selection,
    older_than: Option<Duration>,
    limit: Option<usize>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let filter = selection.checked(older_than, "purge")?;
    // Without --yes (or a yes on the terminal), purge says what it would remove.
    let yes = selection.yes;
    let bar = progress(session.dead_letters_now().await?, if yes { "purging" } else { "checking" });
    let mut pass = Pass::open(&session.connection, &session.topology.dead_queue(), &session.signer).await?;
    let mut letters = Vec::new();
    while limit.is_none_or(|l| letters.len() < l) {
        let Some(taken) = pass.next().await? else { break };
        bar.inc(1);
        if filter.matches(&taken.letter) {
            if yes {
                taken.remove().await?;
            }
            letters.push(taken.letter);
        }
    }
    pass.close().await?;
    bar.finish_and_clear();
    if json {
        print_json(&Purged { removed: yes, letters })?;
        return Ok(ExitCode::SUCCESS);
    }
    for letter in &letters {
        let verb = if yes { "removed" } else { "would remove" };
        println!(
            "{verb} {} ({}, {})",
            letter.message_id.as_deref().unwrap_or("-"),
            letter.reason.as_deref().unwrap_or("-"),
            letter.organization_id.as_deref().unwrap_or("-")
        );
    }
    if yes {
        println!("removed {} dead letter(s) from {}", letters.len(), session.topology.dead_queue());
    } else {
        println!("{} dead letter(s) match; nothing removed. Add --yes to remove them.", letters.len());
    }
    Ok(ExitCode::SUCCESS)
}
