//! Packet builders: whole Ethernet frames with valid checksums (etherparse),
//! and the malformed ones the parser must pass untouched.

use std::net::{IpAddr, SocketAddr};

use conndrain_common::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP};
use etherparse::{
    IpFragOffset, IpHeaders, IpNumber, Ipv4Extensions, Ipv4Header, Ipv4Options, Ipv6Extensions,
    Ipv6FragmentHeader, Ipv6Header, Ipv6RawExtHeader, NetSlice, PacketBuilder, PacketBuilderStep,
    SlicedPacket, TcpHeader, TransportSlice,
};

use crate::harness::mapped;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

const MAC_POD: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const MAC_HOST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;

/// Optional IP header extras: IPv6 extension headers between the IPv6
/// header and TCP/UDP, IPv4 options.
#[derive(Clone, Copy, Debug, Default)]
pub struct IpExt {
    /// IPv6 hop-by-hop options header (first).
    pub hop_by_hop: bool,
    /// IPv6 destination options header.
    pub dest_opts: bool,
    /// IPv6 fragment header: (offset in 8-byte units, more fragments).
    pub v6_fragment: Option<(u16, bool)>,
    /// 4 bytes of IPv4 options (IHL 6).
    pub v4_options: bool,
}

/// One connection between a pod and a peer, to build its packets both ways.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    pub pod: SocketAddr,
    pub peer: SocketAddr,
    pub ip_ext: IpExt,
}

impl Conn {
    pub fn new(pod: &str, peer: &str) -> Self {
        Self {
            pod: pod.parse().unwrap(),
            peer: peer.parse().unwrap(),
            ip_ext: IpExt::default(),
        }
    }

    #[must_use]
    pub fn with_ip_ext(mut self, ip_ext: IpExt) -> Self {
        self.ip_ext = ip_ext;
        self
    }

    /// The same pod and peer addresses, another peer port.
    #[must_use]
    pub fn peer_port(mut self, port: u16) -> Self {
        self.peer.set_port(port);
        self
    }

    /// A TCP segment from the peer to the pod.
    pub fn peer_tcp(&self, flags: u8, payload: &[u8]) -> Vec<u8> {
        tcp(self.peer, self.pod, self.ip_ext, flags, payload)
    }

    /// A TCP segment from the pod to the peer.
    pub fn pod_tcp(&self, flags: u8, payload: &[u8]) -> Vec<u8> {
        tcp(self.pod, self.peer, self.ip_ext, flags, payload)
    }

    pub fn peer_udp(&self, payload: &[u8]) -> Vec<u8> {
        udp(self.peer, self.pod, payload)
    }

    pub fn pod_udp(&self, payload: &[u8]) -> Vec<u8> {
        udp(self.pod, self.peer, payload)
    }

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

    pub fn udp_key(&self) -> FlowKey {
        self.key(PROTO_UDP)
    }
}

fn ip_step(src: IpAddr, dst: IpAddr, ext: IpExt) -> PacketBuilderStep<IpHeaders> {
    let eth = PacketBuilder::ethernet2(MAC_POD, MAC_HOST);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) if ext.v4_options => {
            // Protocol and lengths are set by the builder when it writes.
            let mut hdr = Ipv4Header::new(0, 64, IpNumber::TCP, s.octets(), d.octets()).unwrap();
            hdr.options = Ipv4Options::try_from(&[1u8, 1, 1, 0][..]).unwrap(); // NOP NOP NOP EOL
            eth.ip(IpHeaders::Ipv4(hdr, Ipv4Extensions::default()))
        }
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            // PadN filling the 6 bytes of option space of the smallest header.
            let padn = [1, 4, 0, 0, 0, 0];
            // next_header values are set by the builder when it writes.
            let raw = || Some(Ipv6RawExtHeader::new_raw(IpNumber::TCP, &padn).unwrap());
            let exts = Ipv6Extensions {
                hop_by_hop_options: if ext.hop_by_hop { raw() } else { None },
                destination_options: if ext.dest_opts { raw() } else { None },
                fragment: ext.v6_fragment.map(|(offset, more)| {
                    Ipv6FragmentHeader::new(
                        IpNumber::TCP,
                        IpFragOffset::try_new(offset).unwrap(),
                        more,
                        0x1234,
                    )
                }),
                ..Ipv6Extensions::default()
            };
            let hdr = Ipv6Header {
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
                ..Ipv6Header::default()
            };
            eth.ip(IpHeaders::Ipv6(hdr, exts))
        }
        _ => panic!("mixed address families {src} -> {dst}"),
    }
}

