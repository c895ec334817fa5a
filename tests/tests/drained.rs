//! "Drained" must mean drained: every way a pod was once reported drained
//! while it still served, each on the real agent and kernel. Each test
//! fails on an agent that trusts the packet path alone (main at 2b4f760).
//!
//! Pod networks here are built by Debian's real CNI plugins (bridge, ptp,
//! macvlan) where the issue is the pod network itself.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, ensure};
use conndrain_tests::{
    Agent, NODE_V4, Netns, TIMEOUT, TcpConn, TcpServer, Topology,
    cni::{CniNetwork, CniPod},
    require_root, run_cmd, sleep, unique_tag, wait_until,
};

const PORT: u16 = 8080;

/// A client and a node (the testbed's), with pods from a CNI plugin on the node.
fn cni_node() -> Result<Topology> {
    Topology::builder().no_verify().build()
}

fn add(agent: &Agent, pod: &CniPod) -> Result<()> {
    let args = pod.add_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    agent.cli().ok(&args).map(drop)
}

/// The client routes `subnet` via the node.
fn route_via_node(topo: &Topology, subnet: &str) -> Result<()> {
    topo.client().ip(&["route", "add", subnet, "via", &NODE_V4.to_string()]).map(drop)
}

fn bridge_net(topo: &Topology, subnet: &str) -> Result<CniNetwork> {
    let br = format!("{}br", unique_tag().replace('_', ""));
    let br = &br[br.len().saturating_sub(12)..];
    let _ = topo;
    CniNetwork::new(
        "cdbridge",
        serde_json::json!({"type": "bridge", "bridge": br, "isGateway": true, "ipMasq": false}),
        subnet,
    )
}

fn state(agent: &Agent, pod: &str) -> Result<String> {
    Ok(agent.cli().pod(pod)?.state)
}

/// Waits for `pod` to be drained; if it is not, says why (`conndrain why`)
/// and which TCP sockets the namespaces `seen` really have.
fn wait_drained(agent: &Agent, pod: &str, what: &str, seen: &[&Netns]) -> Result<()> {
    wait_until(what, TIMEOUT, || state(agent, pod), |s| s == "drained").map(drop).with_context(|| {
        let sockets: Vec<String> = seen
            .iter()
            .map(|ns| format!("{}: {}", ns.name(), ns.exec("ss", &["-tanoie"]).unwrap_or_default()))
            .collect();
        format!("{}\n{}", agent.cli().ok(&["why", pod]).unwrap_or_default(), sockets.join("\n"))
    })
}

/// Two pods on one Linux bridge (the CNI `bridge` plugin, as flannel,
/// kubenet and k3s wire pods): B's connections to A pass only between the
/// bridge's ports, never the bridge device itself.
#[test]
fn connections_from_a_pod_on_the_same_bridge_hold_the_pod() -> Result<()> {
    require_root()?;
    let topo = cni_node()?;
    let net = bridge_net(&topo, "10.210.0.0/24")?;
    let a = net.add(topo.node(), "a")?;
    let b = net.add(topo.node(), "b")?;
    route_via_node(&topo, "10.210.0.0/24")?;
    let agent = Agent::start(topo.node(), &[])?;
    add(&agent, &a)?;
    add(&agent, &b)?;
    let server = TcpServer::start(&a.ns, SocketAddr::new(a.ip.into(), PORT))?;
    let from_client = TcpConn::connect_many(topo.client(), server.addr(), 3)?;
    let from_b = TcpConn::connect_many(&b.ns, server.addr(), 2)?;
    wait_until("pod a with 5 active flows", TIMEOUT, || agent.cli().pod("a"), |p| p.active_flows == 5)?;

    agent.cli().terminate("a", 1.0, 60.0)?;
    for c in from_client {
        c.close()?;
    }
    sleep(Duration::from_secs(3))?;
    let pod = agent.cli().pod("a")?;
    ensure!(pod.state == "draining", "pod b still has 2 connections open to a: {pod:?}");
    ensure!(pod.active_flows == 2, "b's connections are seen on the bridge ports: {pod:?}");
    for c in from_b {
        c.close()?;
    }
    wait_drained(&agent, "a", "a drained once b closes", &[&a.ns, &b.ns])?;
    Ok(())
}

