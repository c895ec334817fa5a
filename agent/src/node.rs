//! Pod lifecycle on this node: the registered pods, their flows as the
//! datapath reports them, and the evaluator that moves terminating pods to
//! drained or deadline as events arrive.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use conndrain_common::{
    FlowEvent, FlowKey, FlowValue, LAYOUT_VERSION, PROTO_TCP, PROTO_UDP, direction, event_kind, maps, stats, tcp_state,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify, watch};

use crate::{
    datapath::{self, Datapath},
    drain::{self, Counting, FlowClass, Observation, PodState, Termination, Timeouts},
    flowindex::{FlowIndex, SocketEvidence, SocketHold},
    metrics::{Metrics, OutcomeLabels, PodLabels, advance},
    views::{
        FlowView, InterfaceView, MapFill, MapsView, PinView, PodView, SettingsView, SocketView, SocketsWhy, StatsView,
        Status, SteeringView, WaitOutcome, Why,
    },
};

/// How to drain a terminating pod; none: the pod's own setting, else the agent's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TerminateSpec {
    pub deadline: Option<Duration>,
    pub quiet_period: Option<Duration>,
}

/// Errors a caller of the node can fix; the API maps them to 4xx.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("no pod named {0:?}; list pods with `conndrain pods`")]
    Unknown(String),
    #[error("pod {0:?} already exists")]
    Exists(String),
    #[error("IP {ip} already belongs to pod {pod:?}")]
    IpTaken { ip: IpAddr, pod: String },
    #[error("pod {0:?} needs at least one IP (--ip)")]
    NoIps(String),
    #[error("invalid pod name {0:?}: use 1-253 characters of a-z, 0-9, '-', '.' and '/'")]
    BadName(String),
    #[error("pod {0:?} is already terminating")]
    AlreadyTerminating(String),
    #[error("invalid {what} {value}: must be a positive number of seconds")]
    BadDuration { what: &'static str, value: f64 },
    #[error("invalid port {0}: use 1-65535")]
    BadPort(u16),
    #[error("no room for more pods (limit {0})")]
    Full(u32),
    #[error("pod {0:?} was removed while waiting")]
    Removed(String),
    #[error(transparent)]
    Datapath(#[from] crate::error::Error),
}

pub struct Settings {
    pub timeouts: Timeouts,
    pub default_deadline: Duration,
    pub default_quiet_period: Duration,
    /// How long a live pinned flow stays pinned after its pod's deadline
    /// while the pod is not seen gone (`--pin-limit`).
    pub pin_limit_ns: u64,
    pub mode: &'static str,
    /// How steering reads conntrack (one filtered dump per terminating backend by default).
    pub conntrack_dump: crate::conntrack::DumpMode,
}

struct Pod {
    slot: u32,
    ips: Vec<IpAddr>,
    ifindexes: Vec<u32>,
    termination: Option<Termination>,
    state: watch::Sender<PodState>,
    /// No verdict before this time (`CLOCK_MONOTONIC` ns): a drain restored
    /// with a new, empty flow table waits one quiet period, for its live
    /// flows to be picked up again at their next packet.
    hold_until_ns: u64,
    /// When it was registered (`CLOCK_MONOTONIC` ns); 0: it was already
    /// running when this agent first saw it (its early sockets are unknown).
    registered_ns: u64,
    /// The kubelet's probe ports.
    probes: Vec<u16>,
    /// Its own drain settings (quiet period, ignored ports).
    settings: PodSettings,
    /// Why no attached interface sees its traffic, if none does: the pod
    /// is then `skipped` and its preStop wait falls back to sleeping.
    unseen: Option<String>,
}

impl Pod {
    /// Why its sockets cannot confirm a drain, if they cannot: they are
    /// known only if the sockets tracepoint has watched its IPs since
    /// before its first connection.
    fn sockets_unknown(&self, sockets_since_ns: u64) -> Option<String> {
        if self.registered_ns == 0 {
            Some("it was already running when conndrain first saw it: connections opened before are not known".into())
        } else if self.registered_ns < sockets_since_ns {
            Some("the sockets tracepoint was not attached all along since it was registered (agent restarted without its pinned link)".into())
        } else {
            None
        }
    }
}

/// How a pod is declared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodSpec {
    /// Ports the kubelet probes: new connections from the node's own
    /// processes to them do not restart the quiet period.
    pub probe_ports: Vec<u16>,
    /// Already running before this agent could watch it (Kubernetes mode,
    /// first sync): its sockets cannot confirm a drain.
    pub preexisting: bool,
    pub settings: PodSettings,
}

/// A pod's own drain settings: Kubernetes mode reads them from its
/// `conndrain.io/` annotations (`kubernetes/annotations.rs`), standalone
/// mode from `pod add` flags. A value that was refused is left at its
/// default here and named in `problems`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PodSettings {
    /// How long with no new inbound flow before it may count as drained;
    /// `None`: the agent's `--quiet-period`.
    pub quiet_period: Option<Duration>,
    /// Where `quiet_period` was set, for `why` ("annotation conndrain.io/quiet-period").
    pub quiet_period_from: String,
    /// Its own listening ports whose inbound connections never hold it
    /// (neither counted as active nor restarting the quiet period).
    pub ignore_ports: Vec<u16>,
    /// Settings refused for a bad value, each saying what is used instead.
    pub problems: Vec<String>,
}

struct Inner {
    datapath: Datapath,
    pods: BTreeMap<String, Pod>,
    by_slot: HashMap<u32, String>,
    /// Live flows per pod slot: built from events, so the drain path never
    /// scans the table (see `flowindex.rs`).
    index: FlowIndex,
    events_received: u64,
    /// Pods we know of but do not track.
    skipped: BTreeMap<String, SkippedPod>,
    steering: crate::steering::Steering,
    metrics: std::sync::Arc<Metrics>,
    /// Where the state is saved (`--bpffs` only), and whether it changed since.
    persist: Option<Persist>,
    /// Pods taken back from the saved state that nobody declared again yet:
    /// declaring one again with the same IPs adopts it (Kubernetes mode
    /// declares every pod it finds after a restart).
    restored: BTreeSet<String>,
    /// Likewise for their terminations: `is_terminating` says no until the
    /// termination is declared again, which adopts the saved drain (so
    /// Kubernetes mode follows it again and reports its outcome).
    restored_drains: BTreeSet<String>,
}

/// A pod known but not tracked: why, and its IPs if they are its own (an
/// opted-out pod's preStop wait is answered `skipped` at once; a
/// hostNetwork pod has the node's IPs, which name no pod).
struct SkippedPod {
    reason: String,
    ips: Vec<IpAddr>,
}

