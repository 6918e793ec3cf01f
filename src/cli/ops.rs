//! `herald seed` and `herald doctor`.

use std::process::ExitCode;

use anyhow::Context;
use secrecy::ExposeSecret;
use serde::Deserialize;

use crate::mongo::{ConversationDoc, OrgIntegrationDoc, Store};
use crate::rabbitmq;
use crate::settings::{Settings, redact_url};

/// The file `herald seed` reads (docs/operations.md, "Onboard an
/// organization"; an example is deploy/demo/seed.json).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedFile {
    #[serde(default)]
    org_integrations: Vec<OrgIntegrationDoc>,
    #[serde(default)]
    conversations: Vec<ConversationDoc>,
}

/// Load org_integrations and conversations: every record is checked with
/// the worker's own checks first, and nothing is written if one fails.
pub async fn seed(settings: &Settings, file: &std::path::Path, dry_run: bool, release_quarantined: bool, json: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let seed: SeedFile = serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let teams = crate::teams::Teams::new(&settings.teams)?;
    let mut problems = Vec::new();
    for (i, record) in seed.org_integrations.iter().enumerate() {
        if let Err(problem) = crate::worker::resolve::check_record(record, &teams) {
            problems.push(format!("org_integrations[{i}]: {problem}"));
        }
    }
    for (i, conversation) in seed.conversations.iter().enumerate() {
        let known = seed
            .org_integrations
            .iter()
            .any(|o| o.organization_id == conversation.organization_id && o.integration_id == conversation.integration_id);
        if conversation.conversation_id.trim().is_empty() {
            problems.push(format!("conversations[{i}]: blank conversation_id"));
        }
        if !known {
            println!(
                "note: conversations[{i}] belongs to {}/{}, which this file does not define (it must exist already)",
                conversation.organization_id, conversation.integration_id
            );
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("{} refused, nothing written:\n  {}", file.display(), problems.join("\n  "));
    }
    let (orgs, conversations) = (seed.org_integrations.len(), seed.conversations.len());
    if dry_run {
        match json {
            true => println!(
                "{}",
                serde_json::json!({ "valid": true, "org_integrations": orgs, "conversations": conversations, "written": false })
            ),
            false => println!(
                "{} is valid: would write {orgs} org_integration(s) and {conversations} conversation(s); nothing written",
                file.display()
            ),
        }
        return Ok(());
    }
    let store = Store::connect(settings).await?;
    store.ensure_indexes().await?;
    let report = store.seed(&seed.org_integrations, &seed.conversations, release_quarantined).await?;
    store.shutdown().await;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "seeded {orgs} org_integration(s) ({} new, {} replaced) and {conversations} conversation(s) ({} new, {} updated{})",
        report.org_integrations_created,
        report.org_integrations_updated,
        report.conversations_created,
        report.conversations_updated,
        if release_quarantined { ", quarantines lifted" } else { ", quarantines kept" }
    );
    Ok(())
}

pub async fn doctor(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let mut checks: Vec<serde_json::Value> = Vec::new();
    let mut check = |name: &str, result: Result<String, String>| {
        let (ok, detail) = match result {
            Ok(detail) => (true, detail),
            Err(detail) => (false, detail),
        };
        if !json {
            println!("{}  {name}: {detail}", if ok { "ok  " } else { "FAIL" });
        }
        checks.push(serde_json::json!({ "check": name, "ok": ok, "detail": detail }));
    };
    check("settings", Ok(format!("prefix {}, database {}", settings.topology_prefix, settings.mongodb_database)));
    let amqp = redact_url(&settings.amqp_url);
    match rabbitmq::connect(settings.amqp_url.expose_secret(), "herald doctor").await {
        Ok(connection) => {
            check("rabbitmq", Ok(format!("connected to {amqp}")));
            let topology = crate::rabbitmq::Topology::from(settings);
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
        Err(err) => check("rabbitmq", Err(format!("{amqp}: {}", crate::text::error_chain(&err)))),
    }
    let mongo = redact_url(&settings.mongodb_uri);
    match Store::connect(settings).await {
        Ok(store) => {
            match store.ping().await {
                Ok(()) => {
                    check("mongodb", Ok(format!("{mongo} answers ping")));
                    let indexes = match store.missing_indexes().await {
                        Ok(missing) if missing.is_empty() => Ok("every index herald uses exists (retention included)".to_owned()),
                        Ok(missing) => Err(format!("missing {}: run `herald setup`", missing.join(", "))),
                        Err(err) => Err(crate::text::error_chain(&err)),
                    };
                    check("indexes", indexes);
                }
                Err(err) => check("mongodb", Err(format!("{mongo}: {}", crate::text::error_chain(&err)))),
            }
            store.shutdown().await;
        }
        Err(err) => check("mongodb", Err(format!("{mongo}: {}", crate::text::error_chain(&err)))),
    }
    let ok = checks.iter().all(|c| c["ok"] == true);
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        println!(
            "note  on RabbitMQ 4.x, lift the quorum queues' default delivery limit on the dead-letter queue (docs/operations.md, \
             \"RabbitMQ 4 and the dead-letter queue\"); it cannot be read over AMQP: check `rabbitmqctl list_policies`"
        );
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
