//! Which flows are tracked and where: mid-stream pickups, port reuse,
//! unregistered addresses, two pods' slots, and LRU eviction.


use conndrain_common::{PodCounters, direction, event_kind, flow_flags, stats, tcp_state};

use crate::{
    PEER4, assert_event, conn4, conn6, established_inbound,
    harness::{Harness, POD_SLOT, now_ns},
    inbound_handshake, kinds, len,
    packets::{ACK, Conn, FIN, PSH, SYN},
    pod_ip,
};

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
