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


use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use conndrain_tests::{Agent, Cli, Netns, TIMEOUT, require_root, unique_tag, wait_until};
use conndrain_tests::kubeproxy::{self, 
    Backend, CLIENT_V4, CLIENT_V6, Cluster, Conversation, KubeProxy, NODE_A_LINK_V4,
    NODE_A_LINK_V6, NODE_A_TUN_V4, NODE_A_TUN_V6, NODE_A_V4, NODE_A_V6, NODE_B_V4, NODE_B_V6, Node, PodApp, Protocol, Reply,
    Service, ServicePort, TunLink,
};
use serde_json::Value;

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

/// A cluster with the app in every pod and kube-proxy on both nodes, all
/// three pods serving.
struct Bed {
    // Drop order: proxies and apps before the namespaces.
    proxies: Vec<KubeProxy>,
    apps: Vec<PodApp>,
    service: Service,
    /// The L3 link IPv4 pod traffic takes between the nodes, and node A's
    /// device (see `over_l3_link`); else the veth.
    l3_link: Option<(TunLink, String)>,
    cluster: Cluster,
}

impl Bed {
    fn new(backend: Backend) -> Result<Self> {
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
    fn over_l3_link(mut self) -> Result<Self> {
        self.l3_link = Some(self.cluster.route_pods_over_l3_link()?);
        Ok(self)
    }

    /// The address pod `target` sees the client's flow through `front` come
    /// from, if known (see `expected_peer`).
    fn expected_peer(&self, front: Front, target: &str, v6: bool) -> Option<IpAddr> {
        let node = self.cluster.pod(target).node();
        if self.l3_link.is_some() && matches!(front, Front::NodePort) && node == Node::B {
            return Some(if v6 { NODE_A_TUN_V6.into() } else { NODE_A_TUN_V4.into() });
        }
        expected_peer(front, node, v6)
    }

    /// kube-proxy's sync on every node: the endpoints are now `pods`.
    fn sync(&self, pods: &[&str]) -> Result<()> {
        let ips: Vec<IpAddr> = pods
            .iter()
            .flat_map(|p| self.cluster.pod(p).ips())
            .collect();
        for proxy in &self.proxies {
            proxy.sync(&ips)?;
        }
        Ok(())
    }

    fn node_a(&self) -> &KubeProxy {
        &self.proxies[0]
    }

    fn app(&self, pod: &str) -> &PodApp {
        self.apps
            .iter()
            .find(|a| a.name() == pod)
            .expect("an app per pod")
    }

    fn client(&self) -> &Netns {
        self.cluster.client()
    }

    /// Where the client sends to: ClusterIP or node A's NodePort.
    fn frontend(&self, front: Front, v6: bool, proto: Protocol) -> SocketAddr {
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
    fn show_conntrack(&self, when: &str) -> Result<String> {
        let ct = self.node_a().conntrack()?;
        eprintln!("--- node A conntrack, {when} ---\n{ct}");
        Ok(ct)
    }
}

#[derive(Debug, Clone, Copy)]
enum Front {
    ClusterIp,
    NodePort,
}

/// How the conntrack state of the TCP flow goes away.
#[derive(Debug, Clone, Copy)]
enum Clear {
    /// `conntrack -D --reply-src <endpoint>`.
    DeleteEndpoint,
    /// `conntrack -F`.
    Flush,
}

/// The one conntrack line (of `conntrack -L`) of the client's flow: the one
/// with the client's source port and the frontend's destination port.
fn entry_of(ct: &str, client: SocketAddr, front: SocketAddr) -> Option<&str> {
    // The original tuple is the first one: `... sport=<client> dport=<front> src=...`.
    let orig = format!(" sport={} dport={} ", client.port(), front.port());
    ct.lines().find(|l| l.contains(&orig))
}

/// The pod a `[NEW]` conntrack event for the client's flow maps it to (the
/// reply source), if the events have one.
fn remapped_to<'a>(
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
fn reply_part(line: &str) -> &str {
    // The second " src=" starts the reply tuple.
    let mut idx = line.match_indices(" src=").map(|(i, _)| i);
    idx.next();
    idx.next().map_or("", |i| &line[i..])
}

/// The address the pod sees as its peer for a flow through `front` from the
/// client: the client itself, or (NodePort, masqueraded) a node A address.
fn expected_peer(front: Front, pod_node: Node, v6: bool) -> Option<IpAddr> {
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

/// A long-lived TCP stream to pod `target` through `front`; the endpoint is
/// removed from the rules, then its conntrack state is cleared: the stream
/// must break.
fn tcp_breaks(backend: Backend, front: Front, v6: bool, target: &str, clear: Clear) -> Result<()> {
    tcp_breaks_on(Bed::new(backend)?, backend, front, v6, target, clear)
}

/// `tcp_breaks` on `bed`, which it owns (torn down when it returns).
#[expect(clippy::needless_pass_by_value, reason = "the test owns its bed")]
fn tcp_breaks_on(bed: Bed, backend: Backend, front: Front, v6: bool, target: &str, clear: Clear) -> Result<()> {
    let to = bed.frontend(front, v6, Protocol::Tcp);
    let pod = bed.cluster.pod(target);
    let pod_ip = pod.ip_like(to.ip());
    let conv = Conversation::landing_on(bed.client(), to, None, target)?;
    conv.expect_steady(5)?;

    // What kube-proxy's translation left in node A's conntrack table.
    let ct = bed.show_conntrack(&format!(
        "{target} serving the stream {} -> {to}",
        conv.local_addr()
    ))?;
    let line = entry_of(&ct, conv.local_addr(), to)
        .with_context(|| format!("no conntrack entry for the stream on node A:\n{ct}"))?;
    ensure!(
        reply_part(line).contains(&format!("src={pod_ip} ")),
        "the entry maps the stream to {target} ({pod_ip}): {line}"
    );
    if pod.node() == Node::B {
        eprintln!(
            "--- node B conntrack (forwarded, no NAT) ---\n{}",
            bed.proxies[1].conntrack()?
        );
    }
    if let Some(peer) = bed.expected_peer(front, target, v6) {
        ensure!(
            bed.app(target).peers().iter().any(|p| p.ip() == peer),
            "{target} sees the stream from {peer}: {:?}",
            bed.app(target).peers()
        );
    }

    // Removing the endpoint from the rules alone does not move the stream:
    // its conntrack entry keeps it on its pod.
    let rest: Vec<&str> = ["a1", "a2", "b1"]
        .into_iter()
        .filter(|p| *p != target)
        .collect();
    bed.sync(&rest)?;
    eprintln!(
        "--- node A rules after removing {target} ---\n{}",
        bed.node_a().ruleset()?
    );
    conv.expect_steady(5)
        .context("after the sync, before the conntrack entries go")?;

    let events = bed.node_a().watch_conntrack()?;
    match clear {
        Clear::DeleteEndpoint => {
            let n = bed.node_a().delete_conntrack_of(pod_ip)?;
            ensure!(
                n >= 1,
                "conntrack -D --reply-src {pod_ip} deleted the stream's entry"
            );
        }
        Clear::Flush => bed.node_a().flush_conntrack()?,
    }

    let broke = conv.wait_break(BREAK_WITHIN);
    let events = events.stop();
    eprintln!("--- node A conntrack events from the clearing on ---\n{events}");
    let ct = bed.show_conntrack("after the break")?;
    eprintln!("replies: {:?}", conv.replies());
    match broke {
        Some(Reply::Failed(how)) => {
            eprintln!("{backend:?} {front:?} v6={v6}: the stream to {target} broke: {how}");
            if let Some(line) = entry_of(&ct, conv.local_addr(), to) {
                eprintln!("its new conntrack entry: {line}");
            }
            // Why: the client's next segment was picked up mid-stream as a new
            // connection (nf_conntrack_tcp_loose) and DNATed to another pod.
            // The break (a RST) is what this test asserts. The conntrack event
            // explains it, but `conntrack -E` can miss it on a loaded machine
            // (it subscribes asynchronously, and the new entry dies at once),
            // so it is checked only when it was captured.
            match remapped_to(&events, conv.local_addr(), to, &bed) {
                // IPVS keeps its own connection table: the new conntrack
                // entry goes to the same pod, but the masquerade picked a new
                // source port, which the pod does not know.
                Some(p) if backend == Backend::Ipvs => {
                    eprintln!("IPVS re-forwarded the stream to {p} with a new masquerade port")
                }
                Some(p) => ensure!(
                    p != target,
                    "a new conntrack entry maps the stream to another pod, not {p}"
                ),
                None => {
                    eprintln!("note: conntrack -E captured no event for the stream: {events:?}")
                }
            }
            Ok(())
        }
        Some(Reply::Pod(other)) => bail!("a TCP stream cannot answer from {other}"),
        None => bail!(
            "the stream to {target} did not break within {BREAK_WITHIN:?} after its endpoint \
             was removed and its conntrack state cleared: the scenario does not reproduce"
        ),
    }
}

/// Padding of the sessions of the `*_fragmented_*` tests: 3000 bytes more
/// in every request and answer, over the testbed's 1500-byte MTU on every
/// link, so each datagram leaves its sender (the client, the pod) in three
/// IP fragments.
const FRAGMENTED: usize = 3000;

/// A session id (`Conversation::udp`) for a new session, padded with `pad`
/// bytes (its datagrams are then that much larger, both ways), and its
/// short form for messages.
fn session_id(pad: usize) -> (String, String) {
    let short = format!("s{}", unique_tag());
    (format!("{short}{}", "-".repeat(pad)), short)
}

/// A UDP session to pod `target` through `front`; the endpoint is removed
/// from the rules and kube-proxy's UDP conntrack cleanup runs: the session's
/// answers must come from another pod.
fn udp_moves(backend: Backend, front: Front, v6: bool, target: &str) -> Result<()> {
    udp_moves_padded(backend, front, v6, target, 0)
}

/// `udp_moves` with every datagram `pad` bytes larger.
fn udp_moves_padded(backend: Backend, front: Front, v6: bool, target: &str, pad: usize) -> Result<()> {
    udp_moves_on(Bed::new(backend)?, backend, front, v6, target, pad)
}

/// `udp_moves_padded` on `bed`, which it owns (torn down when it returns).
#[expect(clippy::needless_pass_by_value, reason = "the test owns its bed")]
fn udp_moves_on(bed: Bed, backend: Backend, front: Front, v6: bool, target: &str, pad: usize) -> Result<()> {
    let to = bed.frontend(front, v6, Protocol::Udp);
    let pod = bed.cluster.pod(target);
    let pod_ip = pod.ip_like(to.ip());
    let (session, short) = session_id(pad);
    let conv = Conversation::landing_on(bed.client(), to, Some(&session), target)?;
    conv.expect_steady(5)?;

    let ct = bed.show_conntrack(&format!(
        "{target} serving session {short} {} -> {to}",
        conv.local_addr()
    ))?;
    let line = entry_of(&ct, conv.local_addr(), to)
        .with_context(|| format!("no conntrack entry for the session on node A:\n{ct}"))?;
    ensure!(
        reply_part(line).contains(&format!("src={pod_ip} ")),
        "the entry maps the session to {target} ({pod_ip}): {line}"
    );
    if let Some(peer) = bed.expected_peer(front, target, v6) {
        ensure!(
            bed.app(target).peers().iter().any(|p| p.ip() == peer),
            "{target} sees the session from {peer}: {:?}",
            bed.app(target).peers()
        );
    }

    let rest: Vec<&str> = ["a1", "a2", "b1"]
        .into_iter()
        .filter(|p| *p != target)
        .collect();
    bed.sync(&rest)?;
    if backend == Backend::Ipvs {
        ipvs_drops_the_entry(&bed, conv.local_addr(), to, pod_ip)?;
    } else {
        conv.expect_steady(5)
            .context("after the sync, before kube-proxy's UDP cleanup")?;
    }

    // kube-proxy's cleanup runs on every node; only node A has the entry.
    let events = bed.node_a().watch_conntrack()?;
    let deleted: usize = bed
        .proxies
        .iter()
        .map(|p| p.cleanup_udp_conntrack(pod_ip))
        .sum::<Result<usize>>()?;
    ensure!(
        deleted >= 1 || backend == Backend::Ipvs,
        "kube-proxy's UDP cleanup deleted the session's entry"
    );

    let moved = conv.wait_break(BREAK_WITHIN);
    let events = events.stop();
    eprintln!("--- node A conntrack events from the cleanup on ---\n{events}");
    let ct = bed.show_conntrack("after kube-proxy's UDP cleanup")?;
    eprintln!("replies: {:?}", conv.replies());
    match moved {
        Some(Reply::Pod(other)) => {
            ensure!(
                rest.contains(&other.as_str()),
                "answers come from a serving pod, got {other}"
            );
            eprintln!(
                "{backend:?} {front:?} v6={v6}: session {short} moved from {target} to {other}"
            );
            if let Some(line) = entry_of(&ct, conv.local_addr(), to) {
                eprintln!("its new conntrack entry: {line}");
            }
            // The new entry, from the events or (if the watcher missed them) the table.
            let to_pod = remapped_to(&events, conv.local_addr(), to, &bed).or_else(|| {
                let line = entry_of(&ct, conv.local_addr(), to)?;
                let src = reply_part(line).strip_prefix(" src=")?.split_whitespace().next()?;
                bed.cluster.pod_by_ip(src.parse().ok()?).map(kubeproxy::ClusterPod::name)
            });
            ensure!(
                to_pod == Some(other.as_str()),
                "a new conntrack entry maps the session to {other}; events:\n{events}\ntable:\n{ct}"
            );
            Ok(())
        }
        Some(Reply::Failed(how)) => bail!("the session failed instead of moving: {how}"),
        None => bail!(
            "session {short} still talks to {target} {BREAK_WITHIN:?} after kube-proxy's \
             UDP cleanup: the scenario does not reproduce"
        ),
    }
}

/// IPVS mode: the sync deleted the session's UDP real server at once (no
/// graceful termination for UDP), and IPVS, with `expire_nodest_conn=1`
/// (kernels from 5.9 flush a deleted real server's connections right away),
/// expires its connections and, with `vs.conntrack=1`, their conntrack
/// entries: the session's entry to `pod_ip` goes before kube-proxy's UDP
/// cleanup runs, which then finds nothing left. Seen in the guest (6.1):
/// the cleanup deleted no entry.
fn ipvs_drops_the_entry(
    bed: &Bed,
    client: SocketAddr,
    to: SocketAddr,
    pod_ip: IpAddr,
) -> Result<()> {
    let to_pod = format!("src={pod_ip} ");
    wait_until(
        "IPVS to drop the conntrack entry of the deleted UDP real server's session",
        TIMEOUT,
        || bed.node_a().conntrack(),
        |ct| entry_of(ct, client, to).is_none_or(|l| !reply_part(l).contains(&to_pod)),
    )?;
    eprintln!(
        "--- node A IPVS connections after the sync ---\n{}",
        bed.node_a().ipvs_connections()?
    );
    Ok(())
}

/// New flows go only to serving endpoints: kube-proxy already does this.
fn new_flows_avoid_removed(backend: Backend) -> Result<()> {
    let bed = Bed::new(backend)?;
    let fronts = [
        (Front::ClusterIp, false),
        (Front::ClusterIp, true),
        (Front::NodePort, false),
        (Front::NodePort, true),
    ];
    let mut session = 0;
    let mut probe = |to: SocketAddr, proto: Protocol| -> Result<String> {
        session += 1;
        let s = format!("n{session}");
        Conversation::probe(
            bed.client(),
            to,
            (proto == Protocol::Udp).then_some(s.as_str()),
        )
    };
    // Before: every pod gets flows.
    for (front, v6) in fronts {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let to = bed.frontend(front, v6, proto);
            let mut seen = BTreeSet::new();
            for _ in 0..200 {
                seen.insert(probe(to, proto)?);
                if seen.len() == 3 {
                    break;
                }
            }
            ensure!(
                seen.len() == 3,
                "{proto:?} flows to {to} reach all three pods: {seen:?}"
            );
        }
    }
    bed.sync(&["a2", "b1"])?;
    // As kube-proxy does after a sync: without it, a UDP probe that happens
    // to reuse an earlier probe's source port follows that probe's
    // conntrack entry to a1.
    for v6 in [false, true] {
        let a1 = bed.cluster.pod("a1").ip_like(bed.frontend(Front::ClusterIp, v6, Protocol::Udp).ip());
        for p in &bed.proxies {
            p.cleanup_udp_conntrack(a1)?;
        }
    }
    for (front, v6) in fronts {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let to = bed.frontend(front, v6, proto);
            let mut seen = BTreeSet::new();
            for _ in 0..30 {
                seen.insert(probe(to, proto)?);
            }
            ensure!(
                !seen.contains("a1"),
                "no new {proto:?} flow to {to} lands on the removed a1: {seen:?}"
            );
            // 30 random picks between two pods: all on one has odds 2^-29.
            ensure!(
                seen.len() == 2,
                "new {proto:?} flows to {to} reach both remaining pods: {seen:?}"
            );
        }
    }
    Ok(())
}

/// The emulation is faithful where it matters to steering: ClusterIP flows
/// keep the client's address, NodePort flows are masqueraded to node A's
/// address on the way to the pod (local: its veth gateway; remote: its
/// inter-node address), as kube-proxy does for `externalTrafficPolicy:
/// Cluster`.
fn masquerade_as_kube_proxy(backend: Backend) -> Result<()> {
    let bed = Bed::new(backend)?;
    for (front, v6, target) in [
        (Front::ClusterIp, false, "a1"),
        (Front::ClusterIp, false, "b1"),
        (Front::ClusterIp, true, "b1"),
        (Front::NodePort, false, "a1"),
        (Front::NodePort, false, "b1"),
        (Front::NodePort, true, "b1"),
    ] {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let to = bed.frontend(front, v6, proto);
            let session = format!("m{}", unique_tag());
            let udp = (proto == Protocol::Udp).then_some(session.as_str());
            let conv = Conversation::landing_on(bed.client(), to, udp, target)?;
            let ct = bed.node_a().conntrack()?;
            let line = entry_of(&ct, conv.local_addr(), to)
                .with_context(|| format!("no conntrack entry for {proto:?} to {to}:\n{ct}"))?;
            eprintln!("{backend:?} {proto:?} {front:?} -> {target}: {line}");
            let peer = expected_peer(front, bed.cluster.pod(target).node(), v6);
            if let Some(peer) = peer {
                ensure!(
                    bed.app(target).peers().iter().any(|p| p.ip() == peer),
                    "{target} sees {proto:?} to {to} from {peer}: {:?}",
                    bed.app(target).peers()
                );
                ensure!(
                    reply_part(line).contains(&format!("dst={peer} ")),
                    "the reply tuple goes to {peer}: {line}"
                );
            }
        }
    }
    Ok(())
}

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

