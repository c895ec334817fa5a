//! The steering agent's CPU with a large conntrack table during a rollout.
//!
//! While any backend terminates, the agent learns its flows' translations
//! from conntrack every second. Node A of the kube-proxy emulation gets
//! 100,000 unrelated conntrack entries (other Services' flows) plus 25 UDP
//! flows to each of four pods; the four pods terminate at once (a rollout
//! replacing them) and stay terminating while the agent's CPU time (user +
//! system, from `/proc/PID/stat`; the kernel's side of a dump counts as the
//! agent's system time) is measured. Rows: the agent with no pod terminating
//! (no dumps: the baseline), and with the four pods terminating under each
//! way of reading conntrack: one kernel-filtered dump per terminating
//! backend (what the agent does: every second in the first minute of a
//! termination, every 10 s after it), and one dump of the whole table every
//! second (what it did before, `--conntrack-dump full`). Runs alternate
//! A B B A.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use conndrain::conntrack::{Translation, create};
use conndrain_common::{PROTO_TCP, PROTO_UDP};
use conndrain_tests::{
    Agent,
    kubeproxy::{CLIENT_V4, Cluster, Node},
    run_in, sleep, wait_until,
};

use crate::report::{Section, Table, count, median, ratio};

const PODS: [&str; 4] = ["a1", "a2", "a3", "a4"];
const FLOWS_PER_POD: u16 = 25;
/// The agent learns a terminating backend's flows every second for this long
/// (`steering::LEARN_FAST_NS`), then every 10 s.
const LEARN_FAST_SECS: u64 = 60;

pub struct Sizes {
    /// Unrelated conntrack entries.
    pub entries: u32,
    /// Seconds of each measurement.
    pub secs: u64,
    /// Measurements per dump mode (in A B B A order).
    pub runs: usize,
}

/// CPU seconds (user + system) the process has used.
fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("a /proc stat line")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Ok(ticks as f64 / hz as f64)
}

/// The agent's CPU, in % of one core, over `secs`.
fn measure(agent: &Agent, secs: u64) -> Result<f64> {
    let pid = agent.pid().context("the agent runs")?;
    let (c0, t0) = (cpu_secs(pid)?, Instant::now());
    sleep(Duration::from_secs(secs))?;
    let (c1, wall) = (cpu_secs(pid)?, t0.elapsed().as_secs_f64());
    Ok(100.0 * (c1 - c0) / wall)
}

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

