//! `herald dlq export` and `import`.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{Session, print_json, progress};
use crate::dlq::{Exported, Filter, Pass};
use crate::rabbitmq::{Publisher, ROUTING_KEY};

pub(super) async fn export(session: &Session, filter: &Filter, out: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let queue = session.topology.dead_queue();
    let mut file = std::io::BufWriter::new(std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?);
    let bar = progress(session.dead_letters_now().await?, "exporting");
    let mut pass = Pass::open(&session.connection, &queue, &session.signer).await?;
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
    if json {
        print_json(&serde_json::json!({ "exported": written, "file": out }))?;
    } else {
        println!("exported {written} dead letter(s) to {} (nothing removed)", out.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
struct Imported {
    imported: usize,
    /// Letters of the file already in the queue (an earlier run's).
    already_there: usize,
}

/// Check every line, skip what the queue already holds, publish the rest in
/// confirmed batches. On a failure, say how far it got.
pub(super) async fn import(session: &Session, file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let reader = std::io::BufReader::new(std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?);
    let mut messages = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: cannot be read (not UTF-8?)", file.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let message = Exported::parse(&line).and_then(|e| e.to_message()).with_context(|| format!("{}:{}", file.display(), n + 1))?;
        messages.push(message);
    }
    let queue = session.topology.dead_queue();
    let present: HashSet<(Option<String>, [u8; 32])> = crate::dlq::fingerprints(&session.connection, &queue, &session.signer).await?;
    let total = messages.len();
    messages.retain(|(data, properties)| {
        let id = properties.message_id().as_ref().map(|m| m.to_string());
        !present.contains(&(id, Sha256::digest(data).into()))
    });
    let already_there = total - messages.len();
    let publisher = Publisher::open(session.connection.clone()).await?;
    let bar = progress(messages.len() as u64, "importing");
    let mut imported = 0;
    for chunk in messages.chunks(256) {
        let published: anyhow::Result<()> = async {
            let mut pending = Vec::with_capacity(chunk.len());
            for (data, properties) in chunk {
                pending.push(publisher.start(&session.topology.dead_exchange(), ROUTING_KEY, data, properties.clone()).await?);
            }
            for confirm in pending {
                confirm.confirmed().await?;
                bar.inc(1);
            }
            Ok(())
        }
        .await;
        if let Err(err) = published {
            bar.finish_and_clear();
            return Err(err.context(format!(
                "imported {imported} of {} new dead letter(s) before the failure; run the import again to add the rest (it skips what is there)",
                messages.len()
            )));
        }
        imported += chunk.len();
    }
    publisher.close().await;
    bar.finish_and_clear();
    if json {
        print_json(&Imported { imported, already_there })?;
    } else {
        println!("imported {imported} dead letter(s) into {queue}; {already_there} already there");
    }
    Ok(ExitCode::SUCCESS)
}