/// IPVS mode, TCP through the ClusterIP, no agent: kube-proxy's graceful
/// termination gives the terminating pod's real server weight 0 while it has
/// connections, and IPVS keeps forwarding the stream from its own
/// connection table, also after the stream's conntrack entry is deleted (the
/// next segment gets a new entry, which IPVS points at the same pod). The
/// UDP real server is deleted at once.
fn ipvs_tcp_clusterip_graceful() -> Result<()> {
    let bed = Bed::new(Backend::Ipvs)?;
    let to = bed.frontend(Front::ClusterIp, false, Protocol::Tcp);
    let a1 = bed.cluster.pod("a1").ip_like(to.ip());
    let conv = Conversation::landing_on(bed.client(), to, None, "a1")?;
    conv.expect_steady(3)?;
    let ct = bed.show_conntrack("a1 serving the stream")?;
    let line = entry_of(&ct, conv.local_addr(), to).with_context(|| {
        format!("with net.ipv4.vs.conntrack=1, IPVS's connection has a conntrack entry:\n{ct}")
    })?;
    ensure!(
        reply_part(line).contains(&format!("src={a1} ")),
        "the entry maps the stream to a1 ({a1}), as an iptables DNAT would: {line}"
    );
    eprintln!(
        "--- node A IPVS connections ---\n{}",
        bed.node_a().ipvs_connections()?
    );

    bed.sync(&["a2", "b1"])?;
    let table = bed.node_a().ipvs_table()?;
    eprintln!(
        "--- node A rules after removing a1 ---\n{}",
        bed.node_a().ruleset()?
    );
    let rs = |proto: Protocol, port: u16| {
        table
            .iter()
            .find(|(vs, _)| vs.protocol == proto && vs.addr == SocketAddr::new(to.ip(), port))
            .and_then(|(_, rss)| rss.iter().find(|r| r.addr.ip() == a1).copied())
    };
    let tcp = rs(Protocol::Tcp, TCP_PORT)
        .context("a1 stays a TCP real server while it has a connection")?;
    ensure!(
        tcp.weight == 0 && tcp.active >= 1,
        "a1's TCP real server: weight 0, the stream active: {tcp:?}"
    );
    ensure!(
        rs(Protocol::Udp, UDP_PORT).is_none(),
        "a1's UDP real server is deleted at once"
    );
    conv.expect_steady(5)
        .context("weight 0: the stream goes on")?;

    let n = bed.node_a().delete_conntrack_of(a1)?;
    ensure!(
        n >= 1,
        "conntrack -D --reply-src {a1} deleted the stream's entry"
    );
    conv.expect_steady(5).context(
        "IPVS's own connection table keeps the stream on a1 after its conntrack entry is deleted",
    )?;
    let ct = bed.show_conntrack("after conntrack -D")?;
    if let Some(line) = entry_of(&ct, conv.local_addr(), to) {
        eprintln!("the stream's new conntrack entry: {line}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// With the agent: the same scenarios, and no break.
// ---------------------------------------------------------------------------

/// The agent on node A (where kube-proxy translates the client's flows), with
/// `target` declared: a local pod, or a pod on node B reached through node A.
fn agent_for(bed: &Bed, target: &str) -> Result<(Agent, Cli)> {
    let agent = Agent::start(bed.cluster.node_a(), &[])?;
    let cli = agent.cli();
    let [v4, v6] = bed.cluster.pod(target).ips();
    cli.ok(&["pod", "add", target, "--ip", &v4.to_string(), "--ip", &v6.to_string()])?;
    Ok((agent, cli))
}

/// `conndrain pod terminate`, then checks the flow through `to` is pinned to
/// `target` in `flows` and counted in `status`.
fn terminate_and_check_pinned(cli: &Cli, target: &str, to: SocketAddr, client: SocketAddr) -> Result<()> {
    cli.ok(&["pod", "terminate", target, "--deadline", "300", "--quiet-period", "1"])?;
    let status = cli.status()?;
    let pins = status["steering"]["pins"].as_array().cloned().unwrap_or_default();
    ensure!(
        pins.iter().any(|p| p["client"] == client.to_string() && p["frontend"] == to.to_string()),
        "`status` lists the flow {client} -> {to} as pinned: {status:#}"
    );
    ensure!(status["steering"]["pinned_flows"].as_u64() >= Some(1), "{status:#}");
    let flows: Value = cli.json(&["flows", "--pod", target, "-o", "json"])?;
    let pinned: Vec<&Value> = flows
        .as_array()
        .map(|a| a.iter().filter(|f| f["pinned"]["frontend"] == to.to_string()).collect())
        .unwrap_or_default();
    ensure!(!pinned.is_empty(), "`flows` shows the flow pinned through {to}: {flows:#}");
    Ok(())
}

/// In IPVS mode, the packet counters (in, out) of node A's virtual server
/// for `to`; `None` in the other modes.
fn ipvs_packets(
    bed: &Bed,
    backend: Backend,
    protocol: Protocol,
    to: SocketAddr,
) -> Result<Option<(u64, u64)>> {
    if backend != Backend::Ipvs {
        return Ok(None);
    }
    bed.node_a()
        .ipvs_packets(kubeproxy::VirtualServer { protocol, addr: to })
        .map(Some)
}

/// Pinned packets are not translated twice: in IPVS mode the virtual
/// server's counters stand still while the pinned flow goes on (the programs
/// redirect its packets past netfilter, so IPVS's LOCAL_IN and FORWARD hooks
/// never see them), and the datapath counted them as steered.
fn ensure_ipvs_saw_none(
    before: Option<(u64, u64)>,
    after: Option<(u64, u64)>,
    steered: (u64, u64),
) -> Result<()> {
    if let (Some(before), Some(after)) = (before, after) {
        eprintln!(
            "IPVS virtual server packets (in, out): {before:?} -> {after:?}; steered packets: {} -> {}",
            steered.0, steered.1
        );
        ensure!(
            after == before,
            "IPVS forwarded none of the pinned flow's packets: its counters (in, out) went {before:?} -> {after:?}"
        );
        ensure!(
            steered.1 > steered.0,
            "the datapath steered the flow's packets meanwhile"
        );
    }
    Ok(())
}

fn steered_packets(cli: &Cli) -> Result<u64> {
    Ok(cli.status()?["steering"]["steered_packets"].as_u64().unwrap_or(0))
}

/// The twin of `tcp_breaks`: with the agent pinning the stream, removing the
/// endpoint and clearing its conntrack state does not break it.
fn tcp_holds(backend: Backend, front: Front, v6: bool, target: &str, clear: Clear) -> Result<()> {
    tcp_holds_on(Bed::new(backend)?, backend, front, v6, target, clear)
}

/// `tcp_holds` on `bed`, which it owns (torn down when it returns).
#[expect(clippy::needless_pass_by_value, reason = "the test owns its bed")]
fn tcp_holds_on(bed: Bed, backend: Backend, front: Front, v6: bool, target: &str, clear: Clear) -> Result<()> {
    let (_agent, cli) = agent_for(&bed, target)?;
    let to = bed.frontend(front, v6, Protocol::Tcp);
    let pod_ip = bed.cluster.pod(target).ip_like(to.ip());
    let conv = Conversation::landing_on(bed.client(), to, None, target)?;
    conv.expect_steady(5)?;
    terminate_and_check_pinned(&cli, target, to, conv.local_addr())?;

    let rest: Vec<&str> = ["a1", "a2", "b1"].into_iter().filter(|p| *p != target).collect();
    bed.sync(&rest)?;
    match clear {
        Clear::DeleteEndpoint => {
            bed.node_a().delete_conntrack_of(pod_ip)?;
        }
        Clear::Flush => bed.node_a().flush_conntrack()?,
    }
    let ipvs_before = ipvs_packets(&bed, backend, Protocol::Tcp, to)?;
    let steered_before = steered_packets(&cli)?;
    conv.expect_steady(20).context(
        "with the agent, the stream keeps its pod after its endpoint and conntrack state are gone",
    )?;
    ensure_ipvs_saw_none(
        ipvs_before,
        ipvs_packets(&bed, backend, Protocol::Tcp, to)?,
        (steered_before, steered_packets(&cli)?),
    )?;
    ensure!(
        steered_packets(&cli)? > 0,
        "the datapath steered the stream's packets"
    );
    if let Some((_, dev)) = &bed.l3_link {
        l3_programs_on(&bed, dev)?;
    }
    Ok(())
}

/// A NodePort flow from the client to pod b1 over the L3 link: node A sends
/// the requests through its TUN device, and b1's replies come back through
/// it, where node A's ingress sees packets without an Ethernet header.
/// Without the agent, the stream breaks on the conntrack flush as over the veth.
fn nodeport_tcp_over_l3_link_breaks(backend: Backend, v6: bool) -> Result<()> {
    let bed = Bed::new(backend)?.over_l3_link()?;
    tcp_breaks_on(bed, backend, Front::NodePort, v6, "b1", Clear::Flush)
}

/// The UDP twin: the session moves after kube-proxy's cleanup.
fn nodeport_udp_over_l3_link_moves(backend: Backend) -> Result<()> {
    let bed = Bed::new(backend)?.over_l3_link()?;
    udp_moves_on(bed, backend, Front::NodePort, false, "b1", 0)
}

/// With the agent, it holds: the requests are steered to the TUN device (an
/// L3 device as the redirect's target), and the replies arriving on it are
/// steered back to the client by the L3 variant of the ingress program,
/// which puts an Ethernet header in front for `bpf_redirect_neigh`. Had they
/// gone on to node A's stack, which no longer knows the flow, node A would
/// have answered b1 with a RST (the masquerade address is its own).
fn nodeport_tcp_over_l3_link_holds(backend: Backend, v6: bool) -> Result<()> {
    let bed = Bed::new(backend)?.over_l3_link()?;
    tcp_holds_on(bed, backend, Front::NodePort, v6, "b1", Clear::Flush)
}

/// With the agent, the UDP session stays: its replies come back over the
/// L3 link and are steered there as the TCP ones.
fn nodeport_udp_over_l3_link_stays(backend: Backend) -> Result<()> {
    let bed = Bed::new(backend)?.over_l3_link()?;
    udp_stays_on(bed, backend, Front::NodePort, false, "b1", 0)
}

/// The agent attached the L3 variants on node A's TUN device `dev` (by its
/// link type): the names of the clsact filters (aya names a filter after its
/// program) and, from Linux 6.6, of the programs on its tcx hooks.
fn l3_programs_on(bed: &Bed, dev: &str) -> Result<()> {
    use aya::programs::{SchedClassifier, TcAttachType};
    use conndrain_common::programs::{EGRESS_L3, INGRESS_L3};
    for (ty, hook, want) in [(TcAttachType::Ingress, "ingress", INGRESS_L3), (TcAttachType::Egress, "egress", EGRESS_L3)] {
        let mut names = bed.cluster.node_a().exec("tc", &["filter", "show", "dev", dev, hook])?;
        if conndrain_tests::kernel_has_tcx() {
            let iface = dev.to_owned();
            names += &bed.cluster.node_a().run(move || -> Result<String> {
                let (_, progs) = SchedClassifier::query_tcx(&iface, ty)?;
                Ok(progs.iter().filter_map(|p| p.name_as_str().map(str::to_owned)).collect::<Vec<_>>().join(" "))
            })??;
        }
        eprintln!("{dev} {hook}: {names}");
        ensure!(names.contains(want), "{want} is on {dev}'s {hook} hook: {names}");
    }
    Ok(())
}

/// The twin of `udp_moves`: the pinned session keeps talking to its pod.
fn udp_stays(backend: Backend, front: Front, v6: bool, target: &str) -> Result<()> {
    udp_stays_padded(backend, front, v6, target, 0)
}

/// `udp_stays` with every datagram `pad` bytes larger. With `FRAGMENTED`,
/// every request and answer is three fragments, and every fragment must be
/// steered: one left to the stack waits in netfilter's reassembly for a
/// first fragment that was redirected past it, and the datagram is lost.
fn udp_stays_padded(backend: Backend, front: Front, v6: bool, target: &str, pad: usize) -> Result<()> {
    udp_stays_on(Bed::new(backend)?, backend, front, v6, target, pad)
}

/// `udp_stays_padded` on `bed`, which it owns (torn down when it returns).
#[expect(clippy::needless_pass_by_value, reason = "the test owns its bed")]
fn udp_stays_on(bed: Bed, backend: Backend, front: Front, v6: bool, target: &str, pad: usize) -> Result<()> {
    let (_agent, cli) = agent_for(&bed, target)?;
    let to = bed.frontend(front, v6, Protocol::Udp);
    let pod_ip = bed.cluster.pod(target).ip_like(to.ip());
    let (session, _) = session_id(pad);
    let conv = Conversation::landing_on(bed.client(), to, Some(&session), target)?;
    conv.expect_steady(5)?;
    terminate_and_check_pinned(&cli, target, to, conv.local_addr())?;

    let rest: Vec<&str> = ["a1", "a2", "b1"].into_iter().filter(|p| *p != target).collect();
    bed.sync(&rest)?;
    if backend == Backend::Ipvs {
        ipvs_drops_the_entry(&bed, conv.local_addr(), to, pod_ip)?;
    }
    let deleted: usize = bed
        .proxies
        .iter()
        .map(|p| p.cleanup_udp_conntrack(pod_ip))
        .sum::<Result<usize>>()?;
    ensure!(
        deleted >= 1 || backend == Backend::Ipvs,
        "kube-proxy's UDP cleanup deleted the session's entry"
    );
    let ipvs_before = ipvs_packets(&bed, backend, Protocol::Udp, to)?;
    let steered_before = steered_packets(&cli)?;
    let answered_before = conv.replies().len();
    conv.expect_steady(20)
        .context("with the agent, the UDP session keeps its pod after kube-proxy's cleanup")?;
    let steered_after = steered_packets(&cli)?;
    let answered = conv.replies().len() - answered_before;
    ensure_ipvs_saw_none(
        ipvs_before,
        ipvs_packets(&bed, backend, Protocol::Udp, to)?,
        (steered_before, steered_after),
    )?;
    if pad >= FRAGMENTED {
        // Each answered request is three fragments each way, all steered
        // (the first answer of the window may have been sent before it).
        let steered = steered_after - steered_before;
        eprintln!("{answered} answers, {steered} packets steered");
        ensure!(
            steered >= 6 * (u64::try_from(answered).unwrap_or(0).saturating_sub(1)),
            "every fragment of the {answered} requests and answers was steered: {steered} packets"
        );
    }
    ensure!(
        steered_packets(&cli)? > 0,
        "the datapath steered the session's packets"
    );
    if let Some((_, dev)) = &bed.l3_link {
        l3_programs_on(&bed, dev)?;
    }
    Ok(())
}

/// The pinned pod is deleted: the client's next segment gets a RST at once
/// (no retransmissions into a black hole until a timeout).
fn tcp_resets_when_pinned_pod_goes(backend: Backend) -> Result<()> {
    let bed = Bed::new(backend)?;
    let (_agent, cli) = agent_for(&bed, "a1")?;
    let to = bed.frontend(Front::ClusterIp, false, Protocol::Tcp);
    let conv = Conversation::landing_on(bed.client(), to, None, "a1")?;
    conv.expect_steady(5)?;
    terminate_and_check_pinned(&cli, "a1", to, conv.local_addr())?;
    bed.sync(&["a2", "b1"])?;
    bed.node_a().flush_conntrack()?;
    conv.expect_steady(5)?;

    // The pod goes: its veth on the node is down (nothing answers any more)
    // and the agent is told.
    let host_if = bed.cluster.pod("a1").host_if().to_owned();
    bed.cluster.node_a().ip(&["link", "set", &host_if, "down"])?;
    cli.ok(&["pod", "remove", "a1"])?;
    match conv.wait_break(BREAK_WITHIN) {
        Some(Reply::Failed(how)) => {
            ensure!(how.contains("reset"), "the client gets a RST, not a timeout: {how}");
        }
        other => bail!("the stream must fail fast with a RST, got {other:?}"),
    }
    let status = cli.status()?;
    ensure!(status["steering"]["resets_sent"].as_u64() >= Some(1), "{status:#}");
    Ok(())
}

/// A stream from the client through the ClusterIP to `target`, pinned by the
/// agent when `target` terminates, with kube-proxy synced without it.
fn pinned_stream_to(bed: &Bed, target: &str) -> Result<(Agent, Cli, Conversation, SocketAddr)> {
    let (agent, cli) = agent_for(bed, target)?;
    let to = bed.frontend(Front::ClusterIp, false, Protocol::Tcp);
    let conv = Conversation::landing_on(bed.client(), to, None, target)?;
    conv.expect_steady(3)?;
    terminate_and_check_pinned(&cli, target, to, conv.local_addr())?;
    let rest: Vec<&str> = ["a1", "a2", "b1"].into_iter().filter(|p| *p != target).collect();
    bed.sync(&rest)?;
    Ok((agent, cli, conv, to))
}

/// Waits until node A's conntrack has no entry of the flow `client` -> `to`.
fn entry_gone(bed: &Bed, flow: &str, client: SocketAddr, to: SocketAddr) -> Result<String> {
    wait_until(
        &format!("{flow}'s conntrack entry to be gone"),
        TIMEOUT,
        || bed.node_a().conntrack(),
        |ct| entry_of(ct, client, to).is_none(),
    )
}

/// A pinned flow's packets bypass netfilter, so conntrack never sees it
/// close. Once the pin of a closed flow is released, the agent deletes the
/// stale entry: left alone it stays ESTABLISHED for days, fills the table, and
/// a new connection reusing the tuple would follow it to the old pod.
#[test]
fn with_agent_a_closed_pinned_flow_leaves_no_conntrack_entry() -> Result<()> {
    let bed = Bed::new(Backend::Iptables)?;
    let (_agent, cli, conv, to) = pinned_stream_to(&bed, "a1")?;
    let client = conv.local_addr();
    conv.expect_steady(3)?;
    let ct = bed.node_a().conntrack()?;
    let entry = entry_of(&ct, client, to)
        .with_context(|| format!("the pinned stream's conntrack entry is there:\n{ct}"))?;
    ensure!(entry.contains("ESTABLISHED"), "the pinned stream's entry: {entry}");

    // The client hangs up: FIN both ways, steered past netfilter.
    drop(conv);
    let pinned = |s: &Value| {
        s["steering"]["pins"]
            .as_array()
            .is_some_and(|pins| pins.iter().any(|p| p["client"] == client.to_string()))
    };
    wait_until("the closed flow's pin to be released", TIMEOUT, || cli.status(), |s| !pinned(s))?;
    entry_gone(&bed, "the closed flow", client, to)
        .context("the agent deletes the stale conntrack entry of a released pinned flow")?;
    Ok(())
}

/// Client ports come round again: a new connection from the port of a
/// pinned flow whose pod is gone (its pin is dead, lingering to answer the old
/// flow's segments with a RST) must be placed by kube-proxy's rules and not be
/// reset. The programs drop the pin at the new connection's SYN, and the agent
/// deleted the old flow's stale conntrack entry when the pod went.
#[test]
fn with_agent_a_new_connection_on_a_dead_pins_tuple_is_placed_by_the_rules() -> Result<()> {
    let bed = Bed::new(Backend::Iptables)?;
    let (_agent, cli, conv, to) = pinned_stream_to(&bed, "a1")?;
    let client = conv.local_addr();

    // a1 goes: its veth is down and the agent is told; the pin turns dead.
    let host_if = bed.cluster.pod("a1").host_if().to_owned();
    bed.cluster.node_a().ip(&["link", "set", &host_if, "down"])?;
    cli.ok(&["pod", "remove", "a1"])?;
    let dead = |s: &Value| {
        s["steering"]["pins"]
            .as_array()
            .is_some_and(|pins| pins.iter().any(|p| p["client"] == client.to_string() && p["dead"] == true))
    };
    wait_until("the pin to turn dead", TIMEOUT, || cli.status(), dead)?;
    // The agent's next sweep (each second) deletes the old flow's conntrack
    // entry, which never saw it end: else a SYN on its tuple would follow it.
    entry_gone(&bed, "the dead flow", client, to)?;
    // The client gives up on the old flow (its FIN is answered with a RST,
    // so the port is free at once), and the same port connects again.
    drop(conv);
    let again = Conversation::tcp_from(bed.client(), client, to)?;
    ensure!(again.pod() != "a1", "the new connection is not sent to the removed pod");
    again
        .expect_steady(5)
        .context("a new connection reusing a dead pin's tuple works (no RST from the dead pin)")?;
    Ok(())
}

/// The Service's IPv4 EndpointSlice: a1 and a2 on node A, b1 on node B,
/// terminating or not.
fn web_slice(bed: &Bed, b1_terminating: bool) -> Result<k8s_openapi::api::discovery::v1::EndpointSlice> {
    let ep = |pod: &str, node: &str, terminating: bool| {
        serde_json::json!({
            "addresses": [bed.cluster.pod(pod).ipv4().to_string()],
            "nodeName": node,
            "conditions": {"ready": !terminating, "serving": true, "terminating": terminating},
        })
    };
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "web-v4", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [ep("a1", "node-a", false), ep("a2", "node-a", false), ep("b1", "node-b", b1_terminating)],
        "ports": [{"name": "http", "port": TCP_TARGET, "protocol": "TCP"}],
    }))?)
}

