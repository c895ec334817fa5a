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

mod harness;
mod hostile;
mod l3;
mod packets;
mod pressure;
mod steer;
mod tracking_only;

use std::net::IpAddr;

use conndrain_common::{
    FlowEvent, FlowKey, PodCounters, direction, event_kind, flow_flags, stats, tcp_state,
};
use etherparse::IpNumber;

use harness::{Harness, POD_SLOT, Side, now_ns};
use packets::{ACK, Conn, ETH_HLEN, FIN, IPV4_HLEN, IPV6_HLEN, IpExt, PSH, RST, SYN};

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

#[test]
fn ipv6_hop_by_hop_header_before_tcp() {
    let c = conn6().with_ip_ext(IpExt {
        hop_by_hop: true,
        dest_opts: false,
        ..IpExt::default()
    });
    assert_eq!(
        packets::v6_next_headers(&c.peer_tcp(SYN, b"")),
        [0, 6],
        "frame must carry a hop-by-hop header"
    );
    check_inbound_handshake_and_data(&c);
}

#[test]
fn ipv6_destination_options_header_before_tcp() {
    let c = conn6().with_ip_ext(IpExt {
        hop_by_hop: false,
        dest_opts: true,
        ..IpExt::default()
    });
    assert_eq!(
        packets::v6_next_headers(&c.pod_tcp(SYN | ACK, b"")),
        [60, 6],
        "frame must carry a dest-opts header"
    );
    check_inbound_handshake_and_data(&c);
}

#[test]
fn ipv6_hop_by_hop_then_destination_options_before_tcp() {
    let c = conn6().with_ip_ext(IpExt {
        hop_by_hop: true,
        dest_opts: true,
        ..IpExt::default()
    });
    assert_eq!(packets::v6_next_headers(&c.peer_tcp(ACK, b"")), [0, 60, 6]);
    check_inbound_handshake_and_data(&c);
}

#[test]
fn ipv6_first_fragment_is_tracked() {
    // Offset 0 with more-fragments: the first fragment carries the ports.
    let c = conn6().with_ip_ext(IpExt {
        v6_fragment: Some((0, true)),
        ..IpExt::default()
    });
    assert_eq!(packets::v6_next_headers(&c.peer_tcp(SYN, b"")), [44, 6]);
    check_inbound_handshake_and_data(&c);
}

#[test]
fn ipv6_non_first_fragment_passes_untouched() {
    let mut h = Harness::with_pod(&[pod_ip(&conn6())]);
    let mut n = 0;
    for (offset, more) in [(1u16, true), (1, false), (185, true), (0x1fff, false)] {
        for hop_by_hop in [false, true] {
            let c = conn6().with_ip_ext(IpExt {
                hop_by_hop,
                v6_fragment: Some((offset, more)),
                ..IpExt::default()
            });
            for frame in [
                c.peer_tcp(SYN, b""),
                c.pod_tcp(SYN, b""),
                c.peer_tcp(ACK, b"data"),
            ] {
                let chain = packets::v6_next_headers(&frame);
                assert_eq!(
                    chain,
                    if hop_by_hop {
                        vec![0, 44, 6]
                    } else {
                        vec![44, 6]
                    }
                );
                h.send_both_ways(&frame);
                n += 2;
            }
        }
    }
    h.assert_untouched(n, stats::UNPARSED);
}

#[test]
fn ipv4_with_options_is_tracked() {
    let c = conn4().with_ip_ext(IpExt {
        v4_options: true,
        ..IpExt::default()
    });
    let syn = c.peer_tcp(SYN, b"");
    assert_eq!(syn[ETH_HLEN], 0x46, "the frame must have IHL 6");
    packets::assert_ipv4_checksum_ok(&syn);
    check_inbound_handshake_and_data(&c);
}

#[test]
fn tcp_outbound_handshake() {
    // The pod is the client: its own ephemeral port, the peer's service port.
    let c = Conn::new("10.0.1.2:51000", "10.0.0.9:443");
    let mut h = Harness::with_pod(&[pod_ip(&c)]);
    let key = c.tcp_key();

    h.send_from_pod(&c.pod_tcp(SYN, b""));
    let v = h.expect_flow(&key);
    assert_eq!(
        (v.state, v.direction),
        (tcp_state::SYN_SENT, direction::OUTBOUND)
    );
    h.send_to_pod(&c.peer_tcp(SYN | ACK, b""));
    assert_eq!(h.expect_flow(&key).state, tcp_state::SYN_RECV);
    h.send_from_pod(&c.pod_tcp(ACK, b""));
    let v = h.expect_flow(&key);
    assert_eq!(
        (v.state, v.direction, v.flags),
        (tcp_state::ESTABLISHED, direction::OUTBOUND, 0)
    );
    let seg = len(&c.pod_tcp(ACK, b""));
    assert_eq!((v.bytes_out, v.bytes_in), (2 * seg, seg));

    assert_eq!(
        h.counters(POD_SLOT),
        PodCounters {
            active_inbound: 0,
            active_outbound: 1,
            new_inbound_total: 0,
            last_new_inbound_ns: 0
        }
    );
    let ev = h.events();
    assert_eq!(kinds(&ev), [event_kind::NEW, event_kind::ESTABLISHED]);
    assert_event(
        &ev[0],
        &key,
        event_kind::NEW,
        tcp_state::SYN_SENT,
        direction::OUTBOUND,
    );
    assert_event(
        &ev[1],
        &key,
        event_kind::ESTABLISHED,
        tcp_state::ESTABLISHED,
        direction::OUTBOUND,
    );
}

