//! The application: servers in pods that say who they are, and a client that
//! keeps talking to a Service and notes who answered.
//!
//! Protocols (one line or datagram each way):
//! - TCP: the client sends `<seq>\n`, the server answers `<pod>:<seq>\n`;
//! - UDP: the client sends `<session>:<seq>`, the server answers
//!   `<pod>:<session>:<seq>`. A long session id makes datagrams larger than
//!   the MTU both ways, which the sender fragments.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::ClusterPod;
use crate::{Netns, run_in};

/// How long the client waits for an answer before it calls the flow broken.
/// Generous: the machines are small, and a healthy answer takes a millisecond.
pub const NO_REPLY: Duration = Duration::from_secs(3);
/// The client's pace: one request (and one answer) every 100 ms.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// A TCP and a UDP server in a pod, on the pod's IPv4 and IPv6 addresses,
/// answering with the pod's name. Stops on drop (closing its connections).
pub struct PodApp {
    name: String,
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<BTreeSet<SocketAddr>>>,
    threads: Vec<JoinHandle<()>>,
}

impl PodApp {
    /// Serves TCP on `tcp_port` and UDP on `udp_port` in `pod`.
    pub fn start(pod: &ClusterPod, tcp_port: u16, udp_port: u16) -> Result<Self> {
        let mut app = Self {
            name: pod.name().to_owned(),
            stop: Arc::new(AtomicBool::new(false)),
            peers: Arc::new(Mutex::new(BTreeSet::new())),
            threads: Vec::new(),
        };
        for ip in pod.ips() {
            let addr = SocketAddr::new(ip, tcp_port);
            let listener = run_in(pod.ns(), || TcpListener::bind(addr))?
                .with_context(|| format!("binding TCP {addr} in pod {}", pod.name()))?;
            listener.set_nonblocking(true)?;
            let (name, stop, peers) = (app.name.clone(), app.stop.clone(), app.peers.clone());
            app.threads.push(
                thread::Builder::new()
                    .name(format!("tcp {addr}"))
                    .spawn(move || accept_loop(&listener, &name, &stop, &peers))?,
            );
            let addr = SocketAddr::new(ip, udp_port);
            let socket = run_in(pod.ns(), || UdpSocket::bind(addr))?
                .with_context(|| format!("binding UDP {addr} in pod {}", pod.name()))?;
            socket.set_read_timeout(Some(Duration::from_millis(50)))?;
            let (name, stop, peers) = (app.name.clone(), app.stop.clone(), app.peers.clone());
            app.threads.push(
                thread::Builder::new()
                    .name(format!("udp {addr}"))
                    .spawn(move || udp_loop(&socket, &name, &stop, &peers))?,
            );
        }
        Ok(app)
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every peer address (TCP connection or UDP sender) the pod has seen:
    /// shows whether a flow arrived with the client's address or masqueraded.
    #[must_use]
    pub fn peers(&self) -> BTreeSet<SocketAddr> {
        self.peers.lock().expect("peers lock").clone()
    }
}

impl Drop for PodApp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    name: &str,
    stop: &Arc<AtomicBool>,
    peers: &Arc<Mutex<BTreeSet<SocketAddr>>>,
) {
    let mut conns = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                peers.lock().expect("peers lock").insert(peer);
                let (name, stop) = (name.to_owned(), stop.clone());
                if let Ok(t) = thread::Builder::new()
                    .name(format!("conn {peer}"))
                    .spawn(move || serve_tcp(stream, &name, &stop))
                {
                    conns.push(t);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(20)),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
    for t in conns {
        let _ = t.join();
    }
}

/// Answers each line `<seq>` with `<pod>:<seq>` until the peer closes, the
/// connection fails, or the app stops.
fn serve_tcp(stream: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with('\n') => {
                let answer = format!("{name}:{}\n", line.trim_end());
                line.clear();
                if writer.write_all(answer.as_bytes()).is_err() {
                    return;
                }
            }
            // A partial line: keep reading.
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

fn udp_loop(
    socket: &UdpSocket,
    name: &str,
    stop: &AtomicBool,
    peers: &Arc<Mutex<BTreeSet<SocketAddr>>>,
) {
    // Room for the largest datagram: sessions may pad their requests past
    // the MTU (fragmented datagrams), and the answer echoes the request.
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::SeqCst) {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            peers.lock().expect("peers lock").insert(from);
            let request = String::from_utf8_lossy(&buf[..n]);
            let _ = socket.send_to(format!("{name}:{request}").as_bytes(), from);
        }
    }
}

/// What one request of a [`Conversation`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// An answer, from this pod.
    Pod(String),
    /// No answer: the connection was reset, closed, or nothing came back in
    /// time. The text says which.
    Failed(String),
}

