//! The programs for L3 devices (`programs::INGRESS_L3`, `programs::EGRESS_L3`),
//! which the agent attaches instead on ipip, `WireGuard` and other devices whose
//! packets start at the IP header: the verifier takes them (the harness loads
//! them), and they track a bare IP connection exactly as the Ethernet ones
//! track the same connection in Ethernet frames. Their steering is in the
//! table of `steer.rs`.
//!
//! `BPF_PROG_TEST_RUN` takes the first 14 bytes of any TC input for an
//! Ethernet header when it sets the skb up, but hands the program the data
//! from byte 0: so a bare IP packet reaches the program as on an L3 device.

use conndrain_common::{programs, stats, tcp_state};

use crate::{
    conn4, conn6,
    harness::Harness,
    packets::{Conn, ETH_HLEN, SYN},
    pod_ip,
    tracking_only::{a_connection, assert_same_counters_and_events},
};

fn tracks_like_the_ethernet_programs(c: &Conn) {
    let mut eth = Harness::with_pod(&[pod_ip(c)]);
    let mut l3 = Harness::with_pod(&[pod_ip(c)]);
    let key = c.tcp_key();
    let (mut bare_in, mut bare_out) = (0u64, 0u64);
    for (from_pod, frame) in &a_connection(c) {
        let bare = &frame[ETH_HLEN..];
        let n = u64::try_from(bare.len()).unwrap();
        if *from_pod {
            eth.run_checked(programs::INGRESS, frame);
            l3.run_checked(programs::INGRESS_L3, bare);
            bare_out += n;
        } else {
            eth.run_checked(programs::EGRESS, frame);
            l3.run_checked(programs::EGRESS_L3, bare);
            bare_in += n;
        }
        let (a, b) = (eth.expect_flow(&key), l3.expect_flow(&key));
        assert_eq!((a.state, a.direction, a.flags, a.pod_slot), (b.state, b.direction, b.flags, b.pod_slot));
        // The same packets, 14 bytes shorter each.
        assert_eq!((b.bytes_in, b.bytes_out), (bare_in, bare_out));
        assert_same_counters_and_events(&mut eth, &mut l3);
    }
    assert_eq!(l3.expect_flow(&key).state, tcp_state::CLOSED);
    assert_eq!(l3.stat(stats::UNPARSED), 0);
}

#[test]
fn l3_programs_track_bare_ipv4_like_the_ethernet_ones() {
    tracks_like_the_ethernet_programs(&conn4());
}

#[test]
fn l3_programs_track_bare_ipv6_like_the_ethernet_ones() {
    tracks_like_the_ethernet_programs(&conn6());
}

/// The Ethernet program on a bare IPv4 packet: what the agent attached on
/// an ipip device before it read link types. Its "ethertype" is the source
/// address's first two bytes, so the packet goes untracked.
#[test]
fn ethernet_program_does_not_track_a_bare_packet() {
    let c = conn4();
    let h = Harness::with_pod(&[pod_ip(&c)]);
    h.run_checked(programs::EGRESS, &c.peer_tcp(SYN, b"")[ETH_HLEN..]);
    assert!(h.flow(&c.tcp_key()).is_none());
    assert_eq!(h.stat(stats::UNPARSED), 1);
}
