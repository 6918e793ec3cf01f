//! The loss of a RabbitMQ node (issue 35), on the local three-node cluster
//! (`scripts/cluster.sh`, started by `scripts/services.sh --cluster`): three
//! workers, each given the three nodes in `amqp_url`, drain 20,000 jobs of
//! 20 organizations, which `herald enqueue --stdin` (given the three nodes
//! too) publishes at 350 per second. Meanwhile the node holding the work
//! queue's leader is stopped (a clean shutdown, as for maintenance) and
//! comes back; then the node the router's connection is on (a worker's)
//! crashes (SIGKILL), and while it is down the worker now routing stops (a
//! rolling restart), so that the next router must allow for the lost
//! node's consumer though the last router was elsewhere; then the node
//! comes back. One node at a time: three nodes keep a majority with one
//! lost, not with two (with two lost, no quorum queue accepts or delivers
//! until one returns).
//!
//! What must hold: the producer publishes every job (again, with its id,
//! where the node it published through was lost before the confirm); every
//! job posted exactly once or dead-lettered with a reason, none lost; a job posted twice only where its ledger record
//! counts it `unconfirmed`; delivery resumes within 15 s of each loss: the
//! longest time without a post after it, and the time until the fleet is
//! whole again (every worker that lost its node reconnected, the router
//! and every shard held, each of their queues consumed), both printed. The
//! workers' prefetch is small (32), so that what they hold cannot hide a
//! pause of the broker's.
//!
//! Run alone (`make test` does): it stops nodes of the cluster, and its
//! workers must not share the two cores with other tests.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use figment::providers::Serialized;
use herald::mongo::DeliveryState;
use teams_sim as sim;

use crate::fleet::{self, burst};
use crate::support::*;

const JOBS: usize = 20_000;
const TENANTS: usize = 20;
/// The longest a node's loss may stop delivery.
const RESUME_WITHIN: Duration = Duration::from_secs(15);
/// Posts after a loss that show delivery resumed: more than the workers
/// hold prefetched on nodes that stayed up (those go on while the queues
/// elect new leaders), so that the pause is behind them.
const RESUMED_AFTER: usize = 2_500;
/// Jobs `herald enqueue` publishes per second, below what the workers post:
/// the queues stay short, so a stop of routing or of a shard shows as a
/// pause of posts.
const PUBLISH_RATE: usize = 350;
/// Jobs that must still be waiting when a node is lost, or the loss came
/// too late to test anything.
const LEFT_AT_LOSS: usize = 4_000;

