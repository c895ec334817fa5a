//! The sockets tracepoint (`sock:inet_sock_set_state`), which keeps the
//! pods' open inbound TCP sockets in `SOCKETS`: attaching it, pinning its
//! link across restarts, and the agent's reads of what it keeps.
//!
//! Continuity matters more than anything here: a socket opened while the
//! program was not attached is missing from `SOCKETS` for good, so the agent
//! records in `CONFIG.sockets_since_ns` since when the tracepoint has run
//! without a gap, and a pod registered before that cannot be confirmed
//! drained from its sockets. With `--bpffs`, the link is pinned: a restarted
//! agent attaches its own program first, then drops the old link, so the
//! two overlap instead of leaving a gap (both count each socket once: see
//! `ebpf/conndrain-ebpf/src/sockets.rs`).

use std::path::Path;

use aya::{
    Ebpf,
    programs::{
        TracePoint,
        links::{FdLink, PinnedLink},
    },
};
use conndrain_common::{PodSockets, SockValue, maps, programs};

use super::{
    bpffs::KeptDir,
    handles::{Maps, update},
};
use crate::error::Error;

const CATEGORY: &str = "sock";
const EVENT: &str = "inet_sock_set_state";
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The attached tracepoint. Kept for the agent's lifetime.
pub enum SocketsLink {
    /// Pinned under `--bpffs`: outlives the agent unless detached.
    Pinned(PinnedLink),
    /// Attached for as long as the agent runs.
    Owned(aya::programs::trace_point::TracePointLink),
}

/// Makes sure tracefs is where aya looks for the tracepoint's id. `ip netns
/// exec` and containers often come without it; we mount it when we may
/// (CAP_SYS_ADMIN), and otherwise say how to provide it.
fn ensure_tracefs() -> Result<(), Error> {
    let has = |root: &str| Path::new(root).join("events").join(CATEGORY).join(EVENT).join("id").exists();
    if TRACEFS.iter().any(|r| has(r)) {
        return Ok(());
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: constant NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(c"tracefs".as_ptr(), target.as_ptr(), c"tracefs".as_ptr(), 0, std::ptr::null()) };
    if rc == 0 && has(TRACEFS[0]) {
        tracing::info!("mounted tracefs at /sys/kernel/tracing (for the sockets tracepoint)");
        return Ok(());
    }
    let why = if rc == 0 {
        "it has no sock:inet_sock_set_state".to_owned()
    } else {
        std::io::Error::last_os_error().to_string()
    };
    Err(Error::Unsupported {
        missing: vec![format!(
            "tracefs: /sys/kernel/tracing is not mounted and could not be mounted ({why}); conndrain reads the pods' \
             sockets from the sock:inet_sock_set_state tracepoint: mount tracefs on the node, and in Kubernetes \
             mount the node's /sys/kernel/tracing into the agent's pod (hostPath, see deploy/daemonset.yaml)"
        )],
    })
}

/// Loads and attaches the tracepoint; returns the link and whether the
/// sockets it keeps are continuous with an earlier agent's (its pinned link
/// was still attached).
pub fn attach(ebpf: &mut Ebpf, pins: Option<&KeptDir>) -> Result<(SocketsLink, bool), Error> {
    ensure_tracefs()?;
    let name = programs::SOCKETS;
    program(ebpf)?.load().map_err(|source| Error::Program { name, op: "loading", source: Box::new(source) })?;
    let link = attach_link(ebpf)?;
    let Some(pins) = pins else { return Ok((SocketsLink::Owned(link), false)) };
    let path = pins.sockets_link_path();
    // Ours runs now; the earlier agent's may go.
    let earlier = PinnedLink::from_pin(&path).ok().map(|old| {
        if let Err(e) = old.unpin() {
            tracing::warn!(path = %path.display(), error = %e, "unpinning the earlier sockets link");
        }
    });
    let fd: FdLink = match link.try_into() {
        Ok(fd) => fd,
        Err(e) => {
            // Kernels before 5.15 have no perf_event links to pin: the
            // tracepoint runs while we do, and a restart starts afresh.
            tracing::warn!(error = %e, "the sockets tracepoint cannot be pinned on this kernel: each restart starts its socket evidence afresh");
            return attach_link(ebpf).map(|l| (SocketsLink::Owned(l), false));
        }
    };
    let pinned = fd.pin(&path).map_err(|e| Error::Pin { path: path.clone(), reason: e.to_string() })?;
    Ok((SocketsLink::Pinned(pinned), earlier.is_some()))
}

