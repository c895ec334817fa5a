//! Attaching the TC programs: tcx where the kernel has it (6.6+, commit
//! e420bed02507 "bpf: Add fd-based tcx multi-prog infra"; probed, see
//! `features.rs`), clsact otherwise, or as `--attach` says. Either way we add
//! our programs next to whatever is there and never replace another tool's.
//!
//! With `--bpffs`, each tcx link is pinned (`bpffs.rs`), so the programs
//! stay attached while no agent runs. A starting agent adopts a link pinned
//! for the interface by swapping its program for the newly loaded one in
//! place: `bpf_link_update` (aya's `SchedClassifier::attach_to_link`), which
//! is atomic. So there is never a moment with two copies of our programs on
//! one interface (which would count every packet twice) nor one with none
//! (which would miss packets), and the link keeps its position among other
//! tools' programs. We swap even when the program is the same: the new
//! program writes its events to this agent's ring buffer, and one code path
//! serves restarts and upgrades alike.
//!
//! clsact filters cannot be pinned, and need not be: they stay attached
//! without any process. With `--bpffs` an exiting agent leaves them; a
//! starting agent finds the filters an earlier agent left on the interface
//! (by name, in a netlink dump) and adopts the first one the same way, in
//! place: a filter change at its priority and handle swaps the program
//! atomically (`cls_bpf_change`). It removes any other filter of ours there.
//! Without `--bpffs` an exiting agent removes its filters, and one that was
//! killed leaves them for the next agent to adopt.
//!
//! L3 devices (ipip, `WireGuard`, GRE: [`is_l3`]) get the `_l3` programs, the
//! same code built for packets that start at the IP header; they exist only
//! with steering, so without it such a device is not attached.

use std::path::PathBuf;

use aya::{
    Ebpf,
    programs::{
        LinkOrder, MultiProgLink as _, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
};
use conndrain_common::programs;

use super::bpffs::{self, KeptDir};
use crate::error::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Tcx,
    Clsact,
}

/// One attached program on one interface, owned by us (taken out of aya's
/// program so that dropping it is ours to decide).
#[derive(Debug)]
struct Held {
    link: SchedClassifierLink,
    /// Where the link is pinned (tcx with `--bpffs`).
    pin: Option<PathBuf>,
}

#[derive(Debug)]
pub struct Links {
    ingress: Held,
    egress: Held,
    /// Whether the links were adopted from an earlier agent.
    pub adopted: bool,
}

impl Links {
    /// The paths these links are pinned at.
    pub fn pins(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.ingress.pin, &self.egress.pin].into_iter().flatten()
    }
}

/// The ingress program: with steering, or (kernels without
/// `bpf_redirect_neigh`, whose verifier refuses that one) tracking only.
#[must_use]
pub fn ingress_program(steering: bool) -> &'static str {
    if steering { programs::INGRESS } else { programs::INGRESS_TRACK }
}

