//! End to end: the real agent in a node namespace, real TCP and UDP between a
//! client namespace and pod namespaces, and the CLI's view of it.
//!
//! Every test builds its own namespaces and agent, so they run in parallel.
//! They assert states and their order, never durations: timeouts are only
//! there so a broken agent fails a test instead of hanging it. Where a test
//! needs "after the quiet period", it asks the agent's own clock
//! (`terminating_for_secs`), not ours.
//!
//! Needs root and `target/debug/conndrain` built with its eBPF object (or
//! `CONNDRAIN_BIN`).

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, ensure};
use conndrain_tests::{
    Agent, Cli, FlowInfo, PodStatus, Repeat, TIMEOUT, TcpConn, TcpServer, Topology, UdpClient,
    UdpServer, require_root,
};

const PORT: u16 = 8080;

/// One veth pod named `web`, the agent, and the pod registered.
fn one_pod(agent_args: &[&str]) -> Result<(Topology, Agent, Cli)> {
    require_root()?;
    let topo = Topology::builder().pod("web").build()?;
    let agent = Agent::start(topo.node(), agent_args)?;
    let cli = agent.cli();
    let pod = cli.add_pod(topo.pod("web"))?;
    ensure!(pod.state == "serving", "a new pod is serving: {pod:?}");
    ensure!(
        pod.interfaces == [topo.pod("web").node_if()],
        "the agent attaches to the pod's veth {}: {pod:?}",
        topo.pod("web").node_if()
    );
    Ok((topo, agent, cli))
}

/// N connections are counted, and each close takes one away.
fn counts_tcp_flows(v6: bool) -> Result<()> {
    let (topo, _agent, cli) = one_pod(&[])?;
    let web = topo.pod("web");
    let addr = if v6 {
        web.addr_v6(PORT)
    } else {
        web.addr_v4(PORT)
    };
    let server = TcpServer::start(web.ns(), addr)?;

    let mut conns = TcpConn::connect_many(topo.client(), server.addr(), 5)?;
    let pod = cli.wait_pod("web", "5 active flows", |p| p.active_flows == 5)?;
    ensure!(pod.state == "serving" && pod.outbound_flows == 0, "{pod:?}");

    let listed = cli.flows(Some("web"))?;
    let flows = inbound_tcp(&listed);
    ensure!(flows.len() == 5, "5 inbound TCP flows listed: {flows:#?}");
    for flow in &flows {
        let pod_addr: SocketAddr = flow
            .pod_addr
            .parse()
            .with_context(|| format!("pod_addr of {flow:?}"))?;
        ensure!(
            pod_addr == server.addr(),
            "pod_addr is the server: {flow:?}"
        );
        ensure!(pod_addr.is_ipv6() == v6, "address family: {flow:?}");
    }

    // Clients close, the server closes its side in turn.
    for conn in conns.drain(..2) {
        conn.close()?;
    }
    cli.wait_pod("web", "3 active flows after 2 closed", |p| {
        p.active_flows == 3
    })?;
    // A client that aborts: its RST closes the flow too.
    conns.pop().expect("3 left").reset()?;
    cli.wait_pod("web", "2 active flows after a reset", |p| {
        p.active_flows == 2
    })?;
    for conn in conns.drain(..) {
        conn.close()?;
    }
    let pod = cli.wait_pod("web", "0 active flows", |p| p.active_flows == 0)?;
    ensure!(
        pod.state == "serving",
        "closing flows does not terminate a pod: {pod:?}"
    );
    Ok(())
}

#[test]
fn tcp_flows_are_counted_and_released_ipv4() -> Result<()> {
    counts_tcp_flows(false)
}

#[test]
fn tcp_flows_are_counted_and_released_ipv6() -> Result<()> {
    counts_tcp_flows(true)
}

#[test]
fn half_closed_flow_still_holds() -> Result<()> {
    let (topo, _agent, cli) = one_pod(&[])?;
    let web = topo.pod("web");
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let conn = TcpConn::connect(topo.client(), server.addr())?;
    cli.wait_pod("web", "1 active flow", |p| p.active_flows == 1)?;

    // The server finishes first (its FIN); the client has not closed yet.
    server.close_all();
    let flows = conndrain_tests::wait_until(
        "the flow to be seen half-closed",
        TIMEOUT,
        || cli.flows(Some("web")),
        |flows| flows.iter().any(|f| f.state == "closing"),
    )?;
    ensure!(
        flows.iter().all(|f| f.active),
        "a half-closed inbound flow still holds the pod: {flows:#?}"
    );
    let pod = cli.pod("web")?;
    ensure!(pod.active_flows == 1, "{pod:?}");

    drop(conn);
    cli.wait_pod("web", "0 active flows once both sides closed", |p| {
        p.active_flows == 0
    })?;
    Ok(())
}

