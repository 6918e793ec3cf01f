//! The worker's step without a broker: `Pipeline::process` takes a message
//! and what herald knows of its history and returns the one `Disposition`
//! the settler carries out. These tests drive it directly against the real
//! MongoDB-protocol server and teams-sim, and read the decision itself.
//! (Timings that need a clock, pacing windows and retry tiers, are tested
//! with a paused clock or as pure functions beside the code.)

use std::sync::Arc;
use std::time::Duration;

use herald::metrics::Metrics;
use herald::outcome::Reason;
use herald::teams::Teams;
use herald::worker::{Acked, Disposition, History, Incoming, Pipeline};
use teams_sim::{Action, Route, Rule};
use tokio_util::sync::CancellationToken;

use crate::support::*;

fn pipeline(env: &TestEnv) -> Pipeline {
    let teams = Teams::new(&env.settings.teams).expect("a Connector client");
    Pipeline::new(&env.settings, env.store.clone(), teams, Arc::new(Metrics::default()), CancellationToken::new())
}

fn incoming(job: &herald::job::Job, history: History) -> Incoming {
    Incoming {
        body: wire(job),
        message_id: Some(job.id.to_string()),
        history,
        traceparent: None,
        content_type: Some("application/json".into()),
        content_encoding: None,
        redelivered: false,
    }
}

