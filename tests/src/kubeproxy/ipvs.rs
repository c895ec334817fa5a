//! kube-proxy's IPVS mode (`--proxy-mode=ipvs`, `pkg/proxy/ipvs`), for one
//! Service on one node.
//!
//! What is reproduced:
//!
//! - at start (`NewProxier`): `net.ipv4.vs.conntrack=1` (IPVS keeps the
//!   conntrack entry of each connection it forwards, so iptables can
//!   masquerade it), `net.ipv4.vs.expire_nodest_conn=1`,
//!   `net.ipv4.vs.expire_quiescent_template=1`, `net.ipv4.ip_forward=1`,
//!   and `net.ipv4.vs.conn_reuse_mode=0` on kernels 4.1 to 5.8 only (kube-proxy
//!   leaves it as it is from 5.9 on, where the kernel fixed the reuse bug);
//!   the dummy interface `kube-ipvs0`;
//! - every ClusterIP bound to `kube-ipvs0` (so the node routes it locally and
//!   IPVS, hooked at LOCAL_IN, sees it); one virtual server per Service port
//!   on the ClusterIP and one per node IP on the NodePort, scheduler `rr`;
//!   one real server per endpoint, in masquerade (NAT) mode, weight 1;
//! - the iptables rules of the IPVS mode: KUBE-SERVICES accepts ClusterIP
//!   traffic and sends local destinations to KUBE-NODE-PORT, which marks
//!   NodePort traffic 0x4000 (KUBE-MARK-MASQ); KUBE-POSTROUTING masquerades
//!   marked packets (`--random-fully`); KUBE-FORWARD accepts marked and
//!   established traffic. kube-proxy matches ClusterIPs and NodePorts with
//!   ipsets (KUBE-CLUSTER-IP `dst,dst`, KUBE-NODE-PORT-TCP/UDP `dst`); here
//!   each set member is a plain `-d ip -p proto --dport port` or
//!   `-p proto --dport port` match: the same packets, without ipset;
//! - graceful termination (`graceful_termination.go`): an endpoint that is
//!   no longer ready leaves the real servers through `GracefulDeleteRS`: a UDP
//!   real server is deleted at once (its connections expire at their next
//!   packet, `expire_nodest_conn`), a TCP one with connections gets weight 0
//!   (no new connection, the existing ones go on) and is deleted by the
//!   manager's periodic pass (every minute in kube-proxy,
//!   [`KubeProxy::graceful_termination_pass`] here) once it has no active
//!   and no inactive connection; an endpoint that comes back while it waits
//!   is deleted and added again;
//! - the UDP conntrack cleanup at the end of the sync: the same
//!   `conntrack.CleanStaleEntries` as the other modes
//!   ([`KubeProxy::cleanup_udp_conntrack`]).
//!
//! Left out: the KUBE-LOOP-BACK hairpin masquerade, LoadBalancer and
//! external IPs, `externalTrafficPolicy: Local`, session affinity
//! (persistent virtual servers), strict ARP, the KUBE-IPVS-FILTER rules that
//! drop traffic to other ports of the IPVS addresses.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context as _, Result, bail};

use super::proxy::{KubeProxy, MASQ_MARK, Protocol, sock};

/// kube-proxy's dummy interface for the IPVS addresses.
pub const DUMMY: &str = "kube-ipvs0";

/// Whether this kernel has IPVS: loads `ip_vs` and `ip_vs_rr` and looks for
/// `/proc/net/ip_vs`. The host kernel of this project's machines has none; the
/// guest stage's Linux 6.1 has it.
#[must_use]
pub fn ipvs_available() -> bool {
    for m in ["ip_vs", "ip_vs_rr"] {
        let _ = std::process::Command::new("modprobe")
            .arg(m)
            .stderr(std::process::Stdio::null())
            .status();
    }
    std::path::Path::new("/proc/net/ip_vs").exists()
}

/// For tests of the IPVS mode: `Ok(true)` to go on; `Ok(false)` (after
/// printing `skipped: no IPVS in this kernel`) when the kernel has no IPVS,
/// unless `CONNDRAIN_REQUIRE_IPVS=1` (the guest stage sets it): then an error.
pub fn ipvs_or_skip() -> Result<bool> {
    if ipvs_available() {
        return Ok(true);
    }
    if std::env::var_os("CONNDRAIN_REQUIRE_IPVS").is_some_and(|v| v == "1") {
        bail!("no IPVS in this kernel (ip_vs does not load), and CONNDRAIN_REQUIRE_IPVS=1");
    }
    eprintln!(
        "skipped: no IPVS in this kernel (these tests run in the Linux 6.1 guest: cargo xtask test-guest)"
    );
    Ok(false)
}

/// One virtual server: protocol and address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtualServer {
    pub protocol: Protocol,
    pub addr: SocketAddr,
}

