//! Shared by the demo and the bench: the built binaries, and child processes
//! that are stopped (SIGTERM, then waited for) when the program ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::Context;

/// Child processes stopped when dropped.
pub struct Guard(pub Vec<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }
}

/// A binary of this workspace, built next to the running example.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.parent().and_then(Path::parent).context("locating the target dir")?.join(name);
    anyhow::ensure!(path.exists(), "{} not found: build with `cargo build --workspace --bins --examples`", path.display());
    Ok(path)
}
