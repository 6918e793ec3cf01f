//! `herald gateway`, the messaging endpoint: only activities Teams signed
//! for a bot herald has an org_integration for change anything, strictly
//! for that bot's organization in the activity's tenant; and the stale
//! conversation of an incident is corrected by Teams' own events, after
//! which the next alert is delivered. teams-sim signs the activities with
//! its own key and publishes it in OpenID metadata.

use std::time::Duration;

use herald::mongo::ConversationStatus;
use serde_json::{Value, json};
use teams_sim::SignRequest;

use crate::support::*;

/// A gateway process of `env`, and its base URL once it answers.
async fn gateway(env: &TestEnv) -> (tokio::process::Child, String) {
    let port = free_port();
    let metadata = format!("{}/v1/.well-known/openidconfiguration", env.sim.base_url());
    let process = env
        .herald_command(&["gateway"])
        .env("HERALD_GATEWAY__LISTEN", format!("127.0.0.1:{port}"))
        .env("HERALD_TEAMS__CLOUDS__PUBLIC__OPENID_METADATA", metadata)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("herald gateway starts");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    eventually("the gateway answers", Duration::from_secs(20), || async {
        http.get(format!("{base}/healthz")).send().await.ok().filter(|r| r.status().is_success())
    })
    .await;
    (process, base)
}

/// A Teams activity about the bot `app` in `conversation` of `tenant`.
fn update(kind: &str, app: &str, tenant: &str, conversation: &str, service_url: &str) -> Value {
    let mut activity = json!({
        "type": "conversationUpdate", "id": uuid::Uuid::new_v4().to_string(), "channelId": "msteams", "serviceUrl": service_url,
        "from": {"id": "29:an-admin"}, "recipient": {"id": format!("28:{app}")},
        "conversation": {"id": conversation, "conversationType": "channel", "tenantId": tenant},
        "channelData": {"tenant": {"id": tenant}, "eventType": if kind == "membersRemoved" { "teamMemberRemoved" } else { "teamMemberAdded" }},
    });
    activity[kind] = json!([{"id": format!("28:{app}")}]);
    activity
}

async fn post(base: &str, activity: &Value, token: Option<&str>) -> u16 {
    let mut request = reqwest::Client::new().post(format!("{base}/api/messages")).json(activity);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().status().as_u16()
}

async fn status_of(env: &TestEnv, org: &str, conversation: &str) -> ConversationStatus {
    let (org, integration, conversation) = (
        herald::job::OrganizationId::parse(org.to_owned()).unwrap(),
        herald::job::IntegrationId::parse(INTEGRATION.to_owned()).unwrap(),
        herald::job::ConversationId::parse(conversation.to_owned()).unwrap(),
    );
    env.store.conversation(&org, &integration, &conversation).await.unwrap().expect("registered").status
}

/// Claims signed with a key that is not Teams' but names Teams' key id.
fn forged(app: &str, service_url: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"iss": "https://api.botframework.com", "aud": app, "exp": now + 600, "nbf": now - 60, "serviceUrl": service_url});
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(teams_sim::signing::KEY_ID.to_owned());
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(include_bytes!("forger-key.pem")).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

