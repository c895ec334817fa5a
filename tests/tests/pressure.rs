//! Flow-table pressure on the real agent: a flood of new flows fills the
//! (LRU) flow table many times over while a pod drains with an idle
//! connection. Without protection the LRU evicts that connection's entry,
//! the agent counts zero connections and releases the pod while it still
//! serves. The drain must hold, the connection must keep working, and the
//! evictions must show in `conndrain status` and the metrics.
//!
//! The `BPF_PROG_TEST_RUN` side of the same promise is in `datapath/pressure.rs`.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use conndrain_tests::{
    Agent, NODE_V4, Netns, TIMEOUT, TcpConn, TcpServer, Topology, UdpServer,
    metrics::{sample, scrape},
    require_root, run_in, wait_until,
};

const PORT: u16 = 8080;
const METRICS_PORT: u16 = 9465;
/// The smallest table `--max-flows` accepts, so the flood is cheap.
const MAX_FLOWS: u32 = 1024;
/// New flows in the flood: the table, eight times over.
const FLOOD: u32 = 8 * MAX_FLOWS;

/// `count` UDP flows from `ns` to `to`, each a datagram and its echo (flows
/// of one packet would only evict each other: the LRU keeps entries that
/// were looked up again). Returns how many were echoed; UDP may lose some.
fn udp_flood(ns: &Netns, to: SocketAddr, count: u32) -> Result<u32> {
    run_in(ns, move || -> Result<u32> {
        let mut echoed = 0;
        for _ in 0..count {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.connect(to)?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            s.send(b"flood")?;
            let mut buf = [0u8; 16];
            echoed += u32::from(s.recv(&mut buf).is_ok());
        }
        Ok(echoed)
    })?
}

#[test]
fn a_flood_of_new_flows_does_not_release_a_draining_pod_early() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").pod("dns").build()?;
    let max_flows = MAX_FLOWS.to_string();
    let metrics_port = METRICS_PORT.to_string();
    let host_ip = NODE_V4.to_string();
    // A long idle timeout: the held connection idles through the flood and
    // must count as active all along (idle keep-alives do not hold a pod).
    let agent = Agent::start(
        topo.node(),
        &[
            "--max-flows",
            &max_flows,
            "--idle-timeout",
            "600",
            "--host-ip",
            &host_ip,
            "--metrics-port",
            &metrics_port,
        ],
    )?;
    let cli = agent.cli();
    cli.add_pod(topo.pod("web"))?;
    cli.add_pod(topo.pod("dns"))?;
    let web = topo.pod("web");
    let dns = topo.pod("dns");
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let udp = UdpServer::start(dns.ns(), dns.addr_v4(53))?;

    let mut conn = TcpConn::connect(topo.client(), server.addr())?;
    cli.wait_pod("web", "1 active flow", |p| p.active_flows == 1)?;
    cli.terminate("web", 0.2, 600.0)?;
    cli.wait_state("web", "draining")?;

    let echoed = udp_flood(topo.client(), udp.addr(), FLOOD)?;
    ensure!(echoed > MAX_FLOWS * 2, "the flood must really fill the table: {echoed} of {FLOOD} flows echoed");

    // The agent evaluates the drain on its own; `why` counts one pod's flows
    // afresh whatever their number (and notices the evicted ones), which a
    // listing does only for its first few thousand flows (`node/census.rs`).
    cli.ok(&["why", "dns"])?;
    let pod = cli.pod("web")?;
    ensure!(
        pod.state == "draining" && pod.active_flows == 1,
        "the draining pod must still count its connection after the flood: {pod:?}"
    );
    let flows = cli.flows(Some("web"))?;
    ensure!(
        flows.iter().any(|f| f.peer_addr == conn.local_addr().to_string() && f.active),
        "the held connection is listed: {flows:#?}"
    );

    let status = cli.status()?;
    let at = |path: &str| status.pointer(path).and_then(serde_json::Value::as_u64).unwrap_or(0);
    ensure!(
        at("/stats/flows_created") > 2 * u64::from(MAX_FLOWS),
        "the flood went through the flow table: {status:#}"
    );
    // `maps.flows.used` is the agent's own count (its flow index), no walk:
    // once `why` above and the listing have counted every pod's flows (dropping the evicted
    // ones), it must be what a walk of the tables lists, and no more than the
    // flow table holds (and the held connection).
    let walked = cli.flows(None)?.len() as u64;
    ensure!(
        at("/maps/flows/used") == walked && walked <= u64::from(MAX_FLOWS) + 1,
        "the flows the agent knows of are those a walk of the tables lists ({walked}): {status:#}"
    );
    ensure!(at("/maps/held/used") >= 1, "the connection is in the held table: {status:#}");
    ensure!(at("/stats/flows_evicted") > 0, "evictions are counted in status: {status:#}");
    ensure!(at("/stats/hold_failed") == 0, "{status:#}");
    let page = scrape(topo.client(), SocketAddr::new(NODE_V4.into(), METRICS_PORT))?;
    let evicted = sample(&page, "conndrain_flows_evicted_total").context("conndrain_flows_evicted_total")?;
    ensure!(evicted > 0.0, "evictions are counted in the metrics:\n{page}");
    let held = sample(&page, "conndrain_held_flows").context("conndrain_held_flows")?;
    ensure!(held >= 1.0, "held flows in the metrics:\n{page}");

    // The connection works, and its close ends the drain.
    ensure!(conn.request("still there")? == "still there", "the connection answers");
    conn.close()?;
    cli.wait_state("web", "drained")?;

    // Nothing outlives the pod.
    cli.ok(&["pod", "remove", "web"])?;
    let status = cli.status()?;
    ensure!(
        status.pointer("/maps/held/used").and_then(serde_json::Value::as_u64) == Some(0),
        "the removed pod's held flows are gone: {status:#}"
    );
    drop(udp);
    Ok(())
}