struct Persist {
    path: PathBuf,
    boot_id: String,
    /// Something changed since the last write (besides steering, which counts its own changes).
    dirty: bool,
    /// `Steering::changes` at the last write.
    steering_changes: u64,
}

/// Version of the format of `Saved`; bump it when a change would misread
/// an older file (new optional fields need no bump).
const STATE_VERSION: u32 = 1;

/// The agent's own state, saved as JSON on every change when the maps are
/// pinned, and taken back at start: what the pinned maps do not hold.
#[derive(Serialize, Deserialize)]
struct Saved {
    /// `STATE_VERSION`.
    version: u32,
    /// `LAYOUT_VERSION` of the maps this state went with. The state does not
    /// depend on it: after a layout change the maps are new, and the pods,
    /// drains and pins are written into them again from this state.
    layout: u32,
    /// `/proc/sys/kernel/random/boot_id`: the times below are
    /// `CLOCK_MONOTONIC`, which survives a restart of the agent but not of the node.
    boot_id: String,
    pods: Vec<SavedPod>,
    /// Attached to every interface (steering).
    everywhere: bool,
    steering: crate::steering::SavedSteering,
}

#[derive(Serialize, Deserialize)]
struct SavedPod {
    name: String,
    slot: u32,
    ips: Vec<IpAddr>,
    #[serde(default)]
    registered_ns: u64,
    #[serde(default)]
    probes: Vec<u16>,
    #[serde(default)]
    settings: PodSettings,
    termination: Option<SavedTermination>,
}

#[derive(Serialize, Deserialize)]
struct SavedTermination {
    started_ns: u64,
    deadline_ns: u64,
    quiet_period_ns: u64,
    new_inbound_at_start: u64,
    outcome: Option<(PodState, u64)>,
}

/// The saved state at `path`, if there is one this agent can take back.
fn read_saved(path: &std::path::Path, boot_id: &str) -> Option<Saved> {
    match std::fs::read_to_string(path) {
        Ok(text) => match serde_json::from_str::<Saved>(&text) {
            Ok(s) if s.version != STATE_VERSION => {
                tracing::warn!(
                    path = %path.display(),
                    "ignoring a saved state of format v{}: this agent reads v{STATE_VERSION}",
                    s.version
                );
                None
            }
            Ok(s) if s.boot_id != *boot_id => {
                tracing::info!(path = %path.display(), "ignoring the state saved before the node rebooted");
                None
            }
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable saved state");
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the saved state");
            None
        }
    }
}

/// Writes a file only root can read, like the socket next to it.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map_or_else(|_| String::new(), |s| s.trim().to_owned())
}

pub struct Node {
    inner: Mutex<Inner>,
    wake: Notify,
    /// Wakes the steering loop (a new flow reached a terminating pod).
    steer_wake: Notify,
    pub settings: Settings,
    pub metrics: std::sync::Arc<Metrics>,
}

pub use crate::clock::now_ns;

#[expect(clippy::cast_precision_loss, reason = "seconds for display")]
fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// A duration given in seconds by a caller: positive and finite, or refused.
pub fn positive_secs(what: &'static str, secs: Option<f64>) -> Result<Option<Duration>, PodError> {
    match secs {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Some(Duration::from_secs_f64(s))),
        Some(value) => Err(PodError::BadDuration { what, value }),
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-./".contains(&b))
}

impl Node {
    #[must_use]
    pub fn new(datapath: Datapath, settings: Settings) -> Self {
        let metrics = std::sync::Arc::new(Metrics::default());
        metrics.flow_table_max.set(i64::from(datapath.max_flows));
        Self {
            inner: Mutex::new(Inner {
                datapath,
                pods: BTreeMap::new(),
                by_slot: HashMap::new(),
                index: FlowIndex::default(),
                events_received: 0,
                skipped: BTreeMap::new(),
                steering: crate::steering::Steering::default(),
                metrics: metrics.clone(),
                persist: None,
                restored: BTreeSet::new(),
                restored_drains: BTreeSet::new(),
            }),
            wake: Notify::new(),
            steer_wake: Notify::new(),
            settings,
            metrics,
        }
    }

    /// Records a pod that is known but not tracked, shown by `conndrain pods`.
    /// `ips`: its own IPs, so its preStop wait is answered `skipped` (none
    /// for a hostNetwork pod, whose IPs are the node's).
    pub async fn set_skipped(&self, name: &str, reason: Option<&str>, ips: &[IpAddr]) {
        let mut inner = self.inner.lock().await;
        match reason {
            Some(r) => inner.skipped.insert(name.to_owned(), SkippedPod { reason: r.to_owned(), ips: ips.to_vec() }),
            None => inner.skipped.remove(name),
        };
    }

    /// Applies a tracked pod's settings anew if they changed (Kubernetes
    /// mode: its annotations were edited). A drain under way keeps its quiet
    /// period; the ignored ports apply at once.
    pub async fn set_settings(&self, name: &str, settings: &PodSettings) -> Result<(), PodError> {
        let mut inner = self.inner.lock().await;
        let pod = inner.pods.get(name).ok_or_else(|| PodError::Unknown(name.to_owned()))?;
        if pod.settings == *settings {
            return Ok(());
        }
        let (slot, probes) = (pod.slot, pod.probes.clone());
        inner.datapath.set_ports(slot, &probes, &settings.ignore_ports)?;
        if let Some(pod) = inner.pods.get_mut(name) {
            pod.settings = settings.clone();
        }
        tracing::info!(pod = name, ?settings, "pod settings changed");
        inner.touch();
        inner.save();
        drop(inner);
        self.wake.notify_one();
        Ok(())
    }

