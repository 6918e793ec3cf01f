//! Secrets never leak: a known bot secret and the tokens issued for it appear
//! in no log line, dead-letter header or body, metric or error message. And
//! every send attempt is attributable: the logs name the org_integration, bot
//! app and tenant used.

use herald::mongo::BotDoc;
use teams_sim::Bot;

use crate::support::*;

const SECRET_A: &str = "sEcReT-alpha-7731-via-env";
const SECRET_B: &str = "sEcReT-bravo-9902-via-file";
const SECRET_C_WRONG: &str = "sEcReT-charlie-WRONG-555";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_token_leaks_and_every_attempt_names_its_credentials() {
    let mut world = two_org_world();
    world.bots[0].app_secret = SECRET_A.into();
    world.bots[1].app_secret = SECRET_B.into();
    world.bots.push(Bot {
        app_id: "app-c".into(),
        app_secret: "the-right-one".into(),
        authority: "botframework.com".into(),
        disabled: false,
    });
    let env = TestEnv::new(world).await;
    let dir = std::env::temp_dir().join(format!("herald-it-{}", env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let secret_file = dir.join("app-b.secret");
    std::fs::write(&secret_file, format!("{SECRET_B}\n")).unwrap();

    let with_bot = |org: &str, app: &str, tenant: &str, bot: BotDoc| {
        let mut doc = env.org_integration(org, app, tenant);
        doc.bot = bot;
        doc
    };
    let bot = |app: &str| BotDoc { app_id: app.into(), app_secret: None, app_secret_env: None, app_secret_file: None, authority: None };
    env.insert_org_integration(with_bot(
        "org-a",
        "app-a",
        "tenant-a",
        BotDoc { app_secret_env: Some("HERALD_IT_SECRET_A".into()), ..bot("app-a") },
    ))
    .await;
    env.insert_org_integration(with_bot(
        "org-b",
        "app-b",
        "tenant-b",
        BotDoc { app_secret_file: Some(secret_file.display().to_string()), ..bot("app-b") },
    ))
    .await;
    env.insert_org_integration(with_bot("org-c", "app-c", "tenant-a", BotDoc { app_secret: Some(SECRET_C_WRONG.into()), ..bot("app-c") }))
        .await;
    env.insert_conversation("org-a", "19:conv-a@thread.tacv2", herald::mongo::ConversationKind::Channel, None).await;
    env.insert_conversation("org-b", "19:conv-b@thread.tacv2", herald::mongo::ConversationKind::Channel, None).await;
    env.insert_conversation("org-c", "19:conv-a@thread.tacv2", herald::mongo::ConversationKind::Channel, None).await;
    let client = env.sim.client();
    client.remove_from_roster("19:conv-b@thread.tacv2", "app-b").await.unwrap();

    let worker = env.observed_worker(&[("HERALD_IT_SECRET_A", SECRET_A), ("HERALD_LOG__FILTER", "debug")]);

    env.publish(&job("org-a", "19:conv-a@thread.tacv2", "first")).await;
    env.activities(1).await;
    // Teams stops accepting the cached token: one 401, one refresh.
    client.revoke_tokens().await.unwrap();
    env.publish(&job("org-a", "19:conv-a@thread.tacv2", "second")).await;
    env.publish(&job("org-b", "19:conv-b@thread.tacv2", "forbidden")).await;
    env.publish(&job("org-c", "19:conv-a@thread.tacv2", "wrong secret")).await;
    env.activities(2).await;
    let letters = env.dead_letters(2).await;
    let metrics = worker.metrics().await;
    let log = worker.stop().await;

    let tokens = client.tokens().await.unwrap();
    assert!(tokens.len() >= 3, "app-a twice, app-b once: {tokens:?}");
    let mut needles: Vec<String> = vec![SECRET_A.into(), SECRET_B.into(), SECRET_C_WRONG.into()];
    needles.extend(tokens.iter().map(|t| t.access_token.clone()));
    let mut haystacks: Vec<(String, String)> = vec![("worker log".into(), log.clone()), ("metrics".into(), metrics)];
    for letter in &letters {
        haystacks.push((format!("dead letter {:?}", letter.message_id), format!("{:?} {}", letter.headers, letter.body)));
    }
    for (what, text) in &haystacks {
        for needle in &needles {
            assert!(!text.contains(needle.as_str()), "{what} contains a secret or token");
        }
    }

    let wrong = letters.iter().find(|l| l.organization_id.as_deref() == Some("org-c")).unwrap();
    assert_eq!(wrong.headers["x-herald-reason"], "teams_unauthorized");
    assert!(wrong.headers["x-herald-error"].contains("AADSTS7000215"), "the error says what is wrong: {}", wrong.headers["x-herald-error"]);
    let stats = client.stats().await.unwrap();
    assert_eq!(stats.responses_by_status.get(&401), Some(&2), "the revoked token, and the wrong secret at the token endpoint");

    // Attributable attempts: every send attempt names org_integration, bot app and tenant.
    let attempts: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| matches!(v["message"].as_str(), Some("delivered" | "send failed")))
        .collect();
    assert!(attempts.len() >= 4, "{} attempts logged", attempts.len());
    for attempt in &attempts {
        for field in ["org_integration_id", "bot_app_id", "tenant_id", "conversation_id", "attempt"] {
            assert!(!attempt[field].is_null(), "{field} missing in {attempt}");
        }
    }
    let forbidden = attempts.iter().find(|a| a["http_status"] == 403).expect("the 403 attempt is logged");
    assert_eq!(forbidden["bot_app_id"], "app-b");
    assert_eq!(forbidden["tenant_id"], "tenant-b");
    assert_eq!(forbidden["teams_code"], "BotNotInConversationRoster");
    std::fs::remove_dir_all(&dir).unwrap();
}
