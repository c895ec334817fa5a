//! Steering of pinned flows: a flow whose backend is terminating keeps that
//! backend, whatever kube-proxy's rules and the conntrack table say now.
//!
//! The agent writes one `PINS` entry per direction, learned from the kernel's
//! own translation (conntrack). A packet that matches one is rewritten here to
//! what netfilter would have made of it (DNAT to the backend, plus SNAT for
//! NodePort traffic to another node; and the reverse for replies) and
//! redirected straight to the outgoing interface with `bpf_redirect_neigh`. It
//! never reaches netfilter, so a missing or flushed conntrack entry cannot send
//! it elsewhere, and an existing one cannot translate it a second time.
//! Everything else is not touched.
//!
//! On an L3 device (`L2` = 0: ipip, `WireGuard`) a packet has no Ethernet
//! header, and `bpf_redirect_neigh` needs one in front of the IP header (the
//! kernel's `__bpf_redirect_neigh` drops the packet when the MAC header does
//! not come before the network header, then pulls 14 bytes). So a packet
//! steered from such a device first gets one, zeroed but for its ethertype,
//! as Cilium's `add_l2_hdr` does; the neighbour output writes the real one.
//! Redirecting to an L3 device needs nothing: its neighbour output adds no
//! link-layer header. A dead pin's RST is only answered on Ethernet devices.

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1},
    helpers::{
        bpf_csum_diff, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_head, bpf_skb_change_tail,
    },
    programs::TcContext,
};
use conndrain_common::{FAMILY_V4, FragKey, FragSteer, PROTO_TCP, Pin, WireKey, pin_flags, stats};

use crate::{
    maps::{CONFIG, FRAGS, PINS, count},
    parse::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, FRAG_FIRST, FRAG_FIRST_OPAQUE, FRAG_NONE, Packet, TCP_ACK, TCP_FIN, TCP_RST,
        TCP_SYN,
    },
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
// linux/bpf.h: flag of bpf_skb_store_bytes, flags of bpf_l{3,4}_csum_replace.
const BPF_F_RECOMPUTE_CSUM: u64 = 0x01;
const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;

/// Whether any flow may be pinned: while the agent says none is (the usual
/// case), the `PINS` lookup is skipped.
#[inline(always)]
pub fn any_pins() -> bool {
    CONFIG.get(0).is_none_or(|c| c.no_pins == 0)
}

/// Whether this packet's flow may be pinned (`Config::pin_filter`): most
/// packets are not, and skip the `PINS` lookup. A first fragment asks only
/// `any_pins`, since `steer` also forgets what an earlier datagram with its
/// IP id left in `FRAGS`.
#[inline(always)]
pub fn may_be_pinned(pkt: &Packet) -> bool {
    if pkt.frag != FRAG_NONE {
        return any_pins();
    }
    CONFIG.get(0).is_none_or(|c| c.may_be_pinned(&pkt.src, &pkt.dst, pkt.sport, pkt.dport))
}

