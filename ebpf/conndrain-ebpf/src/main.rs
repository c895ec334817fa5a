//! conndrain's programs. The two TC programs, attached on the host side of
//! the interfaces that lead to the pods (a pod's veth, or each port of a
//! bridge; with steering, every interface, L3 devices getting the `_l3`
//! variants built for packets without an Ethernet header), track every TCP/UDP flow of the registered pods; the sockets
//! tracepoint keeps the pods' open inbound TCP sockets, the ground truth a
//! drain is confirmed against. The cgroup programs intercept the kubelet's
//! preStop `httpGet` to a pod (`intercept.rs`).
//!
//! Tracking never changes a packet and returns `TC_ACT_UNSPEC`: "no verdict,
//! go on". With tcx that is `TCX_NEXT` and with clsact it continues the filter
//! chain, so programs other tools attached after ours still run, and with
//! none left the packet takes its normal path. Only the packets of a pinned
//! flow are changed: steering rewrites and redirects them (`steer.rs`). The
//! datapath fails open: a bug here can lose tracking but never traffic.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic_xadd: see flow::atomic_add")]

mod flow;
mod intercept;
mod maps;
mod parse;
mod sockets;
mod steer;

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{cgroup_skb, cgroup_sock_addr, classifier, sock_ops, tracepoint},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext, TcContext, TracePointContext},
};
use conndrain_common::stats;

/// Packets entering the host from the interface: sent by a pod behind it,
/// or (on uplinks) by clients. Tracked, then steered if their flow is pinned.
#[classifier]
pub fn conndrain_ingress(ctx: TcContext) -> i32 {
    ingress::<{ parse::ETH_HLEN }>(&ctx)
}

/// `conndrain_ingress` for L3 devices (ipip, `WireGuard`: no Ethernet header),
/// which the agent attaches instead by the device's type.
#[classifier]
pub fn conndrain_in_l3(ctx: TcContext) -> i32 {
    ingress::<0>(&ctx)
}

#[inline(always)]
fn ingress<const L2: usize>(ctx: &TcContext) -> i32 {
    let mut slot = core::mem::MaybeUninit::uninit();
    let Some(pkt) = parsed::<L2>(ctx, &mut slot) else {
        return TC_ACT_UNSPEC;
    };
    if pkt.frag == parse::FRAG_LATER {
        // No ports, so not tracked; steered if its datagram's first fragment was.
        if !steer::any_pins() {
            return TC_ACT_UNSPEC;
        }
        return steer::fragment::<L2>(ctx, pkt).unwrap_or(TC_ACT_UNSPEC);
    }
    track(ctx, flow::Side::FromPod, pkt);
    if !steer::may_be_pinned(pkt) {
        return TC_ACT_UNSPEC;
    }
    steer::steer::<L2>(ctx, pkt).unwrap_or(TC_ACT_UNSPEC)
}

/// `conndrain_ingress` without steering: what the agent attaches on kernels
/// that have no `bpf_redirect_neigh` (before 5.10), where the verifier refuses
/// the program that calls it. Tracking only.
#[classifier]
pub fn conndrain_track(ctx: TcContext) -> i32 {
    let mut slot = core::mem::MaybeUninit::uninit();
    if let Some(pkt) = parsed::<{ parse::ETH_HLEN }>(&ctx, &mut slot)
        && pkt.frag != parse::FRAG_LATER
    {
        track(&ctx, flow::Side::FromPod, pkt);
    }
    TC_ACT_UNSPEC
}

/// Packets leaving the host through the interface: sent to a pod behind it.
#[classifier]
pub fn conndrain_egress(ctx: TcContext) -> i32 {
    egress::<{ parse::ETH_HLEN }>(&ctx)
}

/// `conndrain_egress` for L3 devices, as `conndrain_in_l3`.
#[classifier]
pub fn conndrain_eg_l3(ctx: TcContext) -> i32 {
    egress::<0>(&ctx)
}

#[inline(always)]
fn egress<const L2: usize>(ctx: &TcContext) -> i32 {
    let mut slot = core::mem::MaybeUninit::uninit();
    if let Some(pkt) = parsed::<L2>(ctx, &mut slot)
        && pkt.frag != parse::FRAG_LATER
    {
        pkt.local = flow::local_origin(ctx);
        track(ctx, flow::Side::ToPod, pkt);
    }
    TC_ACT_UNSPEC
}

/// Tracks the packet's flow; counts it in `NOT_POD` when it is no pod's.
#[inline(always)]
fn track(ctx: &TcContext, side: flow::Side, pkt: &parse::Packet) {
    if !flow::track(ctx, side, pkt) {
        maps::count(stats::NOT_POD);
    }
}

/// `sock:inet_sock_set_state`: every TCP socket state change on the node,
/// in every network namespace.
#[tracepoint]
pub fn conndrain_sockets(ctx: TracePointContext) -> u32 {
    let _ = sockets::on_state(&ctx);
    0
}

/// `cgroup/connect4`: the kubelet's preStop `httpGet` to a registered pod
/// goes to the agent instead (`intercept.rs`). Always allows the connect.
#[cgroup_sock_addr(connect4)]
pub fn conndrain_icpt4(ctx: SockAddrContext) -> i32 {
    let _ = intercept::connect4(&ctx);
    1
}

/// `cgroup/connect6`: as `conndrain_icpt4`, for IPv6 sockets.
#[cgroup_sock_addr(connect6)]
pub fn conndrain_icpt6(ctx: SockAddrContext) -> i32 {
    let _ = intercept::connect6(&ctx);
    1
}

/// `sockops`: the local port of each connection the two above rewrote.
#[sock_ops]
pub fn conndrain_icptp(ctx: SockOpsContext) -> u32 {
    let _ = intercept::on_connect(&ctx);
    1
}

/// `cgroup_skb/egress`: drops the SYN of a connection rewritten above while
/// nothing listens on the agent's loopback port (the agent is restarting), so
/// the kubelet's connect is retried by the kernel instead of refused.
#[cgroup_skb(egress)]
pub fn conndrain_icpth(ctx: SkBuffContext) -> i32 {
    i32::from(!intercept::hold_syn(&ctx))
}

/// Parses the packet into `slot` and returns it there: a reference, not
/// an `Option<Packet>`, which LLVM copied twice through the stack.
#[inline(always)]
fn parsed<'a, const L2: usize>(
    ctx: &TcContext,
    slot: &'a mut core::mem::MaybeUninit<parse::Packet>,
) -> Option<&'a mut parse::Packet> {
    maps::count(stats::PACKETS);
    // Zeroed first: Linux 6.1's verifier, given a slot `parse` fills from
    // uninitialized stack, explored the tracking code once per path through
    // the parser and gave up at a million instructions. Seven volatile word
    // stores: LLVM turns plain ones into a call to a byte-by-byte memset.
    let words = slot.as_mut_ptr().cast::<u64>();
    for i in 0..size_of::<parse::Packet>() / 8 {
        // SAFETY: `Packet` is 8-aligned and a multiple of 8 bytes (`_pad`).
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    if parse::parse::<L2>(ctx, slot.as_mut_ptr()) {
        // SAFETY: `parse` wrote all of it when it returns true.
        let pkt = unsafe { slot.assume_init_mut() };
        if pkt.frag == parse::FRAG_LATER {
            // Not tracked (no ports): counted as before this kind was parsed.
            maps::count(stats::UNPARSED);
        }
        Some(pkt)
    } else {
        maps::count(stats::UNPARSED);
        None
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
