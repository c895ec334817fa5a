//! What the kernel, our privileges and our place on the node allow, checked
//! once at start so that each missing piece is one clear line saying what to
//! do, all of them at once, instead of a failure deep in a syscall.
//!
//! Enforced (the agent does not start without them):
//! - `CAP_BPF`, `CAP_NET_ADMIN` and `CAP_PERFMON` (or `CAP_SYS_ADMIN` for
//!   BPF and PERFMON): without `CAP_PERFMON` the verifier runs in its
//!   restricted mode and refuses the programs' pointer arithmetic;
//! - Linux 5.8+ (BPF ring buffer);
//! - `--bpffs DIR` on a mounted bpffs;
//! - `--attach tcx` only where the kernel has tcx;
//! - the node's network namespace: `--host-ip` is an address here, and in
//!   Kubernetes mode there is an interface besides `lo`.
//!
//! Only reported (`conndrain status`):
//! - BTF (`/sys/kernel/btf/vmlinux`): the programs have no CO-RE relocations
//!   (`tests/tests/environment.rs` checks the object), so they load the same
//!   without the kernel's BTF;
//! - tcx: without it (or with `--attach clsact`) the programs go on clsact.
//!
//! Not checked: cgroups. The agent attaches TC programs only, no cgroup
//! programs, and reads no cgroup file; that its BPF memory is charged to its
//! memory cgroup (Linux 5.11+) needs no access.

use std::{
    net::{IpAddr, UdpSocket},
    path::Path,
};

use aya::{
    programs::{ProgramError, SchedClassifier, TcAttachType},
    util::KernelVersion,
};
use serde::{Deserialize, Serialize};

use super::AttachMode;
use crate::error::Error;

// linux/capability.h
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// statfs magic of bpffs (linux/magic.h `BPF_FS_MAGIC`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent yes/no facts, shown as such in `conndrain status`"
)]
pub struct Features {
    pub release: String,
    /// `/sys/kernel/btf/vmlinux` exists (informational: see the module comment).
    pub btf: bool,
    /// The kernel has tcx (probed); clsact is used otherwise.
    pub tcx: bool,
    pub cap_bpf: bool,
    pub cap_net_admin: bool,
    pub cap_perfmon: bool,
}

/// What this start asks of the node, besides capabilities and the kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wanted<'a> {
    /// `--bpffs`: must be on a bpffs.
    pub bpffs: Option<&'a Path>,
    /// `--attach`: `None` for auto.
    pub attach: Option<AttachMode>,
    /// `--host-ip`: must be an address of this network namespace.
    pub host_ip: Option<IpAddr>,
    /// Kubernetes mode: the agent must be in the node's network namespace.
    pub kubernetes: bool,
}

impl Features {
    #[must_use]
    pub fn detect() -> Self {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned());
        let caps = effective_caps();
        let has = |c: u32| caps & (1u64 << c) != 0;
        Self {
            release,
            btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
            tcx: tcx_supported(),
            cap_bpf: has(CAP_BPF) || has(CAP_SYS_ADMIN),
            cap_net_admin: has(CAP_NET_ADMIN),
            cap_perfmon: has(CAP_PERFMON) || has(CAP_SYS_ADMIN),
        }
    }

    /// Fails with one line per missing capability, and for a kernel too old.
    pub fn require(&self) -> Result<(), Error> {
        failed(self.missing())
    }

    /// [`require`](Self::require), and everything `wanted` asks of the node:
    /// one line per missing piece, all of them.
    pub fn check(&self, wanted: &Wanted<'_>) -> Result<(), Error> {
        let mut missing = self.missing();
        if let Some(dir) = wanted.bpffs
            && let Err(e) = require_bpffs(dir)
        {
            missing.push(e.to_string());
        }
        if wanted.attach == Some(AttachMode::Tcx) && !self.tcx {
            missing.push(format!(
                "--attach tcx: kernel {} has no tcx (Linux 6.6+); use --attach auto or --attach clsact",
                self.release
            ));
        }
        missing.extend(netns_problems(wanted));
        failed(missing)
    }

    fn missing(&self) -> Vec<String> {
        let mut missing = Vec::new();
        let lack = |cap: &str, why: &str| {
            format!(
                "missing capability {cap} ({why}): grant it to the agent (see deploy/daemonset.yaml), or run it as root"
            )
        };
        if !self.cap_bpf {
            missing.push(lack("CAP_BPF", "to load the programs and create the maps"));
        }
        if !self.cap_net_admin {
            missing.push(lack(
                "CAP_NET_ADMIN",
                "to attach the TC programs and read routes",
            ));
        }
        if !self.cap_perfmon {
            missing.push(lack(
                "CAP_PERFMON",
                "without it the verifier refuses the programs' pointer arithmetic",
            ));
        }
        if !kernel_at_least(5, 8) {
            missing.push(format!(
                "kernel {} is too old: conndrain needs Linux 5.8 or newer (BPF ring buffer)",
                self.release
            ));
        }
        missing
    }
}

