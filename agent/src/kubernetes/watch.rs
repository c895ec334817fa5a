//! Watches this node's Pods (kube-rs watcher + reflector, with a shorter
//! backoff than its default) and reconciles the node model with them after
//! every change: register pod IPs, start draining on deletionTimestamp, forget removed pods.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Pod, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, reflector, watcher},
};

use super::{Settings, annotations, report::Reporter};
use crate::node::{Node, PodSpec, TerminateSpec};

/// When this agent started: a pod whose containers started before it may
/// have connections its sockets tracepoint never saw.
static AGENT_START: std::sync::LazyLock<k8s_openapi::jiff::Timestamp> = std::sync::LazyLock::new(jiff_now);

/// The ports the kubelet probes (readiness, liveness, startup; HTTP, TCP
/// and gRPC), with named ports resolved through the containers' ports.
fn probe_ports(pod: &Pod) -> Vec<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    let named = |name: &str| {
        spec.containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok())
    };
    let port = |p: &IntOrString| match p {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(s) => s.parse().ok().or_else(|| named(s)),
    };
    let mut out: Vec<u16> = spec
        .containers
        .iter()
        .flat_map(|c| [&c.readiness_probe, &c.liveness_probe, &c.startup_probe])
        .flatten()
        .filter_map(|p| {
            p.http_get
                .as_ref()
                .and_then(|h| port(&h.port))
                .or_else(|| p.tcp_socket.as_ref().and_then(|t| port(&t.port)))
                .or_else(|| p.grpc.as_ref().and_then(|g| u16::try_from(g.port).ok()))
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether the pod's containers (or the pod, without container statuses)
/// started before this agent: taken as new when the API does not say.
fn started_before_agent(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    let started = status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.running.as_ref()?.started_at.as_ref())
        .map(|t| t.0)
        .min()
        .or_else(|| status.and_then(|s| s.start_time.as_ref()).map(|t| t.0));
    started.is_some_and(|t| t < *AGENT_START)
}

/// kube-rs' default backoff (client-go's: up to 30 s) lets the agent sleep
/// through half a minute of pod deletions after an API server outage, and a
/// deletion it has not seen is a drain it does not run. A failed attempt
/// costs the API server little, the backoff resets only once a list
/// succeeds, and jitter spreads the nodes' retries out.
fn watch_backoff() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

/// What the node should know about one pod.
#[derive(Debug, PartialEq)]
enum Desired {
    Track {
        ips: Vec<IpAddr>,
        deadline_in: Option<Duration>,
        spec: PodSpec,
    },
    /// Known, not tracked; `ips` are its own (empty for a hostNetwork pod).
    Skip {
        reason: &'static str,
        ips: Vec<IpAddr>,
    },
    Ignore,
}

/// Why an opted-out pod is skipped.
const OPTED_OUT: &str = "opted out by its annotation conndrain.io/skip: \"true\"";

/// `default_quiet`: the agent's `--quiet-period`, for the messages about
/// a refused `conndrain.io/quiet-period`.
fn desired(pod: &Pod, margin: Duration, default_quiet: Duration) -> Desired {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        let reason = "hostNetwork pod: it shares the node's IPs, so its flows cannot be told apart";
        return Desired::Skip { reason, ips: Vec::new() };
    }
    if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
        return Desired::Ignore;
    }
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|v| v.iter().filter_map(|p| p.ip.parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = status.and_then(|s| s.pod_ip.as_ref()).and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    if ips.is_empty() {
        return Desired::Ignore;
    }
    let annotated = annotations::read(pod, default_quiet);
    if annotated.skip {
        return Desired::Skip { reason: OPTED_OUT, ips };
    }
    let deadline_in = pod.metadata.deletion_timestamp.as_ref().map(|ts| {
        // deletionTimestamp is when the kubelet kills the pod (deletion time + grace period).
        let kill_in = Duration::try_from(ts.0.duration_since(jiff_now())).ok();
        kill_in.and_then(|d| d.checked_sub(margin)).unwrap_or(Duration::from_millis(100))
    });
    Desired::Track {
        ips,
        deadline_in,
        spec: PodSpec {
            probe_ports: probe_ports(pod),
            preexisting: started_before_agent(pod),
            settings: annotated.settings,
        },
    }
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

pub async fn run(
    client: Client,
    node: Arc<Node>,
    settings: Settings,
    reporter: Reporter,
    synced: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    std::sync::LazyLock::force(&AGENT_START);
    let pods: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node_name));
    let (store, writer) = reflector::store();
    let mut stream = watcher(pods, config).backoff(watch_backoff()).reflect(writer).boxed();
    let mut seen = Reconciled::default();
    // Registration can fail for a moment (the CNI has not set up the route yet): retry on a timer too.
    let mut resync = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(watcher::Event::InitDone)) => {
                    reconcile(&store.state(), &node, &settings, &reporter, &mut seen).await;
                    if !synced.swap(true, std::sync::atomic::Ordering::SeqCst) {
                        tracing::info!(node = %settings.node_name, pods = store.state().len(), "first pod sync done");
                    }
                }
                Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
                Some(Ok(_)) => reconcile(&store.state(), &node, &settings, &reporter, &mut seen).await,
                Some(Err(e)) => tracing::warn!(error = %e, "pod watch (retrying with backoff)"),
                None => anyhow::bail!("pod watch ended"),
            },
            _ = resync.tick() => {
                if synced.load(std::sync::atomic::Ordering::SeqCst) {
                    reconcile(&store.state(), &node, &settings, &reporter, &mut seen).await;
                }
            }
        }
    }
}

