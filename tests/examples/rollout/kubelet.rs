//! The Deployment's pods, the agents on both nodes, and the simulated kubelet.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use conndrain_tests::{
    Agent, Cli, Running, conndrain_bin,
    kubeproxy::{Cluster, NODE_A_V4, NODE_B_V4, Node},
};

use crate::{
    Config, DEADLINE_MARGIN, METRICS_PORT, QUIET_PERIOD, Strategy, WAIT_PORT,
    app::App,
    loads::Shared,
    run::{Bed, Release},
};

/// A pod's name and node.
type PodSpot = (String, Node);

/// The Deployment's pods, one generation per version: each replaces the one
/// before it index for index, on the same node: alternately node A and node
/// B, named by node (v1 a1, b1, a2; v2 a3, b2, a4; v3 a5, b3, a6; ...).
pub fn plan(replacements: usize, rollouts: usize) -> Vec<Vec<PodSpot>> {
    let nodes: Vec<Node> = (0..replacements)
        .map(|i| if i % 2 == 0 { Node::A } else { Node::B })
        .collect();
    let mut count = [0usize; 2];
    let mut name = |node: Node| {
        let (i, letter) = match node {
            Node::A => (0, 'a'),
            Node::B => (1, 'b'),
        };
        count[i] += 1;
        (format!("{letter}{}", count[i]), node)
    };
    (0..=rollouts)
        .map(|_| nodes.iter().map(|&n| name(n)).collect())
        .collect()
}

/// The node IP of `node`, where its pods' preStop hooks reach its agent.
fn node_ip(node: Node) -> Ipv4Addr {
    match node {
        Node::A => NODE_A_V4,
        Node::B => NODE_B_V4,
    }
}

/// conndrain on both nodes, standalone, told what Kubernetes mode would learn
/// from the API. Node A's agent has every pod: its own, and node B's, whose
/// flows node A's kube-proxy translates (so node A pins them). Node B's agent
/// has node B's pods: it tracks their flows and answers their preStop hooks.
pub struct Agents {
    a: Agent,
    b: Agent,
}

impl Agents {
    pub fn start(cfg: &Config, cluster: &Cluster, pods: &[(&str, Node)]) -> Result<Self> {
        let start = |node: Node| -> Result<Agent> {
            let ns = match node {
                Node::A => cluster.node_a(),
                Node::B => cluster.node_b(),
            };
            let mut agent = Agent::start(
                ns,
                &[
                    "--host-ip",
                    &node_ip(node).to_string(),
                    "--wait-port",
                    &WAIT_PORT.to_string(),
                    "--metrics-port",
                    &METRICS_PORT.to_string(),
                    "--udp-timeout",
                    &cfg.udp_timeout.to_string(),
                ],
            )?;
            agent.quiet_on_drop();
            Ok(agent)
        };
        let agents = Self {
            a: start(Node::A)?,
            b: start(Node::B)?,
        };
        for &(p, node) in pods {
            let [v4, v6] = cluster.pod(p).ips();
            let (v4, v6) = (v4.to_string(), v6.to_string());
            for cli in agents.for_pod(node) {
                cli.ok(&["pod", "add", p, "--ip", &v4, "--ip", &v6])?;
                cli.wait_pod(p, "attached to an interface", |s| !s.interfaces.is_empty())?;
            }
        }
        Ok(agents)
    }

    /// The agents that know a pod of `node`: its node's first.
    pub fn for_pod(&self, node: Node) -> Vec<Cli> {
        match node {
            Node::A => vec![self.a.cli()],
            Node::B => vec![self.b.cli(), self.a.cli()],
        }
    }
}

