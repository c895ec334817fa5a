//! Kernel tests of the TC programs (`ebpf/conndrain-ebpf`) with
//! `BPF_PROG_TEST_RUN`: each test loads the real embedded object with fresh
//! maps, registers a pod, runs hand-built Ethernet frames through
//! `conndrain_ingress` (from the pod) and `conndrain_egress` (to the pod), and
//! checks the return code, that the frame comes back unchanged, and the maps.
//!
//! Needs root (or `CAP_BPF` + `CAP_NET_ADMIN`) and a build with
//! `CONNDRAIN_REQUIRE_EBPF=1` so that the object is real.
#![expect(
    clippy::many_single_char_names,
    reason = "h (harness), c (connection), v (flow value) in every test"
)]

mod flows;
mod harness;
mod headers;
mod hostile;
mod l3;
mod packets;
mod pressure;
mod steer;
mod tcp;
mod tracking_only;
mod udp;
mod untouched;

use std::net::IpAddr;

use conndrain_common::{FlowEvent, FlowKey, PodCounters, direction, event_kind, stats, tcp_state};

use harness::{Harness, POD_SLOT, now_ns};
use packets::{ACK, Conn, PSH, SYN};

const POD4: &str = "10.0.1.2:8080";
const PEER4: &str = "10.0.0.2:40312";
const POD6: &str = "[fd00::1:2]:8080";
const PEER6: &str = "[fd00::2]:40312";

fn conn4() -> Conn {
    Conn::new(POD4, PEER4)
}

fn conn6() -> Conn {
    Conn::new(POD6, PEER6)
}

fn pod_ip(c: &Conn) -> IpAddr {
    c.pod.ip()
}

fn len(frame: &[u8]) -> u64 {
    u64::try_from(frame.len()).unwrap()
}

pub(crate) fn kinds(events: &[FlowEvent]) -> Vec<u8> {
    events.iter().map(|e| e.kind).collect()
}

/// Peer SYN, pod SYN-ACK, peer ACK; returns the three frames.
pub(crate) fn inbound_handshake(h: &Harness, c: &Conn) -> [Vec<u8>; 3] {
    let frames = [
        c.peer_tcp(SYN, b""),
        c.pod_tcp(SYN | ACK, b""),
        c.peer_tcp(ACK, b""),
    ];
    h.send_to_pod(&frames[0]);
    h.send_from_pod(&frames[1]);
    h.send_to_pod(&frames[2]);
    frames
}

/// Pod SYN, peer SYN-ACK, pod ACK.
fn outbound_handshake(h: &Harness, c: &Conn) {
    h.send_from_pod(&c.pod_tcp(SYN, b""));
    h.send_to_pod(&c.peer_tcp(SYN | ACK, b""));
    h.send_from_pod(&c.pod_tcp(ACK, b""));
}

/// An established inbound flow, its events drained.
fn established_inbound(c: &Conn) -> Harness {
    let mut h = Harness::with_pod(&[pod_ip(c)]);
    inbound_handshake(&h, c);
    assert_eq!(h.expect_flow(&c.tcp_key()).state, tcp_state::ESTABLISHED);
    assert_eq!(
        kinds(&h.events()),
        [event_kind::NEW, event_kind::ESTABLISHED]
    );
    h
}

/// Checks an event against the flow it is about.
fn assert_event(ev: &FlowEvent, key: &FlowKey, kind: u8, state: u8, dir: u8) {
    assert_eq!(ev.key, *key, "event key");
    assert_eq!(ev.kind, kind, "event kind in {ev:?}");
    assert_eq!(ev.state, state, "event state in {ev:?}");
    assert_eq!(ev.direction, dir, "event direction in {ev:?}");
    assert_eq!(ev.pod_slot, POD_SLOT, "event slot in {ev:?}");
}

