//! One bad job never hurts another: oversized fields, forged herald headers,
//! a panic, hostile Connector answers, a publishing channel that dies, and
//! credentials in odd places. Each test runs a real `herald worker` process
//! against the real broker, MongoDB-protocol server and teams-sim, and reads
//! its metrics to prove the connection stayed up.

use herald::mongo::{ConversationKind, OrgIntegrationDoc};
use std::process::Stdio;

use lapin::BasicProperties;
use lapin::options::ExchangeDeleteOptions;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use teams_sim::{Action, Route, Rule};

use crate::support::*;

const BIG: usize = 150 * 1024;

/// Good jobs of both organizations, to publish around the bad ones.
async fn good_jobs(env: &TestEnv, n: usize, label: &str) {
    for i in 0..n {
        let (org, conversation) = if i % 2 == 0 { ("org-a", CONV_A) } else { ("org-b", CONV_B) };
        env.publish(&job(org, conversation, &format!("{label} {i}"))).await;
    }
}

/// Every header of a dead letter is bounded, and all of them together fit
/// far inside RabbitMQ's default frame_max (128 KiB).
fn assert_bounded(letter: &herald::dlq::DeadLetter) {
    let total: usize = letter.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    for (key, value) in &letter.headers {
        assert!(value.len() <= 1024 + 64, "{key} is {} bytes", value.len());
    }
    assert!(total < 16 * 1024, "{total} bytes of headers");
}

/// A 150 KB value in each field of a job (its body under the 256 KiB limit):
/// each is one dead letter with bounded headers naming the original length,
/// the worker never loses its broker connection, and every good job of
/// every tenant around them is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_150_kb_value_in_any_field_is_one_bounded_dead_letter_and_no_reconnect() {
    let env = TestEnv::two_orgs().await;
    let worker = env.observed_worker(&[]);
    let big = "x".repeat(BIG);
    let mut bad = Vec::new();
    for (field, pointer) in [
        ("job_id", "/job_id"),
        ("organization_id", "/organization_id"),
        ("integration_id", "/integration_id"),
        ("conversation_id", "/recipient/conversation_id"),
        ("title", "/message/title"),
    ] {
        let mut value = job_value("org-a", CONV_A, "poison");
        *value.pointer_mut(pointer).unwrap() = json!(big);
        bad.push((field, serde_json::to_vec(&value).unwrap()));
    }
    // A producer header that alone would not fit a herald dead letter's budget.
    let mut headers = FieldTable::default();
    headers.insert("x-producer-notes".into(), AMQPValue::LongString("n".repeat(100 * 1024).into()));
    let unknown_org = job("org-unknown", CONV_A, "with a huge producer header");

    good_jobs(&env, 10, "before").await;
    for (field, body) in &bad {
        env.publish_raw(body, &format!("poison-{field}")).await;
    }
    let id = unknown_org.id.to_string();
    let properties = BasicProperties::default().with_message_id(id.as_str().into()).with_headers(headers);
    env.publish_with(&env.topology.jobs_exchange(), &wire(&unknown_org), properties).await;
    good_jobs(&env, 10, "after").await;

    env.activities(20).await;
    let letters = env.dead_letters(bad.len() + 1).await;
    assert_eq!(letters.len(), bad.len() + 1, "one dead letter each");
    letters.iter().for_each(assert_bounded);
    let reason_of = |id: &str| letters.iter().find(|l| l.message_id.as_deref() == Some(id)).and_then(|l| l.reason.clone());
    assert_eq!(reason_of("poison-job_id").as_deref(), Some("invalid_job"));
    assert_eq!(reason_of("poison-organization_id").as_deref(), Some("org_integration_not_found"));
    assert_eq!(reason_of("poison-integration_id").as_deref(), Some("org_integration_not_found"));
    assert_eq!(reason_of("poison-conversation_id").as_deref(), Some("recipient_not_in_organization"));
    assert_eq!(reason_of("poison-title").as_deref(), Some("payload_too_large"));
    let clipped = letters.iter().find(|l| l.message_id.as_deref() == Some("poison-organization_id")).unwrap();
    assert!(clipped.headers["x-herald-organization-id"].contains(&format!("{BIG} bytes")), "{:?}", clipped.headers);
    let dropped = letters.iter().find(|l| l.message_id.as_deref() == Some(id.as_str())).unwrap();
    assert!(dropped.headers["x-herald-dropped-headers"].starts_with("1 header(s), 102426 bytes"), "{:?}", dropped.headers);
    assert_eq!(dropped.body.len(), wire(&unknown_org).len(), "the body is kept whole");

    assert_eq!(worker.metric("herald_broker_reconnects_total").await, 0.0, "the connection stayed up");
    assert_eq!(env.sim.client().stats().await.unwrap().activities_total, 20, "every good job posted once");
    worker.stop().await;
}