/// Watches `EndpointSlices` cluster-wide for endpoints that are terminating.
/// Those on other nodes are pinned here too, because this node's kube-proxy
/// translated flows to them (`ClusterIP` from local clients, `NodePort` traffic it
/// forwarded); when their endpoint disappears, their pod is gone.
pub async fn endpoints(client: Client, node: Arc<Node>, settings: Settings) -> anyhow::Result<()> {
    let api: Api<EndpointSlice> = Api::all(client);
    let (store, writer) = reflector::store();
    let mut stream = watcher(api, watcher::Config::default()).backoff(watch_backoff()).reflect(writer).boxed();
    let mut terminating: BTreeSet<IpAddr> = BTreeSet::new();
    loop {
        match stream.next().await {
            Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => continue,
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::warn!(error = %e, "endpointslice watch (retrying with backoff)");
                continue;
            }
            None => anyhow::bail!("endpointslice watch ended"),
        }
        let mut now_terminating = BTreeSet::new();
        let mut present = BTreeSet::new();
        for slice in store.state() {
            for ep in slice.endpoints.iter().flatten() {
                let remote = ep.node_name.as_deref().is_some_and(|n| n != settings.node_name);
                let ips = ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok());
                for ip in ips {
                    present.insert(ip);
                    let term = ep.conditions.as_ref().and_then(|c| c.terminating).unwrap_or(false);
                    if remote && term {
                        now_terminating.insert(ip);
                    }
                }
            }
        }
        for ip in now_terminating.difference(&terminating) {
            tracing::info!(%ip, "remote endpoint terminating: pinning its flows");
            node.pin_remote(*ip, settings.remote_pin_limit).await;
        }
        // Gone: no slice lists it any more (the EndpointSlice controller
        // removes a pod's endpoint once the pod object is deleted, after
        // its containers stopped), or it is listed again but no longer
        // terminating: a terminating pod never turns back, so that is a new
        // pod with the same IP. Its pins stay until then, past its deadline
        // (`--pin-limit` at most): see `Steering::sweep`.
        for ip in terminating.difference(&now_terminating) {
            let why = if present.contains(ip) { "its IP is listed again, not terminating" } else { "no longer listed" };
            tracing::info!(%ip, why, "remote endpoint gone");
            node.remote_gone(*ip).await;
        }
        terminating = now_terminating;
    }
}

