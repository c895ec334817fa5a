//! The seeds' rolling-update scenario (issue 6, items 1-4), three strategies
//! side by side on the same simulated cluster and the same loads:
//!
//! - `none`: no mitigation, the preStop hook returns at once;
//! - `sleep`: `preStop: sleep N` (the seeds' workaround);
//! - `conndrain`: an agent on each node, the pods declared, preStop =
//!   `conndrain wait` (blocks until the pod is drained, asked of the agent of
//!   the pod's node), and steering (node A's agent, where kube-proxy
//!   translates the client's flows, pins the terminating pod's established
//!   flows, whichever node the pod is on).
//!
//! ```sh
//! cargo build -p conndrain
//! cargo run -p conndrain-tests --example rollout -- --short     # ~50 s
//! cargo run -p conndrain-tests --example rollout                # full, ~3 min
//! ```
//!
//! Options: `--short`, `--propagation SECS` (default 1), `--sleep N` (default
//! 15 short / 61 full, seed 000's `preStop: sleep 61`), `--grace SECS`
//! (default 30 short / 120 full, seed 001's terminationGracePeriodSeconds),
//! `--keepalive-requests N` (the app closes a keep-alive connection after N
//! requests, as nginx's `keepalive_requests`; default 30 short / 100 full; 0:
//! never, then a busy keep-alive connection holds a conndrain-drained pod
//! until its deadline), `--nftables` (kube-proxy's nftables mode),
//! `--only none,sleep,conndrain`, `--summary-out FILE` (the summary table
//! in Markdown, for BENCHMARKS.md).
//!
//! The cluster is `conndrain_tests::kubeproxy`: a client, node A, node B,
//! kube-proxy's rules on both nodes. Each strategy gets a fresh cluster. The
//! Deployment's pods (version 1) are spread over both nodes (a1, b1, a2,
//! ...: 2 in short mode, 3 in full mode, seed 000's `replicas: 3`), and every
//! one of them is replaced, by one rolling update in short mode and by three
//! in a row in full mode (`--rollouts N`; seed 000 redeploys continually):
//! v1 -> v2 -> v3 -> v4, each update once the monitor has seen the last one's
//! version answer, while that update's old pods may still be terminating. The client reaches the Service through node A,
//! whose kube-proxy sends the flows to node B's pods over the inter-node
//! link. A rolling update (maxSurge 1, maxUnavailable 0) starts a new pod
//! (the next version) on the node of the pod it replaces, adds it to the endpoints,
//! and deletes the old pod; the simulated kubelet then runs Kubernetes' order:
//!
//! deletion -> { endpoints update reaching the nodes' kube-proxy after the
//! propagation delay (rules rewritten without the pod, UDP conntrack cleanup)
//! || preStop hook } -> SIGTERM -> the app's graceful shutdown (stop accepting,
//! finish in-flight requests, close idle keep-alives and open streams, close
//! the UDP socket) -> SIGKILL at the grace period.
//!
//! The loads, in the client namespace through the Service's cluster IP: HTTP keep-alive,
//! HTTP `Connection: close` (seed 001's `wrk`), `/slow` requests, long-lived
//! TCP streams, UDP sessions, and seed 000's monitor (a pooled keep-alive
//! client that numbers its requests and checks the version in every answer;
//! see `monitor_client`). Two more reach the pods from elsewhere:
//!
//! - a masqueraded NodePort client: from the client namespace to node A's
//!   NodePort, one `Connection: close` request every 0.3 s (seed 000's ELB
//!   health checks and traffic). kube-proxy marks NodePort traffic for
//!   masquerade whatever node the endpoint is on (`externalTrafficPolicy:
//!   Cluster`), so the pods see node A's address as the source: its gateway
//!   address on the pod's veth for node A's pods, its inter-node link address
//!   for node B's;
//! - a same-node client: a pod on node A (not an endpoint; `client-a`, wired
//!   like the Deployment's pods and, with conndrain, known to node A's agent
//!   as Kubernetes mode would) calling the cluster IP, a pooled keep-alive
//!   client and a `Connection: close` one; its connections to node A's pods
//!   are pod-to-pod on the same node.
//!
//! The app runs in-process: its sockets live in the pod's namespace, and
//! "SIGTERM"/"SIGKILL" are flags its threads watch. Every answer carries the
//! pod, its version and the request's sequence number; a "wrong version" is
//! an answer to another request or from a pod already released.
//!
//! Known result (not a bug of this program): with conndrain, a UDP session
//! that starts on the terminating pod less than a second before kube-proxy's
//! UDP conntrack cleanup can still move to another pod, because the agent
//! re-learns flows to pin from conntrack once a second.

