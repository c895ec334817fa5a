//! `cargo xtask demo`, in two parts on a simulated node:
//!
//! 1. A standalone agent: one pod goes serving -> draining -> drained while its
//!    clients finish, and `conndrain wait` returns right then.
//! 2. Kubernetes mode: the agent watches the node's pods through a kubeconfig
//!    (the in-repo fake API server stands in for the cluster). After
//!    `kubectl delete pod` it reports the drain as the pod condition
//!    `conndrain.io/Drained` and as events, and releases the pod's preStop
//!    hook (`conndrain wait`) as soon as the pod is drained.
//!
//! Everything lives in network namespaces made for this run; they, the agents,
//! the API server and the servers go away on exit, also on Ctrl-C.

use std::{
    fmt,
    process::ExitCode,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use conndrain_tests::{
    Agent, Cli, NODE_V4, Netns, Output, PodStatus, Repeat, Running, TIMEOUT, TcpConn, TcpServer,
    Topology, check_interrupted, conndrain_bin,
    fakeapi::{AgentApi, FakeApiServer},
    require_root, sleep, stop_on_signals, wait_until,
};
use k8s_openapi::api::core::v1 as k8s;

const POD: &str = "web-1";
const CLIENTS: usize = 3;
const QUIET_PERIOD: &str = "2";

/// Kubernetes mode: the node's name, the pod's namespace, and the pod's
/// `terminationGracePeriodSeconds` (long enough for a `preStop: sleep 60`).
const NODE: &str = "node-a";
const NS: &str = "default";
const GRACE_SECS: i64 = 90;
/// What the pod would do without conndrain.
const BLIND_SLEEP_SECS: u32 = 60;
const CONDITION: &str = "conndrain.io/Drained";
/// `kubectl get pod -o jsonpath=...` for the condition, as one line.
const JSONPATH: &str = r#"{range .status.conditions[?(@.type=="conndrain.io/Drained")]}{.type}={.status} ({.reason}): {.message}{end}"#;

fn main() -> ExitCode {
    stop_on_signals();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    require_root()?;
    START.get_or_init(Instant::now);
    standalone()?;
    kubernetes()
}

/// When the demo started; steps show the time since, to make the order plain.
static START: OnceLock<Instant> = OnceLock::new();

fn part(title: &str) {
    println!("\n\n######## {title}");
}

fn step(what: &str) {
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    println!("\n==> [{t:4.1}s] {what}");
}

/// Runs a read-only CLI command and prints it like a terminal would.
fn show(cli: &Cli, args: &[&str]) -> Result<()> {
    println!("$ conndrain {}", args.join(" "));
    for line in cli.ok(args)?.lines() {
        println!("  {line}");
    }
    Ok(())
}

fn describe(p: &PodStatus) -> String {
    format!(
        "{}: {} ({} active flows, {} new since termination)",
        p.name, p.state, p.active_flows, p.new_flows_since_termination
    )
}

/// `CLIENTS` keep-alive connections from the client host, each sending a
/// request every 200 ms until stopped (stopping one closes its connection).
fn open_clients(topo: &Topology, server: &TcpServer) -> Result<Vec<Repeat>> {
    step(&format!(
        "Opening {CLIENTS} keep-alive connections; each sends GET /fast every 200 ms"
    ));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut conn = TcpConn::connect(topo.client(), server.addr())?;
        clients.push(Repeat::every(Duration::from_millis(200), move || {
            conn.request("GET /fast").map(drop)
        }));
    }
    Ok(clients)
}

/// Waits for a background command to exit. Ctrl-C ends the wait (the
/// command's guard then kills it); on a timeout it is killed and the error
/// has what it printed.
fn wait_exit(cmd: &mut Running) -> Result<Output> {
    let what = format!("`{}` to return", cmd.shown());
    let waited = wait_until(&what, TIMEOUT, || Ok(cmd.is_running()), |running| !running);
    check_interrupted()?;
    let grace = if waited.is_ok() {
        TIMEOUT
    } else {
        Duration::ZERO
    };
    cmd.wait_exit(grace)
}

// ---------------------------------------------------------------------------
// Part 1: a standalone agent.
// ---------------------------------------------------------------------------