/// Loads the programs (`ingress`: see [`ingress_program`]), and says how they
/// will be attached: `wanted`, or (`None`) tcx where the kernel has it,
/// clsact otherwise.
pub fn load_programs(ebpf: &mut Ebpf, ingress: &'static str, wanted: Option<AttachMode>) -> Result<AttachMode, Error> {
    let tcx = super::features::tcx_supported();
    if wanted == Some(AttachMode::Tcx) && !tcx {
        return Err(Error::Unsupported {
            missing: vec![
                "--attach tcx: this kernel has no tcx (Linux 6.6+); use --attach auto or --attach clsact".into(),
            ],
        });
    }
    let l3: &[&'static str] =
        if ingress == programs::INGRESS { &[programs::INGRESS_L3, programs::EGRESS_L3] } else { &[] };
    for &name in [ingress, programs::EGRESS].iter().chain(l3) {
        program(ebpf, name)?.load().map_err(|source| Error::Program {
            name,
            op: "loading",
            source: Box::new(source),
        })?;
    }
    Ok(wanted.unwrap_or(if tcx { AttachMode::Tcx } else { AttachMode::Clsact }))
}

/// Link types (`ARPHRD_*`, `linux/if_arp.h`) whose packets have no link-layer
/// header at TC: they start at the IP header. `ARPHRD_NONE` is `WireGuard`'s
/// (and a tun device's in TUN mode).
const L3_LINK_TYPES: [u16; 7] = [
    0xFFFE, // ARPHRD_NONE
    768,    // ARPHRD_TUNNEL (ipip)
    769,    // ARPHRD_TUNNEL6 (ip6tnl)
    776,    // ARPHRD_SIT
    778,    // ARPHRD_IPGRE
    823,    // ARPHRD_IP6GRE
    519,    // ARPHRD_RAWIP
];

/// `ioctl`'s request is a `c_ulong` with glibc and a `c_int` with musl (the image's target).
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::unnecessary_cast,
    reason = "SIOCGIFHWADDR is 0x8927 on every Linux ABI"
)]
const SIOCGIFHWADDR: libc::Ioctl = libc::SIOCGIFHWADDR as libc::Ioctl;
/// Whether `iface` is an L3 device (see [`L3_LINK_TYPES`]), by its link type
/// (`dev->type`, as `SIOCGIFHWADDR` reports it in this network namespace).
/// Not known: taken as Ethernet, as before link types were read.
#[must_use]
pub fn is_l3(iface: &str) -> bool {
    link_type(iface).is_ok_and(|t| L3_LINK_TYPES.contains(&t))
}

fn link_type(iface: &str) -> std::io::Result<u16> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let name = iface.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all zeroes is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, &b) in req.ifr_name.iter_mut().zip(name) {
        *d = libc::c_char::from_ne_bytes([b]);
    }
    // SAFETY: SIOCGIFHWADDR fills the ifreq we pass, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFHWADDR, &raw mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel filled ifr_hwaddr for this request.
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Attaches the programs to `iface`: `ingress` and `EGRESS`, or their `_l3`
/// variants on an L3 device (`l3`; the caller attaches those only with steering).
pub fn attach(
    ebpf: &mut Ebpf,
    ingress: &'static str,
    l3: bool,
    iface: &str,
    ifindex: u32,
    mode: AttachMode,
    pins: Option<&KeptDir>,
) -> Result<Links, Error> {
    let (ingress, egress_name) =
        if l3 { (programs::INGRESS_L3, programs::EGRESS_L3) } else { (ingress, programs::EGRESS) };
    if mode == AttachMode::Clsact {
        // Adding clsact where it exists fails with EEXIST; that is fine.
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            tracing::debug!(%iface, error = %e, "clsact qdisc (probably already there)");
        }
    }
    let ingress_name = ingress;
    let ingress = attach_one(ebpf, ingress_name, iface, ifindex, TcAttachType::Ingress, mode, pins)?;
    let egress = match attach_one(ebpf, egress_name, iface, ifindex, TcAttachType::Egress, mode, pins) {
        Ok(l) => l,
        Err(e) => {
            detach_one(ingress.0);
            return Err(e);
        }
    };
    if mode == AttachMode::Tcx {
        // Filters an earlier agent left on clsact (it ran with --attach
        // clsact): ours run on tcx now, and two copies would count twice.
        for (ty, name) in [(TcAttachType::Ingress, ingress_name), (TcAttachType::Egress, egress_name)] {
            if tc::qdisc_detach_program(iface, ty, name).is_ok() {
                tracing::info!(interface = iface, program = name, "removed the clsact filter an earlier agent left");
            }
        }
    }
    Ok(Links { adopted: ingress.1 || egress.1, ingress: ingress.0, egress: egress.0 })
}

