//! The corpus, IPv6: extension header chains and lengths, and the
//! payload-length field.


use conndrain_common::{PROTO_TCP, PROTO_UDP, tcp_state};

use super::{
    DEST, HOP, MAX_EXT_HEADERS, ROUTING, TCP_HLEN,
    frames::{Ext, L3, ip_frame, udp_datagram},
    lab::Lab,
};
use crate::{
    harness::{POD_SLOT, Side},
    packets::{self, ACK, ETH_HLEN, FIN, IPV6_HLEN, RST, SYN},
};

/// Every chain of hop-by-hop, routing, destination-options and fragment
/// headers up to 4 long, and longer ones (5 to 8) of each kind and in cycles.
/// Up to `MAX_EXT_HEADERS` the transport is found; a longer chain passes
/// untracked.
#[test]
fn ipv6_extension_header_chains() {
    let kinds = [
        Ext::Hop(0),
        Ext::Routing(0),
        Ext::Dest(0),
        Ext::Frag(0, true),
    ];
    let mut chains: Vec<Vec<Ext>> = vec![vec![]];
    let mut frontier: Vec<Vec<Ext>> = vec![vec![]];
    for _ in 0..4 {
        frontier = frontier
            .iter()
            .flat_map(|c| {
                kinds.iter().map(move |k| {
                    let mut c = c.clone();
                    c.push(*k);
                    c
                })
            })
            .collect();
        chains.extend(frontier.iter().cloned());
    }
    for n in 5..=8 {
        for (i, k) in kinds.iter().enumerate() {
            chains.push(vec![*k; n]);
            chains.push((0..n).map(|j| kinds[(i + j) % kinds.len()]).collect());
        }
        // Longer headers too: 16, 24 and 256 bytes (BPF_PROG_TEST_RUN takes
        // no frame much over 3 KiB).
        chains.push(
            (0..n)
                .map(|j| match j % 3 {
                    _ if j == 0 => Ext::Hop(1),
                    0 => Ext::Dest(2),
                    1 => Ext::Routing(31),
                    _ => Ext::Frag(0, false),
                })
                .collect(),
        );
    }
    assert_eq!(
        chains.iter().filter(|c| c.len() <= 4).count(),
        1 + 4 + 16 + 64 + 256
    );

    let mut lab = Lab::new();
    let mut tracked = 0;
    for chain in &chains {
        lab.keep_small();
        let l3 = L3::v6_exts(chain);
        let what = format!("chain {chain:?}");
        let inbound = lab.server_flow(true);
        let syn = inbound.tcp_with(Side::ToPod, SYN, &l3, &[], b"");
        let udp = {
            let (src, dst) = inbound.ends(Side::FromPod);
            ip_frame(
                src.ip(),
                dst.ip(),
                &l3,
                PROTO_UDP,
                &udp_datagram(src, dst, b"u"),
            )
        };
        let mut expect_chain: Vec<u8> = chain.iter().map(|e| e.number()).collect();
        expect_chain.push(PROTO_TCP);
        // Hop-by-hop only first (RFC 8200 4.1), which the parser does not check.
        let well_formed = chain.iter().skip(1).all(|e| !matches!(e, Ext::Hop(_)));
        if well_formed
            && chain
                .iter()
                .all(|e| matches!(e, Ext::Hop(_) | Ext::Dest(_)))
        {
            // etherparse agrees on the chain (it does not walk routing headers).
            assert_eq!(packets::v6_next_headers(&syn), expect_chain, "{what}");
        }
        if chain.len() > MAX_EXT_HEADERS {
            lab.expect_unparsed(Side::ToPod, &syn, &what);
            lab.expect_unparsed(Side::FromPod, &udp, &what);
        } else if well_formed {
            lab.expect_new(
                Side::ToPod,
                &syn,
                &inbound.tcp_key(),
                tcp_state::SYN_SENT,
                &what,
            );
            lab.expect_new(
                Side::FromPod,
                &udp,
                &inbound.key(PROTO_UDP),
                tcp_state::ESTABLISHED,
                &what,
            );
            tracked += 2;
        } else {
            lab.run(Side::ToPod, &syn);
            lab.run(Side::FromPod, &udp);
        }
    }
    eprintln!(
        "ipv6 chains: {} chains, {tracked} packets tracked; {}",
        chains.len(),
        lab.summary()
    );
}

