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
/// Org A's variable, in its own scope (`secrets.env_prefix`).
const ENV_A: &str = "TEAMS_BOT_SECRET_org-a__MAIN";

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
    let secret_file = env.secret_file("org-b", "bot", format!("{SECRET_B}\n").as_bytes());

    let with_bot = |org: &str, app: &str, tenant: &str, bot: BotDoc| {
        let mut doc = env.org_integration(org, app, tenant);
        doc.bot = bot;
        doc
    };
    let bot = |app: &str| BotDoc {
        app_id: app.into(),
        app_secret: None,
        app_secret_sealed: None,
        app_secret_env: None,
        app_secret_file: None,
        authority: None,
    };
    env.insert_org_integration(with_bot("org-a", "app-a", "tenant-a", BotDoc { app_secret_env: Some(ENV_A.into()), ..bot("app-a") })).await;
    env.insert_org_integration(with_bot("org-b", "app-b", "tenant-b", BotDoc { app_secret_file: Some(secret_file), ..bot("app-b") })).await;
    env.insert_org_integration(with_bot("org-c", "app-c", "tenant-a", BotDoc { app_secret: Some(SECRET_C_WRONG.into()), ..bot("app-c") }))
        .await;
    env.insert_conversation("org-a", "19:conv-a@thread.tacv2", herald::mongo::ConversationKind::Channel, None).await;
    env.insert_conversation("org-b", "19:conv-b@thread.tacv2", herald::mongo::ConversationKind::Channel, None).await;
    env.insert_conversation("org-c", "19:conv-a@thread.tacv2", herald::mongo::ConversationKind::Channel, None).await;
    let client = env.sim.client();
    client.remove_from_roster("19:conv-b@thread.tacv2", "app-b").await.unwrap();

    let worker = env.observed_worker(&[(ENV_A, SECRET_A), ("HERALD_LOG__FILTER", "debug")]);

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
}

