//! Frames the programs must pass untouched and untracked: ARP, short and
//! truncated frames, non-first fragments, bad IP headers, unknown protocols,
//! and TCP flag combinations that create nothing.


use conndrain_common::{PodCounters, stats, tcp_state};
use etherparse::IpNumber;

use crate::{
    conn4, conn6,
    harness::{Harness, POD_SLOT, Side},
    packets::{self, ACK, ETH_HLEN, FIN, IPV4_HLEN, IPV6_HLEN, IpExt, PSH, RST, SYN},
    pod_ip,
};

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
