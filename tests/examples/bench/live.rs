//! Live traffic through a simulated node (client ns -> node ns -> pod ns):
//! TCP throughput (iperf3), packets per second of small UDP datagrams over
//! many flows (`bench/pps.rs`) and request latency (a ping-pong over one TCP
//! connection) with no program, an empty classifier, or conndrain's programs
//! on the pod's veth, alternating in the same run; then the programs' own run
//! time from the kernel's BPF stats.

use std::{
    net::IpAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::programs::{SchedClassifier, TcAttachType};
use conndrain_tests::{Agent, Cli, Netns, Pod, TcpConn, TcpServer, Topology, run_in, sleep};
use serde_json::Value;

use crate::{
    bpfsys::EmptyClassifier,
    pps::{FLOWS as PPS_FLOWS, PAYLOAD as PPS_PAYLOAD, per_cycle, spread},
    report::{Section, Table, count, median, quantile, ratio, us},
};

pub const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 8080;
/// Target of issue 16: throughput at least 99 % of no programs, as the median
/// of the per-cycle ratios (issue 6 asked for within 3 %).
const TARGET_THROUGHPUT_LOSS: f64 = 0.01;

pub struct Sizes {
    /// iperf3 runs per mode.
    pub iperf_runs: usize,
    /// Seconds per iperf3 run (the first one omitted as warm-up).
    pub iperf_secs: u32,
    /// Seconds per packets-per-second run, one after each iperf3 run (0: none).
    pub pps_secs: u32,
    /// Ping-pong round trips per mode.
    pub round_trips: usize,
}

/// What is attached to the pod's veth.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Nothing: the pod is not registered.
    None,
    /// An empty classifier (`r0 = -1; exit`) on tcx ingress and egress: the
    /// cost of having any TC program there.
    Empty,
    /// The pod registered with the agent: `conndrain_ingress`/`conndrain_egress`.
    Conndrain,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::None => "no programs",
            Mode::Empty => "empty classifier",
            Mode::Conndrain => "conndrain",
        }
    }
}

/// The order of runs: cycles of A B C C B A, so that a drift of the machine
/// hits every mode alike.
fn order(per_mode: usize) -> Vec<Mode> {
    abba(&[Mode::None, Mode::Empty, Mode::Conndrain], per_mode)
}

/// `per_mode` runs of each of `modes`, in cycles of A B .. B A.
pub fn abba<T: Copy>(modes: &[T], per_mode: usize) -> Vec<T> {
    let cycle: Vec<T> = modes.iter().chain(modes.iter().rev()).copied().collect();
    cycle.into_iter().cycle().take(modes.len() * per_mode.max(1)).collect()
}

/// Switches the veth between modes; checks what is attached after each switch.
struct Switch<'a> {
    cli: &'a Cli,
    topo: &'a Topology,
    pod: &'a Pod,
    empty: EmptyClassifier,
    ifindex: u32,
    links: Vec<std::os::fd::OwnedFd>,
    current: Mode,
}

impl Switch<'_> {
    fn set(&mut self, mode: Mode) -> Result<()> {
        if mode != self.current {
            match self.current {
                Mode::None => {}
                Mode::Empty => self.links.clear(), // closing a tcx link detaches it
                Mode::Conndrain => {
                    self.cli.ok(&["pod", "remove", self.pod.name()])?;
                }
            }
            match mode {
                Mode::None => {}
                Mode::Empty => {
                    // The ifindex is resolved in the calling thread's namespace.
                    let (empty, ifindex) = (&self.empty, self.ifindex);
                    for ty in [TCX_INGRESS, TCX_EGRESS] {
                        let link = run_in(self.topo.node(), || empty.attach_tcx(ifindex, ty))??;
                        self.links.push(link);
                    }
                }
                Mode::Conndrain => {
                    self.cli.add_pod(self.pod)?;
                }
            }
            self.current = mode;
        }
        let progs = attached_programs(self.topo.node(), self.pod.node_if())?;
        let ok = match mode {
            Mode::None => progs.is_empty(),
            Mode::Empty => progs.len() == 2 && progs.iter().all(|(n, _)| n == EmptyClassifier::NAME),
            Mode::Conndrain => progs.len() == 2 && progs.iter().all(|(n, _)| n.starts_with("conndrain_")),
        };
        ensure!(ok, "{}: unexpected programs on {}: {progs:?}", mode.label(), self.pod.node_if());
        // Let the attach/detach and the CLI calls settle.
        sleep(Duration::from_millis(200))
    }
}

