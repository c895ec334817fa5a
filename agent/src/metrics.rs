//! Prometheus metrics (prometheus-client): the one place that owns their names.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `drained` or `deadline`.
    pub outcome: String,
}

pub struct Metrics {
    registry: Registry,
    pub active_flows: Family<PodLabels, Gauge>,
    pub idle_flows: Family<PodLabels, Gauge>,
    pub outbound_flows: Family<PodLabels, Gauge>,
    pub new_flows_after_termination: Family<PodLabels, Gauge>,
    pub drains: Family<OutcomeLabels, Counter>,
    pub drain_duration: Histogram,
    pub flow_table_used: Gauge,
    pub flow_table_max: Gauge,
    pub flows_evicted: Counter,
    pub held_flows: Gauge,
    /// Read from the datapath's per-CPU counter at each scrape, hence a gauge.
    pub hold_failed: Gauge,
    pub events_lost: Gauge,
    pub pinned_flows: Gauge,
    /// Read from the datapath's per-CPU counter at each scrape, hence a gauge.
    pub steered_packets: Gauge,
    pub resets_sent: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("conndrain"),
            active_flows: Family::default(),
            idle_flows: Family::default(),
            outbound_flows: Family::default(),
            new_flows_after_termination: Family::default(),
            drains: Family::default(),
            // 0.1 s to ~100 s: drains end between "no connections at all" and long deadlines.
            drain_duration: Histogram::new([0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]),
            flow_table_used: Gauge::default(),
            flow_table_max: Gauge::default(),
            flows_evicted: Counter::default(),
            held_flows: Gauge::default(),
            hold_failed: Gauge::default(),
            events_lost: Gauge::default(),
            pinned_flows: Gauge::default(),
            steered_packets: Gauge::default(),
            resets_sent: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register("pod_active_flows", "Active inbound flows that hold the pod", m.active_flows.clone());
        r.register("pod_idle_flows", "Idle keep-alive inbound flows (do not hold the pod)", m.idle_flows.clone());
        r.register("pod_outbound_flows", "Flows the pod opened", m.outbound_flows.clone());
        r.register(
            "pod_new_flows_after_termination",
            "New inbound flows since the pod began terminating",
            m.new_flows_after_termination.clone(),
        );
        r.register("drains", "Finished drains by outcome", m.drains.clone());
        r.register("drain_duration_seconds", "Time from termination to drained or deadline", m.drain_duration.clone());
        r.register("flow_table_entries", "Entries in the flow table", m.flow_table_used.clone());
        r.register("flow_table_max_entries", "Size of the flow table", m.flow_table_max.clone());
        r.register("flows_evicted", "Live flows lost from the flow table (LRU eviction)", m.flows_evicted.clone());
        r.register("held_flows", "Flows of draining pods in the held table (never evicted)", m.held_flows.clone());
        r.register(
            "hold_failed",
            "Flows of draining pods the held table had no room for (left in the LRU flow table)",
            m.hold_failed.clone(),
        );
        r.register("events_lost", "Datapath events the ring buffer had no room for", m.events_lost.clone());
        r.register("pinned_flows", "Flows pinned to a terminating backend", m.pinned_flows.clone());
        r.register(
            "steered_packets",
            "Packets of pinned flows rewritten and redirected since the maps were created",
            m.steered_packets.clone(),
        );
        r.register("resets_sent", "RSTs sent for pinned flows whose pod is gone", m.resets_sent.clone());
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
}
