//! `conndrain pods`: one line per pod; `--watch` prints again on every change.

use std::{fmt::Write as _, time::Duration};

use anyhow::Context as _;

use super::{Output, emit, human_secs, render};
use crate::api::{PodView, client::Client};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output format: wide adds the open sockets, the time since termination
    /// began and the interfaces.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Print again whenever a pod changes (state, flow counts, IPs), until Ctrl-C.
    #[arg(short = 'w', long)]
    pub watch: bool,
}

/// How often `--watch` asks the agent (a local socket: cheap).
const WATCH_EVERY: Duration = Duration::from_millis(250);

pub async fn run(client: &Client, args: Args) -> anyhow::Result<()> {
    let pods: Vec<PodView> = client.get("/v1/pods").await?;
    if !args.watch {
        return emit(&print(&pods, args.output)?).map(|_| ());
    }
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the Ctrl-C handler")?;
    let mut tick = tokio::time::interval(WATCH_EVERY);
    let mut last = None;
    let mut pods = Some(pods);
    loop {
        let pods = match pods.take() {
            Some(p) => p,
            None => client.get("/v1/pods").await?,
        };
        let now = changes(&pods);
        if last.as_ref() != Some(&now) {
            // Each print is a whole table or document, set apart like kubectl's.
            let separator = match (last.is_some(), args.output) {
                (false, _) => "",
                (true, Output::Yaml) => "---\n",
                (true, _) => "\n",
            };
            if !emit(&format!("{separator}{}", print(&pods, args.output)?))? {
                return Ok(());
            }
            last = Some(now);
        }
        tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            _ = tick.tick() => {}
        }
    }
}

/// What `--watch` reprints for: everything but the clocks, which move every second.
fn changes(pods: &[PodView]) -> Vec<String> {
    pods.iter()
        .map(|p| {
            let PodView {
                name,
                ips,
                state,
                active_flows,
                idle_flows,
                outbound_flows,
                new_flows_since_termination,
                terminating_for_secs: _,
                deadline_in_secs: _,
                quiet_for_secs: _,
                quiet_period_secs,
                interfaces,
                open_sockets,
                note,
                ignored_flows,
                counted_secs_ago: _,
                settings,
            } = p;
            format!(
                "{name} {ips:?} {state:?} {active_flows} {idle_flows} {outbound_flows} {new_flows_since_termination} \
                 {quiet_period_secs:?} {interfaces:?} {open_sockets} {note:?} {ignored_flows} {settings:?}"
            )
        })
        .collect()
}

fn print(pods: &[PodView], output: Output) -> anyhow::Result<String> {
    if let Some(data) = output.data() {
        return render(&pods, data);
    }
    let wide = output == Output::Wide;
    let mut out = String::new();
    let _ = write!(
        out,
        "{:<24} {:<9} {:>6} {:>4} {:>8} {:>4} {:>9} {:>9}",
        "NAME", "STATE", "ACTIVE", "IDLE", "OUTBOUND", "NEW", "QUIET", "DEADLINE"
    );
    if wide {
        let _ = write!(out, " {:>7} {:>11} {:<16}", "SOCKETS", "TERMINATING", "INTERFACES");
    }
    out.push_str("  IPS\n");
    for p in pods {
        let opt = |v: Option<f64>| v.map_or_else(|| "-".into(), human_secs);
        let quiet = match (p.quiet_for_secs, p.quiet_period_secs) {
            (Some(q), Some(period)) => format!("{}/{}", human_secs(q.min(period)), human_secs(period)),
            _ => "-".into(),
        };
        let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
        let _ = write!(
            out,
            "{:<24} {:<9} {:>6} {:>4} {:>8} {:>4} {:>9} {:>9}",
            p.name,
            format!("{:?}", p.state).to_lowercase(),
            p.active_flows,
            p.idle_flows,
            p.outbound_flows,
            p.new_flows_since_termination,
            quiet,
            opt(p.deadline_in_secs),
        );
        if wide {
            let interfaces = if p.interfaces.is_empty() { "-".to_owned() } else { p.interfaces.join(",") };
            let _ = write!(out, " {:>7} {:>11} {:<16}", p.open_sockets, opt(p.terminating_for_secs), interfaces);
        }
        let _ = write!(out, "  {}", p.note.as_ref().map_or_else(|| ips.join(","), |n| format!("({n})")));
        if let Some(ago) = p.counted_secs_ago {
            // A large pod in a listing: its latest full count (node/census.rs).
            let _ = write!(out, " (flows counted {} ago)", human_secs(ago));
        }
        out.push('\n');
    }
    Ok(out)
}
