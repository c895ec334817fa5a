//! The seeds' rolling-update scenario (issue 6, items 1-4), three strategies
//! side by side on the same simulated cluster and the same loads:
//!
//! - `none`: no mitigation, the preStop hook returns at once;
//! - `sleep`: `preStop: sleep N` (the seeds' workaround);
//! - `conndrain`: an agent on each node, the pods declared, preStop =
//!   `conndrain wait` (blocks until the pod is drained, asked of the agent of
//!   the pod's node), and steering (node A's agent, where kube-proxy
//!   translates the client's flows, pins the terminating pod's established
//!   flows, whichever node the pod is on).
//!
//! ```sh
//! cargo build -p conndrain
//! cargo run -p conndrain-tests --example rollout -- --short     # ~50 s
//! cargo run -p conndrain-tests --example rollout                # full, ~3 min
//! ```
//!
//! Options: `--short`, `--propagation SECS` (default 1), `--sleep N` (default
//! 15 short / 61 full, seed 000's `preStop: sleep 61`), `--grace SECS`
//! (default 30 short / 120 full, seed 001's terminationGracePeriodSeconds),
//! `--keepalive-requests N` (the app closes a keep-alive connection after N
//! requests, as nginx's `keepalive_requests`; default 30 short / 100 full; 0:
//! never, then a busy keep-alive connection holds a conndrain-drained pod
//! until its deadline), `--nftables` (kube-proxy's nftables mode),
//! `--only none,sleep,conndrain`, `--summary-out FILE` (the summary table
//! in Markdown, for BENCHMARKS.md).
//!
//! The cluster is `conndrain_tests::kubeproxy`: a client, node A, node B,
//! kube-proxy's rules on both nodes. Each strategy gets a fresh cluster. The
//! Deployment's pods (version 1) are spread over both nodes (a1, b1, a2,
//! ...: 2 in short mode, 3 in full mode, seed 000's `replicas: 3`), and every
//! one of them is replaced, by one rolling update in short mode and by three
//! in a row in full mode (`--rollouts N`; seed 000 redeploys continually):
//! v1 -> v2 -> v3 -> v4, each update once the monitor has seen the last one's
//! version answer, while that update's old pods may still be terminating. The client reaches the Service through node A,
//! whose kube-proxy sends the flows to node B's pods over the inter-node
//! link. A rolling update (maxSurge 1, maxUnavailable 0) starts a new pod
//! (the next version) on the node of the pod it replaces, adds it to the endpoints,
//! and deletes the old pod; the simulated kubelet then runs Kubernetes' order:
//!
//! deletion -> { endpoints update reaching the nodes' kube-proxy after the
//! propagation delay (rules rewritten without the pod, UDP conntrack cleanup)
//! || preStop hook } -> SIGTERM -> the app's graceful shutdown (stop accepting,
//! finish in-flight requests, close idle keep-alives and open streams, close
//! the UDP socket) -> SIGKILL at the grace period.
//!
//! The loads, in the client namespace through the Service's cluster IP: HTTP keep-alive,
//! HTTP `Connection: close` (seed 001's `wrk`), `/slow` requests, long-lived
//! TCP streams, UDP sessions, and seed 000's monitor (a pooled keep-alive
//! client that numbers its requests and checks the version in every answer;
//! see `monitor_client`). Two more reach the pods from elsewhere:
//!
//! - a masqueraded NodePort client: from the client namespace to node A's
//!   NodePort, one `Connection: close` request every 0.3 s (seed 000's ELB
//!   health checks and traffic). kube-proxy marks NodePort traffic for
//!   masquerade whatever node the endpoint is on (`externalTrafficPolicy:
//!   Cluster`), so the pods see node A's address as the source: its gateway
//!   address on the pod's veth for node A's pods, its inter-node link address
//!   for node B's;
//! - a same-node client: a pod on node A (not an endpoint; `client-a`, wired
//!   like the Deployment's pods and, with conndrain, known to node A's agent
//!   as Kubernetes mode would) calling the cluster IP, a pooled keep-alive
//!   client and a `Connection: close` one; its connections to node A's pods
//!   are pod-to-pod on the same node.
//!
//! The app runs in-process: its sockets live in the pod's namespace, and
//! "SIGTERM"/"SIGKILL" are flags its threads watch. Every answer carries the
//! pod, its version and the request's sequence number; a "wrong version" is
//! an answer to another request or from a pod already released.
//!
//! Known result (not a bug of this program): with conndrain, a UDP session
//! that starts on the terminating pod less than a second before kube-proxy's
//! UDP conntrack cleanup can still move to another pod, because the agent
//! re-learns flows to pin from conntrack once a second.

