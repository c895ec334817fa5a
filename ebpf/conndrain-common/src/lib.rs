//! Types shared by the conndrain eBPF programs and the agent, and nothing else.
//!
//! Every type is `#[repr(C)]` with explicit padding so that its layout is the
//! same on both sides of a map; flags are integers, never `bool`.
#![no_std]

/// Map names, shared so the agent cannot misspell them.
pub mod maps {
    /// `LruHashMap<FlowKey, FlowValue>`: every flow of a registered pod,
    /// except those `HELD` holds.
    pub const FLOWS: &str = "FLOWS";
    /// `HashMap<FlowKey, FlowValue>` (not LRU): the flows of draining pods,
    /// which a flood of new flows must not evict from `FLOWS`.
    pub const HELD: &str = "HELD";
    /// `Array<u32>`: `pod_flags::*` per pod slot.
    pub const POD_FLAGS: &str = "POD_FLAGS";
    /// `HashMap<PodIpKey, u32>`: pod IP to pod slot.
    pub const POD_IPS: &str = "POD_IPS";
    /// `Array<PodCounters>`: per-pod counters, indexed by pod slot.
    pub const POD_COUNTERS: &str = "POD_COUNTERS";
    /// `Array<Config>` with one element.
    pub const CONFIG: &str = "CONFIG";
    /// `PerCpuArray<u64>`: datapath statistics, indexed by `stats::*`.
    pub const STATS: &str = "STATS";
    /// `RingBuf` of `FlowEvent`.
    pub const EVENTS: &str = "EVENTS";
    /// `HashMap<WireKey, Pin>`: pinned flows, one entry per direction.
    pub const PINS: &str = "PINS";
    /// `HashMap<PodIpKey, u8>`: the node's own addresses (not pinned: refilled at start).
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    /// `LruHashMap<FragKey, FragSteer>`: where the first fragment of a
    /// datagram of a pinned flow was steered, so that its later fragments
    /// (which carry no ports) follow it. Not pinned: a datagram's fragments
    /// arrive within moments, so an agent restart loses at most the datagrams
    /// in flight.
    pub const FRAGS: &str = "FRAGS";
    /// `HashMap<u64, SockValue>`: the open inbound TCP sockets of registered
    /// pods, by kernel socket address, kept by the `sock:inet_sock_set_state`
    /// tracepoint whatever path their packets take.
    pub const SOCKETS: &str = "SOCKETS";
    /// `Array<PodSockets>`: per pod slot, how many of its sockets `SOCKETS` holds.
    pub const POD_SOCKETS: &str = "POD_SOCKETS";
    /// `HashMap<ProbeKey, u8>`: per pod slot, its ports whose new inbound
    /// connections do not restart the quiet period, with `port_flags`: the
    /// ports the kubelet probes (only connections from the node's own
    /// processes) and the ports its settings ignore (any connection).
    pub const PROBES: &str = "PROBES";
    /// `Array<InterceptConfig>` with one element: the preStop intercept's
    /// settings (agent-written; pinned with `--bpffs`, like the intercept's links).
    pub const INTERCEPT_CONFIG: &str = "INTERCEPT_CONFIG";
    /// `LruHashMap<u64, InterceptDst>`: by socket cookie, the connects the
    /// intercept rewrote, until the `sockops` program learns their local port.
    pub const INTERCEPT_CONNECTS: &str = "INTERCEPT_CONNECTS";
    /// `LruHashMap<InterceptPeer, InterceptDst>`: the client end (loopback
    /// address and port) of each rewritten connection, and the pod address it
    /// dialled. The agent takes the entry when it accepts the connection.
    pub const INTERCEPT_PEERS: &str = "INTERCEPT_PEERS";
}

/// Size of the `SOCKETS` map (allocated per entry). When it is full, a pod's
/// further sockets are counted in `PodSockets::lost`, and that pod can no
/// longer be confirmed drained.
pub const MAX_SOCKETS: u32 = 262_144;

/// Size of the `PINS` map (two entries per pinned flow).
pub const MAX_PINS: u32 = 65_536;

/// Size of the `HELD` map: flows of draining pods. Allocated per entry
/// (`BPF_F_NO_PREALLOC`), so it costs memory only while pods drain. When it
/// is full, a draining pod's new flows go to `FLOWS` (counted in
/// `stats::HOLD_FAILED`).
pub const MAX_HELD: u32 = 65_536;

