//! Restart and upgrade (issue 7, item 1): with `--bpffs`, an agent that is
//! killed (kill -9) or stopped loses no pinned flow and no drain state. The
//! programs stay attached through their pinned tcx links and keep using the
//! pinned maps while no agent runs; the next agent swaps its programs into
//! those links, takes back its saved state, rebuilds its flow index, and
//! carries the drain on.
//!
//! Each test mounts its own bpffs on a temp dir (in the test's mount
//! namespace, before the agent starts: `ip netns exec` gives the agent a copy
//! of it). Like the other end-to-end tests they assert states and their
//! order, never durations.
//!
//! Needs root and `target/debug/conndrain` (or `CONNDRAIN_BIN`).

#![allow(clippy::doc_markdown)] // Kubernetes words (ClusterIP, NodePort) are prose here

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use aya::programs::{SchedClassifier, TcAttachType};
use conndrain_tests::kubeproxy::{
    Backend, Cluster, Conversation, KubeProxy, NODE_A_V4, NODE_A_V6, NODE_B_V4, NODE_B_V6, Node, PodApp, Protocol,
    Service, ServicePort,
};
use conndrain_tests::{
    Agent, Bpffs, Cli, Netns, TcpConn, TcpServer, Topology, require_root, sleep, unique_tag,
};
use serde_json::Value;


const VIP_V4: &str = "10.96.0.10";
const VIP_V6: &str = "fd00:96::10";
const TCP_TARGET: u16 = 8080;
const UDP_TARGET: u16 = 5353;


/// The kube-proxy emulation of `tests/steering.rs`: a client, node A with
/// pods a1 and a2, node B with b1, one dual-stack Service with a TCP and a
/// UDP port, kube-proxy (iptables mode) on both nodes.
struct Bed {
    proxies: Vec<KubeProxy>,
    _apps: Vec<PodApp>,
    service: Service,
    cluster: Cluster,
}

impl Bed {
    fn new() -> Result<Self> {
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
                    port: 80,
                    target_port: TCP_TARGET,
                    node_port: Some(30080),
                },
                ServicePort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53,
                    target_port: UDP_TARGET,
                    node_port: Some(30053),
                },
            ],
        };
        let proxies = vec![
            KubeProxy::start(cluster.node_a(), Backend::Iptables, &service, &[NODE_A_V4.into(), NODE_A_V6.into()])?,
            KubeProxy::start(cluster.node_b(), Backend::Iptables, &service, &[NODE_B_V4.into(), NODE_B_V6.into()])?,
        ];
        let bed = Self { proxies, _apps: apps, service, cluster };
        bed.sync(&["a1", "a2", "b1"])?;
        Ok(bed)
    }

    /// kube-proxy's sync on every node: the endpoints are now `pods`.
    fn sync(&self, pods: &[&str]) -> Result<()> {
        let ips: Vec<IpAddr> = pods.iter().flat_map(|p| self.cluster.pod(p).ips()).collect();
        for proxy in &self.proxies {
            proxy.sync(&ips)?;
        }
        Ok(())
    }

    /// The ClusterIP (v4) frontend of `proto`.
    fn frontend(&self, proto: Protocol) -> SocketAddr {
        let port = self.service.port(proto).expect("the service has the port").port;
        SocketAddr::new(VIP_V4.parse().expect("an IP"), port)
    }
}

/// How many copies of each of our programs tcx runs on `iface` in `ns`
/// (ingress, egress): (1, 1) means attached once, with no double counting.
fn our_programs(ns: &Netns, iface: &str) -> Result<(usize, usize)> {
    let iface = iface.to_owned();
    ns.run(move || -> Result<(usize, usize)> {
        let count = |ty, prefix: &str| -> Result<usize> {
            let progs = match SchedClassifier::query_tcx(&iface, ty) {
                Ok((_, progs)) => progs,
                // No tcx (before 6.6, e.g. the guest stage's 6.1): the
                // agent is on the clsact path; count its filters there.
                Err(_) if !conndrain_tests::kernel_has_tcx() => {
                    let dir = if matches!(ty, TcAttachType::Ingress) {
                        "ingress"
                    } else {
                        "egress"
                    };
                    let out = std::process::Command::new("tc")
                        .args(["filter", "show", "dev", &iface, dir])
                        .output()
                        .context("running tc filter show")?;
                    return Ok(String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .filter(|l| l.contains(prefix) && l.contains("direct-action"))
                        .count());
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("querying the tcx programs of {iface}"));
                }
            };
            // Kernel program names are cut at 15 bytes: conndrain_ingre, conndrain_egres.
            Ok(progs.iter().filter(|p| p.name_as_str().is_some_and(|n| n.starts_with(prefix))).count())
        };
        Ok((count(TcAttachType::Ingress, "conndrain_ingr")?, count(TcAttachType::Egress, "conndrain_egr")?))
    })?
}

