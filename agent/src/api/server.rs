//! The agent's side of the local API (axum on a unix socket). The socket is
//! mode 0600: only root on the node may drive or inspect the agent.

use std::{os::unix::fs::PermissionsExt as _, path::Path, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Path as UrlPath, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use tokio::net::UnixListener;

use super::{AddPod, Terminate};
use crate::node::{Node, PodError};

/// Binds the socket, replacing a stale one but never a live agent's.
pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "cannot {what} socket {}: {e}; choose a writable path with --socket or CONNDRAIN_SOCKET",
            path.display()
        )
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail("create the directory of", &e))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            anyhow::bail!("another conndrain agent is already serving on {}", path.display());
        }
        std::fs::remove_file(path).map_err(|e| fail("remove the stale", &e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| fail("create", &e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| fail("restrict", &e))?;
    Ok(listener)
}

/// Most connections to the local API at once: it is for the CLI, and only root
/// can reach it, so this is a backstop against a runaway script.
pub const MAX_CONNECTIONS: usize = 128;

pub fn router(node: Arc<Node>) -> Router {
    let router = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/pods", get(pods).post(add_pod))
        .route("/v1/pods/{name}", get(pod).delete(remove_pod))
        .route("/v1/pods/{name}/terminate", post(terminate))
        .route("/v1/pods/{name}/why", get(why))
        .route("/v1/pods/{name}/wait", get(wait))
        .route("/v1/flows", get(flows))
        .with_state(node);
    super::refuse_unknown(router, "the local API is for the conndrain CLI: see `conndrain --help`")
}

pub async fn serve(listener: UnixListener, node: Arc<Node>) -> anyhow::Result<()> {
    super::serve(listener, router(node), MAX_CONNECTIONS).await
}

struct ApiError(PodError);

impl From<PodError> for ApiError {
    fn from(e: PodError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match &self.0 {
            PodError::Unknown(_) | PodError::Removed(_) => StatusCode::NOT_FOUND,
            PodError::Exists(_) | PodError::IpTaken { .. } | PodError::AlreadyTerminating(_) => StatusCode::CONFLICT,
            PodError::NoIps(_) | PodError::BadName(_) | PodError::BadDuration { .. } | PodError::BadPort(_) => {
                StatusCode::BAD_REQUEST
            }
            PodError::Full(_) => StatusCode::INSUFFICIENT_STORAGE,
            PodError::Datapath(crate::error::Error::NoRoute { .. }) => StatusCode::UNPROCESSABLE_ENTITY,
            PodError::Datapath(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        super::error(code, self.0.to_string())
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

async fn status(State(node): State<Arc<Node>>) -> ApiResult<super::Status> {
    Ok(Json(node.status().await?))
}

async fn pods(State(node): State<Arc<Node>>) -> Json<Vec<super::PodView>> {
    Json(node.pods().await)
}

async fn pod(State(node): State<Arc<Node>>, UrlPath(name): UrlPath<String>) -> ApiResult<super::PodView> {
    Ok(Json(node.pod(&name).await?))
}

async fn add_pod(State(node): State<Arc<Node>>, Json(req): Json<AddPod>) -> ApiResult<super::PodView> {
    let quiet_period = crate::node::positive_secs("quiet period", req.quiet_period_secs)?;
    if req.ignore_ports.contains(&0) {
        return Err(PodError::BadPort(0).into());
    }
    let mut ignore_ports = req.ignore_ports;
    ignore_ports.sort_unstable();
    ignore_ports.dedup();
    let settings = crate::node::PodSettings {
        quiet_period,
        quiet_period_from: "pod add --quiet-period".to_owned(),
        ignore_ports,
        problems: Vec::new(),
    };
    let spec = crate::node::PodSpec { probe_ports: req.probe_ports, preexisting: false, settings };
    node.add_pod(&req.name, &req.ips, &spec).await?;
    Ok(Json(node.pod(&req.name).await?))
}

async fn remove_pod(State(node): State<Arc<Node>>, UrlPath(name): UrlPath<String>) -> Result<StatusCode, ApiError> {
    node.remove_pod(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn terminate(
    State(node): State<Arc<Node>>,
    UrlPath(name): UrlPath<String>,
    Json(req): Json<Terminate>,
) -> ApiResult<super::PodView> {
    let spec = crate::node::TerminateSpec {
        deadline: crate::node::positive_secs("deadline", req.deadline_secs)?,
        quiet_period: crate::node::positive_secs("quiet period", req.quiet_period_secs)?,
    };
    node.terminate(&name, &spec).await?;
    Ok(Json(node.pod(&name).await?))
}

async fn why(State(node): State<Arc<Node>>, UrlPath(name): UrlPath<String>) -> ApiResult<super::Why> {
    Ok(Json(node.why(&name).await?))
}

#[derive(Deserialize)]
struct WaitQuery {
    timeout_secs: Option<f64>,
}

async fn wait(
    State(node): State<Arc<Node>>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<super::WaitOutcome> {
    let timeout = match q.timeout_secs {
        None => None,
        Some(s) if (0.0..1e9).contains(&s) => Some(Duration::from_secs_f64(s)),
        Some(value) => {
            return Err(PodError::BadDuration { what: "timeout", value }.into());
        }
    };
    Ok(Json(node.wait(&name, timeout).await?))
}

#[derive(Deserialize)]
struct FlowsQuery {
    pod: Option<String>,
}

async fn flows(State(node): State<Arc<Node>>, Query(q): Query<FlowsQuery>) -> ApiResult<Vec<super::FlowView>> {
    Ok(Json(node.flows(q.pod.as_deref()).await?))
}
