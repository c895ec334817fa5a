//! The test bed: the cluster, kube-proxy on both nodes, the app in every pod,
//! and reading node A's conntrack table.

use std::net::{IpAddr, SocketAddr};

use anyhow::Result;
use conndrain_tests::kubeproxy::{
    self, Backend, CLIENT_V4, CLIENT_V6, Cluster, KubeProxy, NODE_A_LINK_V4, NODE_A_LINK_V6, NODE_A_TUN_V4,
    NODE_A_TUN_V6, NODE_A_V4, NODE_A_V6, NODE_B_V4, NODE_B_V6, Node, PodApp, Protocol, Service, ServicePort, TunLink,
};
use conndrain_tests::{Netns, require_root};

use super::{TCP_NODE_PORT, TCP_PORT, TCP_TARGET, UDP_NODE_PORT, UDP_PORT, UDP_TARGET, VIP_V4, VIP_V6};

/// A cluster with the app in every pod and kube-proxy on both nodes, all
/// three pods serving.
pub struct Bed {
    // Drop order: proxies and apps before the namespaces.
    pub proxies: Vec<KubeProxy>,
    apps: Vec<PodApp>,
    service: Service,
    /// The L3 link IPv4 pod traffic takes between the nodes, and node A's
    /// device (see `over_l3_link`); else the veth.
    pub l3_link: Option<(TunLink, String)>,
    pub cluster: Cluster,
}

