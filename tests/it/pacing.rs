//! herald paces itself by Teams' published limits: with the simulator's
//! throttling on, few 429s, and a busy conversation does not stall the others.

use figment::providers::Serialized;
use teams_sim as sim;

use crate::support::*;

const BUSY: &str = "19:conv-a@thread.tacv2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_conversation_is_paced_and_does_not_stall_the_others() {
    let mut world = two_org_world();
    for i in 0..20 {
        world.conversations.push(sim::Conversation {
            id: format!("19:quiet-{i}@thread.tacv2"),
            tenant_id: "tenant-a".into(),
            kind: sim::ConversationKind::Channel,
            roster: ["app-a".to_owned()].into(),
            blocked: false,
            user_id: None,
        });
    }
    // Microsoft's throttling on in the simulator, herald's pacing on in the worker.
    let env = TestEnv::with(world, sim::Options::default(), |f| {
        f.merge(Serialized::default("teams.rate_limits.enabled", true)).merge(Serialized::default("worker.concurrency", 8))
    })
    .await;
    env.seed_two_orgs().await;
    for i in 0..20 {
        env.insert_conversation("org-a", &format!("19:quiet-{i}@thread.tacv2"), herald::mongo::ConversationKind::Channel, None).await;
    }
    // The worst order: the busy conversation's burst first, then the others.
    const BURST: usize = 40;
    for i in 0..BURST {
        env.publish(&job("org-a", BUSY, &format!("busy-{i}"))).await;
    }
    for i in 0..20 {
        env.publish(&job("org-a", &format!("19:quiet-{i}@thread.tacv2"), &format!("quiet-{i}"))).await;
    }
    let worker = env.spawn_worker();
    let records = env.activities(BURST + 20).await;
    let stats = env.sim.client().stats().await.unwrap();
    let requests: u64 = stats.responses_by_status.values().sum::<u64>() - stats.tokens_issued.values().sum::<u64>();
    let throttled = stats.responses_by_status.get(&429).copied().unwrap_or(0);
    eprintln!(
        "{} activities, {requests} Connector requests, {throttled} answered 429 ({:.1}%)",
        records.len(),
        100.0 * throttled as f64 / requests as f64
    );
    assert!((throttled as f64) <= 0.05 * requests as f64, "herald stays under Teams' limits: {throttled} 429s of {requests}");

    let start = records.iter().map(|r| r.received_at).min().unwrap();
    let quiet_done = records.iter().filter(|r| r.conversation_id != BUSY).map(|r| r.received_at).max().unwrap();
    let busy_done = records.iter().filter(|r| r.conversation_id == BUSY).map(|r| r.received_at).max().unwrap();
    let quiet_secs = (quiet_done - start).num_milliseconds() as f64 / 1000.0;
    let busy_secs = (busy_done - start).num_milliseconds() as f64 / 1000.0;
    eprintln!("quiet conversations done after {quiet_secs:.1} s, the busy one after {busy_secs:.1} s");
    assert!(busy_secs >= 4.0, "40 posts into one conversation take seconds under 7/s and 8/2s");
    assert!(quiet_done < busy_done && quiet_secs < busy_secs / 2.0, "the quiet conversations were not stalled behind the busy one");
    assert_eq!(env.queue_len(&env.topology.dead_queue()).await, 0);
    env.drained().await;
    worker.stop().await;
}
