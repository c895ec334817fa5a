//! The preStop intercept as the agent sees it (the programs and why they are
//! built this way: `ebpf/conndrain-ebpf/src/intercept.rs`, `docs/prestop.md`):
//! loading and attaching the cgroup programs, telling them the node's network
//! namespace and ports, and finding which pod an accepted connection dialled.
//!
//! The links are owned by [`Intercept`]: they go when the agent goes, and the
//! kubelet's `httpGet` then reaches the pod's own port (see the failure modes
//! in `docs/prestop.md`).

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SockOps, cgroup_sock_addr::CgroupSockAddrLink, sock_ops::SockOpsLink,
    },
};
use conndrain_common::{InterceptConfig, InterceptDst, InterceptPeer, maps, programs};

use super::{ip_bytes, map_mut};
use crate::error::Error;

/// `SO_NETNS_COOKIE` (asm-generic/socket.h; Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// What to intercept and where to send it.
#[derive(Clone, Debug)]
pub struct InterceptOptions {
    /// The port the kubelet dials on a pod IP (`--intercept-port`).
    pub pod_port: u16,
    /// The agent's loopback listener (`--intercept-listen-port`).
    pub listen_port: u16,
    /// The cgroup (v2) to attach to: processes in it and below are intercepted.
    pub cgroup: PathBuf,
}

/// The attached intercept, and the agent's side of `INTERCEPT_PEERS`.
pub struct Intercept {
    peers: Mutex<HashMap<MapData, InterceptPeer, InterceptDst>>,
    pub cgroup: PathBuf,
    // Dropped with us: detached.
    _connect: [CgroupSockAddrLink; 2],
    _ports: SockOpsLink,
}

impl Intercept {
    /// The pod address the connection from `peer` (an accepted connection's
    /// client end on the loopback listener) dialled, if the programs
    /// rewrote it. Taken: each connection is looked up once, so a later
    /// connection that reuses the port cannot inherit it.
    pub fn take_dialled(&self, peer: SocketAddr) -> Option<IpAddr> {
        let key = InterceptPeer { addr: ip_bytes(peer.ip().to_canonical()), port: peer.port(), _pad: 0 };
        let mut peers = self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let dst = peers.get(&key, 0).ok()?;
        let _ = peers.remove(&key);
        let ip = std::net::Ipv6Addr::from(dst.addr);
        Some(ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4))
    }
}

/// The cookie of the calling thread's network namespace.
pub fn netns_cookie() -> std::io::Result<u64> {
    let sock = std::net::UdpSocket::bind(("127.0.0.1", 0))?;
    let mut cookie = 0u64;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).unwrap_or(8);
    // SAFETY: a valid socket and an out-parameter of the size we pass.
    let rc = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &raw mut len)
    };
    if rc == 0 { Ok(cookie) } else { Err(std::io::Error::last_os_error()) }
}

/// The cgroup2 root to attach to by default, from `/proc/mounts`
/// (`/sys/fs/cgroup` on a unified host, often `/sys/fs/cgroup/unified` on a
/// hybrid one), and whether it is the machine's root cgroup. A container with
/// its own cgroup namespace sees its own cgroup mounted there, which has a
/// `cgroup.type` file that the root has not: a mount of the real root (the
/// node's `/sys/fs/cgroup` mounted into the pod) is preferred to it.
#[must_use]
pub fn cgroup2_root() -> Option<(PathBuf, bool)> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .collect();
    let is_root = |dir: &PathBuf| !dir.join("cgroup.type").exists();
    found.iter().find(|d| is_root(d)).map(|d| (d.clone(), true)).or_else(|| found.first().map(|d| (d.clone(), false)))
}

fn open_dir(path: &Path) -> Result<OwnedFd, Error> {
    let io = |source| Error::Io { op: "opening the cgroup", path: path.to_path_buf(), source };
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io(std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: a valid NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Writes the settings, then loads and attaches the three programs to
/// `opts.cgroup`. They attach as BPF links (Linux 5.7+, below the intercept's
/// floor), which always run alongside other tools' programs of the cgroup
/// and take no flags: `Single` is flags 0 (`BPF_F_ALLOW_MULTI` is EINVAL there).
pub fn start(ebpf: &mut Ebpf, opts: &InterceptOptions) -> Result<Intercept, Error> {
    let netns_cookie = netns_cookie().map_err(|source| Error::Io {
        op: "reading the network namespace cookie (SO_NETNS_COOKIE) of",
        path: "the agent's network namespace".into(),
        source,
    })?;
    {
        let name = maps::INTERCEPT_CONFIG;
        let mut config: Array<_, InterceptConfig> =
            Array::try_from(map_mut(ebpf, name)?).map_err(|source| Error::map(name, source))?;
        let c = InterceptConfig { netns_cookie, pod_port: opts.pod_port, listen_port: opts.listen_port, _pad: 0 };
        config.set(0, c, 0).map_err(|source| Error::map(name, source))?;
    }
    let cgroup = open_dir(&opts.cgroup)?;
    // The port learner first: a connect rewritten before it runs would have no peer entry.
    let name = programs::INTERCEPT_PORTS;
    let ports: &mut SockOps = program(ebpf, name)?;
    ports.load().map_err(program_err(name, "loading"))?;
    let id = ports.attach(&cgroup, CgroupAttachMode::Single).map_err(program_err(name, "attaching"))?;
    let ports = ports.take_link(id).map_err(program_err(name, "attaching"))?;
    let connect = [
        attach_connect(ebpf, programs::INTERCEPT_V4, &cgroup)?,
        attach_connect(ebpf, programs::INTERCEPT_V6, &cgroup)?,
    ];
    let name = maps::INTERCEPT_PEERS;
    let peers = ebpf.take_map(name).ok_or(Error::MissingMap { name })?;
    let peers = HashMap::try_from(peers).map_err(|source| Error::map(name, source))?;
    Ok(Intercept { peers: Mutex::new(peers), cgroup: opts.cgroup.clone(), _connect: connect, _ports: ports })
}

fn program_err(name: &'static str, op: &'static str) -> impl Fn(aya::programs::ProgramError) -> Error {
    move |source| Error::Program { name, op, source: Box::new(source) }
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, Error>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name).ok_or(Error::MissingProgram { name })?.try_into().map_err(program_err(name, "loading"))
}

fn attach_connect(ebpf: &mut Ebpf, name: &'static str, cgroup: &OwnedFd) -> Result<CgroupSockAddrLink, Error> {
    let prog: &mut CgroupSockAddr = program(ebpf, name)?;
    prog.load().map_err(program_err(name, "loading"))?;
    let id = prog.attach(cgroup, CgroupAttachMode::Single).map_err(program_err(name, "attaching"))?;
    prog.take_link(id).map_err(program_err(name, "attaching"))
}
