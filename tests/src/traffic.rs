//! Traffic between the namespaces: a line-based TCP server ("HTTP-ish": `GET
//! /fast`, `GET /slow`, anything else is echoed), client connections that stay
//! open until closed or dropped, a UDP echo server and client, and a repeater
//! for keep-alive traffic.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{Netns, run_in};

/// No blocking call of a test may hang forever.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `GET /slow` takes (seed 001's /slow endpoint, shortened).
const SLOW: Duration = Duration::from_secs(2);

/// A TCP server in a namespace. Each connection gets a thread that answers
/// line by line and closes its side as soon as the client closes (so both
/// FINs are seen). Dropping the server stops accepting and closes every
/// connection it still has.
pub struct TcpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpServer {
    /// Listens on `addr` inside `ns`; port 0 picks a free one (see [`addr`](Self::addr)).
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let listener = run_in(ns, || TcpListener::bind(addr))?
            .with_context(|| format!("binding a TCP server to {addr} in {}", ns.name()))?;
        let addr = listener.local_addr()?;
        // Non-blocking accept so the acceptor can notice `stop`.
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let conns = Arc::new(Mutex::new(HashMap::new()));
        let acceptor = {
            let (stop, accepted, conns) = (stop.clone(), accepted.clone(), conns.clone());
            thread::Builder::new()
                .name(format!("accept {addr}"))
                .spawn(move || accept_loop(&listener, &stop, &accepted, &conns))?
        };
        Ok(Self {
            addr,
            stop,
            accepted,
            conns,
            acceptor: Some(acceptor),
        })
    }

    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    #[must_use]
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections the server still has open.
    #[must_use]
    pub fn open(&self) -> usize {
        self.conns.lock().expect("server connections lock").len()
    }

    /// Closes every open connection from the server's side (FIN to the clients).
    pub fn close_all(&self) {
        for (_, stream) in self.conns.lock().expect("server connections lock").drain() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    accepted: &AtomicU64,
    conns: &Arc<Mutex<HashMap<u64, TcpStream>>>,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let id = accepted.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_nonblocking(false);
                let Ok(clone) = stream.try_clone() else {
                    continue;
                };
                conns
                    .lock()
                    .expect("server connections lock")
                    .insert(id, clone);
                let conns = conns.clone();
                let _ = thread::Builder::new()
                    .name(format!("serve {id}"))
                    .spawn(move || {
                        serve(&stream);
                        // Close our side whatever other handles exist.
                        let _ = stream.shutdown(Shutdown::Both);
                        conns.lock().expect("server connections lock").remove(&id);
                    });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(10)),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("testbed: accept: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Answers lines until the client closes (or the server shuts the socket).
fn serve(stream: &TcpStream) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let request = line.trim_end();
        let reply = match request.strip_prefix("GET ") {
            Some("/slow") => {
                thread::sleep(SLOW);
                "200 /slow".to_owned()
            }
            // A handler that takes N seconds (a report, a long poll).
            Some(path) if path.starts_with("/sleep/") => {
                let secs: u64 = path["/sleep/".len()..].parse().unwrap_or(1);
                thread::sleep(Duration::from_secs(secs));
                format!("200 {path}")
            }
            Some(path) => format!("200 {path}"),
            None => request.to_owned(),
        };
        if writer.write_all(format!("{reply}\n").as_bytes()).is_err() {
            return;
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        self.close_all();
    }
}

/// A client TCP connection, made in some namespace. It stays open until
/// [`close`](Self::close)d or dropped.
#[derive(Debug)]
pub struct TcpConn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl TcpConn {
    /// Connects from `ns` to `to`, then does one request/reply so that the
    /// server has accepted it and traffic has gone both ways.
    pub fn connect(ns: &Netns, to: SocketAddr) -> Result<Self> {
        let stream = run_in(ns, || TcpStream::connect_timeout(&to, IO_TIMEOUT))?
            .with_context(|| format!("connecting from {} to {to}", ns.name()))?;
        let mut conn = Self::from_stream(stream)?;
        conn.request("ping")
            .with_context(|| format!("first round trip from {} to {to}", ns.name()))?;
        Ok(conn)
    }

    /// `n` connections from `ns` to `to`.
    pub fn connect_many(ns: &Netns, to: SocketAddr, n: usize) -> Result<Vec<Self>> {
        (0..n).map(|_| Self::connect(ns, to)).collect()
    }

    fn from_stream(stream: TcpStream) -> Result<Self> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    /// Sends one line and returns the reply line (without the newline).
    pub fn request(&mut self, line: &str) -> Result<String> {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .with_context(|| format!("sending {line:?} to {}", self.peer()))?;
        let mut reply = String::new();
        let n = self
            .reader
            .read_line(&mut reply)
            .with_context(|| format!("reading the reply to {line:?} from {}", self.peer()))?;
        if n == 0 {
            bail!(
                "{} closed the connection instead of answering {line:?}",
                self.peer()
            );
        }
        Ok(reply.trim_end().to_owned())
    }

    /// Sends one line without waiting for the reply (a request in flight).
    pub fn send(&mut self, line: &str) -> Result<()> {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .with_context(|| format!("sending {line:?} to {}", self.peer()))
    }

