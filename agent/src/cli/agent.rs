//! `conndrain agent`: load the datapath, serve the local API, follow events.

use std::{
    path::Path,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::{
    api::{
        access::{BindAddress, MetricsAllow},
        prestop::{self, NodeApi},
        server,
    },
    datapath::{
        AttachMode, Datapath, Features, LoadOptions,
        features::Wanted,
        intercept::{self, Intercept, InterceptOptions},
    },
    drain::Timeouts,
    node::{Node, Settings},
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run without Kubernetes: pods are declared with `conndrain pod`.
    #[arg(long)]
    pub standalone: bool,
    /// Pin the maps and programs under this bpffs directory, and save the pods
    /// and drains in --state-dir, so that a restart or an upgrade of the agent
    /// loses no flow, pin or drain: the programs keep running while it is down.
    #[arg(long, env = "CONNDRAIN_BPFFS")]
    pub bpffs: Option<std::path::PathBuf>,
    /// With --bpffs: where the agent saves its pods, drains and pinned flows
    /// (a file, state.json). Default: the directory of the socket.
    #[arg(long)]
    pub state_dir: Option<std::path::PathBuf>,
    /// With --bpffs: on SIGTERM, detach the programs and remove the pinned maps
    /// and saved state, instead of leaving them for the next agent.
    #[arg(long)]
    pub detach_on_exit: bool,
    /// How to attach the programs: tcx where the kernel has it (Linux 6.6+),
    /// clsact otherwise (auto); or always one of them (clsact for a kernel
    /// whose tcx misbehaves).
    #[arg(long, env = "CONNDRAIN_ATTACH", value_enum, default_value_t = Attach::Auto)]
    pub attach: Attach,
    /// Size of the flow table (entries; LRU when full).
    #[arg(long, env = "CONNDRAIN_MAX_FLOWS", default_value_t = conndrain_common::DEFAULT_MAX_FLOWS,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_flows: u32,
    /// Seconds after which an idle UDP flow is over.
    #[arg(long, env = "CONNDRAIN_UDP_TIMEOUT", default_value_t = 30.0, value_parser = positive_secs)]
    pub udp_timeout: f64,
    /// Seconds after which an established inbound TCP flow with no traffic is an idle
    /// keep-alive, which does not hold its pod.
    #[arg(long, env = "CONNDRAIN_IDLE_TIMEOUT", default_value_t = 30.0, value_parser = positive_secs)]
    pub idle_timeout: f64,
    /// How steering reads conntrack while backends terminate: one dump per
    /// terminating backend, filtered in the kernel (Linux 5.8+), or the whole
    /// table (the benchmark's baseline). Hidden: not a tuning knob.
    #[arg(long, hide = true, value_enum, default_value_t = crate::conntrack::DumpMode::Filtered)]
    pub conntrack_dump: crate::conntrack::DumpMode,
    /// Default drain deadline for `pod terminate`, in seconds.
    #[arg(long, env = "CONNDRAIN_DEADLINE", default_value_t = 30.0, value_parser = positive_secs)]
    pub deadline: f64,
    /// Default quiet period for `pod terminate`, in seconds.
    #[arg(long, env = "CONNDRAIN_QUIET_PERIOD", default_value_t = 3.0, value_parser = positive_secs)]
    pub quiet_period: f64,
    /// Kubeconfig to use; without it: in-cluster config, then $KUBECONFIG, then ~/.kube/config.
    #[arg(long)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// This node's name (Kubernetes mode): only pods with this spec.nodeName are tracked.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The node IP the preStop API (`/v1/wait`) listens on; all addresses if unset.
    #[arg(long, env = "HOST_IP")]
    pub host_ip: Option<std::net::IpAddr>,
    /// Port of the preStop API (`/v1/wait`).
    #[arg(long, env = "CONNDRAIN_WAIT_PORT", default_value_t = crate::api::DEFAULT_WAIT_PORT)]
    pub wait_port: u16,
    /// The preStop intercept: the kubelet's `preStop.httpGet` to a registered pod's
    /// IP on this port is answered by the agent, like `/v1/wait` for that pod
    /// (docs/prestop.md). 0: off.
    #[arg(long, env = "CONNDRAIN_INTERCEPT_PORT", default_value_t = crate::api::DEFAULT_WAIT_PORT)]
    pub intercept_port: u16,
    /// The loopback port (127.0.0.1 and `::1`) the intercepted connections are sent to.
    #[arg(long, env = "CONNDRAIN_INTERCEPT_LISTEN_PORT", default_value_t = crate::api::DEFAULT_INTERCEPT_LISTEN_PORT)]
    pub intercept_listen_port: u16,
    /// The cgroup (v2 directory) whose processes' connects are intercepted, the kubelet's
    /// or an ancestor of it; default: the cgroup2 root, from /proc/mounts.
    #[arg(long)]
    pub intercept_cgroup: Option<std::path::PathBuf>,
    /// Port of /metrics, /healthz and /readyz, unless --metrics-bind-address names one.
    #[arg(long, env = "CONNDRAIN_METRICS_PORT", default_value_t = crate::api::DEFAULT_METRICS_PORT)]
    pub metrics_port: u16,
    /// Where /metrics, /healthz and /readyz listen, like kube-proxy's flag: IP or
    /// IP:PORT ([IPv6]:PORT). The default, ::, is every address, IPv4 and IPv6.
    /// The kubelet probes /healthz and /readyz on the node IP: keep it reachable.
    #[arg(long, env = "CONNDRAIN_METRICS_BIND_ADDRESS", default_value = "::")]
    pub metrics_bind_address: BindAddress,
    /// Who may read /metrics: comma-separated IPv4 or IPv6 networks such as
    /// 10.244.0.0/16, or single addresses; pods of this node like anyone else.
    /// The metrics name this node's pods and count their flows.
    #[arg(long, env = "CONNDRAIN_METRICS_ALLOW", default_value = "0.0.0.0/0,::/0")]
    pub metrics_allow: MetricsAllow,
    /// Seconds before the kubelet's kill time (deletionTimestamp) at which a drain gives up.
    #[arg(long, env = "CONNDRAIN_DEADLINE_MARGIN", default_value_t = 2.0, value_parser = positive_secs)]
    pub deadline_margin: f64,
    /// Most pods that may wait in /v1/wait at once.
    #[arg(long, env = "CONNDRAIN_MAX_WAITERS", default_value_t = 512)]
    pub max_waiters: usize,
    /// Most waits one pod may have open at once, so one pod cannot take every slot.
    #[arg(long, env = "CONNDRAIN_MAX_WAITERS_PER_POD", default_value_t = crate::api::prestop::MAX_WAITERS_PER_POD)]
    pub max_waiters_per_pod: usize,
    /// The deadline, in seconds, of a terminating pod on another node (EndpointSlices carry no
    /// kill time): its flows are pinned until then, and stay pinned after it until its endpoint
    /// is gone (at most --pin-limit longer).
    #[arg(long, env = "CONNDRAIN_REMOTE_PIN_LIMIT", default_value_t = 600.0, value_parser = positive_secs)]
    pub remote_pin_limit: f64,
    /// Longest seconds a pinned flow stays pinned after its pod's deadline while the pod is never
    /// seen gone. Until the pod is gone a live pinned flow stays pinned: released, it would meet
    /// kube-proxy's conntrack entry with a stale TCP window and be dropped as INVALID.
    #[arg(long, env = "CONNDRAIN_PIN_LIMIT", default_value_t = 600.0, value_parser = positive_secs)]
    pub pin_limit: f64,
    /// Log lines as text, or as JSON objects, one per line (for log collectors).
    #[arg(long, env = "CONNDRAIN_LOG_FORMAT", value_enum, default_value_t = crate::telemetry::LogFormat::Text)]
    pub log_format: crate::telemetry::LogFormat,
    /// Least seconds between two progress updates of a pod's condition.
    #[arg(long, env = "CONNDRAIN_MIN_WRITE_INTERVAL", default_value_t = 1.0, value_parser = positive_secs)]
    pub min_write_interval: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Attach {
    Auto,
    Tcx,
    Clsact,
}

impl Attach {
    /// The mode asked for; `None`: the datapath decides.
    #[must_use]
    pub fn mode(self) -> Option<AttachMode> {
        match self {
            Self::Auto => None,
            Self::Tcx => Some(AttachMode::Tcx),
            Self::Clsact => Some(AttachMode::Clsact),
        }
    }
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

/// Where the state is saved: only with `--bpffs` (without it nothing of the
/// datapath outlives the agent, so there is nothing to take back).
fn state_file(args: &Args, socket: &Path) -> Option<std::path::PathBuf> {
    args.bpffs.as_ref()?;
    Some(state_path(args.state_dir.as_deref(), socket))
}

/// The saved state's file: in `--state-dir`, by default the socket's directory.
pub(crate) fn state_path(state_dir: Option<&Path>, socket: &Path) -> std::path::PathBuf {
    let dir = state_dir.or_else(|| socket.parent()).unwrap_or(Path::new("/run/conndrain"));
    dir.join("state.json")
}

fn ns(secs: f64) -> u64 {
    u64::try_from(Duration::from_secs_f64(secs).as_nanos()).unwrap_or(u64::MAX)
}

pub async fn run(args: Args, socket: &Path) -> anyhow::Result<()> {
    // Everything that can be checked before touching the kernel is checked
    // first: the arguments, then the node (one line per missing piece).
    let node_name = node_name(&args)?;
    check_node(&args)?;
    // The APIs may hold 2 x 1024 + 128 connections (see api::serve), more
    // than the 1024 open files containers often start with.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < 4096 => tracing::warn!(limit = n, "few open files allowed: the APIs may refuse connections"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "raising the open-file limit"),
    }
    let kube = match node_name {
        Some(node_name) => Some((crate::kubernetes::client(args.kubeconfig.as_ref()).await?, node_name)),
        None => None,
    };
    let listener = server::bind(socket).await?;
    let (wait_listener, metrics_listener) = match node_api_listeners(&args).await {
        Ok(listeners) => listeners,
        Err(e) => {
            let _ = std::fs::remove_file(socket);
            return Err(e);
        }
    };
    let loaded = Datapath::load(&LoadOptions {
        max_flows: args.max_flows,
        udp_timeout_ns: ns(args.udp_timeout),
        bpffs: args.bpffs.clone(),
        detach_on_exit: args.detach_on_exit,
        attach: args.attach.mode(),
    });
    let (mut datapath, mut events) = match loaded {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(socket);
            return Err(e.into());
        }
    };
    let mode = if args.standalone { "standalone" } else { "kubernetes" };
    log_start(&args, &datapath, socket, mode);
    let intercept = start_intercept(&args, &mut datapath).await.inspect_err(|_| {
        let _ = std::fs::remove_file(socket);
    })?;
    let node = Arc::new(Node::new(
        datapath,
        Settings {
            timeouts: Timeouts { idle_ns: ns(args.idle_timeout), udp_ns: ns(args.udp_timeout) },
            default_deadline: Duration::from_secs_f64(args.deadline),
            default_quiet_period: Duration::from_secs_f64(args.quiet_period),
            pin_limit_ns: ns(args.pin_limit),
            mode,
            conntrack_dump: args.conntrack_dump,
        },
    ));
    // Take back what an earlier agent left (--bpffs), before serving anyone.
    node.restore(state_file(&args, socket)).await;
    let ready = Arc::new(AtomicBool::new(kube.is_none()));
    let node_api = Arc::new(NodeApi {
        node: node.clone(),
        waiters: tokio::sync::Semaphore::new(args.max_waiters),
        per_pod: std::sync::Mutex::default(),
        per_pod_limit: args.max_waiters_per_pod,
        ready: ready.clone(),
        metrics_allow: args.metrics_allow.clone(),
    });

    let events_node = node.clone();
    let events_task = async move {
        loop {
            let batch = events.next_batch().await?;
            events_node.on_events(&batch).await;
        }
        #[expect(unreachable_code, reason = "gives the async block its Result type")]
        Ok::<(), anyhow::Error>(())
    };
    let kube_task = async {
        match kube {
            Some((client, node_name)) => kubernetes(client, node_name, &args, node.clone(), ready.clone()).await,
            None => std::future::pending().await,
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let result = tokio::select! {
        r = server::serve(listener, node.clone()) => r.context("local API"),
        r = prestop::serve(wait_listener, prestop::wait_router(node_api.clone())) => r.context("preStop API"),
        r = serve_intercept(intercept, node_api.clone()) => r.context("preStop intercept"),
        r = prestop::serve(metrics_listener, prestop::metrics_router(node_api.clone())) => r.context("metrics API"),
        r = events_task => r.context("reading datapath events"),
        r = kube_task => r.context("Kubernetes"),
        () = node.run_evaluator() => Ok(()),
        () = node.run_steering() => Ok(()),
        () = node.run_census() => Ok(()),
        _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted, shutting down"); Ok(()) }
        _ = term.recv() => { tracing::info!("terminated, shutting down"); Ok(()) }
    };
    let _ = std::fs::remove_file(socket);
    shut_down(&node, args.bpffs.is_some()).await;
    result
}

/// The start, in one line, and what the kernel leaves out.
fn log_start(args: &Args, datapath: &Datapath, socket: &Path, mode: &str) {
    tracing::info!(
        kernel = %datapath.features.release,
        btf = datapath.features.btf,
        tcx = datapath.features.tcx,
        steering = datapath.features.steering,
        prestop_intercept = datapath.features.prestop_intercept,
        attach = ?datapath.mode,
        max_flows = args.max_flows,
        socket = %socket.display(),
        mode,
        "agent started"
    );
    if let Some(line) = datapath.features.steering_off() {
        tracing::warn!("{line}");
    }
}

/// The node API's listeners: `/v1/wait` on `--host-ip` (else every address),
/// and the metrics on `--metrics-bind-address`.
async fn node_api_listeners(args: &Args) -> anyhow::Result<(TcpListener, TcpListener)> {
    let listen = |addr: std::net::SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for {what}; choose another address or port"))
    };
    let any = std::net::IpAddr::from([0u8; 16]);
    let wait = listen((args.host_ip.unwrap_or(any), args.wait_port).into(), "the preStop API (--wait-port)").await?;
    let metrics_addr = args.metrics_bind_address.with_default_port(args.metrics_port);
    let metrics = listen(metrics_addr, "metrics (--metrics-bind-address, --metrics-port)").await?;
    tracing::info!(%metrics_addr, allow = %args.metrics_allow, "serving /metrics");
    Ok((wait, metrics))
}

/// Serves the intercept's listeners for as long as it is attached (forever
/// when it is off).
async fn serve_intercept(
    intercept: Option<(Vec<prestop::InterceptListener>, Arc<Intercept>)>,
    api: Arc<NodeApi>,
) -> anyhow::Result<()> {
    let Some((listeners, _attached)) = intercept else { return std::future::pending().await };
    let serving = listeners.into_iter().map(|l| prestop::serve(l, prestop::intercept_router(api.clone())));
    futures::future::try_join_all(serving).await.map(drop)
}

/// Starts the preStop intercept unless it is off (`--intercept-port 0`) or
/// the kernel or node cannot have it (then one line, and the agent runs on:
/// the exec hook still works). Its listeners taken, a port in use is an error.
/// Without it, the intercept links an earlier agent pinned are removed.
async fn start_intercept(
    args: &Args,
    datapath: &mut Datapath,
) -> anyhow::Result<Option<(Vec<prestop::InterceptListener>, Arc<Intercept>)>> {
    let started = try_start_intercept(args, datapath).await;
    if matches!(started, Ok(None)) {
        datapath.remove_kept_intercept();
    }
    started
}

async fn try_start_intercept(
    args: &Args,
    datapath: &mut Datapath,
) -> anyhow::Result<Option<(Vec<prestop::InterceptListener>, Arc<Intercept>)>> {
    if args.intercept_port == 0 {
        return Ok(None);
    }
    if let Some(line) = datapath.features.intercept_off() {
        tracing::warn!("{line}");
        return Ok(None);
    }
    let port = args.intercept_listen_port;
    let what = || {
        format!("cannot listen on 127.0.0.1:{port} for the preStop intercept; choose another --intercept-listen-port")
    };
    let v4 = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)).await.with_context(what)?;
    let mut listeners = vec![v4];
    match TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, port)).await {
        Ok(v6) => listeners.push(v6),
        Err(e) => {
            tracing::warn!(error = %e, port, "no ::1 listener for the preStop intercept: IPv6 pod IPs are not intercepted");
        }
    }
    let cgroup = match (&args.intercept_cgroup, intercept::cgroup2_root()) {
        (Some(dir), _) => dir.clone(),
        (None, Some((root, true))) => root,
        (None, Some((dir, false))) => {
            tracing::warn!(
                cgroup = %dir.display(),
                "the only cgroup2 mount is not the node's root cgroup (a cgroup namespace?): only processes \
                 under it are intercepted; mount the node's /sys/fs/cgroup (see deploy/daemonset.yaml) or set \
                 --intercept-cgroup"
            );
            dir
        }
        (None, None) => {
            tracing::warn!("preStop intercept disabled: no cgroup2 mount in /proc/mounts; set --intercept-cgroup");
            return Ok(None);
        }
    };
    let opts = InterceptOptions { pod_port: args.intercept_port, listen_port: port, cgroup };
    match datapath.intercept(&opts) {
        Ok(i) => {
            tracing::info!(
                cgroup = %i.cgroup.display(),
                pod_port = opts.pod_port,
                listen_port = port,
                adopted = i.adopted,
                "preStop intercept attached"
            );
            let i = Arc::new(i);
            let listeners = listeners
                .into_iter()
                .map(|listener| prestop::InterceptListener { listener, intercept: i.clone() })
                .collect();
            Ok(Some((listeners, i)))
        }
        Err(e) => {
            tracing::warn!("preStop intercept disabled: {e}");
            Ok(None)
        }
    }
}

