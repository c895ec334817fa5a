//! The pods' TCP sockets themselves, from the `sock:inet_sock_set_state`
//! tracepoint: the ground truth a drain is confirmed against.
//!
//! The TC programs see packets on the interfaces they are attached to; a
//! connection whose packets take another path (pod to pod across a bridge,
//! a CNI that redirects past our hook), or whose events the ring buffer had
//! no room for, is invisible to them. The socket layer sees every
//! connection of every network namespace, whatever its path. Here we keep,
//! per pod, the set of its open *inbound* (passively opened) TCP sockets:
//! created on the child socket's move to SYN_RECV, removed at CLOSE. Both
//! are map operations that succeed once (insert with BPF_NOEXIST, delete),
//! so a counter can neither miss nor double a socket, even with two copies
//! of this program attached during an agent restart.
//!
//! The tracepoint's record layout (`/sys/kernel/tracing/events/sock/
//! inet_sock_set_state/format`) has been the same since Linux 4.16.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TracePointContext};
use conndrain_common::{
    FAMILY_V4, FAMILY_V6, FlowEvent, FlowKey, PROTO_TCP, PodIpKey, SockValue, direction, event_kind, pod_flags,
    tcp_state,
};

use crate::maps::{POD_FLAGS, POD_IPS, POD_SOCKETS, SOCKETS, output_event};

const OFF_SKADDR: usize = 8;
const OFF_NEWSTATE: usize = 20;
const OFF_SPORT: usize = 24;
const OFF_DPORT: usize = 26;
const OFF_PROTOCOL: usize = 30;
/// IPv4 sockets have their addresses here too, IPv4-mapped (like `PodIpKey`).
const OFF_SADDR_V6: usize = 40;
const OFF_DADDR_V6: usize = 56;

// include/net/tcp_states.h
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;

use crate::flow::{BPF_NOEXIST, EEXIST};

#[inline(always)]
fn read<T>(ctx: &TracePointContext, off: usize) -> Option<T> {
    // SAFETY: the offsets are inside the tracepoint's fixed record.
    unsafe { ctx.read_at::<T>(off) }.ok()
}

pub fn on_state(ctx: &TracePointContext) -> Option<()> {
    if read::<u16>(ctx, OFF_PROTOCOL)? != u16::from(PROTO_TCP) {
        return None;
    }
    match read::<i32>(ctx, OFF_NEWSTATE)? {
        // A passive open's child socket (and, rarely, a simultaneous open):
        // a connection the pod serves.
        TCP_SYN_RECV => opened(ctx),
        TCP_CLOSE => closed(ctx),
        _ => None,
    }
}

#[inline(always)]
fn opened(ctx: &TracePointContext) -> Option<()> {
    let pod_addr: [u8; 16] = read(ctx, OFF_SADDR_V6)?;
    // SAFETY: read-only lookup of a plain integer.
    let slot = *unsafe { POD_IPS.get(&PodIpKey { addr: pod_addr }) }?;
    let skaddr: u64 = read(ctx, OFF_SKADDR)?;
    let v4 = pod_addr[..10].iter().all(|b| *b == 0) && pod_addr[10] == 0xff && pod_addr[11] == 0xff;
    let value = SockValue {
        key: FlowKey {
            pod_addr,
            peer_addr: read(ctx, OFF_DADDR_V6)?,
            pod_port: read(ctx, OFF_SPORT)?,
            peer_port: read(ctx, OFF_DPORT)?,
            proto: PROTO_TCP,
            family: if v4 { FAMILY_V4 } else { FAMILY_V6 },
            _pad: [0; 2],
        },
        // SAFETY: no preconditions.
        opened_ns: unsafe { bpf_ktime_get_ns() },
        pod_slot: slot,
        _pad: 0,
    };
    let counters = POD_SOCKETS.get_ptr_mut(slot)?;
    match SOCKETS.insert(&skaddr, &value, BPF_NOEXIST) {
        // SAFETY: field projection on a valid map value pointer.
        Ok(()) => crate::flow::atomic_add(unsafe { &raw mut (*counters).open }, 1),
        Err(e) if e == EEXIST => {}
        // Full: this socket goes unseen, so the pod can no longer be confirmed drained.
        // SAFETY: as above.
        Err(_) => crate::flow::atomic_add(unsafe { &raw mut (*counters).lost }, 1),
    }
    Some(())
}

#[inline(always)]
fn closed(ctx: &TracePointContext) -> Option<()> {
    let skaddr: u64 = read(ctx, OFF_SKADDR)?;
    // SAFETY: the value is copied out before the delete below.
    let value = *unsafe { SOCKETS.get(&skaddr) }?;
    // Only the one delete that succeeds counts the close.
    SOCKETS.remove(&skaddr).ok()?;
    let counters = POD_SOCKETS.get_ptr_mut(value.pod_slot)?;
    // SAFETY: field projection on a valid map value pointer; wrapping add of -1.
    crate::flow::atomic_add(unsafe { &raw mut (*counters).open }, u64::MAX);
    if POD_FLAGS.get(value.pod_slot).is_some_and(|f| f & pod_flags::DRAINING != 0) {
        // Tell the agent: this may be the close a drain waits for. Losing
        // this event only delays the verdict (the agent also polls).
        let ev = FlowEvent {
            key: value.key,
            ts_ns: value.opened_ns,
            first_seen_ns: value.opened_ns,
            pod_slot: value.pod_slot,
            kind: event_kind::SOCKET_CLOSED,
            direction: direction::INBOUND,
            state: tcp_state::CLOSED,
            flags: 0,
        };
        let _ = output_event(&ev);
    }
    Some(())
}
