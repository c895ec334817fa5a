//! Pod lifecycle on this node: the registered pods, their flows as the
//! datapath reports them, and the evaluator that moves terminating pods to
//! drained or deadline as events arrive.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use conndrain_common::{
    FlowEvent, FlowKey, FlowValue, PROTO_TCP, PROTO_UDP, direction, event_kind, stats, tcp_state,
};
use tokio::sync::{Mutex, Notify, watch};

use crate::{
    api::{FlowView, InterfaceView, MapFill, MapsView, PodView, StatsView, Status, SteeringView, WaitOutcome, Why},
    datapath::{self, Datapath},
    drain::{self, FlowClass, FlowCounts, Observation, PodState, Termination, Timeouts},
    metrics::{Metrics, OutcomeLabels, PodLabels},
};

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
    pub mode: &'static str,
}

struct Pod {
    slot: u32,
    ips: Vec<IpAddr>,
    ifindexes: Vec<u32>,
    termination: Option<Termination>,
    state: watch::Sender<PodState>,
}

struct Inner {
    datapath: Datapath,
    pods: BTreeMap<String, Pod>,
    by_slot: HashMap<u32, String>,
    /// Live flows per pod slot, with the `first_seen_ns` that identifies their
    /// incarnation: built from events, so the drain path never scans the table.
    index: HashMap<u32, HashMap<FlowKey, u64>>,
    events_received: u64,
    /// Pods we know of but do not track, with the reason.
    skipped: BTreeMap<String, String>,
    steering: crate::steering::Steering,
    metrics: std::sync::Arc<Metrics>,
}