/// A fake API server and the agent on node A in Kubernetes mode (node
/// `node-a`), with `extra` arguments.
fn kubernetes_agent(bed: &Bed, extra: &[&str]) -> Result<(conndrain_tests::fakeapi::AgentApi, Agent, Cli)> {
    let k8s = conndrain_tests::fakeapi::AgentApi::start(bed.cluster.node_a())?;
    let kc = k8s.kubeconfig_arg();
    let mut args = vec!["--kubeconfig", &kc, "--node-name", "node-a"];
    args.extend_from_slice(extra);
    let agent = Agent::start_with(bed.cluster.node_a(), &args)?;
    let cli = agent.cli();
    Ok((k8s, agent, cli))
}

/// Kubernetes mode: node A's agent learns from the EndpointSlice that b1 (on
/// node B) is terminating, and pins the flows node A's kube-proxy sent to it.
#[test]
fn with_agent_kubernetes_mode_pins_flows_to_a_terminating_remote_endpoint() -> Result<()> {
    let bed = Bed::new(Backend::Iptables)?;
    let (k8s, _agent, cli) = kubernetes_agent(&bed, &[])?;
    let api = &k8s.api;
    let slice = |b1_terminating: bool| web_slice(&bed, b1_terminating);
    api.create_endpoint_slice(slice(false)?);

    let to = bed.frontend(Front::ClusterIp, false, Protocol::Tcp);
    let conv = Conversation::landing_on(bed.client(), to, None, "b1")?;
    conv.expect_steady(5)?;

    // The EndpointSlice controller marks b1 terminating (its pod was deleted).
    api.update_endpoint_slice("default", "web-v4", |s| *s = slice(true).expect("slice"));
    conndrain_tests::wait_until(
        "the agent to pin the flow to b1",
        conndrain_tests::TIMEOUT,
        || cli.status(),
        |s| s["steering"]["pinned_flows"].as_u64() >= Some(1),
    )?;
    bed.sync(&["a1", "a2"])?;
    bed.node_a().flush_conntrack()?;
    conv.expect_steady(20).context("the stream keeps b1 after its endpoint and conntrack state are gone")?;
    ensure!(steered_packets(&cli)? > 0, "the datapath steered the stream");
    Ok(())
}

