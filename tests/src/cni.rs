//! Pods wired by the real CNI plugins from Debian's
//! `containernetworking-plugins` (`/usr/lib/cni/bridge`, `ptp`, `macvlan`),
//! run in the node's namespace as a container runtime runs them: the
//! `CNI_*` environment and the network configuration on stdin. host-local
//! IPAM keeps its leases in the test's own directory.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{Netns, TempDir};

const CNI_PATH: &str = "/usr/lib/cni";

/// One pod made by a CNI plugin: its namespace and IPv4 address.
#[derive(Debug)]
pub struct CniPod {
    pub name: String,
    pub ip: Ipv4Addr,
    // Dropped after the plugin's DEL (see `Drop`): namespace last.
    pub ns: Netns,
    config: String,
    node: String,
}

/// A network of one CNI plugin on one node.
#[derive(Debug)]
pub struct CniNetwork {
    /// The plugin's config (JSON), without `cniVersion`/`name`.
    plugin: serde_json::Value,
    name: String,
    state: TempDir,
}

impl CniNetwork {
    /// `plugin`: e.g. `{"type": "bridge", "bridge": "cd0br", "isGateway": true}`;
    /// `subnet` for host-local IPAM.
    pub fn new(name: &str, mut plugin: serde_json::Value, subnet: &str) -> Result<Self> {
        let ty = plugin["type"].as_str().context("a plugin type")?.to_owned();
        if !std::path::Path::new(CNI_PATH).join(&ty).exists() {
            bail!(
                "the CNI plugin {CNI_PATH}/{ty} is missing: install Debian's containernetworking-plugins (cargo xtask setup does)"
            );
        }
        let state = TempDir::new()?;
        plugin["ipam"] = serde_json::json!({
            "type": "host-local",
            "subnet": subnet,
            "dataDir": state.path().join("ipam"),
            "routes": [{"dst": "0.0.0.0/0"}],
        });
        plugin["cniVersion"] = "1.0.0".into();
        plugin["name"] = name.into();
        Ok(Self { plugin, name: name.to_owned(), state })
    }

    /// Creates a pod namespace and runs the plugin's ADD for it in `node`.
    pub fn add(&self, node: &Netns, pod: &str) -> Result<CniPod> {
        let ns = Netns::unique(pod)?;
        let config = self.plugin.to_string();
        let out =
            cni(node.name(), "ADD", &ns, &config).with_context(|| format!("CNI ADD of {pod} on {}", self.name))?;
        let result: serde_json::Value = serde_json::from_str(&out).with_context(|| format!("CNI result {out}"))?;
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no IPv4 address in the CNI result {out}"))?;
        let _ = &self.state;
        Ok(CniPod { name: pod.to_owned(), ip, ns, config, node: node.name().to_owned() })
    }
}

fn cni(node: &str, command: &str, pod: &Netns, config: &str) -> Result<String> {
    let plugin = serde_json::from_str::<serde_json::Value>(config)?["type"].as_str().unwrap_or_default().to_owned();
    let mut child = Command::new("ip")
        .args(["netns", "exec", node, &format!("{CNI_PATH}/{plugin}")])
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", pod.name())
        .env("CNI_NETNS", format!("/run/netns/{}", pod.name()))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {CNI_PATH}/{plugin}"))?;
    child.stdin.take().context("stdin")?.write_all(config.as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("{plugin} {command} failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(stdout)
}

impl CniPod {
    /// The `conndrain pod add` arguments for this pod.
    #[must_use]
    pub fn add_args(&self) -> Vec<String> {
        vec!["pod".into(), "add".into(), self.name.clone(), "--ip".into(), self.ip.to_string()]
    }
}

impl Drop for CniPod {
    fn drop(&mut self) {
        // As the runtime does at sandbox removal: the plugin tears down its
        // host side and releases the lease.
        let _ = cni(&self.node, "DEL", &self.ns, &self.config);
    }
}