    /// The registered pod that owns `ip`, if any: how the node API knows its caller.
    pub async fn pod_for_ip(&self, ip: IpAddr) -> Option<String> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 @ IpAddr::V4(_) => v4,
        };
        let inner = self.inner.lock().await;
        let tracked = inner.pods.iter().find(|(_, p)| p.ips.contains(&ip)).map(|(n, _)| n);
        tracked.or_else(|| inner.skipped.iter().find(|(_, p)| p.ips.contains(&ip)).map(|(n, _)| n)).cloned()
    }

    pub async fn names(&self) -> Vec<String> {
        self.inner.lock().await.pods.keys().cloned().collect()
    }

    /// Whether the pod's termination was declared (a drain restored from the
    /// saved state counts once declared again: see `Inner::restored_drains`).
    pub async fn is_terminating(&self, name: &str) -> bool {
        let inner = self.inner.lock().await;
        !inner.restored_drains.contains(name) && inner.pods.get(name).is_some_and(|p| p.termination.is_some())
    }

    /// Follows a pod's state; `None` if there is no such pod.
    pub async fn subscribe(&self, name: &str) -> Option<watch::Receiver<PodState>> {
        self.inner.lock().await.pods.get(name).map(|p| p.state.subscribe())
    }

    /// The metrics page: the gauges refreshed from the current state, and the
    /// datapath's counters read, under one lock so that two scrapes at once
    /// (a pair of Prometheus replicas) each see every pod.
    pub async fn scrape(&self) -> String {
        let m = &self.metrics;
        let _one_at_a_time = m.scraping.lock().await;
        let pods = self.pods().await;
        for f in [&m.active_flows, &m.idle_flows, &m.outbound_flows, &m.new_flows_after_termination] {
            f.clear();
        }
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for p in pods.iter().filter(|p| p.state != PodState::Skipped) {
            let l = PodLabels::of(&p.name);
            m.active_flows.get_or_create(&l).set(g(p.active_flows));
            m.idle_flows.get_or_create(&l).set(g(p.idle_flows));
            m.outbound_flows.get_or_create(&l).set(g(p.outbound_flows));
            m.new_flows_after_termination.get_or_create(&l).set(g(p.new_flows_since_termination));
        }
        if let Ok(s) = self.status().await {
            m.flow_table_used.set(g(s.maps.flows.used));
            m.held_flows.set(g(s.maps.held.used));
            m.pinned_flows.set(g(s.steering.pinned_flows));
            advance(&m.hold_failed, s.stats.hold_failed);
            advance(&m.events_lost, s.events_lost);
            advance(&m.steered_packets, s.steering.steered_packets);
            advance(&m.resets_sent, s.steering.resets_sent);
        }
        m.encode()
    }

    pub async fn add_pod(&self, name: &str, ips: &[IpAddr], spec: &PodSpec) -> Result<(), PodError> {
        if !valid_name(name) {
            return Err(PodError::BadName(name.to_owned()));
        }
        if ips.is_empty() {
            return Err(PodError::NoIps(name.to_owned()));
        }
        let mut inner = self.inner.lock().await;
        if inner.restored.remove(name)
            && let Some(pod) = inner.pods.get(name)
        {
            let (had, has): (BTreeSet<&IpAddr>, BTreeSet<&IpAddr>) = (pod.ips.iter().collect(), ips.iter().collect());
            if had == has {
                tracing::info!(pod = name, "pod declared again after a restart: keeping its saved state");
                drop(inner);
                return self.set_settings(name, &spec.settings).await;
            }
            tracing::info!(pod = name, "a new pod under the name of a restored one: the restored one is removed");
            inner.remove(name)?;
        }
        if inner.pods.contains_key(name) {
            return Err(PodError::Exists(name.to_owned()));
        }
        for ip in ips {
            if let Some((other, _)) = inner.pods.iter().find(|(_, p)| p.ips.contains(ip)) {
                return Err(PodError::IpTaken { ip: *ip, pod: other.clone() });
            }
        }
        let slot = (0..datapath::MAX_POD_SLOTS)
            .find(|s| !inner.by_slot.contains_key(s))
            .ok_or(PodError::Full(datapath::MAX_POD_SLOTS))?;
        let mut ips = ips.to_vec();
        ips.dedup();
        let registered =
            inner.datapath.register_pod(slot, &ips, &spec.probe_ports, &spec.settings.ignore_ports).await?;
        tracing::info!(pod = name, ?ips, slot, probes = ?spec.probe_ports, settings = ?spec.settings, "pod added");
        if let Some(why) = &registered.unseen {
            tracing::warn!(pod = name, reason = %why, "pod skipped: conndrain cannot see its traffic");
        }
        inner.by_slot.insert(slot, name.to_owned());
        inner.index.add_slot(slot);
        let (state, _) =
            watch::channel(if registered.unseen.is_some() { PodState::Skipped } else { PodState::Serving });
        inner.pods.insert(
            name.to_owned(),
            Pod {
                slot,
                ips,
                ifindexes: registered.ifindexes,
                termination: None,
                state,
                hold_until_ns: 0,
                registered_ns: if spec.preexisting { 0 } else { now_ns() },
                probes: spec.probe_ports.clone(),
                settings: spec.settings.clone(),
                unseen: registered.unseen,
            },
        );
        inner.touch();
        inner.save();
        Ok(())
    }

    /// Starts a pod's drain. Its quiet period is the spec's, else the
    /// pod's own setting, else the agent's default.
    pub async fn terminate(&self, name: &str, spec: &TerminateSpec) -> Result<(), PodError> {
        let deadline = nanos(spec.deadline.unwrap_or(self.settings.default_deadline));
        let asked = spec.quiet_period;
        let mut inner = self.inner.lock().await;
        let (slot, own) = inner
            .pods
            .get(name)
            .map(|p| (p.slot, p.settings.quiet_period))
            .ok_or_else(|| PodError::Unknown(name.to_owned()))?;
        let quiet = nanos(asked.or(own).unwrap_or(self.settings.default_quiet_period));
        if inner.restored_drains.remove(name) {
            tracing::info!(pod = name, "termination declared again after a restart: the saved drain goes on");
            return Ok(());
        }
        let counters = inner.datapath.counters(slot)?;
        let pod = inner.pods.get_mut(name).ok_or_else(|| PodError::Unknown(name.to_owned()))?;
        if pod.termination.is_some() {
            return Err(PodError::AlreadyTerminating(name.to_owned()));
        }
        let now = now_ns();
        pod.termination = Some(Termination {
            started_ns: now,
            deadline_ns: now.saturating_add(deadline),
            quiet_period_ns: quiet,
            new_inbound_at_start: counters.new_inbound_total,
            outcome: None,
        });
        if pod.unseen.is_none() {
            pod.state.send_replace(PodState::Draining);
        }
        let ips = pod.ips.clone();
        inner.hold(name, slot);
        if inner.datapath.features.steering {
            inner.steering.add_backend(name, &ips, now.saturating_add(deadline), now);
        }
        tracing::info!(pod = name, deadline_s = secs(deadline), quiet_s = secs(quiet), "drain started");
        inner.touch();
        inner.save();
        drop(inner);
        self.wake.notify_one();
        // Pin its established flows before we answer, so a caller may cut the
        // rules right after.
        self.refresh_pins(false).await;
        Ok(())
    }

    /// A backend on another node is terminating (Kubernetes mode: its
    /// EndpointSlice endpoint says so): pin the flows this node translated to it.
    pub async fn pin_remote(&self, ip: IpAddr, limit: Duration) {
        {
            let mut inner = self.inner.lock().await;
            if !inner.datapath.features.steering {
                return;
            }
            let now = now_ns();
            let deadline = now.saturating_add(u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX));
            inner.steering.add_backend(&format!("remote {ip}"), &[ip], deadline, now);
            inner.save();
        }
        self.refresh_pins(false).await;
    }

    /// A remote backend's endpoint is gone (its pod was deleted): its pinned
    /// TCP flows get a RST on their next segment.
    pub async fn remote_gone(&self, ip: IpAddr) {
        let mut inner = self.inner.lock().await;
        let Inner { steering, datapath, .. } = &mut *inner;
        steering.mark_dead(datapath, &[ip], now_ns());
        inner.save();
    }

    /// Learns the translations of terminating backends' flows from conntrack
    /// and pins the new ones: of the backends that started terminating
    /// lately, or with `all` (and with `--conntrack-dump full`), of every one.
    pub async fn refresh_pins(&self, all: bool) {
        let all = all || self.settings.conntrack_dump == crate::conntrack::DumpMode::Full;
        let backends = self.inner.lock().await.steering.backends_to_learn(now_ns(), all);
        if backends.is_empty() {
            return;
        }
        let mode = self.settings.conntrack_dump;
        let dump = move || crate::conntrack::dump_translations(&backends, mode);
        let translations = match tokio::task::spawn_blocking(dump).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading conntrack");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading conntrack");
                return;
            }
        };
        let mut inner = self.inner.lock().await;
        let Inner { steering, datapath, .. } = &mut *inner;
        let node_addrs = crate::datapath::local_addrs();
        steering.apply(datapath, &translations, &node_addrs, now_ns()).await;
        inner.save();
    }

    /// Keeps pins current: learns new ones while backends terminate, releases
    /// closed, idle, expired and orphaned ones. Runs until the node is dropped.
    pub async fn run_steering(&self) {
        let mut last_all = 0u64;
        for round in 0u64.. {
            // Every second, or at once when a new flow reaches a terminating
            // pod (it must be pinned before kube-proxy's cleanup can move it).
            let woken = tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => false,
                () = self.steer_wake.notified() => true,
            };
            // Each second the backends that started terminating lately; all of
            // them when woken, and every LEARN_SLOW_ROUNDS seconds.
            let now = now_ns();
            let all = woken || now.saturating_sub(last_all) >= crate::steering::LEARN_SLOW_ROUNDS * 1_000_000_000;
            if all {
                last_all = now;
            }
            self.refresh_pins(all).await;
            let mut inner = self.inner.lock().await;
            if round % 30 == 0 {
                inner.datapath.refresh_node_addrs();
            }
            let Inner { steering, datapath, index, .. } = &mut *inner;
            let over = steering.sweep(datapath, now_ns(), self.settings.timeouts.udp_ns, self.settings.pin_limit_ns);
            if round % 5 == 0 {
                let swept = datapath.sweep_held(now_ns(), self.settings.timeouts.udp_ns);
                if !swept.is_empty() {
                    index.forget(&swept);
                    tracing::debug!(swept = swept.len(), "finished flows of draining pods removed from HELD");
                }
            }
            inner.save();
            drop(inner);
            if !over.is_empty() {
                let n = over.len();
                let forgotten = tokio::task::spawn_blocking(move || crate::conntrack::forget_translations(&over)).await;
                match forgotten.map_err(anyhow::Error::from).and_then(|r| r) {
                    Ok(deleted) => {
                        tracing::debug!(over = n, deleted, "stale conntrack entries of finished flows deleted")
                    }
                    Err(e) => tracing::warn!(error = %e, "deleting stale conntrack entries"),
                }
            }
        }
    }

    pub async fn remove_pod(&self, name: &str) -> Result<(), PodError> {
        let mut inner = self.inner.lock().await;
        inner.remove(name)?;
        inner.save();
        Ok(())
    }

    /// Feeds datapath events into the flow index and wakes the evaluator when
    /// a terminating pod is concerned.
    pub async fn on_events(&self, events: &[FlowEvent]) {
        let mut inner = self.inner.lock().await;
        inner.events_received += events.len() as u64;
        let mut wake = false;
        let mut steer = false;
        for ev in events {
            let Some(name) = inner.by_slot.get(&ev.pod_slot) else {
                continue;
            };
            if inner.pods.get(name).is_some_and(|p| p.termination.is_some()) {
                wake = true;
                steer |= ev.kind == event_kind::NEW || ev.kind == event_kind::ESTABLISHED;
            }
            inner.index.on_event(ev);
        }
        drop(inner);
        if wake {
            self.wake.notify_one();
        }
        if steer {
            self.steer_wake.notify_one();
        }
    }

    /// Runs the drain rule for every terminating pod until the node is dropped:
    /// on each wake-up from events, and at the next instant a pod can change
    /// on its own (end of quiet period, deadline, a flow turning idle).
    pub async fn run_evaluator(&self) {
        loop {
            let next = self.evaluate().await;
            let sleep = next.map_or(Duration::from_secs(3600), |t| Duration::from_nanos(t.saturating_sub(now_ns())));
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    async fn evaluate(&self) -> Option<u64> {
        let mut inner = self.inner.lock().await;
        let now = now_ns();
        let t = self.settings.timeouts;
        let mut next: Option<u64> = None;
        let mut changed = false;
        let names: Vec<String> = inner
            .pods
            .iter()
            .filter(|(_, p)| p.termination.as_ref().is_some_and(|t| t.outcome.is_none()))
            .map(|(n, _)| n.clone())
            .collect();
        let sockets_since = inner.datapath.sockets_since_ns;
        for name in names {
            let Some((slot, ignore)) =
                inner.pods.get(&name).filter(|p| p.unseen.is_none()).map(|p| (p.slot, p.settings.ignore_ports.clone()))
            else {
                continue;
            };
            let Ok(counters) = inner.datapath.counters(slot) else {
                continue;
            };
            let Inner { index, datapath, .. } = &mut *inner;
            // Sockets first: one whose event was lost is indexed by it, and counted below.
            let c = Counting { timeouts: t, ignore_ports: &ignore };
            let sockets = index.sockets(datapath, slot, now, c);
            let (counts, flow_next, _) = index.classify_pod(datapath, slot, now, c, false);
            let Some(pod) = inner.pods.get_mut(&name) else {
                continue;
            };
            if now < pod.hold_until_ns {
                next = Some(next.map_or(pod.hold_until_ns, |n: u64| n.min(pod.hold_until_ns)));
                continue;
            }
            let unknown = pod.sockets_unknown(sockets_since);
            let Some(term) = pod.termination.as_mut() else {
                continue;
            };
            let verdict = term.evaluate(&Observation {
                now_ns: now,
                counts,
                new_inbound_total: counters.new_inbound_total,
                last_new_inbound_ns: counters.last_new_inbound_ns,
                sockets_holding: sockets.holding.len() as u64,
                sockets_complete: unknown.is_none() && sockets.incomplete.is_none(),
            });
            if verdict.state != *pod.state.borrow() {
                tracing::info!(
                    pod = %name,
                    state = ?verdict.state,
                    after_s = secs(now - term.started_ns),
                    active = counts.active,
                    open_sockets = sockets.open,
                    sockets_holding = sockets.holding.len(),
                    "drain state"
                );
                pod.state.send_replace(verdict.state);
                changed = true;
                if verdict.state.is_final() {
                    let outcome = if verdict.state == PodState::Drained { "drained" } else { "deadline" };
                    self.metrics.drains.get_or_create(&OutcomeLabels { outcome }).inc();
                    self.metrics.drain_duration.observe(secs(now - term.started_ns));
                }
            }
            for t in
                [verdict.next_check_ns, if verdict.state.is_final() { None } else { flow_next }].into_iter().flatten()
            {
                next = Some(next.map_or(t, |n: u64| n.min(t)));
            }
        }
        self.metrics.flows_evicted.inc_by(std::mem::take(&mut inner.index.evicted));
        if changed {
            inner.touch();
            inner.save();
        }
        next
    }

    pub async fn pods(&self) -> Vec<PodView> {
        let mut inner = self.inner.lock().await;
        let now = now_ns();
        let names: Vec<String> = inner.pods.keys().cloned().collect();
        let (t, quiet) = (self.settings.timeouts, self.settings.default_quiet_period);
        let mut out: Vec<PodView> = names.iter().filter_map(|n| inner.view(n, now, t, quiet)).collect();
        out.extend(inner.skipped.iter().map(|(name, skipped)| skipped_view(name, skipped)));
        out
    }

    pub async fn pod(&self, name: &str) -> Result<PodView, PodError> {
        let mut inner = self.inner.lock().await;
        let view = inner.view(name, now_ns(), self.settings.timeouts, self.settings.default_quiet_period);
        view.or_else(|| inner.skipped.get(name).map(|s| skipped_view(name, s)))
            .ok_or_else(|| PodError::Unknown(name.to_owned()))
    }

    pub async fn why(&self, name: &str) -> Result<Why, PodError> {
        let mut inner = self.inner.lock().await;
        let now = now_ns();
        let t = self.settings.timeouts;
        let Some(pod) = inner.view(name, now, t, self.settings.default_quiet_period) else {
            let skipped = inner.skipped.get(name).ok_or_else(|| PodError::Unknown(name.to_owned()))?;
            return Ok(Why {
                pod: skipped_view(name, skipped),
                holding: Vec::new(),
                not_holding: Vec::new(),
                idle_timeout_secs: secs(t.idle_ns),
                sockets: SocketsWhy::default(),
                probe_ports: Vec::new(),
            });
        };
        let (slot, probes, ignore, unknown) = inner
            .pods
            .get(name)
            .map(|p| {
                let unknown = p.sockets_unknown(inner.datapath.sockets_since_ns);
                (p.slot, p.probes.clone(), p.settings.ignore_ports.clone(), unknown)
            })
            .ok_or_else(|| PodError::Unknown(name.to_owned()))?;
        let Inner { index, datapath, .. } = &mut *inner;
        let c = Counting { timeouts: t, ignore_ports: &ignore };
        let sockets = index.sockets(datapath, slot, now, c);
        let (_, _, flows) = index.classify_pod(datapath, slot, now, c, true);
        let flows: Vec<FlowView> = flows.iter().map(|(k, v, c)| flow_view(name, k, v, *c, now)).collect();
        let (holding, not_holding) = flows.into_iter().partition(|f| f.active);
        Ok(Why {
            pod,
            holding,
            not_holding,
            idle_timeout_secs: secs(t.idle_ns),
            sockets: sockets_why(&sockets, unknown),
            probe_ports: probes,
        })
    }

    /// Every live flow of the registered pods (or of one), from a walk of the
    /// flow table: for people, not for the drain path.
    pub async fn flows(&self, pod: Option<&str>) -> Result<Vec<FlowView>, PodError> {
        let inner = self.inner.lock().await;
        let slot = match pod {
            Some(name) => Some(inner.pods.get(name).ok_or_else(|| PodError::Unknown(name.to_owned()))?.slot),
            None => None,
        };
        let now = now_ns();
        let t = self.settings.timeouts;
        let mut out: Vec<FlowView> = inner
            .datapath
            .all_flows()?
            .into_iter()
            .filter(|(_, v)| slot.is_none_or(|s| s == v.pod_slot))
            .filter_map(|(k, v)| {
                let name = inner.by_slot.get(&v.pod_slot)?;
                let ignore = inner.pods.get(name).map_or(&[][..], |p| &p.settings.ignore_ports);
                let (class, _) = drain::classify_for(&k, &v, now, Counting { timeouts: t, ignore_ports: ignore });
                let open = k.proto == PROTO_TCP && !matches!(v.state, tcp_state::CLOSED);
                (class != FlowClass::Inactive || open).then(|| {
                    let mut view = flow_view(name, &k, &v, class, now);
                    let pod = SocketAddr::new(datapath::ip_from_bytes(k.pod_addr, k.family), k.pod_port);
                    let peer = SocketAddr::new(datapath::ip_from_bytes(k.peer_addr, k.family), k.peer_port);
                    view.pinned = inner.steering.for_pod_flow(pod, peer, k.proto).map(pin_view);
                    view
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.pod, &a.pod_addr, &a.peer_addr).cmp(&(&b.pod, &b.pod_addr, &b.peer_addr)));
        Ok(out)
    }

    pub async fn status(&self) -> Result<Status, PodError> {
        let inner = self.inner.lock().await;
        let dp = &inner.datapath;
        let s = dp.stats()?;
        let used_flows = dp.all_flows()?.len() as u64;
        let mut interfaces: Vec<InterfaceView> =
            dp.interfaces().map(|i| InterfaceView { name: i.name.clone(), ifindex: i.ifindex, pods: i.pods }).collect();
        interfaces.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            mode: self.settings.mode.to_owned(),
            kernel: dp.features.clone(),
            attach_mode: dp.mode,
            interfaces,
            maps: MapsView {
                flows: MapFill { max: u64::from(dp.max_flows), used: used_flows },
                held: MapFill { max: u64::from(conndrain_common::MAX_HELD), used: dp.held_count() as u64 },
                pods: MapFill { max: u64::from(datapath::MAX_POD_SLOTS), used: inner.pods.len() as u64 },
            },
            stats: StatsView {
                packets: s[stats::PACKETS as usize],
                unparsed: s[stats::UNPARSED as usize],
                not_pod: s[stats::NOT_POD as usize],
                flows_created: s[stats::FLOWS_CREATED as usize],
                insert_failed: s[stats::INSERT_FAILED as usize],
                flows_evicted: self.metrics.flows_evicted.get(),
                held: s[stats::HELD as usize],
                hold_failed: s[stats::HOLD_FAILED as usize],
            },
            events_lost: s[stats::EVENTS_LOST as usize],
            steering: SteeringView {
                pinned_flows: inner.steering.pinned() as u64,
                steered_packets: s[stats::STEERED as usize],
                resets_sent: s[stats::RESETS_SENT as usize],
                steer_failed: s[stats::STEER_FAILED as usize],
                pins: pin_views(&inner.steering),
            },
            events_received: inner.events_received,
            idle_timeout_secs: secs(self.settings.timeouts.idle_ns),
            udp_timeout_secs: secs(self.settings.timeouts.udp_ns),
        })
    }

    /// Blocks until the pod is drained or at its deadline, or `timeout` passes.
    pub async fn wait(&self, name: &str, timeout: Option<Duration>) -> Result<WaitOutcome, PodError> {
        let start = now_ns();
        let mut rx = {
            let inner = self.inner.lock().await;
            match inner.pods.get(name) {
                Some(p) => p.state.subscribe(),
                // Known but not tracked (opted out, hostNetwork): the caller falls back at once.
                None if inner.skipped.contains_key(name) => {
                    return Ok(WaitOutcome {
                        pod: name.to_owned(),
                        state: PodState::Skipped,
                        active_flows: 0,
                        waited_secs: 0.0,
                        timed_out: false,
                    });
                }
                None => return Err(PodError::Unknown(name.to_owned())),
            }
        };
        // Skipped (its traffic cannot be seen) answers at once: the caller falls back.
        let waited = async {
            rx.wait_for(|s| s.is_final() || *s == PodState::Skipped)
                .await
                .map(|s| *s)
                .map_err(|_| PodError::Removed(name.to_owned()))
        };
        let (state, timed_out) = match timeout {
            Some(t) => match tokio::time::timeout(t, waited).await {
                Ok(r) => (r?, false),
                Err(_) => (*rx.borrow(), true),
            },
            None => (waited.await?, false),
        };
        let active_flows = self.pod(name).await.map(|p| p.active_flows).unwrap_or(0);
        Ok(WaitOutcome { pod: name.to_owned(), state, active_flows, waited_secs: secs(now_ns() - start), timed_out })
    }
}

impl Node {
    /// Takes back what an earlier agent left, before the node serves anyone.
    /// Only with `--bpffs` (`state_file` is then where the state is saved;
    /// without it nothing outlives the agent and nothing is saved).
    ///
    /// The pods, their terminations and the steering state come from the
    /// saved file; the flows, counters and pins from the pinned maps, which
    /// the programs kept up to date while no agent ran. The flow index is
    /// rebuilt from one walk of `FLOWS`.
    pub async fn restore(&self, state_file: Option<PathBuf>) {
        let Some(path) = state_file else { return };
        let mut inner = self.inner.lock().await;
        let boot_id = boot_id();
        let saved = read_saved(&path, &boot_id);
        inner.persist = Some(Persist { path, boot_id, dirty: true, steering_changes: 0 });
        let now = now_ns();
        if let Some(saved) = saved {
            inner.restore_pods(saved.pods, now).await;
            let Inner { steering, datapath, .. } = &mut *inner;
            *steering = crate::steering::Steering::restore(saved.steering, datapath, now).await;
            if (saved.everywhere || steering.pinned() > 0)
                && let Err(e) = datapath.attach_everywhere()
            {
                tracing::warn!(error = %e, "attaching to every interface again (steering)");
            }
        }
        // IPs of pods the state does not know (it was lost, or we were killed
        // between registering and saving) would count into slots that may be
        // handed out again.
        let known: HashMap<IpAddr, u32> =
            inner.pods.values().flat_map(|p| p.ips.iter().map(|ip| (*ip, p.slot))).collect();
        inner.datapath.retain_pod_ips(|ip, slot| known.get(&ip) == Some(&slot));
        inner.datapath.finish_restore();
        // The flow index, as the events built it: live UDP flows and
        // established or closing TCP flows of our pods. This walk of FLOWS,
        // once at start, is the only full-table walk the agent makes on its
        // own (listings walk it when someone asks); afterwards events and
        // point lookups keep the index, as they always do.
        let mut indexed = 0usize;
        match inner.datapath.all_flows() {
            Ok(flows) => {
                for (k, v) in flows {
                    let live = k.proto == PROTO_UDP || tcp_state::is_active(v.state);
                    if live && inner.by_slot.contains_key(&v.pod_slot) {
                        inner.index.insert(v.pod_slot, k, v.first_seen_ns);
                        indexed += 1;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the flow table to rebuild the flow index")
            }
        }
        // The flags are pinned with the maps, but not across a layout change.
        let draining: Vec<(String, u32)> =
            inner.pods.iter().filter(|(_, p)| p.termination.is_some()).map(|(n, p)| (n.clone(), p.slot)).collect();
        for (name, slot) in draining {
            inner.hold(&name, slot);
        }
        tracing::info!(
            pods = inner.pods.len(),
            terminating = inner.pods.values().filter(|p| p.termination.is_some()).count(),
            pinned_flows = inner.steering.pinned(),
            indexed_flows = indexed,
            interfaces = inner.datapath.interfaces().count(),
            "state restored"
        );
        inner.save();
        drop(inner);
        self.wake.notify_one();
    }

    /// Removes the pods restored from the saved state that nobody declared
    /// again: Kubernetes mode calls it after its first pod sync, which
    /// declares every pod still on the node.
    pub async fn forget_undeclared(&self) {
        let mut inner = self.inner.lock().await;
        let names: Vec<String> = inner.restored.iter().cloned().collect();
        for name in names {
            tracing::info!(pod = %name, "a restored pod was not declared again (deleted while the agent was down): removing it");
            let _ = inner.remove(&name);
        }
        inner.save();
    }

    /// Whether the programs stay attached (and the state saved) when the agent exits.
    pub async fn keeps_attached_on_exit(&self) -> bool {
        self.inner.lock().await.datapath.keeps_attached_on_exit()
    }

    /// `--detach-on-exit`: unregisters every pod (detaching the programs),
    /// then removes the pinned maps and the saved state, so the next agent
    /// starts afresh.
    pub async fn detach_all(&self) {
        for name in self.names().await {
            let _ = self.remove_pod(&name).await;
        }
        let mut inner = self.inner.lock().await;
        inner.datapath.remove_pins();
        if let Some(p) = inner.persist.take()
            && let Err(e) = std::fs::remove_file(&p.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %p.path.display(), error = %e, "removing the saved state");
        }
    }
}

impl Inner {
    /// Registers the saved pods again, under their old slots, with their drains.
    async fn restore_pods(&mut self, pods: Vec<SavedPod>, now: u64) {
        // The counters were kept if their map was: else the snapshots
        // taken at termination refer to counts that are gone.
        let counters_kept = self.datapath.reused(maps::POD_COUNTERS);
        // Likewise the flows: if the table is new (a layout change), the
        // live flows come back only at their next packet.
        let flows_kept = self.datapath.flows_kept();
        for p in pods {
            if p.slot >= datapath::MAX_POD_SLOTS
                || self.by_slot.contains_key(&p.slot)
                || self.pods.contains_key(&p.name)
            {
                tracing::warn!(pod = %p.name, slot = p.slot, "ignoring a saved pod that clashes with another");
                continue;
            }
            let ifindexes = self.datapath.restore_pod(p.slot, &p.ips).await;
            let termination = p.termination.map(|t| Termination {
                started_ns: t.started_ns,
                deadline_ns: t.deadline_ns,
                quiet_period_ns: t.quiet_period_ns,
                new_inbound_at_start: if counters_kept { t.new_inbound_at_start } else { 0 },
                outcome: t.outcome,
            });
            let state = match &termination {
                None => PodState::Serving,
                Some(t) => t.outcome.map_or(PodState::Draining, |(s, _)| s),
            };
            self.by_slot.insert(p.slot, p.name.clone());
            self.index.add_slot(p.slot);
            if (!p.probes.is_empty() || !p.settings.ignore_ports.is_empty())
                && let Err(e) = self.datapath.set_ports(p.slot, &p.probes, &p.settings.ignore_ports)
            {
                tracing::warn!(pod = %p.name, error = %e, "restoring the pod's probe and ignored ports");
            }
            self.restored.insert(p.name.clone());
            if termination.is_some() {
                self.restored_drains.insert(p.name.clone());
            }
            let (state, _) = watch::channel(state);
            let hold_until_ns = match &termination {
                Some(t) if !flows_kept && t.outcome.is_none() => {
                    tracing::warn!(
                        pod = %p.name,
                        "the flow table is new: the drain waits one quiet period for the pod's flows to show again"
                    );
                    now.saturating_add(t.quiet_period_ns)
                }
                _ => 0,
            };
            self.pods.insert(
                p.name,
                Pod {
                    slot: p.slot,
                    ips: p.ips,
                    ifindexes,
                    termination,
                    state,
                    hold_until_ns,
                    registered_ns: p.registered_ns,
                    probes: p.probes,
                    settings: p.settings,
                    unseen: None,
                },
            );
        }
    }

    fn remove(&mut self, name: &str) -> Result<(), PodError> {
        let pod = self.pods.remove(name).ok_or_else(|| PodError::Unknown(name.to_owned()))?;
        self.restored.remove(name);
        self.restored_drains.remove(name);
        self.touch();
        {
            let Inner { steering, datapath, .. } = &mut *self;
            steering.mark_dead(datapath, &pod.ips, now_ns());
        }
        self.by_slot.remove(&pod.slot);
        let known: Vec<FlowKey> = self.index.remove_slot(pod.slot);
        self.datapath.unregister_pod(pod.slot, &pod.ips, &pod.ifindexes, &known);
        tracing::info!(pod = name, "pod removed");
        Ok(())
    }

    /// Keeps a draining pod's flows out of the LRU's reach (see
    /// `datapath/held.rs`).
    fn hold(&mut self, name: &str, slot: u32) {
        let known: Vec<FlowKey> = self.index.keys(slot);
        match self.datapath.hold_pod(slot, &known) {
            Ok(moved) => tracing::debug!(pod = name, moved, "flows held for the drain"),
            Err(e) => tracing::warn!(
                pod = name,
                error = %e,
                "cannot protect the pod's flows from eviction: a flood of new flows may make it look drained early"
            ),
        }
    }

    /// Marks the state changed, to be saved by the next `save`.
    fn touch(&mut self) {
        if let Some(p) = self.persist.as_mut() {
            p.dirty = true;
        }
    }

    /// Writes the state if it changed since the last write (`--bpffs` only).
    /// Written to a temporary file and renamed, so a kill -9 leaves the old
    /// state or the new one, never half of one. Not synced to disk: the
    /// state is worth nothing after a reboot anyway (see `Saved::boot_id`).
    fn save(&mut self) {
        let Some(p) = &self.persist else { return };
        if !p.dirty && p.steering_changes == self.steering.changes() {
            return;
        }
        let saved = Saved {
            version: STATE_VERSION,
            layout: LAYOUT_VERSION,
            boot_id: p.boot_id.clone(),
            pods: self
                .pods
                .iter()
                .map(|(name, pod)| SavedPod {
                    name: name.clone(),
                    slot: pod.slot,
                    ips: pod.ips.clone(),
                    registered_ns: pod.registered_ns,
                    probes: pod.probes.clone(),
                    settings: pod.settings.clone(),
                    termination: pod.termination.as_ref().map(|t| SavedTermination {
                        started_ns: t.started_ns,
                        deadline_ns: t.deadline_ns,
                        quiet_period_ns: t.quiet_period_ns,
                        new_inbound_at_start: t.new_inbound_at_start,
                        outcome: t.outcome,
                    }),
                })
                .collect(),
            everywhere: self.datapath.everywhere(),
            steering: self.steering.save(),
        };
        let text = match serde_json::to_string_pretty(&saved) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "serializing the state");
                return;
            }
        };
        let changes = self.steering.changes();
        let Some(p) = self.persist.as_mut() else {
            return;
        };
        let tmp = p.path.with_extension("json.tmp");
        let written = write_private(&tmp, text.as_bytes()).and_then(|()| std::fs::rename(&tmp, &p.path));
        match written {
            Ok(()) => {
                p.dirty = false;
                p.steering_changes = changes;
            }
            Err(e) => tracing::warn!(path = %p.path.display(), error = %e, "saving the state"),
        }
    }

    fn view(&mut self, name: &str, now: u64, t: Timeouts, default_quiet: Duration) -> Option<PodView> {
        let (slot, ignore) = self.pods.get(name).map(|p| (p.slot, p.settings.ignore_ports.clone()))?;
        let counters = self.datapath.counters(slot).unwrap_or_default();
        let open_sockets = self.datapath.pod_sockets(slot).map(|s| s.open).unwrap_or(0);
        let c = Counting { timeouts: t, ignore_ports: &ignore };
        let (counts, _, _) = self.index.classify_pod(&self.datapath, slot, now, c, false);
        self.metrics.flows_evicted.inc_by(std::mem::take(&mut self.index.evicted));
        let pod = self.pods.get(name)?;
        let interfaces = pod
            .ifindexes
            .iter()
            .filter_map(|i| self.datapath.interfaces().find(|x| x.ifindex == *i).map(|x| x.name.clone()))
            .collect();
        let state = *pod.state.borrow();
        let term = pod.termination.as_ref();
        let quiet_since = term.map(|t| {
            if counters.new_inbound_total > t.new_inbound_at_start {
                t.started_ns.max(counters.last_new_inbound_ns)
            } else {
                t.started_ns
            }
        });
        Some(PodView {
            name: name.to_owned(),
            ips: pod.ips.clone(),
            state,
            active_flows: counts.active,
            idle_flows: counts.idle,
            outbound_flows: counts.outbound,
            new_flows_since_termination: term.map_or(0, |t| t.new_since(counters.new_inbound_total)),
            terminating_for_secs: term.map(|t| secs(now.saturating_sub(t.started_ns))),
            deadline_in_secs: term.map(|t| secs(t.deadline_ns.saturating_sub(now))),
            quiet_for_secs: quiet_since.map(|q| secs(now.saturating_sub(q))),
            quiet_period_secs: term.map(|t| secs(t.quiet_period_ns)),
            interfaces,
            note: pod.unseen.clone(),
            open_sockets,
            ignored_flows: counts.ignored,
            settings: settings_view(&pod.settings, term, default_quiet),
        })
    }
}