#![allow(
    clippy::too_many_lines,
    clippy::cast_precision_loss,
    clippy::many_single_char_names,
    clippy::similar_names,
    clippy::needless_pass_by_value,
    clippy::struct_field_names
)]

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    fs::File,
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use conndrain_tests::{
    Agent, Cli, Running, check_interrupted, conndrain_bin,
    kubeproxy::{
        Backend, Cluster, ClusterPod, KubeProxy, NODE_A_V4, NODE_A_V6, NODE_B_V4, NODE_B_V6, Node,
        Protocol, Service, ServicePort,
    },
    require_root, run_in, stop_on_signals,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_V6: &str = "fd00:96::10";
const HTTP_PORT: u16 = 80;
const HTTP_TARGET: u16 = 8080;
/// The HTTP port's NodePort, reached on node A's node IP.
const HTTP_NODE_PORT: u16 = 30080;
/// The masqueraded NodePort client's pace (seed 000's ELB).
const NODE_PORT_INTERVAL: Duration = Duration::from_millis(300);
/// The same-node client: a pod on node A that is not one of the Deployment's.
const SAME_NODE_POD: &str = "client-a";
/// The same-node client's pace, per connection kind (keep-alive, close).
const SAME_NODE_INTERVAL: Duration = Duration::from_millis(100);
/// The names of those two loads (the summary finds them by name).
const NODE_PORT_LOAD: &str = "NodePort, masqueraded (close, 1 per 0.3s)";
const SAME_NODE_LOAD: &str = "same-node pod (keep-alive + close, 2 x 10/s)";
const STREAM_PORT: u16 = 9000;
const UDP_PORT: u16 = 53;
const UDP_TARGET: u16 = 5353;
const WAIT_PORT: u16 = 9464;
const METRICS_PORT: u16 = 9465;
/// The agent's quiet period (its default): covers the propagation delay.
const QUIET_PERIOD: f64 = 3.0;
/// Kubernetes mode's default `--deadline-margin`: the deadline is the kill
/// time minus this.
const DEADLINE_MARGIN: f64 = 2.0;
/// The clients' patience for a connect or an answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// Seed 000's monitor: its Go client's timeout, and how often it asks.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(5);
const MONITOR_INTERVAL: Duration = Duration::from_millis(200);
/// The Deployment's first version; each rolling update adds one.
const FIRST_VERSION: u32 = 1;

#[derive(Debug, Clone)]
struct Config {
    short: bool,
    propagation: Duration,
    sleep_secs: u64,
    grace: Duration,
    slow: Duration,
    /// How long one stream and one UDP session last (then the client closes
    /// it and opens the next one).
    session_life: Duration,
    /// The app closes a keep-alive connection after this many requests
    /// (nginx's `keepalive_requests`, lowered so connections rotate).
    keepalive_requests: u64,
    /// The agent's `--udp-timeout`.
    udp_timeout: f64,
    replacements: usize,
    /// Rolling updates one after the other (seed 000 redeploys continually):
    /// v1 -> v2 -> ... -> v(rollouts + 1).
    rollouts: usize,
    /// Between two deletions of the rolling update.
    step_gap: Duration,
    backend: Backend,
    only: Vec<Strategy>,
    /// Also write the summary table (Markdown) here, for BENCHMARKS.md.
    summary_out: Option<String>,
}

impl Config {
    fn parse() -> Result<Self> {
        let mut args = std::env::args().skip(1);
        let mut short = false;
        let mut summary_out = None;
        let (mut propagation, mut sleep, mut grace, mut backend, mut only, mut keepalive) =
            (1.0_f64, None, None, Backend::Iptables, None, None);
        let mut rollouts = None;
        while let Some(a) = args.next() {
            let mut val = |name: &str| -> Result<String> {
                args.next().with_context(|| format!("{name} needs a value"))
            };
            match a.as_str() {
                "--short" => short = true,
                "--propagation" => propagation = val(&a)?.parse()?,
                "--sleep" => sleep = Some(val(&a)?.parse()?),
                "--grace" => grace = Some(val(&a)?.parse::<f64>()?),
                "--nftables" => backend = Backend::Nftables,
                "--summary-out" => summary_out = Some(val(&a)?),
                "--keepalive-requests" => keepalive = Some(val(&a)?.parse::<u64>()?),
                "--rollouts" => {
                    let n: usize = val(&a)?.parse().context("--rollouts takes a number of rolling updates")?;
                    if n == 0 {
                        bail!("--rollouts must be at least 1");
                    }
                    rollouts = Some(n);
                }
                "--only" => {
                    only = Some(
                        val(&a)?
                            .split(',')
                            .map(|s| match s {
                                "none" => Ok(Strategy::None),
                                "sleep" => Ok(Strategy::Sleep),
                                "conndrain" => Ok(Strategy::Conndrain),
                                _ => bail!("unknown strategy {s:?} (none, sleep, conndrain)"),
                            })
                            .collect::<Result<Vec<_>>>()?,
                    );
                }
                "-h" | "--help" => {
                    println!(
                        "rollout [--short] [--propagation SECS] [--sleep N] [--grace SECS] [--keepalive-requests N (0: never)] [--rollouts N] [--nftables] [--only none,sleep,conndrain] [--summary-out FILE.md]"
                    );
                    std::process::exit(0);
                }
                _ => bail!("unknown argument {a:?} (try --help)"),
            }
        }
        let grace = Duration::from_secs_f64(grace.unwrap_or(if short { 30.0 } else { 120.0 }));
        Ok(Self {
            short,
            propagation: Duration::from_secs_f64(propagation),
            sleep_secs: sleep.unwrap_or(if short { 15 } else { 61 }),
            grace,
            slow: Duration::from_secs(if short { 2 } else { 10 }),
            session_life: Duration::from_secs(if short { 3 } else { 8 }),
            keepalive_requests: match keepalive {
                Some(0) => u64::MAX,
                Some(n) => n,
                None if short => 30,
                None => 100,
            },
            udp_timeout: 2.0,
            replacements: if short { 2 } else { 3 },
            rollouts: rollouts.unwrap_or(if short { 1 } else { 3 }),
            step_gap: Duration::from_secs(if short { 0 } else { 10 }),
            backend,
            only: only
                .unwrap_or_else(|| vec![Strategy::None, Strategy::Sleep, Strategy::Conndrain]),
            summary_out,
        })
    }
}

impl Config {
    fn last_version(&self) -> u32 {
        FIRST_VERSION + u32::try_from(self.rollouts).unwrap_or(u32::MAX - 1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    None,
    Sleep,
    Conndrain,
}

impl Strategy {
    fn label(self, cfg: &Config) -> String {
        match self {
            Strategy::None => "no mitigation".into(),
            Strategy::Sleep => format!("preStop sleep {}", cfg.sleep_secs),
            Strategy::Conndrain => "conndrain".into(),
        }
    }
}

fn main() -> ExitCode {
    stop_on_signals();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rollout: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    require_root()?;
    let cfg = Config::parse()?;
    println!(
        "Rolling updates under load, {} mode: {} update(s) of {} pod(s) each (v{FIRST_VERSION} to v{}), pods on node A and node B, kube-proxy {:?} mode, \
         endpoints propagation {:.1}s, grace period {}s, /slow {}s, streams and UDP sessions of {}s, \
         keep-alive connections closed by the app after {} requests.",
        if cfg.short { "short" } else { "full" },
        cfg.rollouts,
        cfg.replacements,
        cfg.last_version(),
        cfg.backend,
        cfg.propagation.as_secs_f64(),
        cfg.grace.as_secs(),
        cfg.slow.as_secs(),
        cfg.session_life.as_secs(),
        if cfg.keepalive_requests == u64::MAX {
            "unlimited".to_owned()
        } else {
            cfg.keepalive_requests.to_string()
        },
    );
    let mut results = Vec::new();
    for &s in &cfg.only {
        println!("\n######## strategy: {}", s.label(&cfg));
        let r = run_strategy(&cfg, s).with_context(|| format!("strategy {}", s.label(&cfg)))?;
        r.print(&cfg);
        results.push(r);
    }
    println!(
        "\n######## summary ({} mode)\n",
        if cfg.short { "short" } else { "full" }
    );
    let summary = summary(&cfg, &results);
    print!("{summary}");
    if let Some(path) = &cfg.summary_out {
        std::fs::write(path, &summary).with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The app: HTTP/1.1 (`/fast`, `/slow`), a line stream, UDP; each answer says
// `<pod> v<version> <seq>`.
// ---------------------------------------------------------------------------

struct App {
    name: String,
    term: Arc<AtomicBool>,
    kill: Arc<AtomicBool>,
    live: Arc<AtomicUsize>,
}

/// Counts a live app thread; the app has ended when none is left.
struct Live(Arc<AtomicUsize>);
impl Live {
    fn new(c: &Arc<AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        Self(c.clone())
    }
}
impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct AppCtx {
    name: String,
    version: u32,
    slow: Duration,
    keepalive_requests: u64,
    term: Arc<AtomicBool>,
    kill: Arc<AtomicBool>,
    live: Arc<AtomicUsize>,
}

impl App {
    fn start(pod: &ClusterPod, version: u32, cfg: &Config) -> Result<Self> {
        let ctx = AppCtx {
            name: pod.name().to_owned(),
            version,
            slow: cfg.slow,
            keepalive_requests: cfg.keepalive_requests,
            term: Arc::new(AtomicBool::new(false)),
            kill: Arc::new(AtomicBool::new(false)),
            live: Arc::new(AtomicUsize::new(0)),
        };
        let ip: IpAddr = pod.ipv4().into();
        for (port, stream) in [(HTTP_TARGET, false), (STREAM_PORT, true)] {
            let addr = SocketAddr::new(ip, port);
            let l = run_in(pod.ns(), || TcpListener::bind(addr))?
                .with_context(|| format!("binding {addr} in {}", pod.name()))?;
            l.set_nonblocking(true)?;
            let (c, live) = (ctx.clone(), Live::new(&ctx.live));
            thread::spawn(move || {
                let _live = live;
                accept_loop(l, &c, stream);
            });
        }
        let addr = SocketAddr::new(ip, UDP_TARGET);
        let u = run_in(pod.ns(), || UdpSocket::bind(addr))??;
        u.set_read_timeout(Some(Duration::from_millis(50)))?;
        let (c, live) = (ctx.clone(), Live::new(&ctx.live));
        thread::spawn(move || {
            let _live = live;
            let mut buf = [0u8; 1500];
            while !c.term.load(Ordering::SeqCst) {
                if let Ok((n, from)) = u.recv_from(&mut buf) {
                    let req = String::from_utf8_lossy(&buf[..n]);
                    let _ = u.send_to(format!("{} v{} {req}", c.name, c.version).as_bytes(), from);
                }
            }
        });
        Ok(Self {
            name: ctx.name,
            term: ctx.term,
            kill: ctx.kill,
            live: ctx.live,
        })
    }

    fn sigterm(&self) {
        self.term.store(true, Ordering::SeqCst);
    }
    fn sigkill(&self) {
        self.term.store(true, Ordering::SeqCst);
        self.kill.store(true, Ordering::SeqCst);
    }
    fn ended(&self) -> bool {
        self.live.load(Ordering::SeqCst) == 0
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.sigkill();
        let end = Instant::now() + Duration::from_secs(2);
        while !self.ended() && Instant::now() < end {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

fn accept_loop(l: TcpListener, c: &AppCtx, stream: bool) {
    // Stop accepting at SIGTERM: the listener is closed, so SYNs that still
    // arrive get a RST (connection refused).
    while !c.term.load(Ordering::SeqCst) {
        match l.accept() {
            Ok((s, _)) => {
                let (c2, live) = (c.clone(), Live::new(&c.live));
                thread::spawn(move || {
                    let _live = live;
                    if stream {
                        serve_stream(s, &c2);
                    } else {
                        serve_http(s, &c2);
                    }
                });
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Close with a RST, as the kernel does for a killed process's sockets that
/// have unread data; SIGKILL here.
fn reset(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a properly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&l).cast(),
            u32::try_from(std::mem::size_of::<libc::linger>()).expect("small"),
        );
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn serve_http(mut s: TcpStream, c: &AppCtx) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
    let mut served = 0u64;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        // Read one request head.
        let head_end = loop {
            if c.kill.load(Ordering::SeqCst) {
                reset(&s);
                return;
            }
            if let Some(e) = find(&buf, b"\r\n\r\n") {
                break e;
            }
            if c.term.load(Ordering::SeqCst) && buf.is_empty() {
                // Graceful shutdown: an idle keep-alive connection is closed.
                let _ = s.shutdown(std::net::Shutdown::Both);
                return;
            }
            match s.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end + 4);
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let client_close = head.to_ascii_lowercase().contains("connection: close");
        let seq = path.split("seq=").nth(1).unwrap_or("0").to_owned();
        if path.starts_with("/slow") {
            let end = Instant::now() + c.slow;
            while Instant::now() < end {
                if c.kill.load(Ordering::SeqCst) {
                    reset(&s);
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        served += 1;
        // In-flight requests finish during shutdown, then the connection closes.
        let close = client_close || c.term.load(Ordering::SeqCst) || served >= c.keepalive_requests;
        let body = format!("{} v{} {seq}\n", c.name, c.version);
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if close { "close" } else { "keep-alive" }
        );
        if s.write_all(resp.as_bytes()).is_err() {
            return;
        }
        if close {
            let _ = s.shutdown(std::net::Shutdown::Write);
            // Let the client read and close first (no RST on unread data).
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = s.read(&mut chunk);
            return;
        }
    }
}

/// A long-lived stream: `<seq>\n` -> `<pod> v<version> <seq>\n`. The app
/// closes open streams at SIGTERM (as a WebSocket server sends its close).
fn serve_stream(s: TcpStream, c: &AppCtx) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = s;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        if c.kill.load(Ordering::SeqCst) {
            reset(&r);
            return;
        }
        while let Some(e) = find(&buf, b"\n") {
            let line = String::from_utf8_lossy(&buf[..e]).into_owned();
            buf.drain(..=e);
            if w.write_all(format!("{} v{} {line}\n", c.name, c.version).as_bytes())
                .is_err()
            {
                return;
            }
        }
        if c.term.load(Ordering::SeqCst) {
            let _ = r.shutdown(std::net::Shutdown::Both);
            return;
        }
        match r.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

// ---------------------------------------------------------------------------
// The loads, in the client namespace, through the ClusterIP.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Refused,
    Reset,
    Timeout,
    WrongVersion,
    ClosedByServer,
    Moved,
    Other,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Refused => "connect refused",
            Kind::Reset => "reset",
            Kind::Timeout => "timeout",
            Kind::WrongVersion => "wrong version",
            Kind::ClosedByServer => "closed by server",
            Kind::Moved => "moved to another pod",
            Kind::Other => "other",
        }
    }
}

#[derive(Debug)]
struct Fail(Kind, String);

fn classify(e: &std::io::Error, what: &str) -> Fail {
    let kind = match e.kind() {
        ErrorKind::ConnectionRefused => Kind::Refused,
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            Kind::Reset
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Kind::Timeout,
        _ => Kind::Other,
    };
    Fail(kind, format!("{what}: {e}"))
}

/// What one load saw.
#[derive(Default)]
struct Tally {
    /// Requests sent (HTTP), or streams/sessions opened.
    sent: u64,
    ok: u64,
    failed: BTreeMap<Kind, u64>,
    samples: Vec<String>,
}

/// How a load is counted in the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    /// HTTP requests, summed over these loads.
    Requests,
    /// Streams or UDP sessions, per load.
    Sessions,
    /// Seed 000's monitor: columns of its own.
    Monitor,
    /// HTTP requests from elsewhere than the client namespace's cluster IP
    /// (the masqueraded NodePort, the same-node pod): a column each.
    Apart,
}

struct Load {
    name: &'static str,
    counted: Counted,
    tally: Mutex<Tally>,
}

impl Load {
    fn new(name: &'static str, counted: Counted) -> Arc<Self> {
        Arc::new(Self {
            name,
            counted,
            tally: Mutex::new(Tally::default()),
        })
    }
    fn sent(&self) {
        self.tally.lock().expect("tally").sent += 1;
    }
    fn ok(&self) {
        self.tally.lock().expect("tally").ok += 1;
    }
    fn fail(&self, run: &Shared, f: &Fail) {
        let mut t = self.tally.lock().expect("tally");
        *t.failed.entry(f.0).or_default() += 1;
        if t.samples.len() < 4 {
            t.samples
                .push(format!("[{:5.2}s] {}: {}", run.since(), f.0.label(), f.1));
        }
    }
}

/// What the loads and the kubelet share in one strategy's run.
struct Shared {
    t0: Instant,
    stop: AtomicBool,
    /// Pods whose app has ended: an answer from one is a wrong version.
    released: Mutex<Vec<String>>,
    timeline: Mutex<Vec<(f64, String)>>,
    seq: AtomicU64,
    /// When the Deployment was updated to each new version (s since `t0`).
    updated_at: Mutex<Vec<f64>>,
    /// The last version the Deployment will have: answers carry v1 to this.
    last_version: u32,
}

impl Shared {
    fn since(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
    fn event(&self, what: String) {
        self.timeline
            .lock()
            .expect("timeline")
            .push((self.since(), what));
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || check_interrupted().is_err()
    }
    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }
    /// Checks an answer `<pod> v<version> <seq>`; returns the pod.
    fn check_answer(&self, answer: &str, seq: &str) -> std::result::Result<String, Fail> {
        let mut w = answer.split_whitespace();
        let (pod, ver, s) = (w.next(), w.next(), w.next());
        match (pod, ver, s) {
            (Some(pod), Some(_), Some(s)) if s == seq => {
                if self
                    .released
                    .lock()
                    .expect("released")
                    .iter()
                    .any(|p| p == pod)
                {
                    Err(Fail(
                        Kind::WrongVersion,
                        format!("answer {answer:?} from {pod}, which was already released"),
                    ))
                } else {
                    Ok(pod.to_owned())
                }
            }
            _ => Err(Fail(
                Kind::WrongVersion,
                format!("answer {answer:?} to request {seq}"),
            )),
        }
    }
}

/// Moves the calling thread into `ns` for good: its sockets are made there.
fn enter(ns: &conndrain_tests::Netns) -> Result<()> {
    let path = format!("/var/run/netns/{}", ns.name());
    let f = File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: a valid fd to a network namespace; only this thread moves.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns into {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn connect(to: SocketAddr) -> std::result::Result<TcpStream, Fail> {
    let s = TcpStream::connect_timeout(&to, CLIENT_TIMEOUT).map_err(|e| classify(&e, "connect"))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Sends one GET and reads the answer; returns (body, server closes).
fn http_request(
    s: &mut TcpStream,
    path: &str,
    close: bool,
    timeout: Duration,
) -> std::result::Result<(String, bool), Fail> {
    s.set_read_timeout(Some(timeout)).ok();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: web\r\nConnection: {}\r\n\r\n",
        if close { "close" } else { "keep-alive" }
    );
    s.write_all(req.as_bytes())
        .map_err(|e| classify(&e, "send"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(e) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..e]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= e + 4 + len {
                let body = String::from_utf8_lossy(&buf[e + 4..e + 4 + len]).into_owned();
                return Ok((body, head.contains("connection: close")));
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                return Err(Fail(
                    Kind::Reset,
                    if buf.is_empty() {
                        "connection closed before any answer".into()
                    } else {
                        "connection closed mid-answer".into()
                    },
                ));
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(classify(&e, "read")),
        }
    }
}

/// Whether an idle keep-alive connection was closed by the server meanwhile
/// (a pooled client checks this before reusing one, as Go's transport does).
fn closed_by_peer(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let mut b = [0u8; 1];
    let closed = match s.peek(&mut b) {
        Ok(_) => true, // EOF or unexpected data: either way unusable
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    let _ = s.set_nonblocking(false);
    closed
}

/// One GET over a pooled keep-alive connection, as Go's `http.Transport`
/// does: the idle connection is reused unless the server closed it, else a
/// new one is opened; it goes back to the pool unless the answer closes it.
/// Returns the body.
fn pooled_request(
    pool: &mut Option<TcpStream>,
    to: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::result::Result<String, Fail> {
    if pool.as_ref().is_some_and(closed_by_peer) {
        *pool = None;
    }
    let mut s = match pool.take() {
        Some(s) => s,
        None => connect(to)?,
    };
    let (body, close) = http_request(&mut s, path, false, timeout)?;
    if !close {
        *pool = Some(s);
    }
    Ok(body)
}

/// HTTP keep-alive through the cluster IP: one pooled connection, a request
/// every `interval`.
fn keepalive_client(run: &Shared, load: &Load, interval: Duration) {
    let to = SocketAddr::new(VIP.into(), HTTP_PORT);
    let mut pool: Option<TcpStream> = None;
    while !run.stopped() {
        let seq = run.next_seq();
        load.sent();
        match pooled_request(&mut pool, to, &format!("/fast?seq={seq}"), CLIENT_TIMEOUT)
            .and_then(|body| run.check_answer(&body, &seq.to_string()))
        {
            Ok(_) => load.ok(),
            Err(f) => load.fail(run, &f),
        }
        thread::sleep(interval);
    }
}

/// What seed 000's monitor saw, beyond the per-request tally.
#[derive(Default)]
struct MonitorStats {
    /// When the last good answer came (s since the loads started).
    last_good: Option<f64>,
    /// The longest time between two good answers (or from the last one to
    /// the end): what the monitor's user sees as an outage.
    longest_gap: f64,
    /// Runs of consecutive requests without a good answer.
    gaps: u64,
    in_gap: bool,
    /// Per version: when it answered first and last.
    answered: BTreeMap<u32, (f64, f64)>,
}

#[derive(Default)]
struct Monitor {
    stats: Mutex<MonitorStats>,
}

impl Monitor {
    fn good(&self, at: f64, version: u32) {
        let mut m = self.stats.lock().expect("monitor");
        if let Some(last) = m.last_good {
            m.longest_gap = m.longest_gap.max(at - last);
        }
        m.last_good = Some(at);
        m.in_gap = false;
        m.answered.entry(version).and_modify(|(_, last)| *last = at).or_insert((at, at));
    }

    fn has_answered(&self, version: u32) -> bool {
        self.stats.lock().expect("monitor").answered.contains_key(&version)
    }

    fn missed(&self) {
        let mut m = self.stats.lock().expect("monitor");
        if !m.in_gap {
            m.in_gap = true;
            m.gaps += 1;
        }
    }

    fn end(&self, at: f64) {
        let mut m = self.stats.lock().expect("monitor");
        if let Some(last) = m.last_good {
            m.longest_gap = m.longest_gap.max(at - last);
        }
    }
}

/// Seed 000's monitor. Its user "continually redeploys an app with a
/// sequence number" (the version, a Deployment argument the app answers
/// with) "and checks that no request is dropped": a Go `http.Client` (pooled
/// keep-alive connections, 5 s timeout) GETs the Service in a loop, counts
/// every error, and after each redeploy waits until the new number answers.
/// Here each redeploy is a rolling update (`run_strategy` waits for the
/// monitor to see the new version before the next one), and the loop runs 5
/// times a second rather than once, to sample the short run. Each request is
/// numbered 1, 2, 3, ...; every answer must echo its number (no gap), come
/// from a pod not yet released, and carry a version the Deployment has had.
/// A gap is a run of requests without a good answer.
fn monitor_client(run: &Shared, load: &Load, mon: &Monitor) {
    let to = SocketAddr::new(VIP.into(), HTTP_PORT);
    let mut pool: Option<TcpStream> = None;
    let mut seq = 0u64;
    // Time gaps from the start, so that failing from the first request on shows.
    mon.stats.lock().expect("monitor").last_good = Some(run.since());
    while !run.stopped() {
        seq += 1;
        load.sent();
        let answer = pooled_request(&mut pool, to, &format!("/?seq={seq}"), MONITOR_TIMEOUT)
            .and_then(|body| {
                run.check_answer(&body, &seq.to_string())?;
                version_of(&body, run.last_version)
            });
        match answer {
            Ok(version) => {
                load.ok();
                mon.good(run.since(), version);
            }
            Err(f) => {
                load.fail(run, &f);
                mon.missed();
            }
        }
        thread::sleep(MONITOR_INTERVAL);
    }
    mon.end(run.since());
}

/// The version in an answer `<pod> v<version> <seq>`: one the Deployment has
/// had (v1 to `last`).
fn version_of(answer: &str, last: u32) -> std::result::Result<u32, Fail> {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.strip_prefix('v')?.parse().ok())
        .filter(|v| (FIRST_VERSION..=last).contains(v))
        .ok_or_else(|| {
            Fail(
                Kind::WrongVersion,
                format!("answer {answer:?}: the Deployment has v{FIRST_VERSION} to v{last} only"),
            )
        })
}

/// HTTP with `Connection: close` (seed 001's wrk), a new connection per request
/// to `to` (the cluster IP, or a NodePort).
fn close_client(run: &Shared, load: &Load, to: SocketAddr, path: &str, interval: Duration, timeout: Duration) {
    while !run.stopped() {
        let seq = run.next_seq();
        load.sent();
        let r = connect(to).and_then(|mut s| {
            http_request(&mut s, &format!("{path}?seq={seq}"), true, timeout)
                .and_then(|(body, _)| run.check_answer(&body, &seq.to_string()))
        });
        match r {
            Ok(_) => load.ok(),
            Err(f) => load.fail(run, &f),
        }
        thread::sleep(interval);
    }
}

/// Long-lived streams, one after another, each `life` long, a message every
/// 100 ms. A stream is broken if any message fails or is answered by another
/// pod than the first.
fn stream_client(run: &Shared, load: &Load, life: Duration) {
    let to = SocketAddr::new(VIP.into(), STREAM_PORT);
    while !run.stopped() {
        load.sent();
        let r = (|| -> std::result::Result<(), Fail> {
            let mut s = connect(to)?;
            s.set_read_timeout(Some(CLIENT_TIMEOUT)).ok();
            let end = Instant::now() + life;
            let mut first: Option<String> = None;
            let mut answers = 0u64;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 512];
            while Instant::now() < end && !run.stopped() {
                let seq = run.next_seq();
                s.write_all(format!("{seq}\n").as_bytes())
                    .map_err(|e| classify(&e, "send"))?;
                let line = loop {
                    if let Some(e) = find(&buf, b"\n") {
                        let l = String::from_utf8_lossy(&buf[..e]).into_owned();
                        buf.drain(..=e);
                        break l;
                    }
                    match s.read(&mut chunk) {
                        Ok(0) => {
                            return Err(Fail(
                                Kind::ClosedByServer,
                                format!(
                                    "stream to {} closed by the server after {answers} answers",
                                    first.as_deref().unwrap_or("?")
                                ),
                            ));
                        }
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        Err(e) => return Err(classify(&e, "read")),
                    }
                };
                let pod = run.check_answer(&line, &seq.to_string())?;
                answers += 1;
                match &first {
                    None => first = Some(pod),
                    Some(f) if *f != pod => {
                        return Err(Fail(
                            Kind::Moved,
                            format!("stream from {f} answered by {pod}"),
                        ));
                    }
                    Some(_) => {}
                }
                thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        })();
        match r {
            Ok(()) => load.ok(),
            Err(f) => {
                load.fail(run, &f);
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// UDP sessions (one 5-tuple each), one after another, each `life` long, a
/// datagram every 100 ms (two tries of 1 s). Broken if a datagram goes
/// unanswered, is refused, or is answered by another pod than the first.
fn udp_client(run: &Shared, load: &Load, life: Duration, id: usize) {
    let to = SocketAddr::new(VIP.into(), UDP_PORT);
    let mut n = 0;
    while !run.stopped() {
        n += 1;
        load.sent();
        let session = format!("u{id}-{n}");
        let r = (|| -> std::result::Result<(), Fail> {
            let u =
                UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| classify(&e, "bind"))?;
            u.connect(to).map_err(|e| classify(&e, "connect"))?;
            u.set_read_timeout(Some(Duration::from_secs(1))).ok();
            let end = Instant::now() + life;
            let mut first: Option<String> = None;
            let mut buf = [0u8; 1500];
            while Instant::now() < end && !run.stopped() {
                let seq = run.next_seq();
                let tag = format!("{session}:{seq}");
                let mut answer = None;
                let mut last = Fail(
                    Kind::Timeout,
                    format!("datagram {tag}: no answer in 2 tries of 1s"),
                );
                'tries: for _ in 0..2 {
                    if let Err(e) = u.send(tag.as_bytes()) {
                        last = classify(&e, "send");
                        continue;
                    }
                    let deadline = Instant::now() + Duration::from_secs(1);
                    while Instant::now() < deadline {
                        match u.recv(&mut buf) {
                            Ok(k) => {
                                let a = String::from_utf8_lossy(&buf[..k]).into_owned();
                                if a.ends_with(&format!(" {tag}")) {
                                    answer = Some(a);
                                    break 'tries;
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock | ErrorKind::TimedOut
                                ) =>
                            {
                                break;
                            }
                            Err(e) => {
                                last = classify(&e, "recv (ICMP port unreachable)");
                                break;
                            }
                        }
                    }
                }
                let Some(a) = answer else { return Err(last) };
                let pod = run.check_answer(&a, &tag)?;
                match &first {
                    None => first = Some(pod),
                    Some(f) if *f != pod => {
                        return Err(Fail(
                            Kind::Moved,
                            format!("session {session} from {f} answered by {pod}"),
                        ));
                    }
                    Some(_) => {}
                }
                thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        })();
        match r {
            Ok(()) => load.ok(),
            Err(f) => {
                load.fail(run, &f);
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// One strategy's run: cluster, kube-proxy, (agent), loads, rolling update.
// ---------------------------------------------------------------------------

struct Release {
    pod: String,
    deleted_at: f64,
    prestop_secs: f64,
    prestop_note: String,
    release_secs: f64,
    killed: bool,
}

struct Outcome {
    strategy: Strategy,
    loads: Vec<Arc<Load>>,
    monitor: MonitorStats,
    /// When the Deployment was updated to v2, v3, ... (s since the loads started).
    updated_at: Vec<f64>,
    releases: Vec<Release>,
    timeline: Vec<(f64, String)>,
}

struct Bed {
    proxies: Vec<KubeProxy>,
    cluster: Cluster,
}

impl Bed {
    fn sync(&self, pods: &[String]) -> Result<()> {
        let ips: Vec<IpAddr> = pods
            .iter()
            .flat_map(|p| self.cluster.pod(p).ips())
            .collect();
        for p in &self.proxies {
            p.sync(&ips)?;
        }
        Ok(())
    }
}

fn run_strategy(cfg: &Config, strategy: Strategy) -> Result<Outcome> {
    let generations = plan(cfg.replacements, cfg.rollouts);
    // The Deployment's pods, then the same-node client's pod (last, so the
    // Deployment's pods keep their addresses).
    let layout: Vec<(&str, Node)> = generations
        .iter()
        .flatten()
        .map(|(p, node)| (p.as_str(), *node))
        .chain([(SAME_NODE_POD, Node::A)])
        .collect();
    let cluster = Cluster::build(&layout)?;
    let names: Vec<Vec<String>> = generations
        .iter()
        .map(|g| g.iter().map(|(p, _)| p.clone()).collect())
        .collect();
    let old = &names[0];
    let service = Service {
        namespace: "default".into(),
        name: "web".into(),
        cluster_ips: vec![VIP.into(), VIP_V6.parse()?],
        ports: vec![
            ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: HTTP_PORT,
                target_port: HTTP_TARGET,
                node_port: Some(HTTP_NODE_PORT),
            },
            ServicePort {
                name: "stream".into(),
                protocol: Protocol::Tcp,
                port: STREAM_PORT,
                target_port: STREAM_PORT,
                node_port: None,
            },
            ServicePort {
                name: "dns".into(),
                protocol: Protocol::Udp,
                port: UDP_PORT,
                target_port: UDP_TARGET,
                node_port: None,
            },
        ],
    };
    let proxies = vec![
        KubeProxy::start(
            cluster.node_a(),
            cfg.backend,
            &service,
            &[NODE_A_V4.into(), NODE_A_V6.into()],
        )?,
        KubeProxy::start(
            cluster.node_b(),
            cfg.backend,
            &service,
            &[NODE_B_V4.into(), NODE_B_V6.into()],
        )?,
    ];
    let bed = Bed { proxies, cluster };

    let agents = if strategy == Strategy::Conndrain {
        Some(Agents::start(cfg, &bed.cluster, &layout)?)
    } else {
        None
    };

    let apps: Mutex<HashMap<String, Arc<App>>> = Mutex::new(HashMap::new());
    for p in old {
        let app = App::start(bed.cluster.pod(p), FIRST_VERSION, cfg)?;
        apps.lock().expect("apps").insert(p.clone(), Arc::new(app));
    }
    let endpoints: Mutex<Vec<String>> = Mutex::new(old.clone());
    let monitor = Monitor::default();
    bed.sync(&endpoints.lock().expect("endpoints"))?;

    let shared = Shared {
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        released: Mutex::new(Vec::new()),
        timeline: Mutex::new(Vec::new()),
        seq: AtomicU64::new(0),
        updated_at: Mutex::new(Vec::new()),
        last_version: cfg.last_version(),
    };
    let keepalive = Load::new(
        "HTTP keep-alive (4 conns, 20 req/s each)",
        Counted::Requests,
    );
    let close = Load::new("HTTP Connection: close (2 x 20 req/s)", Counted::Requests);
    let slow = Load::new(
        "HTTP /slow, Connection: close (2 back to back)",
        Counted::Requests,
    );
    let streams = Load::new("TCP streams (3 at a time)", Counted::Sessions);
    let udp = Load::new("UDP sessions (3 at a time)", Counted::Sessions);
    let monitor_load = Load::new("seed 000 monitor (keep-alive, 5 req/s)", Counted::Monitor);
    let node_port = Load::new(NODE_PORT_LOAD, Counted::Apart);
    let same_node = Load::new(SAME_NODE_LOAD, Counted::Apart);
    let loads = vec![
        keepalive.clone(),
        close.clone(),
        slow.clone(),
        streams.clone(),
        udp.clone(),
        monitor_load.clone(),
        node_port.clone(),
        same_node.clone(),
    ];

    let mut releases = Vec::new();
    thread::scope(|scope| -> Result<()> {
        let client = bed.cluster.client();
        let same_node_ns = bed.cluster.pod(SAME_NODE_POD).ns();
        let vip_http = SocketAddr::new(VIP.into(), HTTP_PORT);
        let node_port_addr = SocketAddr::new(NODE_A_V4.into(), HTTP_NODE_PORT);
        macro_rules! spawn_load {
            ($body:expr) => {
                spawn_load!(client, $body)
            };
            ($ns:expr, $body:expr) => {{
                let ns = $ns;
                scope.spawn(move || {
                    if let Err(e) = enter(ns) {
                        eprintln!("rollout: {e:#}");
                        return;
                    }
                    $body;
                })
            }};
        }
        let mut handles = Vec::new();
        let sh = &shared;
        for _ in 0..4 {
            let l = keepalive.clone();
            handles.push(spawn_load!(keepalive_client(
                sh,
                &l,
                Duration::from_millis(50)
            )));
        }
        for _ in 0..2 {
            let l = close.clone();
            handles.push(spawn_load!(close_client(
                sh,
                &l,
                vip_http,
                "/fast",
                Duration::from_millis(50),
                CLIENT_TIMEOUT
            )));
            let l = slow.clone();
            let t = cfg.slow + CLIENT_TIMEOUT;
            handles.push(spawn_load!(close_client(
                sh,
                &l,
                vip_http,
                "/slow",
                Duration::ZERO,
                t
            )));
        }
        {
            let (l, m) = (monitor_load.clone(), &monitor);
            handles.push(spawn_load!(monitor_client(sh, &l, m)));
        }
        {
            let l = node_port.clone();
            handles.push(spawn_load!(close_client(
                sh,
                &l,
                node_port_addr,
                "/fast",
                NODE_PORT_INTERVAL,
                CLIENT_TIMEOUT
            )));
            let l = same_node.clone();
            handles.push(spawn_load!(same_node_ns, keepalive_client(sh, &l, SAME_NODE_INTERVAL)));
            let l = same_node.clone();
            handles.push(spawn_load!(
                same_node_ns,
                close_client(sh, &l, vip_http, "/fast", SAME_NODE_INTERVAL, CLIENT_TIMEOUT)
            ));
        }
        for i in 0..3 {
            let l = streams.clone();
            let life = cfg.session_life;
            handles.push(spawn_load!({
                thread::sleep(life / 3 * u32::try_from(i).unwrap_or(0));
                stream_client(sh, &l, life);
            }));
            let l = udp.clone();
            handles.push(spawn_load!({
                thread::sleep(life / 3 * u32::try_from(i).unwrap_or(0));
                udp_client(sh, &l, life, i);
            }));
        }
        let result = (|| -> Result<()> {
            conndrain_tests::sleep(Duration::from_secs(3))?;
            shared.event("loads running".into());
            let mut kubelets = Vec::new();
            for (version, pair) in (FIRST_VERSION + 1..).zip(names.windows(2)) {
                let [old, new] = pair else { unreachable!("windows(2)") };
                if version > FIRST_VERSION + 1 {
                    // Seed 000's redeployer: the next update once the last one's
                    // version answers (its old pods may still be terminating).
                    let seen = conndrain_tests::wait_until(
                        "the monitor to see the new version",
                        Duration::from_secs(30),
                        || Ok(monitor.has_answered(version - 1)),
                        |seen| *seen,
                    )
                    .is_ok();
                    check_interrupted()?;
                    shared.event(if seen {
                        format!("the monitor got answers from v{}: redeploying", version - 1)
                    } else {
                        format!("the monitor got no answer from v{} in 30s: redeploying anyway", version - 1)
                    });
                    conndrain_tests::sleep(Duration::from_secs(2))?;
                }
                shared.updated_at.lock().expect("updated_at").push(shared.since());
                shared.event(format!(
                    "Deployment updated from v{} to v{version}: the rolling update starts",
                    version - 1
                ));
                for (i, (o, nw)) in old.iter().zip(new).enumerate() {
                    if i > 0 {
                        conndrain_tests::sleep(cfg.step_gap)?;
                    }
                    // The new pod starts, becomes ready, and its endpoint reaches kube-proxy.
                    let app = App::start(bed.cluster.pod(nw), version, cfg)?;
                    apps.lock().expect("apps").insert(nw.clone(), Arc::new(app));
                    {
                        let mut eps = endpoints.lock().expect("endpoints");
                        eps.push(nw.clone());
                        bed.sync(&eps)?;
                    }
                    shared.event(format!("{nw} (v{version}) ready and in the endpoints"));
                    conndrain_tests::sleep(Duration::from_secs(1))?;
                    let app = apps.lock().expect("apps")[o].clone();
                    let (bed, eps, sh) = (&bed, &endpoints, &shared);
                    let clis = agents
                        .as_ref()
                        .map(|a| a.for_pod(bed.cluster.pod(o).node()));
                    let o = o.clone();
                    kubelets.push(scope.spawn(move || {
                        kubelet(cfg, strategy, bed, eps, sh, clis.as_deref(), &o, &app)
                    }));
                }
            }
            for k in kubelets {
                releases.push(
                    k.join()
                        .map_err(|_| anyhow::anyhow!("the kubelet thread panicked"))??,
                );
            }
            conndrain_tests::sleep(Duration::from_secs(2))?;
            Ok(())
        })();
        shared.stop.store(true, Ordering::SeqCst);
        for h in handles {
            let _ = h.join();
        }
        result
    })?;
    drop(apps);
    drop(agents);
    let timeline = shared.timeline.into_inner().expect("timeline");
    Ok(Outcome {
        strategy,
        loads,
        monitor: monitor.stats.into_inner().expect("monitor"),
        updated_at: shared.updated_at.into_inner().expect("updated_at"),
        releases,
        timeline,
    })
}

/// A pod's name and node.
type PodSpot = (String, Node);

/// The Deployment's pods, one generation per version: each replaces the one
/// before it index for index, on the same node: alternately node A and node
/// B, named by node (v1 a1, b1, a2; v2 a3, b2, a4; v3 a5, b3, a6; ...).
fn plan(replacements: usize, rollouts: usize) -> Vec<Vec<PodSpot>> {
    let nodes: Vec<Node> = (0..replacements)
        .map(|i| if i % 2 == 0 { Node::A } else { Node::B })
        .collect();
    let mut count = [0usize; 2];
    let mut name = |node: Node| {
        let (i, letter) = match node {
            Node::A => (0, 'a'),
            Node::B => (1, 'b'),
        };
        count[i] += 1;
        (format!("{letter}{}", count[i]), node)
    };
    (0..=rollouts)
        .map(|_| nodes.iter().map(|&n| name(n)).collect())
        .collect()
}

/// The node IP of `node`, where its pods' preStop hooks reach its agent.
fn node_ip(node: Node) -> Ipv4Addr {
    match node {
        Node::A => NODE_A_V4,
        Node::B => NODE_B_V4,
    }
}

/// conndrain on both nodes, standalone, told what Kubernetes mode would learn
/// from the API. Node A's agent has every pod: its own, and node B's, whose
/// flows node A's kube-proxy translates (so node A pins them). Node B's agent
/// has node B's pods: it tracks their flows and answers their preStop hooks.
struct Agents {
    a: Agent,
    b: Agent,
}

impl Agents {
    fn start(cfg: &Config, cluster: &Cluster, pods: &[(&str, Node)]) -> Result<Self> {
        let start = |node: Node| -> Result<Agent> {
            let ns = match node {
                Node::A => cluster.node_a(),
                Node::B => cluster.node_b(),
            };
            let mut agent = Agent::start(
                ns,
                &[
                    "--host-ip",
                    &node_ip(node).to_string(),
                    "--wait-port",
                    &WAIT_PORT.to_string(),
                    "--metrics-port",
                    &METRICS_PORT.to_string(),
                    "--udp-timeout",
                    &cfg.udp_timeout.to_string(),
                ],
            )?;
            agent.quiet_on_drop();
            Ok(agent)
        };
        let agents = Self {
            a: start(Node::A)?,
            b: start(Node::B)?,
        };
        for &(p, node) in pods {
            let [v4, v6] = cluster.pod(p).ips();
            let (v4, v6) = (v4.to_string(), v6.to_string());
            for cli in agents.for_pod(node) {
                cli.ok(&["pod", "add", p, "--ip", &v4, "--ip", &v6])?;
                cli.wait_pod(p, "attached to an interface", |s| !s.interfaces.is_empty())?;
            }
        }
        Ok(agents)
    }

    /// The agents that know a pod of `node`: its node's first.
    fn for_pod(&self, node: Node) -> Vec<Cli> {
        match node {
            Node::A => vec![self.a.cli()],
            Node::B => vec![self.b.cli(), self.a.cli()],
        }
    }
}

/// The simulated kubelet (and endpoints controller) for the deletion of `pod`.
/// `clis`: the agents told about it (conndrain only), the one of the pod's
/// node first.
#[allow(clippy::too_many_arguments)]
fn kubelet(
    cfg: &Config,
    strategy: Strategy,
    bed: &Bed,
    endpoints: &Mutex<Vec<String>>,
    sh: &Shared,
    clis: Option<&[Cli]>,
    pod: &str,
    app: &App,
) -> Result<Release> {
    let t0 = Instant::now();
    let deleted_at = sh.since();
    sh.event(format!(
        "kubectl delete pod {pod} (grace period {}s)",
        cfg.grace.as_secs()
    ));
    thread::scope(|s| -> Result<Release> {
        // The endpoints update, reaching kube-proxy after the propagation delay.
        let ep = s.spawn(|| -> Result<()> {
            conndrain_tests::sleep(cfg.propagation)?;
            let eps = {
                let mut eps = endpoints.lock().expect("endpoints");
                eps.retain(|p| p != pod);
                eps.clone()
            };
            bed.sync(&eps)?;
            let ip: IpAddr = bed.cluster.pod(pod).ipv4().into();
            let mut cleaned = 0;
            for p in &bed.proxies {
                cleaned += p.cleanup_udp_conntrack(ip)?;
            }
            sh.event(format!(
                "kube-proxy synced without {pod}; UDP conntrack cleanup deleted {cleaned} entries"
            ));
            Ok(())
        });
        // The agents learn of the deletion (Kubernetes mode: the pod's
        // deletionTimestamp on its node, its endpoint turning terminating on
        // the other).
        for cli in clis.unwrap_or_default() {
            let deadline = (cfg.grace.as_secs_f64() - DEADLINE_MARGIN).to_string();
            cli.ok(&[
                "pod",
                "terminate",
                pod,
                "--deadline",
                &deadline,
                "--quiet-period",
                &QUIET_PERIOD.to_string(),
            ])?;
        }
        if clis.is_some() {
            sh.event(format!(
                "conndrain: {pod} terminating on {} agent(s) (node A pins its established flows)",
                clis.map_or(0, <[Cli]>::len)
            ));
        }
        // preStop.
        let pre = Instant::now();
        let note = match strategy {
            Strategy::None => "returns at once".to_owned(),
            Strategy::Sleep => {
                conndrain_tests::sleep(Duration::from_secs(cfg.sleep_secs).min(cfg.grace))?;
                format!("slept {}s", cfg.sleep_secs)
            }
            Strategy::Conndrain => {
                let mut cmd = bed
                    .cluster
                    .pod(pod)
                    .ns()
                    .command(&conndrain_bin().to_string_lossy());
                cmd.args(["wait", "--fallback-sleep", &cfg.sleep_secs.to_string()])
                    .env("HOST_IP", node_ip(bed.cluster.pod(pod).node()).to_string())
                    .env("CONNDRAIN_WAIT_PORT", WAIT_PORT.to_string());
                let out = Running::spawn(cmd)?.wait_exit(cfg.grace)?;
                format!(
                    "conndrain wait exit {}: {}",
                    out.code,
                    out.all().trim().replace('\n', " ")
                )
            }
        };
        let prestop_secs = pre.elapsed().as_secs_f64();
        sh.event(format!(
            "{pod} preStop done after {prestop_secs:.2}s ({note}); SIGTERM"
        ));
        app.sigterm();
        let kill_at = t0 + cfg.grace;
        let mut killed = false;
        while !app.ended() {
            if Instant::now() >= kill_at && !killed {
                app.sigkill();
                killed = true;
                sh.event(format!("{pod}: grace period over, SIGKILL"));
            }
            thread::sleep(Duration::from_millis(5));
        }
        let release_secs = t0.elapsed().as_secs_f64();
        sh.released.lock().expect("released").push(app.name.clone());
        sh.event(format!(
            "{pod} released (app ended) {release_secs:.2}s after deletion"
        ));
        for cli in clis.unwrap_or_default() {
            cli.ok(&["pod", "remove", pod])?;
        }
        ep.join()
            .map_err(|_| anyhow::anyhow!("the endpoints thread panicked"))??;
        Ok(Release {
            pod: pod.to_owned(),
            deleted_at,
            prestop_secs,
            prestop_note: note,
            release_secs,
            killed,
        })
    })
}

// ---------------------------------------------------------------------------
// Tables.
// ---------------------------------------------------------------------------

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    v[i as usize]
}

impl Outcome {
    fn print(&self, cfg: &Config) {
        println!("timeline (s since the loads started):");
        for (t, e) in &self.timeline {
            println!("  {t:6.2}  {e}");
        }
        println!();
        println!(
            "  {:<48} {:>7} {:>6} {:>8} {:>6} {:>8} {:>6} {:>6} {:>6}",
            "load", "sent", "failed", "refused", "reset", "timeout", "wrong", "closed", "moved"
        );
        for l in &self.loads {
            let t = l.tally.lock().expect("tally");
            let k = |k: Kind| t.failed.get(&k).copied().unwrap_or(0);
            let failed: u64 = t.failed.values().sum();
            println!(
                "  {:<48} {:>7} {:>6} {:>8} {:>6} {:>8} {:>6} {:>6} {:>6}{}",
                l.name,
                t.sent,
                failed,
                k(Kind::Refused),
                k(Kind::Reset),
                k(Kind::Timeout),
                k(Kind::WrongVersion),
                k(Kind::ClosedByServer),
                k(Kind::Moved),
                if k(Kind::Other) > 0 {
                    format!("  (+{} other)", k(Kind::Other))
                } else {
                    String::new()
                }
            );
        }
        println!("  (for streams and UDP sessions: sent = opened, failed = broken)");
        println!("  {}", self.monitor_line());
        for l in &self.loads {
            let t = l.tally.lock().expect("tally");
            for s in &t.samples {
                println!(
                    "    e.g. {}: {s}",
                    l.name.split(" (").next().unwrap_or(l.name)
                );
            }
        }
        for r in &self.releases {
            println!(
                "  {} deleted at {:.2}s: preStop {:.2}s ({}), released {:.2}s after deletion{}",
                r.pod,
                r.deleted_at,
                r.prestop_secs,
                r.prestop_note,
                r.release_secs,
                if r.killed {
                    " (SIGKILL at the grace period)"
                } else {
                    ""
                }
            );
        }
        let _ = cfg;
    }

    fn requests(&self) -> (u64, BTreeMap<Kind, u64>) {
        let mut sent = 0;
        let mut failed = BTreeMap::new();
        for l in self.loads.iter().filter(|l| l.counted == Counted::Requests) {
            let t = l.tally.lock().expect("tally");
            sent += t.sent;
            for (k, v) in &t.failed {
                *failed.entry(*k).or_insert(0) += v;
            }
        }
        (sent, failed)
    }

    /// Seed 000's monitor: (requests sent, failed).
    fn monitor_counts(&self) -> (u64, u64) {
        self.counts(|l| l.counted == Counted::Monitor)
    }

    fn monitor_line(&self) -> String {
        let m = &self.monitor;
        let (sent, failed) = self.monitor_counts();
        let mut line = format!(
            "seed 000 monitor: {sent} requests, {failed} without a good answer in {} gap(s); longest time \
             without a good answer {:.1}s",
            m.gaps, m.longest_gap,
        );
        for (version, &at) in (FIRST_VERSION + 1..).zip(&self.updated_at) {
            let after = |t: Option<f64>| t.map_or_else(|| "never".to_owned(), |t| format!("{:.1}s", t - at));
            let _ = write!(
                line,
                "; update to v{version}: v{version} first answered {} after it, v{} last answered {} after it",
                after(m.answered.get(&version).map(|a| a.0)),
                version - 1,
                after(m.answered.get(&(version - 1)).map(|a| a.1)),
            );
        }
        line
    }

    /// Streams or sessions of the loads named `name_start...`: (opened, broken).
    fn sessions(&self, name_start: &str) -> (u64, u64) {
        self.counts(|l| l.name.starts_with(name_start))
    }

    /// (sent, failed) over the loads that `pick` picks.
    fn counts(&self, pick: impl Fn(&Load) -> bool) -> (u64, u64) {
        self.loads
            .iter()
            .filter(|l| pick(l))
            .map(|l| {
                let t = l.tally.lock().expect("tally");
                (t.sent, t.failed.values().sum::<u64>())
            })
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }
}

fn summary(cfg: &Config, results: &[Outcome]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| strategy | requests sent | failed | refused | reset | timeout | wrong version | streams broken | UDP sessions broken | NodePort (masqueraded) failed | same-node pod failed | seed 000 monitor failed | monitor's longest gap | release p50 | release max |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in results {
        let (sent, failed) = r.requests();
        let k = |k: Kind| failed.get(&k).copied().unwrap_or(0);
        let total: u64 = failed.values().sum();
        let (so, sb) = r.sessions("TCP streams");
        let (uo, ub) = r.sessions("UDP sessions");
        let (ms, mf) = r.monitor_counts();
        let (ns, nf) = r.counts(|l| l.name == NODE_PORT_LOAD);
        let (ss, sf) = r.counts(|l| l.name == SAME_NODE_LOAD);
        let rel: Vec<f64> = r.releases.iter().map(|x| x.release_secs).collect();
        let _ = writeln!(
            out,
            "| {} | {sent} | {total} | {} | {} | {} | {} | {sb}/{so} | {ub}/{uo} | {nf}/{ns} | {sf}/{ss} | {mf}/{ms} | {:.1}s | {:.1}s | {:.1}s |",
            r.strategy.label(cfg),
            k(Kind::Refused),
            k(Kind::Reset),
            k(Kind::Timeout),
            k(Kind::WrongVersion),
            r.monitor.longest_gap,
            pct(rel.clone(), 0.5),
            pct(rel, 1.0),
        );
    }
    let _ = writeln!(
        out,
        "\nRelease: from `kubectl delete pod` to the pod's app ending (preStop + graceful shutdown), \
         over {} pod(s) per strategy ({} rolling update(s) of {} pod(s), v{FIRST_VERSION} to v{}). Failed requests are HTTP requests (keep-alive, Connection: close, /slow) \
         from the client through the cluster IP; \
         a stream or UDP session is broken if it could not be opened, failed, or was answered by another pod. \
         The NodePort client (one Connection: close request every {} ms to node A's NodePort, masqueraded to a node A \
         address whichever node the pod is on) and the same-node client (a pod on node A, not an endpoint, calling the \
         cluster IP with a pooled keep-alive connection and with Connection: close, a request every {} ms each) \
         are counted apart: failed/sent HTTP requests. \
         Seed 000's monitor is counted apart: a pooled keep-alive client, like the seed's Go `http.Client`, \
         numbering its requests 1, 2, 3, ... every {} ms; a request fails unless its answer echoes its number, \
         comes from a pod not yet released and carries a version the Deployment has had. \
         Its longest gap is the longest time it went without a good answer (one interval plus a round trip \
         when nothing fails).",
        cfg.replacements * cfg.rollouts,
        cfg.rollouts,
        cfg.replacements,
        cfg.last_version(),
        NODE_PORT_INTERVAL.as_millis(),
        SAME_NODE_INTERVAL.as_millis(),
        MONITOR_INTERVAL.as_millis()
    );
    out
}