const TCX_INGRESS: u32 = 46;
const TCX_EGRESS: u32 = 47;

pub fn run(sizes: &Sizes) -> Result<(Section, Section)> {
    let topo = Topology::builder().pod("bench").build()?;
    let pod = topo.pod("bench");
    let mut agent = Agent::start(topo.node(), &[])?;
    agent.quiet_on_drop();
    let cli = agent.cli();
    let _iperf = IperfServer::start(pod.ns(), Some(pod.ipv4().into()))?;
    let echo = TcpServer::start(pod.ns(), pod.addr_v4(ECHO_PORT))?;
    let mut conn = TcpConn::connect(topo.client(), echo.addr())?;
    let dev = pod.node_if().to_owned();
    let ifindex = run_in(topo.node(), move || {
        let name = std::ffi::CString::new(dev).expect("no NUL in an interface name");
        // SAFETY: a valid C string.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    })?;
    ensure!(ifindex != 0, "no interface {} in the node namespace", pod.node_if());
    let mut switch = Switch {
        cli: &cli,
        topo: &topo,
        pod,
        empty: EmptyClassifier::load()?,
        ifindex,
        links: Vec::new(),
        current: Mode::None,
    };

    let blaster = crate::pps::Blaster::new(topo.client(), pod)?;
    let mut gbps: [Vec<f64>; 3] = Default::default();
    let mut pps: [Vec<f64>; 3] = Default::default();
    let mut retrans = [0u64; 3];
    // The agent's CPU time (user + system) and the wall time, per mode.
    let agent_pid = pid_with_arg(agent.socket())?;
    let mut agent_cpu = [(Duration::ZERO, Duration::ZERO); 3];
    for mode in order(sizes.iperf_runs) {
        switch.set(mode)?;
        let (cpu0, t0) = (process_cpu(agent_pid)?, Instant::now());
        let (bps, rt) = iperf(topo.client(), pod.ipv4().into(), sizes.iperf_secs)?;
        let (cpu, wall) = (process_cpu(agent_pid)?.saturating_sub(cpu0), t0.elapsed());
        eprintln!("bench: iperf3, {}: {:.2} Gbit/s", mode.label(), bps / 1e9);
        let m = mode as usize;
        gbps[m].push(bps / 1e9);
        retrans[m] += rt;
        agent_cpu[m].0 += cpu;
        agent_cpu[m].1 += wall;
        if sizes.pps_secs > 0 {
            let rate = blaster.run(pod, sizes.pps_secs)?;
            eprintln!("bench: UDP {} B × {} flows, {}: {rate:.0} packets/s", PPS_PAYLOAD, PPS_FLOWS, mode.label());
            pps[m].push(rate);
        }
    }
    drop(blaster);

    // Latency: blocks of round trips in the same order, one connection throughout.
    for _ in 0..500 {
        conn.request("warm-up")?;
    }
    let blocks = order(8);
    let per_block = (sizes.round_trips / 8).max(1);
    let mut rtt: [Vec<u64>; 3] = Default::default();
    for &mode in &blocks {
        switch.set(mode)?;
        crate::check_interrupted()?;
        for _ in 0..per_block {
            let t = Instant::now();
            conn.request("ping")?;
            rtt[mode as usize].push(u64::try_from(t.elapsed().as_nanos())?);
        }
    }

    // The programs' own run time on live traffic.
    switch.set(Mode::Conndrain)?;
    let ids = attached_programs(topo.node(), pod.node_if())?;
    let sysctl_before = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    let mut stats_table = Table::new(&["traffic", "program", "runs", "runs/s", "avg ns/run", "CPU (% of one core)"]);
    let (before, t0) = (run_stats(&ids)?, Instant::now());
    let (bps, _) = iperf(topo.client(), pod.ipv4().into(), sizes.iperf_secs)?;
    let (after, wall) = (run_stats(&ids)?, t0.elapsed());
    let iperf_cpu =
        push_stats(&mut stats_table, &format!("iperf3, {:.1} Gbit/s", bps / 1e9), &ids, &before, &after, wall);
    let n = sizes.round_trips / 4;
    let (before, t0) = (run_stats(&ids)?, Instant::now());
    for _ in 0..n {
        conn.request("ping")?;
    }
    let (after, wall) = (run_stats(&ids)?, t0.elapsed());
    push_stats(&mut stats_table, &format!("ping-pong, {} round trips", count(n as u64)), &ids, &before, &after, wall);
    drop(stats_fd);
    switch.set(Mode::None)?;
    drop(conn);

    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let med: Vec<f64> = gbps.iter().map(|v| median(&mut v.clone())).collect();
    let avg: Vec<f64> = gbps.iter().map(|v| mean(v)).collect();
    let (none, empty, ours) = (Mode::None as usize, Mode::Empty as usize, Mode::Conndrain as usize);
    let mut table = Table::new(&[
        "measurement",
        "no programs",
        "empty classifier",
        "conndrain",
        "conndrain / no programs",
        "conndrain / empty",
    ]);
    let row3 = |table: &mut Table, what: String, v: [f64; 3], fmt: &dyn Fn(f64) -> String| {
        table.row(vec![what, fmt(v[0]), fmt(v[1]), fmt(v[2]), ratio(v[2], v[0]), ratio(v[2], v[1])]);
    };
    let gb = |x: f64| format!("{x:.2}");
    row3(
        &mut table,
        format!("TCP throughput, iperf3, median of {} × {} s (Gbit/s)", sizes.iperf_runs, sizes.iperf_secs),
        [med[0], med[1], med[2]],
        &gb,
    );
    row3(&mut table, "TCP throughput, mean of the same runs (Gbit/s)".into(), [avg[0], avg[1], avg[2]], &gb);
    let tcp_cycles = per_cycle(&gbps[ours], &gbps[none]);
    table.row(vec![
        "TCP throughput, per-cycle ratios: median (min–max, IQR)".into(),
        "–".into(),
        "–".into(),
        "–".into(),
        spread(&tcp_cycles),
        spread(&per_cycle(&gbps[ours], &gbps[empty])),
    ]);
    if sizes.pps_secs > 0 {
        let pps_med: Vec<f64> = pps.iter().map(|v| median(&mut v.clone())).collect();
        let kpps = |x: f64| format!("{:.0}", x / 1e3);
        row3(
            &mut table,
            format!(
                "UDP, {PPS_PAYLOAD}-byte datagrams over {PPS_FLOWS} flows, median of {} × {} s (thousand packets/s)",
                pps[none].len(),
                sizes.pps_secs
            ),
            [pps_med[0], pps_med[1], pps_med[2]],
            &kpps,
        );
        table.row(vec![
            "UDP packets/s, per-cycle ratios: median (min–max, IQR)".into(),
            "–".into(),
            "–".into(),
            "–".into(),
            spread(&per_cycle(&pps[ours], &pps[none])),
            spread(&per_cycle(&pps[ours], &pps[empty])),
        ]);
    }
    table.row(vec![
        "TCP retransmits, all runs".into(),
        count(retrans[0]),
        count(retrans[1]),
        count(retrans[2]),
        "–".into(),
        "–".into(),
    ]);
    let pct = |(cpu, wall): (Duration, Duration)| 100.0 * cpu.as_secs_f64() / wall.as_secs_f64();
    table.row(vec![
        "agent process CPU during iperf3 (% of one core)".into(),
        format!("{:.1}", pct(agent_cpu[0])),
        format!("{:.1}", pct(agent_cpu[1])),
        format!("{:.1}", pct(agent_cpu[2])),
        "–".into(),
        "–".into(),
    ]);
    let micros = |ns: f64| us(Duration::from_nanos(ns as u64));
    for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
        let v = [0, 1, 2].map(|m| quantile(&mut rtt[m], q) as f64);
        row3(
            &mut table,
            format!("request latency {label}, {} round trips each (µs)", count(rtt[0].len() as u64)),
            v,
            &micros,
        );
    }
    let loss = 1.0 - median(&mut tcp_cycles.clone());
    let spread = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        (hi - lo) / mean(v)
    };
    let max_spread = 100.0 * gbps.iter().map(|v| spread(v)).fold(0.0, f64::max);
    let verdict = if loss <= TARGET_THROUGHPUT_LOSS {
        format!(
            "Target of issue 16 (throughput at least {:.0} % of no programs): **met** in this run ({:+.1} %, median of the per-cycle ratios).",
            100.0 - TARGET_THROUGHPUT_LOSS * 100.0,
            -loss * 100.0
        )
    } else {
        format!(
            "Target of issue 16 (throughput at least {:.0} % of no programs): **missed** in this run ({:+.1} %, median of the per-cycle ratios).",
            100.0 - TARGET_THROUGHPUT_LOSS * 100.0,
            -loss * 100.0,
        )
    };
    let why = format!(
        "Runs of one mode differ by up to {max_spread:.0}% among themselves here (list above), so differences \
         of a few % are within this machine's noise; the empty classifier's column shows what merely having \
         a TC program on the veth does in the same conditions ({:+.1}% vs no programs; conndrain vs the empty \
         classifier: {:+.1}%). During iperf3 \
         conndrain's two programs used {iperf_cpu:.1}% of one core (next section) and the agent process \
         {:.1}%; sender, forwarding node and receiver share 2 cores, so the test is CPU-bound and that time \
         comes out of throughput.",
        100.0 * (med[empty] / med[none] - 1.0),
        100.0 * (med[ours] / med[empty] - 1.0),
        pct(agent_cpu[ours])
    );
    let perf = Section {
        title: "Throughput and request latency through a node, programs attached vs not".into(),
        name: "live",
        intro: format!(
            "client ns → node ns (forwarding) → pod ns over veths, IPv4. Three modes of the pod's veth on \
             the node, alternating in one run (cycles of A B C C B A): no programs (the pod not registered, \
             or removed with `conndrain pod remove`); an empty classifier (`r0 = -1; exit`) on tcx ingress and \
             egress; conndrain (the pod registered with a standalone agent, which attaches \
             `conndrain_ingress`/`conndrain_egress` with tcx). What is attached is checked after each switch. \
             Tracking only: no flow is pinned. Throughput: `iperf3 -c POD -t {} -O 1 -J` (one stream; the \
             first second is omitted); a cycle is one run of each mode, and the per-cycle ratios are run i of \
             conndrain over run i of the other mode. Packets per second: after each iperf3 run, in the same mode, \
             a Rust sender in the client writes {PPS_PAYLOAD}-byte UDP datagrams round-robin over {PPS_FLOWS} connected \
             sockets (so {PPS_FLOWS} flows) for {} s as fast as it can, and the pod's interface counts what it \
             received (the pod's socket never reads: what overflows it is dropped there); no GSO, so each packet \
             is one run of the programs. Latency: a Rust ping-pong (one line each way, TCP_NODELAY) over one \
             TCP connection, in 8 blocks per mode.",
            sizes.iperf_secs - 1,
            sizes.pps_secs
        ),
        table,
        notes: vec![
            format!(
                "Runs (Gbit/s): no programs: {}; empty classifier: {}; conndrain: {}.",
                runs(&gbps[none]),
                runs(&gbps[empty]),
                runs(&gbps[ours])
            ),
            format!(
                "UDP runs (thousand packets/s): no programs: {}; empty classifier: {}; conndrain: {}.",
                runs(&pps[none].iter().map(|x| x / 1e3).collect::<Vec<_>>()),
                runs(&pps[empty].iter().map(|x| x / 1e3).collect::<Vec<_>>()),
                runs(&pps[ours].iter().map(|x| x / 1e3).collect::<Vec<_>>())
            ),
            verdict,
            why,
        ],
    };
    let stats = Section {
        title: "Programs' run time on live traffic (kernel BPF stats)".into(),
        name: "live",
        intro: "Same node and agent as above, conndrain's programs attached. The kernel's per-program \
                `run_time_ns` and `run_cnt` (what `kernel.bpf_stats_enabled=1` turns on, as `bpftool prog \
                show` reports them) are read before and after the traffic; avg = Δrun_time_ns / Δrun_cnt, \
                CPU = Δrun_time_ns / wall time."
            .into(),
        table: stats_table,
        notes: vec![format!(
            "Stats are enabled with `BPF_ENABLE_STATS` (a file descriptor held for the measurement: the \
             same switch as the sysctl, undone when it is closed or the process dies), so the global \
             sysctl is never left on; it read {} before. These ns include the kernel's clock reads \
             around each run and cold caches, unlike TEST_RUN's repeat loop. Over veth, GRO/TSO hand \
             the programs super-packets of up to 64 KiB: compare runs/s with the throughput.",
            sysctl_before.trim()
        )],
    };
    Ok((perf, stats))
}

