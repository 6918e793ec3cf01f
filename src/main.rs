//! `herald`: load settings, start telemetry, run the command until it ends or
//! the shutdown signal, and report a failure once with its whole cause chain.

use std::process::ExitCode;

use clap::Parser;
use herald::cli::{Cli, exit_code, run, runtime_plan};

/// Every job allocates and frees its body, headers, BSON statements and HTTP
/// buffers, across threads; glibc's malloc and free were a large share of the
/// worker's CPU in profiles (docs/benchmarks.md). mimalloc's thread-local
/// free lists make that cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let plan = runtime_plan(&cli);
    if plan.batch_scheduling {
        // Before any thread starts, so that all of them inherit it.
        herald::worker::sched::use_batch_policy();
    }
    let runtime = match plan.threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("herald: error: could not start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match run(cli).await {
            Ok(code) => code,
            Err(err) => {
                eprintln!("herald: error: {}", herald::text::causes(err.as_ref()));
                exit_code(&err)
            }
        }
    })
}
