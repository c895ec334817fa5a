//! Flow state: one entry per flow of a registered pod, keyed from the pod's
//! side, with the TCP state machine and the per-pod counters it keeps exact.
//!
//! Flows live in the LRU table `FLOWS`, except those of draining pods: they
//! move to `HELD`, which nothing evicts, so that a flood of new flows cannot
//! push out the very flows a drain waits for (and release the pod early).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use conndrain_common::{
    FlowEvent, FlowKey, FlowValue, PROTO_TCP, PodIpKey, ProbeKey, direction, event_kind, flow_flags, pod_flags,
    port_flags, stats, tcp_state,
};

use crate::{
    maps::{CONFIG, FLOWS, HELD, NODE_ADDRS, POD_COUNTERS, POD_FLAGS, POD_IPS, PROBES, count, output_event},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Where the packet is going relative to the pods behind the interface.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    FromPod,
    ToPod,
}

/// BPF_NOEXIST: two CPUs racing to create one flow must not both count it.
pub const BPF_NOEXIST: u64 = 1;
/// What a map insert returns when the key exists (-EEXIST).
pub const EEXIST: i32 = -17;
/// Ports from here up are the kernel's default ephemeral range (the
/// `ip_local_port_range` default starts at 32768): a client's side.
const EPHEMERAL_PORTS: u16 = 32768;

// Not inlined: its frame and steering's are separate BPF stack frames, each
// well under the 512-byte limit. Returns whether the packet is a pod's: a
// value the callers use, so that r0 is always set at its exit (with no
// return value, LLVM once left a stack pointer in r0 there, which the
// verifier refuses: "cannot return stack pointer to the caller").
#[inline(never)]
#[must_use]
pub fn track(ctx: &TcContext, side: Side, pkt: &Packet) -> bool {
    let Some((key, slot)) = flow_key(pkt, side) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let len = u64::from(ctx.len());
    let from_pod = side == Side::FromPod;
    // Only a draining pod has flows in HELD (a pod never stops draining;
    // its removal takes its entries out), so the others skip that lookup.
    let draining = is_draining(slot);

    if draining && let Some(v) = HELD.get_ptr_mut(&key) {
        // SAFETY: as below.
        update(&key, unsafe { &mut *v }, pkt, from_pod, now, len);
        return true;
    }
    if let Some(v) = FLOWS.get_ptr_mut(&key) {
        // SAFETY: the pointer is into the map value; concurrent writers can
        // only make the byte/packet statistics approximate.
        let v = unsafe { &mut *v };
        if draining {
            hold(&key, v, pkt, from_pod, now, len);
        } else {
            update(&key, v, pkt, from_pod, now, len);
        }
        return true;
    }
    create(&key, slot, draining, pkt, from_pod, now, len);
    true
}

/// Whether the packet was sent by a local socket: `skb->sk` is set for
/// packets a process of this network namespace sent, and empty for
/// forwarded ones. What a kubelet probe is, and masqueraded Service traffic
/// from another host is not.
#[inline(always)]
pub fn local_origin(ctx: &TcContext) -> bool {
    // SAFETY: reading a context field; the verifier turns it into a load of `skb->sk`.
    !unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk }.is_null()
}

#[inline(always)]
fn is_draining(slot: u32) -> bool {
    POD_FLAGS.get(slot).is_some_and(|f| f & pod_flags::DRAINING != 0)
}

/// A draining pod's flow still in `FLOWS` (the agent moves the ones it
/// knows when the drain starts; this catches the rest at their next
/// packet): copied to `HELD` as it is, then updated there, so that a CPU
/// racing us on the same flow applies its packet to the one entry in
/// `HELD` and no state change is counted twice.
#[inline(always)]
fn hold(key: &FlowKey, v: &mut FlowValue, pkt: &Packet, from_pod: bool, now: u64, len: u64) {
    let moved = match HELD.insert(key, &*v, BPF_NOEXIST) {
        Ok(()) => true,
        Err(e) if e == EEXIST => false,
        Err(_) => {
            // HELD is full: the flow stays where the LRU can reach it.
            count(stats::HOLD_FAILED);
            update(key, v, pkt, from_pod, now, len);
            return;
        }
    };
    match HELD.get_ptr_mut(key) {
        Some(h) => {
            if moved {
                let _ = FLOWS.remove(key);
                count(stats::HELD);
            }
            // SAFETY: pointer into the map value, as in `track`.
            update(key, unsafe { &mut *h }, pkt, from_pod, now, len);
        }
        // Taken out again at once (the pod's removal): fail open, update in place.
        None => update(key, v, pkt, from_pod, now, len),
    }
}

