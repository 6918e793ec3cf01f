//! Connection resilience: the broker restarted and MongoDB stopped for 30 s,
//! with the worker running. These tests stop shared services, so they live in
//! their own test binary (cargo runs test binaries one after another) and run
//! one at a time.

#[path = "../it/support.rs"]
mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl").args(args).status().expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reconnects_after_a_broker_restart_without_a_process_restart() {
    let _serial = SERIAL.lock().await;
    let mut env = TestEnv::new(two_org_world()).await;
    env.seed_two_orgs().await;
    let worker = env.spawn_worker();
    for i in 0..10 {
        env.publish(&job("org-a", CONV_A, &format!("before-{i}"))).await;
    }
    env.activities(10).await;
    let fleet = mongodb::Client::with_uri_str("mongodb://127.0.0.1:27017/?directConnection=true")
        .await
        .unwrap()
        .database(&env.settings.mongodb_database)
        .collection::<mongodb::bson::Document>("fleet");
    let workers = || async {
        let found: Vec<mongodb::bson::Document> =
            futures_util::TryStreamExt::try_collect(fleet.find(mongodb::bson::doc! { "kind": "worker" }).await.unwrap()).await.unwrap();
        found.iter().map(|d| d.get_str("_id").unwrap().to_owned()).collect::<Vec<_>>()
    };
    let before = workers().await;
    assert_eq!(before.len(), 1, "{before:?}");

    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);

    env.reconnect().await;
    for i in 0..10 {
        env.publish(&job("org-a", CONV_A, &format!("after-{i}"))).await;
    }
    let records = env.activities(20).await;
    assert_eq!(records.len(), 20, "the same worker delivered the jobs published after the restart");
    // The same name in the fleet after the reconnect: its own earlier record
    // (and the requests it wrote there) is never counted as another worker's.
    assert_eq!(workers().await, before, "one fleet record, under the same name");
    env.drained().await;
    worker.stop().await;
}

fn mongo_port_open() -> bool {
    std::net::TcpStream::connect_timeout(&"127.0.0.1:27017".parse().unwrap(), Duration::from_millis(200)).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_wait_through_a_30_second_mongodb_outage_and_are_then_delivered() {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::two_orgs().await;
    let worker = env.spawn_worker();
    env.publish(&job("org-a", CONV_A, "before")).await;
    env.activities(1).await;

    // Restart it later exactly as it runs now (same storage path, same data).
    let pid = String::from_utf8(Command::new("pgrep").args(["-f", "secantusd-rs --host"]).output().unwrap().stdout).unwrap();
    let pid = pid.lines().next().expect("SecantusDB is running").trim().to_owned();
    let argv: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let stopped = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(stopped.success(), "SecantusDB was running");
    eventually("MongoDB to stop", Duration::from_secs(20), || async { (!mongo_port_open()).then_some(()) }).await;
    for i in 0..10 {
        env.publish(&job("org-a", CONV_A, &format!("during-{i}"))).await;
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(env.sim.client().stats().await.unwrap().activities_total, 1, "nothing can be sent without the ledger");
    let log = std::fs::File::create(std::env::temp_dir().join("herald-resilience-secantusd.log")).unwrap();
    // `setsid --fork` returns at once and leaves the server running on its own.
    let started =
        Command::new("setsid").arg("--fork").args(&argv).stdout(log.try_clone().unwrap()).stderr(log).status().expect("setsid runs");
    assert!(started.success(), "SecantusDB restarts");
    eventually("MongoDB to answer again", Duration::from_secs(30), || async { mongo_port_open().then_some(()) }).await;

    let records = env.activities(11).await;
    assert_eq!(records.len(), 11);
    env.drained().await;
    assert_eq!(env.queue_len(&env.topology.dead_queue()).await, 0, "waited, not dead-lettered");
    worker.stop().await;
}
