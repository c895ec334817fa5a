//! Builds the eBPF programs (`ebpf/conndrain-ebpf`) with aya-build and leaves
//! the object in `OUT_DIR/conndrain-ebpf`, which `datapath::load` embeds.
//!
//! Without the eBPF toolchain (nightly + rust-src + bpf-linker) an empty
//! placeholder is written instead so `cargo check`, clippy and the pure unit
//! tests still work; the agent then refuses to start with a clear message.
//! `cargo xtask` sets `CONNDRAIN_REQUIRE_EBPF=1`, which turns that fallback
//! into a hard error so the real object is always built for tests and images.
//!
//! It also sets `CONNDRAIN_GIT_COMMIT`, the commit in `conndrain_build_info`.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=CONNDRAIN_REQUIRE_EBPF");
    let required = env::var("CONNDRAIN_REQUIRE_EBPF").is_ok_and(|v| v == "1");
    println!("cargo:rustc-env=CONNDRAIN_GIT_COMMIT={}", git_commit());
    let out = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let object = out.join("conndrain-ebpf");

    let have_linker = Command::new("bpf-linker").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have_linker && !required {
        println!(
            "cargo:warning=bpf-linker not found: building conndrain without its eBPF programs \
             (run `cargo xtask build` for a working binary)"
        );
        fs::write(&object, []).with_context(|| format!("writing placeholder {}", object.display()))?;
        return Ok(());
    }

    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| anyhow!("no manifest dir"))?)
        .join("../ebpf/conndrain-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [Package { name: "conndrain-ebpf", root_dir: root, ..Package::default() }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF programs (needs nightly with rust-src and bpf-linker; `cargo xtask setup` installs them)",
    )
}

/// The commit being built: `CONNDRAIN_GIT_COMMIT` if set (a build outside a
/// checkout), else git's HEAD, else empty. Cargo reruns this when HEAD moves
/// (a commit, a checkout); uncommitted changes are not shown.
fn git_commit() -> String {
    println!("cargo:rerun-if-env-changed=CONNDRAIN_GIT_COMMIT");
    if let Ok(commit) = env::var("CONNDRAIN_GIT_COMMIT") {
        return commit;
    }
    let dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).current_dir(&dir).output().ok().filter(|o| o.status.success())?;
        Some(String::from_utf8(out.stdout).ok()?.trim().to_owned())
    };
    let Some(head) = git(&["rev-parse", "HEAD"]) else {
        return String::new();
    };
    // HEAD, the branch it names (in a worktree, in the main repository) and the packed refs.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for name in ["HEAD", "packed-refs"].into_iter().chain(branch.as_deref()) {
        if let Some(path) = git(&["rev-parse", "--git-path", name]).map(|p| dir.join(p))
            && Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    head
}
