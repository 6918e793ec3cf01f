//! Credentials and the ledger under attack: each test is named for the
//! failure it rules out, against the real worker, broker, MongoDB-protocol
//! server and teams-sim.

use std::time::Duration;

use figment::providers::Serialized;
use herald::mongo::{BotDoc, ConversationStatus, DeliveryState};
use teams_sim::{self as sim, Action, Route, Rule, Tenant};

use crate::support::*;

const CONV_C: &str = "19:conv-c@thread.tacv2";

/// Org C's org_integration names org A's bot app, with a secret that is not
/// A's. A's token is cached already. C must not post as A's bot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_for_another_organizations_bot_never_rides_on_its_cached_token() {
    let mut world = two_org_world();
    world.tenants.push(Tenant { id: "tenant-c".into(), name: None });
    // The roster would let app-a post into C's channel: only the credential check stops it.
    world.conversations.push(channel(CONV_C, "tenant-c", "app-a"));
    let env = TestEnv::new(world).await;
    env.seed_two_orgs().await;
    let mut impostor = env.org_integration("org-c", "app-a", "tenant-c");
    impostor.bot = BotDoc::with_secret("app-a", "not-the-secret-of-app-a");
    env.insert_org_integration(impostor).await;
    env.insert_conversation("org-c", CONV_C, herald::mongo::ConversationKind::Channel, None).await;
    let worker = env.spawn_worker();

    env.publish(&job("org-a", CONV_A, "a first")).await;
    env.activities(1).await;
    let forged = job("org-c", CONV_C, "as someone else's bot");
    env.publish(&forged).await;
    let letter = env.dead_letters(1).await.remove(0);
    assert_eq!(letter.reason.as_deref(), Some("teams_unauthorized"), "{:?}", letter.headers);
    assert!(letter.headers["x-herald-error"].contains("AADSTS7000215"), "the identity platform's own refusal");
    let stats = env.sim.client().stats().await.unwrap();
    assert_eq!(stats.activities_total, 1, "nothing was posted for org-c");
    assert_eq!(stats.responses_by_status.get(&401), Some(&1), "one token request refused");
    worker.stop().await;
}

/// A rotated secret is a new credential: the next resolution fetches a new
/// token with it, and the old secret stops working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_fetches_a_new_token_at_the_next_resolution() {
    let env = TestEnv::two_orgs_with_setting("worker.resolution_cache_ttl_secs", 1).await;
    env.publish(&job("org-a", CONV_A, "before")).await;
    let worker = env.spawn_worker();
    env.activities(1).await;

    let client = env.sim.client();
    client.put_bot(&sim::Bot { app_secret: "rotated-a".into(), ..bot("app-a") }).await.unwrap();
    let mut rotated = env.org_integration("org-a", "app-a", "tenant-a");
    rotated.bot = BotDoc::with_secret("app-a", "rotated-a");
    env.insert_org_integration(rotated).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    env.publish(&job("org-a", CONV_A, "after")).await;
    env.activities(2).await;
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.tokens_issued.get("app-a"), Some(&2), "a new token for the new secret");
    assert_eq!(env.queue_len(&env.topology.dead_queue()).await, 0);
    worker.stop().await;
}

/// Organization B reuses a job id that organization A already sent. B's job
/// is B's: it is delivered, and A's record is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_id_reused_by_another_organization_is_delivered_not_suppressed() {
    let a = job("org-a", CONV_A, "from a");
    let env = TestEnv::two_orgs().await;
    let worker = env.spawn_worker();
    env.publish(&a).await;
    env.activities(1).await;
    let a_record = env.sent(&a.id.to_string()).await;

    let mut b = job_value("org-b", CONV_B, "from b");
    b["job_id"] = serde_json::json!(a.id.to_string());
    let b = job_json(b);
    // Twice, and concurrently: still once.
    env.publish(&b).await;
    env.publish(&b).await;
    let records = env.activities(2).await;
    env.drained().await;
    assert_eq!(posts_by_title(&records), [("from a".to_owned(), 1), ("from b".to_owned(), 1)].into());
    let b_record = records.iter().find(|r| r.conversation_id == CONV_B).unwrap();
    assert_eq!((b_record.app_id.as_str(), b_record.tenant_id.as_str()), ("app-b", "tenant-b"));
    let ledger = env.store.deliveries_of(&a.id.to_string()).await.unwrap();
    assert_eq!(ledger.len(), 2, "one record per organization");
    let a_after = ledger.iter().find(|d| d.organization_id == "org-a").unwrap();
    assert_eq!(a_after.activity_id, a_record.activity_id, "A's record is untouched");
    assert!(ledger.iter().all(|d| d.state == DeliveryState::Sent));
    worker.stop().await;
}