fn reason(disposition: &Disposition) -> Option<Reason> {
    match disposition {
        Disposition::Ack(_) | Disposition::GiveBack => None,
        Disposition::Retry { failure, .. } | Disposition::DeadLetter { failure, .. } => Some(failure.reason),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_delivered_once_and_its_copy_is_acked_without_a_post() {
    let env = TestEnv::two_orgs().await;
    let step = pipeline(&env);
    let job = job("org-a", CONV_A, "straight through");
    let first = step.process(&incoming(&job, History::default())).await;
    let Disposition::Ack(Acked::Delivered { conversation_id, .. }) = &first else { panic!("{first:?}") };
    assert_eq!(conversation_id, CONV_A);
    let again = step.process(&incoming(&job, History::default())).await;
    assert!(matches!(again, Disposition::Ack(Acked::AlreadySent)), "{again:?}");
    assert_eq!(env.sim.client().stats().await.unwrap().activities_total, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_dead_letters_with_their_reason_and_nothing_is_sent() {
    let env = TestEnv::two_orgs().await;
    let step = pipeline(&env);
    let cases = [
        (job("org-ghost", CONV_A, "unknown org"), Reason::OrgIntegrationNotFound),
        (job("org-a", CONV_B, "another org's conversation"), Reason::RecipientNotInOrganization),
        (
            job_json({
                let mut v = job_value("org-a", CONV_A, "late");
                v["expires_at"] = serde_json::json!("2020-01-01T00:00:00Z");
                v
            }),
            Reason::JobExpired,
        ),
    ];
    for (job, expected) in cases {
        let disposition = step.process(&incoming(&job, History::default())).await;
        assert!(matches!(disposition, Disposition::DeadLetter { .. }), "{disposition:?}");
        assert_eq!(reason(&disposition), Some(expected));
    }
    let mut bad = incoming(&job("org-a", CONV_A, "t"), History::default());
    bad.content_type = Some("text/plain".into());
    assert_eq!(reason(&step.process(&bad).await), Some(Reason::InvalidJob));
    assert_eq!(env.sim.client().stats().await.unwrap().requests_total, 0);
}

/// A 503 with a long `Retry-After` is a retry in a tier at least that long
/// (never an in-process wait), and the retry budget is part of the same
/// decision: with the hops used up, the same answer is `retries_exhausted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_decided_with_its_tier_and_the_budget_in_one_place() {
    let env = TestEnv::two_orgs().await;
    let busy = Action::Status { status: 503, code: None, retry_after: Some(60) };
    env.sim.client().add_fault(&Rule { route: Route::Send, sequence: vec![busy.clone(), busy], ..Default::default() }).await.unwrap();
    let step = pipeline(&env);
    let job = job("org-a", CONV_A, "busy");
    // Had it waited in process, its next try would have been the second 503, then a post.
    let first = step.process(&incoming(&job, History::default())).await;
    let Disposition::Retry { tier, history, failure } = &first else { panic!("{first:?}") };
    assert_eq!((*tier, history.hops, failure.reason), (Duration::from_secs(2), 1, Reason::TeamsUnavailable));
    assert_eq!(failure.http_status, Some(503));

    let spent = History { hops: env.settings.retry.max_hops, ..History::default() };
    let last = step.process(&incoming(&job, spent)).await;
    let Disposition::DeadLetter { failure, .. } = &last else { panic!("{last:?}") };
    assert_eq!(failure.reason, Reason::RetriesExhausted);
    assert!(failure.error.contains("503"), "the last error: {}", failure.error);
}

/// While one delivery holds the claim, a copy's decision is a retry
/// (`in_progress`) that does not use up its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_job_in_progress_is_told_to_come_back() {
    let env = TestEnv::two_orgs().await;
    let job = job("org-a", CONV_A, "held");
    assert!(matches!(env.store.claim(job.id, &job.organization_id, &job.integration_id).await.unwrap(), herald::mongo::Claim::Fresh(_)));
    let step = pipeline(&env);
    let copy = step.process(&incoming(&job, History::default())).await;
    let Disposition::Retry { history, failure, .. } = &copy else { panic!("{copy:?}") };
    assert_eq!((failure.reason, history.hops), (Reason::InProgress, 0));
    assert_eq!(env.sim.client().stats().await.unwrap().requests_total, 0);
}

/// A hostile job's 150 KB ids are looked up, refused, and not kept: the
/// caches hold only ids a real record could have (a poisoned stream must not
/// park megabytes in memory for a cache TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_ids_are_refused_without_a_place_in_the_cache() {
    let env = TestEnv::two_orgs().await;
    let step = pipeline(&env);
    let big = "x".repeat(150 * 1024);
    for pointer in ["/organization_id", "/integration_id", "/recipient/conversation_id"] {
        let mut value = job_value("org-a", CONV_A, "hostile");
        *value.pointer_mut(pointer).unwrap() = serde_json::json!(big);
        let disposition = step.process(&incoming(&job_json(value), History::default())).await;
        assert!(matches!(disposition, Disposition::DeadLetter { .. }), "{pointer}: {disposition:?}");
    }
    let cached_after_hostile = step.resolver.cached();
    step.process(&incoming(&job("org-a", CONV_A, "normal"), History::default())).await;
    assert!(cached_after_hostile <= 1, "only the normal org_integration is cached, not the 150 KB ids: {cached_after_hostile}");
    assert!(step.resolver.cached() >= 2, "normal lookups are cached");
}

/// A job waiting for Teams' windows holds no claim: when its worker gives up
/// the job's shard meanwhile, the step hands it back untouched (no post, no
/// ledger record), and the next holder delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_for_teams_windows_is_handed_back_untouched_when_its_shard_moves() {
    let env = TestEnv::two_orgs_with_setting("teams.rate_limits.enabled", true).await;
    let step = pipeline(&env);
    for i in 0..7 {
        let first = step.process(&incoming(&job("org-a", CONV_A, &format!("burst {i}")), History::default())).await;
        assert!(matches!(first, Disposition::Ack(Acked::Delivered { .. })), "{first:?}");
    }
    // The eighth waits for the 1 s window; its shard is given up meanwhile.
    let waiting = job("org-a", CONV_A, "the eighth");
    let stop = CancellationToken::new();
    let giving_up = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        giving_up.cancel();
    });
    let handed_back = step.process_until(&incoming(&waiting, History::default()), None, &stop, &Default::default()).await;
    assert_eq!(handed_back, Disposition::GiveBack);
    assert_eq!(env.sim.client().stats().await.unwrap().activities_total, 7, "no post for the job handed back");
    assert!(env.store.delivery(&waiting.id.to_string()).await.unwrap().is_none(), "no ledger record: nothing to wait for");

    // Its next holder (a new pipeline: no memory of the window) delivers it.
    let next = pipeline(&env).process(&incoming(&waiting, History::default())).await;
    assert!(matches!(next, Disposition::Ack(Acked::Delivered { .. })), "{next:?}");
}
