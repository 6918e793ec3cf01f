//! `amqp_url` with several brokers (the nodes of a cluster): a worker whose
//! list starts with a node that does not answer connects to the next one
//! and delivers; `herald doctor` connects the same way. (The loss of a node
//! of a real three-node cluster is issue 35's test; this one holds the
//! list's rules.)

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_connects_to_the_next_broker_when_one_does_not_answer() {
    let env = TestEnv::two_orgs().await;
    // Nothing listens there: connection refused, at once.
    let dead = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let urls = format!("{dead}, {AMQP_URL}");
    let doctor = env.herald_command(&["doctor"]).env("HERALD_AMQP_URL", &urls).output().await.unwrap();
    assert!(doctor.status.success(), "{}{}", stdout(&doctor), stderr(&doctor));
    assert!(stdout(&doctor).contains("ok    rabbitmq: connected to amqp://guest:***@127.0.0.1:"), "{}", stdout(&doctor));

    // Both orders: whichever node a process starts with, it ends on the live one.
    let backwards = format!("{AMQP_URL},{dead}");
    for list in [&urls, &backwards] {
        let worker = env.worker_process(&[("HERALD_AMQP_URL", list.as_str())]);
        let title = format!("through {}", if list.starts_with(&dead) { "the second" } else { "the first" });
        env.publish(&job("org-a", CONV_A, &title)).await;
        eventually(&format!("the job sent {title}"), std::time::Duration::from_secs(30), || async {
            let records = env.sim.client().activities(&Default::default()).await.ok()?;
            records.iter().any(|r| super::support::title(r) == title).then_some(())
        })
        .await;
        terminate(worker).await;
    }

    let refused = env.herald_command(&["doctor"]).env("HERALD_AMQP_URL", format!("{dead},http://x")).output().await.unwrap();
    assert!(!refused.status.success(), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("amqp_url"), "{}", stderr(&refused));
}
