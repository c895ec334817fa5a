//! The table's rows: flows through the cluster IP and node ports, both
//! families, fragments, and the L3 rows.


use conndrain_common::{PROTO_TCP, PROTO_UDP, Pin, WireKey, pin_flags};

use super::{
    TC_ACT_REDIRECT,
    frames::{Flow, frame, frame_with_flags, reset_of},
    run::ones_sum,
};
use crate::{
    harness::TC_ACT_UNSPEC,
    packets::{ETH_HLEN, IPV4_HLEN, IPV6_HLEN, IpExt, SYN},
};

/// One row of the table.
pub struct Row {
    pub name: &'static str,
    pub pins: Vec<(WireKey, Pin)>,
    /// Frames run first, in the same program state (the earlier fragments
    /// of a datagram); their verdicts are not checked, their counts are.
    pub earlier: Vec<Vec<u8>>,
    pub input: Vec<u8>,
    pub verdict: u32,
    /// `None`: the input, byte for byte.
    pub output: Option<Vec<u8>>,
    pub steered: u64,
    pub steer_failed: u64,
    pub resets_sent: u64,
    pub pins_left: usize,
    /// Run with a `CHECKSUM_COMPLETE` skb and check `skb->csum` (where the kernel can).
    pub skb_csum: bool,
    /// Run `conndrain_in_l3` (the input has no Ethernet header).
    pub l3: bool,
}

impl Row {
    /// A packet of a pinned flow: rewritten and redirected.
    fn steered(name: &'static str, flow: &Flow, (input, output): (Vec<u8>, Vec<u8>)) -> Self {
        Self {
            name,
            pins: flow.pins(),
            earlier: Vec::new(),
            input,
            verdict: TC_ACT_REDIRECT,
            output: Some(output),
            steered: 1,
            steer_failed: 0,
            resets_sent: 0,
            pins_left: 2,
            skb_csum: true,
            l3: false,
        }
    }

    /// `steered`, on an L3 device: the input without its Ethernet header, the
    /// output with a zeroed one but for the ethertype.
    fn steered_l3(name: &'static str, flow: &Flow, (input, output): (Vec<u8>, Vec<u8>)) -> Self {
        Self { skb_csum: false, l3: true, ..Self::steered(name, flow, (bare(input), pushed(output))) }
    }

    /// `untouched`, on an L3 device.
    fn untouched_l3(name: &'static str, flow: &Flow, input: Vec<u8>) -> Self {
        Self { skb_csum: false, l3: true, ..Self::untouched(name, flow, bare(input)) }
    }

    /// A packet that must go on untouched, with the pins of `flow` in place.
    fn untouched(name: &'static str, flow: &Flow, input: Vec<u8>) -> Self {
        Self {
            name,
            pins: flow.pins(),
            earlier: Vec::new(),
            input,
            verdict: TC_ACT_UNSPEC,
            output: None,
            steered: 0,
            steer_failed: 0,
            resets_sent: 0,
            pins_left: 2,
            skb_csum: true,
            l3: false,
        }
    }
}

