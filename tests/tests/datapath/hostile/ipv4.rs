//! The corpus, IPv4: options, the total-length field and the IHL.


use conndrain_common::tcp_state;

use super::{
    frames::{L3, fix_ipv4_checksum, set_ipv4_total_len},
    lab::Lab,
};
use crate::{
    harness::Side,
    packets::{self, ACK, ETH_HLEN, FIN, IPV4_HLEN, PSH, RST, SYN},
};

/// IPv4 options of every length of 0 to 40 bytes, well-formed and with bad
/// option lengths. The parser skips IHL words whatever the options say.
#[test]
fn ipv4_options_of_every_length() {
    let mut lab = Lab::new();
    let data_flow = lab.server_flow(false);
    lab.established(&data_flow, true);
    let mut option_sets: Vec<(String, Vec<u8>, bool)> = Vec::new();
    for n in 0..=40usize {
        let area = n.div_ceil(4) * 4;
        let mut nops = vec![1u8; n];
        nops.resize(area, 0); // EOL padding
        option_sets.push((format!("{n} NOPs"), nops, true));
        if n >= 3 {
            // One record-route option of length n: type, length, pointer, slots.
            let mut rr = vec![0u8; area];
            rr[..3].copy_from_slice(&[7, u8::try_from(n).unwrap(), 4]);
            option_sets.push((format!("record route of {n} bytes"), rr, true));
        }
        if n >= 2 {
            for bad in [0u8, 1, 2, u8::try_from(n + 1).unwrap(), 41, 255] {
                // A timestamp option whose length is wrong for the area.
                let mut o = vec![1u8; area];
                o[area - n] = 0x44;
                o[area - n + 1] = bad;
                option_sets.push((format!("{n} bytes, option length {bad}"), o, false));
            }
        }
    }
    assert!(option_sets.iter().any(|o| o.1.len() == 40));
    for (what, opts, well_formed) in &option_sets {
        if lab.keep_small() {
            lab.established(&data_flow, true);
        }
        let l3 = L3::v4_options(opts);
        // A SYN from a peer, a SYN from the pod, data both ways on a flow.
        let inbound = lab.server_flow(false);
        let syn = inbound.tcp_with(Side::ToPod, SYN, &l3, &[], b"");
        packets::assert_ipv4_checksum_ok(&syn);
        assert_eq!(
            usize::from(syn[ETH_HLEN] & 0x0f) * 4,
            IPV4_HLEN + opts.len()
        );
        let outbound = lab.client_flow(false);
        let out_syn = outbound.tcp_with(Side::FromPod, SYN, &l3, &[], b"");
        if *well_formed {
            lab.expect_new(
                Side::ToPod,
                &syn,
                &inbound.tcp_key(),
                tcp_state::SYN_SENT,
                what,
            );
            lab.expect_new(
                Side::FromPod,
                &out_syn,
                &outbound.tcp_key(),
                tcp_state::SYN_SENT,
                what,
            );
        } else {
            lab.run(Side::ToPod, &syn);
            lab.run(Side::FromPod, &out_syn);
        }
        for side in [Side::ToPod, Side::FromPod] {
            lab.run(
                side,
                &data_flow.tcp_with(side, PSH | ACK, &l3, &[], b"data"),
            );
            assert_eq!(
                lab.flows[&data_flow.tcp_key()].state,
                tcp_state::ESTABLISHED,
                "{what}"
            );
        }
    }
    eprintln!(
        "ipv4 options: {} option sets, {}",
        option_sets.len(),
        lab.summary()
    );
}

/// The IPv4 total-length field smaller and larger than the real packet.
#[test]
fn ipv4_total_length_smaller_or_larger_than_the_packet() {
    let mut lab = Lab::new();
    let totals = [
        0u16, 1, 19, 20, 21, 27, 28, 33, 34, 35, 39, 40, 41, 46, 60, 576, 1500, 65535,
    ];
    for total in totals {
        let what = format!("total length {total}");
        for pad in [0usize, 6, 200] {
            lab.keep_small();
            // Ethernet padding or trailing junk after the real datagram.
            let tweak = |mut frame: Vec<u8>| {
                frame.resize(frame.len() + pad, 0);
                set_ipv4_total_len(&mut frame, total);
                frame
            };
            let f = lab.server_flow(false);
            let syn = tweak(f.tcp(Side::ToPod, SYN));
            let u = lab.server_flow(false);
            let udp = tweak(u.udp(Side::ToPod, b"q"));
            // A RST and a FIN on established flows, both ways.
            let est_in = lab.server_flow(false);
            let est_out = lab.client_flow(false);
            let rst = tweak(est_in.tcp(Side::ToPod, RST | ACK));
            let fin = tweak(est_out.tcp(Side::FromPod, FIN | ACK));
            if total < 20 {
                // Shorter than the IPv4 header itself.
                lab.expect_unparsed(Side::ToPod, &syn, &what);
                lab.expect_unparsed(Side::ToPod, &udp, &what);
            } else {
                lab.run(Side::ToPod, &syn);
                lab.run(Side::ToPod, &udp);
            }
            lab.established(&est_in, true);
            lab.established(&est_out, false);
            lab.run(Side::ToPod, &rst);
            lab.run(Side::FromPod, &fin);
        }
    }
    eprintln!("ipv4 total length: {}", lab.summary());
}

/// IHL of 6 to 15 words on frames that are not that long, and IHL pointing
/// exactly at the end of the frame.
#[test]
fn ipv4_ihl_larger_than_the_packet() {
    let mut lab = Lab::new();
    for ihl in 5u8..=15 {
        let hlen = usize::from(ihl) * 4;
        for total in [None, Some(65535u16)] {
            for payload in [0usize, 4, 40] {
                let what = format!("IHL {ihl}, total length {total:?}, payload {payload}");
                let f = lab.server_flow(false);
                let mut syn = f.tcp_with(Side::ToPod, SYN, &L3::default(), &[], &vec![0; payload]);
                syn[ETH_HLEN] = 0x40 | ihl;
                if let Some(t) = total {
                    syn[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&t.to_be_bytes());
                }
                fix_ipv4_checksum(&mut syn);
                let ip_total =
                    usize::from(u16::from_be_bytes([syn[ETH_HLEN + 2], syn[ETH_HLEN + 3]]));
                if ETH_HLEN + hlen + 14 > syn.len() || ip_total < hlen {
                    // The "TCP header" after the claimed IP header is not all there.
                    lab.expect_refused_or_unparsed(Side::ToPod, &syn, &what);
                    lab.expect_refused_or_unparsed(Side::FromPod, &syn, &what);
                } else {
                    lab.run(Side::ToPod, &syn);
                    lab.run(Side::FromPod, &syn);
                }
                // The IP header alone, IHL words long, nothing after it.
                let mut bare = syn[..(ETH_HLEN + hlen).min(syn.len())].to_vec();
                bare.resize(ETH_HLEN + hlen, 1);
                set_ipv4_total_len(&mut bare, u16::try_from(hlen).unwrap());
                lab.expect_refused_or_unparsed(Side::ToPod, &bare, &what);
            }
        }
    }
    eprintln!("ipv4 IHL: {}", lab.summary());
}
