//! SIGTERM drains the `herald worker` process without losing or repeating a job.

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use teams_sim as sim;

use crate::support::*;

fn titles(records: &[sim::ActivityRecord]) -> Vec<String> {
    records.iter().map(|r| r.body["attachments"][0]["content"]["body"][0]["text"].as_str().unwrap().to_owned()).collect()
}

/// Each thread of process `pid` with its scheduling policy (`/proc/PID/task/TID/stat`, field 41).
fn thread_policies(pid: &str) -> Vec<(String, u32)> {
    let mut policies = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the worker runs") {
        let task = task.unwrap().path();
        let (Ok(stat), Ok(name)) = (std::fs::read_to_string(task.join("stat")), std::fs::read_to_string(task.join("comm"))) else {
            continue;
        };
        let after_name = &stat[stat.rfind(')').expect("a stat line") + 2..];
        let policy = after_name.split(' ').nth(41 - 3).expect("field 41").parse().expect("a number");
        policies.push((name.trim().to_owned(), policy));
    }
    policies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_jobs_and_loses_none() {
    let env = TestEnv::two_orgs().await;
    let client = env.sim.client();
    client.set_throttling(&sim::Throttling { enabled: false, limits: None }).await.unwrap();
    client.set_latency(sim::Latency::Fixed { ms: 200 }).await.unwrap();
    const JOBS: usize = 40;
    for i in 0..JOBS {
        env.publish(&job("org-a", CONV_A, &format!("job-{i}"))).await;
    }

    let mut process = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("worker")
        .envs(env.env_vars())
        .env("HERALD_WORKER__CONCURRENCY", "4")
        .env("HERALD_WORKER__PREFETCH", "8")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("herald worker starts");
    env.activities(6).await;
    let pid = process.id().expect("running").to_string();
    // worker.batch_scheduling (on by default): every thread of the worker,
    // lapin's I/O threads included, runs under SCHED_BATCH (3).
    let policies = thread_policies(&pid);
    assert!(policies.len() >= 3, "tokio's thread and an I/O thread per connection: {policies:?}");
    assert!(policies.iter().all(|(_, policy)| *policy == 3), "{policies:?}");
    let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(15), process.wait()).await.expect("exits within the drain deadline").unwrap();
    assert!(exit.success(), "clean exit after SIGTERM: {exit:?}");

    let delivered = client.all_activities().await.unwrap();
    assert!(delivered.len() < JOBS, "the test must stop the worker mid-run ({} delivered)", delivered.len());
    let remaining = eventually("unacked jobs to return to the queue", Duration::from_secs(10), || async {
        let n = env.waiting().await as usize;
        (n + delivered.len() == JOBS).then_some(n)
    })
    .await;
    assert_eq!(remaining + delivered.len(), JOBS, "every job is either delivered or back in the queue");

    // A new worker delivers the rest; nothing twice.
    let worker = env.spawn_worker();
    let records = env.activities(JOBS).await;
    env.drained().await;
    let distinct: HashSet<String> = titles(&records).into_iter().collect();
    assert_eq!(records.len(), JOBS);
    assert_eq!(distinct.len(), JOBS);
    worker.stop().await;
}
