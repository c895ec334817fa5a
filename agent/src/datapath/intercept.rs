//! The preStop intercept as the agent sees it (the programs and why they are
//! built this way: `ebpf/conndrain-ebpf/src/intercept.rs`, `docs/prestop.md`):
//! loading and attaching the cgroup programs, telling them the node's network
//! namespace and ports, and finding which pod an accepted connection dialled.
//!
//! Without `--bpffs` the links are owned by [`Intercept`]: they go when the
//! agent goes, and the kubelet's `httpGet` then reaches the pod's own port.
//! With `--bpffs` they are pinned under `DIR/v<layout>/intercept/` (and the
//! intercept's maps with the others), so they stay attached while no agent
//! runs: the kubelet's connection is still sent to the loopback port, and
//! the `cgroup_skb/egress` program holds its SYN back until an agent listens
//! there again. A starting agent adopts the pinned links by swapping its
//! programs into them (`BPF_LINK_UPDATE`, atomic), as `attach.rs` does for
//! the tcx links. See the failure modes in `docs/prestop.md`.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SockOps, links::FdLink},
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
    /// Whether the links were adopted from an earlier agent (pinned).
    pub adopted: bool,
    /// Without `--bpffs`: dropped with us, detached. With it: empty, the
    /// pins hold the links.
    _links: Vec<FdLink>,
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

/// The pins of the intercept's links under `dir` (`KeptDir::intercept_dir`).
pub const LINK_PINS: [&str; 4] = ["connect4", "connect6", "sockops", "syn-hold"];

// linux/bpf.h: commands and attach types.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_CGROUP_INET_EGRESS: u32 = 1;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<libc::c_long> {
    // SAFETY: bpf(2) with a zero-padded attribute union of 128 bytes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of::<[u64; 16]>()) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

/// The link pinned at `path` (`BPF_OBJ_GET`).
fn pinned_link(path: &Path) -> std::io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: a new fd the kernel gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(|_| std::io::Error::other("fd out of range"))?) })
}

/// Swaps the program of `link` for `prog` in place (`BPF_LINK_UPDATE`).
fn link_update(link: &OwnedFd, prog: &OwnedFd) -> std::io::Result<()> {
    let mut attr = [0u64; 16];
    // link_fd, new_prog_fd (u32 each), flags 0, old_prog_fd 0.
    let (l, p) = (u64::try_from(link.as_raw_fd()).unwrap_or(0), u64::try_from(prog.as_raw_fd()).unwrap_or(0));
    attr[0] = if cfg!(target_endian = "little") { l | (p << 32) } else { (l << 32) | p };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// The cgroup id and attach type of a cgroup link, from its fdinfo.
fn cgroup_link_target(fd: &OwnedFd) -> Option<(u64, u32)> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    let field = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.split_whitespace().next().map(str::to_owned))
    };
    Some((field("cgroup_id:")?.parse().ok()?, field("attach_type:")?.parse().ok()?))
}