/// The flow key seen from the pod, and the pod's slot; `None` when the pod
/// end of the packet is not a registered pod IP.
#[inline(always)]
fn flow_key(pkt: &Packet, side: Side) -> Option<(FlowKey, u32)> {
    let (pod_addr, peer_addr, pod_port, peer_port) = match side {
        Side::FromPod => (words(&pkt.src), words(&pkt.dst), pkt.sport, pkt.dport),
        Side::ToPod => (words(&pkt.dst), words(&pkt.src), pkt.dport, pkt.sport),
    };
    // SAFETY: read-only lookup of a plain integer.
    let slot = *unsafe { POD_IPS.get(&PodIpKey { addr: bytes(pod_addr) }) }?;
    Some((
        FlowKey {
            pod_addr: bytes(pod_addr),
            peer_addr: bytes(peer_addr),
            pod_port,
            peer_port,
            proto: pkt.proto,
            family: pkt.family,
            _pad: [0; 2],
        },
        slot,
    ))
}

/// An address of a `Packet` as two words: `Packet` is 8-aligned with its
/// addresses at offsets 0 and 16, so these are two 8-byte loads, where
/// moving the `[u8; 16]` itself takes sixteen byte loads and stores.
#[inline(always)]
fn words(a: &[u8; 16]) -> [u64; 2] {
    // SAFETY: in bounds, aligned (above), and any bits are valid words.
    unsafe { core::ptr::read(a.as_ptr().cast::<[u64; 2]>()) }
}

#[inline(always)]
fn bytes(w: [u64; 2]) -> [u8; 16] {
    // SAFETY: same size; any bits are valid bytes.
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(w) }
}

/// The agent's default `--udp-timeout`.
const DEFAULT_UDP_TIMEOUT_NS: u64 = 30_000_000_000;

/// `CONFIG[0]` always exists (an array) and is zeroed until the agent writes
/// it, so 0 means "not set" and takes the default; without this, every UDP
/// packet before the agent's write would open a new flow.
#[inline(always)]
fn udp_timeout_ns() -> u64 {
    match CONFIG.get(0) {
        Some(c) if c.udp_timeout_ns != 0 => c.udp_timeout_ns,
        _ => DEFAULT_UDP_TIMEOUT_NS,
    }
}

#[inline(always)]
fn create(key: &FlowKey, slot: u32, draining: bool, pkt: &Packet, from_pod: bool, now: u64, len: u64) {
    let opened_by_peer = if pkt.proto == PROTO_TCP {
        let f = pkt.tcp_flags;
        if f & TCP_RST != 0 || (f & TCP_SYN != 0 && f & (TCP_ACK | TCP_FIN) != 0) {
            // RST, SYN-ACK, SYN+FIN with no flow: nothing to track.
            return;
        }
        if f & TCP_SYN == 0 {
            pickup(key, slot, draining, pkt, from_pod, now, len);
            return;
        }
        !from_pod
    } else {
        !from_pod
    };
    let state = if pkt.proto == PROTO_TCP { tcp_state::SYN_SENT } else { tcp_state::ESTABLISHED };
    let dir = if opened_by_peer { direction::INBOUND } else { direction::OUTBOUND };
    let v = new_value(slot, state, dir, 0, pkt, from_pod, now, len);
    if !insert(key, &v, draining) {
        return;
    }
    if opened_by_peer {
        note_new_inbound(key, slot, pkt, now);
    }
    emit(key, &v, event_kind::NEW, now);
}

/// A TCP packet of a flow we have no entry for (agent restart, eviction):
/// take it as established. Its direction is a guess, made to err on the
/// side that holds the pod: inbound, unless the pod's port is in the
/// ephemeral range and the peer's is not (the pod is then a client). A gRPC
/// server on 50051 talking to a client's 45000 is inbound; the sockets
/// tracepoint knows the truth and the agent confirms a drain against it.
#[inline(always)]
fn pickup(key: &FlowKey, slot: u32, draining: bool, pkt: &Packet, from_pod: bool, now: u64, len: u64) {
    let dir = if key.pod_port >= EPHEMERAL_PORTS && key.peer_port < EPHEMERAL_PORTS {
        direction::OUTBOUND
    } else {
        direction::INBOUND
    };
    let mut flags = flow_flags::PICKED_UP;
    let mut state = tcp_state::ESTABLISHED;
    if pkt.tcp_flags & TCP_FIN != 0 {
        flags |= fin_bit(dir, from_pod);
        state = tcp_state::CLOSING;
    }
    let v = new_value(slot, state, dir, flags, pkt, from_pod, now, len);
    if !insert(key, &v, draining) {
        return;
    }
    add_active(slot, dir, 1);
    emit(key, &v, event_kind::ESTABLISHED, now);
}

