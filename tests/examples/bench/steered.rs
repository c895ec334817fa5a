//! Steered (pinned) flows on live traffic, IPv4 and IPv6: the kube-proxy
//! emulation's node A with a standalone agent, a Service, and two pods, one
//! serving and one terminating. Flows through the Service's cluster IP to the
//! serving pod go through kube-proxy's DNAT (tracked, not pinned); flows to
//! the terminating pod are pinned, so the programs rewrite and redirect their
//! packets themselves. Both kinds alternate in one run: throughput, request
//! latency, the programs' run time from the kernel's BPF stats, and how many
//! packets the datapath steered.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use conndrain_tests::{
    Agent, Cli, TcpConn, TcpServer,
    kubeproxy::{Backend, Cluster, KubeProxy, NODE_A_V4, NODE_A_V6, Node, Protocol, Service, ServicePort},
    sleep, wait_until,
};

use crate::{
    live::{IPERF_PORT, IperfServer, Sizes, abba, attached_programs, iperf, run_stats},
    report::{Section, Table, count, median, quantile, ratio, us},
};

const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_V6: &str = "fd00:96::10";
const ECHO_PORT: u16 = 8080;
/// The serving pod (its flows are not pinned) and the terminating one.
const SERVING: &str = "a1";
const TERMINATING: &str = "a2";

/// Whether the flows of a run are pinned.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// To the serving pod: kube-proxy's DNAT, tracked only.
    NotPinned,
    /// To the terminating pod: pinned, rewritten and redirected by the programs.
    Pinned,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::NotPinned => "not pinned",
            Mode::Pinned => "pinned",
        }
    }
    fn pod(self) -> &'static str {
        match self {
            Mode::NotPinned => SERVING,
            Mode::Pinned => TERMINATING,
        }
    }
}

/// What the kernel and the agent counted over some runs.
#[derive(Default, Clone, Copy)]
struct Counted {
    /// Per program (ingress, egress): Δ`run_time_ns`, Δ`run_cnt`.
    ns: [u64; 2],
    runs: [u64; 2],
    /// Δ steered packets (the agent's `status`).
    steered: u64,
}

impl Counted {
    fn add(&mut self, o: Counted) {
        for i in 0..2 {
            self.ns[i] += o.ns[i];
            self.runs[i] += o.runs[i];
        }
        self.steered += o.steered;
    }
}

/// One family's results, per mode (`Mode as usize`).
#[derive(Default)]
struct Family {
    gbps: [Vec<f64>; 2],
    rtt_ns: [Vec<u64>; 2],
    iperf: [Counted; 2],
    pingpong: [Counted; 2],
}

struct Bed {
    cluster: Cluster,
    proxy: KubeProxy,
    cli: Cli,
    /// (name, id) of `conndrain_ingress` and `conndrain_egress`.
    ids: Vec<(String, u32)>,
}

impl Bed {
    /// kube-proxy sends new flows to `pod` only.
    fn route_to(&self, pod: &str) -> Result<()> {
        self.proxy.sync(&self.cluster.pod(pod).ips())
    }

    fn steered(&self) -> Result<u64> {
        Ok(self.cli.status()?["steering"]["steered_packets"].as_u64().unwrap_or(0))
    }

    /// Runs `f`, counting the programs' runs and the packets steered meanwhile.
    fn measure<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(T, Counted)> {
        // The last ACKs of the previous run (delayed by up to 40 ms) are not this run's.
        sleep(Duration::from_millis(100))?;
        let steered = self.steered()?;
        let before = run_stats(&self.ids)?;
        let out = f()?;
        let after = run_stats(&self.ids)?;
        let mut c = Counted { steered: self.steered()? - steered, ..Counted::default() };
        for i in 0..2 {
            c.ns[i] = after[i].0 - before[i].0;
            c.runs[i] = after[i].1 - before[i].1;
        }
        Ok((out, c))
    }
}

