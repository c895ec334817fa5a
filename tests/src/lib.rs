//! The conndrain testbed: simulated hosts as network namespaces, the agent as
//! a child process, the CLI, and traffic between them.
//!
//! Everything is an RAII guard in the style of aya's integration tests: a
//! namespace, a topology, an agent or a server goes away when its value is
//! dropped, also when a test fails. Nothing is put into the root network
//! namespace, and every namespace and interface name is unique per process
//! (`cd` + pid + a counter), so tests run in parallel and a crashed run leaves
//! nothing that breaks the next one.
//!
//! ```no_run
//! use conndrain_tests::{Agent, TcpConn, TcpServer, Topology};
//! # fn main() -> anyhow::Result<()> {
//! let topo = Topology::builder().pod("web").build()?;
//! let agent = Agent::start(topo.node(), &[])?;
//! let cli = agent.cli();
//! let web = topo.pod("web");
//! cli.add_pod(web)?;
//! let server = TcpServer::start(web.ns(), web.addr_v4(8080))?;
//! let conn = TcpConn::connect(topo.client(), server.addr())?;
//! cli.wait_pod("web", "1 active flow", |p| p.active_flows == 1)?;
//! # drop(conn); Ok(()) }
//! ```

mod agent;
pub mod benchgate;
mod bpffs;
mod cgroup;
pub mod cni;
pub mod fakeapi;
pub mod kubeproxy;
pub mod metrics;
mod netns;
mod topology;
mod traffic;

use std::{
    fmt::Debug,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub use agent::{
    Agent, Cli, FlowInfo, Output, PodStatus, Running, conndrain_bin, run_with_timeout,
};
pub use bpffs::Bpffs;
pub use cgroup::Cgroup;
pub use netns::{Netns, run_in};
pub use topology::{CLIENT_V4, CLIENT_V6, NODE_V4, NODE_V6, Pod, Topology, TopologyBuilder};
pub use traffic::{Repeat, TcpConn, TcpServer, UdpClient, UdpServer};

/// How long to wait for anything the agent or the kernel should do "soon".
/// Generous on purpose: the machines are small and noisy, and the tests never
/// assert on durations, only on states and their order.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// How much slower this machine is than the one the timeouts were made for:
/// `CONNDRAIN_TIME_SCALE` (default 1). The guest stage runs under qemu's TCG,
/// several times slower, and sets it; [`wait_until`] and the agent's start
/// stretch their timeouts by it.
#[must_use]
pub fn time_scale() -> u32 {
    std::env::var("CONNDRAIN_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// Whether this kernel has tcx (6.6+). The agent probes it and `conndrain
/// status` says which path it took; helpers that run without an agent look
/// at the kernel release, which is enough.
#[must_use]
pub fn kernel_has_tcx() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut nums = release
        .trim()
        .split(['.', '-'])
        .map(|n| n.parse::<u32>().unwrap_or(0));
    (nums.next().unwrap_or(0), nums.next().unwrap_or(0)) >= (6, 6)
}

/// How often [`wait_until`] looks again.
pub const POLL: Duration = Duration::from_millis(25);

/// A name no other namespace, interface or directory of this or any other
/// running test process has: `cd` + pid + counter, both base 36 to leave room
/// under the 15-byte interface name limit (`cd` + 5 + `_` + 2 = 10 bytes).
#[must_use]
pub fn unique_tag() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("cd{}_{}", base36(std::process::id()), base36(n))
}

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ASCII digits")
}

/// Set by the SIGINT/SIGTERM handler of [`stop_on_signals`].
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Makes Ctrl-C (and SIGTERM) end waits with an error instead of killing the
/// process, so the guards' drops run and the namespaces are removed. For the
/// demo; tests keep the default handlers.
pub fn stop_on_signals() {
    extern "C" fn on_signal(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::SeqCst);
    }
    let handler = on_signal as extern "C" fn(libc::c_int);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
}

/// Fails once a signal arrived (see [`stop_on_signals`]).
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps like `thread::sleep`, but ends early with an error on Ctrl-C (see
/// [`stop_on_signals`]).
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        thread::sleep(left.min(POLL));
    }
}

/// Polls `probe` every [`POLL`] until `done` accepts what it returned, and
/// returns that. Errors from `probe` count as "not yet" (the agent may be busy),
/// and the last one is reported if time runs out. On timeout the error names
/// `what` was awaited and the last observed value.
pub fn wait_until<T: Debug>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T>,
    mut done: impl FnMut(&T) -> bool,
) -> Result<T> {
    let timeout = timeout * time_scale();
    let start = Instant::now();
    loop {
        check_interrupted()?;
        let last = match probe() {
            Ok(value) if done(&value) => return Ok(value),
            Ok(value) => format!("{value:?}"),
            Err(e) => format!("error: {e:#}"),
        };
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}; last observed: {last}");
        }
        thread::sleep(POLL);
    }
}

/// Runs a command to completion and returns its stdout; fails with the
/// command line and its stderr if it cannot start or exits non-zero.
pub fn run_cmd(cmd: &mut Command) -> Result<String> {
    let shown = show(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not run `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `program args...` as one line, for error messages.
#[must_use]
pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Fails early with a clear message instead of a wall of EPERMs.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this test creates network namespaces and loads BPF programs: run it as root");
    }
    Ok(())
}

/// The value at quantile `q` (0..=1) of `samples`, nearest rank; sorts them.
/// The one quantile of the benches and the rollout example.
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn quantile<T: Copy + PartialOrd>(samples: &mut [T], q: f64) -> T {
    assert!(!samples.is_empty(), "quantile of no samples");
    samples.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let rank = (q * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// A directory under the system temp dir, removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(unique_tag());
        std::fs::create_dir(&path)
            .with_context(|| format!("creating the temp dir {}", path.display()))?;
        Ok(Self { path })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("testbed: removing {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_unique_and_short() {
        let a = unique_tag();
        let b = unique_tag();
        assert_ne!(a, b);
        // The longest interface suffix the topology adds is 3 bytes ("h12").
        assert!(a.len() + 3 <= 15, "{a} is too long for interface names");
    }

    #[test]
    fn base36_digits() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        assert_eq!(base36(4_194_304).len(), 5); // the largest pid_max
    }

    #[test]
    fn wait_until_reports_what_and_last_value() {
        let mut n = 0;
        let err = wait_until(
            "n to reach 1000",
            Duration::from_millis(100),
            || {
                n += 1;
                Ok(n)
            },
            |&n| n >= 1000,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("n to reach 1000"), "{err}");
        assert!(err.contains("last observed:"), "{err}");
    }
}