impl Bed {
    pub fn new(backend: Backend) -> Result<Self> {
        require_root()?;
        let cluster = Cluster::build(&[("a1", Node::A), ("a2", Node::A), ("b1", Node::B)])?;
        let apps = cluster
            .pods()
            .iter()
            .map(|p| PodApp::start(p, TCP_TARGET, UDP_TARGET))
            .collect::<Result<Vec<_>>>()?;
        let service = Service {
            namespace: "default".into(),
            name: "web".into(),
            cluster_ips: vec![VIP_V4.parse()?, VIP_V6.parse()?],
            ports: vec![
                ServicePort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: TCP_PORT,
                    target_port: TCP_TARGET,
                    node_port: Some(TCP_NODE_PORT),
                },
                ServicePort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: UDP_PORT,
                    target_port: UDP_TARGET,
                    node_port: Some(UDP_NODE_PORT),
                },
            ],
        };
        let proxies = vec![
            KubeProxy::start(
                cluster.node_a(),
                backend,
                &service,
                &[NODE_A_V4.into(), NODE_A_V6.into()],
            )?,
            KubeProxy::start(
                cluster.node_b(),
                backend,
                &service,
                &[NODE_B_V4.into(), NODE_B_V6.into()],
            )?,
        ];
        let bed = Self {
            proxies,
            apps,
            service,
            l3_link: None,
            cluster,
        };
        bed.sync(&["a1", "a2", "b1"])?;
        Ok(bed)
    }

    /// The traffic between the nodes' pods takes an L3 link (TUN devices, no
    /// Ethernet header, like ipip or `WireGuard`) instead of the veth; NodePort
    /// traffic to node B is masqueraded to node A's addresses on it.
    pub fn over_l3_link(mut self) -> Result<Self> {
        self.l3_link = Some(self.cluster.route_pods_over_l3_link()?);
        Ok(self)
    }

    /// The address pod `target` sees the client's flow through `front` come
    /// from, if known (see `expected_peer`).
    pub fn expected_peer(&self, front: Front, target: &str, v6: bool) -> Option<IpAddr> {
        let node = self.cluster.pod(target).node();
        if self.l3_link.is_some() && matches!(front, Front::NodePort) && node == Node::B {
            return Some(if v6 { NODE_A_TUN_V6.into() } else { NODE_A_TUN_V4.into() });
        }
        expected_peer(front, node, v6)
    }

    /// kube-proxy's sync on every node: the endpoints are now `pods`.
    pub fn sync(&self, pods: &[&str]) -> Result<()> {
        let ips: Vec<IpAddr> = pods
            .iter()
            .flat_map(|p| self.cluster.pod(p).ips())
            .collect();
        for proxy in &self.proxies {
            proxy.sync(&ips)?;
        }
        Ok(())
    }

    pub fn node_a(&self) -> &KubeProxy {
        &self.proxies[0]
    }

    pub fn app(&self, pod: &str) -> &PodApp {
        self.apps
            .iter()
            .find(|a| a.name() == pod)
            .expect("an app per pod")
    }

    pub fn client(&self) -> &Netns {
        self.cluster.client()
    }

    /// Where the client sends to: ClusterIP or node A's NodePort.
    pub fn frontend(&self, front: Front, v6: bool, proto: Protocol) -> SocketAddr {
        let like: IpAddr = if v6 { VIP_V6 } else { VIP_V4 }.parse().expect("an IP");
        let port = self.service.port(proto).expect("the service has the port");
        match front {
            Front::ClusterIp => SocketAddr::new(
                self.service.cluster_ip(like).expect("dual stack"),
                port.port,
            ),
            Front::NodePort => {
                Cluster::node_port(like, port.node_port.expect("a NodePort service"))
            }
        }
    }

    /// Node A's conntrack table, printed for `--nocapture` runs.
    pub fn show_conntrack(&self, when: &str) -> Result<String> {
        let ct = self.node_a().conntrack()?;
        eprintln!("--- node A conntrack, {when} ---\n{ct}");
        Ok(ct)
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Front {
    ClusterIp,
    NodePort,
}

/// How the conntrack state of the TCP flow goes away.
#[derive(Debug, Clone, Copy)]
pub enum Clear {
    /// `conntrack -D --reply-src <endpoint>`.
    DeleteEndpoint,
    /// `conntrack -F`.
    Flush,
}

/// The one conntrack line (of `conntrack -L`) of the client's flow: the one
/// with the client's source port and the frontend's destination port.
pub fn entry_of(ct: &str, client: SocketAddr, front: SocketAddr) -> Option<&str> {
    // The original tuple is the first one: `... sport=<client> dport=<front> src=...`.
    let orig = format!(" sport={} dport={} ", client.port(), front.port());
    ct.lines().find(|l| l.contains(&orig))
}

/// The pod a `[NEW]` conntrack event for the client's flow maps it to (the
/// reply source), if the events have one.
pub fn remapped_to<'a>(
    events: &str,
    client: SocketAddr,
    front: SocketAddr,
    bed: &'a Bed,
) -> Option<&'a str> {
    let line = events
        .lines()
        .filter(|l| l.contains("[NEW]"))
        .find_map(|l| entry_of(l, client, front))?;
    let reply = reply_part(line);
    let src = reply.strip_prefix(" src=")?.split_whitespace().next()?;
    bed.cluster
        .pod_by_ip(src.parse().ok()?)
        .map(kubeproxy::ClusterPod::name)
}

/// The reply direction of a conntrack line: `src=... dst=... sport=... dport=...`.
pub fn reply_part(line: &str) -> &str {
    // The second " src=" starts the reply tuple.
    let mut idx = line.match_indices(" src=").map(|(i, _)| i);
    idx.next();
    idx.next().map_or("", |i| &line[i..])
}

/// The address the pod sees as its peer for a flow through `front` from the
/// client: the client itself, or (NodePort, masqueraded) a node A address.
pub fn expected_peer(front: Front, pod_node: Node, v6: bool) -> Option<IpAddr> {
    match (front, pod_node, v6) {
        (Front::ClusterIp, _, false) => Some(CLIENT_V4.into()),
        (Front::ClusterIp, _, true) => Some(CLIENT_V6.into()),
        (Front::NodePort, Node::B, false) => Some(NODE_A_LINK_V4.into()),
        (Front::NodePort, Node::B, true) => Some(NODE_A_LINK_V6.into()),
        // The address of node A's end of the pod's veth: 10.244.1.1 for v4.
        (Front::NodePort, Node::A, false) => Some("10.244.1.1".parse().expect("an IP")),
        // IPv6 masquerade picks a source from any interface: not pinned here.
        (Front::NodePort, Node::A, true) => None,
    }
}