/// The same, pod B reaching A through a ClusterIP with br_netfilter on
/// (the DNAT happens on the bridge; replies are bridged straight back).
#[test]
fn a_pod_reaching_its_neighbour_through_a_cluster_ip_holds_it() -> Result<()> {
    require_root()?;
    if run_cmd(std::process::Command::new("modprobe").arg("br_netfilter")).is_err() {
        eprintln!("skipped: no br_netfilter module in this kernel");
        return Ok(());
    }
    let topo = cni_node()?;
    let net = bridge_net(&topo, "10.211.0.0/24")?;
    let a = net.add(topo.node(), "a")?;
    let b = net.add(topo.node(), "b")?;
    topo.node().sysctl(&["net.bridge.bridge-nf-call-iptables=1"])?;
    let vip = "10.96.7.7";
    topo.node().exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            vip,
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            &format!("{}:{PORT}", a.ip),
        ],
    )?;
    b.ns.ip(&["route", "add", vip, "via", "10.211.0.1"]).ok();
    let agent = Agent::start(topo.node(), &[])?;
    add(&agent, &a)?;
    add(&agent, &b)?;
    let _server = TcpServer::start(&a.ns, SocketAddr::new(a.ip.into(), PORT))?;
    let conn = TcpConn::connect(&b.ns, format!("{vip}:80").parse()?)?;
    agent.cli().terminate("a", 1.0, 60.0)?;
    sleep(Duration::from_secs(3))?;
    ensure!(state(&agent, "a")? == "draining", "b's connection through the ClusterIP holds a");
    conn.close()?;
    wait_drained(&agent, "a", "a drained once b closes", &[&a.ns, &b.ns])?;
    Ok(())
}

/// Service traffic masqueraded to a node address (NodePort/LoadBalancer
/// with `externalTrafficPolicy: Cluster`): a new connection every 0.3 s
/// keeps restarting the quiet period, so the pod never drains between two.
#[test]
fn masqueraded_service_traffic_restarts_the_quiet_period() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").build()?;
    let web = topo.pod("web");
    let node = topo.node();
    let target = format!("{}:{PORT}", web.ipv4());
    node.exec(
        "iptables",
        &["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "30080", "-j", "DNAT", "--to-destination", &target],
    )?;
    node.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-d",
            &web.ipv4().to_string(),
            "-p",
            "tcp",
            "--dport",
            &PORT.to_string(),
            "-j",
            "MASQUERADE",
        ],
    )?;
    let agent = Agent::start(node, &[])?;
    // PORT is also the kubelet's probe port, as it usually is.
    agent.cli().add_pod_probed(web, &[PORT])?;
    let _server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let nodeport: SocketAddr = format!("{NODE_V4}:30080").parse()?;
    agent.cli().terminate("web", 1.0, 60.0)?;
    for i in 0..15 {
        let mut c = TcpConn::connect(topo.client(), nodeport)?;
        ensure!(c.request("GET /x")? == "200 /x", "request {i}");
        c.close()?;
        let s = state(&agent, "web")?;
        ensure!(s == "draining", "new masqueraded connections keep arriving, yet the pod is {s} after {i} of them");
        sleep(Duration::from_millis(300))?;
    }
    wait_drained(&agent, "web", "drained once they stop", &[web.ns()])?;
    ensure!(agent.cli().pod("web")?.new_flows_since_termination >= 15, "each one counted");
    Ok(())
}