#[test]
fn terminating_pod_drains_after_last_close() -> Result<()> {
    let (topo, _agent, cli) = one_pod(&[])?;
    let web = topo.pod("web");
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let mut conns = TcpConn::connect_many(topo.client(), server.addr(), 3)?;
    cli.wait_pod("web", "3 active flows", |p| p.active_flows == 3)?;

    cli.terminate("web", 1.0, 60.0)?;
    let mut wait = cli.spawn(&["wait", "web", "--timeout", "30"])?;
    let pod = cli.pod("web")?;
    ensure!(
        pod.state == "draining",
        "terminated with 3 open flows: {pod:?}"
    );
    ensure!(
        pod.quiet_period_secs
            .is_some_and(|q| (q - 1.0).abs() < 1e-6),
        "{pod:?}"
    );

    for conn in conns.drain(..2) {
        conn.close()?;
    }
    cli.wait_pod("web", "1 active flow", |p| p.active_flows == 1)?;
    // Past the quiet period by the agent's clock, the open flow still holds the pod.
    let pod = cli.wait_pod("web", "termination older than the quiet period", |p| {
        p.terminating_for_secs.is_some_and(|t| t > 1.5)
    })?;
    ensure!(
        pod.state == "draining" && pod.active_flows == 1,
        "one open flow holds the pod: {pod:?}"
    );
    ensure!(
        wait.is_running(),
        "`conndrain wait` returned while a flow was still open"
    );

    conns.pop().expect("one left").close()?;
    let pod = cli.wait_state("web", "drained")?;
    ensure!(pod.active_flows == 0, "{pod:?}");
    ensure!(
        pod.quiet_for_secs
            .zip(pod.quiet_period_secs)
            .is_some_and(|(q, p)| q >= p),
        "drained only after the quiet period: {pod:?}"
    );
    let out = wait.wait_exit(TIMEOUT)?;
    ensure!(
        out.code == 0,
        "`conndrain wait` exits 0 once drained: {out:?}"
    );
    Ok(())
}

#[test]
fn new_connection_restarts_quiet_period() -> Result<()> {
    let (topo, _agent, cli) = one_pod(&[])?;
    let web = topo.pod("web");
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;

    // Long enough that a connection made right after terminating lands inside it.
    cli.terminate("web", 4.0, 60.0)?;
    // Let the agent's clock move, so a restart is visible as quiet_for < terminating_for.
    let before = cli.wait_pod("web", "termination 0.5 s old", |p| {
        p.terminating_for_secs.is_some_and(|t| t >= 0.5)
    })?;
    ensure!(
        before.state == "draining",
        "no flows, but inside the quiet period: {before:?}"
    );
    ensure!(before.new_flows_since_termination == 0, "{before:?}");

    // One short request during the quiet period, as a late load balancer would send.
    let mut conn = TcpConn::connect(topo.client(), server.addr())?;
    ensure!(
        conn.request("GET /fast")? == "200 /fast",
        "the pod still answers"
    );
    conn.close()?;

    let pod = cli.wait_pod("web", "the new flow counted and closed", |p| {
        p.new_flows_since_termination == 1 && p.active_flows == 0
    })?;
    let (terminating, quiet) = (
        pod.terminating_for_secs.unwrap_or(0.0),
        pod.quiet_for_secs.unwrap_or(f64::MAX),
    );
    ensure!(
        quiet <= terminating - 0.25,
        "the quiet period restarted at the new flow: {pod:?}"
    );
    ensure!(
        pod.state == "draining" || pod.quiet_period_secs.is_some_and(|p| quiet >= p),
        "draining until the restarted quiet period is over: {pod:?}"
    );

    let pod = cli.wait_state("web", "drained")?;
    ensure!(pod.new_flows_since_termination == 1, "{pod:?}");
    ensure!(
        pod.quiet_for_secs.is_some_and(|q| q >= 4.0),
        "a full quiet period after the new flow: {pod:?}"
    );
    Ok(())
}

#[test]
fn deadline_leaves_flows_open() -> Result<()> {
    let (topo, _agent, cli) = one_pod(&[])?;
    let web = topo.pod("web");
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let mut conn = TcpConn::connect(topo.client(), server.addr())?;
    cli.wait_pod("web", "1 active flow", |p| p.active_flows == 1)?;

    cli.terminate("web", 1.0, 2.0)?;
    let mut wait = cli.spawn(&["wait", "web", "--timeout", "30"])?;
    let pod = cli.wait_state("web", "deadline")?;
    ensure!(
        pod.active_flows >= 1,
        "the held flow is still counted: {pod:?}"
    );

    let out = wait.wait_exit(TIMEOUT)?;
    ensure!(
        out.code == 2,
        "`conndrain wait` exits 2 at the deadline: {out:?}"
    );
    ensure!(
        out.all().contains('1'),
        "the message says 1 flow was still open: {out:?}"
    );
    // The agent never touches traffic: the flow still works.
    ensure!(
        conn.request("GET /fast")? == "200 /fast",
        "the connection survives the deadline"
    );
    let pod = cli.pod("web")?;
    ensure!(pod.state == "deadline", "deadline is final: {pod:?}");
    Ok(())
}