/// Size of the `FRAGS` map (LRU): datagrams whose fragments are on their way
/// through steering at once, as Cilium sizes its fragment map.
pub const MAX_FRAGS: u32 = 8192;

/// Bits of the `POD_FLAGS` entries.
pub mod pod_flags {
    /// The pod is draining: its flows go to `HELD`, out of the LRU's reach.
    pub const DRAINING: u32 = 1;
}

/// Values of `PROBES` entries (bits). Agents before these flags wrote 1 for
/// every entry, which reads as `PROBE`: the layout did not change.
pub mod port_flags {
    /// The kubelet probes this port: a new connection to it from a process
    /// of the node, from a node address, does not restart the quiet period.
    pub const PROBE: u8 = 1;
    /// The pod's settings ignore this port (a metrics scrape port): no new
    /// inbound connection to it restarts the quiet period.
    pub const IGNORED: u8 = 2;
}

/// Version of the layout of the maps the agent pins under bpffs (`--bpffs
/// DIR` pins them in `DIR/v<LAYOUT_VERSION>/`, so a restarted or upgraded
/// agent picks them up again).
///
/// Bump it whenever anything a pinned map holds changes: a key or value type
/// below (fields, their order or meaning, flag bits, `stats` indexes), a
/// map's type or size constant, or what a slot means. An agent of another
/// layout then replaces the pinned maps (and says so in one log line)
/// instead of misreading them. The sizes alone are checked too, but they do
/// not catch a reordered field.
pub const LAYOUT_VERSION: u32 = 4;

/// The maps `--bpffs` pins: everything that holds state the agent or the
/// programs need after a restart. `EVENTS` is not among them: each agent
/// reads its own ring buffer, and rebuilds what it missed from `FLOWS`.
pub const PINNED_MAPS: [&str; 14] = [
    maps::FLOWS,
    maps::HELD,
    maps::POD_IPS,
    maps::POD_COUNTERS,
    maps::POD_FLAGS,
    maps::PINS,
    maps::CONFIG,
    maps::STATS,
    maps::SOCKETS,
    maps::POD_SOCKETS,
    maps::PROBES,
    maps::INTERCEPT_CONFIG,
    maps::INTERCEPT_CONNECTS,
    maps::INTERCEPT_PEERS,
];

/// Program names in the object.
pub mod programs {
    /// Sees packets entering the host from the interface (sent by the pods behind it).
    pub const INGRESS: &str = "conndrain_ingress";
    /// `INGRESS` without steering, for kernels without `bpf_redirect_neigh`
    /// (before 5.10), where the verifier refuses `INGRESS`. At most 15
    /// characters, so the kernel keeps the whole name.
    pub const INGRESS_TRACK: &str = "conndrain_track";
    /// Sees packets leaving the host through the interface (to the pods behind it).
    pub const EGRESS: &str = "conndrain_egress";
    /// `INGRESS` for L3 devices (ipip, `WireGuard`, GRE: packets without an
    /// Ethernet header), attached instead by the device's type. 15 characters.
    pub const INGRESS_L3: &str = "conndrain_in_l3";
    /// `EGRESS` for L3 devices.
    pub const EGRESS_L3: &str = "conndrain_eg_l3";
    /// Tracepoint `sock:inet_sock_set_state`: the pods' TCP sockets themselves.
    pub const SOCKETS: &str = "conndrain_sockets";
    /// `cgroup/connect4`: the kubelet's preStop `httpGet` to a pod, sent to the agent instead.
    pub const INTERCEPT_V4: &str = "conndrain_icpt4";
    /// `cgroup/connect6`: the same for IPv6.
    pub const INTERCEPT_V6: &str = "conndrain_icpt6";
    /// `sockops`: learns the local port of each connection the two above rewrote.
    pub const INTERCEPT_PORTS: &str = "conndrain_icptp";
    /// `cgroup_skb/egress`: holds back (drops) the SYN of an intercepted
    /// connection while no agent listens, so that the kubelet's connect
    /// retries instead of being refused.
    pub const INTERCEPT_HOLD: &str = "conndrain_icpth";
}

/// Size of `INTERCEPT_CONNECTS` and `INTERCEPT_PEERS` (LRU).
pub const INTERCEPT_ENTRIES: u32 = 4096;

/// Number of pod slots; `POD_COUNTERS` has this many entries.
pub const MAX_PODS: u32 = 4096;
/// Default size of the flow table.
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;