/// Datagrams for the census test, from as many sockets: more flows than a
/// listing counts afresh (4096).
const LARGE_POD_FLOWS: u32 = 6000;

/// `conndrain pods` (and the metrics scrape) count a pod's flows afresh only
/// within a budget of lookups, so a listing stays fast at 1M flows; a larger
/// pod shows its latest full count with its age, and the census recounts it
/// in the background (`node/census.rs`). Here the census's recount is what
/// makes the listed count younger than the last fresh count (`why`).
#[test]
fn a_listing_shows_a_large_pods_latest_count_which_the_census_renews() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("dns").build()?;
    let agent = Agent::start(topo.node(), &["--max-flows", "16384", "--udp-timeout", "600"])?;
    let cli = agent.cli();
    cli.add_pod(topo.pod("dns"))?;
    let dns = topo.pod("dns");
    let udp = UdpServer::start(dns.ns(), dns.addr_v4(53))?;
    udp_flood(topo.client(), udp.addr(), LARGE_POD_FLOWS)?;
    // Sockets in a row reuse source ports, so there are fewer flows than
    // datagrams: the flows are those the datapath created, once all indexed.
    let status = wait_until(
        "the agent indexed every flow the datapath created",
        TIMEOUT,
        || cli.status(),
        |s| s.pointer("/maps/flows/used").is_some_and(|u| Some(u) == s.pointer("/stats/flows_created")),
    )?;
    let flows = status.pointer("/maps/flows/used").and_then(serde_json::Value::as_u64).unwrap_or(0);
    ensure!(flows > 4096, "the flood must outgrow a listing's budget: {flows} flows");

    // A fresh count, then listings: none counts the pod afresh again.
    cli.ok(&["why", "dns"])?;
    let fresh = Instant::now();
    let listed = cli.pod("dns")?;
    ensure!(listed.counted_secs_ago.is_some(), "a pod beyond the budget shows its latest count: {listed:?}");
    ensure!(listed.active_flows == flows, "`why`'s count of every flow: {listed:?}");

    // The census recounts it: the listed count gets younger than `why`'s.
    let renewed = wait_until(
        "the census recounted the pod",
        TIMEOUT,
        || cli.pod("dns"),
        |p| p.counted_secs_ago.is_some_and(|ago| ago + 1.0 < fresh.elapsed().as_secs_f64()),
    )?;
    ensure!(renewed.active_flows == flows, "the census counted every flow: {renewed:?}");
    drop(udp);
    Ok(())
}
