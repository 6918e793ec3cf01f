//! The delivery pipeline end to end: real RabbitMQ, real MongoDB-protocol
//! server, real teams-sim over HTTP.

use std::time::Duration;

use figment::providers::Serialized;
use herald::job::{ConversationId, IntegrationId, OrganizationId};
use herald::mongo::ConversationStatus;
use mongodb::bson::doc;
use serde_json::json;
use teams_sim::{self as sim, Action, Route, Rule};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_delivers_with_the_organizations_own_bot_and_records_it() {
    let env = TestEnv::two_orgs().await;
    let worker = env.spawn_worker();
    let job = job("org-a", CONV_A, "Disk full");
    env.publish(&job).await;

    let records = env.activities(1).await;
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.app_id, "app-a");
    assert_eq!(record.tenant_id, "tenant-a");
    assert_eq!(record.conversation_id, CONV_A);
    assert_eq!(record.body["attachments"][0]["content"]["body"][0]["text"], "Disk full");

    let delivery = env.sent(&job.id.to_string()).await;
    assert_eq!(delivery.activity_id.as_deref(), Some(record.activity_id.as_str()));
    assert_eq!(delivery.attempts, 1);
    env.drained().await;
    worker.stop().await;
}

/// Incident regression (background/incident-msteams-wrong-org.md): a Teams
/// integration shared by two organizations, where the first org_integration
/// found for the integration is the other organization's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_shared_integration_each_org_is_delivered_by_its_own_bot() {
    let env = TestEnv::two_orgs().await;
    // What the incident's client did, straight against the database: the
    // first record of the integration belongs to the other organization.
    let raw = mongodb::Client::with_uri_str("mongodb://127.0.0.1:27017/?directConnection=true").await.unwrap();
    let first = raw
        .database(&env.settings.mongodb_database)
        .collection::<mongodb::bson::Document>("org_integrations")
        .find_one(doc! { "integration_id": INTEGRATION })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.get_str("organization_id").unwrap(), "org-b", "the setup must make the first-found record the wrong one for org-a");
    let worker = env.spawn_worker();
    for i in 0..5 {
        env.publish(&job("org-a", CONV_A, &format!("a{i}"))).await;
        env.publish(&job("org-b", CONV_B, &format!("b{i}"))).await;
    }
    let records = env.activities(10).await;
    assert_eq!(records.len(), 10);
    for record in &records {
        let expected = if record.conversation_id == CONV_A { ("app-a", "tenant-a") } else { ("app-b", "tenant-b") };
        assert_eq!((record.app_id.as_str(), record.tenant_id.as_str()), expected, "{record:?}");
    }
    let stats = env.sim.client().stats().await.unwrap();
    assert_eq!(stats.responses_by_status.get(&403), None, "no BotNotInConversationRoster");
    assert_eq!(env.queue_len(&env.topology.dead_queue()).await, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_disabled_and_missing_organizations_are_dead_lettered_without_a_request() {
    let env = TestEnv::two_orgs().await;
    let mut disabled = env.org_integration("org-off", "app-a", "tenant-a");
    disabled.status = herald::mongo::IntegrationStatus::Disabled;
    env.insert_org_integration(disabled).await;
    let worker = env.spawn_worker();

    let unknown = job("org-unknown", CONV_A, "x");
    env.publish(&unknown).await;
    let off = job("org-off", CONV_A, "x");
    env.publish(&off).await;
    let mut missing = serde_json::to_value(herald::job::WireJob::from(&job("org-a", CONV_A, "x"))).unwrap();
    missing.as_object_mut().unwrap().remove("organization_id");
    env.publish_raw(&serde_json::to_vec(&missing).unwrap(), "missing-org").await;

    let letters = env.dead_letters(3).await;
    let reason_of = |id: &str| letters.iter().find(|l| l.message_id.as_deref() == Some(id)).and_then(|l| l.reason.clone());
    assert_eq!(reason_of(&unknown.id.to_string()).as_deref(), Some("org_integration_not_found"));
    assert_eq!(reason_of(&off.id.to_string()).as_deref(), Some("org_integration_disabled"));
    assert_eq!(reason_of("missing-org").as_deref(), Some("missing_organization"));
    assert_eq!(env.sim.client().stats().await.unwrap().requests_total, 0, "no token or Connector request for any of them");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bot_not_in_roster_is_dead_lettered_at_once_with_every_header_and_quarantined() {
    let env = TestEnv::two_orgs().await;
    env.sim.client().remove_from_roster(CONV_A, "app-a").await.unwrap();
    let worker = env.spawn_worker();
    let job = job("org-a", CONV_A, "x");
    let body = wire(&job);
    env.publish(&job).await;

    let letter = env.dead_letters(1).await.remove(0);
    assert_eq!(letter.body.as_bytes(), body.as_slice(), "the original body, unchanged");
    assert_eq!(letter.message_id, Some(job.id.to_string()));
    let h = &letter.headers;
    assert_eq!(h["x-herald-reason"], "teams_forbidden");
    assert_eq!(h["x-herald-teams-code"], "BotNotInConversationRoster");
    assert_eq!(h["x-herald-http-status"], "403");
    assert_eq!(h["x-herald-correlation-id"].len(), 32, "Teams' X-Correlating-OperationId");
    assert!(h["x-herald-error"].contains("BotNotInConversationRoster"), "{}", h["x-herald-error"]);
    assert_eq!(h["x-herald-attempts"], "1", "403 is never retried");
    assert_eq!(h["x-herald-organization-id"], "org-a");
    assert!(!h["x-herald-org-integration-id"].is_empty());
    assert!(chrono::DateTime::parse_from_rfc3339(&h["x-herald-dead-lettered-at"]).is_ok());
    assert_eq!(h["x-herald-replays"], "0");

    let (org, integration, conversation) =
        (OrganizationId::parse("org-a").unwrap(), IntegrationId::parse(INTEGRATION).unwrap(), ConversationId::parse(CONV_A).unwrap());
    let conversation = env.store.conversation(&org, &integration, &conversation).await.unwrap().unwrap();
    assert_eq!(conversation.status, ConversationStatus::Quarantined);
    assert_eq!(conversation.quarantine.unwrap().teams_code.as_deref(), Some("BotNotInConversationRoster"));

    // The next job for that conversation is refused without a request.
    let before = env.sim.client().stats().await.unwrap().requests_total;
    env.publish(&crate::support::job("org-a", CONV_A, "y")).await;
    let letters = env.dead_letters(2).await;
    assert!(letters.iter().any(|l| l.reason.as_deref() == Some("conversation_quarantined")));
    assert_eq!(env.sim.client().stats().await.unwrap().requests_total, before);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_with_retry_after_then_delivered() {
    let env = TestEnv::two_orgs().await;
    let throttle = Action::Status { status: 429, code: Some("Throttled".into()), retry_after: Some(1) };
    env.sim.client().add_fault(&Rule { route: Route::Send, sequence: vec![throttle], ..Default::default() }).await.unwrap();
    let worker = env.spawn_worker();
    let job = job("org-a", CONV_A, "x");
    env.publish(&job).await;
    env.activities(1).await;
    let stats = env.sim.client().stats().await.unwrap();
    assert_eq!(stats.responses_by_status.get(&429), Some(&1));
    assert_eq!(stats.activities_total, 1);
    let delivery = env.sent(&job.id.to_string()).await;
    assert_eq!(delivery.attempts, 2);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_storm_goes_through_a_delayed_retry_and_is_then_delivered() {
    let env = TestEnv::two_orgs().await;
    let unavailable = Action::Status { status: 503, code: None, retry_after: None };
    // Four 503s: more than the three quick attempts, so one delayed hop.
    env.sim.client().add_fault(&Rule { route: Route::Send, sequence: vec![unavailable; 4], ..Default::default() }).await.unwrap();
    let worker = env.spawn_worker();
    let job = job("org-a", CONV_A, "x");
    env.publish(&job).await;
    env.activities(1).await;
    let delivery = env.sent(&job.id.to_string()).await;
    assert_eq!(delivery.attempts, 5, "3 quick attempts, a delayed retry, then 2 more");
    let stats = env.sim.client().stats().await.unwrap();
    assert_eq!(stats.responses_by_status.get(&503), Some(&4));
    assert_eq!(stats.activities_total, 1);
    assert_eq!(env.queue_len(&env.topology.dead_queue()).await, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_exhausted_are_dead_lettered_with_the_last_error() {
    let env = TestEnv::with(two_org_world(), sim::Options::default(), |f| f.merge(Serialized::default("retry.max_hops", 1))).await;
    env.seed_two_orgs().await;
    let unavailable = Action::Status { status: 503, code: None, retry_after: None };
    env.sim
        .client()
        .add_fault(&Rule { route: Route::Send, sequence: vec![unavailable], repeat: true, ..Default::default() })
        .await
        .unwrap();
    let worker = env.spawn_worker();
    env.publish(&job("org-a", CONV_A, "x")).await;
    let letter = env.dead_letters(1).await.remove(0);
    assert_eq!(letter.headers["x-herald-reason"], "retries_exhausted");
    assert!(letter.headers["x-herald-error"].contains("503"), "{}", letter.headers["x-herald-error"]);
    assert_eq!(letter.headers["x-herald-attempts"], "6", "3 quick attempts on each of 2 deliveries");
    assert_eq!(env.sim.client().stats().await.unwrap().activities_total, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_wrong_version_and_oversized_bodies_are_dead_lettered_with_the_parse_error() {
    let env = TestEnv::two_orgs().await;
    let worker = env.spawn_worker();
    env.publish_raw(b"{\"version\": 1, \"organization_id\": ", "malformed").await;
    let mut v2 = serde_json::to_value(herald::job::WireJob::from(&job("org-a", CONV_A, "x"))).unwrap();
    v2["version"] = json!(2);
    env.publish_raw(&serde_json::to_vec(&v2).unwrap(), "version-2").await;
    let mut big = serde_json::to_value(herald::job::WireJob::from(&job("org-a", CONV_A, "x"))).unwrap();
    big["message"]["text"] = json!("x".repeat(300 * 1024));
    let big = serde_json::to_vec(&big).unwrap();
    env.publish_raw(&big, "oversized").await;

    let letters = env.dead_letters(3).await;
    let by_id = |id: &str| letters.iter().find(|l| l.message_id.as_deref() == Some(id)).unwrap().clone();
    let malformed = by_id("malformed");
    assert_eq!(malformed.headers["x-herald-reason"], "invalid_job");
    assert!(malformed.headers["x-herald-error"].contains("not JSON"));
    let v2 = by_id("version-2");
    assert_eq!(v2.headers["x-herald-reason"], "invalid_job");
    assert!(v2.headers["x-herald-error"].contains("unsupported version 2"));
    // Refused by the router before it reached a shard: the broker dead-lettered it.
    let oversized = by_id("oversized");
    assert_eq!(oversized.reason.as_deref(), Some("invalid_job"));
    assert!(oversized.headers["x-herald-error"].contains("exceeds the limit"));
    assert_eq!(oversized.headers.get("x-first-death-reason").map(String::as_str), Some("rejected"), "{:?}", oversized.headers);
    assert_eq!(oversized.body.len(), big.len(), "the body is kept whole");
    assert_eq!(env.sim.client().stats().await.unwrap().requests_total, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_url_off_the_allowlist_gets_zero_requests() {
    let env = TestEnv::new(two_org_world()).await;
    let mut doc = env.org_integration("org-a", "app-a", "tenant-a");
    // Same simulator, but by a host name that is not allow-listed.
    doc.service_url = doc.service_url.replace("127.0.0.1", "localhost");
    env.insert_org_integration(doc).await;
    env.insert_conversation("org-a", CONV_A, herald::mongo::ConversationKind::Channel, None).await;
    let worker = env.spawn_worker();
    env.publish(&job("org-a", CONV_A, "x")).await;
    let letter = env.dead_letters(1).await.remove(0);
    assert_eq!(letter.headers["x-herald-reason"], "service_url_not_allowed");
    assert_eq!(env.sim.client().stats().await.unwrap().requests_total, 0, "no token request, no Connector request");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_expires_mid_run_is_refreshed_once() {
    let env = TestEnv::two_orgs().await;
    let worker = env.spawn_worker();
    env.publish(&job("org-a", CONV_A, "first")).await;
    env.activities(1).await;
    // An hour passes for Microsoft: the cached token is now expired there.
    env.sim.client().advance_clock(Duration::from_secs(3600)).await.unwrap();
    env.publish(&job("org-a", CONV_A, "second")).await;
    env.activities(2).await;
    let stats = env.sim.client().stats().await.unwrap();
    assert_eq!(stats.tokens_issued.get("app-a"), Some(&2));
    assert_eq!(stats.responses_by_status.get(&401), Some(&1), "one 401, then the refreshed token worked");
    assert_eq!(env.queue_len(&env.topology.dead_queue()).await, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_jobs_share_one_token_request() {
    let env = TestEnv::two_orgs().await;
    env.sim.client().set_throttling(&sim::Throttling { enabled: false, limits: None }).await.unwrap();
    env.sim.client().set_latency(sim::Latency::Fixed { ms: 20 }).await.unwrap();
    for i in 0..40 {
        env.publish(&job("org-a", CONV_A, &format!("{i}"))).await;
    }
    let worker = env.spawn_worker();
    env.activities(40).await;
    let stats = env.sim.client().stats().await.unwrap();
    assert_eq!(stats.tokens_issued.get("app-a"), Some(&1));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_job_that_was_sent_is_not_posted_twice() {
    let env = TestEnv::two_orgs().await;
    let worker = env.spawn_worker();
    let job = job("org-a", CONV_A, "once");
    env.publish(&job).await;
    env.activities(1).await;
    // The same job id again, as after a redelivery or a producer retry.
    env.publish(&job).await;
    env.drained().await;
    eventually("the duplicate to be acked", Duration::from_secs(10), || async {
        (env.queue_len(&env.topology.work_queue()).await == 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.sim.client().stats().await.unwrap().activities_total, 1);
    assert_eq!(env.queue_len(&env.topology.dead_queue()).await, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_of_another_organization_is_refused_without_a_request() {
    let env = TestEnv::two_orgs().await;
    let worker = env.spawn_worker();
    // Org A's job naming org B's channel.
    env.publish(&job("org-a", CONV_B, "x")).await;
    let letter = env.dead_letters(1).await.remove(0);
    assert_eq!(letter.headers["x-herald-reason"], "recipient_not_in_organization");
    assert_eq!(env.sim.client().stats().await.unwrap().requests_total, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_job_is_dead_lettered_not_sent() {
    let env = TestEnv::two_orgs().await;
    let worker = env.spawn_worker();
    let created = chrono::Utc::now() - chrono::Duration::minutes(10);
    let job = job_json(json!({
        "version": 1, "job_id": uuid::Uuid::new_v4(), "organization_id": "org-a", "integration_id": INTEGRATION,
        "recipient": {"conversation_id": CONV_A}, "message": {"title": "old", "text": "old"},
        "created_at": created, "expires_at": created + chrono::Duration::minutes(5),
    }));
    env.publish(&job).await;
    let letter = env.dead_letters(1).await.remove(0);
    assert_eq!(letter.headers["x-herald-reason"], "job_expired");
    assert_eq!(env.sim.client().stats().await.unwrap().requests_total, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_refreshed_before_it_expires() {
    let options = sim::Options { token_ttl: Duration::from_secs(4), ..Default::default() };
    let env = TestEnv::with(two_org_world(), options, |f| f).await;
    env.seed_two_orgs().await;
    let worker = env.spawn_worker();
    env.publish(&job("org-a", CONV_A, "first")).await;
    env.activities(1).await;
    // Past half of a 4 s lifetime the worker fetches a new token unasked.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    env.publish(&job("org-a", CONV_A, "second")).await;
    env.activities(2).await;
    let stats = env.sim.client().stats().await.unwrap();
    assert_eq!(stats.tokens_issued.get("app-a"), Some(&2));
    assert_eq!(stats.responses_by_status.get(&401), None, "refreshed before Teams refused it");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_an_org_integration_stops_deliveries_within_the_cache_ttl() {
    let env = TestEnv::two_orgs_with_setting("worker.resolution_cache_ttl_secs", 1).await;
    let worker = env.spawn_worker();
    env.publish(&job("org-a", CONV_A, "before")).await;
    env.activities(1).await;
    assert!(env.store.set_org_integration_status("org-a", INTEGRATION, herald::mongo::IntegrationStatus::Disabled).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    env.publish(&job("org-a", CONV_A, "after")).await;
    let letter = env.dead_letters(1).await.remove(0);
    assert_eq!(letter.headers["x-herald-reason"], "org_integration_disabled");
    assert_eq!(env.sim.client().stats().await.unwrap().activities_total, 1);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_of_one_job_consumed_at_once_are_posted_once() {
    let env = TestEnv::two_orgs().await;
    // Slow Teams: the first copy is still being sent when the second is taken.
    env.sim.client().set_latency(sim::Latency::Fixed { ms: 700 }).await.unwrap();
    let job = job("org-a", CONV_A, "twice published");
    env.publish_copies(&job, 2).await;
    let worker = env.spawn_worker();
    env.activities(1).await;
    env.drained().await;
    eventually("the second copy to be settled", Duration::from_secs(30), || async { (env.waiting().await == 0).then_some(()) }).await;
    assert_eq!(env.sim.client().stats().await.unwrap().activities_total, 1, "posted once");
    assert_eq!(env.queue_len(&env.topology.dead_queue()).await, 0);
    worker.stop().await;
}

/// The worker queues its acks without waiting for lapin to write them
/// (`rabbitmq::ack_queued`). Queued acks still reach the broker before the
/// channel's close, single and `multiple`: none of the deliveries acked that
/// way, the channel closed right after, comes back to the queue. On a closed
/// channel the ack is refused, not lost silently.
#[tokio::test]
async fn acks_queued_without_waiting_reach_the_broker_before_the_channel_closes() {
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::FieldTable;

    const N: usize = 300;
    let connection = herald::rabbitmq::connect(AMQP_URL, "herald it acks").await.expect("RabbitMQ answers");
    let queue = format!("it-{}-acks", uuid::Uuid::new_v4().simple());
    let setup = connection.create_channel().await.expect("channel");
    setup.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), FieldTable::default()).await.expect("declare");
    let ready = |setup: lapin::Channel, queue: String| async move {
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        setup.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await.expect("queue exists").message_count()
    };

    for multiple in [false, true] {
        for i in 0..N {
            setup
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    i.to_string().as_bytes(),
                    Default::default(),
                )
                .await
                .expect("publish");
        }
        let channel = connection.create_channel().await.expect("channel");
        channel.basic_qos(N as u16, BasicQosOptions::default()).await.expect("qos");
        let mut consumer = channel
            .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .expect("consume");
        let mut tags = Vec::new();
        while tags.len() < N {
            let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("deliveries arrive")
                .expect("open")
                .expect("ok");
            tags.push(delivery.delivery_tag);
        }
        if multiple {
            herald::rabbitmq::ack_queued(&channel, *tags.last().unwrap(), true).expect("queued");
        } else {
            for tag in &tags {
                herald::rabbitmq::ack_queued(&channel, *tag, false).expect("queued");
            }
        }
        channel.close(200, "done".into()).await.expect("close");
        // The close is answered after every frame before it: an ack lost on
        // the way would have put its delivery back by now.
        assert_eq!(ready(setup.clone(), queue.clone()).await, 0, "deliveries returned after queued acks (multiple: {multiple})");
        assert!(herald::rabbitmq::ack_queued(&channel, tags[0], false).is_err(), "an ack on a closed channel is refused");
    }
    let _ = setup.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    let _ = connection.close(200, "".into()).await;
}
