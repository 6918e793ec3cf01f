//! A rolling upgrade and its rollback: workers of the previous landed
//! version (N, built by `make previous` from the Makefile's `PREVIOUS`) and
//! of this one (N+1) share one topology, one MongoDB and one teams-sim while
//! jobs flow, in both directions (docs/upgrading.md, "Rolling upgrade and
//! rollback").

use std::path::PathBuf;

use crate::support::*;

/// The `herald` binary of version N.
fn previous() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/previous/herald");
    assert!(path.exists(), "{} is missing: `make previous` builds version N (make test does)", path.display());
    path.display().to_string()
}

async fn version(binary: &str) -> String {
    let output = tokio::process::Command::new(binary).arg("--version").output().await.expect("herald --version runs");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// `n` jobs of both organizations titled `{label} {i}`; after `n / 2`, `midway` runs.
async fn publish_around(env: &TestEnv, label: &str, n: usize, midway: impl AsyncFnOnce()) {
    let mut midway = Some(midway);
    for i in 0..n {
        if i == n / 2
            && let Some(midway) = midway.take()
        {
            midway().await;
        }
        let (org, conversation) = if i % 2 == 0 { ("org-a", CONV_A) } else { ("org-b", CONV_B) };
        env.publish(&job(org, conversation, &format!("{label} {i}"))).await;
    }
}

/// N delivers alone; N+1 joins while jobs flow and N leaves (the upgrade);
/// then N joins again and N+1 leaves (the rollback). Every job of every phase
/// is posted exactly once with its own organization's bot, and a dead letter
/// written by N is read and verified by N+1's tools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_of_the_previous_version_and_this_one_take_turns_without_losing_or_repeating_a_job() {
    let previous = previous();
    let current = env!("CARGO_BIN_EXE_herald");
    let (old_version, new_version) = (version(&previous).await, version(current).await);
    assert_ne!(old_version, new_version, "make previous built this version, not the previous one");

    let env = TestEnv::two_orgs().await;
    let old = env.observed_worker_of(&previous, &[]);
    publish_around(&env, "before", 40, async || {}).await;
    env.publish(&job("org-unknown", CONV_A, "dead-lettered by N")).await;
    env.activities(40).await;

    // The upgrade: N+1 joins, N leaves half-way through the next jobs.
    let new = env.observed_worker(&[]);
    publish_around(&env, "upgrade", 80, async || {
        old.stop().await;
    })
    .await;
    env.activities(120).await;

    // The rollback: N joins again, N+1 leaves half-way.
    let old = env.observed_worker_of(&previous, &[]);
    publish_around(&env, "rollback", 80, async || {
        new.stop().await;
    })
    .await;
    let records = env.activities(200).await;
    env.drained().await;
    old.stop().await;

    let posts = posts_by_title(&records);
    assert_eq!(posts.len(), 200, "every job posted: {} titles", posts.len());
    let twice: Vec<_> = posts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "posted more than once: {twice:?}");
    for record in &records {
        let n: usize = title(record).rsplit(' ').next().unwrap().parse().unwrap();
        let own = if n % 2 == 0 { "app-a" } else { "app-b" };
        assert_eq!(record.app_id, own, "{}: its own organization's bot", title(record));
    }
    let letters = env.dead_letters(1).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason.as_deref(), Some("org_integration_not_found"));
    assert!(!letters[0].unverified_headers, "N's signed headers verify under N+1");
}
