//! The TCP state machine: handshakes both ways, FIN and RST closes, SYN
//! retransmits and floods.


use conndrain_common::{PodCounters, direction, event_kind, flow_flags, stats, tcp_state};

use crate::{
    assert_event, conn4, established_inbound,
    harness::{Harness, POD_SLOT},
    kinds, len, outbound_handshake,
    packets::{ACK, Conn, FIN, PSH, RST, SYN},
    pod_ip,
};

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