/// `Some(verdict)` when the packet belonged to a pinned flow and was handled;
/// `None` to let it go on untouched. Not inlined, for a stack frame of its own.
/// `L2`: the link-layer header's length, as `parse::parse`.
#[inline(never)]
pub fn steer<const L2: usize>(ctx: &TcContext, pkt: &Packet) -> Option<i32> {
    if pkt.frag == FRAG_FIRST_OPAQUE {
        // Its later fragments could not follow it: the whole datagram goes to the stack.
        return None;
    }
    if pkt.frag == FRAG_FIRST {
        // Whatever an earlier datagram with this IP id left there: the entry
        // exists only while the latest first fragment was steered (below).
        forget_fragments(pkt);
    }
    let key = WireKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    };
    let pin = PINS.get_ptr_mut(&key)?;
    // SAFETY: a pointer into the map value; racing updates only blur the statistics.
    let pin = unsafe { &mut *pin };
    if pkt.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN {
        // Only established flows are pinned, so a pure SYN is a new
        // connection reusing the tuple (of a flow that closed, or whose pod
        // is gone): it is kube-proxy's to place. Both directions go; the
        // agent sees the pin gone and forgets it.
        unpin(&key, pin);
        return None;
    }
    pin.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    pin.packets = pin.packets.wrapping_add(1);
    if pkt.proto == PROTO_TCP {
        if pkt.tcp_flags & TCP_FIN != 0 {
            pin.flags |= pin_flags::FIN;
        }
        if pkt.tcp_flags & TCP_RST != 0 {
            pin.flags |= pin_flags::RST;
        }
    }
    if pin.flags & pin_flags::DEAD != 0 {
        if L2 == ETH_HLEN
            && pkt.proto == PROTO_TCP
            && pkt.tcp_flags & (TCP_RST | TCP_ACK) == TCP_ACK
            && reset(ctx, pkt).is_some()
        {
            count(stats::RESETS_SENT);
            return Some(TC_ACT_REDIRECT as i32);
        }
        // Nothing to steer to: let the stack deal with it.
        return None;
    }
    if pkt.ttl <= 1 {
        // Forwarding would drop it and answer ICMP time exceeded: leave both
        // to the stack, untouched (RFC 1812 5.3.1, RFC 8200 3).
        return None;
    }
    let pin = &*pin;
    // The helper only records where to send the packet (it fails only on
    // bad arguments); the redirect happens when we return its verdict. So it
    // goes first: when it fails, the packet is still untouched and goes on.
    let verdict = redirect_neigh(pkt.family, &pin.nexthop, pin.ifindex);
    if verdict != i64::from(TC_ACT_REDIRECT) {
        count(stats::STEER_FAILED);
        return None;
    }
    if L2 == 0 && push_eth(ctx, pkt).is_none() {
        count(stats::STEER_FAILED);
        return None;
    }
    if rewrite::<L2>(ctx, pkt, pin).is_none() {
        count(stats::STEER_FAILED);
        return None;
    }
    if pkt.frag == FRAG_FIRST {
        remember_fragments(pkt, pin);
    }
    count(stats::STEERED);
    Some(TC_ACT_REDIRECT as i32)
}

/// How long after its first fragment a later one still follows it: Linux's
/// default reassembly timeout (`ipfrag_time`, 30 s); a receiver drops a
/// datagram whose fragments take longer anyway. It bounds what a stale entry
/// (an IP id reused by another datagram whose first fragment has not come
/// yet) can misdirect.
const FRAG_TIMEOUT_NS: u64 = 30_000_000_000;

#[inline(always)]
fn frag_key(pkt: &Packet) -> FragKey {
    FragKey { src: pkt.src, dst: pkt.dst, id: pkt.frag_id, proto: pkt.proto, family: pkt.family, _pad: [0; 2] }
}

/// The first fragment of a datagram of a pinned flow was steered: its later
/// fragments are to follow it (`fragment`). Not inlined, for a stack frame
/// of its own.
#[inline(never)]
fn remember_fragments(pkt: &Packet, pin: &Pin) {
    let key = frag_key(pkt);
    let value = FragSteer {
        new_src: pin.new_src,
        new_dst: pin.new_dst,
        nexthop: pin.nexthop,
        ifindex: pin.ifindex,
        _pad: 0,
        first_ns: unsafe { bpf_ktime_get_ns() },
    };
    // When the LRU map is full it evicts another datagram's entry: that
    // datagram's later fragments then go to the stack and it is lost, as a
    // datagram is when a fragment is.
    let _ = FRAGS.insert(&key, &value, 0);
}

/// A first fragment that is not steered: none of its datagram's fragments are.
#[inline(never)]
fn forget_fragments(pkt: &Packet) {
    let _ = FRAGS.remove(&frag_key(pkt));
}

/// A later fragment (no ports, `parse::FRAG_LATER`): steered exactly as its
/// datagram's first fragment was, if that was steered less than
/// `FRAG_TIMEOUT_NS` ago; else left untouched, to the stack, as its first
/// fragment was (`steer` records only the datagrams it steers). So a
/// datagram's fragments never take both paths, except when a later fragment
/// overtakes its first: it finds no entry and goes to the stack, and that
/// datagram is lost.
///
/// Only the addresses change (the ports are in the first fragment), so only
/// the IPv4 header checksum is updated here: the L4 checksum, in the first
/// fragment, covers the whole datagram, and the first fragment's update
/// covered the pseudo-header's change. Not inlined, for a stack frame of its own.
/// `L2`: the link-layer header's length, as `parse::parse` (an L3 device's
/// fragment gets an Ethernet header pushed, as in `steer`).
#[inline(never)]
pub fn fragment<const L2: usize>(ctx: &TcContext, pkt: &Packet) -> Option<i32> {
    // SAFETY: a copy of a plain value out of the map.
    let f = *unsafe { FRAGS.get(&frag_key(pkt)) }?;
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(f.first_ns) > FRAG_TIMEOUT_NS || pkt.ttl <= 1 {
        return None;
    }
    if redirect_neigh(pkt.family, &f.nexthop, f.ifindex) != i64::from(TC_ACT_REDIRECT) {
        count(stats::STEER_FAILED);
        return None;
    }
    if L2 == 0 && push_eth(ctx, pkt).is_none() {
        count(stats::STEER_FAILED);
        return None;
    }
    if rewrite_fragment(ctx, pkt, &f).is_none() {
        count(stats::STEER_FAILED);
        return None;
    }
    count(stats::STEERED);
    Some(TC_ACT_REDIRECT as i32)
}