/// Producers can set `x-herald-*` headers. A forged attempts count, hop
/// count, replay count, reason or organization on a job's first delivery
/// is ignored: the job gets its full retry budget, and its dead letter (if
/// any) carries what herald saw, never what the producer claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_herald_headers_are_ignored_and_never_reach_a_dead_letter() {
    let env = TestEnv::two_orgs().await;
    // One transient error: a job whose forged hop count were believed would be dead-lettered now.
    let busy = Action::Status { status: 503, code: None, retry_after: None };
    env.sim.client().add_fault(&Rule { route: Route::Send, sequence: vec![busy; 4], ..Default::default() }).await.unwrap();
    let worker = env.observed_worker(&[("HERALD_RETRY__QUICK_ATTEMPTS", "2")]);
    let forged = || {
        let mut table = FieldTable::default();
        table.insert("x-herald-attempts".into(), AMQPValue::LongLongInt(i64::MAX));
        table.insert("x-herald-retry-hops".into(), AMQPValue::LongString("99".into()));
        table.insert("x-herald-replays".into(), AMQPValue::LongLongInt(99));
        table.insert("x-herald-reason".into(), AMQPValue::LongString("teams_forbidden".into()));
        table.insert("x-herald-organization-id".into(), AMQPValue::LongString("org-b".into()));
        table.insert("x-herald-signature".into(), AMQPValue::LongString("00".repeat(32).into()));
        table
    };
    let publish_forged = |job: herald::job::Job| {
        let env = &env;
        let table = forged();
        async move {
            let id = job.id.to_string();
            let properties = BasicProperties::default().with_message_id(id.as_str().into()).with_headers(table);
            env.publish_with(&env.topology.jobs_exchange(), &wire(&job), properties).await;
        }
    };
    publish_forged(job("org-a", CONV_A, "forged but good")).await;
    env.activities(1).await;
    publish_forged(job("org-ghost", CONV_A, "forged and unknown")).await;
    let letter = env.dead_letters(1).await.remove(0);
    assert_eq!(letter.reason.as_deref(), Some("org_integration_not_found"));
    assert_eq!(letter.organization_id.as_deref(), Some("org-ghost"), "what herald saw, not the forged org-b");
    assert!(!letter.unverified_headers, "herald's own letter verifies: {:?}", letter.headers);
    assert!(letter.headers.get("x-herald-replays").is_none_or(|r| r == "0"), "{:?}", letter.headers);
    let listed = env.herald_ok(&["dlq", "list", "--org", "org-b", "--json"]).await;
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&listed.stdout).unwrap(), json!([]));
    assert!(worker.metric("herald_forged_headers_total").await >= 2.0);
    worker.stop().await;
}

/// A panic while processing one job ends in a dead letter `internal_error`,
/// a metric and an error log; the worker goes on with the next job.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_dead_lettered_internal_error_and_the_worker_goes_on() {
    let env = TestEnv::two_orgs().await;
    let worker = env.observed_worker(&[]);
    env.publish(&job("org-a", CONV_A, "herald-fault: panic")).await;
    env.publish(&job("org-b", CONV_B, "after the panic")).await;
    let letter = env.dead_letters(1).await.remove(0);
    assert_eq!(letter.reason.as_deref(), Some("internal_error"));
    assert!(letter.headers["x-herald-error"].contains("fault injection"), "{:?}", letter.headers);
    env.activities(1).await;
    assert_eq!(worker.metric("herald_internal_errors_total").await, 1.0);
    assert_eq!(worker.metric("herald_broker_reconnects_total").await, 0.0);
    let log = worker.stop().await;
    assert!(log.lines().any(|l| l.contains("\"ERROR\"") && l.contains("panic")), "an error log line");
}

