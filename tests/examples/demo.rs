//! `cargo xtask demo`: one pod on a simulated node goes serving -> draining ->
//! drained while its clients finish, and `conndrain wait` returns right then.
//!
//! Everything lives in network namespaces made for this run; they, the agent
//! and the servers go away on exit, also on Ctrl-C.

use std::{
    process::ExitCode,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use conndrain_tests::{
    Agent, Cli, PodStatus, Repeat, TIMEOUT, TcpConn, TcpServer, Topology, require_root, sleep,
    stop_on_signals,
};

const POD: &str = "web-1";
const CLIENTS: usize = 3;
const QUIET_PERIOD: &str = "2";

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

/// When the demo started; steps show the time since, to make the order plain.
static START: OnceLock<Instant> = OnceLock::new();

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

fn run() -> Result<()> {
    require_root()?;
    START.get_or_init(Instant::now);

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
    cli.wait_pod(POD, "all clients counted", |p| {
        p.active_flows == CLIENTS as u64
    })?;
    sleep(Duration::from_millis(600))?;
    show(&cli, &["pods"])?;
    show(&cli, &["flows", "--pod", POD])?;

    terminate_and_drain(&cli, clients)?;

    step("Done; cleaning up: agent stopped, namespaces deleted");
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
    conndrain_tests::wait_until(
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

    let out = wait.wait_exit(TIMEOUT)?;
    step(&format!(
        "`conndrain wait {POD}` returned with exit code {}: the pod can go now",
        out.code
    ));
    for line in out.all().lines() {
        println!("    {line}");
    }

    Ok(())
}