/// The L3 part of `rewrite`, for a later fragment: addresses and TTL (hop
/// limit), and for IPv4 the header checksum. The frame has an Ethernet
/// header by now (`push_eth` on L3 devices). `skb->csum`: as in `rewrite`,
/// the IPv4 changes cancel out with the header checksum's, and the IPv6 ones
/// are stored with `BPF_F_RECOMPUTE_CSUM`.
#[inline(always)]
fn rewrite_fragment(ctx: &TcContext, pkt: &Packet, f: &FragSteer) -> Option<()> {
    if pkt.family == FAMILY_V4 {
        for (off, old, new) in [(ETH_HLEN + 12, &pkt.src, &f.new_src), (ETH_HLEN + 16, &pkt.dst, &f.new_dst)] {
            let old = u32::from_ne_bytes([old[12], old[13], old[14], old[15]]);
            let new = u32::from_ne_bytes([new[12], new[13], new[14], new[15]]);
            if old != new {
                ctx.store(off, &new, 0).ok()?;
                ctx.l3_csum_replace(ETH_HLEN + 10, u64::from(old), u64::from(new), 4).ok()?;
            }
        }
        let old = u16::from_ne_bytes([pkt.ttl, pkt.proto]);
        let new = u16::from_ne_bytes([pkt.ttl - 1, pkt.proto]);
        ctx.store(ETH_HLEN + 8, &new, 0).ok()?;
        ctx.l3_csum_replace(ETH_HLEN + 10, u64::from(old), u64::from(new), 2).ok()?;
    } else {
        if pkt.src != f.new_src {
            ctx.store(ETH_HLEN + 8, &f.new_src, BPF_F_RECOMPUTE_CSUM).ok()?;
        }
        if pkt.dst != f.new_dst {
            ctx.store(ETH_HLEN + 24, &f.new_dst, BPF_F_RECOMPUTE_CSUM).ok()?;
        }
        ctx.store(ETH_HLEN + 7, &(pkt.ttl - 1), BPF_F_RECOMPUTE_CSUM).ok()?;
    }
    Some(())
}

/// Calls `bpf_redirect_neigh` towards `ifindex` and the neighbour `nexthop`
/// (IPv4-mapped for IPv4).
#[inline(always)]
fn redirect_neigh(family: u8, nexthop: &[u8; 16], ifindex: u32) -> i64 {
    let mut nh = if family == FAMILY_V4 {
        bpf_redir_neigh {
            nh_family: AF_INET,
            __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                ipv4_nh: u32::from_ne_bytes([nexthop[12], nexthop[13], nexthop[14], nexthop[15]]),
            },
        }
    } else {
        let n = *nexthop;
        bpf_redir_neigh {
            nh_family: AF_INET6,
            __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
                ipv6_nh: [
                    u32::from_ne_bytes([n[0], n[1], n[2], n[3]]),
                    u32::from_ne_bytes([n[4], n[5], n[6], n[7]]),
                    u32::from_ne_bytes([n[8], n[9], n[10], n[11]]),
                    u32::from_ne_bytes([n[12], n[13], n[14], n[15]]),
                ],
            },
        }
    };
    #[expect(clippy::cast_possible_truncation, reason = "the size of a small struct")]
    // SAFETY: `nh` is a valid `bpf_redir_neigh` on our stack, its size passed along.
    unsafe {
        bpf_redirect_neigh(ifindex, &raw mut nh, size_of::<bpf_redir_neigh>() as i32, 0)
    }
}

