//! `herald dlq` on the real broker: every verb and filter, and no loss when a
//! replay is killed half-way.

use std::collections::HashMap;
use std::process::{Output, Stdio};
use std::time::Duration;

use herald::rabbitmq::{Publisher, ROUTING_KEY, headers};
use lapin::BasicProperties;
use lapin::types::FieldTable;
use serde_json::Value;

use crate::support::*;

/// `herald args` once the dead-letter queue is back at `n` messages (a
/// listing hands its messages back asynchronously; see `settles_at`).
async fn after_settling(env: &TestEnv, n: u32, args: &[&str]) -> Output {
    env.settles_at(&env.topology.dead_queue(), n).await;
    env.herald_ok(args).await
}

/// Put a dead letter straight into the dead-letter queue, as the worker would.
async fn dead_letter(env: &TestEnv, job: &herald::job::Job, reason: &str, code: Option<&str>, at: &str, replays: u32) {
    env.put_dead_letter(job, dead_letter_headers(job, reason, code, at, replays)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_stats_and_show_remove_nothing_and_filter() {
    let env = TestEnv::new(two_org_world()).await;
    let a1 = job("org-a", CONV_A, "a1");
    let a2 = job("org-a", CONV_A, "a2");
    let b1 = job("org-b", CONV_B, "b1");
    dead_letter(&env, &a1, "teams_forbidden", Some("BotNotInConversationRoster"), "2026-11-20T10:00:00Z", 0).await;
    dead_letter(&env, &a2, "org_integration_disabled", None, "2026-11-21T10:00:00Z", 0).await;
    dead_letter(&env, &b1, "teams_forbidden", Some("ConversationBlockedByUser"), "2026-11-22T10:00:00Z", 0).await;

    for _ in 0..3 {
        let all = json(&after_settling(&env, 3, &["dlq", "list", "--json"]).await);
        assert_eq!(all.as_array().unwrap().len(), 3, "listing removes nothing and duplicates nothing");
    }
    let ids = |v: &Value| v.as_array().unwrap().iter().map(|l| l["message_id"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    let by_org = json(&after_settling(&env, 3, &["dlq", "list", "--org", "org-a", "--json"]).await);
    assert_eq!(ids(&by_org).len(), 2);
    let by_reason = json(&after_settling(&env, 3, &["dlq", "list", "--reason", "teams_forbidden", "--json"]).await);
    assert_eq!(ids(&by_reason).len(), 2);
    let by_code = json(&after_settling(&env, 3, &["dlq", "list", "--teams-code", "ConversationBlockedByUser", "--json"]).await);
    assert_eq!(ids(&by_code), [b1.id.to_string()]);
    let by_integration = json(&after_settling(&env, 3, &["dlq", "list", "--integration", INTEGRATION, "--org", "org-b", "--json"]).await);
    assert_eq!(ids(&by_integration), [b1.id.to_string()]);
    let since = json(
        &after_settling(&env, 3, &["dlq", "list", "--since", "2026-11-21T00:00:00Z", "--until", "2026-11-21T23:00:00Z", "--json"]).await,
    );
    assert_eq!(ids(&since), [a2.id.to_string()]);
    let limited = json(&after_settling(&env, 3, &["dlq", "list", "--limit", "1", "--json"]).await);
    assert_eq!(limited.as_array().unwrap().len(), 1);
    let table = stdout(&after_settling(&env, 3, &["dlq", "list"]).await);
    assert!(table.contains("BotNotInConversationRoster") && table.contains("3 dead letter(s)"), "{table}");

    let stats = json(&after_settling(&env, 3, &["dlq", "stats", "--json"]).await);
    assert_eq!(stats["total"], 3);
    assert_eq!(stats["by_reason"]["teams_forbidden"], 2);
    assert_eq!(stats["by_organization"]["org-a"], 2);
    assert_eq!(stats["by_teams_code"]["BotNotInConversationRoster"], 1);
    assert_eq!(stats["oldest"], "2026-11-20T10:00:00Z");
    assert_eq!(stats["newest"], "2026-11-22T10:00:00Z");

    let shown = json(&after_settling(&env, 3, &["dlq", "show", &a1.id.to_string(), "--json"]).await);
    assert_eq!(shown["dead_letter"]["headers"]["x-herald-teams-code"], "BotNotInConversationRoster");
    assert!(shown["dead_letter"]["body"].as_str().unwrap().contains("a1"));
    assert!(shown["delivery"].is_null());
    env.settles_at(&env.topology.dead_queue(), 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_the_cause_is_fixed_delivers_and_leaves_the_rest() {
    let env = TestEnv::two_orgs().await;
    env.sim.client().remove_from_roster(CONV_A, "app-a").await.unwrap();
    let worker = env.spawn_worker();
    let refused = job("org-a", CONV_A, "parked");
    env.publish(&refused).await;
    env.publish(&job("org-unknown", CONV_A, "stays")).await;
    env.dead_letters(2).await;

    // The operator re-adds the bot and releases the quarantine.
    env.sim.client().add_to_roster(CONV_A, "app-a").await.unwrap();
    let released = stdout(
        &env.herald_ok(&["conversations", "release", "--org", "org-a", "--integration", INTEGRATION, "--conversation", CONV_A]).await,
    );
    assert!(released.contains("herald dlq replay"), "{released}");
    // Workers trust their cache for resolution_cache_ttl_secs; a new worker reads afresh.
    worker.stop().await;
    let worker = env.spawn_worker();

    let dry = stdout(&env.herald_ok(&["dlq", "replay", "--org", "org-a", "--dry-run"]).await);
    assert!(dry.contains(&refused.id.to_string()) && dry.contains("would replay 1"), "{dry}");
    // A dry run changes nothing.
    env.settles_at(&env.topology.dead_queue(), 2).await;
    let out = stdout(&env.herald_ok(&["dlq", "replay", "--org", "org-a", "--reason", "teams_forbidden", "--yes"]).await);
    assert!(out.contains("replayed 1") && out.contains("1 did not match"), "{out}");
    let records = env.activities(1).await;
    assert_eq!(records[0].app_id, "app-a");
    let left = env.dead_letters(1).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].reason.as_deref(), Some("org_integration_not_found"));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_job_that_fails_again_counts_its_replays_and_is_refused_past_the_limit() {
    let env = TestEnv::two_orgs().await;
    let worker = env.spawn_worker();
    let lost = job("org-unknown", CONV_A, "x");
    env.publish(&lost).await;
    env.dead_letters(1).await;
    for round in 1..=2 {
        env.herald_ok(&["dlq", "replay", "--all", "--yes"]).await;
        let letter = eventually("the job to fail again", Duration::from_secs(20), || async {
            herald::dlq::browse(&env.connection, &env.topology.dead_queue(), &env.signer, 5)
                .await
                .ok()?
                .into_iter()
                .find(|l| l.replays() == round)
        })
        .await;
        assert_eq!(letter.reason.as_deref(), Some("org_integration_not_found"));
    }
    worker.stop().await;
    // Past dlq.max_replays (2 here) replay refuses it unless forced.
    let mut env_vars = env.env_vars();
    env_vars.push(("HERALD_DLQ__MAX_REPLAYS".into(), "2".into()));
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["dlq", "replay", "--all", "--yes"])
        .envs(env_vars.clone())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&refused.stdout);
    assert!(text.contains("replayed 0") && text.contains("already replayed 2 times"), "{text}");
    assert_eq!(refused.status.code(), Some(3), "a partial replay exits 3");
    env.settles_at(&env.topology.dead_queue(), 1).await;
    let forced = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["dlq", "replay", "--all", "--yes", "--force"])
        .envs(env_vars)
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&forced.stdout).contains("replayed 1"));
    env.settles_at(&env.topology.work_queue(), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_needs_yes_and_export_import_round_trips() {
    let env = TestEnv::new(two_org_world()).await;
    let old = job("org-a", CONV_A, "old");
    let new = job("org-b", CONV_B, "new");
    dead_letter(&env, &old, "teams_forbidden", Some("BotNotInConversationRoster"), "2026-01-01T00:00:00Z", 1).await;
    let now = chrono::Utc::now().to_rfc3339();
    dead_letter(&env, &new, "invalid_job", None, &now, 0).await;

    let dir = std::env::temp_dir().join(format!("herald-it-{}", env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("dlq.jsonl");
    let out = stdout(&env.herald_ok(&["dlq", "export", "--out", file.to_str().unwrap()]).await);
    assert!(out.contains("exported 2"), "{out}");
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 2);
    // Export removes nothing.
    env.settles_at(&env.topology.dead_queue(), 2).await;

    let dry = stdout(&env.herald_ok(&["dlq", "purge", "--older-than", "30d"]).await);
    assert!(dry.contains("1 dead letter(s) match; nothing removed"), "{dry}");
    env.settles_at(&env.topology.dead_queue(), 2).await;
    let purged = stdout(&env.herald_ok(&["dlq", "purge", "--older-than", "30d", "--yes"]).await);
    assert!(purged.contains(&format!("removed {}", old.id)) && purged.contains("removed 1 dead letter(s)"), "{purged}");
    env.settles_at(&env.topology.dead_queue(), 1).await;
    env.herald_ok(&["dlq", "purge", "--all", "--yes"]).await;
    env.settles_at(&env.topology.dead_queue(), 0).await;

    let imported = stdout(&env.herald_ok(&["dlq", "import", file.to_str().unwrap()]).await);
    assert!(imported.contains("imported 2"), "{imported}");
    let letters = env.dead_letters(2).await;
    let by_id: HashMap<_, _> = letters.iter().map(|l| (l.message_id.clone().unwrap(), l)).collect();
    let back = by_id[&old.id.to_string()];
    assert_eq!(back.headers["x-herald-teams-code"], "BotNotInConversationRoster");
    assert_eq!(back.headers["x-herald-replays"], "1");
    assert_eq!(back.body.as_bytes(), wire(&old).as_slice());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SIGKILL a replay of 10,000 dead letters half-way: afterwards each message
/// is in the dead-letter queue or the work queue (both only for the in-flight
/// batch), none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_half_way_loses_nothing() {
    const LETTERS: usize = 10_000;
    let env = TestEnv::new(two_org_world()).await;
    let publisher = Publisher::open(env.connection.clone()).await.unwrap();
    let mut ids = Vec::with_capacity(LETTERS);
    for chunk in 0..LETTERS / 500 {
        let mut pending = Vec::new();
        for i in 0..500 {
            let job = job("org-a", CONV_A, &format!("{chunk}-{i}"));
            ids.push(job.id.to_string());
            let mut table = FieldTable::default();
            headers::set_str(&mut table, headers::REASON, "teams_forbidden");
            let properties = BasicProperties::default().with_message_id(job.id.to_string().into()).with_headers(table);
            pending.push(publisher.start(&env.topology.dead_exchange(), ROUTING_KEY, &wire(&job), properties).await.unwrap());
        }
        for p in pending {
            p.confirmed().await.unwrap();
        }
    }
    assert_eq!(env.queue_len(&env.topology.dead_queue()).await as usize, LETTERS);

    let mut replay = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["dlq", "replay", "--all", "--yes", "--rate", "2000"])
        .envs(env.env_vars())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let work = env.topology.work_queue();
    eventually("the replay to be under way", Duration::from_secs(60), || async { (env.queue_len(&work).await >= 2000).then_some(()) })
        .await;
    replay.start_kill().unwrap();
    replay.wait().await.unwrap();

    let dead = env.topology.dead_queue();
    // Letters the killed replay held come back to the dead-letter queue when
    // the broker notices its connection is gone; a batch published but not
    // yet removed is in both queues meanwhile, so counts alone cannot say
    // when all are back: wait until every id is seen (or fail: one was lost).
    let (seen, in_dead, in_work) = eventually("every dead letter back in one of the queues", Duration::from_secs(15), || async {
        let (d, w) = (env.queue_len(&dead).await as usize, env.queue_len(&work).await as usize);
        let mut seen: HashMap<String, usize> = HashMap::new();
        for queue in [&dead, &work] {
            for letter in herald::dlq::browse(&env.connection, queue, &env.signer, LETTERS + 1000).await.ok()? {
                *seen.entry(letter.message_id?).or_default() += 1;
            }
        }
        ids.iter().all(|id| seen.contains_key(id)).then_some((seen, d, w))
    })
    .await;
    assert!(in_work < LETTERS, "killed half-way ({in_work} replayed, {in_dead} in the DLQ)");
    let twice = seen.values().filter(|n| **n > 1).count();
    assert!(twice <= 256, "duplicates only for the one batch in flight: {twice}");
}

/// Scripts get exit codes and refusals they can rely on: a replay or purge
/// without a filter or `--all` is a usage error (2), so is a misspelt
/// reason, and a replay a script did not confirm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_purge_refuse_to_guess_what_the_operator_meant() {
    let env = TestEnv::new(two_org_world()).await;
    let letter = job("org-a", CONV_A, "kept");
    dead_letter(&env, &letter, "teams_forbidden", None, "2026-11-20T10:00:00Z", 0).await;
    for args in [
        vec!["dlq", "replay", "--yes"],
        vec!["dlq", "purge", "--yes"],
        vec!["dlq", "replay", "--all", "--org", "org-a", "--yes"],
        vec!["dlq", "replay", "--reason", "teams_forbiden", "--yes"],
        vec!["dlq", "replay", "--org", "org-a"],
        vec!["dlq", "purge", "--older-than", "18446744073709551615d", "--yes"],
        vec!["dlq", "list", "--since", "99999999999d"],
    ] {
        let output = env.herald(&args).await;
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}{}", stdout(&output), stderr(&output));
    }
    let typo = stderr(&env.herald(&["dlq", "list", "--reason", "teams_forbiden"]).await);
    assert!(typo.contains("teams_forbidden") && typo.contains("not a reason"), "{typo}");
    env.settles_at(&env.topology.dead_queue(), 1).await;

    // --job-id picks one letter; --json everywhere.
    let other = job("org-a", CONV_A, "purged");
    dead_letter(&env, &other, "teams_forbidden", None, "2026-11-20T10:00:00Z", 0).await;
    env.settles_at(&env.topology.dead_queue(), 2).await;
    let purged = json(&env.herald_ok(&["dlq", "purge", "--job-id", &other.id.to_string(), "--yes", "--json"]).await);
    assert_eq!(purged["removed"], true);
    assert_eq!(purged["letters"][0]["message_id"], other.id.to_string());
    env.settles_at(&env.topology.dead_queue(), 1).await;
    let replayed = json(&env.herald_ok(&["dlq", "replay", "--job-id", &letter.id.to_string(), "--yes", "--json"]).await);
    assert_eq!(replayed["replayed"], 1);
    env.settles_at(&env.topology.work_queue(), 1).await;
}

