//! Teams Workflows webhooks beside bots: the same job, ledger and tenancy
//! rules; each of Workflows' refusals a dead letter with a reason an
//! operator can act on; the URL (a secret) sealed at rest and never shown;
//! `herald org-integrations add --kind workflow_webhook` and `check`.

use std::collections::BTreeMap;

use herald::mongo::{ConversationKind, DeliveryState, OrgIntegrationDoc};
use teams_sim::{self as sim, Action, Route, Rule, Workflow};

use crate::support::*;

/// The channel organization C's flow posts into, registered for its webhook.
const CONV_C: &str = "19:webhook-c@thread.tacv2";

fn flow(id: &str) -> Workflow {
    Workflow {
        id: id.into(),
        sig: format!("{id}-signature"),
        tenant_id: "tenant-c".into(),
        conversation_id: CONV_C.into(),
        disabled: false,
    }
}

/// Organization C on a webhook of `flow` (in teams-sim, its URL sealed in
/// MongoDB) with `CONV_C` registered, beside the two bot organizations.
async fn with_webhook_org(flow: &Workflow) -> TestEnv {
    webhook_org_in(TestEnv::two_orgs().await, flow).await
}

async fn webhook_org_in(env: TestEnv, flow: &Workflow) -> TestEnv {
    env.sim.client().put_workflow(flow).await.unwrap();
    let secrets = herald::secrets::Secrets::new(&env.settings.secrets).unwrap();
    let sealed = secrets.seal_workflow_url("org-c", INTEGRATION, &env.sim.workflow_url(flow).into()).unwrap();
    env.insert_raw_org_integration(OrgIntegrationDoc::workflow_webhook("org-c", INTEGRATION, "tenant-c", sealed)).await;
    env.insert_conversation("org-c", CONV_C, ConversationKind::Channel, None).await;
    env
}

async fn webhook_posts(env: &TestEnv, n: usize) -> Vec<sim::ActivityRecord> {
    let client = env.sim.client();
    eventually(&format!("{n} webhook posts"), std::time::Duration::from_secs(30), || async {
        let records = client.activities(&sim::ActivityFilter { route: Some(Route::Workflow), ..Default::default() }).await.ok()?;
        (records.len() >= n).then_some(records)
    })
    .await
}

/// One organization on a bot and one on a Workflows webhook: each job goes
/// through its own organization's integration, the webhook's run id is the
/// ledger's activity id, and nothing of the URL's signature reaches the
/// MongoDB record in the clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organization_on_a_workflows_webhook_gets_its_alerts_beside_one_on_a_bot() {
    let flow = flow("flow-c");
    let env = with_webhook_org(&flow).await;
    let worker = env.spawn_worker();
    let (bot_job, webhook_job) = (job("org-a", CONV_A, "through the bot"), job("org-c", CONV_C, "through the webhook"));
    env.publish(&bot_job).await;
    env.publish(&webhook_job).await;

    let posted = webhook_posts(&env, 1).await;
    assert_eq!(posted.len(), 1);
    assert_eq!(title(&posted[0]), "through the webhook");
    assert_eq!((posted[0].tenant_id.as_str(), posted[0].conversation_id.as_str()), ("tenant-c", CONV_C));
    let by_bot = env.activities(1).await;
    assert_eq!((title(&by_bot[0]).as_str(), by_bot[0].app_id.as_str()), ("through the bot", "app-a"));
    let record = env.sent(&webhook_job.id.to_string()).await;
    assert_eq!(record.activity_id.as_deref(), Some(posted[0].activity_id.as_str()), "the flow's run id");
    worker.stop().await;

    let raw = mongodb::Client::with_uri_str("mongodb://127.0.0.1:27017/?directConnection=true").await.unwrap();
    let stored = raw
        .database(&env.settings.mongodb_database)
        .collection::<mongodb::bson::Document>("org_integrations")
        .find_one(mongodb::bson::doc! { "organization_id": "org-c" })
        .await
        .unwrap()
        .unwrap();
    let text = stored.to_string();
    assert!(!text.contains(&flow.sig) && !text.contains("/powerautomate/"), "the URL is sealed at rest: {text}");
    assert_eq!(stored.get_str("kind").unwrap(), "workflow_webhook");
    raw.shutdown().await;
}

