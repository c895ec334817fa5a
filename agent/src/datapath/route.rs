//! Which interface the node routes a pod IP through: a real FIB lookup
//! (RTM_GETROUTE for one address, like `ip route get`), so it works for any
//! CNI — a veth per pod or a bridge shared by pods.
//!
//! rtnetlink's `RouteGetRequest` always sets NLM_F_DUMP, which lists the
//! tables instead of resolving one address, so we send the request ourselves
//! through its `Handle::request`.

use std::net::IpAddr;

use futures::StreamExt as _;
use netlink_packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAddress, RouteAttribute, RouteMessage},
};

use crate::error::Error;

pub struct Router {
    handle: rtnetlink::Handle,
}

impl Router {
    pub fn new() -> Result<Self, Error> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|source| Error::Netlink { op: "opening", reason: source.to_string() })?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn oif(&mut self, ip: IpAddr) -> Result<u32, Error> {
        self.lookup(ip).await.map(|(oif, _)| oif)
    }

    /// The outgoing interface for `ip` and the neighbour to reach it there:
    /// the gateway if the route has one, else `ip` itself.
    pub async fn lookup(&mut self, ip: IpAddr) -> Result<(u32, IpAddr), Error> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        msg.header.destination_prefix_length = if ip.is_ipv4() { 32 } else { 128 };
        msg.attributes.push(RouteAttribute::Destination(RouteAddress::from(ip)));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(msg));
        req.header.flags = NLM_F_REQUEST;
        let mut responses = self
            .handle
            .request(req)
            .map_err(|e| Error::Netlink { op: "route lookup", reason: e.to_string() })?;
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
