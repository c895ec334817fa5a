//! IP headers the programs walk to reach TCP: IPv6 extension headers
//! (hop-by-hop, destination options, fragments) and IPv4 options.


use conndrain_common::stats;

use crate::{
    check_inbound_handshake_and_data, conn4, conn6,
    harness::Harness,
    packets::{self, ACK, ETH_HLEN, IpExt, SYN},
    pod_ip,
};

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
