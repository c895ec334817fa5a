//! Raw frame builders.
//!
//! Frames are built byte by byte here (not with etherparse) so that any field
//! can be wrong; `raw_builders_match_the_etherparse_ones` checks the builders
//! against `packets`.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use conndrain_common::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP};

use super::{DEST, FRAGMENT, HOP, MACS, ROUTING, TCP_HLEN, UDP_HLEN};
use crate::{
    harness::{Side, mapped},
    packets::{self, ACK, Conn, ETH_HLEN, FIN, IPV4_HLEN, IPV6_HLEN, IpExt, PSH, RST, SYN},
};

/// The Internet checksum of the concatenation of `parts`.
fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes = parts.concat();
    let mut sum: u64 = bytes
        .chunks(2)
        .map(|w| u64::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap()
}

fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => [
            &s.octets()[..],
            &d.octets(),
            &[0, proto],
            &u16::try_from(len).unwrap().to_be_bytes(),
        ]
        .concat(),
        (IpAddr::V6(s), IpAddr::V6(d)) => [
            &s.octets()[..],
            &d.octets(),
            &u32::try_from(len).unwrap().to_be_bytes(),
            &[0, 0, 0, proto],
        ]
        .concat(),
        _ => panic!("mixed address families {src} -> {dst}"),
    }
}

/// A TCP segment as `packets::tcp` writes it (seq 1000, ack 2000 when ACK is
/// set, window 64240), with any flags byte and `options` (data offset 5 plus
/// their 32-bit words), checksummed.
pub fn tcp_segment(
    src: SocketAddr,
    dst: SocketAddr,
    flags: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert!(
        options.len().is_multiple_of(4) && options.len() <= 40,
        "TCP options"
    );
    let doff = u8::try_from(5 + options.len() / 4).unwrap();
    let ack: u32 = if flags & ACK != 0 { 2000 } else { 0 };
    let mut seg = Vec::with_capacity(TCP_HLEN + options.len() + payload.len());
    seg.extend_from_slice(&src.port().to_be_bytes());
    seg.extend_from_slice(&dst.port().to_be_bytes());
    seg.extend_from_slice(&1000u32.to_be_bytes());
    seg.extend_from_slice(&ack.to_be_bytes());
    seg.extend_from_slice(&[doff << 4, flags]);
    seg.extend_from_slice(&64240u16.to_be_bytes());
    seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    seg.extend_from_slice(options);
    seg.extend_from_slice(payload);
    let sum = checksum(&[
        &pseudo_header(src.ip(), dst.ip(), PROTO_TCP, seg.len()),
        &seg,
    ]);
    seg[16..18].copy_from_slice(&sum.to_be_bytes());
    seg
}

pub fn udp_datagram(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let len = UDP_HLEN + payload.len();
    let mut d = Vec::with_capacity(len);
    d.extend_from_slice(&src.port().to_be_bytes());
    d.extend_from_slice(&dst.port().to_be_bytes());
    d.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    let sum = match checksum(&[&pseudo_header(src.ip(), dst.ip(), PROTO_UDP, len), &d]) {
        0 => 0xffff,
        s => s,
    };
    d[6..8].copy_from_slice(&sum.to_be_bytes());
    d
}

/// An IPv6 extension header. Lengths are the header's own length field (in
/// 8-byte units beyond the first 8); options are Pad1, routing headers are of
/// the experimental type 253 with no segments left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext {
    Hop(u8),
    Routing(u8),
    Dest(u8),
    /// Offset in 8-byte units, more-fragments.
    Frag(u16, bool),
}

impl Ext {
    pub fn number(self) -> u8 {
        match self {
            Ext::Hop(_) => HOP,
            Ext::Routing(_) => ROUTING,
            Ext::Dest(_) => DEST,
            Ext::Frag(..) => FRAGMENT,
        }
    }

