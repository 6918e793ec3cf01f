//! Tenant integrity: recipients belong to the job's organization.

use herald::job::{IntegrationId, OrganizationId, UserId};
use herald::mongo::ConversationKind;
use serde_json::json;
use teams_sim::{self as sim, Conversation, User};

use crate::support::*;

fn personal(id: &str, tenant: &str, app: &str, user: &str) -> Conversation {
    Conversation {
        id: id.into(),
        tenant_id: tenant.into(),
        kind: sim::ConversationKind::Personal,
        roster: [app.to_owned()].into(),
        blocked: false,
        user_id: Some(user.into()),
    }
}

fn user_job(org: &str, conversation: Option<&str>, user: &str, title: &str) -> herald::job::Job {
    let mut recipient = json!({ "user_id": user });
    if let Some(conversation) = conversation {
        recipient["conversation_id"] = json!(conversation);
    }
    job_json(json!({
        "version": 1, "job_id": uuid::Uuid::new_v4(), "organization_id": org, "integration_id": INTEGRATION,
        "recipient": recipient, "message": {"title": title, "text": "t"}, "created_at": chrono::Utc::now(),
    }))
}

/// Incident regression (background/incident-stale-team-context.md): a user
/// whose stored conversation belongs to the organization they used before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_stale_conversation_of_another_org_is_corrected_to_this_orgs_conversation() {
    let mut world = two_org_world();
    world.conversations.push(personal("a:alice-in-a", "tenant-a", "app-a", "29:alice"));
    world.conversations.push(personal("a:alice-in-b", "tenant-b", "app-b", "29:alice"));
    let env = TestEnv::new(world).await;
    env.seed_two_orgs().await;
    env.insert_conversation("org-a", "a:alice-in-a", ConversationKind::Personal, Some("29:alice")).await;
    env.insert_conversation("org-b", "a:alice-in-b", ConversationKind::Personal, Some("29:alice")).await;
    let worker = env.spawn_worker();

    // Alice used org B before; the producer still carries org B's chat id.
    env.publish(&user_job("org-a", Some("a:alice-in-b"), "29:alice", "corrected")).await;
    // A user with no conversation in org A: never guess.
    env.publish(&user_job("org-a", Some("a:alice-in-b"), "29:nobody", "refused")).await;

    let records = env.activities(1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].conversation_id, "a:alice-in-a");
    assert_eq!(records[0].app_id, "app-a");
    assert_eq!(records[0].tenant_id, "tenant-a");
    let letter = env.dead_letters(1).await.remove(0);
    assert_eq!(letter.headers["x-herald-reason"], "recipient_not_in_organization");
    assert!(letter.headers["x-herald-error"].contains("a:alice-in-b"));
    let activity_in_b = env
        .sim
        .client()
        .activities(&sim::ActivityFilter { conversation_id: Some("a:alice-in-b".into()), ..Default::default() })
        .await
        .unwrap();
    assert!(activity_in_b.is_empty(), "nothing ever went into org B's conversation");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_a_conversation_gets_one_created_in_the_org_integrations_tenant() {
    let mut world = two_org_world();
    world.users.push(User { id: "29:carol".into(), tenant_id: "tenant-a".into(), installed_apps: ["app-a".to_owned()].into() });
    let env = TestEnv::new(world).await;
    env.seed_two_orgs().await;
    let worker = env.spawn_worker();
    env.publish(&user_job("org-a", None, "29:carol", "first")).await;
    let records = env.activities(1).await;
    let created = records[0].conversation_id.clone();
    assert_eq!(records[0].app_id, "app-a");
    let stored = env
        .store
        .personal_conversations(
            &OrganizationId::parse("org-a").unwrap(),
            &IntegrationId::parse(INTEGRATION).unwrap(),
            &UserId::parse("29:carol").unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].conversation_id, created);

    // The second job uses the stored conversation: no second create call.
    env.publish(&user_job("org-a", None, "29:carol", "second")).await;
    env.activities(2).await;
    let creates = env
        .sim
        .client()
        .activities(&sim::ActivityFilter { route: Some(sim::Route::CreateConversation), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(creates.len(), 1);
    assert_eq!(creates[0].body["tenantId"], "tenant-a");
    // Org B has no conversation for Carol and its bot is not installed for her.
    env.publish(&user_job("org-b", None, "29:carol", "b")).await;
    let letter = env.dead_letters(1).await.remove(0);
    // Carol is in tenant A: the Connector refuses a chat in org B's tenant.
    assert_eq!(letter.headers["x-herald-reason"], "teams_bad_request", "{:?}", letter.headers);
    worker.stop().await;
}