/// One pod on a standalone agent: registered and terminated through the CLI,
/// it drains while its clients finish, and `conndrain wait` returns then.
fn standalone() -> Result<()> {
    part("Part 1: a standalone agent");

    step("Building a simulated node from network namespaces: client -> node -> pod");
    let topo = Topology::builder().pod(POD).build()?;
    let web = topo.pod(POD);
    println!(
        "    client {}  ->  node (forwards)  ->  pod {POD} {} behind veth {}",
        topo.client_v4(),
        web.ipv4(),
        web.node_if()
    );

    step("Starting `conndrain agent --standalone` in the node namespace");
    let mut agent = Agent::start(topo.node(), &[])?;
    agent.quiet_on_drop();
    let cli = agent.cli();

    step(&format!(
        "Registering the pod: conndrain pod add {POD} --ip {} --ip {}",
        web.ipv4(),
        web.ipv6()
    ));
    cli.add_pod(web)?;

    step("Starting a small HTTP-ish server in the pod on :8080");
    let server = TcpServer::start(web.ns(), web.addr_v4(8080))?;

    let clients = open_clients(&topo, &server)?;
    cli.wait_pod(POD, "all clients counted", |p| {
        p.active_flows == CLIENTS as u64
    })?;
    sleep(Duration::from_millis(600))?;
    show(&cli, &["pods"])?;
    show(&cli, &["flows", "--pod", POD])?;

    terminate_and_drain(&cli, clients)?;

    step("Part 1 done; cleaning up: agent stopped, namespaces deleted");
    drop(server);
    drop(agent);
    drop(topo);
    Ok(())
}

/// Terminates the pod, then the clients finish one by one; the pod drains.
fn terminate_and_drain(cli: &Cli, clients: Vec<Repeat>) -> Result<()> {
    step(&format!(
        "Terminating the pod, as a kubelet preStop hook would: conndrain pod terminate {POD} --quiet-period {QUIET_PERIOD}"
    ));
    cli.ok(&["pod", "terminate", POD, "--quiet-period", QUIET_PERIOD])?;
    step(&format!(
        "`conndrain wait {POD}` runs in the background (the preStop hook blocks on it)"
    ));
    let mut wait = cli.spawn(&["wait", POD, "--timeout", "60"])?;
    show(cli, &["pods"])?;
    show(cli, &["why", POD])?;

    let mut clients = clients;
    for n in 1..=CLIENTS {
        sleep(Duration::from_secs(1))?;
        step(&format!(
            "Client {n} of {CLIENTS} finishes and closes its connection"
        ));
        clients
            .remove(0)
            .stop()
            .context("a client's requests failed")?;
        let left = (CLIENTS - n) as u64;
        cli.wait_pod(POD, "the close to be seen", |p| p.active_flows == left)?;
        println!("    {}", describe(&cli.pod(POD)?));
        println!(
            "    conndrain wait: {}",
            if wait.is_running() {
                "still waiting"
            } else {
                "returned"
            }
        );
    }

    if cli.pod(POD)?.state == "drained" {
        step(&format!(
            "No connection left and none new for the {QUIET_PERIOD} s quiet period: drained at once"
        ));
    } else {
        step(&format!(
            "No connection left; drained once nothing new arrives for the {QUIET_PERIOD} s quiet period"
        ));
    }
    let mut last = String::new();
    wait_until(
        "the pod to be drained",
        TIMEOUT,
        || {
            let pod = cli.pod(POD)?;
            let line = describe(&pod);
            if line != last {
                println!("    {line}");
                last = line;
            }
            Ok(pod)
        },
        |p| p.state == "drained",
    )?;
    show(cli, &["pods"])?;

    let out = wait_exit(&mut wait)?;
    step(&format!(
        "`conndrain wait {POD}` returned with exit code {}: the pod can go now",
        out.code
    ));
    for line in out.all().lines() {
        println!("    {line}");
    }

    Ok(())
}

// ---------------------------------------------------------------------------
// Part 2: Kubernetes mode.
// ---------------------------------------------------------------------------