/// The settings a pod's drain uses, and where its quiet period comes from.
fn settings_view(settings: &PodSettings, term: Option<&Termination>, default_quiet: Duration) -> SettingsView {
    let own = settings.quiet_period.map(nanos);
    let default = nanos(default_quiet);
    let (quiet, from) = match (term.map(|t| t.quiet_period_ns), own) {
        (Some(q), Some(o)) if q == o => (q, settings.quiet_period_from.clone()),
        (Some(q), None) if q == default => (q, "default".to_owned()),
        (Some(q), _) => (q, "pod terminate --quiet-period".to_owned()),
        (None, Some(o)) => (o, settings.quiet_period_from.clone()),
        (None, None) => (default, "default".to_owned()),
    };
    SettingsView {
        quiet_period_secs: secs(quiet),
        quiet_period_from: from,
        ignore_ports: settings.ignore_ports.clone(),
        problems: settings.problems.clone(),
    }
}

fn skipped_view(name: &str, skipped: &SkippedPod) -> PodView {
    PodView {
        name: name.to_owned(),
        ips: skipped.ips.clone(),
        state: PodState::Skipped,
        active_flows: 0,
        idle_flows: 0,
        outbound_flows: 0,
        new_flows_since_termination: 0,
        terminating_for_secs: None,
        deadline_in_secs: None,
        quiet_for_secs: None,
        quiet_period_secs: None,
        interfaces: Vec::new(),
        open_sockets: 0,
        note: Some(skipped.reason.clone()),
        ignored_flows: 0,
        settings: SettingsView::default(),
    }
}

