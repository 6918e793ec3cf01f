//! `herald seed` and `herald doctor`.

use std::process::ExitCode;

use anyhow::Context;
use secrecy::ExposeSecret;
use serde::Deserialize;

use crate::mongo::{ConversationDoc, OrgIntegrationDoc, Store};
use crate::rabbitmq;
use crate::settings::{Settings, redact_url};

#[derive(Deserialize)]
struct SeedFile {
    #[serde(default)]
    org_integrations: Vec<OrgIntegrationDoc>,
    #[serde(default)]
    conversations: Vec<ConversationDoc>,
}

pub async fn seed(settings: &Settings, file: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let seed: SeedFile = serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let store = Store::connect(settings).await?;
    store.ensure_indexes().await?;
    store.seed(&seed.org_integrations, &seed.conversations, false).await?;
    println!("seeded {} org_integration(s) and {} conversation(s)", seed.org_integrations.len(), seed.conversations.len());
    store.shutdown().await;
    Ok(())
}

pub async fn doctor(settings: &Settings) -> anyhow::Result<ExitCode> {
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
        Ok(store) => match store.ping().await {
            Ok(()) => check("mongodb", Ok(format!("{mongo} answers ping"))),
            Err(err) => check("mongodb", Err(format!("{mongo}: {}", crate::text::error_chain(&err)))),
        },
        Err(err) => check("mongodb", Err(format!("{mongo}: {}", crate::text::error_chain(&err)))),
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
