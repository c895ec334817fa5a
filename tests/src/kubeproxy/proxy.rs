//! kube-proxy's rules for one Service on one node, in its iptables mode or
//! its nftables mode, and its conntrack cleanup.
//!
//! What is reproduced (from kube-proxy's `pkg/proxy/iptables` and
//! `pkg/proxy/nftables`, Service type NodePort, `externalTrafficPolicy:
//! Cluster`, no session affinity):
//!
//! - ClusterIP `VIP:port` -> one endpoint chosen at random, DNAT to
//!   `podIP:targetPort`, no source NAT (except hairpin: a pod reaching
//!   itself through the Service);
//! - `nodeIP:nodePort` -> marked 0x4000, then the same endpoint choice and
//!   DNAT; marked packets are masqueraded on the way out (to a local pod:
//!   SNAT to the node's address on the pod's veth; to a pod on another node:
//!   SNAT to the node's address on the inter-node link);
//! - filter rules: drop conntrack-INVALID forwarded packets (iptables mode),
//!   accept marked and established traffic, reject traffic to a Service
//!   port without endpoints;
//! - a sync writes the whole ruleset again in one atomic transaction
//!   (`iptables-restore --noflush` with every kube-proxy chain redeclared,
//!   or one `nft -f` transaction that flushes and refills the table) and
//!   deletes the chains of endpoints that are gone;
//! - UDP conntrack cleanup for endpoints that stop serving, with the filters
//!   of kube-proxy's `conntrack.CleanStaleEntries`.
//!
//! Left out: the cluster-CIDR "masquerade off-cluster traffic to ClusterIPs"
//! rule (see [`Cluster::build`](super::Cluster::build)), LoadBalancer and
//! external IPs, `externalTrafficPolicy: Local`, session affinity, health
//! check node ports, and kube-proxy's partial syncs (a full sync has the same
//! effect on packets).

mod rules;

use std::{
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
    sync::Mutex,
};

use anyhow::{Context as _, Result, bail};

use crate::{Netns, run_cmd, show};

/// The masquerade mark, kube-proxy's default `--iptables-masquerade-bit 14`.
pub(super) const MASQ_MARK: &str = "0x4000";

/// How kube-proxy programs the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `--proxy-mode=iptables`, through `iptables-restore` and
    /// `ip6tables-restore` (here the nf_tables backend of iptables, as on
    /// current distributions).
    Iptables,
    /// `--proxy-mode=nftables`, through `nft -f`: tables `ip kube-proxy` and
    /// `ip6 kube-proxy`.
    Nftables,
    /// `--proxy-mode=ipvs`: IPVS virtual servers through `ipvsadm`, plus the
    /// mode's iptables rules for masquerading (see `kubeproxy/ipvs.rs`). Only
    /// on kernels with IPVS ([`super::ipvs_or_skip`]).
    Ipvs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One port of a Service.
#[derive(Debug, Clone)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// The endpoints' port (what the EndpointSlice says).
    pub target_port: u16,
    pub node_port: Option<u16>,
}

/// A Service of type NodePort (`externalTrafficPolicy: Cluster`).
#[derive(Debug, Clone)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// One ClusterIP per family (dual stack).
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

impl Service {
    /// The ClusterIP of the family of `like`.
    #[must_use]
    pub fn cluster_ip(&self, like: IpAddr) -> Option<IpAddr> {
        self.cluster_ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == like.is_ipv4())
    }

    /// The port of protocol `protocol` (the first one).
    #[must_use]
    pub fn port(&self, protocol: Protocol) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.protocol == protocol)
    }

    /// `namespace/name:port`, kube-proxy's `ServicePortName`.
    fn port_name(&self, port: &ServicePort) -> String {
        format!("{}/{}:{}", self.namespace, self.name, port.name)
    }
}

/// kube-proxy on one node, for one Service.
///
/// Rules live in the node's namespace and go with it; nothing to undo on drop.
#[derive(Debug)]
pub struct KubeProxy {
    ns: String,
    backend: Backend,
    service: Service,
    /// The node IPs that accept NodePort traffic (`--nodeport-addresses`);
    /// the iptables mode matches any local address (`addrtype LOCAL`).
    node_ips: Vec<IpAddr>,
    /// Per family (v4, v6): the endpoint chains of the last sync, to delete
    /// the ones the next sync no longer has.
    synced: Mutex<[Vec<String>; 2]>,
    /// IPVS mode: the real servers waiting for their graceful deletion
    /// (weight 0 until their connections are gone).
    pub(super) graceful: Mutex<Vec<(super::ipvs::VirtualServer, std::net::SocketAddr)>>,
}