/// Workflows' 400, 401, 413 and 404 each end as one dead letter with its own
/// reason (a runbook section each), a 429 waits and goes through, and
/// neither the dead letters, the ledger nor the worker's log show the URL's
/// signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_workflows_refusal_is_a_dead_letter_an_operator_can_act_on() {
    let flow = flow("flow-c");
    let env = with_webhook_org(&flow).await;
    let status = |status: u16, code: Option<&str>, retry_after| Action::Status { status, code: code.map(str::to_owned), retry_after };
    let sequence = vec![
        status(400, Some("InvalidRequestContent"), None),
        status(401, Some("DirectApiInvalidAuthorizationSignature"), None),
        status(413, Some("RequestEntityTooLarge"), None),
        status(429, None, Some(1)),
    ];
    let rule = Rule { route: Route::Workflow, conversation_id: Some(flow.id.clone()), sequence, ..Default::default() };
    env.sim.client().add_fault(&rule).await.unwrap();
    let worker = env.observed_worker(&[]);
    let titles = ["refused card", "stale signature", "too large", "throttled, then posted"];
    let jobs: Vec<_> = titles.iter().map(|t| job("org-c", CONV_C, t)).collect();
    for job in &jobs {
        env.publish(job).await;
    }
    let posted = webhook_posts(&env, 1).await;
    assert_eq!(title(&posted[0]), "throttled, then posted");
    env.sim.client().delete_workflow(&flow.id).await.unwrap();
    let deleted = job("org-c", CONV_C, "flow deleted");
    env.publish(&deleted).await;

    let letters = env.dead_letters(4).await;
    let by_job: BTreeMap<String, String> =
        letters.iter().map(|l| (l.message_id.clone().unwrap_or_default(), l.reason.clone().unwrap_or_default())).collect();
    let expect = |job: &herald::job::Job, reason: &str| assert_eq!(by_job.get(&job.id.to_string()).map(String::as_str), Some(reason));
    expect(&jobs[0], "workflow_bad_request");
    expect(&jobs[1], "workflow_unauthorized");
    expect(&jobs[2], "payload_too_large");
    expect(&deleted, "workflow_not_found");
    assert_eq!(letters.len(), 4, "the throttled job was not dead-lettered");
    let failed = env.store.delivery(&deleted.id.to_string()).await.unwrap().unwrap();
    assert_eq!(failed.state, DeliveryState::DeadLettered);
    let log = worker.stop().await;
    for (what, text) in [("log", log), ("dead letters", format!("{letters:?}")), ("ledger", format!("{failed:?}"))] {
        assert!(!text.contains(&flow.sig), "the webhook's signature is in the {what}");
    }
    assert_eq!(env.sim.client().stats().await.unwrap().activities_total, 1);
}

/// herald paces each webhook by `teams.rate_limits.per_workflow`: with 2
/// per second, no three of a burst of jobs reach the flow within a second
/// (by the simulator's clock), and each is posted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_is_paced_by_its_own_window() {
    let flow = flow("flow-c");
    let env = TestEnv::with(two_org_world(), sim::Options::default(), |f| {
        f.merge(figment::providers::Serialized::default("teams.rate_limits.enabled", true)).merge(figment::providers::Serialized::default(
            "teams.rate_limits.per_workflow",
            [serde_json::json!({"limit": 2, "per_secs": 1})],
        ))
    })
    .await;
    env.seed_two_orgs().await;
    let env = webhook_org_in(env, &flow).await;
    let worker = env.spawn_worker();
    for i in 0..7 {
        env.publish(&job("org-c", CONV_C, &format!("burst {i}"))).await;
    }
    let mut posted = webhook_posts(&env, 7).await;
    worker.stop().await;
    posted.sort_by_key(|r| r.received_at);
    assert_eq!(posts_by_title(&posted).len(), 7, "each job once");
    for three in posted.windows(3) {
        let span = three[2].received_at - three[0].received_at;
        assert!(span >= chrono::Duration::milliseconds(900), "three posts within {span}: the window allows 2 per second");
    }
}

/// A webhook cannot reach a user's personal chat: a job naming only a user
/// is refused with its reason, not posted where the flow posts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_a_user_is_not_posted_through_a_webhook() {
    let flow = flow("flow-c");
    let env = with_webhook_org(&flow).await;
    let worker = env.spawn_worker();
    let mut for_user = job_value("org-c", CONV_C, "for a user only");
    for_user["recipient"] = serde_json::json!({ "user_id": "29:someone" });
    env.publish(&job_json(for_user)).await;
    let letters = env.dead_letters(1).await;
    assert_eq!(letters[0].reason.as_deref(), Some("recipient_not_in_organization"));
    assert!(letters[0].headers["x-herald-error"].contains("Workflows webhook"), "{:?}", letters[0].headers);
    worker.stop().await;
    assert_eq!(env.sim.client().stats().await.unwrap().activities_total, 0);
}

