//! The breaks that steering (issue 3) must fix, shown without any agent on a
//! Service implemented the way kube-proxy does it (iptables mode and nftables
//! mode), in network namespaces: a client, node A with pods a1 and a2, node B
//! with pod b1.
//!
//! Every "break" test asserts that the break HAPPENS: it proves the scenario
//! is real. Once the agent pins flows, each gets a twin that runs the same
//! steps with the agent and asserts no break.
//!
//! Each test first checks that removing the endpoint from the rules alone
//! does not break the flow (conntrack keeps it on its pod), then removes the
//! conntrack state the way it goes in real clusters, and watches the flow:
//! - TCP: `conntrack -D` of the endpoint's entries (or `conntrack -F`); the
//!   client's next segment is picked up mid-stream as a new connection
//!   (`nf_conntrack_tcp_loose`), kube-proxy's rules DNAT it to another pod,
//!   which answers with a RST;
//! - UDP: kube-proxy's own cleanup of the stopped endpoint's UDP entries;
//!   the next datagram of the same session goes to another pod.
//!
//! Needs root. Run with `--nocapture` to see the rules and conntrack tables.

#![allow(clippy::doc_markdown)] // Kubernetes words (ClusterIP, NodePort) are prose here


#[path = "steering/bed.rs"]
mod bed;
#[path = "steering/breaks.rs"]
mod breaks;
#[path = "steering/long_drain.rs"]
mod long_drain;
#[path = "steering/policy_routing.rs"]
mod policy_routing;
#[path = "steering/with_agent.rs"]
mod with_agent;

use std::time::Duration;

use anyhow::Result;
use conndrain_tests::kubeproxy::{self, Backend};

use bed::{Clear, Front};
use breaks::{
    FRAGMENTED, ipvs_tcp_clusterip_graceful, masquerade_as_kube_proxy, new_flows_avoid_removed, tcp_breaks, udp_moves,
    udp_moves_padded,
};
use with_agent::{
    nodeport_tcp_over_l3_link_breaks, nodeport_tcp_over_l3_link_holds, nodeport_udp_over_l3_link_moves,
    nodeport_udp_over_l3_link_stays, tcp_holds, tcp_resets_when_pinned_pod_goes, udp_stays, udp_stays_padded,
};

const TCP_PORT: u16 = 80;
const TCP_TARGET: u16 = 8080;
const TCP_NODE_PORT: u16 = 30080;
const UDP_PORT: u16 = 53;
const UDP_TARGET: u16 = 5353;
const UDP_NODE_PORT: u16 = 30053;
const VIP_V4: &str = "10.96.0.10";
const VIP_V6: &str = "fd00:96::10";

/// How long a flow may take to show its break. It takes one request (100 ms)
/// plus at most the client's 3 s "no answer" timeout; this is generous.
const BREAK_WITHIN: Duration = Duration::from_secs(15);