/// `conndrain cleanup`: removes our clsact filters (named after our
/// programs) from every interface of this network namespace. They stay
/// attached without any process, and no pin holds them. Returns
/// `<interface> <ingress|egress>` for each hook cleaned.
#[must_use]
pub fn remove_clsact_filters() -> Vec<String> {
    let mut removed = Vec::new();
    for iface in interface_names() {
        for ty in [TcAttachType::Ingress, TcAttachType::Egress] {
            let ours = [
                programs::INGRESS,
                programs::INGRESS_TRACK,
                programs::EGRESS,
                programs::INGRESS_L3,
                programs::EGRESS_L3,
            ];
            // NotFound (no filter of that name, or no clsact qdisc) is the usual answer.
            if ours.iter().filter(|name| tc::qdisc_detach_program(&iface, ty, name).is_ok()).count() > 0 {
                removed.push(format!("{iface} {}", direction(ty)));
            }
        }
    }
    removed
}

/// The interfaces of this network namespace (`if_nameindex`, which asks
/// netlink: /sys/class/net may be another namespace's).
fn interface_names() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns an array ended by a zero entry, or null;
    // it is freed once with if_freenameindex after the names are copied.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return names;
        }
        let mut entry = list;
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            names.push(std::ffi::CStr::from_ptr((*entry).if_name).to_string_lossy().into_owned());
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    names
}

fn direction(ty: TcAttachType) -> &'static str {
    if ty == TcAttachType::Ingress { "ingress" } else { "egress" }
}

fn attach_one(
    ebpf: &mut Ebpf,
    name: &'static str,
    iface: &str,
    ifindex: u32,
    ty: TcAttachType,
    mode: AttachMode,
    pins: Option<&KeptDir>,
) -> Result<(Held, bool), Error> {
    let attach_err = |source| Error::Attach { iface: iface.to_owned(), source: Box::new(source) };
    let pin = pins.filter(|_| mode == AttachMode::Tcx).map(|p| p.link_path(iface, direction(ty)));
    let prog = program(ebpf, name)?;
    if let Some(path) = &pin
        && path.exists()
    {
        if let Some(old) = pinned_link(path, ifindex, ty) {
            // Atomic: the interface goes from the old program to ours
            // between two packets (see the module comment).
            match prog.attach_to_link(old).and_then(|id| prog.take_link(id)) {
                Ok(link) => return Ok((Held { link, pin }, true)),
                Err(e) => tracing::warn!(
                    interface = iface,
                    error = %e,
                    "cannot swap our program into the link an earlier agent pinned; replacing the link"
                ),
            }
        } else {
            tracing::info!(
                interface = iface,
                path = %path.display(),
                "a pinned link is for an interface that is gone (or renamed); replacing it"
            );
        }
        // The old link goes with its last reference (this pin).
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "removing a stale link pin");
        }
    }
    if mode == AttachMode::Clsact
        && let Some(link) = adopt_filter(prog, name, iface, ifindex, ty)
    {
        return Ok((Held { link, pin: None }, true));
    }
    let options = match mode {
        AttachMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
        AttachMode::Clsact => TcAttachOptions::Netlink(NlOptions::default()),
    };
    let id = prog.attach_with_options(iface, ty, options).map_err(attach_err)?;
    let link = prog.take_link(id).map_err(attach_err)?;
    let Some(path) = pin else { return Ok((Held { link, pin: None }, false)) };
    let pin_failed = |reason: String| Error::Io {
        op: "pinning the link at",
        path: path.clone(),
        source: std::io::Error::other(reason),
    };
    // On an error below the link is dropped, which detaches it.
    let fd: FdLink = link.try_into().map_err(|e: LinkError| pin_failed(e.to_string()))?;
    let pinned = fd.pin(&path).map_err(|e| pin_failed(e.to_string()))?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| pin_failed(e.to_string()))?;
    Ok((Held { link, pin: Some(path) }, false))
}

