//! Which interface the node routes a pod IP through: a real FIB lookup
//! (RTM_GETROUTE for one address, like `ip route get`), so it works for any
//! CNI — a veth per pod or a bridge shared by pods.
//!
//! rtnetlink's `RouteGetRequest` always sets NLM_F_DUMP, which lists the
//! tables instead of resolving one address, so we send the request ourselves
//! through its `Handle::request`.

use std::net::IpAddr;

use futures::{StreamExt as _, TryStreamExt as _};
use netlink_packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo},
    route::{RouteAddress, RouteAttribute, RouteMessage},
};

use crate::error::Error;

pub struct Router {
    handle: rtnetlink::Handle,
}

impl Router {
    pub fn new() -> Result<Self, Error> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|source| Error::Netlink { op: "opening", reason: source.to_string() })?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn oif(&mut self, ip: IpAddr) -> Result<u32, Error> {
        self.lookup(ip).await.map(|(oif, _)| oif)
    }

    /// The outgoing interface for `ip` and the neighbour to reach it there:
    /// the gateway if the route has one, else `ip` itself.
    pub async fn lookup(&mut self, ip: IpAddr) -> Result<(u32, IpAddr), Error> {
        self.lookup_from(ip, None).await
    }

    /// Like [`Self::lookup`], for a packet to `ip` from the address `from.0`
    /// that came in on the interface `from.1`, as a forwarded packet is
    /// routed (`ip route get IP from SRC iif DEV`): policy rules on the
    /// source or the input interface apply. The kernel checks the source
    /// against the interface as for a real packet (`rp_filter`), and refuses
    /// one of its own addresses as the source of an input route.
    pub async fn lookup_from(&mut self, ip: IpAddr, from: Option<(IpAddr, u32)>) -> Result<(u32, IpAddr), Error> {
        let mut msg = RouteMessage::default();
        let full = if ip.is_ipv4() { 32 } else { 128 };
        msg.header.address_family = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        msg.header.destination_prefix_length = full;
        msg.attributes.push(RouteAttribute::Destination(RouteAddress::from(ip)));
        if let Some((src, iif)) = from {
            msg.header.source_prefix_length = full;
            msg.attributes.push(RouteAttribute::Source(RouteAddress::from(src)));
            msg.attributes.push(RouteAttribute::Iif(iif));
        }
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(msg));
        req.header.flags = NLM_F_REQUEST;
        let mut responses =
            self.handle.request(req).map_err(|e| Error::Netlink { op: "route lookup", reason: e.to_string() })?;
        while let Some(resp) = responses.next().await {
            match resp.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
                    let mut oif = None;
                    let mut nexthop = ip;
                    for attr in route.attributes {
                        match attr {
                            RouteAttribute::Oif(o) => oif = Some(o),
                            RouteAttribute::Gateway(RouteAddress::Inet(g)) => nexthop = IpAddr::V4(g),
                            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => nexthop = IpAddr::V6(g),
                            _ => {}
                        }
                    }
                    if let Some(oif) = oif {
                        return Ok((oif, nexthop));
                    }
                }
                NetlinkPayload::Error(e) => {
                    return Err(Error::NoRoute { ip, reason: e.to_io().to_string() });
                }
                _ => {}
            }
        }
        Err(Error::NoRoute { ip, reason: "the kernel returned no interface".into() })
    }
}

/// What an interface is, as far as choosing where to attach goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    pub ifindex: u32,
    pub name: String,
    /// `IFLA_INFO_KIND` ("veth", "bridge", "macvlan"...); `None` for a physical device.
    pub kind: Option<String>,
    /// The bridge (or bond) it is a port of.
    pub controller: Option<u32>,
}

/// Where the programs must attach to see a pod's own traffic, given the
/// interface the node routes the pod's IP through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachPoints {
    /// These interfaces: the pod's veth, or every veth port of its bridge
    /// (a bridge device never sees frames between two of its ports, so a
    /// pod reaching another pod on the same bridge would go unseen).
    Interfaces(Vec<u32>),
    /// No interface of this namespace carries the pod's own traffic
    /// (macvlan/ipvlan on an uplink, or a device that is not per pod): the
    /// pod cannot be tracked; the reason says why.
    Unseen(String),
}

