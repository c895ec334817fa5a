//! The command line: one file per subcommand. Everything but `agent` is a
//! client of the agent's local API.

mod agent;
mod flows;
mod pod;
mod pods;
mod status;
mod wait;
mod why;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::api::{DEFAULT_SOCKET, client::Client};

#[derive(Parser, Debug)]
#[command(name = "conndrain", version, about = "Drain Kubernetes pods by their real connections")]
pub struct Cli {
    /// The agent's local API socket.
    #[arg(long, global = true, env = "CONNDRAIN_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node agent.
    Agent(agent::Args),
    /// Declare pods (standalone mode).
    #[command(subcommand)]
    Pod(pod::PodCommand),
    /// Kernel features, attached programs and interfaces, map fill.
    Status(OutputArgs),
    /// Pods and their drain state.
    Pods(OutputArgs),
    /// Flows of the registered pods.
    Flows(flows::Args),
    /// Explain what keeps a pod from draining.
    Why(why::Args),
    /// Wait until a pod is drained (exit 0), at its deadline (2) or the timeout passes (3).
    Wait(wait::Args),
}

#[derive(clap::Args, Debug)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Runs the command; the result is the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let client = Client::new(&cli.socket);
    match cli.command {
        Command::Agent(args) => agent::run(args, &cli.socket).await.map(|()| 0),
        Command::Pod(cmd) => pod::run(&client, cmd).await.map(|()| 0),
        Command::Status(o) => status::run(&client, o.output).await.map(|()| 0),
        Command::Pods(o) => pods::run(&client, o.output).await.map(|()| 0),
        Command::Flows(args) => flows::run(&client, args).await.map(|()| 0),
        Command::Why(args) => why::run(&client, args).await.map(|()| 0),
        Command::Wait(args) => wait::run(&client, args).await,
    }
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Seconds for people: "0.4s", "12s", "3m05s".
pub(crate) fn human_secs(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.1}s")
    } else if s < 120.0 {
        format!("{s:.0}s")
    } else {
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "display only")]
        let s = s as u64;
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// Path segments are pod names; escape what is not a name character so a
/// bad name gets the agent's clear error rather than a routing 404.
pub(crate) fn seg(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
