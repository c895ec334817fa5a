//! The CLI's side of the local API: one HTTP/1.1 request per connection over
//! the unix socket (hyper's client connection; no pooling needed for a CLI).

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::UnixStream;

use super::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the agent at {} ({source}); start it with `conndrain agent --standalone`, or point --socket/CONNDRAIN_SOCKET at its socket",
        path.display()
    )]
    Unreachable { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Api(String),
    #[error("talking to the agent: {0}")]
    Protocol(String),
}

pub struct Client {
    path: PathBuf,
}

impl Client {
    #[must_use]
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf() }
    }

    pub async fn get<T: DeserializeOwned>(&self, uri: &str) -> Result<T, ClientError> {
        self.call(Method::GET, uri, None::<&()>).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, uri: &str, body: &B) -> Result<T, ClientError> {
        self.call(Method::POST, uri, Some(body)).await
    }

    pub async fn delete(&self, uri: &str) -> Result<(), ClientError> {
        self.raw(Method::DELETE, uri, Bytes::new()).await.map(drop)
    }

    async fn call<B: Serialize, T: DeserializeOwned>(&self, method: Method, uri: &str, body: Option<&B>) -> Result<T, ClientError> {
        let body = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b).map_err(|e| ClientError::Protocol(e.to_string()))?),
            None => Bytes::new(),
        };
        let bytes = self.raw(method, uri, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(format!("bad response: {e}")))
    }

    async fn raw(&self, method: Method, uri: &str, body: Bytes) -> Result<Bytes, ClientError> {
        let stream = UnixStream::connect(&self.path)
            .await
            .map_err(|source| ClientError::Unreachable { path: self.path.clone(), source })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "conndrain")
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| ClientError::Protocol(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        let msg = serde_json::from_slice::<ErrorBody>(&bytes)
            .map_or_else(|_| format!("{status}: {}", String::from_utf8_lossy(&bytes).trim()), |e| e.error);
        Err(ClientError::Api(msg))
    }
}
