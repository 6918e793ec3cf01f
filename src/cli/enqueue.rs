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
    let mut producer = Healing::connect(settings).await?;
    if let [job] = jobs.as_slice() {
        println!("{}", producer.publish(job).await?);
        return Ok(());
    }
    // Batches of a tenth of a second's jobs (at least one), or of 256 as
    // fast as the broker confirms them.
    let (batch, mut pace) = match args.rate.map(|r| r.max(1)) {
        Some(rate) if rate >= 10 => (rate as usize / 10, Some(tokio::time::interval(Duration::from_millis(100)))),
        Some(rate) => (1, Some(tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate))))),
        None => (256, None),
    };
    let bar = ProgressBar::new(jobs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("enqueueing [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    for chunk in jobs.chunks(batch) {
        if let Some(pace) = pace.as_mut() {
            pace.tick().await;
        }
        producer.publish_all(chunk).await?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    eprintln!("enqueued {} job(s) in {:.1} s, each confirmed by the broker", jobs.len(), started.elapsed().as_secs_f64());
    if producer.again > 0 {
        eprintln!("{} job(s) published again: the broker connection was lost, or the broker nacked, before their confirm", producer.again);
    }
    Ok(())
}

/// How long a job is tried again through new connections before enqueue
/// gives up: a cluster elects new queue leaders within seconds.
const HEAL_FOR: Duration = Duration::from_secs(60);

/// A producer that outlives its broker connection: a publish whose confirm
/// did not come (the connection was lost with its node, or the broker
/// nacked) is published again, with the same job id, through a new
/// connection to any node of `amqp_url`. Herald posts a job id once, so a copy that did
/// reach the queue is not posted twice. A job the broker refused for good
/// (unroutable, no such exchange, no permission) is not retried: `herald
/// setup` or the broker's permissions are the remedy.
struct Healing {
    broker: crate::rabbitmq::Broker,
    prefix: String,
    connection: std::sync::Arc<lapin::Connection>,
    producer: Producer,
    /// Publishes made again after a lost connection.
    again: u64,
}

impl Healing {
    async fn connect(settings: &Settings) -> anyhow::Result<Self> {
        let broker = crate::rabbitmq::Broker::new(settings);
        let connection = std::sync::Arc::new(broker.connect("herald producer").await?);
        let producer = Producer::on(&connection, &settings.topology_prefix).await?;
        Ok(Self { broker, prefix: settings.topology_prefix.clone(), connection, producer, again: 0 })
    }

    async fn publish(&mut self, job: &Job) -> anyhow::Result<crate::job::JobId> {
        self.publish_all(std::slice::from_ref(job)).await?;
        Ok(job.id)
    }

    /// Publish `jobs`, again until each is confirmed (for up to `HEAL_FOR`).
    async fn publish_all(&mut self, jobs: &[Job]) -> anyhow::Result<()> {
        let giving_up = std::time::Instant::now() + HEAL_FOR;
        let mut pending: Vec<&Job> = jobs.iter().collect();
        loop {
            let owned: Vec<Job> = pending.iter().map(|job| (*job).clone()).collect();
            let results = self.producer.publish_all(&owned).await;
            let mut failed = Vec::new();
            let mut first = None;
            for (job, result) in pending.iter().zip(results) {
                match result {
                    Ok(_) => {}
                    // The topology is missing, or the user may not publish:
                    // not the broker's passing state.
                    Err(err) if crate::rabbitmq::refused_for_good(&err) => {
                        return Err(anyhow::Error::new(err).context(format!("publishing job {}", job.id)));
                    }
                    Err(err) => {
                        failed.push(*job);
                        first.get_or_insert(err);
                    }
                }
            }
            let Some(err) = first else { return Ok(()) };
            if std::time::Instant::now() > giving_up {
                return Err(anyhow::Error::new(err).context(format!("publishing job {}", failed[0].id)));
            }
            tracing::warn!(jobs = failed.len(), error = %crate::text::error_chain(&err), "the broker did not confirm these jobs; publishing them again");
            self.again += failed.len() as u64;
            pending = failed;
            // On a new connection, whatever failed: the old one may look
            // open after its node went away.
            let _ = tokio::time::timeout(Duration::from_secs(2), self.connection.close(200, "publishing again".into())).await;
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let reconnected = async {
                    let connection = std::sync::Arc::new(self.broker.connect("herald producer").await?);
                    let producer = Producer::on(&connection, &self.prefix).await?;
                    Ok::<_, crate::rabbitmq::BrokerError>((connection, producer))
                };
                match reconnected.await {
                    Ok((connection, producer)) => {
                        (self.connection, self.producer) = (connection, producer);
                        break;
                    }
                    Err(err) if std::time::Instant::now() > giving_up => return Err(err.into()),
                    Err(_) => {}
                }
            }
        }
    }
}
