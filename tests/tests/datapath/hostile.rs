//! Hostile and malformed packets: a corpus of broken headers, and a property
//! test of random packet sequences, all run through the real programs.
//!
//! Whatever a packet looks like, the programs must hand back their verdict
//! and the packet unchanged (the harness checks both on every run), and the
//! maps must stay consistent after every single packet (`Lab::send`):
//!
//! - for each pod slot, `active_inbound` (`active_outbound`) is the number of
//!   TCP flows in `FLOWS` with that slot, direction inbound (outbound) and
//!   state `ESTABLISHED` or `CLOSING`; the table never evicts here (it holds
//!   exactly the flows that were created), so this must hold exactly;
//! - every flow belongs to a registered pod IP, in that pod's slot, with a
//!   state in 1..=5, a known direction, protocol and family;
//! - one packet changes at most one flow and sends at most one event, which
//!   describes that flow as the table now holds it; a packet counted as
//!   unparsed or not-a-pod's changes nothing;
//! - `new_inbound_total` never decreases, and goes up by one exactly when a
//!   new inbound flow is announced.
//!
//! Where the README or the parser's documented bounds say what a packet does
//! (a chain of more than `MAX_EXT_HEADERS` extension headers, a header cut
//! short, the TCP flag rules), the tests check that too. Where nothing does,
//! only consistency is checked: today the parser reads through an IPv4 total
//! length or IPv6 payload length that ends before the transport header (or
//! runs past the frame), a TCP data offset past the end of the segment, a UDP
//! length of 0, IPv4 options with bad lengths and a hop-by-hop header that is
//! not first, and tracks those packets like well-formed ones, although the
//! kernel's own stack would drop them.
//!
//! Frames are built byte by byte here (not with etherparse) so that any field
//! can be wrong; `raw_builders_match_the_etherparse_ones` checks the builders
//! against `packets`.

use std::{
    cell::RefCell,
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicU16, Ordering},
};

use aya::{
    maps::{
        Array, HashMap as BpfHashMap, Map, MapData, MapInfo, PerCpuArray, PerCpuValues, loaded_maps,
    },
    programs::loaded_programs,
};
use conndrain_common::{
    FAMILY_V4, FAMILY_V6, FlowEvent, FlowKey, FlowValue, PROTO_TCP, PROTO_UDP, PodCounters,
    PodIpKey, direction, event_kind, flow_flags, maps, stats, tcp_state,
};
use proptest::{
    prelude::*,
    sample::Index,
    test_runner::{TestCaseError, TestRunner},
};

use crate::{
    harness::{Harness, POD_SLOT, Side, mapped},
    packets::{self, ACK, Conn, ETH_HLEN, FIN, IPV4_HLEN, IPV6_HLEN, IpExt, PSH, RST, SYN},
};

const URG: u8 = 0x20;
const ECE: u8 = 0x40;
const CWR: u8 = 0x80;

const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

// IPv6 extension header numbers.
const HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DEST: u8 = 60;

/// The parser's bound on IPv6 extension headers (`parse.rs`).
const MAX_EXT_HEADERS: usize = 6;

/// A second pod, in its own slot.
const SLOT_B: u32 = POD_SLOT + 1;
/// Slot 0 (never registered: must stay zero) and the pods' slots.
const SLOTS: [u32; 3] = [0, POD_SLOT, SLOT_B];
const POD4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const POD4_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 3);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, 2);
const POD6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, 3);
/// Addresses of no registered pod.
const STRANGER4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 9);
const STRANGER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, 9);
const PEER4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

/// The MAC addresses `packets` uses: destination (host), then source (pod).
const MACS: [u8; 12] = [0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];

// ---------------------------------------------------------------------------
// Raw frame builders.

/// The Internet checksum of the concatenation of `parts`.
fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes = parts.concat();
    let mut sum: u64 = bytes
        .chunks(2)
        .map(|w| u64::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap()
}

fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => [
            &s.octets()[..],
            &d.octets(),
            &[0, proto],
            &u16::try_from(len).unwrap().to_be_bytes(),
        ]
        .concat(),
        (IpAddr::V6(s), IpAddr::V6(d)) => [
            &s.octets()[..],
            &d.octets(),
            &u32::try_from(len).unwrap().to_be_bytes(),
            &[0, 0, 0, proto],
        ]
        .concat(),
        _ => panic!("mixed address families {src} -> {dst}"),
    }
}

/// A TCP segment as `packets::tcp` writes it (seq 1000, ack 2000 when ACK is
/// set, window 64240), with any flags byte and `options` (data offset 5 plus
/// their 32-bit words), checksummed.
fn tcp_segment(
    src: SocketAddr,
    dst: SocketAddr,
    flags: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert!(
        options.len().is_multiple_of(4) && options.len() <= 40,
        "TCP options"
    );
    let doff = u8::try_from(5 + options.len() / 4).unwrap();
    let ack: u32 = if flags & ACK != 0 { 2000 } else { 0 };
    let mut seg = Vec::with_capacity(TCP_HLEN + options.len() + payload.len());
    seg.extend_from_slice(&src.port().to_be_bytes());
    seg.extend_from_slice(&dst.port().to_be_bytes());
    seg.extend_from_slice(&1000u32.to_be_bytes());
    seg.extend_from_slice(&ack.to_be_bytes());
    seg.extend_from_slice(&[doff << 4, flags]);
    seg.extend_from_slice(&64240u16.to_be_bytes());
    seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    seg.extend_from_slice(options);
    seg.extend_from_slice(payload);
    let sum = checksum(&[
        &pseudo_header(src.ip(), dst.ip(), PROTO_TCP, seg.len()),
        &seg,
    ]);
    seg[16..18].copy_from_slice(&sum.to_be_bytes());
    seg
}

fn udp_datagram(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let len = UDP_HLEN + payload.len();
    let mut d = Vec::with_capacity(len);
    d.extend_from_slice(&src.port().to_be_bytes());
    d.extend_from_slice(&dst.port().to_be_bytes());
    d.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    let sum = match checksum(&[&pseudo_header(src.ip(), dst.ip(), PROTO_UDP, len), &d]) {
        0 => 0xffff,
        s => s,
    };
    d[6..8].copy_from_slice(&sum.to_be_bytes());
    d
}

/// An IPv6 extension header. Lengths are the header's own length field (in
/// 8-byte units beyond the first 8); options are Pad1, routing headers are of
/// the experimental type 253 with no segments left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ext {
    Hop(u8),
    Routing(u8),
    Dest(u8),
    /// Offset in 8-byte units, more-fragments.
    Frag(u16, bool),
}

impl Ext {
    fn number(self) -> u8 {
        match self {
            Ext::Hop(_) => HOP,
            Ext::Routing(_) => ROUTING,
            Ext::Dest(_) => DEST,
            Ext::Frag(..) => FRAGMENT,
        }
    }

    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            Ext::Hop(len) | Ext::Dest(len) => {
                let mut b = vec![0; (usize::from(len) + 1) * 8];
                b[0] = next;
                b[1] = len;
                b
            }
            Ext::Routing(len) => {
                let mut b = vec![0; (usize::from(len) + 1) * 8];
                b[0] = next;
                b[1] = len;
                b[2] = 253;
                b
            }
            Ext::Frag(offset, more) => {
                let word = (offset << 3) | u16::from(more);
                let w = word.to_be_bytes();
                vec![next, 0, w[0], w[1], 0, 0, 0x12, 0x34]
            }
        }
    }
}

/// What sits between the IP header and the transport: IPv4 options or IPv6
/// extension headers (whichever fits the family).
#[derive(Clone, Debug, Default)]
struct L3 {
    v4_options: Vec<u8>,
    v6_exts: Vec<Ext>,
}

impl L3 {
    fn v4_options(options: &[u8]) -> Self {
        Self {
            v4_options: options.to_vec(),
            ..Self::default()
        }
    }

    fn v6_exts(exts: &[Ext]) -> Self {
        Self {
            v6_exts: exts.to_vec(),
            ..Self::default()
        }
    }
}

/// A whole Ethernet frame around `l4`, with right lengths and checksums.
fn ip_frame(src: IpAddr, dst: IpAddr, l3: &L3, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = MACS.to_vec();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let opts = &l3.v4_options;
            assert!(
                opts.len().is_multiple_of(4) && opts.len() <= 40,
                "IPv4 options"
            );
            let ihl = u8::try_from(5 + opts.len() / 4).unwrap();
            let total = u16::try_from(usize::from(ihl) * 4 + l4.len()).unwrap();
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            f.extend_from_slice(&[0x40 | ihl, 0]);
            f.extend_from_slice(&total.to_be_bytes());
            f.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]); // id 0, DF
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
            f.extend_from_slice(opts);
            fix_ipv4_checksum(&mut f);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let numbers: Vec<u8> = l3.v6_exts.iter().map(|e| e.number()).collect();
            let mut exts = Vec::new();
            for (i, e) in l3.v6_exts.iter().enumerate() {
                exts.extend(e.bytes(numbers.get(i + 1).copied().unwrap_or(proto)));
            }
            let first = numbers.first().copied().unwrap_or(proto);
            let payload = u16::try_from(exts.len() + l4.len()).unwrap();
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&payload.to_be_bytes());
            f.extend_from_slice(&[first, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
            f.extend(exts);
        }
        _ => panic!("mixed address families {src} -> {dst}"),
    }
    f.extend_from_slice(l4);
    f
}