#[test]
fn udp_session_holds_pod_until_idle() -> Result<()> {
    let (topo, _agent, cli) = one_pod(&["--udp-timeout", "2"])?;
    let web = topo.pod("web");
    let server = UdpServer::start(web.ns(), web.addr_v4(5353))?;
    let client = UdpClient::connect(topo.client(), server.addr())?;
    let peer = client.local_addr();
    client.echo(b"hello")?;
    // Keep the session busy well inside the UDP timeout.
    let keepalive = Repeat::every(Duration::from_millis(200), move || {
        client.echo(b"still here")
    });

    let pod = cli.wait_pod("web", "1 active flow", |p| p.active_flows == 1)?;
    ensure!(pod.outbound_flows == 0, "{pod:?}");
    let flows = cli.flows(Some("web"))?;
    ensure!(
        flows.iter().any(|f| f.proto == "udp"
            && f.direction == "inbound"
            && f.active
            && f.peer_addr.parse::<SocketAddr>().ok() == Some(peer)),
        "an active inbound UDP flow from {peer}: {flows:#?}"
    );

    cli.terminate("web", 1.0, 60.0)?;
    let pod = cli.wait_pod("web", "termination older than the quiet period", |p| {
        p.terminating_for_secs.is_some_and(|t| t > 1.5)
    })?;
    ensure!(
        pod.state == "draining" && pod.active_flows == 1,
        "the live UDP session holds the pod: {pod:?}"
    );

    keepalive.stop()?;
    // Idle past --udp-timeout, then the quiet period: drained.
    let pod = cli.wait_state("web", "drained")?;
    ensure!(pod.active_flows == 0, "{pod:?}");
    ensure!(
        server.received() >= 2,
        "the keep-alive datagrams went through"
    );
    Ok(())
}

#[test]
fn bridge_pods_are_counted_apart() -> Result<()> {
    require_root()?;
    let topo = Topology::builder()
        .bridge_pod("a")
        .bridge_pod("b")
        .build()?;
    let bridge = topo.bridge().expect("a bridge topology").to_owned();
    let agent = Agent::start(topo.node(), &[])?;
    let cli = agent.cli();
    for name in ["a", "b"] {
        let pod = cli.add_pod(topo.pod(name))?;
        // The bridge never sees frames between two of its ports: each port is watched.
        ensure!(
            pod.interfaces.len() == 2 && !pod.interfaces.contains(&bridge),
            "pods on a bridge are watched on the bridge's ports, not the bridge: {pod:?}"
        );
    }

    let server_a = TcpServer::start(topo.pod("a").ns(), topo.pod("a").addr_v4(PORT))?;
    let server_b = TcpServer::start(topo.pod("b").ns(), topo.pod("b").addr_v4(PORT))?;
    let _to_a = TcpConn::connect_many(topo.client(), server_a.addr(), 2)?;
    let _to_b = TcpConn::connect_many(topo.client(), server_b.addr(), 3)?;

    let pods = conndrain_tests::wait_until(
        "pod a with 2 and pod b with 3 active flows",
        TIMEOUT,
        || cli.pods(),
        |pods| count(pods, "a") == Some(2) && count(pods, "b") == Some(3),
    )?;
    ensure!(pods.iter().all(|p| p.outbound_flows == 0), "{pods:?}");

    let status = cli.status()?;
    let interfaces = status["interfaces"]
        .as_array()
        .context("status has interfaces")?;
    ensure!(
        interfaces.len() == 2 && interfaces.iter().all(|i| i["name"] != bridge.as_str()),
        "the two bridge ports are attached, not the bridge: {status:#}"
    );
    ensure!(
        matches!(status["attach_mode"].as_str(), Some("tcx" | "clsact")),
        "attach_mode: {status:#}"
    );
    Ok(())
}

fn count(pods: &[PodStatus], name: &str) -> Option<u64> {
    pods.iter().find(|p| p.name == name).map(|p| p.active_flows)
}

