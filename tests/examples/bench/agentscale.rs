//! The agent at scale (issue 16): how long `conndrain status`, `conndrain
//! pods` and a metrics scrape take with 1M tracked flows, against the same
//! calls with an empty table in the same run; and the agent's CPU, and the
//! events lost, while new flows arrive at 50,000 per second (each a UDP
//! datagram from the client namespace to a registered pod: a new inbound
//! flow, so one ring-buffer event the agent reads and indexes), with the
//! ring sized from `--max-flows` and with the default table's ring.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use conndrain_tests::{Agent, Cli, NODE_V4, Topology, metrics::scrape, quantile};
use serde_json::Value;

use crate::{
    agentmem::{client_sockets, send_new_flows, settle},
    live::{pid_with_arg, process_cpu},
    report::{Section, Table, count, ms, ratio},
};

const MAX_FLOWS: u32 = 1_048_576;
/// Flows sent to fill it: 1M, within what the client's sockets can send.
const FILL: u32 = 1_000_000;
/// New flows per second (issue 16's figure).
const RATE: f64 = 50_000.0;
const METRICS_PORT: u16 = 9465;
/// Issue 16's target for each call at 1M flows.
const TARGET_MS: f64 = 50.0;

pub struct Sizes {
    /// Timed calls of each kind, per table.
    pub calls: usize,
    /// Seconds of new flows into the agent with the default table.
    pub default_secs: u32,
}

/// The agent under test, and where to reach it.
struct Bench {
    topo: Topology,
    agent: Agent,
    pid: i32,
    target: IpAddr,
    sockets: Vec<UdpSocket>,
}

impl Bench {
    fn start(args: &[&str]) -> Result<Self> {
        let topo = Topology::builder().pod("bench").build()?;
        let host_ip = NODE_V4.to_string();
        let port = METRICS_PORT.to_string();
        let mut all = vec!["--host-ip", &host_ip, "--metrics-port", &port, "--udp-timeout", "3600"];
        all.extend_from_slice(args);
        let mut agent = Agent::start(topo.node(), &all)?;
        agent.quiet_on_drop();
        agent.cli().add_pod(topo.pod("bench"))?;
        let pid = pid_with_arg(agent.socket())?;
        settle(pid)?;
        let target = topo.pod("bench").ipv4().into();
        let sockets = client_sockets(topo.client())?;
        Ok(Self { topo, agent, pid, target, sockets })
    }

    fn cli(&self) -> Cli {
        self.agent.cli()
    }

    fn scrape(&self) -> Result<String> {
        scrape(self.topo.client(), SocketAddr::new(NODE_V4.into(), METRICS_PORT))
    }

    /// Sends flows `first..until` at `RATE`; the agent's CPU meanwhile.
    fn flows(&self, first: u32, until: u32) -> Result<Load> {
        let before = counters(&self.cli().status()?);
        let cpu = process_cpu(self.pid)?;
        let took = send_new_flows(&self.sockets, self.target, first, until, RATE)?;
        let during = process_cpu(self.pid)?.saturating_sub(cpu);
        settle(self.pid)?;
        let after_cpu = process_cpu(self.pid)?.saturating_sub(cpu).saturating_sub(during);
        let after = counters(&self.cli().status()?);
        Ok(Load {
            sent: u64::from(until - first),
            took,
            cores: during.as_secs_f64() / took.as_secs_f64(),
            after: after_cpu,
            received: after.0.saturating_sub(before.0),
            lost: after.1.saturating_sub(before.1),
        })
    }
}

/// `events_received` and `events_lost` of a status.
fn counters(status: &Value) -> (u64, u64) {
    let at = |k: &str| status[k].as_u64().unwrap_or(0);
    (at("events_received"), at("events_lost"))
}

/// New flows sent, and what the agent did meanwhile.
struct Load {
    sent: u64,
    took: Duration,
    /// The agent's CPU (user + system) while they were sent, in cores.
    cores: f64,
    /// Its CPU after the last one, until it went still (a backlog).
    after: Duration,
    received: u64,
    lost: u64,
}

impl Load {
    fn row(&self, table: &mut Table, what: &str, ring: &str) {
        table.row(vec![
            what.into(),
            ring.into(),
            count(self.sent),
            format!("{:.0}/s", self.sent as f64 / self.took.as_secs_f64()),
            format!("{:.2}", self.cores),
            ms(self.after),
            count(self.received),
            count(self.lost),
        ]);
    }
}

/// Times of `calls` rounds of `status`, `pods` and a scrape, in that order.
struct Calls {
    status: Vec<Duration>,
    pods: Vec<Duration>,
    scrape: Vec<Duration>,
}

fn time_calls(bench: &Bench, calls: usize) -> Result<Calls> {
    let cli = bench.cli();
    let mut out = Calls { status: Vec::new(), pods: Vec::new(), scrape: Vec::new() };
    let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<Duration> {
        let t = Instant::now();
        f()?;
        Ok(t.elapsed())
    };
    for _ in 0..calls {
        crate::check_interrupted()?;
        out.status.push(timed(&mut || cli.status().map(drop))?);
        out.pods.push(timed(&mut || cli.pods_json().map(drop))?);
        out.scrape.push(timed(&mut || bench.scrape().map(drop))?);
    }
    Ok(out)
}

