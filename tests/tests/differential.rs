//! A differential test of the drain verdict against the pod's own sockets.
//!
//! A random workload runs against a terminating pod: connections from a
//! client off the node, from a pod on the same node, and through a
//! masqueraded NodePort; closes, half-closes, resets, slow requests, idle
//! keep-alives, and bursts of new flows to another pod while the agent is
//! stalled (beyond the event ring). At random instants the agent's verdict
//! and socket count are compared with the pod's sockets as `ss` lists them
//! inside its namespace. A `drained` verdict while the pod has an
//! established socket fails the test, and so does a socket count that does
//! not settle to what `ss` says.
//!
//! Phase one opens a new connection at least every second with a 3 s quiet
//! period, so no verdict but `draining` is right during it. Phase two only
//! ever closes: a socket `ss` shows after a `drained` verdict was open
//! before it. Bounded by `CONNDRAIN_DIFF_SECS` (default 40 s); the seed is
//! printed, and `CONNDRAIN_DIFF_SEED=N` replays it.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use conndrain_tests::{Agent, NODE_V4, Netns, TIMEOUT, TcpConn, TcpServer, Topology, require_root, sleep, wait_until};

const PORT: u16 = 8080;
const NODEPORT: u16 = 30080;

/// Inbound sockets of the pod on PORT that `ss` lists in `states`.
fn pod_sockets(ns: &Netns, states: &str) -> Result<usize> {
    let out = ns.exec("ss", &["-tanH", "state", states, "sport", "=", &format!(":{PORT}")])?;
    Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
}

fn open_inbound(ns: &Netns) -> Result<usize> {
    // What conndrain calls an open inbound socket: from SYN_RECV to CLOSE.
    let mut n = 0;
    for s in ["established", "syn-recv", "close-wait", "fin-wait-1", "fin-wait-2", "last-ack", "closing"] {
        n += pod_sockets(ns, s)?;
    }
    Ok(n)
}

struct Conn {
    conn: TcpConn,
    /// A request is in flight (sent, reply not read).
    pending: bool,
}

