//! Kubernetes mode end to end: the real agent in a node namespace, talking to
//! the in-repo fake API server (real wire protocol, reached through a
//! kubeconfig, so kube-rs's watcher, reflector, patch and event recorder are
//! exercised) and tracking real flows through the node.
//!
//! The fake server enforces exactly the RBAC rules the agent declares
//! (`conndrain::kubernetes::API_CALLS`): any other call gets 403, and every
//! test checks that none did.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use conndrain_tests::{
    Agent, Cli, NODE_V4, Netns, Running, TIMEOUT, TcpConn, TcpServer, Topology, conndrain_bin,
    fakeapi::{AgentApi, FakeApiServer},
    require_root, wait_until,
};
use k8s_openapi::api::core::v1::Pod;

const NODE: &str = "node-a";
const NS: &str = "default";
const PORT: u16 = 8080;
const CONDITION: &str = "conndrain.io/Drained";

struct Cluster {
    k8s: AgentApi,
    _agent: Agent,
    cli: Cli,
}

impl Cluster {
    fn api(&self) -> &FakeApiServer {
        &self.k8s.api
    }
}

/// The fake API server inside the node namespace (on its loopback), with the
/// agent's RBAC, and the agent in Kubernetes mode.
fn cluster(topo: &Topology, extra: &[&str]) -> Result<Cluster> {
    let agent_api = AgentApi::start(topo.node())?;
    let kc = agent_api.kubeconfig_arg();
    let node_ip = NODE_V4.to_string();
    let mut args = vec![
        "--kubeconfig",
        &kc,
        "--node-name",
        NODE,
        "--host-ip",
        &node_ip,
        "--quiet-period",
        "1",
        "--min-write-interval",
        "0.2",
    ];
    args.extend_from_slice(extra);
    let agent = Agent::start_with(topo.node(), &args)?;
    let cli = agent.cli();
    Ok(Cluster { k8s: agent_api, _agent: agent, cli })
}

fn pod_object(name: &str, node: &str, ips: &[String], host_network: bool) -> Result<Pod> {
    let ips: Vec<serde_json::Value> = ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect();
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"nodeName": node, "hostNetwork": host_network, "containers": [{"name": "app", "image": "app"}]},
        "status": {
            "phase": "Running",
            "podIP": ips.first().and_then(|v| v["ip"].as_str()).unwrap_or_default(),
            "podIPs": ips,
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    }))?)
}

/// Creates the pod in the API and waits until the agent tracks it (as the
/// kubelet would, before the pod is ready and gets traffic).
fn add_pod(c: &Cluster, topo: &Topology, name: &str) -> Result<()> {
    let p = topo.pod(name);
    c.api().create_pod(pod_object(name, NODE, &[p.ipv4().to_string(), p.ipv6().to_string()], false)?);
    c.cli.wait_pod(&format!("{NS}/{name}"), "the pod to be tracked", |p| p.state == "serving")?;
    Ok(())
}

/// The pod's `conndrain.io/Drained` condition as (status, reason, message).
fn condition(api: &FakeApiServer, name: &str) -> Option<(String, String, String)> {
    let pod = api.pod(NS, name)?;
    let conds = pod.status?.conditions?;
    conds.into_iter().find(|c| c.type_ == CONDITION).map(|c| {
        (c.status, c.reason.unwrap_or_default(), c.message.unwrap_or_default())
    })
}

fn wait_condition(api: &FakeApiServer, name: &str, status: &str, reason: &str) -> Result<(String, String, String)> {
    wait_until(
        &format!("condition {CONDITION}={status} ({reason}) on {name}"),
        TIMEOUT,
        || Ok(condition(api, name)),
        |c| c.as_ref().is_some_and(|(s, r, _)| s == status && r == reason),
    )
    .map(|c| c.unwrap_or_default())
}

fn event_reasons(api: &FakeApiServer, name: &str) -> Vec<String> {
    api.events()
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.reason)
        .collect()
}

