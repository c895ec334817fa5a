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

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use conndrain::api::{
    CLIENT_TIMEOUT, prestop::MAX_CONNECTIONS as NODE_MAX_CONNECTIONS, server::MAX_CONNECTIONS as LOCAL_MAX_CONNECTIONS,
};
use conndrain_tests::{
    Agent, Cli, NODE_V4, NODE_V6, Netns, Pod, Running, TIMEOUT, Topology, conndrain_bin, require_root, run_in,
    wait_until,
};

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

/// A GET request that closes its connection after the answer.
fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n").into_bytes()
}

/// A POST with a JSON body (`content_type` None: no Content-Type header).
fn post(path: &str, content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let ct = content_type
        .map(|c| format!("Content-Type: {c}\r\n"))
        .unwrap_or_default();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: conndrain\r\n{ct}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

/// One header too big for any request head the agent accepts.
fn huge_header(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: node\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    )
    .into_bytes()
}

/// More header lines than any request head the agent accepts.
fn many_headers(path: &str) -> Vec<u8> {
    let lines = (0..200)
        .map(|i| format!("X-H{i}: {i}"))
        .collect::<Vec<_>>()
        .join("\r\n");
    format!("GET {path} HTTP/1.1\r\nHost: node\r\n{lines}\r\nConnection: close\r\n\r\n").into_bytes()
}