#![allow(
    clippy::too_many_lines,
    clippy::cast_precision_loss,
    clippy::many_single_char_names,
    clippy::similar_names,
    clippy::needless_pass_by_value,
    clippy::struct_field_names
)]

mod app;
mod kubelet;
mod loads;
mod report;
mod run;

use std::{net::Ipv4Addr, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use conndrain_tests::{kubeproxy::Backend, require_root, stop_on_signals};

use crate::{report::summary, run::run_strategy};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_V6: &str = "fd00:96::10";
const HTTP_PORT: u16 = 80;
const HTTP_TARGET: u16 = 8080;
/// The HTTP port's NodePort, reached on node A's node IP.
const HTTP_NODE_PORT: u16 = 30080;
/// The masqueraded NodePort client's pace (seed 000's ELB).
const NODE_PORT_INTERVAL: Duration = Duration::from_millis(300);
/// The same-node client: a pod on node A that is not one of the Deployment's.
const SAME_NODE_POD: &str = "client-a";
/// The same-node client's pace, per connection kind (keep-alive, close).
const SAME_NODE_INTERVAL: Duration = Duration::from_millis(100);
/// The names of those two loads (the summary finds them by name).
const NODE_PORT_LOAD: &str = "NodePort, masqueraded (close, 1 per 0.3s)";
const SAME_NODE_LOAD: &str = "same-node pod (keep-alive + close, 2 x 10/s)";
const STREAM_PORT: u16 = 9000;
const UDP_PORT: u16 = 53;
const UDP_TARGET: u16 = 5353;
const WAIT_PORT: u16 = 9464;
const METRICS_PORT: u16 = 9465;
/// The agent's quiet period (its default): covers the propagation delay.
const QUIET_PERIOD: f64 = 3.0;
/// Kubernetes mode's default `--deadline-margin`: the deadline is the kill
/// time minus this.
const DEADLINE_MARGIN: f64 = 2.0;
/// The clients' patience for a connect or an answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// Seed 000's monitor: its Go client's timeout, and how often it asks.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(5);
const MONITOR_INTERVAL: Duration = Duration::from_millis(200);
/// The Deployment's first version; each rolling update adds one.
const FIRST_VERSION: u32 = 1;

#[derive(Debug, Clone)]
struct Config {
    short: bool,
    propagation: Duration,
    sleep_secs: u64,
    grace: Duration,
    slow: Duration,
    /// How long one stream and one UDP session last (then the client closes
    /// it and opens the next one).
    session_life: Duration,
    /// The app closes a keep-alive connection after this many requests
    /// (nginx's `keepalive_requests`, lowered so connections rotate).
    keepalive_requests: u64,
    /// The agent's `--udp-timeout`.
    udp_timeout: f64,
    replacements: usize,
    /// Rolling updates one after the other (seed 000 redeploys continually):
    /// v1 -> v2 -> ... -> v(rollouts + 1).
    rollouts: usize,
    /// Between two deletions of the rolling update.
    step_gap: Duration,
    backend: Backend,
    only: Vec<Strategy>,
    /// Also write the summary table (Markdown) here, for BENCHMARKS.md.
    summary_out: Option<String>,
}

impl Config {
    fn parse() -> Result<Self> {
        let mut args = std::env::args().skip(1);
        let mut short = false;
        let mut summary_out = None;
        let (mut propagation, mut sleep, mut grace, mut backend, mut only, mut keepalive) =
            (1.0_f64, None, None, Backend::Iptables, None, None);
        let mut rollouts = None;
        while let Some(a) = args.next() {
            let mut val = |name: &str| -> Result<String> {
                args.next().with_context(|| format!("{name} needs a value"))
            };
            match a.as_str() {
                "--short" => short = true,
                "--propagation" => propagation = val(&a)?.parse()?,
                "--sleep" => sleep = Some(val(&a)?.parse()?),
                "--grace" => grace = Some(val(&a)?.parse::<f64>()?),
                "--nftables" => backend = Backend::Nftables,
                "--summary-out" => summary_out = Some(val(&a)?),
                "--keepalive-requests" => keepalive = Some(val(&a)?.parse::<u64>()?),
                "--rollouts" => {
                    let n: usize = val(&a)?.parse().context("--rollouts takes a number of rolling updates")?;
                    if n == 0 {
                        bail!("--rollouts must be at least 1");
                    }
                    rollouts = Some(n);
                }
                "--only" => {
                    only = Some(
                        val(&a)?
                            .split(',')
                            .map(|s| match s {
                                "none" => Ok(Strategy::None),
                                "sleep" => Ok(Strategy::Sleep),
                                "conndrain" => Ok(Strategy::Conndrain),
                                _ => bail!("unknown strategy {s:?} (none, sleep, conndrain)"),
                            })
                            .collect::<Result<Vec<_>>>()?,
                    );
                }
                "-h" | "--help" => {
                    println!(
                        "rollout [--short] [--propagation SECS] [--sleep N] [--grace SECS] [--keepalive-requests N (0: never)] [--rollouts N] [--nftables] [--only none,sleep,conndrain] [--summary-out FILE.md]"
                    );
                    std::process::exit(0);
                }
                _ => bail!("unknown argument {a:?} (try --help)"),
            }
        }
        let grace = Duration::from_secs_f64(grace.unwrap_or(if short { 30.0 } else { 120.0 }));
        Ok(Self {
            short,
            propagation: Duration::from_secs_f64(propagation),
            sleep_secs: sleep.unwrap_or(if short { 15 } else { 61 }),
            grace,
            slow: Duration::from_secs(if short { 2 } else { 10 }),
            session_life: Duration::from_secs(if short { 3 } else { 8 }),
            keepalive_requests: match keepalive {
                Some(0) => u64::MAX,
                Some(n) => n,
                None if short => 30,
                None => 100,
            },
            udp_timeout: 2.0,
            replacements: if short { 2 } else { 3 },
            rollouts: rollouts.unwrap_or(if short { 1 } else { 3 }),
            step_gap: Duration::from_secs(if short { 0 } else { 10 }),
            backend,
            only: only
                .unwrap_or_else(|| vec![Strategy::None, Strategy::Sleep, Strategy::Conndrain]),
            summary_out,
        })
    }
}

impl Config {
    fn last_version(&self) -> u32 {
        FIRST_VERSION + u32::try_from(self.rollouts).unwrap_or(u32::MAX - 1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    None,
    Sleep,
    Conndrain,
}

impl Strategy {
    fn label(self, cfg: &Config) -> String {
        match self {
            Strategy::None => "no mitigation".into(),
            Strategy::Sleep => format!("preStop sleep {}", cfg.sleep_secs),
            Strategy::Conndrain => "conndrain".into(),
        }
    }
}

fn main() -> ExitCode {
    stop_on_signals();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rollout: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    require_root()?;
    let cfg = Config::parse()?;
    println!(
        "Rolling updates under load, {} mode: {} update(s) of {} pod(s) each (v{FIRST_VERSION} to v{}), pods on node A and node B, kube-proxy {:?} mode, \
         endpoints propagation {:.1}s, grace period {}s, /slow {}s, streams and UDP sessions of {}s, \
         keep-alive connections closed by the app after {} requests.",
        if cfg.short { "short" } else { "full" },
        cfg.rollouts,
        cfg.replacements,
        cfg.last_version(),
        cfg.backend,
        cfg.propagation.as_secs_f64(),
        cfg.grace.as_secs(),
        cfg.slow.as_secs(),
        cfg.session_life.as_secs(),
        if cfg.keepalive_requests == u64::MAX {
            "unlimited".to_owned()
        } else {
            cfg.keepalive_requests.to_string()
        },
    );
    let mut results = Vec::new();
    for &s in &cfg.only {
        println!("\n######## strategy: {}", s.label(&cfg));
        let r = run_strategy(&cfg, s).with_context(|| format!("strategy {}", s.label(&cfg)))?;
        r.print(&cfg);
        results.push(r);
    }
    println!(
        "\n######## summary ({} mode)\n",
        if cfg.short { "short" } else { "full" }
    );
    let summary = summary(&cfg, &results);
    print!("{summary}");
    if let Some(path) = &cfg.summary_out {
        std::fs::write(path, &summary).with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}
