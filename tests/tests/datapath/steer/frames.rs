//! The flows, pins and frames the rows are made of: a translated flow's
//! packets both ways, and the reset a pod's peer would send.

use std::net::{IpAddr, SocketAddr};

use conndrain_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, Pin, WireKey};
use etherparse::{IpNumber, Ipv4Header, Ipv6Header, SlicedPacket, TcpHeader, TransportSlice};

use super::{IFINDEX_TO_BACKEND, IFINDEX_TO_CLIENT, run::ones_sum};
use crate::{
    harness::mapped,
    packets::{self, ACK, ETH_HLEN, IpExt, PSH},
};

/// One flow the kernel translated, as the agent learns it from conntrack:
/// client → frontend became snat-or-client → backend.
#[derive(Clone, Copy)]
pub struct Flow {
    proto: u8,
    pub client: SocketAddr,
    pub frontend: SocketAddr,
    backend: SocketAddr,
    /// The masquerade (a `NodePort` to a pod on another node), if any.
    snat: Option<SocketAddr>,
}

impl Flow {
    pub fn new(proto: u8, client: &str, frontend: &str, backend: &str, snat: Option<&str>) -> Self {
        Self {
            proto,
            client: client.parse().unwrap(),
            frontend: frontend.parse().unwrap(),
            backend: backend.parse().unwrap(),
            snat: snat.map(|s| s.parse().unwrap()),
        }
    }

    /// The client's side as the backend sees it.
    fn translated_client(&self) -> SocketAddr {
        self.snat.unwrap_or(self.client)
    }

    /// The two `PINS` entries the agent writes for this flow.
    pub fn pins(&self) -> Vec<(WireKey, Pin)> {
        let Self { proto, client, frontend, backend, snat: _ } = *self;
        let inner = self.translated_client();
        vec![
            (key(proto, client, frontend), pin(inner, backend, IFINDEX_TO_BACKEND, backend.ip())),
            (key(proto, backend, inner), pin(frontend, client, IFINDEX_TO_CLIENT, client.ip())),
        ]
    }

    /// The client's packet as it arrives, and as it must leave (DNAT, plus SNAT).
    pub fn forward(&self, ttl: u8, payload: &[u8]) -> (Vec<u8>, Vec<u8>) {
        self.forward_ext(IpExt::default(), ttl, payload)
    }

    /// `forward` with IPv4 options or IPv6 extension headers (TCP only).
    pub fn forward_ext(&self, ext: IpExt, ttl: u8, payload: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let flags = if payload.is_empty() { ACK } else { ACK | PSH };
        (
            frame_with_flags(self.proto, self.client, self.frontend, ext, ttl, flags, payload),
            frame_with_flags(self.proto, self.translated_client(), self.backend, ext, ttl - 1, flags, payload),
        )
    }

    /// The backend's reply as it arrives, and as it must leave (un-DNAT, un-SNAT).
    pub fn reply(&self, ttl: u8, payload: &[u8]) -> (Vec<u8>, Vec<u8>) {
        (
            frame(self.proto, self.backend, self.translated_client(), ttl, payload),
            frame(self.proto, self.frontend, self.client, ttl - 1, payload),
        )
    }
}

fn key(proto: u8, src: SocketAddr, dst: SocketAddr) -> WireKey {
    WireKey {
        src: mapped(src.ip()),
        dst: mapped(dst.ip()),
        sport: src.port(),
        dport: dst.port(),
        proto,
        family: if src.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 },
        _pad: [0; 2],
    }
}

fn pin(new_src: SocketAddr, new_dst: SocketAddr, ifindex: u32, nexthop: IpAddr) -> Pin {
    Pin {
        new_src: mapped(new_src.ip()),
        new_dst: mapped(new_dst.ip()),
        new_sport: new_src.port(),
        new_dport: new_dst.port(),
        ifindex,
        nexthop: mapped(nexthop),
        ..Pin::default()
    }
}

/// A TCP segment (ACK|PSH, or a bare ACK without payload) or a UDP datagram,
/// with valid checksums, from etherparse (`packets.rs`).
pub fn frame(proto: u8, src: SocketAddr, dst: SocketAddr, ttl: u8, payload: &[u8]) -> Vec<u8> {
    frame_with_flags(proto, src, dst, IpExt::default(), ttl, if payload.is_empty() { ACK } else { ACK | PSH }, payload)
}

pub fn frame_with_flags(
    proto: u8,
    src: SocketAddr,
    dst: SocketAddr,
    ext: IpExt,
    ttl: u8,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = if proto == PROTO_TCP {
        packets::tcp(src, dst, ext, flags, payload)
    } else {
        assert!(!ext.v4_options && !ext.hop_by_hop && !ext.dest_opts, "UDP frames take no IP extras");
        packets::udp(src, dst, payload)
    };
    if src.is_ipv4() {
        // The header checksum over the whole header, options included.
        let ihl = usize::from(f[ETH_HLEN] & 0x0f) * 4;
        let hdr = &mut f[ETH_HLEN..ETH_HLEN + ihl];
        hdr[8] = ttl;
        hdr[10..12].fill(0);
        let sum = !u16::try_from(ones_sum(hdr)).unwrap();
        hdr[10..12].copy_from_slice(&sum.to_be_bytes());
    } else {
        f[ETH_HLEN + 7] = ttl;
    }
    f
}

/// The RST `steer.rs` makes of a client's segment when its pin is dead
/// (RFC 9293 3.10.7.1: seq = the segment's ACK, no ACK), sent back out
/// where the segment came in: MACs, addresses and ports swapped, TTL 64.
pub fn reset_of(segment: &[u8], from: SocketAddr, to: SocketAddr) -> Vec<u8> {
    let sliced = SlicedPacket::from_ethernet(segment).unwrap();
    let Some(TransportSlice::Tcp(tcp)) = sliced.transport else { panic!("not TCP") };
    let mut rst = TcpHeader::new(from.port(), to.port(), tcp.acknowledgment_number(), 0);
    rst.rst = true;
    let mut out = Vec::new();
    out.extend_from_slice(&segment[6..12]);
    out.extend_from_slice(&segment[0..6]);
    out.extend_from_slice(&segment[12..14]);
    match (from.ip(), to.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = Ipv4Header::new(20, 64, IpNumber::TCP, s.octets(), d.octets()).unwrap();
            ip.dont_fragment = false;
            ip.header_checksum = ip.calc_header_checksum();
            rst.checksum = rst.calc_checksum_ipv4(&ip, &[]).unwrap();
            out.extend_from_slice(&ip.to_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ip = Ipv6Header {
                payload_length: 20,
                next_header: IpNumber::TCP,
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
                ..Ipv6Header::default()
            };
            rst.checksum = rst.calc_checksum_ipv6(&ip, &[]).unwrap();
            out.extend_from_slice(&ip.to_bytes());
        }
        _ => panic!("mixed families"),
    }
    out.extend_from_slice(&rst.to_bytes());
    out
}