#[test]
fn outbound_flows_do_not_hold_the_pod() -> Result<()> {
    let (topo, _agent, cli) = one_pod(&[])?;
    let web = topo.pod("web");
    // A server outside (in the client namespace) that the pod calls.
    let upstream = TcpServer::start(
        topo.client(),
        SocketAddr::new(topo.client_v4().into(), 9090),
    )?;
    let mut conn = TcpConn::connect(web.ns(), upstream.addr())?;

    let pod = cli.wait_pod("web", "1 outbound flow", |p| p.outbound_flows == 1)?;
    ensure!(
        pod.active_flows == 0,
        "an outbound flow is not an active one: {pod:?}"
    );
    let flows = cli.flows(Some("web"))?;
    ensure!(
        flows.iter().any(|f| f.direction == "outbound"
            && !f.active
            && f.peer_addr.parse::<SocketAddr>().ok() == Some(upstream.addr())
            && f.pod_addr.parse::<SocketAddr>().ok() == Some(conn.local_addr())),
        "an outbound flow from {} to {}: {flows:#?}",
        conn.local_addr(),
        upstream.addr()
    );

    cli.terminate("web", 1.0, 60.0)?;
    let pod = cli.wait_state("web", "drained")?;
    ensure!(pod.active_flows == 0, "{pod:?}");
    // Draining never touched it.
    ensure!(
        conn.request("GET /fast")? == "200 /fast",
        "the outbound connection still works"
    );
    Ok(())
}

#[test]
fn flows_and_why_name_the_peer() -> Result<()> {
    let (topo, _agent, cli) = one_pod(&[])?;
    let web = topo.pod("web");
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let conns = TcpConn::connect_many(topo.client(), server.addr(), 2)?;
    cli.wait_pod("web", "2 active flows", |p| p.active_flows == 2)?;

    let flows = cli.flows(Some("web"))?;
    for conn in &conns {
        let peer = conn.local_addr();
        let flow = flows
            .iter()
            .find(|f| f.peer_addr.parse::<SocketAddr>().ok() == Some(peer))
            .with_context(|| format!("a flow with peer_addr {peer}: {flows:#?}"))?;
        ensure!(
            flow.pod == "web"
                && flow.proto == "tcp"
                && flow.direction == "inbound"
                && flow.state == "established"
                && flow.active
                && !flow.idle
                && flow.pod_addr.parse::<SocketAddr>().ok() == Some(server.addr()),
            "flow from {peer} to {}: {flow:?}",
            server.addr()
        );
        ensure!(
            flow.bytes_in > 0 && flow.bytes_out > 0,
            "packets both ways: {flow:?}"
        );
        ensure!(
            flow.bytes_in > 0 && flow.bytes_out > 0,
            "bytes both ways: {flow:?}"
        );
    }
    // Without --pod, the same flows are there.
    let all = cli.flows(None)?;
    ensure!(inbound_tcp(&all).len() == 2, "{all:#?}");

    cli.terminate("web", 1.0, 60.0)?;
    let why = cli.ok(&["why", "web"])?;
    let client = topo.client_v4().to_string();
    ensure!(
        why.contains(&client),
        "`conndrain why web` names the peer {client}: {why}"
    );
    let table = cli.ok(&["pods"])?;
    ensure!(
        table.contains("web") && table.contains("draining"),
        "`conndrain pods`: {table}"
    );
    Ok(())
}

fn inbound_tcp(flows: &[FlowInfo]) -> Vec<&FlowInfo> {
    flows
        .iter()
        .filter(|f| f.proto == "tcp" && f.direction == "inbound" && f.active)
        .collect()
}

/// The kubelet keeps probing a terminating pod from the node's own address.
/// Those connections must not restart the quiet period, or a pod probed more
/// often than the quiet period would never drain.
#[test]
fn probes_from_the_node_do_not_hold_the_pod() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").build()?;
    let _agent = Agent::start(topo.node(), &[])?;
    let cli = _agent.cli();
    // The kubelet's probe port, as Kubernetes mode reads it from the pod spec.
    cli.add_pod_probed(topo.pod("web"), &[PORT])?;
    let web = topo.pod("web");
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    cli.terminate("web", 1.0, 60.0)?;

    // A probe every 200 ms from the node (5 per quiet period), until the pod drains.
    let mut probes = 0;
    let pod = loop {
        let mut conn = TcpConn::connect(topo.node(), server.addr())?;
        ensure!(conn.request("GET /fast")? == "200 /fast", "the probe gets an answer");
        conn.close()?;
        probes += 1;
        let pod = cli.pod("web")?;
        if pod.state == "drained" || probes > 100 {
            break pod;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(pod.state == "drained", "drained despite {probes} probes from the node: {pod:?}");
    ensure!(pod.new_flows_since_termination == 0, "probes are not new inbound flows: {pod:?}");
    Ok(())
}
