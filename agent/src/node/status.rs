//! What the node shows: pod, flow and status views for the API and the CLI
//! (`crate::views`), and the metrics scrape built from them.

use std::{net::SocketAddr, time::Duration};

use conndrain_common::{FlowKey, FlowValue, PROTO_TCP, PROTO_UDP, direction, stats, tcp_state};

use crate::{
    datapath,
    drain::{self, Counting, FlowClass, PodState, Termination, Timeouts},
    flowindex::{SocketEvidence, SocketHold},
    metrics::{PodLabels, advance},
    views::{
        FlowView, InterfaceView, MapFill, MapsView, PinView, PodView, SettingsView, SocketView, SocketsWhy, StatsView,
        Status, SteeringView, Why,
    },
};

use super::{Inner, Node, PodError, PodSettings, SkippedPod, nanos, now_ns, secs};

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
        counted_secs_ago: None,
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
                    SocketHold::Unseen => {
                        "open socket whose packets conndrain never saw (another path, evicted, or a namespace reusing \
                         the address)"
                    }
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

impl Node {
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

    pub async fn pods(&self) -> Vec<PodView> {
        let mut inner = self.inner.lock().await;
        let now = now_ns();
        let names: Vec<String> = inner.pods.keys().cloned().collect();
        let (t, quiet) = (self.settings.timeouts, self.settings.default_quiet_period);
        let mut budget = super::census::LISTING_LOOKUPS;
        let mut out: Vec<PodView> = names.iter().filter_map(|n| inner.view(n, now, t, quiet, &mut budget)).collect();
        out.extend(inner.skipped.iter().map(|(name, skipped)| skipped_view(name, skipped)));
        out
    }

    pub async fn pod(&self, name: &str) -> Result<PodView, PodError> {
        let mut inner = self.inner.lock().await;
        // One pod: counted afresh, whatever its size.
        let mut unlimited = usize::MAX;
        let view =
            inner.view(name, now_ns(), self.settings.timeouts, self.settings.default_quiet_period, &mut unlimited);
        view.or_else(|| inner.skipped.get(name).map(|s| skipped_view(name, s)))
            .ok_or_else(|| PodError::Unknown(name.to_owned()))
    }

    pub async fn why(&self, name: &str) -> Result<Why, PodError> {
        let mut inner = self.inner.lock().await;
        let now = now_ns();
        let t = self.settings.timeouts;
        let mut unlimited = usize::MAX;
        inner.datapath.check_sockets_misses();
        let Some(pod) = inner.view(name, now, t, self.settings.default_quiet_period, &mut unlimited) else {
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
                let unknown = p.sockets_unknown(&inner.datapath);
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
        // Counts the agent keeps (no walk of FLOWS or HELD): a status and a
        // metrics scrape cost the same at 1M flows as at none.
        let known_flows = inner.index.tracked() as u64;
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
                flows: MapFill { max: u64::from(dp.max_flows), used: known_flows },
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
}

impl Inner {
    /// Adds the evictions the index found since the last call to the metric.
    pub(super) fn publish_evictions(&mut self) {
        self.metrics.flows_evicted.inc_by(std::mem::take(&mut self.index.evicted));
    }

    /// The pod's view. Its flows are counted afresh when they are at most
    /// `budget` lookups, which are then spent; else its latest full count is
    /// shown, with its age (`census.rs`).
    pub(super) fn view(
        &mut self,
        name: &str,
        now: u64,
        t: Timeouts,
        default_quiet: Duration,
        budget: &mut usize,
    ) -> Option<PodView> {
        let (slot, ignore) = self.pods.get(name).map(|p| (p.slot, p.settings.ignore_ports.clone()))?;
        let counters = self.datapath.counters(slot).unwrap_or_default();
        let open_sockets = self.datapath.pod_sockets(slot).map(|s| s.open).unwrap_or(0);
        let c = Counting { timeouts: t, ignore_ports: &ignore };
        let (counts, counted_secs_ago) = match self.index.counted(slot) {
            Some(k) if self.index.len(slot) > *budget => (k.counts, Some(secs(now.saturating_sub(k.at_ns)))),
            _ => {
                *budget = budget.saturating_sub(self.index.len(slot));
                let (counts, _, _) = self.index.classify_pod(&self.datapath, slot, now, c, false);
                self.index.remember(slot, counts, now);
                (counts, None)
            }
        };
        self.publish_evictions();
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
            counted_secs_ago,
            settings: settings_view(&pod.settings, term, default_quiet),
        })
    }
}
