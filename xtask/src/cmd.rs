//! Running external commands: each is printed first, and a failure names the
//! command and its exit status.

use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail};

/// Variables that the outer `cargo run` (and rustup's proxy) set for this
/// process. Left in place they would force the outer toolchain, compiler or
/// package metadata onto a nested cargo.
const INHERITED: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_TOOLCHAIN_SOURCE",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTDOC",
    "CARGO",
    "CARGO_TARGET_DIR",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MAKEFLAGS",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
];
const INHERITED_PREFIXES: &[&str] = &[
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
    "CARGO_BIN_",
    "CARGO_CRATE_",
];

/// `program` with the variables of the outer cargo removed, so that nested
/// `cargo`, `rustc` and `rustup` choose their toolchain as if run from a shell.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program);
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if INHERITED.contains(&key) || INHERITED_PREFIXES.iter().any(|p| key.starts_with(p)) {
            c.env_remove(key);
        }
    }
    // cargo prepends its target dir and the toolchain's libraries to
    // LD_LIBRARY_PATH for `cargo run`; drop those entries again.
    if let Some(paths) = env::var_os("LD_LIBRARY_PATH") {
        let added = [
            super::workspace_root().join("target"),
            rustup_home().join("toolchains"),
        ];
        let kept: Vec<PathBuf> = env::split_paths(&paths)
            .filter(|p| !added.iter().any(|a| p.starts_with(a)))
            .collect();
        if kept.is_empty() {
            c.env_remove("LD_LIBRARY_PATH");
        } else if let Ok(kept) = env::join_paths(kept) {
            c.env("LD_LIBRARY_PATH", kept);
        }
    }
    c
}

/// Plain `cargo` from `PATH` (rustup's proxy), with a clean environment.
pub fn cargo() -> Command {
    command("cargo")
}

fn rustup_home() -> PathBuf {
    env::var_os("RUSTUP_HOME").map_or_else(
        || Path::new(&env::var_os("HOME").unwrap_or_default()).join(".rustup"),
        PathBuf::from,
    )
}

/// The command as a shell line, with the variables it sets in front.
/// A `PATH` that extends the current one is shown as `PATH=...:$PATH`.
pub fn show(c: &Command) -> String {
    let current_path = env::var_os("PATH").unwrap_or_default();
    let mut words = Vec::new();
    for (key, value) in c.get_envs() {
        let Some(value) = value else { continue };
        let mut value = value.to_string_lossy().into_owned();
        if key == "PATH" {
            if let Some(prefix) = value.strip_suffix(&*current_path.to_string_lossy()) {
                value = format!("{prefix}$PATH");
            }
        } else if key == "LD_LIBRARY_PATH" {
            continue;
        }
        words.push(format!("{}={}", key.to_string_lossy(), quote(&value)));
    }
    words.push(quote(&c.get_program().to_string_lossy()));
    words.extend(c.get_args().map(|a| quote(&a.to_string_lossy())));
    words.join(" ")
}

/// Single-quotes `word` for the shell when it needs it (`$PATH` is left as is).
fn quote(word: &str) -> String {
    let plain = |ch: char| ch.is_ascii_alphanumeric() || "-_./:=+,@%".contains(ch);
    if word.is_empty() || !word.replace("$PATH", "").chars().all(plain) {
        format!("'{}'", word.replace('\'', r"'\''"))
    } else {
        word.to_owned()
    }
}

/// Runs `c` with inherited stdio; fails unless it exits successfully.
pub fn run(c: &mut Command) -> Result<()> {
    let shown = show(c);
    eprintln!("$ {shown}");
    let status = c
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed with {status}");
    }
    Ok(())
}

/// Runs `c` and returns its output whatever its exit status (stderr is passed through).
pub fn output(c: &mut Command) -> Result<Output> {
    let shown = show(c);
    eprintln!("$ {shown}");
    c.stderr(std::process::Stdio::inherit());
    c.output()
        .with_context(|| format!("could not start `{shown}`"))
}

/// Runs `c` and returns its stdout; fails unless it exits successfully.
pub fn stdout(c: &mut Command) -> Result<String> {
    let out = output(c)?;
    if !out.status.success() {
        bail!("`{}` failed with {}", show(c), out.status);
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8 output", show(c)))
}