    fn bytes(self, next: u8) -> Vec<u8> {
        match self {
            Ext::Hop(len) | Ext::Dest(len) => {
                let mut b = vec![0; (usize::from(len) + 1) * 8];
                b[0] = next;
                b[1] = len;
                b
            }
            Ext::Routing(len) => {
                let mut b = vec![0; (usize::from(len) + 1) * 8];
                b[0] = next;
                b[1] = len;
                b[2] = 253;
                b
            }
            Ext::Frag(offset, more) => {
                let word = (offset << 3) | u16::from(more);
                let w = word.to_be_bytes();
                vec![next, 0, w[0], w[1], 0, 0, 0x12, 0x34]
            }
        }
    }
}

/// What sits between the IP header and the transport: IPv4 options or IPv6
/// extension headers (whichever fits the family).
#[derive(Clone, Debug, Default)]
pub struct L3 {
    v4_options: Vec<u8>,
    v6_exts: Vec<Ext>,
}

impl L3 {
    pub fn v4_options(options: &[u8]) -> Self {
        Self {
            v4_options: options.to_vec(),
            ..Self::default()
        }
    }

    pub fn v6_exts(exts: &[Ext]) -> Self {
        Self {
            v6_exts: exts.to_vec(),
            ..Self::default()
        }
    }
}

/// A whole Ethernet frame around `l4`, with right lengths and checksums.
pub fn ip_frame(src: IpAddr, dst: IpAddr, l3: &L3, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = MACS.to_vec();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let opts = &l3.v4_options;
            assert!(
                opts.len().is_multiple_of(4) && opts.len() <= 40,
                "IPv4 options"
            );
            let ihl = u8::try_from(5 + opts.len() / 4).unwrap();
            let total = u16::try_from(usize::from(ihl) * 4 + l4.len()).unwrap();
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            f.extend_from_slice(&[0x40 | ihl, 0]);
            f.extend_from_slice(&total.to_be_bytes());
            f.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]); // id 0, DF
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
            f.extend_from_slice(opts);
            fix_ipv4_checksum(&mut f);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let numbers: Vec<u8> = l3.v6_exts.iter().map(|e| e.number()).collect();
            let mut exts = Vec::new();
            for (i, e) in l3.v6_exts.iter().enumerate() {
                exts.extend(e.bytes(numbers.get(i + 1).copied().unwrap_or(proto)));
            }
            let first = numbers.first().copied().unwrap_or(proto);
            let payload = u16::try_from(exts.len() + l4.len()).unwrap();
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&payload.to_be_bytes());
            f.extend_from_slice(&[first, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
            f.extend(exts);
        }
        _ => panic!("mixed address families {src} -> {dst}"),
    }
    f.extend_from_slice(l4);
    f
}

/// Recomputes the IPv4 header checksum of `frame` over its IHL (or what
/// there is of it), so that only the fields a test broke are wrong.
pub fn fix_ipv4_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    let end = (ETH_HLEN + ihl.max(IPV4_HLEN)).min(frame.len());
    frame[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
    let sum = checksum(&[&frame[ETH_HLEN..end]]);
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&sum.to_be_bytes());
}

/// Sets the IPv4 total-length field (and the checksum).
pub fn set_ipv4_total_len(frame: &mut [u8], total: u16) {
    frame[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&total.to_be_bytes());
    fix_ipv4_checksum(frame);
}

/// One flow between a pod and a peer, to build its packets either way.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub pod: SocketAddr,
    pub peer: SocketAddr,
}

impl Flow {
    pub fn key(&self, proto: u8) -> FlowKey {
        FlowKey {
            pod_addr: mapped(self.pod.ip()),
            peer_addr: mapped(self.peer.ip()),
            pod_port: self.pod.port(),
            peer_port: self.peer.port(),
            proto,
            family: if self.pod.is_ipv4() {
                FAMILY_V4
            } else {
                FAMILY_V6
            },
            _pad: [0; 2],
        }
    }

    pub fn tcp_key(&self) -> FlowKey {
        self.key(PROTO_TCP)
    }

    /// (source, destination) of a packet going through `side`.
    pub fn ends(&self, side: Side) -> (SocketAddr, SocketAddr) {
        match side {
            Side::FromPod => (self.pod, self.peer),
            Side::ToPod => (self.peer, self.pod),
        }
    }