/// What `reconcile` remembers from one run to the next.
#[derive(Default)]
struct Reconciled {
    /// Pods registered with the node.
    known: BTreeSet<String>,
    /// Pods known but not tracked, with the reason.
    skipped: BTreeMap<String, &'static str>,
    /// Refused annotation values already reported with an event, per pod.
    warned: BTreeMap<String, BTreeSet<String>>,
}

async fn reconcile(
    pods: &[Arc<Pod>],
    node: &Arc<Node>,
    settings: &Settings,
    reporter: &Reporter,
    seen: &mut Reconciled,
) {
    let Reconciled { known, skipped, warned } = seen;
    let default_quiet = node.settings.default_quiet_period;
    let pods: Vec<(String, &Arc<Pod>, Desired)> = pods
        .iter()
        .map(|pod| {
            (
                format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()),
                pod,
                desired(pod, settings.deadline_margin, default_quiet),
            )
        })
        .collect();
    warned.retain(|name, _| pods.iter().any(|(n, _, _)| n == name));
    // Forget the pods that are gone first: after a relist, a new pod may
    // have the IP of one deleted meanwhile, and registering it needs that IP free.
    let tracked: BTreeSet<&String> =
        pods.iter().filter(|(_, _, d)| matches!(d, Desired::Track { .. })).map(|(name, _, _)| name).collect();
    for gone in known.iter().filter(|k| !tracked.contains(k)).cloned().collect::<Vec<_>>() {
        known.remove(&gone);
        if let Err(e) = node.remove_pod(&gone).await {
            tracing::debug!(pod = %gone, error = %e, "removing pod");
        }
    }
    let mut seen_skipped = BTreeSet::new();
    for (name, pod, desired) in pods {
        match desired {
            Desired::Ignore => {}
            Desired::Skip { reason, ips } => {
                seen_skipped.insert(name.clone());
                if skipped.insert(name.clone(), reason).is_none() {
                    tracing::info!(pod = %name, reason, "skipping pod");
                    node.set_skipped(&name, Some(reason), &ips).await;
                }
            }
            Desired::Track { ips, deadline_in, mut spec } => {
                let told = warned.entry(name.clone()).or_default();
                for problem in &spec.settings.problems {
                    if told.insert(problem.clone()) {
                        tracing::warn!(pod = %name, problem, "refused annotation value");
                        reporter.bad_annotation(pod, problem.clone());
                    }
                }
                if known.contains(&name) {
                    if let Err(e) = node.set_settings(&name, &spec.settings).await {
                        tracing::warn!(pod = %name, error = %e, "applying the pod's settings");
                    }
                } else {
                    // A pod that was skipped until now (opted out) has run
                    // untracked: its connections so far are unknown.
                    spec.preexisting |= skipped.contains_key(&name);
                    match node.add_pod(&name, &ips, &spec).await {
                        Ok(()) => {
                            known.insert(name.clone());
                        }
                        Err(e) => {
                            tracing::warn!(pod = %name, error = %e, "cannot track pod yet");
                            continue;
                        }
                    }
                }
                if let Some(d) = deadline_in
                    && !node.is_terminating(&name).await
                {
                    let spec = TerminateSpec { deadline: Some(d.max(Duration::from_millis(100))), quiet_period: None };
                    match node.terminate(&name, &spec).await {
                        Ok(()) => reporter.start(pod.clone(), name.clone()),
                        Err(e) => tracing::warn!(pod = %name, error = %e, "starting drain"),
                    }
                }
            }
        }
    }
    for gone in skipped.keys().filter(|k| !seen_skipped.contains(*k)).cloned().collect::<Vec<_>>() {
        skipped.remove(&gone);
        node.set_skipped(&gone, None, &[]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("valid pod")
    }

    #[test]
    fn host_network_pods_are_skipped() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "a", "namespace": "n"},
            "spec": {"hostNetwork": true, "containers": []},
            "status": {"podIP": "10.0.0.1"}
        }));
        assert!(matches!(desired(&p, Duration::ZERO, Duration::from_secs(3)), Desired::Skip { .. }));
    }

    #[test]
    fn dual_stack_ips_and_deadline() {
        let kill = k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(30);
        let p = pod(serde_json::json!({
            "metadata": {"name": "a", "namespace": "n", "deletionTimestamp": kill.to_string()},
            "spec": {"containers": []},
            "status": {"podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}], "phase": "Running"}
        }));
        let Desired::Track { ips, deadline_in, .. } = desired(&p, Duration::from_secs(5), Duration::from_secs(3))
        else {
            panic!("expected Track");
        };
        assert_eq!(ips.len(), 2);
        let d = deadline_in.expect("deadline").as_secs_f64();
        assert!((23.0..=25.5).contains(&d), "deadline {d}");
    }

    #[test]
    fn probe_ports_come_from_every_probe_and_named_ports() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "a", "namespace": "n"},
            "spec": {"containers": [
                {"name": "app", "ports": [{"name": "http", "containerPort": 8080}],
                 "readinessProbe": {"httpGet": {"port": "http"}},
                 "livenessProbe": {"tcpSocket": {"port": 9000}}},
                {"name": "side", "startupProbe": {"grpc": {"port": 50051}}}
            ]},
            "status": {"podIP": "10.0.0.1", "startTime": "2020-01-01T00:00:00Z"}
        }));
        let Desired::Track { spec, .. } = desired(&p, Duration::ZERO, Duration::from_secs(3)) else {
            panic!("expected Track")
        };
        assert_eq!(spec.probe_ports, vec![8080, 9000, 50051]);
        assert!(spec.preexisting, "started long before this agent");
    }

    #[test]
    fn annotations_opt_out_or_set_the_drain() {
        let with = |annotations: serde_json::Value| {
            pod(serde_json::json!({
                "metadata": {"name": "a", "namespace": "n", "annotations": annotations},
                "spec": {"containers": [{"name": "app", "ports": [{"name": "metrics", "containerPort": 9100}]}]},
                "status": {"podIP": "10.0.0.1"}
            }))
        };
        let d = |p: &Pod| desired(p, Duration::ZERO, Duration::from_secs(3));
        let Desired::Skip { reason, ips } = d(&with(serde_json::json!({"conndrain.io/skip": "true"}))) else {
            panic!("expected Skip")
        };
        assert!(reason.contains("conndrain.io/skip"), "{reason}");
        assert_eq!(ips, vec!["10.0.0.1".parse::<IpAddr>().expect("ip")], "its own IP, for its preStop wait");
        let p = with(serde_json::json!({"conndrain.io/quiet-period": "5s", "conndrain.io/ignore-ports": "metrics"}));
        let Desired::Track { spec, .. } = d(&p) else { panic!("expected Track") };
        assert_eq!(spec.settings.quiet_period, Some(Duration::from_secs(5)));
        assert_eq!(spec.settings.ignore_ports, vec![9100]);
    }

    #[test]
    fn pods_without_ip_or_finished_are_ignored() {
        let p = pod(serde_json::json!({"metadata": {"name": "a"}, "spec": {"containers": []}, "status": {}}));
        assert_eq!(desired(&p, Duration::ZERO, Duration::from_secs(3)), Desired::Ignore);
        let p = pod(serde_json::json!({
            "metadata": {"name": "a"}, "spec": {"containers": []},
            "status": {"podIP": "10.0.0.1", "phase": "Succeeded"}
        }));
        assert_eq!(desired(&p, Duration::ZERO, Duration::from_secs(3)), Desired::Ignore);
    }
}
