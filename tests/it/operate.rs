//! Operating herald without a database shell: an admin onboards an
//! organization, checks it, rotates its secret, switches it off and removes
//! it, each with a `herald` command run as a process against the real
//! services; and an operator asks what happened to one job.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use crate::support::*;

/// `herald args` with `input` on standard input.
async fn herald_with_stdin(env: &TestEnv, args: &[&str], input: &str) -> std::process::Output {
    let mut child = env.herald_command(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).await.unwrap();
    child.wait_with_output().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_onboards_checks_rotates_disables_and_removes_an_organization() {
    let env = TestEnv::new(two_org_world()).await;
    let service_url = env.sim.service_url();
    let target = ["--org", "org-a", "--integration", INTEGRATION];
    let add = |url: &str| -> Vec<String> {
        let flags = ["org-integrations", "add", "--tenant", "tenant-a", "--app-id", "app-a", "--secret-stdin", "--service-url", url];
        flags.iter().chain(&target).map(|s| s.to_string()).collect()
    };

    // A record the worker would refuse is refused before anything is written.
    let refused = herald_with_stdin(&env, &strs(&add("https://teams.evil.example/")), "secret-a").await;
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("nothing written"), "{}", stderr(&refused));
    let listed = json(&env.herald_ok(&["org-integrations", "list", "--json"]).await);
    assert_eq!(listed, serde_json::json!([]));

    // Added, and adding again is safe. The secret came from stdin, never a flag.
    let added = herald_with_stdin(&env, &strs(&add(&service_url)), "secret-a\n").await;
    assert!(added.status.success(), "{}", stderr(&added));
    assert!(stdout(&added).contains("added org_integration org-a"), "{}", stdout(&added));
    let again = herald_with_stdin(&env, &strs(&add(&service_url)), "secret-a").await;
    assert!(stdout(&again).contains("updated org_integration org-a"), "{}", stdout(&again));
    let shown = json(&env.herald_ok(&[&["org-integrations", "show"][..], &target, &["--json"]].concat()).await);
    assert_eq!(shown["secret"], "sealed in MongoDB (key it)");
    assert!(!shown.to_string().contains("secret-a"), "the secret is never shown: {shown}");
    let stored = env.store.list_org_integrations(Some("org-a"), 1).await.unwrap().remove(0);
    assert_eq!(stored.bot.app_secret, None, "never stored in the clear");
    let sealed = stored.bot.app_secret_sealed.expect("sealed");
    assert!(!sealed.ciphertext.contains("secret-a") && sealed.key_id == "it", "{sealed:?}");

    // A conversation, then a check that posts a test card through the real path.
    env.herald_ok(&[&["conversations", "add"][..], &target, &["--conversation", CONV_A]].concat()).await;
    let check = [&["org-integrations", "check"][..], &target, &["--send-test", "--conversation", CONV_A, "--json"]].concat();
    let steps = json(&env.herald_ok(&check).await);
    let names: Vec<_> = steps.as_array().unwrap().iter().map(|s| (s["step"].as_str().unwrap(), s["ok"].as_bool().unwrap())).collect();
    assert_eq!(names, [("record", true), ("structure", true), ("secret", true), ("token", true), ("conversation", true), ("send", true)]);
    let record = env.activities(1).await.remove(0);
    assert_eq!((record.app_id.as_str(), record.conversation_id.as_str()), ("app-a", CONV_A));

    // A reference outside the organization's own scope is refused before
    // anything is written: the worker's settings, another organization's
    // variable, a device or another organization's folder.
    let other_folder = format!("{}/org-b/bot", env.settings.secrets.directory);
    for flags in [
        ["--secret-env", "HERALD_MONGODB_URI"],
        ["--secret-env", "TEAMS_BOT_SECRET_org-b__MAIN"],
        ["--secret-file", "/dev/zero"],
        ["--secret-file", other_folder.as_str()],
    ] {
        let refused = env.herald(&[&["org-integrations", "set-secret"][..], &target, &flags].concat()).await;
        assert_eq!(refused.status.code(), Some(2), "{flags:?}: {}", stderr(&refused));
        assert!(stderr(&refused).contains("is not this organization's"), "{flags:?}: {}", stderr(&refused));
    }
    let shown = json(&env.herald_ok(&[&["org-integrations", "show"][..], &target, &["--json"]].concat()).await);
    assert_eq!(shown["secret"], "sealed in MongoDB (key it)", "nothing was written");

    // Rotated to an env var of its own scope that the worker does not have: the check names the step.
    env.herald_ok(&[&["org-integrations", "set-secret"][..], &target, &["--secret-env", "TEAMS_BOT_SECRET_org-a__UNSET"]].concat()).await;
    let failed = env.herald(&[&["org-integrations", "check"][..], &target].concat()).await;
    assert_eq!(failed.status.code(), Some(1));
    assert!(
        stderr(&failed).contains("failed at `secret`") && stderr(&failed).contains("TEAMS_BOT_SECRET_org-a__UNSET"),
        "{}",
        stderr(&failed)
    );
    // A wrong secret: the identity platform's own refusal, at the token step.
    let wrong = herald_with_stdin(&env, &[&["org-integrations", "set-secret"][..], &target, &["--secret-stdin"]].concat(), "nope").await;
    assert!(wrong.status.success(), "{}", stderr(&wrong));
    let failed = env.herald(&[&["org-integrations", "check"][..], &target].concat()).await;
    assert!(stderr(&failed).contains("failed at `token`") && stderr(&failed).contains("AADSTS7000215"), "{}", stderr(&failed));

    // Disabled: the check says so; enabled again.
    env.herald_ok(&[&["org-integrations", "disable"][..], &target].concat()).await;
    let failed = env.herald(&[&["org-integrations", "check"][..], &target].concat()).await;
    assert!(stderr(&failed).contains("failed at `record`") && stderr(&failed).contains("disabled"), "{}", stderr(&failed));
    env.herald_ok(&[&["org-integrations", "enable"][..], &target].concat()).await;

    // Removing needs --yes; it takes the conversations along.
    let unconfirmed = env.herald(&[&["org-integrations", "remove"][..], &target].concat()).await;
    assert_eq!(unconfirmed.status.code(), Some(2));
    let removed = env.herald_ok(&[&["org-integrations", "remove"][..], &target, &["--yes"]].concat()).await;
    assert!(stdout(&removed).contains("and its 1 conversation(s)"), "{}", stdout(&removed));
    assert_eq!(json(&env.herald_ok(&["conversations", "list", "--json"]).await), serde_json::json!([]));
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// "Did my alert go out?": the ledger keeps each attempt, `herald
/// deliveries` shows them, and records expire by a TTL index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_every_attempt_of_a_job_and_records_expire_by_retention() {
    use teams_sim::{Action, Route, Rule};
    let env = TestEnv::two_orgs().await;
    let busy = Action::Status { status: 503, code: None, retry_after: Some(1) };
    env.sim.client().add_fault(&Rule { route: Route::Send, sequence: vec![busy], ..Default::default() }).await.unwrap();
    let worker = env.spawn_worker();
    let job = job("org-a", CONV_A, "after one 503");
    env.publish(&job).await;
    let id = job.id.to_string();
    env.sent(&id).await;
    worker.stop().await;

    let shown = json(&env.herald_ok(&["deliveries", "show", &id, "--json"]).await);
    let history = shown[0]["history"].as_array().unwrap();
    let outcomes: Vec<_> = history.iter().map(|a| (a["outcome"].as_str().unwrap(), a["http_status"].as_i64())).collect();
    assert_eq!(outcomes, [("retrying", Some(503)), ("sent", Some(201))], "{shown}");
    assert!(history.iter().all(|a| a["bot_app_id"] == "app-a" && a["conversation_id"] == CONV_A), "{shown}");
    let text = stdout(&env.herald_ok(&["deliveries", "show", &id]).await);
    assert!(text.contains("sent") && text.contains("503") && text.contains("ServiceUnavailable"), "{text}");
    let listed = json(&env.herald_ok(&["deliveries", "list", "--org", "org-a", "--state", "sent", "--since", "1h", "--json"]).await);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let none = json(&env.herald_ok(&["deliveries", "list", "--org", "org-b", "--json"]).await);
    assert_eq!(none, serde_json::json!([]));
    let typo = env.herald(&["deliveries", "list", "--state", "delivered"]).await;
    assert_eq!(typo.status.code(), Some(2), "an unknown state is a usage error");

    // `dlq show` of a job that was never dead-lettered falls back to the ledger.
    let dlq_show = stdout(&env.herald_ok(&["dlq", "show", &id]).await);
    assert!(dlq_show.contains("not in") && dlq_show.contains("\"state\": \"sent\""), "{dlq_show}");

    // Retention: a TTL index on updated_at, from ledger.retention_days (30 by default).
    let client = mongodb::Client::with_uri_str("mongodb://127.0.0.1:27017/?directConnection=true").await.unwrap();
    let indexes: Vec<mongodb::IndexModel> = futures_util::TryStreamExt::try_collect(
        client.database(&env.settings.mongodb_database).collection::<mongodb::bson::Document>("deliveries").list_indexes().await.unwrap(),
    )
    .await
    .unwrap();
    let ttl = indexes.iter().find_map(|i| i.options.as_ref()?.expire_after).expect("a TTL index");
    assert_eq!(ttl, std::time::Duration::from_secs(30 * 86_400));
    client.shutdown().await;
}

