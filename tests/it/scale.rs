//! Many workers, one queue: three worker processes drain 20,000 jobs while one
//! of them is killed with SIGKILL. Every job is delivered, none is lost, and
//! none is posted again after the ledger recorded it sent.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use herald::mongo::DeliveryState;
use herald::rabbitmq::{Publisher, ROUTING_KEY};
use lapin::BasicProperties;
use teams_sim as sim;

use crate::support::*;

const JOBS: usize = 20_000;
const CONCURRENCY: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_one_killed_every_job_delivered_none_posted_after_sent() {
    let mut world = two_org_world();
    for i in 0..20 {
        let (org, app, tenant) = if i % 2 == 0 { ("a", "app-a", "tenant-a") } else { ("b", "app-b", "tenant-b") };
        world.conversations.push(sim::Conversation {
            id: format!("19:{org}-{i}@thread.tacv2"),
            tenant_id: tenant.into(),
            kind: sim::ConversationKind::Channel,
            roster: [app.to_owned()].into(),
            blocked: false,
            user_id: None,
        });
    }
    let env = TestEnv::with(world, sim::Options { throttling: false, ..Default::default() }, |f| f).await;
    env.seed_two_orgs().await;
    for i in 0..20 {
        let org = if i % 2 == 0 { "org-a" } else { "org-b" };
        let id = format!("19:{}-{i}@thread.tacv2", &org[4..]);
        env.insert_conversation(org, &id, herald::mongo::ConversationKind::Channel, None).await;
    }
    env.sim.client().set_latency(sim::Latency::Fixed { ms: 2 }).await.unwrap();

    let publisher = Publisher::open(env.connection.clone()).await.unwrap();
    let mut titles = Vec::with_capacity(JOBS);
    for chunk in 0..JOBS / 500 {
        let mut pending = Vec::new();
        for n in 0..500 {
            let i = chunk * 500 + n;
            let org = if i % 2 == 0 { "org-a" } else { "org-b" };
            let conversation = format!("19:{}-{}@thread.tacv2", &org[4..], (i % 10) * 2 + i % 2);
            let job = job(org, &conversation, &format!("job-{i}"));
            titles.push(format!("job-{i}"));
            let properties =
                BasicProperties::default().with_content_type("application/json".into()).with_message_id(job.id.to_string().into());
            pending.push(publisher.start(&env.topology.jobs_exchange(), ROUTING_KEY, &wire(&job), properties).await.unwrap());
        }
        for p in pending {
            p.confirmed().await.unwrap();
        }
    }

    let spawn = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("worker")
            .envs(env.env_vars())
            .env("HERALD_WORKER__CONCURRENCY", CONCURRENCY.to_string())
            .env("HERALD_WORKER__PREFETCH", "32")
            .env("HERALD_LOG__FILTER", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let mut workers = vec![spawn(), spawn(), spawn()];
    let client = env.sim.client();
    eventually("a quarter of the jobs delivered", Duration::from_secs(300), || async {
        (client.stats().await.ok()?.activities_total as usize >= JOBS / 4).then_some(())
    })
    .await;
    let victim = workers.remove(0);
    let status = std::process::Command::new("kill").args(["-KILL", &victim.id().unwrap().to_string()]).status().unwrap();
    assert!(status.success());

    eventually("every job to be delivered", Duration::from_secs(300), || async {
        let stats = client.stats().await.ok()?;
        (stats.activities_total as usize >= JOBS).then_some(())
    })
    .await;
    env.drained().await;
    for mut worker in workers {
        let _ = std::process::Command::new("kill").args(["-TERM", &worker.id().unwrap().to_string()]).status();
        tokio::time::timeout(Duration::from_secs(15), worker.wait()).await.unwrap().unwrap();
    }

    let records = client.all_activities().await.unwrap();
    let mut posts: HashMap<String, Vec<chrono::DateTime<chrono::Utc>>> = HashMap::new();
    for record in &records {
        let title = record.body["attachments"][0]["content"]["body"][0]["text"].as_str().unwrap().to_owned();
        posts.entry(title).or_default().push(record.received_at);
    }
    let missing = titles.iter().filter(|t| !posts.contains_key(*t)).count();
    assert_eq!(missing, 0, "{missing} jobs never delivered");
    let duplicates: Vec<&String> = posts.iter().filter(|(_, at)| at.len() > 1).map(|(t, _)| t).collect();
    assert!(duplicates.len() <= CONCURRENCY, "only the killed worker's in-flight jobs may be posted twice: {}", duplicates.len());

    // The ledger agrees, and no post came after the job was recorded sent.
    let ledger = env.store.list_deliveries(&Default::default(), JOBS as i64 * 2).await.unwrap();
    assert_eq!(ledger.len(), JOBS);
    assert!(ledger.iter().all(|d| d.state == DeliveryState::Sent), "every ledger record says sent");
    let activity_ids: std::collections::HashSet<&str> = records.iter().map(|r| r.activity_id.as_str()).collect();
    assert!(
        ledger.iter().all(|d| d.activity_id.as_deref().is_some_and(|a| activity_ids.contains(a))),
        "the ledger's activity ids are the simulator's"
    );
    for record in &records {
        let title = record.body["attachments"][0]["content"]["body"][0]["text"].as_str().unwrap();
        if !duplicates.iter().any(|d| d.as_str() == title) {
            continue;
        }
        let entry = ledger.iter().find(|d| d.activity_id.as_deref() == Some(record.activity_id.as_str()));
        if let Some(entry) = entry {
            let recorded = chrono::DateTime::from_timestamp_millis(entry.updated_at.timestamp_millis()).unwrap();
            for at in &posts[title] {
                assert!(
                    *at <= recorded + chrono::Duration::milliseconds(5),
                    "{title} was posted at {at} after it was recorded sent at {recorded}"
                );
            }
        }
    }
    eprintln!("{JOBS} jobs, 3 workers, one SIGKILLed: {} posted twice (in flight when killed)", duplicates.len());
}
