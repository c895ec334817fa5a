//! Packet parsing: Ethernet, IPv4/IPv6 (with extension headers), TCP/UDP ports
//! and flags. Anything we cannot read with confidence yields `None`, and the
//! caller passes the packet untouched.
//!
//! `L2` is the length of the link-layer header in front of the IP header:
//! `ETH_HLEN` on Ethernet devices, 0 on L3 devices (ipip, `WireGuard`, GRE:
//! their packets start at the IP header at TC, and the IP version says the
//! family). Each program is built for one, so no packet pays for the choice.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use conndrain_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;

// IPv6 extension headers we walk through to reach TCP/UDP.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Chains longer than this are passed untracked: the verifier needs a bound
/// and real traffic carries one or two.
const MAX_EXT_HEADERS: usize = 6;

/// `Packet::frag`: not a fragment (or an IPv6 "atomic" one, offset 0 and no
/// more fragments: the whole datagram).
pub const FRAG_NONE: u8 = 0;
/// The first fragment of a datagram: it has the L4 header, ports and checksum.
pub const FRAG_FIRST: u8 = 1;
/// A later fragment (offset not 0): no L4 header, so no ports. Only its
/// addresses, `frag_id`, protocol and TTL are filled in; it is not tracked,
/// only steered the way its first fragment was (`steer::fragment`).
pub const FRAG_LATER: u8 = 2;
/// An IPv6 first fragment whose fragment header is followed by more
/// extension headers: its later fragments name that header, not TCP or UDP,
/// so they could not be matched to it. Tracked, never steered: the whole
/// datagram goes to the stack.
pub const FRAG_FIRST_OPAQUE: u8 = 3;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub struct Packet {
    pub family: u8,
    pub proto: u8,
    /// IPv4 as IPv4-mapped IPv6, like `PodIpKey`.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
    /// Offset of the TCP/UDP header.
    pub l4_off: usize,
    /// IPv4 TTL or IPv6 hop limit: steering forwards the packet, so it
    /// decrements it (and leaves a packet that would expire to the stack).
    pub ttl: u8,
    /// A TCP segment that carries data (not a bare ACK, SYN or FIN): what
    /// tells a request in flight from an idle connection.
    pub data: bool,
    /// Sent by a process of the node itself (set by the egress program),
    /// not forwarded.
    pub local: bool,
    /// `FRAG_*`.
    pub frag: u8,
    /// The datagram's IP identification, when `frag` is not `FRAG_NONE`
    /// (IPv4: 16 bits; IPv6: the fragment header's 32), host byte order.
    pub frag_id: u32,
}

/// Parses the packet into `out` and says whether it could.
///
/// Not inlined: the headers it loads get a stack frame of their own, leaving
/// room in the 512-byte budget for tracking and steering after it. Hence an
/// out-parameter and a `bool` in a register rather than an `Option<Packet>`
/// returned through the caller's stack: the verifier follows the register
/// into the caller's branch, but not a tag byte written to the stack, and
/// before Linux 6.3 it refuses the `Some` branch's reads of a packet that the
/// `None` path never wrote ("invalid read from stack"). The caller zeroes
/// `out` first for the same reason.
#[inline(never)]
pub fn parse<const L2: usize>(ctx: &TcContext, out: &mut Packet) -> bool {
    let pkt = if L2 == 0 {
        // Two bytes, not one: for `data + 1 <= data_end` LLVM emits
        // `data < data_end`, from which the verifier grants no bytes.
        let Some([first, _]) = load::<[u8; 2]>(ctx, 0) else {
            return false;
        };
        match first >> 4 {
            4 => parse_v4::<L2>(ctx),
            6 => parse_v6::<L2>(ctx),
            _ => None,
        }
    } else {
        let Some(ethertype) = load::<u16>(ctx, 12) else {
            return false;
        };
        match u16::from_be(ethertype) {
            ETH_P_IP => parse_v4::<L2>(ctx),
            ETH_P_IPV6 => parse_v6::<L2>(ctx),
            _ => None,
        }
    };
    match pkt {
        Some(pkt) => {
            *out = pkt;
            true
        }
        None => false,
    }
}

#[inline(always)]
fn parse_v4<const L2: usize>(ctx: &TcContext) -> Option<Packet> {
    // Two bytes: see `parse` (at offset 0 on an L3 device).
    let [vihl, _]: [u8; 2] = load(ctx, L2)?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    let total_len = u16::from_be(load::<u16>(ctx, L2 + 2)?);
    if usize::from(total_len) < ihl {
        return None;
    }
    // Identification (bytes 4-5), flags and fragment offset (6-7), TTL,
    // protocol. Only a first fragment carries the ports; a later one is
    // returned as `FRAG_LATER`, with no ports, for steering alone.
    let [i0, i1, f0, f1, ttl, proto]: [u8; 6] = load(ctx, L2 + 4)?;
    let src: [u8; 4] = load(ctx, L2 + 12)?;
    let dst: [u8; 4] = load(ctx, L2 + 16)?;
    let frag_word = u16::from_be_bytes([f0, f1]);
    let frag_id = u32::from(u16::from_be_bytes([i0, i1]));
    if frag_word & 0x1fff != 0 {
        return later_fragment(FAMILY_V4, proto, mapped(src), mapped(dst), ttl, frag_id);
    }
    // More fragments (MF) at offset 0: the first of several.
    let frag = if frag_word & 0x2000 != 0 { FRAG_FIRST } else { FRAG_NONE };
    // The L4 header must lie within the IP packet (Linux trims to total_len and drops the rest).
    if L2 + ihl + l4_min(proto) > L2 + usize::from(total_len) {
        return None;
    }
    let (sport, dport, tcp_flags, l4_len) = parse_l4(ctx, proto, L2 + ihl)?;
    Some(Packet {
        family: FAMILY_V4,
        proto,
        src: mapped(src),
        dst: mapped(dst),
        sport,
        dport,
        tcp_flags,
        l4_off: L2 + ihl,
        ttl,
        data: proto == PROTO_TCP && usize::from(total_len) > ihl + l4_len,
        local: false,
        frag,
        frag_id,
    })
}