/// Recomputes the IPv4 header checksum of `frame` over its IHL (or what
/// there is of it), so that only the fields a test broke are wrong.
fn fix_ipv4_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    let end = (ETH_HLEN + ihl.max(IPV4_HLEN)).min(frame.len());
    frame[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
    let sum = checksum(&[&frame[ETH_HLEN..end]]);
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&sum.to_be_bytes());
}

/// Sets the IPv4 total-length field (and the checksum).
fn set_ipv4_total_len(frame: &mut [u8], total: u16) {
    frame[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&total.to_be_bytes());
    fix_ipv4_checksum(frame);
}

/// One flow between a pod and a peer, to build its packets either way.
#[derive(Clone, Copy, Debug)]
struct Flow {
    pod: SocketAddr,
    peer: SocketAddr,
}

impl Flow {
    fn key(&self, proto: u8) -> FlowKey {
        FlowKey {
            pod_addr: mapped(self.pod.ip()),
            peer_addr: mapped(self.peer.ip()),
            pod_port: self.pod.port(),
            peer_port: self.peer.port(),
            proto,
            family: if self.pod.is_ipv4() {
                FAMILY_V4
            } else {
                FAMILY_V6
            },
            _pad: [0; 2],
        }
    }

    fn tcp_key(&self) -> FlowKey {
        self.key(PROTO_TCP)
    }

    /// (source, destination) of a packet going through `side`.
    fn ends(&self, side: Side) -> (SocketAddr, SocketAddr) {
        match side {
            Side::FromPod => (self.pod, self.peer),
            Side::ToPod => (self.peer, self.pod),
        }
    }

    fn tcp(&self, side: Side, flags: u8) -> Vec<u8> {
        self.tcp_with(side, flags, &L3::default(), &[], b"")
    }

    fn tcp_with(&self, side: Side, flags: u8, l3: &L3, options: &[u8], payload: &[u8]) -> Vec<u8> {
        let (src, dst) = self.ends(side);
        let seg = tcp_segment(src, dst, flags, options, payload);
        ip_frame(src.ip(), dst.ip(), l3, PROTO_TCP, &seg)
    }

    fn udp(&self, side: Side, payload: &[u8]) -> Vec<u8> {
        let (src, dst) = self.ends(side);
        let d = udp_datagram(src, dst, payload);
        ip_frame(src.ip(), dst.ip(), &L3::default(), PROTO_UDP, &d)
    }
}

fn hex(frame: &[u8]) -> String {
    frame.iter().fold(String::new(), |mut s, b| {
        write!(s, "{b:02x}").unwrap();
        s
    })
}

// ---------------------------------------------------------------------------
// The lab: a harness with registered pods, and the checks run after every
// packet.

/// What one packet did.
#[derive(Debug)]
struct Outcome {
    /// The kernel ran the programs: `BPF_PROG_TEST_RUN` refuses frames
    /// shorter than an Ethernet header (and, on recent kernels, IP frames
    /// shorter than their IP header) before running anything.
    ran: bool,
    /// Counted in `STATS[UNPARSED]` / `STATS[NOT_POD]`.
    unparsed: bool,
    not_pod: bool,
    /// The flow it created or changed: key, value before, value after.
    changed: Option<(FlowKey, Option<FlowValue>, FlowValue)>,
    event: Option<FlowEvent>,
}

impl Outcome {
    /// The flow's value after the packet, if it changed one.
    fn after(&self) -> Option<&FlowValue> {
        self.changed.as_ref().map(|(_, _, v)| v)
    }

    fn event_kind(&self) -> Option<u8> {
        self.event.map(|e| e.kind)
    }
}

type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// Stats looked at around each packet.
const WATCHED_STATS: [u32; 6] = [
    stats::PACKETS,
    stats::UNPARSED,
    stats::NOT_POD,
    stats::FLOWS_CREATED,
    stats::INSERT_FAILED,
    stats::EVENTS_LOST,
];

/// A harness with two pods registered (`POD4`/`POD6` and `POD4_B`/`POD6_B`),
/// and its maps as they were after the last packet, so that every packet's
/// effect can be checked.
struct Lab {
    h: Harness,
    /// Registered pod addresses (as mapped) and their slots.
    pods: HashMap<[u8; 16], u32>,
    /// The table after the last packet.
    flows: HashMap<FlowKey, FlowValue>,
    counters: HashMap<u32, PodCounters>,
    stats: [u64; WATCHED_STATS.len()],
    next_peer_port: u16,
    next_pod_port: u16,
    tally: Tally,
    /// Found on the first `clear`.
    own: Option<OwnMaps>,
    /// Whether pod A drains too (random sequences start its drain midway).
    a_draining: bool,
}

/// What the packets a lab sent did, for the summary a test prints: shows
/// that a corpus or the random sequences reach the paths they are meant to.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    /// Refused by the kernel before running the programs.
    refused: u64,
    unparsed: u64,
    not_pod: u64,
    /// Created a flow / changed an existing one.
    created: u64,
    updated: u64,
    /// Events by kind (`event_kind::*`).
    events: [u64; 4],
}

/// An event against the flow change the same packet made.
fn check_event(ev: &FlowEvent, changed: Option<&(FlowKey, Option<FlowValue>, FlowValue)>) -> Check {
    let Some((key, _, v)) = changed else {
        return Err(format!("event {ev:?} with no change in the table"));
    };
    ensure!(
        ev.key == *key,
        "event {ev:?} is not about the changed flow {key:?}"
    );
    ensure!(
        (
            ev.first_seen_ns,
            ev.pod_slot,
            ev.direction,
            ev.state,
            ev.flags
        ) == (v.first_seen_ns, v.pod_slot, v.direction, v.state, v.flags),
        "event {ev:?} does not match the flow {v:?}"
    );
    let kind_ok = match ev.kind {
        event_kind::NEW => {
            v.first_seen_ns == v.last_seen_ns
                && v.state
                    == if key.proto == PROTO_TCP {
                        tcp_state::SYN_SENT
                    } else {
                        tcp_state::ESTABLISHED
                    }
        }
        event_kind::ESTABLISHED => tcp_state::is_active(v.state),
        event_kind::CLOSED => v.state == tcp_state::CLOSED,
        _ => false,
    };
    ensure!(kind_ok, "event {ev:?} does not fit the flow {v:?}");
    Ok(())
}

impl Lab {
    /// `POD4` and `POD6` in `POD_SLOT`, `POD4_B` and `POD6_B` in `SLOT_B`.
    fn new() -> Self {
        let mut h = Harness::new();
        let mut pods = HashMap::new();
        for (ip, slot) in [
            (IpAddr::V4(POD4), POD_SLOT),
            (IpAddr::V6(POD6), POD_SLOT),
            (IpAddr::V4(POD4_B), SLOT_B),
            (IpAddr::V6(POD6_B), SLOT_B),
        ] {
            h.add_pod_ip(ip, slot);
            pods.insert(mapped(ip), slot);
        }
        // Pod B drains: its flows live in HELD, pod A's in the LRU table, so
        // every corpus and random sequence runs both paths.
        h.set_draining(SLOT_B, true);
        let mut lab = Self {
            h,
            pods,
            flows: HashMap::new(),
            counters: HashMap::new(),
            stats: [0; WATCHED_STATS.len()],
            next_peer_port: 20_000,
            next_pod_port: 40_000,
            tally: Tally::default(),
            own: None,
            a_draining: false,
        };
        for slot in SLOTS {
            lab.counters.insert(slot, PodCounters::default());
        }
        lab
    }

    /// A fresh flow where the pod serves: pod port 8080, a new peer port.
    fn server_flow(&mut self, v6: bool) -> Flow {
        let port = self.next_peer_port;
        self.next_peer_port += 1;
        let (pod, peer) = if v6 {
            (IpAddr::V6(POD6), IpAddr::V6(PEER6))
        } else {
            (IpAddr::V4(POD4), IpAddr::V4(PEER4))
        };
        Flow {
            pod: SocketAddr::new(pod, 8080),
            peer: SocketAddr::new(peer, port),
        }
    }

