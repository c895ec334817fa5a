//! Policy routing: a source rule sends the client's flows another way.


use anyhow::{Context as _, Result, bail, ensure};
use conndrain_tests::kubeproxy::{Backend, CLIENT_V4, Conversation, Protocol, Reply};
use serde_json::Value;

use super::{
    BREAK_WITHIN,
    bed::{Bed, Front},
    with_agent::{pinned_stream_to, steered_packets},
};

/// Node A's address on a second link to node B, and node B's, with table 100
/// of node A routing node B's pods over it.
const LINK2_A_V4: &str = "172.20.0.1";
const LINK2_B_V4: &str = "172.20.0.2";
const SOURCE_TABLE: &str = "100";

/// Adds a second link between node A and node B, and on node A a source rule
/// (`from <client> lookup 100`, table 100: node B's pods over the second
/// link), as source-based tables send a pod's traffic out of its own ENI
/// (AWS VPC CNI). Node B drops the client's packets to its pods anywhere but
/// on that link, so the main table's path (the first link) is dead for them.
/// Returns node A's end of the second link.
fn source_routed(bed: &Bed) -> Result<String> {
    let tag = bed.cluster.tag();
    let (a, b) = (bed.cluster.node_a(), bed.cluster.node_b());
    let (a_if, b_if) = (format!("{tag}pa"), format!("{tag}pb"));
    a.ip(&["link", "add", &a_if, "type", "veth", "peer", "name", &b_if, "netns", b.name()])?;
    a.ip(&["addr", "add", &format!("{LINK2_A_V4}/24"), "dev", &a_if])?;
    b.ip(&["addr", "add", &format!("{LINK2_B_V4}/24"), "dev", &b_if])?;
    a.ip(&["link", "set", &a_if, "up"])?;
    b.ip(&["link", "set", &b_if, "up"])?;
    a.ip(&["route", "add", "10.244.2.0/24", "via", LINK2_B_V4, "dev", &a_if, "table", SOURCE_TABLE])?;
    a.ip(&["rule", "add", "from", &CLIENT_V4.to_string(), "lookup", SOURCE_TABLE])?;
    b.exec(
        "iptables",
        &["-I", "FORWARD", "-s", &CLIENT_V4.to_string(), "-d", "10.244.2.0/24", "!", "-i", &b_if, "-j", "DROP"],
    )?;
    // What a lookup by destination only says, and what the kernel does with
    // a packet from the client (`ip route get ... from ... iif ...`).
    let b1 = bed.cluster.pod("b1").ipv4().to_string();
    let (client_if, link_if) = bed.cluster.node_a_ifs();
    let by_dst = a.ip(&["route", "get", &b1])?;
    let from_client = a.ip(&["route", "get", &b1, "from", &CLIENT_V4.to_string(), "iif", client_if])?;
    eprintln!("node A: ip route get {b1}: {by_dst}ip route get {b1} from {CLIENT_V4} iif {client_if}: {from_client}");
    ensure!(by_dst.contains(&format!("dev {link_if} ")), "by destination, b1 is over the first link: {by_dst}");
    ensure!(
        from_client.contains(&format!("dev {a_if} ")),
        "from the client, b1 is over the second link: {from_client}"
    );
    Ok(a_if)
}

/// Without the fix, as a demonstration: the main table's path, which a
/// redirect chosen by the destination's route alone takes, is dead for the
/// client's flow to b1. With the source rule the stream works (netfilter's
/// path routes by source too); the rule deleted, its packets take the first
/// link and node B drops them: the stream breaks. (The agent before this fix
/// pinned exactly that way: with it, the twin below breaks the same way.)
#[test]
fn policy_routing_the_destination_route_is_a_dead_path_for_a_source_routed_flow() -> Result<()> {
    let bed = Bed::new(Backend::Iptables)?;
    source_routed(&bed)?;
    let to = bed.frontend(Front::ClusterIp, false, Protocol::Tcp);
    let conv = Conversation::landing_on(bed.client(), to, None, "b1")?;
    conv.expect_steady(5).context("the source rule's path to b1 works")?;
    bed.cluster.node_a().ip(&["rule", "del", "from", &CLIENT_V4.to_string(), "lookup", SOURCE_TABLE])?;
    match conv.wait_break(BREAK_WITHIN) {
        Some(Reply::Failed(how)) => {
            eprintln!("over the main table's path the stream to b1 broke: {how}");
            Ok(())
        }
        other => bail!("the stream must break on the main table's path, got {other:?}"),
    }
}

/// The twin, with the agent: the stream to b1 is pinned, its endpoint
/// removed and node A's conntrack flushed; the pin's redirect goes where the
/// kernel routed the flow (the route looked up with the client's source and
/// input interface, so the source rule applies), and the stream holds.
#[test]
fn with_agent_a_pinned_flow_follows_a_source_rule() -> Result<()> {
    let bed = Bed::new(Backend::Iptables)?;
    let link2 = source_routed(&bed)?;
    let (_agent, cli, conv, _) = pinned_stream_to(&bed, "b1")?;
    bed.node_a().flush_conntrack()?;
    let out = |dev: &str| -> Result<u64> {
        let stats = bed.cluster.node_a().ip(&["-s", "-j", "link", "show", dev])?;
        let v: Value = serde_json::from_str(&stats)?;
        Ok(v[0]["stats64"]["tx"]["packets"].as_u64().unwrap_or(0))
    };
    let sent = out(&link2)?;
    conv.expect_steady(20).context("the pinned stream keeps b1 over the source rule's link")?;
    ensure!(steered_packets(&cli)? > 0, "the datapath steered the stream");
    ensure!(out(&link2)? > sent, "the steered packets left over the second link");
    Ok(())
}
