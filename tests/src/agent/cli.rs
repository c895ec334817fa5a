//! The CLI run against the agent's socket, and what it prints, parsed.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Deserialize;
use serde_json::Value;

use super::{Running, conndrain_bin};
use crate::{Pod, TIMEOUT, show, wait_until};

/// What a CLI run printed and how it exited (`code` is -1 if killed by a signal).
#[derive(Clone, Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    fn from_std(out: &std::process::Output) -> Self {
        Self {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// stdout and stderr together, for "the message says ..." checks.
    #[must_use]
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// One element of `conndrain pods -o json`.
#[derive(Clone, Debug, Deserialize)]
pub struct PodStatus {
    pub name: String,
    pub ips: Vec<String>,
    pub state: String,
    pub active_flows: u64,
    pub idle_flows: u64,
    pub outbound_flows: u64,
    pub new_flows_since_termination: u64,
    pub terminating_for_secs: Option<f64>,
    pub deadline_in_secs: Option<f64>,
    pub quiet_for_secs: Option<f64>,
    pub quiet_period_secs: Option<f64>,
    pub interfaces: Vec<String>,
    /// Open inbound TCP sockets (the sockets tracepoint).
    #[serde(default)]
    pub open_sockets: u64,
    #[serde(default)]
    pub note: Option<String>,
    /// Live inbound flows to the pod's ignored ports (its settings).
    #[serde(default)]
    pub ignored_flows: u64,
    /// Set when a listing showed the pod's latest full count, made this many
    /// seconds ago, instead of counting its flows afresh.
    #[serde(default)]
    pub counted_secs_ago: Option<f64>,
}

/// One element of `conndrain flows -o json`.
#[derive(Clone, Debug, Deserialize)]
pub struct FlowInfo {
    pub pod: String,
    pub proto: String,
    pub direction: String,
    pub state: String,
    pub pod_addr: String,
    pub peer_addr: String,
    pub age_secs: f64,
    pub idle_secs: f64,
    pub idle: bool,
    pub active: bool,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// `conndrain --socket S ...` runs.
#[derive(Clone, Debug)]
pub struct Cli {
    bin: PathBuf,
    socket: PathBuf,
}

impl Cli {
    #[must_use]
    pub fn new(socket: &Path) -> Self {
        Self {
            bin: conndrain_bin(),
            socket: socket.to_owned(),
        }
    }

    /// `conndrain --socket S args...`, not yet run; `CONNDRAIN_SOCKET` removed
    /// so only `--socket` counts.
    #[must_use]
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("CONNDRAIN_SOCKET")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs to completion; a non-zero exit is not an error here.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        run_output(&mut self.command(args))
    }

    /// Runs and returns stdout; a non-zero exit is an error naming the command and its stderr.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        if out.code != 0 {
            bail!(
                "`conndrain {}` exited with {}: {}",
                args.join(" "),
                out.code,
                out.stderr.trim()
            );
        }
        Ok(out.stdout)
    }

    /// Runs and parses stdout as JSON.
    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let stdout = self.ok(args)?;
        serde_json::from_str(&stdout).with_context(|| {
            format!(
                "`conndrain {}` printed no valid JSON: {stdout}",
                args.join(" ")
            )
        })
    }

    pub fn pods_json(&self) -> Result<Value> {
        self.json(&["pods", "-o", "json"])
    }

    pub fn pods(&self) -> Result<Vec<PodStatus>> {
        let value = self.pods_json()?;
        serde_json::from_value(value.clone())
            .with_context(|| format!("`conndrain pods -o json` does not match the README: {value}"))
    }

    pub fn pod(&self, name: &str) -> Result<PodStatus> {
        self.pods()?
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| anyhow!("`conndrain pods -o json` lists no pod {name:?}"))
    }

    /// `flows [--pod NAME] -o json`.
    pub fn flows(&self, pod: Option<&str>) -> Result<Vec<FlowInfo>> {
        let mut args = vec!["flows"];
        if let Some(pod) = pod {
            args.extend(["--pod", pod]);
        }
        args.extend(["-o", "json"]);
        let value = self.json(&args)?;
        serde_json::from_value(value.clone()).with_context(|| {
            format!(
                "`conndrain {}` does not match the README: {value}",
                args.join(" ")
            )
        })
    }

    pub fn status(&self) -> Result<Value> {
        self.json(&["status", "-o", "json"])
    }

    /// `pod add NAME --ip v4 --ip v6`, then waits until the agent reports the
    /// pod with an interface (its programs are attached).
    pub fn add_pod(&self, pod: &Pod) -> Result<PodStatus> {
        self.add_pod_probed(pod, &[])
    }

    /// `pod add` with `--probe-port` for each of `probe_ports`.
    pub fn add_pod_probed(&self, pod: &Pod, probe_ports: &[u16]) -> Result<PodStatus> {
        let ips: Vec<String> = pod.ips().iter().map(ToString::to_string).collect();
        let ports: Vec<String> = probe_ports.iter().map(ToString::to_string).collect();
        let mut args = vec!["pod", "add", pod.name()];
        for ip in &ips {
            args.extend(["--ip", ip]);
        }
        for p in &ports {
            args.extend(["--probe-port", p]);
        }
        self.ok(&args)?;
        self.wait_pod(pod.name(), "the pod to be attached to an interface", |p| {
            !p.interfaces.is_empty()
        })
    }

    /// `pod terminate NAME --quiet-period Q --deadline D`.
    pub fn terminate(&self, name: &str, quiet_period_secs: f64, deadline_secs: f64) -> Result<()> {
        let (q, d) = (quiet_period_secs.to_string(), deadline_secs.to_string());
        self.ok(&[
            "pod",
            "terminate",
            name,
            "--quiet-period",
            &q,
            "--deadline",
            &d,
        ])
        .map(drop)
    }

    /// Polls `pods -o json` until pod `name` satisfies `done`.
    pub fn wait_pod(
        &self,
        name: &str,
        what: &str,
        done: impl FnMut(&PodStatus) -> bool,
    ) -> Result<PodStatus> {
        wait_until(
            &format!("pod {name}: {what}"),
            TIMEOUT,
            || self.pod(name),
            done,
        )
    }

    /// Polls until pod `name` is in `state`.
    pub fn wait_state(&self, name: &str, state: &str) -> Result<PodStatus> {
        self.wait_pod(name, &format!("state {state}"), |p| p.state == state)
    }

    /// Starts `conndrain --socket S args...` in the background.
    pub fn spawn(&self, args: &[&str]) -> Result<Running> {
        Running::spawn(self.command(args))
    }
}

/// Runs a command with piped output to completion.
fn run_output(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("could not run `{}`", show(cmd)))?;
    Ok(Output::from_std(&out))
}
