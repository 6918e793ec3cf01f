//! `teams-sim`: a local Microsoft identity + Bot Connector stand-in.
//! See docs/teams-sim.md.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use teams_sim::{Options, Sim, World};
use tokio_util::sync::CancellationToken;

/// A local stand-in for the Microsoft identity token endpoint and the Bot
/// Framework Connector API, for tests, demos and benchmarks.
///
/// Routes: POST /{authority}/oauth2/v2.0/token; under any service-URL root such
/// as /teams/: POST|PUT /v3/conversations/... ; the admin API under /_admin.
#[derive(Debug, Parser)]
#[command(name = "teams-sim", version)]
struct Args {
    /// Address to listen on; port 0 picks a free port (printed on start).
    #[arg(long, env = "TEAMS_SIM_LISTEN", default_value = "127.0.0.1:3978")]
    listen: String,
    /// JSON fixture with tenants, bots, users and conversations.
    #[arg(long, env = "TEAMS_SIM_WORLD")]
    world: Option<PathBuf>,
    /// Lifetime of issued tokens, in seconds.
    #[arg(long, default_value_t = 3599)]
    token_ttl: u64,
    /// Turn Microsoft's throttling off (benchmarks).
    #[arg(long)]
    no_throttle: bool,
    /// Seed for fault probabilities and latency.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Recorded activities kept for inspection (older ones are dropped).
    #[arg(long, default_value_t = 1_000_000)]
    max_records: usize,
    /// Worker threads of the runtime (1 = serve on one core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runtime =
        if args.threads == 1 { tokio::runtime::Builder::new_current_thread() } else { tokio::runtime::Builder::new_multi_thread() };
    if args.threads > 1 {
        runtime.worker_threads(args.threads);
    }
    runtime.enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let world: World = match &args.world {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading the world fixture {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing the world fixture {}", path.display()))?
        }
        None => World::default(),
    };
    let options = Options {
        token_ttl: Duration::from_secs(args.token_ttl),
        throttling: !args.no_throttle,
        seed: args.seed,
        max_records: args.max_records,
    };
    let listener = tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("teams-sim listening on http://{addr} (service URL http://{addr}/teams/)");
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    #[cfg(unix)]
    {
        let stop = shutdown.clone();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            term.recv().await;
            stop.cancel();
        });
    }
    teams_sim::serve(listener, Sim::new(world, options), shutdown).await?;
    Ok(())
}