/// Every interface the agent reports attached runs our programs exactly once.
fn attached_once(cli: &Cli, ns: &Netns) -> Result<Vec<String>> {
    let status = cli.status()?;
    let names: Vec<String> = status["interfaces"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["name"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    ensure!(!names.is_empty(), "the agent is attached somewhere: {status:#}");
    for name in &names {
        let n = our_programs(ns, name)?;
        ensure!(n == (1, 1), "{name} runs our ingress and egress programs once each, not {n:?}");
    }
    Ok(names)
}

fn pinned_clients(cli: &Cli) -> Result<Vec<String>> {
    let status = cli.status()?;
    Ok(status["steering"]["pins"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["client"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default())
}

fn steered_packets(cli: &Cli) -> Result<u64> {
    Ok(cli.status()?["steering"]["steered_packets"].as_u64().unwrap_or(0))
}

/// kill -9 in the middle of a drain, with a TCP stream and a UDP session
/// pinned to a1 after kube-proxy removed it from its rules and conntrack
/// forgot the flows: neither breaks while the agent is down nor after it is
/// back, the restarted agent still shows a1 draining with both flows, and
/// the drain completes once the clients stop.
#[test]
fn kill9_mid_drain_loses_no_pinned_flow_and_no_drain_state() -> Result<()> {
    require_root()?;
    let bpffs = Bpffs::mount()?;
    let bed = Bed::new()?;
    let node_a = bed.cluster.node_a();
    let args = ["--bpffs", &bpffs.arg(), "--udp-timeout", "3"];
    let mut agent = Agent::start(node_a, &args)?;
    let cli = agent.cli();
    let [v4, v6] = bed.cluster.pod("a1").ips();
    cli.ok(&["pod", "add", "a1", "--ip", &v4.to_string(), "--ip", &v6.to_string()])?;

    let tcp = Conversation::landing_on(bed.cluster.client(), bed.frontend(Protocol::Tcp), None, "a1")?;
    let session = format!("r{}", unique_tag());
    let udp = Conversation::landing_on(bed.cluster.client(), bed.frontend(Protocol::Udp), Some(&session), "a1")?;
    tcp.expect_steady(5)?;
    udp.expect_steady(5)?;

    // a1 terminates: both flows are pinned. Then kube-proxy drops a1 from its
    // rules and conntrack forgets the flows (the break of tests/steering.rs).
    cli.ok(&["pod", "terminate", "a1", "--deadline", "300", "--quiet-period", "1"])?;
    let clients = pinned_clients(&cli)?;
    for conv in [&tcp, &udp] {
        ensure!(
            clients.contains(&conv.local_addr().to_string()),
            "{} is pinned: {clients:?}",
            conv.local_addr()
        );
    }
    bed.sync(&["a2", "b1"])?;
    bed.proxies[0].flush_conntrack()?;
    tcp.expect_steady(5).context("pinned, before the kill")?;
    udp.expect_steady(5).context("pinned, before the kill")?;
    let interfaces = attached_once(&cli, node_a)?;
    let before = cli.pod("a1")?;
    ensure!(before.state == "draining" && before.active_flows == 2, "{before:?}");

    // kill -9: nothing is cleaned up, the programs stay attached through
    // their pinned links and keep steering with the pinned maps.
    agent.kill9()?;
    // tcx links are pinned in the bpffs; clsact filters cannot be pinned and
    // need not be (before 6.6, e.g. the guest stage's 6.1): they stay on the
    // interfaces, which the loop below checks.
    ensure!(
        !conndrain_tests::kernel_has_tcx() || !bpffs.links().is_empty(),
        "the links are pinned: {:?}",
        bpffs.links()
    );
    for name in &interfaces {
        let n = our_programs(node_a, name)?;
        ensure!(n == (1, 1), "with the agent down, {name} still runs our programs once each: {n:?}");
    }
    tcp.expect_steady(10).context("the TCP stream while the agent is down")?;
    udp.expect_steady(10).context("the UDP session while the agent is down")?;

    // The same socket (so the same state dir) and the same bpffs.
    agent.restart(node_a, &args)?;
    let log = agent.log();
    ensure!(log.contains("took over the links an earlier agent pinned"), "the new agent adopts the links:\n{log}");
    ensure!(log.contains("state restored"), "{log}");
    let after = cli.pod("a1")?;
    ensure!(
        after.state == "draining" && after.active_flows == 2,
        "after the restart a1 is still draining with its 2 flows: {after:?}"
    );
    ensure!(
        after.terminating_for_secs >= before.terminating_for_secs,
        "the drain goes on from where it was, it does not start over: {before:?} then {after:?}"
    );
    let flows: Value = cli.json(&["flows", "--pod", "a1", "-o", "json"])?;
    for (conv, proto) in [(&tcp, "tcp"), (&udp, "udp")] {
        let client = conv.local_addr().to_string();
        ensure!(
            flows.as_array().is_some_and(|a| a.iter().any(|f| f["proto"] == proto
                && f["active"] == true
                && f["pinned"]["client"] == client.as_str())),
            "`flows` lists the pinned {proto} flow from {client}: {flows:#}"
        );
    }
    let clients = pinned_clients(&cli)?;
    ensure!(clients.len() == 2, "both pins are back: {clients:?}");
    let again = attached_once(&cli, node_a)?;
    ensure!(again == interfaces, "attached to the same interfaces: {interfaces:?} then {again:?}");

    let steered = steered_packets(&cli)?;
    tcp.expect_steady(10).context("the TCP stream after the restart")?;
    udp.expect_steady(10).context("the UDP session after the restart")?;
    ensure!(steered_packets(&cli)? > steered, "the restarted agent's programs steer the flows");

    // The clients stop: the stream closes (FIN both ways), the session goes
    // idle for --udp-timeout; then a1 is drained.
    drop(tcp);
    drop(udp);
    let drained = cli.wait_state("a1", "drained")?;
    ensure!(drained.active_flows == 0, "{drained:?}");
    let wait = cli.run(&["wait", "a1", "--timeout", "5"])?;
    ensure!(wait.code == 0, "`conndrain wait a1` says drained: {wait:?}");
    Ok(())
}

/// A restart with another `--max-flows` replaces the pinned flow table
/// (one clear log line) and keeps working: the flows are carried into the
/// new table, the drain goes on and completes. Pins of another layout
/// version are replaced with one log line too. `--detach-on-exit` leaves
/// nothing behind.
#[test]
fn restart_with_other_max_flows_replaces_the_flow_table() -> Result<()> {
    require_root()?;
    let bpffs = Bpffs::mount()?;
    let topo = Topology::builder().pod("web").build()?;
    let web = topo.pod("web");
    let server = TcpServer::start(web.ns(), web.addr_v4(8080))?;
    let bpf = bpffs.arg();
    let mut agent = Agent::start(topo.node(), &["--bpffs", &bpf, "--max-flows", "4096"])?;
    let cli = agent.cli();
    cli.add_pod(web)?;
    let mut conns = TcpConn::connect_many(topo.client(), server.addr(), 2)?;
    cli.wait_pod("web", "2 active flows", |p| p.active_flows == 2)?;
    cli.terminate("web", 1.0, 300.0)?;

    // A clean stop (SIGTERM) with --bpffs is a restart too: it leaves the
    // programs attached and the links pinned.
    agent.stop()?;
    let links = bpffs.links();
    let veth = web.node_if().to_owned();
    ensure!(
        links == [format!("{veth}-egress"), format!("{veth}-ingress")],
        "SIGTERM leaves the pod's links pinned: {links:?}"
    );
    ensure!(our_programs(topo.node(), &veth)? == (1, 1), "and attached");
    // What an agent of an older layout would have left.
    std::fs::create_dir(bpffs.path().join("v0")).context("making a v0 pin dir")?;

    agent.restart(topo.node(), &["--bpffs", &bpf, "--max-flows", "8192"])?;
    let log = agent.log();
    ensure!(log.contains("replacing pinned map FLOWS"), "the replacement is logged:\n{log}");
    ensure!(log.contains("replacing maps of layout v0"), "the old layout is replaced:\n{log}");
    ensure!(!bpffs.path().join("v0").exists(), "the v0 pins are gone");
    let status = cli.status()?;
    ensure!(status["maps"]["flows"]["max"] == 8192, "the new table has 8192 entries: {status:#}");
    let pod = cli.pod("web")?;
    ensure!(pod.state == "draining" && pod.active_flows == 2, "the drain and its flows carried over: {pod:?}");
    ensure!(our_programs(topo.node(), &veth)? == (1, 1), "attached once");

    // And it works: a new flow is counted, the drain completes after the closes.
    conns.push(TcpConn::connect(topo.client(), server.addr())?);
    cli.wait_pod("web", "3 active flows", |p| p.active_flows == 3)?;
    for conn in conns.drain(..) {
        conn.close()?;
    }
    cli.wait_state("web", "drained")?;

    // --detach-on-exit: SIGTERM detaches and removes the pins and the state.
    agent.stop()?;
    agent.restart(topo.node(), &["--bpffs", &bpf, "--max-flows", "8192", "--detach-on-exit"])?;
    ensure!(cli.pod("web")?.state == "drained", "the outcome survives restarts");
    agent.stop()?;
    ensure!(!bpffs.layout_dir().exists(), "--detach-on-exit removes the pins");
    ensure!(!agent.dir().join("state.json").exists(), "--detach-on-exit removes the saved state");
    ensure!(our_programs(topo.node(), &veth)? == (0, 0), "--detach-on-exit detaches the programs");
    Ok(())
}

/// An upgrade to an agent whose map layout differs: the old pins are not
/// read but replaced (one log line), the pinned flows keep answering
/// throughout (the old programs steer until ours are attached, then ours
/// steer with the pins written again from the saved state), and the drain
/// goes on and completes. The old layout is made by renaming the pin
/// directory of a killed agent to `v0`.
#[test]
fn upgrade_to_another_map_layout_keeps_pinned_flows_and_the_drain() -> Result<()> {
    require_root()?;
    let bpffs = Bpffs::mount()?;
    let bed = Bed::new()?;
    let node_a = bed.cluster.node_a();
    let args = ["--bpffs", &bpffs.arg(), "--udp-timeout", "3"];
    let mut agent = Agent::start(node_a, &args)?;
    let cli = agent.cli();
    let [v4, v6] = bed.cluster.pod("a1").ips();
    cli.ok(&["pod", "add", "a1", "--ip", &v4.to_string(), "--ip", &v6.to_string()])?;
    let tcp = Conversation::landing_on(bed.cluster.client(), bed.frontend(Protocol::Tcp), None, "a1")?;
    let session = format!("u{}", unique_tag());
    let udp = Conversation::landing_on(bed.cluster.client(), bed.frontend(Protocol::Udp), Some(&session), "a1")?;
    cli.ok(&["pod", "terminate", "a1", "--deadline", "300", "--quiet-period", "1"])?;
    ensure!(pinned_clients(&cli)?.len() == 2, "both flows pinned");
    bed.sync(&["a2", "b1"])?;
    bed.proxies[0].flush_conntrack()?;
    tcp.expect_steady(5)?;
    udp.expect_steady(5)?;

    agent.kill9()?;
    std::fs::rename(bpffs.layout_dir(), bpffs.path().join("v0")).context("renaming the pin dir to v0")?;
    tcp.expect_steady(5).context("the old layout's programs steer while no agent runs")?;
    udp.expect_steady(5).context("the old layout's programs steer while no agent runs")?;

    agent.restart(node_a, &args)?;
    let log = agent.log();
    ensure!(log.contains("replacing maps of layout v0"), "the replacement is logged:\n{log}");
    ensure!(!bpffs.path().join("v0").exists(), "the old layout's pins are gone once ours are attached");
    attached_once(&cli, node_a)?;
    ensure!(pinned_clients(&cli)?.len() == 2, "the pins are written again from the saved state");
    let pod = cli.pod("a1")?;
    ensure!(pod.state == "draining", "the drain is not over because the flow table is new: {pod:?}");
    tcp.expect_steady(10).context("the TCP stream after the upgrade")?;
    udp.expect_steady(10).context("the UDP session after the upgrade")?;
    let pod = cli.wait_pod("a1", "its 2 flows picked up again", |p| p.active_flows == 2)?;
    ensure!(pod.state == "draining", "{pod:?}");

    drop(tcp);
    drop(udp);
    // The new layout's socket table starts empty: the pod's sockets opened
    // before it are unknown, so nothing can confirm the drain and it runs
    // to its deadline (a cost, never a false drain), saying why.
    cli.wait_pod("a1", "no flow left", |p| p.active_flows == 0)?;
    sleep(Duration::from_secs(2))?;
    let pod = cli.pod("a1")?;
    ensure!(pod.state == "draining", "unconfirmed, so not drained: {pod:?}");
    let why = cli.ok(&["why", "a1"])?;
    ensure!(why.contains("cannot confirm a drain"), "why says so: {why}");
    Ok(())
}

/// Kubernetes mode: kill -9 while a deleted pod drains, and another pod is
/// deleted while no agent runs. The restarted agent keeps the drain (the
/// first pod sync declares the pod and its termination again, which picks up
/// the saved ones), reports its outcome as the pod's condition, and forgets
/// the pod that went while it was down.
#[test]
fn kubernetes_mode_restart_keeps_the_drain_and_forgets_pods_deleted_meanwhile() -> Result<()> {
    use conndrain_tests::{
        NODE_V4, TIMEOUT,
        fakeapi::AgentApi,
        wait_until,
    };
    require_root()?;
    let bpffs = Bpffs::mount()?;
    let topo = Topology::builder().pod("web").pod("gone").build()?;
    let k8s = AgentApi::start(topo.node())?;
    let api = &k8s.api;
    let (kc, node_ip, bpf) = (k8s.kubeconfig_arg(), NODE_V4.to_string(), bpffs.arg());
    let args = [
        "--kubeconfig", &kc, "--node-name", "node-a", "--host-ip", &node_ip, "--quiet-period", "1",
        "--min-write-interval", "0.2", "--bpffs", &bpf,
    ];
    let mut agent = Agent::start_with(topo.node(), &args)?;
    let cli = agent.cli();
    for name in ["web", "gone"] {
        let p = topo.pod(name);
        api.create_pod(serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "app"}]},
            "status": {
                "phase": "Running",
                "podIP": p.ipv4().to_string(),
                "podIPs": [{"ip": p.ipv4().to_string()}, {"ip": p.ipv6().to_string()}],
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        }))?);
        cli.wait_pod(&format!("default/{name}"), "the pod to be tracked", |p| p.state == "serving")?;
    }
    let condition = |status: &str, reason: &str| {
        let (status, reason) = (status.to_owned(), reason.to_owned());
        wait_until(
            &format!("conndrain.io/Drained={status} ({reason}) on web"),
            TIMEOUT,
            || {
                Ok(api.pod("default", "web").and_then(|p| p.status?.conditions).and_then(|cs| {
                    cs.into_iter().find(|c| c.type_ == "conndrain.io/Drained").map(|c| (c.status, c.reason))
                }))
            },
            |c| c.as_ref().is_some_and(|(s, r)| *s == status && r.as_deref() == Some(reason.as_str())),
        )
    };
    let web = topo.pod("web");
    let server = TcpServer::start(web.ns(), web.addr_v4(8080))?;
    let conn = TcpConn::connect(topo.client(), server.addr())?;
    cli.wait_pod("default/web", "1 active flow", |p| p.active_flows == 1)?;
    api.mark_pod_deleted("default", "web", 120);
    condition("False", "Draining")?;

    agent.kill9()?;
    api.delete_pod("default", "gone");
    agent.restart_with(topo.node(), &args)?;
    let pods = wait_until("default/gone to be forgotten", TIMEOUT, || cli.pods(), |pods| {
        !pods.iter().any(|p| p.name == "default/gone")
    })?;
    let web_pod = pods.iter().find(|p| p.name == "default/web").context("web is still tracked")?;
    ensure!(web_pod.state == "draining" && web_pod.active_flows == 1, "the drain goes on: {web_pod:?}");
    let log = agent.log();
    ensure!(log.contains("the saved drain goes on"), "the termination is adopted:\n{log}");

    conn.close()?;
    condition("True", "NoConnections")?;
    ensure!(cli.pod("default/web")?.state == "drained", "the CLI agrees");
    let denied: Vec<_> = api.requests().into_iter().filter(|r| r.status == 403).collect();
    ensure!(denied.is_empty(), "only calls its RBAC allows: {denied:#?}");
    Ok(())
}

