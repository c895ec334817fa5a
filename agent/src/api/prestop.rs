//! The node API, served on the node's IP for the pods of this node (the agent
//! runs with hostNetwork):
//!
//! - `GET /v1/wait`: a pod's preStop hook blocks here until that pod is drained
//!   or at its deadline. The caller is identified only by the connection's
//!   source IP, and there is no parameter naming a pod, so a pod can wait for
//!   itself and nothing else: it cannot release, inspect or delay another pod.
//!   A caller that is not a pod on this node gets 403. Nothing in the request
//!   (no header such as X-Forwarded-For) can change who the caller is. A pod
//!   that claims another pod's IP cannot complete a handshake, because the
//!   node routes the replies to the real owner's interface. That holds with a
//!   veth per pod; pods on a shared bridge can poison each other's ARP
//!   entries, so there it takes the CNI's anti-spoofing (e.g. `macspoofchk`).
//! - `GET /v1/wait` on the preStop intercept's loopback listener: the
//!   kubelet's `lifecycle.preStop.httpGet` to `podIP:<intercept port>`, sent
//!   here by the cgroup programs (`datapath/intercept.rs`). The pod is the one
//!   whose IP the kubelet dialled, as the programs recorded it for this
//!   connection; a connection they did not rewrite (a node process dialling
//!   loopback itself) gets 403. Only processes of the node's network
//!   namespace are rewritten, so nothing in a pod reaches this listener.
//! - `GET /metrics`, `/healthz`, `/readyz` on a second listener
//!   (`--metrics-bind-address`). `/metrics` answers the callers that
//!   `--metrics-allow` lists, whoever they are: a Prometheus pod on this node
//!   like one on another node (see `access.rs`). The health endpoints answer
//!   anyone who reaches the listener (the kubelet's probes).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Json, Router,
    extract::{ConnectInfo, RawQuery, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tower_http::limit::RequestBodyLimitLayer;

use super::{WaitOutcome, access::MetricsAllow, error};
use crate::{datapath::intercept::Intercept, drain::PodState, metrics::PreStopOutcome, node::Node};

pub struct NodeApi {
    pub node: Arc<Node>,
    /// Bounds concurrent `/v1/wait` callers.
    pub waiters: Semaphore,
    /// Waits open per pod, so that one pod cannot take every slot.
    pub per_pod: Mutex<HashMap<String, usize>>,
    /// Most waits one pod may have open at once (`--max-waiters-per-pod`).
    pub per_pod_limit: usize,
    /// Set when the programs are loaded and the first pod sync is done.
    pub ready: Arc<AtomicBool>,
    /// Who may read `/metrics` (`--metrics-allow`).
    pub metrics_allow: MetricsAllow,
}

/// Most connections to each node API listener at once: room for the default
/// `--max-waiters` (512) and as many callers again. Beyond it, connections
/// are closed at once; a preStop client then falls back to sleeping.
pub const MAX_CONNECTIONS: usize = 1024;

/// Default of `--max-waiters-per-pod`: one wait per container's preStop hook
/// is plenty; beyond it a pod (buggy or hostile) would only crowd out the
/// other pods' hooks.
pub const MAX_WAITERS_PER_POD: usize = 8;

/// One open wait of a pod, counted in `NodeApi::per_pod` while it lives.
struct PodWaiter<'a> {
    per_pod: &'a Mutex<HashMap<String, usize>>,
    pod: String,
}

impl<'a> PodWaiter<'a> {
    fn enter(per_pod: &'a Mutex<HashMap<String, usize>>, limit: usize, pod: &str) -> Option<Self> {
        let mut open = per_pod.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(pod.to_owned()).or_default();
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(Self { per_pod, pod: pod.to_owned() })
    }
}

impl Drop for PodWaiter<'_> {
    fn drop(&mut self) {
        let mut open = self.per_pod.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.pod) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.pod);
            }
        }
    }
}

pub fn wait_router(api: Arc<NodeApi>) -> Router {
    let router = Router::new()
        .route("/v1/wait", get(wait))
        // GET only: a body announced bigger than this is refused before anything else.
        .layer(RequestBodyLimitLayer::new(1024))
        .with_state(api);
    super::refuse_unknown(router, "this port serves GET /v1/wait, for a pod's preStop `conndrain wait`")
}

/// The preStop intercept's listener: `GET /v1/wait` only, as the kubelet's
/// `httpGet` sends it.
pub fn intercept_router(api: Arc<NodeApi>) -> Router {
    let router =
        Router::new().route("/v1/wait", get(intercepted_wait)).layer(RequestBodyLimitLayer::new(1024)).with_state(api);
    super::refuse_unknown(router, "this port serves GET /v1/wait, for the kubelet's preStop httpGet to a pod IP")
}

pub fn metrics_router(api: Arc<NodeApi>) -> Router {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .layer(RequestBodyLimitLayer::new(1024))
        .with_state(api);
    super::refuse_unknown(router, "this port serves GET /metrics, /healthz and /readyz")
}

/// Serves a node API router; handlers learn the caller from the TCP
/// connection's source address, never from anything the request says.
pub async fn serve<L>(listener: L, router: Router) -> anyhow::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: Clone + Send + Sync + 'static,
{
    super::serve(listener, router, MAX_CONNECTIONS).await
}

/// A connection accepted by the intercept's listener: its client end, and
/// the pod IP the kubelet dialled if the programs rewrote this connection.
#[derive(Clone, Debug)]
pub struct Dialled {
    pub peer: SocketAddr,
    pub pod_ip: Option<IpAddr>,
}