/// The boundary on its own: 6 extension headers are walked, 7 are not,
/// whatever the kinds, both directions, on an established flow too.
#[test]
fn ipv6_seven_extension_headers_pass_untracked() {
    let mut lab = Lab::new();
    let est = lab.server_flow(true);
    lab.established(&est, true);
    for kind in [
        Ext::Hop(0),
        Ext::Routing(0),
        Ext::Dest(0),
        Ext::Frag(0, false),
    ] {
        let six = L3::v6_exts(&[kind; 6]);
        let seven = L3::v6_exts(&[kind; 7]);
        let what = format!("{kind:?}");
        for side in [Side::ToPod, Side::FromPod] {
            // RST and FIN on the established flow: a parser that found the TCP
            // header behind 7 extension headers would close it.
            lab.expect_unparsed(side, &est.tcp_with(side, RST, &seven, &[], b""), &what);
            lab.expect_unparsed(
                side,
                &est.tcp_with(side, FIN | ACK, &seven, &[], b""),
                &what,
            );
            let f = lab.server_flow(true);
            lab.expect_unparsed(side, &f.tcp_with(side, SYN, &seven, &[], b""), &what);
            lab.expect_new(
                side,
                &f.tcp_with(side, SYN, &six, &[], b""),
                &f.tcp_key(),
                tcp_state::SYN_SENT,
                &what,
            );
        }
        assert_eq!(lab.flows[&est.tcp_key()].state, tcp_state::ESTABLISHED);
    }
    assert_eq!(lab.h.counters(POD_SLOT).active_inbound, 1);
}

/// Extension headers whose length runs past the end of the frame, or that
/// end exactly where the frame does, or are cut themselves.
#[test]
fn ipv6_extension_header_length_past_the_end() {
    let mut lab = Lab::new();
    let est = lab.server_flow(true);
    lab.established(&est, true);
    let before = lab.flows[&est.tcp_key()];
    let mut n = 0;
    for kind in [HOP, ROUTING, DEST] {
        for len in [1u8, 2, 10, 255] {
            for prefix in [vec![], vec![Ext::Hop(0), Ext::Dest(0)]] {
                let what = format!("{prefix:?} then header {kind} of length field {len}");
                for side in [Side::ToPod, Side::FromPod] {
                    for flags in [SYN, RST, FIN | ACK] {
                        // A real 8-byte header followed by TCP, whose length
                        // field says it is longer: it covers the TCP header
                        // and runs past the end.
                        let short = match kind {
                            HOP => Ext::Hop(0),
                            ROUTING => Ext::Routing(0),
                            _ => Ext::Dest(0),
                        };
                        let mut chain = prefix.clone();
                        chain.push(short);
                        let mut frame = est.tcp_with(side, flags, &L3::v6_exts(&chain), &[], b"");
                        let at = ETH_HLEN + IPV6_HLEN + 8 * prefix.len();
                        assert_eq!(frame[at], PROTO_TCP);
                        frame[at + 1] = len;
                        lab.expect_unparsed(side, &frame, &what);
                        // The same header really that long, then the frame
                        // ends: no room for the TCP header at all, or only
                        // part of it.
                        let long = match kind {
                            HOP => Ext::Hop(len),
                            ROUTING => Ext::Routing(len),
                            _ => Ext::Dest(len),
                        };
                        let mut chain = prefix.clone();
                        chain.push(long);
                        let whole = est.tcp_with(side, flags, &L3::v6_exts(&chain), &[], b"");
                        let l4 = whole.len() - TCP_HLEN;
                        for cut in [l4, l4 + 1, l4 + 13] {
                            lab.expect_unparsed(side, &whole[..cut], &what);
                        }
                        // The extension header itself cut after 1 byte.
                        lab.expect_unparsed(side, &whole[..=at], &what);
                        n += 5;
                    }
                }
            }
        }
    }
    // A fragment header cut short.
    for cut in 1..8 {
        let frame = est.tcp_with(
            Side::ToPod,
            RST,
            &L3::v6_exts(&[Ext::Frag(0, false)]),
            &[],
            b"",
        );
        lab.expect_unparsed(
            Side::ToPod,
            &frame[..ETH_HLEN + IPV6_HLEN + cut],
            "fragment header cut",
        );
        n += 1;
    }
    // None of it touched the established flow.
    let v = lab.flows[&est.tcp_key()];
    assert_eq!(
        (v.state, v.bytes_in, v.bytes_out),
        (tcp_state::ESTABLISHED, before.bytes_in, before.bytes_out)
    );
    assert_eq!(lab.flows.len(), 1);
    eprintln!("ipv6 extension lengths: {n} frames, {}", lab.summary());
}

/// The IPv6 payload-length field smaller and larger than the real payload.
#[test]
fn ipv6_payload_length_smaller_or_larger_than_the_packet() {
    let mut lab = Lab::new();
    for payload_len in [0u16, 1, 7, 8, 13, 14, 19, 20, 21, 100, 1500, 65535] {
        for exts in [vec![], vec![Ext::Dest(0)]] {
            let l3 = L3::v6_exts(&exts);
            let f = lab.server_flow(true);
            let mut syn = f.tcp_with(Side::ToPod, SYN, &l3, &[], b"");
            syn[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&payload_len.to_be_bytes());
            lab.run(Side::ToPod, &syn);
            let est = lab.client_flow(true);
            lab.established(&est, false);
            let mut rst = est.tcp_with(Side::ToPod, RST, &l3, &[], b"");
            rst[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&payload_len.to_be_bytes());
            lab.run(Side::ToPod, &rst);
        }
    }
    eprintln!("ipv6 payload length: {}", lab.summary());
}
