//! A producer in another language: examples/python/producer.py (pika)
//! publishes a job that the worker then delivers.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_published_with_pika_is_delivered() {
    let env = TestEnv::two_orgs().await;
    let worker = env.spawn_worker();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python/producer.py");
    let output = tokio::process::Command::new("python3")
        .arg(script)
        .args(["--org", "org-a", "--integration", INTEGRATION, "--conversation", "19:conv-a@thread.tacv2"])
        .args(["--title", "from python", "--text", "published with pika", "--severity", "warning"])
        .env("HERALD_AMQP_URL", AMQP_URL)
        .env("HERALD_TOPOLOGY_PREFIX", &env.settings.topology_prefix)
        .output()
        .await
        .expect("python3 runs (make test installs examples/python/requirements.txt)");
    assert!(output.status.success(), "producer.py failed: {}", String::from_utf8_lossy(&output.stderr));
    let job_id = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    assert_eq!(job_id.len(), 36, "prints the job id: {job_id:?}");

    let record = env.activities(1).await.remove(0);
    assert_eq!(record.app_id, "app-a");
    assert_eq!(record.conversation_id, "19:conv-a@thread.tacv2");
    assert_eq!(record.body["attachments"][0]["content"]["body"][0]["text"], "from python");
    assert_eq!(record.body["attachments"][0]["content"]["body"][0]["color"], "Warning");
    let delivery = env.sent(&job_id).await;
    assert_eq!(delivery.activity_id.as_deref(), Some(record.activity_id.as_str()));

    // A publish the broker cannot route is an error in Python too.
    let unroutable = tokio::process::Command::new("python3")
        .arg(script)
        .args(["--org", "org-a", "--integration", INTEGRATION, "--conversation", "c", "--title", "t"])
        .env("HERALD_AMQP_URL", AMQP_URL)
        .env("HERALD_TOPOLOGY_PREFIX", format!("{}-missing", env.settings.topology_prefix))
        .output()
        .await
        .unwrap();
    assert!(!unroutable.status.success(), "publishing to a missing exchange must fail");
    worker.stop().await;
}
