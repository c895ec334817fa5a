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
    Agent, Cli, NODE_V4, Netns, PodStatus, Running, TIMEOUT, TcpConn, TcpServer, Topology, conndrain_bin,
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
        "--min-write-interval",
        "0.2",
    ];
    if !extra.contains(&"--quiet-period") {
        args.extend(["--quiet-period", "1"]);
    }
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

/// Creates the pod with these annotations and waits until the agent knows
/// it (tracked, or skipped when it opts out).
fn add_annotated_pod(c: &Cluster, topo: &Topology, name: &str, annotations: &[(&str, &str)]) -> Result<PodStatus> {
    let p = topo.pod(name);
    let mut pod = pod_object(name, NODE, &[p.ipv4().to_string(), p.ipv6().to_string()], false)?;
    pod.metadata.annotations = Some(annotations.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect());
    c.api().create_pod(pod);
    c.cli.wait_pod(&format!("{NS}/{name}"), "the pod to be known", |p| p.state == "serving" || p.state == "skipped")
}

/// `settings` of the pod in `conndrain pods -o json`.
fn settings(c: &Cluster, name: &str) -> Result<serde_json::Value> {
    let pods = c.cli.pods_json()?;
    let pod = pods.as_array().into_iter().flatten().find(|p| p["name"] == format!("{NS}/{name}"));
    pod.map(|p| p["settings"].clone()).with_context(|| format!("pods -o json lists {name}: {pods}"))
}

/// The agent's default is 10 s; one pod asks for 0.5 s, another for 25 s.
/// Deleted together with no connection, they drain in the order of their
/// quiet periods: the short one while the others still wait, the default
/// one while the long one still waits.
#[test]
fn quiet_period_annotation_shortens_or_lengthens_the_drain() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("short").pod("plain").pod("long").build()?;
    let c = cluster(&topo, &["--quiet-period", "10"])?;
    add_annotated_pod(&c, &topo, "short", &[("conndrain.io/quiet-period", "500ms")])?;
    add_annotated_pod(&c, &topo, "plain", &[])?;
    add_annotated_pod(&c, &topo, "long", &[("conndrain.io/quiet-period", "25s")])?;
    let shown = |name| -> Result<(f64, String)> {
        let s = settings(&c, name)?;
        Ok((s["quiet_period_secs"].as_f64().unwrap_or(-1.0), s["quiet_period_from"].as_str().unwrap_or("").to_owned()))
    };
    ensure!(shown("short")? == (0.5, "annotation conndrain.io/quiet-period".into()), "{:?}", shown("short"));
    ensure!(shown("plain")? == (10.0, "default".into()), "{:?}", shown("plain"));
    ensure!(shown("long")? == (25.0, "annotation conndrain.io/quiet-period".into()), "{:?}", shown("long"));

    for name in ["short", "plain", "long"] {
        c.api().mark_pod_deleted(NS, name, 60);
    }
    wait_condition(c.api(), "short", "True", "NoConnections")?;
    for name in ["plain", "long"] {
        let p = c.cli.pod(&format!("{NS}/{name}"))?;
        ensure!(p.state == "draining", "{name} still waits out its longer quiet period: {p:?}");
    }
    c.cli.wait_state(&format!("{NS}/plain"), "drained")?;
    let long = c.cli.pod(&format!("{NS}/long"))?;
    ensure!(long.state == "draining" && long.quiet_period_secs == Some(25.0), "long still waits: {long:?}");
    let why = c.cli.ok(&["why", &format!("{NS}/long")])?;
    ensure!(why.contains("quiet period 25s (annotation conndrain.io/quiet-period)"), "why shows it: {why}");
    no_forbidden_calls(c.api())
}

