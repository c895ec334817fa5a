//! `conndrain wait NAME`: block until the pod is released.

use super::{human_secs, seg};
use crate::{
    api::{WaitOutcome, client::Client},
    drain::PodState,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    pub name: String,
    /// Give up after this many seconds (exit 3).
    #[arg(long)]
    pub timeout: Option<f64>,
}

pub const EXIT_DEADLINE: i32 = 2;
pub const EXIT_TIMEOUT: i32 = 3;

pub async fn run(client: &Client, args: Args) -> anyhow::Result<i32> {
    let mut uri = format!("/v1/pods/{}/wait", seg(&args.name));
    if let Some(t) = args.timeout {
        uri.push_str(&format!("?timeout_secs={t}"));
    }
    let o: WaitOutcome = client.get(&uri).await?;
    Ok(match (o.timed_out, o.state) {
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
        (false, _) => {
            eprintln!(
                "conndrain: {} reached its deadline with {} active flow(s) still open",
                o.pod, o.active_flows
            );
            EXIT_DEADLINE
        }
    })
}
