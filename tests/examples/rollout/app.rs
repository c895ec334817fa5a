//! The app: HTTP/1.1 (`/fast`, `/slow`), a line stream, UDP; each answer says
//! `<pod> v<version> <seq>`.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use conndrain_tests::{kubeproxy::ClusterPod, run_in};

use crate::{Config, HTTP_TARGET, STREAM_PORT, UDP_TARGET};

pub struct App {
    pub name: String,
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
    pub fn start(pod: &ClusterPod, version: u32, cfg: &Config) -> Result<Self> {
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

    pub fn sigterm(&self) {
        self.term.store(true, Ordering::SeqCst);
    }
    pub fn sigkill(&self) {
        self.term.store(true, Ordering::SeqCst);
        self.kill.store(true, Ordering::SeqCst);
    }
    pub fn ended(&self) -> bool {
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

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
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