#[inline(always)]
fn update(key: &FlowKey, v: &mut FlowValue, pkt: &Packet, from_pod: bool, now: u64, len: u64) {
    if pkt.proto != PROTO_TCP {
        if now.saturating_sub(v.last_seen_ns) > udp_timeout_ns() {
            // The old UDP flow timed out: this packet opens a new one.
            let opened_by_peer = !from_pod;
            let dir = if opened_by_peer { direction::INBOUND } else { direction::OUTBOUND };
            *v = new_value(v.pod_slot, tcp_state::ESTABLISHED, dir, 0, pkt, from_pod, now, len);
            if opened_by_peer {
                note_new_inbound(key, v.pod_slot, pkt, now);
            }
            emit(key, v, event_kind::NEW, now);
            return;
        }
        account(v, pkt, from_pod, now, len);
        return;
    }

    let f = pkt.tcp_flags;
    let old = v.state;
    let from_opener = from_pod == (v.direction == direction::OUTBOUND);

    if old == tcp_state::CLOSED {
        // Port reuse: a fresh SYN after the old flow closed starts a new flow.
        if f & TCP_SYN != 0 && f & (TCP_ACK | TCP_RST | TCP_FIN) == 0 {
            let opened_by_peer = !from_pod;
            let dir = if opened_by_peer { direction::INBOUND } else { direction::OUTBOUND };
            *v = new_value(v.pod_slot, tcp_state::SYN_SENT, dir, 0, pkt, from_pod, now, len);
            if opened_by_peer {
                note_new_inbound(key, v.pod_slot, pkt, now);
            }
            emit(key, v, event_kind::NEW, now);
        } else {
            account(v, pkt, from_pod, now, len);
        }
        return;
    }

    account(v, pkt, from_pod, now, len);
    let mut state = old;
    if f & TCP_RST != 0 {
        v.flags |= flow_flags::RESET;
        state = tcp_state::CLOSED;
    } else {
        if f & TCP_SYN != 0 {
            if f & TCP_ACK != 0 && old == tcp_state::SYN_SENT && !from_opener {
                state = tcp_state::SYN_RECV;
            }
        } else if f & TCP_ACK != 0 && old == tcp_state::SYN_RECV && from_opener {
            state = tcp_state::ESTABLISHED;
        }
        if f & TCP_FIN != 0 && f & TCP_SYN == 0 {
            v.flags |= fin_bit(v.direction, from_pod);
            if state == tcp_state::ESTABLISHED {
                state = tcp_state::CLOSING;
            }
        }
        let both = flow_flags::FIN_OPENER | flow_flags::FIN_RESPONDER;
        if v.flags & both == both && tcp_state::is_active(state) {
            state = tcp_state::CLOSED;
        }
    }
    if state == old {
        return;
    }
    v.state = state;
    let was = tcp_state::is_active(old);
    let is = tcp_state::is_active(state);
    if !was && is {
        add_active(v.pod_slot, v.direction, 1);
        emit(key, v, event_kind::ESTABLISHED, now);
    } else if was && !is {
        add_active(v.pod_slot, v.direction, u64::MAX); // wrapping add of -1
        emit(key, v, event_kind::CLOSED, now);
    } else if state == tcp_state::CLOSED {
        // Refused or reset during the handshake: tell the agent so it forgets it.
        emit(key, v, event_kind::CLOSED, now);
    }
}

#[inline(always)]
fn fin_bit(dir: u8, from_pod: bool) -> u8 {
    if from_pod == (dir == direction::OUTBOUND) { flow_flags::FIN_OPENER } else { flow_flags::FIN_RESPONDER }
}

