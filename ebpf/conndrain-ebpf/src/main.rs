//! conndrain's TC programs: attached on the host side of the interface that
//! routes to a pod, they track every TCP/UDP flow of the registered pods.
//!
//! They never change a packet and always return `TC_ACT_UNSPEC`: "no verdict,
//! go on". With tcx that is `TCX_NEXT` and with clsact it continues the filter
//! chain, so programs other tools attached after ours still run, and with
//! none left the packet takes its normal path. The datapath fails open: a bug
//! here can lose tracking but never traffic. (`TC_ACT_OK` would also pass the
//! packet, but would end the chain and silently skip those other programs.)
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic_xadd: see flow::atomic_add")]

mod flow;
mod maps;
mod parse;
mod steer;

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use conndrain_common::stats;

/// Packets entering the host from the interface: sent by a pod behind it,
/// or (on uplinks) by clients. Tracked, then steered if their flow is pinned.
#[classifier]
pub fn conndrain_ingress(ctx: TcContext) -> i32 {
    let Some(pkt) = parsed(&ctx) else { return TC_ACT_UNSPEC };
    flow::track(&ctx, flow::Side::FromPod, &pkt);
    if !steer::any_pins() {
        return TC_ACT_UNSPEC;
    }
    steer::steer(&ctx, &pkt).unwrap_or(TC_ACT_UNSPEC)
}

/// `conndrain_ingress` without steering: what the agent attaches on kernels
/// that have no `bpf_redirect_neigh` (before 5.10), where the verifier refuses
/// the program that calls it. Tracking only.
#[classifier]
pub fn conndrain_track(ctx: TcContext) -> i32 {
    if let Some(pkt) = parsed(&ctx) {
        flow::track(&ctx, flow::Side::FromPod, &pkt);
    }
    TC_ACT_UNSPEC
}

/// Packets leaving the host through the interface: sent to a pod behind it.
#[classifier]
pub fn conndrain_egress(ctx: TcContext) -> i32 {
    if let Some(pkt) = parsed(&ctx) {
        flow::track(&ctx, flow::Side::ToPod, &pkt);
    }
    TC_ACT_UNSPEC
}

#[inline(always)]
fn parsed(ctx: &TcContext) -> Option<parse::Packet> {
    maps::count(stats::PACKETS);
    let pkt = parse::parse(ctx);
    if pkt.is_none() {
        maps::count(stats::UNPARSED);
    }
    pkt
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