/// A process on node A itself (a hostNetwork pod, the kubelet) reaches the
/// ClusterIP through OUTPUT: its segments leave without meeting any TC
/// ingress hook, so the programs could steer only its replies while netfilter
/// still translated its requests. The agent leaves such a flow unpinned (it
/// keeps its conntrack entry and its pod, as without the agent) while it
/// pins a peer's flow to the same pod. Before this rule, the node's flow was
/// pinned too (its conntrack entry has the same shape).
#[test]
fn with_agent_a_flow_from_the_node_itself_is_not_pinned() -> Result<()> {
    let bed = Bed::new(Backend::Iptables)?;
    let (_agent, cli) = agent_for(&bed, "a1")?;
    let to = bed.frontend(Front::ClusterIp, false, Protocol::Tcp);
    // Node A has no route of its own to the Service range (the client has
    // one through node A); any will do, OUTPUT's DNAT reroutes to the pod.
    let (client_if, _) = bed.cluster.node_a_ifs();
    bed.cluster.node_a().ip(&["route", "add", kubeproxy::SERVICE_CIDR_V4, "dev", client_if])?;
    let from_node = Conversation::landing_on(bed.cluster.node_a(), to, None, "a1")?;
    let from_peer = Conversation::landing_on(bed.client(), to, None, "a1")?;
    from_node.expect_steady(3)?;
    from_peer.expect_steady(3)?;
    ensure!(
        from_node.local_addr().ip() == IpAddr::V4(NODE_A_V4),
        "the node's flow comes from a node address: {}",
        from_node.local_addr()
    );

    terminate_and_check_pinned(&cli, "a1", to, from_peer.local_addr())?;
    let status = cli.status()?;
    let pins = status["steering"]["pins"].as_array().cloned().unwrap_or_default();
    ensure!(
        !pins.iter().any(|p| p["client"] == from_node.local_addr().to_string()),
        "a flow the node itself opened is not pinned: {status:#}"
    );
    bed.sync(&["a2", "b1"])?;
    from_node.expect_steady(5).context("the node's own flow keeps its pod through its conntrack entry")?;
    from_peer.expect_steady(5)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Long drains: a pinned flow that outlives its pod's deadline.
// ---------------------------------------------------------------------------

/// What the long-drain stream sends, and gets back, while pinned: far more
/// than one TCP window. kube-proxy's conntrack entry saw the first exchange
/// only (windows of a few hundred KiB at most; `tcp_rmem` lets one grow to
/// 6 MiB here), and none of these bytes.
const BULK: usize = 24 << 20;

/// The long-drain tests' drain deadline, in seconds: the bulk transfer (well
/// under a second here) is over long before it, and the stream is still
/// active (traffic within the 30 s idle timeout) when it passes.
const LONG_DRAIN_DEADLINE: &str = "8";

/// A TCP connection from the client through a Service for bulk transfers
/// (a [`Conversation`] only exchanges short lines). The pod's app answers a
/// line with `<pod>:<line>`, so a long line comes back as long.
struct BulkStream {
    reader: std::io::BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
    local: SocketAddr,
    seq: u64,
}

impl BulkStream {
    /// Connects until a connection lands on pod `want`.
    fn landing_on(client: &Netns, to: SocketAddr, want: &str) -> Result<Self> {
        let mut seen = BTreeSet::new();
        for _ in 0..100 {
            let tcp = conndrain_tests::run_in(client, || std::net::TcpStream::connect_timeout(&to, TIMEOUT))?
                .with_context(|| format!("connecting to {to}"))?;
            tcp.set_read_timeout(Some(TIMEOUT))?;
            tcp.set_write_timeout(Some(TIMEOUT))?;
            let mut s = Self {
                local: tcp.local_addr()?,
                writer: tcp.try_clone()?,
                reader: std::io::BufReader::new(tcp),
                seq: 0,
            };
            let pod = s.echo(1)?;
            if pod == want {
                return Ok(s);
            }
            seen.insert(pod);
        }
        bail!("100 connections to {to} never landed on {want}; they landed on {seen:?}")
    }

    /// Sends a line of about `n` bytes and reads it back whole; returns the pod that answered.
    fn echo(&mut self, n: usize) -> Result<String> {
        use std::io::{BufRead as _, Write as _};
        self.seq += 1;
        let line = format!("{}{}", "x".repeat(n), self.seq);
        self.writer.write_all(format!("{line}\n").as_bytes()).with_context(|| format!("sending {n} bytes"))?;
        let mut answer = String::new();
        self.reader.read_line(&mut answer).with_context(|| format!("reading the echo of {n} bytes"))?;
        let (pod, echoed) = answer
            .trim_end()
            .split_once(':')
            .with_context(|| format!("an answer `<pod>:<line>`, got {} bytes", answer.len()))?;
        ensure!(echoed == line, "the echo of {} bytes came back whole, got {} bytes", line.len(), echoed.len());
        Ok(pod.to_owned())
    }

    /// Closes the client's side: its FIN goes out.
    fn close(&self) -> Result<()> {
        self.writer.shutdown(std::net::Shutdown::Write).context("shutting the client's side down")
    }

    /// Whether the pod's close (EOF) comes within `within`; a RST is an error.
    fn eof_within(&mut self, within: Duration) -> Result<bool> {
        use std::io::Read as _;
        self.reader.get_ref().set_read_timeout(Some(within))?;
        let mut buf = [0u8; 64];
        match self.reader.read(&mut buf) {
            Ok(0) => Ok(true),
            Ok(n) => bail!("{n} unexpected bytes instead of the pod's close"),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Ok(false),
            Err(e) => Err(e).context("waiting for the pod's close"),
        }
    }
}

/// Packets node A's conntrack found INVALID so far (`conntrack -S`, summed
/// over the CPUs): a TCP segment outside the window its entry tracks is one.
fn conntrack_invalid(bed: &Bed) -> Result<u64> {
    let stats = bed.cluster.node_a().exec("conntrack", &["-S"])?;
    Ok(stats.split_whitespace().filter_map(|f| f.strip_prefix("invalid=")).map(|n| n.parse::<u64>().unwrap_or(0)).sum())
}

fn pin_of<'a>(status: &'a Value, client: SocketAddr) -> Option<&'a Value> {
    status["steering"]["pins"].as_array()?.iter().find(|p| p["client"] == client.to_string())
}

