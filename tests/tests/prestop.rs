//! The preStop intercept (docs/prestop.md): the kubelet's
//! `lifecycle.preStop.httpGet` to `podIP:<intercept port>` is answered by the
//! agent like `/v1/wait` for that pod, and nothing else is intercepted.
//!
//! The agent attaches its cgroup programs to a cgroup the test makes
//! (`--intercept-cgroup`), and the "kubelet" is a process of the node's network
//! namespace in that cgroup, sending the GET the kubelet sends (bash's
//! `/dev/tcp`, so that it is a process of its own that can join a cgroup).

use std::net::SocketAddr;

use anyhow::{Result, ensure};
use conndrain_tests::{
    Agent, Bpffs, Cgroup, NODE_V4, Netns, Running, TIMEOUT, TcpConn, TcpServer, Topology, require_root, wait_until,
};

const PORT: u16 = 8080;
const INTERCEPT_PORT: u16 = 9464;
const LISTEN_PORT: u16 = 9466;

struct Node {
    topo: Topology,
    agent: Agent,
    cgroup: Cgroup,
}

/// A node with `pods` (only those in `registered` declared to the agent) and
/// an agent whose intercept is attached to a cgroup of the test's own.
fn setup(pods: &[&str], registered: &[&str]) -> Result<Node> {
    setup_with(pods, registered, &[])
}

/// `setup` with more agent arguments.
fn setup_with(pods: &[&str], registered: &[&str], extra: &[&str]) -> Result<Node> {
    require_root()?;
    let mut b = Topology::builder();
    for p in pods {
        b = b.pod(p);
    }
    let topo = b.build()?;
    let cgroup = Cgroup::unique("kubelet")?;
    let args = agent_args(&cgroup, extra);
    let agent = Agent::start(topo.node(), &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    ensure!(agent.log().contains("preStop intercept attached"), "the intercept is on: {}", agent.log());
    for p in registered {
        agent.cli().add_pod(topo.pod(p))?;
    }
    Ok(Node { topo, agent, cgroup })
}

/// The agent's arguments: the intercept attached to `cgroup`, and `extra`.
fn agent_args(cgroup: &Cgroup, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--host-ip".to_owned(),
        NODE_V4.to_string(),
        "--intercept-port".into(),
        INTERCEPT_PORT.to_string(),
        "--intercept-listen-port".into(),
        LISTEN_PORT.to_string(),
        "--intercept-cgroup".into(),
        cgroup.path().display().to_string(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args
}

/// `GET /v1/wait` to `to`, as the kubelet's preStop `httpGet` sends it, from
/// a process in `ns` (and in `cgroup`, if given); prints the whole answer.
fn get(ns: &Netns, cgroup: Option<&Cgroup>, to: SocketAddr) -> Result<Running> {
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} || exit 7; printf 'GET /v1/wait HTTP/1.1\\r\\nHost: pod\\r\\nUser-Agent: kube-lifecycle/1.31\\r\\nConnection: close\\r\\n\\r\\n' >&3; cat <&3",
        to.ip(),
        to.port()
    );
    let mut cmd = ns.command("bash");
    cmd.args(["-c", &script]);
    if let Some(cg) = cgroup {
        cg.join_on_spawn(&mut cmd)?;
    }
    Running::spawn(cmd)
}

/// How many waits the agent accepted through the intercept for `pod`.
fn intercepted_waits(agent: &Agent, pod: &str) -> usize {
    agent.log().lines().filter(|l| l.contains(&format!("preStop wait pod={pod}")) && l.contains("httpGet")).count()
}