/// A request whose handler takes longer than the idle timeout: the last
/// data went to the pod and no answer came back, so it is in flight.
#[test]
fn a_request_in_flight_longer_than_the_idle_timeout_holds_the_pod() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").build()?;
    let agent = Agent::start(topo.node(), &["--idle-timeout", "2"])?;
    let web = topo.pod("web");
    agent.cli().add_pod(web)?;
    let _server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let mut conn = TcpConn::connect(topo.client(), web.addr_v4(PORT))?;
    conn.send("GET /sleep/8")?;
    sleep(Duration::from_secs(1))?;
    agent.cli().terminate("web", 1.0, 60.0)?;
    sleep(Duration::from_secs(5))?;
    let pod = agent.cli().pod("web")?;
    ensure!(pod.state == "draining" && pod.active_flows == 1, "the request is in flight: {pod:?}");
    ensure!(conn.reply()? == "200 /sleep/8", "the slow answer arrives");
    // Now the last word was the pod's: an idle keep-alive once quiet.
    wait_drained(&agent, "web", "drained after the answer", &[web.ns(), topo.client()])?;
    Ok(())
}

/// The agent stalls while a burst of new flows overflows the event ring,
/// and a TCP connection opened in the middle is never announced. Its
/// socket is: the pod is not drained while it is open.
#[test]
fn a_connection_whose_events_were_lost_still_holds_the_pod() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").pod("dns").build()?;
    // A table of 32768 flows gets the smallest ring (256 KiB, about 3600
    // events; the default table's 2 MiB would hold the whole flood).
    let agent = Agent::start(topo.node(), &["--max-flows", "32768"])?;
    let (web, dns) = (topo.pod("web"), topo.pod("dns"));
    agent.cli().add_pod(web)?;
    agent.cli().add_pod(dns)?;
    let _server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    agent.signal(libc::SIGSTOP)?;
    let flood = |n: usize| udp_burst(topo.client(), SocketAddr::new(dns.ipv4().into(), 53), n);
    let burst = (|| {
        flood(8000)?;
        let conn = TcpConn::connect(topo.client(), web.addr_v4(PORT))?;
        flood(8000)?;
        Ok::<_, anyhow::Error>(conn)
    })();
    agent.signal(libc::SIGCONT)?;
    let mut conn = burst?;
    let lost = wait_until("events lost", TIMEOUT, || agent.cli().status(), |s| s["events_lost"].as_u64() > Some(0))?;
    eprintln!("events lost: {}", lost["events_lost"]);
    agent.cli().terminate("web", 1.0, 60.0)?;
    for _ in 0..8 {
        ensure!(conn.request("GET /x")? == "200 /x", "the connection works");
        sleep(Duration::from_millis(500))?;
        let pod = agent.cli().pod("web")?;
        ensure!(pod.state == "draining", "an open connection, yet {pod:?}");
    }
    conn.close()?;
    wait_drained(&agent, "web", "drained once it closes", &[topo.pod("web").ns(), topo.client()])?;
    Ok(())
}

/// A request in flight whose flow a flood pushed out of the flow table
/// before the drain began: the packet path has nothing left of it and the
/// connection is quiet (the handler is slow), but its socket is open, so it
/// holds the pod.
#[test]
fn a_quiet_connection_the_flow_table_lost_still_holds_the_pod() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").pod("dns").build()?;
    let agent = Agent::start(topo.node(), &["--max-flows", "1024"])?;
    let (web, dns) = (topo.pod("web"), topo.pod("dns"));
    agent.cli().add_pod(web)?;
    agent.cli().add_pod(dns)?;
    let _server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let mut conn = TcpConn::connect(topo.client(), web.addr_v4(PORT))?;
    conn.send("GET /sleep/7")?;
    // Flows seen twice, so the LRU's active list turns over too.
    udp_flows(topo.client(), SocketAddr::new(dns.ipv4().into(), 53), 12_000, 2)?;
    agent.cli().terminate("web", 1.0, 60.0)?;
    sleep(Duration::from_secs(3))?;
    let why = agent.cli().ok(&["why", "web"])?;
    let pod = agent.cli().pod("web")?;
    ensure!(pod.state == "draining", "its socket is open and its answer due: {pod:?}\n{why}");
    ensure!(conn.reply()? == "200 /sleep/7", "the answer arrives");
    conn.close()?;
    wait_drained(&agent, "web", "drained once it closes", &[topo.pod("web").ns(), topo.client()])?;
    Ok(())
}