/// `Retry-After` as an HTTP-date is honoured, and an absurd one (a year
/// away) is clamped: the job waits in a retry tier, not for a year.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_as_an_http_date_is_honoured_and_clamped() {
    let env = TestEnv::two_orgs().await;
    let client = env.sim.client();
    let dated = |secs| Action::RetryAt { status: 429, secs };
    client.add_fault(&Rule { route: Route::Send, sequence: vec![dated(1), dated(365 * 86_400)], ..Default::default() }).await.unwrap();
    let worker = env.observed_worker(&[]);
    env.publish(&job("org-a", CONV_A, "dated")).await;
    env.activities(1).await;
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.responses_by_status.get(&429), Some(&2));
    assert_eq!(stats.activities_total, 1);
    assert_eq!(env.queue_len(&env.topology.dead_queue()).await, 0);
    worker.stop().await;
}

/// A Connector that sends its 201's headers and then hangs, and one whose
/// 201 body is 10 MB: the post happened, the answer cannot be read within
/// the limits. Both end `unconfirmed` within the request timeout, never resent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_that_hangs_after_headers_or_floods_its_body_is_unconfirmed_in_time() {
    let env = TestEnv::two_orgs().await;
    let client = env.sim.client();
    let sequence = vec![Action::Stall { ms: 60_000 }, Action::Flood { bytes: 10_000_000 }];
    client.add_fault(&Rule { route: Route::Send, conversation_id: Some(CONV_A.into()), sequence, ..Default::default() }).await.unwrap();
    let worker = env.observed_worker(&[]);
    env.publish(&job("org-a", CONV_A, "stalled")).await;
    env.dead_letters(1).await;
    env.publish(&job("org-a", CONV_A, "flooded")).await;
    env.publish(&job("org-b", CONV_B, "unaffected")).await;
    let letters = env.dead_letters(2).await;
    assert!(letters.iter().all(|l| l.reason.as_deref() == Some("delivery_unconfirmed")), "{letters:?}");
    env.activities(3).await;
    assert_eq!(worker.metric("herald_deliveries_unconfirmed_total").await, 2.0);
    worker.stop().await;
    assert_eq!(client.stats().await.unwrap().activities_total, 3, "nothing was resent");
}

/// The dead-letter exchange is deleted under a running worker: its
/// publishing channel dies on the next dead letter. The worker reopens the
/// channel, declares the topology again, publishes, and goes on, on the same
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publishing_channel_heals_when_the_dead_letter_exchange_is_deleted() {
    let env = TestEnv::two_orgs().await;
    let worker = env.observed_worker(&[]);
    env.publish(&job("org-a", CONV_A, "warm up")).await;
    env.activities(1).await;
    let channel = env.connection.create_channel().await.unwrap();
    channel.exchange_delete(env.topology.dead_exchange().as_str().into(), ExchangeDeleteOptions::default()).await.unwrap();
    env.publish(&job("org-nobody", CONV_A, "dead letter without an exchange")).await;
    let letter = env.dead_letters(1).await.remove(0);
    assert_eq!(letter.reason.as_deref(), Some("org_integration_not_found"));
    env.publish(&job("org-b", CONV_B, "after the heal")).await;
    env.activities(2).await;
    assert!(worker.metric("herald_publish_retries_total").await >= 1.0);
    assert_eq!(worker.metric("herald_broker_reconnects_total").await, 0.0, "the connection was never lost");
    let log = worker.stop().await;
    assert!(log.contains("NOT_FOUND") || log.contains("not found"), "the log says what failed");
}

