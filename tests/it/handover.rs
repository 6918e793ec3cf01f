//! A job's delivery limit counts attempts that crashed, not handovers.
//!
//! RabbitMQ before 4.3 counts every return of a message to a quorum queue
//! against `x-delivery-limit`, a channel closed by a worker that hands its
//! shard (or the router) to another included. herald counts the attempts
//! that ended without an outcome in the job's ledger record instead, and
//! the broker's limit is a far higher backstop. Queues declared by an earlier
//! version keep their old limit until `herald setup --migrate` rebuilds them.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};

use herald::mongo::DeliveryState;
use teams_sim::{Action, Route, Rule};

use crate::support::*;

/// Settings of these tests: two crashed attempts are the limit.
fn crash_limit_two(figment: figment::Figment) -> figment::Figment {
    figment.merge(figment::providers::Serialized::default("worker.delivery_limit", 2))
}

/// Take the head of `queue` without acking it, then close the channel: the
/// broker puts it back, as it does with the jobs a worker holds unstarted
/// when it hands its shard over. The `x-delivery-count` it was delivered with.
async fn take_and_give_back(env: &TestEnv, queue: &str) -> i64 {
    let channel = env.connection.create_channel().await.unwrap();
    channel.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut consumer =
        channel.basic_consume(queue.into(), "handover".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.expect("a delivery").unwrap().unwrap();
    let count = match delivery.properties.headers().as_ref().and_then(|h| h.inner().get("x-delivery-count")) {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        _ => 0,
    };
    channel.close(200, "handed over".into()).await.unwrap();
    count
}

/// A job returned to its queue unstarted six times (three times the crash
/// limit) is still delivered, once. Before, the broker's limit was the crash
/// limit itself, and the third return dead-lettered a job nobody had tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_handed_over_more_often_than_the_delivery_limit_is_still_delivered() {
    let env = TestEnv::with(two_org_world(), Default::default(), crash_limit_two).await;
    env.seed_two_orgs().await;
    let job = job("org-a", CONV_A, "handed over six times");
    env.publish(&job).await;
    let queue = env.topology.work_queue();
    let mut counts = Vec::new();
    for _ in 0..6 {
        counts.push(take_and_give_back(&env, &queue).await);
    }
    // The broker counted each return (RabbitMQ before 4.3 does; 4.3 and
    // later count none of them).
    assert!(counts.iter().all(|&c| c == 0) || counts == [0, 1, 2, 3, 4, 5], "{counts:?}");
    env.settles_at(&queue, 1).await;

    let worker = env.spawn_worker();
    let record = env.sent(&job.id.to_string()).await;
    env.drained().await;
    worker.stop().await;
    assert_eq!(env.activities(1).await.len(), 1);
    assert_eq!(record.takeovers, 0, "no attempt crashed");
    assert_eq!(env.queue_len(&env.topology.dead_queue()).await, 0, "nothing was dead-lettered");
}

/// A job whose post is under way each time its worker is killed: the next
/// worker takes its claim over once the lease ran out and posts again, and
/// at the second take-over (the limit) it is dead-lettered
/// `delivery_limit_exceeded` without a third post.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_workers_die_mid_send_is_dead_lettered_at_the_delivery_limit() {
    let env = TestEnv::with(two_org_world(), Default::default(), crash_limit_two).await;
    env.seed_two_orgs().await;
    // Teams records each post and holds its answer: the worker is killed
    // while it waits.
    let stall = Rule { route: Route::Send, action: Some(Action::Stall { ms: 30_000 }), probability: Some(1.0), ..Default::default() };
    env.sim.client().add_fault(&stall).await.unwrap();
    let settings = [("HERALD_WORKER__DELIVERY_LIMIT", "2"), ("HERALD_WORKER__CLAIM_LEASE_SECS", "10")];
    let job = job("org-a", CONV_A, "kills its workers");
    let id = job.id.to_string();
    env.publish(&job).await;

    for posts in 1..=2 {
        let worker = env.worker_process(&settings);
        env.activities(posts).await;
        kill(&worker);
        let _ = worker.wait_with_output().await;
    }
    let worker = env.worker_process(&settings);
    let letters = env.dead_letters(1).await;
    let record = eventually("the ledger to say dead_lettered", Duration::from_secs(30), || async {
        env.store.delivery(&id).await.unwrap().filter(|d| d.state == DeliveryState::DeadLettered)
    })
    .await;
    terminate(worker).await;
    assert_eq!(letters[0].reason.as_deref(), Some("delivery_limit_exceeded"), "{letters:?}");
    assert_eq!(record.takeovers, 2, "{record:?}");
    assert_eq!(env.activities(2).await.len(), 2, "no third post");
}

/// Queues declared by a version that gave them another delivery limit:
/// `herald setup` names them and goes on (declaring uses them as they are,
/// as a worker does), `herald doctor` fails naming them, and `herald setup --migrate` rebuilds them while a
/// producer goes on publishing. Every job is posted once, the older ones in
/// the order they were published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_rebuilds_queues_declared_with_the_old_delivery_limit_and_keeps_their_jobs() {
    let old = |f: figment::Figment| f.merge(figment::providers::Serialized::default("worker.broker_delivery_limit", 20));
    let env = TestEnv::with(two_org_world(), Default::default(), old).await;
    env.seed_two_orgs().await;
    let queue = env.topology.work_queue();
    let before: Vec<_> = (0..40).map(|i| job("org-a", CONV_A, &format!("before {i:02}"))).collect();
    for job in &before {
        env.publish(job).await;
    }

    let setup = env.herald(&["setup"]).await;
    assert!(setup.status.success(), "a rolling upgrade's init container goes on: {}", stderr(&setup));
    assert!(stderr(&setup).contains(&format!("queue {queue} exists with other arguments")), "{}", stderr(&setup));
    let doctor = env.herald(&["doctor"]).await;
    assert!(!doctor.status.success());
    assert!(stdout(&doctor).contains("herald setup --migrate"), "{}", stdout(&doctor));
    env.settles_at(&queue, 40).await;

    // A producer publishes throughout the rebuild.
    let during: Vec<_> = (0..40).map(|i| job("org-b", CONV_B, &format!("during {i:02}"))).collect();
    let migrate = env.herald(&["setup", "--migrate"]);
    let publish = async {
        for job in &during {
            env.publish(job).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (migrated, ()) = tokio::join!(migrate, publish);
    assert!(migrated.status.success(), "{}{}", stdout(&migrated), stderr(&migrated));
    let report = stdout(&migrated);
    let line = report.lines().find(|l| l.starts_with(&format!("queue {queue} rebuilt"))).unwrap_or_else(|| panic!("{report}"));
    let numbers: Vec<u64> = line.split(' ').filter_map(|w| w.parse().ok()).collect();
    let [kept, arrived] = numbers[..] else { panic!("{line}") };
    assert!(kept >= 40 && kept + arrived >= 80, "every job the queue held or got meanwhile is in it: {line}");
    assert!(env.herald(&["doctor"]).await.status.success(), "the queues now have this version's arguments");
    assert!(!stderr(&env.herald_ok(&["setup"]).await).contains("other arguments"));

    let worker = env.worker_process(&[]);
    let records = env.activities(80).await;
    env.drained().await;
    terminate(worker).await;
    let titles = posts_by_title(&records);
    assert_eq!(titles.len(), 80, "every job posted");
    assert!(titles.values().all(|&n| n == 1), "none twice: {titles:?}");
    let order: Vec<_> = records.iter().map(title).filter(|t| t.starts_with("before")).collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "the jobs the queue held keep their order");
}