pub struct Node {
    inner: Mutex<Inner>,
    wake: Notify,
    pub settings: Settings,
    pub metrics: std::sync::Arc<Metrics>,
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`.
#[must_use]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

#[expect(clippy::cast_precision_loss, reason = "seconds for display")]
fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn duration_ns(what: &'static str, secs: Option<f64>, default: Duration) -> Result<u64, PodError> {
    match secs {
        None => Ok(u64::try_from(default.as_nanos()).unwrap_or(u64::MAX)),
        Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => {
            Ok(u64::try_from(Duration::from_secs_f64(s).as_nanos()).unwrap_or(u64::MAX))
        }
        Some(value) => Err(PodError::BadDuration { what, value }),
    }
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
                index: HashMap::new(),
                events_received: 0,
                skipped: BTreeMap::new(),
                steering: crate::steering::Steering::default(),
                metrics: metrics.clone(),
            }),
            wake: Notify::new(),
            settings,
            metrics,
        }
    }

    /// Records a pod that is known but not tracked, shown by `conndrain pods`.
    pub async fn set_skipped(&self, name: &str, reason: Option<&str>) {
        let mut inner = self.inner.lock().await;
        match reason {
            Some(r) => inner.skipped.insert(name.to_owned(), r.to_owned()),
            None => inner.skipped.remove(name),
        };
    }

    /// The registered pod that owns `ip`, if any: how the node API knows its caller.
    pub async fn pod_for_ip(&self, ip: IpAddr) -> Option<String> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 @ IpAddr::V4(_) => v4,
        };
        let inner = self.inner.lock().await;
        inner.pods.iter().find(|(_, p)| p.ips.contains(&ip)).map(|(n, _)| n.clone())
    }

    pub async fn names(&self) -> Vec<String> {
        self.inner.lock().await.pods.keys().cloned().collect()
    }

    pub async fn is_terminating(&self, name: &str) -> bool {
        self.inner.lock().await.pods.get(name).is_some_and(|p| p.termination.is_some())
    }

    /// Follows a pod's state; `None` if there is no such pod.
    pub async fn subscribe(&self, name: &str) -> Option<watch::Receiver<PodState>> {
        self.inner.lock().await.pods.get(name).map(|p| p.state.subscribe())
    }

    /// Refreshes the gauges from the current state, for a scrape.
    pub async fn refresh_metrics(&self) {
        let pods = self.pods().await;
        let m = &self.metrics;
        for f in [&m.active_flows, &m.idle_flows, &m.outbound_flows, &m.new_flows_after_termination] {
            f.clear();
        }
        for p in pods.iter().filter(|p| p.state != PodState::Skipped) {
            let l = PodLabels { pod: p.name.clone() };
            let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            m.active_flows.get_or_create(&l).set(g(p.active_flows));
            m.idle_flows.get_or_create(&l).set(g(p.idle_flows));
            m.outbound_flows.get_or_create(&l).set(g(p.outbound_flows));
            m.new_flows_after_termination.get_or_create(&l).set(g(p.new_flows_since_termination));
        }
        if let Ok(s) = self.status().await {
            m.flow_table_used.set(i64::try_from(s.maps.flows.used).unwrap_or(i64::MAX));
            m.events_lost.set(i64::try_from(s.events_lost).unwrap_or(i64::MAX));
        }
    }

    pub async fn add_pod(&self, name: &str, ips: &[IpAddr]) -> Result<(), PodError> {
        if !valid_name(name) {
            return Err(PodError::BadName(name.to_owned()));
        }
        if ips.is_empty() {
            return Err(PodError::NoIps(name.to_owned()));
        }
        let mut inner = self.inner.lock().await;
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
        let ifindexes = inner.datapath.register_pod(slot, &ips).await?;
        tracing::info!(pod = name, ?ips, slot, "pod added");
        inner.by_slot.insert(slot, name.to_owned());
        inner.index.insert(slot, HashMap::new());
        let (state, _) = watch::channel(PodState::Serving);
        inner.pods.insert(name.to_owned(), Pod { slot, ips, ifindexes, termination: None, state });
        Ok(())
    }

    pub async fn terminate(&self, name: &str, req: &crate::api::Terminate) -> Result<(), PodError> {
        let deadline = duration_ns("deadline", req.deadline_secs, self.settings.default_deadline)?;
        let quiet = duration_ns("quiet period", req.quiet_period_secs, self.settings.default_quiet_period)?;
        let mut inner = self.inner.lock().await;
        let slot = inner.pods.get(name).ok_or_else(|| PodError::Unknown(name.to_owned()))?.slot;
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
        pod.state.send_replace(PodState::Draining);
        let ips = pod.ips.clone();
        inner.steering.add_backend(name, &ips, now.saturating_add(deadline));
        tracing::info!(pod = name, deadline_s = secs(deadline), quiet_s = secs(quiet), "drain started");
        drop(inner);
        self.wake.notify_one();
        // Pin its established flows before we answer, so a caller may cut the
        // rules right after.
        self.refresh_pins().await;
        Ok(())
    }

    /// A backend on another node is terminating (Kubernetes mode: its
    /// EndpointSlice endpoint says so): pin the flows this node translated to it.
    pub async fn pin_remote(&self, ip: IpAddr, limit: Duration) {
        {
            let mut inner = self.inner.lock().await;
            let deadline = now_ns().saturating_add(u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX));
            inner.steering.add_backend(&format!("remote {ip}"), &[ip], deadline);
        }
        self.refresh_pins().await;
    }

    /// A remote backend's endpoint is gone (its pod was deleted): its pinned
    /// TCP flows get a RST on their next segment.
    pub async fn remote_gone(&self, ip: IpAddr) {
        let mut inner = self.inner.lock().await;
        let Inner { steering, datapath, .. } = &mut *inner;
        steering.mark_dead(datapath, &[ip], now_ns());
    }

    /// Learns the translations of terminating backends' flows from conntrack
    /// and pins the new ones.
    pub async fn refresh_pins(&self) {
        if !self.inner.lock().await.steering.has_backends() {
            return;
        }
        let translations = match tokio::task::spawn_blocking(crate::steering::dump_translations).await {
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
        steering.apply(datapath, &translations, now_ns()).await;
    }

    /// Keeps pins current: learns new ones while backends terminate, releases
    /// closed, idle, expired and orphaned ones. Runs until the node is dropped.
    pub async fn run_steering(&self) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.refresh_pins().await;
            let mut inner = self.inner.lock().await;
            let Inner { steering, datapath, .. } = &mut *inner;
            steering.sweep(datapath, now_ns(), self.settings.timeouts.udp_ns);
        }
    }

    pub async fn remove_pod(&self, name: &str) -> Result<(), PodError> {
        let mut inner = self.inner.lock().await;
        let pod = inner.pods.remove(name).ok_or_else(|| PodError::Unknown(name.to_owned()))?;
        {
            let Inner { steering, datapath, .. } = &mut *inner;
            steering.mark_dead(datapath, &pod.ips, now_ns());
        }
        inner.by_slot.remove(&pod.slot);
        inner.index.remove(&pod.slot);
        inner.datapath.unregister_pod(&pod.ips, &pod.ifindexes);
        tracing::info!(pod = name, "pod removed");
        Ok(())
    }

    /// Feeds datapath events into the flow index and wakes the evaluator when
    /// a terminating pod is concerned.
    pub async fn on_events(&self, events: &[FlowEvent]) {
        let mut inner = self.inner.lock().await;
        inner.events_received += events.len() as u64;
        let mut wake = false;
        for ev in events {
            let Some(name) = inner.by_slot.get(&ev.pod_slot) else { continue };
            if inner.pods.get(name).is_some_and(|p| p.termination.is_some()) {
                wake = true;
            }
            let Some(flows) = inner.index.get_mut(&ev.pod_slot) else { continue };
            match ev.kind {
                // Half-open TCP flows are not indexed: a SYN flood must not grow it.
                event_kind::NEW if ev.key.proto == PROTO_UDP => {
                    flows.insert(ev.key, ev.first_seen_ns);
                }
                event_kind::ESTABLISHED => {
                    flows.insert(ev.key, ev.first_seen_ns);
                }
                event_kind::CLOSED => {
                    flows.remove(&ev.key);
                }
                _ => {}
            }
        }
        drop(inner);
        if wake {
            self.wake.notify_one();
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
        let names: Vec<String> = inner
            .pods
            .iter()
            .filter(|(_, p)| p.termination.as_ref().is_some_and(|t| t.outcome.is_none()))
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let Some(slot) = inner.pods.get(&name).map(|p| p.slot) else { continue };
            let Ok(counters) = inner.datapath.counters(slot) else { continue };
            let (counts, flow_next, _) = inner.classify_pod(slot, now, t, false);
            let Some(pod) = inner.pods.get_mut(&name) else { continue };
            let Some(term) = pod.termination.as_mut() else { continue };
            let verdict = term.evaluate(&Observation {
                now_ns: now,
                counts,
                new_inbound_total: counters.new_inbound_total,
                last_new_inbound_ns: counters.last_new_inbound_ns,
            });
            if verdict.state != *pod.state.borrow() {
                tracing::info!(
                    pod = %name,
                    state = ?verdict.state,
                    after_s = secs(now - term.started_ns),
                    active = counts.active,
                    "drain state"
                );
                pod.state.send_replace(verdict.state);
                if verdict.state.is_final() {
                    let outcome = if verdict.state == PodState::Drained { "drained" } else { "deadline" };
                    self.metrics.drains.get_or_create(&OutcomeLabels { outcome: outcome.into() }).inc();
                    self.metrics.drain_duration.observe(secs(now - term.started_ns));
                }
            }
            for t in [verdict.next_check_ns, if verdict.state.is_final() { None } else { flow_next }].into_iter().flatten() {
                next = Some(next.map_or(t, |n: u64| n.min(t)));
            }
        }
        next
    }

    pub async fn pods(&self) -> Vec<PodView> {
        let mut inner = self.inner.lock().await;
        let now = now_ns();
        let names: Vec<String> = inner.pods.keys().cloned().collect();
        let mut out: Vec<PodView> = names.iter().filter_map(|n| inner.view(n, now, self.settings.timeouts)).collect();
        out.extend(inner.skipped.iter().map(|(name, reason)| PodView {
            name: name.clone(),
            ips: Vec::new(),
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
            note: Some(reason.clone()),
        }));
        out
    }

    pub async fn pod(&self, name: &str) -> Result<PodView, PodError> {
        let mut inner = self.inner.lock().await;
        inner.view(name, now_ns(), self.settings.timeouts).ok_or_else(|| PodError::Unknown(name.to_owned()))
    }

    pub async fn why(&self, name: &str) -> Result<Why, PodError> {
        let mut inner = self.inner.lock().await;
        let now = now_ns();
        let t = self.settings.timeouts;
        let pod = inner.view(name, now, t).ok_or_else(|| PodError::Unknown(name.to_owned()))?;
        let slot = inner.pods.get(name).map(|p| p.slot).ok_or_else(|| PodError::Unknown(name.to_owned()))?;
        let (_, _, flows) = inner.classify_pod(slot, now, t, true);
        let (holding, not_holding) = flows.into_iter().partition(|f| f.active);
        Ok(Why { pod, holding, not_holding, idle_timeout_secs: secs(t.idle_ns) })
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
                let (class, _) = drain::classify(k.proto, &v, now, t);
                let open = k.proto == PROTO_TCP && !matches!(v.state, tcp_state::CLOSED);
                (class != FlowClass::Inactive || open).then(|| {
                    let mut view = flow_view(name, &k, &v, class, now);
                    let pod = SocketAddr::new(datapath::ip_from_bytes(k.pod_addr, k.family), k.pod_port);
                    let peer = SocketAddr::new(datapath::ip_from_bytes(k.peer_addr, k.family), k.peer_port);
                    view.pinned = inner.steering.for_pod_flow(pod, peer, k.proto).cloned();
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
        let mut interfaces: Vec<InterfaceView> = dp
            .interfaces()
            .map(|i| InterfaceView { name: i.name.clone(), ifindex: i.ifindex, pods: i.pods })
            .collect();
        interfaces.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            mode: self.settings.mode.to_owned(),
            kernel: dp.features.clone(),
            attach_mode: dp.mode,
            interfaces,
            maps: MapsView {
                flows: MapFill { max: u64::from(dp.max_flows), used: used_flows },
                pods: MapFill { max: u64::from(datapath::MAX_POD_SLOTS), used: inner.pods.len() as u64 },
            },
            stats: StatsView {
                packets: s[stats::PACKETS as usize],
                unparsed: s[stats::UNPARSED as usize],
                not_pod: s[stats::NOT_POD as usize],
                flows_created: s[stats::FLOWS_CREATED as usize],
                insert_failed: s[stats::INSERT_FAILED as usize],
            },
            events_lost: s[stats::EVENTS_LOST as usize],
            steering: SteeringView {
                pinned_flows: inner.steering.pinned() as u64,
                steered_packets: s[stats::STEERED as usize],
                resets_sent: s[stats::RESETS_SENT as usize],
                steer_failed: s[stats::STEER_FAILED as usize],
                pins: inner.steering.views(),
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
            inner.pods.get(name).ok_or_else(|| PodError::Unknown(name.to_owned()))?.state.subscribe()
        };
        let waited = async {
            rx.wait_for(|s| s.is_final()).await.map(|s| *s).map_err(|_| PodError::Removed(name.to_owned()))
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

impl Inner {
    /// Counts the pod's indexed flows by point lookups (never a table walk).
    /// Drops index entries whose flow is gone or was replaced (evicted or
    /// timed out). Returns the counts, the next time a flow changes class on
    /// its own, and the flows themselves when `collect`.
    fn classify_pod(&mut self, slot: u32, now: u64, t: Timeouts, collect: bool) -> (FlowCounts, Option<u64>, Vec<FlowView>) {
        let mut counts = FlowCounts::default();
        let mut next: Option<u64> = None;
        let mut views = Vec::new();
        let name = self.by_slot.get(&slot).cloned().unwrap_or_default();
        let Some(flows) = self.index.get(&slot) else { return (counts, None, views) };
        let mut gone = Vec::new();
        for (key, first_seen) in flows {
            let v = match self.datapath.flow(key) {
                Ok(Some(v)) if v.first_seen_ns == *first_seen => v,
                Ok(_) => {
                    // Gone or replaced while we still counted it live: evicted.
                    self.metrics.flows_evicted.inc();
                    gone.push(*key);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "flow lookup");
                    continue;
                }
            };
            let (class, changes_at) = drain::classify(key.proto, &v, now, t);
            match class {
                FlowClass::Active => counts.active += 1,
                FlowClass::Idle => counts.idle += 1,
                FlowClass::Outbound => counts.outbound += 1,
                FlowClass::Inactive => {
                    gone.push(*key);
                    continue;
                }
            }
            if let Some(c) = changes_at {
                next = Some(next.map_or(c, |n: u64| n.min(c)));
            }
            if collect {
                views.push(flow_view(&name, key, &v, class, now));
            }
        }
        if let Some(flows) = self.index.get_mut(&slot) {
            for k in gone {
                flows.remove(&k);
            }
        }
        (counts, next, views)
    }

    fn view(&mut self, name: &str, now: u64, t: Timeouts) -> Option<PodView> {
        let slot = self.pods.get(name)?.slot;
        let counters = self.datapath.counters(slot).unwrap_or_default();
        let (counts, _, _) = self.classify_pod(slot, now, t, false);
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
            note: None,
        })
    }
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
        packets_in: u64::from(v.packets_in),
        packets_out: u64::from(v.packets_out),
        bytes_in: v.bytes_in,
        bytes_out: v.bytes_out,
        pinned: None,
    }
}