    /// A fresh flow where the pod is the client: a new pod port, peer port 443.
    fn client_flow(&mut self, v6: bool) -> Flow {
        let port = self.next_pod_port;
        self.next_pod_port += 1;
        let (pod, peer) = if v6 {
            (IpAddr::V6(POD6), IpAddr::V6(PEER6))
        } else {
            (IpAddr::V4(POD4), IpAddr::V4(PEER4))
        };
        Flow {
            pod: SocketAddr::new(pod, port),
            peer: SocketAddr::new(peer, 443),
        }
    }

    fn read_stats(&self) -> [u64; WATCHED_STATS.len()] {
        WATCHED_STATS.map(|s| self.h.stat(s))
    }

    /// Runs `frame` through `side` and checks everything; panics on a failure.
    fn send(&mut self, side: Side, frame: &[u8]) -> Outcome {
        match self.try_send(side, frame) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like `send`, for a frame the kernel must run.
    fn run(&mut self, side: Side, frame: &[u8]) -> Outcome {
        let o = self.send(side, frame);
        assert!(o.ran, "{side:?}: the kernel refused {}", hex(frame));
        o
    }

    /// Runs `frame` through `side` and checks every invariant (see the
    /// module doc); the error names the frame.
    fn try_send(&mut self, side: Side, frame: &[u8]) -> Result<Outcome, String> {
        let ran = self.h.send_or_refused(side, frame);
        let o = self
            .check_packet(ran)
            .map_err(|e| format!("after {side:?} {} ({} bytes): {e}", hex(frame), frame.len()))?;
        let t = &mut self.tally;
        t.sent += 1;
        t.refused += u64::from(!o.ran);
        t.unparsed += u64::from(o.unparsed);
        t.not_pod += u64::from(o.not_pod);
        match &o.changed {
            Some((_, None, _)) => t.created += 1,
            Some((_, Some(_), _)) => t.updated += 1,
            None => {}
        }
        if let Some(ev) = &o.event {
            t.events[usize::from(ev.kind)] += 1;
        }
        Ok(o)
    }

    fn check_packet(&mut self, ran: bool) -> Result<Outcome, String> {
        let stats = self.read_stats();
        let delta: Vec<u64> = stats.iter().zip(self.stats).map(|(a, b)| a - b).collect();
        self.stats = stats;
        let [
            packets,
            unparsed,
            not_pod,
            created,
            insert_failed,
            events_lost,
        ] = delta[..]
        else {
            unreachable!()
        };
        ensure!(
            packets == u64::from(ran),
            "STATS[PACKETS] went up by {packets}"
        );
        ensure!(
            unparsed + not_pod <= 1,
            "counted both unparsed and not a pod's"
        );
        ensure!(insert_failed == 0, "a flow insert failed");
        ensure!(events_lost == 0, "an event was lost");

        let events = self.h.events();
        ensure!(
            events.len() <= 1,
            "one packet sent {} events: {events:#?}",
            events.len()
        );
        let event = events.first().copied();

        let flows = self.both_tables()?;
        ensure!(
            u64::try_from(flows.len()).unwrap() == self.stats[3],
            "the table holds {} flows but {} were created: it evicted, the test is wrong",
            flows.len(),
            self.stats[3]
        );
        for k in self.flows.keys() {
            ensure!(flows.contains_key(k), "flow {k:?} disappeared");
        }
        let changed: Vec<_> = flows
            .iter()
            .filter(|(k, v)| self.flows.get(*k) != Some(*v))
            .map(|(k, v)| (*k, self.flows.get(k).copied(), *v))
            .collect();
        ensure!(
            changed.len() <= 1,
            "one packet changed {} flows: {changed:#?}",
            changed.len()
        );
        let changed = changed.into_iter().next();
        ensure!(
            created <= 1 && (created == 0 || changed.as_ref().is_some_and(|c| c.1.is_none())),
            "FLOWS_CREATED went up by {created}, changes: {changed:?}"
        );
        if unparsed + not_pod + u64::from(!ran) > 0 {
            ensure!(
                changed.is_none() && event.is_none(),
                "a packet that was not tracked changed {changed:?}, sent {event:?}"
            );
        }
        if let Some(ev) = &event {
            check_event(ev, changed.as_ref())?;
        }
        self.check_table(&flows)?;
        self.check_new_inbound(event)?;

        self.flows = flows;
        Ok(Outcome {
            ran,
            unparsed: unparsed == 1,
            not_pod: not_pod == 1,
            changed,
            event,
        })
    }

    /// FLOWS and HELD as one table, checking that each flow is in the one
    /// its pod's drain state says, and in one only.
    fn both_tables(&self) -> Result<HashMap<FlowKey, FlowValue>, String> {
        let mut flows: HashMap<FlowKey, FlowValue> = self.h.flows().into_iter().collect();
        let draining = |slot| slot == SLOT_B || (slot == POD_SLOT && self.a_draining);
        for (k, v) in &flows {
            // Flows of a pod that started draining move at their next packet;
            // a draining pod's new flows are born in HELD.
            let may_stay = v.pod_slot == POD_SLOT && self.flows.contains_key(k);
            ensure!(
                !draining(v.pod_slot) || may_stay,
                "a draining pod's flow in FLOWS: {k:?} {v:?}"
            );
        }
        for (k, v) in self.h.held_flows() {
            ensure!(
                draining(v.pod_slot),
                "a flow of a pod that is not draining in HELD: {k:?} {v:?}"
            );
            ensure!(
                flows.insert(k, v).is_none(),
                "a flow in both FLOWS and HELD: {k:?}"
            );
        }
        Ok(flows)
    }

    /// `new_inbound_total` goes up by one exactly when a new inbound flow is
    /// announced, and `last_new_inbound_ns` moves with it.
    fn check_new_inbound(&mut self, event: Option<FlowEvent>) -> Check {
        for slot in SLOTS {
            let c = self.h.counters(slot);
            let old = self.counters[&slot];
            let announced = event.is_some_and(|e| {
                e.kind == event_kind::NEW && e.direction == direction::INBOUND && e.pod_slot == slot
            });
            ensure!(
                c.new_inbound_total == old.new_inbound_total + u64::from(announced),
                "slot {slot}: new_inbound_total went from {} to {} (new inbound event: {announced})",
                old.new_inbound_total,
                c.new_inbound_total
            );
            if announced {
                ensure!(
                    c.last_new_inbound_ns == event.unwrap().ts_ns,
                    "slot {slot}: last_new_inbound_ns {} is not the event's time",
                    c.last_new_inbound_ns
                );
            } else {
                ensure!(
                    c.last_new_inbound_ns == old.last_new_inbound_ns,
                    "slot {slot}: last_new_inbound_ns moved without a new inbound flow"
                );
            }
            self.counters.insert(slot, c);
        }
        Ok(())
    }

    /// The table against itself and the counters.
    fn check_table(&self, flows: &HashMap<FlowKey, FlowValue>) -> Check {
        let mut active: HashMap<u32, (u64, u64)> = HashMap::new();
        for (k, v) in flows {
            let Some(&slot) = self.pods.get(&k.pod_addr) else {
                return Err(format!("flow of an unregistered pod address: {k:?} {v:?}"));
            };
            ensure!(
                v.pod_slot == slot,
                "flow in slot {} of a pod in slot {slot}: {k:?}",
                v.pod_slot
            );
            ensure!(
                (tcp_state::SYN_SENT..=tcp_state::CLOSED).contains(&v.state),
                "state {} out of range: {k:?} {v:?}",
                v.state
            );
            ensure!(
                v.direction == direction::INBOUND || v.direction == direction::OUTBOUND,
                "direction {}: {k:?} {v:?}",
                v.direction
            );
            ensure!(
                v.flags & !0x1f == 0,
                "unknown flags {:#x}: {k:?} {v:?}",
                v.flags
            );
            ensure!(k._pad == [0; 2], "key padding {k:?}");
            ensure!(v._pad == 0, "value padding {v:?}");
            ensure!(
                v.first_seen_ns <= v.last_seen_ns,
                "first seen after last seen: {k:?} {v:?}"
            );
            // At least one frame, and every frame has an Ethernet header.
            ensure!(
                v.bytes_in + v.bytes_out >= 14,
                "byte counts: {k:?} {v:?}"
            );
            match k.family {
                FAMILY_V4 => ensure!(
                    k.pod_addr[..12] == mapped(IpAddr::V4(Ipv4Addr::UNSPECIFIED))[..12]
                        && k.peer_addr[..12] == k.pod_addr[..12],
                    "an IPv4 flow with non-IPv4 addresses: {k:?}"
                ),
                FAMILY_V6 => {}
                f => return Err(format!("family {f}: {k:?}")),
            }
            match k.proto {
                PROTO_TCP => {
                    if tcp_state::is_active(v.state) {
                        let e = active.entry(slot).or_default();
                        if v.direction == direction::INBOUND {
                            e.0 += 1;
                        } else {
                            e.1 += 1;
                        }
                    }
                }
                PROTO_UDP => ensure!(
                    v.state == tcp_state::ESTABLISHED && v.flags == 0,
                    "UDP flow in state {} flags {}: {k:?}",
                    v.state,
                    v.flags
                ),
                p => return Err(format!("protocol {p}: {k:?}")),
            }
        }
        for slot in SLOTS {
            let c = self.h.counters(slot);
            let want = active.get(&slot).copied().unwrap_or_default();
            ensure!(
                (c.active_inbound, c.active_outbound) == want,
                "slot {slot}: counters say {} inbound / {} outbound active, the table holds {} / {}",
                c.active_inbound,
                c.active_outbound,
                want.0,
                want.1
            );
        }
        Ok(())
    }

    /// An established TCP flow (handshake from the right opener), checked.
    fn established(&mut self, flow: &Flow, inbound: bool) {
        let (opener, responder) = if inbound {
            (Side::ToPod, Side::FromPod)
        } else {
            (Side::FromPod, Side::ToPod)
        };
        self.run(opener, &flow.tcp(opener, SYN));
        self.run(responder, &flow.tcp(responder, SYN | ACK));
        let o = self.run(opener, &flow.tcp(opener, ACK));
        assert_eq!(o.event_kind(), Some(event_kind::ESTABLISHED), "{flow:?}");
        let v = self.flows[&flow.tcp_key()];
        assert_eq!(v.state, tcp_state::ESTABLISHED);
        let dir = if inbound {
            direction::INBOUND
        } else {
            direction::OUTBOUND
        };
        assert_eq!(v.direction, dir);
    }

    /// The frame must run and be counted as unparsed, changing nothing.
    fn expect_unparsed(&mut self, side: Side, frame: &[u8], what: &str) {
        let o = self.run(side, frame);
        assert!(
            o.unparsed,
            "{what}: {side:?} {} was not counted unparsed: {o:?}",
            hex(frame)
        );
    }

    /// The frame must be either refused by the kernel or run unparsed.
    fn expect_refused_or_unparsed(&mut self, side: Side, frame: &[u8], what: &str) {
        let o = self.send(side, frame);
        assert!(
            !o.ran || o.unparsed,
            "{what}: {side:?} {} was tracked: {o:?}",
            hex(frame)
        );
    }

    /// The frame must create `key` in `state`.
    fn expect_new(&mut self, side: Side, frame: &[u8], key: &FlowKey, state: u8, what: &str) {
        let o = self.run(side, frame);
        match &o.changed {
            Some((k, None, v)) if k == key && v.state == state => {}
            _ => panic!(
                "{what}: {side:?} {} should have created {key:?} in state {state}: {o:?}",
                hex(frame)
            ),
        }
    }

    /// Brings the maps back to a fresh harness's state, the pods still
    /// registered (much faster than a new harness).
    fn clear(&mut self) {
        self.own
            .get_or_insert_with(|| OwnMaps::find(&mut self.h))
            .clear();
        self.h.set_draining(POD_SLOT, false);
        self.a_draining = false;
        self.h.events();
        self.reset_view();
    }

    /// Clears the maps once the table holds 64 flows: every check walks the
    /// whole table, so a long corpus would slow down as it grows. Returns
    /// whether it cleared.
    fn keep_small(&mut self) -> bool {
        let full = self.flows.len() >= 64;
        if full {
            self.clear();
        }
        full
    }

    /// Forgets what the lab saw, after its maps were cleared.
    fn reset_view(&mut self) {
        self.flows.clear();
        for c in self.counters.values_mut() {
            *c = PodCounters::default();
        }
        self.stats = [0; WATCHED_STATS.len()];
        assert_eq!(self.read_stats(), self.stats, "STATS not cleared");
        assert!(self.h.flows().is_empty(), "FLOWS not cleared");
        assert!(self.h.held_flows().is_empty(), "HELD not cleared");
    }

    fn summary(&self) -> String {
        let t = &self.tally;
        format!(
            "{} packets: {} refused by the kernel, {} unparsed, {} not a pod's, {} created a \
             flow, {} updated one; events new/established/closed {}/{}/{}; {} flows in the table",
            t.sent,
            t.refused,
            t.unparsed,
            t.not_pod,
            t.created,
            t.updated,
            t.events[1],
            t.events[2],
            t.events[3],
            self.flows.len()
        )
    }
}

// ---------------------------------------------------------------------------
// The corpus.

#[test]
fn raw_builders_match_the_etherparse_ones() {
    let c4 = Conn::new("10.0.1.2:8080", "10.0.0.2:40312");
    let c6 = Conn::new("[fd00::1:2]:8080", "[fd00::2]:40312");
    let f4 = Flow {
        pod: c4.pod,
        peer: c4.peer,
    };
    let f6 = Flow {
        pod: c6.pod,
        peer: c6.peer,
    };
    for flags in [
        SYN,
        SYN | ACK,
        ACK,
        PSH | ACK,
        FIN | ACK,
        RST,
        FIN | SYN | RST | PSH | ACK,
    ] {
        assert_eq!(
            f4.tcp(Side::ToPod, flags),
            c4.peer_tcp(flags, b""),
            "{flags:#x}"
        );
        assert_eq!(
            f6.tcp(Side::FromPod, flags),
            c6.pod_tcp(flags, b""),
            "{flags:#x}"
        );
        assert_eq!(
            f4.tcp_with(Side::FromPod, flags, &L3::default(), &[], b"data"),
            c4.pod_tcp(flags, b"data")
        );
    }
    assert_eq!(f4.udp(Side::ToPod, b"x"), c4.peer_udp(b"x"));
    assert_eq!(f6.udp(Side::FromPod, b"xyz"), c6.pod_udp(b"xyz"));
    // IPv4 options and IPv6 extension headers as `packets` writes them.
    let opts = c4.with_ip_ext(IpExt {
        v4_options: true,
        ..IpExt::default()
    });
    assert_eq!(
        f4.tcp_with(Side::ToPod, SYN, &L3::v4_options(&[1, 1, 1, 0]), &[], b""),
        opts.peer_tcp(SYN, b"")
    );
    let exts = c6.with_ip_ext(IpExt {
        hop_by_hop: true,
        dest_opts: true,
        v6_fragment: Some((0, true)),
        ..IpExt::default()
    });
    let mine = f6.tcp_with(
        Side::ToPod,
        SYN,
        &L3::v6_exts(&[Ext::Hop(0), Ext::Dest(0), Ext::Frag(0, true)]),
        &[],
        b"",
    );
    let theirs = exts.peer_tcp(SYN, b"");
    assert_eq!(packets::v6_next_headers(&mine), [0, 60, 44, 6]);
    assert_eq!(packets::v6_next_headers(&theirs), [0, 60, 44, 6]);
    // Same but for the option bytes: theirs are PadN, mine Pad1.
    assert_eq!(mine.len(), theirs.len());
    let differ: Vec<usize> = (0..mine.len()).filter(|&i| mine[i] != theirs[i]).collect();
    let hbh = ETH_HLEN + IPV6_HLEN;
    assert!(
        differ
            .iter()
            .all(|&i| (hbh + 2..hbh + 4).contains(&i) || (hbh + 10..hbh + 12).contains(&i)),
        "bytes {differ:?} differ:\n{}\n{}",
        hex(&mine),
        hex(&theirs)
    );
}

/// IPv4 options of every length of 0 to 40 bytes, well-formed and with bad
/// option lengths. The parser skips IHL words whatever the options say.
#[test]
fn ipv4_options_of_every_length() {
    let mut lab = Lab::new();
    let data_flow = lab.server_flow(false);
    lab.established(&data_flow, true);
    let mut option_sets: Vec<(String, Vec<u8>, bool)> = Vec::new();
    for n in 0..=40usize {
        let area = n.div_ceil(4) * 4;
        let mut nops = vec![1u8; n];
        nops.resize(area, 0); // EOL padding
        option_sets.push((format!("{n} NOPs"), nops, true));
        if n >= 3 {
            // One record-route option of length n: type, length, pointer, slots.
            let mut rr = vec![0u8; area];
            rr[..3].copy_from_slice(&[7, u8::try_from(n).unwrap(), 4]);
            option_sets.push((format!("record route of {n} bytes"), rr, true));
        }
        if n >= 2 {
            for bad in [0u8, 1, 2, u8::try_from(n + 1).unwrap(), 41, 255] {
                // A timestamp option whose length is wrong for the area.
                let mut o = vec![1u8; area];
                o[area - n] = 0x44;
                o[area - n + 1] = bad;
                option_sets.push((format!("{n} bytes, option length {bad}"), o, false));
            }
        }
    }
    assert!(option_sets.iter().any(|o| o.1.len() == 40));
    for (what, opts, well_formed) in &option_sets {
        if lab.keep_small() {
            lab.established(&data_flow, true);
        }
        let l3 = L3::v4_options(opts);
        // A SYN from a peer, a SYN from the pod, data both ways on a flow.
        let inbound = lab.server_flow(false);
        let syn = inbound.tcp_with(Side::ToPod, SYN, &l3, &[], b"");
        packets::assert_ipv4_checksum_ok(&syn);
        assert_eq!(
            usize::from(syn[ETH_HLEN] & 0x0f) * 4,
            IPV4_HLEN + opts.len()
        );
        let outbound = lab.client_flow(false);
        let out_syn = outbound.tcp_with(Side::FromPod, SYN, &l3, &[], b"");
        if *well_formed {
            lab.expect_new(
                Side::ToPod,
                &syn,
                &inbound.tcp_key(),
                tcp_state::SYN_SENT,
                what,
            );
            lab.expect_new(
                Side::FromPod,
                &out_syn,
                &outbound.tcp_key(),
                tcp_state::SYN_SENT,
                what,
            );
        } else {
            lab.run(Side::ToPod, &syn);
            lab.run(Side::FromPod, &out_syn);
        }
        for side in [Side::ToPod, Side::FromPod] {
            lab.run(
                side,
                &data_flow.tcp_with(side, PSH | ACK, &l3, &[], b"data"),
            );
            assert_eq!(
                lab.flows[&data_flow.tcp_key()].state,
                tcp_state::ESTABLISHED,
                "{what}"
            );
        }
    }
    eprintln!(
        "ipv4 options: {} option sets, {}",
        option_sets.len(),
        lab.summary()
    );
}

/// The IPv4 total-length field smaller and larger than the real packet.
#[test]
fn ipv4_total_length_smaller_or_larger_than_the_packet() {
    let mut lab = Lab::new();
    let totals = [
        0u16, 1, 19, 20, 21, 27, 28, 33, 34, 35, 39, 40, 41, 46, 60, 576, 1500, 65535,
    ];
    for total in totals {
        let what = format!("total length {total}");
        for pad in [0usize, 6, 200] {
            lab.keep_small();
            // Ethernet padding or trailing junk after the real datagram.
            let tweak = |mut frame: Vec<u8>| {
                frame.resize(frame.len() + pad, 0);
                set_ipv4_total_len(&mut frame, total);
                frame
            };
            let f = lab.server_flow(false);
            let syn = tweak(f.tcp(Side::ToPod, SYN));
            let u = lab.server_flow(false);
            let udp = tweak(u.udp(Side::ToPod, b"q"));
            // A RST and a FIN on established flows, both ways.
            let est_in = lab.server_flow(false);
            let est_out = lab.client_flow(false);
            let rst = tweak(est_in.tcp(Side::ToPod, RST | ACK));
            let fin = tweak(est_out.tcp(Side::FromPod, FIN | ACK));
            if total < 20 {
                // Shorter than the IPv4 header itself.
                lab.expect_unparsed(Side::ToPod, &syn, &what);
                lab.expect_unparsed(Side::ToPod, &udp, &what);
            } else {
                lab.run(Side::ToPod, &syn);
                lab.run(Side::ToPod, &udp);
            }
            lab.established(&est_in, true);
            lab.established(&est_out, false);
            lab.run(Side::ToPod, &rst);
            lab.run(Side::FromPod, &fin);
        }
    }
    eprintln!("ipv4 total length: {}", lab.summary());
}

/// IHL of 6 to 15 words on frames that are not that long, and IHL pointing
/// exactly at the end of the frame.
#[test]
fn ipv4_ihl_larger_than_the_packet() {
    let mut lab = Lab::new();
    for ihl in 5u8..=15 {
        let hlen = usize::from(ihl) * 4;
        for total in [None, Some(65535u16)] {
            for payload in [0usize, 4, 40] {
                let what = format!("IHL {ihl}, total length {total:?}, payload {payload}");
                let f = lab.server_flow(false);
                let mut syn = f.tcp_with(Side::ToPod, SYN, &L3::default(), &[], &vec![0; payload]);
                syn[ETH_HLEN] = 0x40 | ihl;
                if let Some(t) = total {
                    syn[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&t.to_be_bytes());
                }
                fix_ipv4_checksum(&mut syn);
                let ip_total =
                    usize::from(u16::from_be_bytes([syn[ETH_HLEN + 2], syn[ETH_HLEN + 3]]));
                if ETH_HLEN + hlen + 14 > syn.len() || ip_total < hlen {
                    // The "TCP header" after the claimed IP header is not all there.
                    lab.expect_refused_or_unparsed(Side::ToPod, &syn, &what);
                    lab.expect_refused_or_unparsed(Side::FromPod, &syn, &what);
                } else {
                    lab.run(Side::ToPod, &syn);
                    lab.run(Side::FromPod, &syn);
                }
                // The IP header alone, IHL words long, nothing after it.
                let mut bare = syn[..(ETH_HLEN + hlen).min(syn.len())].to_vec();
                bare.resize(ETH_HLEN + hlen, 1);
                set_ipv4_total_len(&mut bare, u16::try_from(hlen).unwrap());
                lab.expect_refused_or_unparsed(Side::ToPod, &bare, &what);
            }
        }
    }
    eprintln!("ipv4 IHL: {}", lab.summary());
}

/// Every chain of hop-by-hop, routing, destination-options and fragment
/// headers up to 4 long, and longer ones (5 to 8) of each kind and in cycles.
/// Up to `MAX_EXT_HEADERS` the transport is found; a longer chain passes
/// untracked.
#[test]
fn ipv6_extension_header_chains() {
    let kinds = [
        Ext::Hop(0),
        Ext::Routing(0),
        Ext::Dest(0),
        Ext::Frag(0, true),
    ];
    let mut chains: Vec<Vec<Ext>> = vec![vec![]];
    let mut frontier: Vec<Vec<Ext>> = vec![vec![]];
    for _ in 0..4 {
        frontier = frontier
            .iter()
            .flat_map(|c| {
                kinds.iter().map(move |k| {
                    let mut c = c.clone();
                    c.push(*k);
                    c
                })
            })
            .collect();
        chains.extend(frontier.iter().cloned());
    }
    for n in 5..=8 {
        for (i, k) in kinds.iter().enumerate() {
            chains.push(vec![*k; n]);
            chains.push((0..n).map(|j| kinds[(i + j) % kinds.len()]).collect());
        }
        // Longer headers too: 16, 24 and 256 bytes (BPF_PROG_TEST_RUN takes
        // no frame much over 3 KiB).
        chains.push(
            (0..n)
                .map(|j| match j % 3 {
                    _ if j == 0 => Ext::Hop(1),
                    0 => Ext::Dest(2),
                    1 => Ext::Routing(31),
                    _ => Ext::Frag(0, false),
                })
                .collect(),
        );
    }
    assert_eq!(
        chains.iter().filter(|c| c.len() <= 4).count(),
        1 + 4 + 16 + 64 + 256
    );

    let mut lab = Lab::new();
    let mut tracked = 0;
    for chain in &chains {
        lab.keep_small();
        let l3 = L3::v6_exts(chain);
        let what = format!("chain {chain:?}");
        let inbound = lab.server_flow(true);
        let syn = inbound.tcp_with(Side::ToPod, SYN, &l3, &[], b"");
        let udp = {
            let (src, dst) = inbound.ends(Side::FromPod);
            ip_frame(
                src.ip(),
                dst.ip(),
                &l3,
                PROTO_UDP,
                &udp_datagram(src, dst, b"u"),
            )
        };
        let mut expect_chain: Vec<u8> = chain.iter().map(|e| e.number()).collect();
        expect_chain.push(PROTO_TCP);
        // Hop-by-hop only first (RFC 8200 4.1), which the parser does not check.
        let well_formed = chain.iter().skip(1).all(|e| !matches!(e, Ext::Hop(_)));
        if well_formed
            && chain
                .iter()
                .all(|e| matches!(e, Ext::Hop(_) | Ext::Dest(_)))
        {
            // etherparse agrees on the chain (it does not walk routing headers).
            assert_eq!(packets::v6_next_headers(&syn), expect_chain, "{what}");
        }
        if chain.len() > MAX_EXT_HEADERS {
            lab.expect_unparsed(Side::ToPod, &syn, &what);
            lab.expect_unparsed(Side::FromPod, &udp, &what);
        } else if well_formed {
            lab.expect_new(
                Side::ToPod,
                &syn,
                &inbound.tcp_key(),
                tcp_state::SYN_SENT,
                &what,
            );
            lab.expect_new(
                Side::FromPod,
                &udp,
                &inbound.key(PROTO_UDP),
                tcp_state::ESTABLISHED,
                &what,
            );
            tracked += 2;
        } else {
            lab.run(Side::ToPod, &syn);
            lab.run(Side::FromPod, &udp);
        }
    }
    eprintln!(
        "ipv6 chains: {} chains, {tracked} packets tracked; {}",
        chains.len(),
        lab.summary()
    );
}

/// The boundary on its own: 6 extension headers are walked, 7 are not,
/// whatever the kinds, both directions, on an established flow too.
#[test]
fn ipv6_seven_extension_headers_pass_untracked() {
    let mut lab = Lab::new();
    let est = lab.server_flow(true);
    lab.established(&est, true);
    for kind in [
        Ext::Hop(0),
        Ext::Routing(0),
        Ext::Dest(0),
        Ext::Frag(0, false),
    ] {
        let six = L3::v6_exts(&[kind; 6]);
        let seven = L3::v6_exts(&[kind; 7]);
        let what = format!("{kind:?}");
        for side in [Side::ToPod, Side::FromPod] {
            // RST and FIN on the established flow: a parser that found the TCP
            // header behind 7 extension headers would close it.
            lab.expect_unparsed(side, &est.tcp_with(side, RST, &seven, &[], b""), &what);
            lab.expect_unparsed(
                side,
                &est.tcp_with(side, FIN | ACK, &seven, &[], b""),
                &what,
            );
            let f = lab.server_flow(true);
            lab.expect_unparsed(side, &f.tcp_with(side, SYN, &seven, &[], b""), &what);
            lab.expect_new(
                side,
                &f.tcp_with(side, SYN, &six, &[], b""),
                &f.tcp_key(),
                tcp_state::SYN_SENT,
                &what,
            );
        }
        assert_eq!(lab.flows[&est.tcp_key()].state, tcp_state::ESTABLISHED);
    }
    assert_eq!(lab.h.counters(POD_SLOT).active_inbound, 1);
}

/// Extension headers whose length runs past the end of the frame, or that
/// end exactly where the frame does, or are cut themselves.
#[test]
fn ipv6_extension_header_length_past_the_end() {
    let mut lab = Lab::new();
    let est = lab.server_flow(true);
    lab.established(&est, true);
    let before = lab.flows[&est.tcp_key()];
    let mut n = 0;
    for kind in [HOP, ROUTING, DEST] {
        for len in [1u8, 2, 10, 255] {
            for prefix in [vec![], vec![Ext::Hop(0), Ext::Dest(0)]] {
                let what = format!("{prefix:?} then header {kind} of length field {len}");
                for side in [Side::ToPod, Side::FromPod] {
                    for flags in [SYN, RST, FIN | ACK] {
                        // A real 8-byte header followed by TCP, whose length
                        // field says it is longer: it covers the TCP header
                        // and runs past the end.
                        let short = match kind {
                            HOP => Ext::Hop(0),
                            ROUTING => Ext::Routing(0),
                            _ => Ext::Dest(0),
                        };
                        let mut chain = prefix.clone();
                        chain.push(short);
                        let mut frame = est.tcp_with(side, flags, &L3::v6_exts(&chain), &[], b"");
                        let at = ETH_HLEN + IPV6_HLEN + 8 * prefix.len();
                        assert_eq!(frame[at], PROTO_TCP);
                        frame[at + 1] = len;
                        lab.expect_unparsed(side, &frame, &what);
                        // The same header really that long, then the frame
                        // ends: no room for the TCP header at all, or only
                        // part of it.
                        let long = match kind {
                            HOP => Ext::Hop(len),
                            ROUTING => Ext::Routing(len),
                            _ => Ext::Dest(len),
                        };
                        let mut chain = prefix.clone();
                        chain.push(long);
                        let whole = est.tcp_with(side, flags, &L3::v6_exts(&chain), &[], b"");
                        let l4 = whole.len() - TCP_HLEN;
                        for cut in [l4, l4 + 1, l4 + 13] {
                            lab.expect_unparsed(side, &whole[..cut], &what);
                        }
                        // The extension header itself cut after 1 byte.
                        lab.expect_unparsed(side, &whole[..=at], &what);
                        n += 5;
                    }
                }
            }
        }
    }
    // A fragment header cut short.
    for cut in 1..8 {
        let frame = est.tcp_with(
            Side::ToPod,
            RST,
            &L3::v6_exts(&[Ext::Frag(0, false)]),
            &[],
            b"",
        );
        lab.expect_unparsed(
            Side::ToPod,
            &frame[..ETH_HLEN + IPV6_HLEN + cut],
            "fragment header cut",
        );
        n += 1;
    }
    // None of it touched the established flow.
    let v = lab.flows[&est.tcp_key()];
    assert_eq!(
        (v.state, v.bytes_in, v.bytes_out),
        (tcp_state::ESTABLISHED, before.bytes_in, before.bytes_out)
    );
    assert_eq!(lab.flows.len(), 1);
    eprintln!("ipv6 extension lengths: {n} frames, {}", lab.summary());
}

/// The IPv6 payload-length field smaller and larger than the real payload.
#[test]
fn ipv6_payload_length_smaller_or_larger_than_the_packet() {
    let mut lab = Lab::new();
    for payload_len in [0u16, 1, 7, 8, 13, 14, 19, 20, 21, 100, 1500, 65535] {
        for exts in [vec![], vec![Ext::Dest(0)]] {
            let l3 = L3::v6_exts(&exts);
            let f = lab.server_flow(true);
            let mut syn = f.tcp_with(Side::ToPod, SYN, &l3, &[], b"");
            syn[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&payload_len.to_be_bytes());
            lab.run(Side::ToPod, &syn);
            let est = lab.client_flow(true);
            lab.established(&est, false);
            let mut rst = est.tcp_with(Side::ToPod, RST, &l3, &[], b"");
            rst[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&payload_len.to_be_bytes());
            lab.run(Side::ToPod, &rst);
        }
    }
    eprintln!("ipv6 payload length: {}", lab.summary());
}

/// TCP data offsets of 6 to 15 words on segments with no options (the
/// offset points past the end of the packet), and the same offsets with
/// options really there.
#[test]
fn tcp_data_offset_past_the_packet() {
    for v6 in [false, true] {
        let mut lab = Lab::new();
        for doff in 5u8..=15 {
            let what = format!("v6 {v6}, data offset {doff}");
            let set_doff = |mut frame: Vec<u8>| {
                let l4 = ETH_HLEN + if v6 { IPV6_HLEN } else { IPV4_HLEN };
                frame[l4 + 12] = doff << 4;
                frame
            };
            for flags in [SYN, RST | ACK, FIN | ACK, PSH | ACK] {
                let f = lab.server_flow(v6);
                let est = lab.server_flow(v6);
                lab.established(&est, true);
                for side in [Side::ToPod, Side::FromPod] {
                    lab.run(side, &set_doff(f.tcp(side, flags)));
                    lab.run(side, &set_doff(est.tcp(side, flags)));
                }
            }
            // Options of the length the offset claims: a well-formed segment.
            let opts = vec![1u8; usize::from(doff - 5) * 4];
            let g = lab.server_flow(v6);
            let frame = g.tcp_with(Side::ToPod, SYN, &L3::default(), &opts, b"");
            lab.expect_new(
                Side::ToPod,
                &frame,
                &g.tcp_key(),
                tcp_state::SYN_SENT,
                &what,
            );
        }
        eprintln!("tcp data offset (v6 {v6}): {}", lab.summary());
    }
}

/// What a packet with `flags` does to a flow the table does not have: the
/// README's rules (a SYN opens, RST/SYN-ACK/SYN-FIN create nothing, anything
/// else is picked up mid-stream with the direction guessed from the ports).
fn expected_on_unknown(flags: u8, side: Side, key: &FlowKey) -> Option<(u8, u8, u8, u8)> {
    let from_pod = matches!(side, Side::FromPod);
    if flags & RST != 0 || (flags & SYN != 0 && flags & (ACK | FIN) != 0) {
        return None;
    }
    if flags & SYN != 0 {
        let dir = if from_pod {
            direction::OUTBOUND
        } else {
            direction::INBOUND
        };
        return Some((tcp_state::SYN_SENT, dir, 0, event_kind::NEW));
    }
    let dir = if key.pod_port <= key.peer_port {
        direction::INBOUND
    } else {
        direction::OUTBOUND
    };
    if flags & FIN != 0 {
        let opener = from_pod == (dir == direction::OUTBOUND);
        let fin = if opener {
            flow_flags::FIN_OPENER
        } else {
            flow_flags::FIN_RESPONDER
        };
        Some((
            tcp_state::CLOSING,
            dir,
            flow_flags::PICKED_UP | fin,
            event_kind::ESTABLISHED,
        ))
    } else {
        Some((
            tcp_state::ESTABLISHED,
            dir,
            flow_flags::PICKED_UP,
            event_kind::ESTABLISHED,
        ))
    }
}

/// All 64 combinations of FIN/SYN/RST/PSH/ACK/URG (alone and with ECE+CWR),
/// each on a flow the table does not have, both ways, IPv4 and IPv6, with the
/// pod as server and as client.
#[test]
fn tcp_flag_combinations_on_unknown_flows() {
    let mut lab = Lab::new();
    let mut created = 0;
    for six in 0u8..64 {
        for extra in [0, ECE | CWR] {
            let flags = six | extra;
            for v6 in [false, true] {
                for side in [Side::ToPod, Side::FromPod] {
                    for server in [true, false] {
                        lab.keep_small();
                        let f = if server {
                            lab.server_flow(v6)
                        } else {
                            lab.client_flow(v6)
                        };
                        let key = f.tcp_key();
                        let frame = f.tcp(side, flags);
                        let o = lab.run(side, &frame);
                        let what = format!("flags {flags:#04x} {side:?} on {f:?}: {o:?}");
                        assert!(!o.unparsed && !o.not_pod, "{what}");
                        match expected_on_unknown(flags, side, &key) {
                            None => assert!(o.changed.is_none() && o.event.is_none(), "{what}"),
                            Some((state, dir, fl, kind)) => {
                                let v = o.after().unwrap_or_else(|| panic!("{what}"));
                                assert_eq!(
                                    (v.state, v.direction, v.flags),
                                    (state, dir, fl),
                                    "{what}"
                                );
                                assert_eq!(o.event_kind(), Some(kind), "{what}");
                                created += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    // Per 64: 32 have RST, 12 more SYN with ACK or FIN; 20 create a flow.
    assert_eq!(created, 20 * 2 * 8);
    eprintln!("tcp flags on unknown flows: {}", lab.summary());
}

/// All 64 combinations (alone and with ECE+CWR) on established flows,
/// inbound and outbound, from either end, IPv4 and IPv6.
#[test]
fn tcp_flag_combinations_on_established_flows() {
    for v6 in [false, true] {
        let mut lab = Lab::new();
        for six in 0u8..64 {
            for extra in [0, ECE | CWR] {
                let flags = six | extra;
                for inbound in [true, false] {
                    for side in [Side::ToPod, Side::FromPod] {
                        lab.keep_small();
                        let f = if inbound {
                            lab.server_flow(v6)
                        } else {
                            lab.client_flow(v6)
                        };
                        lab.established(&f, inbound);
                        let before = lab.flows[&f.tcp_key()];
                        let o = lab.run(side, &f.tcp(side, flags));
                        let what = format!(
                            "flags {flags:#04x} {side:?} on {f:?} inbound {inbound}: {o:?}"
                        );
                        let v = o
                            .after()
                            .copied()
                            .unwrap_or_else(|| panic!("not counted: {what}"));
                        let from_pod = matches!(side, Side::FromPod);
                        let opener = from_pod != inbound;
                        let fin = if opener {
                            flow_flags::FIN_OPENER
                        } else {
                            flow_flags::FIN_RESPONDER
                        };
                        let (state, fl, kind) = if flags & RST != 0 {
                            (
                                tcp_state::CLOSED,
                                flow_flags::RESET,
                                Some(event_kind::CLOSED),
                            )
                        } else if flags & FIN != 0 && flags & SYN == 0 {
                            (tcp_state::CLOSING, fin, None)
                        } else {
                            (tcp_state::ESTABLISHED, 0, None)
                        };
                        assert_eq!(
                            (v.state, v.flags, v.direction),
                            (state, fl, before.direction),
                            "{what}"
                        );
                        assert_eq!(o.event_kind(), kind, "{what}");
                        assert_eq!(v.first_seen_ns, before.first_seen_ns, "{what}");
                    }
                }
            }
        }
        eprintln!(
            "tcp flags on established flows (v6 {v6}): {}",
            lab.summary()
        );
    }
}

/// UDP length fields of 0 (and other wrong values), and UDP headers cut short.
#[test]
fn udp_with_bad_length_fields() {
    let mut lab = Lab::new();
    for v6 in [false, true] {
        let existing = lab.server_flow(v6);
        lab.expect_new(
            Side::ToPod,
            &existing.udp(Side::ToPod, b"hello"),
            &existing.key(PROTO_UDP),
            tcp_state::ESTABLISHED,
            "control",
        );
        let l4 = ETH_HLEN + if v6 { IPV6_HLEN } else { IPV4_HLEN };
        for ulen in [0u16, 1, 7, 8, 9, 12, 14, 100, 65535] {
            for side in [Side::ToPod, Side::FromPod] {
                let f = lab.server_flow(v6);
                for flow in [f, existing] {
                    let mut frame = flow.udp(side, b"hello!");
                    frame[l4 + 4..l4 + 6].copy_from_slice(&ulen.to_be_bytes());
                    lab.run(side, &frame);
                }
            }
        }
        // The header cut short: the ports may be there, the rest is not.
        for cut in 0..UDP_HLEN {
            for side in [Side::ToPod, Side::FromPod] {
                let f = lab.server_flow(v6);
                let frame = f.udp(side, b"");
                lab.expect_unparsed(side, &frame[..l4 + cut], "UDP header cut");
            }
        }
        assert_eq!(
            lab.flows[&existing.key(PROTO_UDP)].state,
            tcp_state::ESTABLISHED
        );
    }
    eprintln!("udp lengths: {}", lab.summary());
}

// ---------------------------------------------------------------------------
// The property test.

/// One of the few flows a random sequence is made of: both ends, ports from
/// small sets so that the direction guess from ports goes both ways.
#[derive(Clone, Debug)]
struct FlowSpec {
    v6: bool,
    /// The pod end: 0 pod A, 1 pod B, 2 an address of no pod.
    pod: u8,
    /// The peer end: 0 a peer, 1 pod B (pod to pod traffic, or pod B to itself).
    peer: u8,
    pod_port: u16,
    peer_port: u16,
}

impl FlowSpec {
    fn ends(&self) -> (SocketAddr, SocketAddr) {
        let pod = match (self.v6, self.pod) {
            (false, 0) => IpAddr::V4(POD4),
            (false, 1) => IpAddr::V4(POD4_B),
            (false, _) => IpAddr::V4(STRANGER4),
            (true, 0) => IpAddr::V6(POD6),
            (true, 1) => IpAddr::V6(POD6_B),
            (true, _) => IpAddr::V6(STRANGER6),
        };
        let peer = match (self.v6, self.peer) {
            (false, 0) => IpAddr::V4(PEER4),
            (false, _) => IpAddr::V4(POD4_B),
            (true, 0) => IpAddr::V6(PEER6),
            (true, _) => IpAddr::V6(POD6_B),
        };
        (
            SocketAddr::new(pod, self.pod_port),
            SocketAddr::new(peer, self.peer_port),
        )
    }
}

/// One packet of a random sequence.
#[derive(Clone, Debug)]
struct Step {
    /// Which of the case's flows (as an index into them).
    flow: Index,
    /// The program it goes through.
    side: Side,
    /// Built from the pod end rather than to it; usually matches `side`,
    /// sometimes not (a packet on the wrong side).
    from_pod: bool,
    body: Body,
    /// IPv4 option words (NOPs) or IPv6 destination-options headers.
    ext: u8,
    /// Bytes overwritten with garbage, anywhere in the frame.
    garbage: Vec<(Index, u8)>,
    /// Cut the frame at this point.
    cut: Option<Index>,
}

#[derive(Clone, Debug)]
enum Body {
    Tcp {
        flags: u8,
        payload: u8,
    },
    Udp {
        payload: u8,
    },
    /// Random bytes after the Ethernet header, under the flow's IP ethertype.
    Junk(Vec<u8>),
}

const POD_PORTS: [u16; 2] = [80, 40_001];
const PEER_PORTS: [u16; 2] = [80, 40_312];

impl Step {
    fn frame(&self, flow: &FlowSpec) -> Vec<u8> {
        let (pod, peer) = flow.ends();
        let (src, dst) = if self.from_pod {
            (pod, peer)
        } else {
            (peer, pod)
        };
        let l3 = if flow.v6 {
            L3::v6_exts(&vec![Ext::Dest(0); usize::from(self.ext)])
        } else {
            L3::v4_options(&vec![1; usize::from(self.ext) * 4])
        };
        let mut frame = match &self.body {
            Body::Tcp { flags, payload } => {
                let seg = tcp_segment(src, dst, *flags, &[], &vec![b'p'; usize::from(*payload)]);
                ip_frame(src.ip(), dst.ip(), &l3, PROTO_TCP, &seg)
            }
            Body::Udp { payload } => {
                let d = udp_datagram(src, dst, &vec![b'p'; usize::from(*payload)]);
                ip_frame(src.ip(), dst.ip(), &l3, PROTO_UDP, &d)
            }
            Body::Junk(bytes) => {
                let mut f = MACS.to_vec();
                f.extend_from_slice(if flow.v6 {
                    &[0x86, 0xdd]
                } else {
                    &[0x08, 0x00]
                });
                f.extend_from_slice(bytes);
                f
            }
        };
        for (at, byte) in &self.garbage {
            let i = at.index(frame.len());
            frame[i] = *byte;
        }
        if let Some(cut) = &self.cut {
            frame.truncate(cut.index(frame.len() + 1));
        }
        frame
    }
}

fn flow_strategy() -> impl Strategy<Value = FlowSpec> {
    (
        any::<bool>(),
        prop_oneof![6 => Just(0u8), 2 => Just(1u8), 1 => Just(2u8)],
        prop_oneof![4 => Just(0u8), 1 => Just(1u8)],
        proptest::sample::select(POD_PORTS.to_vec()),
        proptest::sample::select(PEER_PORTS.to_vec()),
    )
        .prop_map(|(v6, pod, peer, pod_port, peer_port)| FlowSpec {
            v6,
            pod,
            peer,
            pod_port,
            peer_port,
        })
}

fn flags_strategy() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => proptest::sample::select(vec![
            SYN, SYN | ACK, ACK, PSH | ACK, FIN | ACK, FIN, RST, RST | ACK, SYN | FIN, URG | ACK,
        ]),
        1 => any::<u8>(),
    ]
}

fn body_strategy() -> impl Strategy<Value = Body> {
    prop_oneof![
        12 => (flags_strategy(), prop_oneof![3 => Just(0u8), 1 => any::<u8>()])
            .prop_map(|(flags, payload)| Body::Tcp { flags, payload }),
        3 => (0u8..32).prop_map(|payload| Body::Udp { payload }),
        1 => proptest::collection::vec(any::<u8>(), 0..80).prop_map(Body::Junk),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    (
        any::<Index>(),
        (
            any::<bool>(),
            prop_oneof![9 => Just(true), 1 => Just(false)],
        ),
        body_strategy(),
        prop_oneof![12 => Just(0u8), 1 => 1u8..=10],
        prop_oneof![
            12 => Just(vec![]),
            1 => proptest::collection::vec((any::<Index>(), any::<u8>()), 1..4),
        ],
        prop_oneof![12 => Just(None), 1 => any::<Index>().prop_map(Some)],
    )
        .prop_map(
            |(flow, (from_pod, consistent), body, ext, garbage, cut)| Step {
                flow,
                side: if from_pod == consistent {
                    Side::FromPod
                } else {
                    Side::ToPod
                },
                from_pod,
                body,
                ext,
                garbage,
                cut,
            },
        )
}

/// One case: whether UDP flows time out at once (every UDP packet then
/// opens a new flow), 1 to 3 flows, and 1 to 39 packets on them.
#[derive(Clone, Debug)]
struct Case {
    udp_times_out: bool,
    /// Before which step pod A starts draining, if it does.
    a_drains_at: Option<Index>,
    flows: Vec<FlowSpec>,
    steps: Vec<Step>,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop_oneof![4 => Just(false), 1 => Just(true)],
        prop_oneof![1 => Just(None), 1 => any::<Index>().prop_map(Some)],
        proptest::collection::vec(flow_strategy(), 1..4),
        proptest::collection::vec(step_strategy(), 1..40),
    )
        .prop_map(|(udp_times_out, a_drains_at, flows, steps)| Case {
            udp_times_out,
            a_drains_at,
            flows,
            steps,
        })
}

fn proptest_config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(512);
    ProptestConfig {
        cases,
        // Shrinking re-runs the sequence each time; bound it.
        max_shrink_iters: 4096,
        // No regression files written into the source tree: the failure
        // message carries the minimal sequence.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs one random sequence on a lab cleared for it.
fn run_case(lab: &mut Lab, case: &Case) -> Check {
    lab.clear();
    // 1 ns: every UDP packet after the first of a flow finds it timed out.
    lab.h.set_udp_timeout_ns(u64::from(case.udp_times_out));
    let drain_at = case.a_drains_at.map(|at| at.index(case.steps.len()));
    for (i, step) in case.steps.iter().enumerate() {
        if drain_at == Some(i) {
            lab.h.set_draining(POD_SLOT, true);
            lab.a_draining = true;
        }
        let flow = &case.flows[step.flow.index(case.flows.len())];
        let frame = step.frame(flow);
        lab.try_send(step.side, &frame).map_err(|e| {
            format!(
                "step {i} of {}, {step:?} on {flow:?}: {e}",
                case.steps.len()
            )
        })?;
    }
    Ok(())
}

/// Random sequences of 1 to 39 packets on 1 to 3 flows (two pods and an
/// address of none; pod B draining, pod A starting its drain midway in half
/// the cases, so flows move to HELD under random traffic; pod to pod too, two ports each end, both families, TCP
/// and UDP, both ways and sometimes the wrong way, random TCP flags, IPv4
/// options and IPv6 extension headers up to past the parser's bound, garbage
/// bytes, cuts, junk after the Ethernet header), with every check of
/// `Lab::send` after every packet. A failure shrinks to a minimal sequence.
#[test]
fn random_packet_sequences_keep_the_maps_consistent() {
    let lab = RefCell::new(Lab::new());
    let config = proptest_config();
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case_strategy(), |case| {
        run_case(&mut lab.borrow_mut(), &case).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!(
        "random sequences: {cases} cases, {}",
        lab.borrow().summary()
    );
}

/// Handles on a lab's own `FLOWS`, `POD_COUNTERS` and `STATS`, to clear them
/// (between the cases of the property test, and in the longer corpora): the
/// harness has no way to, and loading the object afresh costs about 0.3 s,
/// far too much per case.
///
/// They are found by id: a marker address registered through the harness
/// tells which `POD_IPS` in the system is this harness's, and the programs
/// that use that map name the others.
struct OwnMaps {
    flows: BpfHashMap<MapData, FlowKey, FlowValue>,
    held: BpfHashMap<MapData, FlowKey, FlowValue>,
    counters: Array<MapData, PodCounters>,
    stats: PerCpuArray<MapData, u64>,
}

impl OwnMaps {
    fn find(h: &mut Harness) -> Self {
        static NEXT: AtomicU16 = AtomicU16::new(1);
        let pid = std::process::id();
        let marker = Ipv6Addr::new(
            0xfd00,
            0xdead,
            u16::try_from(pid >> 16).unwrap(),
            u16::try_from(pid & 0xffff).unwrap(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            0,
            0,
            1,
        );
        h.add_pod_ip(IpAddr::V6(marker), 0);
        let marker = PodIpKey {
            addr: marker.octets(),
        };
        let open = |id: u32| MapData::from_id(id).and_then(Map::from_map_data).ok();
        let (pod_ips_id, mut pod_ips) = loaded_maps()
            .filter_map(Result::ok)
            .filter(|m| m.name_as_str() == Some(maps::POD_IPS))
            .find_map(|m| {
                let map = BpfHashMap::<MapData, PodIpKey, u32>::try_from(open(m.id())?).ok()?;
                map.get(&marker, 0).is_ok().then_some((m.id(), map))
            })
            .expect("no POD_IPS map holds the marker");
        pod_ips.remove(&marker).expect("removing the marker");
        let ids = loaded_programs()
            .filter_map(Result::ok)
            .find_map(|p| {
                p.map_ids()
                    .ok()
                    .flatten()
                    .filter(|ids| ids.contains(&pod_ips_id))
            })
            .expect("no program uses this POD_IPS");
        let by_name = |name: &str| {
            ids.iter()
                .copied()
                .find(|&id| MapInfo::from_id(id).is_ok_and(|i| i.name_as_str() == Some(name)))
                .and_then(open)
                .unwrap_or_else(|| panic!("no {name} map next to this POD_IPS"))
        };
        Self {
            flows: BpfHashMap::try_from(by_name(maps::FLOWS)).unwrap(),
            held: BpfHashMap::try_from(by_name(maps::HELD)).unwrap(),
            counters: Array::try_from(by_name(maps::POD_COUNTERS)).unwrap(),
            stats: PerCpuArray::try_from(by_name(maps::STATS)).unwrap(),
        }
    }

    fn clear(&mut self) {
        let keys: Vec<FlowKey> = self.flows.keys().map(Result::unwrap).collect();
        for k in &keys {
            self.flows.remove(k).expect("clearing FLOWS");
        }
        let keys: Vec<FlowKey> = self.held.keys().map(Result::unwrap).collect();
        for k in &keys {
            self.held.remove(k).expect("clearing HELD");
        }
        for slot in SLOTS {
            self.counters
                .set(slot, PodCounters::default(), 0)
                .expect("clearing POD_COUNTERS");
        }
        for s in 0..stats::COUNT {
            let cpus = self.stats.get(&s, 0).expect("reading STATS").len();
            let zeros = PerCpuValues::try_from(vec![0u64; cpus]).unwrap();
            self.stats.set(s, zeros, 0).expect("clearing STATS");
        }
    }
}
