//! `conndrain wait [NAME]`: block until a pod is released.
//!
//! With NAME it asks the local API (operators, standalone mode). Without it,
//! it is the preStop client: it asks the agent's node API on `HOST_IP` for
//! the calling pod itself, and fails open: if the agent cannot be reached or
//! does not know the pod, it sleeps `--fallback-sleep` seconds instead, so a
//! pod is never worse off than with today's `preStop: sleep`.

use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;

use super::{human_secs, seg};
use crate::{
    api::{WaitOutcome, client::Client},
    drain::PodState,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The pod to wait for. Omit it in a preStop hook: the agent then
    /// identifies the calling pod by its IP.
    pub name: Option<String>,
    /// Give up after this many seconds (exit 3).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// preStop mode: the node's IP, where the agent listens (downward API status.hostIP).
    #[arg(long, env = "HOST_IP")]
    pub host_ip: Option<String>,
    /// preStop mode: the agent's /v1/wait port.
    #[arg(long, env = "CONNDRAIN_WAIT_PORT", default_value_t = crate::api::DEFAULT_WAIT_PORT)]
    pub port: u16,
    /// preStop mode: seconds to sleep when the agent cannot be reached.
    #[arg(long, env = "CONNDRAIN_FALLBACK_SLEEP", default_value_t = 30.0)]
    pub fallback_sleep: f64,
}

pub const EXIT_DEADLINE: i32 = 2;
pub const EXIT_TIMEOUT: i32 = 3;
pub const EXIT_SKIPPED: i32 = 4;

pub async fn run(client: &Client, args: Args) -> anyhow::Result<i32> {
    let Some(name) = &args.name else {
        return Ok(pre_stop(&args).await);
    };
    let mut uri = format!("/v1/pods/{}/wait", seg(name));
    if let Some(t) = args.timeout {
        uri = format!("{uri}?timeout_secs={t}");
    }
    let o: WaitOutcome = client.get(&uri).await?;
    Ok(report(&o))
}

fn report(o: &WaitOutcome) -> i32 {
    match (o.timed_out, o.state) {
        (true, state) => {
            eprintln!(
                "conndrain: timed out after {} waiting for {} (state {}, {} active flows)",
                human_secs(o.waited_secs),
                o.pod,
                format!("{state:?}").to_lowercase(),
                o.active_flows
            );
            EXIT_TIMEOUT
        }
        (false, PodState::Drained) => {
            println!("{} drained after {}", o.pod, human_secs(o.waited_secs));
            0
        }
        (false, PodState::Skipped) => {
            eprintln!(
                "conndrain: {} is skipped: conndrain does not track its traffic (conndrain why {})",
                o.pod, o.pod
            );
            EXIT_SKIPPED
        }
        (false, _) => {
            eprintln!("conndrain: {} reached its deadline with {} active flow(s) still open", o.pod, o.active_flows);
            EXIT_DEADLINE
        }
    }
}

/// The preStop hook: always exits 0 so the kubelet proceeds to SIGTERM.
async fn pre_stop(args: &Args) -> i32 {
    let result = match &args.host_ip {
        None => Err("HOST_IP is not set (add it from the downward API: status.hostIP)".to_owned()),
        Some(host) => ask_agent(host, args.port, args.timeout).await,
    };
    let result = result.and_then(|o| {
        if o.state == PodState::Skipped {
            Err(format!("the agent does not track {}'s traffic (skipped)", o.pod))
        } else {
            Ok(o)
        }
    });
    match result {
        Ok(o) => {
            report(&o);
            0
        }
        Err(why) => {
            let secs =
                if args.fallback_sleep.is_finite() && args.fallback_sleep > 0.0 { args.fallback_sleep } else { 0.0 };
            eprintln!("conndrain: {why}; falling back to sleeping {secs}s");
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            0
        }
    }
}

async fn ask_agent(host: &str, port: u16, timeout: Option<f64>) -> Result<WaitOutcome, String> {
    let addr = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, port),
        Err(_) => return Err(format!("HOST_IP {host:?} is not an IP address")),
    };
    let call = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot reach the conndrain agent at {addr} ({e})"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("talking to the agent at {addr}: {e}"))?;
        tokio::spawn(conn);
        let req = Request::get("/v1/wait")
            .header("host", addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| format!("agent at {addr}: {e}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        if !status.is_success() {
            return Err(format!("the agent at {addr} answered {status}: {}", String::from_utf8_lossy(&body).trim()));
        }
        serde_json::from_slice::<WaitOutcome>(&body).map_err(|e| format!("bad answer from the agent: {e}"))
    };
    match timeout {
        Some(t) if t.is_finite() && t >= 0.0 => tokio::time::timeout(Duration::from_secs_f64(t), call)
            .await
            .unwrap_or_else(|_| Err(format!("the agent at {addr} did not answer within {t}s"))),
        _ => call.await,
    }
}