pub fn tcp(src: SocketAddr, dst: SocketAddr, ext: IpExt, flags: u8, payload: &[u8]) -> Vec<u8> {
    assert_eq!(
        flags & !(FIN | SYN | RST | PSH | ACK),
        0,
        "unsupported TCP flags {flags:#x}"
    );
    let mut b = ip_step(src.ip(), dst.ip(), ext).tcp(src.port(), dst.port(), 1000, 64240);
    if flags & FIN != 0 {
        b = b.fin();
    }
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & RST != 0 {
        b = b.rst();
    }
    if flags & PSH != 0 {
        b = b.psh();
    }
    if flags & ACK != 0 {
        b = b.ack(2000);
    }
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("building a TCP frame");
    if let Some((offset, more)) = ext.v6_fragment {
        // etherparse 0.16 writes the fragment offset and M flag at the wrong
        // bit positions (etherparse issue #150, fixed in 0.20); write them as
        // RFC 8200 says: offset in the top 13 bits, M in the lowest.
        let at = v6_fragment_header(&out).expect("no fragment header");
        let word = (offset << 3) | u16::from(more);
        out[at + 2..at + 4].copy_from_slice(&word.to_be_bytes());
    }
    out
}

pub fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let b = ip_step(src.ip(), dst.ip(), IpExt::default()).udp(src.port(), dst.port());
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("building a UDP frame");
    out
}

/// An IPv4 packet of protocol `proto` whose payload is a valid-looking TCP
/// header from `src` to `dst` (so that a parser ignoring the protocol number
/// would find ports and flags there).
pub fn ipv4_with_proto(src: SocketAddr, dst: SocketAddr, proto: IpNumber) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        panic!("IPv4 only")
    };
    let mut tcp = TcpHeader::new(src.port(), dst.port(), 1000, 64240);
    tcp.syn = true;
    let payload = tcp.to_bytes();
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_POD, MAC_HOST)
        .ipv4(s.octets(), d.octets(), 64)
        .write(&mut out, proto, &payload)
        .expect("building an IPv4 frame");
    out
}

/// An ARP request from `sender` asking for `target`, both IPv4.
pub fn arp_request(sender: IpAddr, target: IpAddr) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(t)) = (sender, target) else {
        panic!("IPv4 only")
    };
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]); // broadcast
    f.extend_from_slice(&MAC_POD);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&MAC_POD);
    f.extend_from_slice(&s.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&t.octets());
    f
}

/// Applies `edit` to the IPv4 header of `frame` and fixes the header checksum,
/// so that only the edited field is wrong.
pub fn edit_ipv4_header(frame: &mut [u8], edit: impl FnOnce(&mut [u8])) {
    let hdr = &mut frame[ETH_HLEN..ETH_HLEN + IPV4_HLEN];
    edit(hdr);
    hdr[10] = 0;
    hdr[11] = 0;
    let mut sum: u32 = hdr
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let csum = !u16::try_from(sum).unwrap();
    hdr[10..12].copy_from_slice(&csum.to_be_bytes());
}

