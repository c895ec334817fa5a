//! The serde views the local API serves and the CLI reads: the wire format,
//! kept apart from the domain's own types. The node builds them, `api`
//! serves them (and re-exports them), the CLI prints them; a leaf, so this
//! imports nothing from the node, the API or Kubernetes.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{
    datapath::{AttachMode, Features},
    drain::PodState,
};

/// A pinned flow, as `status` and `flows` show it (addresses as text, IPv4 unmapped).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PinView {
    pub proto: String,
    pub client: String,
    pub frontend: String,
    pub backend: String,
    /// The address the backend sees as its peer (the client, or kube-proxy's SNAT address).
    pub backend_peer: String,
    pub pod: String,
    pub dead: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodView {
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub state: PodState,
    pub active_flows: u64,
    pub idle_flows: u64,
    pub outbound_flows: u64,
    pub new_flows_since_termination: u64,
    pub terminating_for_secs: Option<f64>,
    pub deadline_in_secs: Option<f64>,
    pub quiet_for_secs: Option<f64>,
    pub quiet_period_secs: Option<f64>,
    pub interfaces: Vec<String>,
    /// Open inbound TCP sockets, as the sockets tracepoint counts them.
    #[serde(default)]
    pub open_sockets: u64,
    /// Why a pod is `skipped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Live inbound flows to its ignored ports (they hold nothing).
    #[serde(default)]
    pub ignored_flows: u64,
    /// Set when the flow counts above are not from this moment but from
    /// the pod's latest full count, this many seconds ago: a listing counts
    /// only its first few thousand flows afresh (see `node/census.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted_secs_ago: Option<f64>,
    /// Its own drain settings, as the agent applies them.
    #[serde(default)]
    pub settings: SettingsView,
}

/// A pod's drain settings (Kubernetes: its `conndrain.io/` annotations;
/// standalone: `pod add` flags), as the agent applies them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SettingsView {
    /// The quiet period its drain uses (or will use).
    pub quiet_period_secs: f64,
    /// Where it comes from: "default" (the agent's `--quiet-period`),
    /// "annotation conndrain.io/quiet-period", "pod add --quiet-period" or
    /// "pod terminate --quiet-period".
    pub quiet_period_from: String,
    /// Its listening ports whose inbound connections never hold it.
    pub ignore_ports: Vec<u16>,
    /// Settings refused for a bad value, each saying what is used instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlowView {
    pub pod: String,
    pub proto: String,
    pub direction: String,
    pub state: String,
    pub pod_addr: String,
    pub peer_addr: String,
    pub age_secs: f64,
    pub idle_secs: f64,
    pub idle: bool,
    pub active: bool,
    /// Inbound to one of the pod's ignored ports: does not hold it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignored: bool,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Set when the flow is pinned to this pod (its backend is terminating).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<PinView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Why {
    pub pod: PodView,
    /// The flows that hold the pod (active inbound).
    pub holding: Vec<FlowView>,
    /// Flows that exist but do not hold it (idle keep-alives, outbound).
    pub not_holding: Vec<FlowView>,
    pub idle_timeout_secs: f64,
    /// What the pod's own sockets say (the ground truth a drain is confirmed against).
    #[serde(default)]
    pub sockets: SocketsWhy,
    /// Ports whose connections from the node's own processes are probes.
    #[serde(default)]
    pub probe_ports: Vec<u16>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SocketsWhy {
    /// Open inbound TCP sockets of the pod.
    pub open: u64,
    /// Whether the sockets can confirm a drain (else the pod goes to its deadline).
    pub confirms_drain: bool,
    /// Why they cannot, if they cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Open sockets no active or idle flow accounts for: each holds the pod.
    pub holding: Vec<SocketView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SocketView {
    pub pod_addr: String,
    pub peer_addr: String,
    pub why: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WaitOutcome {
    pub pod: String,
    pub state: PodState,
    /// Active inbound flows left at the outcome (non-zero only at a deadline).
    pub active_flows: u64,
    pub waited_secs: f64,
    /// True when the caller's timeout passed first.
    pub timed_out: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InterfaceView {
    pub name: String,
    pub ifindex: u32,
    pub pods: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapFill {
    pub max: u64,
    pub used: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapsView {
    /// `max`: the flow table's size; `used`: the flows the agent knows of
    /// from the datapath's events (established TCP and UDP flows of the
    /// registered pods, not yet seen closed or gone), not the table's exact
    /// fill, which only a walk could tell (`conndrain flows` walks). A flow
    /// the LRU evicted counts until its pod's flows are next counted.
    pub flows: MapFill,
    /// Flows of draining pods, kept out of the LRU flow table. `used`: as
    /// many as the agent's last sweep (every 5 s) left, plus the flows it
    /// moved there since and less those it removed.
    pub held: MapFill,
    pub pods: MapFill,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatsView {
    pub packets: u64,
    pub unparsed: u64,
    pub not_pod: u64,
    pub flows_created: u64,
    pub insert_failed: u64,
    /// Live flows the LRU flow table evicted (seen by the agent's point lookups).
    pub flows_evicted: u64,
    /// Flows of draining pods put into the held table.
    pub held: u64,
    /// Flows of draining pods the held table had no room for (left where the LRU may evict them).
    pub hold_failed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub mode: String,
    pub kernel: Features,
    pub attach_mode: AttachMode,
    pub interfaces: Vec<InterfaceView>,
    pub maps: MapsView,
    pub stats: StatsView,
    pub events_lost: u64,
    pub events_received: u64,
    pub steering: SteeringView,
    pub idle_timeout_secs: f64,
    pub udp_timeout_secs: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SteeringView {
    /// Flows currently pinned to a terminating backend.
    pub pinned_flows: u64,
    /// Packets the datapath rewrote and redirected for pinned flows.
    pub steered_packets: u64,
    /// RSTs sent for pinned flows whose pod is gone.
    pub resets_sent: u64,
    /// Pinned packets that could not be steered (passed on unchanged).
    pub steer_failed: u64,
    pub pins: Vec<PinView>,
}