/// A metrics port named in `conndrain.io/ignore-ports` holds nothing: a
/// scrape in flight on it and new scrapes every 200 ms during the drain
/// (each would restart a 1 s quiet period) do not keep the pod, while a
/// connection to its service port does until it closes.
#[test]
fn connections_to_an_ignored_port_do_not_hold_the_pod() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").build()?;
    let c = cluster(&topo, &[])?;
    add_annotated_pod(&c, &topo, "web", &[("conndrain.io/ignore-ports", "9090")])?;
    let web = topo.pod("web");
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let metrics = TcpServer::start(web.ns(), web.addr_v4(9090))?;
    let mut scrape = TcpConn::connect(topo.client(), metrics.addr())?;
    scrape.send("GET /sleep/30")?; // in flight: would hold the pod on any other port
    let conn = TcpConn::connect(topo.client(), server.addr())?;
    let p = c.cli.wait_pod(&web_name(), "the service connection", |p| p.active_flows == 1)?;
    ensure!(p.ignored_flows == 1, "the scrape is counted apart: {p:?}");

    c.api().mark_pod_deleted(NS, "web", 60);
    wait_condition(c.api(), "web", "False", "Draining")?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| -> Result<()> {
        let scraper = s.spawn(|| -> Result<u64> {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut again = TcpConn::connect(topo.client(), metrics.addr())?;
                again.request("GET /metrics")?;
                again.close()?;
                n += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(n)
        });
        let held = c.cli.wait_pod(&web_name(), "scrapes during the drain", |_| metrics.accepted() >= 4);
        let p = c.cli.pod(&web_name())?;
        let why = c.cli.ok(&["why", &web_name()])?;
        let closed = conn.close();
        let drained = wait_condition(c.api(), "web", "True", "NoConnections");
        let scrapes_open = metrics.open();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let scrapes = scraper.join().map_err(|_| anyhow::anyhow!("the scraper panicked"))??;
        held?;
        closed?;
        ensure!(p.state == "draining" && p.active_flows == 1, "the service connection holds it: {p:?}");
        ensure!(p.new_flows_since_termination == 0, "scrapes are no new flows for the quiet period: {p:?}");
        ensure!(why.contains("ignored ports: 9090"), "why shows the setting: {why}");
        drained.with_context(|| format!("drained while scraped ({scrapes} scrapes)"))?;
        ensure!(scrapes_open >= 1, "drained with the scrape in flight still open");
        Ok(())
    })?;
    drop(scrape);
    no_forbidden_calls(c.api())
}

/// `conndrain.io/skip: "true"`: the pod is not tracked; its preStop wait
/// is answered `skipped` at once (the hook falls back to sleeping) and no
/// condition or event is written for it, while a tracked pod deleted with
/// it drains and is reported.
#[test]
fn an_opted_out_pod_is_skipped_and_gets_no_condition() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("optout").pod("web").build()?;
    let c = cluster(&topo, &[])?;
    let p = add_annotated_pod(&c, &topo, "optout", &[("conndrain.io/skip", "true")])?;
    ensure!(p.state == "skipped", "{p:?}");
    ensure!(p.note.as_deref().is_some_and(|n| n.contains("conndrain.io/skip")), "it says why: {p:?}");
    add_pod(&c, &topo, "web")?;
    let why = c.cli.ok(&["why", &format!("{NS}/optout")])?;
    ensure!(why.contains("not tracked") && why.contains("conndrain.io/skip"), "why: {why}");

    c.api().mark_pod_deleted(NS, "optout", 60);
    c.api().mark_pod_deleted(NS, "web", 60);
    let out = pre_stop(topo.pod("optout").ns())?.wait_exit(TIMEOUT)?;
    ensure!(out.code == 0 && out.stderr.contains("skipped"), "the hook falls back at once: {out:?}");
    let local = c.cli.run(&["wait", &format!("{NS}/optout")])?;
    ensure!(local.code == 4, "conndrain wait says skipped (exit 4): {local:?}");
    // Once the tracked pod is reported, the agent has been through the deletions.
    wait_condition(c.api(), "web", "True", "NoConnections")?;
    ensure!(condition(c.api(), "optout").is_none(), "no condition for the opted-out pod");
    ensure!(event_reasons(c.api(), "optout").is_empty(), "no event: {:?}", event_reasons(c.api(), "optout"));
    no_forbidden_calls(c.api())
}

