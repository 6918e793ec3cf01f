//! `herald`: load settings, start telemetry, run the command until it ends or
//! the shutdown signal, and report a failure once with its whole cause chain.

use std::process::ExitCode;

use clap::Parser;
use herald::cli::{Cli, exit_code, run};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("herald: error: {err:#}");
            exit_code(&err)
        }
    }
}
