//! `cargo xtask bench`: after setup and a release build, runs the benchmark
//! (`tests/examples/bench.rs`), which measures the datapath's cost and writes
//! `BENCHMARKS.md` at the workspace root; with `--check`, the regression gate
//! (the TEST_RUN section compared with the committed `BENCHMARKS.md`).

use std::{path::Path, process::Command};

use anyhow::Result;

use crate::cmd;

/// Runs `cargo_run` (a `cargo run --release` in the workspace) on the bench
/// example with `args`, against the release `conndrain` binary.
/// `rollout` is another `cargo run --release`, for the rolling-update comparison.
/// `check`: the regression gate (`--check` to the bench, no rolling update).
pub fn run(
    root: &Path,
    mut cargo_run: Command,
    mut rollout: Command,
    check: bool,
    args: &[String],
) -> Result<()> {
    let bin = root.join("target").join("release").join("conndrain");
    if check {
        cargo_run.env("CONNDRAIN_BIN", &bin).args([
            "--package",
            "conndrain-tests",
            "--example",
            "bench",
            "--",
            "--check",
        ]);
        return cmd::run(cargo_run.args(args));
    }
    if args.is_empty() {
        // A full run: the rolling-update comparison first, its table goes into BENCHMARKS.md.
        let summary = root.join("target").join("bench").join("rollout.md");
        std::fs::create_dir_all(summary.parent().unwrap_or(root))?;
        rollout
            .args([
                "--package",
                "conndrain-tests",
                "--example",
                "rollout",
                "--",
                "--summary-out",
            ])
            .arg(&summary)
            .env("CONNDRAIN_BIN", &bin);
        cmd::run(&mut rollout)?;
        cargo_run.env("CONNDRAIN_ROLLOUT_SUMMARY", &summary);
    }
    cargo_run
        .args(["--package", "conndrain-tests", "--example", "bench", "--"])
        .args(args)
        .env("CONNDRAIN_BIN", &bin);
    cmd::run(&mut cargo_run)
}