fn program(ebpf: &mut Ebpf) -> Result<&mut TracePoint, Error> {
    let name = programs::SOCKETS;
    ebpf.program_mut(name).ok_or(Error::MissingProgram { name })?.try_into().map_err(|source| Error::Program {
        name,
        op: "loading",
        source: Box::new(source),
    })
}

fn attach_link(ebpf: &mut Ebpf) -> Result<aya::programs::trace_point::TracePointLink, Error> {
    let name = programs::SOCKETS;
    let err = |source| Error::Program { name, op: "attaching", source: Box::new(source) };
    let prog = program(ebpf)?;
    let id = prog.attach(CATEGORY, EVENT).map_err(err)?;
    prog.take_link(id).map_err(err)
}

/// Leaves the pinned link attached for the next agent, or detaches it.
pub fn release(link: SocketsLink, keep: bool) {
    match link {
        SocketsLink::Pinned(p) if !keep => {
            if let Err(e) = p.unpin() {
                tracing::warn!(error = %e, "unpinning the sockets link");
            }
        }
        SocketsLink::Pinned(_) => {}
        SocketsLink::Owned(l) => drop(l),
    }
}

/// How many times the kernel skipped the program: `recursion_misses` in its
/// fdinfo (Linux 5.12+; `None` before, or if unreadable). A classic
/// tracepoint's programs do not run while the CPU's `bpf_prog_active` is
/// held (`trace_call_bpf`): by another tracing program, or by a bpf(2) map
/// operation that a softirq finishing a handshake interrupted. Each miss is
/// a socket open or close `SOCKETS` may lack. aya does not expose the
/// counter, so it is read where bpftool reads it.
pub fn misses(ebpf: &Ebpf) -> Option<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = ebpf.program(programs::SOCKETS)?.fd().ok()?.as_fd().as_raw_fd();
    parse_misses(&std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?)
}

fn parse_misses(fdinfo: &str) -> Option<u64> {
    fdinfo.lines().find_map(|l| l.strip_prefix("recursion_misses:")).and_then(|v| v.trim().parse().ok())
}

pub fn pod_sockets(m: &Maps, slot: u32) -> Result<PodSockets, Error> {
    m.pod_sockets.get(&slot, 0).map_err(|source| Error::map(maps::POD_SOCKETS, source))
}

/// The open inbound sockets of one pod: a walk of `SOCKETS`, which holds
/// only the pods' open inbound connections (read only when a drain is to be
/// confirmed and the pod's counter is not zero).
pub fn open_sockets(m: &Maps, slot: u32) -> Result<Vec<SockValue>, Error> {
    Ok(m.sockets.iter().filter_map(Result::ok).map(|(_, v)| v).filter(|v| v.pod_slot == slot).collect())
}

/// Forgets a slot's sockets (a removed pod's, or a new pod's inherited slot):
/// entries first, then the counter, so a close racing us cannot count twice.
pub fn reset_slot(m: &mut Maps, slot: u32) -> Result<(), Error> {
    let keys: Vec<u64> =
        m.sockets.iter().filter_map(Result::ok).filter(|(_, v)| v.pod_slot == slot).map(|(k, _)| k).collect();
    for k in keys {
        let _ = m.sockets.remove(&k);
    }
    m.pod_sockets.set(slot, PodSockets::default(), update::ANY).map_err(|source| Error::map(maps::POD_SOCKETS, source))
}

#[cfg(test)]
mod tests {
    use super::parse_misses;

    #[test]
    fn misses_are_read_from_the_programs_fdinfo() {
        let info =
            "pos:\t0\nflags:\t02000002\nprog_type:\t5\nrun_cnt:\t0\nrecursion_misses:\t3\nverified_insns:\t410\n";
        assert_eq!(parse_misses(info), Some(3));
        // Before 5.12 the line is missing: unknown, not zero.
        assert_eq!(parse_misses("prog_type:\t5\nrun_time_ns:\t0\n"), None);
    }
}