/// IP protocol numbers we track.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Address families in `FlowKey::family`.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Which side opened the flow.
pub mod direction {
    /// A peer opened it: the pod serves it.
    pub const INBOUND: u8 = 1;
    /// The pod opened it: the pod is the client.
    pub const OUTBOUND: u8 = 2;
}

/// TCP state as seen from the flags on the wire. UDP flows are `ESTABLISHED`
/// from their first packet until the agent's idle timeout.
pub mod tcp_state {
    /// SYN seen, no SYN-ACK yet.
    pub const SYN_SENT: u8 = 1;
    /// SYN-ACK seen, the opener's ACK not yet.
    pub const SYN_RECV: u8 = 2;
    /// Handshake complete (or picked up mid-stream).
    pub const ESTABLISHED: u8 = 3;
    /// One side sent FIN.
    pub const CLOSING: u8 = 4;
    /// FIN both ways, or RST.
    pub const CLOSED: u8 = 5;

    /// Whether a flow in `state` holds its pod (counts as active).
    #[must_use]
    pub const fn is_active(state: u8) -> bool {
        state == ESTABLISHED || state == CLOSING
    }
}

/// Bits of `FlowValue::flags`.
pub mod flow_flags {
    /// The opener sent FIN.
    pub const FIN_OPENER: u8 = 1;
    /// The responder sent FIN.
    pub const FIN_RESPONDER: u8 = 2;
    /// Created from a packet in the middle of a flow (agent restart or
    /// eviction): the direction is a guess from the ports.
    pub const PICKED_UP: u8 = 4;
    /// Closed by RST rather than FIN.
    pub const RESET: u8 = 8;
    /// The last TCP segment that carried data went to the pod: a request is
    /// in flight, however long the pod takes to answer it. Cleared by the
    /// next segment with data from the pod.
    pub const AWAITING_REPLY: u8 = 16;
}

/// Indexes into the `STATS` per-CPU array.
pub mod stats {
    /// Packets the programs looked at.
    pub const PACKETS: u32 = 0;
    /// Packets that were not IPv4/IPv6 TCP/UDP or were cut short; passed untouched.
    pub const UNPARSED: u32 = 1;
    /// Packets of no registered pod.
    pub const NOT_POD: u32 = 2;
    /// Flow entries created.
    pub const FLOWS_CREATED: u32 = 3;
    /// Flow-table inserts that failed.
    pub const INSERT_FAILED: u32 = 4;
    /// Events the ring buffer had no room for.
    pub const EVENTS_LOST: u32 = 5;
    /// Packets of pinned flows rewritten and redirected to their old backend (or back to the client).
    /// Not those left to the stack with a TTL (hop limit) of 1.
    pub const STEERED: u32 = 6;
    /// TCP resets sent for pinned flows whose pod is gone.
    pub const RESETS_SENT: u32 = 7;
    /// Pinned packets that could not be redirected (passed on untouched) or
    /// rewritten (passed on, possibly half rewritten); never also in `STEERED`.
    pub const STEER_FAILED: u32 = 8;
    /// Flows of draining pods the programs put into `HELD` (new ones, and ones
    /// they moved out of `FLOWS`; the agent moves the others).
    pub const HELD: u32 = 9;
    /// Flows of draining pods that `HELD` had no room for (left in `FLOWS`,
    /// where the LRU may evict them).
    pub const HOLD_FAILED: u32 = 10;
    pub const COUNT: u32 = 11;
}

/// A pod address: IPv4 is stored as an IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`) so one key type serves both families.
///
/// The keys here are `align(8)` (their sizes are multiples of 8, so the
/// bytes are the same): with byte-array fields alone they would be align 1
/// or 2, and the BPF backend copies such a key one byte at a time.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PodIpKey {
    pub addr: [u8; 16],
}

/// A flow, seen from the pod: the pod's own address and port first.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub pod_addr: [u8; 16],
    pub peer_addr: [u8; 16],
    /// Host byte order.
    pub pod_port: u16,
    /// Host byte order.
    pub peer_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// What the datapath knows of a flow. "in" is towards the pod, "out" from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the first packet.
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Bytes each way, counted at L2. (No packet counts: 40 bytes a value
    /// keeps a tracked flow under 150 bytes of kernel memory.)
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub pod_slot: u32,
    /// `tcp_state::*`
    pub state: u8,
    /// `direction::*`
    pub direction: u8,
    /// `flow_flags::*`
    pub flags: u8,
    pub _pad: u8,
}

