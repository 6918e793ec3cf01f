//! `herald deliveries`: what happened to a job, from the ledger (its state
//! and its last attempts), whether or not it was ever dead-lettered.

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::Subcommand;

use super::dlq::parse_instant;
use crate::mongo::{DeliveryDoc, DeliveryFilter, DeliveryState, Store};
use crate::settings::Settings;

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// Every ledger record of a job id (one per org_integration that received
    /// it) with its attempts: when, outcome, HTTP status, Teams code, bot app,
    /// duration.
    Show {
        job_id: String,
        /// Only the record of this organization.
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Ledger records, last changed first.
    List {
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        integration: Option<String>,
        /// sending, retrying, sent, unconfirmed or dead_lettered.
        #[arg(long, value_parser = parse_state)]
        state: Option<DeliveryState>,
        /// Last changed at or after this time (RFC 3339) or this long ago (30m, 2h, 7d).
        #[arg(long, value_parser = parse_instant)]
        since: Option<DateTime<Utc>>,
        /// Last changed at or before this time (RFC 3339) or this long ago.
        #[arg(long, value_parser = parse_instant)]
        until: Option<DateTime<Utc>>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
}

fn parse_state(text: &str) -> Result<DeliveryState, String> {
    [DeliveryState::Sending, DeliveryState::Retrying, DeliveryState::Sent, DeliveryState::Unconfirmed, DeliveryState::DeadLettered]
        .into_iter()
        .find(|s| s.as_str() == text)
        .ok_or_else(|| format!("{text:?}: the state is one of sending, retrying, sent, unconfirmed, dead_lettered"))
}

pub async fn run(settings: &Settings, command: DeliveriesCommand) -> anyhow::Result<ExitCode> {
    let store = Store::connect(settings).await?;
    let result = dispatch(&store, command).await;
    store.shutdown().await;
    result
}

async fn dispatch(store: &Store, command: DeliveriesCommand) -> anyhow::Result<ExitCode> {
    match command {
        DeliveriesCommand::Show { job_id, org, json } => {
            let records: Vec<DeliveryDoc> =
                store.deliveries_of(&job_id).await?.into_iter().filter(|d| org.as_ref().is_none_or(|o| *o == d.organization_id)).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&records)?);
            } else if records.is_empty() {
                eprintln!(
                    "no ledger record of job {job_id}: never claimed (refused before sending), expired by ledger.retention_days, or a typo"
                );
            }
            if !json {
                records.iter().for_each(print_record);
            }
            Ok(if records.is_empty() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        DeliveriesCommand::List { org, integration, state, since, until, limit, json } => {
            let to_bson = |t: Option<DateTime<Utc>>| t.map(|t| mongodb::bson::DateTime::from_millis(t.timestamp_millis()));
            let filter =
                DeliveryFilter { organization_id: org, integration_id: integration, state, since: to_bson(since), until: to_bson(until) };
            let records = store.list_deliveries(&filter, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&records)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("{:<36} {:<16} {:<16} {:<13} {:>8} {:<24} LAST", "JOB", "ORGANIZATION", "INTEGRATION", "STATE", "ATTEMPTS", "UPDATED");
            for d in &records {
                let last = d.reason.as_deref().unwrap_or(if d.state == DeliveryState::Sent { "-" } else { "" });
                println!(
                    "{:<36} {:<16} {:<16} {:<13} {:>8} {:<24} {last}",
                    d.job_id,
                    d.organization_id,
                    d.integration_id,
                    d.state.as_str(),
                    d.attempts,
                    d.updated_at.try_to_rfc3339_string().unwrap_or_default()
                );
            }
            println!("{} record(s)", records.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_record(d: &DeliveryDoc) {
    println!("job {} of {}/{}: {}", d.job_id, d.organization_id, d.integration_id, d.state.as_str());
    if let Some(activity) = &d.activity_id {
        println!("  activity {activity} in {}", d.conversation_id.as_deref().unwrap_or("-"));
    }
    if let Some(error) = &d.last_error {
        println!("  last error ({}): {error}", d.reason.as_deref().unwrap_or("-"));
    }
    println!("  {} Connector request(s) in all; the last {} attempt(s):", d.attempts, d.history.len());
    for a in &d.history {
        println!(
            "    {}  {:<13} {:<28} http {:<4} {:<28} bot {:<20} {} request(s), {} ms",
            a.at.try_to_rfc3339_string().unwrap_or_default(),
            a.outcome,
            a.reason.as_deref().unwrap_or("-"),
            a.http_status.map_or("-".into(), |s| s.to_string()),
            a.teams_code.as_deref().unwrap_or("-"),
            a.bot_app_id.as_deref().unwrap_or("-"),
            a.sends,
            a.duration_ms
        );
    }
}
