//! The worker's health, readiness and Prometheus metrics endpoint.

use figment::providers::Serialized;

use crate::support::*;

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
}

/// The producer's W3C trace continues in the worker: the job's span carries
/// the published trace id in the logs, and is exported over OTLP/HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_of_a_published_job_continues_in_the_worker_and_is_exported() {
    use std::sync::{Arc, Mutex};

    let env = TestEnv::two_orgs().await;
    // A minimal OTLP/HTTP collector that keeps every request body.
    let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let keep = bodies.clone();
    let collector = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let keep = keep.clone();
            async move {
                keep.lock().unwrap().push(body.to_vec());
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let dir = std::env::temp_dir().join(format!("herald-it-{}", env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let log_path = dir.join("worker.log");
    let mut process = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("worker")
        .envs(env.env_vars())
        .env("HERALD_TELEMETRY__OTLP_ENDPOINT", format!("http://{collector_addr}"))
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let job = job("org-a", CONV_A, "traced");
    env.producer.publish_raw(&wire(&job), &job.id.to_string(), Some(&format!("00-{trace_id}-00f067aa0ba902b7-01"))).await.unwrap();
    env.activities(1).await;
    // The batch exporter flushes at shutdown.
    std::process::Command::new("kill").args(["-TERM", &process.id().unwrap().to_string()]).status().unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(15), process.wait()).await.unwrap().unwrap();

    let log = std::fs::read_to_string(&log_path).unwrap();
    let delivered = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "delivered")
        .unwrap_or_else(|| panic!("no delivered line in\n{log}"));
    assert_eq!(delivered["span"]["trace_id"], trace_id, "{delivered}");
    assert_eq!(delivered["span"]["job_id"], job.id.to_string());

    let raw_trace_id: Vec<u8> = (0..16).map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap()).collect();
    let exported = bodies.lock().unwrap().iter().any(|b| b.windows(16).any(|w| w == raw_trace_id.as_slice()));
    assert!(exported, "the job's span was exported over OTLP with the producer's trace id");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The fleet's gauges follow what a worker really consumes. Its MongoDB
/// stalls (a proxy stops every connection for 10 s): its leases cannot be
/// renewed, it stops routing and consuming its shards, and its metrics say
/// so (0 of 4 shards, no router) while jobs wait in the work queue and none
/// is processed: the conditions of HeraldShardsUnheld, HeraldRouterUnheld
/// and HeraldWorkNotDraining (deploy/prometheus/herald-rules.test.yaml feeds
/// these series to the rules). Once MongoDB answers, it holds them again and
/// the jobs are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_gauges_tell_when_shards_and_the_router_are_unheld() {
    use std::time::Duration;
    let env = TestEnv::with(two_org_world(), Default::default(), |f| f.merge(Serialized::default("fleet.shards", 4))).await;
    env.seed_two_orgs().await;
    let proxy = StallProxy::start("127.0.0.1:27017").await;
    let uri = proxy.mongodb_uri();
    let worker = env.observed_worker(&[
        ("HERALD_MONGODB_URI", uri.as_str()),
        ("HERALD_MONGODB_COMMAND_TIMEOUT_MS", "1000"),
        ("HERALD_FLEET__SHARDS", "4"),
        ("HERALD_FLEET__LEASE_SECS", "3"),
        ("HERALD_FLEET__HEARTBEAT_MS", "500"),
        ("HERALD_METRICS__QUEUE_POLL_SECS", "1"),
    ]);
    let series = |page: &str, name: &str| metric(page, name);
    let held =
        |page: &str| (series(page, "herald_fleet_units_held{unit=\"shard\"}"), series(page, "herald_fleet_units_held{unit=\"router\"}"));
    eventually("the worker to hold every shard and the router", Duration::from_secs(30), || async {
        let page = worker.metrics().await;
        (series(&page, "herald_fleet_shards") == 4.0 && held(&page) == (4.0, 1.0)).then_some(())
    })
    .await;
    env.publish(&job("org-a", CONV_A, "before the stall")).await;
    env.activities(1).await;

    proxy.stall(Duration::from_secs(10));
    let page = eventually("the gauges to say nothing is held", Duration::from_secs(15), || async {
        let page = worker.metrics().await;
        (held(&page) == (0.0, 0.0)).then_some(page)
    })
    .await;
    assert_eq!(series(&page, "herald_fleet_shards"), 4.0, "the worker still says how many shards the fleet must hold");
    let processed = series(&page, "herald_jobs_total");
    for i in 0..5 {
        env.publish(&job("org-a", CONV_A, &format!("during the stall {i}"))).await;
    }
    let page = eventually("the waiting jobs in the queue gauge", Duration::from_secs(10), || async {
        let page = worker.metrics().await;
        (series(&page, "herald_queue_messages{queue=\"work\"}") >= 5.0).then_some(page)
    })
    .await;
    assert_eq!(held(&page), (0.0, 0.0));
    assert_eq!(series(&page, "herald_jobs_total"), processed, "nothing is processed meanwhile");

    eventually("the worker to hold them again", Duration::from_secs(60), || async {
        (held(&worker.metrics().await) == (4.0, 1.0)).then_some(())
    })
    .await;
    assert_eq!(env.activities(6).await.len(), 6, "the waiting jobs are delivered");
    worker.stop().await;
}
