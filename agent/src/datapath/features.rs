//! What the kernel and our privileges allow, checked once at start so that a
//! missing piece is one clear line instead of a failure deep in a syscall.

use std::path::Path;

use aya::util::KernelVersion;
use serde::{Deserialize, Serialize};

use crate::error::Error;

// linux/capability.h
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// statfs magic of bpffs (linux/magic.h BPF_FS_MAGIC).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Features {
    pub release: String,
    /// `/sys/kernel/btf/vmlinux` exists.
    pub btf: bool,
    /// tcx attach (Linux 6.6+); clsact is used otherwise.
    pub tcx: bool,
    pub cap_bpf: bool,
    pub cap_net_admin: bool,
    pub cap_perfmon: bool,
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
            tcx: kernel_at_least(6, 6),
            cap_bpf: has(CAP_BPF) || has(CAP_SYS_ADMIN),
            cap_net_admin: has(CAP_NET_ADMIN),
            cap_perfmon: has(CAP_PERFMON) || has(CAP_SYS_ADMIN),
        }
    }

    /// Fails with one line per missing piece and what to do about it.
    pub fn require(&self) -> Result<(), Error> {
        let mut missing = Vec::new();
        if !self.cap_bpf {
            missing.push(
                "missing capability CAP_BPF: run the agent as root or grant it CAP_BPF (and CAP_NET_ADMIN, CAP_PERFMON)"
                    .to_owned(),
            );
        }
        if !self.cap_net_admin {
            missing.push(
                "missing capability CAP_NET_ADMIN: needed to attach TC programs; run as root or grant CAP_NET_ADMIN"
                    .to_owned(),
            );
        }
        if !kernel_at_least(5, 8) {
            missing.push(format!(
                "kernel {} is too old: conndrain needs Linux 5.8 or newer (BPF ring buffer)",
                self.release
            ));
        }
        if missing.is_empty() { Ok(()) } else { Err(Error::Unsupported { missing }) }
    }
}

#[must_use]
pub fn kernel_at_least(major: u8, minor: u8) -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(major, minor, 0))
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

pub fn require_bpffs(dir: &Path) -> Result<(), Error> {
    // The directory itself may not exist yet: check the nearest existing ancestor.
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let c = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::NotBpffs { path: dir.to_path_buf() })?;
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path; st is writable.
    let rc = unsafe { libc::statfs(c.as_ptr(), &raw mut st) };
    #[expect(clippy::cast_lossless, reason = "f_type is i64 on x86_64 but not on every target")]
    if rc != 0 || st.f_type as i64 != BPF_FS_MAGIC {
        return Err(Error::NotBpffs { path: dir.to_path_buf() });
    }
    Ok(())
}
