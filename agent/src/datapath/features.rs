//! What the kernel, our privileges and our place on the node allow, checked
//! once at start so that each missing piece is one clear line saying what to
//! do, all of them at once, instead of a failure deep in a syscall.
//!
//! Enforced (the agent does not start without them):
//! - `CAP_BPF`, `CAP_NET_ADMIN` and `CAP_PERFMON` (or `CAP_SYS_ADMIN` for
//!   BPF and PERFMON): without `CAP_PERFMON` the verifier runs in its
//!   restricted mode and refuses the programs' pointer arithmetic;
//! - the BPF ring buffer ([`TRACKING_FLOOR`], Linux 5.8), which tracking
//!   needs: probed, and by version where the probe cannot tell;
//! - `--bpffs DIR` on a mounted bpffs;
//! - `--attach tcx` only where the kernel has tcx;
//! - the node's network namespace: `--host-ip` is an address here, and in
//!   Kubernetes mode there is an interface besides `lo`.
//!
//! Only reported (`conndrain status`):
//! - steering: `bpf_redirect_neigh` with a nexthop ([`STEERING_FLOOR`], Linux
//!   5.10), probed like the ring buffer. Without it the agent loads the
//!   tracking-only ingress program and pins nothing: flows are tracked and
//!   pods drain, but a pinned flow is not held on its backend;
//! - BTF (`/sys/kernel/btf/vmlinux`): the programs have no CO-RE relocations
//!   (`tests/tests/environment.rs` checks the object), so they load the same
//!   without the kernel's BTF;
//! - tcx: without it (or with `--attach clsact`) the programs go on clsact.
//! - the preStop intercept ([`INTERCEPT_FLOOR`], Linux 5.14): `SO_NETNS_COOKIE`
//!   (read, not guessed), `bpf_get_netns_cookie` in `cgroup/connect*` and
//!   `bpf_get_socket_cookie` in `sockops` (probed, else by version). Without
//!   it the agent logs one line and runs on: the exec hook `conndrain wait`
//!   still works, the kubelet's `httpGet` reaches the pod itself.
//!
//! cgroups: only the intercept uses one (its `--intercept-cgroup`, cgroup2);
//! if it cannot be opened or attached to, the intercept is off with one line.
//! That the agent's BPF memory is charged to its memory cgroup (Linux 5.11+)
//! needs no access.

use std::{
    net::{IpAddr, UdpSocket},
    path::Path,
};