/// `herald doctor` says what is missing: the topology before `setup` is
/// complete, and an index someone dropped; after `setup`, all is well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_finds_a_dropped_index_and_setup_restores_it() {
    let env = TestEnv::new(two_org_world()).await;
    let healthy = env.herald(&["doctor"]).await;
    assert!(healthy.status.success(), "{}", stdout(&healthy));
    assert!(stdout(&healthy).contains("ok    indexes"), "{}", stdout(&healthy));

    let client = mongodb::Client::with_uri_str("mongodb://127.0.0.1:27017/?directConnection=true").await.unwrap();
    let conversations = client.database(&env.settings.mongodb_database).collection::<mongodb::bson::Document>("conversations");
    conversations.drop_index("conversation_unique").await.unwrap();
    let sick = env.herald(&["doctor"]).await;
    assert_eq!(sick.status.code(), Some(1));
    assert!(stdout(&sick).contains("conversations.conversation_unique") && stdout(&sick).contains("herald setup"), "{}", stdout(&sick));
    env.herald_ok(&["setup"]).await;
    let checks = json(&env.herald_ok(&["doctor", "--json"]).await);
    let indexes = checks.as_array().unwrap().iter().find(|c| c["check"] == "indexes").expect("an indexes check");
    assert_eq!(indexes["ok"], true, "{checks}");
    // The dead-letter queue's policy, read through the management API (3.x here: none needed).
    let policy = stdout(&env.herald_ok(&["doctor", "--management-url", "http://guest:guest@127.0.0.1:15672/"]).await);
    assert!(policy.contains("ok    dead-letter policy: RabbitMQ 3."), "{policy}");
    let refused = env.herald(&["doctor", "--management-url", "http://guest:not-the-pw-4242@127.0.0.1:15672/"]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(stdout(&refused).contains("FAIL  dead-letter policy") && !stdout(&refused).contains("not-the-pw-4242"), "{}", stdout(&refused));
    client.shutdown().await;
}