/// The long drain up to its deadline: a stream through the ClusterIP lands on
/// a1, a1 terminates (deadline [`LONG_DRAIN_DEADLINE`]) and the agent pins the
/// stream, kube-proxy removes a1 from the rules, and the stream echoes
/// [`BULK`] bytes each way, steered past netfilter: kube-proxy's conntrack
/// entry, still ESTABLISHED, sees none of them. Then a1's deadline passes.
fn long_drain_past_deadline(bed: &Bed, agent_args: &[&str]) -> Result<(Agent, Cli, BulkStream, SocketAddr)> {
    let agent = Agent::start(bed.cluster.node_a(), agent_args)?;
    let cli = agent.cli();
    let [v4, v6] = bed.cluster.pod("a1").ips();
    cli.ok(&["pod", "add", "a1", "--ip", &v4.to_string(), "--ip", &v6.to_string()])?;
    let to = bed.frontend(Front::ClusterIp, false, Protocol::Tcp);
    let mut stream = BulkStream::landing_on(bed.client(), to, "a1")?;
    let client = stream.local;
    cli.ok(&["pod", "terminate", "a1", "--deadline", LONG_DRAIN_DEADLINE, "--quiet-period", "1"])?;
    ensure!(pin_of(&cli.status()?, client).is_some(), "the stream {client} -> {to} is pinned: {:#}", cli.status()?);
    bed.sync(&["a2", "b1"])?;

    let steered = steered_packets(&cli)?;
    ensure!(stream.echo(BULK)? == "a1", "the bulk transfer is answered by a1");
    ensure!(steered_packets(&cli)? > steered, "the bulk transfer was steered");
    let pod = cli.pod("a1")?;
    ensure!(
        pod.state == "draining",
        "the bulk transfer was over before a1's deadline ({LONG_DRAIN_DEADLINE} s; this machine is too slow?): {pod:?}"
    );
    let ct = bed.show_conntrack("after the bulk transfer, while pinned")?;
    let entry = entry_of(&ct, client, to).with_context(|| format!("the stream's conntrack entry:\n{ct}"))?;
    ensure!(entry.contains("ESTABLISHED"), "kube-proxy's entry of the stream stays ESTABLISHED: {entry}");

    wait_until("a1's deadline to pass", TIMEOUT, || cli.pod("a1"), |p| p.state == "deadline")?;
    Ok((agent, cli, stream, to))
}