#[test]
fn tcp_fin_both_ways_closes() {
    let c = conn4();
    let mut h = established_inbound(&c);
    let key = c.tcp_key();
    let first_seen = h.expect_flow(&key).first_seen_ns;

    // The peer (the opener) closes first.
    h.send_to_pod(&c.peer_tcp(FIN | ACK, b""));
    let v = h.expect_flow(&key);
    assert_eq!(
        (v.state, v.flags),
        (tcp_state::CLOSING, flow_flags::FIN_OPENER)
    );
    assert_eq!(
        h.counters(POD_SLOT).active_inbound,
        1,
        "half-closed still holds the pod"
    );
    assert_eq!(h.events(), []);

    h.send_from_pod(&c.pod_tcp(FIN | ACK, b""));
    let v = h.expect_flow(&key);
    assert_eq!(v.state, tcp_state::CLOSED);
    assert_eq!(v.flags, flow_flags::FIN_OPENER | flow_flags::FIN_RESPONDER);
    assert_eq!(v.first_seen_ns, first_seen);
    let cnt = h.counters(POD_SLOT);
    assert_eq!(
        (
            cnt.active_inbound,
            cnt.active_outbound,
            cnt.new_inbound_total
        ),
        (0, 0, 1)
    );

    // The last ACK, and a retransmitted FIN: counted, but closed stays closed.
    h.send_to_pod(&c.peer_tcp(ACK, b""));
    h.send_from_pod(&c.pod_tcp(FIN | ACK, b""));
    let v = h.expect_flow(&key);
    assert_eq!(v.state, tcp_state::CLOSED);
    let seg = len(&c.pod_tcp(ACK, b""));
    assert_eq!((v.bytes_in, v.bytes_out), (4 * seg, 3 * seg));
    assert_eq!(
        h.counters(POD_SLOT).active_inbound,
        0,
        "closing twice must not decrement twice"
    );

    let ev = h.events();
    assert_eq!(ev.len(), 1, "exactly one CLOSED event: {ev:?}");
    assert_event(
        &ev[0],
        &key,
        event_kind::CLOSED,
        tcp_state::CLOSED,
        direction::INBOUND,
    );
    assert_eq!(ev[0].first_seen_ns, first_seen);
    assert_eq!(
        ev[0].flags,
        flow_flags::FIN_OPENER | flow_flags::FIN_RESPONDER
    );
}

#[test]
fn tcp_fin_both_ways_closes_outbound_pod_first() {
    let c = Conn::new("10.0.1.2:51000", "10.0.0.9:443");
    let mut h = Harness::with_pod(&[pod_ip(&c)]);
    let key = c.tcp_key();
    outbound_handshake(&h, &c);
    assert_eq!(h.counters(POD_SLOT).active_outbound, 1);
    h.events();

    // The pod opened the flow, so its FIN is the opener's.
    h.send_from_pod(&c.pod_tcp(FIN | ACK, b""));
    let v = h.expect_flow(&key);
    assert_eq!(
        (v.state, v.flags),
        (tcp_state::CLOSING, flow_flags::FIN_OPENER)
    );
    assert_eq!(h.counters(POD_SLOT).active_outbound, 1);
    h.send_to_pod(&c.peer_tcp(FIN | ACK, b""));
    let v = h.expect_flow(&key);
    assert_eq!(v.state, tcp_state::CLOSED);
    assert_eq!(v.flags, flow_flags::FIN_OPENER | flow_flags::FIN_RESPONDER);
    assert_eq!(h.counters(POD_SLOT), PodCounters::default());
    let ev = h.events();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_event(
        &ev[0],
        &key,
        event_kind::CLOSED,
        tcp_state::CLOSED,
        direction::OUTBOUND,
    );
}

/// A request whose answer is still due is in flight; the answer ends it.
#[test]
fn data_to_the_pod_awaits_a_reply_until_data_comes_back() {
    let c = conn4();
    let h = established_inbound(&c);
    let key = c.tcp_key();
    let awaiting = |h: &Harness| h.expect_flow(&key).flags & flow_flags::AWAITING_REPLY;
    h.send_to_pod(&c.peer_tcp(PSH | ACK, b"GET /report"));
    assert_eq!(awaiting(&h), flow_flags::AWAITING_REPLY);
    h.send_from_pod(&c.pod_tcp(ACK, b""));
    assert_eq!(awaiting(&h), flow_flags::AWAITING_REPLY, "a bare ACK is no answer");
    h.send_from_pod(&c.pod_tcp(PSH | ACK, b"200 OK"));
    assert_eq!(awaiting(&h), 0, "answered");
    h.send_to_pod(&c.peer_tcp(ACK, b""));
    assert_eq!(awaiting(&h), 0, "the client's ACK is no request");
}

