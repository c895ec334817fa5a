//! The agent as a child process in the node namespace, and the CLI that talks
//! to it over its unix socket (which works from any network namespace).

use std::{
    fs::File,
    io::Read,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::{Netns, POLL, Pod, TIMEOUT, TempDir, show, wait_until};

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
        let mut cmd = node.command(&bin.to_string_lossy());
        cmd.arg("--socket")
            .arg(&socket)
            .arg("agent")
            .args(args);
        cmd.env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
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
        let mut cmd = node.command(&bin.to_string_lossy());
        cmd.arg("--socket").arg(&self.socket).arg("agent").args(args);
        cmd.env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
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
        self.child = Some(cmd.spawn().with_context(|| format!("starting `{shown}`"))?);
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

/// What a CLI run printed and how it exited (`code` is -1 if killed by a signal).
#[derive(Clone, Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    fn from_std(out: &std::process::Output) -> Self {
        Self {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// stdout and stderr together, for "the message says ..." checks.
    #[must_use]
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// One element of `conndrain pods -o json`.
#[derive(Clone, Debug, Deserialize)]
pub struct PodStatus {
    pub name: String,
    pub ips: Vec<String>,
    pub state: String,
    pub active_flows: u64,
    pub idle_flows: u64,
    pub outbound_flows: u64,
    pub new_flows_since_termination: u64,
    pub terminating_for_secs: Option<f64>,
    pub deadline_in_secs: Option<f64>,
    pub quiet_for_secs: Option<f64>,
    pub quiet_period_secs: Option<f64>,
    pub interfaces: Vec<String>,
    /// Open inbound TCP sockets (the sockets tracepoint).
    #[serde(default)]
    pub open_sockets: u64,
    #[serde(default)]
    pub note: Option<String>,
    /// Live inbound flows to the pod's ignored ports (its settings).
    #[serde(default)]
    pub ignored_flows: u64,
}

/// One element of `conndrain flows -o json`.
#[derive(Clone, Debug, Deserialize)]
pub struct FlowInfo {
    pub pod: String,
    pub proto: String,
    pub direction: String,
    pub state: String,
    pub pod_addr: String,
    pub peer_addr: String,
    pub age_secs: f64,
    pub idle_secs: f64,
    pub idle: bool,
    pub active: bool,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// `conndrain --socket S ...` runs.
#[derive(Clone, Debug)]
pub struct Cli {
    bin: PathBuf,
    socket: PathBuf,
}

impl Cli {
    #[must_use]
    pub fn new(socket: &Path) -> Self {
        Self {
            bin: conndrain_bin(),
            socket: socket.to_owned(),
        }
    }

    /// `conndrain --socket S args...`, not yet run; `CONNDRAIN_SOCKET` removed
    /// so only `--socket` counts.
    #[must_use]
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("CONNDRAIN_SOCKET")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs to completion; a non-zero exit is not an error here.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        run_output(&mut self.command(args))
    }

    /// Runs and returns stdout; a non-zero exit is an error naming the command and its stderr.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        if out.code != 0 {
            bail!(
                "`conndrain {}` exited with {}: {}",
                args.join(" "),
                out.code,
                out.stderr.trim()
            );
        }
        Ok(out.stdout)
    }

    /// Runs and parses stdout as JSON.
    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let stdout = self.ok(args)?;
        serde_json::from_str(&stdout).with_context(|| {
            format!(
                "`conndrain {}` printed no valid JSON: {stdout}",
                args.join(" ")
            )
        })
    }

    pub fn pods_json(&self) -> Result<Value> {
        self.json(&["pods", "-o", "json"])
    }

    pub fn pods(&self) -> Result<Vec<PodStatus>> {
        let value = self.pods_json()?;
        serde_json::from_value(value.clone())
            .with_context(|| format!("`conndrain pods -o json` does not match the README: {value}"))
    }

    pub fn pod(&self, name: &str) -> Result<PodStatus> {
        self.pods()?
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| anyhow!("`conndrain pods -o json` lists no pod {name:?}"))
    }

    /// `flows [--pod NAME] -o json`.
    pub fn flows(&self, pod: Option<&str>) -> Result<Vec<FlowInfo>> {
        let mut args = vec!["flows"];
        if let Some(pod) = pod {
            args.extend(["--pod", pod]);
        }
        args.extend(["-o", "json"]);
        let value = self.json(&args)?;
        serde_json::from_value(value.clone()).with_context(|| {
            format!(
                "`conndrain {}` does not match the README: {value}",
                args.join(" ")
            )
        })
    }

    pub fn status(&self) -> Result<Value> {
        self.json(&["status", "-o", "json"])
    }

    /// `pod add NAME --ip v4 --ip v6`, then waits until the agent reports the
    /// pod with an interface (its programs are attached).
    pub fn add_pod(&self, pod: &Pod) -> Result<PodStatus> {
        self.add_pod_probed(pod, &[])
    }

    /// `pod add` with `--probe-port` for each of `probe_ports`.
    pub fn add_pod_probed(&self, pod: &Pod, probe_ports: &[u16]) -> Result<PodStatus> {
        let ips: Vec<String> = pod.ips().iter().map(ToString::to_string).collect();
        let ports: Vec<String> = probe_ports.iter().map(ToString::to_string).collect();
        let mut args = vec!["pod", "add", pod.name()];
        for ip in &ips {
            args.extend(["--ip", ip]);
        }
        for p in &ports {
            args.extend(["--probe-port", p]);
        }
        self.ok(&args)?;
        self.wait_pod(pod.name(), "the pod to be attached to an interface", |p| {
            !p.interfaces.is_empty()
        })
    }

    /// `pod terminate NAME --quiet-period Q --deadline D`.
    pub fn terminate(&self, name: &str, quiet_period_secs: f64, deadline_secs: f64) -> Result<()> {
        let (q, d) = (quiet_period_secs.to_string(), deadline_secs.to_string());
        self.ok(&[
            "pod",
            "terminate",
            name,
            "--quiet-period",
            &q,
            "--deadline",
            &d,
        ])
        .map(drop)
    }

    /// Polls `pods -o json` until pod `name` satisfies `done`.
    pub fn wait_pod(
        &self,
        name: &str,
        what: &str,
        done: impl FnMut(&PodStatus) -> bool,
    ) -> Result<PodStatus> {
        wait_until(
            &format!("pod {name}: {what}"),
            TIMEOUT,
            || self.pod(name),
            done,
        )
    }

    /// Polls until pod `name` is in `state`.
    pub fn wait_state(&self, name: &str, state: &str) -> Result<PodStatus> {
        self.wait_pod(name, &format!("state {state}"), |p| p.state == state)
    }

    /// Starts `conndrain --socket S args...` in the background.
    pub fn spawn(&self, args: &[&str]) -> Result<Running> {
        Running::spawn(self.command(args))
    }
}

