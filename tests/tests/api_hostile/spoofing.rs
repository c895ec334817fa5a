//! Who is asking: a pod that claims another pod's IP gets no answer, and
//! forwarding headers do not change who the agent answers about.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    thread,
};

use anyhow::{Context as _, Result, bail, ensure};
use conndrain_tests::{NODE_V4, NODE_V6, Netns, TIMEOUT, run_in};

use super::{
    METRICS_PORT, Reply, WAIT_PORT, ask, exchange, malformed::get, node_addr, pre_stop_drains, setup, still_serving,
};

/// The gateway of the default route in `ns` (`fam`: `-4` or `-6`).
fn gateway(ns: &Netns, fam: &str) -> Result<String> {
    let out = ns.ip(&[fam, "route", "show", "default"])?;
    let mut words = out.split_whitespace();
    words.find(|w| *w == "via");
    words
        .next()
        .map(str::to_owned)
        .with_context(|| format!("a default route via a gateway in {out:?}"))
}

/// The packets of nft counter `name` in table `inet spoof` of `ns`.
fn counter(ns: &Netns, name: &str) -> Result<u64> {
    let out = ns.exec("nft", &["list", "table", "inet", "spoof"])?;
    let line = out
        .lines()
        .find(|l| l.contains(&format!("comment \"{name}\"")))
        .with_context(|| format!("counter {name} in {out}"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "packets");
    words
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("a packet count in {line:?}"))
}

#[test]
fn a_pod_that_claims_another_pods_ip_gets_no_answer() -> Result<()> {
    let (topo, mut agent, cli) = setup(&["a", "b"], &[])?;
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let (node, a_if, b_if) = (topo.node(), a.node_if(), b.node_if());
    // The worst case: a node that takes packets whatever their source.
    node.sysctl(&[
        "net.ipv4.conf.all.rp_filter=0",
        &format!("net.ipv4.conf.{b_if}.rp_filter=0"),
    ])?;
    // Counters on the node: what arrives from b's interface with a's
    // addresses, and where the wait port's answers go.
    let (a4, a6) = (a.ipv4(), a.ipv6());
    node.exec(
        "nft",
        &[&format!(
            r#"table inet spoof {{
                chain pre {{
                    type filter hook prerouting priority -300; policy accept;
                    iifname "{b_if}" ip saddr {a4} tcp dport {WAIT_PORT} counter comment "from_b_as_a_v4"
                    iifname "{b_if}" ip6 saddr {a6} tcp dport {WAIT_PORT} counter comment "from_b_as_a_v6"
                }}
                chain out {{
                    type filter hook output priority 0; policy accept;
                    oifname "{a_if}" ip daddr {a4} tcp sport {WAIT_PORT} counter comment "to_a_v4"
                    oifname "{a_if}" ip6 daddr {a6} tcp sport {WAIT_PORT} counter comment "to_a_v6"
                    oifname "{b_if}" tcp sport {WAIT_PORT} counter comment "to_b"
                }}
            }}"#
        )],
    )?;

    // b takes a's addresses as its own and sends from them to the node.
    let targets = [(IpAddr::from(a4), IpAddr::from(NODE_V4)), (a6.into(), NODE_V6.into())];
    for (own, to) in targets {
        let (fam, host) = if own.is_ipv4() { ("-4", "32") } else { ("-6", "128") };
        let mut add = vec![fam, "addr", "add"];
        let cidr = format!("{own}/{host}");
        add.extend([cidr.as_str(), "dev", b.pod_if()]);
        if own.is_ipv6() {
            add.push("nodad");
        }
        b.ns().ip(&add)?;
        let gw = gateway(b.ns(), fam)?;
        b.ns().ip(&[
            fam,
            "route",
            "add",
            &format!("{to}/{host}"),
            "via",
            &gw,
            "src",
            &own.to_string(),
        ])?;
        let route = b.ns().ip(&[fam, "route", "get", &to.to_string()])?;
        ensure!(
            route.contains(&format!("src {own} ")),
            "b reaches {to} from a's address {own}: {route}"
        );
    }
    // Both at once: each attempt runs until its connect gives up.
    let attempts: Vec<Result<std::io::Result<TcpStream>>> = thread::scope(|scope| {
        let tries: Vec<_> = targets
            .iter()
            .map(|&(_, to)| {
                scope.spawn(move || {
                    run_in(b.ns(), || {
                        TcpStream::connect_timeout(&SocketAddr::new(to, WAIT_PORT), TIMEOUT)
                    })
                })
            })
            .collect();
        tries
            .into_iter()
            .map(|t| t.join().expect("a connect attempt does not panic"))
            .collect()
    });
    for (attempt, (own, to)) in attempts.into_iter().zip(targets) {
        if let Ok(s) = attempt? {
            // A completed handshake would be the hole: show what the agent says to it.
            let (local, peer) = (s.local_addr(), s.peer_addr());
            let reply = exchange(s, &get("/v1/wait"));
            bail!("b completed a handshake from a's {own} to {to} ({local:?} -> {peer:?}); it got {reply:?}");
        }
    }
    // b's packets did reach the node from a's addresses, and the node
    // answered them towards a, never b.
    for fam in ["v4", "v6"] {
        let (sent, answered) = (
            counter(node, &format!("from_b_as_a_{fam}"))?,
            counter(node, &format!("to_a_{fam}"))?,
        );
        ensure!(sent > 0, "b's SYNs from a's {fam} address reached the node");
        ensure!(
            answered > 0,
            "the node answered b's SYNs from a's {fam} address towards a"
        );
    }
    ensure!(counter(node, "to_b")? == 0, "nothing from the wait port went to b");

    // The agent never saw a request; a is untouched, and its own wait works.
    let log = agent.log();
    ensure!(
        !log.contains("preStop wait") && !log.contains("refused /v1/wait"),
        "the agent saw no request:\n{log}"
    );
    let a_now = cli.pod("a")?;
    ensure!(
        a_now.state == "serving" && a_now.active_flows == 0,
        "a is untouched: {a_now:?}"
    );
    pre_stop_drains(&cli, a)?;
    still_serving(&mut agent, &cli)
}