/// `herald enqueue` before `herald setup`: the broker has no exchange to
/// take the job, which no reconnection fixes, so enqueue fails at once
/// (rather than publishing again for a minute), naming the job and the
/// broker's reason once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_without_the_topology_fails_at_once_naming_the_job() {
    let env = TestEnv::two_orgs().await;
    let prefix = format!("{}-not-set-up", env.settings.topology_prefix);
    let mut command =
        env.herald_command(&["enqueue", "--org", "org-a", "--integration", INTEGRATION, "--conversation", "c-1", "--title", "t"]);
    command.env("HERALD_TOPOLOGY_PREFIX", &prefix);
    // Publishing again would go on for 60 s (HEAL_FOR).
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), command.output())
        .await
        .expect("enqueue still publishing again after 30 s: a missing exchange must fail at once")
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let line = stderr(&out).lines().find(|l| l.starts_with("herald: error:")).map(str::to_owned).unwrap_or_default();
    assert!(line.contains("publishing job ") && line.contains(&format!("no exchange '{prefix}.jobs'")), "{}", stderr(&out));
    assert_eq!(line.matches("no exchange").count(), 1, "the broker's reason once: {line}");
}

/// Week-one metrics: queue depths and the age of the work queue's head,
/// polled; outcomes per organization only for the organizations named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_queue_depths_head_age_and_named_organizations_only() {
    let env = TestEnv::two_orgs().await;
    let worker = env.observed_worker(&[("HERALD_METRICS__ORGANIZATIONS", "[\"org-a\"]"), ("HERALD_METRICS__QUEUE_POLL_SECS", "1")]);
    env.publish(&job("org-a", CONV_A, "named")).await;
    env.publish(&job("org-b", CONV_B, "other")).await;
    env.publish(&job("org-unknown", CONV_B, "other, dead-lettered")).await;
    env.activities(2).await;
    env.dead_letters(1).await;
    let series = |page: &str, prefix: &str| -> Option<f64> {
        page.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    let page = eventually("the dead-letter queue's depth polled", std::time::Duration::from_secs(15), || async {
        let page = worker.metrics().await;
        (series(&page, "herald_queue_messages{queue=\"dead\"}") == Some(1.0)).then_some(page)
    })
    .await;
    assert_eq!(series(&page, "herald_queue_messages{queue=\"work\"}"), Some(0.0));
    assert_eq!(series(&page, "herald_organization_jobs_total{organization=\"org-a\",outcome=\"delivered\"}"), Some(1.0));
    assert_eq!(series(&page, "herald_organization_jobs_total{organization=\"other\",outcome=\"delivered\"}"), Some(1.0));
    assert_eq!(series(&page, "herald_organization_jobs_total{organization=\"other\",outcome=\"dead_lettered\"}"), Some(1.0));
    assert!(!page.contains("org-b") && !page.contains("org-unknown"), "organizations not named are never labels");
    assert!(series(&page, "herald_oldest_job_age_seconds").is_some());
    worker.stop().await;
}
