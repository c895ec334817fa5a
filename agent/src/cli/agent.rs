//! `conndrain agent`: load the datapath, serve the local API, follow events.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;

use crate::{
    api::server,
    datapath::{Datapath, LoadOptions},
    drain::Timeouts,
    node::{Node, Settings},
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run without Kubernetes: pods are declared with `conndrain pod`.
    #[arg(long)]
    pub standalone: bool,
    /// Pin the flow and pod maps under this bpffs directory.
    #[arg(long, env = "CONNDRAIN_BPFFS")]
    pub bpffs: Option<std::path::PathBuf>,
    /// Size of the flow table (entries; LRU when full).
    #[arg(long, env = "CONNDRAIN_MAX_FLOWS", default_value_t = conndrain_common::DEFAULT_MAX_FLOWS,
          value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub max_flows: u32,
    /// Seconds after which an idle UDP flow is over.
    #[arg(long, env = "CONNDRAIN_UDP_TIMEOUT", default_value_t = 30.0, value_parser = positive_secs)]
    pub udp_timeout: f64,
    /// Seconds after which an established inbound TCP flow with no traffic is an idle
    /// keep-alive, which does not hold its pod.
    #[arg(long, env = "CONNDRAIN_IDLE_TIMEOUT", default_value_t = 30.0, value_parser = positive_secs)]
    pub idle_timeout: f64,
    /// Default drain deadline for `pod terminate`, in seconds.
    #[arg(long, env = "CONNDRAIN_DEADLINE", default_value_t = 30.0, value_parser = positive_secs)]
    pub deadline: f64,
    /// Default quiet period for `pod terminate`, in seconds.
    #[arg(long, env = "CONNDRAIN_QUIET_PERIOD", default_value_t = 3.0, value_parser = positive_secs)]
    pub quiet_period: f64,
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

fn ns(secs: f64) -> u64 {
    u64::try_from(Duration::from_secs_f64(secs).as_nanos()).unwrap_or(u64::MAX)
}

pub async fn run(args: Args, socket: &Path) -> anyhow::Result<()> {
    if !args.standalone {
        anyhow::bail!(
            "Kubernetes mode is not available in this build yet; run `conndrain agent --standalone` and declare pods with `conndrain pod add`"
        );
    }
    let listener = server::bind(socket).await?;
    let loaded = Datapath::load(&LoadOptions {
        max_flows: args.max_flows,
        udp_timeout_ns: ns(args.udp_timeout),
        bpffs: args.bpffs.clone(),
    });
    let (datapath, mut events) = match loaded {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(socket);
            return Err(e.into());
        }
    };
    tracing::info!(
        kernel = %datapath.features.release,
        mode = ?datapath.mode,
        max_flows = args.max_flows,
        socket = %socket.display(),
        "agent ready (standalone)"
    );
    let node = Arc::new(Node::new(
        datapath,
        Settings {
            timeouts: Timeouts { idle_ns: ns(args.idle_timeout), udp_ns: ns(args.udp_timeout) },
            default_deadline: Duration::from_secs_f64(args.deadline),
            default_quiet_period: Duration::from_secs_f64(args.quiet_period),
            mode: "standalone",
        },
    ));

    let events_node = node.clone();
    let events_task = async move {
        loop {
            let batch = events.next_batch().await?;
            events_node.on_events(&batch).await;
        }
        #[expect(unreachable_code, reason = "gives the async block its Result type")]
        Ok::<(), anyhow::Error>(())
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let result = tokio::select! {
        r = server::serve(listener, node.clone()) => r.context("local API"),
        r = events_task => r.context("reading datapath events"),
        () = node.run_evaluator() => Ok(()),
        _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted, shutting down"); Ok(()) }
        _ = term.recv() => { tracing::info!("terminated, shutting down"); Ok(()) }
    };
    let _ = std::fs::remove_file(socket);
    // Unregister every pod so the programs are detached before we go.
    for pod in node.pods().await {
        let _ = node.remove_pod(&pod.name).await;
    }
    result
}
