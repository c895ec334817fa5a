//! Drain detection latency: from the client's close of a terminating pod's
//! last connection to `conndrain wait NAME` (CLI, unix socket) and to the
//! preStop `conndrain wait` (node API `/v1/wait`, from the pod's namespace)
//! returning.

use std::{
    io::Read as _,
    process::{Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use conndrain_tests::{Agent, NODE_V4, TIMEOUT, TcpConn, TcpServer, Topology, conndrain_bin, sleep};

use crate::report::{Section, Table, count, ms, quantile};

const WAIT_PORT: u16 = 9464;
const METRICS_PORT: u16 = 9465;
const PORT: u16 = 8080;
/// `--quiet-period` of every drain; the close comes after it has passed.
const QUIET_PERIOD: f64 = 0.05;
/// Target of issue 6.
const TARGET_P99: Duration = Duration::from_millis(100);

pub fn run(drains: usize) -> Result<Section> {
    let topo = Topology::builder().pod("bench").build()?;
    let pod = topo.pod("bench");
    let host_ip = NODE_V4.to_string();
    let (wait_port, metrics_port) = (WAIT_PORT.to_string(), METRICS_PORT.to_string());
    let mut agent = Agent::start(
        topo.node(),
        &["--host-ip", &host_ip, "--wait-port", &wait_port, "--metrics-port", &metrics_port],
    )?;
    agent.quiet_on_drop();
    let cli = agent.cli();
    let server = TcpServer::start(pod.ns(), pod.addr_v4(PORT))?;
    let ips: Vec<String> = pod.ips().iter().map(ToString::to_string).collect();

    let mut cli_ms: Vec<Duration> = Vec::new();
    let mut prestop_ms: Vec<Duration> = Vec::new();
    for i in 0..drains {
        crate::check_interrupted()?;
        let name = format!("bench-{i}");
        cli.ok(&["pod", "add", &name, "--ip", &ips[0], "--ip", &ips[1]])?;
        cli.wait_pod(&name, "attached", |p| !p.interfaces.is_empty())?;
        let conn = TcpConn::connect(topo.client(), server.addr())?;
        cli.wait_pod(&name, "1 active flow", |p| p.active_flows == 1)?;
        cli.terminate(&name, QUIET_PERIOD, 30.0)?;

        let mut by_cli = Waiter::spawn(cli.command(&["wait", &name, "--timeout", "20"]))?;
        let mut pre_stop = {
            let mut cmd = pod.ns().command(&conndrain_bin().to_string_lossy());
            cmd.args(["wait", "--fallback-sleep", "0"])
                .env("HOST_IP", &host_ip)
                .env("CONNDRAIN_WAIT_PORT", &wait_port)
                .env_remove("CONNDRAIN_SOCKET");
            Waiter::spawn(cmd)?
        };
        // Well past the quiet period, so that only the close holds the pod,
        // and long enough for both waiters to be waiting.
        sleep(Duration::from_millis(300))?;
        let p = cli.pod(&name)?;
        ensure!(p.state == "draining" && p.active_flows == 1, "before the close: {p:?}");
        ensure!(
            p.quiet_for_secs.unwrap_or(0.0) > QUIET_PERIOD,
            "the quiet period has not passed: {p:?}"
        );
        by_cli.still_running()?;
        pre_stop.still_running()?;

        let closed = Instant::now();
        conn.close()?;
        let t_cli = by_cli.exited(TIMEOUT)?;
        let t_pre = pre_stop.exited(TIMEOUT)?;
        cli_ms.push(t_cli.saturating_duration_since(closed));
        prestop_ms.push(t_pre.saturating_duration_since(closed));
        ensure!(cli.pod(&name)?.state == "drained", "{name} is not drained");
        cli.ok(&["pod", "remove", &name])?;
    }

    let mut table = Table::new(&["from the last close to", "p50 (ms)", "p99 (ms)", "max (ms)", "drains"]);
    let mut worst_p99 = Duration::ZERO;
    for (what, samples) in [
        ("`conndrain wait NAME` returning (CLI, local unix socket)", &mut cli_ms),
        ("`conndrain wait` returning (preStop, `/v1/wait` from the pod's namespace)", &mut prestop_ms),
    ] {
        let p50 = quantile(samples, 0.5);
        let p99 = quantile(samples, 0.99);
        let max = quantile(samples, 1.0);
        worst_p99 = worst_p99.max(p99);
        table.row(vec![what.into(), ms(p50), ms(p99), ms(max), count(samples.len() as u64)]);
    }
    let verdict = if worst_p99 < TARGET_P99 {
        format!("Target (drain detection p99 under {} ms): **met**.", TARGET_P99.as_millis())
    } else {
        format!(
            "Target (drain detection p99 under {} ms): **missed** in this run ({} ms).",
            TARGET_P99.as_millis(),
            ms(worst_p99)
        )
    };
    Ok(Section {
        title: "Drain detection latency".into(),
        name: "drain",
        intro: format!(
            "Per drain: a pod is registered (`pod add`), a client in the client namespace opens one \
             connection to it, the pod is terminated with `--quiet-period {QUIET_PERIOD}`, and both \
             waiters are started. 300 ms later (the quiet period long over, so nothing is subtracted) \
             the client closes its connection; the clock starts just before its FIN and stops when each \
             waiter process has exited (`waitpid`). So the figures include the FIN exchange, the ring-buffer \
             event, the agent's evaluation, the HTTP answer and the waiter's exit. Then `pod remove`."
        ),
        table,
        notes: vec![
            verdict,
            format!(
                "With {drains} drains, p99 is the nearest-rank 99th percentile, i.e. the slowest drain or close to it."
            ),
        ],
    })
}

/// A background `conndrain wait`; a thread records when it exits. Killed on
/// drop if still running.
struct Waiter {
    shown: String,
    pid: libc::pid_t,
    rx: Receiver<(Instant, std::io::Result<ExitStatus>, String)>,
    done: bool,
}

impl Waiter {
    fn spawn(mut cmd: Command) -> Result<Self> {
        let shown = conndrain_tests::show(&cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {shown}"))?;
        let pid = libc::pid_t::try_from(child.id())?;
        let mut stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let status = child.wait();
            let at = Instant::now();
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err);
            let _ = tx.send((at, status, err));
        });
        Ok(Self { shown, pid, rx, done: false })
    }

    fn still_running(&mut self) -> Result<()> {
        match self.rx.try_recv() {
            Err(TryRecvError::Empty) => Ok(()),
            Ok((_, status, err)) => {
                self.done = true;
                bail!("`{}` returned early ({status:?}): {err}", self.shown)
            }
            Err(TryRecvError::Disconnected) => bail!("`{}`: its waiting thread is gone", self.shown),
        }
    }

    /// When it exited; fails unless it exited 0 within `timeout`.
    fn exited(&mut self, timeout: Duration) -> Result<Instant> {
        match self.rx.recv_timeout(timeout) {
            Ok((at, status, err)) => {
                self.done = true;
                let status = status?;
                ensure!(status.success(), "`{}` exited with {status}: {err}", self.shown);
                Ok(at)
            }
            Err(RecvTimeoutError::Timeout) => bail!("`{}` did not return within {timeout:?}", self.shown),
            Err(RecvTimeoutError::Disconnected) => bail!("`{}`: its waiting thread is gone", self.shown),
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if !self.done && self.rx.try_recv().is_err() {
            // SAFETY: our own child, not yet reaped (its thread has not sent).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }
}