/// One of the intercept's programs, loaded; attached to `cgroup` through the
/// link pinned at `pin` when there is one for that cgroup and attach type
/// (its program swapped for ours), else through a new link (pinned at `pin`
/// when given, replacing a stale pin only once the new link is attached, so
/// that nothing is ever without the hook). Returns the link to keep (none
/// when pinned) and whether an earlier agent's link was adopted.
fn attach_one(
    name: &'static str,
    prog_fd: &OwnedFd,
    pin: Option<&Path>,
    target: (u64, u32),
    attach: impl FnOnce() -> Result<FdLink, Error>,
) -> Result<(Option<FdLink>, bool), Error> {
    let old = pin.filter(|p| p.exists()).and_then(|p| match pinned_link(p) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::warn!(program = name, path = %p.display(), error = %e, "cannot open a pinned intercept link");
            None
        }
    });
    if let Some(old) = &old {
        if cgroup_link_target(old) == Some(target) {
            match link_update(old, prog_fd) {
                Ok(()) => return Ok((None, true)),
                Err(e) => tracing::warn!(
                    program = name,
                    error = %e,
                    "cannot swap our program into the intercept link an earlier agent pinned; replacing the link"
                ),
            }
        } else {
            tracing::info!(program = name, "a pinned intercept link is for another cgroup; replacing it");
        }
    }
    let link = attach()?;
    let Some(path) = pin else { return Ok((Some(link), false)) };
    // The old link (if any) stays attached through `old` until the new one is pinned.
    if path.exists()
        && let Err(e) = std::fs::remove_file(path)
    {
        tracing::warn!(path = %path.display(), error = %e, "removing a stale intercept link pin");
    }
    let pinned = link.pin(path).map_err(|e| Error::Io {
        op: "pinning the intercept link at",
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    drop(pinned);
    drop(old);
    Ok((None, false))
}

/// Writes the settings, then loads and attaches the four programs to
/// `opts.cgroup`, adopting the links pinned in `pins` (`--bpffs`) if any.
/// They attach as BPF links (Linux 5.7+, below the intercept's floor), which
/// always run alongside other tools' programs of the cgroup and take no
/// flags: `Single` is flags 0 (`BPF_F_ALLOW_MULTI` is EINVAL there).
pub fn start(ebpf: &mut Ebpf, opts: &InterceptOptions, pins: Option<&Path>) -> Result<Intercept, Error> {
    use std::os::unix::fs::MetadataExt as _;
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
    // A cgroup2 directory's inode number is its cgroup id.
    let cgroup_id = std::fs::metadata(&opts.cgroup)
        .map_err(|source| Error::Io { op: "reading", path: opts.cgroup.clone(), source })?
        .ino();
    let pin = |i: usize| pins.map(|d| d.join(LINK_PINS[i]));
    let mut links = Vec::new();
    let mut adopted = false;
    let mut keep = |(link, a): (Option<FdLink>, bool)| {
        links.extend(link);
        adopted |= a;
    };
    // The port learner first: a connect rewritten before it runs would have
    // no peer entry. Then the SYN hold, then the rewrite.
    let name = programs::INTERCEPT_PORTS;
    program::<SockOps>(ebpf, name)?.load().map_err(program_err(name, "loading"))?;
    keep(attach_one(name, &loaded_fd(ebpf, name)?, pin(2).as_deref(), (cgroup_id, BPF_CGROUP_SOCK_OPS), || {
        let prog: &mut SockOps = program(ebpf, name)?;
        let id = prog.attach(&cgroup, CgroupAttachMode::Single).map_err(program_err(name, "attaching"))?;
        fd_link(name, prog.take_link(id).map_err(program_err(name, "attaching"))?)
    })?);
    let name = programs::INTERCEPT_HOLD;
    program::<CgroupSkb>(ebpf, name)?.load().map_err(program_err(name, "loading"))?;
    keep(attach_one(name, &loaded_fd(ebpf, name)?, pin(3).as_deref(), (cgroup_id, BPF_CGROUP_INET_EGRESS), || {
        let prog: &mut CgroupSkb = program(ebpf, name)?;
        let id = prog
            .attach(&cgroup, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
            .map_err(program_err(name, "attaching"))?;
        fd_link(name, prog.take_link(id).map_err(program_err(name, "attaching"))?)
    })?);
    for (i, name, ty) in
        [(0, programs::INTERCEPT_V4, BPF_CGROUP_INET4_CONNECT), (1, programs::INTERCEPT_V6, BPF_CGROUP_INET6_CONNECT)]
    {
        program::<CgroupSockAddr>(ebpf, name)?.load().map_err(program_err(name, "loading"))?;
        keep(attach_one(name, &loaded_fd(ebpf, name)?, pin(i).as_deref(), (cgroup_id, ty), || {
            let prog: &mut CgroupSockAddr = program(ebpf, name)?;
            let id = prog.attach(&cgroup, CgroupAttachMode::Single).map_err(program_err(name, "attaching"))?;
            fd_link(name, prog.take_link(id).map_err(program_err(name, "attaching"))?)
        })?);
    }
    let name = maps::INTERCEPT_PEERS;
    let peers = ebpf.take_map(name).ok_or(Error::MissingMap { name })?;
    let peers = HashMap::try_from(peers).map_err(|source| Error::map(name, source))?;
    Ok(Intercept { peers: Mutex::new(peers), cgroup: opts.cgroup.clone(), adopted, _links: links })
}

/// A copy of the fd of the loaded program `name`, to swap it into a pinned link.
fn loaded_fd(ebpf: &Ebpf, name: &'static str) -> Result<OwnedFd, Error> {
    use std::os::fd::AsFd as _;
    let prog = ebpf.program(name).ok_or(Error::MissingProgram { name })?;
    let fd = prog.fd().map_err(program_err(name, "loading"))?;
    fd.as_fd().try_clone_to_owned().map_err(|source| Error::Io {
        op: "duplicating the fd of",
        path: name.into(),
        source,
    })
}

fn fd_link<L>(name: &'static str, link: L) -> Result<FdLink, Error>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    FdLink::try_from(link).map_err(|e| Error::Io {
        op: "taking the link of",
        path: name.into(),
        source: std::io::Error::other(e.to_string()),
    })
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
