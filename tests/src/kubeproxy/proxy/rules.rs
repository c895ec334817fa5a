//! The rulesets a sync writes: the `iptables-restore` input and the `nft -f`
//! transaction for one family, and the chain names kube-proxy hashes.

use std::{fmt::Write as _, net::IpAddr};

use super::{KubeProxy, MASQ_MARK, sock};

impl KubeProxy {
    /// The `iptables-restore` input for one family: every kube-proxy chain
    /// redeclared (which flushes it) and refilled, stale endpoint chains
    /// deleted. Returns it and the endpoint chains it made.
    #[allow(clippy::too_many_lines)] // one ruleset, easier to compare with kube-proxy's whole
    pub(super) fn iptables_rules(
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
    pub(super) fn nftables_rules(
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::kubeproxy::{Backend, Protocol, Service, ServicePort};

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
