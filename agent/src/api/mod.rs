//! The local API: HTTP/1.1 with JSON over a unix socket, served by the agent
//! (`server`) and used by the CLI (`client`). The request bodies below and the
//! views it serves (`crate::views`, re-exported here) are its wire format and
//! what `-o json` prints. [`serve`] runs it and the node API (`prestop`).

pub mod access;
pub mod client;
pub mod prestop;
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

pub use crate::views::{
    FlowView, InterfaceView, MapFill, MapsView, PinView, PodView, SettingsView, SocketView, SocketsWhy, StatsView,
    Status, SteeringView, WaitOutcome, Why,
};

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
