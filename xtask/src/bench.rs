//! `cargo xtask bench`: after setup and a release build, runs the benchmark
//! (`tests/examples/bench.rs`), which measures the datapath's cost and writes
//! `BENCHMARKS.md` at the workspace root.

use std::{path::Path, process::Command};

use anyhow::Result;

use crate::cmd;

/// Runs `cargo_run` (a `cargo run --release` in the workspace) on the bench
/// example with `args`, against the release `conndrain` binary.
pub fn run(root: &Path, mut cargo_run: Command, args: &[String]) -> Result<()> {
    cargo_run
        .args(["--package", "conndrain-tests", "--example", "bench", "--"])
        .args(args)
        .env("CONNDRAIN_BIN", root.join("target").join("release").join("conndrain"));
    cmd::run(&mut cargo_run)
}