#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "every field of a new entry")]
fn new_value(slot: u32, state: u8, dir: u8, flags: u8, pkt: &Packet, from_pod: bool, now: u64, len: u64) -> FlowValue {
    let mut v = FlowValue {
        first_seen_ns: now,
        last_seen_ns: now,
        pod_slot: slot,
        state,
        direction: dir,
        flags,
        // Every field named, not `..Default::default()`: LLVM zeroed the
        // rest with a call to a byte-by-byte memset.
        bytes_in: 0,
        bytes_out: 0,
        _pad: 0,
    };
    account(&mut v, pkt, from_pod, now, len);
    v
}

#[inline(always)]
fn account(v: &mut FlowValue, pkt: &Packet, from_pod: bool, now: u64, len: u64) {
    v.last_seen_ns = now;
    if from_pod {
        v.bytes_out = v.bytes_out.wrapping_add(len);
    } else {
        v.bytes_in = v.bytes_in.wrapping_add(len);
    }
    // Data towards the pod is a request until data comes back: a slow
    // handler's connection is quiet but not idle.
    if pkt.data {
        if from_pod {
            v.flags &= !flow_flags::AWAITING_REPLY;
        } else {
            v.flags |= flow_flags::AWAITING_REPLY;
        }
    }
}

/// A new flow: into `HELD` for a draining pod, else (or when `HELD` is
/// full) into `FLOWS`.
#[inline(always)]
fn insert(key: &FlowKey, v: &FlowValue, draining: bool) -> bool {
    if draining {
        match HELD.insert(key, v, BPF_NOEXIST) {
            Ok(()) => {
                count(stats::FLOWS_CREATED);
                count(stats::HELD);
                return true;
            }
            Err(e) if e == EEXIST => {
                // Another CPU created it first.
                count(stats::INSERT_FAILED);
                return false;
            }
            Err(_) => count(stats::HOLD_FAILED),
        }
    }
    if FLOWS.insert(key, v, BPF_NOEXIST).is_err() {
        count(stats::INSERT_FAILED);
        return false;
    }
    count(stats::FLOWS_CREATED);
    true
}

/// Atomic add on a per-pod counter (BPF_ATOMIC_ADD): packets of one pod are
/// handled on several CPUs at once and the counters must stay exact.
/// `core::sync::atomic` has no `fetch_add` on the BPF target, hence the intrinsic.
#[inline(always)]
pub fn atomic_add(p: *mut u64, delta: u64) {
    // SAFETY: `p` points into a map value that outlives this program run.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, delta) };
}

#[inline(always)]
fn add_active(slot: u32, dir: u8, delta: u64) {
    if let Some(p) = POD_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: field projection on a valid map value pointer.
        let field = unsafe {
            if dir == direction::INBOUND { &raw mut (*p).active_inbound } else { &raw mut (*p).active_outbound }
        };
        atomic_add(field, delta);
    }
}

/// Counts a new inbound flow for the quiet period, unless it goes to a port
/// the pod's settings ignore (`port_flags::IGNORED`), or is one of the
/// kubelet's probes: the kubelet keeps probing a terminating pod, and its
/// probes must not hold the pod forever. A probe is sent by a process of
/// the node (not forwarded), from a node address, to one of the pod's probe
/// ports. Service traffic masqueraded to a node address is forwarded, so it
/// restarts the quiet period like any other client.
#[inline(always)]
fn note_new_inbound(key: &FlowKey, slot: u32, pkt: &Packet, now: u64) {
    // SAFETY: read-only lookups of plain bytes.
    let ports = unsafe { PROBES.get(&ProbeKey { pod_slot: slot, port: key.pod_port, _pad: 0 }) }.map_or(0, |p| *p);
    if ports & port_flags::IGNORED != 0
        || (ports & port_flags::PROBE != 0
            && pkt.local
            // SAFETY: as above.
            && unsafe { NODE_ADDRS.get(&PodIpKey { addr: key.peer_addr }) }.is_some())
    {
        return;
    }
    if let Some(p) = POD_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: field projection on a valid map value pointer; racing
        // writers of `last_new_inbound_ns` all store "now".
        unsafe {
            atomic_add(&raw mut (*p).new_inbound_total, 1);
            (*p).last_new_inbound_ns = now;
        }
    }
}

#[inline(always)]
fn emit(key: &FlowKey, v: &FlowValue, kind: u8, now: u64) {
    let ev = FlowEvent {
        key: *key,
        ts_ns: now,
        first_seen_ns: v.first_seen_ns,
        pod_slot: v.pod_slot,
        kind,
        direction: v.direction,
        state: v.state,
        flags: v.flags,
    };
    if !output_event(&ev) {
        count(stats::EVENTS_LOST);
    }
}
