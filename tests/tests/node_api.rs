//! The node API that pods reach on the node's IP: `conndrain wait` as a
//! preStop hook releases the calling pod, and only that pod; callers that are
//! not pods of this node are refused; the preStop client fails open.
//!
//! Runs the agent in standalone mode (pods declared with the CLI), which
//! serves the same node API as the Kubernetes mode.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
};

use anyhow::{Context as _, Result, ensure};
use conndrain_tests::{
    Agent, Cli, NODE_V4, Netns, Output, Running, TIMEOUT, TcpConn, TcpServer, Topology, conndrain_bin,
    require_root, run_in,
};

const PORT: u16 = 8080;
const WAIT_PORT: u16 = 9464;
const METRICS_PORT: u16 = 9465;

fn agent_args() -> Vec<String> {
    vec![
        "--host-ip".into(),
        NODE_V4.to_string(),
        "--wait-port".into(),
        WAIT_PORT.to_string(),
        "--metrics-port".into(),
        METRICS_PORT.to_string(),
    ]
}

fn setup(pods: &[&str], extra: &[&str]) -> Result<(Topology, Agent, Cli)> {
    require_root()?;
    let mut b = Topology::builder();
    for p in pods {
        b = b.pod(p);
    }
    let topo = b.build()?;
    let mut args = agent_args();
    args.extend(extra.iter().map(ToString::to_string));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(topo.node(), &args)?;
    let cli = agent.cli();
    for p in pods {
        cli.add_pod(topo.pod(p))?;
    }
    Ok((topo, agent, cli))
}

/// `conndrain wait` in preStop mode, run inside `ns` as the pod's hook would be.
fn pre_stop(ns: &Netns, extra: &[&str]) -> Result<Running> {
    let mut cmd = ns.command(&conndrain_bin().to_string_lossy());
    cmd.arg("wait")
        .args(extra)
        .env("HOST_IP", NODE_V4.to_string())
        .env("CONNDRAIN_WAIT_PORT", WAIT_PORT.to_string());
    Running::spawn(cmd)
}

/// A raw HTTP GET from inside `ns`, returning (status code, body).
fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let path = path.to_owned();
    run_in(ns, move || -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let code = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("an HTTP status line in {resp:?}"))?;
        let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        Ok((code, body))
    })?
}

fn node_addr(port: u16) -> SocketAddr {
    SocketAddr::new(NODE_V4.into(), port)
}

#[test]
fn pre_stop_wait_returns_when_the_calling_pod_drains() -> Result<()> {
    let (topo, _agent, cli) = setup(&["web"], &[])?;
    let web = topo.pod("web");
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let conn = TcpConn::connect(topo.client(), server.addr())?;
    cli.wait_pod("web", "1 active flow", |p| p.active_flows == 1)?;
    cli.terminate("web", 1.0, 60.0)?;

    let mut hook = pre_stop(web.ns(), &["--fallback-sleep", "0"])?;
    // Still held by the open connection, well past the quiet period.
    cli.wait_pod("web", "termination older than the quiet period", |p| {
        p.terminating_for_secs.unwrap_or(0.0) > 1.5
    })?;
    ensure!(hook.is_running(), "the preStop wait blocks while a connection is open");
    ensure!(cli.pod("web")?.state == "draining", "still draining");

    conn.close()?;
    let out = hook.wait_exit(TIMEOUT)?;
    ensure!(out.code == 0, "preStop exits 0: {out:?}");
    ensure!(out.stdout.contains("drained"), "it reports the drain: {out:?}");
    ensure!(!out.stderr.contains("falling back"), "it did not fall back: {out:?}");
    ensure!(cli.pod("web")?.state == "drained", "the pod is drained");
    Ok(())
}

#[test]
fn callers_that_are_not_local_pods_get_403() -> Result<()> {
    let (topo, _agent, _cli) = setup(&["web"], &[])?;
    let (code, body) = http_get(topo.client(), node_addr(WAIT_PORT), "/v1/wait")?;
    ensure!(code == 403, "the client namespace is no pod: got {code} {body}");
    ensure!(body.contains("not a pod on this node"), "{body}");
    Ok(())
}

#[test]
fn a_pod_cannot_wait_for_another_pod() -> Result<()> {
    let (topo, _agent, cli) = setup(&["a", "b"], &[])?;
    // No way to name another pod.
    let (code, body) = http_get(topo.pod("a").ns(), node_addr(WAIT_PORT), "/v1/wait?pod=b")?;
    ensure!(code == 400, "a pod name in the request is refused: got {code} {body}");

    // b drains (no flows at all); a, still serving, must not be released by it.
    let mut a_hook = pre_stop(topo.pod("a").ns(), &["--timeout", "4", "--fallback-sleep", "0"])?;
    cli.terminate("b", 0.5, 60.0)?;
    cli.wait_state("b", "drained")?;
    let out = a_hook.wait_exit(TIMEOUT)?;
    ensure!(out.code == 0, "preStop always exits 0: {out:?}");
    ensure!(
        out.stderr.contains("did not answer within") && !out.stdout.contains("drained"),
        "a's wait was not answered with b's outcome: {out:?}"
    );
    ensure!(cli.pod("a")?.state == "serving", "a is untouched");
    Ok(())
}