/// The same pod in Kubernetes mode: created and deleted through the (fake)
/// API server; the agent reports the drain as the `conndrain.io/Drained`
/// condition and as events, and its preStop hook returns once it is drained.
fn kubernetes() -> Result<()> {
    part("Part 2: Kubernetes mode: the conndrain.io/Drained condition and the preStop release");

    step("A fresh simulated node, with a fake Kubernetes API server on its loopback");
    let topo = Topology::builder().pod(POD).build()?;
    let web = topo.pod(POD);
    // Bound inside the node namespace: the agent reaches it at 127.0.0.1.
    // It allows exactly the calls of the agent's ClusterRole, nothing else.
    let k8s = AgentApi::start(topo.node())?;
    let (api, kubeconfig) = (&k8s.api, &k8s.kubeconfig);
    println!(
        "    API server {}, kubeconfig {}",
        api.url("127.0.0.1"),
        kubeconfig.display()
    );

    let kubeconfig = kubeconfig.to_string_lossy();
    let host_ip = NODE_V4.to_string();
    let args = [
        "--kubeconfig",
        &kubeconfig,
        "--node-name",
        NODE,
        "--host-ip",
        &host_ip,
        "--quiet-period",
        QUIET_PERIOD,
    ];
    step(&format!(
        "Starting `conndrain agent {}` in the node namespace",
        args.join(" ")
    ));
    let mut agent = Agent::start_with(topo.node(), &args)?;
    agent.quiet_on_drop();
    let cli = agent.cli();
    println!(
        "    it watches the pods with spec.nodeName={NODE}; preStop hooks reach it at {host_ip}:{}",
        conndrain::api::DEFAULT_WAIT_PORT
    );

    step(&format!(
        "kubectl apply: pod {POD} runs on {NODE} with IPs {} and {}; the agent tracks it",
        web.ipv4(),
        web.ipv6()
    ));
    api.create_pod(pod_object(web)?);
    let name = format!("{NS}/{POD}");
    cli.wait_pod(&name, "the agent to track the pod", |p| {
        p.state == "serving" && !p.interfaces.is_empty()
    })?;
    show(&cli, &["pods"])?;

    step("Starting the server in the pod on :8080");
    let server = TcpServer::start(web.ns(), web.addr_v4(8080))?;
    let clients = open_clients(&topo, &server)?;
    cli.wait_pod(&name, "all clients counted", |p| {
        p.active_flows == CLIENTS as u64
    })?;
    println!("    {}", pods_line(&cli, &name)?);

    delete_and_release(api, &cli, web.ns(), clients)?;

    step("Part 2 done; cleaning up: agent and API server stopped, namespaces deleted");
    drop(server);
    drop(agent);
    drop(k8s);
    drop(topo);
    Ok(())
}

/// `kubectl delete pod`, then the clients finish one by one: the condition
/// follows, and the preStop hook returns once the pod is drained.
fn delete_and_release(
    api: &FakeApiServer,
    cli: &Cli,
    pod_ns: &Netns,
    clients: Vec<Repeat>,
) -> Result<()> {
    let name = format!("{NS}/{POD}");
    step(&format!(
        "kubectl delete pod {POD} (simulated: the API server sets its deletionTimestamp to now + {GRACE_SECS} s)"
    ));
    let deleted = Instant::now();
    api.mark_pod_deleted(NS, POD, GRACE_SECS);
    let draining = wait_condition(api, |c| c.status == "False" && c.reason == "Draining")?;
    println!("$ kubectl get pod {POD} -o jsonpath='{JSONPATH}'");
    println!("  {draining}");

    step(&format!(
        "The kubelet runs the preStop hook in the pod: conndrain wait (HOST_IP={NODE_V4}); it blocks"
    ));
    let mut hook = pre_stop(pod_ns)?;
    cli.wait_pod(&name, "the hook's call to the agent", |p| {
        p.outbound_flows == 1
    })?;
    println!(
        "    preStop hook: blocked in GET {NODE_V4}:{}/v1/wait (the pod's one OUTBOUND flow; those never hold a pod)",
        conndrain::api::DEFAULT_WAIT_PORT
    );

    let mut clients = clients;
    // One close per second, counted from the previous close: printing what
    // follows a close can take up to the condition's write interval (1 s).
    let mut next_close = Instant::now();
    for n in 1..=CLIENTS {
        next_close += Duration::from_secs(1);
        sleep(next_close.saturating_duration_since(Instant::now()))?;
        step(&format!(
            "Client {n} of {CLIENTS} finishes and closes its connection"
        ));
        clients
            .remove(0)
            .stop()
            .context("a client's requests failed")?;
        let left = CLIENTS - n;
        cli.wait_pod(&name, "the close to be seen", |p| {
            p.active_flows == left as u64
        })?;
        // The agent writes the condition at most once per --min-write-interval (1 s).
        let now = wait_condition(api, |c| {
            c.status == "True" || c.message.starts_with(&format!("{left} active"))
        })?;
        println!("    {}", pods_line(cli, &name)?);
        println!("    {now}");
        println!(
            "    preStop hook: {}",
            if hook.is_running() {
                "still blocking"
            } else {
                "returned"
            }
        );
    }

    let out = wait_exit(&mut hook)?;
    let released = deleted.elapsed().as_secs_f64();
    ensure!(
        out.code == 0 && out.stdout.contains("drained"),
        "the preStop hook did not report a drain: {}",
        out.all().trim()
    );
    step("The preStop hook returns: the kubelet sends SIGTERM to the app now");
    for line in out.all().lines() {
        println!("    {line}");
    }

    let drained = wait_condition(api, |c| c.status == "True")?;
    step(&format!(
        "The condition turns True (kubectl wait --for=condition={CONDITION} returns)"
    ));
    println!("$ kubectl get pod {POD} -o jsonpath='{JSONPATH}'");
    println!("  {drained}");

    step("The events the agent recorded");
    wait_until(
        "the Drained event",
        TIMEOUT,
        || Ok(pod_events(api)),
        |events| {
            events
                .iter()
                .any(|e| e.reason.as_deref() == Some("Drained"))
        },
    )?;
    show_events(api);

    step(&format!(
        "Released after {released:.1} s versus a blind `preStop: sleep {BLIND_SLEEP_SECS}`"
    ));
    println!(
        "    preStop: conndrain wait  released {released:4.1} s after the delete, as soon as its last client had finished"
    );
    println!(
        "    preStop: sleep {BLIND_SLEEP_SECS:<4}      released {:4.1} s after the delete, {:.0} s of it with nothing left to serve",
        f64::from(BLIND_SLEEP_SECS),
        f64::from(BLIND_SLEEP_SECS) - released
    );
    Ok(())
}