/// A client flow to a Service that sends a request every 100 ms on its own
/// thread and records who answered: one TCP connection or one UDP 5-tuple
/// (a "session") for its whole life. A TCP conversation ends at its first
/// failure (the connection is gone); a UDP one keeps going.
pub struct Conversation {
    /// The pod that answered the first request.
    first: String,
    local: SocketAddr,
    log: Arc<Mutex<Vec<Reply>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Conversation {
    /// Opens a TCP connection from `client` to `to`, and starts talking once
    /// the first answer came.
    pub fn tcp(client: &Netns, to: SocketAddr) -> Result<Self> {
        let (local, exchange) = tcp_exchange(client, to)?;
        Self::start(local, to, true, exchange)
    }

    /// Like [`Conversation::tcp`], from the local address `local` (a client
    /// port used before, to reuse a flow's tuple).
    pub fn tcp_from(client: &Netns, local: SocketAddr, to: SocketAddr) -> Result<Self> {
        let connect = || -> std::io::Result<TcpStream> {
            let sock = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None)?;
            sock.set_reuse_address(true)?;
            sock.bind(&local.into())?;
            sock.connect_timeout(&to.into(), NO_REPLY)?;
            Ok(sock.into())
        };
        let stream = run_in(client, connect)?.with_context(|| format!("connecting to {to} from {local}"))?;
        let (local, exchange) = tcp_exchange_on(stream)?;
        Self::start(local, to, true, exchange)
    }

    /// Opens a UDP session (a connected socket, so one 5-tuple) from `client`
    /// to `to` with session id `session`, and starts talking once the first
    /// answer came. A request is sent up to three times, a second apart,
    /// before it counts as unanswered.
    pub fn udp(client: &Netns, to: SocketAddr, session: &str) -> Result<Self> {
        let (local, exchange) = udp_exchange(client, to, session)?;
        Self::start(local, to, false, exchange)
    }

    /// Opens conversations (TCP, or UDP with session id `udp_session`) until
    /// one lands on pod `want`. Load balancing is random, so this takes a few
    /// tries; the flows that landed elsewhere are closed.
    pub fn landing_on(
        client: &Netns,
        to: SocketAddr,
        udp_session: Option<&str>,
        want: &str,
    ) -> Result<Self> {
        let mut seen = BTreeSet::new();
        for _ in 0..100 {
            let (local, mut exchange) = open(client, to, udp_session)?;
            match exchange() {
                Reply::Pod(p) if p == want => {
                    return Ok(Self::run(p, local, udp_session.is_none(), exchange));
                }
                Reply::Pod(p) => {
                    seen.insert(p);
                }
                Reply::Failed(e) => bail!("the first request to {to} failed: {e}"),
            }
        }
        bail!("100 flows to {to} never landed on {want}; they landed on {seen:?}")
    }

    /// Opens a flow (TCP, or UDP with session id `udp_session`), makes one
    /// request, closes it, and returns the pod that answered.
    pub fn probe(client: &Netns, to: SocketAddr, udp_session: Option<&str>) -> Result<String> {
        let (_, mut exchange) = open(client, to, udp_session)?;
        match exchange() {
            Reply::Pod(p) => Ok(p),
            Reply::Failed(e) => bail!("a request to {to} failed: {e}"),
        }
    }

    fn start(
        local: SocketAddr,
        to: SocketAddr,
        stop_at_failure: bool,
        mut exchange: impl FnMut() -> Reply + Send + 'static,
    ) -> Result<Self> {
        match exchange() {
            Reply::Pod(p) => Ok(Self::run(p, local, stop_at_failure, exchange)),
            Reply::Failed(e) => bail!("the first request to {to} failed: {e}"),
        }
    }