fn runs(v: &[f64]) -> String {
    v.iter().map(|g| format!("{g:.2}")).collect::<Vec<_>>().join(", ")
}

/// (program name, id) of the TC programs attached to `dev` in `ns`: tcx
/// (what the agent uses on 6.6+), else clsact as `bpftool net` lists it.
pub fn attached_programs(ns: &Netns, dev: &str) -> Result<Vec<(String, u32)>> {
    let tcx = run_in(ns, || -> Result<Vec<(String, u32)>, aya::programs::ProgramError> {
        let mut found = Vec::new();
        for ty in [TcAttachType::Ingress, TcAttachType::Egress] {
            let (_, progs) = SchedClassifier::query_tcx(dev, ty)?;
            for p in progs {
                found.push((full_name(p.name_as_str().unwrap_or_default()), p.id()));
            }
        }
        Ok(found)
    })?;
    if let Ok(found) = tcx {
        return Ok(found);
    }
    // bpftool 7.1 (Debian 12) lists clsact filters but not tcx links.
    let out = ns.exec("bpftool", &["-j", "net", "show", "dev", dev])?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("bpftool net printed {out}"))?;
    let mut found = Vec::new();
    for obj in v.as_array().into_iter().flatten() {
        for e in obj["tc"].as_array().into_iter().flatten() {
            let name = full_name(e["name"].as_str().unwrap_or_default());
            if let Some(id) = e["id"].as_u64().or_else(|| e["prog_id"].as_u64()) {
                found.push((name, u32::try_from(id)?));
            }
        }
    }
    Ok(found)
}

