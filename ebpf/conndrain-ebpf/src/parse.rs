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

/// `repr(C)` with every byte a field (`_pad` included): `parse` writes a
/// `Packet` whole, so no byte of it is padding, which Linux 6.1's verifier
/// would see as uninitialized stack when the struct is copied. 8-aligned,
/// with the addresses first: `flow::words` reads each as two aligned words,
/// and the caller zeroes its slot as whole words (`parsed` in main.rs).
#[repr(C, align(8))]
pub struct Packet {
    /// IPv4 as IPv4-mapped IPv6, like `PodIpKey`.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The datagram's IP identification, when `frag` is not `FRAG_NONE`
    /// (IPv4: 16 bits; IPv6: the fragment header's 32), host byte order.
    pub frag_id: u32,
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub proto: u8,
    /// Offset of the TCP/UDP header. A `u16` at an offset that is not a
    /// multiple of 8, on purpose: Linux 6.1's verifier remembers a value
    /// stored at such an offset as "some bytes", not as the constant the
    /// parser's path wrote (34, 54, 62...), so the states after `parse`
    /// merge again. With `usize` at offset 32, the ingress program cost it
    /// 570k instructions (of its 1M limit) instead of about 100k: every
    /// header layout was verified through tracking and steering on its own
    /// (`cargo run --example verifier_cost` in the 6.1 guest measures it).
    pub l4_off: u16,
    /// TCP flags byte; 0 for UDP.
    pub tcp_flags: u8,
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
    pub _pad: [u8; 7],
}

/// Parses the packet into `out` and says whether it could.
///
/// Not inlined: the headers it loads get a stack frame of their own, leaving
/// room in the 512-byte budget for tracking and steering after it. Hence an
/// out-parameter and a `bool` in a register rather than an `Option<Packet>`
/// returned through the caller's stack: the verifier follows the register
/// into the caller's branch, but not a tag byte written to the stack, and
/// before Linux 6.3 it refuses the `Some` branch's reads of a packet that the
/// `None` path never wrote ("invalid read from stack"). `out` is written
/// whole on `true` (all of it fields, see `Packet`); the caller still zeroes
/// it first, for 6.1's verifier (`parsed` in main.rs says why), with word
/// stores: a 56-byte memset was a third of the cost of an unrelated packet.
#[inline(never)]
pub fn parse<const L2: usize>(ctx: &TcContext, out: *mut Packet) -> bool {
    let pkt = if L2 == 0 {
        // Two bytes, not one: for `data + 1 <= data_end` LLVM emits
        // `data < data_end`, from which the verifier grants no bytes.
        let Some(first) = load::<u16>(ctx, 0) else {
            return false;
        };
        let [first, _] = first.to_ne_bytes();
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
            // SAFETY: `out` is the caller's `MaybeUninit<Packet>`, written whole here.
            unsafe { out.write(pkt) };
            true
        }
        None => false,
    }
}

#[inline(always)]
fn parse_v4<const L2: usize>(ctx: &TcContext) -> Option<Packet> {
    // The fixed header in one read: version/IHL, TOS, total length; id,
    // flags and fragment offset; TTL, protocol, checksum; source; destination.
    let h: [u32; 5] = load(ctx, L2)?;
    let [vihl, _, len_hi, len_lo] = h[0].to_ne_bytes();
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    let total_len = u16::from_be_bytes([len_hi, len_lo]);
    if usize::from(total_len) < ihl {
        return None;
    }
    // Only a first fragment carries the ports; a later one is returned as
    // `FRAG_LATER`, with no ports, for steering alone.
    let [i0, i1, f0, f1] = h[1].to_ne_bytes();
    let [ttl, proto, _, _] = h[2].to_ne_bytes();
    let (src, dst) = (mapped(h[3]), mapped(h[4]));
    let frag_word = u16::from_be_bytes([f0, f1]);
    let frag_id = u32::from(u16::from_be_bytes([i0, i1]));
    if frag_word & 0x1fff != 0 {
        return later_fragment(FAMILY_V4, proto, src, dst, ttl, frag_id);
    }
    // More fragments (MF) at offset 0: the first of several.
    let frag = if frag_word & 0x2000 != 0 { FRAG_FIRST } else { FRAG_NONE };
    // The L4 header must lie within the IP packet (Linux trims to total_len and drops the rest).
    if L2 + ihl + l4_min(proto) > L2 + usize::from(total_len) {
        return None;
    }
    let (sport, dport, tcp_flags, l4_len) = parse_l4(ctx, proto, L2 + ihl)?;
    Some(Packet {
        src,
        dst,
        l4_off: l4_offset(L2 + ihl),
        frag_id,
        sport,
        dport,
        family: FAMILY_V4,
        proto,
        tcp_flags,
        ttl,
        data: proto == PROTO_TCP && usize::from(total_len) > ihl + l4_len,
        local: false,
        frag,
        _pad: [0; 7],
    })
}

/// `Packet::l4_off` from an offset the parser computed: within the first
/// few kilobytes of the packet (the IPv4 header is at most 60 bytes, each of
/// the `MAX_EXT_HEADERS` IPv6 ones at most 2 KiB).
#[inline(always)]
#[expect(clippy::cast_possible_truncation, reason = "see above: far below 64 KiB")]
fn l4_offset(off: usize) -> u16 {
    off as u16
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
        _pad: [0; 7],
    })
}

