//! The maps the programs share with the agent (layouts in `conndrain-common`).
//!
//! With `--bpffs DIR`, the agent pins the maps of `conndrain_common::PINNED_MAPS`
//! under `DIR/v<LAYOUT_VERSION>/` and reuses them on its next start, so a
//! restart loses no flow, pin or counter. None is declared `pinned` here: that
//! would make aya pin it under `/sys/fs/bpf` even when the agent runs without
//! `--bpffs`. The agent names each pin path itself (`EbpfLoader::map_pin_path`,
//! which aya honours whatever the declaration says), and checks an existing
//! pin's type, key, value and size first, because aya reuses a pin as it is.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use conndrain_common::{
    Config, DEFAULT_MAX_FLOWS, FlowEvent, FlowKey, FlowValue, FragKey, FragSteer, INTERCEPT_ENTRIES, InterceptConfig,
    InterceptDst, InterceptPeer, MAX_FRAGS, MAX_HELD, MAX_PINS, MAX_PODS, MAX_SOCKETS, Pin, PodCounters, PodIpKey,
    PodSockets, ProbeKey, SockValue, WireKey, stats,
};

/// linux/bpf.h: entries are allocated on insert, not all at map creation.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Resized by the agent at load time (`--max-flows`).
#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// The flows of draining pods. Not LRU: nothing but the agent's sweep and
/// the pod's removal takes an entry out, so a flood of new flows that fills
/// `FLOWS` cannot make a draining pod look drained while it still serves.
#[map]
pub static HELD: HashMap<FlowKey, FlowValue> = HashMap::with_max_entries(MAX_HELD, BPF_F_NO_PREALLOC);

/// `pod_flags::*` by pod slot (agent-written).
#[map]
pub static POD_FLAGS: Array<u32> = Array::with_max_entries(MAX_PODS, 0);

#[map]
pub static POD_IPS: HashMap<PodIpKey, u32> = HashMap::with_max_entries(MAX_PODS * 2, 0);

#[map]
pub static POD_COUNTERS: Array<PodCounters> = Array::with_max_entries(MAX_PODS, 0);

#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

/// Written by the agent when a backend starts terminating; read and updated here.
#[map]
pub static PINS: HashMap<WireKey, Pin> = HashMap::with_max_entries(MAX_PINS, 0);

/// Datagrams of pinned flows whose first fragment was steered, and how:
/// their later fragments, which carry no ports, follow it (`steer::fragment`).
/// Written and read only here; not pinned (see `conndrain_common::maps::FRAGS`).
#[map]
pub static FRAGS: LruHashMap<FragKey, FragSteer> = LruHashMap::with_max_entries(MAX_FRAGS, 0);

/// The node's own addresses (agent-written): new connections from them, such
/// as the kubelet's probes, do not restart a pod's quiet period.
#[map]
pub static NODE_ADDRS: HashMap<PodIpKey, u8> = HashMap::with_max_entries(256, 0);

/// The pods' open inbound TCP sockets, by kernel socket address (written
/// by the sockets tracepoint, read by the agent before it says "drained").
#[map]
pub static SOCKETS: HashMap<u64, SockValue> = HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

#[map]
pub static POD_SOCKETS: Array<PodSockets> = Array::with_max_entries(MAX_PODS, 0);

/// The kubelet's probe ports per pod (agent-written).
#[map]
pub static PROBES: HashMap<ProbeKey, u8> = HashMap::with_max_entries(MAX_PODS * 4, 0);

/// The preStop intercept (`intercept.rs`; agent-written).
#[map]
pub static INTERCEPT_CONFIG: Array<InterceptConfig> = Array::with_max_entries(1, 0);

/// Connects the intercept rewrote, by socket cookie, until their local port is known.
#[map]
pub static INTERCEPT_CONNECTS: LruHashMap<u64, InterceptDst> = LruHashMap::with_max_entries(INTERCEPT_ENTRIES, 0);

/// Intercepted connections by their client end, until the agent accepts them.
#[map]
pub static INTERCEPT_PEERS: LruHashMap<InterceptPeer, InterceptDst> =
    LruHashMap::with_max_entries(INTERCEPT_ENTRIES, 0);

/// 256 KiB here: the agent sizes it from `--max-flows` at load time
/// (`datapath::events::ring_bytes`; 2 MiB for the default table).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// linux/bpf.h `bpf_ringbuf_output` flags and `bpf_ringbuf_query` what.
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// Unread bytes from which an event wakes the agent: about 450 events, an
/// eighth of the smallest ring, so a burst is read long before it fills.
const WAKE_AT_BYTES: u64 = 32 * 1024;

/// Writes an event to `EVENTS` without waking the agent, which reads the
/// ring every few milliseconds anyway (`datapath::events`): a wakeup is an
/// irq_work, several microseconds in a VM, and by default the kernel sends
/// one for every event the agent finds when idle, i.e. for each new flow of
/// a quiet node. Only a backlog past `WAKE_AT_BYTES` wakes it. False when
/// the ring is full (the event is lost).
#[inline(always)]
pub fn output_event(ev: &FlowEvent) -> bool {
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA) >= WAKE_AT_BYTES { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
    EVENTS.output::<FlowEvent>(ev, flags).is_ok()
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *p += 1 };
    }
}