/// Credentials inside a stored `service_url`, and in the AMQP and MongoDB
/// URLs the worker was given, never appear in a log line, an error, a dead
/// letter or a metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_urls_never_reach_a_log_a_dead_letter_or_a_metric() {
    const IN_SERVICE_URL: &str = "svc-pw-3141-SECRET";
    const IN_AMQP_URL: &str = "amqp-pw-2718-SECRET";
    const IN_MONGO_URL: &str = "mongo-pw-1618-SECRET";
    let env = TestEnv::two_orgs().await;
    let sneaky = OrgIntegrationDoc {
        service_url: env.sim.service_url().replacen("http://", &format!("http://herald:{IN_SERVICE_URL}@"), 1),
        ..env.org_integration("org-c", "app-a", "tenant-a")
    };
    env.insert_org_integration(sneaky).await;
    env.insert_conversation("org-c", CONV_A, ConversationKind::Channel, None).await;
    let worker = env.observed_worker(&[("HERALD_LOG__FILTER", "debug")]);
    env.publish(&job("org-c", CONV_A, "through a URL with credentials")).await;
    let letter = env.dead_letters(1).await.remove(0);
    assert_eq!(letter.reason.as_deref(), Some("service_url_not_allowed"));
    let metrics = worker.metrics().await;
    let log = worker.stop().await;
    assert_eq!(env.sim.client().stats().await.unwrap().requests_total, 0, "no request at all, token included");

    // A worker and a doctor given wrong credentials in their URLs fail, and say so without them.
    let broker = format!("amqp://guest:{IN_AMQP_URL}@127.0.0.1:5672/%2f");
    let mongo = format!("mongodb://herald:{IN_MONGO_URL}@127.0.0.1:{}/?directConnection=true&serverSelectionTimeoutMS=1000", free_port());
    // The worker keeps trying to connect (a broker may come back): give it a few tries, then stop it.
    let mut failing = env.herald_command(&["worker"]);
    failing.env("HERALD_AMQP_URL", &broker).env("HERALD_LOG__FILTER", "debug").stdout(Stdio::piped()).stderr(Stdio::piped());
    let failing = failing.spawn().unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let pid = failing.id().unwrap().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let failed_worker = tokio::time::timeout(std::time::Duration::from_secs(15), failing.wait_with_output()).await.unwrap().unwrap();
    let doctor = env.herald_command(&["doctor"]).env("HERALD_AMQP_URL", &broker).env("HERALD_MONGODB_URI", &mongo).output().await.unwrap();
    assert!(!doctor.status.success(), "doctor fails: {}", stdout(&doctor));
    assert!(
        stderr(&failed_worker).contains("ACCESS_REFUSED") || stderr(&failed_worker).to_lowercase().contains("auth"),
        "{}",
        stderr(&failed_worker)
    );

    let haystacks = [
        ("worker log", log),
        ("metrics", metrics),
        ("dead letter", format!("{:?} {}", letter.headers, letter.body)),
        ("failed worker", format!("{}{}", stdout(&failed_worker), stderr(&failed_worker))),
        ("doctor", format!("{}{}", stdout(&doctor), stderr(&doctor))),
    ];
    for (what, text) in &haystacks {
        for needle in [IN_SERVICE_URL, IN_AMQP_URL, IN_MONGO_URL] {
            assert!(!text.contains(needle), "{what} contains a credential from a URL:\n{text}");
        }
    }
    assert!(letter.headers["x-herald-error"].contains("***"), "the URL is shown redacted: {:?}", letter.headers);
    assert!(haystacks[4].1.contains("***"), "doctor shows the URLs redacted");
}