/// Checks a frame against etherparse: it must parse, and its IPv4 header
/// checksum must be right. Guards the builders above, so that a test meant to
/// exercise one malformation does not exercise another by accident.
pub fn assert_ipv4_checksum_ok(frame: &[u8]) {
    let hdr = &frame[ETH_HLEN..];
    let ihl = usize::from(hdr[0] & 0x0f) * 4;
    let ihl = ihl.max(IPV4_HLEN);
    let mut sum: u32 = hdr[..ihl]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    assert_eq!(sum, 0xffff, "bad IPv4 header checksum in {frame:02x?}");
}

/// The chain of next-header numbers of an IPv6 `frame`, from the IPv6 header
/// to the transport; also checks that etherparse parses the frame down to TCP.
pub fn v6_next_headers(frame: &[u8]) -> Vec<u8> {
    let mut chain = vec![frame[ETH_HLEN + 6]];
    let mut off = ETH_HLEN + IPV6_HLEN;
    while matches!(chain.last(), Some(0 | 44 | 60)) {
        chain.push(frame[off]);
        off += (usize::from(frame[off + 1]) + 1) * 8; // also right for the fragment header: byte 1 is 0
    }
    let sliced = SlicedPacket::from_ethernet(frame).expect("frame does not parse");
    // etherparse does not parse the transport of a fragment.
    assert!(
        chain.contains(&44) || matches!(sliced.transport, Some(TransportSlice::Tcp(_))),
        "no TCP in {frame:02x?}"
    );
    chain
}

/// Offset of the IPv6 fragment header in `frame`, if it has one.
fn v6_fragment_header(frame: &[u8]) -> Option<usize> {
    let mut next = frame[ETH_HLEN + 6];
    let mut off = ETH_HLEN + IPV6_HLEN;
    while matches!(next, 0 | 60) {
        next = frame[off];
        off += (usize::from(frame[off + 1]) + 1) * 8;
    }
    (next == 44).then_some(off)
}

/// Sanity check for `ipv4_with_proto`: the frame parses as IPv4 with the
/// given protocol and a correct header checksum.
pub fn assert_ipv4_proto(frame: &[u8], proto: IpNumber) {
    let sliced = SlicedPacket::from_ethernet(frame).expect("frame does not parse");
    let Some(NetSlice::Ipv4(v4)) = sliced.net else {
        panic!("not IPv4")
    };
    assert_eq!(v4.header().protocol(), proto);
    assert_ipv4_checksum_ok(frame);
}

/// Rewrites the TCP header of `frame` (IPv4 or IPv6, no extension headers or
/// IPv4 options) with `edit`, then fixes the TCP checksum.
pub fn edit_tcp_header(frame: &mut [u8], edit: impl FnOnce(&mut [u8])) {
    let v6 = frame[ETH_HLEN] >> 4 == 6;
    let l4 = ETH_HLEN + if v6 { IPV6_HLEN } else { IPV4_HLEN };
    assert_eq!(
        frame[if v6 { ETH_HLEN + 6 } else { ETH_HLEN + 9 }],
        6,
        "not a plain TCP frame"
    );
    edit(&mut frame[l4..]);
    frame[l4 + 16] = 0;
    frame[l4 + 17] = 0;
    let seg_len = u32::try_from(frame.len() - l4).unwrap();
    let mut pseudo = Vec::new();
    if v6 {
        pseudo.extend_from_slice(&frame[ETH_HLEN + 8..ETH_HLEN + 40]);
        pseudo.extend_from_slice(&seg_len.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
    } else {
        pseudo.extend_from_slice(&frame[ETH_HLEN + 12..ETH_HLEN + 20]);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&u16::try_from(seg_len).unwrap().to_be_bytes());
    }
    pseudo.extend_from_slice(&frame[l4..]);
    if pseudo.len() % 2 == 1 {
        pseudo.push(0);
    }
    let mut sum: u32 = pseudo
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let csum = !u16::try_from(sum).unwrap();
    frame[l4 + 16..l4 + 18].copy_from_slice(&csum.to_be_bytes());
}