/// Every way a request can fail to be Teams' own for this activity is 401
/// or 403 and changes nothing; an activity Teams signed for org A's bot but
/// naming org B's tenant and conversation is recorded as unclaimed and
/// leaves org B untouched; the genuine removal quarantines org A's channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_activities_teams_signed_for_a_configured_bot_change_anything() {
    let env = TestEnv::two_orgs().await;
    let (process, base) = gateway(&env).await;
    let service_url = env.sim.service_url();
    let client = env.sim.client();
    let sign = |app: &str, service_url: &str, expires_in_secs: Option<i64>, issuer: Option<&str>| {
        let request =
            SignRequest { app_id: app.into(), service_url: service_url.into(), expires_in_secs, issuer: issuer.map(str::to_owned) };
        let client = client.clone();
        async move { client.sign(&request).await.unwrap() }
    };
    let removal = update("membersRemoved", "app-a", "tenant-a", CONV_A, &service_url);

    assert_eq!(post(&base, &removal, None).await, 401, "no token");
    assert_eq!(post(&base, &removal, Some(&forged("app-a", &service_url))).await, 401, "forged");
    assert_eq!(post(&base, &removal, Some(&sign("app-a", &service_url, Some(-900), None).await)).await, 401, "expired");
    assert_eq!(post(&base, &removal, Some(&sign("app-zzz", &service_url, None, None).await)).await, 401, "no bot of ours");
    let other_issuer = sign("app-a", &service_url, None, Some("https://sts.example.com")).await;
    assert_eq!(post(&base, &removal, Some(&other_issuer)).await, 401, "another issuer");
    let elsewhere = sign("app-a", "https://smba.trafficmanager.net/amer/", None, None).await;
    assert_eq!(post(&base, &removal, Some(&elsewhere)).await, 403, "the serviceUrl claim is another's");
    let hs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"iss": "https://api.botframework.com", "aud": "app-a", "exp": chrono::Utc::now().timestamp() + 600, "serviceUrl": service_url}),
        &jsonwebtoken::EncodingKey::from_secret(b"guessable"),
    )
    .unwrap();
    assert_eq!(post(&base, &removal, Some(&hs256)).await, 401, "HS256");
    let mut slack = removal.clone();
    slack["channelId"] = json!("slack");
    assert_eq!(
        post(&base, &slack, Some(&sign("app-a", &service_url, None, None).await)).await,
        403,
        "a channel the key is not endorsed for"
    );
    assert_eq!(status_of(&env, "org-a", CONV_A).await, ConversationStatus::Active, "nothing changed");

    // Teams' own token for app A, replayed with org B's tenant and channel.
    let replayed = update("membersRemoved", "app-a", "tenant-b", CONV_B, &service_url);
    assert_eq!(post(&base, &replayed, Some(&sign("app-a", &service_url, None, None).await)).await, 200);
    assert_eq!(status_of(&env, "org-b", CONV_B).await, ConversationStatus::Active, "org B untouched");
    let unclaimed = env.store.unclaimed(10).await.unwrap();
    assert_eq!((unclaimed.len(), unclaimed[0].tenant_id.as_str(), unclaimed[0].matched), (1, "tenant-b", 0));

    // An admin cannot claim it for org B: Teams named app A's bot, not org B's.
    let claim = |org: &'static str, integration: &'static str, conversation: &'static str| {
        ["conversations", "claim", "--org", org, "--integration", integration, "--conversation", conversation]
    };
    let refused = env.herald(&claim("org-b", INTEGRATION, CONV_B)).await;
    assert!(!refused.status.success() && stderr(&refused).contains("refused"), "{}", stderr(&refused));

    // Two org_integrations of app A in tenant A: a new channel names neither
    // alone, so it waits for an admin, who claims it for one of them.
    env.insert_org_integration(herald::mongo::OrgIntegrationDoc {
        integration_id: "alerts-2".into(),
        ..env.org_integration("org-a", "app-a", "tenant-a")
    })
    .await;
    const NEW: &str = "19:new-channel@thread.tacv2";
    let added = update("membersAdded", "app-a", "tenant-a", NEW, &service_url);
    assert_eq!(post(&base, &added, Some(&sign("app-a", &service_url, None, None).await)).await, 200);
    let listed = stdout(&env.herald_ok(&["conversations", "unclaimed"]).await);
    assert!(listed.contains(NEW) && listed.contains("teamMemberAdded"), "{listed}");
    let claimed = stdout(&env.herald_ok(&claim("org-a", "alerts-2", NEW)).await);
    assert!(claimed.contains("registered") && claimed.contains("1 unclaimed"), "{claimed}");
    let registered = env.store.list_conversations(&Default::default(), 100).await.unwrap();
    assert!(registered.iter().any(|c| c.conversation_id == NEW && c.integration_id == "alerts-2"));
    env.store.remove_org_integration("org-a", "alerts-2").await.unwrap();

    assert_eq!(post(&base, &removal, Some(&sign("app-a", &service_url, None, None).await)).await, 200);
    assert_eq!(status_of(&env, "org-a", CONV_A).await, ConversationStatus::Quarantined, "Teams removed the bot");
    assert_eq!(status_of(&env, "org-b", CONV_B).await, ConversationStatus::Active);
    let metrics = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("herald_gateway_activities_total{type=\"conversationUpdate\",outcome=\"refused\"} 8"), "{metrics}");
    assert!(terminate(process).await.success(), "the gateway exits cleanly on SIGTERM");
}