pub fn run(sizes: &Sizes) -> Result<Section> {
    // The default table first: its ring (2 MiB) under the same rate.
    let mut loads = Table::new(&[
        "agent",
        "ring buffer",
        "new flows",
        "rate reached",
        "agent CPU while they arrive (cores)",
        "agent CPU after the last (ms)",
        "events received",
        "events lost",
    ]);
    let default_load = {
        let bench = Bench::start(&[])?;
        let n = (RATE as u32) * sizes.default_secs;
        eprintln!("bench: {n} new flows into an agent with the default table");
        bench.flows(0, n)?
    };
    // The ring the agent gives each table size (`datapath/events.rs`).
    default_load.row(&mut loads, "default `--max-flows` (262,144)", "2 MiB");

    let max_flows = MAX_FLOWS.to_string();
    let bench = Bench::start(&["--max-flows", &max_flows])?;
    eprintln!("bench: {} calls of each kind with no flow", sizes.calls);
    let empty = time_calls(&bench, sizes.calls)?;
    eprintln!("bench: {FILL} new flows at {RATE}/s");
    let fill = bench.flows(0, FILL)?;
    fill.row(&mut loads, "`--max-flows 1048576`", "8 MiB");
    let filled = std::time::Instant::now();
    let status = bench.cli().status()?;
    let known = status["maps"]["flows"]["used"].as_u64().unwrap_or(0);
    ensure!(known > 0, "the agent knows of no flow after the fill: {status}");
    // A listing shows a pod this large with its latest full count, which the
    // census makes in the background (`node/census.rs`): the calls are timed
    // once it counted the pod after the fill, so that they show real counts.
    let counted = loop {
        let pods = bench.cli().pods()?;
        let pod = pods.iter().find(|p| p.name == "bench").context("no pod bench")?;
        if pod.counted_secs_ago.is_some_and(|ago| ago < filled.elapsed().as_secs_f64()) {
            eprintln!("bench: the census counted the pod after {:.1} s", filled.elapsed().as_secs_f64());
            break pod.active_flows + pod.idle_flows;
        }
        ensure!(
            filled.elapsed() < std::time::Duration::from_secs(300),
            "the census did not count the pod within 300 s of the fill: {pod:?}"
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    };
    eprintln!("bench: {} calls of each kind with {known} flows", sizes.calls);
    let full = time_calls(&bench, sizes.calls)?;

    let mut calls = Table::new(&[
        "call",
        "no flow: median (ms)",
        "1M flows: median (ms)",
        "ratio",
        "no flow: p99 (ms)",
        "1M flows: p99 (ms)",
        "ratio",
        "target (issue 16)",
    ]);
    for (what, e, f) in [
        ("`conndrain status -o json`", &empty.status, &full.status),
        ("`conndrain pods -o json`", &empty.pods, &full.pods),
        ("`GET /metrics`", &empty.scrape, &full.scrape),
    ] {
        let (mut e, mut f) = (e.clone(), f.clone());
        let (em, fm) = (quantile(&mut e, 0.5), quantile(&mut f, 0.5));
        let (ep, fp) = (quantile(&mut e, 0.99), quantile(&mut f, 0.99));
        calls.row(vec![
            what.into(),
            ms(em),
            ms(fm),
            ratio(fm.as_secs_f64(), em.as_secs_f64()),
            ms(ep),
            ms(fp),
            ratio(fp.as_secs_f64(), ep.as_secs_f64()),
            format!("< {TARGET_MS:.0} ms"),
        ]);
    }

    Ok(Section {
        title: "The agent at scale".into(),
        name: "agentscale",
        intro: format!(
            "A standalone agent with `--max-flows {MAX_FLOWS}` and one registered pod, and the client \
             namespace sending one UDP datagram per new flow to the pod through the node (distinct \
             ports, paced at {} per second; `--udp-timeout 3600`, so that none times out). The calls \
             are timed from the bench, CLI process start or HTTP connect included, {} rounds of each \
             (`status`, `pods`, a scrape) with no flow and again once the agent knows of {} flows \
             (`status`'s `maps.flows.used`; the census counted {} for the pod); p99 of {} calls is close to \
             their maximum. No assertion on times. The agent's CPU is user + system time from \
             `/proc/PID/stat` while the flows are sent, over the time they took.",
            count(RATE as u64),
            sizes.calls,
            count(known),
            count(counted),
            sizes.calls
        ),
        table: calls,
        notes: vec![
            format!(
                "Agent CPU and events while new flows arrive (an agent with the default table first, \
                 {} s of flows; then the one above, filled to 1M). The ring is sized from `--max-flows` \
                 (one event per 16 entries, a power of two from 256 KiB, which the programs declare, to \
                 32 MiB). Half a core is issue 16's target.\n\n{}",
                sizes.default_secs,
                loads.markdown()
            ),
            "`status` and the scrape's map gauges read counts the agent keeps (its flow index's size, \
             the held table's count at its last sweep), never a walk of the tables. `pods` and the \
             scrape's per-pod gauges count a pod's flows afresh (a point lookup per flow in the kernel \
             tables) only within 4,096 lookups per listing; a larger pod, as here, shows its latest full \
             count and its age (`counted_secs_ago`): the drain evaluator's for a draining pod, else the \
             census's, which recounts such pods in the background in steps of 2,048 lookups (the \
             agent's lock is released between steps) and rests ten times a round's length after it \
             (at most a tenth of a core). `conndrain why POD` still counts that pod afresh."
                .into(),
        ],
    })
}
