//! A child process (a preStop hook, a long `wait`) running in a namespace,
//! its output collected as it goes.

use std::{
    io::Read,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::Output;
use crate::{POLL, show};

/// A command running in the background (e.g. `conndrain wait`), its output
/// collected as it comes. Killed on drop if still running.
pub struct Running {
    shown: String,
    child: Child,
    stdout: Collector,
    stderr: Collector,
}

type Collector = (Arc<Mutex<Vec<u8>>>, Option<JoinHandle<()>>);

fn collect(from: impl Read + Send + 'static) -> Collector {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let handle = {
        let buf = buf.clone();
        thread::spawn(move || {
            let mut from = from;
            let mut chunk = [0u8; 4096];
            while let Ok(n) = from.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.lock()
                    .expect("output buffer lock")
                    .extend_from_slice(&chunk[..n]);
            }
        })
    };
    (buf, Some(handle))
}

impl Running {
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        let shown = show(&cmd);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{shown}`"))?;
        let stdout = collect(child.stdout.take().expect("piped"));
        let stderr = collect(child.stderr.take().expect("piped"));
        Ok(Self {
            shown,
            child,
            stdout,
            stderr,
        })
    }

    /// Still running (not exited yet)?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` (stretched by [`crate::time_scale`]) for the
    /// exit; kills it and fails after that.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Output> {
        let timeout = timeout * crate::time_scale();
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if start.elapsed() >= timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let partial = self.output_so_far(-1);
                bail!(
                    "`{}` still running after {timeout:?}; killed it. It printed: {}{}",
                    self.shown,
                    partial.stdout,
                    partial.stderr
                );
            }
            thread::sleep(POLL);
        };
        for (_, handle) in [&mut self.stdout, &mut self.stderr] {
            if let Some(h) = handle.take() {
                let _ = h.join();
            }
        }
        Ok(self.output_so_far(status.code().unwrap_or(-1)))
    }

    fn output_so_far(&self, code: i32) -> Output {
        let text = |c: &Collector| {
            String::from_utf8_lossy(&c.0.lock().expect("output buffer lock")).into_owned()
        };
        Output {
            code,
            stdout: text(&self.stdout),
            stderr: text(&self.stderr),
        }
    }

    /// What it has printed on stdout so far.
    #[must_use]
    pub fn stdout_so_far(&self) -> String {
        self.output_so_far(-1).stdout
    }

    /// Sends it SIGINT, as Ctrl-C would.
    pub fn interrupt(&self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill with a pid we own and a valid signal.
        if unsafe { libc::kill(pid, libc::SIGINT) } != 0 {
            bail!("SIGINT to `{}`: {}", self.shown, std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The command line, for messages.
    #[must_use]
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` (stdout and stderr piped) and waits up to `timeout` for it to
/// exit; kills it and fails if it does not. For commands expected to fail fast,
/// like an agent that cannot start.
pub fn run_with_timeout(cmd: Command, timeout: Duration) -> Result<Output> {
    Running::spawn(cmd)?.wait_exit(timeout)
}
