//! The local API (unix socket, for the CLI) and the node API (TCP on the
//! node's IP, for the pods' preStop `conndrain wait`) under hostile use:
//! malformed requests, slow clients, connection floods, waiters that hang up,
//! and a pod that claims another pod's IP. Each is refused or bounded; the
//! agent never crashes and never answers about the wrong pod.
//!
//! Runs the agent in standalone mode, which serves the same APIs as the
//! Kubernetes mode. The waits here are bounded but generous: the agent drops
//! slow clients after `conndrain::api::CLIENT_TIMEOUT`, and the tests only
//! check that it does so within a few times that.

#[path = "api_hostile/malformed.rs"]
mod malformed;
#[path = "api_hostile/slow_clients.rs"]
mod slow_clients;
#[path = "api_hostile/spoofing.rs"]
mod spoofing;

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use conndrain::api::CLIENT_TIMEOUT;
use conndrain_tests::{
    Agent, Cli, NODE_V4, Netns, Pod, Running, TIMEOUT, Topology, conndrain_bin, require_root, run_in,
};

use malformed::get;

const WAIT_PORT: u16 = 9464;
const METRICS_PORT: u16 = 9465;

/// How long a slow client may stay connected before the test calls it a
/// failure: the agent's timeout, plus the usual allowance for a busy machine.
const DROP_WITHIN: Duration = Duration::from_secs(CLIENT_TIMEOUT.as_secs() * 3 + TIMEOUT.as_secs());

/// A topology with `pods`, an agent serving the node API on the node's IPs,
/// and the pods registered.
fn setup(pods: &[&str], extra: &[&str]) -> Result<(Topology, Agent, Cli)> {
    require_root()?;
    let topo = pods.iter().fold(Topology::builder(), |b, p| b.pod(p)).build()?;
    let (wait, metrics) = (WAIT_PORT.to_string(), METRICS_PORT.to_string());
    // No --host-ip: the node API listens on all addresses, v4 and v6.
    let mut args = vec!["--wait-port", &wait, "--metrics-port", &metrics];
    args.extend_from_slice(extra);
    let agent = Agent::start(topo.node(), &args)?;
    let cli = agent.cli();
    for p in pods {
        cli.add_pod(topo.pod(p))?;
    }
    Ok((topo, agent, cli))
}

fn node_addr(port: u16) -> SocketAddr {
    SocketAddr::new(NODE_V4.into(), port)
}

/// `conndrain wait` in preStop mode, run inside the pod as its hook would be.
fn pre_stop(pod: &Pod) -> Result<Running> {
    let mut cmd = pod.ns().command(&conndrain_bin().to_string_lossy());
    cmd.args(["wait", "--fallback-sleep", "0"])
        .env("HOST_IP", NODE_V4.to_string())
        .env("CONNDRAIN_WAIT_PORT", WAIT_PORT.to_string());
    Running::spawn(cmd)
}

/// Terminates `pod` (no flows, so it drains after the quiet period) and checks
/// that its own preStop wait is answered with its own drain.
fn pre_stop_drains(cli: &Cli, pod: &Pod) -> Result<()> {
    let mut hook = pre_stop(pod)?;
    cli.terminate(pod.name(), 0.5, 60.0)?;
    let out = hook.wait_exit(TIMEOUT)?;
    let drained = format!("{} drained", pod.name());
    ensure!(
        out.code == 0 && out.stdout.contains(&drained) && !out.stderr.contains("falling back"),
        "{}'s preStop wait is answered with its drain: {out:?}",
        pod.name()
    );
    Ok(())
}

/// `n` TCP connections from inside `ns` to `addr`, each having sent `bytes`.
fn connections(ns: &Netns, addr: SocketAddr, n: usize, bytes: &[u8]) -> Result<Vec<TcpStream>> {
    run_in(ns, || {
        (0..n)
            .map(|i| {
                let mut s =
                    TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("connection {i} to {addr}"))?;
                s.write_all(bytes)?;
                Ok(s)
            })
            .collect::<Result<Vec<_>>>()
    })?
}

fn tcp(ns: &Netns, addr: SocketAddr) -> Result<TcpStream> {
    Ok(connections(ns, addr, 1, b"")?.remove(0))
}

fn unix(agent: &Agent) -> Result<UnixStream> {
    UnixStream::connect(agent.socket()).with_context(|| format!("connecting to {}", agent.socket().display()))
}

/// Sends `request` on a new connection from inside `ns` to `to`; see [`exchange`].
fn ask(ns: &Netns, to: SocketAddr, request: &[u8]) -> Result<Reply> {
    exchange(tcp(ns, to)?, request)
}

/// Sends `request` on a new connection to the local API; see [`exchange`].
fn ask_local(agent: &Agent, request: &[u8]) -> Result<Reply> {
    exchange(unix(agent)?, request)
}

/// `/healthz` on the metrics port answers the client host.
fn healthy(topo: &Topology) -> Result<()> {
    let reply = ask(topo.client(), node_addr(METRICS_PORT), &get("/healthz"))?;
    ensure!(reply.code() == Some(200), "/healthz answers: {reply:?}");
    Ok(())
}

/// What the server did with one request.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// An HTTP response: status code and body.
    Http(u16, String),
    /// The connection ended without a response.
    Closed,
}

impl Reply {
    fn code(&self) -> Option<u16> {
        match self {
            Self::Http(code, _) => Some(*code),
            Self::Closed => None,
        }
    }
}

/// Sends `request` as is and reads until the server closes the connection,
/// failing if it neither answers nor closes within [`TIMEOUT`].
fn exchange<S: Read + Write + ReadTimeout>(mut s: S, request: &[u8]) -> Result<Reply> {
    // A server may answer and close before it has read all of an oversized
    // request: a failed write is fine, what it answered is what counts.
    let _ = s.write_all(request);
    let got = read_until_closed(&mut s, TIMEOUT)?;
    if got.is_empty() {
        return Ok(Reply::Closed);
    }
    let text = String::from_utf8_lossy(&got);
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("an HTTP/1.1 status line in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok(Reply::Http(code, body))
}

/// Everything the server sends until it closes the connection (a reset after
/// some bytes counts as closing); fails if it is still open after `within`.
fn read_until_closed<S: Read + ReadTimeout>(s: &mut S, within: Duration) -> Result<Vec<u8>> {
    s.set_timeout(within.min(Duration::from_secs(1)).max(Duration::from_millis(10)))?;
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if start.elapsed() >= within {
                    bail!(
                        "the server neither closed the connection nor finished answering within {within:?}; got {:?}",
                        String::from_utf8_lossy(&got)
                    );
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => return Ok(got),
            Err(e) => return Err(e.into()),
        }
    }
}

trait ReadTimeout {
    fn set_timeout(&self, d: Duration) -> std::io::Result<()>;
}
impl ReadTimeout for TcpStream {
    fn set_timeout(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))
    }
}
impl ReadTimeout for UnixStream {
    fn set_timeout(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))
    }
}

/// The agent is alive, logged no panic, and its local API answers.
fn still_serving(agent: &mut Agent, cli: &Cli) -> Result<()> {
    ensure!(
        agent.is_running(),
        "the agent is still running; its log:\n{}",
        agent.log()
    );
    let log = agent.log();
    ensure!(!log.contains("panicked"), "no panic in the agent's log:\n{log}");
    cli.status().context("the local API still answers")?;
    Ok(())
}