#[test]
fn the_verdict_never_says_drained_while_the_pod_has_a_connection() -> Result<()> {
    require_root()?;
    let seed = std::env::var("CONNDRAIN_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let secs: u64 = std::env::var("CONNDRAIN_DIFF_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    eprintln!("differential: seed {seed} (replay with CONNDRAIN_DIFF_SEED={seed}), {secs} s");
    let mut rng = fastrand::Rng::with_seed(seed);
    let result = run(&mut rng, Duration::from_secs(secs));
    if let Err(e) = &result {
        eprintln!("differential: seed {seed} failed: {e:#}");
    }
    result
}

fn run(rng: &mut fastrand::Rng, budget: Duration) -> Result<()> {
    let topo = Topology::builder().pod("web").pod("peer").pod("dns").build()?;
    let (web, peer, dns) = (topo.pod("web"), topo.pod("peer"), topo.pod("dns"));
    let node = topo.node();
    // A NodePort masqueraded to the node's address, as kube-proxy does it.
    node.exec("iptables", &["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", &NODEPORT.to_string(), "-j", "DNAT", "--to-destination", &format!("{}:{PORT}", web.ipv4())])?;
    node.exec("iptables", &["-t", "nat", "-A", "POSTROUTING", "-d", &web.ipv4().to_string(), "-p", "tcp", "--dport", &PORT.to_string(), "-j", "MASQUERADE"])?;
    // No connection turns idle within the test: every open one holds the pod.
    let agent = Agent::start(node, &["--idle-timeout", "300"])?;
    let cli = agent.cli();
    cli.add_pod_probed(web, &[PORT])?;
    cli.add_pod(peer)?;
    cli.add_pod(dns)?;
    let _server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let nodeport: SocketAddr = format!("{NODE_V4}:{NODEPORT}").parse()?;
    cli.terminate("web", 3.0, 600.0)?;

    let mut conns: Vec<Conn> = Vec::new();
    let phase_one = budget / 2;
    let start = Instant::now();
    let mut last_open = Instant::now();
    let mut checks = 0u32;
    // Phase one: anything, with a new connection at least every second.
    while start.elapsed() < phase_one {
        let must_open = last_open.elapsed() > Duration::from_millis(700);
        let op = if must_open { rng.u8(0..3) } else { rng.u8(0..10) };
        match op {
            0 => conns.push(Conn { conn: TcpConn::connect(topo.client(), web.addr_v4(PORT))?, pending: false }),
            1 => conns.push(Conn { conn: TcpConn::connect(peer.ns(), web.addr_v4(PORT))?, pending: false }),
            2 => conns.push(Conn { conn: TcpConn::connect(topo.client(), nodeport)?, pending: false }),
            3 | 4 => close_one(rng, &mut conns)?,
            5 => slow_request(rng, &mut conns)?,
            6 => keep_alive(rng, &mut conns)?,
            7 => stalled_burst(rng, &agent, &topo, dns)?,
            _ => sleep(Duration::from_millis(rng.u64(50..250)))?,
        }
        if op < 3 {
            last_open = Instant::now();
        }
        let pod = cli.pod("web")?;
        if pod.state != "draining" {
            // Only right after a quiet period with nothing open.
            let quiet = last_open.elapsed();
            ensure!(
                quiet >= Duration::from_millis(2500),
                "the last new connection came {quiet:?} ago, less than the 3 s quiet period, yet: {pod:?}"
            );
            let established = pod_sockets(web.ns(), "established")?;
            ensure!(established == 0, "{} with {established} established socket(s): {pod:?}", pod.state);
            eprintln!("differential: drained in phase one after {quiet:?} without new connections");
            return Ok(());
        }
        if rng.u8(0..4) == 0 {
            compare(&agent, web.ns())?;
            checks += 1;
        }
    }
    // Phase two: only closes, half-closes, resets and answers.
    while !conns.is_empty() {
        match rng.u8(0..4) {
            0 | 1 => close_one(rng, &mut conns)?,
            2 => keep_alive(rng, &mut conns)?,
            _ => sleep(Duration::from_millis(rng.u64(100..600)))?,
        }
        let state = cli.pod("web")?.state;
        let established = pod_sockets(web.ns(), "established")?;
        if state == "drained" {
            ensure!(
                established == 0,
                "drained while the pod has {established} established socket(s) ({} connections open in the test)",
                conns.len()
            );
        }
        checks += 1;
    }
    eprintln!("differential: {checks} checks");
    wait_until("drained once every connection is closed", TIMEOUT, || cli.pod("web"), |p| p.state == "drained")?;
    ensure!(pod_sockets(web.ns(), "established")? == 0);
    Ok(())
}

/// The agent's socket count settles to what `ss` lists in the pod.
fn compare(agent: &Agent, ns: &Netns) -> Result<()> {
    let want = open_inbound(ns)?;
    wait_until(
        &format!("the agent's open socket count to match ss ({want})"),
        Duration::from_secs(5),
        || {
            let pod = agent.cli().pod("web")?;
            Ok::<_, anyhow::Error>((pod.open_sockets, open_inbound(ns)?))
        },
        |(agent, ss)| *agent == *ss as u64,
    )
    .map(drop)
}

fn close_one(rng: &mut fastrand::Rng, conns: &mut Vec<Conn>) -> Result<()> {
    if conns.is_empty() {
        return Ok(());
    }
    let mut c = conns.swap_remove(rng.usize(..conns.len()));
    if c.pending {
        c.conn.reply()?;
    }
    // A close is a half-close first: the client's FIN, then the pod's.
    if rng.bool() { c.conn.close() } else { c.conn.reset() }
}

fn slow_request(rng: &mut fastrand::Rng, conns: &mut [Conn]) -> Result<()> {
    if let Some(c) = pick_idle(rng, conns) {
        c.conn.send(&format!("GET /sleep/{}", rng.u8(1..4)))?;
        c.pending = true;
    }
    Ok(())
}

fn keep_alive(rng: &mut fastrand::Rng, conns: &mut [Conn]) -> Result<()> {
    if conns.is_empty() {
        return Ok(());
    }
    let i = rng.usize(..conns.len());
    let c = &mut conns[i];
    if c.pending {
        c.conn.reply()?;
        c.pending = false;
    } else {
        ensure!(c.conn.request("GET /k")? == "200 /k", "keep-alive request");
    }
    Ok(())
}

fn pick_idle<'a>(rng: &mut fastrand::Rng, conns: &'a mut [Conn]) -> Option<&'a mut Conn> {
    let idle: Vec<usize> = (0..conns.len()).filter(|i| !conns[*i].pending).collect();
    if idle.is_empty() {
        return None;
    }
    let i = idle[rng.usize(..idle.len())];
    conns.get_mut(i)
}

/// New UDP flows to another pod, beyond the event ring, while the agent is stalled.
fn stalled_burst(rng: &mut fastrand::Rng, agent: &Agent, topo: &Topology, dns: &conndrain_tests::Pod) -> Result<()> {
    let n = rng.usize(1000..6000);
    let to = SocketAddr::new(dns.ipv4().into(), 53);
    agent.signal(libc::SIGSTOP)?;
    let sent = conndrain_tests::run_in(topo.client(), || {
        for _ in 0..n {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.send_to(b"q", to)?;
        }
        Ok::<_, std::io::Error>(())
    });
    agent.signal(libc::SIGCONT)?;
    match sent {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e).context("UDP burst"),
        Err(e) => bail!("UDP burst: {e:#}"),
    }
}