/// A later fragment of a TCP or UDP datagram (`FRAG_LATER`); `None` for
/// other protocols.
#[inline(always)]
fn later_fragment(family: u8, proto: u8, src: [u8; 16], dst: [u8; 16], ttl: u8, frag_id: u32) -> Option<Packet> {
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    Some(Packet {
        family,
        proto,
        src,
        dst,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        l4_off: 0,
        ttl,
        data: false,
        local: false,
        frag: FRAG_LATER,
        frag_id,
    })
}

#[inline(always)]
fn parse_v6<const L2: usize>(ctx: &TcContext) -> Option<Packet> {
    let [vtc, _]: [u8; 2] = load(ctx, L2)?;
    if vtc >> 4 != 6 {
        return None;
    }
    let [mut next, hop_limit]: [u8; 2] = load(ctx, L2 + 6)?;
    let src: [u8; 16] = load(ctx, L2 + 8)?;
    let dst: [u8; 16] = load(ctx, L2 + 24)?;
    let mut off = L2 + 40;
    let mut frag = FRAG_NONE;
    let mut frag_id = 0;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            PROTO_TCP | PROTO_UDP => break,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let hdr: [u8; 2] = load(ctx, off)?;
                next = hdr[0];
                off += (usize::from(hdr[1]) + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let hdr: [u8; 8] = load(ctx, off)?;
                let word = u16::from_be_bytes([hdr[2], hdr[3]]);
                let id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                if word & 0xfff8 != 0 {
                    return later_fragment(FAMILY_V6, hdr[0], src, dst, hop_limit, id);
                }
                // M (more fragments) at offset 0: the first of several.
                if word & 1 != 0 && frag != FRAG_FIRST_OPAQUE {
                    frag = if hdr[0] == PROTO_TCP || hdr[0] == PROTO_UDP { FRAG_FIRST } else { FRAG_FIRST_OPAQUE };
                    frag_id = id;
                }
                next = hdr[0];
                off += 8;
            }
            _ => return None,
        }
    }
    let payload_len = usize::from(u16::from_be(load::<u16>(ctx, L2 + 4)?));
    if off + l4_min(next) > L2 + 40 + payload_len {
        return None;
    }
    let (sport, dport, tcp_flags, l4_len) = parse_l4(ctx, next, off)?;
    Some(Packet {
        family: FAMILY_V6,
        proto: next,
        src,
        dst,
        sport,
        dport,
        tcp_flags,
        l4_off: off,
        ttl: hop_limit,
        data: next == PROTO_TCP && L2 + 40 + payload_len > off + l4_len,
        local: false,
        frag,
        frag_id,
    })
}

/// The smallest header of an L4 protocol we track.
/// Reads a `T` at `off`: straight from the packet when it lies in the
/// linear data (the usual case, and far cheaper than a helper call), else
/// through `bpf_skb_load_bytes`, which also reads paged data.
#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + size_of::<T>() <= end {
        // SAFETY: the bounds check above keeps the read inside the packet
        // (the verifier checks it too); any bit pattern is a valid `T` here.
        return Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) });
    }
    ctx.load(off).ok()
}

#[inline(always)]
fn l4_min(proto: u8) -> usize {
    if proto == PROTO_TCP { 20 } else { 8 }
}

#[inline(always)]
/// Ports, TCP flags and the L4 header's length.
fn parse_l4(ctx: &TcContext, proto: u8, off: usize) -> Option<(u16, u16, u8, usize)> {
    match proto {
        PROTO_TCP => {
            // Ports, then the flags byte at offset 13; a header cut short fails a load.
            let ports: [u8; 4] = load(ctx, off)?;
            let doff_flags: [u8; 2] = load(ctx, off + 12)?;
            if (doff_flags[0] >> 4) < 5 {
                return None;
            }
            let (s, d) = ports_of(ports);
            Some((s, d, doff_flags[1], usize::from(doff_flags[0] >> 4) * 4))
        }
        PROTO_UDP => {
            let hdr: [u8; 8] = load(ctx, off)?;
            let (s, d) = ports_of([hdr[0], hdr[1], hdr[2], hdr[3]]);
            Some((s, d, 0, 8))
        }
        _ => None,
    }
}

#[inline(always)]
fn ports_of(b: [u8; 4]) -> (u16, u16) {
    (u16::from_be_bytes([b[0], b[1]]), u16::from_be_bytes([b[2], b[3]]))
}

#[inline(always)]
fn mapped(v4: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]
}
