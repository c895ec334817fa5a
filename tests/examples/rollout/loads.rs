//! The loads, in the client namespace, through the `ClusterIP`.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use conndrain_tests::check_interrupted;

use crate::{
    CLIENT_TIMEOUT, FIRST_VERSION, HTTP_PORT, MONITOR_INTERVAL, MONITOR_TIMEOUT, STREAM_PORT, UDP_PORT, VIP, app::find,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
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
pub struct Tally {
    /// Requests sent (HTTP), or streams/sessions opened.
    pub sent: u64,
    ok: u64,
    pub failed: BTreeMap<Kind, u64>,
    pub samples: Vec<String>,
}

/// How a load is counted in the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
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

pub struct Load {
    pub name: &'static str,
    pub counted: Counted,
    pub tally: Mutex<Tally>,
}

impl Load {
    pub fn new(name: &'static str, counted: Counted) -> Arc<Self> {
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
pub struct Shared {
    pub t0: Instant,
    pub stop: AtomicBool,
    /// Pods whose app has ended: an answer from one is a wrong version.
    pub released: Mutex<Vec<String>>,
    pub timeline: Mutex<Vec<(f64, String)>>,
    pub seq: AtomicU64,
    /// When the Deployment was updated to each new version (s since `t0`).
    pub updated_at: Mutex<Vec<f64>>,
    /// The last version the Deployment will have: answers carry v1 to this.
    pub last_version: u32,
}

impl Shared {
    pub fn since(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
    pub fn event(&self, what: String) {
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
pub fn enter(ns: &conndrain_tests::Netns) -> Result<()> {
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
pub fn keepalive_client(run: &Shared, load: &Load, interval: Duration) {
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
pub struct MonitorStats {
    /// When the last good answer came (s since the loads started).
    last_good: Option<f64>,
    /// The longest time between two good answers (or from the last one to
    /// the end): what the monitor's user sees as an outage.
    pub longest_gap: f64,
    /// Runs of consecutive requests without a good answer.
    pub gaps: u64,
    in_gap: bool,
    /// Per version: when it answered first and last.
    pub answered: BTreeMap<u32, (f64, f64)>,
}

#[derive(Default)]
pub struct Monitor {
    pub stats: Mutex<MonitorStats>,
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

    pub fn has_answered(&self, version: u32) -> bool {
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
pub fn monitor_client(run: &Shared, load: &Load, mon: &Monitor) {
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
pub fn close_client(run: &Shared, load: &Load, to: SocketAddr, path: &str, interval: Duration, timeout: Duration) {
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
pub fn stream_client(run: &Shared, load: &Load, life: Duration) {
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
pub fn udp_client(run: &Shared, load: &Load, life: Duration, id: usize) {
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