    /// Reads one reply line (after [`send`](Self::send)).
    pub fn reply(&mut self) -> Result<String> {
        let mut reply = String::new();
        self.reader
            .read_line(&mut reply)
            .with_context(|| format!("reading a reply from {}", self.peer()))?;
        Ok(reply.trim_end().to_owned())
    }

    /// Our end: from the pod's point of view, the peer address.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.stream
            .local_addr()
            .expect("a connected socket has a local address")
    }

    #[must_use]
    pub fn peer_addr(&self) -> SocketAddr {
        self.stream
            .peer_addr()
            .expect("a connected socket has a peer address")
    }

    fn peer(&self) -> String {
        self.stream
            .peer_addr()
            .map_or_else(|_| "the server".to_owned(), |a| a.to_string())
    }

    /// Closes gracefully: our FIN, then waits for the server's FIN, so the flow
    /// has seen both and is closed when this returns.
    pub fn close(mut self) -> Result<()> {
        let peer = self.peer();
        self.stream
            .shutdown(Shutdown::Write)
            .with_context(|| format!("closing the connection to {peer}"))?;
        let mut rest = Vec::new();
        self.reader
            .read_to_end(&mut rest)
            .with_context(|| format!("waiting for {peer} to close its side"))?;
        Ok(())
    }

    /// Aborts with a RST (`SO_LINGER` 0), like a client that crashes.
    pub fn reset(self) -> Result<()> {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket fd and a properly sized linger struct.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&self.stream),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                libc::socklen_t::try_from(size_of::<libc::linger>()).expect("small"),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("setting SO_LINGER 0");
        }
        Ok(()) // Dropping both handles closes the socket with a RST.
    }
}

/// A UDP echo server in a namespace; stops on drop.
pub struct UdpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl UdpServer {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Self> {
        let socket = run_in(ns, || UdpSocket::bind(addr))?
            .with_context(|| format!("binding a UDP server to {addr} in {}", ns.name()))?;
        let addr = socket.local_addr()?;
        // A short timeout so the thread notices `stop`.
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, received) = (stop.clone(), received.clone());
            thread::Builder::new()
                .name(format!("udp {addr}"))
                .spawn(move || {
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::SeqCst) {
                        if let Ok((n, from)) = socket.recv_from(&mut buf) {
                            received.fetch_add(1, Ordering::SeqCst);
                            let _ = socket.send_to(&buf[..n], from);
                        }
                    }
                })?
        };
        Ok(Self {
            addr,
            stop,
            received,
            thread: Some(thread),
        })
    }

    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams received so far.
    #[must_use]
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connected UDP socket in a namespace: one 5-tuple, so one flow.
#[derive(Debug)]
pub struct UdpClient {
    socket: UdpSocket,
}

impl UdpClient {
    pub fn connect(ns: &Netns, to: SocketAddr) -> Result<Self> {
        let socket = run_in(ns, || -> std::io::Result<UdpSocket> {
            let any: SocketAddr = if to.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = UdpSocket::bind(any)?;
            socket.connect(to)?;
            Ok(socket)
        })?
        .with_context(|| format!("making a UDP socket in {} for {to}", ns.name()))?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(Self { socket })
    }

    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.socket
            .local_addr()
            .expect("a bound socket has a local address")
    }

    /// Sends `payload` and waits for the echo; resends a few times (UDP).
    pub fn echo(&self, payload: &[u8]) -> Result<()> {
        let mut buf = [0u8; 2048];
        let mut last = None;
        for _ in 0..5 {
            self.socket.send(payload).context("sending a datagram")?;
            match self.socket.recv(&mut buf) {
                Ok(n) if &buf[..n] == payload => return Ok(()),
                Ok(_) => last = Some(anyhow!("a datagram with other content came back")),
                Err(e) => last = Some(anyhow!(e)),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no echo"))).context("waiting for the UDP echo")
    }
}

/// Runs `f` every `interval` on a thread until stopped or dropped; whatever
/// `f` owns (a connection, say) is dropped with it. Keep-alive traffic.
pub struct Repeat {
    stop: Arc<AtomicBool>,
    runs: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Repeat {
    pub fn every(interval: Duration, mut f: impl FnMut() -> Result<()> + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let runs = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, runs) = (stop.clone(), runs.clone());
            thread::spawn(move || -> Result<()> {
                while !stop.load(Ordering::SeqCst) {
                    f()?;
                    runs.fetch_add(1, Ordering::SeqCst);
                    // Sleep in small steps so stop() returns promptly.
                    let mut slept = Duration::ZERO;
                    while slept < interval && !stop.load(Ordering::SeqCst) {
                        let nap = interval
                            .saturating_sub(slept)
                            .min(Duration::from_millis(20));
                        thread::sleep(nap);
                        slept += nap;
                    }
                }
                Ok(())
            })
        };
        Self {
            stop,
            runs,
            thread: Some(thread),
        }
    }

    /// Times `f` has run successfully.
    #[must_use]
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }

    /// Stops, drops `f`, and returns its first error, if any.
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(anyhow!("the repeating thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Repeat {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            eprintln!("testbed: repeated traffic failed: {e:#}");
        }
    }
}