/// The simulated kubelet (and endpoints controller) for the deletion of `pod`.
/// `clis`: the agents told about it (conndrain only), the one of the pod's
/// node first.
#[allow(clippy::too_many_arguments)]
pub fn kubelet(
    cfg: &Config,
    strategy: Strategy,
    bed: &Bed,
    endpoints: &Mutex<Vec<String>>,
    sh: &Shared,
    clis: Option<&[Cli]>,
    pod: &str,
    app: &App,
) -> Result<Release> {
    let t0 = Instant::now();
    let deleted_at = sh.since();
    sh.event(format!(
        "kubectl delete pod {pod} (grace period {}s)",
        cfg.grace.as_secs()
    ));
    thread::scope(|s| -> Result<Release> {
        // The endpoints update, reaching kube-proxy after the propagation delay.
        let ep = s.spawn(|| -> Result<()> {
            conndrain_tests::sleep(cfg.propagation)?;
            let eps = {
                let mut eps = endpoints.lock().expect("endpoints");
                eps.retain(|p| p != pod);
                eps.clone()
            };
            bed.sync(&eps)?;
            let ip: IpAddr = bed.cluster.pod(pod).ipv4().into();
            let mut cleaned = 0;
            for p in &bed.proxies {
                cleaned += p.cleanup_udp_conntrack(ip)?;
            }
            sh.event(format!(
                "kube-proxy synced without {pod}; UDP conntrack cleanup deleted {cleaned} entries"
            ));
            Ok(())
        });
        // The agents learn of the deletion (Kubernetes mode: the pod's
        // deletionTimestamp on its node, its endpoint turning terminating on
        // the other).
        for cli in clis.unwrap_or_default() {
            let deadline = (cfg.grace.as_secs_f64() - DEADLINE_MARGIN).to_string();
            cli.ok(&[
                "pod",
                "terminate",
                pod,
                "--deadline",
                &deadline,
                "--quiet-period",
                &QUIET_PERIOD.to_string(),
            ])?;
        }
        if clis.is_some() {
            sh.event(format!(
                "conndrain: {pod} terminating on {} agent(s) (node A pins its established flows)",
                clis.map_or(0, <[Cli]>::len)
            ));
        }
        // preStop.
        let pre = Instant::now();
        let note = match strategy {
            Strategy::None => "returns at once".to_owned(),
            Strategy::Sleep => {
                conndrain_tests::sleep(Duration::from_secs(cfg.sleep_secs).min(cfg.grace))?;
                format!("slept {}s", cfg.sleep_secs)
            }
            Strategy::Conndrain => {
                let mut cmd = bed
                    .cluster
                    .pod(pod)
                    .ns()
                    .command(&conndrain_bin().to_string_lossy());
                cmd.args(["wait", "--fallback-sleep", &cfg.sleep_secs.to_string()])
                    .env("HOST_IP", node_ip(bed.cluster.pod(pod).node()).to_string())
                    .env("CONNDRAIN_WAIT_PORT", WAIT_PORT.to_string());
                let out = Running::spawn(cmd)?.wait_exit(cfg.grace)?;
                format!(
                    "conndrain wait exit {}: {}",
                    out.code,
                    out.all().trim().replace('\n', " ")
                )
            }
        };
        let prestop_secs = pre.elapsed().as_secs_f64();
        sh.event(format!(
            "{pod} preStop done after {prestop_secs:.2}s ({note}); SIGTERM"
        ));
        app.sigterm();
        let kill_at = t0 + cfg.grace;
        let mut killed = false;
        while !app.ended() {
            if Instant::now() >= kill_at && !killed {
                app.sigkill();
                killed = true;
                sh.event(format!("{pod}: grace period over, SIGKILL"));
            }
            thread::sleep(Duration::from_millis(5));
        }
        let release_secs = t0.elapsed().as_secs_f64();
        sh.released.lock().expect("released").push(app.name.clone());
        sh.event(format!(
            "{pod} released (app ended) {release_secs:.2}s after deletion"
        ));
        for cli in clis.unwrap_or_default() {
            cli.ok(&["pod", "remove", pod])?;
        }
        ep.join()
            .map_err(|_| anyhow::anyhow!("the endpoints thread panicked"))??;
        Ok(Release {
            pod: pod.to_owned(),
            deleted_at,
            prestop_secs,
            prestop_note: note,
            release_secs,
            killed,
        })
    })
}