/// Per-pod counters, kept by the datapath with atomic adds so they stay exact
/// without scanning the flow table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodCounters {
    /// Inbound TCP flows established or closing.
    pub active_inbound: u64,
    /// Outbound TCP flows established or closing.
    pub active_outbound: u64,
    /// Inbound flows ever opened (TCP SYN or new UDP flow). The agent takes a
    /// snapshot when termination begins and reports the difference.
    pub new_inbound_total: u64,
    /// `bpf_ktime_get_ns` of the last new inbound flow.
    pub last_new_inbound_ns: u64,
}

/// Words of `Config::pin_filter`: 16384 bits, so that with a few hundred
/// flows pinned a packet of another flow rarely finds its bit set.
pub const PIN_FILTER_WORDS: usize = 256;
const PIN_FILTER_BITS: u32 = PIN_FILTER_WORDS as u32 * 64;

/// Datapath settings written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// A UDP flow idle longer than this is over; its next packet opens a new one.
    pub udp_timeout_ns: u64,
    /// 1 while the agent knows `PINS` is empty: the programs then skip its
    /// lookup (most of the time no backend is terminating). 0, the value of
    /// fresh maps, means "look".
    pub no_pins: u32,
    /// 1 while `pin_filter` has the bit of every tuple in `PINS`: a packet
    /// whose bit is clear is not pinned, and skips the `PINS` lookup (a
    /// 40-byte hash, as costly as the rest of an unrelated packet's path).
    /// 0, the value of fresh maps, means "look for every packet". Bits are
    /// set before their pin is inserted and all cleared only when `PINS` is
    /// empty, so a clear bit never hides a pin; a set one may be stale.
    pub pin_filter_on: u32,
    /// `CLOCK_MONOTONIC` ns since when the sockets tracepoint has been
    /// attached without a gap (agent-written; kept across restarts while its
    /// link stays pinned). Sockets opened before it are not in `SOCKETS`.
    pub sockets_since_ns: u64,
    /// One bit per `pin_filter_bit` of the pinned tuples (a Bloom filter
    /// with one hash).
    pub pin_filter: [u64; PIN_FILTER_WORDS],
}

impl Default for Config {
    fn default() -> Self {
        Self { udp_timeout_ns: 0, no_pins: 0, pin_filter_on: 0, sockets_since_ns: 0, pin_filter: [0; PIN_FILTER_WORDS] }
    }
}

impl Config {
    /// Sets the filter bit of a tuple about to be pinned.
    pub fn note_pin(&mut self, key: &WireKey) {
        let bit = pin_filter_bit(low_word(&key.src), low_word(&key.dst), key.sport, key.dport);
        if let Some(w) = self.pin_filter.get_mut((bit >> 6) as usize) {
            *w |= 1 << (bit & 63);
        }
    }

    /// Whether a packet of this tuple may be pinned: what the programs ask
    /// before they look it up in `PINS`.
    #[inline(always)]
    #[must_use]
    pub fn may_be_pinned(&self, src: &[u8; 16], dst: &[u8; 16], sport: u16, dport: u16) -> bool {
        if self.no_pins != 0 {
            return false;
        }
        if self.pin_filter_on == 0 {
            return true;
        }
        let bit = pin_filter_bit(low_word(src), low_word(dst), sport, dport);
        self.pin_filter.get((bit >> 6) as usize).is_none_or(|w| w & (1 << (bit & 63)) != 0)
    }
}

/// An address's last four bytes (all of an IPv4-mapped one), as the filter hashes them.
#[inline(always)]
fn low_word(a: &[u8; 16]) -> u32 {
    u32::from_ne_bytes([a[12], a[13], a[14], a[15]])
}

/// The `Config::pin_filter` bit of a wire tuple: the programs and the agent
/// both call this, so they cannot disagree. Each word is folded in with a
/// multiply (XOR alone lets an address and a port that move together cancel
/// out), then murmur3's finalizer; masked, not a modulo, so that the
/// verifier bounds the word index.
#[inline(always)]
#[must_use]
pub fn pin_filter_bit(src_low: u32, dst_low: u32, sport: u16, dport: u16) -> u32 {
    const K: u32 = 0x9e37_79b1;
    let mut h = src_low.wrapping_mul(K) ^ dst_low;
    h = h.wrapping_mul(K) ^ ((u32::from(sport) << 16) | u32::from(dport));
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h & (PIN_FILTER_BITS - 1)
}