    fn run(
        first: String,
        local: SocketAddr,
        stop_at_failure: bool,
        mut exchange: impl FnMut() -> Reply + Send + 'static,
    ) -> Self {
        let log = Arc::new(Mutex::new(vec![Reply::Pod(first.clone())]));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (log, stop) = (log.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    thread::sleep(INTERVAL);
                    let reply = exchange();
                    let failed = matches!(reply, Reply::Failed(_));
                    log.lock().expect("conversation log").push(reply);
                    if failed && stop_at_failure {
                        return;
                    }
                }
            })
        };
        Self {
            first,
            local,
            log,
            stop,
            thread: Some(thread),
        }
    }

    /// The pod that answered first.
    #[must_use]
    pub fn pod(&self) -> &str {
        &self.first
    }

    /// The client's end of the flow.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Every reply so far, in order.
    #[must_use]
    pub fn replies(&self) -> Vec<Reply> {
        self.log.lock().expect("conversation log").clone()
    }

    /// The first reply that is not an answer from the first pod, if one comes
    /// within `timeout`: the flow broke (a failure) or moved (another pod).
    /// `None` means every reply in that time came from the first pod.
    #[must_use]
    pub fn wait_break(&self, timeout: Duration) -> Option<Reply> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(r) = self.first_break() {
                return Some(r);
            }
            if Instant::now() >= end {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fails unless at least `n` more replies come, all from the first pod.
    pub fn expect_steady(&self, n: usize) -> Result<()> {
        let start = self.replies().len();
        // Each reply takes INTERVAL plus a round trip; allow a lot more.
        let budget = INTERVAL * u32::try_from(n).unwrap_or(u32::MAX) * 5 + NO_REPLY * 2;
        let end = Instant::now() + budget;
        loop {
            if let Some(r) = self.first_break() {
                bail!(
                    "the flow from {} to pod {} broke: {r:?} (replies: {:?})",
                    self.local,
                    self.first,
                    self.replies()
                );
            }
            if self.replies().len() >= start + n {
                return Ok(());
            }
            if Instant::now() >= end {
                bail!(
                    "fewer than {n} replies in {budget:?} from pod {} (replies: {:?})",
                    self.first,
                    self.replies()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn first_break(&self) -> Option<Reply> {
        self.log
            .lock()
            .expect("conversation log")
            .iter()
            .find(|r| **r != Reply::Pod(self.first.clone()))
            .cloned()
    }
}

impl Drop for Conversation {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Exchange = Box<dyn FnMut() -> Reply + Send>;

fn open(
    client: &Netns,
    to: SocketAddr,
    udp_session: Option<&str>,
) -> Result<(SocketAddr, Exchange)> {
    if let Some(s) = udp_session {
        let (local, x) = udp_exchange(client, to, s)?;
        Ok((local, Box::new(x)))
    } else {
        let (local, x) = tcp_exchange(client, to)?;
        Ok((local, Box::new(x)))
    }
}

/// A TCP connection from `client` to `to`, and the request/answer step on it.
fn tcp_exchange(
    client: &Netns,
    to: SocketAddr,
) -> Result<(SocketAddr, impl FnMut() -> Reply + Send + 'static)> {
    let stream = run_in(client, || TcpStream::connect_timeout(&to, NO_REPLY))?
        .with_context(|| format!("connecting to {to} from {}", client.name()))?;
    tcp_exchange_on(stream)
}

/// The request/answer step over a connected `stream`.
fn tcp_exchange_on(stream: TcpStream) -> Result<(SocketAddr, impl FnMut() -> Reply + Send + 'static)> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(NO_REPLY))?;
    stream.set_write_timeout(Some(NO_REPLY))?;
    let local = stream.local_addr()?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut seq = 0u64;
    Ok((local, move || -> Reply {
        seq += 1;
        if let Err(e) = writer.write_all(format!("{seq}\n").as_bytes()) {
            return Reply::Failed(describe(&e));
        }
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => Reply::Failed("connection closed by the peer (FIN)".into()),
            Ok(_) => match line.trim_end().rsplit_once(':') {
                Some((pod, s)) if s == seq.to_string() => Reply::Pod(pod.to_owned()),
                _ => Reply::Failed(format!("unexpected answer {line:?} to {seq}")),
            },
            Err(e) => Reply::Failed(describe(&e)),
        }
    }))
}

/// A connected UDP socket from `client` to `to`, and the request/answer step
/// on it (three tries, [`NO_REPLY`] in all).
fn udp_exchange(
    client: &Netns,
    to: SocketAddr,
    session: &str,
) -> Result<(SocketAddr, impl FnMut() -> Reply + Send + 'static)> {
    let socket = run_in(client, || -> std::io::Result<UdpSocket> {
        let any: SocketAddr = if to.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(any)?;
        socket.connect(to)?;
        Ok(socket)
    })?
    .with_context(|| format!("making a UDP socket for {to} in {}", client.name()))?;
    let attempt = NO_REPLY / 3;
    socket.set_read_timeout(Some(attempt))?;
    let local = socket.local_addr()?;
    let session = session.to_owned();
    let mut seq = 0u64;
    Ok((local, move || -> Reply {
        seq += 1;
        let tail = format!(":{session}:{seq}");
        let mut buf = vec![0u8; 65_536];
        let mut last = String::from("no answer");
        for _ in 0..3 {
            if let Err(e) = socket.send(format!("{session}:{seq}").as_bytes()) {
                last = describe(&e);
                continue;
            }
            let deadline = Instant::now() + attempt;
            while Instant::now() < deadline {
                match socket.recv(&mut buf) {
                    Ok(n) => {
                        // Late answers to earlier requests are skipped.
                        let answer = String::from_utf8_lossy(&buf[..n]);
                        if let Some(pod) = answer.strip_suffix(&tail) {
                            return Reply::Pod(pod.to_owned());
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        break;
                    }
                    Err(e) => {
                        last = describe(&e);
                        break;
                    }
                }
            }
        }
        Reply::Failed(format!("{last} (3 tries in {NO_REPLY:?})"))
    }))
}

fn describe(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionReset => "connection reset (RST)".into(),
        ErrorKind::ConnectionRefused => "connection refused".into(),
        ErrorKind::BrokenPipe => "broken pipe (the connection was reset)".into(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut => format!("no answer within {NO_REPLY:?}"),
        _ => e.to_string(),
    }
}
