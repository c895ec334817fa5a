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

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};

/// Packets entering the host from the interface: sent by a pod behind it.
#[classifier]
pub fn conndrain_ingress(ctx: TcContext) -> i32 {
    flow::track(&ctx, flow::Side::FromPod);
    TC_ACT_UNSPEC
}

/// Packets leaving the host through the interface: sent to a pod behind it.
#[classifier]
pub fn conndrain_egress(ctx: TcContext) -> i32 {
    flow::track(&ctx, flow::Side::ToPod);
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