#[test]
fn pre_stop_falls_back_to_sleep_without_an_agent() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").build()?;
    let mut hook = pre_stop(topo.pod("web").ns(), &["--fallback-sleep", "1"])?;
    let out: Output = hook.wait_exit(TIMEOUT)?;
    ensure!(out.code == 0, "fails open: {out:?}");
    ensure!(
        out.stderr.contains("cannot reach the conndrain agent") && out.stderr.contains("falling back to sleeping 1s"),
        "says why and what it does instead: {out:?}"
    );
    Ok(())
}

#[test]
fn concurrent_waiters_are_bounded() -> Result<()> {
    let (topo, agent, _cli) = setup(&["a", "b"], &["--max-waiters", "1"])?;
    let mut a_hook = pre_stop(topo.pod("a").ns(), &["--fallback-sleep", "0"])?;
    // Once a holds the only slot (the agent logs each accepted wait), b is told to come back later.
    conndrain_tests::wait_until(
        "the agent to accept a's wait",
        TIMEOUT,
        || Ok(agent.log().contains("preStop wait pod=a")),
        |accepted| *accepted,
    )?;
    let last = http_get(topo.pod("b").ns(), node_addr(WAIT_PORT), "/v1/wait")?;
    ensure!(last.0 == 429, "the second waiter is refused with 429: {last:?}");
    ensure!(a_hook.is_running(), "the first waiter still waits");
    Ok(())
}

/// One pod (a buggy hook, or a hostile container) cannot take every waiter
/// slot: past its own bound it gets 429, and other pods still get theirs.
#[test]
fn one_pod_cannot_take_every_waiter_slot() -> Result<()> {
    let (topo, agent, _cli) = setup(&["a", "b"], &[])?;
    let per_pod = 8;
    let _hooks: Vec<Running> =
        (0..per_pod).map(|_| pre_stop(topo.pod("a").ns(), &["--fallback-sleep", "0"])).collect::<Result<_>>()?;
    conndrain_tests::wait_until(
        "the agent to accept a's waits",
        TIMEOUT,
        || Ok(agent.log().matches("preStop wait pod=a").count()),
        |accepted| *accepted == per_pod,
    )?;
    let more = http_get(topo.pod("a").ns(), node_addr(WAIT_PORT), "/v1/wait")?;
    ensure!(more.0 == 429 && more.1.contains("waits open"), "a's next wait is refused: {more:?}");
    let mut b_hook = pre_stop(topo.pod("b").ns(), &["--fallback-sleep", "0"])?;
    conndrain_tests::wait_until(
        "the agent to accept b's wait",
        TIMEOUT,
        || Ok(agent.log().contains("preStop wait pod=b")),
        |accepted| *accepted,
    )?;
    ensure!(b_hook.is_running(), "b waits (it is not draining)");
    Ok(())
}

#[test]
fn metrics_and_health_for_the_node_not_for_pods() -> Result<()> {
    let (topo, _agent, cli) = setup(&["web"], &[])?;
    let web = topo.pod("web");
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let _conn = TcpConn::connect(topo.client(), server.addr())?;
    cli.wait_pod("web", "1 active flow", |p| p.active_flows == 1)?;

    let (code, body) = http_get(topo.client(), node_addr(METRICS_PORT), "/metrics")?;
    ensure!(code == 200, "metrics from outside the node's pods: {code} {body}");
    ensure!(
        body.contains("conndrain_pod_active_flows{pod=\"web\"} 1"),
        "per-pod active flows in Prometheus text: {body}"
    );
    for metric in ["conndrain_flow_table_max_entries", "conndrain_pinned_flows", "conndrain_steered_packets", "conndrain_flows_evicted_total"] {
        ensure!(body.contains(metric), "{metric} is exported: {body}");
    }
    let (code, _) = http_get(web.ns(), node_addr(METRICS_PORT), "/metrics")?;
    ensure!(code == 403, "a pod may not read other pods' metrics: {code}");
    for path in ["/healthz", "/readyz"] {
        let (code, body) = http_get(topo.client(), node_addr(METRICS_PORT), path)?;
        ensure!(code == 200, "{path}: {code} {body}");
    }
    Ok(())
}