fn no_forbidden_calls(api: &FakeApiServer) -> Result<()> {
    let denied: Vec<_> = api.requests().into_iter().filter(|r| r.status == 403).collect();
    ensure!(denied.is_empty(), "the agent only makes calls its RBAC allows: {denied:#?}");
    Ok(())
}

fn pre_stop(ns: &Netns) -> Result<Running> {
    let mut cmd = ns.command(&conndrain_bin().to_string_lossy());
    cmd.args(["wait", "--fallback-sleep", "0"]).env("HOST_IP", NODE_V4.to_string());
    Running::spawn(cmd)
}

fn web_name() -> String {
    format!("{NS}/web")
}

#[test]
fn deleted_pod_drains_reports_and_is_released_through_pre_stop() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").pod("other").pod("hostnet").build()?;
    let c = cluster(&topo, &[])?;
    add_pod(&c, &topo, "web")?;
    // A pod of another node and a hostNetwork pod of this node.
    let other = topo.pod("other");
    c.api().create_pod(pod_object("other", "node-b", &[other.ipv4().to_string()], false)?);
    c.api().create_pod(pod_object("hostnet", NODE, &[NODE_V4.to_string()], true)?);

    let web = topo.pod("web");
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let conns = TcpConn::connect_many(topo.client(), server.addr(), 2)?;
    let p = c.cli.wait_pod(&web_name(), "2 active flows", |p| p.active_flows == 2)?;
    ensure!(p.state == "serving", "{p:?}");

    let pods = c.cli.pods()?;
    ensure!(!pods.iter().any(|p| p.name.ends_with("/other")), "a pod of another node is ignored: {pods:?}");
    let hostnet = pods.iter().find(|p| p.name.ends_with("/hostnet")).context("the hostNetwork pod is listed")?;
    ensure!(hostnet.state == "skipped", "the hostNetwork pod is skipped: {hostnet:?}");
    let table = c.cli.ok(&["pods"])?;
    ensure!(table.contains("hostNetwork"), "`conndrain pods` says why: {table}");

    // kubectl delete pod web: the kubelet's kill time is 60 s from now.
    c.api().mark_pod_deleted(NS, "web", 60);
    let (_, _, msg) = wait_condition(&c.api(), "web", "False", "Draining")?;
    ensure!(msg.contains("2 active"), "the message has the counts: {msg}");
    wait_until("a DrainStarted event", TIMEOUT, || Ok(event_reasons(&c.api(), "web")), |r| {
        r.iter().any(|x| x == "DrainStarted")
    })?;
    let mut hook = pre_stop(web.ns())?;

    let mut conns = conns.into_iter();
    conns.next().context("first connection")?.close()?;
    c.cli.wait_pod(&web_name(), "1 active flow", |p| p.active_flows == 1)?;
    ensure!(hook.is_running(), "the preStop wait blocks while a connection is open");
    ensure!(
        condition(&c.api(), "web").is_some_and(|(s, _, _)| s == "False"),
        "still Draining with a connection open"
    );
    conns.next().context("second connection")?.close()?;

    let out = hook.wait_exit(TIMEOUT)?;
    ensure!(out.code == 0 && out.stdout.contains("drained"), "preStop released the pod: {out:?}");
    let (_, _, msg) = wait_condition(&c.api(), "web", "True", "NoConnections")?;
    ensure!(msg.contains("0 active"), "{msg}");
    let reasons = wait_until("a Drained event", TIMEOUT, || Ok(event_reasons(&c.api(), "web")), |r| {
        r.iter().any(|x| x == "Drained")
    })?;
    ensure!(reasons.iter().any(|r| r == "DrainStarted"), "{reasons:?}");
    // The Ready condition the kubelet wrote is still there.
    let pod = c.api().pod(NS, "web").context("web")?;
    let conds = pod.status.and_then(|s| s.conditions).unwrap_or_default();
    ensure!(conds.iter().any(|c| c.type_ == "Ready"), "other conditions are kept: {conds:?}");
    no_forbidden_calls(c.api())
}

