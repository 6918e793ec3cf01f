//! `herald enqueue`: publish jobs with publisher confirms.

use std::io::{BufRead, Read};
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};

use super::EnqueueArgs;
use crate::job::{Fact, Job, Message, Recipient, Severity, WireJob};
use crate::producer::Producer;
use crate::settings::Settings;

/// A job from the command-line flags, validated like any job on the wire.
fn job_from_flags(args: &EnqueueArgs) -> anyhow::Result<Job> {
    let severity: Severity = serde_json::from_value(serde_json::Value::String(args.severity.clone()))
        .map_err(|_| anyhow::anyhow!("--severity must be info, warning, error or critical, not {:?}", args.severity))?;
    let url = args.url.as_deref().map(url::Url::parse).transpose().context("--url is not a valid URL")?;
    let facts = args
        .facts
        .iter()
        .map(|f| match f.split_once('=') {
            Some((name, value)) => Ok(Fact { name: name.to_owned(), value: value.to_owned() }),
            None => bail!("--fact {f:?} must be NAME=VALUE"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let now = chrono::Utc::now();
    let wire = WireJob {
        version: crate::job::VERSION,
        job_id: uuid::Uuid::new_v4(),
        organization_id: args.organization_id.clone().context("--org is required (or use --file / --stdin)")?,
        integration_id: args.integration_id.clone().context("--integration is required")?,
        recipient: Recipient {
            conversation_id: args.conversation.clone().and_then(crate::job::ConversationId::parse),
            user_id: args.user.clone().and_then(crate::job::UserId::parse),
        },
        message: Some(Message {
            title: args.title.clone().unwrap_or_default(),
            text: args.text.clone().unwrap_or_default(),
            url,
            severity,
            facts,
        }),
        card: None,
        created_at: now,
        expires_at: args.expires_in.map(|s| now + chrono::Duration::seconds(s as i64)),
    };
    Job::try_from(wire).map_err(|err| anyhow::anyhow!("invalid job: {err}"))
}

pub async fn enqueue(settings: &Settings, args: EnqueueArgs) -> anyhow::Result<()> {
    let jobs: Vec<Job> = if args.stdin {
        let mut jobs = Vec::new();
        for (n, line) in std::io::stdin().lock().lines().enumerate() {
            let line = line.context("reading standard input")?;
            if line.trim().is_empty() {
                continue;
            }
            jobs.push(Job::decode(line.as_bytes()).map_err(|err| anyhow::anyhow!("line {}: invalid job: {err}", n + 1))?);
        }
        jobs
    } else if let Some(file) = &args.file {
        let mut body = Vec::new();
        std::fs::File::open(file).and_then(|mut f| f.read_to_end(&mut body)).with_context(|| format!("reading {}", file.display()))?;
        vec![Job::decode(&body).map_err(|err| anyhow::anyhow!("{}: invalid job: {err}", file.display()))?]
    } else {
        vec![job_from_flags(&args)?]
    };
    let connection = crate::rabbitmq::Broker::new(settings).connect("herald producer").await?;
    let producer = Producer::on(&std::sync::Arc::new(connection), &settings.topology_prefix).await?;
    if let [job] = jobs.as_slice() {
        println!("{}", producer.publish(job).await.with_context(|| format!("publishing job {}", job.id))?);
        return Ok(());
    }
    let mut pace = args.rate.map(|r| tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(r.max(1)))));
    let bar = ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("enqueueing [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    for job in &jobs {
        if let Some(pace) = pace.as_mut() {
            pace.tick().await;
        }
        producer.publish(job).await.with_context(|| format!("publishing job {}", job.id))?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    eprintln!("enqueued {} job(s) in {:.1} s, each confirmed by the broker", jobs.len(), started.elapsed().as_secs_f64());
    Ok(())
}
