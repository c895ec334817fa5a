//! `conndrain pods`: one line per pod.

use super::{Output, human_secs, print_json};
use crate::api::{PodView, client::Client};

pub async fn run(client: &Client, output: Output) -> anyhow::Result<()> {
    let pods: Vec<PodView> = client.get("/v1/pods").await?;
    if output == Output::Json {
        return print_json(&pods);
    }
    println!(
        "{:<24} {:<9} {:>6} {:>4} {:>8} {:>4} {:>9} {:>9}  IPS",
        "NAME", "STATE", "ACTIVE", "IDLE", "OUTBOUND", "NEW", "QUIET", "DEADLINE"
    );
    for p in &pods {
        let opt = |v: Option<f64>| v.map_or_else(|| "-".into(), human_secs);
        let quiet = match (p.quiet_for_secs, p.quiet_period_secs) {
            (Some(q), Some(period)) => format!("{}/{}", human_secs(q.min(period)), human_secs(period)),
            _ => "-".into(),
        };
        let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
        println!(
            "{:<24} {:<9} {:>6} {:>4} {:>8} {:>4} {:>9} {:>9}  {}",
            p.name,
            format!("{:?}", p.state).to_lowercase(),
            p.active_flows,
            p.idle_flows,
            p.outbound_flows,
            p.new_flows_since_termination,
            quiet,
            opt(p.deadline_in_secs),
            p.note.as_ref().map_or_else(|| ips.join(","), |n| format!("({n})"))
        );
    }
    Ok(())
}
