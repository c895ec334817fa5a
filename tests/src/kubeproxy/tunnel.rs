//! An inter-node link without Ethernet headers: a TUN device in each node,
//! and this process carrying the packets between them, as a userspace VPN
//! (wireguard-go, boringtun) does. TUN devices are `ARPHRD_NONE`, like
//! `WireGuard`'s: their packets start at the IP header, also at TC. (The test
//! kernels may have no ipip or `WireGuard` module; every kernel has TUN.)

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, Result, bail};

use crate::Netns;

// linux/if_tun.h
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Two TUN devices, `a_if` in one namespace and `b_if` in another, joined
/// by two threads that copy each packet one sends to the other, which
/// receives it. Dropping it stops the threads and closes the devices (they
/// are not persistent, so the kernel deletes them).
pub struct TunLink {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TunLink {
    /// Creates the devices (down, without addresses) and starts carrying.
    pub fn new(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<Self> {
        let fa = Arc::new(a.run(|| open_tun(a_if))?.with_context(|| format!("TUN {a_if}"))?);
        let fb = Arc::new(b.run(|| open_tun(b_if))?.with_context(|| format!("TUN {b_if}"))?);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = [(fa.clone(), fb.clone()), (fb, fa)]
            .into_iter()
            .map(|(from, to)| {
                let stop = stop.clone();
                std::thread::spawn(move || carry(&from, &to, &stop))
            })
            .collect();
        Ok(Self { stop, threads })
    }
}

impl Drop for TunLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn open_tun(name: &str) -> Result<OwnedFd> {
    if name.len() >= libc::IFNAMSIZ {
        bail!("interface name {name:?} too long");
    }
    // SAFETY: open(2) of a constant path; the fd is owned below.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("opening /dev/net/tun");
    }
    // SAFETY: a new fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all zeroes is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, &s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    req.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
    // SAFETY: TUNSETIFF reads (and fills in) the ifreq, which outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &raw mut req) } < 0 {
        return Err(io::Error::last_os_error()).context("TUNSETIFF");
    }
    Ok(fd)
}

/// Copies packets from `from` to `to` until `stop`; polls so that it sees
/// `stop` within 100 ms. A packet the other device refuses (it is down) is
/// dropped, as a link would.
fn carry(from: &OwnedFd, to: &OwnedFd, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd { fd: from.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&raw mut pfd, 1, 100) };
        if n <= 0 || pfd.revents & libc::POLLIN == 0 {
            continue;
        }
        // SAFETY: buf is writable for its length.
        let len = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(len) = usize::try_from(len) else { continue };
        // SAFETY: the first len bytes of buf were just read.
        let _ = unsafe { libc::write(to.as_raw_fd(), buf.as_ptr().cast(), len) };
    }
}
