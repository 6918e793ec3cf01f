//! Many workers, one queue: three worker processes drain 20,000 jobs while one
//! of them is killed with SIGKILL. Every job is delivered, none is lost, and
//! none is posted again after the ledger recorded it sent.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use herald::mongo::DeliveryState;
use herald::rabbitmq::{Publisher, ROUTING_KEY};
use lapin::BasicProperties;
use teams_sim as sim;

use crate::support::*;

const JOBS: usize = 20_000;
const CONCURRENCY: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_one_killed_every_job_delivered_none_posted_after_sent() {
    let mut world = two_org_world();
    for i in 0..20 {
        let (org, app, tenant) = if i % 2 == 0 { ("a", "app-a", "tenant-a") } else { ("b", "app-b", "tenant-b") };
        world.conversations.push(sim::Conversation {
            id: format!("19:{org}-{i}@thread.tacv2"),
            tenant_id: tenant.into(),
            kind: sim::ConversationKind::Channel,
            roster: [app.to_owned()].into(),
            blocked: false,
            user_id: None,
        });
    }
    let env = TestEnv::with(world, sim::Options { throttling: false, ..Default::default() }, |f| f).await;
    env.seed_two_orgs().await;
    for i in 0..20 {
        let org = if i % 2 == 0 { "org-a" } else { "org-b" };
        let id = format!("19:{}-{i}@thread.tacv2", &org[4..]);
        env.insert_conversation(org, &id, herald::mongo::ConversationKind::Channel, None).await;
    }
    env.sim.client().set_latency(sim::Latency::Fixed { ms: 2 }).await.unwrap();

    let publisher = Publisher::open(env.connection.clone()).await.unwrap();
    let mut titles = Vec::with_capacity(JOBS);
    for chunk in 0..JOBS / 500 {
        let mut pending = Vec::new();
        for n in 0..500 {
            let i = chunk * 500 + n;
            let org = if i % 2 == 0 { "org-a" } else { "org-b" };
            let conversation = format!("19:{}-{}@thread.tacv2", &org[4..], (i % 10) * 2 + i % 2);
            let job = job(org, &conversation, &format!("job-{i}"));
            titles.push(format!("job-{i}"));
            let properties =
                BasicProperties::default().with_content_type("application/json".into()).with_message_id(job.id.to_string().into());
            pending.push(publisher.start(&env.topology.jobs_exchange(), ROUTING_KEY, &wire(&job), properties).await.unwrap());
        }
        for p in pending {
            p.confirmed().await.unwrap();
        }
    }

    let spawn = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("worker")
            .envs(env.env_vars())
            .env("HERALD_WORKER__CONCURRENCY", CONCURRENCY.to_string())
            .env("HERALD_WORKER__PREFETCH", "32")
            .env("HERALD_LOG__FILTER", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let mut workers = vec![spawn(), spawn(), spawn()];
    let client = env.sim.client();
    eventually("a quarter of the jobs delivered", Duration::from_secs(300), || async {
        (client.stats().await.ok()?.activities_total as usize >= JOBS / 4).then_some(())
    })
    .await;
    let victim = workers.remove(0);
    let status = std::process::Command::new("kill").args(["-KILL", &victim.id().unwrap().to_string()]).status().unwrap();
    assert!(status.success());

    eventually("every job to be delivered", Duration::from_secs(300), || async {
        let stats = client.stats().await.ok()?;
        (stats.activities_total as usize >= JOBS).then_some(())
    })
    .await;
    env.drained().await;
    for mut worker in workers {
        let _ = std::process::Command::new("kill").args(["-TERM", &worker.id().unwrap().to_string()]).status();
        tokio::time::timeout(Duration::from_secs(15), worker.wait()).await.unwrap().unwrap();
    }

    let records = client.all_activities().await.unwrap();
    let mut posts: HashMap<String, Vec<chrono::DateTime<chrono::Utc>>> = HashMap::new();
    for record in &records {
        let title = record.body["attachments"][0]["content"]["body"][0]["text"].as_str().unwrap().to_owned();
        posts.entry(title).or_default().push(record.received_at);
    }
    let missing = titles.iter().filter(|t| !posts.contains_key(*t)).count();
    assert_eq!(missing, 0, "{missing} jobs never delivered");
    let duplicates: Vec<&String> = posts.iter().filter(|(_, at)| at.len() > 1).map(|(t, _)| t).collect();
    assert!(duplicates.len() <= CONCURRENCY, "only the killed worker's in-flight jobs may be posted twice: {}", duplicates.len());

    // The ledger agrees, and no post came after the job was recorded sent.
    let ledger = env.store.list_deliveries(&Default::default(), JOBS as i64 * 2).await.unwrap();
    assert_eq!(ledger.len(), JOBS);
    assert!(ledger.iter().all(|d| d.state == DeliveryState::Sent), "every ledger record says sent");
    let activity_ids: std::collections::HashSet<&str> = records.iter().map(|r| r.activity_id.as_str()).collect();
    assert!(
        ledger.iter().all(|d| d.activity_id.as_deref().is_some_and(|a| activity_ids.contains(a))),
        "the ledger's activity ids are the simulator's"
    );
    for record in &records {
        let title = record.body["attachments"][0]["content"]["body"][0]["text"].as_str().unwrap();
        if !duplicates.iter().any(|d| d.as_str() == title) {
            continue;
        }
        let entry = ledger.iter().find(|d| d.activity_id.as_deref() == Some(record.activity_id.as_str()));
        if let Some(entry) = entry {
            let recorded = chrono::DateTime::from_timestamp_millis(entry.updated_at.timestamp_millis()).unwrap();
            for at in &posts[title] {
                assert!(
                    *at <= recorded + chrono::Duration::milliseconds(5),
                    "{title} was posted at {at} after it was recorded sent at {recorded}"
                );
            }
        }
    }
    eprintln!("{JOBS} jobs, 3 workers, one SIGKILLed: {} posted twice (in flight when killed)", duplicates.len());
}

/// A worker that stops for longer than its lease while it routes (SIGSTOP: a
/// frozen VM, a long pause) still holds the work queue's jobs RabbitMQ gave
/// it. The other worker takes the router once the lease ran out, and must not
/// route beside it: jobs keep arriving during the pause, and every
/// conversation's jobs are still posted in publish order, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_paused_past_its_lease_never_routes_beside_the_next_one() {
    use crate::fleet::{self, burst};
    const TENANTS: usize = 4;
    let (world, _, _) = fleet::fleet(TENANTS, burst::PER_TENANT, "");
    let env = TestEnv::with(world, sim::Options::default(), |f| f).await;
    let (_, integrations, conversations) = fleet::fleet(TENANTS, burst::PER_TENANT, &env.sim.service_url());
    env.seed(&integrations, &conversations).await;
    let jobs = burst::plan(1_500, 0, TENANTS, 7);

    // The paused worker also holds shards: a post it has on the wire when it
    // freezes must outlast the pause, or its answer is read only after the
    // request's timeout ran out and the job is rightly `unconfirmed` (the
    // test environment's 2 s timeout against a 6 s pause failed this test
    // once so; `isolation::a_send_whose_answer_is_lost_is_unconfirmed_and_never_resent`
    // covers that case). This test is about the router.
    let settings: &[(&str, &str)] = &[
        ("HERALD_TEAMS__RATE_LIMITS__ENABLED", "true"),
        ("HERALD_FLEET__LEASE_SECS", "3"),
        ("HERALD_FLEET__HEARTBEAT_MS", "500"),
        ("HERALD_TEAMS__REQUEST_TIMEOUT_SECS", "12"),
        ("HERALD_WORKER__CLAIM_LEASE_SECS", "30"),
    ];
    let workers = [env.observed_worker(settings), env.observed_worker(settings)];
    let router_pid = || async {
        let holders = env.store.fleet_holders().await.ok()?;
        let owner = holders.get("router")?;
        // A worker's fleet id is hostname-pid-random.
        owner.rsplit('-').nth(1)?.parse::<u32>().ok()
    };
    eventually("both workers in the fleet, one routing", Duration::from_secs(60), || async {
        let holders = env.store.fleet_holders().await.ok()?;
        let owners: std::collections::HashSet<&String> = holders.values().collect();
        (holders.len() == 17 && owners.len() == 2).then_some(())
    })
    .await;
    let paused = router_pid().await.expect("a router");
    let other = workers.iter().map(|w| w.process.id().unwrap()).find(|pid| *pid != paused).expect("two workers");

    // 1,500 jobs at about 100 per second; the router is frozen from the
    // 3rd second to the 9th, three times its lease.
    let publisher = Publisher::open(env.connection.clone()).await.unwrap();
    let publishing = async {
        for chunk in jobs.chunks(10) {
            env.publish_confirmed(&publisher, chunk.iter().map(|j| (j.job_id.as_str(), j.body.as_slice()))).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let pausing = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        signal(paused, "-STOP");
        tokio::time::sleep(Duration::from_secs(6)).await;
        signal(paused, "-CONT");
    };
    let started = chrono::Utc::now();
    tokio::join!(publishing, pausing);

    let ids: std::collections::HashSet<&str> = jobs.iter().map(|j| j.job_id.as_str()).collect();
    let settled = [DeliveryState::Sent, DeliveryState::DeadLettered, DeliveryState::Unconfirmed];
    eventually("every job settled", Duration::from_secs(120), || async {
        let ledger = env.store.list_deliveries(&Default::default(), 3 * jobs.len() as i64).await.ok()?;
        let done = ledger.iter().filter(|d| settled.contains(&d.state) && ids.contains(d.job_id.as_str())).count();
        (done >= jobs.len()).then_some(())
    })
    .await;

    let records = env.sim.client().all_activities().await.unwrap();
    let stats = env.sim.client().stats().await.unwrap();
    let ledger = env.store.list_deliveries(&Default::default(), 3 * jobs.len() as i64).await.unwrap();
    let limits = teams_limits::Limits::default();
    let verdict = burst::check(&jobs, started, &records, &stats, &ledger, &Default::default(), &limits);
    eprintln!(
        "router paused past its lease: {} jobs, 429: {} of {}, posted twice {}, excused from order {}, out of order {}",
        verdict.jobs,
        verdict.throttled,
        verdict.connector_requests,
        verdict.posted_twice,
        verdict.excused,
        verdict.out_of_order.len()
    );
    assert_eq!(router_pid().await, Some(other), "the router moved to the worker that was not paused");
    assert!(verdict.out_of_order.is_empty(), "{} posts out of order: {:?}", verdict.out_of_order.len(), verdict.out_of_order);
    assert!(verdict.excused < 15, "at most 1% of the jobs took a retry tier: {}", verdict.excused);
    assert_eq!(verdict.missing, 0, "every job posted");
    assert_eq!(verdict.posted_twice, 0, "no job posted twice");
    assert_eq!((verdict.ledger_not_sent, verdict.ledger_disagrees), (0, 0), "the ledger agrees with teams-sim");
    for worker in workers {
        let log = worker.stop().await;
        assert!(!log.contains("panicked"), "{log}");
    }
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// The router's batches (`Publisher::start_all`): every message of a batch
/// reaches its shard in the order given and is confirmed on its own; one
/// that no queue takes is an error of its own, not of its neighbours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_published_in_order_and_each_message_confirmed_on_its_own() {
    use futures_util::StreamExt;
    use lapin::options::BasicConsumeOptions;
    use lapin::types::FieldTable;
    let env = TestEnv::two_orgs().await;
    let publisher = Publisher::open(env.connection.clone()).await.unwrap();
    let exchange = env.topology.shard_exchange();
    let bodies: Vec<String> = (0..600).map(|i| format!("{{\"n\":{i}}}")).collect();
    let mut confirmed = 0;
    for batch in bodies.chunks(200) {
        let mut messages: Vec<(std::sync::Arc<str>, &[u8], BasicProperties)> =
            batch.iter().map(|b| ("3".into(), b.as_bytes(), BasicProperties::default())).collect();
        messages.insert(100, ("no-such-shard".into(), b"{}", BasicProperties::default()));
        let sent = publisher.start_all(&exchange, messages).await;
        assert_eq!(sent.len(), 201);
        for (i, pending) in sent.into_iter().enumerate() {
            let result = pending.expect("queued").confirmed().await;
            if i == 100 {
                assert!(result.is_err(), "the unroutable message is refused");
            } else {
                result.expect("confirmed");
                confirmed += 1;
            }
        }
    }
    assert_eq!(confirmed, 600);
    // A consumer (a shard queue takes no basic.get: single active consumer).
    let channel = env.connection.create_channel().await.unwrap();
    let queue = env.topology.shard_queue(3);
    let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let mut consumer = channel.basic_consume(queue.as_str().into(), "".into(), no_ack, FieldTable::default()).await.unwrap();
    let mut got = Vec::new();
    while got.len() < bodies.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next()).await.expect("every message arrives");
        got.push(String::from_utf8(delivery.unwrap().unwrap().data).unwrap());
    }
    let _ = channel.close(200, "".into()).await;
    assert_eq!(got, bodies, "in the order given");
}

