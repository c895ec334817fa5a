//! Pod lifecycle on this node: the registered pods, their flows as the
//! datapath reports them, and the evaluator that moves terminating pods to
//! drained or deadline as events arrive.
//!
//! - `registry`: adding, terminating and removing pods
//! - `evaluator`: events in, the drain rule run, `wait`
//! - `steer`: terminating backends and the steering loop
//! - `status`: the views the API serves, and the metrics scrape
//! - `persist`, `restore`: the state file, and taking back an earlier agent's state

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify, watch};

use crate::{
    datapath::Datapath,
    drain::{PodState, Termination, Timeouts},
    flowindex::FlowIndex,
    metrics::Metrics,
};

mod census;
mod evaluator;
mod persist;
mod registry;
mod restore;
mod status;
mod steer;

use persist::Persist;

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
    fn sockets_unknown(&self, datapath: &Datapath) -> Option<String> {
        if self.registered_ns == 0 {
            Some("it was already running when conndrain first saw it: connections opened before are not known".into())
        } else if self.registered_ns < datapath.sockets_since_ns {
            Some(datapath.sockets_gap.to_string())
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
}
