//! The preStop intercept: the kubelet's `lifecycle.preStop.httpGet` to
//! `podIP:port` is sent to the agent's loopback listener instead of the pod,
//! so an app needs no conndrain binary for its preStop hook.
//!
//! `cgroup/connect4` and `cgroup/connect6` (attached to a cgroup: the cgroup2
//! root by default, so the kubelet is under it) rewrite a TCP connect when
//! all of these hold, and leave every other connect alone:
//! - the socket is in the node's network namespace (its netns cookie is the
//!   agent's): a process in a pod's namespace is never touched;
//! - the destination port is the intercept port;
//! - the destination IP is a registered pod's (`POD_IPS`).
//!
//! The rewrite records the dialled pod address by socket cookie. The local
//! port is not chosen yet at connect time, so the sock_ops program, at
//! `BPF_SOCK_OPS_TCP_CONNECT_CB` (before the SYN leaves), moves the record to
//! `INTERCEPT_PEERS` under the client's (loopback address, port): what the
//! agent sees as the peer when it accepts, and looks up to learn which pod
//! the kubelet asked for.
//!
//! The `cgroup_skb/egress` program holds an intercepted connection back while
//! no agent listens (the agent is restarting; with `--bpffs` the programs
//! above stay attached): it drops the connection's SYN when no socket
//! listens on its destination (`bpf_sk_lookup_tcp`). `tcp_connect` ignores
//! any error but `ECONNREFUSED`, so the kernel retransmits the SYN (after 1,
//! 2, 4 ... s) and `connect()` waits, until an agent listens again, or until
//! `tcp_syn_retries` is spent (about 127 s): a fail-open sleep instead of a
//! refusal.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext},
};
use conndrain_common::{InterceptConfig, InterceptDst, InterceptPeer, PROTO_TCP, PodIpKey};

use crate::maps::{INTERCEPT_CONFIG, INTERCEPT_CONNECTS, INTERCEPT_PEERS, POD_IPS};

// linux/socket.h
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// A context field, read as one load at its constant offset from the context
/// pointer: the verifier refuses context reads through a computed pointer,
/// which is what LLVM makes of plain reads whose bytes it then shuffles
/// (it merges them into one loop over the context).
macro_rules! ctx_read {
    ($field:expr) => {
        // SAFETY: a field of the program's context, which the kernel lets it read.
        unsafe { core::ptr::read_volatile(&raw const $field) }
    };
}

/// A context field written as one store (see `ctx_read!`).
macro_rules! ctx_write {
    ($field:expr, $value:expr) => {
        // SAFETY: a field of the program's context that this program type may rewrite.
        unsafe { core::ptr::write_volatile(&raw mut $field, $value) }
    };
}

/// IPv4 `a.b.c.d` as the IPv4-mapped IPv6 address `::ffff:a.b.c.d`, from
/// the network-order word the kernel hands us.
#[inline(always)]
fn mapped_v4(ip4: u32) -> [u8; 16] {
    let b = ip4.to_ne_bytes();
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3]]
}

#[inline(always)]
fn v6(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// The settings, when the intercept is on and this connect is a candidate
/// (TCP, to the intercept port, from the node's network namespace).
#[inline(always)]
fn candidate(ctx: &SockAddrContext) -> Option<InterceptConfig> {
    let cfg = *INTERCEPT_CONFIG.get(0)?;
    if cfg.pod_port == 0 {
        return None;
    }
    let sa = ctx.sock_addr;
    let (protocol, port) = (ctx_read!((*sa).protocol), ctx_read!((*sa).user_port));
    // `user_port` holds the port in network byte order in its low 16 bits.
    if protocol != u32::from(PROTO_TCP) || port != u32::from(cfg.pod_port.to_be()) {
        return None;
    }
    // SAFETY: the helper only reads the socket behind the context.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != cfg.netns_cookie {
        return None;
    }
    Some(cfg)
}

/// Records the dialled pod address under the socket's cookie; `None` when
/// `addr` is no registered pod or the record cannot be kept (then the connect
/// goes where it was going: the pod's own port).
#[inline(always)]
fn record(ctx: &SockAddrContext, addr: [u8; 16], port: u16) -> Option<()> {
    // SAFETY: read-only lookup.
    unsafe { POD_IPS.get(&PodIpKey { addr }) }?;
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    INTERCEPT_CONNECTS.insert(&cookie, &InterceptDst { addr, port, _pad: 0 }, 0).ok()
}

pub fn connect4(ctx: &SockAddrContext) -> Option<()> {
    let cfg = candidate(ctx)?;
    let sa = ctx.sock_addr;
    let dst = mapped_v4(ctx_read!((*sa).user_ip4));
    record(ctx, dst, cfg.pod_port)?;
    ctx_write!((*sa).user_ip4, u32::from_ne_bytes([127, 0, 0, 1]));
    ctx_write!((*sa).user_port, u32::from(cfg.listen_port.to_be()));
    Some(())
}

pub fn connect6(ctx: &SockAddrContext) -> Option<()> {
    let cfg = candidate(ctx)?;
    let sa = ctx.sock_addr;
    // An IPv4-mapped destination (an IPv6 socket dialling IPv4) is already a
    // `POD_IPS` key as it is.
    let dst = v6([
        ctx_read!((*sa).user_ip6[0]),
        ctx_read!((*sa).user_ip6[1]),
        ctx_read!((*sa).user_ip6[2]),
        ctx_read!((*sa).user_ip6[3]),
    ]);
    record(ctx, dst, cfg.pod_port)?;
    ctx_write!((*sa).user_ip6[0], 0);
    ctx_write!((*sa).user_ip6[1], 0);
    ctx_write!((*sa).user_ip6[2], 0);
    ctx_write!((*sa).user_ip6[3], u32::from_ne_bytes([0, 0, 0, 1]));
    ctx_write!((*sa).user_port, u32::from(cfg.listen_port.to_be()));
    Some(())
}

