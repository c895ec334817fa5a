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

use std::{
    fmt::Write as _,
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

    /// The `iptables-restore` input for one family: every kube-proxy chain
    /// redeclared (which flushes it) and refilled, stale endpoint chains
    /// deleted. Returns it and the endpoint chains it made.
    #[allow(clippy::too_many_lines)] // one ruleset, easier to compare with kube-proxy's whole
    fn iptables_rules(
        &self,
        v6: bool,
        endpoints: &[IpAddr],
        stale: &[String],
    ) -> (String, Vec<String>) {
        let svc = &self.service;
        let host = if v6 { "/128" } else { "/32" };
        let filter_chains: Vec<String> =
            ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD"]
                .map(String::from)
                .to_vec();
        let mut filter = String::new();
        let mut nat_chains: Vec<String> = [
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
        ]
        .map(String::from)
        .to_vec();
        let mut nat = String::new();
        let mut sep_chains = Vec::new();

        // Filter: conntrack-INVALID forwarded packets are dropped; marked
        // (NodePort) and established traffic is accepted.
        filter.push_str(
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
             -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
             -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
        );
        let _ = write!(
            nat,
            "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
             -A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n\
             -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
             -A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}\n"
        );

        let vip = svc.cluster_ips.iter().find(|ip| ip.is_ipv6() == v6);
        let mut nodeports = String::new();
        for port in &svc.ports {
            let Some(vip) = vip else { continue };
            let name = svc.port_name(port);
            let proto = port.protocol.as_str();
            let hash = port_hash(&format!("{name}{}", proto.to_uppercase()));
            let svc_chain = format!("KUBE-SVC-{hash}");
            let ext_chain = format!("KUBE-EXT-{hash}");
            if endpoints.is_empty() {
                // kube-proxy: "has no endpoints" -> REJECT, in filter.
                let _ = writeln!(
                    filter,
                    "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" -m {proto} -p {proto} -d {vip}{host} --dport {} -j REJECT",
                    port.port
                );
                if let Some(np) = port.node_port {
                    let _ = writeln!(
                        filter,
                        "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{name} has no endpoints\" -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {np} -j REJECT"
                    );
                }
                continue;
            }
            nat_chains.push(svc_chain.clone());
            let _ = writeln!(
                nat,
                "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {vip}{host} --dport {} -j {svc_chain}",
                port.port
            );
            if let Some(np) = port.node_port {
                nat_chains.push(ext_chain.clone());
                let _ = writeln!(
                    nodeports,
                    "-A KUBE-NODEPORTS -m comment --comment {name} -m {proto} -p {proto} --dport {np} -j {ext_chain}"
                );
                let _ = writeln!(
                    nat,
                    "-A {ext_chain} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ\n\
                     -A {ext_chain} -j {svc_chain}"
                );
            }
            let n = endpoints.len();
            for (i, ep) in endpoints.iter().enumerate() {
                let ep_str = sock(*ep, port.target_port);
                let sep = format!(
                    "KUBE-SEP-{}",
                    port_hash(&format!("{name}{}{ep_str}", proto.to_uppercase()))
                );
                // Each rule takes its share of what the ones before left:
                // 1/n, 1/(n-1), ..., and the last one takes the rest.
                let statistic = if i + 1 < n {
                    #[allow(clippy::cast_precision_loss)] // n is small
                    let p = 1.0 / (n - i) as f64;
                    format!(" -m statistic --mode random --probability {p:.10}")
                } else {
                    String::new()
                };
                let _ = writeln!(
                    nat,
                    "-A {svc_chain} -m comment --comment \"{name} -> {ep_str}\"{statistic} -j {sep}\n\
                     -A {sep} -m comment --comment {name} -s {ep}{host} -j KUBE-MARK-MASQ\n\
                     -A {sep} -m comment --comment {name} -m {proto} -p {proto} -j DNAT --to-destination {ep_str}"
                );
                nat_chains.push(sep.clone());
                sep_chains.push(sep);
            }
        }
        nat.push_str(&nodeports);
        nat.push_str(
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
        );
        // Chains of endpoints that are gone: declared (flushed), then deleted.
        let gone: Vec<&String> = stale.iter().filter(|c| !sep_chains.contains(c)).collect();
        for c in &gone {
            nat_chains.push((*c).clone());
        }
        for c in &gone {
            let _ = writeln!(nat, "-X {c}");
        }
        let mut out = String::from("*filter\n");
        for c in &filter_chains {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        out.push_str(&filter);
        out.push_str("COMMIT\n*nat\n");
        for c in &nat_chains {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        out.push_str(&nat);
        out.push_str("COMMIT\n");
        (out, sep_chains)
    }

    /// The `nft -f` transaction for one family: the table, sets, maps and
    /// base chains (idempotent `add`), everything flushed, refilled, stale
    /// endpoint chains deleted. Returns it and the endpoint chains it made.
    #[allow(clippy::too_many_lines)] // one ruleset, easier to compare with kube-proxy's whole
    fn nftables_rules(
        &self,
        v6: bool,
        endpoints: &[IpAddr],
        stale: &[String],
    ) -> (String, Vec<String>) {
        let svc = &self.service;
        let (fam, ip, addr_type) = if v6 {
            ("ip6", "ip6", "ipv6_addr")
        } else {
            ("ip", "ip", "ipv4_addr")
        };
        let t = format!("{fam} kube-proxy");
        let mut out = String::new();
        let _ = write!(
            out,
            "add table {t} {{ comment \"rules for kube-proxy\" ; }}\n\
             add set {t} cluster-ips {{ type {addr_type} ; comment \"Active ClusterIPs\" ; }}\n\
             add set {t} nodeport-ips {{ type {addr_type} ; comment \"IPs that accept NodePort traffic\" ; }}\n\
             add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}\n\
             add map {t} no-endpoint-services {{ type {addr_type} . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
             add map {t} service-ips {{ type {addr_type} . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
             add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n\
             add chain {t} cluster-ips-check\n\
             add chain {t} filter-forward {{ type filter hook forward priority 0 ; }}\n\
             add chain {t} filter-input {{ type filter hook input priority 0 ; }}\n\
             add chain {t} filter-output {{ type filter hook output priority 0 ; }}\n\
             add chain {t} mark-for-masquerade\n\
             add chain {t} masquerading\n\
             add chain {t} nat-output {{ type nat hook output priority -100 ; }}\n\
             add chain {t} nat-postrouting {{ type nat hook postrouting priority 100 ; }}\n\
             add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}\n\
             add chain {t} nodeport-endpoints-check\n\
             add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}\n\
             add chain {t} services\n\
             add chain {t} service-endpoints-check\n\
             flush table {t}\n\
             flush set {t} cluster-ips\n\
             flush set {t} nodeport-ips\n\
             flush map {t} no-endpoint-nodeports\n\
             flush map {t} no-endpoint-services\n\
             flush map {t} service-ips\n\
             flush map {t} service-nodeports\n\
             add rule {t} cluster-ips-check {ip} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n\
             add rule {t} filter-forward ct state new jump service-endpoints-check\n\
             add rule {t} filter-forward ct state new jump cluster-ips-check\n\
             add rule {t} filter-input ct state new jump nodeport-endpoints-check\n\
             add rule {t} filter-input ct state new jump service-endpoints-check\n\
             add rule {t} filter-output ct state new jump service-endpoints-check\n\
             add rule {t} filter-output ct state new jump cluster-ips-check\n\
             add rule {t} mark-for-masquerade mark set mark or {MASQ_MARK}\n\
             add rule {t} masquerading mark and {MASQ_MARK} == 0 return\n\
             add rule {t} masquerading mark set mark xor {MASQ_MARK}\n\
             add rule {t} masquerading masquerade fully-random\n\
             add rule {t} nat-output jump services\n\
             add rule {t} nat-postrouting jump masquerading\n\
             add rule {t} nat-prerouting jump services\n\
             add rule {t} nodeport-endpoints-check {ip} daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports\n\
             add rule {t} reject-chain reject\n\
             add rule {t} services {ip} daddr . meta l4proto . th dport vmap @service-ips\n\
             add rule {t} services {ip} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n\
             add rule {t} service-endpoints-check {ip} daddr . meta l4proto . th dport vmap @no-endpoint-services\n"
        );
        for node_ip in self.node_ips.iter().filter(|a| a.is_ipv6() == v6) {
            let _ = writeln!(out, "add element {t} nodeport-ips {{ {node_ip} }}");
        }
        let mut ep_chains = Vec::new();
        let vip = svc.cluster_ips.iter().find(|a| a.is_ipv6() == v6);
        if let Some(vip) = vip {
            let _ = writeln!(out, "add element {t} cluster-ips {{ {vip} }}");
        }
        for port in &svc.ports {
            let Some(vip) = vip else { continue };
            let proto = port.protocol.as_str();
            let name = svc.port_name(port);
            // kube-proxy: "ns/svc/tcp/port", behind a hash of it.
            let id = format!("{}/{}/{proto}/{}", svc.namespace, svc.name, port.name);
            let hash = &port_hash(&id)[..8];
            let svc_chain = format!("service-{hash}-{id}");
            let ext_chain = format!("external-{hash}-{id}");
            if endpoints.is_empty() {
                let _ = writeln!(
                    out,
                    "add element {t} no-endpoint-services {{ {vip} . {proto} . {} comment \"{name}\" : goto reject-chain }}",
                    port.port
                );
                if let Some(np) = port.node_port {
                    let _ = writeln!(
                        out,
                        "add element {t} no-endpoint-nodeports {{ {proto} . {np} comment \"{name}\" : goto reject-chain }}"
                    );
                }
                continue;
            }
            let mut vmap = Vec::new();
            for (i, ep) in endpoints.iter().enumerate() {
                // kube-proxy writes IPv6 endpoints with '.' for ':' in names.
                let ep_id = format!(
                    "{id}__{}/{}",
                    ep.to_string().replace(':', "."),
                    port.target_port
                );
                let chain = format!("endpoint-{}-{ep_id}", &port_hash(&ep_id)[..8]);
                let _ = writeln!(
                    out,
                    "add chain {t} {chain}\n\
                     add rule {t} {chain} {ip} saddr {ep} jump mark-for-masquerade\n\
                     add rule {t} {chain} meta l4proto {proto} dnat to {}",
                    sock(*ep, port.target_port)
                );
                vmap.push(format!("{i} : goto {chain}"));
                ep_chains.push(chain);
            }
            let _ = writeln!(
                out,
                "add chain {t} {svc_chain}\n\
                 add rule {t} {svc_chain} numgen random mod {} vmap {{ {} }}\n\
                 add element {t} service-ips {{ {vip} . {proto} . {} : goto {svc_chain} }}",
                endpoints.len(),
                vmap.join(" , "),
                port.port
            );
            if let Some(np) = port.node_port {
                let _ = writeln!(
                    out,
                    "add chain {t} {ext_chain}\n\
                     add rule {t} {ext_chain} jump mark-for-masquerade\n\
                     add rule {t} {ext_chain} goto {svc_chain}\n\
                     add element {t} service-nodeports {{ {proto} . {np} : goto {ext_chain} }}"
                );
            }
        }
        // Endpoint chains that are gone: unreferenced after the flush above.
        for c in stale.iter().filter(|c| !ep_chains.contains(c)) {
            let _ = writeln!(out, "delete chain {t} {c}");
        }
        (out, ep_chains)
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

/// 16 base32 characters of a hash of `s`, as kube-proxy names its chains
/// (it uses SHA-256; any stable hash does here).
fn port_hash(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    // Two FNV-1a 64 passes with different offsets: 128 bits, 80 of them used.
    let fnv = |offset: u64| {
        s.bytes().fold(offset, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let bits =
        (u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 64) | u128::from(fnv(0x6c62_272e_07bb_0142));
    (0..16)
        .map(|i| char::from(ALPHABET[usize::try_from((bits >> (5 * i)) & 31).expect("5 bits")]))
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> Service {
        Service {
            namespace: "default".into(),
            name: "web".into(),
            cluster_ips: vec![
                "10.96.0.10".parse().unwrap(),
                "fd00:96::10".parse().unwrap(),
            ],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: 8080,
                node_port: Some(30080),
            }],
        }
    }

    fn proxy(backend: Backend) -> KubeProxy {
        KubeProxy {
            ns: "unused".into(),
            backend,
            service: service(),
            node_ips: vec!["172.18.0.10".parse().unwrap()],
            synced: Mutex::new([Vec::new(), Vec::new()]),
            graceful: Mutex::new(Vec::new()),
        }
    }

    #[test]
    fn iptables_probabilities_and_stale_chains() {
        let p = proxy(Backend::Iptables);
        let eps: Vec<IpAddr> = ["10.244.1.2", "10.244.1.3", "10.244.2.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let (text, chains) = p.iptables_rules(false, &eps, &[]);
        assert_eq!(chains.len(), 3);
        assert!(text.contains("--probability 0.3333333333"), "{text}");
        assert!(text.contains("--probability 0.5000000000"), "{text}");
        assert!(
            text.contains("-j DNAT --to-destination 10.244.2.2:8080"),
            "{text}"
        );
        assert!(text.contains("--dport 30080 -j KUBE-EXT-"), "{text}");
        let (text2, chains2) = p.iptables_rules(false, &eps[1..], &chains);
        assert_eq!(chains2.len(), 2);
        assert!(text2.contains(&format!("-X {}", chains[0])), "{text2}");
        assert!(!text2.contains("10.244.1.2:8080"), "{text2}");
    }

    #[test]
    fn nftables_vmap_and_ipv6_names() {
        let p = proxy(Backend::Nftables);
        let eps: Vec<IpAddr> = vec![
            "fd00:244:1::2".parse().unwrap(),
            "fd00:244:2::2".parse().unwrap(),
        ];
        let (text, chains) = p.nftables_rules(true, &eps, &[]);
        assert!(
            text.contains("numgen random mod 2 vmap { 0 : goto endpoint-"),
            "{text}"
        );
        assert!(text.contains("dnat to [fd00:244:1::2]:8080"), "{text}");
        assert!(
            chains[0].ends_with("default/web/tcp/http__fd00.244.1..2/8080"),
            "{chains:?}"
        );
        assert!(
            text.contains(
                "add element ip6 kube-proxy service-nodeports { tcp . 30080 : goto external-"
            ),
            "{text}"
        );
    }

    #[test]
    fn hashes_are_stable_and_distinct() {
        assert_eq!(port_hash("a"), port_hash("a"));
        assert_ne!(
            port_hash("default/web:httpTCP"),
            port_hash("default/web:httpUDP")
        );
        assert_eq!(port_hash("x").len(), 16);
    }
}