impl VirtualServer {
    /// `-t ADDR` or `-u ADDR`, as ipvsadm takes it.
    fn arg(&self) -> String {
        let flag = match self.protocol {
            Protocol::Tcp => "-t",
            Protocol::Udp => "-u",
        };
        format!("{flag} {}", self.addr)
    }
}

/// One real server of a virtual server, as `ipvsadm -Ln` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RealServer {
    pub addr: SocketAddr,
    pub weight: u32,
    pub active: u64,
    pub inactive: u64,
}

/// Parses `ipvsadm -Ln`.
pub fn parse_table(text: &str) -> Result<Vec<(VirtualServer, Vec<RealServer>)>> {
    let mut out: Vec<(VirtualServer, Vec<RealServer>)> = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [proto @ ("TCP" | "UDP"), addr, ..] => {
                let protocol = if *proto == "TCP" {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                };
                let addr = addr
                    .parse()
                    .with_context(|| format!("ipvsadm -Ln: {line}"))?;
                out.push((VirtualServer { protocol, addr }, Vec::new()));
            }
            ["->", addr, _forward, weight, active, inactive] if *addr != "RemoteAddress:Port" => {
                let rs = RealServer {
                    addr: addr
                        .parse()
                        .with_context(|| format!("ipvsadm -Ln: {line}"))?,
                    weight: weight.parse()?,
                    active: active.parse()?,
                    inactive: inactive.parse()?,
                };
                out.last_mut()
                    .with_context(|| {
                        format!("ipvsadm -Ln: a real server before any virtual server: {line}")
                    })?
                    .1
                    .push(rs);
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The `InPkts` and `OutPkts` of virtual server `vs` in `ipvsadm -Ln --stats --exact`.
pub fn parse_stats(text: &str, vs: VirtualServer) -> Option<(u64, u64)> {
    let proto = match vs.protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    };
    text.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [p, addr, _conns, inpkts, outpkts, ..]
                if *p == proto && addr.parse::<SocketAddr>().ok() == Some(vs.addr) =>
            {
                Some((inpkts.parse().ok()?, outpkts.parse().ok()?))
            }
            _ => None,
        }
    })
}

/// The kernel releases from which kube-proxy leaves `conn_reuse_mode` alone.
fn conn_reuse_fixed(release: &str) -> bool {
    let mut nums = release
        .split(['.', '-'])
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    (major, minor) >= (5, 9)
}

impl KubeProxy {
    /// `NewProxier` and the one-time setup of the IPVS mode (see the module doc).
    pub(super) fn ipvs_start(&self) -> Result<()> {
        if !ipvs_available() {
            bail!(
                "kube-proxy's IPVS mode needs IPVS, and this kernel has none (ip_vs does not load)"
            );
        }
        let mut sysctls = vec![
            "net.ipv4.vs.conntrack=1",
            "net.ipv4.vs.expire_nodest_conn=1",
            "net.ipv4.vs.expire_quiescent_template=1",
            "net.ipv4.ip_forward=1",
        ];
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        if !conn_reuse_fixed(release.trim()) {
            sysctls.push("net.ipv4.vs.conn_reuse_mode=0");
        }
        let mut args = vec!["-w"];
        args.extend(sysctls);
        self.exec("sysctl", &args)?;
        self.exec("ip", &["link", "add", DUMMY, "type", "dummy"])?;
        // kube-proxy never sets kube-ipvs0 up: its addresses still get their
        // local routes, which is all IPVS needs.
        for vip in &self.service().cluster_ips {
            let prefix = if vip.is_ipv6() { "128" } else { "32" };
            self.exec(
                "ip",
                &["addr", "add", &format!("{vip}/{prefix}"), "dev", DUMMY],
            )?;
        }
        for v6 in [false, true] {
            self.restore(v6, &self.ipvs_iptables_rules(v6))
                .context("installing kube-proxy's iptables rules of the IPVS mode")?;
        }
        Ok(())
    }

