//! The least a worker does per job with herald's stack (lapin, reqwest,
//! tokio), for the bench's side-by-side: consume, post a card to the job's
//! conversation, ack. The org_integrations are read once at start and a
//! token is fetched once per bot app, so no job costs a MongoDB statement or
//! a token request; nothing is checked, recorded or retried. Its CPU per job
//! is the floor under any worker built on these crates on this machine.
//!
//! `floor <amqp url> <work queue> <mongodb uri> <database> <token endpoint> [jobs per second]`
//!
//! With a rate, jobs start no faster than it: the floor at herald's own
//! pace, where fewer jobs share each wake-up of the threads.

#[path = "support/token.rs"]
mod token;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use futures_util::{StreamExt, TryStreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use mongodb::bson::Document;
use serde::Deserialize;
use tokio::sync::Semaphore;

/// What a job needs to be posted: its integration's service URL and token.
struct Target {
    service_url: String,
    bearer: String,
}

#[derive(Deserialize)]
struct Job<'a> {
    #[serde(borrow)]
    organization_id: &'a str,
    #[serde(borrow)]
    integration_id: &'a str,
    recipient: Recipient,
}

#[derive(Deserialize)]
struct Recipient {
    conversation_id: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (amqp, queue, mongo, database, token_endpoint, rate) = match args.as_slice() {
        [_, a, q, m, d, t] => (a, q, m, d, t, None),
        [_, a, q, m, d, t, r] => (a, q, m, d, t, Some(r.parse::<f64>().context("jobs per second")?)),
        _ => anyhow::bail!("usage: floor <amqp url> <work queue> <mongodb uri> <database> <token endpoint> [jobs per second]"),
    };
    let http = reqwest::Client::new();
    let targets = Arc::new(targets(&http, mongo, database, token_endpoint).await?);
    let connection = lapin::Connection::connect(amqp, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.basic_qos(128, BasicQosOptions::default()).await?;
    let mut consumer =
        channel.basic_consume(queue.as_str().into(), "floor".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    let card = Arc::new(
        serde_json::to_vec(&serde_json::json!({
            "type": "message",
            "attachments": [{ "contentType": "application/vnd.microsoft.card.adaptive", "content": {
                "type": "AdaptiveCard", "version": "1.5", "body": [{ "type": "TextBlock", "text": "floor" }],
            } }],
        }))
        .expect("JSON"),
    );
    let slots = Arc::new(Semaphore::new(64));
    let start = tokio::time::Instant::now();
    let mut taken = 0_u32;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        if let Some(rate) = rate {
            tokio::time::sleep_until(start + std::time::Duration::from_secs_f64(f64::from(taken) / rate)).await;
            taken += 1;
        }
        let permit = slots.clone().acquire_owned().await?;
        let (http, targets, card) = (http.clone(), targets.clone(), card.clone());
        tokio::spawn(async move {
            if let Err(err) = post(&delivery.data, &http, &targets, &card).await {
                eprintln!("floor: {err:#}");
            }
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            drop(permit);
        });
    }
    Ok(())
}

async fn targets(http: &reqwest::Client, mongo: &str, database: &str, endpoint: &str) -> anyhow::Result<HashMap<(String, String), Target>> {
    let db = mongodb::Client::with_uri_str(mongo).await?.database(database);
    let docs: Vec<Document> = db.collection::<Document>("org_integrations").find(Document::new()).await?.try_collect().await?;
    let mut tokens: HashMap<String, String> = HashMap::new();
    let mut targets = HashMap::new();
    for doc in docs {
        let bot = doc.get_document("bot")?;
        let app = bot.get_str("app_id")?.to_owned();
        if !tokens.contains_key(&app) {
            tokens.insert(app.clone(), token::fetch(http, endpoint, &app, bot.get_str("app_secret")?).await?);
        }
        let key = (doc.get_str("organization_id")?.to_owned(), doc.get_str("integration_id")?.to_owned());
        targets.insert(key, Target { service_url: doc.get_str("service_url")?.to_owned(), bearer: format!("Bearer {}", tokens[&app]) });
    }
    Ok(targets)
}

async fn post(body: &[u8], http: &reqwest::Client, targets: &HashMap<(String, String), Target>, card: &Arc<Vec<u8>>) -> anyhow::Result<()> {
    let job: Job<'_> = serde_json::from_slice(body)?;
    let target = targets.get(&(job.organization_id.to_owned(), job.integration_id.to_owned())).context("no org_integration")?;
    let url = format!("{}v3/conversations/{}/activities", target.service_url, job.recipient.conversation_id);
    http.post(url)
        .header("authorization", &target.bearer)
        .header("content-type", "application/json")
        .body(card.as_ref().clone())
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}