#[test]
fn tcp_one_fin_only_is_closing_and_still_active() {
    let c = conn4();
    let mut h = established_inbound(&c);
    let key = c.tcp_key();

    // The pod (responder) half-closes; the peer keeps sending.
    h.send_from_pod(&c.pod_tcp(FIN | ACK, b""));
    h.send_to_pod(&c.peer_tcp(PSH | ACK, b"more"));
    h.send_to_pod(&c.peer_tcp(PSH | ACK, b"and more"));
    let v = h.expect_flow(&key);
    assert_eq!(v.state, tcp_state::CLOSING);
    // The peer's data is unanswered: a request in flight.
    assert_eq!(v.flags, flow_flags::FIN_RESPONDER | flow_flags::AWAITING_REPLY);
    let seg = len(&c.peer_tcp(ACK, b""));
    let data = len(&c.peer_tcp(PSH | ACK, b"more")) + len(&c.peer_tcp(PSH | ACK, b"and more"));
    assert_eq!(v.bytes_in, 2 * seg + data);
    assert_eq!(h.counters(POD_SLOT).active_inbound, 1);
    assert_eq!(h.events(), [], "CLOSING is still active: no event");
}

#[test]
fn tcp_rst_closes_established() {
    // Either side may reset; each case on a fresh harness.
    for (who, rst_from_pod) in [("peer", false), ("pod", true)] {
        let c = conn4();
        let mut h = established_inbound(&c);
        let key = c.tcp_key();
        if rst_from_pod {
            h.send_from_pod(&c.pod_tcp(RST | ACK, b""));
        } else {
            h.send_to_pod(&c.peer_tcp(RST, b""));
        }
        let v = h.expect_flow(&key);
        assert_eq!(v.state, tcp_state::CLOSED, "RST from {who}");
        assert_eq!(v.flags, flow_flags::RESET, "RST from {who}");
        let cnt = h.counters(POD_SLOT);
        assert_eq!(
            (
                cnt.active_inbound,
                cnt.active_outbound,
                cnt.new_inbound_total
            ),
            (0, 0, 1),
            "RST from {who}"
        );
        let ev = h.events();
        assert_eq!(ev.len(), 1, "RST from {who}: {ev:?}");
        assert_event(
            &ev[0],
            &key,
            event_kind::CLOSED,
            tcp_state::CLOSED,
            direction::INBOUND,
        );
        assert_eq!(ev[0].flags, flow_flags::RESET);

        // A second RST changes nothing.
        h.send_to_pod(&c.peer_tcp(RST, b""));
        assert_eq!(
            h.counters(POD_SLOT).active_inbound,
            0,
            "RST from {who}, twice"
        );
        assert_eq!(h.events(), []);
    }
}

#[test]
fn tcp_rst_during_handshake_closes_without_touching_active() {
    let c = conn4();
    let mut h = Harness::with_pod(&[pod_ip(&c)]);
    let key = c.tcp_key();
    // A refused connection: peer SYN, pod RST.
    h.send_to_pod(&c.peer_tcp(SYN, b""));
    h.send_from_pod(&c.pod_tcp(RST | ACK, b""));
    let v = h.expect_flow(&key);
    assert_eq!((v.state, v.flags), (tcp_state::CLOSED, flow_flags::RESET));
    let cnt = h.counters(POD_SLOT);
    assert_eq!((cnt.active_inbound, cnt.new_inbound_total), (0, 1));
    assert_eq!(kinds(&h.events()), [event_kind::NEW, event_kind::CLOSED]);
}

#[test]
fn tcp_rst_on_unknown_flow_creates_nothing() {
    let c = conn4();
    let mut h = Harness::with_pod(&[pod_ip(&c)]);
    h.send_to_pod(&c.peer_tcp(RST, b""));
    h.send_to_pod(&c.peer_tcp(RST | ACK, b""));
    h.send_from_pod(&c.pod_tcp(RST, b""));
    h.send_from_pod(&c.pod_tcp(RST | ACK, b""));
    assert!(h.flows().is_empty(), "{:#?}", h.flows());
    assert_eq!(h.counters(POD_SLOT), PodCounters::default());
    assert_eq!(h.events(), []);
    assert_eq!(h.stat(stats::PACKETS), 4);
    assert_eq!(h.stat(stats::FLOWS_CREATED), 0);
    assert_eq!(
        h.stat(stats::UNPARSED),
        0,
        "RSTs parse fine; they are just not tracked"
    );
}

#[test]
fn tcp_syn_retransmits_make_one_flow() {
    let c = conn4();
    let mut h = Harness::with_pod(&[pod_ip(&c)]);
    let key = c.tcp_key();
    let syn = c.peer_tcp(SYN, b"");
    for _ in 0..3 {
        h.send_to_pod(&syn);
    }
    assert_eq!(h.flows().len(), 1);
    let v = h.expect_flow(&key);
    assert_eq!(
        (v.state, v.direction),
        (tcp_state::SYN_SENT, direction::INBOUND)
    );
    assert_eq!(v.bytes_in, 3 * len(&syn));
    let cnt = h.counters(POD_SLOT);
    assert_eq!((cnt.new_inbound_total, cnt.active_inbound), (1, 0));
    assert_eq!(
        cnt.last_new_inbound_ns, v.first_seen_ns,
        "a retransmit is not a new flow"
    );
    assert_eq!(kinds(&h.events()), [event_kind::NEW]);
    assert_eq!(h.stat(stats::FLOWS_CREATED), 1);

    // The handshake still completes after the retransmits.
    h.send_from_pod(&c.pod_tcp(SYN | ACK, b""));
    h.send_to_pod(&c.peer_tcp(SYN, b"")); // one more late retransmit
    assert_eq!(h.expect_flow(&key).state, tcp_state::SYN_RECV);
    h.send_to_pod(&c.peer_tcp(ACK, b""));
    assert_eq!(h.expect_flow(&key).state, tcp_state::ESTABLISHED);
    assert_eq!(h.counters(POD_SLOT).new_inbound_total, 1);
    assert_eq!(h.counters(POD_SLOT).active_inbound, 1);
}