/// `sizes`: per family and mode.
pub fn run(sizes: &Sizes) -> Result<(Section, Section)> {
    let cluster = Cluster::build(&[(SERVING, Node::A), (TERMINATING, Node::A)])?;
    let tcp = |name: &str, port: u16| ServicePort {
        name: name.into(),
        protocol: Protocol::Tcp,
        port,
        target_port: port,
        node_port: None,
    };
    let service = Service {
        namespace: "default".into(),
        name: "bench".into(),
        cluster_ips: vec![VIP_V4.into(), VIP_V6.parse()?],
        ports: vec![tcp("iperf", IPERF_PORT), tcp("echo", ECHO_PORT)],
    };
    let proxy = KubeProxy::start(cluster.node_a(), Backend::Iptables, &service, &[NODE_A_V4.into(), NODE_A_V6.into()])?;
    let mut agent = Agent::start(cluster.node_a(), &[])?;
    agent.quiet_on_drop();
    let cli = agent.cli();
    let mut servers = Vec::new();
    let mut iperfs = Vec::new();
    for name in [SERVING, TERMINATING] {
        let pod = cluster.pod(name);
        let [v4, v6] = pod.ips();
        cli.ok(&["pod", "add", name, "--ip", &v4.to_string(), "--ip", &v6.to_string()])?;
        cli.wait_pod(name, "attached", |p| !p.interfaces.is_empty())?;
        for ip in [v4, v6] {
            servers.push(TcpServer::start(pod.ns(), SocketAddr::new(ip, ECHO_PORT))?);
        }
        iperfs.push(IperfServer::start(pod.ns(), None)?);
    }
    let ids = attached_programs(cluster.node_a(), cluster.pod(SERVING).host_if())?;
    ensure!(ids.len() == 2, "conndrain's two programs on {}: {ids:?}", cluster.pod(SERVING).host_if());
    let bed = Bed { cluster, proxy, cli, ids };
    let vips: [IpAddr; 2] = [VIP_V4.into(), VIP_V6.parse()?];

    // Per family, one long-lived connection to each pod through the
    // ClusterIP, made while kube-proxy sends new flows only to that pod.
    let mut conns: Vec<[TcpConn; 2]> = Vec::new();
    for vip in vips {
        let to = SocketAddr::new(vip, ECHO_PORT);
        bed.route_to(SERVING)?;
        let serving = TcpConn::connect(bed.cluster.client(), to)?;
        bed.route_to(TERMINATING)?;
        let terminating = TcpConn::connect(bed.cluster.client(), to)?;
        conns.push([serving, terminating]);
    }
    // The pod starts terminating: the agent pins its established flows (and,
    // from now on, each new flow that reaches it). Never drained during the run.
    bed.cli.ok(&["pod", "terminate", TERMINATING, "--deadline", "3600", "--quiet-period", "3600"])?;
    wait_until("both connections to the terminating pod pinned", conndrain_tests::TIMEOUT, || bed.cli.status(), |s| {
        s["steering"]["pinned_flows"].as_u64() >= Some(2)
    })?;
    let uplink = bed.cluster.node_a_ifs().0.to_owned();
    let on_uplink = attached_programs(bed.cluster.node_a(), &uplink)?;
    ensure!(
        on_uplink.iter().any(|(n, id)| n == conndrain_common::programs::INGRESS && *id == bed.ids[0].1),
        "with flows pinned, the same conndrain_ingress runs on node A's uplink {uplink}: {on_uplink:?}"
    );

    let sysctl_before = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    let modes = [Mode::NotPinned, Mode::Pinned];
    let mut fams: [Family; 2] = Default::default();
    for (f, vip) in vips.iter().enumerate() {
        for mode in abba(&modes, sizes.iperf_runs) {
            crate::check_interrupted()?;
            bed.route_to(mode.pod())?;
            let ((bps, _), c) = bed.measure(|| iperf(bed.cluster.client(), *vip, sizes.iperf_secs))?;
            eprintln!("bench: iperf3 via {vip}, {}: {:.2} Gbit/s, {} packets steered", mode.label(), bps / 1e9, c.steered);
            let m = mode as usize;
            fams[f].gbps[m].push(bps / 1e9);
            fams[f].iperf[m].add(c);
        }
        let per_block = (sizes.round_trips / 8).max(1);
        for mode in abba(&modes, 8) {
            crate::check_interrupted()?;
            let conn = &mut conns[f][mode as usize];
            let (rtts, c) = bed.measure(|| {
                let mut rtts = Vec::with_capacity(per_block);
                for _ in 0..per_block {
                    let t = Instant::now();
                    conn.request("ping")?;
                    rtts.push(u64::try_from(t.elapsed().as_nanos())?);
                }
                Ok(rtts)
            })?;
            let m = mode as usize;
            fams[f].rtt_ns[m].extend(rtts);
            fams[f].pingpong[m].add(c);
        }
    }
    drop(stats_fd);
    for (f, fam) in fams.iter().enumerate() {
        ensure!(
            fam.pingpong[Mode::Pinned as usize].steered > 0 && fam.iperf[Mode::Pinned as usize].steered > 0,
            "{}: the pinned runs steered no packets",
            vips[f]
        );
    }

    Ok((perf_section(sizes, &mut fams), stats_section(&fams, sysctl_before.trim())))
}