/// The whole inbound handshake and a few data packets, checked step by step.
fn check_inbound_handshake_and_data(c: &Conn) {
    let mut h = Harness::with_pod(&[pod_ip(c)]);
    let key = c.tcp_key();

    // Peer SYN.
    let t0 = now_ns();
    let syn = c.peer_tcp(SYN, b"");
    h.send_to_pod(&syn);
    let t1 = now_ns();
    let v = h.expect_flow(&key);
    assert_eq!(v.state, tcp_state::SYN_SENT);
    assert_eq!(v.direction, direction::INBOUND);
    assert_eq!(v.pod_slot, POD_SLOT);
    assert_eq!(v.flags, 0);
    assert!(
        (t0..=t1).contains(&v.first_seen_ns),
        "first_seen {} not in [{t0}, {t1}]",
        v.first_seen_ns
    );
    assert_eq!(v.last_seen_ns, v.first_seen_ns);
    assert_eq!(
        (v.bytes_in, v.bytes_out),
        (len(&syn), 0)
    );
    let first_seen = v.first_seen_ns;
    assert_eq!(
        h.counters(POD_SLOT),
        PodCounters {
            active_inbound: 0,
            active_outbound: 0,
            new_inbound_total: 1,
            last_new_inbound_ns: first_seen
        }
    );
    let ev = h.events();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_event(
        &ev[0],
        &key,
        event_kind::NEW,
        tcp_state::SYN_SENT,
        direction::INBOUND,
    );
    assert_eq!(ev[0].first_seen_ns, first_seen);
    assert_eq!(ev[0].ts_ns, first_seen);

    // Pod SYN-ACK.
    let synack = c.pod_tcp(SYN | ACK, b"");
    h.send_from_pod(&synack);
    let v = h.expect_flow(&key);
    assert_eq!(v.state, tcp_state::SYN_RECV);
    assert_eq!(v.direction, direction::INBOUND);
    assert_eq!(v.bytes_out, len(&synack));
    assert!(v.last_seen_ns >= first_seen);
    assert_eq!(
        h.counters(POD_SLOT).active_inbound,
        0,
        "a half-open handshake is not active"
    );
    assert_eq!(h.events(), [], "SYN_SENT -> SYN_RECV sends no event");

    // Peer ACK.
    let ack = c.peer_tcp(ACK, b"");
    h.send_to_pod(&ack);
    let v = h.expect_flow(&key);
    assert_eq!(v.state, tcp_state::ESTABLISHED);
    assert_eq!(v.direction, direction::INBOUND);
    assert_eq!(v.first_seen_ns, first_seen);
    assert_eq!(v.flags, 0);
    let cnt = h.counters(POD_SLOT);
    assert_eq!(
        (
            cnt.active_inbound,
            cnt.active_outbound,
            cnt.new_inbound_total
        ),
        (1, 0, 1)
    );
    assert_eq!(cnt.last_new_inbound_ns, first_seen);
    let ev = h.events();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_event(
        &ev[0],
        &key,
        event_kind::ESTABLISHED,
        tcp_state::ESTABLISHED,
        direction::INBOUND,
    );
    assert_eq!(ev[0].first_seen_ns, first_seen);

    // Data both ways.
    let req = c.peer_tcp(PSH | ACK, &[b'q'; 100]);
    let resp = c.pod_tcp(PSH | ACK, &[b'r'; 1300]);
    let ack2 = c.peer_tcp(ACK, b"");
    let before = h.expect_flow(&key).last_seen_ns;
    h.send_to_pod(&req);
    h.send_from_pod(&resp);
    h.send_to_pod(&ack2);
    let v = h.expect_flow(&key);
    assert_eq!(v.state, tcp_state::ESTABLISHED);
    assert_eq!(v.bytes_in, len(&syn) + len(&ack) + len(&req) + len(&ack2));
    assert_eq!(v.bytes_out, len(&synack) + len(&resp));
    assert!(v.last_seen_ns > before, "last_seen must move on");
    assert_eq!(v.first_seen_ns, first_seen);
    let cnt = h.counters(POD_SLOT);
    assert_eq!((cnt.active_inbound, cnt.new_inbound_total), (1, 1));
    assert_eq!(h.events(), [], "data sends no event");

    assert_eq!(h.flows().len(), 1);
    assert_eq!(
        h.counters(0),
        PodCounters::default(),
        "another pod's slot was touched"
    );
    assert_eq!(h.stat(stats::PACKETS), 6);
    assert_eq!(h.stat(stats::FLOWS_CREATED), 1);
    for s in [
        stats::UNPARSED,
        stats::NOT_POD,
        stats::INSERT_FAILED,
        stats::EVENTS_LOST,
    ] {
        assert_eq!(h.stat(s), 0, "STATS[{s}]");
    }
}

#[test]
fn tcp_inbound_handshake_and_data() {
    check_inbound_handshake_and_data(&conn4());
}

#[test]
fn ipv6_tcp_inbound_handshake_and_data() {
    let c = conn6();
    assert_eq!(c.tcp_key().family, conndrain_common::FAMILY_V6);
    check_inbound_handshake_and_data(&c);
}
