//! `cargo xtask <command>`: set the machine up, build, test and demo conndrain.
//!
//! Every command that builds starts with `setup`, which is idempotent and fast
//! once everything is installed. Builds run with the workspace's own
//! `target/tools/bin` (bpf-linker) first on `PATH` and `CONNDRAIN_REQUIRE_EBPF=1`,
//! so `agent/build.rs` always embeds the real eBPF object.

mod bench;
mod cmd;
mod guest;
mod image;
mod manifests;
mod setup;
mod test;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    about = "Set up, build, test and demo conndrain",
    bin_name = "cargo xtask"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: nightly rust-src, bpf-linker in target/tools, Debian packages.
    Setup,
    /// Setup, then build the workspace with the real eBPF programs embedded.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Setup, build, then run every test (needs root): on this machine's
    /// kernel, then the image stage (what `image` does: the static musl build,
    /// checked with skopeo and umoci), then the kernel tests again in a Linux
    /// 6.1 guest (the guest stage, see `test-guest`). Args after `--` go to
    /// the test binaries; with any, the image stage is skipped.
    Test {
        /// Build and test with the release profile.
        #[arg(long)]
        release: bool,
        /// Passed to every test binary, e.g. a name filter or `--nocapture`
        /// (`--test-threads=2` unless given).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, build, then only the guest stage (needs root): boot Debian's
    /// Linux 6.1 under qemu (virtme-ng) and run the kernel tests inside it
    /// (clsact attach, tracking and drain, restarts, steering under the
    /// iptables, nftables and IPVS modes). Args after `--` go to the test binaries.
    TestGuest {
        /// Build and test with the release profile.
        #[arg(long)]
        release: bool,
        /// Passed to every test binary in the guest, e.g. a name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, build, then run the demo (needs root). Args after `--` go to the demo.
    Demo {
        /// Build and run with the release profile.
        #[arg(long)]
        release: bool,
        /// Passed to the demo.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, release build, then measure the datapath's cost and write BENCHMARKS.md
    /// (needs root). Args after `--` go to the benchmark (`-- --help`).
    Bench {
        /// The regression gate instead: measure the TEST_RUN section and fail when a
        /// path got more than 25 % slower (against the empty classifier of the same
        /// run) than in the committed BENCHMARKS.md. Run it after any change under ebpf/.
        #[arg(long)]
        check: bool,
        /// Passed to the benchmark, e.g. `--quick` or `--sections testrun,drain`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, build a static (musl) release conndrain, write the OCI image
    /// tarball target/image/conndrain-<version>-oci.tar (no container engine
    /// needed), and check it with skopeo and umoci.
    Image,
    /// Render deploy/install.yaml from the kustomize base in deploy/.
    Manifests {
        /// Only check that deploy/install.yaml is up to date (exit 1 if not).
        #[arg(long)]
        check: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let name = match &cli.command {
        Cmd::Setup => "setup",
        Cmd::Build { .. } => "build",
        Cmd::Test { .. } => "test",
        Cmd::TestGuest { .. } => "test-guest",
        Cmd::Demo { .. } => "demo",
        Cmd::Bench { .. } => "bench",
        Cmd::Image => "image",
        Cmd::Manifests { .. } => "manifests",
    };
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Cmd) -> Result<()> {
    let root = workspace_root();
    match command {
        Cmd::Setup => setup::run(&root),
        Cmd::Build { release } => {
            setup::run(&root)?;
            build(&root, release)
        }
        Cmd::Test { release, args } => {
            require_root("the tests create network namespaces and load BPF programs")?;
            setup::run(&root)?;
            build(&root, release)?;
            let (host, host_result) = test::run(&mut cargo(&root, "test", release), &args);
            if let Err(e) = &host_result {
                eprintln!("xtask test: {e:#}");
            }
            // After the tests, not beside them: on 2 cores the release build
            // would slow the timing-sensitive tests down.
            let image_result = if args.is_empty() {
                image::stage(&root)
            } else {
                println!("image: skipped (test arguments given; `cargo xtask image` runs it alone)");
                Ok(())
            };
            if let Err(e) = &image_result {
                eprintln!("xtask test: {e:#}");
            }
            let (guest, guest_result) = if std::env::var_os("CONNDRAIN_SKIP_GUEST").is_some_and(|v| v == "1") {
                println!("guest: skipped (CONNDRAIN_SKIP_GUEST=1): the kernel tests did not run on Linux 6.1");
                (test::Totals::default(), Ok(()))
            } else {
                test_guest(&root, release, &args)
            };
            let all = host.plus(guest);
            println!("total: {} passed, {} failed, {} skipped", all.passed, all.failed, all.ignored);
            let failed: Vec<String> = [("host tests", host_result), ("image stage", image_result), ("guest stage", guest_result)]
                .into_iter()
                .filter_map(|(stage, r)| r.err().map(|e| format!("{stage}: {e:#}")))
                .collect();
            if !failed.is_empty() {
                bail!("{}", failed.join("; "));
            }
            Ok(())
        }
        Cmd::TestGuest { release, args } => {
            require_root("the tests create network namespaces and load BPF programs")?;
            setup::run(&root)?;
            build(&root, release)?;
            let (guest, result) = test_guest(&root, release, &args);
            println!("total: {} passed, {} failed, {} skipped", guest.passed, guest.failed, guest.ignored);
            result
        }
        Cmd::Demo { release, args } => {
            require_root("the demo creates network namespaces and loads BPF programs")?;
            setup::run(&root)?;
            build(&root, release)?;
            let bin = root.join("target").join(if release { "release" } else { "debug" }).join("conndrain");
            let mut demo = cargo(&root, "run", release);
            demo.env("CONNDRAIN_BIN", &bin)
                .args(["--package", "conndrain-tests", "--example", "demo", "--"])
                .args(args);
            cmd::run(&mut demo)?;
            // The seeds' rolling update, short: no mitigation vs preStop sleep vs conndrain.
            let mut rollout = cargo(&root, "run", release);
            rollout
                .env("CONNDRAIN_BIN", &bin)
                .args(["--package", "conndrain-tests", "--example", "rollout", "--", "--short"]);
            cmd::run(&mut rollout)
        }
        Cmd::Bench { check, args } => {
            require_root("the benchmark creates network namespaces and loads BPF programs")?;
            setup::run(&root)?;
            build(&root, true)?;
            bench::run(
                &root,
                cargo(&root, "run", true),
                cargo(&root, "run", true),
                check,
                &args,
            )
        }
        Cmd::Image => {
            setup::run(&root)?;
            image::stage(&root)
        }
        Cmd::Manifests { check } => manifests::run(&root, check),
    }
}

/// The guest stage: builds the test binaries it runs, boots the guest, runs them.
fn test_guest(root: &Path, release: bool, args: &[String]) -> (test::Totals, Result<()>) {
    let binaries = match guest::build(&mut cargo(root, "test", release)) {
        Ok(b) => b,
        Err(e) => return (test::Totals::default(), Err(e)),
    };
    let conndrain = root.join("target").join(if release { "release" } else { "debug" }).join("conndrain");
    guest::run(root, &conndrain, &binaries, args)
}

fn build(root: &Path, release: bool) -> Result<()> {
    cmd::run(&mut cargo(root, "build", release))
}

/// `cargo <subcommand> [--release]` in the workspace, with bpf-linker on `PATH`
/// and the eBPF object required.
fn cargo(root: &Path, subcommand: &str, release: bool) -> Command {
    let mut c = cmd::cargo();
    c.current_dir(root).arg(subcommand);
    if release {
        c.arg("--release");
    }
    let tools_bin = setup::tools_dir(root).join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(tools_bin).chain(std::env::split_paths(&path)))
        .expect("target/tools/bin contains no ':'");
    c.env("PATH", path).env("CONNDRAIN_REQUIRE_EBPF", "1");
    c
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in a subdirectory of the workspace")
        .to_path_buf()
}

/// Whether the effective user is root (read from `/proc/self/status`).
pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|ids| ids.split_whitespace().nth(1)) == Some("0")
    })
}

fn require_root(why: &str) -> Result<()> {
    if !is_root() {
        bail!("must run as root ({why}); run it again as root");
    }
    Ok(())
}