fn failed(missing: Vec<String>) -> Result<(), Error> {
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Unsupported { missing })
    }
}

#[must_use]
pub fn kernel_at_least(major: u8, minor: u8) -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(major, minor, 0))
}

/// Whether the kernel has tcx, by asking it rather than trusting its version
/// (distribution kernels backport): a tcx program query on `lo` succeeds
/// where tcx exists, and fails with EINVAL (unknown attach type) where it does
/// not. Without the privilege to ask, the version decides (6.6+), as in aya.
pub(super) fn tcx_supported() -> bool {
    match SchedClassifier::query_tcx("lo", TcAttachType::Ingress) {
        Ok(_) => true,
        Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL) => {
            false
        }
        Err(_) => kernel_at_least(6, 6),
    }
}

/// `CapEff` from /proc/self/status; 0 if unreadable (then every check fails
/// with its own clear line rather than an EPERM later).
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// `dir` (or, while it does not exist yet, its nearest existing ancestor) is
/// on a bpffs.
pub fn require_bpffs(dir: &Path) -> Result<(), Error> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let c = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()).map_err(|_| {
        Error::NotBpffs {
            path: dir.to_path_buf(),
        }
    })?;
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path; st is writable.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(Error::Io {
            op: "--bpffs: cannot check the filesystem of",
            path: existing.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    #[allow(
        clippy::useless_conversion,
        reason = "f_type is i64 on x86_64, narrower or unsigned elsewhere"
    )]
    if i64::from(st.f_type) != BPF_FS_MAGIC {
        return Err(Error::NotBpffs {
            path: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// The agent must see the host side of the pods' interfaces, so it runs in
/// the node's network namespace (`hostNetwork: true`). What can be told from
/// inside: the node IP it was given is an address here, and in Kubernetes mode
/// (where a node always has an uplink) there is an interface besides `lo`.
/// That a registered pod's IP routes through an interface here is checked
/// when the pod is registered (`Error::NoRoute`).
fn netns_problems(wanted: &Wanted<'_>) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(ip) = wanted.host_ip.filter(|ip| !ip.is_unspecified())
        && let Err(e) = UdpSocket::bind((ip, 0))
        && e.kind() == std::io::ErrorKind::AddrNotAvailable
    {
        problems.push(format!(
            "--host-ip {ip} (HOST_IP) is not an address of the agent's network namespace: the agent must run in \
             the node's network namespace (hostNetwork: true, see deploy/daemonset.yaml), and HOST_IP must be the \
             node's IP (status.hostIP)"
        ));
    }
    if wanted.kubernetes && interfaces().is_some_and(|names| names.iter().all(|n| n == "lo")) {
        problems.push(
            "the agent's network namespace has no interface but lo, so it cannot see the pods' interfaces: run \
             it in the node's network namespace (hostNetwork: true, see deploy/daemonset.yaml)"
                .to_owned(),
        );
    }
    problems
}

/// The interfaces of our network namespace, from `/proc/self/net/dev`
/// (`None` if unreadable: then nothing is claimed).
fn interfaces() -> Option<Vec<String>> {
    let dev = std::fs::read_to_string("/proc/self/net/dev").ok()?;
    // Two header lines, then `  name: counters...`.
    Some(
        dev.lines()
            .skip(2)
            .filter_map(|l| l.split_once(':'))
            .map(|(name, _)| name.trim().to_owned())
            .collect(),
    )
}