#[test]
fn kubelet_http_get_to_a_pod_ip_returns_when_that_pod_drains() -> Result<()> {
    let Node { topo, agent, cgroup } = setup(&["web"], &["web"])?;
    let cli = agent.cli();
    let web = topo.pod("web");
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let mut conn = TcpConn::connect(topo.client(), server.addr())?;
    cli.wait_pod("web", "1 active flow", |p| p.active_flows == 1)?;
    cli.terminate("web", 0.5, 60.0)?;

    // Both families: the kubelet dials the pod IP it has.
    let mut v4 = get(topo.node(), Some(&cgroup), web.addr_v4(INTERCEPT_PORT))?;
    let mut v6 = get(topo.node(), Some(&cgroup), web.addr_v6(INTERCEPT_PORT))?;
    wait_until(
        "the agent to take both intercepted waits",
        TIMEOUT,
        || Ok(intercepted_waits(&agent, "web")),
        |n| *n == 2,
    )?;
    // The connection still serves, so the pod drains no matter how long we take here.
    ensure!(conn.request("GET /still-serving")?.contains("200"), "the pod's connection is open and serving");
    cli.wait_pod("web", "termination older than the quiet period", |p| p.quiet_for_secs.unwrap_or(0.0) > 0.5)?;
    ensure!(v4.is_running() && v6.is_running(), "the hooks block while a connection to the pod is open");
    ensure!(cli.pod("web")?.state == "draining", "still draining");

    conn.close()?;
    for (family, hook) in [("IPv4", &mut v4), ("IPv6", &mut v6)] {
        let out = hook.wait_exit(TIMEOUT)?;
        ensure!(out.code == 0, "{family}: the GET completed: {out:?}");
        ensure!(out.stdout.starts_with("HTTP/1.1 200"), "{family}: 200 from the agent: {out:?}");
        ensure!(
            out.stdout.contains(r#""pod":"web""#) && out.stdout.contains(r#""state":"drained""#),
            "{family}: the answer is web's drain: {out:?}"
        );
    }
    ensure!(server.accepted() == 1, "nothing but the client reached the pod's server");
    Ok(())
}

#[test]
fn a_pod_dialling_another_pods_ip_is_not_intercepted() -> Result<()> {
    let Node { topo, agent, cgroup } = setup(&["web", "other"], &["web", "other"])?;
    let web = topo.pod("web");
    // The pod's own listener on the intercept port: what a GET that is not intercepted reaches.
    let own = TcpServer::start(web.ns(), web.addr_v4(INTERCEPT_PORT))?;
    agent.cli().terminate("web", 0.5, 60.0)?;
    // In the intercepted cgroup, but in a pod's network namespace.
    let _from_pod = get(topo.pod("other").ns(), Some(&cgroup), web.addr_v4(INTERCEPT_PORT))?;
    wait_until("the GET to reach web itself", TIMEOUT, || Ok(own.accepted()), |n| *n == 1)?;
    ensure!(intercepted_waits(&agent, "web") == 0, "the agent took no wait: {}", agent.log());
    Ok(())
}

#[test]
fn addresses_of_no_registered_pod_and_processes_outside_the_cgroup_are_not_intercepted() -> Result<()> {
    let Node { topo, agent, cgroup } = setup(&["web", "stranger"], &["web"])?;
    let stranger = topo.pod("stranger");
    let own = TcpServer::start(stranger.ns(), stranger.addr_v4(INTERCEPT_PORT))?;
    let _to_stranger = get(topo.node(), Some(&cgroup), stranger.addr_v4(INTERCEPT_PORT))?;
    wait_until("the GET to reach the unregistered pod itself", TIMEOUT, || Ok(own.accepted()), |n| *n == 1)?;

    // A node process outside the cgroup the intercept is attached to goes to the pod too.
    let web = topo.pod("web");
    let web_own = TcpServer::start(web.ns(), web.addr_v4(INTERCEPT_PORT))?;
    let _outside = get(topo.node(), None, web.addr_v4(INTERCEPT_PORT))?;
    wait_until("the GET from outside the cgroup to reach web itself", TIMEOUT, || Ok(web_own.accepted()), |n| *n == 1)?;
    ensure!(intercepted_waits(&agent, "web") + intercepted_waits(&agent, "stranger") == 0, "{}", agent.log());
    Ok(())
}

#[test]
fn a_direct_connection_to_the_intercept_listener_gets_403() -> Result<()> {
    let Node { topo, agent, cgroup } = setup(&["web"], &["web"])?;
    agent.cli().terminate("web", 0.5, 60.0)?;
    for to in [
        SocketAddr::from(([127, 0, 0, 1], LISTEN_PORT)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, LISTEN_PORT)),
    ] {
        // Inside the intercepted cgroup and outside it: no recorded pod either way.
        for cg in [Some(&cgroup), None] {
            let out = get(topo.node(), cg, to)?.wait_exit(TIMEOUT)?;
            ensure!(out.stdout.starts_with("HTTP/1.1 403"), "{to}: refused: {out:?}");
            ensure!(out.stdout.contains("only the kubelet's preStop httpGet"), "{to}: says why: {out:?}");
        }
    }
    ensure!(intercepted_waits(&agent, "web") == 0, "{}", agent.log());
    Ok(())
}

/// Without `--bpffs` the hook belongs to the agent process, so once the
/// agent is gone the kubelet's GET reaches the pod's own port (refused when
/// nothing listens there; here a listener shows it). See the next test for
/// `--bpffs`, which `deploy/daemonset.yaml` sets.
#[test]
fn without_bpffs_with_the_agent_gone_the_get_reaches_the_pod_itself() -> Result<()> {
    let Node { topo, mut agent, cgroup } = setup(&["web"], &["web"])?;
    let web = topo.pod("web");
    let own = TcpServer::start(web.ns(), web.addr_v4(INTERCEPT_PORT))?;
    agent.stop()?;
    let _hook = get(topo.node(), Some(&cgroup), web.addr_v4(INTERCEPT_PORT))?;
    wait_until("the GET to reach web itself", TIMEOUT, || Ok(own.accepted()), |n| *n == 1)?;
    Ok(())
}