/// Bad values: each is a Warning event naming the annotation, the value
/// and what to write, and the default is used: the quiet period is the
/// agent's, and port 9090 is not ignored, so its connection holds the pod.
#[test]
fn bad_annotation_values_are_reported_and_the_defaults_used() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").build()?;
    let c = cluster(&topo, &[])?;
    let bad = [("conndrain.io/quiet-period", "45s"), ("conndrain.io/ignore-ports", "9090,70000")];
    add_annotated_pod(&c, &topo, "web", &bad)?;
    let warnings = wait_until(
        "two InvalidAnnotation events",
        TIMEOUT,
        || {
            Ok(c.api()
                .events()
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("InvalidAnnotation") && e.type_.as_deref() == Some("Warning"))
                .filter_map(|e| e.note)
                .collect::<Vec<_>>())
        },
        |notes| notes.len() >= 2,
    )?;
    let note = |key: &str| warnings.iter().find(|n| n.starts_with(key)).cloned().unwrap_or_default();
    let quiet = note("conndrain.io/quiet-period");
    ensure!(quiet.contains("\"45s\"") && quiet.contains("terminationGracePeriodSeconds: 30"), "{warnings:?}");
    ensure!(quiet.contains("such as \"5s\"") && quiet.contains("default quiet period (1s)"), "{quiet}");
    let ports = note("conndrain.io/ignore-ports");
    ensure!(ports.contains("\"9090,70000\"") && ports.contains("70000 out of range"), "{warnings:?}");
    ensure!(ports.contains("such as \"9090,9100\"") && ports.contains("no port is ignored"), "{ports}");
    let s = settings(&c, "web")?;
    ensure!(s["quiet_period_secs"] == 1.0 && s["quiet_period_from"] == "default", "the default is used: {s}");
    ensure!(s["ignore_ports"].as_array().is_some_and(Vec::is_empty), "no port is ignored: {s}");
    ensure!(s["problems"].as_array().is_some_and(|p| p.len() == 2), "the problems are shown: {s}");
    let why = c.cli.ok(&["why", &web_name()])?;
    ensure!(why.contains("refused: conndrain.io/quiet-period"), "why: {why}");
    // One more, added later: its own event, not a repeat of the first two
    // (kube's Recorder folds an event into the last one with the same
    // reason, action and object, whatever its note).
    c.api().update_pod(NS, "web", |p| {
        p.metadata.annotations.get_or_insert_default().insert("conndrain.io/quiet-perod".into(), "5s".into());
    });
    wait_until(
        "an InvalidAnnotation event for the misspelt key",
        TIMEOUT,
        || Ok(c.api().events().into_iter().filter_map(|e| e.note).collect::<Vec<_>>()),
        |notes| notes.iter().any(|n| n.starts_with("conndrain.io/quiet-perod is not an annotation conndrain reads")),
    )?;

    let web = topo.pod("web");
    let metrics = TcpServer::start(web.ns(), web.addr_v4(9090))?;
    let conn = TcpConn::connect(topo.client(), metrics.addr())?;
    c.cli.wait_pod(&web_name(), "the 9090 connection counted", |p| p.active_flows == 1)?;
    c.api().mark_pod_deleted(NS, "web", 60);
    wait_condition(c.api(), "web", "False", "Draining")?;
    let p = c.cli.pod(&web_name())?;
    ensure!(p.state == "draining" && p.quiet_period_secs == Some(1.0), "held by the 9090 connection: {p:?}");
    conn.close()?;
    wait_condition(c.api(), "web", "True", "NoConnections")?;
    no_forbidden_calls(c.api())
}

/// Annotations edited on a running pod apply: new ignored ports at once; an
/// opt-out unregisters it; opting back in tracks it again as a pod that ran
/// untracked (its earlier connections are unknown), so its drain cannot be
/// confirmed and runs to its deadline, and `why` says so.
#[test]
fn annotations_edited_on_a_running_pod_apply() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").build()?;
    let c = cluster(&topo, &["--deadline-margin", "1"])?;
    add_annotated_pod(&c, &topo, "web", &[])?;
    let annotate = |pairs: &[(&str, &str)]| {
        let annotations = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        c.api().update_pod(NS, "web", |p| p.metadata.annotations = Some(annotations));
    };
    annotate(&[("conndrain.io/ignore-ports", "9090")]);
    wait_until(
        "the new ignored port",
        TIMEOUT,
        || settings(&c, "web"),
        |s| s["ignore_ports"] == serde_json::json!([9090]),
    )?;
    annotate(&[("conndrain.io/skip", "true")]);
    c.cli.wait_state(&web_name(), "skipped")?;
    annotate(&[]);
    c.cli.wait_state(&web_name(), "serving")?;
    c.api().mark_pod_deleted(NS, "web", 4);
    wait_condition(c.api(), "web", "True", "DeadlineReached")?;
    let why = c.cli.ok(&["why", &web_name()])?;
    ensure!(why.contains("already running when conndrain first saw it"), "why: {why}");
    no_forbidden_calls(c.api())
}
