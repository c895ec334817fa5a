//! UDP flows: the first packet opens one, the idle timeout ends it.


use conndrain_common::{direction, event_kind, tcp_state};

use crate::{
    assert_event,
    harness::{Harness, POD_SLOT},
    kinds, len,
    packets::Conn,
    pod_ip,
};

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