/// The kernel keeps 15 bytes of a program's name.
fn full_name(name: &str) -> String {
    [conndrain_common::programs::INGRESS, conndrain_common::programs::EGRESS]
        .into_iter()
        .find(|full| !name.is_empty() && full.starts_with(name))
        .unwrap_or(name)
        .to_owned()
}

/// (`run_time_ns`, `run_cnt`) of each program, in the order of `ids`.
pub fn run_stats(ids: &[(String, u32)]) -> Result<Vec<(u64, u64)>> {
    let mut out = vec![(0, 0); ids.len()];
    let mut seen = 0;
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if let Some(i) = ids.iter().position(|(_, id)| *id == info.id()) {
            out[i] = (u64::try_from(info.run_time().as_nanos())?, info.run_count());
            seen += 1;
        }
    }
    if seen != ids.len() {
        bail!("found {seen} of the programs {ids:?}");
    }
    Ok(out)
}

/// One row per program; returns their CPU time together, in % of one core.
fn push_stats(
    table: &mut Table,
    traffic: &str,
    ids: &[(String, u32)],
    before: &[(u64, u64)],
    after: &[(u64, u64)],
    wall: Duration,
) -> f64 {
    let mut cpu = 0.0;
    for (i, (name, _)) in ids.iter().enumerate() {
        let runs = after[i].1 - before[i].1;
        let ns = after[i].0 - before[i].0;
        let avg = if runs == 0 { "–".into() } else { format!("{:.0}", ns as f64 / runs as f64) };
        let share = 100.0 * ns as f64 / wall.as_nanos() as f64;
        cpu += share;
        table.row(vec![
            traffic.into(),
            format!("`{name}`"),
            count(runs),
            count((runs as f64 / wall.as_secs_f64()) as u64),
            avg,
            format!("{share:.2}"),
        ]);
    }
    cpu
}