/// A second copy that finds the job `sending` goes to a retry tier and
/// comes back while the first copy is still sending: it must find the claim
/// as it was, not one its own failure record freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_finds_the_job_in_progress_never_frees_the_claim() {
    let env = TestEnv::with(two_org_world(), sim::Options::default(), |f| {
        f.merge(Serialized::default("teams.request_timeout_secs", 5)).merge(Serialized::default("worker.claim_lease_secs", 20))
    })
    .await;
    env.seed_two_orgs().await;
    // Slower than the first retry tier (1 s): the second copy is back before the first is done.
    env.sim.client().set_latency(sim::Latency::Fixed { ms: 2500 }).await.unwrap();
    let job = job("org-a", CONV_A, "twice published");
    env.publish_copies(&job, 2).await;
    let worker = env.spawn_worker();
    env.activities(1).await;
    env.drained().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.sim.client().stats().await.unwrap().activities_total, 1, "posted once");
    assert_eq!(env.queue_len(&env.topology.dead_queue()).await, 0);
    worker.stop().await;
}

/// Teams keeps answering 503 with `Retry-After`, so in-process retries could
/// outlast the claim's lease; a second copy would then take the job over
/// while the first still sends. Every wait ends within the lease instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_slower_than_the_lease_never_overlaps_another_copy() {
    let env = TestEnv::with(two_org_world(), sim::Options::default(), |f| {
        f.merge(Serialized::default("worker.claim_lease_secs", 10))
            .merge(Serialized::default("retry.quick_attempts", 20))
            .merge(Serialized::default("retry.max_in_process_wait_secs", 5))
            .merge(Serialized::default("retry.max_hops", 20))
    })
    .await;
    env.seed_two_orgs().await;
    let busy = Action::Status { status: 503, code: None, retry_after: Some(2) };
    env.sim.client().add_fault(&Rule { route: Route::Send, sequence: vec![busy; 6], ..Default::default() }).await.unwrap();
    let job = job("org-a", CONV_A, "slow");
    env.publish_copies(&job, 2).await;
    let worker = env.spawn_worker();
    env.activities(1).await;
    env.drained().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = env.sim.client().stats().await.unwrap();
    assert_eq!(stats.activities_total, 1, "posted once");
    assert_eq!(stats.responses_by_status.get(&503), Some(&6));
    worker.stop().await;
}

/// Two worker processes whose wall clocks are 30 s behind and 30 s ahead
/// share jobs published twice, with slow sends: the claims are timed by the
/// server's clock, so neither takes over the other's live claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_hold_whatever_each_workers_clock_says() {
    let env = TestEnv::two_orgs().await;
    env.sim.client().set_latency(sim::Latency::Fixed { ms: 1500 }).await.unwrap();
    const JOBS: usize = 20;
    let jobs: Vec<_> = (0..JOBS)
        .map(|i| job(if i % 2 == 0 { "org-a" } else { "org-b" }, if i % 2 == 0 { CONV_A } else { CONV_B }, &format!("skew-{i}")))
        .collect();
    for job in &jobs {
        env.publish(job).await;
        env.publish(job).await;
    }
    let behind = env.worker_process(&skewed_clock("-30s"));
    let ahead = env.worker_process(&skewed_clock("+30s"));
    let records = env.activities(JOBS).await;
    env.drained().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let records = if records.len() < JOBS { records } else { env.sim.client().all_activities().await.unwrap() };
    let posts = posts_by_title(&records);
    assert_eq!(posts.len(), JOBS);
    assert!(posts.values().all(|n| *n == 1), "a job posted twice: {posts:?}");
    assert!(terminate(behind).await.success() && terminate(ahead).await.success());
}

