//! `make demo` runs to its end and says what it promises, with no panic
//! trace (a MongoDB driver task failing under a program that exits with
//! clients still open used to print one). `make test` builds the examples
//! before this runs.

use std::path::Path;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_clean_and_shows_the_bots_the_webhook_and_the_dead_letters() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debug/examples/demo");
    assert!(demo.exists(), "{} is missing: `cargo build --workspace --bins --examples` first (make test does)", demo.display());
    let output = tokio::process::Command::new(&demo).output().await.expect("the demo runs");
    let all = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the demo failed:\n{all}");
    assert!(!all.to_lowercase().contains("panicked"), "a panic in the demo's output:\n{all}");
    for promised in [
        "reason teams_forbidden",
        "BotNotInConversationRoster",
        "reason invalid_job",
        "acme-bot-app",
        "globex-bot-app",
        "by Workflows webhook",
        "Initech: TPS reports late",
    ] {
        assert!(all.contains(promised), "the demo does not show {promised:?}:\n{all}");
    }
}
