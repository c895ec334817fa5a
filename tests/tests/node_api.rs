//! The node API that pods reach on the node's IP: `conndrain wait` as a
//! preStop hook releases the calling pod, and only that pod; callers that are
//! not pods of this node are refused; the preStop client fails open. The
//! metrics listener answers whom its policy allows, a pod of this node like
//! any other, and counts how each wait ended.
//!
//! Runs the agent in standalone mode (pods declared with the CLI), which
//! serves the same node API as the Kubernetes mode.

use std::net::SocketAddr;

use anyhow::{Context as _, Result, ensure};
use conndrain_tests::{
    Agent, Cli, NODE_V4, Netns, Output, Running, TIMEOUT, TcpConn, TcpServer, Topology, conndrain_bin,
    metrics::{http_get, sample, scrape},
    require_root,
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

/// `pod add NAMESPACE/NAME` for a pod of the topology, as Kubernetes mode names pods.
fn add_namespaced(cli: &Cli, namespace: &str, pod: &conndrain_tests::Pod) -> Result<String> {
    let name = format!("{namespace}/{}", pod.name());
    let ips: Vec<String> = pod.ips().iter().map(ToString::to_string).collect();
    let mut args = vec!["pod", "add", &name];
    for ip in &ips {
        args.extend(["--ip", ip]);
    }
    cli.ok(&args)?;
    cli.wait_pod(&name, "the pod to be attached", |p| !p.interfaces.is_empty())?;
    Ok(name)
}

/// A Prometheus pod on the node scrapes like one elsewhere: the policy
/// (`--metrics-allow`, `--metrics-bind-address`) decides, not where it runs.
#[test]
fn metrics_are_for_whoever_the_policy_allows_a_pod_of_the_node_too() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").pod("prom").build()?;
    let args = agent_args();
    let mut agent = Agent::start(topo.node(), &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let cli = agent.cli();
    let (web, prom) = (topo.pod("web"), topo.pod("prom"));
    let name = add_namespaced(&cli, "shop", web)?;
    cli.add_pod(prom)?;
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let _conn = TcpConn::connect(topo.client(), server.addr())?;
    cli.wait_pod(&name, "1 active flow", |p| p.active_flows == 1)?;

    // The default policy: every caller, the node's own pods included.
    let from_client = scrape(topo.client(), node_addr(METRICS_PORT))?;
    let from_prom = scrape(prom.ns(), node_addr(METRICS_PORT)).context("a pod of the node scrapes")?;
    for page in [&from_client, &from_prom] {
        ensure!(
            sample(page, r#"conndrain_pod_active_flows{namespace="shop",pod="web"}"#) == Some(1.0),
            "per-pod series carry the namespace and the pod apart: {page}"
        );
        ensure!(
            sample(page, r#"conndrain_pod_active_flows{namespace="",pod="prom"}"#) == Some(0.0),
            "a standalone pod has no namespace: {page}"
        );
    }
    let page = from_prom;
    for (family, kind) in [
        ("conndrain_build_info", "gauge"),
        ("conndrain_pod_active_flows", "gauge"),
        ("conndrain_drains", "counter"),
        ("conndrain_prestop_waits", "counter"),
        ("conndrain_flows_evicted", "counter"),
        ("conndrain_events_lost", "counter"),
        ("conndrain_hold_failed", "counter"),
        ("conndrain_steered_packets", "counter"),
        ("conndrain_resets_sent", "counter"),
        ("conndrain_drain_duration_seconds", "histogram"),
        ("conndrain_flow_table_max_entries", "gauge"),
        ("conndrain_pinned_flows", "gauge"),
    ] {
        ensure!(page.contains(&format!("\n# TYPE {family} {kind}\n")), "{family} is a {kind}: {page}");
    }
    for counter in ["conndrain_flows_evicted_total", "conndrain_events_lost_total", "conndrain_steered_packets_total"] {
        ensure!(sample(&page, counter).is_some(), "{counter}: {page}");
    }
    // The version, and the commit the binary was built from (the tests build it in a checkout).
    let build = page.lines().find(|l| l.starts_with("conndrain_build_info{")).context("conndrain_build_info")?;
    let version = format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"));
    let commit = build.split(r#"git_commit=""#).nth(1).and_then(|c| c.split('"').next()).unwrap_or_default();
    ensure!(
        build.contains(&version) && commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
        "build_info names the version and the git commit: {build}"
    );
    ensure!(build.ends_with("} 1"), "{build}");
    let samples: Vec<&str> = page.lines().filter(|l| !l.starts_with('#')).collect();
    for old in ["conndrain_steered_packets ", "conndrain_events_lost ", "conndrain_hold_failed "] {
        ensure!(!samples.iter().any(|l| l.starts_with(old)), "{old:?} is no gauge any more: {page}");
    }
    ensure!(!page.contains("pod=\"shop/web\""), "no namespace/name in one label: {page}");

    // An allow-list without the pods, and the metrics on another address and port.
    let mut args = agent_args();
    args.extend(["--metrics-allow".into(), "10.100.0.0/24,fd00:100::/64".into()]);
    args.extend(["--metrics-bind-address".into(), format!("{NODE_V4}:{}", METRICS_PORT + 1)]);
    agent.stop()?;
    agent.restart(topo.node(), &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let moved = node_addr(METRICS_PORT + 1);
    scrape(topo.client(), moved).context("the client's network is allowed")?;
    let (code, body) = http_get(prom.ns(), moved, "/metrics")?;
    ensure!(code == 403 && body.contains("--metrics-allow"), "a pod outside the list is refused: {code} {body}");
    for path in ["/healthz", "/readyz"] {
        let (code, body) = http_get(prom.ns(), moved, path)?;
        ensure!(code == 200, "{path} answers anyone who reaches it: {code} {body}");
    }
    ensure!(
        http_get(topo.client(), node_addr(METRICS_PORT), "/metrics").is_err(),
        "nothing listens on the default port any more"
    );
    Ok(())
}

/// Every way a preStop wait ends is counted, after real `conndrain wait`
/// hooks: drained, deadline, cancelled (the hook's own timeout), refused
/// (no pod), busy (the pod's bound), error (the pod removed mid-wait), and
/// the drains themselves. (skipped needs a pod the agent cannot track, such
/// as a macvlan one, that still reaches the node's API: not set up here.)
#[test]
fn pre_stop_wait_outcomes_are_counted() -> Result<()> {
    let (topo, agent, cli) = setup(&["web", "slow", "idle", "gone"], &["--max-waiters-per-pod", "1"])?;
    let (web, slow, idle, gone) = (topo.pod("web"), topo.pod("slow"), topo.pod("idle"), topo.pod("gone"));
    let server = TcpServer::start(slow.ns(), slow.addr_v4(PORT))?;
    let _held = TcpConn::connect(topo.client(), server.addr())?;
    cli.wait_pod("slow", "1 active flow", |p| p.active_flows == 1)?;
    let waits = |page: &str, outcome: &str| sample(page, &format!("conndrain_prestop_waits_total{{outcome=\"{outcome}\"}}"));

    let page = scrape(topo.client(), node_addr(METRICS_PORT))?;
    for outcome in ["drained", "deadline", "skipped", "cancelled", "refused", "busy", "error"] {
        ensure!(waits(&page, outcome) == Some(0.0), "{outcome} is there at 0 from the start: {page}");
    }

    // refused: the client is no pod of this node.
    let (code, _) = http_get(topo.client(), node_addr(WAIT_PORT), "/v1/wait")?;
    ensure!(code == 403, "{code}");
    // drained, and deadline (a connection stays open past a short deadline).
    cli.terminate("web", 0.5, 60.0)?;
    cli.terminate("slow", 0.5, 1.5)?;
    for (pod, says) in [(web, "drained after"), (slow, "reached its deadline")] {
        let out = pre_stop(pod.ns(), &["--fallback-sleep", "0"])?.wait_exit(TIMEOUT)?;
        let said = format!("{}{}", out.stdout, out.stderr);
        ensure!(out.code == 0 && said.contains(says), "{}'s hook: {out:?}", pod.name());
    }
    // busy: a second wait of a pod that may have one; then cancelled: the first hook gives up.
    let mut hook = pre_stop(idle.ns(), &["--timeout", "5", "--fallback-sleep", "0"])?;
    conndrain_tests::wait_until(
        "the agent to accept idle's wait",
        TIMEOUT,
        || Ok(agent.log().contains("preStop wait pod=idle")),
        |accepted| *accepted,
    )?;
    let (code, _) = http_get(idle.ns(), node_addr(WAIT_PORT), "/v1/wait")?;
    ensure!(code == 429, "{code}");
    let out = hook.wait_exit(TIMEOUT)?;
    ensure!(out.stderr.contains("did not answer within"), "idle's hook gave up: {out:?}");

    // error: the pod is removed while its hook waits.
    let mut hook = pre_stop(gone.ns(), &["--fallback-sleep", "0"])?;
    conndrain_tests::wait_until(
        "the agent to accept gone's wait",
        TIMEOUT,
        || Ok(agent.log().contains("preStop wait pod=gone")),
        |accepted| *accepted,
    )?;
    cli.ok(&["pod", "remove", "gone"])?;
    let out = hook.wait_exit(TIMEOUT)?;
    ensure!(out.stderr.contains("409") && out.stderr.contains("falling back"), "gone's hook: {out:?}");

    let page = conndrain_tests::wait_until(
        "the cancelled wait to be counted",
        TIMEOUT,
        || scrape(topo.client(), node_addr(METRICS_PORT)),
        |page| waits(page, "cancelled") == Some(1.0),
    )?;
    for (outcome, n) in
        [("drained", 1.0), ("deadline", 1.0), ("skipped", 0.0), ("cancelled", 1.0), ("refused", 1.0), ("busy", 1.0), ("error", 1.0)]
    {
        ensure!(waits(&page, outcome) == Some(n), "{n} preStop wait(s) {outcome}: {page}");
    }
    for (outcome, n) in [("drained", 1.0), ("deadline", 1.0)] {
        let series = format!("conndrain_drains_total{{outcome=\"{outcome}\"}}");
        ensure!(sample(&page, &series) == Some(n), "{series}: {page}");
    }
    ensure!(sample(&page, "conndrain_drain_duration_seconds_count") == Some(2.0), "{page}");
    Ok(())
}
