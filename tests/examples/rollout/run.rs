//! One strategy's run: cluster, kube-proxy, (agent), loads, rolling update.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use conndrain_tests::{
    check_interrupted,
    kubeproxy::{Cluster, KubeProxy, NODE_A_V4, NODE_A_V6, NODE_B_V4, NODE_B_V6, Node, Protocol, Service, ServicePort},
};

use crate::{
    CLIENT_TIMEOUT, Config, FIRST_VERSION, HTTP_NODE_PORT, HTTP_PORT, HTTP_TARGET, NODE_PORT_INTERVAL, NODE_PORT_LOAD,
    SAME_NODE_INTERVAL, SAME_NODE_LOAD, SAME_NODE_POD, STREAM_PORT, Strategy, UDP_PORT, UDP_TARGET, VIP, VIP_V6,
    app::App,
    kubelet::{Agents, kubelet, plan},
    loads::{
        Counted, Load, Monitor, MonitorStats, Shared, close_client, enter, keepalive_client, monitor_client,
        stream_client, udp_client,
    },
};

pub struct Release {
    pub pod: String,
    pub deleted_at: f64,
    pub prestop_secs: f64,
    pub prestop_note: String,
    pub release_secs: f64,
    pub killed: bool,
}

pub struct Outcome {
    pub strategy: Strategy,
    pub loads: Vec<Arc<Load>>,
    pub monitor: MonitorStats,
    /// When the Deployment was updated to v2, v3, ... (s since the loads started).
    pub updated_at: Vec<f64>,
    pub releases: Vec<Release>,
    pub timeline: Vec<(f64, String)>,
}

pub struct Bed {
    pub proxies: Vec<KubeProxy>,
    pub cluster: Cluster,
}

impl Bed {
    pub fn sync(&self, pods: &[String]) -> Result<()> {
        let ips: Vec<IpAddr> = pods
            .iter()
            .flat_map(|p| self.cluster.pod(p).ips())
            .collect();
        for p in &self.proxies {
            p.sync(&ips)?;
        }
        Ok(())
    }
}