/// Event kinds in `FlowEvent::kind`.
pub mod event_kind {
    /// A flow entry was created (TCP SYN or first UDP packet; a mid-stream
    /// pickup sends `ESTABLISHED` only).
    pub const NEW: u8 = 1;
    /// A TCP flow completed its handshake (or was picked up established).
    pub const ESTABLISHED: u8 = 2;
    /// A TCP flow closed (FIN both ways or RST).
    pub const CLOSED: u8 = 3;
    /// A draining pod's inbound TCP socket closed (from the sockets
    /// tracepoint): the agent looks at the pod again.
    pub const SOCKET_CLOSED: u8 = 4;
}

/// Sent through the `EVENTS` ring buffer on every flow state change, so the
/// agent learns of them at once instead of polling the table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    pub key: FlowKey,
    pub ts_ns: u64,
    /// Identifies this incarnation of the flow (same as `FlowValue::first_seen_ns`).
    pub first_seen_ns: u64,
    pub pod_slot: u32,
    pub kind: u8,
    pub direction: u8,
    pub state: u8,
    pub flags: u8,
}

/// A packet's addresses as they are on the wire (unlike `FlowKey`, not
/// turned to the pod's side): what a pinned flow's packets are matched on.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct WireKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    /// Host byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Bits of `Pin::flags`.
pub mod pin_flags {
    /// The pinned pod is gone: answer TCP with a reset instead of steering.
    pub const DEAD: u32 = 1;
    /// A FIN went this way.
    pub const FIN: u32 = 2;
    /// A RST went this way (the flow is over).
    pub const RST: u32 = 4;
}

/// One direction of a pinned flow: how to rewrite its packets and where to
/// send them, bypassing netfilter (so kube-proxy's rules and conntrack no
/// longer matter to it, and nothing translates it twice).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Pin {
    pub new_src: [u8; 16],
    pub new_dst: [u8; 16],
    /// Host byte order.
    pub new_sport: u16,
    /// Host byte order.
    pub new_dport: u16,
    /// Interface to send the rewritten packet out of.
    pub ifindex: u32,
    /// Neighbour to resolve on `ifindex`: the destination itself, or the gateway to it.
    pub nexthop: [u8; 16],
    pub last_seen_ns: u64,
    pub packets: u64,
    /// `pin_flags::*`
    pub flags: u32,
    pub _pad: u32,
}

/// A fragmented datagram: its addresses as they are on the wire (IPv4
/// as IPv4-mapped IPv6), its IP identification (IPv4: 16 bits; IPv6: the
/// fragment header's 32) and protocol. What the receiver reassembles by
/// (RFC 791, RFC 8200 4.5).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order.
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// How the first fragment of a datagram was steered (the `FRAGS` value):
/// its pin's addresses and target. The ports are only in the first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragSteer {
    pub new_src: [u8; 16],
    pub new_dst: [u8; 16],
    pub nexthop: [u8; 16],
    pub ifindex: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the first fragment.
    pub first_ns: u64,
}

/// One open inbound TCP socket of a pod, as the kernel's socket layer
/// reports it (the `SOCKETS` value).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockValue {
    /// The connection, from the pod's side, as in `FLOWS`.
    pub key: FlowKey,
    /// `bpf_ktime_get_ns` when the socket was created (SYN_RECV).
    pub opened_ns: u64,
    pub pod_slot: u32,
    pub _pad: u32,
}

/// Per pod slot: its open inbound TCP sockets, kept with atomic adds by the
/// sockets tracepoint (the `POD_SOCKETS` value).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodSockets {
    /// Entries of this slot in `SOCKETS`.
    pub open: u64,
    /// Sockets `SOCKETS` had no room for: never decremented, so a pod with
    /// any cannot be confirmed drained.
    pub lost: u64,
}

/// A pod's probe port (the `PROBES` key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ProbeKey {
    pub pod_slot: u32,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// The preStop intercept's settings (the `INTERCEPT_CONFIG` value).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InterceptConfig {
    /// Cookie of the node's network namespace (`SO_NETNS_COOKIE`): only
    /// sockets of that namespace are intercepted, never a pod's.
    pub netns_cookie: u64,
    /// The port the kubelet dials on a pod IP (host byte order); 0: off.
    pub pod_port: u16,
    /// The agent's loopback listener it is sent to instead (host byte order).
    pub listen_port: u16,
    pub _pad: u32,
}

