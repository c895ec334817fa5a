//! Addresses: the node's own (`NODE_ADDRS`), and the 16-byte form the maps
//! keep every address in.

use std::net::IpAddr;

use conndrain_common::PodIpKey;

use super::{Datapath, handles};
use handles::update;

/// The node's own addresses, from `getifaddrs` in this network namespace.
#[must_use]
pub fn local_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below; we only read sockaddrs it owns.
    unsafe {
        if libc::getifaddrs(&raw mut list) != 0 {
            return out;
        }
        let mut p = list;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                match i32::from((*a).sa_family) {
                    libc::AF_INET => {
                        let sin = &*a.cast::<libc::sockaddr_in>();
                        out.push(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*a.cast::<libc::sockaddr_in6>();
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

/// Fills `NODE_ADDRS`, so that connections from the node itself (the
/// kubelet's probes) do not restart a terminating pod's quiet period.
pub(super) fn fill_node_addrs(m: &mut handles::Maps) {
    for ip in local_addrs() {
        if let Err(e) = m.node_addrs.insert(ip_key(ip), 1, update::ANY) {
            tracing::warn!(%ip, error = %e, "recording a node address");
        }
    }
}

impl Datapath {
    /// Re-reads the node's addresses (they may change while we run).
    pub fn refresh_node_addrs(&mut self) {
        fill_node_addrs(&mut self.maps);
    }
}

/// The map key of a pod IP: IPv4 as IPv4-mapped IPv6, as the programs see it.
#[must_use]
pub fn ip_key(ip: IpAddr) -> PodIpKey {
    PodIpKey { addr: ip_bytes(ip) }
}

#[must_use]
pub fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Back from the map's 16 bytes to an address of the flow's family.
#[must_use]
pub fn ip_from_bytes(bytes: [u8; 16], family: u8) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(bytes);
    match (family, v6.to_ipv4_mapped()) {
        (conndrain_common::FAMILY_V4, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    }
}