#[test]
fn tcp_syn_flood_from_many_ports() {
    const N: u16 = 200;
    let base = conn4();
    let mut h = Harness::with_pod(&[pod_ip(&base)]);
    for i in 0..N {
        h.send_to_pod(&base.peer_port(20_000 + i).peer_tcp(SYN, b""));
    }
    let flows = h.flows();
    assert_eq!(flows.len(), usize::from(N));
    for i in 0..N {
        let v = h.expect_flow(&base.peer_port(20_000 + i).tcp_key());
        assert_eq!(
            (v.state, v.direction, v.bytes_in),
            (tcp_state::SYN_SENT, direction::INBOUND, len(&base.peer_tcp(SYN, b"")))
        );
    }
    let cnt = h.counters(POD_SLOT);
    assert_eq!(
        cnt.active_inbound, 0,
        "a flood of half-open handshakes holds nothing"
    );
    assert_eq!(cnt.active_outbound, 0);
    assert_eq!(
        cnt.new_inbound_total,
        u64::from(N),
        "every SYN is a new inbound flow"
    );
    let newest = flows.iter().map(|(_, v)| v.first_seen_ns).max().unwrap();
    assert_eq!(cnt.last_new_inbound_ns, newest);
    let ev = h.events();
    assert_eq!(ev.len(), usize::from(N));
    assert!(ev.iter().all(|e| e.kind == event_kind::NEW));
    assert_eq!(h.stat(stats::FLOWS_CREATED), u64::from(N));
    assert_eq!(h.stat(stats::EVENTS_LOST), 0);
}

#[test]
fn udp_first_packet_opens_inbound_flow_and_reply_counts() {
    // Fresh maps: CONFIG is as the loader left it (zeroed), as on a node
    // before the agent has written its settings.
    let c = Conn::new("10.0.1.2:53", "10.0.0.2:40000");
    let mut h = Harness::with_pod(&[pod_ip(&c)]);
    let key = c.udp_key();

    let q = c.peer_udp(&[b'q'; 40]);
    h.send_to_pod(&q);
    let v = h.expect_flow(&key);
    assert_eq!(
        (v.state, v.direction, v.flags),
        (tcp_state::ESTABLISHED, direction::INBOUND, 0)
    );
    assert_eq!((v.bytes_in, v.bytes_out), (len(&q), 0));
    let first_seen = v.first_seen_ns;
    let cnt = h.counters(POD_SLOT);
    assert_eq!(
        (cnt.new_inbound_total, cnt.last_new_inbound_ns),
        (1, first_seen)
    );
    assert_eq!(
        (cnt.active_inbound, cnt.active_outbound),
        (0, 0),
        "active counters are TCP only"
    );
    let ev = h.events();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_event(
        &ev[0],
        &key,
        event_kind::NEW,
        tcp_state::ESTABLISHED,
        direction::INBOUND,
    );

    let r = c.pod_udp(&[b'r'; 200]);
    h.send_from_pod(&r);
    h.send_to_pod(&q);
    let v = h.expect_flow(&key);
    assert_eq!(
        v.first_seen_ns, first_seen,
        "the reply belongs to the same flow"
    );
    assert_eq!(
        (v.state, v.direction),
        (tcp_state::ESTABLISHED, direction::INBOUND)
    );
    assert_eq!((v.bytes_in, v.bytes_out), (2 * len(&q), len(&r)));
    assert_eq!(h.counters(POD_SLOT).new_inbound_total, 1);
    assert_eq!(h.events(), [], "replies within the timeout send no event");
}

#[test]
fn udp_idle_timeout_makes_the_next_packet_a_new_flow() {
    let c = Conn::new("10.0.1.2:53", "10.0.0.2:40000");
    let mut h = Harness::with_pod(&[pod_ip(&c)]);
    h.set_udp_timeout_ns(1);
    let key = c.udp_key();

    h.send_to_pod(&c.peer_udp(b"one"));
    let first = h.expect_flow(&key);
    assert_eq!(h.counters(POD_SLOT).new_inbound_total, 1);

    let two = c.peer_udp(b"two");
    h.send_to_pod(&two);
    let v = h.expect_flow(&key);
    assert!(
        v.first_seen_ns > first.first_seen_ns,
        "a new incarnation of the flow"
    );
    assert_eq!(
        (v.bytes_in, v.bytes_out),
        (len(&two), 0),
        "counts start over"
    );
    assert_eq!(
        (v.state, v.direction),
        (tcp_state::ESTABLISHED, direction::INBOUND)
    );
    let cnt = h.counters(POD_SLOT);
    assert_eq!(cnt.new_inbound_total, 2);
    assert_eq!(cnt.last_new_inbound_ns, v.first_seen_ns);

    // After another timeout the pod speaks first: a new outbound flow.
    h.send_from_pod(&c.pod_udp(b"three"));
    let v = h.expect_flow(&key);
    assert_eq!(v.direction, direction::OUTBOUND);
    assert_eq!((v.bytes_out, v.bytes_in), (len(&c.pod_udp(b"three")), 0));
    assert_eq!(
        h.counters(POD_SLOT).new_inbound_total,
        2,
        "an outbound flow is not a new inbound one"
    );

    let ev = h.events();
    assert_eq!(kinds(&ev), [event_kind::NEW; 3]);
    assert_eq!(ev[2].direction, direction::OUTBOUND);
    assert_eq!(h.flows().len(), 1);
}