fn perf_section(sizes: &Sizes, fams: &mut [Family; 2]) -> Section {
    let mut table = Table::new(&[
        "measurement",
        "IPv4, not pinned",
        "IPv4, pinned",
        "IPv4 pinned / not",
        "IPv6, not pinned",
        "IPv6, pinned",
        "IPv6 pinned / not",
    ]);
    let row = |table: &mut Table, what: String, v: [[f64; 2]; 2], fmt: &dyn Fn(f64) -> String| {
        let mut cells = vec![what];
        for [a, b] in v {
            cells.extend([fmt(a), fmt(b), ratio(b, a)]);
        }
        table.row(cells);
    };
    let gbps = fams.each_mut().map(|f| [median(&mut f.gbps[0]), median(&mut f.gbps[1])]);
    row(
        &mut table,
        format!("TCP throughput via the ClusterIP, iperf3, median of {} × {} s (Gbit/s)", sizes.iperf_runs, sizes.iperf_secs),
        gbps,
        &|x| format!("{x:.2}"),
    );
    let micros = |ns: f64| us(Duration::from_nanos(ns as u64));
    for (label, q) in [("p50", 0.5), ("p99", 0.99)] {
        let v = fams.each_mut().map(|f| [0, 1].map(|m| quantile(&mut f.rtt_ns[m], q) as f64));
        row(
            &mut table,
            format!("request latency {label}, {} round trips each (µs)", count(fams[0].rtt_ns[0].len() as u64)),
            v,
            &micros,
        );
    }
    let mut cells = vec!["packets steered, in % of `conndrain_ingress` runs (iperf3; ping-pong)".to_owned()];
    for f in fams.iter() {
        let share = |c: &Counted| if c.runs[0] == 0 { 0.0 } else { 100.0 * c.steered as f64 / c.runs[0] as f64 };
        for m in 0..2 {
            cells.push(format!("{:.0}%; {:.0}%", share(&f.iperf[m]), share(&f.pingpong[m])));
        }
        cells.push("–".into());
    }
    table.row(cells);
    let runs = |v: &[f64]| v.iter().map(|g| format!("{g:.2}")).collect::<Vec<_>>().join(", ");
    Section {
        title: "Steered (pinned) flows on live traffic, IPv4 and IPv6".into(),
        name: "steered",
        intro: format!(
            "The kube-proxy emulation's client and node A (iptables rules for a ClusterIP Service, \
             {VIP_V4} and {VIP_V6}), two pods on node A behind it, and a standalone agent on node A with both \
             pods registered. Pod {TERMINATING} is terminating (deadline and quiet period of an hour) for the \
             whole run: the agent has pinned its flows, so `conndrain_ingress` rewrites and redirects their \
             packets with `bpf_redirect_neigh` (client → Service on node A's uplink, replies on the pod's veth), \
             ahead of netfilter. Pod {SERVING} is serving: its flows go through kube-proxy's DNAT, tracked only. \
             Runs to either pod alternate (A B B A), kube-proxy's rules re-synced before each to send new flows \
             to that pod only. Throughput: `iperf3 -c CLUSTER_IP -t {} -O 1 -J`; new flows to the terminating pod \
             are pinned when they reach it, so their first packets go through netfilter. Latency: a ping-pong \
             over one connection per pod through the ClusterIP, made before the termination, in 8 blocks per mode. \
             Packets steered: the datapath's counter (`conndrain status`), both directions.",
            sizes.iperf_secs - 1
        ),
        table,
        notes: vec![format!(
            "Runs (Gbit/s): IPv4 not pinned: {}; IPv4 pinned: {}; IPv6 not pinned: {}; IPv6 pinned: {}.",
            runs(&fams[0].gbps[0]),
            runs(&fams[0].gbps[1]),
            runs(&fams[1].gbps[0]),
            runs(&fams[1].gbps[1]),
        )],
    }
}

