//! `conndrain pod add|terminate|remove`: declare pods in standalone mode.

use std::net::IpAddr;

use clap::Subcommand;

use super::seg;
use crate::api::{AddPod, PodView, Terminate, client::Client};

#[derive(Subcommand, Debug)]
pub enum PodCommand {
    /// Register a pod and its IPs; the agent attaches to the interfaces that route to them.
    Add {
        name: String,
        /// A pod IP (IPv4 or IPv6); repeat for dual-stack.
        #[arg(long = "ip", required = true)]
        ips: Vec<IpAddr>,
        /// A port the kubelet probes; repeat for several. New connections
        /// from the node's own processes to it do not restart the quiet period.
        #[arg(long = "probe-port")]
        probe_ports: Vec<u16>,
        /// Seconds without a new inbound flow before this pod counts as
        /// drained (Kubernetes: annotation conndrain.io/quiet-period). Default: the agent's --quiet-period.
        #[arg(long)]
        quiet_period: Option<f64>,
        /// A port of the pod whose inbound connections never hold it (a
        /// metrics port; Kubernetes: annotation conndrain.io/ignore-ports); repeat for several.
        #[arg(long = "ignore-port")]
        ignore_ports: Vec<u16>,
    },
    /// Start draining a pod.
    Terminate {
        name: String,
        /// Seconds until the drain gives up (state `deadline`). Default: the agent's --deadline.
        #[arg(long)]
        deadline: Option<f64>,
        /// Seconds without a new inbound flow before the pod counts as drained. Default: the agent's --quiet-period.
        #[arg(long)]
        quiet_period: Option<f64>,
    },
    /// Forget a pod and its flows.
    Remove { name: String },
}

pub async fn run(client: &Client, cmd: PodCommand) -> anyhow::Result<()> {
    match cmd {
        PodCommand::Add { name, ips, probe_ports, quiet_period, ignore_ports } => {
            let req = AddPod { name, ips, probe_ports, quiet_period_secs: quiet_period, ignore_ports };
            let pod: PodView = client.post("/v1/pods", &req).await?;
            println!("pod {} added ({}) on {}", pod.name, join(&pod.ips), pod.interfaces.join(", "));
            if let Some(note) = &pod.note {
                eprintln!("conndrain: pod {} is skipped: {note}", pod.name);
            }
        }
        PodCommand::Terminate { name, deadline, quiet_period } => {
            let req = Terminate { deadline_secs: deadline, quiet_period_secs: quiet_period };
            let pod: PodView = client.post(&format!("/v1/pods/{}/terminate", seg(&name)), &req).await?;
            println!(
                "pod {} is draining: {} active flows, deadline in {}",
                pod.name,
                pod.active_flows,
                pod.deadline_in_secs.map_or_else(|| "-".into(), super::human_secs)
            );
        }
        PodCommand::Remove { name } => {
            client.delete(&format!("/v1/pods/{}", seg(&name))).await?;
            println!("pod {name} removed");
        }
    }
    Ok(())
}

fn join(ips: &[IpAddr]) -> String {
    ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}