async fn cluster(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");
    let out = tokio::process::Command::new("bash").arg(script).args(args).output().await.expect("bash runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "cluster.sh {args:?}: {text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// The node number (1..=3) of `herald-N@localhost`.
fn node_number(node: &str) -> u8 {
    node.strip_prefix("herald-").and_then(|n| n.split('@').next()).and_then(|n| n.parse().ok()).expect("a cluster node name")
}

/// Ask the management API of any node that answers.
async fn management(path: &str) -> serde_json::Value {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    for port in 15681..=15683 {
        let answer = http.get(format!("http://127.0.0.1:{port}/api/{path}")).basic_auth("guest", Some("guest")).send().await;
        if let Ok(answer) = answer
            && answer.status().is_success()
            && let Ok(value) = answer.json().await
        {
            return value;
        }
    }
    panic!("no node of the cluster answers GET /api/{path}");
}

/// Posts counted by the simulator.
async fn posted(env: &TestEnv) -> usize {
    env.sim.client().stats().await.map(|s| s.activities_total as usize).unwrap_or(0)
}

async fn wait_for_posts(env: &TestEnv, what: &str, n: usize) {
    eventually(what, Duration::from_secs(60), || async { (posted(env).await >= n).then_some(()) }).await;
}

/// The workers' reconnects, summed.
async fn reconnects(workers: &[ObservedWorker]) -> f64 {
    let mut sum = 0.0;
    for worker in workers {
        sum += worker.metric("herald_broker_reconnects_total").await;
    }
    sum
}

/// Connections named `name` on `node`, by the management API.
async fn workers_on(node: u8, name: &str) -> usize {
    let connections = management("connections").await;
    connections
        .as_array()
        .expect("a list of connections")
        .iter()
        .filter(|c| c["client_properties"]["connection_name"] == name)
        .filter(|c| c["node"].as_str().map(node_number) == Some(node))
        .count()
}

/// Wait until the fleet is whole again after a node's loss: the workers
/// reconnected `due` times in all, together they hold the router and every
/// shard, and the broker counts a consumer on each of those queues (a
/// passive declare); how long that took since `since`.
async fn consumed_again(env: &mut TestEnv, workers: &[ObservedWorker], due: f64, since: std::time::Instant) -> Duration {
    let queues = env.topology.pending_queues();
    let shards = f64::from(env.topology.shards);
    loop {
        assert!(since.elapsed() < Duration::from_secs(120), "the fleet was not whole again within 120 s");
        let mut router = 0.0;
        let mut held = 0.0;
        for worker in workers {
            let page = worker.metrics().await;
            router += metric(&page, "herald_fleet_units_held{unit=\"router\"}");
            held += metric(&page, "herald_fleet_units_held{unit=\"shard\"}");
        }
        let mut whole = router == 1.0 && held == shards && reconnects(workers).await >= due;
        for queue in &queues {
            if !whole {
                break;
            }
            let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
            let declared = tokio::time::timeout(Duration::from_secs(2), async {
                let channel = env.connection.create_channel().await?;
                let declared = channel.queue_declare(queue.as_str().into(), passive, Default::default()).await;
                let _ = channel.close(200, "".into()).await;
                declared
            })
            .await;
            whole = matches!(declared, Ok(Ok(ref q)) if q.consumer_count() > 0);
            // The node this test was connected to is gone, or the queue has no leader yet.
            if matches!(declared, Ok(Err(_)) | Err(_)) && !env.connection.status().connected() {
                env.reconnect().await;
            }
        }
        if whole {
            return since.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The longest stretch without a post from `from` to `to`.
fn pause(posts: &[DateTime<Utc>], from: DateTime<Utc>, to: DateTime<Utc>) -> Duration {
    let mut last = from;
    let mut longest = chrono::Duration::zero();
    for at in posts.iter().filter(|at| **at > from && **at <= to) {
        longest = longest.max(*at - last);
        last = *at;
    }
    longest.to_std().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_node_of_three_loses_no_job_and_delivery_resumes() {
    let urls = cluster(&["urls"]).await.trim().to_owned();
    cluster(&["up"]).await;
    let (world, _, _) = fleet::fleet(TENANTS, burst::PER_TENANT, "");
    let mut env =
        TestEnv::with(world, sim::Options { throttling: false, ..Default::default() }, |f| f.merge(Serialized::default("amqp_url", &urls)))
            .await;
    let (_, integrations, conversations) = fleet::fleet(TENANTS, burst::PER_TENANT, &env.sim.service_url());
    env.seed(&integrations, &conversations).await;
    env.sim.client().set_latency(sim::Latency::Fixed { ms: 2 }).await.unwrap();

    // Every job is in the cluster before the workers start.
    let jobs = burst::plan(JOBS, 0, TENANTS, 35);
    // The producer: `herald enqueue`, given the three nodes too.
    let producer_log = std::env::temp_dir().join(format!("herald-it-{}-enqueue.log", env.id));
    let mut producer = env
        .herald_command(&["enqueue", "--stdin", "--rate", &PUBLISH_RATE.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&producer_log).expect("a log file"))
        .spawn()
        .expect("herald enqueue starts");
    let mut lines = Vec::with_capacity(JOBS * 300);
    for job in &jobs {
        lines.extend_from_slice(&job.body);
        lines.push(b'\n');
    }
    let mut stdin = producer.stdin.take().expect("a pipe");
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        stdin.write_all(&lines).await.expect("enqueue reads its jobs");
    });
    let settings = [("HERALD_LOG__FILTER", "warn"), ("HERALD_WORKER__PREFETCH", "32")];
    let mut workers: Vec<ObservedWorker> = (0..3).map(|_| env.observed_worker(&settings)).collect();

    // 1. The node holding the work queue's leader stops, and comes back.
    wait_for_posts(&env, "the first jobs posted", 2_000).await;
    let leader = management(&format!("queues/%2f/{}", env.topology.work_queue())).await["leader"].as_str().unwrap().to_owned();
    let stopped = node_number(&leader);
    let due = reconnects(&workers).await + workers_on(stopped, "herald worker").await as f64;
    let at_stop = posted(&env).await;
    assert!(JOBS - at_stop >= LEFT_AT_LOSS, "only {} jobs were left when the leader's node stopped", JOBS - at_stop);
    let stopping = std::time::Instant::now();
    let stop = Utc::now();
    cluster(&["stop", &stopped.to_string()]).await;
    let first_whole = consumed_again(&mut env, &workers, due, stopping).await;
    wait_for_posts(&env, "delivery to resume after the leader's node stopped", at_stop + RESUMED_AFTER).await;
    let resumed = Utc::now();
    cluster(&["up"]).await;

    // 2. The node the router consumes through crashes, and comes back. A
    // quorum queue counts a consumer of a crashed node until the node is
    // back: the next router must not wait for it.
    let mut crashed = None;
    for _ in 0..50 {
        crashed = futures_util::future::join_all((1..=3).map(|n| async move { (n, workers_on(n, "herald router").await) }))
            .await
            .into_iter()
            .find(|(_, on)| *on > 0)
            .map(|(n, _)| n);
        if crashed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let crashed = crashed.expect("the router's connection, on a node of the cluster");
    let due = reconnects(&workers).await + workers_on(crashed, "herald worker").await.max(1) as f64;
    let pid = cluster(&["pid", &crashed.to_string()]).await.trim().to_owned();
    let at_crash = posted(&env).await;
    assert!(JOBS - at_crash >= LEFT_AT_LOSS, "only {} jobs were left when the router's node crashed", JOBS - at_crash);
    let crashing = std::time::Instant::now();
    let crash = Utc::now();
    let killed = tokio::process::Command::new("kill").args(["-KILL", &pid]).status().await.expect("kill runs");
    assert!(killed.success(), "could not kill herald-{crashed} (pid {pid})");
    let second_whole = consumed_again(&mut env, &workers, due, crashing).await;
    wait_for_posts(&env, "delivery to resume after the router's node crashed", at_crash + RESUMED_AFTER).await;
    let resumed_again = Utc::now();

    // 3. While that node is still down (its router's consumer still
    // counted), the worker now routing stops, as in a rolling restart: the
    // next router must allow for the lost node's consumer, not only for the
    // last router's.
    let mut routing = None;
    for (n, worker) in workers.iter().enumerate() {
        if worker.metric("herald_fleet_units_held{unit=\"router\"}").await == 1.0 {
            routing = Some(n);
        }
    }
    let routing = workers.swap_remove(routing.expect("a worker routing"));
    let stopped_reconnects = routing.metric("herald_broker_reconnects_total").await;
    let at_restart = posted(&env).await;
    assert!(JOBS - at_restart >= LEFT_AT_LOSS / 2, "only {} jobs were left when the routing worker stopped", JOBS - at_restart);
    routing.stop().await;
    wait_for_posts(
        &env,
        "delivery to resume after the routing worker stopped, its node's lost consumer still counted",
        at_restart + RESUMED_AFTER / 2,
    )
    .await;
    cluster(&["up"]).await;

    let produced = tokio::time::timeout(Duration::from_secs(120), producer.wait()).await.expect("enqueue ends").unwrap();
    let said = std::fs::read_to_string(&producer_log).unwrap_or_default();
    assert!(produced.success(), "herald enqueue failed: {said}");
    let _ = std::fs::remove_file(&producer_log);
    assert!(said.contains(&format!("enqueued {JOBS} job(s)")), "{said}");
    let republished = said.lines().find(|l| l.contains("published again")).unwrap_or("none published again").to_owned();

    // Every job settled: posted, or dead-lettered with a reason.
    env.reconnect().await;
    let ids: HashSet<&str> = jobs.iter().map(|j| j.job_id.as_str()).collect();
    let settled = [DeliveryState::Sent, DeliveryState::DeadLettered, DeliveryState::Unconfirmed];
    let ledger = eventually("every job settled", Duration::from_secs(300), || async {
        let ledger = env.store.list_deliveries(&Default::default(), 2 * JOBS as i64).await.ok()?;
        let done = ledger.iter().filter(|d| settled.contains(&d.state) && ids.contains(d.job_id.as_str())).count();
        (done == JOBS).then_some(ledger)
    })
    .await;
    env.drained().await;
    let reconnects = reconnects(&workers).await + stopped_reconnects;
    for worker in workers {
        worker.stop().await;
    }

    let records = env.sim.client().all_activities().await.unwrap();
    let mut posts: HashMap<String, usize> = HashMap::new();
    for record in &records {
        *posts.entry(title(record)).or_default() += 1;
    }
    let unconfirmed: HashSet<&str> = ledger.iter().filter(|d| d.state == DeliveryState::Unconfirmed).map(|d| d.job_id.as_str()).collect();
    let dead_lettered: HashSet<&str> =
        ledger.iter().filter(|d| d.state == DeliveryState::DeadLettered).map(|d| d.job_id.as_str()).collect();
    let dead = if dead_lettered.is_empty() && unconfirmed.is_empty() {
        Vec::new()
    } else {
        env.dead_letters(dead_lettered.len() + unconfirmed.len()).await
    };
    let mut lost = 0;
    let mut twice = Vec::new();
    for job in &jobs {
        let id = job.job_id.as_str();
        match posts.get(&format!("burst {id}")).copied().unwrap_or(0) {
            1 => {}
            0 if dead.iter().any(|d| d.message_id.as_deref() == Some(id) && d.reason.is_some()) => {}
            0 => lost += 1,
            _ if unconfirmed.contains(id) => {}
            _ => twice.push(id),
        }
    }
    assert_eq!(lost, 0, "{lost} jobs neither posted nor dead-lettered with a reason");
    assert!(twice.is_empty(), "{} jobs posted twice outside an unconfirmed state: {:?}", twice.len(), &twice[..twice.len().min(5)]);

    let mut times: Vec<DateTime<Utc>> = records.iter().map(|r| r.received_at).collect();
    times.sort();
    let first_pause = pause(&times, stop, resumed);
    let second_pause = pause(&times, crash, resumed_again);
    eprintln!(
        "{JOBS} jobs, 3 workers, 3 nodes: herald-{stopped} (the work queue's leader) stopped at {at_stop} posted: \
         longest without a post {first_pause:?}, fleet whole again after {first_whole:?}; \
         herald-{crashed} (the router's) killed at {at_crash} posted: {second_pause:?}, {second_whole:?}; \
         {} dead-lettered, {} unconfirmed, {reconnects} reconnects; herald enqueue: {republished}",
        dead_lettered.len(),
        unconfirmed.len()
    );
    for (what, took) in [
        ("no post after the leader's node stopped", first_pause),
        ("the fleet not whole after the leader's node stopped", first_whole),
        ("no post after the router's node crashed", second_pause),
        ("the fleet not whole after the router's node crashed", second_whole),
    ] {
        assert!(took < RESUME_WITHIN, "{what} for {took:?}");
    }
    assert!(reconnects >= 1.0, "a worker connected to a lost node reconnects (counted {reconnects})");
}