/// The pod as the API server has it once the kubelet runs it: on this node,
/// Running and Ready, with the topology pod's IPs and a preStop hook.
fn pod_object(pod: &conndrain_tests::Pod) -> Result<k8s::Pod> {
    let ips = [pod.ipv4().to_string(), pod.ipv6().to_string()];
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": POD, "namespace": NS},
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": GRACE_SECS,
            "containers": [{
                "name": "app",
                "image": "app",
                "lifecycle": {"preStop": {"exec": {"command": ["/conndrain-bin/conndrain", "wait"]}}},
                "env": [{"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}]
            }]
        },
        "status": {
            "phase": "Running",
            "hostIP": NODE_V4.to_string(),
            "podIP": ips[0],
            "podIPs": [{"ip": ips[0]}, {"ip": ips[1]}],
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    }))?)
}

/// The preStop hook, run inside the pod's network namespace as the kubelet
/// would: `conndrain wait` with `HOST_IP` from the downward API.
fn pre_stop(ns: &Netns) -> Result<Running> {
    let mut cmd = ns.command(&conndrain_bin().to_string_lossy());
    cmd.args(["wait", "--fallback-sleep", "0"])
        .env("HOST_IP", NODE_V4.to_string());
    Running::spawn(cmd)
}

/// The pod's line of `conndrain pods`.
fn pods_line(cli: &Cli, name: &str) -> Result<String> {
    let table = cli.ok(&["pods"])?;
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .map(|l| l.trim_end().to_owned())
        .with_context(|| format!("`conndrain pods` lists no {name}:\n{table}"))
}

/// The pod's `conndrain.io/Drained` condition.
#[derive(Debug)]
struct Drained {
    status: String,
    reason: String,
    message: String,
}

/// As `kubectl get pod -o jsonpath=JSONPATH` prints it.
impl fmt::Display for Drained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{CONDITION}={} ({}): {}",
            self.status, self.reason, self.message
        )
    }
}

fn condition(api: &FakeApiServer) -> Option<Drained> {
    let conditions = api.pod(NS, POD)?.status?.conditions?;
    conditions
        .into_iter()
        .find(|c| c.type_ == CONDITION)
        .map(|c| Drained {
            status: c.status,
            reason: c.reason.unwrap_or_default(),
            message: c.message.unwrap_or_default(),
        })
}

fn wait_condition(api: &FakeApiServer, done: impl Fn(&Drained) -> bool) -> Result<Drained> {
    let found = wait_until(
        &format!("the {CONDITION} condition of {POD}"),
        TIMEOUT,
        || Ok(condition(api)),
        |c| c.as_ref().is_some_and(&done),
    )?;
    found.context("the condition is there")
}

/// The events about the pod, oldest first.
fn pod_events(api: &FakeApiServer) -> Vec<k8s_openapi::api::events::v1::Event> {
    let mut events: Vec<_> = api
        .events()
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(POD))
        .collect();
    events.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    events
}

/// Like `kubectl events --for pod/NAME`.
fn show_events(api: &FakeApiServer) {
    println!("$ kubectl events --for pod/{POD}");
    println!(
        "  {:<9} {:<7} {:<13} {:<10} MESSAGE",
        "LAST SEEN", "TYPE", "REASON", "OBJECT"
    );
    let now = k8s_openapi::jiff::Timestamp::now();
    for e in pod_events(api) {
        let age = e.event_time.as_ref().map_or_else(
            || "-".to_owned(),
            |t| format!("{:.0}s", now.duration_since(t.0).as_secs_f64()),
        );
        println!(
            "  {age:<9} {:<7} {:<13} {:<10} {}",
            e.type_.unwrap_or_default(),
            e.reason.unwrap_or_default(),
            format!("pod/{POD}"),
            e.note.unwrap_or_default()
        );
    }
}