/// The intercept's loopback listener: each accepted connection carries the
/// pod IP it dialled (looked up once, at accept, so keep-alive requests on
/// it keep their pod).
pub struct InterceptListener {
    pub listener: TcpListener,
    pub intercept: Arc<Intercept>,
}

impl axum::serve::Listener for InterceptListener {
    type Io = tokio::net::TcpStream;
    type Addr = Dialled;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, peer) = axum::serve::Listener::accept(&mut self.listener).await;
        (io, Dialled { peer, pod_ip: self.intercept.take_dialled(peer) })
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Dialled { peer: self.listener.local_addr()?, pod_ip: None })
    }
}

/// Counts one `/v1/wait` in `conndrain_prestop_waits_total` when it ends:
/// as `cancelled` unless an outcome was set, because a caller that hangs up
/// (its own timeout, the kubelet ending the hook) drops the handler mid-wait.
struct WaitCount<'a> {
    api: &'a NodeApi,
    outcome: PreStopOutcome,
}

impl Drop for WaitCount<'_> {
    fn drop(&mut self) {
        self.api.node.metrics.count_wait(self.outcome);
    }
}

async fn wait(
    State(api): State<Arc<NodeApi>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
) -> Response {
    let mut count = WaitCount { api: &api, outcome: PreStopOutcome::Cancelled };
    // A v4 caller of a dual-stack listener shows as ::ffff:a.b.c.d; name it as itself.
    let (outcome, response) = answer_wait(&api, peer.ip().to_canonical(), query, "exec").await;
    count.outcome = outcome;
    response
}

/// The kubelet's `httpGet`, intercepted: the pod is the one it dialled.
async fn intercepted_wait(
    State(api): State<Arc<NodeApi>>,
    ConnectInfo(dialled): ConnectInfo<Dialled>,
    RawQuery(query): RawQuery,
) -> Response {
    let mut count = WaitCount { api: &api, outcome: PreStopOutcome::Cancelled };
    let Dialled { peer, pod_ip } = dialled;
    let (outcome, response) = if let Some(ip) = pod_ip {
        answer_wait(&api, ip, query, "httpGet").await
    } else {
        tracing::info!(%peer, "refused an intercept connection that no pod IP was dialled for");
        let msg = "this listener answers only the kubelet's preStop httpGet to a pod IP, redirected here by conndrain";
        (PreStopOutcome::Refused, error(StatusCode::FORBIDDEN, msg))
    };
    count.outcome = outcome;
    response
}

/// `/v1/wait` for the pod with address `ip`, the one the caller may wait
/// for: no parameters, the per-pod and node bounds, then the wait (`hook`:
/// how the call came, for the log).
async fn answer_wait(
    api: &NodeApi,
    ip: IpAddr,
    query: Option<String>,
    hook: &'static str,
) -> (PreStopOutcome, Response) {
    if query.is_some_and(|q| !q.is_empty()) {
        let msg = "/v1/wait takes no parameters: the caller is identified by its address and can only wait for itself";
        return (PreStopOutcome::Refused, error(StatusCode::BAD_REQUEST, msg));
    }
    let Some(pod) = api.node.pod_for_ip(ip).await else {
        tracing::info!(%ip, hook, "refused /v1/wait for an address that is no pod on this node");
        return (PreStopOutcome::Refused, error(StatusCode::FORBIDDEN, format!("{ip} is not a pod on this node")));
    };
    let Some(_mine) = PodWaiter::enter(&api.per_pod, api.per_pod_limit, &pod) else {
        let msg = format!("pod {pod} already has {} waits open; retry shortly", api.per_pod_limit);
        return (PreStopOutcome::Busy, error(StatusCode::TOO_MANY_REQUESTS, msg));
    };
    let Ok(_permit) = api.waiters.try_acquire() else {
        return (PreStopOutcome::Busy, error(StatusCode::TOO_MANY_REQUESTS, "too many pods waiting; retry shortly"));
    };
    tracing::info!(%pod, hook, "preStop wait");
    // No timeout of our own: the pod's deadline ends every drain, and the
    // kubelet ends the hook at the grace period anyway.
    match api.node.wait(&pod, None).await {
        Ok(o) => {
            tracing::info!(%pod, state = ?o.state, waited_s = o.waited_secs, "preStop wait done");
            let outcome = match o.state {
                PodState::Drained => PreStopOutcome::Drained,
                PodState::Deadline => PreStopOutcome::Deadline,
                PodState::Skipped => PreStopOutcome::Skipped,
                // Without a timeout a wait ends on one of the above only.
                PodState::Serving | PodState::Draining => PreStopOutcome::Error,
            };
            (outcome, Json::<WaitOutcome>(o).into_response())
        }
        Err(e) => (PreStopOutcome::Error, error(StatusCode::CONFLICT, e.to_string())),
    }
}

async fn metrics(State(api): State<Arc<NodeApi>>, ConnectInfo(peer): ConnectInfo<SocketAddr>) -> Response {
    let caller = peer.ip().to_canonical();
    if !api.metrics_allow.allows(caller) {
        tracing::debug!(%caller, "refused /metrics: the caller is in no network of --metrics-allow");
        return error(StatusCode::FORBIDDEN, format!("{caller} may not read the metrics (--metrics-allow)"));
    }
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], api.node.scrape().await)
        .into_response()
}

async fn readyz(State(api): State<Arc<NodeApi>>) -> Response {
    if api.ready.load(Ordering::SeqCst) {
        "ready".into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "not ready: waiting for the first pod sync")
    }
}