fn tcp4() -> Flow {
    Flow::new(PROTO_TCP, "10.0.0.2:40312", "10.96.0.10:80", "10.244.1.2:8080", None)
}
pub fn udp4() -> Flow {
    Flow::new(PROTO_UDP, "10.0.0.2:34051", "10.96.0.10:53", "10.244.1.2:5353", None)
}
/// A `NodePort` to a pod on another node: masqueraded to the inter-node address.
fn tcp4_nodeport() -> Flow {
    Flow::new(PROTO_TCP, "172.18.0.2:42302", "172.18.0.10:30080", "10.244.2.2:8080", Some("172.19.0.1:54505"))
}
fn udp4_nodeport() -> Flow {
    Flow::new(PROTO_UDP, "172.18.0.2:35222", "172.18.0.10:30053", "10.244.2.2:5353", Some("172.19.0.1:9766"))
}
fn tcp6() -> Flow {
    Flow::new(PROTO_TCP, "[fd00:18::2]:56188", "[fd00:96::10]:80", "[fd00:244:1::2]:8080", None)
}
fn udp6() -> Flow {
    Flow::new(PROTO_UDP, "[fd00:18::2]:34051", "[fd00:96::10]:53", "[fd00:244:1::2]:5353", None)
}
fn tcp6_nodeport() -> Flow {
    Flow::new(
        PROTO_TCP,
        "[fd00:18::2]:41070",
        "[fd00:18::10]:30080",
        "[fd00:244:2::2]:8080",
        Some("[fd00:19::1]:44527"),
    )
}
fn udp6_nodeport() -> Flow {
    Flow::new(PROTO_UDP, "[fd00:18::2]:35222", "[fd00:18::10]:30053", "[fd00:244:2::2]:5353", Some("[fd00:19::1]:9766"))
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n";
/// An odd length, so that the checksums' last byte is padded.
pub const ODD: &[u8] = b"hello";

pub fn rows() -> Vec<Row> {
    let mut rows = vec![
        Row::steered("v4 tcp: client to backend (DNAT)", &tcp4(), tcp4().forward(64, REQUEST)),
        Row::steered("v4 tcp: bare ACK to backend", &tcp4(), tcp4().forward(64, b"")),
        Row::steered("v4 tcp: reply (un-DNAT)", &tcp4(), tcp4().reply(64, ODD)),
        Row::steered("v4 tcp nodeport: to backend (DNAT+SNAT)", &tcp4_nodeport(), tcp4_nodeport().forward(64, REQUEST)),
        Row::steered("v4 tcp nodeport: reply (un-SNAT+un-DNAT)", &tcp4_nodeport(), tcp4_nodeport().reply(63, ODD)),
        Row::steered("v4 udp: to backend", &udp4(), udp4().forward(64, ODD)),
        Row::steered("v4 udp: reply", &udp4(), udp4().reply(64, REQUEST)),
        Row::steered("v4 udp nodeport: to backend", &udp4_nodeport(), udp4_nodeport().forward(64, ODD)),
        Row::steered("v4 udp nodeport: reply", &udp4_nodeport(), udp4_nodeport().reply(64, ODD)),
        Row::steered("v6 tcp: client to backend (DNAT)", &tcp6(), tcp6().forward(64, REQUEST)),
        Row::steered("v6 tcp: reply (un-DNAT)", &tcp6(), tcp6().reply(64, ODD)),
        Row::steered("v6 tcp nodeport: to backend (DNAT+SNAT)", &tcp6_nodeport(), tcp6_nodeport().forward(64, ODD)),
        Row::steered("v6 tcp nodeport: reply", &tcp6_nodeport(), tcp6_nodeport().reply(64, REQUEST)),
        Row::steered("v6 udp: to backend", &udp6(), udp6().forward(64, ODD)),
        Row::steered("v6 udp: reply", &udp6(), udp6().reply(64, REQUEST)),
        Row::steered("v6 udp nodeport: to backend", &udp6_nodeport(), udp6_nodeport().forward(64, REQUEST)),
        Row::steered("v6 udp nodeport: reply", &udp6_nodeport(), udp6_nodeport().reply(64, ODD)),
        Row::steered("v4 TTL 2: forwarded with TTL 1", &tcp4(), tcp4().forward(2, REQUEST)),
        Row::steered(
            "v4 tcp with IP options: to backend",
            &tcp4(),
            tcp4().forward_ext(IpExt { v4_options: true, ..IpExt::default() }, 64, REQUEST),
        ),
        Row::steered(
            "v6 tcp after hop-by-hop and destination options: to backend",
            &tcp6(),
            tcp6().forward_ext(IpExt { hop_by_hop: true, dest_opts: true, ..IpExt::default() }, 64, ODD),
        ),
        Row::steered("v6 hop limit 2: forwarded with 1", &udp6(), udp6().forward(2, ODD)),
        // Forwarding would drop these and answer ICMP time exceeded: the stack's job.
        Row::untouched("v4 TTL 1: left to the stack", &tcp4(), tcp4().forward(1, REQUEST).0),
        Row::untouched("v6 hop limit 1: left to the stack", &tcp6(), tcp6().forward(1, REQUEST).0),
        Row::untouched("v4 udp TTL 1 reply: left to the stack", &udp4(), udp4().reply(1, ODD).0),
        Row::untouched(
            "v4 tcp: another client port is not pinned",
            &tcp4(),
            frame(PROTO_TCP, "10.0.0.2:40313".parse().unwrap(), tcp4().frontend, 64, REQUEST),
        ),
        Row::untouched(
            "v6 udp: other frontend is not pinned",
            &udp6(),
            frame(PROTO_UDP, udp6().client, "[fd00:96::11]:53".parse().unwrap(), 64, ODD),
        ),
        Row {
            pins: Vec::new(),
            pins_left: 0,
            ..Row::untouched("v4 tcp: nothing pinned", &tcp4(), tcp4().forward(64, REQUEST).0)
        },
        // Cut inside the TCP header: the parser gives up, so does steering.
        Row::untouched("v4 tcp: truncated pinned frame", &tcp4(), {
            let mut f = tcp4().forward(64, REQUEST).0;
            f.truncate(ETH_HLEN + IPV4_HLEN + 10);
            f
        }),
        Row::untouched("v6 udp: truncated pinned frame", &udp6(), {
            let mut f = udp6().forward(64, ODD).0;
            f.truncate(ETH_HLEN + IPV6_HLEN + 6);
            f
        }),
        Row::untouched("v4 tcp: pinned tuple with IHL 4", &tcp4(), {
            let mut f = tcp4().forward(64, REQUEST).0;
            f[ETH_HLEN] = 0x44;
            f
        }),
    ];
    // A pure SYN on a pinned tuple is a new connection: both pins go, kube-proxy places it.
    let syn = frame_with_flags(PROTO_TCP, tcp4().client, tcp4().frontend, IpExt::default(), 64, SYN, b"");
    rows.push(Row { pins_left: 0, ..Row::untouched("v4 tcp: SYN on a pinned tuple unpins", &tcp4(), syn) });
    // The pinned pod is gone: the client's next segment comes back as a RST.
    for flow in [tcp4(), tcp6()] {
        let mut pins = flow.pins();
        pins[0].1.flags |= pin_flags::DEAD;
        let input = flow.forward(63, REQUEST).0;
        let output = reset_of(&input, flow.frontend, flow.client);
        let name =
            if flow.client.is_ipv4() { "v4 tcp: dead pin answers a RST" } else { "v6 tcp: dead pin answers a RST" };
        rows.push(Row {
            pins,
            output: Some(output),
            verdict: TC_ACT_REDIRECT,
            resets_sent: 1,
            // The RST is cut to size with bpf_skb_change_tail, whose trim
            // turns CHECKSUM_COMPLETE into CHECKSUM_NONE (`__skb_trim_rcsum`):
            // the receiver sums it itself and never reads `skb->csum`, which
            // the test run would still compare.
            skb_csum: false,
            ..Row::untouched(name, &flow, input)
        });
    }
    // UDP without a checksum (IPv4 allows it): must stay without one.
    let (mut input, mut output) = udp4().forward(64, ODD);
    input[ETH_HLEN + IPV4_HLEN + 6..][..2].fill(0);
    output[ETH_HLEN + IPV4_HLEN + 6..][..2].fill(0);
    rows.push(Row::steered("v4 udp without checksum stays without", &udp4(), (input.clone(), output.clone())));
    rows.push(Row::steered_l3("L3: v4 udp without checksum stays without", &udp4(), (input, output)));
    rows.extend(l3_rows());
    rows.extend(fragment_rows());
    rows
}

/// A UDP payload that takes three fragments of `FRAG_AT` bytes of IP payload.
const BIG: &[u8] = &[0x5a; 1200];
/// Fragment size (IP payload bytes; a multiple of 8).
const FRAG_AT: usize = 512;
const FRAG_ID: u32 = 0x4d2;

/// `frame` (a whole TCP/UDP datagram, no IP options or extension headers)
/// cut into fragments of `FRAG_AT` bytes of IP payload with IP id `id`, as
/// a sender fragments it: IPv4 with MF and the offset set and the header
/// checksum recomputed (DF cleared); IPv6 with a fragment header.
fn fragments(frame: &[u8], id: u32) -> Vec<Vec<u8>> {
    let v4 = frame[ETH_HLEN] >> 4 == 4;
    let hlen = if v4 { IPV4_HLEN } else { IPV6_HLEN };
    let (head, payload) = frame.split_at(ETH_HLEN + hlen);
    let chunks: Vec<&[u8]> = payload.chunks(FRAG_AT).collect();
    let last = chunks.len() - 1;
    chunks
        .iter()
        .enumerate()
        .map(|(i, chunk)| {
            let offset = u16::try_from(i * FRAG_AT / 8).unwrap();
            let more = i < last;
            let mut f = head.to_vec();
            if v4 {
                let ip = &mut f[ETH_HLEN..];
                ip[2..4].copy_from_slice(&u16::try_from(IPV4_HLEN + chunk.len()).unwrap().to_be_bytes());
                ip[4..6].copy_from_slice(&u16::try_from(id).unwrap().to_be_bytes());
                ip[6..8].copy_from_slice(&(offset | if more { 0x2000 } else { 0 }).to_be_bytes());
                ip[10..12].fill(0);
                let sum = !u16::try_from(ones_sum(&ip[..IPV4_HLEN])).unwrap();
                ip[10..12].copy_from_slice(&sum.to_be_bytes());
            } else {
                let ip = &mut f[ETH_HLEN..];
                let proto = ip[6];
                ip[4..6].copy_from_slice(&u16::try_from(8 + chunk.len()).unwrap().to_be_bytes());
                ip[6] = 44;
                f.extend_from_slice(&[proto, 0]);
                f.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                f.extend_from_slice(&id.to_be_bytes());
            }
            f.extend_from_slice(chunk);
            f
        })
        .collect()
}

/// Whether `frame` is an IP fragment (IPv4 MF or offset; an IPv6 fragment header first).
pub fn is_fragment(frame: &[u8]) -> bool {
    let ip = &frame[ETH_HLEN..];
    if ip[0] >> 4 == 4 { u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 } else { ip[6] == 44 }
}

/// Fragmented datagrams of pinned flows: every fragment is rewritten and
/// redirected as the first was, or none is.
fn fragment_rows() -> Vec<Row> {
    let mut rows = Vec::new();
    for (what, flow, (input, output)) in [
        ("v4 udp", udp4(), udp4().forward(64, BIG)),
        ("v4 udp reply", udp4(), udp4().reply(64, BIG)),
        ("v4 udp nodeport (DNAT+SNAT)", udp4_nodeport(), udp4_nodeport().forward(64, BIG)),
        ("v6 udp", udp6(), udp6().forward(64, BIG)),
        ("v6 udp nodeport reply", udp6_nodeport(), udp6_nodeport().reply(64, BIG)),
    ] {
        let ins = fragments(&input, FRAG_ID);
        let outs = fragments(&output, FRAG_ID);
        assert_eq!(ins.len(), 3);
        let name = |s: &str| -> &'static str { format!("{what}: {s}").leak() };
        rows.push(Row::steered(name("first fragment, rewritten"), &flow, (ins[0].clone(), outs[0].clone())));
        rows.push(Row {
            earlier: vec![ins[0].clone()],
            steered: 2,
            ..Row::steered(name("second fragment follows its first"), &flow, (ins[1].clone(), outs[1].clone()))
        });
        rows.push(Row {
            earlier: vec![ins[0].clone(), ins[1].clone()],
            steered: 3,
            ..Row::steered(name("last fragment follows its first"), &flow, (ins[2].clone(), outs[2].clone()))
        });
        // Its first fragment not seen (it was not steered, or comes later): to the stack.
        rows.push(Row::untouched(name("later fragment without its first"), &flow, ins[1].clone()));
        // Another datagram of the same flow: another IP id.
        rows.push(Row {
            earlier: vec![ins[0].clone()],
            steered: 1,
            ..Row::untouched(
                name("later fragment of another datagram (IP id)"),
                &flow,
                fragments(&input, FRAG_ID + 1)[1].clone(),
            )
        });
    }
    // A datagram of a flow that is not pinned (another client port), with the
    // pins of `udp4` in place: neither its first fragment nor a later one is touched.
    let other = frame(PROTO_UDP, "10.0.0.2:34052".parse().unwrap(), udp4().frontend, 64, BIG);
    let other = fragments(&other, FRAG_ID);
    rows.push(Row::untouched("v4 udp not pinned: first fragment", &udp4(), other[0].clone()));
    rows.push(Row {
        earlier: vec![other[0].clone()],
        ..Row::untouched("v4 udp not pinned: later fragment after its first", &udp4(), other[1].clone())
    });
    // A first fragment left to the stack (TTL 1) takes its later fragments along.
    let ttl1 = fragments(&udp4().forward(1, BIG).0, FRAG_ID);
    let pinned = fragments(&udp4().forward(64, BIG).0, FRAG_ID);
    rows.push(Row {
        earlier: vec![ttl1[0].clone()],
        ..Row::untouched("v4 udp: later fragment of a first one left to the stack (TTL 1)", &udp4(), pinned[1].clone())
    });
    // The pinned flow's datagram was steered, then a datagram of an unpinned
    // flow between the same addresses reused its IP id: the unpinned first
    // fragment drops the entry, so its later fragment is not misdirected.
    rows.push(Row {
        earlier: vec![pinned[0].clone(), other[0].clone()],
        steered: 1,
        ..Row::untouched("v4 udp: IP id reused by an unpinned datagram", &udp4(), other[1].clone())
    });
    rows
}

/// Rows of `conndrain_in_l3`: the packets of an ipip or `WireGuard` device.
fn l3_rows() -> Vec<Row> {
    let mut rows = vec![
        Row::steered_l3("L3: v4 tcp: client to backend (DNAT)", &tcp4(), tcp4().forward(64, REQUEST)),
        Row::steered_l3("L3: v4 tcp nodeport: to backend", &tcp4_nodeport(), tcp4_nodeport().forward(64, REQUEST)),
        // The reply of a pod on another node, arriving over the tunnel.
        Row::steered_l3("L3: v4 tcp nodeport: reply", &tcp4_nodeport(), tcp4_nodeport().reply(63, ODD)),
        Row::steered_l3("L3: v4 udp nodeport: reply", &udp4_nodeport(), udp4_nodeport().reply(64, ODD)),
        Row::steered_l3(
            "L3: v4 tcp with IP options: to backend",
            &tcp4(),
            tcp4().forward_ext(IpExt { v4_options: true, ..IpExt::default() }, 64, REQUEST),
        ),
        Row::steered_l3("L3: v6 tcp nodeport: reply", &tcp6_nodeport(), tcp6_nodeport().reply(64, REQUEST)),
        Row::steered_l3("L3: v6 udp nodeport: to backend", &udp6_nodeport(), udp6_nodeport().forward(64, ODD)),
        Row::steered_l3(
            "L3: v6 tcp after hop-by-hop and destination options: to backend",
            &tcp6(),
            tcp6().forward_ext(IpExt { hop_by_hop: true, dest_opts: true, ..IpExt::default() }, 64, ODD),
        ),
        Row::untouched_l3("L3: v4 TTL 1: left to the stack", &tcp4(), tcp4().forward(1, REQUEST).0),
        Row::untouched_l3(
            "L3: v4 tcp: another client port is not pinned",
            &tcp4(),
            frame(PROTO_TCP, "10.0.0.2:40313".parse().unwrap(), tcp4().frontend, 64, REQUEST),
        ),
        Row {
            pins: Vec::new(),
            pins_left: 0,
            ..Row::untouched_l3("L3: v6 nothing pinned", &tcp6(), tcp6().forward(64, ODD).0)
        },
        Row::untouched_l3("L3: v4 tcp: truncated pinned packet", &tcp4(), {
            let mut f = tcp4().forward(64, REQUEST).0;
            f.truncate(ETH_HLEN + IPV4_HLEN + 10);
            f
        }),
    ];
    // A dead pin answers no RST on an L3 device (there are no MACs to swap):
    // the segment goes on to the stack untouched.
    let mut dead = Row::untouched_l3(
        "L3: v4 tcp: dead pin leaves the segment to the stack",
        &tcp4(),
        tcp4().forward(63, REQUEST).0,
    );
    dead.pins[0].1.flags |= pin_flags::DEAD;
    rows.push(dead);
    let syn = frame_with_flags(PROTO_TCP, tcp4().client, tcp4().frontend, IpExt::default(), 64, SYN, b"");
    rows.push(Row { pins_left: 0, ..Row::untouched_l3("L3: v4 tcp: SYN on a pinned tuple unpins", &tcp4(), syn) });
    rows
}

/// The IP packet of an Ethernet frame: what an L3 device carries.
fn bare(mut frame: Vec<u8>) -> Vec<u8> {
    frame.drain(..ETH_HLEN);
    frame
}

/// `frame` with zeroed MACs: what `conndrain_in_l3` puts in front of a packet it steers.
fn pushed(mut frame: Vec<u8>) -> Vec<u8> {
    frame[..12].fill(0);
    frame
}