/// The node name, in Kubernetes mode (`None`: standalone).
fn node_name(args: &Args) -> anyhow::Result<Option<String>> {
    if args.standalone {
        return Ok(None);
    }
    args.node_name.clone().map(Some).context(
        "Kubernetes mode needs the node name: pass --node-name or set NODE_NAME (from the downward API), or run with --standalone",
    )
}

/// What the agent needs of the node (privileges, kernel, bpffs, attach mode,
/// network namespace): one line per missing piece, all of them.
fn check_node(args: &Args) -> Result<(), crate::error::Error> {
    Features::detect().check(&Wanted {
        bpffs: args.bpffs.as_deref(),
        attach: args.attach.mode(),
        host_ip: args.host_ip,
        kubernetes: !args.standalone,
    })
}

/// Kubernetes mode: the pod and endpoint watches, and once the first pod
/// sync is done, forgetting the restored pods it did not declare again.
async fn kubernetes(
    client: kube::Client,
    node_name: String,
    args: &Args,
    node: Arc<Node>,
    ready: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let settings = crate::kubernetes::Settings {
        node_name,
        deadline_margin: Duration::from_secs_f64(args.deadline_margin),
        min_write_interval: Duration::from_secs_f64(args.min_write_interval),
        remote_pin_limit: Duration::from_secs_f64(args.remote_pin_limit),
    };
    let forget = async {
        forget_undeclared(&node, &ready).await;
        std::future::pending::<()>().await;
    };
    // `forget` never ends, so this is the watches' result.
    tokio::select! {
        r = crate::kubernetes::run(client, node.clone(), settings, ready.clone()) => r,
        () = forget => Ok(()),
    }
}

/// Kubernetes mode: once the first pod sync declared every pod of the node,
/// the pods restored from the saved state that it did not declare again were
/// deleted while no agent ran.
async fn forget_undeclared(node: &Node, synced: &AtomicBool) {
    while !synced.load(std::sync::atomic::Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.forget_undeclared().await;
}

async fn shut_down(node: &Node, pinned: bool) {
    if node.keeps_attached_on_exit().await {
        // --bpffs: an exit is a restart or an upgrade. The programs run on
        // with the pinned maps and links, the state is saved; the next agent
        // takes them over. (--detach-on-exit to clean up instead.)
        tracing::info!("leaving the programs attached and the state saved for the next agent");
    } else if pinned {
        node.detach_all().await;
    } else {
        // Unregister every pod so the programs are detached before we go.
        for name in node.names().await {
            let _ = node.remove_pod(&name).await;
        }
    }
}