    /// The iptables rules of the IPVS mode for one family (they depend on
    /// the Service's ports, not on its endpoints).
    pub(super) fn ipvs_iptables_rules(&self, v6: bool) -> String {
        let svc = self.service();
        let host = if v6 { "/128" } else { "/32" };
        let mut nat = String::new();
        let mut nodeport = String::new();
        for port in &svc.ports {
            let proto = port.protocol.as_str();
            if let Some(np) = port.node_port {
                // KUBE-NODE-PORT-TCP / -UDP (bitmap:port, matched "dst").
                let _ = writeln!(
                    nodeport,
                    "-A KUBE-NODE-PORT -p {proto} -m comment --comment \"Kubernetes nodeport {proto} port for masquerade purpose\" -m {proto} --dport {np} -j KUBE-MARK-MASQ"
                );
            }
        }
        nat.push_str(&nodeport);
        nat.push_str("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT\n");
        // acceptIPVSTraffic: KUBE-CLUSTER-IP (hash:ip,port, matched "dst,dst").
        if let Some(vip) = svc.cluster_ips.iter().find(|ip| ip.is_ipv6() == v6) {
            for port in &svc.ports {
                let proto = port.protocol.as_str();
                let _ = writeln!(
                    nat,
                    "-A KUBE-SERVICES -m comment --comment \"Kubernetes service cluster ip + port for masquerade purpose\" -d {vip}{host} -p {proto} -m {proto} --dport {} -j ACCEPT",
                    port.port
                );
            }
        }
        format!(
            "*filter\n\
             :KUBE-FORWARD - [0:0]\n\
             -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
             -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT\n\
             -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
             COMMIT\n\
             *nat\n\
             :KUBE-SERVICES - [0:0]\n\
             :KUBE-POSTROUTING - [0:0]\n\
             :KUBE-NODE-PORT - [0:0]\n\
             :KUBE-MARK-MASQ - [0:0]\n\
             -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
             {nat}\
             -A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
             -A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}\n\
             -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
             -A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}\n\
             COMMIT\n"
        )
    }

    /// The virtual servers of the Service: per port, the ClusterIP of each
    /// family and every node IP on the NodePort.
    pub fn ipvs_virtual_servers(&self) -> Vec<VirtualServer> {
        let svc = self.service();
        let mut out = Vec::new();
        for port in &svc.ports {
            for vip in &svc.cluster_ips {
                out.push(VirtualServer {
                    protocol: port.protocol,
                    addr: SocketAddr::new(*vip, port.port),
                });
            }
            if let Some(np) = port.node_port {
                for ip in self.node_ips() {
                    out.push(VirtualServer {
                        protocol: port.protocol,
                        addr: SocketAddr::new(*ip, np),
                    });
                }
            }
        }
        out
    }

    /// The node's IPVS table: `ipvsadm -Ln`, parsed.
    pub fn ipvs_table(&self) -> Result<Vec<(VirtualServer, Vec<RealServer>)>> {
        parse_table(&self.exec("ipvsadm", &["-Ln"])?)
    }

    /// `syncEndpoint` for every virtual server: `endpoints` are the ready
    /// ones (both families). Returns the ipvsadm commands it ran.
    pub(super) fn ipvs_sync(&self, endpoints: &[IpAddr]) -> Result<String> {
        let table = self.ipvs_table()?;
        let mut graceful = self.graceful.lock().expect("graceful termination list");
        let mut cmds = String::new();
        for vs in self.ipvs_virtual_servers() {
            let target_port = self
                .service()
                .ports
                .iter()
                .find(|p| {
                    p.protocol == vs.protocol
                        && (p.port == vs.addr.port() || p.node_port == Some(vs.addr.port()))
                })
                .map(|p| p.target_port)
                .context("a virtual server of a Service port")?;
            let current: &[RealServer] = match table.iter().find(|(v, _)| *v == vs) {
                Some((_, rss)) => rss,
                None => {
                    let _ = writeln!(cmds, "-A {} -s rr", vs.arg());
                    &[]
                }
            };
            let wanted: Vec<SocketAddr> = endpoints
                .iter()
                .filter(|ip| ip.is_ipv6() == vs.addr.is_ipv6())
                .map(|ip| SocketAddr::new(*ip, target_port))
                .collect();
            for rs in &wanted {
                if current.iter().any(|c| c.addr == *rs) {
                    // Back while waiting for its graceful deletion: deleted
                    // and added again (MoveRSOutofGracefulDeleteList).
                    if let Some(i) = graceful.iter().position(|(v, r)| *v == vs && r == rs) {
                        graceful.remove(i);
                        let _ = writeln!(cmds, "-d {} -r {}", vs.arg(), sock(rs.ip(), rs.port()));
                    } else {
                        continue;
                    }
                }
                let _ = writeln!(
                    cmds,
                    "-a {} -r {} -m -w 1",
                    vs.arg(),
                    sock(rs.ip(), rs.port())
                );
            }
            for rs in current.iter().filter(|c| !wanted.contains(&c.addr)) {
                if graceful.iter().any(|(v, r)| *v == vs && *r == rs.addr) {
                    continue;
                }
                // GracefulDeleteRS: at once for UDP or without connections.
                if vs.protocol == Protocol::Udp || rs.active + rs.inactive == 0 {
                    let _ = writeln!(
                        cmds,
                        "-d {} -r {}",
                        vs.arg(),
                        sock(rs.addr.ip(), rs.addr.port())
                    );
                } else {
                    let _ = writeln!(
                        cmds,
                        "-e {} -r {} -m -w 0",
                        vs.arg(),
                        sock(rs.addr.ip(), rs.addr.port())
                    );
                    graceful.push((vs, rs.addr));
                }
            }
        }
        if !cmds.is_empty() {
            let mut cmd = self.command("ipvsadm");
            cmd.arg("-R");
            super::proxy::run_with_stdin(&mut cmd, &cmds)
                .context("applying the IPVS changes of a sync")?;
        }
        Ok(cmds)
    }

    /// The graceful termination manager's periodic pass (`tryDeleteRs`,
    /// every minute in kube-proxy): deletes each weight-0 real server that
    /// has no active and no inactive connection left. Returns how many it
    /// deleted.
    pub fn graceful_termination_pass(&self) -> Result<usize> {
        let table = self.ipvs_table()?;
        let mut graceful = self.graceful.lock().expect("graceful termination list");
        let mut cmds = String::new();
        let mut deleted = 0;
        graceful.retain(|(vs, addr)| {
            let rs = table
                .iter()
                .find(|(v, _)| v == vs)
                .and_then(|(_, rss)| rss.iter().find(|r| r.addr == *addr));
            match rs {
                Some(rs) if rs.active + rs.inactive != 0 => true,
                Some(_) => {
                    let _ = writeln!(cmds, "-d {} -r {}", vs.arg(), sock(addr.ip(), addr.port()));
                    deleted += 1;
                    false
                }
                None => false,
            }
        });
        if !cmds.is_empty() {
            let mut cmd = self.command("ipvsadm");
            cmd.arg("-R");
            super::proxy::run_with_stdin(&mut cmd, &cmds)?;
        }
        Ok(deleted)
    }

    /// The packet counters of one virtual server (`ipvsadm -Ln --stats
    /// --exact`): packets in (client to real server) and out (replies), over
    /// all its real servers, deleted ones included. IPVS counts every packet
    /// it forwards at LOCAL_IN or FORWARD, so a flow whose packets do not
    /// move them never went through IPVS.
    pub fn ipvs_packets(&self, vs: VirtualServer) -> Result<(u64, u64)> {
        let text = self.exec("ipvsadm", &["-Ln", "--stats", "--exact"])?;
        parse_stats(&text, vs)
            .with_context(|| format!("no virtual server {vs:?} in ipvsadm --stats:\n{text}"))
    }

    /// IPVS's own connection table (`ipvsadm -Lnc`).
    pub fn ipvs_connections(&self) -> Result<String> {
        self.exec("ipvsadm", &["-Lnc"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ipvsadm_listing() {
        let text = "IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  10.96.0.10:80 rr
  -> 10.244.1.2:8080              Masq    0      1          0
  -> 10.244.1.3:8080              Masq    1      0          2
UDP  [fd00:96::10]:53 rr
  -> [fd00:244:1::2]:5353         Masq    1      0          1
TCP  172.18.0.10:30080 rr
";
        let t = parse_table(text).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].0.protocol, Protocol::Tcp);
        assert_eq!(t[0].1[0].weight, 0);
        assert_eq!(t[0].1[0].active, 1);
        assert_eq!(t[0].1[1].inactive, 2);
        assert_eq!(t[1].0.addr, "[fd00:96::10]:53".parse().unwrap());
        assert_eq!(t[1].1[0].addr, "[fd00:244:1::2]:5353".parse().unwrap());
        assert!(t[2].1.is_empty());
    }

    #[test]
    fn parses_ipvsadm_stats() {
        let text = "IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes
  -> RemoteAddress:Port
TCP  10.96.0.10:80                       3     1234      987    81234    65432
  -> 10.244.1.2:8080                     1     1000      900    60000    50000
UDP  10.96.0.10:53                       1        5        5      300      300
";
        let tcp = VirtualServer {
            protocol: Protocol::Tcp,
            addr: "10.96.0.10:80".parse().unwrap(),
        };
        let udp = VirtualServer {
            protocol: Protocol::Udp,
            addr: "10.96.0.10:53".parse().unwrap(),
        };
        let other = VirtualServer {
            protocol: Protocol::Udp,
            addr: "10.96.0.10:80".parse().unwrap(),
        };
        assert_eq!(parse_stats(text, tcp), Some((1234, 987)));
        assert_eq!(parse_stats(text, udp), Some((5, 5)));
        assert_eq!(parse_stats(text, other), None);
    }

    #[test]
    fn conn_reuse_mode_is_left_alone_from_5_9() {
        assert!(conn_reuse_fixed("6.1.0-47-amd64"));
        assert!(conn_reuse_fixed("5.9.0"));
        assert!(!conn_reuse_fixed("5.4.0-150-generic"));
        assert!(!conn_reuse_fixed("4.19.0"));
    }
}