/// A record reaches only its own organization's secrets: impostor records
/// that name another organization's bot app id together with that
/// organization's real secret (its variable, its file, a copy of its sealed
/// secret), or anything else of the worker (its settings' variables, a
/// device, a FIFO, a huge file), are refused before any request, while the
/// victims' own records deliver. Run against a real `herald worker` process
/// holding the victims' variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_reaches_only_its_own_organizations_secrets() {
    let mut world = two_org_world();
    // The impostors' channels accept the victims' bots: only the secret rules stop them.
    for (k, app) in ["app-a", "app-b", "app-a", "app-a", "app-a", "app-a"].iter().enumerate() {
        world.tenants.push(teams_sim::Tenant { id: format!("tenant-imp-{k}"), name: None });
        world.conversations.push(channel(&format!("19:imp-{k}@thread.tacv2"), &format!("tenant-imp-{k}"), app));
    }
    let env = TestEnv::new(world).await;
    let secrets = herald::secrets::Secrets::new(&env.settings.secrets).unwrap();
    let unset = BotDoc {
        app_id: String::new(),
        app_secret: None,
        app_secret_sealed: None,
        app_secret_env: None,
        app_secret_file: None,
        authority: None,
    };
    let record = |org: &str, app: &str, tenant: &str, bot: BotDoc| {
        let mut doc = env.org_integration(org, app, tenant);
        doc.bot = BotDoc { app_id: app.into(), ..bot };
        doc
    };
    // The victims: org-a's secret in its variable, org-b's in its file.
    let file_b = env.secret_file("org-b", "bot", b"secret-b\n");
    env.insert_org_integration(record("org-a", "app-a", "tenant-a", BotDoc { app_secret_env: Some(ENV_A.into()), ..unset.clone() })).await;
    env.insert_org_integration(record("org-b", "app-b", "tenant-b", BotDoc { app_secret_file: Some(file_b.clone()), ..unset.clone() }))
        .await;
    // In an impostor's own folder: a link to a device, a FIFO, a sparse 100 MiB file.
    let own = |name: &str| format!("{}/imp-4/{name}", env.settings.secrets.directory);
    env.secret_file("imp-4", "placeholder", b"x");
    std::os::unix::fs::symlink("/dev/zero", own("zero")).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(own("fifo")).status().unwrap().success());
    std::fs::File::create(own("huge")).unwrap().set_len(100 << 20).unwrap();
    let org_a = record("org-a", "app-a", "tenant-a", unset.clone());
    let copied = secrets.sealed_bot(herald::secrets::Owner::of(&org_a), None, &"secret-a".to_owned().into()).unwrap();
    let impostors = [
        ("imp-0", "app-a", BotDoc { app_secret_env: Some(ENV_A.into()), ..unset.clone() }, "is not this organization's"),
        ("imp-1", "app-b", BotDoc { app_secret_file: Some(file_b.clone()), ..unset.clone() }, "is not this organization's"),
        ("imp-2", "app-a", copied, "does not open"),
        ("imp-3", "app-a", BotDoc { app_secret_env: Some("HERALD_AMQP_URL".into()), ..unset.clone() }, "is not this organization's"),
        ("imp-4", "app-a", BotDoc { app_secret_file: Some(own("zero")), ..unset.clone() }, "not a regular file"),
        ("imp-5", "app-a", BotDoc { app_secret_file: Some("/proc/self/environ".into()), ..unset.clone() }, "is not this organization's"),
    ];
    env.insert_conversation("org-a", CONV_A, herald::mongo::ConversationKind::Channel, None).await;
    env.insert_conversation("org-b", CONV_B, herald::mongo::ConversationKind::Channel, None).await;
    for (k, (org, app, bot, _)) in impostors.iter().enumerate() {
        env.insert_org_integration(record(org, app, &format!("tenant-{org}"), bot.clone())).await;
        env.insert_conversation(org, &format!("19:imp-{k}@thread.tacv2"), herald::mongo::ConversationKind::Channel, None).await;
    }
    // imp-4's FIFO and huge file, as its records on two more integrations.
    for (integration, name) in [("int-fifo", "fifo"), ("int-huge", "huge")] {
        let mut doc = record("imp-4", "app-a", "tenant-imp-4", BotDoc { app_secret_file: Some(own(name)), ..unset.clone() });
        doc.integration_id = integration.into();
        env.insert_org_integration(doc).await;
    }
    let worker = env.observed_worker(&[(ENV_A, "secret-a")]);

    let mut expected = Vec::new();
    for (k, (org, _, _, why)) in impostors.iter().enumerate() {
        let job = job(org, &format!("19:imp-{k}@thread.tacv2"), "reach");
        expected.push((job.id.to_string(), *why));
        env.publish(&job).await;
    }
    for (integration, why) in [("int-fifo", "not a regular file"), ("int-huge", "larger than")] {
        let mut value = job_value("imp-4", "19:imp-4@thread.tacv2", "reach");
        value["integration_id"] = integration.into();
        let job = job_json(value);
        expected.push((job.id.to_string(), why));
        env.publish(&job).await;
    }
    // After every impostor: the victims' own jobs still go out.
    env.publish(&job("org-a", CONV_A, "own variable")).await;
    env.publish(&job("org-b", CONV_B, "own file")).await;
    let records = env.activities(2).await;
    let letters = env.dead_letters(expected.len()).await;
    let metrics = worker.metrics().await;
    let log = worker.stop().await;

    let mut posted: Vec<(String, String)> = records.iter().map(|r| (r.app_id.clone(), r.conversation_id.clone())).collect();
    posted.sort();
    assert_eq!(posted, [("app-a".to_owned(), CONV_A.to_owned()), ("app-b".to_owned(), CONV_B.to_owned())]);
    for (id, why) in &expected {
        let letter = letters.iter().find(|l| l.message_id.as_deref() == Some(id)).unwrap_or_else(|| panic!("no dead letter for {id}"));
        assert_eq!(letter.reason.as_deref(), Some("org_integration_misconfigured"), "{letter:?}");
        assert!(letter.headers["x-herald-error"].contains(why), "{why}: {}", letter.headers["x-herald-error"]);
    }
    let stats = env.sim.client().stats().await.unwrap();
    assert_eq!(stats.responses_by_status.get(&401), None, "no impostor reached the token endpoint: {:?}", stats.responses_by_status);
    for text in [&log, &metrics] {
        assert!(!text.contains("secret-a") && !text.contains("secret-b"), "a secret leaked");
    }
    let letters_text = format!("{letters:?}");
    assert!(!letters_text.contains("secret-a") && !letters_text.contains("secret-b"), "a secret leaked into a dead letter");
}