macro_rules! both_backends {
    ($($name:ident => |$b:ident| $body:expr;)*) => {
        mod iptables {
            use super::*;
            $(#[test] fn $name() -> Result<()> { let $b = Backend::Iptables; $body })*
        }
        mod nftables {
            use super::*;
            $(#[test] fn $name() -> Result<()> { let $b = Backend::Nftables; $body })*
        }
    };
}

both_backends! {
    clusterip_tcp_v4_breaks_when_conntrack_entries_go =>
        |b| tcp_breaks(b, Front::ClusterIp, false, "a1", Clear::DeleteEndpoint);
    clusterip_tcp_v6_breaks_when_conntrack_entries_go =>
        |b| tcp_breaks(b, Front::ClusterIp, true, "a1", Clear::DeleteEndpoint);
    clusterip_tcp_v4_remote_breaks_on_conntrack_flush =>
        |b| tcp_breaks(b, Front::ClusterIp, false, "b1", Clear::Flush);
    nodeport_remote_tcp_breaks_on_conntrack_flush =>
        |b| tcp_breaks(b, Front::NodePort, false, "b1", Clear::Flush);
    clusterip_udp_v4_session_moves_after_kube_proxy_cleanup =>
        |b| udp_moves(b, Front::ClusterIp, false, "a1");
    clusterip_udp_v6_session_moves_after_kube_proxy_cleanup =>
        |b| udp_moves(b, Front::ClusterIp, true, "a1");
    nodeport_remote_udp_session_moves_after_kube_proxy_cleanup =>
        |b| udp_moves(b, Front::NodePort, false, "b1");
    clusterip_udp_v4_fragmented_session_moves_after_kube_proxy_cleanup =>
        |b| udp_moves_padded(b, Front::ClusterIp, false, "a1", FRAGMENTED);
    new_flows_land_only_on_remaining_pods =>
        |b| new_flows_avoid_removed(b);
    masquerade_as_kube_proxy_does =>
        |b| masquerade_as_kube_proxy(b);

    // With the agent: each break above, and no break.
    with_agent_clusterip_tcp_v4_holds_when_conntrack_entries_go =>
        |b| tcp_holds(b, Front::ClusterIp, false, "a1", Clear::DeleteEndpoint);
    with_agent_clusterip_tcp_v6_holds_when_conntrack_entries_go =>
        |b| tcp_holds(b, Front::ClusterIp, true, "a1", Clear::DeleteEndpoint);
    with_agent_clusterip_tcp_v4_remote_holds_on_conntrack_flush =>
        |b| tcp_holds(b, Front::ClusterIp, false, "b1", Clear::Flush);
    with_agent_nodeport_remote_tcp_holds_on_conntrack_flush =>
        |b| tcp_holds(b, Front::NodePort, false, "b1", Clear::Flush);
    with_agent_clusterip_udp_v4_session_stays_after_kube_proxy_cleanup =>
        |b| udp_stays(b, Front::ClusterIp, false, "a1");
    with_agent_clusterip_udp_v6_session_stays_after_kube_proxy_cleanup =>
        |b| udp_stays(b, Front::ClusterIp, true, "a1");
    with_agent_nodeport_remote_udp_session_stays_after_kube_proxy_cleanup =>
        |b| udp_stays(b, Front::NodePort, false, "b1");
    with_agent_clusterip_udp_v4_fragmented_session_stays_after_kube_proxy_cleanup =>
        |b| udp_stays_padded(b, Front::ClusterIp, false, "a1", FRAGMENTED);
    with_agent_clusterip_udp_v6_fragmented_session_stays_after_kube_proxy_cleanup =>
        |b| udp_stays_padded(b, Front::ClusterIp, true, "a1", FRAGMENTED);
    with_agent_nodeport_remote_udp_fragmented_session_stays_after_kube_proxy_cleanup =>
        |b| udp_stays_padded(b, Front::NodePort, false, "b1", FRAGMENTED);
    with_agent_pinned_pod_deleted_client_gets_rst =>
        |b| tcp_resets_when_pinned_pod_goes(b);

    // Node A to node B over an L3 link (no Ethernet header: ipip, `WireGuard`).
    nodeport_remote_tcp_over_l3_link_breaks_on_conntrack_flush =>
        |b| nodeport_tcp_over_l3_link_breaks(b, false);
    nodeport_remote_tcp_v6_over_l3_link_breaks_on_conntrack_flush =>
        |b| nodeport_tcp_over_l3_link_breaks(b, true);
    nodeport_remote_udp_over_l3_link_moves_after_kube_proxy_cleanup =>
        |b| nodeport_udp_over_l3_link_moves(b);
    with_agent_nodeport_remote_tcp_over_l3_link_holds_on_conntrack_flush =>
        |b| nodeport_tcp_over_l3_link_holds(b, false);
    with_agent_nodeport_remote_tcp_v6_over_l3_link_holds_on_conntrack_flush =>
        |b| nodeport_tcp_over_l3_link_holds(b, true);
    with_agent_nodeport_remote_udp_over_l3_link_stays_after_kube_proxy_cleanup =>
        |b| nodeport_udp_over_l3_link_stays(b);
}

/// kube-proxy's IPVS mode: each test first checks that this kernel has IPVS
/// (the host's has none: there they print `skipped: no IPVS in this kernel`
/// and pass; the guest stage sets `CONNDRAIN_REQUIRE_IPVS=1`, so there they
/// fail without it).
macro_rules! ipvs_tests {
    ($($name:ident => $body:expr;)*) => {
        mod ipvs {
            use super::*;
            $(#[test] fn $name() -> Result<()> {
                if !kubeproxy::ipvs_or_skip()? {
                    return Ok(());
                }
                $body
            })*
        }
    };
}

ipvs_tests! {
    clusterip_tcp_stream_keeps_its_pod_through_graceful_termination =>
        ipvs_tcp_clusterip_graceful();
    clusterip_udp_v4_session_moves_after_kube_proxy_cleanup =>
        udp_moves(Backend::Ipvs, Front::ClusterIp, false, "a1");
    nodeport_remote_udp_session_moves_after_kube_proxy_cleanup =>
        udp_moves(Backend::Ipvs, Front::NodePort, false, "b1");
    nodeport_remote_tcp_breaks_on_conntrack_flush =>
        tcp_breaks(Backend::Ipvs, Front::NodePort, false, "b1", Clear::Flush);
    new_flows_land_only_on_remaining_pods =>
        new_flows_avoid_removed(Backend::Ipvs);

    with_agent_clusterip_tcp_v4_holds_when_conntrack_entries_go =>
        tcp_holds(Backend::Ipvs, Front::ClusterIp, false, "a1", Clear::DeleteEndpoint);
    with_agent_nodeport_remote_tcp_holds_on_conntrack_flush =>
        tcp_holds(Backend::Ipvs, Front::NodePort, false, "b1", Clear::Flush);
    with_agent_clusterip_udp_v4_session_stays_after_kube_proxy_cleanup =>
        udp_stays(Backend::Ipvs, Front::ClusterIp, false, "a1");
    with_agent_nodeport_remote_udp_session_stays_after_kube_proxy_cleanup =>
        udp_stays(Backend::Ipvs, Front::NodePort, false, "b1");
}
