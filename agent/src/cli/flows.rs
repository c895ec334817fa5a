//! `conndrain flows`: the flows of the registered pods.

use std::fmt::Write as _;

use super::{Output, emit, human_secs, print_data, seg};
use crate::api::{FlowView, client::Client};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only this pod's flows.
    #[arg(long)]
    pub pod: Option<String>,
    /// Output format: wide adds the bytes each way and the pinned flow's backend.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let uri = match &args.pod {
        Some(p) => format!("/v1/flows?pod={}", seg(p)),
        None => "/v1/flows".to_owned(),
    };
    let flows: Vec<FlowView> = client.get(&uri).await?;
    if let Some(data) = args.output.data() {
        return print_data(&flows, data);
    }
    emit(&table(&flows, args.output == Output::Wide)).map(|_| ())
}

fn table(flows: &[FlowView], wide: bool) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "{:<20} {:<4} {:<8} {:<11} {:<28} {:<28} {:>7} {:>7} {:>8}",
        "POD", "PROTO", "DIR", "STATE", "POD ADDR", "PEER ADDR", "AGE", "IDLE", "HOLDS"
    );
    if wide {
        let _ = write!(out, " {:>12} {:>12}", "BYTES IN", "BYTES OUT");
    }
    out.push_str("  PINNED\n");
    for f in flows {
        let holds = if f.active {
            "yes"
        } else if f.idle {
            "no(idle)"
        } else {
            "no"
        };
        let _ = write!(
            out,
            "{:<20} {:<4} {:<8} {:<11} {:<28} {:<28} {:>7} {:>7} {:>8}",
            f.pod,
            f.proto,
            f.direction,
            f.state,
            f.pod_addr,
            f.peer_addr,
            human_secs(f.age_secs),
            human_secs(f.idle_secs),
            holds,
        );
        if wide {
            let _ = write!(out, " {:>12} {:>12}", f.bytes_in, f.bytes_out);
        }
        let pinned = f.pinned.as_ref().map_or_else(
            || "-".to_owned(),
            |p| {
                let via = format!("{} via {}", p.client, p.frontend);
                if wide { format!("{via} to {}", p.backend) } else { via }
            },
        );
        let _ = writeln!(out, "  {pinned}");
    }
    out
}