/// Teams accepted the post but its answer was lost (a timeout after the
/// request was written) or cannot be read (a broken 2xx body). Resending
/// could post it twice: it is `unconfirmed`, dead-lettered for an operator,
/// and a later copy is not posted either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_whose_answer_is_lost_is_unconfirmed_and_never_resent() {
    let env = TestEnv::two_orgs().await;
    let client = env.sim.client();
    client
        .add_fault(&Rule { route: Route::Send, sequence: vec![Action::Lose { ms: 4000 }, Action::Garble], ..Default::default() })
        .await
        .unwrap();
    let worker = env.spawn_worker();
    let lost = job("org-a", CONV_A, "answer lost");
    env.publish(&lost).await;
    env.dead_letters(1).await;
    let garbled = job("org-a", CONV_A, "answer garbled");
    env.publish(&garbled).await;
    let letters = env.dead_letters(2).await;
    assert!(letters.iter().all(|l| l.reason.as_deref() == Some("delivery_unconfirmed")), "{letters:?}");
    for job in [&lost, &garbled] {
        let record = env.store.delivery(&job.id.to_string()).await.unwrap().unwrap();
        assert_eq!(record.state, DeliveryState::Unconfirmed);
    }
    assert_eq!(client.stats().await.unwrap().activities_total, 2, "each was posted once, and not again");

    // A producer's retry of the same job is not posted either.
    env.publish(&lost).await;
    env.drained().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(client.stats().await.unwrap().activities_total, 2);
    assert_eq!(env.queue_len(&env.topology.dead_queue()).await, 2);

    // The operator looked in Teams: the garbled one did arrive, the lost one... also.
    // Replaying without saying so resends nothing (exit 3: skipped).
    let id = lost.id.to_string();
    let skipped = env.herald(&["dlq", "replay", "--job-id", &id, "--yes"]).await;
    assert_eq!(skipped.status.code(), Some(3), "{}", stdout(&skipped));
    assert!(stdout(&skipped).contains("--resend-unconfirmed"), "{}", stdout(&skipped));
    env.settles_at(&env.topology.dead_queue(), 2).await;
    // Saying so resends it.
    let out = stdout(&env.herald_ok(&["dlq", "replay", "--job-id", &id, "--resend-unconfirmed", "--yes"]).await);
    assert!(out.contains("replayed 1"), "{out}");
    env.activities(3).await;
    assert_eq!(env.sent(&id).await.organization_id, "org-a");
    worker.stop().await;
}