#[inline(always)]
fn parse_v6<const L2: usize>(ctx: &TcContext) -> Option<Packet> {
    // The fixed header in one read: version and flow label; payload length,
    // next header, hop limit; source; destination.
    let h: [u32; 10] = load(ctx, L2)?;
    let [vtc, _, _, _] = h[0].to_ne_bytes();
    if vtc >> 4 != 6 {
        return None;
    }
    let [len_hi, len_lo, mut next, hop_limit] = h[1].to_ne_bytes();
    let payload_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    let src = addr([h[2], h[3], h[4], h[5]]);
    let dst = addr([h[6], h[7], h[8], h[9]]);
    let mut off = L2 + 40;
    let mut frag = FRAG_NONE;
    let mut frag_id = 0;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            PROTO_TCP | PROTO_UDP => break,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let [hdr_next, hdr_len] = load::<u16>(ctx, off)?.to_ne_bytes();
                next = hdr_next;
                off += (usize::from(hdr_len) + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let hdr: [u32; 2] = load(ctx, off)?;
                let [hdr_next, _, w0, w1] = hdr[0].to_ne_bytes();
                let word = u16::from_be_bytes([w0, w1]);
                let id = u32::from_be(hdr[1]);
                if word & 0xfff8 != 0 {
                    return later_fragment(FAMILY_V6, hdr_next, src, dst, hop_limit, id);
                }
                // M (more fragments) at offset 0: the first of several.
                if word & 1 != 0 && frag != FRAG_FIRST_OPAQUE {
                    frag = if hdr_next == PROTO_TCP || hdr_next == PROTO_UDP { FRAG_FIRST } else { FRAG_FIRST_OPAQUE };
                    frag_id = id;
                }
                next = hdr_next;
                off += 8;
            }
            _ => return None,
        }
    }
    if off + l4_min(next) > L2 + 40 + payload_len {
        return None;
    }
    let (sport, dport, tcp_flags, l4_len) = parse_l4(ctx, next, off)?;
    Some(Packet {
        src,
        dst,
        l4_off: l4_offset(off),
        frag_id,
        sport,
        dport,
        family: FAMILY_V6,
        proto: next,
        tcp_flags,
        ttl: hop_limit,
        data: next == PROTO_TCP && L2 + 40 + payload_len > off + l4_len,
        local: false,
        frag,
        _pad: [0; 7],
    })
}

/// The smallest header of an L4 protocol we track.
/// Reads a `T` at `off`: straight from the packet when it lies in the
/// linear data (the usual case, and far cheaper than a helper call), else
/// through `bpf_skb_load_bytes`, which also reads paged data.
///
/// Callers read words (`u16`, `u32`, arrays of them), never byte arrays: the
/// BPF backend splits a read of an align-1 type into one load per byte.
#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + size_of::<T>() <= end {
        // SAFETY: the bounds check above keeps the read inside the packet
        // (the verifier checks it too); any bit pattern is a valid `T` here.
        // A plain read, not `read_unaligned`, which the BPF backend turns into
        // byte loads: headers sit at 2-byte offsets, and the verifier allows
        // unaligned packet reads where the CPU does them efficiently (x86-64,
        // arm64: `CONFIG_HAVE_EFFICIENT_UNALIGNED_ACCESS`); elsewhere it
        // refuses the program at load time, so the agent fails to start
        // rather than misread a packet.
        #[expect(clippy::cast_ptr_alignment, reason = "see above: the verifier allows unaligned packet reads")]
        return Some(unsafe { core::ptr::read((start + off) as *const T) });
    }
    ctx.load(off).ok()
}

#[inline(always)]
fn l4_min(proto: u8) -> usize {
    if proto == PROTO_TCP { 20 } else { 8 }
}

/// Ports, TCP flags and the L4 header's length.
#[inline(always)]
fn parse_l4(ctx: &TcContext, proto: u8, off: usize) -> Option<(u16, u16, u8, usize)> {
    match proto {
        PROTO_TCP => {
            // Ports, sequence, ack, then data offset and flags: the first 16
            // bytes in one read; a header cut short fails it.
            let h: [u32; 4] = load(ctx, off)?;
            let [doff, flags, _, _] = h[3].to_ne_bytes();
            if (doff >> 4) < 5 {
                return None;
            }
            let (s, d) = ports_of(h[0]);
            Some((s, d, flags, usize::from(doff >> 4) * 4))
        }
        PROTO_UDP => {
            let h: [u32; 2] = load(ctx, off)?;
            let (s, d) = ports_of(h[0]);
            Some((s, d, 0, 8))
        }
        _ => None,
    }
}

/// Source and destination port from the L4 header's first word.
#[inline(always)]
fn ports_of(w: u32) -> (u16, u16) {
    let [s0, s1, d0, d1] = w.to_ne_bytes();
    (u16::from_be_bytes([s0, s1]), u16::from_be_bytes([d0, d1]))
}

/// An IPv4 address (as read from the packet) as IPv4-mapped IPv6.
#[inline(always)]
fn mapped(v4: u32) -> [u8; 16] {
    addr([0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), v4])
}

/// 16 address bytes from four words read from the packet, in their order.
#[inline(always)]
fn addr(w: [u32; 4]) -> [u8; 16] {
    // SAFETY: same size, and every bit pattern is valid for both.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(w) }
}
