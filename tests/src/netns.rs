//! Named network namespaces (`ip netns`) and running code inside one.

use std::{fs::File, os::fd::AsRawFd as _, process::Command, sync::Mutex, thread};

use std::net::IpAddr;

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{run_cmd, unique_tag};

/// `ip netns add/del` race on the first mount of /run/netns (it is made a
/// shared bind mount on first use), so parallel tests take turns.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// A named network namespace, created with `ip netns add` and deleted with
/// `ip netns del` on drop. Sockets created inside it keep the kernel object
/// alive after the name is gone, so drop order against sockets does not matter.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` with its loopback up.
    pub fn new(name: &str) -> Result<Self> {
        {
            let _turn = NETNS_LOCK
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            run_cmd(Command::new("ip").args(["netns", "add", name]))
                .with_context(|| format!("creating network namespace {name}"))?;
        }
        // From here on, drop cleans up even if the rest fails.
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        // Addresses are usable at once: no duplicate address detection, also
        // for the link-local addresses of interfaces created later.
        ns.sysctl(&[
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ])?;
        Ok(ns)
    }

    /// A namespace named `<unique tag>-<role>`, e.g. `cd1x2y_3-node`.
    pub fn unique(role: &str) -> Result<Self> {
        Self::new(&format!("{}-{role}", unique_tag()))
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> args...` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_cmd(Command::new("ip").arg("-n").arg(&self.name).args(args))
            .with_context(|| format!("in network namespace {}", self.name))
    }

    /// Runs `ip netns exec <ns> program args...` and returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        run_cmd(self.command(program).args(args))
            .with_context(|| format!("in network namespace {}", self.name))
    }

    /// `ip netns exec <ns> program`, to add arguments and spawn.
    #[must_use]
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Sets sysctls (`key=value`) inside the namespace.
    pub fn sysctl(&self, settings: &[&str]) -> Result<()> {
        let mut args = vec!["-qw"];
        args.extend_from_slice(settings);
        self.exec("sysctl", &args).map(drop)
    }

    /// Runs `f` inside the namespace; see [`run_in`].
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        run_in(self, f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _turn = NETNS_LOCK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = run_cmd(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("testbed: deleting network namespace {}: {e:#}", self.name);
        }
    }
}

/// Runs `f` on a fresh thread that first joins `ns` (`setns(CLONE_NEWNET)`),
/// and returns what it returned. Sockets created by `f` belong to `ns` for
/// good, so a listener or stream made here can be used from any thread after.
/// The calling thread's namespace never changes.
pub fn run_in<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/var/run/netns/{}", ns.name);
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            // SAFETY: a valid fd to a network namespace; only this thread moves.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns into {path}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| {
            anyhow!(
                "the thread running in network namespace {} panicked",
                ns.name
            )
        })?
    })
}

/// A veth pair whose ends are created directly inside `a` and `b`, so neither
/// ever appears in the root namespace.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    run_cmd(Command::new("ip").args([
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]))
    .with_context(|| {
        format!(
            "creating veth {a_if} ({}) <-> {b_if} ({})",
            a.name(),
            b.name()
        )
    })
    .map(drop)
}

/// Adds `ip/prefix` to `dev` inside `ns` (IPv6 without duplicate address detection).
pub fn addr(ns: &Netns, dev: &str, ip: IpAddr, prefix: u8) -> Result<()> {
    let cidr = format!("{ip}/{prefix}");
    let mut args = vec!["addr", "add", &cidr, "dev", dev];
    if ip.is_ipv6() {
        args.push("nodad");
    }
    ns.ip(&args).map(drop)
}

/// Sets `dev` up inside `ns`.
pub fn up(ns: &Netns, dev: &str) -> Result<()> {
    ns.ip(&["link", "set", dev, "up"]).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root; skipped (passes) otherwise so `cargo test` as a user works.
    #[test]
    fn run_in_sees_only_the_namespace() {
        if crate::require_root().is_err() {
            return;
        }
        let ns = Netns::unique("unit").unwrap();
        let ifindex = run_in(&ns, || {
            let name = std::ffi::CString::new("lo").unwrap();
            // SAFETY: a valid C string.
            unsafe { libc::if_nametoindex(name.as_ptr()) }
        })
        .unwrap();
        assert_eq!(ifindex, 1, "lo is ifindex 1 in a fresh namespace");
        let out = ns.ip(&["-o", "link"]).unwrap();
        assert_eq!(
            out.lines().count(),
            1,
            "only lo in a fresh namespace: {out}"
        );
    }
}