/// `herald seed` makes the stored records what the file says: a secret
/// source the file leaves out is removed, quarantines are kept unless
/// lifted on purpose, and a file with an invalid record writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_replaces_what_it_owns_keeps_quarantines_and_checks_before_writing() {
    let env = TestEnv::two_orgs().await;
    env.store.quarantine("org-a", INTEGRATION, CONV_A, "teams_forbidden", Some("BotNotInConversationRoster")).await.unwrap();
    let dir = std::env::temp_dir().join(format!("herald-seed-{}", env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("seed.json");
    let seed_file = |service_url: &str, org: &str| {
        serde_json::json!({
            "org_integrations": [{
                "organization_id": org, "integration_id": INTEGRATION, "status": "active", "tenant_id": "tenant-a",
                "service_url": service_url, "bot": { "app_id": "app-a", "app_secret_env": format!("TEAMS_BOT_SECRET_{org}__MAIN") },
            }],
            "conversations": [{
                "organization_id": org, "integration_id": INTEGRATION, "conversation_id": CONV_A, "kind": "channel", "status": "active",
            }],
        })
        .to_string()
    };
    let path = file.to_str().unwrap();

    std::fs::write(&file, seed_file(&env.sim.service_url(), "org-a")).unwrap();
    let dry = stdout(&env.herald_ok(&["seed", "--file", path, "--dry-run"]).await);
    assert!(dry.contains("nothing written"), "{dry}");
    let org = |id: &str| herald::job::OrganizationId::parse(id).unwrap();
    let integration = herald::job::IntegrationId::parse(INTEGRATION).unwrap();
    let before = env.store.org_integration(&org("org-a"), &integration).await.unwrap().unwrap();
    assert!(before.bot.app_secret_sealed.is_some(), "a dry run changes nothing");

    env.herald_ok(&["seed", "--file", path]).await;
    let after = env.store.org_integration(&org("org-a"), &integration).await.unwrap().unwrap();
    assert_eq!(after.bot.app_secret_sealed, None, "the stored secret the file leaves out is gone");
    assert_eq!(after.bot.app_secret_env.as_deref(), Some("TEAMS_BOT_SECRET_org-a__MAIN"));
    let conversation = |store: &herald::mongo::Store| {
        let store = store.clone();
        async move {
            let id = herald::job::ConversationId::parse(CONV_A).unwrap();
            store.conversation(&org("org-a"), &herald::job::IntegrationId::parse(INTEGRATION).unwrap(), &id).await.unwrap().unwrap()
        }
    };
    assert_eq!(conversation(&env.store).await.status, ConversationStatus::Quarantined, "the quarantine is kept");
    env.herald_ok(&["seed", "--file", path, "--release-quarantined"]).await;
    let released = conversation(&env.store).await;
    assert_eq!((released.status, released.quarantine), (ConversationStatus::Active, None));

    // A record the worker would refuse: nothing of the file is written.
    std::fs::write(&file, seed_file("https://evil.example.com/teams/", "org-new")).unwrap();
    let refused = env.herald(&["seed", "--file", path]).await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("host is not on the allowlist") && stderr(&refused).contains("nothing written"),
        "{}",
        stderr(&refused)
    );
    assert!(env.store.org_integration(&org("org-new"), &integration).await.unwrap().is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The "sent" marks of concurrent jobs are one statement, and each record
/// still gets only its own values: 24 claims, one of them taken over by
/// another delivery after its lease ran out, then all 24 marked at once. The
/// mark of the claim that was taken over changes nothing; the others each
/// carry their own activity, attempts and history. (A current-thread runtime:
/// every mark is queued before a flusher runs.)
#[tokio::test]
async fn the_marks_of_concurrent_jobs_are_one_statement_and_each_record_keeps_its_own() {
    use herald::mongo::{AttemptRecord, Claim, Store};
    let env = TestEnv::two_orgs().await;
    let jobs: Vec<_> = (0..24).map(|i| job("org-a", CONV_A, &format!("mark {i}"))).collect();
    let mut leases = Vec::new();
    for job in &jobs {
        match env.store.claim(job.id, &job.organization_id, &job.integration_id).await.unwrap() {
            Claim::Fresh(lease) => leases.push(lease),
            other => panic!("a new job is ours to send: {other:?}"),
        }
    }
    // Job 7's worker hung past its lease; another delivery takes the job over.
    let raw = mongodb::Client::with_uri_str("mongodb://127.0.0.1:27017/?directConnection=true").await.unwrap();
    let deliveries = raw.database(&env.settings.mongodb_database).collection::<mongodb::bson::Document>("deliveries");
    let expired = mongodb::bson::doc! { "$set": { "lease_until": mongodb::bson::DateTime::from_millis(0) } };
    deliveries.update_one(mongodb::bson::doc! { "_id": &leases[7].key }, expired).await.unwrap();
    let other = Store::connect(&env.settings).await.unwrap();
    let Claim::Fresh(taken) = other.claim(jobs[7].id, &jobs[7].organization_id, &jobs[7].integration_id).await.unwrap() else {
        panic!("a claim whose lease ran out can be taken over")
    };
    assert!(taken.taken_over);
    assert_eq!(taken.takeovers, 1, "the take-over is counted");

    let attempt = |i: usize| AttemptRecord {
        at: mongodb::bson::DateTime::now(),
        outcome: "sent".into(),
        reason: None,
        http_status: Some(201),
        teams_code: None,
        bot_app_id: Some("app-a".into()),
        conversation_id: Some(format!("$conversation-{i}")),
        sends: 1,
        duration_ms: i as i64,
    };
    // Job 5 was tried 20 times before: the record keeps the newest 20 attempts.
    let old = mongodb::bson::to_document(&AttemptRecord { duration_ms: -1, ..attempt(5) }).unwrap();
    let tried = mongodb::bson::doc! { "$set": { "history": vec![old; 20] } };
    deliveries.update_one(mongodb::bson::doc! { "_id": &leases[5].key }, tried).await.unwrap();

    let (_, writes_before) = env.store.op_counts();
    let marks = futures_util::future::join_all(leases.iter().enumerate().map(|(i, lease)| {
        let attempts: Vec<_> = (0..=i % 3).map(|_| attempt(i)).collect();
        let store = env.store.clone();
        async move { store.mark_sent(lease, &format!("$activity-{i}"), &attempts).await.unwrap() }
    }))
    .await;
    let (_, writes_after) = env.store.op_counts();
    assert!(writes_after - writes_before <= 2, "24 marks made {} statements", writes_after - writes_before);
    for (i, (job, held)) in jobs.iter().zip(marks).enumerate() {
        let record = env.store.delivery(&job.id.to_string()).await.unwrap().unwrap();
        if i == 7 {
            assert!(!held, "the claim was taken over: the mark does not hold");
            assert_eq!(
                (record.state, record.owner.as_deref(), record.activity_id),
                (DeliveryState::Sending, Some(taken.owner.as_str()), None)
            );
            continue;
        }
        assert!(held, "job {i}");
        assert_eq!(record.state, DeliveryState::Sent, "job {i}");
        assert_eq!(record.activity_id.as_deref(), Some(format!("$activity-{i}").as_str()), "values starting with $ are data");
        assert_eq!(record.conversation_id.as_deref(), Some(format!("$conversation-{i}").as_str()));
        assert_eq!(record.attempts, (i % 3 + 1) as i64);
        let (earlier, this) = record.history.split_at(record.history.len() - (i % 3 + 1));
        assert!(this.iter().all(|a| a.duration_ms == i as i64), "job {i}: {:?}", record.history);
        let earlier_kept = if i == 5 { 17 } else { 0 };
        assert!(earlier.len() == earlier_kept && earlier.iter().all(|a| a.duration_ms == -1), "job {i}: {:?}", record.history);
        assert_eq!((record.owner, record.lease_until), (None, None));
    }
    other.shutdown().await;
}

/// `dlq replay --resend-unconfirmed` reopens the ledger record of exactly the
/// letter's job, organization and integration: the same job id unconfirmed
/// for another integration of the organization, or for another
/// organization, stays unconfirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowing_a_resend_reopens_only_that_org_integrations_record() {
    use herald::job::{IntegrationId, JobId, OrganizationId};
    use herald::mongo::Claim;
    let env = TestEnv::two_orgs().await;
    let job_id = JobId(uuid::Uuid::new_v4());
    let id = job_id.to_string();
    let scopes = [("org-a", INTEGRATION), ("org-a", "int-other"), ("org-b", INTEGRATION)];
    for (org, integration) in scopes {
        let (org, integration) = (OrganizationId::parse(org).unwrap(), IntegrationId::parse(integration).unwrap());
        let Claim::Fresh(lease) = env.store.claim(job_id, &org, &integration).await.unwrap() else { panic!("a fresh claim") };
        assert!(env.store.release_claim(&lease, DeliveryState::Unconfirmed, "answer lost", &[]).await.unwrap());
    }
    assert_eq!(env.store.allow_resend(&id, "org-a", INTEGRATION).await.unwrap(), 1);
    let states: std::collections::BTreeMap<(String, String), DeliveryState> =
        env.store.deliveries_of(&id).await.unwrap().into_iter().map(|d| ((d.organization_id, d.integration_id), d.state)).collect();
    let state = |org: &str, integration: &str| states[&(org.to_owned(), integration.to_owned())];
    assert_eq!(state("org-a", INTEGRATION), DeliveryState::Retrying);
    assert_eq!(state("org-a", "int-other"), DeliveryState::Unconfirmed, "another integration's record is untouched");
    assert_eq!(state("org-b", INTEGRATION), DeliveryState::Unconfirmed, "another organization's record is untouched");
}