/// The operator's path: `add --kind workflow_webhook --url-file`, refused for
/// a host outside the cloud's workflow_hosts (nothing written); `list` and
/// `show` name the kind, never the URL; `check` posts nothing unless asked,
/// and `--send-test` posts one card; `set-secret --url-file` replaces the
/// URL; `seal-secrets` reseals it after a key rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_add_check_and_rotate_a_webhook_without_ever_seeing_its_url() {
    let flow = flow("flow-d");
    let env = TestEnv::two_orgs().await;
    env.sim.client().put_workflow(&flow).await.unwrap();
    let dir = std::env::temp_dir().join(format!("herald-it-{}-workflow", env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let url_file = dir.join("url");
    std::fs::write(&url_file, env.sim.workflow_url(&flow)).unwrap();
    let target = ["--org", "org-d", "--integration", INTEGRATION];
    let add = |file: &std::path::Path| {
        let mut args = vec!["org-integrations", "add", "--tenant", "tenant-c", "--kind", "workflow_webhook"];
        args.extend(target);
        args.extend(["--url-file", file.to_str().unwrap()]);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let elsewhere = dir.join("elsewhere");
    std::fs::write(&elsewhere, "https://hooks.example.com/powerautomate/automations/direct/workflows/x/triggers/manual/paths/invoke?sig=s")
        .unwrap();
    let refused = env.herald(&add(&elsewhere).iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("workflow_hosts") && !stderr(&refused).contains("sig=s"), "{}", stderr(&refused));
    assert!(env.store.list_org_integrations(Some("org-d"), 10).await.unwrap().is_empty(), "nothing written");

    let added = env.herald_ok(&add(&url_file).iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(stdout(&added).contains("Workflows webhook"), "{}", stdout(&added));
    let listed = stdout(&env.herald_ok(&["org-integrations", "list", "--org", "org-d"]).await);
    assert!(listed.contains("workflow_webhook") && listed.contains("webhook URL sealed"), "{listed}");
    assert!(!listed.contains(&flow.sig) && !listed.contains("powerautomate"), "{listed}");

    let check = [["org-integrations", "check"].as_slice(), target.as_slice()].concat();
    let checked = stdout(&env.herald_ok(&check).await);
    assert!(checked.contains("webhook URL opened") && !checked.contains(&flow.sig), "{checked}");
    assert_eq!(env.sim.client().stats().await.unwrap().activities_total, 0, "check posts nothing unless asked");
    let sent = stdout(&env.herald_ok(&[check.as_slice(), &["--send-test"]].concat()).await);
    assert!(sent.contains("accepted by Workflows"), "{sent}");
    let posted = env.sim.client().activities(&sim::ActivityFilter { route: Some(Route::Workflow), ..Default::default() }).await.unwrap();
    assert_eq!(posted.len(), 1);

    // The flow's URL was regenerated: the old one stops working.
    let renewed = Workflow { sig: "renewed".into(), ..flow.clone() };
    env.sim.client().put_workflow(&renewed).await.unwrap();
    let stale = env.herald(&[check.as_slice(), &["--send-test"]].concat()).await;
    assert_eq!(stale.status.code(), Some(1));
    assert!(stdout(&stale).contains("401"), "{}", stdout(&stale));
    std::fs::write(&url_file, env.sim.workflow_url(&renewed)).unwrap();
    let set = [["org-integrations", "set-secret"].as_slice(), target.as_slice(), &["--url-file", url_file.to_str().unwrap()]].concat();
    env.herald_ok(&set).await;
    env.herald_ok(&[check.as_slice(), &["--send-test"]].concat()).await;

    // A new sealing key: seal-secrets reseals the URL with it.
    let rotated = [("HERALD_SECRETS__KEYS__NEW", NEW_SEAL_KEY), ("HERALD_SECRETS__SEAL_WITH", "new")];
    let mut reseal = env.herald_command(&["org-integrations", "seal-secrets"]);
    reseal.envs(rotated);
    let resealed = reseal.output().await.unwrap();
    // The two bot organizations' secrets and the webhook's URL.
    assert!(resealed.status.success() && stdout(&resealed).contains("sealed 3 secret(s) with key new"), "{}", stdout(&resealed));
    let doc = env.store.list_org_integrations(Some("org-d"), 10).await.unwrap().remove(0);
    assert_eq!(doc.workflow.unwrap().url_sealed.key_id, "new");
    let mut with_new_key = env.herald_command(&[check.as_slice(), &["--send-test"]].concat());
    with_new_key.envs(rotated);
    assert!(with_new_key.output().await.unwrap().status.success(), "the resealed URL opens");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second key for the rotation (32 bytes, base64).
const NEW_SEAL_KEY: &str = "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoM=";
