//! The command line: one file per subcommand. Everything but `agent` is a
//! client of the agent's local API.

mod agent;
mod cleanup;
mod flows;
mod install;
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
    Status(ObjectArgs),
    /// Pods and their drain state.
    Pods(pods::Args),
    /// Flows of the registered pods.
    Flows(flows::Args),
    /// Explain what keeps a pod from draining.
    Why(why::Args),
    /// Wait until a pod is drained (exit 0), at its deadline (2) or the timeout passes (3).
    Wait(wait::Args),
    /// Copy this binary to DIR/conndrain (an init container's job: see deploy/examples).
    Install(install::Args),
    /// Remove what agents leave on this node (pinned maps and programs, clsact filters, saved state).
    Cleanup(cleanup::Args),
}

/// `-o` of the commands that print one object (`status`, `why`).
#[derive(clap::Args, Debug)]
pub struct ObjectArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

/// How `status` and `why` print.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people.
    #[value(alias = "table")]
    Text,
    Json,
    Yaml,
}

/// How `pods` and `flows` print.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// One line each.
    Table,
    /// One line each, with more columns.
    Wide,
    Json,
    Yaml,
}

/// JSON or YAML, the same fields either way (the API's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Data {
    Json,
    Yaml,
}

impl Format {
    pub(crate) fn data(self) -> Option<Data> {
        match self {
            Self::Text => None,
            Self::Json => Some(Data::Json),
            Self::Yaml => Some(Data::Yaml),
        }
    }
}

impl Output {
    pub(crate) fn data(self) -> Option<Data> {
        match self {
            Self::Table | Self::Wide => None,
            Self::Json => Some(Data::Json),
            Self::Yaml => Some(Data::Yaml),
        }
    }
}

impl Cli {
    /// The log format: the agent's `--log-format`; text for the other commands.
    #[must_use]
    pub fn log_format(&self) -> crate::telemetry::LogFormat {
        match &self.command {
            Command::Agent(args) => args.log_format,
            _ => crate::telemetry::LogFormat::Text,
        }
    }
}

/// Runs the command; the result is the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let client = Client::new(&cli.socket);
    match cli.command {
        Command::Agent(args) => agent::run(args, &cli.socket).await.map(|()| 0),
        Command::Pod(cmd) => pod::run(&client, cmd).await.map(|()| 0),
        Command::Status(o) => status::run(&client, o.output).await.map(|()| 0),
        Command::Pods(args) => pods::run(&client, args).await.map(|()| 0),
        Command::Flows(args) => flows::run(&client, args).await.map(|()| 0),
        Command::Why(args) => why::run(&client, args).await.map(|()| 0),
        Command::Wait(args) => wait::run(&client, args).await,
        Command::Install(args) => install::run(&args).map(|()| 0),
        Command::Cleanup(args) => cleanup::run(&args, &cli.socket).await.map(|()| 0),
    }
}

/// `v` as JSON (pretty) or YAML, ending with a newline.
pub(crate) fn render<T: serde::Serialize>(v: &T, data: Data) -> anyhow::Result<String> {
    Ok(match data {
        Data::Json => serde_json::to_string_pretty(v)? + "\n",
        Data::Yaml => serde_saphyr::to_string(v)?,
    })
}

pub(crate) fn print_data<T: serde::Serialize>(v: &T, data: Data) -> anyhow::Result<()> {
    emit(&render(v, data)?).map(|_| ())
}

/// Writes `text` to stdout. `Ok(false)`: the reader went away (a closed
/// pipe, e.g. `| head`), which is no error.
pub(crate) fn emit(text: &str) -> anyhow::Result<bool> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
    }
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
            if b.is_ascii_alphanumeric() || b"-._".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }
        })
        .collect()
}
