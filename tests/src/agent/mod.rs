//! The agent as a child process in the node namespace, and the CLI that talks
//! to it over its unix socket (which works from any network namespace).

mod cli;
mod running;

use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    thread::{self},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

pub use cli::{Cli, FlowInfo, Output, PodStatus};
pub use running::{Running, run_with_timeout};

use crate::{Netns, POLL, TIMEOUT, TempDir, show};

/// The `conndrain` binary: `$CONNDRAIN_BIN`, else `target/debug/conndrain` of
/// this workspace.
#[must_use]
pub fn conndrain_bin() -> PathBuf {
    std::env::var_os("CONNDRAIN_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/conndrain"),
        PathBuf::from,
    )
}

fn existing_bin() -> Result<PathBuf> {
    let bin = conndrain_bin();
    if !bin.is_file() {
        bail!(
            "no conndrain binary at {}: build it (cargo build -p conndrain) or set CONNDRAIN_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

/// `conndrain agent --standalone` running in a namespace, with its socket and
/// log in a temp dir. Stopped on drop, which also prints the end of its log
/// to stderr: libtest shows that only for failing tests.
pub struct Agent {
    child: Option<Child>,
    echo_log: bool,
    socket: PathBuf,
    log: PathBuf,
    // Last: removed after the agent is gone.
    dir: TempDir,
}

impl Agent {
    /// Starts the agent in `node` with `extra` arguments after `--standalone`,
    /// and waits until `conndrain status` answers.
    pub fn start(node: &Netns, extra: &[&str]) -> Result<Self> {
        let mut args = vec!["--standalone"];
        args.extend_from_slice(extra);
        Self::start_with(node, &args)
    }

    /// Starts `conndrain agent <args>` in `node` (any mode) and waits until
    /// `conndrain status` answers.
    pub fn start_with(node: &Netns, args: &[&str]) -> Result<Self> {
        let bin = existing_bin()?;
        let dir = TempDir::new()?;
        let socket = dir.path().join("conndrain.sock");
        let log = dir.path().join("agent.log");
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let (child, shown) = spawn(node, &bin, &socket, args, out)?;
        // Errors below carry the log themselves.
        let mut agent = Self {
            child: Some(child),
            echo_log: false,
            socket,
            log,
            dir,
        };

        let cli = agent.cli();
        let start = Instant::now();
        loop {
            if let Some(status) = agent
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                agent.child = None;
                bail!(
                    "`{shown}` exited with {status} before answering; its log:\n{}",
                    agent.log()
                );
            }
            match cli.run(&["status"]) {
                Ok(out) if out.code == 0 => {
                    agent.echo_log = true;
                    return Ok(agent);
                }
                Ok(out) if start.elapsed() >= TIMEOUT * crate::time_scale() => bail!(
                    "`{shown}` did not answer `conndrain status` within {:?} (last: exit {}, {}); its log:\n{}",
                    TIMEOUT * crate::time_scale(),
                    out.code,
                    out.stderr.trim(),
                    agent.log()
                ),
                Err(e) if start.elapsed() >= TIMEOUT => {
                    return Err(
                        e.context(format!("waiting for `{shown}`; its log:\n{}", agent.log()))
                    );
                }
                _ => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The agent's temp dir (socket and log live here).
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    #[must_use]
    pub fn cli(&self) -> Cli {
        Cli::new(&self.socket)
    }

    /// Everything the agent printed so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }

    /// The agent's process id, while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Do not print the agent's log on drop (for the demo).
    pub fn quiet_on_drop(&mut self) {
        self.echo_log = false;
    }

    /// Whether the agent process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops the agent with SIGTERM (SIGKILL after a while) and returns how it exited.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("the agent is not running"))?;
        terminate(&mut child)
    }

    /// Sends `signal` to the agent (e.g. SIGSTOP to stall it, SIGCONT to resume).
    pub fn signal(&self, signal: i32) -> Result<()> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| anyhow!("the agent is not running"))?;
        let pid = i32::try_from(child.id())?;
        // SAFETY: sending a signal to our own child process.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// Kills the agent with SIGKILL (no chance to clean up: a crash, an OOM
    /// kill) and returns how it exited.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("the agent is not running"))?;
        child.kill()?;
        Ok(child.wait()?)
    }

    /// Starts the agent again after [`stop`](Self::stop) or
    /// [`kill9`](Self::kill9), in `node`, with the same socket (so the same
    /// default state directory) and log file (appended to), `--standalone`
    /// and `extra`; waits until `conndrain status` answers.
    pub fn restart(&mut self, node: &Netns, extra: &[&str]) -> Result<()> {
        let mut args = vec!["--standalone"];
        args.extend_from_slice(extra);
        self.restart_with(node, &args)
    }

    /// Like [`restart`](Self::restart) with the whole `conndrain agent` argument list.
    pub fn restart_with(&mut self, node: &Netns, args: &[&str]) -> Result<()> {
        if self.is_running() {
            bail!("the agent is still running; stop or kill it first");
        }
        let bin = existing_bin()?;
        let out = File::options()
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let (child, shown) = spawn(node, &bin, &self.socket, args, out)?;
        self.child = Some(child);
        let cli = self.cli();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                bail!("`{shown}` exited with {status} before answering; its log:\n{}", self.log());
            }
            match cli.run(&["status"]) {
                Ok(out) if out.code == 0 => return Ok(()),
                Ok(out) if start.elapsed() >= TIMEOUT * crate::time_scale() => bail!(
                    "`{shown}` did not answer `conndrain status` within {:?} (last: exit {}, {}); its log:\n{}",
                    TIMEOUT * crate::time_scale(),
                    out.code,
                    out.stderr.trim(),
                    self.log()
                ),
                Err(e) if start.elapsed() >= TIMEOUT => {
                    return Err(e.context(format!("waiting for `{shown}`; its log:\n{}", self.log())));
                }
                _ => thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// SIGTERM, up to 5 s for a clean exit, then SIGKILL.
/// `conndrain --socket SOCKET agent ARGS` in `node`, its output to `out`;
/// with the command line, for messages.
fn spawn(node: &Netns, bin: &Path, socket: &Path, args: &[&str], out: File) -> Result<(Child, String)> {
    let mut cmd = node.command(&bin.to_string_lossy());
    cmd.arg("--socket").arg(socket).arg("agent").args(args);
    cmd.env("RUST_BACKTRACE", "1").stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    // If the test process dies without running drops, take the agent along.
    // (`ip netns exec` execs the agent, so the pid is the agent's.)
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let shown = show(&cmd);
    let child = cmd.spawn().with_context(|| format!("starting `{shown}`"))?;
    Ok((child, shown))
}

fn terminate(child: &mut Child) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    // SAFETY: signalling our own child, which has not been reaped yet.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        thread::sleep(POLL);
    }
    child.kill()?;
    Ok(child.wait()?)
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && let Err(e) = terminate(&mut child)
        {
            eprintln!("testbed: stopping the agent: {e:#}");
        }
        if self.echo_log {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            eprintln!("---- agent log (last 60 lines) ----\n{tail}\n---- end of agent log ----");
        }
    }
}