impl KubeProxy {
    /// Sets up kube-proxy's base rules in `node` (the jumps from the built-in
    /// chains, the tables and base chains) and syncs the Service with no
    /// endpoints. `node_ips` accept the Service's NodePorts.
    pub fn start(
        node: &Netns,
        backend: Backend,
        service: &Service,
        node_ips: &[IpAddr],
    ) -> Result<Self> {
        let proxy = Self {
            ns: node.name().to_owned(),
            backend,
            service: service.clone(),
            node_ips: node_ips.to_vec(),
            synced: Mutex::new([Vec::new(), Vec::new()]),
            graceful: Mutex::new(Vec::new()),
        };
        if backend == Backend::Ipvs {
            proxy.ipvs_start()?;
        }
        if backend == Backend::Iptables {
            for v6 in [false, true] {
                proxy
                    .restore(v6, IPTABLES_JUMPS)
                    .context("installing kube-proxy's jump rules")?;
            }
        }
        proxy.sync(&[])?;
        Ok(proxy)
    }

    #[must_use]
    pub fn backend(&self) -> Backend {
        self.backend
    }

    #[must_use]
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// The node IPs that accept NodePort traffic.
    #[must_use]
    pub fn node_ips(&self) -> &[IpAddr] {
        &self.node_ips
    }

    /// Rewrites the whole ruleset for `endpoints` (pod IPs of both
    /// families; each family's rules get that family's endpoints), in one
    /// atomic transaction per family as kube-proxy's sync does, and deletes
    /// the chains of endpoints that are gone.
    ///
    /// In IPVS mode: the real servers of every virtual server become
    /// `endpoints`, with kube-proxy's graceful termination for the others.
    pub fn sync(&self, endpoints: &[IpAddr]) -> Result<()> {
        if self.backend == Backend::Ipvs {
            self.ipvs_sync(endpoints).with_context(|| {
                format!("syncing IPVS for endpoints {endpoints:?} in {}", self.ns)
            })?;
            return Ok(());
        }
        let mut synced = self.synced.lock().expect("kube-proxy sync lock");
        for (i, v6) in [false, true].into_iter().enumerate() {
            let eps: Vec<IpAddr> = endpoints
                .iter()
                .copied()
                .filter(|ip| ip.is_ipv6() == v6)
                .collect();
            let (text, chains) = match self.backend {
                Backend::Iptables => self.iptables_rules(v6, &eps, &synced[i]),
                Backend::Nftables => self.nftables_rules(v6, &eps, &synced[i]),
                Backend::Ipvs => unreachable!("IPVS synced above"),
            };
            match self.backend {
                Backend::Iptables => self.restore(v6, &text),
                Backend::Nftables | Backend::Ipvs => self.nft(&text),
            }
            .with_context(|| {
                format!(
                    "syncing {} rules for endpoints {eps:?} in {}",
                    if v6 { "IPv6" } else { "IPv4" },
                    self.ns
                )
            })?;
            synced[i] = chains;
        }
        Ok(())
    }

    /// The node's ruleset as the tools show it (`iptables-save` for both
    /// families, or `nft list table` for both kube-proxy tables).
    pub fn ruleset(&self) -> Result<String> {
        match self.backend {
            Backend::Iptables => Ok(format!(
                "{}{}",
                self.exec("iptables-save", &[])?,
                self.exec("ip6tables-save", &[])?
            )),
            Backend::Nftables => Ok(format!(
                "{}{}",
                self.exec("nft", &["list", "table", "ip", "kube-proxy"])?,
                self.exec("nft", &["list", "table", "ip6", "kube-proxy"])?
            )),
            Backend::Ipvs => Ok(format!(
                "{}{}{}",
                self.exec("iptables-save", &[])?,
                self.exec("ip6tables-save", &[])?,
                self.exec("ipvsadm", &["-Ln"])?
            )),
        }
    }

    /// kube-proxy's cleanup for a UDP endpoint that stopped serving
    /// (`conntrack.CleanStaleEntries`): deletes the UDP entries whose
    /// original destination is the ClusterIP and port, or whose original
    /// destination port is the NodePort, and whose reply source is
    /// `endpoint`. Returns how many entries were deleted.
    ///
    /// (kube-proxy before 1.28 ran `conntrack -D --orig-dst <ClusterIP>
    /// --dst-nat <endpoint> -p udp` and `conntrack -D -p udp --orig-port-dst
    /// <nodePort> --dst-nat <endpoint>`, the same entries.)
    pub fn cleanup_udp_conntrack(&self, endpoint: IpAddr) -> Result<usize> {
        let family = family(endpoint);
        let ep = endpoint.to_string();
        let mut deleted = 0;
        for port in self
            .service
            .ports
            .iter()
            .filter(|p| p.protocol == Protocol::Udp)
        {
            if let Some(vip) = self.service.cluster_ip(endpoint) {
                let (vip, dport) = (vip.to_string(), port.port.to_string());
                deleted += self.conntrack_delete(&[
                    "-f",
                    family,
                    "-p",
                    "udp",
                    "--orig-dst",
                    &vip,
                    "--orig-port-dst",
                    &dport,
                    "--reply-src",
                    &ep,
                ])?;
            }
            if let Some(node_port) = port.node_port {
                let node_port = node_port.to_string();
                deleted += self.conntrack_delete(&[
                    "-f",
                    family,
                    "-p",
                    "udp",
                    "--orig-port-dst",
                    &node_port,
                    "--reply-src",
                    &ep,
                ])?;
            }
        }
        Ok(deleted)
    }

