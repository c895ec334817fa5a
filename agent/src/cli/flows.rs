//! `conndrain flows`: the flows of the registered pods.

use super::{Output, human_secs, print_json, seg};
use crate::api::{FlowView, client::Client};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only this pod's flows.
    #[arg(long)]
    pub pod: Option<String>,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let uri = match &args.pod {
        Some(p) => format!("/v1/flows?pod={}", seg(p)),
        None => "/v1/flows".to_owned(),
    };
    let flows: Vec<FlowView> = client.get(&uri).await?;
    if args.output == Output::Json {
        return print_json(&flows);
    }
    print_table(&flows);
    Ok(())
}

pub(crate) fn print_table(flows: &[FlowView]) {
    println!(
        "{:<20} {:<4} {:<8} {:<11} {:<28} {:<28} {:>7} {:>7} {:>8}  PINNED",
        "POD", "PROTO", "DIR", "STATE", "POD ADDR", "PEER ADDR", "AGE", "IDLE", "HOLDS"
    );
    for f in flows {
        let holds = if f.active { "yes" } else if f.idle { "no(idle)" } else { "no" };
        println!(
            "{:<20} {:<4} {:<8} {:<11} {:<28} {:<28} {:>7} {:>7} {:>8}  {}",
            f.pod,
            f.proto,
            f.direction,
            f.state,
            f.pod_addr,
            f.peer_addr,
            human_secs(f.age_secs),
            human_secs(f.idle_secs),
            holds,
            f.pinned.as_ref().map_or_else(|| "-".to_owned(), |p| format!("{} via {}", p.client, p.frontend))
        );
    }
}
