//! The local API: HTTP/1.1 with JSON over a unix socket, served by the agent
//! (`server`) and used by the CLI (`client`). The types below are its wire
//! format and what `-o json` prints.

pub mod client;
pub mod node;
pub mod server;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{datapath::AttachMode, datapath::Features, drain::PodState};

pub const DEFAULT_SOCKET: &str = "/run/conndrain/conndrain.sock";
/// Port of the node API's `/v1/wait` on the node IP.
pub const DEFAULT_WAIT_PORT: u16 = 9464;
/// Port of `/metrics`, `/healthz` and `/readyz`.
pub const DEFAULT_METRICS_PORT: u16 = 9465;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddPod {
    pub name: String,
    pub ips: Vec<IpAddr>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Terminate {
    pub deadline_secs: Option<f64>,
    pub quiet_period_secs: Option<f64>,
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
    /// Why a pod is `skipped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
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
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Set when the flow is pinned to this pod (its backend is terminating).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<crate::steering::PinView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Why {
    pub pod: PodView,
    /// The flows that hold the pod (active inbound).
    pub holding: Vec<FlowView>,
    /// Flows that exist but do not hold it (idle keep-alives, outbound).
    pub not_holding: Vec<FlowView>,
    pub idle_timeout_secs: f64,
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
    pub flows: MapFill,
    /// Flows of draining pods, kept out of the LRU flow table.
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
    pub pins: Vec<crate::steering::PinView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