#[test]
fn udp_within_timeout_stays_one_flow() {
    let c = Conn::new("10.0.1.2:53", "10.0.0.2:40000");
    let mut h = Harness::with_pod(&[pod_ip(&c)]);
    h.set_udp_timeout_ns(60_000_000_000);
    for _ in 0..5 {
        h.send_to_pod(&c.peer_udp(b"q"));
        h.send_from_pod(&c.pod_udp(b"r"));
    }
    let v = h.expect_flow(&c.udp_key());
    assert_eq!(
        (v.bytes_in, v.bytes_out, v.direction),
        (5 * len(&c.peer_udp(b"q")), 5 * len(&c.pod_udp(b"r")), direction::INBOUND)
    );
    assert_eq!(h.counters(POD_SLOT).new_inbound_total, 1);
    assert_eq!(kinds(&h.events()), [event_kind::NEW]);
}

#[test]
fn midstream_pickup_guesses_direction_from_ports() {
    // (pod, peer, who sends the data, expected direction): inbound (the
    // side that holds the pod) unless the pod's port is ephemeral and the
    // peer's is not.
    let cases = [
        ("10.0.1.2:8080", "10.0.0.2:40312", false, direction::INBOUND), // pod has the lower port: server
        ("10.0.1.2:8080", "10.0.0.2:40312", true, direction::INBOUND),
        ("10.0.1.2:50051", "10.0.0.2:45000", false, direction::INBOUND), // gRPC server, both ports high
        ("10.0.1.2:50051", "10.0.0.2:45000", true, direction::INBOUND),
        ("10.0.1.2:51000", "10.0.0.9:443", true, direction::OUTBOUND), // pod ephemeral, peer a service port
        ("10.0.1.2:51000", "10.0.0.9:443", false, direction::OUTBOUND),
    ];
    for (pod, peer, from_pod, dir) in cases {
        let c = Conn::new(pod, peer);
        let mut h = Harness::with_pod(&[pod_ip(&c)]);
        let key = c.tcp_key();
        let what = format!(
            "{pod} <-> {peer}, data from {}",
            if from_pod { "pod" } else { "peer" }
        );
        let t0 = now_ns();
        if from_pod {
            h.send_from_pod(&c.pod_tcp(PSH | ACK, b"data"));
        } else {
            h.send_to_pod(&c.peer_tcp(PSH | ACK, b"data"));
        }
        let v = h.expect_flow(&key);
        assert_eq!(v.state, tcp_state::ESTABLISHED, "{what}");
        // Data from the peer is a request until the pod answers.
        let awaiting = if from_pod { 0 } else { flow_flags::AWAITING_REPLY };
        assert_eq!(v.flags, flow_flags::PICKED_UP | awaiting, "{what}");
        assert_eq!(v.direction, dir, "{what}");
        assert!(v.first_seen_ns >= t0, "{what}");
        let data = len(&c.pod_tcp(PSH | ACK, b"data"));
        let want = if from_pod { (data, 0) } else { (0, data) };
        assert_eq!((v.bytes_out, v.bytes_in), want, "{what}");
        let cnt = h.counters(POD_SLOT);
        let inbound = dir == direction::INBOUND;
        assert_eq!(cnt.active_inbound, u64::from(inbound), "{what}");
        assert_eq!(cnt.active_outbound, u64::from(!inbound), "{what}");
        assert_eq!(
            cnt.new_inbound_total, 0,
            "{what}: a picked-up flow is not new"
        );
        let ev = h.events();
        assert_eq!(ev.len(), 1, "{what}: {ev:?}");
        assert_event(
            &ev[0],
            &key,
            event_kind::ESTABLISHED,
            tcp_state::ESTABLISHED,
            dir,
        );
        assert_eq!(ev[0].flags, flow_flags::PICKED_UP | awaiting, "{what}");

        // It closes like any other flow, and the active count returns to 0.
        h.send_to_pod(&c.peer_tcp(FIN | ACK, b""));
        assert_eq!(h.expect_flow(&key).state, tcp_state::CLOSING, "{what}");
        h.send_from_pod(&c.pod_tcp(FIN | ACK, b""));
        let v = h.expect_flow(&key);
        assert_eq!(v.state, tcp_state::CLOSED, "{what}");
        assert_eq!(h.counters(POD_SLOT), PodCounters::default(), "{what}");
        assert_eq!(kinds(&h.events()), [event_kind::CLOSED], "{what}");
    }
}