/// Without the fix (a pin released while its flow lives, as the agent did at
/// the backend's deadline; here by `--pin-limit` set to almost nothing, its
/// fallback for a pod never seen gone): the stream sent more than a window
/// past kube-proxy's conntrack entry while pinned, so once the pin is gone
/// the entry's TCP window is stale. The client's FIN is out of that window:
/// conntrack finds it INVALID and it never reaches a1 (kube-proxy's iptables
/// mode drops INVALID forwarded packets; here no route even takes the
/// untranslated ClusterIP packet). The client hangs in its close.
#[test]
fn a_pin_released_at_the_deadline_leaves_a_long_drain_hanging_in_its_close() -> Result<()> {
    let bed = Bed::new(Backend::Iptables)?;
    let (_agent, cli, mut stream, to) = long_drain_past_deadline(&bed, &["--pin-limit", "0.1"])?;
    let client = stream.local;
    wait_until("the pin to be released at the deadline", TIMEOUT, || cli.status(), |s| pin_of(s, client).is_none())?;

    let invalid = conntrack_invalid(&bed)?;
    stream.close()?;
    wait_until(
        "node A's conntrack to find the client's FIN invalid",
        TIMEOUT,
        || conntrack_invalid(&bed),
        |n| *n > invalid,
    )
    .context("the stale window makes the stream's next segment INVALID")?;
    ensure!(!stream.eof_within(Duration::from_secs(3))?, "a1 never saw the FIN, so it never closes its side");
    let ct = bed.show_conntrack("after the client's close")?;
    let entry = entry_of(&ct, client, to).with_context(|| format!("the stream's conntrack entry:\n{ct}"))?;
    ensure!(entry.contains("ESTABLISHED"), "conntrack never took the FIN: the entry stays ESTABLISHED: {entry}");
    eprintln!(
        "the client's close hangs; its FIN is INVALID to node A's conntrack ({} so far)",
        conntrack_invalid(&bed)?
    );
    Ok(())
}