/// Pure choice of attach points from the routed interface and the links of
/// the namespace (unit-tested below).
#[must_use]
pub fn attach_points(oif: u32, links: &[LinkFacts]) -> AttachPoints {
    let Some(link) = links.iter().find(|l| l.ifindex == oif) else {
        return AttachPoints::Interfaces(vec![oif]);
    };
    match link.kind.as_deref() {
        // A veth; or an L3 tunnel to a pod on another node (ipip, WireGuard,
        // a userspace VPN's TUN device): its traffic passes there, as over
        // a veth to that node. The `_l3` programs go on those (`attach.rs`).
        Some("veth" | "ipip" | "wireguard" | "tun" | "gre" | "sit" | "ip6tnl" | "ip6gre") => {
            AttachPoints::Interfaces(vec![oif])
        }
        Some("bridge") => {
            let ports: Vec<u32> = links
                .iter()
                .filter(|l| l.controller == Some(oif) && l.kind.as_deref() == Some("veth"))
                .map(|l| l.ifindex)
                .collect();
            if ports.is_empty() {
                AttachPoints::Unseen(format!("bridge {} has no veth port: its pods' traffic is not per pod", link.name))
            } else {
                AttachPoints::Interfaces(ports)
            }
        }
        kind => AttachPoints::Unseen(format!(
            "the node reaches this pod through {} ({}), not a veth or a bridge: \
             its traffic (macvlan, ipvlan, or a CNI that bypasses the host's interfaces) passes no hook conndrain can attach to",
            link.name,
            kind.unwrap_or("a physical device")
        )),
    }
}

impl Router {
    /// Every link of this network namespace.
    pub async fn links(&mut self) -> Result<Vec<LinkFacts>, Error> {
        let mut out = Vec::new();
        let mut dump = self.handle.link().get().execute();
        while let Some(msg) =
            dump.try_next().await.map_err(|e| Error::Netlink { op: "listing links", reason: e.to_string() })?
        {
            let mut facts = LinkFacts { ifindex: msg.header.index, name: String::new(), kind: None, controller: None };
            for attr in msg.attributes {
                match attr {
                    LinkAttribute::IfName(n) => facts.name = n,
                    LinkAttribute::Controller(c) => facts.controller = Some(c),
                    LinkAttribute::LinkInfo(infos) => {
                        for info in infos {
                            if let LinkInfo::Kind(k) = info {
                                facts.kind = Some(match k {
                                    InfoKind::Other(s) => s,
                                    k => k.to_string(),
                                });
                            }
                        }
                    }
                    _ => {}
                }
            }
            out.push(facts);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(ifindex: u32, name: &str, kind: Option<&str>, controller: Option<u32>) -> LinkFacts {
        LinkFacts { ifindex, name: name.into(), kind: kind.map(Into::into), controller }
    }

    #[test]
    fn a_bridge_means_its_veth_ports() {
        let links = [
            link(1, "lo", None, None),
            link(2, "eth0", None, None),
            link(3, "cni0", Some("bridge"), None),
            link(4, "veth1", Some("veth"), Some(3)),
            link(5, "veth2", Some("veth"), Some(3)),
            link(6, "vxlan0", Some("vxlan"), Some(3)),
            link(7, "veth3", Some("veth"), None),
        ];
        assert_eq!(attach_points(3, &links), AttachPoints::Interfaces(vec![4, 5]));
        assert_eq!(attach_points(7, &links), AttachPoints::Interfaces(vec![7]));
        assert!(matches!(attach_points(2, &links), AttachPoints::Unseen(r) if r.contains("eth0")));
        let bare = [link(3, "cni0", Some("bridge"), None)];
        assert!(matches!(attach_points(3, &bare), AttachPoints::Unseen(_)));
    }

    #[test]
    fn macvlan_parents_and_dummies_are_unseen() {
        let links = [link(2, "dummy0", Some("dummy"), None), link(3, "mv0", Some("macvlan"), None)];
        assert!(matches!(attach_points(2, &links), AttachPoints::Unseen(r) if r.contains("dummy")));
        assert!(matches!(attach_points(3, &links), AttachPoints::Unseen(r) if r.contains("macvlan")));
    }

    #[test]
    fn l3_tunnels_to_other_nodes_are_attached() {
        for kind in ["ipip", "wireguard", "tun"] {
            let links = [link(9, "tunnel", Some(kind), None)];
            assert_eq!(attach_points(9, &links), AttachPoints::Interfaces(vec![9]), "{kind}");
        }
    }
}