fn sockets_why(ev: &SocketEvidence, unknown: Option<String>) -> SocketsWhy {
    let addr = |k: &FlowKey, bytes, port| SocketAddr::new(datapath::ip_from_bytes(bytes, k.family), port).to_string();
    SocketsWhy {
        open: ev.open,
        confirms_drain: unknown.is_none() && ev.incomplete.is_none(),
        note: unknown.or_else(|| ev.incomplete.clone()),
        holding: ev
            .holding
            .iter()
            .map(|h| SocketView {
                pod_addr: addr(&h.key, h.key.pod_addr, h.key.pod_port),
                peer_addr: addr(&h.key, h.key.peer_addr, h.key.peer_port),
                why: match h.why {
                    SocketHold::Unseen => "open socket whose packets conndrain never saw (another path, or evicted)",
                    SocketHold::Misread => "open socket the packet path has as closed or outbound",
                }
                .to_owned(),
            })
            .collect(),
    }
}

/// A pinned flow as the API shows it.
fn pin_view(p: &crate::steering::PinnedFlow) -> PinView {
    PinView {
        proto: if p.translation().proto == PROTO_TCP { "tcp" } else { "udp" }.into(),
        client: p.client().to_string(),
        frontend: p.frontend().to_string(),
        backend: p.backend().to_string(),
        backend_peer: p.backend_peer().to_string(),
        pod: p.pod().to_owned(),
        dead: p.dead(),
    }
}