/// `conndrain cleanup ARGS` on `node` (its network namespace: the clsact
/// filters it removes are per namespace).
fn cleanup(node: &Netns, socket: &std::path::Path, args: &[&str]) -> Result<conndrain_tests::Output> {
    let mut cmd = node.command(&conndrain_tests::conndrain_bin().to_string_lossy());
    cmd.arg("--socket").arg(socket).arg("cleanup").args(args);
    conndrain_tests::run_with_timeout(cmd, conndrain_tests::TIMEOUT)
}

/// `conndrain cleanup` (the uninstall of a node): refused, touching nothing,
/// while an agent runs, whether it answers on the socket or only holds the
/// --bpffs directory; once the agent is gone (kill -9 leaves everything:
/// pins, programs, saved state, socket), it removes them all and says what it
/// did; a second run finds nothing.
#[test]
fn cleanup_refuses_while_an_agent_runs_then_removes_pins_programs_and_state() -> Result<()> {
    require_root()?;
    let bpffs = Bpffs::mount()?;
    let topo = Topology::builder().pod("web").build()?;
    let web = topo.pod("web");
    let veth = web.node_if().to_owned();
    let bpf = bpffs.arg();
    let mut agent = Agent::start(topo.node(), &["--bpffs", &bpf])?;
    agent.cli().add_pod(web)?;
    ensure!(our_programs(topo.node(), &veth)? == (1, 1), "attached");
    let socket = agent.socket().to_owned();
    let elsewhere = agent.dir().join("other.sock");
    for (socket, why) in [(&socket, "answers on"), (&elsewhere, "with --bpffs")] {
        let out = cleanup(topo.node(), socket, &["--bpffs", &bpf])?;
        ensure!(out.code == 1, "refused while the agent runs: {out:?}");
        ensure!(
            out.stderr.starts_with("conndrain: an agent is running on this node")
                && out.stderr.contains(why)
                && out.stderr.contains("nothing was removed"),
            "says why and what to do: {out:?}"
        );
        ensure!(bpffs.links().len() == 2 && our_programs(topo.node(), &veth)? == (1, 1), "nothing removed");
    }
    ensure!(agent.cli().pod("web")?.state == "serving", "the agent still works");

    agent.kill9()?;
    let state = agent.dir().join("state.json");
    ensure!(state.exists() && socket.exists(), "kill -9 leaves the state and the socket");
    ensure!(our_programs(topo.node(), &veth)? == (1, 1), "and the programs");
    let out = cleanup(topo.node(), &socket, &["--bpffs", &bpf])?;
    ensure!(out.code == 0, "cleanup: {out:?}");
    let layout = bpffs.layout_dir().display().to_string();
    for said in [
        format!("removed {layout}"),
        "3 pinned link(s) removed (".to_owned(),
        format!("{veth}-egress"),
        format!("{veth}-ingress"),
        "sockets-link".to_owned(),
        format!("removed the saved state {}", state.display()),
        format!("removed the stale socket {}", socket.display()),
    ] {
        ensure!(out.stdout.contains(&said), "says {said:?}: {out:?}");
    }
    ensure!(!bpffs.layout_dir().exists() && !state.exists() && !socket.exists(), "all gone");
    ensure!(our_programs(topo.node(), &veth)? == (0, 0), "the programs are detached");
    let again = cleanup(topo.node(), &socket, &["--bpffs", &bpf])?;
    ensure!(again.code == 0 && again.stdout.starts_with("nothing to clean up"), "{again:?}");
    Ok(())
}
