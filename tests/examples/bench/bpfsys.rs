//! Raw `bpf(2)` calls the benchmark makes itself: loading the empty classifier
//! (the floor any TC program costs) and one `BPF_PROG_TEST_RUN`.

use std::{
    mem::size_of,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use anyhow::{Context as _, Result, bail};

/// `r0 = TC_ACT_UNSPEC; exit`, a `BPF_PROG_TYPE_SCHED_CLS` program.
pub struct EmptyClassifier(OwnedFd);

#[repr(C, align(8))]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

#[repr(C, align(8))]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// `bpf_attr` for `BPF_LINK_CREATE` of a tcx link.
#[repr(C, align(8))]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

const BPF_LINK_CREATE: libc::c_long = 28;

impl EmptyClassifier {
    pub const NAME: &str = "bench_empty";

    pub fn load() -> Result<Self> {
        // mov64 r0, -1 ; exit
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0x00, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
        ];
        let license = c"GPL";
        let mut name = [0u8; 16];
        name[..Self::NAME.len()].copy_from_slice(Self::NAME.as_bytes());
        let attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            ..ProgLoadAttr::default()
        };
        // SAFETY: a valid bpf_attr prefix for BPF_PROG_LOAD; the pointers outlive the call.
        let fd = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, &raw const attr, size_of::<ProgLoadAttr>())
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("loading the empty classifier");
        }
        // SAFETY: a new fd that we own.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(RawFd::try_from(fd)?) }))
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Attaches it with tcx (`attach_type` `BPF_TCX_INGRESS` or `BPF_TCX_EGRESS`)
    /// after whatever is there; closing the returned link detaches it.
    pub fn attach_tcx(&self, ifindex: u32, attach_type: u32) -> Result<OwnedFd> {
        let attr = LinkCreateAttr {
            prog_fd: u32::try_from(self.fd())?,
            target_ifindex: ifindex,
            attach_type,
            ..LinkCreateAttr::default()
        };
        // SAFETY: a valid bpf_attr prefix for BPF_LINK_CREATE.
        let fd = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, &raw const attr, size_of::<LinkCreateAttr>())
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("attaching the empty classifier with tcx");
        }
        // SAFETY: a new fd that we own.
        Ok(unsafe { OwnedFd::from_raw_fd(RawFd::try_from(fd)?) })
    }
}

/// One `BPF_PROG_TEST_RUN`: (return value, average ns per run).
pub fn test_run(fd: RawFd, frame: &[u8], repeat: u32) -> Result<(u32, u32)> {
    let mut attr = TestRunAttr {
        prog_fd: u32::try_from(fd)?,
        data_size_in: u32::try_from(frame.len())?,
        data_in: frame.as_ptr() as u64,
        repeat,
        ..TestRunAttr::default()
    };
    // SAFETY: a valid bpf_attr prefix for BPF_PROG_TEST_RUN; `frame` outlives
    // the call, and no output buffer is given.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &raw mut attr, size_of::<TestRunAttr>())
    };
    if rc != 0 {
        bail!("BPF_PROG_TEST_RUN: {}", std::io::Error::last_os_error());
    }
    Ok((attr.retval, attr.duration))
}
