//! `conndrain why NAME`: what keeps a pod from draining, in words.

use super::{Format, human_secs, print_data, seg};
use crate::{
    api::{PodView, Why, client::Client},
    drain::PodState,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    pub name: String,
    /// Output format: json and yaml give the flows and sockets the words are made of.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let w: Why = client.get(&format!("/v1/pods/{}/why", seg(&args.name))).await?;
    if let Some(data) = args.output.data() {
        return print_data(&w, data);
    }
    let p = &w.pod;
    match p.state {
        PodState::Serving => {
            println!("{} is serving: it is not terminating, so nothing is draining it.", p.name);
            println!("{} active inbound flow(s) would hold it if it were.", p.active_flows);
        }
        PodState::Skipped => println!("{} is not tracked: {}.", p.name, p.note.as_deref().unwrap_or("skipped")),
        PodState::Drained => {
            println!("{} is drained: no active inbound flow and no new one for the quiet period.", p.name)
        }
        PodState::Deadline => {
            println!("{} reached its deadline with {} active inbound flow(s) still open.", p.name, p.active_flows)
        }
        PodState::Draining => {
            let deadline = p.deadline_in_secs.map_or_else(|| "?".into(), human_secs);
            if w.holding.is_empty() && !w.sockets.holding.is_empty() {
                println!(
                    "{} is held by {} open socket(s) its flows do not account for; deadline in {}:",
                    p.name,
                    w.sockets.holding.len(),
                    deadline
                );
            } else if w.holding.is_empty() {
                let quiet = p.quiet_for_secs.unwrap_or(0.0);
                let period = p.quiet_period_secs.unwrap_or(0.0);
                println!(
                    "{} has no active inbound flow, but its quiet period is not over: no new inbound flow for {} of {} ({} new since termination began).",
                    p.name,
                    human_secs(quiet),
                    human_secs(period),
                    p.new_flows_since_termination
                );
            } else {
                println!("{} is held by {} active inbound flow(s); deadline in {}:", p.name, w.holding.len(), deadline);
            }
        }
    }
    for f in &w.holding {
        println!(
            "  {} from {} to {} ({}), open {}, last packet {} ago, {} B in / {} B out",
            f.proto,
            f.peer_addr,
            f.pod_addr,
            f.state,
            human_secs(f.age_secs),
            human_secs(f.idle_secs),
            f.bytes_in,
            f.bytes_out
        );
    }
    if p.state != PodState::Skipped {
        print_settings(p);
    }
    let s = &w.sockets;
    if p.state != PodState::Skipped {
        println!(
            "Its own sockets: {} open inbound TCP connection(s){}.",
            s.open,
            if s.confirms_drain { "; a drain is confirmed against them" } else { "" }
        );
        if let Some(note) = &s.note {
            println!("  They cannot confirm a drain, so it goes to its deadline: {note}.");
        }
        for h in &s.holding {
            println!("  tcp from {} to {}: {}", h.peer_addr, h.pod_addr, h.why);
        }
    }
    if !w.probe_ports.is_empty() {
        let ports: Vec<String> = w.probe_ports.iter().map(u16::to_string).collect();
        println!(
            "Probe ports (the node's own connections to them do not restart the quiet period): {}",
            ports.join(", ")
        );
    }
    if !w.not_holding.is_empty() {
        println!("Not holding it:");
        for f in &w.not_holding {
            let why = if f.ignored {
                "to an ignored port of the pod (its settings)".to_owned()
            } else if f.idle {
                format!("idle keep-alive, quiet for {} (> {}s)", human_secs(f.idle_secs), w.idle_timeout_secs)
            } else {
                "outbound: the pod is the client".to_owned()
            };
            println!("  {} {} {} -> {}: {}", f.proto, f.direction, f.pod_addr, f.peer_addr, why);
        }
    }
    Ok(())
}

/// The pod's own drain settings, where they come from, and any refused.
fn print_settings(p: &PodView) {
    let s = &p.settings;
    let ignored = if s.ignore_ports.is_empty() {
        "none".to_owned()
    } else {
        let ports: Vec<String> = s.ignore_ports.iter().map(u16::to_string).collect();
        format!("{} (inbound connections to them hold nothing; {} open now)", ports.join(", "), p.ignored_flows)
    };
    println!(
        "Settings: quiet period {} ({}); ignored ports: {}.",
        human_secs(s.quiet_period_secs),
        s.quiet_period_from,
        ignored
    );
    for problem in &s.problems {
        println!("  refused: {problem}");
    }
}
