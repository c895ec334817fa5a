//! Running a row through the kernel (`BPF_PROG_TEST_RUN`, with
//! `CHECKSUM_COMPLETE` where the kernel has it) and recomputing its checksums.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    sync::OnceLock,
};

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use conndrain_common::{PROTO_UDP, programs};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};

use super::{
    BPF_F_TEST_SKB_CHECKSUM_COMPLETE, BPF_PROG_TEST_RUN,
    frames::frame,
    rows::{ODD, is_fragment, udp4},
};
use crate::{
    harness::Harness,
    packets::{ETH_HLEN, IPV4_HLEN},
};

/// Whether the kernel takes `BPF_F_TEST_SKB_CHECKSUM_COMPLETE`.
pub fn checksum_complete_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let h = Harness::new();
        let probe = frame(PROTO_UDP, udp4().client, udp4().frontend, 64, ODD);
        match test_run_flags(&h, programs::INGRESS, &probe, BPF_F_TEST_SKB_CHECKSUM_COMPLETE) {
            Ok(_) => true,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => false,
            Err(e) => panic!("probing BPF_F_TEST_SKB_CHECKSUM_COMPLETE: {e}"),
        }
    })
}

/// Runs `frame` through `prog` (`conndrain_ingress` or `conndrain_in_l3`): with a
/// `CHECKSUM_COMPLETE` skb if `skb_csum` and the kernel can, else as a plain test run.
pub fn run_ingress(h: &Harness, prog: &str, frame: &[u8], skb_csum: bool) -> Result<(u32, Vec<u8>), String> {
    if skb_csum && checksum_complete_supported() {
        return test_run_flags(h, prog, frame, BPF_F_TEST_SKB_CHECKSUM_COMPLETE).map_err(|e| {
            if e.raw_os_error() == Some(libc::EBADMSG) {
                "skb->csum left out of step with the packet (EBADMSG under CHECKSUM_COMPLETE)".to_owned()
            } else {
                format!("BPF_PROG_TEST_RUN: {e}")
            }
        });
    }
    let prog: &SchedClassifier = h.ebpf().program(prog).unwrap().try_into().unwrap();
    let mut out = vec![0u8; frame.len() + 256];
    let res = prog
        .test_run(TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::default() })
        .map_err(|e| format!("BPF_PROG_TEST_RUN: {e:?}"))?;
    out.truncate(usize::try_from(res.data_size_out).unwrap());
    Ok((res.return_value, out))
}

/// The `test` member of `union bpf_attr` (linux/bpf.h). aya 0.14 sets no
/// test-run flag but XDP's, so this one call is made by hand.
#[repr(C)]
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

fn test_run_flags(h: &Harness, prog: &str, frame: &[u8], flags: u32) -> std::io::Result<(u32, Vec<u8>)> {
    let prog: &SchedClassifier = h.ebpf().program(prog).unwrap().try_into().unwrap();
    let fd = prog.fd().unwrap().as_fd().as_raw_fd();
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: u32::try_from(fd).unwrap(),
        data_size_in: u32::try_from(frame.len()).unwrap(),
        data_size_out: u32::try_from(out.len()).unwrap(),
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        flags,
        ..TestRunAttr::default()
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix whose pointers outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &raw mut attr,
            libc::c_uint::try_from(size_of::<TestRunAttr>()).unwrap(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval, out))
}

/// The 16-bit one's-complement sum of `bytes`, odd lengths padded with a zero.
pub fn ones_sum(bytes: &[u8]) -> u32 {
    let mut sum: u32 = bytes.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// Recomputes the IPv4 header checksum and the TCP/UDP checksum of `frame`
/// from scratch (pseudo-header included) and checks them against the fields.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    if is_fragment(frame) {
        // Only the IPv4 header checksum is in a fragment alone; the rows
        // compare the L4 checksum (in the first fragment) with etherparse's,
        // computed over the whole rewritten datagram.
        let ip = &frame[ETH_HLEN..];
        if ip[0] >> 4 == 4 && ones_sum(&ip[..IPV4_HLEN]) != 0xffff {
            return Err(format!("bad IPv4 header checksum in {:02x?}", &ip[..IPV4_HLEN]));
        }
        return Ok(());
    }
    let sliced = SlicedPacket::from_ethernet(frame).map_err(|e| format!("output does not parse: {e}"))?;
    let (mut pseudo, l4) = match &sliced.net {
        Some(NetSlice::Ipv4(v4)) => {
            let hdr = v4.header().slice();
            if ones_sum(hdr) != 0xffff {
                return Err(format!("bad IPv4 header checksum in {hdr:02x?}"));
            }
            let payload = v4.payload().payload;
            let mut p = Vec::new();
            p.extend_from_slice(&hdr[12..20]);
            p.extend_from_slice(&[0, v4.header().protocol().0]);
            p.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
            (p, payload)
        }
        Some(NetSlice::Ipv6(v6)) => {
            let hdr = v6.header().slice();
            let payload = v6.payload().payload;
            let mut p = Vec::new();
            p.extend_from_slice(&hdr[8..40]);
            p.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, v6.payload().ip_number.0]);
            (p, payload)
        }
        _ => return Err("output is not IP".to_owned()),
    };
    let is_v4 = matches!(sliced.net, Some(NetSlice::Ipv4(_)));
    match &sliced.transport {
        Some(TransportSlice::Udp(u)) if is_v4 && u.checksum() == 0 => return Ok(()), // no checksum
        Some(TransportSlice::Tcp(_) | TransportSlice::Udp(_)) => {}
        _ => return Err("output has no TCP/UDP".to_owned()),
    }
    pseudo.extend_from_slice(l4);
    if ones_sum(&pseudo) != 0xffff {
        return Err(format!("bad L4 checksum in {l4:02x?}"));
    }
    Ok(())
}
