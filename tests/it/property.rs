//! The tenancy property test: a seeded random world of organizations, shared
//! integrations, disabled org_integrations, quarantined conversations, stale
//! recipients and users without a conversation; thousands of jobs through the
//! real worker, RabbitMQ, MongoDB and teams-sim. Every delivered activity must
//! be authenticated by the job's own org_integration's bot and land in a
//! conversation of the job's organization; every other job must be
//! dead-lettered with the reason the world predicts.
//!
//! `HERALD_PROPERTY_JOBS` (default 5000) and `HERALD_PROPERTY_SEED` scale and
//! replay it: `HERALD_PROPERTY_JOBS=5000 cargo test --test it property`.

use std::collections::HashMap;
use std::time::Duration;

use figment::providers::Serialized;
use herald::mongo::{ConversationDoc, ConversationKind, ConversationStatus, IntegrationStatus, OrgIntegrationDoc, Quarantine};
use serde_json::json;
use teams_sim::{self as sim, Bot, Conversation, Tenant, User, World};

use crate::support::*;

const ORGS: usize = 24;

struct Org {
    id: String,
    integration: String,
    app: String,
    tenant: String,
    disabled: bool,
    channels: Vec<String>,
    quarantined: Vec<String>,
    /// Users with a stored personal conversation here: (user, conversation).
    users: Vec<(String, String)>,
    /// Users with the bot installed but no conversation yet.
    new_users: Vec<String>,
}

