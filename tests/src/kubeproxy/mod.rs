//! A Kubernetes Service implemented the way kube-proxy does it, in network
//! namespaces: the ground the steering feature (issue 3) stands on.
//!
//! ```text
//!  client ns                node A ns                               node B ns
//!  172.18.0.2  ---veth---   172.18.0.10 (node IP, NodePort)
//!  fd00:18::2               fd00:18::10
//!                           172.19.0.1   ------- veth -------       172.19.0.2
//!                           fd00:19::1                              fd00:19::2
//!                           pod a1 10.244.1.2  fd00:244:1::2        pod b1 10.244.2.2  fd00:244:2::2
//!                           pod a2 10.244.1.3  fd00:244:1::3
//!  ClusterIPs 10.96.0.0/16 and fd00:96::/112 are routed from the client to node A.
//! ```
//!
//! - [`Cluster`]: the namespaces, one veth per pod (like most CNIs), routes
//!   between the nodes' pod CIDRs over the inter-node link.
//! - [`KubeProxy`]: kube-proxy's ruleset for one [`Service`] on one node, with
//!   [`Backend::Iptables`] (`iptables-restore`, KUBE-SERVICES / KUBE-SVC /
//!   KUBE-SEP / KUBE-NODEPORTS / KUBE-POSTROUTING chains) or
//!   [`Backend::Nftables`] (`nft -f`, the `kube-proxy` tables of the
//!   nftables mode) or [`Backend::Ipvs`] (IPVS virtual servers through
//!   `ipvsadm`, VIPs on `kube-ipvs0`, graceful termination; kernels with
//!   IPVS only); a full-ruleset [`sync`](KubeProxy::sync) that replaces
//!   the endpoints atomically, and kube-proxy's UDP conntrack cleanup.
//! - [`TunLink`]: an inter-node link without Ethernet headers (TUN devices,
//!   `ARPHRD_NONE` like `WireGuard`), for [`Cluster::route_pods_over_l3_link`].
//! - [`PodApp`]: a TCP and a UDP server in a pod that answer with the pod's name.
//! - [`Conversation`]: a client that talks to a Service every 100 ms on a
//!   thread and records which pod answered, to detect a break.
//!
//! Everything goes away on drop: the namespaces take their rules, conntrack
//! tables and sockets with them.

// Kubernetes words (ClusterIP, NodePort, EndpointSlice) are prose here, not code.
#![allow(clippy::doc_markdown)]

mod apps;
mod cluster;
mod ipvs;
mod proxy;
mod tunnel;

pub use apps::{Conversation, PodApp, Reply};
pub use cluster::{
    CLIENT_V4, CLIENT_V6, CLUSTER_CIDR_V4, CLUSTER_CIDR_V6, Cluster, ClusterPod, NODE_A_LINK_V4, NODE_A_LINK_V6,
    NODE_A_TUN_V4, NODE_A_TUN_V6, NODE_A_V4, NODE_A_V6, NODE_B_TUN_V4, NODE_B_TUN_V6, NODE_B_V4, NODE_B_V6, Node, SERVICE_CIDR_V4, SERVICE_CIDR_V6,
};
pub use ipvs::{DUMMY as IPVS_DUMMY, RealServer, VirtualServer, ipvs_available, ipvs_or_skip};
pub use proxy::{Backend, ConntrackEvents, KubeProxy, Protocol, Service, ServicePort};
pub use tunnel::TunLink;
