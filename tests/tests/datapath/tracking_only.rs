//! The tracking-only ingress program (`programs::INGRESS_TRACK`), which the
//! agent loads instead of `conndrain_ingress` on kernels without
//! `bpf_redirect_neigh` (before 5.10): the verifier takes it (the harness
//! loads it), and it tracks exactly as `conndrain_ingress` does.

use conndrain_common::{programs, tcp_state};

use crate::{
    conn4, conn6,
    harness::{Harness, POD_SLOT},
    kinds,
    packets::{ACK, Conn, FIN, PSH, SYN},
    pod_ip,
};

/// One whole inbound connection, as (sent by the pod, frame).
pub(crate) fn a_connection(c: &Conn) -> [(bool, Vec<u8>); 7] {
    [
        (false, c.peer_tcp(SYN, b"")),
        (true, c.pod_tcp(SYN | ACK, b"")),
        (false, c.peer_tcp(ACK, b"")),
        (false, c.peer_tcp(PSH | ACK, b"GET / HTTP/1.1\r\n\r\n")),
        (true, c.pod_tcp(PSH | ACK, b"HTTP/1.1 200 OK\r\n\r\n")),
        (true, c.pod_tcp(FIN | ACK, b"")),
        (false, c.peer_tcp(FIN | ACK, b"")),
    ]
}

/// The pod's counters and the events are the same in both harnesses.
pub(crate) fn assert_same_counters_and_events(a: &mut Harness, b: &mut Harness) {
    let (x, y) = (a.counters(POD_SLOT), b.counters(POD_SLOT));
    assert_eq!(
        (x.active_inbound, x.active_outbound, x.new_inbound_total),
        (y.active_inbound, y.active_outbound, y.new_inbound_total)
    );
    assert_eq!(kinds(&a.events()), kinds(&b.events()));
}

/// Runs one connection through `conndrain_ingress` and through
/// `conndrain_track` (both with `conndrain_egress` the other way), and
/// compares the flow, the pod's counters and the events after every packet.
fn tracks_like_the_full_program(c: &Conn) {
    let mut full = Harness::with_pod(&[pod_ip(c)]);
    let mut track = Harness::with_pod(&[pod_ip(c)]);
    let key = c.tcp_key();
    for (from_pod, frame) in &a_connection(c) {
        for (h, ingress) in [(&full, programs::INGRESS), (&track, programs::INGRESS_TRACK)] {
            if *from_pod {
                h.run_checked(ingress, frame);
            } else {
                h.send_to_pod(frame);
            }
        }
        let (a, b) = (full.expect_flow(&key), track.expect_flow(&key));
        assert_eq!(
            (a.state, a.direction, a.flags, a.pod_slot, a.bytes_in, a.bytes_out),
            (b.state, b.direction, b.flags, b.pod_slot, b.bytes_in, b.bytes_out)
        );
        assert_same_counters_and_events(&mut full, &mut track);
    }
    assert_eq!(track.expect_flow(&key).state, tcp_state::CLOSED);
}

#[test]
fn tracking_only_ingress_tracks_like_the_full_one() {
    tracks_like_the_full_program(&conn4());
}

#[test]
fn ipv6_tracking_only_ingress_tracks_like_the_full_one() {
    tracks_like_the_full_program(&conn6());
}
