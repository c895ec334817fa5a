//! The agent's memory with many tracked flows: a standalone agent with
//! `--max-flows 1048576` and one registered pod receives one UDP datagram
//! per flow from the client namespace (each a new inbound flow, so one
//! ring-buffer event that the agent adds to its flow index); its RSS is read
//! at 100k and at 1M flows.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use conndrain_tests::{Agent, Cli, Netns, Topology, run_in, sleep};

use crate::{
    live::{pid_with_arg, process_cpu},
    report::{Section, Table, count},
};

const MAX_FLOWS: &str = "1048576";
/// Datagrams per second: paced so that the agent keeps up with the events
/// (the ring buffer holds about 3600).
const RATE: f64 = 50_000.0;
const SOCKETS: usize = 16;

pub fn run(stages: &[u32]) -> Result<Section> {
    let topo = Topology::builder().pod("bench").build()?;
    let pod = topo.pod("bench");
    let mut agent = Agent::start(topo.node(), &["--max-flows", MAX_FLOWS])?;
    agent.quiet_on_drop();
    let cli = agent.cli();
    cli.add_pod(pod)?;
    let pid = pid_with_arg(agent.socket())?;
    settle(pid)?;
    let idle = rss(pid)?;

    let target = pod.ipv4();
    let sockets = client_sockets(topo.client())?;
    let mut table = Table::new(&[
        "flows sent",
        "flows the agent tracks",
        "agent RSS",
        "RSS above idle, per flow",
        "time of `conndrain pods`",
    ]);
    table.row(vec!["0 (pod registered)".into(), "0".into(), mib(idle), "–".into(), "–".into()]);
    let mut sent: u32 = 0;
    for &stage in stages {
        send_new_flows(&sockets, target.into(), sent, stage, RATE)?;
        sent = stage;
        settle(pid)?;
        let mem = rss(pid)?;
        let tracked = indexed_flows(&cli)?;
        let t = Instant::now();
        cli.pods()?;
        let took = t.elapsed();
        let per_flow = mem.saturating_sub(idle) as f64 / tracked.max(1) as f64;
        eprintln!("bench: {stage} flows sent, {tracked} tracked, RSS {}", mib(mem));
        table.row(vec![
            count(u64::from(stage)),
            count(tracked),
            mib(mem),
            format!("{per_flow:.0} bytes"),
            format!("{:.2} s", took.as_secs_f64()),
        ]);
    }
    let t = Instant::now();
    let status = cli.status()?;
    let status_took = t.elapsed();
    let lost = status["events_lost"].as_u64().unwrap_or(0);
    let in_table = status["maps"]["flows"]["used"].as_u64().unwrap_or(0);
    ensure!(in_table > 0, "the agent knows of no flow: {status}");

    Ok(Section {
        title: "Agent memory with many flows".into(),
        name: "agentmem",
        intro: format!(
            "A standalone agent with `--max-flows {MAX_FLOWS}` and one registered pod; the client \
             namespace sends one UDP datagram per flow to the pod through the node (distinct source \
             and destination ports, {} datagrams/s), so every datagram is a new inbound flow and one \
             event that the agent adds to its flow index. The agent's RSS (`VmRSS`) is read once its \
             CPU time has stopped growing, before anything queries it. \"Flows the agent tracks\" are \
             those in its flow index (`status`'s `maps.flows.used`; all the pod's); RSS per flow is per \
             tracked flow. A listing counts a pod this large from its latest full count, not afresh \
             (see `agentscale`).",
            count(RATE as u64)
        ),
        table,
        notes: vec![format!(
            "At the end the agent knew of {} flows (`status`'s `maps.flows.used`) and {} events had \
             been lost. `conndrain pods` and `conndrain status` read counts the agent keeps (no walk): \
             at the last stage these took the times shown and {:.2} s, respectively (see `agentscale`).",
            count(in_table),
            count(lost),
            status_took.as_secs_f64()
        )],
    })
}

/// The flows in the agent's index (one pod registered: all its flows).
fn indexed_flows(cli: &Cli) -> Result<u64> {
    let status = cli.status()?;
    status["maps"]["flows"]["used"].as_u64().with_context(|| format!("no maps.flows.used in {status}"))
}

/// Sockets in `client` to send new flows from: each sends to 65,535 ports.
pub fn client_sockets(client: &Netns) -> Result<Vec<UdpSocket>> {
    Ok(run_in(client, || (0..SOCKETS).map(|_| UdpSocket::bind("0.0.0.0:0")).collect::<std::io::Result<Vec<_>>>())??)
}

/// Flows `first..until` (numbered as `client_sockets` can send them), one
/// UDP datagram each to `target`, paced at `rate` per second. Returns how
/// long the sending took.
pub fn send_new_flows(sockets: &[UdpSocket], target: IpAddr, first: u32, until: u32, rate: f64) -> Result<Duration> {
    let start = Instant::now();
    let payload = [0u8; 16];
    for n in first..until {
        if n.is_multiple_of(1024) {
            crate::check_interrupted()?;
            let due = Duration::from_secs_f64(f64::from(n - first) / rate);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let (sock, port) = (n as usize / 65_535, 1 + (n % 65_535));
        let sock = sockets.get(sock).context("more flows than the client's sockets can send")?;
        sock.send_to(&payload, SocketAddr::new(target, u16::try_from(port)?)).context("sending a datagram")?;
    }
    Ok(start.elapsed())
}

/// Waits (up to 15 s) until the process's CPU time stops growing: the agent
/// has read every event.
pub fn settle(pid: i32) -> Result<()> {
    let start = Instant::now();
    let mut last = process_cpu(pid)?;
    let mut still = 0;
    while start.elapsed() < Duration::from_secs(15) && still < 3 {
        sleep(Duration::from_millis(100))?;
        let now = process_cpu(pid)?;
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    Ok(())
}

/// `VmRSS` of `pid`, in bytes.
fn rss(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1024.0 / 1024.0)
}
