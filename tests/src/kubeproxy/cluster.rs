//! Two nodes, their pods and a client, each a network namespace.
//!
//! Pods are wired like the CNI `ptp` plugin (and Calico, Cilium): one veth
//! per pod, the pod's address as a /32 (/128) with a default route to a
//! gateway address on the node's end of the veth (`10.244.N.1/32` and
//! `fe80::1`, the same on every pod veth of node N), and a /32 (/128) route
//! per pod on the node. Each node routes the other node's pod CIDR via the
//! inter-node link, as a host-gw / native-routing CNI does.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context as _, Result, bail};

use super::tunnel::TunLink;
use crate::{
    Netns,
    netns::{addr, up, veth},
    unique_tag,
};

/// The client's address on its link to node A.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 2);
/// Node A's node IP, on the client-facing link: NodePorts are reached here.
pub const NODE_A_V4: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 10);
pub const NODE_A_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x10);
/// Node A's address on the inter-node link: what kube-proxy's masquerade
/// puts as source on NodePort traffic that node A sends to a pod on node B.
pub const NODE_A_LINK_V4: Ipv4Addr = Ipv4Addr::new(172, 19, 0, 1);
pub const NODE_A_LINK_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 1);
/// Node B's node IP, on the inter-node link.
pub const NODE_B_V4: Ipv4Addr = Ipv4Addr::new(172, 19, 0, 2);
pub const NODE_B_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 2);
/// Node A's and node B's addresses on the L3 link
/// ([`Cluster::route_pods_over_l3_link`]), one of its pod CIDR each, as
/// Calico gives `tunl0`: what the masquerade puts as source on NodePort
/// traffic node A sends to a pod on node B over that link.
pub const NODE_A_TUN_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 254);
pub const NODE_A_TUN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0xfe);
pub const NODE_B_TUN_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 254);
pub const NODE_B_TUN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 0xfe);
/// All pod CIDRs (node A has 10.244.1.0/24, node B 10.244.2.0/24).
pub const CLUSTER_CIDR_V4: &str = "10.244.0.0/16";
pub const CLUSTER_CIDR_V6: &str = "fd00:244::/48";
/// The ClusterIP ranges.
pub const SERVICE_CIDR_V4: &str = "10.96.0.0/16";
pub const SERVICE_CIDR_V6: &str = "fd00:96::/112";

/// Which node a pod runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    A,
    B,
}

impl Node {
    /// The third octet of the node's pod CIDR (and the v6 equivalent).
    fn index(self) -> u8 {
        match self {
            Node::A => 1,
            Node::B => 2,
        }
    }
}

/// One pod: its namespace and addresses.
#[derive(Debug)]
pub struct ClusterPod {
    name: String,
    node: Node,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    /// The node's end of the pod's veth.
    host_if: String,
    ns: Netns,
}

impl ClusterPod {
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }
    #[must_use]
    pub fn node(&self) -> Node {
        self.node
    }
    #[must_use]
    pub fn ns(&self) -> &Netns {
        &self.ns
    }
    #[must_use]
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }
    #[must_use]
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }
    /// The pod's address of the family of `like`.
    #[must_use]
    pub fn ip_like(&self, like: IpAddr) -> IpAddr {
        if like.is_ipv4() {
            self.ipv4.into()
        } else {
            self.ipv6.into()
        }
    }
    #[must_use]
    pub fn ips(&self) -> [IpAddr; 2] {
        [self.ipv4.into(), self.ipv6.into()]
    }
    /// The node-side interface of the pod's veth (where an agent attaches).
    #[must_use]
    pub fn host_if(&self) -> &str {
        &self.host_if
    }
}

/// Client, node A, node B and the pods. Dropping it deletes every namespace.
#[derive(Debug)]
pub struct Cluster {
    tag: String,
    // Drop order is declaration order: pods first, then the hosts.
    pods: Vec<ClusterPod>,
    node_a: Netns,
    node_b: Netns,
    client: Netns,
    /// Node A's end of the inter-node link.
    node_a_link_if: String,
    /// Node A's end of the client link.
    node_a_client_if: String,
}

