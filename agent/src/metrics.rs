//! Prometheus metrics (prometheus-client): the one place that owns their names.
//!
//! Counters are counters (`_total`), durations are in seconds, and a pod is
//! two labels, `namespace` and `pod`. The datapath's own counters (per-CPU
//! sums since its maps were created) are read at each scrape and exported as
//! counters too: they only grow, and [`advance`] never moves one back.

use std::sync::atomic::Ordering;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

/// The commit the binary was built from (agent/build.rs), empty if unknown.
pub const GIT_COMMIT: &str = env!("CONNDRAIN_GIT_COMMIT");

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    /// Empty for a standalone pod declared without one (`pod add NAME`).
    pub namespace: String,
    pub pod: String,
}

impl PodLabels {
    /// The labels of a pod named `namespace/name` (Kubernetes mode) or `name`.
    #[must_use]
    pub fn of(name: &str) -> Self {
        let (namespace, pod) = name.split_once('/').unwrap_or(("", name));
        Self { namespace: namespace.to_owned(), pod: pod.to_owned() }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    git_commit: &'static str,
}

/// How a drain ended (`conndrain_drains_total`).
pub const DRAIN_OUTCOMES: [&str; 2] = ["drained", "deadline"];

/// How a preStop wait (`GET /v1/wait`) ended (`conndrain_prestop_waits_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreStopOutcome {
    /// Answered: the pod is drained.
    Drained,
    /// Answered: the pod reached its deadline with flows still open.
    Deadline,
    /// Answered at once: the agent cannot see the pod's traffic; the hook falls back to sleeping.
    Skipped,
    /// The caller hung up before the answer (its timeout, or the kubelet ending the hook).
    Cancelled,
    /// Refused (403 or 400): the caller is no pod of this node, or the request named something.
    Refused,
    /// Refused with 429: too many waits open, on the node or for this pod.
    Busy,
    /// The pod was removed while it waited (409).
    Error,
}

impl PreStopOutcome {
    pub const ALL: [Self; 7] =
        [Self::Drained, Self::Deadline, Self::Skipped, Self::Cancelled, Self::Refused, Self::Busy, Self::Error];

    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Drained => "drained",
            Self::Deadline => "deadline",
            Self::Skipped => "skipped",
            Self::Cancelled => "cancelled",
            Self::Refused => "refused",
            Self::Busy => "busy",
            Self::Error => "error",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    /// One scrape at a time: a scrape clears and refills the per-pod families.
    pub scraping: tokio::sync::Mutex<()>,
    pub active_flows: Family<PodLabels, Gauge>,
    pub idle_flows: Family<PodLabels, Gauge>,
    pub outbound_flows: Family<PodLabels, Gauge>,
    pub new_flows_after_termination: Family<PodLabels, Gauge>,
    pub drains: Family<OutcomeLabels, Counter>,
    pub drain_duration: Histogram,
    pub pre_stop_waits: Family<OutcomeLabels, Counter>,
    pub flow_table_used: Gauge,
    pub flow_table_max: Gauge,
    pub flows_evicted: Counter,
    pub held_flows: Gauge,
    pub hold_failed: Counter,
    pub events_lost: Counter,
    pub pinned_flows: Gauge,
    pub steered_packets: Counter,
    pub resets_sent: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("conndrain"),
            scraping: tokio::sync::Mutex::default(),
            active_flows: Family::default(),
            idle_flows: Family::default(),
            outbound_flows: Family::default(),
            new_flows_after_termination: Family::default(),
            drains: Family::default(),
            // 0.1 s to ~100 s: drains end between "no connections at all" and long deadlines.
            drain_duration: Histogram::new([0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]),
            pre_stop_waits: Family::default(),
            flow_table_used: Gauge::default(),
            flow_table_max: Gauge::default(),
            flows_evicted: Counter::default(),
            held_flows: Gauge::default(),
            hold_failed: Counter::default(),
            events_lost: Counter::default(),
            pinned_flows: Gauge::default(),
            steered_packets: Counter::default(),
            resets_sent: Counter::default(),
        };
        // Every outcome from the start, at 0, so that rate() and alerts see the first one.
        for outcome in DRAIN_OUTCOMES {
            m.drains.get_or_create(&OutcomeLabels { outcome }).inc_by(0);
        }
        for o in PreStopOutcome::ALL {
            m.pre_stop_waits.get_or_create(&OutcomeLabels { outcome: o.label() }).inc_by(0);
        }
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION"), git_commit: GIT_COMMIT }).set(1);
        let r = &mut m.registry;
        r.register("build_info", "The agent's version and the git commit it was built from; always 1", build_info);
        r.register("pod_active_flows", "Active inbound flows that hold the pod", m.active_flows.clone());
        r.register("pod_idle_flows", "Idle keep-alive inbound flows (do not hold the pod)", m.idle_flows.clone());
        r.register("pod_outbound_flows", "Flows the pod opened", m.outbound_flows.clone());
        r.register(
            "pod_new_flows_after_termination",
            "New inbound flows since the pod began terminating",
            m.new_flows_after_termination.clone(),
        );
        r.register("drains", "Finished drains by outcome (drained, deadline)", m.drains.clone());
        r.register_with_unit(
            "drain_duration",
            "Time from termination to drained or deadline",
            Unit::Seconds,
            m.drain_duration.clone(),
        );
        r.register(
            "prestop_waits",
            "preStop waits (GET /v1/wait) by how they ended: drained, deadline, skipped, cancelled (the caller \
             hung up), refused (no pod of this node, or a bad request), busy (429), error (pod removed)",
            m.pre_stop_waits.clone(),
        );
        r.register(
            "flow_table_entries",
            "Flows the agent knows of from the datapath's events (established TCP and UDP flows of \
             registered pods not seen closed or gone), not an exact count of the flow table",
            m.flow_table_used.clone(),
        );
        r.register("flow_table_max_entries", "Size of the flow table", m.flow_table_max.clone());
        r.register("flows_evicted", "Live flows lost from the flow table (LRU eviction)", m.flows_evicted.clone());
        r.register("held_flows", "Flows of draining pods in the held table (never evicted), as of the agent's last sweep (every 5 s) and its own moves since", m.held_flows.clone());
        r.register(
            "hold_failed",
            "Flows of draining pods the held table had no room for (left in the LRU flow table), since the maps \
             were created",
            m.hold_failed.clone(),
        );
        r.register(
            "events_lost",
            "Datapath events the ring buffer had no room for, since the maps were created",
            m.events_lost.clone(),
        );
        r.register("pinned_flows", "Flows pinned to a terminating backend", m.pinned_flows.clone());
        r.register(
            "steered_packets",
            "Packets of pinned flows rewritten and redirected, since the maps were created",
            m.steered_packets.clone(),
        );
        r.register(
            "resets_sent",
            "RSTs sent for pinned flows whose pod is gone, since the maps were created",
            m.resets_sent.clone(),
        );
        m
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }

    pub fn count_wait(&self, outcome: PreStopOutcome) {
        self.pre_stop_waits.get_or_create(&OutcomeLabels { outcome: outcome.label() }).inc();
    }
}