#[test]
fn port_reuse_after_close_starts_a_fresh_flow() {
    let c = conn4();
    let mut h = established_inbound(&c);
    let key = c.tcp_key();
    h.send_to_pod(&c.peer_tcp(PSH | ACK, b"request"));
    h.send_to_pod(&c.peer_tcp(FIN | ACK, b""));
    h.send_from_pod(&c.pod_tcp(FIN | ACK, b""));
    h.send_to_pod(&c.peer_tcp(ACK, b""));
    let old = h.expect_flow(&key);
    assert_eq!(old.state, tcp_state::CLOSED);
    assert_eq!(kinds(&h.events()), [event_kind::CLOSED]);

    let syn = c.peer_tcp(SYN, b"");
    h.send_to_pod(&syn);
    let v = h.expect_flow(&key);
    assert_eq!(
        (v.state, v.direction, v.flags),
        (tcp_state::SYN_SENT, direction::INBOUND, 0)
    );
    assert!(
        v.first_seen_ns > old.first_seen_ns,
        "new first_seen: {} vs {}",
        v.first_seen_ns,
        old.first_seen_ns
    );
    assert!(v.first_seen_ns > old.last_seen_ns);
    assert_eq!(
        (v.bytes_in, v.bytes_out),
        (len(&syn), 0)
    );
    let cnt = h.counters(POD_SLOT);
    assert_eq!((cnt.new_inbound_total, cnt.active_inbound), (2, 0));
    assert_eq!(cnt.last_new_inbound_ns, v.first_seen_ns);
    let ev = h.events();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_event(
        &ev[0],
        &key,
        event_kind::NEW,
        tcp_state::SYN_SENT,
        direction::INBOUND,
    );
    assert_eq!(ev[0].first_seen_ns, v.first_seen_ns);

    h.send_from_pod(&c.pod_tcp(SYN | ACK, b""));
    h.send_to_pod(&c.peer_tcp(ACK, b""));
    assert_eq!(h.expect_flow(&key).state, tcp_state::ESTABLISHED);
    assert_eq!(h.counters(POD_SLOT).active_inbound, 1);
    assert_eq!(h.flows().len(), 1);
}

#[test]
fn unregistered_ip_is_not_tracked() {
    let c = conn4();
    let mut h = Harness::with_pod(&[pod_ip(&c)]);
    let other = Conn::new("10.0.1.99:8080", PEER4);
    h.send_to_pod(&other.peer_tcp(SYN, b""));
    h.send_from_pod(&other.pod_tcp(SYN, b""));
    h.send_to_pod(&other.peer_udp(b"x"));
    // A registered pod's packet on the wrong side: the other end is the "pod"
    // end for that program, and it is not registered.
    h.send_to_pod(&c.pod_tcp(SYN, b""));
    h.send_from_pod(&c.peer_tcp(SYN, b""));
    let c6 = conn6();
    h.send_to_pod(&c6.peer_tcp(SYN, b""));
    h.assert_untouched(6, stats::NOT_POD);
    assert_eq!(h.stat(stats::UNPARSED), 0);
}

#[test]
fn arp_passes_untouched() {
    let c = conn4();
    let mut h = Harness::with_pod(&[pod_ip(&c)]);
    let arp = packets::arp_request(c.peer.ip(), c.pod.ip());
    h.send_both_ways(&arp);
    let arp = packets::arp_request(c.pod.ip(), c.peer.ip());
    h.send_both_ways(&arp);
    h.assert_untouched(4, stats::UNPARSED);
}

#[test]
fn frames_shorter_than_ethernet_never_reach_the_programs() {
    // BPF_PROG_TEST_RUN refuses SCHED_CLS input shorter than ETH_HLEN with
    // EINVAL, so a 10-byte frame cannot be run: check that it is refused, not
    // run, and that nothing was counted. (On a real interface the stack never
    // hands TC a frame without a whole Ethernet header either.)
    let c = conn4();
    let mut h = Harness::with_pod(&[pod_ip(&c)]);
    let syn = c.peer_tcp(SYN, b"");
    for cut in [0, 1, 10, ETH_HLEN - 1] {
        for side in [Side::FromPod, Side::ToPod] {
            assert!(
                !h.send_or_refused(side, &syn[..cut]),
                "{side:?}: a {cut}-byte frame was run"
            );
        }
    }
    h.assert_untouched(0, stats::UNPARSED);
}

#[test]
fn bare_ethernet_headers_pass_untouched() {
    let c = conn4();
    let mut h = Harness::with_pod(&[pod_ip(&c)]);
    let mut ran = 0;
    for ethertype in [0x0806u16, 0x8100, 0x88cc, 0x0000, 0xffff, 0x0800, 0x86dd] {
        let mut frame = c.peer_tcp(SYN, b"")[..ETH_HLEN].to_vec();
        frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
        for side in [Side::FromPod, Side::ToPod] {
            let did_run = h.send_or_refused(side, &frame);
            // Kernels since the "too short for its protocol" checks refuse
            // IPv4/IPv6 frames without a whole IP header; nothing else.
            assert!(
                did_run || ethertype == 0x0800 || ethertype == 0x86dd,
                "{ethertype:#06x} refused"
            );
            ran += u64::from(did_run);
        }
    }
    h.assert_untouched(ran, stats::UNPARSED);
}

/// Runs every cut of `whole` (from a bare Ethernet header to `last_cut`
/// bytes) through `side`, and returns how many the kernel let run. Cuts
/// from `must_run` up must run: the kernel refuses only frames too short
/// for their IP header, never ones with a short TCP header.
fn send_cuts(h: &Harness, side: Side, whole: &[u8], last_cut: usize, must_run: usize) -> u64 {
    let mut ran = 0;
    for cut in ETH_HLEN..=last_cut {
        let did_run = h.send_or_refused(side, &whole[..cut]);
        assert!(
            did_run || cut < must_run,
            "{side:?}: the kernel refused a frame cut at {cut} bytes"
        );
        ran += u64::from(did_run);
        assert!(
            h.flows().is_empty(),
            "{side:?}: a frame cut at {cut} bytes created a flow: {:#?}",
            h.flows()
        );
    }
    ran
}