fn stats_section(fams: &[Family; 2], sysctl_before: &str) -> Section {
    let mut table = Table::new(&["family", "traffic", "flows", "program", "runs", "avg ns/run", "packets steered"]);
    for (f, fam) in fams.iter().enumerate() {
        let family = if f == 0 { "IPv4" } else { "IPv6" };
        for (traffic, counted) in [("iperf3", &fam.iperf), ("ping-pong", &fam.pingpong)] {
            for mode in [Mode::NotPinned, Mode::Pinned] {
                let c = counted[mode as usize];
                for (p, prog) in [conndrain_common::programs::INGRESS, conndrain_common::programs::EGRESS].iter().enumerate() {
                    let avg = if c.runs[p] == 0 { "–".into() } else { format!("{:.0}", c.ns[p] as f64 / c.runs[p] as f64) };
                    table.row(vec![
                        family.into(),
                        traffic.into(),
                        mode.label().into(),
                        format!("`{prog}`"),
                        count(c.runs[p]),
                        avg,
                        if p == 0 { count(c.steered) } else { "–".into() },
                    ]);
                }
            }
        }
    }
    let avg = |c: &Counted| c.ns[0] as f64 / c.runs[0].max(1) as f64;
    let extra: Vec<String> = fams
        .iter()
        .zip(["IPv4", "IPv6"])
        .map(|(f, family)| {
            let (not, pinned) = (avg(&f.pingpong[0]), avg(&f.pingpong[1]));
            format!("{family} {:+.0} ns ({pinned:.0} vs {not:.0})", pinned - not)
        })
        .collect();
    Section {
        title: "Programs' run time on steered traffic (kernel BPF stats)".into(),
        name: "steered",
        intro: "The runs of the section above. The kernel's per-program `run_time_ns` and `run_cnt` (as \
                `kernel.bpf_stats_enabled=1` turns on) are read before and after each run and summed per \
                family, traffic and mode; avg = Δrun_time_ns / Δrun_cnt. The agent loads each program once and \
                attaches it to the pods' veths and, once a flow is pinned, to node A's uplink (the ping-pong \
                connections to the terminating pod stay pinned throughout, so in both modes); the counts cover \
                every interface. Each packet runs `conndrain_ingress` where it enters node A (the uplink for \
                client → Service, the pod's veth for replies) and `conndrain_egress` where it leaves, hence \
                the equal runs. \"Packets steered\" (both directions) over the ingress runs is the share of runs \
                that took the pinned path."
            .into(),
        table,
        notes: vec![
            format!(
                "The pinned path's own cost per packet, `conndrain_ingress` on the ping-pong, pinned minus not \
                 pinned: {}.",
                extra.join("; ")
            ),
            format!(
            "Stats are enabled with `BPF_ENABLE_STATS` for the measurement only (the sysctl read {sysctl_before} \
             before). The ping-pong rows are the per-packet figures (one small segment per run); iperf3's runs \
             are GRO/TSO super-packets. On the pinned path a run costs the PINS hit, the rewrite with checksum \
             updates and the `bpf_redirect_neigh` call; the redirect itself (neighbour lookup, transmit) is \
             carried out by the kernel after the program returns, so it is not in these ns, as under TEST_RUN: \
             its effect is in the throughput and latency above."
            ),
        ],
    }
}