/// A lease held under a worker's name that none of its tasks consumes (left
/// from a session that ended without releasing it) is released at the next
/// heartbeat instead of renewed: otherwise nobody would consume that unit
/// while the worker lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_left_from_a_workers_last_session_is_released_not_renewed() {
    use mongodb::bson::{Document, doc};
    let env = TestEnv::two_orgs().await;
    let worker = env.spawn_worker();
    let fleet = mongodb::Client::with_uri_str("mongodb://127.0.0.1:27017/?directConnection=true")
        .await
        .unwrap()
        .database(&env.settings.mongodb_database)
        .collection::<Document>("fleet");
    let name = eventually("the worker in the fleet", Duration::from_secs(15), || async {
        let record = fleet.find_one(doc! { "kind": "worker" }).await.unwrap()?;
        Some(record.get_str("_id").unwrap().trim_start_matches("worker/").to_owned())
    })
    .await;
    let in_an_hour = mongodb::bson::DateTime::from_millis(mongodb::bson::DateTime::now().timestamp_millis() + 3_600_000);
    fleet.insert_one(doc! { "_id": "shard/99", "kind": "unit", "owner": &name, "expires_at": in_an_hour }).await.unwrap();
    eventually("the stale lease released", Duration::from_secs(15), || async {
        let unit = fleet.find_one(doc! { "_id": "shard/99" }).await.unwrap()?;
        (!unit.contains_key("owner")).then_some(())
    })
    .await;
    worker.stop().await;
}

