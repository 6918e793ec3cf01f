//! The ledger against a MongoDB that misbehaves: a connection that stops
//! answering mid-batch must not leave a posted job recorded `sending` (a
//! later copy would post it again once the claim ran out).

use std::time::Duration;

use herald::job::Job;
use herald::mongo::{DeliveryDoc, DeliveryState};

use crate::support::*;

/// Publish `job`; once its claim is in the ledger (the delivery is on its
/// way), stall every connection of the worker to MongoDB, and those it
/// opens in the next 4 s. The job's id.
async fn publish_and_stall_once_claimed(env: &TestEnv, proxy: &StallProxy, job: &Job) -> String {
    let id = job.id.to_string();
    env.publish(job).await;
    recorded(env, &id, DeliveryState::Sending).await;
    proxy.stall(Duration::from_secs(4));
    id
}

/// The job's ledger record once it is in `state`.
async fn recorded(env: &TestEnv, id: &str, state: DeliveryState) -> DeliveryDoc {
    eventually(&format!("the ledger to say {state:?}"), Duration::from_secs(60), || async {
        env.store.delivery(id).await.unwrap().filter(|d| d.state == state)
    })
    .await
}

/// The worker reaches MongoDB through a proxy; while a job's post is on its
/// way to Teams, every connection the worker has open, and every one it
/// opens for the next 4 s, stalls (no answer, no error). The "sent" mark's
/// command times out (`mongodb_command_timeout_ms`), is retried as a lost
/// connection is, lands on a connection made after the stall, and a copy of
/// the job published afterwards is acked without a second post.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_mongodb_connection_never_leaves_a_posted_job_unrecorded() {
    let env = TestEnv::two_orgs().await;
    let proxy = StallProxy::start("127.0.0.1:27017").await;
    let uri = proxy.mongodb_uri();
    // Slow enough to stall the proxy while the post is on its way.
    env.sim.client().set_latency(teams_sim::Latency::Fixed { ms: 1200 }).await.unwrap();
    let worker = env.observed_worker(&[("HERALD_MONGODB_URI", uri.as_str()), ("HERALD_MONGODB_COMMAND_TIMEOUT_MS", "1000")]);

    let job = job("org-a", CONV_A, "posted while MongoDB stalls");
    let id = publish_and_stall_once_claimed(&env, &proxy, &job).await;

    let record = recorded(&env, &id, DeliveryState::Sent).await;
    assert_eq!(env.activities(1).await.len(), 1);
    assert!(record.activity_id.is_some(), "{record:?}");

    env.sim.client().set_latency(teams_sim::Latency::None).await.unwrap();
    env.publish(&job).await;
    env.drained().await;
    worker.stop().await;
    assert_eq!(env.activities(1).await.len(), 1, "the copy was acked as already sent, not posted again");
}

/// A post whose answer is lost is recorded `unconfirmed` even when MongoDB
/// stalls as the outcome is written: the outcome is retried while the claim
/// lasts, instead of written once and lost (the record would stay `sending`,
/// and a copy would take it over after the lease and post again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_outcome_is_recorded_through_a_stalled_mongodb() {
    let env = TestEnv::two_orgs().await;
    let proxy = StallProxy::start("127.0.0.1:27017").await;
    let uri = proxy.mongodb_uri();
    // The post is accepted, its answer lost past the request timeout (2 s).
    let lose =
        teams_sim::Rule { route: teams_sim::Route::Send, sequence: vec![teams_sim::Action::Lose { ms: 2500 }], ..Default::default() };
    env.sim.client().add_fault(&lose).await.unwrap();
    let worker = env.observed_worker(&[
        ("HERALD_MONGODB_URI", uri.as_str()),
        ("HERALD_MONGODB_COMMAND_TIMEOUT_MS", "1000"),
        ("HERALD_WORKER__CLAIM_LEASE_SECS", "60"),
    ]);

    let job = job("org-a", CONV_A, "answer lost while MongoDB stalls");
    let id = publish_and_stall_once_claimed(&env, &proxy, &job).await;

    recorded(&env, &id, DeliveryState::Unconfirmed).await;
    let letter = env.dead_letters(1).await.remove(0);
    assert_eq!(letter.reason.as_deref(), Some("delivery_unconfirmed"));
    worker.stop().await;
    assert_eq!(env.activities(1).await.len(), 1, "posted once, never resent");
}