/// Every pinned flow, by pod and client.
fn pin_views(steering: &crate::steering::Steering) -> Vec<PinView> {
    let mut v: Vec<_> = steering.pins().map(pin_view).collect();
    v.sort_by(|a, b| (&a.pod, &a.client).cmp(&(&b.pod, &b.client)));
    v
}

fn flow_view(pod: &str, k: &FlowKey, v: &FlowValue, class: FlowClass, now: u64) -> FlowView {
    let addr = |bytes, port| SocketAddr::new(datapath::ip_from_bytes(bytes, k.family), port).to_string();
    FlowView {
        pod: pod.to_owned(),
        proto: if k.proto == PROTO_TCP { "tcp" } else { "udp" }.to_owned(),
        direction: if v.direction == direction::INBOUND { "inbound" } else { "outbound" }.to_owned(),
        state: match (k.proto, v.state) {
            (PROTO_UDP, _) if class == FlowClass::Inactive => "timed_out",
            (PROTO_UDP, _) => "active",
            (_, tcp_state::SYN_SENT) => "syn_sent",
            (_, tcp_state::SYN_RECV) => "syn_recv",
            (_, tcp_state::ESTABLISHED) => "established",
            (_, tcp_state::CLOSING) => "closing",
            _ => "closed",
        }
        .to_owned(),
        pod_addr: addr(k.pod_addr, k.pod_port),
        peer_addr: addr(k.peer_addr, k.peer_port),
        age_secs: secs(now.saturating_sub(v.first_seen_ns)),
        idle_secs: secs(now.saturating_sub(v.last_seen_ns)),
        idle: class == FlowClass::Idle,
        active: class == FlowClass::Active,
        ignored: class == FlowClass::Ignored,
        bytes_in: v.bytes_in,
        bytes_out: v.bytes_out,
        pinned: None,
    }
}
