//! The worker's health, readiness and Prometheus metrics endpoint.

use figment::providers::Serialized;

use crate::support::*;

const CONV_A: &str = "19:conv-a@thread.tacv2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let port = free_port();
    let env =
        TestEnv::with(two_org_world(), Default::default(), |f| f.merge(Serialized::default("http.listen", format!("127.0.0.1:{port}"))))
            .await;
    env.seed_two_orgs().await;
    env.sim.client().remove_from_roster("19:conv-b@thread.tacv2", "app-b").await.unwrap();
    let worker = env.spawn_worker();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    eventually("readiness", std::time::Duration::from_secs(10), || async {
        let response = http.get(format!("{base}/readyz")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200);

    env.publish(&job("org-a", CONV_A, "ok")).await;
    env.publish(&job("org-b", "19:conv-b@thread.tacv2", "refused")).await;
    env.activities(1).await;
    env.dead_letters(1).await;
    let text = eventually("metrics to count both jobs", std::time::Duration::from_secs(10), || async {
        let text = http.get(format!("{base}/metrics")).send().await.ok()?.text().await.ok()?;
        text.contains("herald_jobs_total{outcome=\"dead_lettered\"} 1").then_some(text)
    })
    .await;
    for line in [
        "herald_jobs_total{outcome=\"delivered\"} 1",
        "herald_dead_letters_total{reason=\"teams_forbidden\"} 1",
        "herald_teams_requests_total{class=\"2xx\"} 1",
        "herald_teams_requests_total{class=\"4xx\"} 1",
        "herald_token_requests_total 2",
        "herald_conversations_quarantined_total 1",
        "herald_jobs_in_flight 0",
        "herald_consumer_active 1",
        "herald_job_duration_seconds_count 2",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(!text.contains("org-a") && !text.contains("org-b"), "no organization ids as labels");

    worker.stop().await;
    let after = http.get(format!("{base}/readyz")).send().await;
    assert!(after.is_err() || after.unwrap().status() != 200, "not ready once stopped");
    env.teardown().await;
}