use aya::{
    maps::MapType,
    programs::{ProgramError, ProgramType, SchedClassifier, TcAttachType},
    sys::{BpfHelper, is_helper_supported, is_map_supported},
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

/// The oldest mainline Linux the tracking runs on: the BPF ring buffer (and
/// `CAP_BPF`/`CAP_PERFMON`) came in 5.8. Every other map type, helper and
/// flag the programs use is older (see the README, "Kernel versions").
pub const TRACKING_FLOOR: (u8, u8) = (5, 8);
/// The oldest mainline Linux steering runs on: `bpf_redirect_neigh` came in
/// 5.10, with the nexthop argument the programs pass (commit ba452c9e996d
/// changed its signature before 5.10 was released).
pub const STEERING_FLOOR: (u8, u8) = (5, 10);
/// tcx came in 6.6 (commit e420bed02507); clsact is used before.
pub const TCX_FLOOR: (u8, u8) = (6, 6);
/// The preStop intercept's floor, the newest of what it needs: the agent
/// reads its network namespace's cookie with `SO_NETNS_COOKIE` (5.14), which
/// `cgroup/connect*` programs compare with `bpf_get_netns_cookie` (5.7), and
/// cgroup programs attach as links (5.7).
pub const INTERCEPT_FLOOR: (u8, u8) = (5, 14);

/// statfs magic of bpffs (linux/magic.h `BPF_FS_MAGIC`).
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[expect(clippy::struct_excessive_bools, reason = "independent yes/no facts, shown as such in `conndrain status`")]
pub struct Features {
    pub release: String,
    /// `/sys/kernel/btf/vmlinux` exists (informational: see the module comment).
    pub btf: bool,
    /// The kernel has tcx (probed); clsact is used otherwise.
    pub tcx: bool,
    /// The kernel has the BPF ring buffer (probed, else by version): required.
    #[serde(default = "yes")]
    pub ring_buffer: bool,
    /// The kernel has `bpf_redirect_neigh` with a nexthop (probed, else by
    /// version): pinned flows are steered. Without it, tracking only.
    #[serde(default = "yes")]
    pub steering: bool,
    /// The kernel has what the preStop intercept needs (see [`INTERCEPT_FLOOR`]).
    #[serde(default)]
    pub prestop_intercept: bool,
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
        let version = KernelVersion::current().ok();
        // A probe that could not tell (no privilege, another error) is `None`:
        // then the version decides.
        let ring_buffer = is_map_supported(MapType::RingBuf).ok();
        let redirect_neigh = is_helper_supported(ProgramType::SchedClassifier, BpfHelper::BPF_FUNC_redirect_neigh).ok();
        let cookies = [
            (ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_get_netns_cookie),
            (ProgramType::SockOps, BpfHelper::BPF_FUNC_get_socket_cookie),
        ]
        .map(|(program, helper)| is_helper_supported(program, helper).ok());
        let cookies = if cookies.contains(&Some(false)) { Some(false) } else { cookies[0].and(cookies[1]) };
        Self {
            release,
            btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
            tcx: tcx_supported(),
            ring_buffer: supported(version, TRACKING_FLOOR, ring_buffer),
            steering: supported(version, STEERING_FLOOR, redirect_neigh),
            prestop_intercept: supported(version, INTERCEPT_FLOOR, cookies) && super::intercept::netns_cookie().is_ok(),
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
                "--attach tcx: kernel {} has no tcx (Linux {}.{}+); use --attach auto or --attach clsact",
                self.release, TCX_FLOOR.0, TCX_FLOOR.1
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
            missing.push(lack("CAP_NET_ADMIN", "to attach the TC programs and read routes"));
        }
        if !self.cap_perfmon {
            missing.push(lack("CAP_PERFMON", "without it the verifier refuses the programs' pointer arithmetic"));
        }
        if !self.ring_buffer {
            missing.push(too_old(&self.release));
        }
        missing
    }

    /// Why the preStop intercept is off, in one line; `None` when the kernel has it.
    #[must_use]
    pub fn intercept_off(&self) -> Option<String> {
        let (major, minor) = INTERCEPT_FLOOR;
        (!self.prestop_intercept).then(|| {
            format!(
                "preStop intercept disabled: kernel {} lacks SO_NETNS_COOKIE or the socket and netns cookie \
                 helpers of cgroup programs (Linux {major}.{minor}+); the kubelet's preStop httpGet reaches the \
                 pod itself, use the exec hook `conndrain wait` there",
                self.release
            )
        })
    }

    /// Why steering is off, in one line; `None` when it is on.
    #[must_use]
    pub fn steering_off(&self) -> Option<String> {
        (!self.steering).then(|| steering_off(&self.release))
    }
}

fn yes() -> bool {
    true
}

/// Whether a feature that mainline Linux has since `floor` is there: the
/// probe's answer where it gave one (distributions backport features, and
/// can leave them out), else the version (`None`: unknown, so no).
#[must_use]
pub fn supported(version: Option<KernelVersion>, floor: (u8, u8), probe: Option<bool>) -> bool {
    probe.unwrap_or_else(|| version.is_some_and(|v| v >= KernelVersion::new(floor.0, floor.1, 0)))
}

/// The one line for a kernel below [`TRACKING_FLOOR`].
#[must_use]
pub fn too_old(release: &str) -> String {
    let (major, minor) = TRACKING_FLOOR;
    format!("kernel {release} is too old: conndrain needs Linux {major}.{minor} or newer (BPF ring buffer)")
}

/// The one line the agent logs on a kernel below [`STEERING_FLOOR`].
#[must_use]
pub fn steering_off(release: &str) -> String {
    let (major, minor) = STEERING_FLOOR;
    format!(
        "steering disabled: kernel {release} has no bpf_redirect_neigh with a nexthop (Linux {major}.{minor}+); \
         flows are tracked and pods drain, but pinned flows are not kept on their backend"
    )
}

fn failed(missing: Vec<String>) -> Result<(), Error> {
    if missing.is_empty() { Ok(()) } else { Err(Error::Unsupported { missing }) }
}

/// Before Linux 5.11 BPF maps are charged to `RLIMIT_MEMLOCK` (often 64 KiB
/// or 8 MiB), not to the memory cgroup, and the flow table alone is larger:
/// there, raise it to unlimited (root or `CAP_SYS_RESOURCE`), else as far as
/// the hard limit goes. From 5.11 on it is left alone.
pub fn raise_memlock() {
    if kernel_at_least(5, 11) {
        return;
    }
    let mut limit = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a valid rlimit for the calling process.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const limit) } == 0 {
        return;
    }
    let error = std::io::Error::last_os_error();
    // SAFETY: limit is writable.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut limit) } == 0 {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const limit) };
    }
    tracing::warn!(%error, max_bytes = limit.rlim_max, "cannot lift RLIMIT_MEMLOCK, which this kernel (before 5.11) charges BPF maps to");
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
        Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EINVAL) => false,
        Err(_) => kernel_at_least(TCX_FLOOR.0, TCX_FLOOR.1),
    }
}

