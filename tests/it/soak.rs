//! The poison soak (examples/fleet), small enough for `make test`: jobs of
//! 12 organizations, 10% of them hostile, through one real worker process
//! while teams-sim answers with 429s (HTTP-date `Retry-After`), 503s, hangs,
//! resets and broken 2xx. The bench runs it at full scale and compares
//! latency and memory with a run without hostile jobs.
//!
//! `HERALD_SOAK_JOBS` (default 2,000) scales it; `HERALD_SOAK_HOSTILE`
//! (default 0.10) sets the hostile share (0 gives the clean run to compare
//! the printed peak RSS with).

use std::collections::HashMap;
use std::time::Duration;

use herald::rabbitmq::{Publisher, ROUTING_KEY};

use crate::fleet;
use crate::support::*;

const ORGS: usize = 12;
const PER_ORG: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_jobs_are_each_one_bounded_dead_letter_and_good_jobs_are_posted_once() {
    let jobs: usize = std::env::var("HERALD_SOAK_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let (world, _, _) = fleet::fleet(ORGS, PER_ORG, "");
    let options = teams_sim::Options { throttling: false, seed: 7, ..Default::default() };
    let env = TestEnv::with(world, options, |f| f).await;
    let (_, integrations, conversations) = fleet::fleet(ORGS, PER_ORG, &env.sim.service_url());
    env.seed(&integrations, &conversations).await;
    let client = env.sim.client();
    for rule in fleet::faults(3000) {
        client.add_fault(&rule).await.unwrap();
    }
    let mut rng = fastrand::Rng::with_seed(11);
    let hostile: f64 = std::env::var("HERALD_SOAK_HOSTILE").ok().and_then(|v| v.parse().ok()).unwrap_or(0.10);
    let planned = fleet::plan(&mut rng, jobs, hostile, ORGS, PER_ORG);
    let worker = env.observed_worker(&[("HERALD_WORKER__CONCURRENCY", "32"), ("HERALD_LOG__FILTER", "warn")]);

    let publisher = Publisher::open(env.connection.clone()).await.unwrap();
    let mut published_at = HashMap::new();
    for chunk in planned.chunks(200) {
        let mut pending = Vec::new();
        for job in chunk {
            published_at.insert(job.message_id.clone(), chrono::Utc::now());
            pending.push(publisher.start(&env.topology.jobs_exchange(), ROUTING_KEY, &job.body, job.properties.clone()).await.unwrap());
        }
        for confirm in pending {
            confirm.confirmed().await.unwrap();
        }
    }

    // Settled (`fleet::settled`), and nothing waiting in a queue.
    eventually("the soak to settle", Duration::from_secs(300), || async {
        let ledger = env.store.list_deliveries(&Default::default(), 2 * jobs as i64).await.ok()?;
        let dead = env.queue_len(&env.topology.dead_queue()).await as usize;
        (fleet::settled(&planned, &ledger, dead) && env.waiting().await == 0).then_some(())
    })
    .await;
    let reconnects = worker.metric("herald_broker_reconnects_total").await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", worker.process.id().unwrap())).unwrap_or_default();
    let peak = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap_or("VmHWM: ?").to_owned();
    let forged = worker.metric("herald_forged_headers_total").await;
    worker.stop().await;

    let records =
        client.activities(&teams_sim::ActivityFilter { route: Some(teams_sim::Route::Send), ..Default::default() }).await.unwrap();
    let letters = herald::dlq::browse(&env.connection, &env.topology.dead_queue(), &env.signer, jobs + 10).await.unwrap();
    let ledger: HashMap<String, herald::mongo::DeliveryState> =
        env.store.list_deliveries(&Default::default(), 2 * jobs as i64).await.unwrap().into_iter().map(|d| (d.job_id, d.state)).collect();
    let verdict = fleet::check(&planned, &published_at, &records, &letters, &ledger);
    let stats = client.stats().await.unwrap();
    eprintln!(
        "soak: {jobs} jobs; {} good posted once, {} unconfirmed, {} hostile dead-lettered once; Teams answered {:?}; worker {peak}",
        verdict.delivered, verdict.unconfirmed, verdict.hostile_dead_lettered, stats.responses_by_status
    );
    assert!(
        verdict.problems.is_empty(),
        "{} problems, the first: {:#?}",
        verdict.problems.len(),
        &verdict.problems[..verdict.problems.len().min(10)]
    );
    assert_eq!(verdict.delivered + verdict.unconfirmed + verdict.hostile_dead_lettered, jobs);
    assert_eq!(reconnects, 0.0, "the worker never lost its broker connection");
    assert!(forged >= 1.0, "forged headers were seen and counted");
    assert!(stats.responses_by_status.get(&429).is_some_and(|n| *n > 0), "the run met HTTP-date Retry-Afters");
}
