//! `cargo xtask test`: runs `cargo test`, passes its output through, and ends
//! with one summary line added up from libtest's `test result:` lines.

use std::{
    io::{IsTerminal as _, Read, Write as _},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// The machine has 2 cores and every test runs in its own network namespaces.
const DEFAULT_TEST_THREADS: &str = "--test-threads=2";

#[derive(Default, Clone, Copy)]
pub struct Totals {
    pub binaries: u32,
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Totals {
    /// Adds up a line like
    /// `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s`.
    pub fn add(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        self.binaries += 1;
        for part in rest.split(['.', ';']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }

    /// Both stages' counts together.
    #[must_use]
    pub fn plus(self, other: Self) -> Self {
        Self {
            binaries: self.binaries + other.binaries,
            passed: self.passed + other.passed,
            failed: self.failed + other.failed,
            ignored: self.ignored + other.ignored,
        }
    }
}

/// Runs `cargo_test` (a `cargo test` command) with `args` for the test
/// binaries. Returns the totals, and an error too when it failed.
pub fn run(cargo_test: &mut Command, args: &[String]) -> (Totals, Result<()>) {
    let mut totals = Totals::default();
    let result = run_counting(cargo_test, args, &mut totals);
    (totals, result)
}

fn run_counting(cargo_test: &mut Command, args: &[String], totals_out: &mut Totals) -> Result<()> {
    let color = std::io::stdout().is_terminal();
    if color {
        cargo_test.arg("--color=always");
    }
    cargo_test.arg("--").args(args);
    let threads_given = std::env::var_os("RUST_TEST_THREADS").is_some()
        || args
            .iter()
            .any(|a| a == "--test-threads" || a.starts_with("--test-threads="));
    if !threads_given {
        cargo_test.arg(DEFAULT_TEST_THREADS);
    }
    if color && !args.iter().any(|a| a.starts_with("--color")) {
        cargo_test.arg("--color=always");
    }

    let shown = cmd::show(cargo_test);
    eprintln!("$ {shown}");
    let start = Instant::now();
    // cargo's messages (stderr) and the tests' results (stdout) share one pipe
    // so that they stay in order in a log.
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    let writer_too = writer.try_clone().context("duplicating a pipe")?;
    let mut child = cargo_test
        .stdout(writer)
        .stderr(writer_too)
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    // Close our copies of the pipe's write end, or reading never ends.
    cargo_test.stdout(Stdio::null()).stderr(Stdio::null());
    let totals = pass_through(reader).inspect_err(|_| {
        let _ = child.kill();
        let _ = child.wait();
    })?;
    *totals_out = totals;
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;

    let verdict = if status.success() { "ok" } else { "FAILED" };
    println!(
        "test: {verdict}: {} passed, {} failed, {} ignored in {} test binaries ({:.0} s)",
        totals.passed,
        totals.failed,
        totals.ignored,
        totals.binaries,
        start.elapsed().as_secs_f64()
    );
    if !status.success() {
        bail!("`{shown}` failed with {status}");
    }
    Ok(())
}

/// Copies the child's output to our stdout as it comes (libtest prints `test x ... `
/// before the result) and adds up the `test result:` lines.
fn pass_through(mut from: impl Read) -> Result<Totals> {
    let mut totals = Totals::default();
    let mut line = Vec::new();
    let mut buf = [0u8; 8192];
    let mut stdout = std::io::stdout();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the output of cargo test"),
        };
        stdout
            .write_all(&buf[..n])
            .and_then(|()| stdout.flush())
            .context("writing to stdout")?;
        for &byte in &buf[..n] {
            if byte == b'\n' {
                totals.add(&String::from_utf8_lossy(&line));
                line.clear();
            } else {
                line.push(byte);
            }
        }
    }
    totals.add(&String::from_utf8_lossy(&line));
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::Totals;

    #[test]
    fn adds_up_test_results() {
        let mut t = Totals::default();
        t.add("test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        t.add("test result: \x1b[31mFAILED\x1b[0m. 2 passed; 1 failed; 0 ignored; 0 measured; 5 filtered out; finished in 1.00s");
        t.add("test parse::tests::result ... ok");
        assert_eq!((t.binaries, t.passed, t.failed, t.ignored), (2, 5, 1, 1));
    }
}