enum Expect {
    Delivered { conversation: Option<String>, app: String, tenant: String },
    Dead(&'static str),
}

fn build(rng: &mut fastrand::Rng) -> (Vec<Org>, World) {
    let mut orgs = Vec::new();
    let mut world = World::default();
    for i in 0..ORGS {
        // Half of the organizations share one Teams integration.
        let integration = if i % 2 == 0 { "int-shared".to_owned() } else { format!("int-{i}") };
        let (app, tenant) = (format!("app-{i}"), format!("tenant-{i}"));
        let disabled = i % 7 == 3;
        let channels: Vec<String> = (0..3).map(|c| format!("19:org{i}-c{c}@thread.tacv2")).collect();
        let quarantined = if rng.bool() { vec![format!("19:org{i}-q@thread.tacv2")] } else { vec![] };
        let users: Vec<(String, String)> = (0..2).map(|u| (format!("29:u{i}-{u}"), format!("a:org{i}-u{u}"))).collect();
        let new_users: Vec<String> = (0..2).map(|u| format!("29:new{i}-{u}")).collect();
        world.tenants.push(Tenant { id: tenant.clone(), name: None });
        world.bots.push(Bot {
            app_id: app.clone(),
            app_secret: format!("secret-{i}"),
            authority: "botframework.com".into(),
            disabled: false,
        });
        for id in channels.iter().chain(&quarantined) {
            let roster = if quarantined.contains(id) { Default::default() } else { [app.clone()].into() };
            world.conversations.push(Conversation {
                id: id.clone(),
                tenant_id: tenant.clone(),
                kind: sim::ConversationKind::Channel,
                roster,
                blocked: false,
                user_id: None,
            });
        }
        for (user, conversation) in &users {
            world.users.push(User { id: user.clone(), tenant_id: tenant.clone(), installed_apps: [app.clone()].into() });
            world.conversations.push(Conversation {
                id: conversation.clone(),
                tenant_id: tenant.clone(),
                kind: sim::ConversationKind::Personal,
                roster: [app.clone()].into(),
                blocked: false,
                user_id: Some(user.clone()),
            });
        }
        for user in &new_users {
            world.users.push(User { id: user.clone(), tenant_id: tenant.clone(), installed_apps: [app.clone()].into() });
        }
        orgs.push(Org { id: format!("org-{i}"), integration, app, tenant, disabled, channels, quarantined, users, new_users });
    }
    (orgs, world)
}

async fn seed_world(env: &TestEnv, orgs: &[Org]) {
    // Inserted in reverse, so that for the shared integration the first record
    // found is never the organization of the first jobs.
    let integrations: Vec<OrgIntegrationDoc> = orgs
        .iter()
        .rev()
        .map(|o| OrgIntegrationDoc {
            status: if o.disabled { IntegrationStatus::Disabled } else { IntegrationStatus::Active },
            integration_id: o.integration.clone(),
            ..env.org_integration(&o.id, &o.app, &o.tenant)
        })
        .collect();
    let mut conversations = Vec::new();
    let doc = |o: &Org, id: &str, kind, user: Option<&str>, quarantined: bool| ConversationDoc {
        organization_id: o.id.clone(),
        integration_id: o.integration.clone(),
        conversation_id: id.to_owned(),
        kind,
        user_id: user.map(str::to_owned),
        status: if quarantined { ConversationStatus::Quarantined } else { ConversationStatus::Active },
        quarantine: quarantined.then(|| Quarantine {
            reason: "teams_forbidden".into(),
            teams_code: Some("BotNotInConversationRoster".into()),
            at: mongodb::bson::DateTime::now(),
        }),
        created_at: None,
    };
    for o in orgs {
        for c in &o.channels {
            conversations.push(doc(o, c, ConversationKind::Channel, None, false));
        }
        for c in &o.quarantined {
            conversations.push(doc(o, c, ConversationKind::Channel, None, true));
        }
        for (user, c) in &o.users {
            conversations.push(doc(o, c, ConversationKind::Personal, Some(user), false));
        }
    }
    env.seed(&integrations, &conversations).await;
}

/// A random job and what the world predicts for it.
fn draw(rng: &mut fastrand::Rng, orgs: &[Org]) -> (serde_json::Value, Expect) {
    let org = &orgs[rng.usize(..orgs.len())];
    let other = loop {
        let o = &orgs[rng.usize(..orgs.len())];
        if o.id != org.id {
            break o;
        }
    };
    let delivered = |conversation: Option<&String>| Expect::Delivered {
        conversation: conversation.cloned(),
        app: org.app.clone(),
        tenant: org.tenant.clone(),
    };
    let pick = |list: &[String], rng: &mut fastrand::Rng| list[rng.usize(..list.len())].clone();
    let (org_id, integration, recipient, expect) = if org.disabled {
        (
            org.id.clone(),
            org.integration.clone(),
            json!({"conversation_id": pick(&org.channels, rng)}),
            Expect::Dead("org_integration_disabled"),
        )
    } else {
        match rng.u8(..9) {
            0 => (
                format!("ghost-{}", rng.u8(..5)),
                org.integration.clone(),
                json!({"conversation_id": pick(&org.channels, rng)}),
                Expect::Dead("org_integration_not_found"),
            ),
            1 if !org.quarantined.is_empty() => (
                org.id.clone(),
                org.integration.clone(),
                json!({"conversation_id": org.quarantined[0]}),
                Expect::Dead("conversation_quarantined"),
            ),
            2 => (
                org.id.clone(),
                org.integration.clone(),
                json!({"conversation_id": pick(&other.channels, rng)}),
                Expect::Dead("recipient_not_in_organization"),
            ),
            3 => {
                // Stale: another organization's conversation, but a user with a conversation here.
                let (user, conversation) = &org.users[rng.usize(..org.users.len())];
                (
                    org.id.clone(),
                    org.integration.clone(),
                    json!({"conversation_id": other.users[0].1, "user_id": user}),
                    delivered(Some(conversation)),
                )
            }
            4 => {
                let (user, conversation) = &org.users[rng.usize(..org.users.len())];
                (org.id.clone(), org.integration.clone(), json!({"user_id": user}), delivered(Some(conversation)))
            }
            5 => {
                // No conversation yet: created through the Connector (once).
                let user = pick(&org.new_users, rng);
                (org.id.clone(), org.integration.clone(), json!({"user_id": user}), delivered(None))
            }
            6 => {
                // Stale, and the user named has no conversation here: refused.
                (
                    org.id.clone(),
                    org.integration.clone(),
                    json!({"conversation_id": other.channels[0], "user_id": "29:stranger"}),
                    Expect::Dead("recipient_not_in_organization"),
                )
            }
            _ => {
                let conversation = pick(&org.channels, rng);
                (org.id.clone(), org.integration.clone(), json!({"conversation_id": conversation}), delivered(Some(&conversation)))
            }
        }
    };
    let id = uuid::Uuid::from_u128(rng.u128(..));
    let job = json!({
        "version": 1, "job_id": id, "organization_id": org_id, "integration_id": integration,
        "recipient": recipient, "message": {"title": id.to_string(), "text": "property"}, "created_at": chrono::Utc::now(),
    });
    (job, expect)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_is_delivered_by_its_own_org_or_dead_lettered_as_the_world_predicts() {
    let jobs: usize = std::env::var("HERALD_PROPERTY_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    let seed: u64 = std::env::var("HERALD_PROPERTY_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(20261122);
    eprintln!("property test: {jobs} jobs, seed {seed} (HERALD_PROPERTY_JOBS, HERALD_PROPERTY_SEED)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let (orgs, world) = build(&mut rng);
    let options = sim::Options { throttling: false, ..Default::default() };
    let env = TestEnv::with(world, options, |f| {
        f.merge(Serialized::default("worker.concurrency", 64)).merge(Serialized::default("worker.prefetch", 128))
    })
    .await;
    seed_world(&env, &orgs).await;

    let mut expected = HashMap::new();
    for _ in 0..jobs {
        let (body, expect) = draw(&mut rng, &orgs);
        expected.insert(body["job_id"].as_str().unwrap().to_owned(), expect);
        env.publish_raw(&serde_json::to_vec(&body).unwrap(), body["job_id"].as_str().unwrap()).await;
    }
    let predicted_delivered = expected.values().filter(|e| matches!(e, Expect::Delivered { .. })).count();
    let worker = env.spawn_worker();

    let client = env.sim.client();
    let dead_queue = env.topology.dead_queue();
    eventually("every job delivered or dead-lettered", Duration::from_secs(240), || async {
        // Creates first: every create counted here is in the total read
        // after it (a create recorded between two reads in the other order
        // made the difference negative).
        let creates =
            client.activities(&sim::ActivityFilter { route: Some(sim::Route::CreateConversation), ..Default::default() }).await.ok()?.len();
        let delivered = client.stats().await.ok()?.activities_by_app.values().sum::<u64>() as usize;
        let dead = env.queue_len(&dead_queue).await as usize;
        (delivered.saturating_sub(creates) + dead >= jobs).then_some(())
    })
    .await;
    worker.stop().await;

    let records = env.activities(predicted_delivered).await;
    let conversations_of: HashMap<&str, &Org> = orgs
        .iter()
        .flat_map(|o| o.channels.iter().chain(&o.quarantined).chain(o.users.iter().map(|(_, c)| c)).map(move |c| (c.as_str(), o)))
        .collect();
    let mut seen = HashMap::new();
    for record in &records {
        let job_id = record.body["attachments"][0]["content"]["body"][0]["text"].as_str().unwrap().to_owned();
        let Some(Expect::Delivered { conversation, app, tenant }) = expected.get(&job_id) else {
            panic!("job {job_id} was delivered, the world predicts a dead letter");
        };
        assert_eq!(&record.app_id, app, "job {job_id}: authenticated by its own org_integration's bot");
        assert_eq!(&record.tenant_id, tenant, "job {job_id}: a conversation of its own tenant");
        match conversation {
            Some(conversation) => assert_eq!(&record.conversation_id, conversation, "job {job_id}"),
            // A conversation created for the user: in the org's tenant (checked above) and of no other org.
            None => assert!(!conversations_of.contains_key(record.conversation_id.as_str()), "job {job_id}"),
        }
        assert!(seen.insert(job_id.clone(), ()).is_none(), "job {job_id} was posted twice");
    }
    let letters = herald::dlq::browse(&env.connection, &dead_queue, &env.signer, jobs + 10).await.unwrap();
    for letter in &letters {
        let job_id = letter.message_id.clone().unwrap();
        match expected.get(&job_id) {
            Some(Expect::Dead(reason)) => assert_eq!(letter.reason.as_deref(), Some(*reason), "job {job_id}: {:?}", letter.headers),
            _ => panic!("job {job_id} was dead-lettered ({:?}), the world predicts a delivery", letter.headers.get("x-herald-error")),
        }
    }
    assert_eq!(records.len(), predicted_delivered);
    assert_eq!(records.len() + letters.len(), jobs, "delivered + dead-lettered = enqueued");
    eprintln!("property test: {} delivered, {} dead-lettered", records.len(), letters.len());
}
