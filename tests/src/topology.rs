//! A simulated Kubernetes node: a client host, the node, and pods, each a
//! network namespace.
//!
//! ```text
//!  client ns                 node ns                          pod ns
//!  10.100.0.2  ---veth---  10.100.0.1
//!  fd00:100::2             fd00:100::1
//!                          10.200.i.1    ---veth (own)---   10.200.i.2       veth pods, i = 1..=250
//!                          fd00:200:i::1                    fd00:200:i::2
//!                          bridge 10.201.k.1 ---veth------   10.201.k.(j+2)  bridge pods, j = 0, 1, ...
//!                                 fd00:201:k::1             fd00:201:k::(j+2)
//! ```
//!
//! `i` (per veth pod) and `k` (per bridge) come from counters this process
//! shares, so topologies built at the same time never share a pod address.
//! Tests run concurrently on one kernel, whose sockets tracepoint shows every
//! agent the sockets of every namespace, by address: two simulated nodes
//! with the same pod address would hold each other's pods, which pods on
//! different real nodes cannot.
//!
//! The node forwards between client and pods; pods route everything via the
//! node, the client routes the pod ranges via the node. Most CNIs give each
//! pod its own veth (the agent attaches to that veth); bridge CNIs enslave the
//! host ends to one bridge (the agent attaches to the bridge).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicU8, Ordering},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    Netns, TcpConn, TcpServer,
    netns::{addr, up, veth},
    unique_tag,
};

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2);
pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);

/// The next veth pod's `i` and the next bridge's `k` (see the module docs).
static VETH_SUBNET: AtomicU8 = AtomicU8::new(0);
static BRIDGE_SUBNET: AtomicU8 = AtomicU8::new(0);

/// 1..=250, in turn: 250 subnets outlast any set of topologies alive at once.
fn next_subnet(counter: &AtomicU8) -> u8 {
    counter.fetch_add(1, Ordering::Relaxed) % 250 + 1
}

/// One pod: its namespace, addresses, and the node-side interface that leads
/// to it.
#[derive(Debug)]
pub struct Pod {
    name: String,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    /// The interface the agent should attach to: the pod's own veth on the
    /// node, or the bridge.
    node_if: String,
    /// The pod's end of its veth.
    inside_if: String,
    ns: Netns,
}

impl Pod {
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
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
    /// Both addresses, as `pod add --ip` gets them.
    #[must_use]
    pub fn ips(&self) -> [IpAddr; 2] {
        [self.ipv4.into(), self.ipv6.into()]
    }
    #[must_use]
    pub fn addr_v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ipv4.into(), port)
    }
    #[must_use]
    pub fn addr_v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ipv6.into(), port)
    }
    /// The node-side interface traffic to this pod leaves by (where the agent attaches).
    #[must_use]
    pub fn node_if(&self) -> &str {
        &self.node_if
    }
    #[must_use]
    pub fn pod_if(&self) -> &str {
        &self.inside_if
    }
}

/// The namespaces of one test. Dropping it deletes them all, which also
/// destroys every veth and the bridge.
#[derive(Debug)]
pub struct Topology {
    tag: String,
    // Drop order is declaration order: pods first, then the hosts.
    pods: Vec<Pod>,
    bridge: Option<String>,
    node: Netns,
    client: Netns,
}

#[derive(Debug, Default)]
pub struct TopologyBuilder {
    pods: Vec<(String, bool)>,
    verify: bool,
}

impl Topology {
    #[must_use]
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder {
            pods: Vec::new(),
            verify: true,
        }
    }

    /// The unique tag all names of this topology start with.
    #[must_use]
    pub fn tag(&self) -> &str {
        &self.tag
    }
    #[must_use]
    pub fn client(&self) -> &Netns {
        &self.client
    }
    #[must_use]
    pub fn node(&self) -> &Netns {
        &self.node
    }
    /// The pod named `name`; panics if the builder made none (a test bug).
    #[must_use]
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("the topology has no pod {name:?}"))
    }
    #[must_use]
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }
    /// The node's bridge, if any pod was built with [`TopologyBuilder::bridge_pod`].
    #[must_use]
    pub fn bridge(&self) -> Option<&str> {
        self.bridge.as_deref()
    }
    #[must_use]
    pub fn client_v4(&self) -> Ipv4Addr {
        CLIENT_V4
    }
    #[must_use]
    pub fn client_v6(&self) -> Ipv6Addr {
        CLIENT_V6
    }
}

