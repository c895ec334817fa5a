//! Flow-table pressure: the LRU flow table evicts under a flood of new flows,
//! and a draining pod's flows must not be among the evicted (they live in
//! `HELD`, which nothing evicts). See `agent/src/datapath/held.rs`.

use conndrain_common::{event_kind, stats, tcp_state};

use crate::{
    harness::{Harness, POD_SLOT},
    inbound_handshake, kinds,
    packets::{ACK, Conn, FIN, PSH, SYN},
};

const DRAINING: &str = "10.0.1.2:8080";
const OTHER: &str = "10.0.1.3:53";
const OTHER_SLOT: u32 = POD_SLOT + 1;
/// As small as `--max-flows` allows.
const TABLE: u32 = 1024;

fn peer(port: u16) -> String {
    format!("10.0.0.2:{port}")
}

#[test]
fn a_draining_pods_new_flows_go_to_the_held_table() {
    let c = Conn::new(DRAINING, &peer(40_000));
    let mut h = Harness::with_pod(&[c.pod.ip()]);
    h.set_draining(POD_SLOT, true);
    inbound_handshake(&h, &c);
    let v = h.held(&c.tcp_key()).expect("the flow is in HELD");
    assert_eq!(v.state, tcp_state::ESTABLISHED);
    assert_eq!(h.flow(&c.tcp_key()), None, "not also in FLOWS");
    assert_eq!(
        kinds(&h.events()),
        [event_kind::NEW, event_kind::ESTABLISHED]
    );
    let cnt = h.counters(POD_SLOT);
    assert_eq!((cnt.active_inbound, cnt.new_inbound_total), (1, 1));
    assert_eq!(h.stat(stats::HELD), 1);
    assert_eq!(h.stat(stats::HOLD_FAILED), 0);
}

#[test]
fn a_draining_pods_flow_moves_to_the_held_table_at_its_next_packet() {
    let c = Conn::new(DRAINING, &peer(40_001));
    let mut h = Harness::with_pod(&[c.pod.ip()]);
    inbound_handshake(&h, &c);
    let before = h.expect_flow(&c.tcp_key());
    h.events();

    h.set_draining(POD_SLOT, true);
    let data = c.peer_tcp(ACK | PSH, b"GET / HTTP/1.1\r\n\r\n");
    h.send_to_pod(&data);
    assert_eq!(h.flow(&c.tcp_key()), None, "moved out of FLOWS");
    let v = h.held(&c.tcp_key()).expect("moved into HELD");
    assert_eq!(v.first_seen_ns, before.first_seen_ns, "the same flow");
    assert_eq!(v.state, tcp_state::ESTABLISHED);
    assert_eq!(v.bytes_in, before.bytes_in + u64::try_from(data.len()).unwrap(), "this packet counted");
    assert_eq!(h.events(), [], "a move is no state change");
    assert_eq!(h.counters(POD_SLOT).active_inbound, 1);

    // It goes on being tracked there: FIN both ways closes it.
    h.send_to_pod(&c.peer_tcp(FIN | ACK, b""));
    h.send_from_pod(&c.pod_tcp(FIN | ACK, b""));
    assert_eq!(h.held(&c.tcp_key()).unwrap().state, tcp_state::CLOSED);
    assert_eq!(kinds(&h.events()), [event_kind::CLOSED]);
    assert_eq!(h.counters(POD_SLOT).active_inbound, 0);
    assert_eq!(h.flows(), [], "nothing left behind in FLOWS");
}

/// The flood fills the LRU table several times over. The control — an
/// established flow of a pod that is not draining, idle like the draining
/// pod's — is evicted, which shows the flood really evicts; the draining
/// pod's flow stays, and goes on to close normally.
#[test]
fn a_flood_that_fills_the_flow_table_never_evicts_a_draining_pods_flows() {
    let drained = Conn::new(DRAINING, &peer(40_002));
    let control = Conn::new(OTHER, &peer(40_003));
    let mut h = Harness::with_flow_table(TABLE);
    h.add_pod_ip(drained.pod.ip(), POD_SLOT);
    h.add_pod_ip(control.pod.ip(), OTHER_SLOT);
    inbound_handshake(&h, &drained);
    h.send_to_pod(&control.peer_udp(b"q"));
    h.send_from_pod(&control.pod_udp(b"r"));
    h.set_draining(POD_SLOT, true);
    // The drain started while the flow idled: it is still in FLOWS, where
    // the agent moves it (here: its next packet does).
    h.send_to_pod(&drained.peer_tcp(ACK, b""));
    assert!(h.held(&drained.tcp_key()).is_some());

    // Each flood flow is a query and its answer: one-packet flows would
    // only evict each other (the LRU keeps entries looked up again).
    let flood = Conn::new(OTHER, &peer(1));
    for port in 0..u16::try_from(TABLE * 8).unwrap() {
        let f = flood.peer_port(10_000 + port);
        h.send_to_pod(&f.peer_udp(b"x"));
        h.send_from_pod(&f.pod_udp(b"y"));
    }
    assert!(
        h.flow(&control.udp_key()).is_none(),
        "control: the flood did not evict the other pod's idle flow"
    );
    let v = h
        .held(&drained.tcp_key())
        .expect("the draining pod's flow was evicted by the flood");
    assert_eq!(v.state, tcp_state::ESTABLISHED);
    assert_eq!(h.counters(POD_SLOT).active_inbound, 1);
    assert_eq!(h.held_flows().len(), 1, "the flood went to FLOWS, not HELD");

    h.events();
    h.send_from_pod(&drained.pod_tcp(FIN | ACK, b""));
    h.send_to_pod(&drained.peer_tcp(FIN | ACK, b""));
    assert_eq!(kinds(&h.events()), [event_kind::CLOSED]);
    assert_eq!(h.counters(POD_SLOT).active_inbound, 0);
}

/// A SYN flood against the draining pod itself goes to `HELD` too (each SYN
/// is a new inbound flow, which keeps the pod from being released); the
/// flows held before it are untouched by it.
#[test]
fn a_syn_flood_against_a_draining_pod_keeps_its_established_flows() {
    let c = Conn::new(DRAINING, &peer(40_004));
    let mut h = Harness::with_flow_table(TABLE);
    h.add_pod_ip(c.pod.ip(), POD_SLOT);
    h.set_draining(POD_SLOT, true);
    inbound_handshake(&h, &c);
    for port in 0..u16::try_from(TABLE * 2).unwrap() {
        h.send_to_pod(&c.peer_port(20_000 + port).peer_tcp(SYN, b""));
    }
    assert_eq!(
        h.held(&c.tcp_key()).map(|v| v.state),
        Some(tcp_state::ESTABLISHED)
    );
    let cnt = h.counters(POD_SLOT);
    assert_eq!(cnt.active_inbound, 1);
    assert_eq!(cnt.new_inbound_total, 1 + u64::from(TABLE * 2));
    assert_eq!(h.flows(), [], "HELD had room for all of them");
}