/// Puts a zeroed Ethernet header with the packet's ethertype in front of an
/// L3 device's packet, for `bpf_redirect_neigh` (see the module comment).
/// `skb->csum` is left alone: at TC ingress it never covers the MAC header
/// (the redirect adds it, `bpf_push_mac_rcsum`, and pulls it again). If the
/// rewrite fails after it, the packet goes on with the header in front: the
/// hook pulls `mac_len` (now 14) after the programs, so the stack gets the
/// IP packet as before.
#[inline(always)]
fn push_eth(ctx: &TcContext, pkt: &Packet) -> Option<()> {
    #[expect(clippy::cast_possible_truncation, reason = "14")]
    // SAFETY: the helper on our own skb; packet pointers are reloaded after it.
    let rc = unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_HLEN as u32, 0) };
    if rc != 0 {
        return None;
    }
    let ethertype = if pkt.family == FAMILY_V4 { ETH_P_IP } else { ETH_P_IPV6 };
    ctx.store(12, &ethertype.to_be_bytes(), 0).ok()
}

/// Removes both directions of the pin `pin` found at `key`. Not inlined:
/// the reverse key gets a stack frame of its own (`steer`'s is near the limit).
#[inline(never)]
fn unpin(key: &WireKey, pin: &Pin) {
    let rev = WireKey {
        src: pin.new_dst,
        dst: pin.new_src,
        sport: pin.new_dport,
        dport: pin.new_sport,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    };
    let _ = PINS.remove(&rev);
    let _ = PINS.remove(key);
}

/// Offset of the L4 checksum field, the L4 header being at `l4_off`.
#[inline(always)]
fn l4_csum_off(pkt: &Packet, l4_off: usize) -> usize {
    l4_off + if pkt.proto == PROTO_TCP { 16 } else { 6 }
}

