//! The worker a team would write instead of herald, for the bench's
//! side-by-side (`make bench` runs it on the same services and world): one
//! process that consumes the work queue, looks the org_integration up in
//! MongoDB, takes a token (cached per bot app), posts the card and acks. No
//! ledger, no dead letters, no retries, no checks of the recipient, no
//! bounds: what herald must beat on cost, and what it adds on correctness.
//!
//! `naive <amqp url> <work queue> <mongodb uri> <database> <token endpoint>`

#[path = "support/token.rs"]
mod token;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, amqp, queue, mongo, database, token_endpoint] = args.as_slice() else {
        anyhow::bail!("usage: naive <amqp url> <work queue> <mongodb uri> <database> <token endpoint>");
    };
    let connection = lapin::Connection::connect(amqp, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.basic_qos(128, BasicQosOptions::default()).await?;
    let mut consumer =
        channel.basic_consume(queue.as_str().into(), "naive".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    let db = mongodb::Client::with_uri_str(mongo).await?.database(database);
    let integrations = db.collection::<Document>("org_integrations");
    let http = reqwest::Client::new();
    let tokens: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let slots = Arc::new(Semaphore::new(64));
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let permit = slots.clone().acquire_owned().await?;
        let (integrations, http, tokens, endpoint) = (integrations.clone(), http.clone(), tokens.clone(), token_endpoint.clone());
        tokio::spawn(async move {
            if let Err(err) = deliver(&delivery.data, &integrations, &http, &tokens, &endpoint).await {
                eprintln!("naive: {err:#}");
            }
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            drop(permit);
        });
    }
    Ok(())
}

async fn deliver(
    body: &[u8],
    integrations: &mongodb::Collection<Document>,
    http: &reqwest::Client,
    tokens: &Mutex<HashMap<String, String>>,
    endpoint: &str,
) -> anyhow::Result<()> {
    let job: Value = serde_json::from_slice(body)?;
    let filter = doc! { "organization_id": job["organization_id"].as_str(), "integration_id": job["integration_id"].as_str() };
    let integration = integrations.find_one(filter).await?.context("no org_integration")?;
    let bot = integration.get_document("bot")?;
    let app = bot.get_str("app_id")?.to_owned();
    let cached = tokens.lock().await.get(&app).cloned();
    let token = match cached {
        Some(token) => token,
        None => {
            let token = token::fetch(http, endpoint, &app, bot.get_str("app_secret")?).await?;
            tokens.lock().await.insert(app, token.clone());
            token
        }
    };
    let conversation = job["recipient"]["conversation_id"].as_str().context("no conversation")?;
    let url = format!("{}v3/conversations/{}/activities", integration.get_str("service_url")?, urlencode(conversation));
    let activity = json!({
        "type": "message",
        "attachments": [{ "contentType": "application/vnd.microsoft.card.adaptive", "content": {
            "type": "AdaptiveCard", "version": "1.5",
            "body": [{ "type": "TextBlock", "text": job["message"]["title"] }, { "type": "TextBlock", "text": job["message"]["text"] }],
        } }],
    });
    http.post(url).bearer_auth(token).json(&activity).send().await?.error_for_status()?;
    Ok(())
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}
