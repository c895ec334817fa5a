//! The local API: HTTP/1.1 with JSON over a unix socket, served by the agent
//! (`server`) and used by the CLI (`client`). The types below are its wire
//! format and what `-o json` prints. [`serve`] runs it and the node API.

pub mod access;
pub mod client;
pub mod node;
pub mod server;

use std::{net::IpAddr, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::ConnectInfo,
    http::{Method, Request, StatusCode, Uri},
    response::{IntoResponse, Response},
    serve::Listener,
};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use serde::{Deserialize, Serialize};
use tower::ServiceExt as _;
use tower_http::{limit::RequestBodyLimitLayer, timeout::RequestBodyTimeoutLayer};

use crate::{datapath::AttachMode, datapath::Features, drain::PodState};

pub const DEFAULT_SOCKET: &str = "/run/conndrain/conndrain.sock";
/// Port of the node API's `/v1/wait` on the node IP.
pub const DEFAULT_WAIT_PORT: u16 = 9464;
/// Loopback port the preStop intercept sends the kubelet's `httpGet` to.
pub const DEFAULT_INTERCEPT_LISTEN_PORT: u16 = 9466;
/// Port of `/metrics`, `/healthz` and `/readyz`.
pub const DEFAULT_METRICS_PORT: u16 = 9465;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddPod {
    pub name: String,
    pub ips: Vec<IpAddr>,
    /// Ports the kubelet probes (new connections from the node's own
    /// processes to them do not restart the quiet period).
    #[serde(default)]
    pub probe_ports: Vec<u16>,
    /// The pod's own quiet period (`pod add --quiet-period`); none: the agent's.
    #[serde(default)]
    pub quiet_period_secs: Option<f64>,
    /// Its listening ports whose inbound connections never hold it (`pod add --ignore-port`).
    #[serde(default)]
    pub ignore_ports: Vec<u16>,
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
    /// Open inbound TCP sockets, as the sockets tracepoint counts them.
    #[serde(default)]
    pub open_sockets: u64,
    /// Why a pod is `skipped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Live inbound flows to its ignored ports (they hold nothing).
    #[serde(default)]
    pub ignored_flows: u64,
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
    pub pinned: Option<crate::views::PinView>,
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
    pub pins: Vec<crate::views::PinView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Longest a client may take to send a request head, or a body once its head
/// is in; also how long an idle keep-alive connection stays open. The CLI and
/// the preStop client send a whole request at once, so only a stuck or
/// hostile client ever waits this long, and then it loses its connection.
/// It also bounds how long an answer may wait for the client to read it
/// (hyper has no write timeout), so a caller that asks for `/v1/flows` and
/// never reads cannot keep its slot.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (hyper's read buffer): our requests are a few hundred
/// bytes, and each connection a slow client holds costs at most this.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest request body: the largest the APIs take is a pod and its IPs.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// An error answer, as JSON in the shape the CLI reads.
pub(crate) fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(ErrorBody { error: msg.into() })).into_response()
}

/// Answers unknown paths and methods with an error that says what `router`
/// serves (axum's own are empty bodies).
pub(crate) fn refuse_unknown(router: Router, serves: &'static str) -> Router {
    router
        .fallback(move |uri: Uri| async move {
            error(StatusCode::NOT_FOUND, format!("no endpoint {}; {serves}", uri.path()))
        })
        .method_not_allowed_fallback(move |method: Method, uri: Uri| async move {
            error(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {}; {serves}", uri.path()))
        })
}

/// Serves `app` on `listener` within bounds that slow or hostile clients
/// cannot stretch, which `axum::serve` does not set: [`CLIENT_TIMEOUT`] to
/// send a request or to take an answer, heads and bodies of bounded size, and at most
/// `max_connections` at once (further ones are closed at once, so a flood
/// cannot take the file descriptors the agent needs for its own work).
/// Handlers get the peer's address as `ConnectInfo<L::Addr>`.
pub async fn serve<L>(mut listener: L, app: Router, max_connections: usize) -> anyhow::Result<()>
where
    L: Listener,
    L::Addr: Clone + Send + Sync + 'static,
{
    let app = app
        .layer(RequestBodyTimeoutLayer::new(CLIENT_TIMEOUT))
        // Outermost: refuses a Content-Length over the limit before anything waits for the body.
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(CLIENT_TIMEOUT).max_buf_size(MAX_HEAD_BYTES);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut full = false;
    loop {
        // axum's accept retries on errors (and backs off when out of file descriptors).
        let (io, peer) = listener.accept().await;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Once per spell at the limit: a flood must not flood the log too.
            if !std::mem::replace(&mut full, true) {
                tracing::warn!(max_connections, "too many connections; closing new ones until some end");
            }
            continue;
        };
        full = false;
        let app = app.clone().map_request(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer.clone()));
            req
        });
        // A wait idles for minutes without writing, so only writes are timed.
        let mut io = tokio_io_timeout::TimeoutStream::new(io);
        io.set_write_timeout(Some(CLIENT_TIMEOUT));
        let conn = http.serve_connection(TokioIo::new(Box::pin(io)), TowerToHyperService::new(app));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("API connection ended: {e}");
            }
            drop(slot);
        });
    }
}