/// Brings a counter up to `total`, a count the datapath keeps; never down,
/// even when two scrapes race.
pub fn advance(counter: &Counter, total: u64) {
    counter.inner().fetch_max(total, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> String {
        let m = Metrics::default();
        m.active_flows.get_or_create(&PodLabels::of("shop/web-1")).set(2);
        m.idle_flows.get_or_create(&PodLabels::of("standalone")).set(1);
        advance(&m.steered_packets, 5);
        advance(&m.steered_packets, 3);
        m.count_wait(PreStopOutcome::Cancelled);
        m.encode()
    }

    #[test]
    fn a_pod_is_a_namespace_and_a_name() {
        let page = page();
        assert!(page.contains(r#"conndrain_pod_active_flows{namespace="shop",pod="web-1"} 2"#), "{page}");
        assert!(page.contains(r#"conndrain_pod_idle_flows{namespace="",pod="standalone"} 1"#), "{page}");
    }

    #[test]
    fn counters_end_in_total_and_never_go_back() {
        let page = page();
        for name in [
            "conndrain_drains",
            "conndrain_prestop_waits",
            "conndrain_flows_evicted",
            "conndrain_hold_failed",
            "conndrain_events_lost",
            "conndrain_steered_packets",
            "conndrain_resets_sent",
        ] {
            assert!(page.contains(&format!("# TYPE {name} counter\n")), "{name} is a counter: {page}");
            assert!(page.contains(&format!("\n{name}_total")), "{name}_total: {page}");
        }
        assert!(page.contains("conndrain_steered_packets_total 5\n"), "{page}");
        assert!(page.contains("# UNIT conndrain_drain_duration_seconds seconds\n"), "{page}");
    }

    #[test]
    fn every_outcome_is_there_from_the_start() {
        let page = page();
        for o in PreStopOutcome::ALL {
            let n = u8::from(o == PreStopOutcome::Cancelled);
            let line = format!("conndrain_prestop_waits_total{{outcome=\"{}\"}} {n}\n", o.label());
            assert!(page.contains(&line), "{line}: {page}");
        }
        for o in DRAIN_OUTCOMES {
            assert!(page.contains(&format!("conndrain_drains_total{{outcome=\"{o}\"}} 0\n")), "{page}");
        }
        let build = format!(
            "conndrain_build_info{{version=\"{}\",git_commit=\"{GIT_COMMIT}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        assert!(page.contains(&build), "{build}: {page}");
    }
}