/// The number of live workers comes from records anyone can write. With
/// three records that look alive but belong to no consuming worker, the one
/// real worker's fair share is one shard of four; it used to hold one, and
/// jobs routed to the other three waited forever. Now a shard left unheld
/// from one heartbeat to the next is taken beyond the share, and a record
/// that never asks for a shard makes nobody give one up: every job of
/// organizations spread over all four shards is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_counted_but_not_consuming_leave_no_shard_unheld() {
    use mongodb::bson::{Document, doc};
    let orgs: Vec<String> = (0..12).map(|i| format!("org-{i}")).collect();
    let mut world = two_org_world();
    for org in &orgs {
        world.conversations.push(channel(&format!("19:{org}@thread.tacv2"), "tenant-a", "app-a"));
    }
    let env = TestEnv::with(world, sim::Options::default(), |f| f.merge(figment::providers::Serialized::default("fleet.shards", 4))).await;
    let fleet = mongodb::Client::with_uri_str("mongodb://127.0.0.1:27017/?directConnection=true")
        .await
        .unwrap()
        .database(&env.settings.mongodb_database)
        .collection::<Document>("fleet");
    let in_an_hour = mongodb::bson::DateTime::from_millis(mongodb::bson::DateTime::now().timestamp_millis() + 3_600_000);
    for ghost in 0..3 {
        fleet.insert_one(doc! { "_id": format!("worker/ghost-{ghost}"), "kind": "worker", "expires_at": in_an_hour }).await.unwrap();
    }
    for org in &orgs {
        env.insert_org_integration(env.org_integration(org, "app-a", "tenant-a")).await;
        env.insert_conversation(org, &format!("19:{org}@thread.tacv2"), herald::mongo::ConversationKind::Channel, None).await;
    }
    let shards: std::collections::HashSet<u16> =
        orgs.iter().map(|org| herald::worker::shard_of(&wire(&job(org, &format!("19:{org}@thread.tacv2"), "x")), 4)).collect();
    assert_eq!(shards.len(), 4, "the organizations reach every shard");

    let worker = env.worker_process(&[("HERALD_FLEET__SHARDS", "4"), ("HERALD_FLEET__HEARTBEAT_MS", "300")]);
    for org in &orgs {
        env.publish(&job(org, &format!("19:{org}@thread.tacv2"), &format!("for {org}"))).await;
    }
    let records = env.activities(orgs.len()).await;
    terminate(worker).await;
    assert_eq!(posts_by_title(&records).len(), orgs.len(), "every organization's job was delivered");
    let held = fleet.count_documents(doc! { "kind": "unit", "_id": { "$regex": "^shard/" } }).await.unwrap();
    assert_eq!(held, 4);
}