pub fn run(sizes: &Sizes) -> Result<Section> {
    let cluster = Cluster::build(&PODS.map(|p| (p, Node::A)))?;
    let node = cluster.node_a();
    // Entries of flows through a ClusterIP to each pod, and of other
    // Services' flows to pods elsewhere (10.245/16: no pod of this node).
    let mut flows = Vec::new();
    for (i, name) in PODS.iter().enumerate() {
        let [v4, _] = cluster.pod(name).ips();
        for n in 0..FLOWS_PER_POD {
            // The emulation's client: node A routes to it, as a pin needs.
            let client = sa(CLIENT_V4.into(), 20_000 + 100 * i as u16 + n);
            flows.push(Translation {
                proto: PROTO_UDP,
                orig_src: client,
                orig_dst: sa("10.96.0.10".parse()?, 53),
                reply_src: sa(v4, 53),
                reply_dst: client,
                live: true,
            });
        }
    }
    for n in 0..sizes.entries {
        let client = sa(format!("198.18.{}.{}", (n >> 8) & 0x7f, n & 0xff).parse()?, 10_000 + (n >> 15) as u16);
        let backend = sa(format!("10.245.{}.{}", (n >> 8) & 0xff, n & 0xff).parse()?, 8080);
        flows.push(Translation {
            proto: if n % 2 == 0 { PROTO_TCP } else { PROTO_UDP },
            orig_src: client,
            orig_dst: sa("10.96.1.1".parse()?, 80),
            reply_src: backend,
            reply_dst: client,
            live: true,
        });
    }
    let t = Instant::now();
    let created = run_in(node, || create(&flows, 7200))??;
    eprintln!("bench: {} conntrack entries created in {:.1} s", count(created as u64), t.elapsed().as_secs_f64());

    let modes = ["filtered", "full"];
    let mut idle = Vec::new();
    let mut busy: [Vec<f64>; 2] = Default::default();
    let mut later = Vec::new();
    for m in crate::live::abba(&[0usize, 1], sizes.runs) {
        crate::check_interrupted()?;
        let mut agent = Agent::start(node, &["--conntrack-dump", modes[m], "--udp-timeout", "7200"])?;
        agent.quiet_on_drop();
        let cli = agent.cli();
        for name in PODS {
            let [v4, v6] = cluster.pod(name).ips();
            cli.ok(&["pod", "add", name, "--ip", &v4.to_string(), "--ip", &v6.to_string()])?;
        }
        // Settle after the start, then the baseline: nothing terminating.
        sleep(Duration::from_secs(2))?;
        idle.push(measure(&agent, sizes.secs)?);
        let terminated = Instant::now();
        for name in PODS {
            cli.ok(&["pod", "terminate", name, "--deadline", "3600", "--quiet-period", "3600"])?;
        }
        let want = u64::from(FLOWS_PER_POD) * PODS.len() as u64;
        wait_until(
            "the terminating pods' flows pinned",
            conndrain_tests::TIMEOUT,
            || cli.status(),
            |s| s["steering"]["pinned_flows"].as_u64() >= Some(want),
        )
        .with_context(|| format!("the agent's log:\n{}", agent.log()))?;
        let cpu = measure(&agent, sizes.secs)?;
        eprintln!("bench: steering agent, {} dumps: {cpu:.1}% CPU", modes[m]);
        busy[m].push(cpu);
        if m == 0 {
            // Past the first minute: every backend is learned every 10 s only.
            sleep(Duration::from_secs(LEARN_FAST_SECS + 2).saturating_sub(terminated.elapsed()))?;
            let cpu = measure(&agent, sizes.secs)?;
            eprintln!("bench: steering agent, filtered dumps after the first minute: {cpu:.1}% CPU");
            later.push(cpu);
        }
        ensure!(agent.is_running(), "the agent exited during the run:\n{}", agent.log());
        agent.stop()?;
    }

    let idle = median(&mut idle);
    let filtered = median(&mut busy[0]);
    let full = median(&mut busy[1]);
    let later = median(&mut later);
    let mut table = Table::new(&["agent", "CPU (% of one core)", "× filtered dumps"]);
    let row = |what: &str, v: f64| vec![what.to_string(), format!("{v:.2}"), ratio(v, filtered)];
    table.row(row("no pod terminating (no dumps)", idle));
    table
        .row(row("4 pods terminating, first minute: one filtered dump per backend every second (the agent)", filtered));
    table.row(row("4 pods terminating, after the first minute: every 10 s (the agent)", later));
    table.row(row("4 pods terminating, whole-table dump every second (before)", full));
    Ok(Section {
        title: "Steering at scale: the agent's CPU with 100k conntrack entries".into(),
        intro: format!(
            "Node A of the kube-proxy emulation with {} unrelated conntrack entries (half TCP established, half \
             UDP) and {FLOWS_PER_POD} UDP flows to each of four pods, which all terminate at once and stay \
             terminating, so the agent reads conntrack (every second in the first minute of a termination, every 10 s after \
             it) and keeps {} flows pinned. The agent's CPU \
             time (user + system from `/proc/PID/stat`; the kernel's side of each dump is the agent's system \
             time) over {} s, median of {} runs per way of reading conntrack, runs alternating A B B A; each \
             run first measures the same agent before any pod terminates (the first row).",
            count(u64::from(sizes.entries)),
            u64::from(FLOWS_PER_POD) * PODS.len() as u64,
            sizes.secs,
            sizes.runs,
        ),
        name: "steercost",
        table,
        notes: vec![
            "A filtered dump still makes the kernel walk the whole table (under its locks), but it copies and \
             the agent parses only the backend's entries. IPv6 backends are read from one dump of the IPv6 \
             entries, filtered by the agent: the kernel's IPv6 address filter skips the matching entries instead \
             of the others (seen on 6.18). Kernels before 5.8 ignore the filter; the agent notices and reads the \
             whole table once per round."
                .into(),
        ],
    })
}