/// The pid of the process whose command line has `arg` (the agent, by its
/// unique socket path).
pub fn pid_with_arg(arg: &std::path::Path) -> Result<i32> {
    let want = arg.as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if cmdline.split(|&b| b == 0).any(|a| a == want) {
            return Ok(pid);
        }
    }
    bail!("no process with {} on its command line", arg.display())
}

/// User + system CPU time of `pid` so far.
pub fn process_cpu(pid: i32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may have spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc/PID/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })?;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// `iperf3 -s` in a pod's namespace, on `bind` or every address of both
/// families; killed on drop.
pub struct IperfServer(Child);

impl IperfServer {
    pub fn start(ns: &Netns, bind: Option<IpAddr>) -> Result<Self> {
        let mut cmd = ns.command("iperf3");
        cmd.args(["-s", "-p", &IPERF_PORT.to_string()]);
        if let Some(ip) = bind {
            cmd.args(["-B", &ip.to_string()]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s (installed by cargo xtask setup)")?;
        let server = Self(child);
        let filter = format!("sport = :{IPERF_PORT}");
        let start = Instant::now();
        while ns.exec("ss", &["-Htln", &filter])?.trim().is_empty() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("iperf3 -s did not listen within 10 s");
            }
            sleep(Duration::from_millis(50))?;
        }
        Ok(server)
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 run from the client namespace to `to`: (bits/s received,
/// retransmits).
pub fn iperf(client: &Netns, to: IpAddr, secs: u32) -> Result<(f64, u64)> {
    let secs = secs.max(2);
    let mut last = None;
    for _ in 0..3 {
        crate::check_interrupted()?;
        let mut cmd: Command = client.command("iperf3");
        cmd.args([
            "-c",
            &to.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &(secs - 1).to_string(),
            "-O",
            "1",
            "-J",
        ]);
        let out = cmd.stdin(Stdio::null()).output().context("running iperf3 -c")?;
        let json: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(bps) = json["end"]["sum_received"]["bits_per_second"].as_f64() {
            let rt = json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
            return Ok((bps, rt));
        }
        last = Some(format!("{} {}", json["error"].as_str().unwrap_or_default(), String::from_utf8_lossy(&out.stderr)));
        // The server may still be finishing the previous test.
        sleep(Duration::from_millis(500))?;
    }
    bail!("iperf3 -c failed three times: {}", last.unwrap_or_default())
}