/// A careless producer's 12 MiB messages amid good jobs: the router refuses
/// each unread (the broker dead-letters it: `invalid_job`, body kept), no
/// shard ever holds one, the connection stays up and every good job of
/// every tenant is posted once. (What they cost in memory is the bench's
/// figure, not a test's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_many_megabytes_are_refused_at_the_router_and_other_tenants_go_on() {
    const HUGE: usize = 12 << 20;
    const COUNT: usize = 6;
    let env = TestEnv::two_orgs().await;
    let worker = env.observed_worker(&[]);
    good_jobs(&env, 10, "before").await;
    let mut huge = job_value("org-a", CONV_A, "huge");
    huge["message"]["text"] = json!("x".repeat(HUGE));
    let huge = serde_json::to_vec(&huge).unwrap();
    for i in 0..COUNT {
        env.publish_raw(&huge, &format!("huge-{i}")).await;
    }
    good_jobs(&env, 10, "after").await;

    env.activities(20).await;
    let letters = env.dead_letters(COUNT).await;
    let refused: Vec<_> = letters.iter().filter(|l| l.message_id.as_deref().is_some_and(|id| id.starts_with("huge-"))).collect();
    assert_eq!(refused.len(), COUNT, "one dead letter each");
    for letter in refused {
        assert_eq!(letter.reason.as_deref(), Some("invalid_job"));
        assert!(letter.headers["x-herald-error"].contains("refused by the router"), "{:?}", letter.headers.get("x-herald-error"));
        assert!(!letter.headers.contains_key("x-herald-reason"), "the broker dead-lettered it: herald never copied the body");
        assert_eq!(letter.body.len(), huge.len(), "the body is kept whole");
    }
    assert_eq!(worker.metric("herald_broker_reconnects_total").await, 0.0, "the connection stayed up");
    let invalid = worker
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("herald_dead_letters_total") && l.contains("invalid_job"))
        .map(|l| l.to_owned())
        .collect::<Vec<_>>();
    assert!(invalid.iter().any(|l| l.ends_with(&format!(" {COUNT}"))), "counted: {invalid:?}");
    env.drained().await;
    worker.stop().await;
    assert_eq!(env.sim.client().stats().await.unwrap().activities_total, 20, "every good job posted once");
}

/// The prefetch of each consumer, by queue, as the broker's management API
/// reports it.
async fn prefetch_by_queue() -> std::collections::HashMap<String, u64> {
    let consumers: serde_json::Value = reqwest::Client::new()
        .get("http://127.0.0.1:15672/api/consumers")
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("the management API answers")
        .json()
        .await
        .expect("JSON");
    consumers
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| Some((c["queue"]["name"].as_str()?.to_owned(), c["prefetch_count"].as_u64()?)))
        .collect()
}

/// The router, which reads producers' messages before anyone checked their
/// size, is sent only as many as `worker.intake_budget_mib` holds of the
/// broker's largest message; the shards, whose jobs the router checked,
/// keep `worker.prefetch`. `herald doctor` proves the broker refuses
/// anything larger than `worker.broker_max_message_bytes` says, and fails
/// when the broker accepts more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_takes_only_what_its_memory_budget_holds_of_the_largest_message() {
    let env = TestEnv::two_orgs().await;
    let topology = herald::rabbitmq::Topology::from(&env.settings);
    // 64 MiB over the test broker's 16 MiB (scripts/services.sh): 4 at a time.
    let worker = env.observed_worker(&[("HERALD_WORKER__INTAKE_BUDGET_MIB", "64"), ("HERALD_WORKER__PREFETCH", "100")]);
    good_jobs(&env, 20, "budgeted").await;
    env.activities(20).await;
    let shard = topology.shard_queue(0);
    let prefetch = eventually("the router and the shards consuming", std::time::Duration::from_secs(20), || async {
        let prefetch = prefetch_by_queue().await;
        (prefetch.contains_key(&topology.work_queue()) && prefetch.contains_key(&shard)).then_some(prefetch)
    })
    .await;
    assert_eq!(prefetch[&topology.work_queue()], 4, "64 MiB of 16 MiB messages");
    assert_eq!(prefetch[&shard], 100, "a shard's jobs were checked by the router");
    worker.stop().await;

    let holds = env.herald(&["doctor"]).await;
    assert!(holds.status.success(), "{}", stdout(&holds));
    assert!(stdout(&holds).contains("ok    message size: RabbitMQ refuses messages over worker.broker_max_message_bytes (16777216)"));
    let mut understated = env.herald_command(&["doctor"]);
    understated.env("HERALD_WORKER__BROKER_MAX_MESSAGE_BYTES", "1048576");
    let understated = understated.output().await.unwrap();
    assert_eq!(understated.status.code(), Some(1), "{}", stdout(&understated));
    assert!(stdout(&understated).contains("FAIL  message size: RabbitMQ accepted a message of 1048577 bytes"), "{}", stdout(&understated));
}