pub fn run_strategy(cfg: &Config, strategy: Strategy) -> Result<Outcome> {
    let generations = plan(cfg.replacements, cfg.rollouts);
    // The Deployment's pods, then the same-node client's pod (last, so the
    // Deployment's pods keep their addresses).
    let layout: Vec<(&str, Node)> = generations
        .iter()
        .flatten()
        .map(|(p, node)| (p.as_str(), *node))
        .chain([(SAME_NODE_POD, Node::A)])
        .collect();
    let cluster = Cluster::build(&layout)?;
    let names: Vec<Vec<String>> = generations
        .iter()
        .map(|g| g.iter().map(|(p, _)| p.clone()).collect())
        .collect();
    let old = &names[0];
    let service = Service {
        namespace: "default".into(),
        name: "web".into(),
        cluster_ips: vec![VIP.into(), VIP_V6.parse()?],
        ports: vec![
            ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: HTTP_PORT,
                target_port: HTTP_TARGET,
                node_port: Some(HTTP_NODE_PORT),
            },
            ServicePort {
                name: "stream".into(),
                protocol: Protocol::Tcp,
                port: STREAM_PORT,
                target_port: STREAM_PORT,
                node_port: None,
            },
            ServicePort {
                name: "dns".into(),
                protocol: Protocol::Udp,
                port: UDP_PORT,
                target_port: UDP_TARGET,
                node_port: None,
            },
        ],
    };
    let proxies = vec![
        KubeProxy::start(
            cluster.node_a(),
            cfg.backend,
            &service,
            &[NODE_A_V4.into(), NODE_A_V6.into()],
        )?,
        KubeProxy::start(
            cluster.node_b(),
            cfg.backend,
            &service,
            &[NODE_B_V4.into(), NODE_B_V6.into()],
        )?,
    ];
    let bed = Bed { proxies, cluster };

    let agents = if strategy == Strategy::Conndrain {
        Some(Agents::start(cfg, &bed.cluster, &layout)?)
    } else {
        None
    };

    let apps: Mutex<HashMap<String, Arc<App>>> = Mutex::new(HashMap::new());
    for p in old {
        let app = App::start(bed.cluster.pod(p), FIRST_VERSION, cfg)?;
        apps.lock().expect("apps").insert(p.clone(), Arc::new(app));
    }
    let endpoints: Mutex<Vec<String>> = Mutex::new(old.clone());
    let monitor = Monitor::default();
    bed.sync(&endpoints.lock().expect("endpoints"))?;

    let shared = Shared {
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        released: Mutex::new(Vec::new()),
        timeline: Mutex::new(Vec::new()),
        seq: AtomicU64::new(0),
        updated_at: Mutex::new(Vec::new()),
        last_version: cfg.last_version(),
    };
    let keepalive = Load::new(
        "HTTP keep-alive (4 conns, 20 req/s each)",
        Counted::Requests,
    );
    let close = Load::new("HTTP Connection: close (2 x 20 req/s)", Counted::Requests);
    let slow = Load::new(
        "HTTP /slow, Connection: close (2 back to back)",
        Counted::Requests,
    );
    let streams = Load::new("TCP streams (3 at a time)", Counted::Sessions);
    let udp = Load::new("UDP sessions (3 at a time)", Counted::Sessions);
    let monitor_load = Load::new("seed 000 monitor (keep-alive, 5 req/s)", Counted::Monitor);
    let node_port = Load::new(NODE_PORT_LOAD, Counted::Apart);
    let same_node = Load::new(SAME_NODE_LOAD, Counted::Apart);
    let loads = vec![
        keepalive.clone(),
        close.clone(),
        slow.clone(),
        streams.clone(),
        udp.clone(),
        monitor_load.clone(),
        node_port.clone(),
        same_node.clone(),
    ];

    let mut releases = Vec::new();
    thread::scope(|scope| -> Result<()> {
        let client = bed.cluster.client();
        let same_node_ns = bed.cluster.pod(SAME_NODE_POD).ns();
        let vip_http = SocketAddr::new(VIP.into(), HTTP_PORT);
        let node_port_addr = SocketAddr::new(NODE_A_V4.into(), HTTP_NODE_PORT);
        macro_rules! spawn_load {
            ($body:expr) => {
                spawn_load!(client, $body)
            };
            ($ns:expr, $body:expr) => {{
                let ns = $ns;
                scope.spawn(move || {
                    if let Err(e) = enter(ns) {
                        eprintln!("rollout: {e:#}");
                        return;
                    }
                    $body;
                })
            }};
        }
        let mut handles = Vec::new();
        let sh = &shared;
        for _ in 0..4 {
            let l = keepalive.clone();
            handles.push(spawn_load!(keepalive_client(
                sh,
                &l,
                Duration::from_millis(50)
            )));
        }
        for _ in 0..2 {
            let l = close.clone();
            handles.push(spawn_load!(close_client(
                sh,
                &l,
                vip_http,
                "/fast",
                Duration::from_millis(50),
                CLIENT_TIMEOUT
            )));
            let l = slow.clone();
            let t = cfg.slow + CLIENT_TIMEOUT;
            handles.push(spawn_load!(close_client(
                sh,
                &l,
                vip_http,
                "/slow",
                Duration::ZERO,
                t
            )));
        }
        {
            let (l, m) = (monitor_load.clone(), &monitor);
            handles.push(spawn_load!(monitor_client(sh, &l, m)));
        }
        {
            let l = node_port.clone();
            handles.push(spawn_load!(close_client(
                sh,
                &l,
                node_port_addr,
                "/fast",
                NODE_PORT_INTERVAL,
                CLIENT_TIMEOUT
            )));
            let l = same_node.clone();
            handles.push(spawn_load!(same_node_ns, keepalive_client(sh, &l, SAME_NODE_INTERVAL)));
            let l = same_node.clone();
            handles.push(spawn_load!(
                same_node_ns,
                close_client(sh, &l, vip_http, "/fast", SAME_NODE_INTERVAL, CLIENT_TIMEOUT)
            ));
        }
        for i in 0..3 {
            let l = streams.clone();
            let life = cfg.session_life;
            handles.push(spawn_load!({
                thread::sleep(life / 3 * u32::try_from(i).unwrap_or(0));
                stream_client(sh, &l, life);
            }));
            let l = udp.clone();
            handles.push(spawn_load!({
                thread::sleep(life / 3 * u32::try_from(i).unwrap_or(0));
                udp_client(sh, &l, life, i);
            }));
        }
        let result = (|| -> Result<()> {
            conndrain_tests::sleep(Duration::from_secs(3))?;
            shared.event("loads running".into());
            let mut kubelets = Vec::new();
            for (version, pair) in (FIRST_VERSION + 1..).zip(names.windows(2)) {
                let [old, new] = pair else { unreachable!("windows(2)") };
                if version > FIRST_VERSION + 1 {
                    // Seed 000's redeployer: the next update once the last one's
                    // version answers (its old pods may still be terminating).
                    let seen = conndrain_tests::wait_until(
                        "the monitor to see the new version",
                        Duration::from_secs(30),
                        || Ok(monitor.has_answered(version - 1)),
                        |seen| *seen,
                    )
                    .is_ok();
                    check_interrupted()?;
                    shared.event(if seen {
                        format!("the monitor got answers from v{}: redeploying", version - 1)
                    } else {
                        format!("the monitor got no answer from v{} in 30s: redeploying anyway", version - 1)
                    });
                    conndrain_tests::sleep(Duration::from_secs(2))?;
                }
                shared.updated_at.lock().expect("updated_at").push(shared.since());
                shared.event(format!(
                    "Deployment updated from v{} to v{version}: the rolling update starts",
                    version - 1
                ));
                for (i, (o, nw)) in old.iter().zip(new).enumerate() {
                    if i > 0 {
                        conndrain_tests::sleep(cfg.step_gap)?;
                    }
                    // The new pod starts, becomes ready, and its endpoint reaches kube-proxy.
                    let app = App::start(bed.cluster.pod(nw), version, cfg)?;
                    apps.lock().expect("apps").insert(nw.clone(), Arc::new(app));
                    {
                        let mut eps = endpoints.lock().expect("endpoints");
                        eps.push(nw.clone());
                        bed.sync(&eps)?;
                    }
                    shared.event(format!("{nw} (v{version}) ready and in the endpoints"));
                    conndrain_tests::sleep(Duration::from_secs(1))?;
                    let app = apps.lock().expect("apps")[o].clone();
                    let (bed, eps, sh) = (&bed, &endpoints, &shared);
                    let clis = agents
                        .as_ref()
                        .map(|a| a.for_pod(bed.cluster.pod(o).node()));
                    let o = o.clone();
                    kubelets.push(scope.spawn(move || {
                        kubelet(cfg, strategy, bed, eps, sh, clis.as_deref(), &o, &app)
                    }));
                }
            }
            for k in kubelets {
                releases.push(
                    k.join()
                        .map_err(|_| anyhow::anyhow!("the kubelet thread panicked"))??,
                );
            }
            conndrain_tests::sleep(Duration::from_secs(2))?;
            Ok(())
        })();
        shared.stop.store(true, Ordering::SeqCst);
        for h in handles {
            let _ = h.join();
        }
        result
    })?;
    drop(apps);
    drop(agents);
    let timeline = shared.timeline.into_inner().expect("timeline");
    Ok(Outcome {
        strategy,
        loads,
        monitor: monitor.stats.into_inner().expect("monitor"),
        updated_at: shared.updated_at.into_inner().expect("updated_at"),
        releases,
        timeline,
    })
}