/// A pod whose containers started before this agent may have connections
/// its sockets tracepoint never saw (a first install): with no connection
/// left that the agent can see, it still cannot say `drained`, so the pod
/// runs to its deadline, and `why` says why.
#[test]
fn a_pod_running_before_the_agent_runs_to_its_deadline() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").build()?;
    let c = cluster(&topo, &["--deadline-margin", "1"])?;
    let web = topo.pod("web");
    let mut pod = pod_object("web", NODE, &[web.ipv4().to_string()], false)?;
    let status = pod.status.as_mut().expect("a status");
    status.start_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(3600),
    ));
    c.api().create_pod(pod);
    c.cli.wait_pod(&web_name(), "the pod to be tracked", |p| p.state == "serving")?;
    c.api().mark_pod_deleted(NS, "web", 5);
    wait_condition(&c.api(), "web", "True", "DeadlineReached")?;
    let why = c.cli.ok(&["why", &web_name()])?;
    ensure!(why.contains("already running when conndrain first saw it"), "why: {why}");
    no_forbidden_calls(c.api())
}

#[test]
fn deadline_is_reported_when_connections_stay_open() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").build()?;
    let c = cluster(&topo, &["--deadline-margin", "1"])?;
    add_pod(&c, &topo, "web")?;
    let web = topo.pod("web");
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let _conn = TcpConn::connect(topo.client(), server.addr())?;
    c.cli.wait_pod(&web_name(), "1 active flow", |p| p.active_flows == 1)?;

    c.api().mark_pod_deleted(NS, "web", 4);
    let (_, _, msg) = wait_condition(&c.api(), "web", "True", "DeadlineReached")?;
    ensure!(msg.contains("1 active"), "the message says what was left: {msg}");
    ensure!(c.cli.pod(&web_name())?.state == "deadline", "the CLI agrees");
    no_forbidden_calls(c.api())
}

#[test]
fn api_outage_during_a_drain_delays_the_report_but_loses_nothing() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").build()?;
    let c = cluster(&topo, &[])?;
    add_pod(&c, &topo, "web")?;
    let web = topo.pod("web");
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let conn = TcpConn::connect(topo.client(), server.addr())?;
    c.cli.wait_pod(&web_name(), "1 active flow", |p| p.active_flows == 1)?;
    c.api().mark_pod_deleted(NS, "web", 60);
    wait_condition(&c.api(), "web", "False", "Draining")?;

    c.api().set_down(true);
    conn.close()?;
    // The datapath and the agent go on without the API server.
    c.cli.wait_state(&web_name(), "drained")?;
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        condition(&c.api(), "web").is_some_and(|(s, _, _)| s == "False"),
        "nothing could be written while the API server was down"
    );
    c.api().set_down(false);
    wait_condition(&c.api(), "web", "True", "NoConnections")?;
    let refused: Vec<_> = c
        .api()
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/pods/web/status") && r.status == 503)
        .collect();
    ensure!(!refused.is_empty(), "the agent tried during the outage and retried after it");
    no_forbidden_calls(c.api())
}

#[test]
fn expired_watch_relists_and_loses_nothing() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").pod("api").build()?;
    let c = cluster(&topo, &[])?;
    add_pod(&c, &topo, "web")?;
    c.cli.wait_pod(&web_name(), "web registered", |p| p.state == "serving")?;

    // History is gone: the agent's next watch gets 410 and must relist.
    c.api().compact();
    c.api().delete_pod(NS, "web");
    add_pod(&c, &topo, "api")?;
    wait_until(
        "the agent to see web gone and api added",
        TIMEOUT,
        || c.cli.pods(),
        |pods| {
            pods.iter().any(|p| p.name == format!("{NS}/api")) && !pods.iter().any(|p| p.name == web_name())
        },
    )?;
    no_forbidden_calls(c.api())
}