#[test]
fn forwarding_headers_do_not_change_who_is_asking() -> Result<()> {
    // The metrics for the client's network only: headers naming the client must not open them to a pod.
    let (topo, mut agent, cli) = setup(&["a", "b"], &["--metrics-allow", "10.100.0.0/24"])?;
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    let a4 = a.ipv4();
    let claiming_a = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {a4}\r\nX-Forwarded-For: {a4}\r\nX-Real-IP: {a4}\r\nForwarded: for={a4}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes()
    };
    let ask_as_a = |ns: &Netns, to: SocketAddr, path: &str| -> Result<Reply> { ask(ns, to, &claiming_a(path)) };

    // Not a pod: refused by its real address.
    let reply = ask_as_a(topo.client(), node_addr(WAIT_PORT), "/v1/wait")?;
    ensure!(
        matches!(&reply, Reply::Http(403, body) if body.contains(r#""error":"10.100.0.2 is not a pod"#)),
        "the client is refused as itself: {reply:?}"
    );
    // Pod b is answered about b, over v4 and v6 (b is drained, so at once).
    cli.terminate("b", 0.5, 60.0)?;
    cli.wait_state("b", "drained")?;
    for to in [node_addr(WAIT_PORT), SocketAddr::new(NODE_V6.into(), WAIT_PORT)] {
        let reply = ask_as_a(b.ns(), to, "/v1/wait")?;
        ensure!(
            matches!(&reply, Reply::Http(200, body) if body.contains(r#""pod":"b""#)),
            "b is answered about itself via {to}: {reply:?}"
        );
    }
    // Headers naming an allowed caller do not open the metrics to a pod the list leaves out.
    let client = topo.client_v4();
    let claiming_client = format!(
        "GET /metrics HTTP/1.1\r\nHost: {client}\r\nX-Forwarded-For: {client}\r\nX-Real-IP: {client}\r\nForwarded: for={client}\r\nConnection: close\r\n\r\n"
    );
    let reply = ask(b.ns(), node_addr(METRICS_PORT), claiming_client.as_bytes())?;
    ensure!(reply.code() == Some(403), "pod b may not read the metrics: {reply:?}");
    let reply = ask(topo.client(), node_addr(METRICS_PORT), claiming_client.as_bytes())?;
    ensure!(reply.code() == Some(200), "the client may: {reply:?}");

    ensure!(
        !agent.log().contains("preStop wait pod=a"),
        "nothing waited as a:\n{}",
        agent.log()
    );
    ensure!(cli.pod("a")?.state == "serving", "a is untouched");
    pre_stop_drains(&cli, a)?;
    still_serving(&mut agent, &cli)
}