/// `CapEff` from /proc/self/status; 0 if unreadable (then every check fails
/// with its own clear line rather than an EPERM later).
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// `dir` (or, while it does not exist yet, its nearest existing ancestor) is
/// on a bpffs.
pub fn require_bpffs(dir: &Path) -> Result<(), Error> {
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let c = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::NotBpffs { path: dir.to_path_buf() })?;
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
    // `f_type` is i64 with glibc on x86_64 but u64 with musl (the image's
    // binary), and 32 bits wide on 32-bit targets; filesystem magics are
    // 32-bit values, so compare the low 32 bits, which is the same on all.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::unnecessary_cast,
        reason = "f_type's width and sign differ between libcs and targets; magics are 32-bit"
    )]
    if st.f_type as u32 != BPF_FS_MAGIC {
        return Err(Error::NotBpffs { path: dir.to_path_buf() });
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
    Some(dev.lines().skip(2).filter_map(|l| l.split_once(':')).map(|(name, _)| name.trim().to_owned()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_decides_where_no_probe_answered() {
        for (version, tracking, steering, tcx, intercept) in [
            ((4, 19), false, false, false, false),
            ((5, 4), false, false, false, false),
            ((5, 7), false, false, false, false),
            ((5, 8), true, false, false, false),
            ((5, 9), true, false, false, false),
            ((5, 10), true, true, false, false),
            ((5, 13), true, true, false, false),
            ((5, 14), true, true, false, true),
            ((5, 15), true, true, false, true),
            ((6, 1), true, true, false, true),
            ((6, 5), true, true, false, true),
            ((6, 6), true, true, true, true),
            ((6, 18), true, true, true, true),
        ] {
            let v = Some(KernelVersion::new(version.0, version.1, 0));
            assert_eq!(supported(v, TRACKING_FLOOR, None), tracking, "tracking on {version:?}");
            assert_eq!(supported(v, STEERING_FLOOR, None), steering, "steering on {version:?}");
            assert_eq!(supported(v, TCX_FLOOR, None), tcx, "tcx on {version:?}");
            assert_eq!(supported(v, INTERCEPT_FLOOR, None), intercept, "preStop intercept on {version:?}");
        }
        assert!(!supported(None, TRACKING_FLOOR, None), "an unknown version is not enough");
    }

    #[test]
    fn a_probe_beats_the_version() {
        // A distribution kernel with a backport (RHEL's 4.18 has the ring buffer) ...
        assert!(supported(Some(KernelVersion::new(4, 18, 0)), TRACKING_FLOOR, Some(true)));
        // ... or with a feature configured out.
        assert!(!supported(Some(KernelVersion::new(6, 1, 0)), STEERING_FLOOR, Some(false)));
        assert!(supported(None, STEERING_FLOOR, Some(true)));
    }

    #[test]
    fn too_old_kernel_and_no_steering_are_one_line_each() {
        let features = |ring_buffer, steering| Features {
            release: "5.4.0-1-amd64".into(),
            btf: false,
            tcx: false,
            ring_buffer,
            steering,
            prestop_intercept: false,
            cap_bpf: true,
            cap_net_admin: true,
            cap_perfmon: true,
        };
        assert_eq!(
            features(false, false).missing(),
            ["kernel 5.4.0-1-amd64 is too old: conndrain needs Linux 5.8 or newer (BPF ring buffer)"]
        );
        // Steering missing alone does not stop the agent: tracking only.
        let tracking_only = features(true, false);
        assert!(tracking_only.missing().is_empty());
        let line = tracking_only.steering_off().unwrap();
        assert!(!line.contains('\n') && line.contains("Linux 5.10+"), "{line}");
        assert_eq!(features(true, true).steering_off(), None);
        let line = tracking_only.intercept_off().unwrap();
        assert!(!line.contains('\n') && line.contains("Linux 5.14+") && line.contains("conndrain wait"), "{line}");
    }

    #[test]
    fn statfs_magic_compares_the_same_whatever_the_libc() {
        // glibc x86_64: i64; musl: u64; 32-bit glibc: i32 (the magic is negative there).
        #[allow(clippy::cast_possible_wrap, reason = "the bits of a 32-bit magic in a signed f_type")]
        let as_i32 = 0xcafe_4a11_u32 as i32;
        #[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation, reason = "what require_bpffs does")]
        {
            assert_eq!(0xcafe_4a11_i64 as u32, BPF_FS_MAGIC);
            assert_eq!(0xcafe_4a11_u64 as u32, BPF_FS_MAGIC);
            assert_eq!(as_i32 as u32, BPF_FS_MAGIC);
            assert_ne!(0x0102_1994_u64 as u32, BPF_FS_MAGIC, "tmpfs");
        }
    }
}