#[test]
fn ipv4_truncated_at_every_length_passes_untouched() {
    let c = conn4();
    let mut h = Harness::with_pod(&[pod_ip(&c)]);
    let syn_in = c.peer_tcp(SYN, b"");
    let syn_out = c.pod_tcp(SYN, b"");
    assert_eq!(syn_in.len(), ETH_HLEN + IPV4_HLEN + 20);
    // Every cut that loses part of the IPv4 header, the ports or the flags.
    // This kernel refuses cuts inside the IPv4 header before running the
    // program (older ones run them); the ones inside TCP always run.
    let last = ETH_HLEN + IPV4_HLEN + 13;
    let must_run = ETH_HLEN + IPV4_HLEN;
    let ran = send_cuts(&h, Side::ToPod, &syn_in, last, must_run)
        + send_cuts(&h, Side::FromPod, &syn_out, last, must_run);
    assert!(ran >= 2 * 14, "only {ran} cuts ran");
    h.assert_untouched(ran, stats::UNPARSED);

    // The control: the same frames whole are tracked, so the cuts above are
    // what made the difference.
    h.send_to_pod(&syn_in);
    assert_eq!(h.expect_flow(&c.tcp_key()).state, tcp_state::SYN_SENT);
}

#[test]
fn ipv6_truncated_at_every_length_passes_untouched() {
    for ext in [
        IpExt::default(),
        IpExt {
            hop_by_hop: true,
            dest_opts: true,
            ..IpExt::default()
        },
    ] {
        let c = conn6().with_ip_ext(ext);
        let mut h = Harness::with_pod(&[pod_ip(&c)]);
        let syn_in = c.peer_tcp(SYN, b"");
        let syn_out = c.pod_tcp(SYN, b"");
        let ext_len = if ext.hop_by_hop { 16 } else { 0 };
        assert_eq!(syn_in.len(), ETH_HLEN + IPV6_HLEN + ext_len + 20);
        // With extension headers, the cuts inside them always run too.
        let last = ETH_HLEN + IPV6_HLEN + ext_len + 13;
        let must_run = ETH_HLEN + IPV6_HLEN;
        let ran = send_cuts(&h, Side::ToPod, &syn_in, last, must_run)
            + send_cuts(&h, Side::FromPod, &syn_out, last, must_run);
        assert!(ran >= 2 * 14, "{ext:?}: only {ran} cuts ran");
        h.assert_untouched(ran, stats::UNPARSED);
        h.send_to_pod(&syn_in);
        assert_eq!(
            h.expect_flow(&c.tcp_key()).state,
            tcp_state::SYN_SENT,
            "{ext:?}: control"
        );
    }
}

#[test]
fn ipv4_non_first_fragment_passes_untouched() {
    let c = conn4();
    let mut h = Harness::with_pod(&[pod_ip(&c)]);
    let mut n = 0;
    // Offsets in 8-byte units; with and without more-fragments. The payload
    // still looks like a TCP SYN / UDP header, which a parser that ignored the
    // offset would track.
    for (offset, more) in [(1u16, true), (1, false), (185, true), (0x1fff, false)] {
        for mut frame in [
            c.peer_tcp(SYN, b""),
            c.pod_tcp(SYN, b""),
            c.peer_udp(b"x"),
            c.pod_udp(b"x"),
        ] {
            packets::edit_ipv4_header(&mut frame, |hdr| {
                let v = offset | if more { 0x2000 } else { 0 };
                hdr[6..8].copy_from_slice(&v.to_be_bytes());
            });
            packets::assert_ipv4_checksum_ok(&frame);
            h.send_both_ways(&frame);
            n += 2;
        }
    }
    h.assert_untouched(n, stats::UNPARSED);

    // Control: a first fragment (offset 0, more-fragments set) carries the
    // ports and is tracked.
    let mut frame = c.peer_tcp(SYN, b"");
    packets::edit_ipv4_header(&mut frame, |hdr| {
        hdr[6..8].copy_from_slice(&0x2000u16.to_be_bytes())
    });
    h.send_to_pod(&frame);
    assert_eq!(h.expect_flow(&c.tcp_key()).state, tcp_state::SYN_SENT);
}

#[test]
fn ipv4_ihl_below_5_passes_untouched() {
    let c = conn4();
    let mut h = Harness::with_pod(&[pod_ip(&c)]);
    let mut n = 0;
    for ihl in 0..5u8 {
        for mut frame in [
            c.peer_tcp(SYN, b""),
            c.pod_tcp(SYN, b""),
            c.peer_udp(b"x"),
            c.pod_udp(b"x"),
        ] {
            packets::edit_ipv4_header(&mut frame, |hdr| hdr[0] = 0x40 | ihl);
            h.send_both_ways(&frame);
            n += 2;
        }
    }
    h.assert_untouched(n, stats::UNPARSED);
}

#[test]
fn ip_version_mismatch_passes_untouched() {
    let c = conn4();
    let c6 = conn6();
    let mut h = Harness::with_pod(&[pod_ip(&c), pod_ip(&c6)]);
    let mut v4 = c.peer_tcp(SYN, b"");
    packets::edit_ipv4_header(&mut v4, |hdr| hdr[0] = 0x65); // version 6 behind ethertype IPv4
    h.send_both_ways(&v4);
    let mut v6 = c6.peer_tcp(SYN, b"");
    v6[ETH_HLEN] = 0x40 | (v6[ETH_HLEN] & 0x0f); // version 4 behind ethertype IPv6
    h.send_both_ways(&v6);
    h.assert_untouched(4, stats::UNPARSED);
}