/// Adopts the filter of ours an earlier agent left on `iface` (it ran with
/// `--bpffs`, or was killed), by swapping our program into it in place, and
/// removes any other filter of ours there. `None` if there is none, or it
/// cannot be swapped (then it is removed, and the caller attaches anew).
fn adopt_filter(
    prog: &mut SchedClassifier,
    name: &str,
    iface: &str,
    ifindex: u32,
    ty: TcAttachType,
) -> Option<SchedClassifierLink> {
    let found = match clsact_filters(ifindex, ty, name) {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(interface = iface, error = %e, "listing the clsact filters; removing ours by name instead");
            if tc::qdisc_detach_program(iface, ty, name).is_ok() {
                tracing::info!(interface = iface, program = name, "removed the filter an earlier agent left");
            }
            return None;
        }
    };
    let filter = |(priority, handle): (u16, u32)| {
        SchedClassifierLink::attached(iface, ty, priority, TcHandle::from(handle), None).ok()
    };
    let (&first, rest) = found.split_first()?;
    // Dropping a link detaches its filter.
    for &extra in rest {
        tracing::info!(interface = iface, program = name, priority = extra.0, "removing a second filter of ours");
        drop(filter(extra));
    }
    let old = filter(first)?;
    match prog.attach_to_link(old).and_then(|id| prog.take_link(id)) {
        Ok(link) => {
            tracing::info!(
                interface = iface,
                program = name,
                priority = first.0,
                handle = first.1,
                "swapped our program into the clsact filter an earlier agent left"
            );
            Some(link)
        }
        Err(e) => {
            tracing::warn!(
                interface = iface,
                error = %e,
                "cannot swap our program into the filter an earlier agent left; replacing the filter"
            );
            drop(filter(first));
            None
        }
    }
}

/// Our filters on `ifindex`'s clsact hook `ty`, as (priority, handle): the
/// `bpf` filters named `name` (aya names a filter after its program). A
/// netlink dump, like `tc filter show dev IFACE ingress`; aya keeps its own
/// private.
fn clsact_filters(ifindex: u32, ty: TcAttachType, name: &str) -> std::io::Result<Vec<(u16, u32)>> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // linux/rtnetlink.h, linux/pkt_cls.h; the sizes of nlmsghdr and tcmsg.
    const TCA_KIND: u16 = 1;
    const TCA_OPTIONS: u16 = 2;
    const TCA_BPF_NAME: u16 = 7;
    const NLMSG_HDR: usize = 16;
    const TCMSG: usize = 20;
    // linux/pkt_sched.h: TC_H_CLSACT with its ingress or egress minor.
    let parent: u32 = if ty == TcAttachType::Ingress { 0xFFFF_FFF2 } else { 0xFFFF_FFF3 };

    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // nlmsghdr then tcmsg (family, pad, ifindex, handle, parent, info).
    let mut req = Vec::with_capacity(NLMSG_HDR + TCMSG);
    req.extend_from_slice(&u32::try_from(NLMSG_HDR + TCMSG).unwrap_or(0).to_ne_bytes());
    req.extend_from_slice(&libc::RTM_GETTFILTER.to_ne_bytes());
    #[expect(clippy::cast_possible_truncation, reason = "netlink flags are 16 bits")]
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    req.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
    req.extend_from_slice(&[0u8; 4]);
    req.extend_from_slice(&ifindex.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&parent.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    // SAFETY: req is a valid buffer of its length.
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }

    let mut found = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).map_err(|_| std::io::Error::last_os_error())?;
        if n == 0 {
            return Ok(found);
        }
        for (kind, msg) in messages(&buf[..n]) {
            match i32::from(kind) {
                libc::NLMSG_DONE => return Ok(found),
                libc::NLMSG_ERROR => {
                    // A negative errno, or 0 for an acknowledgement.
                    let errno = msg.get(..4).map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    return if errno == 0 { Ok(found) } else { Err(std::io::Error::from_raw_os_error(-errno)) };
                }
                _ if kind == libc::RTM_NEWTFILTER && msg.len() >= TCMSG => {
                    let word = |at: usize| u32::from_ne_bytes([msg[at], msg[at + 1], msg[at + 2], msg[at + 3]]);
                    let (handle, info) = (word(8), word(16));
                    let attrs: Vec<(u16, &[u8])> = attributes(&msg[TCMSG..]).collect();
                    let is_bpf = attrs.iter().any(|&(k, v)| k == TCA_KIND && v == b"bpf\0");
                    let named = attrs.iter().filter(|&&(k, _)| k == TCA_OPTIONS).any(|&(_, opts)| {
                        attributes(opts)
                            .any(|(k, v)| k == TCA_BPF_NAME && v.strip_suffix(b"\0") == Some(name.as_bytes()))
                    });
                    // The priority is tcm_info's upper half. Handle 0 is the
                    // priority's own entry, not a filter.
                    let entry = ((info >> 16) as u16, handle);
                    if is_bpf && named && handle != 0 {
                        found.push(entry);
                    }
                }
                _ => {}
            }
        }
    }
}