/// Rewrites the packet as netfilter's NAT and forwarding would have: the
/// addresses and ports, the TTL (hop limit) decremented, and every checksum
/// fixed incrementally, `skb->csum` included (see below).
///
/// `skb->csum` (CHECKSUM_COMPLETE: the sum of everything after the L2
/// header, which a receiving NIC or veth may hand us) must follow each
/// change, or the receiver sees a "hw csum failure" and re-sums the packet.
/// No helper does that for a plain `bpf_skb_store_bytes` unless it is given
/// `BPF_F_RECOMPUTE_CSUM`. How each change nets out:
/// - IPv4 address: its change, the header checksum's and the L4 checksum's
///   sum to minus the address change, which is exactly what
///   `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` applies to `skb->csum`
///   (the kernel's `inet_proto_csum_replace4`). So the store and
///   `bpf_l3_csum_replace` leave `skb->csum` alone.
/// - IPv6 address: there is no header checksum, so the address change and
///   the L4 checksum's cancel out; but `bpf_l4_csum_replace` with
///   `BPF_F_PSEUDO_HDR` still applies minus the change to `skb->csum`, as for
///   IPv4. A 2025 patch ("bpf: Fix L4 csum update on IPv6 in
///   CHECKSUM_COMPLETE", Linux 6.16) added `BPF_F_IPV6` to skip that;
///   kernels without it (our floor is 5.10) refuse the flag as unknown, and
///   which stable releases took it varies. Instead, the address is stored
///   with `BPF_F_RECOMPUTE_CSUM`, which adds the change back: right on every
///   kernel, with or without the patch (the flag is never passed, and
///   without it the helper behaves as before).
/// - Ports: the port and the L4 checksum cancel out, and neither call
///   touches `skb->csum` (no `BPF_F_PSEUDO_HDR`); but a UDP checksum of 0
///   stays 0, so then the port is stored with `BPF_F_RECOMPUTE_CSUM`.
/// - IPv4 TTL: with the header checksum, cancels out (`bpf_l3_csum_replace`
///   never touches `skb->csum`). IPv6 hop limit: no checksum, so it is
///   stored with `BPF_F_RECOMPUTE_CSUM`.
/// The datapath tests run every rewrite with `BPF_F_TEST_SKB_CHECKSUM_COMPLETE`,
/// which fails the run when `skb->csum` does not match the packet.
///
/// The frame has an Ethernet header by now (`push_eth` for `L2` = 0), so
/// only the L4 offset parsed without one moves.
///
/// Not inlined: its buffers get a stack frame of their own, beside (not on
/// top of) `reset`'s.
#[inline(never)]
fn rewrite<const L2: usize>(ctx: &TcContext, pkt: &Packet, pin: &Pin) -> Option<()> {
    let l4_off = usize::from(pkt.l4_off) + ETH_HLEN - L2;
    let csum = l4_csum_off(pkt, l4_off);
    let l4_flags = if pkt.proto == PROTO_TCP { 0 } else { BPF_F_MARK_MANGLED_0 };
    if pkt.family == FAMILY_V4 {
        for (off, old, new) in [(ETH_HLEN + 12, &pkt.src, &pin.new_src), (ETH_HLEN + 16, &pkt.dst, &pin.new_dst)] {
            let old = u32::from_ne_bytes([old[12], old[13], old[14], old[15]]);
            let new = u32::from_ne_bytes([new[12], new[13], new[14], new[15]]);
            if old == new {
                continue;
            }
            ctx.store(off, &new, 0).ok()?;
            ctx.l3_csum_replace(ETH_HLEN + 10, u64::from(old), u64::from(new), 4).ok()?;
            ctx.l4_csum_replace(csum, u64::from(old), u64::from(new), BPF_F_PSEUDO_HDR | l4_flags | 4).ok()?;
        }
        // TTL and protocol are one 16-bit word of the header checksum.
        let old = u16::from_ne_bytes([pkt.ttl, pkt.proto]);
        let new = u16::from_ne_bytes([pkt.ttl - 1, pkt.proto]);
        ctx.store(ETH_HLEN + 8, &new, 0).ok()?;
        ctx.l3_csum_replace(ETH_HLEN + 10, u64::from(old), u64::from(new), 2).ok()?;
    } else {
        for (off, old, new) in [(ETH_HLEN + 8, pkt.src, pin.new_src), (ETH_HLEN + 24, pkt.dst, pin.new_dst)] {
            if old == new {
                continue;
            }
            let mut o = old;
            let mut n = new;
            // SAFETY: both buffers are 16 bytes on our stack.
            let diff = unsafe { bpf_csum_diff(o.as_mut_ptr().cast(), 16, n.as_mut_ptr().cast(), 16, 0) };
            if diff < 0 {
                return None;
            }
            ctx.store(off, &new, BPF_F_RECOMPUTE_CSUM).ok()?;
            #[expect(clippy::cast_sign_loss, reason = "checked non-negative")]
            ctx.l4_csum_replace(csum, 0, diff as u64, BPF_F_PSEUDO_HDR | l4_flags).ok()?;
        }
        ctx.store(ETH_HLEN + 7, &(pkt.ttl - 1), BPF_F_RECOMPUTE_CSUM).ok()?;
    }
    // A UDP datagram without a checksum (0, IPv4) keeps none: the helper
    // leaves the field alone, so nothing cancels the ports' change in
    // `skb->csum` and the store has to record it.
    let port_flags = if pkt.proto != PROTO_TCP && ctx.load::<u16>(csum).ok()? == 0 { BPF_F_RECOMPUTE_CSUM } else { 0 };
    for (off, old, new) in [(l4_off, pkt.sport, pin.new_sport), (l4_off + 2, pkt.dport, pin.new_dport)] {
        if old == new {
            continue;
        }
        let old = u16::from_ne_bytes(old.to_be_bytes());
        let new = u16::from_ne_bytes(new.to_be_bytes());
        ctx.store(off, &new, port_flags).ok()?;
        ctx.l4_csum_replace(csum, u64::from(old), u64::from(new), l4_flags | 2).ok()?;
    }
    Some(())
}

