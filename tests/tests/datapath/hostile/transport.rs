//! The corpus, TCP and UDP: data offsets, every flag combination on unknown
//! and established flows, and UDP length fields.


use conndrain_common::{FlowKey, PROTO_UDP, direction, event_kind, flow_flags, tcp_state};

use super::{CWR, ECE, UDP_HLEN, frames::L3, lab::Lab};
use crate::{
    harness::Side,
    packets::{ACK, ETH_HLEN, FIN, IPV4_HLEN, IPV6_HLEN, PSH, RST, SYN},
};

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