/// The messages of a netlink receive buffer: (type, payload). A message is
/// a 16-byte header (length, type, flags, sequence, port) and its payload.
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    tlv(buf, 16, |h| (u32::from_ne_bytes([h[0], h[1], h[2], h[3]]), u16::from_ne_bytes([h[4], h[5]])))
}

/// The attributes of a netlink payload: (type less its nested and byte-order
/// flags, value). An attribute is a 4-byte header (length, type) and its value.
fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    tlv(buf, 4, |h| (u32::from(u16::from_ne_bytes([h[0], h[1]])), u16::from_ne_bytes([h[2], h[3]]) & 0x3fff))
}

/// Type-length-value items, each padded to 4 bytes; stops at the first
/// malformed one.
fn tlv(buf: &[u8], header: usize, read: impl Fn(&[u8]) -> (u32, u16)) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let (len, kind) = read(rest.get(..header)?);
        let len = usize::try_from(len).ok().filter(|&l| l >= header && l <= rest.len())?;
        let item = (kind, &rest[header..len]);
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        Some(item)
    })
}

/// The link pinned at `path`, if it is a tcx link on `ifindex` in direction `ty`.
fn pinned_link(path: &std::path::Path, ifindex: u32, ty: TcAttachType) -> Option<SchedClassifierLink> {
    let pinned = PinnedLink::from_pin(path).ok()?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).ok()?;
    let target = bpffs::tcx_link_target(link.fd().ok()?)?;
    (target == (ifindex, direction(ty))).then_some(link)
}

fn detach_one(held: Held) {
    if let Some(path) = &held.pin
        && let Err(e) = std::fs::remove_file(path)
    {
        tracing::debug!(path = %path.display(), error = %e, "unpinning link");
    }
    // Dropping the last reference detaches: closes a tcx link's fd, removes a
    // clsact filter. The interface may be gone with its pod; then the kernel
    // already dropped the program.
    drop(held.link);
}

pub fn detach(links: Links) {
    detach_one(links.ingress);
    detach_one(links.egress);
}

/// Lets the programs run on after we exit: a pinned tcx link stays attached
/// by its pin once our fd is closed; a clsact filter stays attached unless
/// removed, so its handle is forgotten instead of dropped.
pub fn leave_attached(links: Links) {
    for held in [links.ingress, links.egress] {
        if held.pin.is_some() {
            drop(held.link);
        } else {
            std::mem::forget(held.link);
        }
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, Error> {
    ebpf.program_mut(name).ok_or(Error::MissingProgram { name })?.try_into().map_err(|source| Error::Program {
        name,
        op: "finding",
        source: Box::new(source),
    })
}

pub fn ifname(ifindex: u32) -> Result<String, Error> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf is IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(Error::Interface { ifindex, source: std::io::Error::last_os_error() });
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}