/// The client end of an intercepted connection: its loopback address
/// (IPv4-mapped for IPv4, as `PodIpKey`) and port (the `INTERCEPT_PEERS` key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct InterceptPeer {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// The pod address an intercepted connection dialled (IPv4-mapped for IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InterceptDst {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all of these are `repr(C)`, `Copy`, made only of integers and
    // byte arrays, with explicit padding, so every bit pattern is valid.
    unsafe impl aya::Pod for super::PodIpKey {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::PodCounters {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::WireKey {}
    unsafe impl aya::Pod for super::Pin {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragSteer {}
    unsafe impl aya::Pod for super::SockValue {}
    unsafe impl aya::Pod for super::PodSockets {}
    unsafe impl aya::Pod for super::ProbeKey {}
    unsafe impl aya::Pod for super::InterceptConfig {}
    unsafe impl aya::Pod for super::InterceptPeer {}
    unsafe impl aya::Pod for super::InterceptDst {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    fn wire(i: u32) -> WireKey {
        let mut k = WireKey { proto: PROTO_TCP, family: FAMILY_V4, ..WireKey::default() };
        k.src[10..12].copy_from_slice(&[0xff, 0xff]);
        let [_, _, hi, lo] = i.to_be_bytes();
        k.src[12..16].copy_from_slice(&[10, 0, hi, lo]);
        k.dst[10..12].copy_from_slice(&[0xff, 0xff]);
        k.dst[12..16].copy_from_slice(&[10, 96, 0, 10]);
        k.sport = 32768 + u16::try_from(i % 28000).unwrap_or(0);
        k.dport = 80;
        k
    }

    fn may(c: &Config, k: &WireKey) -> bool {
        c.may_be_pinned(&k.src, &k.dst, k.sport, k.dport)
    }

    /// Fresh maps (all zero) look up every packet; "no pins" none; with the
    /// filter on, every noted tuple is looked up and few others are.
    #[test]
    fn the_pin_filter_never_hides_a_pin_and_lets_most_others_through() {
        let mut c = Config::default();
        assert!(may(&c, &wire(1)), "a fresh Config must mean: look");
        c.no_pins = 1;
        assert!(!may(&c, &wire(1)));
        c.no_pins = 0;
        c.pin_filter_on = 1;
        assert!(!may(&c, &wire(1)), "an empty filter holds no pin");
        for i in 0..300 {
            c.note_pin(&wire(i));
        }
        assert!((0..300).all(|i| may(&c, &wire(i))), "a noted tuple must be looked up");
        let set: u32 = c.pin_filter.iter().map(|w| w.count_ones()).sum();
        assert!(set > 250, "{set} bits set: the hash spreads badly");
        let others = (1000..11_000).filter(|&i| may(&c, &wire(i))).count();
        assert!(others < 500, "{others} of 10000 other tuples pass a filter of 300 pins");
    }

    /// If one of these sizes changes, bump `LAYOUT_VERSION` too.
    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowValue>(), 40);
        assert_eq!(size_of::<PodCounters>(), 32);
        assert_eq!(size_of::<FlowEvent>(), 64);
        assert_eq!(size_of::<WireKey>(), 40);
        assert_eq!(size_of::<Pin>(), 80);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<FragSteer>(), 64);
        assert_eq!(size_of::<SockValue>(), 56);
        assert_eq!(size_of::<PodSockets>(), 16);
        assert_eq!(size_of::<ProbeKey>(), 8);
        assert_eq!(size_of::<InterceptConfig>(), 16);
        assert_eq!(size_of::<InterceptPeer>(), 20);
        assert_eq!(size_of::<InterceptDst>(), 20);
    }

    /// Pinned maps outlive the agent: a layout change must come with a new
    /// `LAYOUT_VERSION`, or the next agent would misread the old maps.
    #[test]
    fn layout_version_goes_with_the_layouts() {
        let sizes = [
            size_of::<FlowKey>(),
            size_of::<FlowValue>(),
            size_of::<PodIpKey>(),
            size_of::<PodCounters>(),
            size_of::<Config>(),
            size_of::<WireKey>(),
            size_of::<Pin>(),
            size_of::<SockValue>(),
            size_of::<PodSockets>(),
            size_of::<ProbeKey>(),
        ];
        let sizing = (MAX_PODS, MAX_PINS, MAX_HELD, MAX_SOCKETS, stats::COUNT, pod_flags::DRAINING);
        assert_eq!(
            (LAYOUT_VERSION, sizes, sizing),
            (4, [40, 40, 16, 32, 2072, 40, 80, 56, 16, 8], (4096, 65_536, 65_536, 262_144, 11, 1)),
            "a pinned layout changed: bump LAYOUT_VERSION, then update this test"
        );
    }
}