/// Runs a command with piped output to completion.
fn run_output(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("could not run `{}`", show(cmd)))?;
    Ok(Output::from_std(&out))
}

/// A command running in the background (e.g. `conndrain wait`), its output
/// collected as it comes. Killed on drop if still running.
pub struct Running {
    shown: String,
    child: Child,
    stdout: Collector,
    stderr: Collector,
}

type Collector = (Arc<Mutex<Vec<u8>>>, Option<JoinHandle<()>>);

fn collect(from: impl Read + Send + 'static) -> Collector {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let handle = {
        let buf = buf.clone();
        thread::spawn(move || {
            let mut from = from;
            let mut chunk = [0u8; 4096];
            while let Ok(n) = from.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.lock()
                    .expect("output buffer lock")
                    .extend_from_slice(&chunk[..n]);
            }
        })
    };
    (buf, Some(handle))
}

impl Running {
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        let shown = show(&cmd);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{shown}`"))?;
        let stdout = collect(child.stdout.take().expect("piped"));
        let stderr = collect(child.stderr.take().expect("piped"));
        Ok(Self {
            shown,
            child,
            stdout,
            stderr,
        })
    }

    /// Still running (not exited yet)?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` (stretched by [`crate::time_scale`]) for the
    /// exit; kills it and fails after that.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Output> {
        let timeout = timeout * crate::time_scale();
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if start.elapsed() >= timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let partial = self.output_so_far(-1);
                bail!(
                    "`{}` still running after {timeout:?}; killed it. It printed: {}{}",
                    self.shown,
                    partial.stdout,
                    partial.stderr
                );
            }
            thread::sleep(POLL);
        };
        for (_, handle) in [&mut self.stdout, &mut self.stderr] {
            if let Some(h) = handle.take() {
                let _ = h.join();
            }
        }
        Ok(self.output_so_far(status.code().unwrap_or(-1)))
    }

    fn output_so_far(&self, code: i32) -> Output {
        let text = |c: &Collector| {
            String::from_utf8_lossy(&c.0.lock().expect("output buffer lock")).into_owned()
        };
        Output {
            code,
            stdout: text(&self.stdout),
            stderr: text(&self.stderr),
        }
    }

    /// What it has printed on stdout so far.
    #[must_use]
    pub fn stdout_so_far(&self) -> String {
        self.output_so_far(-1).stdout
    }

    /// Sends it SIGINT, as Ctrl-C would.
    pub fn interrupt(&self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill with a pid we own and a valid signal.
        if unsafe { libc::kill(pid, libc::SIGINT) } != 0 {
            bail!("SIGINT to `{}`: {}", self.shown, std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The command line, for messages.
    #[must_use]
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` (stdout and stderr piped) and waits up to `timeout` for it to
/// exit; kills it and fails if it does not. For commands expected to fail fast,
/// like an agent that cannot start.
pub fn run_with_timeout(cmd: Command, timeout: Duration) -> Result<Output> {
    Running::spawn(cmd)?.wait_exit(timeout)
}