/// At `BPF_SOCK_OPS_TCP_CONNECT_CB` (the local port is bound, no SYN sent
/// yet): a connect rewritten above moves to `INTERCEPT_PEERS` under its
/// local address and port. Every other op and socket: one comparison, or one
/// lookup that misses.
pub fn on_connect(ctx: &SockOpsContext) -> Option<()> {
    if ctx_read!((*ctx.ops).op) != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return None;
    }
    // SAFETY: the helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out before the delete below.
    let dst = *unsafe { INTERCEPT_CONNECTS.get(&cookie) }?;
    let _ = INTERCEPT_CONNECTS.remove(&cookie);
    let ops = ctx.ops;
    // Both families' fields, before the family is looked at: read in the
    // match arms, LLVM merges them into one load through a computed pointer.
    let ip4 = ctx_read!((*ops).local_ip4);
    let ip6 = [
        ctx_read!((*ops).local_ip6[0]),
        ctx_read!((*ops).local_ip6[1]),
        ctx_read!((*ops).local_ip6[2]),
        ctx_read!((*ops).local_ip6[3]),
    ];
    let addr = match ctx_read!((*ops).family) {
        AF_INET => mapped_v4(ip4),
        AF_INET6 => v6(ip6),
        _ => return None,
    };
    let peer = InterceptPeer { addr, port: u16::try_from(ctx_read!((*ops).local_port)).ok()?, _pad: 0 };
    INTERCEPT_PEERS.insert(&peer, &dst, 0).ok()
}

// linux/if_ether.h, linux/in.h, tcp flags.
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Whether to drop this packet: the SYN of a connection the programs above
/// rewrote (it has an `INTERCEPT_PEERS` entry) while no socket listens on
/// the agent's loopback address and port. Every other packet: a protocol and
/// address comparison, and kept.
pub fn hold_syn(ctx: &SkBuffContext) -> bool {
    held(ctx).is_some()
}

#[inline(always)]
fn held(ctx: &SkBuffContext) -> Option<()> {
    let cfg = *INTERCEPT_CONFIG.get(0)?;
    if cfg.pod_port == 0 {
        return None;
    }
    // `protocol` holds the ethertype in network byte order in its low 16 bits.
    #[expect(clippy::cast_possible_truncation, reason = "a 16-bit field")]
    let ethertype = u16::from_be(ctx_read!((*ctx.skb.skb).protocol) as u16);
    // SAFETY: plain integers; all zeroes is a valid tuple. The packet starts at its network header.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let (peer, l4, size) = if ethertype == ETH_P_IP {
        let vihl: u8 = ctx.load(0).ok()?;
        let proto: u8 = ctx.load(9).ok()?;
        let daddr: [u8; 4] = ctx.load(16).ok()?;
        if proto != IPPROTO_TCP || daddr != [127, 0, 0, 1] {
            return None;
        }
        let saddr: [u8; 4] = ctx.load(12).ok()?;
        let l4 = usize::from(vihl & 0x0f) * 4;
        tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: u32::from_ne_bytes(saddr),
            daddr: u32::from_ne_bytes(daddr),
            sport: 0,
            dport: 0,
        };
        (mapped_v4(u32::from_ne_bytes(saddr)), l4, size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>())
    } else if ethertype == ETH_P_IPV6 {
        let next: u8 = ctx.load(6).ok()?;
        let daddr: [u8; 16] = ctx.load(24).ok()?;
        if next != IPPROTO_TCP || daddr != [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1] {
            return None;
        }
        let saddr: [u8; 16] = ctx.load(8).ok()?;
        let words = |a: [u8; 16]| {
            [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ]
        };
        tuple.__bindgen_anon_1.ipv6 =
            bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 { saddr: words(saddr), daddr: words(daddr), sport: 0, dport: 0 };
        (saddr, 40, size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>())
    } else {
        return None;
    };
    let ports: [u8; 4] = ctx.load(l4).ok()?;
    if u16::from_be_bytes([ports[2], ports[3]]) != cfg.listen_port {
        return None;
    }
    let flags: u8 = ctx.load(l4 + 13).ok()?;
    if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
        return None;
    }
    // SAFETY: read-only lookup.
    unsafe {
        INTERCEPT_PEERS.get(&InterceptPeer { addr: peer, port: u16::from_be_bytes([ports[0], ports[1]]), _pad: 0 })
    }?;
    let (sport, dport) = (u16::from_ne_bytes([ports[0], ports[1]]), u16::from_ne_bytes([ports[2], ports[3]]));
    // Writes to a union's fields (the variant set above).
    if ethertype == ETH_P_IP {
        tuple.__bindgen_anon_1.ipv4.sport = sport;
        tuple.__bindgen_anon_1.ipv4.dport = dport;
    } else {
        tuple.__bindgen_anon_1.ipv6.sport = sport;
        tuple.__bindgen_anon_1.ipv6.dport = dport;
    }
    #[expect(clippy::cast_possible_truncation, reason = "a tuple is tens of bytes")]
    let size = size as u32;
    // SAFETY: the helper reads `size` bytes of the tuple; a socket it returns is released below.
    let sk = unsafe { bpf_sk_lookup_tcp(ctx.as_ptr(), &raw mut tuple, size, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        return Some(());
    }
    // SAFETY: the reference the lookup took.
    unsafe { bpf_sk_release(sk.cast()) };
    None
}