/// `n` UDP datagrams from `n` source ports.
fn udp_burst(from: &Netns, to: SocketAddr, n: usize) -> Result<()> {
    udp_flows(from, to, n, 1)
}

/// `n` UDP flows of `each` datagrams.
fn udp_flows(from: &Netns, to: SocketAddr, n: usize, each: usize) -> Result<()> {
    conndrain_tests::run_in(from, || {
        for _ in 0..n {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            for _ in 0..each {
                s.send_to(b"q", to)?;
            }
        }
        Ok::<_, std::io::Error>(())
    })?
    .context("UDP burst")
}

/// Routed veths (the CNI `ptp` plugin, as Calico wires pods): tracked and drained.
#[test]
fn ptp_pods_drain_after_their_last_connection() -> Result<()> {
    require_root()?;
    let topo = cni_node()?;
    let net = CniNetwork::new("cdptp", serde_json::json!({"type": "ptp", "ipMasq": false}), "10.212.0.0/24")?;
    let pod = net.add(topo.node(), "p")?;
    route_via_node(&topo, "10.212.0.0/24")?;
    let agent = Agent::start(topo.node(), &[])?;
    add(&agent, &pod)?;
    let server = TcpServer::start(&pod.ns, SocketAddr::new(pod.ip.into(), PORT))?;
    let conns = TcpConn::connect_many(topo.client(), server.addr(), 2)?;
    wait_until("2 active flows", TIMEOUT, || agent.cli().pod("p"), |p| p.active_flows == 2)?;
    agent.cli().terminate("p", 1.0, 60.0)?;
    sleep(Duration::from_secs(2))?;
    ensure!(state(&agent, "p")? == "draining");
    for c in conns {
        c.close()?;
    }
    wait_drained(&agent, "p", "drained", &[&pod.ns, topo.client()])?;
    Ok(())
}

/// macvlan pods (the CNI `macvlan` plugin) talk to their neighbours without
/// passing any interface of the node: conndrain cannot count their
/// connections, so the pod is skipped (its preStop wait falls back to
/// sleeping), never counted as zero.
#[test]
fn macvlan_pods_are_skipped_not_counted_as_zero() -> Result<()> {
    require_root()?;
    let topo = cni_node()?;
    // The parent: an L2 device with no per-pod port (a real node's uplink;
    // here a port-less bridge, as this kernel has no dummy devices).
    // The whole tag (at most 11 characters with "mv", under IFNAMSIZ): its
    // length follows the test process's pid.
    let parent = format!("{}mv", unique_tag().replace('_', ""));
    topo.node().ip(&["link", "add", &parent, "type", "bridge"])?;
    topo.node().ip(&["link", "set", &parent, "up"])?;
    topo.node().ip(&["addr", "add", "10.213.0.254/24", "dev", &parent])?;
    let net = CniNetwork::new(
        "cdmacvlan",
        serde_json::json!({"type": "macvlan", "master": parent, "mode": "bridge"}),
        "10.213.0.0/24",
    )?;
    let pod = net.add(topo.node(), "m")?;
    let peer = net.add(topo.node(), "peer")?;
    let agent = Agent::start(topo.node(), &[])?;
    add(&agent, &pod)?;
    let server = TcpServer::start(&pod.ns, SocketAddr::new(pod.ip.into(), PORT))?;
    let conn = TcpConn::connect(&peer.ns, server.addr())?;
    agent.cli().terminate("m", 1.0, 60.0)?;
    sleep(Duration::from_secs(2))?;
    let p = agent.cli().pod("m")?;
    ensure!(p.state == "skipped", "a macvlan pod's traffic is not seen: {p:?}");
    let out = agent.cli().run(&["wait", "m"])?;
    ensure!(out.code == 4, "wait says skipped (exit 4): {}", out.stderr);
    conn.close()?;
    Ok(())
}