impl Cluster {
    /// Builds the client, both nodes and `pods` (name, node), e.g.
    /// `[("a1", Node::A), ("a2", Node::A), ("b1", Node::B)]`. Pods get
    /// `10.244.<node>.<2, 3, ...>` and `fd00:244:<node>::<2, 3, ...>`.
    #[allow(clippy::too_many_lines)] // the wiring, step by step
    pub fn build(pods: &[(&str, Node)]) -> Result<Self> {
        let tag = unique_tag();
        let client = Netns::new(&format!("{tag}-client"))?;
        let node_a = Netns::new(&format!("{tag}-nodea"))?;
        let node_b = Netns::new(&format!("{tag}-nodeb"))?;
        let mut cluster = Cluster {
            tag: tag.clone(),
            pods: Vec::new(),
            node_a,
            node_b,
            client,
            node_a_link_if: format!("{tag}ab"),
            node_a_client_if: format!("{tag}ac"),
        };
        for node in [&cluster.node_a, &cluster.node_b] {
            node.sysctl(&["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
                .with_context(|| format!("enabling forwarding on {}", node.name()))?;
        }

        // client <-> node A
        let client_if = format!("{tag}c");
        veth(
            &cluster.client,
            &client_if,
            &cluster.node_a,
            &cluster.node_a_client_if,
        )?;
        addr(&cluster.client, &client_if, CLIENT_V4.into(), 24)?;
        addr(&cluster.client, &client_if, CLIENT_V6.into(), 64)?;
        addr(
            &cluster.node_a,
            &cluster.node_a_client_if,
            NODE_A_V4.into(),
            24,
        )?;
        addr(
            &cluster.node_a,
            &cluster.node_a_client_if,
            NODE_A_V6.into(),
            64,
        )?;
        up(&cluster.client, &client_if)?;
        up(&cluster.node_a, &cluster.node_a_client_if)?;
        // In a real cluster ClusterIP traffic starts on a node or in a pod;
        // a client outside the nodes that routes the ClusterIP ranges to
        // node A is a fine stand-in: node A's kube-proxy rules see the same
        // forwarded packets as from one of its own pods. (Its source is not
        // in the cluster CIDR, so [`KubeProxy`](super::KubeProxy) leaves out
        // kube-proxy's "masquerade off-cluster traffic to ClusterIPs" rule,
        // as kube-proxy does when it is given no cluster CIDR.)
        cluster.client.ip(&[
            "route",
            "add",
            SERVICE_CIDR_V4,
            "via",
            &NODE_A_V4.to_string(),
        ])?;
        cluster.client.ip(&[
            "-6",
            "route",
            "add",
            SERVICE_CIDR_V6,
            "via",
            &NODE_A_V6.to_string(),
        ])?;

        // node A <-> node B
        let node_b_if = format!("{tag}ba");
        veth(
            &cluster.node_a,
            &cluster.node_a_link_if,
            &cluster.node_b,
            &node_b_if,
        )?;
        addr(
            &cluster.node_a,
            &cluster.node_a_link_if,
            NODE_A_LINK_V4.into(),
            24,
        )?;
        addr(
            &cluster.node_a,
            &cluster.node_a_link_if,
            NODE_A_LINK_V6.into(),
            64,
        )?;
        addr(&cluster.node_b, &node_b_if, NODE_B_V4.into(), 24)?;
        addr(&cluster.node_b, &node_b_if, NODE_B_V6.into(), 64)?;
        up(&cluster.node_a, &cluster.node_a_link_if)?;
        up(&cluster.node_b, &node_b_if)?;
        let (a4, a6) = (NODE_A_LINK_V4.to_string(), NODE_A_LINK_V6.to_string());
        let (b4, b6) = (NODE_B_V4.to_string(), NODE_B_V6.to_string());
        cluster
            .node_a
            .ip(&["route", "add", "10.244.2.0/24", "via", &b4])?;
        cluster
            .node_a
            .ip(&["-6", "route", "add", "fd00:244:2::/64", "via", &b6])?;
        cluster
            .node_b
            .ip(&["route", "add", "10.244.1.0/24", "via", &a4])?;
        cluster
            .node_b
            .ip(&["-6", "route", "add", "fd00:244:1::/64", "via", &a6])?;
        // Replies of unmasqueraded ClusterIP traffic from node B's pods go
        // back to the client through node A, which un-DNATs them.
        cluster
            .node_b
            .ip(&["route", "add", "172.18.0.0/24", "via", &a4])?;
        cluster
            .node_b
            .ip(&["-6", "route", "add", "fd00:18::/64", "via", &a6])?;

        let mut per_node = [0u8; 2];
        for (i, &(name, node)) in pods.iter().enumerate() {
            if cluster.pods.iter().any(|p| p.name == name) {
                bail!("two pods named {name:?} in one cluster");
            }
            let n = node.index();
            let slot = &mut per_node[usize::from(n - 1)];
            let host = *slot + 2;
            *slot += 1;
            let ns = Netns::new(&format!("{tag}-pod-{name}"))?;
            let node_ns = match node {
                Node::A => &cluster.node_a,
                Node::B => &cluster.node_b,
            };
            let (host_if, pod_if) = (format!("{tag}h{i}"), format!("{tag}p{i}"));
            veth(node_ns, &host_if, &ns, &pod_if)?;
            let gw4 = Ipv4Addr::new(10, 244, n, 1);
            let ipv4 = Ipv4Addr::new(10, 244, n, host);
            let ipv6 = Ipv6Addr::new(0xfd00, 0x244, n.into(), 0, 0, 0, 0, host.into());
            // Node side: the gateway addresses and a host route to the pod.
            addr(node_ns, &host_if, gw4.into(), 32)?;
            addr(node_ns, &host_if, "fe80::1".parse()?, 64)?;
            up(node_ns, &host_if)?;
            node_ns.ip(&["route", "add", &format!("{ipv4}/32"), "dev", &host_if])?;
            node_ns.ip(&[
                "-6",
                "route",
                "add",
                &format!("{ipv6}/128"),
                "dev",
                &host_if,
            ])?;
            // Pod side.
            addr(&ns, &pod_if, ipv4.into(), 32)?;
            addr(&ns, &pod_if, ipv6.into(), 128)?;
            up(&ns, &pod_if)?;
            ns.ip(&[
                "route",
                "add",
                &gw4.to_string(),
                "dev",
                &pod_if,
                "scope",
                "link",
            ])?;
            ns.ip(&[
                "route",
                "add",
                "default",
                "via",
                &gw4.to_string(),
                "dev",
                &pod_if,
            ])?;
            ns.ip(&[
                "-6", "route", "add", "default", "via", "fe80::1", "dev", &pod_if,
            ])?;
            cluster.pods.push(ClusterPod {
                name: name.to_owned(),
                node,
                ipv4,
                ipv6,
                host_if,
                ns,
            });
        }
        Ok(cluster)
    }

    /// The unique tag all names of this cluster start with.
    #[must_use]
    pub fn tag(&self) -> &str {
        &self.tag
    }
    #[must_use]
    pub fn client(&self) -> &Netns {
        &self.client
    }
    #[must_use]
    pub fn node_a(&self) -> &Netns {
        &self.node_a
    }
    #[must_use]
    pub fn node_b(&self) -> &Netns {
        &self.node_b
    }
    /// Node A's interfaces: to the client, and to node B.
    #[must_use]
    pub fn node_a_ifs(&self) -> (&str, &str) {
        (&self.node_a_client_if, &self.node_a_link_if)
    }
    /// The pod named `name`; panics if there is none (a test bug).
    #[must_use]
    pub fn pod(&self, name: &str) -> &ClusterPod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("the cluster has no pod {name:?}"))
    }
    #[must_use]
    pub fn pods(&self) -> &[ClusterPod] {
        &self.pods
    }
    /// The pod that has address `ip`, if any.
    #[must_use]
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&ClusterPod> {
        self.pods.iter().find(|p| p.ips().contains(&ip))
    }
    /// Moves the traffic between the two nodes' pod CIDRs onto an L3 link,
    /// as an overlay CNI routes it over ipip or `WireGuard` (Calico's `tunl0`,
    /// `wireguard.cali`): TUN devices joined by this process ([`TunLink`]),
    /// each with addresses of its node's pod CIDRs ([`NODE_A_TUN_V4`] and
    /// [`NODE_A_TUN_V6`]; node B's), and each node's routes to the other's
    /// pod CIDRs through it. Returns the link (it lasts as long as this
    /// value) and node A's device.
    pub fn route_pods_over_l3_link(&self) -> Result<(TunLink, String)> {
        let (a_if, b_if) = (format!("{}ta", self.tag), format!("{}tb", self.tag));
        let link = TunLink::new(&self.node_a, &a_if, &self.node_b, &b_if)?;
        for (ns, dev, own4, own6, other4, other6) in [
            (&self.node_a, &a_if, NODE_A_TUN_V4, NODE_A_TUN_V6, "10.244.2.0/24", "fd00:244:2::/64"),
            (&self.node_b, &b_if, NODE_B_TUN_V4, NODE_B_TUN_V6, "10.244.1.0/24", "fd00:244:1::/64"),
        ] {
            addr(ns, dev, own4.into(), 32)?;
            addr(ns, dev, own6.into(), 128)?;
            up(ns, dev)?;
            ns.ip(&["route", "replace", other4, "dev", dev])?;
            ns.ip(&["-6", "route", "replace", other6, "dev", dev])?;
        }
        Ok((link, a_if))
    }

    /// Node A's node IP of the family of `like` (where NodePorts are reached).
    #[must_use]
    pub fn node_a_ip(like: IpAddr) -> IpAddr {
        if like.is_ipv4() {
            NODE_A_V4.into()
        } else {
            NODE_A_V6.into()
        }
    }
    /// `node A IP:port` of the family of `like`.
    #[must_use]
    pub fn node_port(like: IpAddr, port: u16) -> SocketAddr {
        SocketAddr::new(Self::node_a_ip(like), port)
    }
}