/// A plaintext secret in MongoDB (a record from before sealing) is refused
/// by default; `seal-secrets` seals it in place, a worker then delivers with
/// it; a key rotation re-seals it with the new key, after which the old key
/// is no longer needed, and a ring without the key names the missing key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_refused_until_seal_secrets_seals_it() {
    const NEW_KEY: &str = "bmV3LXJpbmcta2V5LWZvci10aGUtcm90YXRpb24tdGU=";
    let env = TestEnv::new(two_org_world()).await;
    env.insert_raw_org_integration(env.org_integration("org-a", "app-a", "tenant-a")).await;
    env.insert_conversation("org-a", CONV_A, herald::mongo::ConversationKind::Channel, None).await;
    let stored = || async { env.store.list_org_integrations(Some("org-a"), 1).await.unwrap().remove(0).bot };
    assert_eq!(stored().await.app_secret.as_deref(), Some("secret-a"), "stored in the clear, as before sealing");

    let worker = env.spawn_worker();
    env.publish(&job("org-a", CONV_A, "before sealing")).await;
    let letter = env.dead_letters(1).await.remove(0);
    worker.stop().await;
    assert_eq!(letter.reason.as_deref(), Some("org_integration_misconfigured"));
    assert!(letter.headers["x-herald-error"].contains("plaintext"), "{}", letter.headers["x-herald-error"]);

    let doctor = |output: std::process::Output| {
        let checks = json(&output);
        checks.as_array().unwrap().iter().find(|c| c["check"] == "bot secrets").cloned().expect("a bot secrets check")
    };
    let before = doctor(env.herald(&["doctor", "--json"]).await);
    assert_eq!(before["ok"], false, "{before}");
    assert!(before["detail"].as_str().unwrap().contains("1 in plaintext"), "{before}");

    let dry = stdout(&env.herald_ok(&["org-integrations", "seal-secrets", "--dry-run"]).await);
    assert!(dry.contains("would seal 1 secret(s) with key it"), "{dry}");
    assert_eq!(stored().await.app_secret.as_deref(), Some("secret-a"), "a dry run writes nothing");
    let sealed = stdout(&env.herald_ok(&["org-integrations", "seal-secrets"]).await);
    assert!(sealed.contains("sealed 1 secret(s) with key it"), "{sealed}");
    let bot = stored().await;
    assert_eq!(bot.app_secret, None);
    assert_eq!(bot.app_secret_sealed.as_ref().map(|s| s.key_id.as_str()), Some("it"));
    let after = doctor(env.herald(&["doctor", "--json"]).await);
    assert_eq!(after["ok"], true, "{after}");
    assert!(after["detail"].as_str().unwrap().contains("1 sealed with the current key"), "{after}");
    let again = stdout(&env.herald_ok(&["org-integrations", "seal-secrets"]).await);
    assert!(again.contains("sealed 0 secret(s)") && again.contains("1 already current"), "re-running is safe: {again}");

    let worker = env.spawn_worker();
    env.publish(&job("org-a", CONV_A, "after sealing")).await;
    let record = env.activities(1).await.remove(0);
    worker.stop().await;
    assert_eq!((record.app_id.as_str(), record.conversation_id.as_str()), ("app-a", CONV_A));

    // Rotation: a second key, named by seal_with, then the old key dropped.
    let both = [("HERALD_SECRETS__KEYS__K2", NEW_KEY), ("HERALD_SECRETS__SEAL_WITH", "k2")];
    let rotated = env.herald_command(&["org-integrations", "seal-secrets"]).envs(both).output().await.unwrap();
    assert!(stdout(&rotated).contains("sealed 1 secret(s) with key k2"), "{}{}", stdout(&rotated), stderr(&rotated));
    assert_eq!(stored().await.app_secret_sealed.map(|s| s.key_id), Some("k2".to_owned()));
    let check = ["org-integrations", "check", "--org", "org-a", "--integration", INTEGRATION];
    let new_only =
        env.herald_command(&check).env_remove("HERALD_SECRETS__KEYS__IT").env("HERALD_SECRETS__KEYS__K2", NEW_KEY).output().await.unwrap();
    assert!(new_only.status.success(), "the new key alone opens it: {}{}", stdout(&new_only), stderr(&new_only));
    let old_only = env.herald(&check).await;
    assert!(!old_only.status.success());
    assert!(stderr(&old_only).contains("sealed with key \"k2\", which is not in secrets.keys"), "{}", stderr(&old_only));

    // A seed file's plaintext secret is sealed before it is written.
    let seed = std::env::temp_dir().join(format!("herald-seed-{}.json", env.id));
    let record = serde_json::json!({ "org_integrations": [{
        "organization_id": "org-b", "integration_id": INTEGRATION, "status": "active", "tenant_id": "tenant-b",
        "service_url": env.sim.service_url(), "bot": { "app_id": "app-b", "app_secret": "secret-b" },
    }] });
    std::fs::write(&seed, record.to_string()).unwrap();
    env.herald_command(&["seed", "--file", seed.to_str().unwrap()]).envs(both).output().await.unwrap();
    let seeded = env.store.list_org_integrations(Some("org-b"), 1).await.unwrap().remove(0).bot;
    assert_eq!(seeded.app_secret, None, "never stored in the clear");
    assert_eq!(seeded.app_secret_sealed.map(|s| s.key_id), Some("k2".to_owned()));
    std::fs::remove_file(&seed).unwrap();

    // No key at all: nothing can be sealed, and herald says why.
    let mut no_key =
        env.herald_command(&["org-integrations", "set-secret", "--org", "org-a", "--integration", INTEGRATION, "--secret-stdin"]);
    let no_key = no_key.env_remove("HERALD_SECRETS__KEYS__IT").output().await.unwrap();
    assert_eq!(no_key.status.code(), Some(2), "{}", stderr(&no_key));
    assert!(stderr(&no_key).contains("no key to seal with"), "{}", stderr(&no_key));
}