    /// Deletes every conntrack entry (any protocol) whose reply comes from
    /// `endpoint`, i.e. every flow NATed to it or started by it:
    /// `conntrack -D --reply-src <endpoint>`. What an operator, a
    /// conntrack-table eviction or a cleanup script does to an endpoint.
    pub fn delete_conntrack_of(&self, endpoint: IpAddr) -> Result<usize> {
        let ep = endpoint.to_string();
        self.conntrack_delete(&["-f", family(endpoint), "--reply-src", &ep])
    }

    /// `conntrack -F`, both families.
    pub fn flush_conntrack(&self) -> Result<()> {
        self.exec("conntrack", &["-F", "-f", "ipv4"])?;
        self.exec("conntrack", &["-F", "-f", "ipv6"])?;
        Ok(())
    }

    /// Starts `conntrack -E` (events of both families) in the node: every
    /// NEW, UPDATE and DESTROY from now until [`ConntrackEvents::stop`].
    pub fn watch_conntrack(&self) -> Result<ConntrackEvents> {
        // Line-buffered: conntrack writes events with stdio, and a block
        // buffer still unflushed when the watcher is stopped would lose them.
        let mut cmd = self.command("stdbuf");
        cmd.args(["-oL", "conntrack", "-E", "-o", "timestamp"]);
        let shown = show(&cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("could not run `{shown}`"))?;
        let mut stdout = child.stdout.take().expect("piped stdout");
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
            text
        });
        // Let it subscribe before the caller makes the events it wants to see.
        std::thread::sleep(std::time::Duration::from_millis(500));
        Ok(ConntrackEvents {
            child,
            reader: Some(reader),
        })
    }

    /// `conntrack -L`, both families, one entry per line.
    pub fn conntrack(&self) -> Result<String> {
        Ok(format!(
            "{}{}",
            self.exec("conntrack", &["-L", "-f", "ipv4"])?,
            self.exec("conntrack", &["-L", "-f", "ipv6"])?
        ))
    }

    fn conntrack_delete(&self, args: &[&str]) -> Result<usize> {
        let mut cmd = self.command("conntrack");
        cmd.arg("-D").args(args);
        let shown = show(&cmd);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("could not run `{shown}`"))?;
        // "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been deleted."
        // It exits 1 when there was nothing to delete.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let count = stderr
            .lines()
            .find_map(|l| {
                let (_, rest) = l.split_once("): ")?;
                let (n, tail) = rest.split_once(' ')?;
                tail.starts_with("flow entries have been deleted")
                    .then(|| n.parse::<usize>().ok())?
            })
            .with_context(|| format!("`{shown}` failed ({}): {}", out.status, stderr.trim()))?;
        Ok(count)
    }

    pub(super) fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, program]);
        cmd
    }

    pub(super) fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        run_cmd(self.command(program).args(args))
    }

    pub(super) fn restore(&self, v6: bool, rules: &str) -> Result<()> {
        let tool = if v6 {
            "ip6tables-restore"
        } else {
            "iptables-restore"
        };
        let mut cmd = self.command(tool);
        cmd.args(["-w", "--noflush"]);
        run_with_stdin(&mut cmd, rules)
    }

    fn nft(&self, rules: &str) -> Result<()> {
        let mut cmd = self.command("nft");
        cmd.args(["-f", "/dev/stdin"]);
        run_with_stdin(&mut cmd, rules)
    }
}

/// A running `conntrack -E` (see [`KubeProxy::watch_conntrack`]); killed on
/// drop.
#[derive(Debug)]
pub struct ConntrackEvents {
    child: std::process::Child,
    reader: Option<std::thread::JoinHandle<String>>,
}

impl ConntrackEvents {
    /// Stops watching and returns the events seen, one per line.
    #[must_use]
    pub fn stop(mut self) -> String {
        self.terminate();
        self.reader
            .take()
            .and_then(|r| r.join().ok())
            .unwrap_or_default()
    }

    fn terminate(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SIGTERM: conntrack flushes its output and exits. (`ip netns
            // exec` execs conntrack, so this pid is conntrack's.)
            // SAFETY: signalling our own child, which we have not reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.child.wait();
    }
}

impl Drop for ConntrackEvents {
    fn drop(&mut self) {
        if self.reader.is_some() {
            self.terminate();
        }
    }
}

/// Installed once by kube-proxy at start (its `ensureChain`/`ensureRule`):
/// the jumps from the built-in chains into its own.
const IPTABLES_JUMPS: &str = "*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
COMMIT
";

/// `ip:port`, with brackets for IPv6 (`[fd00::1]:80`), as both tools take it.
pub(super) fn sock(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "ipv4" } else { "ipv6" }
}

/// Runs `cmd` with `input` on its stdin; fails with its stderr and the input.
pub(super) fn run_with_stdin(cmd: &mut Command, input: &str) -> Result<()> {
    let shown = show(cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not run `{shown}`"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())
        .with_context(|| format!("writing to `{shown}`"))?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}\n--- input ---\n{input}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