#[test]
fn unknown_ip_protocol_passes_untouched() {
    let c = conn4();
    let mut h = Harness::with_pod(&[pod_ip(&c)]);
    let mut n = 0;
    for proto in [
        IpNumber::GRE,
        IpNumber::ICMP,
        IpNumber(132 /* SCTP */),
        IpNumber::IPV6_NO_NEXT_HEADER,
    ] {
        for frame in [
            packets::ipv4_with_proto(c.peer, c.pod, proto),
            packets::ipv4_with_proto(c.pod, c.peer, proto),
        ] {
            packets::assert_ipv4_proto(&frame, proto);
            h.send_both_ways(&frame);
            n += 2;
        }
    }
    h.assert_untouched(n, stats::UNPARSED);
}

#[test]
fn tcp_data_offset_below_5_passes_untouched() {
    for c in [conn4(), conn6()] {
        let mut h = Harness::with_pod(&[pod_ip(&c)]);
        let mut n = 0;
        for doff in 0..5u8 {
            for mut frame in [
                c.peer_tcp(SYN, b""),
                c.pod_tcp(SYN, b""),
                c.peer_tcp(PSH | ACK, b"data"),
            ] {
                packets::edit_tcp_header(&mut frame, |tcp| tcp[12] = doff << 4);
                h.send_both_ways(&frame);
                n += 2;
            }
        }
        h.assert_untouched(n, stats::UNPARSED);

        // Control: rewriting data offset 5 gives back the original frame
        // (so the checksum code is right) and that frame is tracked.
        let mut frame = c.peer_tcp(SYN, b"");
        packets::edit_tcp_header(&mut frame, |tcp| tcp[12] = 5 << 4);
        assert_eq!(frame, c.peer_tcp(SYN, b""));
        h.send_to_pod(&frame);
        assert_eq!(h.expect_flow(&c.tcp_key()).state, tcp_state::SYN_SENT);
    }
}

#[test]
fn syn_fin_and_syn_rst_on_unknown_flow_create_nothing() {
    let c = conn4();
    let mut h = Harness::with_pod(&[pod_ip(&c)]);
    let mut n = 0;
    for flags in [
        SYN | FIN,
        SYN | RST,
        SYN | FIN | ACK,
        SYN | RST | ACK,
        SYN | FIN | RST,
        SYN | ACK,
    ] {
        h.send_to_pod(&c.peer_tcp(flags, b""));
        h.send_from_pod(&c.pod_tcp(flags, b""));
        n += 2;
        assert!(
            h.flows().is_empty(),
            "flags {flags:#04x} created a flow: {:#?}",
            h.flows()
        );
    }
    assert!(h.flows().is_empty());
    assert_eq!(h.counters(POD_SLOT), PodCounters::default());
    assert_eq!(h.events(), []);
    assert_eq!(h.stat(stats::PACKETS), n);
    assert_eq!(h.stat(stats::FLOWS_CREATED), 0);
    assert_eq!(h.stat(stats::UNPARSED), 0);
}

#[test]
fn two_pods_count_in_their_own_slots() {
    let a = conn4();
    let b = Conn::new("10.0.1.3:8080", PEER4);
    let mut h = Harness::new();
    h.add_pod_ip(pod_ip(&a), 1);
    h.add_pod_ip(pod_ip(&b), 2);
    inbound_handshake(&h, &a);
    h.send_to_pod(&b.peer_tcp(SYN, b""));
    assert_eq!(h.expect_flow(&a.tcp_key()).pod_slot, 1);
    assert_eq!(h.expect_flow(&b.tcp_key()).pod_slot, 2);
    let (ca, cb) = (h.counters(1), h.counters(2));
    assert_eq!((ca.active_inbound, ca.new_inbound_total), (1, 1));
    assert_eq!((cb.active_inbound, cb.new_inbound_total), (0, 1));
    assert_eq!(h.counters(0), PodCounters::default());
    assert_eq!(h.events().len(), 3);
}

/// Known bug, not fixed here: it needs a design change, not a minimal fix.
/// The per-pod active counters are kept by +1/-1 at state changes, but when
/// the LRU flow table is full the kernel evicts entries silently, active ones
/// included, and nothing ever takes their -1. Once more flows are established
/// than `--max-flows`, `active_inbound` stays above the real number for good
/// and the pod can never drain (only its deadline releases it). A later
/// packet of an evicted flow is picked up with another +1 that its close
/// balances, so the leak never heals.
#[test]
#[ignore = "known bug: LRU eviction of an active flow leaks its active count; see the comment"]
fn active_counters_match_the_table_after_lru_eviction() {
    const TABLE: u16 = 1024;
    let base = conn4();
    let mut h = Harness::with_flow_table(u32::from(TABLE));
    h.add_pod_ip(pod_ip(&base), POD_SLOT);
    for i in 0..3 * TABLE {
        inbound_handshake(&h, &base.peer_port(10_000 + i));
    }
    let flows = h.flows();
    assert!(
        flows.len() < usize::from(3 * TABLE),
        "the table must have evicted flows"
    );
    let active = flows
        .iter()
        .filter(|(_, v)| v.direction == direction::INBOUND && tcp_state::is_active(v.state))
        .count();
    assert_eq!(
        h.counters(POD_SLOT).active_inbound,
        u64::try_from(active).unwrap(),
        "active_inbound must count the active inbound flows the table holds"
    );
}