impl TopologyBuilder {
    /// A pod with its own veth to the node.
    #[must_use]
    pub fn pod(mut self, name: &str) -> Self {
        self.pods.push((name.to_owned(), false));
        self
    }

    /// A pod attached to the node's shared bridge.
    #[must_use]
    pub fn bridge_pod(mut self, name: &str) -> Self {
        self.pods.push((name.to_owned(), true));
        self
    }

    /// Skip the TCP connectivity check at the end of [`build`](Self::build).
    #[must_use]
    pub fn no_verify(mut self) -> Self {
        self.verify = false;
        self
    }

    pub fn build(self) -> Result<Topology> {
        let tag = unique_tag();
        let client = Netns::new(&format!("{tag}-client"))?;
        let node = Netns::new(&format!("{tag}-node"))?;
        let mut topo = Topology {
            tag: tag.clone(),
            pods: Vec::new(),
            bridge: None,
            node,
            client,
        };

        topo.node
            .sysctl(&["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
            .context("enabling forwarding on the node")?;

        let (client_if, node_if) = (format!("{tag}c"), format!("{tag}n"));
        veth(&topo.client, &client_if, &topo.node, &node_if)?;
        addr(&topo.client, &client_if, CLIENT_V4.into(), 24)?;
        addr(&topo.client, &client_if, CLIENT_V6.into(), 64)?;
        addr(&topo.node, &node_if, NODE_V4.into(), 24)?;
        addr(&topo.node, &node_if, NODE_V6.into(), 64)?;
        up(&topo.client, &client_if)?;
        up(&topo.node, &node_if)?;
        // The client reaches every pod range through the node.
        for range in ["10.200.0.0/16", "10.201.0.0/16"] {
            topo.client
                .ip(&["route", "add", range, "via", &NODE_V4.to_string()])?;
        }
        for range in ["fd00:200::/32", "fd00:201::/32"] {
            topo.client
                .ip(&["-6", "route", "add", range, "via", &NODE_V6.to_string()])?;
        }

        let (mut veth_pods, mut bridge_pods) = (0u8, 0u8);
        let k = next_subnet(&BRIDGE_SUBNET);
        let (bridge_v4, bridge_v6) = (Ipv4Addr::new(10, 201, k, 1), Ipv6Addr::new(0xfd00, 0x201, k.into(), 0, 0, 0, 0, 1));
        for (name, on_bridge) in &self.pods {
            if topo.pods.iter().any(|p| &p.name == name) {
                bail!("two pods named {name:?} in one topology");
            }
            let ns = Netns::new(&format!("{tag}-pod-{name}"))?;
            let pod = if *on_bridge {
                if topo.bridge.is_none() {
                    let b = format!("{tag}br");
                    make_bridge(&topo.node, &b, bridge_v4, bridge_v6)?;
                    topo.bridge = Some(b);
                }
                let bridge = topo.bridge.clone().expect("just made");
                let j = bridge_pods;
                bridge_pods += 1;
                let (host_if, pod_if) = (format!("{tag}b{j}"), format!("{tag}q{j}"));
                veth(&topo.node, &host_if, &ns, &pod_if)?;
                topo.node
                    .ip(&["link", "set", &host_if, "master", &bridge])?;
                up(&topo.node, &host_if)?;
                let host = j + 2;
                let ipv4 = Ipv4Addr::new(10, 201, k, host);
                let ipv6 = Ipv6Addr::new(0xfd00, 0x201, k.into(), 0, 0, 0, 0, host.into());
                pod_side(&ns, &pod_if, ipv4, ipv6, bridge_v4, bridge_v6)?;
                Pod {
                    name: name.clone(),
                    ipv4,
                    ipv6,
                    node_if: bridge,
                    inside_if: pod_if,
                    ns,
                }
            } else {
                veth_pods += 1;
                let i = veth_pods;
                let (host_if, pod_if) = (format!("{tag}h{i}"), format!("{tag}p{i}"));
                veth(&topo.node, &host_if, &ns, &pod_if)?;
                let s = next_subnet(&VETH_SUBNET);
                let gw4 = Ipv4Addr::new(10, 200, s, 1);
                let gw6 = Ipv6Addr::new(0xfd00, 0x200, s.into(), 0, 0, 0, 0, 1);
                addr(&topo.node, &host_if, gw4.into(), 24)?;
                addr(&topo.node, &host_if, gw6.into(), 64)?;
                up(&topo.node, &host_if)?;
                let ipv4 = Ipv4Addr::new(10, 200, s, 2);
                let ipv6 = Ipv6Addr::new(0xfd00, 0x200, s.into(), 0, 0, 0, 0, 2);
                pod_side(&ns, &pod_if, ipv4, ipv6, gw4, gw6)?;
                Pod {
                    name: name.clone(),
                    ipv4,
                    ipv6,
                    node_if: host_if,
                    inside_if: pod_if,
                    ns,
                }
            };
            topo.pods.push(pod);
        }

        if self.verify {
            for pod in &topo.pods {
                for addr in [pod.addr_v4(0), pod.addr_v6(0)] {
                    verify(&topo.client, pod, addr)?;
                }
            }
        }
        Ok(topo)
    }
}


fn make_bridge(node: &Netns, bridge: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<()> {
    // No multicast snooping: neighbor discovery must reach every port at once.
    node.ip(&[
        "link",
        "add",
        bridge,
        "type",
        "bridge",
        "mcast_snooping",
        "0",
    ])?;
    addr(node, bridge, v4.into(), 24)?;
    addr(node, bridge, v6.into(), 64)?;
    up(node, bridge)
}

fn pod_side(
    ns: &Netns,
    dev: &str,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    gw4: Ipv4Addr,
    gw6: Ipv6Addr,
) -> Result<()> {
    addr(ns, dev, ipv4.into(), 24)?;
    addr(ns, dev, ipv6.into(), 64)?;
    up(ns, dev)?;
    ns.ip(&["route", "add", "default", "via", &gw4.to_string()])?;
    ns.ip(&["-6", "route", "add", "default", "via", &gw6.to_string()])
        .map(drop)
}

/// One TCP connection from the client to a throwaway server in the pod.
fn verify(client: &Netns, pod: &Pod, addr: SocketAddr) -> Result<()> {
    let server = TcpServer::start(pod.ns(), addr)?;
    let conn = TcpConn::connect(client, server.addr())
        .with_context(|| format!("checking the client can reach pod {} at {addr}", pod.name))?;
    conn.close()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Subnets go round 1..=250, never 0 or 255.
    #[test]
    fn subnets_go_round_without_zero() {
        let c = AtomicU8::new(0);
        let first: Vec<u8> = (0..250).map(|_| next_subnet(&c)).collect();
        assert_eq!(first, (1..=250).collect::<Vec<u8>>());
        // The u8 counter itself wraps at 256, not at 250: still never 0.
        assert!((0..600).map(|_| next_subnet(&c)).all(|s| (1..=250).contains(&s)));
    }

    /// Builds both kinds of pods; `build` itself checks TCP over v4 and v6
    /// from the client to every pod. Needs root; passes trivially otherwise.
    #[test]
    fn veth_and_bridge_pods_are_reachable() {
        if crate::require_root().is_err() {
            return;
        }
        let topo = Topology::builder()
            .pod("v1")
            .pod("v2")
            .bridge_pod("b1")
            .bridge_pod("b2")
            .build()
            .unwrap();
        let [v1, v2, b1, b2] = ["v1", "v2", "b1", "b2"].map(|p| topo.pod(p).ipv4().octets());
        assert!(v1[..2] == [10, 200] && v1[3] == 2 && v2[..2] == [10, 200] && v2[3] == 2, "{v1:?} {v2:?}");
        assert_ne!(v1[2], v2[2], "each veth pod has its own subnet");
        assert_eq!((b1[..3] == b2[..3], b1[1], b1[3], b2[3]), (true, 201, 2, 3), "bridge pods share its subnet");
        assert_eq!(topo.pod("b1").node_if(), topo.bridge().unwrap());
        // Outbound too: a pod reaches a server in the client namespace.
        let server = TcpServer::start(topo.client(), SocketAddr::new(CLIENT_V6.into(), 0)).unwrap();
        TcpConn::connect(topo.pod("b2").ns(), server.addr())
            .unwrap()
            .close()
            .unwrap();
        // Nothing of ours in the root namespace.
        let root = crate::run_cmd(std::process::Command::new("ip").args(["-o", "link"])).unwrap();
        assert!(
            !root.contains(topo.tag()),
            "an interface leaked into the root namespace: {root}"
        );
        let names: Vec<String> = [topo.client(), topo.node()]
            .iter()
            .map(|n| n.name().to_owned())
            .collect();
        drop(topo);
        let left =
            crate::run_cmd(std::process::Command::new("ip").args(["netns", "list"])).unwrap();
        for name in names {
            assert!(
                !left.contains(&name),
                "{name} still exists after drop: {left}"
            );
        }
    }
}