/// A request that announces a body of 100 GB and sends none of it.
fn announced_huge_body(method: &str, path: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\nContent-Length: 100000000000\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// What a malformed request must get: any of `codes`, or (`closed_ok`) a
/// closed connection, which is what non-HTTP garbage may get.
struct Case {
    what: &'static str,
    request: Vec<u8>,
    codes: &'static [u16],
    closed_ok: bool,
    /// The JSON error body must contain this.
    says: Option<&'static str>,
}

fn case(what: &'static str, request: impl Into<Vec<u8>>, codes: &'static [u16]) -> Case {
    Case {
        what,
        request: request.into(),
        codes,
        closed_ok: false,
        says: None,
    }
}

impl Case {
    fn or_closed(mut self) -> Self {
        self.closed_ok = true;
        self
    }
    fn saying(mut self, says: &'static str) -> Self {
        self.says = Some(says);
        self
    }
    fn check(&self, reply: &Reply) -> Result<()> {
        let ok = match reply {
            Reply::Closed => self.closed_ok,
            Reply::Http(code, body) => {
                self.codes.contains(code)
                    && self
                        .says
                        .is_none_or(|s| body.contains("\"error\":") && body.contains(s))
            }
        };
        ensure!(
            ok,
            "{}: expected {:?}{}{}, got {reply:?}",
            self.what,
            self.codes,
            if self.closed_ok { " or a closed connection" } else { "" },
            self.says
                .map(|s| format!(" with a JSON error saying {s:?}"))
                .unwrap_or_default()
        );
        Ok(())
    }
}

/// Bytes that are not HTTP at all, the start of a TLS `ClientHello` among them.
fn garbage() -> Vec<Case> {
    vec![
        case(
            "a TLS ClientHello",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00\r\n\r\n".to_vec(),
            &[400],
        )
        .or_closed(),
        case("binary garbage", b"\x00\xff\xfe\x00\x01\x02\r\n\r\n".to_vec(), &[400]).or_closed(),
        case(
            "an HTTP/2 preface without HTTP/2",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            &[400, 505],
        )
        .or_closed(),
        case("a request line without a path", b"GET\r\n\r\n".to_vec(), &[400]),
        case(
            "an unknown HTTP version",
            b"GET / HTTP/7.1\r\nHost: node\r\n\r\n".to_vec(),
            &[400, 505],
        ),
        case(
            "a header line without a colon",
            b"GET / HTTP/1.1\r\nno colon here\r\n\r\n".to_vec(),
            &[400],
        ),
        case(
            "an invalid Content-Length",
            b"GET / HTTP/1.1\r\nHost: node\r\nContent-Length: lots\r\n\r\n".to_vec(),
            &[400],
        ),
    ]
}

#[test]
fn malformed_requests_to_the_node_api_are_refused_and_it_keeps_serving() -> Result<()> {
    let (topo, mut agent, cli) = setup(&["web"], &[])?;
    let web = topo.pod("web");
    let mut cases = garbage();
    cases.extend([
        case(
            "a method that is no HTTP token",
            b"G(T /v1/wait HTTP/1.1\r\nHost: node\r\n\r\n".to_vec(),
            &[400],
        ),
        case(
            "a method /v1/wait does not take",
            b"BREW /v1/wait HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n".to_vec(),
            &[405],
        )
        .saying("this port serves GET /v1/wait"),
        case(
            "DELETE /v1/wait",
            b"DELETE /v1/wait HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n".to_vec(),
            &[405],
        )
        .saying("this port serves GET /v1/wait"),
        case("an unknown path", get("/v1/pods/web/terminate"), &[404]).saying("this port serves GET /v1/wait"),
        case("a path with a bad escape", get("/v1/%zz%00"), &[404]).saying("this port serves GET /v1/wait"),
        case("a header of 64 KiB", huge_header("/v1/wait"), &[431]),
        case("200 header lines", many_headers("/v1/wait"), &[431]),
        case(
            "a 100 GB body announced and not sent",
            announced_huge_body("GET", "/v1/wait"),
            &[413],
        ),
        case("a query string naming nothing", get("/v1/wait?%ff%fe=&&="), &[400]).saying("takes no parameters"),
    ]);
    // From the pod itself: a request that got through would be its own wait.
    for c in &cases {
        c.check(&ask(web.ns(), node_addr(WAIT_PORT), &c.request).with_context(|| c.what)?)?;
    }
    // The metrics listener is served by the same code; a few there too.
    for c in [
        case("an unknown path on the metrics port", get("/v1/wait"), &[404]).saying("serves GET /metrics"),
        case("POST /metrics", post("/metrics", Some("text/plain"), b"x"), &[405]).saying("serves GET /metrics"),
        case(
            "a header of 64 KiB on the metrics port",
            huge_header("/metrics"),
            &[431],
        ),
    ]
    .iter()
    .chain(&garbage())
    {
        c.check(&ask(topo.client(), node_addr(METRICS_PORT), &c.request).with_context(|| c.what)?)?;
    }

    still_serving(&mut agent, &cli)?;
    ensure!(
        !agent.log().contains("preStop wait pod=web"),
        "no malformed request got as far as a wait:\n{}",
        agent.log()
    );
    healthy(&topo)?;
    pre_stop_drains(&cli, web)
}

#[test]
fn malformed_requests_to_the_local_api_are_refused_and_it_keeps_serving() -> Result<()> {
    let (topo, mut agent, cli) = setup(&["web"], &[])?;
    let json = Some("application/json");
    let mut cases = garbage();
    cases.extend([
        case(
            "a method /v1/pods does not take",
            b"PUT /v1/pods HTTP/1.1\r\nHost: c\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            &[405],
        )
        .saying("the local API is for the conndrain CLI"),
        case("an unknown path", get("/v2/everything"), &[404]).saying("the local API is for the conndrain CLI"),
        case("a header of 64 KiB", huge_header("/v1/status"), &[431]),
        case("200 header lines", many_headers("/v1/status"), &[431]),
        case("a body that is not JSON", post("/v1/pods", json, b"{not json"), &[400]),
        case(
            "JSON of the wrong shape",
            post("/v1/pods", json, br#"{"name": 5, "ips": "all"}"#),
            &[422],
        ),
        case(
            "JSON without a Content-Type",
            post("/v1/pods", None, br#"{"name":"x","ips":["10.9.9.9"]}"#),
            &[415],
        ),
        case(
            "an IP that is no IP",
            post("/v1/pods", json, br#"{"name":"x","ips":["10.9.9.300"]}"#),
            &[422],
        ),
        case(
            "a pod name of 10 KiB",
            post(
                "/v1/pods",
                json,
                format!(r#"{{"name":"{}","ips":["10.9.9.9"]}}"#, "a".repeat(10 * 1024)).as_bytes(),
            ),
            &[400],
        ),
        case(
            "a body of 1 MiB",
            post(
                "/v1/pods",
                json,
                format!(r#"{{"name":"x","ips":[],"pad":"{}"}}"#, "a".repeat(1 << 20)).as_bytes(),
            ),
            &[413],
        ),
        case(
            "a 100 GB body announced and not sent",
            announced_huge_body("POST", "/v1/pods/web/terminate"),
            &[413],
        ),
        case(
            "a timeout that is no number",
            get("/v1/pods/web/wait?timeout_secs=soon"),
            &[400],
        ),
        case("a negative timeout", get("/v1/pods/web/wait?timeout_secs=-1"), &[400]).saying("timeout"),
        case("a NaN timeout", get("/v1/pods/web/wait?timeout_secs=NaN"), &[400]).saying("timeout"),
        case(
            "an endless timeout",
            get("/v1/pods/web/wait?timeout_secs=1e999"),
            &[400],
        )
        .saying("timeout"),
        case("a pod name that is not UTF-8", get("/v1/pods/%ff%fe/wait"), &[400]),
        // Query strings are decoded lossily: this names a pod that cannot exist.
        case("a filter that is not UTF-8", get("/v1/flows?pod=%ff"), &[404]).saying("no pod named"),
    ]);
    for c in &cases {
        c.check(&ask_local(&agent, &c.request).with_context(|| c.what)?)?;
    }

    still_serving(&mut agent, &cli)?;
    let pods = cli.pods()?;
    ensure!(
        pods.len() == 1 && pods[0].name == "web",
        "no malformed request added a pod: {pods:?}"
    );
    ensure!(
        pods[0].state == "serving",
        "no malformed request terminated web: {pods:?}"
    );
    pre_stop_drains(&cli, topo.pod("web"))
}

/// A connection that sends a request head one byte at a time and never ends
/// it, on its own thread; returns once the server closes it, or fails after
/// [`DROP_WITHIN`].
fn trickle<S: Read + Write + ReadTimeout + Send + 'static>(mut s: S) -> thread::JoinHandle<Result<usize>> {
    thread::spawn(move || {
        // The read timeout paces the bytes: one per round.
        s.set_timeout(Duration::from_millis(100))?;
        let head = b"GET /v1/wait HTTP/1.1\r\nHost: node\r\nX-Slow: ";
        let start = Instant::now();
        let mut buf = [0u8; 1024];
        for sent in 0.. {
            let byte = head.get(sent).copied().unwrap_or(b'a');
            if s.write_all(&[byte]).is_err() {
                return Ok(sent);
            }
            match s.read(&mut buf) {
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                // An answer (there is none to a head never finished), an EOF or a reset: dropped.
                Ok(_) | Err(_) => return Ok(sent + 1),
            }
            if start.elapsed() >= DROP_WITHIN {
                bail!(
                    "a client sending its request head byte by byte was still connected after {DROP_WITHIN:?} ({sent} bytes)"
                );
            }
        }
        unreachable!("the loop only ends by returning")
    })
}

/// Each connection is closed by the server within [`DROP_WITHIN`] (all of
/// them together: they were opened at about the same time).
fn all_closed<S: Read + ReadTimeout>(what: &str, conns: Vec<S>) -> Result<()> {
    let start = Instant::now();
    for (i, mut s) in conns.into_iter().enumerate() {
        let left = DROP_WITHIN
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(100));
        read_until_closed(&mut s, left).with_context(|| format!("{what}: connection {i}"))?;
    }
    Ok(())
}

#[test]
fn slow_clients_of_the_node_api_are_dropped_and_block_no_one() -> Result<()> {
    let (topo, mut agent, cli) = setup(&["a", "b"], &[])?;
    let b = topo.pod("b");
    // Pod b holds many connections: request heads cut short, and nothing at all.
    let partial = connections(
        b.ns(),
        node_addr(WAIT_PORT),
        100,
        b"GET /v1/wait HTTP/1.1\r\nHost: node\r\n",
    )?;
    let silent = connections(b.ns(), node_addr(WAIT_PORT), 20, b"")?;
    // Callers that send a whole request and never read the answer.
    let deaf = connections(
        topo.client(),
        node_addr(WAIT_PORT),
        20,
        b"GET /v1/wait HTTP/1.1\r\nHost: node\r\n\r\n",
    )?;
    let trickler = trickle(tcp(b.ns(), node_addr(WAIT_PORT))?);
    let slow_metrics = connections(b.ns(), node_addr(METRICS_PORT), 20, b"GET /metrics HTTP/1.1\r\n")?;

    // Meanwhile, everyone else is served.
    healthy(&topo)?;
    cli.status().context("the local API answers during the flood")?;
    pre_stop_drains(&cli, topo.pod("a"))?;

    // And every slow connection is dropped in bounded time.
    all_closed("a request head cut short", partial)?;
    all_closed("a connection that sent nothing", silent)?;
    all_closed("a caller that never reads", deaf)?;
    all_closed("a request head cut short on the metrics port", slow_metrics)?;
    let sent = trickler.join().expect("the trickling thread does not panic")?;
    ensure!(sent > 0, "the trickling client sent something before it was dropped");
    ensure!(
        !agent.log().contains("preStop wait pod=b"),
        "no slow request got as far as a wait:\n{}",
        agent.log()
    );
    still_serving(&mut agent, &cli)
}

#[test]
fn slow_clients_of_the_local_api_are_dropped_and_block_no_one() -> Result<()> {
    let (_topo, mut agent, cli) = setup(&["web"], &[])?;
    let open = |n: usize, bytes: &[u8]| -> Result<Vec<UnixStream>> {
        (0..n)
            .map(|_| {
                let mut s = unix(&agent)?;
                s.write_all(bytes)?;
                Ok(s)
            })
            .collect()
    };
    let partial = open(40, b"GET /v1/status HTTP/1.1\r\nHost: c\r\n")?;
    let silent = open(20, b"")?;
    let deaf = open(20, b"GET /v1/status HTTP/1.1\r\nHost: c\r\n\r\n")?;
    // A body announced and sent only in part.
    let slow_body = open(
        1,
        b"POST /v1/pods HTTP/1.1\r\nHost: c\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{\"name\":",
    )?;
    let trickler = trickle(unix(&agent)?);

    let pods = cli.pods().context("the CLI is served during the flood")?;
    ensure!(pods.len() == 1, "{pods:?}");
    cli.status().context("the CLI is served during the flood")?;

    all_closed("a request head cut short", partial)?;
    all_closed("a connection that sent nothing", silent)?;
    all_closed("a caller that never reads", deaf)?;
    let mut slow_body = slow_body.into_iter().next().expect("one");
    let got = read_until_closed(&mut slow_body, DROP_WITHIN).context("a body sent in part")?;
    let got = String::from_utf8_lossy(&got);
    ensure!(
        got.is_empty() || got.starts_with("HTTP/1.1 4"),
        "a body sent in part is refused or dropped, not served: {got:?}"
    );
    trickler.join().expect("the trickling thread does not panic")?;

    let pods = cli.pods()?;
    ensure!(pods.len() == 1, "the partial POST added no pod: {pods:?}");
    still_serving(&mut agent, &cli)
}

#[test]
fn callers_that_never_read_their_answers_lose_their_slots() -> Result<()> {
    // Answers bigger than the socket buffers (here: thousands of pipelined
    // status requests, on every connection the local API allows) that the
    // caller never reads: the agent gives up writing after CLIENT_TIMEOUT.
    let (_topo, mut agent, cli) = setup(&["web"], &[])?;
    let request = b"GET /v1/status HTTP/1.1\r\nHost: c\r\n\r\n".repeat(8192);
    let deaf: Vec<UnixStream> = (0..LOCAL_MAX_CONNECTIONS)
        .map(|_| {
            let mut s = unix(&agent)?;
            // As much as the socket takes at once; the rest is never sent.
            s.set_nonblocking(true)?;
            let sent = s.write(&request).context("pipelining requests")?;
            s.set_nonblocking(false)?;
            ensure!(sent > 100 * 1024, "sent only {sent} bytes of requests");
            Ok(s)
        })
        .collect::<Result<_>>()?;
    let reply = ask_local(&agent, &get("/v1/status"))?;
    ensure!(reply == Reply::Closed, "every slot is taken: {reply:?}");

    wait_until("a slot freed by the agent", DROP_WITHIN, || ask_local(&agent, &get("/v1/status")), |r| {
        r.code() == Some(200)
    })
    .context("the agent stops writing to callers that do not read")?;
    all_closed("a caller that never reads its answers", deaf)?;
    still_serving(&mut agent, &cli)
}

/// How often `needle` occurs in `log`.
fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[test]
fn connections_beyond_the_limit_are_closed_at_once() -> Result<()> {
    let many = (2 * NODE_MAX_CONNECTIONS).to_string();
    // One pod fills the listener, so it may hold that many waits.
    let (topo, mut agent, cli) = setup(&["a"], &["--max-waiters", &many, "--max-waiters-per-pod", &many])?;
    let a = topo.pod("a");

    // Node API: a (not terminating) fills every connection with a wait, a
    // request that stays in flight (unlike a slow client's, which times out).
    let waits = connections(a.ns(), node_addr(WAIT_PORT), NODE_MAX_CONNECTIONS, &get("/v1/wait"))?;
    wait_until(
        "the agent to take every wait",
        TIMEOUT,
        || Ok(count(&agent.log(), "preStop wait pod=a")),
        |n| *n == NODE_MAX_CONNECTIONS,
    )?;
    let reply = ask(topo.client(), node_addr(WAIT_PORT), &get("/v1/wait"))?;
    ensure!(
        reply == Reply::Closed,
        "a connection beyond the limit is closed without an answer: {reply:?}"
    );
    ensure!(
        agent.log().contains("too many connections"),
        "the agent says why:\n{}",
        agent.log()
    );
    // The other listener has its own connections.
    healthy(&topo)?;

    // Local API: the same, with waits for a through the CLI's endpoint.
    let local: Vec<UnixStream> = (0..LOCAL_MAX_CONNECTIONS)
        .map(|_| {
            let mut s = unix(&agent)?;
            s.write_all(&get("/v1/pods/a/wait"))?;
            Ok(s)
        })
        .collect::<Result<_>>()?;
    // A status request gets in only while a slot is free, so poll until one is refused.
    let refused = wait_until(
        "a local connection beyond the limit",
        TIMEOUT,
        || ask_local(&agent, &get("/v1/status")),
        |r| *r == Reply::Closed,
    );
    refused.context("the local API closes connections beyond its limit")?;

    // Hanging up frees a slot: the CLI gets in again, and a drains, which
    // answers every node API wait, so those connections end too.
    drop(local);
    wait_until(
        "the local API to serve again",
        TIMEOUT,
        || cli.run(&["pod", "terminate", "a", "--quiet-period", "0.5", "--deadline", "60"]),
        |o| o.code == 0,
    )?;
    cli.wait_state("a", "drained")?;
    all_closed("a wait answered with a's drain", waits)?;
    wait_until(
        "the node API to serve again",
        TIMEOUT,
        || ask(topo.client(), node_addr(WAIT_PORT), &get("/v1/wait")),
        |r| r.code() == Some(403),
    )?;
    still_serving(&mut agent, &cli)
}

#[test]
fn a_waiter_that_hangs_up_frees_its_slot() -> Result<()> {
    // That waiters beyond --max-waiters get 429 is node_api::concurrent_waiters_are_bounded;
    // here: a hostile pod cannot keep the slots by opening waits and walking away.
    let (topo, agent, cli) = setup(&["a", "b"], &["--max-waiters", "1"])?;
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    // a is drained, so its wait is answered as soon as it gets a slot.
    cli.terminate("a", 0.5, 60.0)?;
    cli.wait_state("a", "drained")?;
    let mut b_wait = tcp(b.ns(), node_addr(WAIT_PORT))?;
    b_wait.write_all(&get("/v1/wait"))?;
    wait_until(
        "the agent to take b's wait",
        TIMEOUT,
        || Ok(agent.log().contains("preStop wait pod=b")),
        |taken| *taken,
    )?;
    let ask_a = || ask(a.ns(), node_addr(WAIT_PORT), &get("/v1/wait"));
    let reply = ask_a()?;
    ensure!(reply.code() == Some(429), "b holds the only slot: {reply:?}");

    drop(b_wait);
    let reply = wait_until("a's wait to get the slot b hung up on", TIMEOUT, ask_a, |r| {
        r.code() != Some(429)
    })?;
    ensure!(
        matches!(&reply, Reply::Http(200, body) if body.contains(r#""pod":"a""#) && body.contains("drained")),
        "a's wait is answered with a's drain: {reply:?}"
    );
    ensure!(
        !agent.log().contains("preStop wait done pod=b"),
        "b's wait was dropped, not answered:\n{}",
        agent.log()
    );
    Ok(())
}

/// The gateway of the default route in `ns` (`fam`: `-4` or `-6`).
fn gateway(ns: &Netns, fam: &str) -> Result<String> {
    let out = ns.ip(&[fam, "route", "show", "default"])?;
    let mut words = out.split_whitespace();
    words.find(|w| *w == "via");
    words
        .next()
        .map(str::to_owned)
        .with_context(|| format!("a default route via a gateway in {out:?}"))
}

/// The packets of nft counter `name` in table `inet spoof` of `ns`.
fn counter(ns: &Netns, name: &str) -> Result<u64> {
    let out = ns.exec("nft", &["list", "table", "inet", "spoof"])?;
    let line = out
        .lines()
        .find(|l| l.contains(&format!("comment \"{name}\"")))
        .with_context(|| format!("counter {name} in {out}"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "packets");
    words
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("a packet count in {line:?}"))
}

#[test]
fn a_pod_that_claims_another_pods_ip_gets_no_answer() -> Result<()> {
    let (topo, mut agent, cli) = setup(&["a", "b"], &[])?;
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let (node, a_if, b_if) = (topo.node(), a.node_if(), b.node_if());
    // The worst case: a node that takes packets whatever their source.
    node.sysctl(&[
        "net.ipv4.conf.all.rp_filter=0",
        &format!("net.ipv4.conf.{b_if}.rp_filter=0"),
    ])?;
    // Counters on the node: what arrives from b's interface with a's
    // addresses, and where the wait port's answers go.
    let (a4, a6) = (a.ipv4(), a.ipv6());
    node.exec(
        "nft",
        &[&format!(
            r#"table inet spoof {{
                chain pre {{
                    type filter hook prerouting priority -300; policy accept;
                    iifname "{b_if}" ip saddr {a4} tcp dport {WAIT_PORT} counter comment "from_b_as_a_v4"
                    iifname "{b_if}" ip6 saddr {a6} tcp dport {WAIT_PORT} counter comment "from_b_as_a_v6"
                }}
                chain out {{
                    type filter hook output priority 0; policy accept;
                    oifname "{a_if}" ip daddr {a4} tcp sport {WAIT_PORT} counter comment "to_a_v4"
                    oifname "{a_if}" ip6 daddr {a6} tcp sport {WAIT_PORT} counter comment "to_a_v6"
                    oifname "{b_if}" tcp sport {WAIT_PORT} counter comment "to_b"
                }}
            }}"#
        )],
    )?;

    // b takes a's addresses as its own and sends from them to the node.
    let targets = [(IpAddr::from(a4), IpAddr::from(NODE_V4)), (a6.into(), NODE_V6.into())];
    for (own, to) in targets {
        let (fam, host) = if own.is_ipv4() { ("-4", "32") } else { ("-6", "128") };
        let mut add = vec![fam, "addr", "add"];
        let cidr = format!("{own}/{host}");
        add.extend([cidr.as_str(), "dev", b.pod_if()]);
        if own.is_ipv6() {
            add.push("nodad");
        }
        b.ns().ip(&add)?;
        let gw = gateway(b.ns(), fam)?;
        b.ns().ip(&[
            fam,
            "route",
            "add",
            &format!("{to}/{host}"),
            "via",
            &gw,
            "src",
            &own.to_string(),
        ])?;
        let route = b.ns().ip(&[fam, "route", "get", &to.to_string()])?;
        ensure!(
            route.contains(&format!("src {own} ")),
            "b reaches {to} from a's address {own}: {route}"
        );
    }
    // Both at once: each attempt runs until its connect gives up.
    let attempts: Vec<Result<std::io::Result<TcpStream>>> = thread::scope(|scope| {
        let tries: Vec<_> = targets
            .iter()
            .map(|&(_, to)| {
                scope.spawn(move || {
                    run_in(b.ns(), || {
                        TcpStream::connect_timeout(&SocketAddr::new(to, WAIT_PORT), TIMEOUT)
                    })
                })
            })
            .collect();
        tries
            .into_iter()
            .map(|t| t.join().expect("a connect attempt does not panic"))
            .collect()
    });
    for (attempt, (own, to)) in attempts.into_iter().zip(targets) {
        if let Ok(s) = attempt? {
            // A completed handshake would be the hole: show what the agent says to it.
            let (local, peer) = (s.local_addr(), s.peer_addr());
            let reply = exchange(s, &get("/v1/wait"));
            bail!("b completed a handshake from a's {own} to {to} ({local:?} -> {peer:?}); it got {reply:?}");
        }
    }
    // b's packets did reach the node from a's addresses, and the node
    // answered them towards a, never b.
    for fam in ["v4", "v6"] {
        let (sent, answered) = (
            counter(node, &format!("from_b_as_a_{fam}"))?,
            counter(node, &format!("to_a_{fam}"))?,
        );
        ensure!(sent > 0, "b's SYNs from a's {fam} address reached the node");
        ensure!(
            answered > 0,
            "the node answered b's SYNs from a's {fam} address towards a"
        );
    }
    ensure!(counter(node, "to_b")? == 0, "nothing from the wait port went to b");

    // The agent never saw a request; a is untouched, and its own wait works.
    let log = agent.log();
    ensure!(
        !log.contains("preStop wait") && !log.contains("refused /v1/wait"),
        "the agent saw no request:\n{log}"
    );
    let a_now = cli.pod("a")?;
    ensure!(
        a_now.state == "serving" && a_now.active_flows == 0,
        "a is untouched: {a_now:?}"
    );
    pre_stop_drains(&cli, a)?;
    still_serving(&mut agent, &cli)
}

#[test]
fn forwarding_headers_do_not_change_who_is_asking() -> Result<()> {
    // The metrics for the client's network only: headers naming the client must not open them to a pod.
    let (topo, mut agent, cli) = setup(&["a", "b"], &["--metrics-allow", "10.100.0.0/24"])?;
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let a4 = a.ipv4();
    let claiming_a = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {a4}\r\nX-Forwarded-For: {a4}\r\nX-Real-IP: {a4}\r\nForwarded: for={a4}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes()
    };
    let ask_as_a = |ns: &Netns, to: SocketAddr, path: &str| -> Result<Reply> { ask(ns, to, &claiming_a(path)) };

    // Not a pod: refused by its real address.
    let reply = ask_as_a(topo.client(), node_addr(WAIT_PORT), "/v1/wait")?;
    ensure!(
        matches!(&reply, Reply::Http(403, body) if body.contains(r#""error":"10.100.0.2 is not a pod"#)),
        "the client is refused as itself: {reply:?}"
    );
    // Pod b is answered about b, over v4 and v6 (b is drained, so at once).
    cli.terminate("b", 0.5, 60.0)?;
    cli.wait_state("b", "drained")?;
    for to in [node_addr(WAIT_PORT), SocketAddr::new(NODE_V6.into(), WAIT_PORT)] {
        let reply = ask_as_a(b.ns(), to, "/v1/wait")?;
        ensure!(
            matches!(&reply, Reply::Http(200, body) if body.contains(r#""pod":"b""#)),
            "b is answered about itself via {to}: {reply:?}"
        );
    }
    // Headers naming an allowed caller do not open the metrics to a pod the list leaves out.
    let client = topo.client_v4();
    let claiming_client = format!(
        "GET /metrics HTTP/1.1\r\nHost: {client}\r\nX-Forwarded-For: {client}\r\nX-Real-IP: {client}\r\nForwarded: for={client}\r\nConnection: close\r\n\r\n"
    );
    let reply = ask(b.ns(), node_addr(METRICS_PORT), claiming_client.as_bytes())?;
    ensure!(reply.code() == Some(403), "pod b may not read the metrics: {reply:?}");
    let reply = ask(topo.client(), node_addr(METRICS_PORT), claiming_client.as_bytes())?;
    ensure!(reply.code() == Some(200), "the client may: {reply:?}");

    ensure!(
        !agent.log().contains("preStop wait pod=a"),
        "nothing waited as a:\n{}",
        agent.log()
    );
    ensure!(cli.pod("a")?.state == "serving", "a is untouched");
    pre_stop_drains(&cli, a)?;
    still_serving(&mut agent, &cli)
}