    pub fn tcp(&self, side: Side, flags: u8) -> Vec<u8> {
        self.tcp_with(side, flags, &L3::default(), &[], b"")
    }

    pub fn tcp_with(&self, side: Side, flags: u8, l3: &L3, options: &[u8], payload: &[u8]) -> Vec<u8> {
        let (src, dst) = self.ends(side);
        let seg = tcp_segment(src, dst, flags, options, payload);
        ip_frame(src.ip(), dst.ip(), l3, PROTO_TCP, &seg)
    }

    pub fn udp(&self, side: Side, payload: &[u8]) -> Vec<u8> {
        let (src, dst) = self.ends(side);
        let d = udp_datagram(src, dst, payload);
        ip_frame(src.ip(), dst.ip(), &L3::default(), PROTO_UDP, &d)
    }
}

pub fn hex(frame: &[u8]) -> String {
    frame.iter().fold(String::new(), |mut s, b| {
        write!(s, "{b:02x}").unwrap();
        s
    })
}

#[test]
fn raw_builders_match_the_etherparse_ones() {
    let c4 = Conn::new("10.0.1.2:8080", "10.0.0.2:40312");
    let c6 = Conn::new("[fd00::1:2]:8080", "[fd00::2]:40312");
    let f4 = Flow {
        pod: c4.pod,
        peer: c4.peer,
    };
    let f6 = Flow {
        pod: c6.pod,
        peer: c6.peer,
    };
    for flags in [
        SYN,
        SYN | ACK,
        ACK,
        PSH | ACK,
        FIN | ACK,
        RST,
        FIN | SYN | RST | PSH | ACK,
    ] {
        assert_eq!(
            f4.tcp(Side::ToPod, flags),
            c4.peer_tcp(flags, b""),
            "{flags:#x}"
        );
        assert_eq!(
            f6.tcp(Side::FromPod, flags),
            c6.pod_tcp(flags, b""),
            "{flags:#x}"
        );
        assert_eq!(
            f4.tcp_with(Side::FromPod, flags, &L3::default(), &[], b"data"),
            c4.pod_tcp(flags, b"data")
        );
    }
    assert_eq!(f4.udp(Side::ToPod, b"x"), c4.peer_udp(b"x"));
    assert_eq!(f6.udp(Side::FromPod, b"xyz"), c6.pod_udp(b"xyz"));
    // IPv4 options and IPv6 extension headers as `packets` writes them.
    let opts = c4.with_ip_ext(IpExt {
        v4_options: true,
        ..IpExt::default()
    });
    assert_eq!(
        f4.tcp_with(Side::ToPod, SYN, &L3::v4_options(&[1, 1, 1, 0]), &[], b""),
        opts.peer_tcp(SYN, b"")
    );
    let exts = c6.with_ip_ext(IpExt {
        hop_by_hop: true,
        dest_opts: true,
        v6_fragment: Some((0, true)),
        ..IpExt::default()
    });
    let mine = f6.tcp_with(
        Side::ToPod,
        SYN,
        &L3::v6_exts(&[Ext::Hop(0), Ext::Dest(0), Ext::Frag(0, true)]),
        &[],
        b"",
    );
    let theirs = exts.peer_tcp(SYN, b"");
    assert_eq!(packets::v6_next_headers(&mine), [0, 60, 44, 6]);
    assert_eq!(packets::v6_next_headers(&theirs), [0, 60, 44, 6]);
    // Same but for the option bytes: theirs are PadN, mine Pad1.
    assert_eq!(mine.len(), theirs.len());
    let differ: Vec<usize> = (0..mine.len()).filter(|&i| mine[i] != theirs[i]).collect();
    let hbh = ETH_HLEN + IPV6_HLEN;
    assert!(
        differ
            .iter()
            .all(|&i| (hbh + 2..hbh + 4).contains(&i) || (hbh + 10..hbh + 12).contains(&i)),
        "bytes {differ:?} differ:\n{}\n{}",
        hex(&mine),
        hex(&theirs)
    );
}