/// The twin, with the agent as it is: a1's deadline passes, a1 is still
/// there, and the stream stays pinned. It sends more, closes, and a1's close
/// comes back; then the pin goes and the agent deletes the stale entry.
#[test]
fn with_agent_a_long_drain_stays_pinned_past_the_deadline_and_closes_cleanly() -> Result<()> {
    let bed = Bed::new(Backend::Iptables)?;
    let (_agent, cli, mut stream, to) = long_drain_past_deadline(&bed, &[])?;
    let client = stream.local;
    // A sweep runs every second: let a few run after the deadline.
    std::thread::sleep(Duration::from_secs(3));
    ensure!(stream.echo(BULK)? == "a1", "the stream goes on past the deadline");
    ensure!(
        pin_of(&cli.status()?, client).is_some(),
        "the live stream stays pinned past a1's deadline: {:#}",
        cli.status()?
    );

    stream.close()?;
    ensure!(stream.eof_within(TIMEOUT)?, "the client's close reaches a1, and a1's close comes back");
    wait_until("the closed stream's pin to be released", TIMEOUT, || cli.status(), |s| pin_of(s, client).is_none())?;
    entry_gone(&bed, "the closed stream", client, to)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Policy routing: a source rule sends the client's flows another way.
// ---------------------------------------------------------------------------

/// Node A's address on a second link to node B, and node B's, with table 100
/// of node A routing node B's pods over it.
const LINK2_A_V4: &str = "172.20.0.1";
const LINK2_B_V4: &str = "172.20.0.2";
const SOURCE_TABLE: &str = "100";

/// Adds a second link between node A and node B, and on node A a source rule
/// (`from <client> lookup 100`, table 100: node B's pods over the second
/// link), as source-based tables send a pod's traffic out of its own ENI
/// (AWS VPC CNI). Node B drops the client's packets to its pods anywhere but
/// on that link, so the main table's path (the first link) is dead for them.
/// Returns node A's end of the second link.
fn source_routed(bed: &Bed) -> Result<String> {
    let tag = bed.cluster.tag();
    let (a, b) = (bed.cluster.node_a(), bed.cluster.node_b());
    let (a_if, b_if) = (format!("{tag}pa"), format!("{tag}pb"));
    a.ip(&["link", "add", &a_if, "type", "veth", "peer", "name", &b_if, "netns", b.name()])?;
    a.ip(&["addr", "add", &format!("{LINK2_A_V4}/24"), "dev", &a_if])?;
    b.ip(&["addr", "add", &format!("{LINK2_B_V4}/24"), "dev", &b_if])?;
    a.ip(&["link", "set", &a_if, "up"])?;
    b.ip(&["link", "set", &b_if, "up"])?;
    a.ip(&["route", "add", "10.244.2.0/24", "via", LINK2_B_V4, "dev", &a_if, "table", SOURCE_TABLE])?;
    a.ip(&["rule", "add", "from", &CLIENT_V4.to_string(), "lookup", SOURCE_TABLE])?;
    b.exec(
        "iptables",
        &["-I", "FORWARD", "-s", &CLIENT_V4.to_string(), "-d", "10.244.2.0/24", "!", "-i", &b_if, "-j", "DROP"],
    )?;
    // What a lookup by destination only says, and what the kernel does with
    // a packet from the client (`ip route get ... from ... iif ...`).
    let b1 = bed.cluster.pod("b1").ipv4().to_string();
    let (client_if, link_if) = bed.cluster.node_a_ifs();
    let by_dst = a.ip(&["route", "get", &b1])?;
    let from_client = a.ip(&["route", "get", &b1, "from", &CLIENT_V4.to_string(), "iif", client_if])?;
    eprintln!("node A: ip route get {b1}: {by_dst}ip route get {b1} from {CLIENT_V4} iif {client_if}: {from_client}");
    ensure!(by_dst.contains(&format!("dev {link_if} ")), "by destination, b1 is over the first link: {by_dst}");
    ensure!(
        from_client.contains(&format!("dev {a_if} ")),
        "from the client, b1 is over the second link: {from_client}"
    );
    Ok(a_if)
}

/// Without the fix, as a demonstration: the main table's path, which a
/// redirect chosen by the destination's route alone takes, is dead for the
/// client's flow to b1. With the source rule the stream works (netfilter's
/// path routes by source too); the rule deleted, its packets take the first
/// link and node B drops them: the stream breaks. (The agent before this fix
/// pinned exactly that way: with it, the twin below breaks the same way.)
#[test]
fn policy_routing_the_destination_route_is_a_dead_path_for_a_source_routed_flow() -> Result<()> {
    let bed = Bed::new(Backend::Iptables)?;
    source_routed(&bed)?;
    let to = bed.frontend(Front::ClusterIp, false, Protocol::Tcp);
    let conv = Conversation::landing_on(bed.client(), to, None, "b1")?;
    conv.expect_steady(5).context("the source rule's path to b1 works")?;
    bed.cluster.node_a().ip(&["rule", "del", "from", &CLIENT_V4.to_string(), "lookup", SOURCE_TABLE])?;
    match conv.wait_break(BREAK_WITHIN) {
        Some(Reply::Failed(how)) => {
            eprintln!("over the main table's path the stream to b1 broke: {how}");
            Ok(())
        }
        other => bail!("the stream must break on the main table's path, got {other:?}"),
    }
}

/// The twin, with the agent: the stream to b1 is pinned, its endpoint
/// removed and node A's conntrack flushed; the pin's redirect goes where the
/// kernel routed the flow (the route looked up with the client's source and
/// input interface, so the source rule applies), and the stream holds.
#[test]
fn with_agent_a_pinned_flow_follows_a_source_rule() -> Result<()> {
    let bed = Bed::new(Backend::Iptables)?;
    let link2 = source_routed(&bed)?;
    let (_agent, cli, conv, _) = pinned_stream_to(&bed, "b1")?;
    bed.node_a().flush_conntrack()?;
    let out = |dev: &str| -> Result<u64> {
        let stats = bed.cluster.node_a().ip(&["-s", "-j", "link", "show", dev])?;
        let v: Value = serde_json::from_str(&stats)?;
        Ok(v[0]["stats64"]["tx"]["packets"].as_u64().unwrap_or(0))
    };
    let sent = out(&link2)?;
    conv.expect_steady(20).context("the pinned stream keeps b1 over the source rule's link")?;
    ensure!(steered_packets(&cli)? > 0, "the datapath steered the stream");
    ensure!(out(&link2)? > sent, "the steered packets left over the second link");
    Ok(())
}

/// Kubernetes mode, a long drain on another node: the flow to b1 stays
/// pinned past b1's deadline (`--remote-pin-limit 1`: EndpointSlices carry
/// no kill time) while b1's endpoint is still there, terminating. Then b1's
/// address is listed again, not terminating: a terminating pod never turns
/// back, so that is a new pod with the address, and b1 is gone: the pin
/// turns dead and the client gets a RST. (The agent before released the pin
/// at that deadline: with the conntrack entry flushed, the stream then broke
/// at once on another pod's RST.)
#[test]
fn with_agent_kubernetes_mode_a_remote_pin_outlives_its_deadline_until_the_endpoint_is_gone() -> Result<()> {
    let bed = Bed::new(Backend::Iptables)?;
    let (k8s, _agent, cli) = kubernetes_agent(&bed, &["--remote-pin-limit", "1"])?;
    let api = &k8s.api;
    api.create_endpoint_slice(web_slice(&bed, false)?);
    let to = bed.frontend(Front::ClusterIp, false, Protocol::Tcp);
    let conv = Conversation::landing_on(bed.client(), to, None, "b1")?;
    conv.expect_steady(5)?;
    let client = conv.local_addr();

    api.update_endpoint_slice("default", "web-v4", |s| *s = web_slice(&bed, true).expect("slice"));
    wait_until("the agent to pin the flow to b1", TIMEOUT, || cli.status(), |s| pin_of(s, client).is_some())?;
    bed.sync(&["a1", "a2"])?;
    bed.node_a().flush_conntrack()?;
    // Well past b1's deadline (1 s), a sweep each second meanwhile.
    conv.expect_steady(30).context("the stream keeps b1 past its deadline while its endpoint is there")?;
    ensure!(pin_of(&cli.status()?, client).is_some(), "still pinned past the deadline: {:#}", cli.status()?);

    // b1 is gone (its node's side stops answering), and its address is
    // listed again, not terminating.
    let host_if = bed.cluster.pod("b1").host_if().to_owned();
    bed.cluster.node_b().ip(&["link", "set", &host_if, "down"])?;
    api.update_endpoint_slice("default", "web-v4", |s| *s = web_slice(&bed, false).expect("slice"));
    wait_until(
        "the pin to turn dead",
        TIMEOUT,
        || cli.status(),
        |s| pin_of(s, client).is_some_and(|p| p["dead"] == true),
    )?;
    match conv.wait_break(BREAK_WITHIN) {
        Some(Reply::Failed(how)) => ensure!(how.contains("reset"), "the client gets a RST, not a timeout: {how}"),
        other => bail!("the stream must fail fast with a RST, got {other:?}"),
    }
    Ok(())
}