/// A letter the broker dead-lettered itself (a job that crashed workers past
/// the delivery limit) has no herald verdict: its reason, organization and
/// time come from `x-death` and the body, and survive export and import.
/// Importing twice adds nothing the second time; a bad line names itself
/// and nothing is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_dead_letters_are_read_from_x_death_and_survive_export_and_import() {
    use lapin::types::{AMQPValue, FieldTable};
    let env = TestEnv::new(two_org_world()).await;
    let crashed = job("org-b", CONV_B, "crashed workers");
    let mut death = FieldTable::default();
    death.insert("reason".into(), AMQPValue::LongString("delivery_limit".into()));
    death.insert("queue".into(), AMQPValue::LongString(env.topology.work_queue().as_str().into()));
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    death.insert("time".into(), AMQPValue::Timestamp(1_795_000_000));
    let mut table = FieldTable::default();
    table.insert("x-death".into(), AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()));
    let id = crashed.id.to_string();
    let properties = lapin::BasicProperties::default().with_message_id(id.as_str().into()).with_headers(table);
    env.publish_with(&env.topology.dead_exchange(), &wire(&crashed), properties).await;

    let listed = json(&after_settling(&env, 1, &["dlq", "list", "--org", "org-b", "--reason", "delivery_limit_exceeded", "--json"]).await);
    assert_eq!(listed[0]["message_id"], id, "{listed}");
    assert_eq!(listed[0]["dead_lettered_at"], "2026-11-18T11:06:40Z");
    let since = json(&after_settling(&env, 1, &["dlq", "list", "--since", "2026-11-18T00:00:00Z", "--json"]).await);
    assert_eq!(since.as_array().unwrap().len(), 1);

    let dir = std::env::temp_dir().join(format!("herald-it-broker-{}", env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("dlq.jsonl");
    env.settles_at(&env.topology.dead_queue(), 1).await;
    env.herald_ok(&["dlq", "export", "--out", file.to_str().unwrap()]).await;
    env.settles_at(&env.topology.dead_queue(), 1).await;
    env.herald_ok(&["dlq", "purge", "--all", "--yes"]).await;
    env.settles_at(&env.topology.dead_queue(), 0).await;
    let first = json(&env.herald_ok(&["dlq", "import", file.to_str().unwrap(), "--json"]).await);
    assert_eq!((first["imported"].as_u64(), first["already_there"].as_u64()), (Some(1), Some(0)));
    env.settles_at(&env.topology.dead_queue(), 1).await;
    let again = json(&env.herald_ok(&["dlq", "import", file.to_str().unwrap(), "--json"]).await);
    assert_eq!((again["imported"].as_u64(), again["already_there"].as_u64()), (Some(0), Some(1)), "a re-run adds nothing");
    let back = env.dead_letters(1).await.remove(0);
    assert_eq!(back.reason.as_deref(), Some("delivery_limit_exceeded"), "x-death survived the round trip");

    let broken = dir.join("broken.jsonl");
    let good = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&broken, format!("{good}{{\"message_id\": \"{}\", \"headers\": {{}}, \"body\": \n", "x".repeat(300))).unwrap();
    let refused = env.herald(&["dlq", "import", broken.to_str().unwrap()]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("broken.jsonl:2"), "names the line: {}", stderr(&refused));
    env.settles_at(&env.topology.dead_queue(), 1).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The dead-letter tools take bad input cleanly: absurd durations are a
/// usage error that says why, and an import file with an over-long header
/// name or message id names the line and publishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_durations_and_over_long_import_lines_are_refused_with_the_line_named() {
    let env = TestEnv::new(two_org_world()).await;
    for args in [["dlq", "list", "--since", "99999999999d"], ["dlq", "purge", "--older-than", "18446744073709551615s"]] {
        let refused = env.herald(&args).await;
        assert_eq!(refused.status.code(), Some(2), "{args:?}");
        assert!(stderr(&refused).contains("is too long"), "{args:?}: {}", stderr(&refused));
    }
    let kept = job("org-a", CONV_A, "already there");
    env.put_dead_letter(&kept, dead_letter_headers(&kept, "teams_forbidden", None, "2026-11-30T10:00:00Z", 0)).await;
    let dir = std::env::temp_dir().join(format!("herald-it-import-{}", env.id));
    std::fs::create_dir_all(&dir).unwrap();
    let good = serde_json::json!({"message_id": "fine", "headers": {}, "body": "{}"});
    for (name, bad) in [
        ("header-name", serde_json::json!({"message_id": "a", "headers": {"x".repeat(300): "v"}, "body": "{}"})),
        ("message-id", serde_json::json!({"message_id": "m".repeat(300), "headers": {}, "body": "{}"})),
        ("headers-size", serde_json::json!({"message_id": "b", "headers": {"x-big": "v".repeat(70 * 1024)}, "body": "{}"})),
    ] {
        let file = dir.join(format!("{name}.jsonl"));
        std::fs::write(&file, format!("{good}\n{good}\n{bad}\n")).unwrap();
        let refused = env.herald(&["dlq", "import", file.to_str().unwrap()]).await;
        assert_eq!(refused.status.code(), Some(1), "{name}");
        assert!(stderr(&refused).contains(&format!("{name}.jsonl:3")), "{name}: {}", stderr(&refused));
        assert!(stderr(&refused).len() < 2048, "{name}: the error is bounded");
        env.settles_at(&env.topology.dead_queue(), 1).await;
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The header key rotates: after the workers and tools move to a configured
/// key, a letter signed with the key kept in MongoDB, or with a key listed in
/// `headers.previous_keys`, keeps its replay count (the replay limit still
/// holds); a key the tool does not hold makes its headers unverified, and the
/// tool says so. A tool pointed at a database without a key refuses to run
/// and creates none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_header_key_still_believes_old_letters_and_a_tool_never_invents_one() {
    use sha2::{Digest, Sha256};
    let env = TestEnv::two_orgs().await;
    // Signed with the key kept in MongoDB (the test environment's), replayed twice already.
    let kept = job("org-a", CONV_A, "signed with the kept key");
    dead_letter(&env, &kept, "teams_forbidden", None, "2026-01-01T00:00:00Z", 2).await;
    // Signed with an old configured key.
    let old = job("org-a", CONV_A, "signed with the old key");
    let mut table = dead_letter_headers(&old, "teams_forbidden", None, "2026-01-01T00:00:00Z", 2);
    let old_signer = herald::rabbitmq::headers::Signer::new(Sha256::digest(b"old-key").into());
    let body = wire(&old);
    old_signer.sign(Some(&old.id.to_string()), &body, &mut table);
    let properties = BasicProperties::default().with_message_id(old.id.to_string().as_str().into()).with_headers(table);
    env.publish_with(&env.topology.dead_exchange(), &body, properties).await;
    env.settles_at(&env.topology.dead_queue(), 2).await;

    let with = |extra: &[(&str, &str)], args: &[&str]| {
        let mut command = env.herald_command(args);
        command.envs(extra.iter().copied()).env("HERALD_DLQ__MAX_REPLAYS", "2");
        command
    };
    let rotated = [("HERALD_HEADERS__SIGNING_KEY", "new-key"), ("HERALD_HEADERS__PREVIOUS_KEYS", "[\"old-key\"]")];
    let replay = with(&rotated, &["dlq", "replay", "--all", "--yes"]).output().await.unwrap();
    let text = stdout(&replay);
    assert!(text.contains("replayed 0") && text.contains("already replayed 2 times"), "both letters are still believed: {text}");
    env.settles_at(&env.topology.dead_queue(), 2).await;

    // Without the old key, its letter's headers verify with nothing: counted and said.
    let stats = with(&[("HERALD_HEADERS__SIGNING_KEY", "new-key")], &["dlq", "stats", "--json"]).output().await.unwrap();
    assert!(stats.status.success(), "{}", stderr(&stats));
    assert_eq!(json(&stats)["unverified_headers"], 1, "the kept key's letter verifies, the old key's does not");
    assert!(stderr(&stats).contains("verify with no key"), "the tool says so: {}", stderr(&stats));
    env.settles_at(&env.topology.dead_queue(), 2).await;

    // A database without a key: refused, and none created.
    let empty = format!("{}_empty", env.settings.mongodb_database);
    let refused = env.herald_command(&["dlq", "stats"]).env("HERALD_MONGODB_DATABASE", &empty).output().await.unwrap();
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("no header signing key"), "{}", stderr(&refused));
    let client = mongodb::Client::with_uri_str("mongodb://127.0.0.1:27017/?directConnection=true").await.unwrap();
    let collections = client.database(&empty).list_collection_names().await.unwrap();
    assert!(collections.is_empty(), "the tool created nothing: {collections:?}");
    let _ = client.database(&empty).drop().await;
}