/// Turns a client's TCP segment for a pinned flow whose pod is gone into a
/// RST back to the client (RFC 9293 3.10.7.1: seq = the segment's ACK), and
/// sends it out where the segment came in. The client fails fast instead of
/// retransmitting into a black hole. Not inlined: its header buffers get a
/// stack frame of their own.
#[inline(never)]
fn reset(ctx: &TcContext, pkt: &Packet) -> Option<()> {
    let ack: [u8; 4] = ctx.load(usize::from(pkt.l4_off) + 8).ok()?;
    let macs: [u8; 12] = ctx.load(0).ok()?;
    let tcp: [u8; 20] = {
        let mut t = [0u8; 20];
        t[0..2].copy_from_slice(&pkt.dport.to_be_bytes());
        t[2..4].copy_from_slice(&pkt.sport.to_be_bytes());
        t[4..8].copy_from_slice(&ack);
        t[12] = 5 << 4;
        t[13] = TCP_RST;
        t
    };
    let ip_len;
    // Whether the headers are plain (no IPv4 options, no IPv6 extension
    // headers) is read from the packet, not from `pkt.l4_off`: Linux 6.1's
    // verifier, since `Packet` got its fragment fields, took the IPv4 branch
    // below for dead and jumped from it straight to the end (`bpftool prog
    // dump xlated` in the guest stage: no RST for a dead IPv4 pin, while 6.18
    // sent it), as if `l4_off` could never be 34 there.
    if pkt.family == FAMILY_V4 {
        if ctx.load::<u8>(ETH_HLEN).ok()? != 0x45 {
            return None; // IP options: not worth the verifier's trouble; the client times out as before.
        }
        ip_len = 20;
        let first: [u8; 2] = ctx.load(ETH_HLEN).ok()?;
        let mut ip = [0u8; 20];
        ip[0] = first[0];
        ip[1] = first[1];
        ip[2..4].copy_from_slice(&40u16.to_be_bytes());
        ip[8] = 64;
        ip[9] = PROTO_TCP;
        ip[12..16].copy_from_slice(&pkt.dst[12..16]);
        ip[16..20].copy_from_slice(&pkt.src[12..16]);
        let c = fold(csum(&ip)?);
        ip[10..12].copy_from_slice(&c.to_ne_bytes());
        let mut pseudo = [0u8; 32];
        pseudo[0..4].copy_from_slice(&pkt.dst[12..16]);
        pseudo[4..8].copy_from_slice(&pkt.src[12..16]);
        pseudo[9] = PROTO_TCP;
        pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
        pseudo[12..32].copy_from_slice(&tcp);
        let tc = fold(csum(&pseudo)?);
        shrink(ctx, ETH_HLEN + ip_len + 20)?;
        ctx.store(ETH_HLEN, &ip, 0).ok()?;
        store_tcp(ctx, ETH_HLEN + ip_len, tcp, tc)?;
    } else {
        if ctx.load::<u8>(ETH_HLEN + 6).ok()? != PROTO_TCP {
            return None; // extension headers: as above
        }
        ip_len = 40;
        let first: [u8; 4] = ctx.load(ETH_HLEN).ok()?;
        let mut ip = [0u8; 40];
        ip[0..4].copy_from_slice(&first);
        ip[4..6].copy_from_slice(&20u16.to_be_bytes());
        ip[6] = PROTO_TCP;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&pkt.dst);
        ip[24..40].copy_from_slice(&pkt.src);
        let mut pseudo = [0u8; 60];
        pseudo[0..16].copy_from_slice(&pkt.dst);
        pseudo[16..32].copy_from_slice(&pkt.src);
        pseudo[34..36].copy_from_slice(&20u16.to_be_bytes());
        pseudo[39] = PROTO_TCP;
        pseudo[40..60].copy_from_slice(&tcp);
        let tc = fold(csum(&pseudo)?);
        shrink(ctx, ETH_HLEN + ip_len + 20)?;
        ctx.store(ETH_HLEN, &ip, 0).ok()?;
        store_tcp(ctx, ETH_HLEN + ip_len, tcp, tc)?;
    }
    let mut swapped = [0u8; 12];
    swapped[0..6].copy_from_slice(&macs[6..12]);
    swapped[6..12].copy_from_slice(&macs[0..6]);
    ctx.store(0, &swapped, 0).ok()?;
    // SAFETY: reading the ingress interface index of our own skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // Out of the interface the segment came in on (egress: flags 0).
    unsafe { bpf_redirect(ifindex, 0) };
    Some(())
}

#[inline(always)]
fn store_tcp(ctx: &TcContext, off: usize, mut tcp: [u8; 20], csum: u16) -> Option<()> {
    tcp[16..18].copy_from_slice(&csum.to_ne_bytes());
    ctx.store(off, &tcp, 0).ok()
}

#[inline(always)]
fn shrink(ctx: &TcContext, len: usize) -> Option<()> {
    #[expect(clippy::cast_possible_truncation, reason = "a frame length")]
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) };
    (rc == 0).then_some(())
}

/// The 32-bit one's-complement sum of `buf` (a multiple of 4 bytes).
#[inline(always)]
fn csum<const N: usize>(buf: &[u8; N]) -> Option<u64> {
    let mut b = *buf;
    #[expect(clippy::cast_possible_truncation, reason = "N is a small header size")]
    // SAFETY: b is N bytes on our stack, N a multiple of 4.
    let s = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, b.as_mut_ptr().cast(), N as u32, 0) };
    #[expect(clippy::cast_sign_loss, reason = "checked non-negative")]
    (s >= 0).then_some(s as u64)
}

/// Folds a 32-bit sum into the 16-bit checksum field value (already in
/// network byte order as the sum was over network-order bytes).
#[inline(always)]
fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits")]
    !(s as u16)
}