/// The incident, with Teams in the loop: the bot is removed from org A's
/// channel, so an alert is refused (403) and the channel quarantined; Teams
/// then adds the bot back (from a new service URL) and says so; the gateway
/// lifts the quarantine and refreshes the record's service URL, and the next
/// alert is delivered there, with org A's bot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_own_events_correct_a_stale_record_and_the_next_alert_goes_out() {
    let env = TestEnv::two_orgs().await;
    let worker = env.observed_worker(&[("HERALD_WORKER__RESOLUTION_CACHE_TTL_SECS", "1")]);
    let (process, base) = gateway(&env).await;
    let client = env.sim.client();
    client.remove_from_roster(CONV_A, "app-a").await.unwrap();
    env.publish(&job("org-a", CONV_A, "while the bot was removed")).await;
    let letters = env.dead_letters(1).await;
    assert_eq!(letters[0].reason.as_deref(), Some("teams_forbidden"));
    assert_eq!(status_of(&env, "org-a", CONV_A).await, ConversationStatus::Quarantined);

    client.add_to_roster(CONV_A, "app-a").await.unwrap();
    let moved = format!("{}/emea/", env.sim.base_url());
    let token = client.sign(&SignRequest { app_id: "app-a".into(), service_url: moved.clone(), ..Default::default() }).await.unwrap();
    assert_eq!(post(&base, &update("membersAdded", "app-a", "tenant-a", CONV_A, &moved), Some(&token)).await, 200);
    assert_eq!(status_of(&env, "org-a", CONV_A).await, ConversationStatus::Active, "Teams' event lifted the quarantine");
    let record = env.store.list_org_integrations(Some("org-a"), 1).await.unwrap().remove(0);
    assert_eq!(record.service_url, moved, "the service URL follows Teams'");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    env.publish(&job("org-a", CONV_A, "after Teams said so")).await;
    let records = env.activities(1).await;
    assert_eq!((title(&records[0]).as_str(), records[0].app_id.as_str()), ("after Teams said so", "app-a"));
    worker.stop().await;
    assert!(terminate(process).await.success());
}

/// The signing keys are fetched on the first request; a stream of tokens
/// naming a key id Teams never published fetches them once more, not once
/// per request (`gateway.unknown_key_refresh_secs`), and each is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_unknown_key_ids_does_not_hammer_the_metadata() {
    let env = TestEnv::two_orgs().await;
    let (process, base) = gateway(&env).await;
    let service_url = env.sim.service_url();
    let removal = update("membersRemoved", "app-a", "tenant-a", CONV_A, &service_url);
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"iss": "https://api.botframework.com", "aud": "app-a", "exp": now + 600, "serviceUrl": service_url});
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(include_bytes!("forger-key.pem")).unwrap();
    for n in 0..5 {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(format!("made-up-{n}"));
        let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        assert_eq!(post(&base, &removal, Some(&token)).await, 401);
    }
    assert_eq!(env.sim.client().stats().await.unwrap().key_fetches, 2, "the first fetch, and one refresh for an unknown key id");
    assert_eq!(status_of(&env, "org-a", CONV_A).await, ConversationStatus::Active);
    assert!(terminate(process).await.success());
}