/// The highest retransmission count of the node's connections in SYN-SENT to
/// the intercept's loopback listener (`ss -o`: `timer:(on,1.2sec,2)`), if any.
fn syn_retransmits(node: &Netns) -> Result<Option<u32>> {
    let mut cmd = node.command("ss");
    cmd.args(["-tnoH", "state", "syn-sent", "dport", "=", &format!(":{LISTEN_PORT}")]);
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| l.split("timer:(on,").nth(1)?.split(')').next()?.rsplit(',').next()?.parse::<u32>().ok())
        .max())
}

/// With `--bpffs` the hook outlives the agent: after kill -9 the kubelet's
/// GET is still sent to the loopback port, where nothing listens, and its
/// SYN is held back (dropped, so the kernel retries it) instead of refused;
/// a new agent on the same bpffs adopts the links and answers the GET with
/// the drain's outcome.
#[test]
fn with_bpffs_the_get_waits_through_an_agent_restart() -> Result<()> {
    let bpffs = Bpffs::mount()?;
    let bpf = bpffs.arg();
    let Node { topo, mut agent, cgroup } = setup_with(&["web"], &["web"], &["--bpffs", &bpf])?;
    let cli = agent.cli();
    let web = topo.pod("web");
    // The pod's own listener on the intercept port: a GET that is not intercepted reaches it.
    let own = TcpServer::start(web.ns(), web.addr_v4(INTERCEPT_PORT))?;
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let mut conn = TcpConn::connect(topo.client(), server.addr())?;
    cli.wait_pod("web", "1 active flow", |p| p.active_flows == 1)?;
    cli.terminate("web", 0.5, 120.0)?;
    let links = std::fs::read_dir(bpffs.layout_dir().join("intercept"))?.count();
    ensure!(links == 4, "the four intercept links are pinned: {links}");

    agent.kill9()?;
    let mut hook = get(topo.node(), Some(&cgroup), web.addr_v4(INTERCEPT_PORT))?;
    // Its SYN was sent and dropped at least once, and it is retried: the
    // connect waits (a refusal would have ended it at the first SYN).
    wait_until("the GET's SYN to be retried", TIMEOUT, || syn_retransmits(topo.node()), |n| n.is_some_and(|n| n >= 1))?;
    ensure!(hook.is_running(), "the GET waits while no agent runs: {}", hook.stdout_so_far());
    ensure!(own.accepted() == 0, "the GET did not reach the pod's own port");

    let args = agent_args(&cgroup, &["--bpffs", &bpf]);
    agent.restart(topo.node(), &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let log = agent.log();
    ensure!(
        log.contains("preStop intercept attached") && log.contains("adopted=true"),
        "adopted the pinned links:\n{log}"
    );
    // The next retransmission connects (the backoff doubles: up to 16 s
    // after the restart here), and the agent takes the wait.
    wait_until("the agent to take the held GET", TIMEOUT * 3, || Ok(intercepted_waits(&agent, "web")), |n| *n == 1)?;
    ensure!(conn.request("GET /still-serving")?.contains("200"), "the pod's connection is open and serving");
    ensure!(hook.is_running(), "the GET waits for the drain: {}", hook.stdout_so_far());
    conn.close()?;
    let out = hook.wait_exit(TIMEOUT)?;
    ensure!(out.code == 0 && out.stdout.starts_with("HTTP/1.1 200"), "200 from the agent: {out:?}");
    ensure!(
        out.stdout.contains(r#""pod":"web""#) && out.stdout.contains(r#""state":"drained""#),
        "web's drain: {out:?}"
    );
    ensure!(own.accepted() == 0, "nothing reached the pod's own port");

    // `conndrain cleanup` removes the pinned intercept with the other pins:
    // then a GET goes to the pod's own port again.
    agent.kill9()?;
    let mut cmd = topo.node().command(&conndrain_tests::conndrain_bin().to_string_lossy());
    cmd.arg("--socket").arg(agent.socket()).arg("cleanup").args(["--bpffs", &bpf]);
    let out = conndrain_tests::run_with_timeout(cmd, TIMEOUT)?;
    ensure!(out.code == 0 && out.stdout.contains("intercept/syn-hold"), "cleanup removes the intercept links: {out:?}");
    let _after = get(topo.node(), Some(&cgroup), web.addr_v4(INTERCEPT_PORT))?;
    wait_until("the GET to reach web itself once cleaned up", TIMEOUT, || Ok(own.accepted()), |n| *n == 1)?;
    Ok(())
}
