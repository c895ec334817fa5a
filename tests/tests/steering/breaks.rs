//! Without the agent: each break, shown happening (TCP streams broken by
//! conntrack deletes and flushes, UDP sessions moved by kube-proxy's cleanup),
//! and kube-proxy's own behaviour (new flows, masquerade, IPVS mode).

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context as _, Result, bail, ensure};
use conndrain_tests::kubeproxy::{self, Backend, Conversation, Node, Protocol, Reply};
use conndrain_tests::{TIMEOUT, unique_tag, wait_until};

use super::{
    BREAK_WITHIN, TCP_PORT, UDP_PORT,
    bed::{Bed, Clear, Front, entry_of, expected_peer, remapped_to, reply_part},
};

/// A long-lived TCP stream to pod `target` through `front`; the endpoint is
/// removed from the rules, then its conntrack state is cleared: the stream
/// must break.
pub fn tcp_breaks(backend: Backend, front: Front, v6: bool, target: &str, clear: Clear) -> Result<()> {
    tcp_breaks_on(Bed::new(backend)?, backend, front, v6, target, clear)
}

/// `tcp_breaks` on `bed`, which it owns (torn down when it returns).
#[expect(clippy::needless_pass_by_value, reason = "the test owns its bed")]
pub fn tcp_breaks_on(bed: Bed, backend: Backend, front: Front, v6: bool, target: &str, clear: Clear) -> Result<()> {
    let to = bed.frontend(front, v6, Protocol::Tcp);
    let pod = bed.cluster.pod(target);
    let pod_ip = pod.ip_like(to.ip());
    let conv = Conversation::landing_on(bed.client(), to, None, target)?;
    conv.expect_steady(5)?;

    // What kube-proxy's translation left in node A's conntrack table.
    let ct = bed.show_conntrack(&format!(
        "{target} serving the stream {} -> {to}",
        conv.local_addr()
    ))?;
    let line = entry_of(&ct, conv.local_addr(), to)
        .with_context(|| format!("no conntrack entry for the stream on node A:\n{ct}"))?;
    ensure!(
        reply_part(line).contains(&format!("src={pod_ip} ")),
        "the entry maps the stream to {target} ({pod_ip}): {line}"
    );
    if pod.node() == Node::B {
        eprintln!(
            "--- node B conntrack (forwarded, no NAT) ---\n{}",
            bed.proxies[1].conntrack()?
        );
    }
    if let Some(peer) = bed.expected_peer(front, target, v6) {
        ensure!(
            bed.app(target).peers().iter().any(|p| p.ip() == peer),
            "{target} sees the stream from {peer}: {:?}",
            bed.app(target).peers()
        );
    }

    // Removing the endpoint from the rules alone does not move the stream:
    // its conntrack entry keeps it on its pod.
    let rest: Vec<&str> = ["a1", "a2", "b1"]
        .into_iter()
        .filter(|p| *p != target)
        .collect();
    bed.sync(&rest)?;
    eprintln!(
        "--- node A rules after removing {target} ---\n{}",
        bed.node_a().ruleset()?
    );
    conv.expect_steady(5)
        .context("after the sync, before the conntrack entries go")?;

    let events = bed.node_a().watch_conntrack()?;
    match clear {
        Clear::DeleteEndpoint => {
            let n = bed.node_a().delete_conntrack_of(pod_ip)?;
            ensure!(
                n >= 1,
                "conntrack -D --reply-src {pod_ip} deleted the stream's entry"
            );
        }
        Clear::Flush => bed.node_a().flush_conntrack()?,
    }

    let broke = conv.wait_break(BREAK_WITHIN);
    let events = events.stop();
    eprintln!("--- node A conntrack events from the clearing on ---\n{events}");
    let ct = bed.show_conntrack("after the break")?;
    eprintln!("replies: {:?}", conv.replies());
    match broke {
        Some(Reply::Failed(how)) => {
            eprintln!("{backend:?} {front:?} v6={v6}: the stream to {target} broke: {how}");
            if let Some(line) = entry_of(&ct, conv.local_addr(), to) {
                eprintln!("its new conntrack entry: {line}");
            }
            // Why: the client's next segment was picked up mid-stream as a new
            // connection (nf_conntrack_tcp_loose) and DNATed to another pod.
            // The break (a RST) is what this test asserts. The conntrack event
            // explains it, but `conntrack -E` can miss it on a loaded machine
            // (it subscribes asynchronously, and the new entry dies at once),
            // so it is checked only when it was captured.
            match remapped_to(&events, conv.local_addr(), to, &bed) {
                // IPVS keeps its own connection table: the new conntrack
                // entry goes to the same pod, but the masquerade picked a new
                // source port, which the pod does not know.
                Some(p) if backend == Backend::Ipvs => {
                    eprintln!("IPVS re-forwarded the stream to {p} with a new masquerade port")
                }
                Some(p) => ensure!(
                    p != target,
                    "a new conntrack entry maps the stream to another pod, not {p}"
                ),
                None => {
                    eprintln!("note: conntrack -E captured no event for the stream: {events:?}")
                }
            }
            Ok(())
        }
        Some(Reply::Pod(other)) => bail!("a TCP stream cannot answer from {other}"),
        None => bail!(
            "the stream to {target} did not break within {BREAK_WITHIN:?} after its endpoint \
             was removed and its conntrack state cleared: the scenario does not reproduce"
        ),
    }
}

/// Padding of the sessions of the `*_fragmented_*` tests: 3000 bytes more
/// in every request and answer, over the testbed's 1500-byte MTU on every
/// link, so each datagram leaves its sender (the client, the pod) in three
/// IP fragments.
pub const FRAGMENTED: usize = 3000;

/// A session id (`Conversation::udp`) for a new session, padded with `pad`
/// bytes (its datagrams are then that much larger, both ways), and its
/// short form for messages.
pub fn session_id(pad: usize) -> (String, String) {
    let short = format!("s{}", unique_tag());
    (format!("{short}{}", "-".repeat(pad)), short)
}

/// A UDP session to pod `target` through `front`; the endpoint is removed
/// from the rules and kube-proxy's UDP conntrack cleanup runs: the session's
/// answers must come from another pod.
pub fn udp_moves(backend: Backend, front: Front, v6: bool, target: &str) -> Result<()> {
    udp_moves_padded(backend, front, v6, target, 0)
}

/// `udp_moves` with every datagram `pad` bytes larger.
pub fn udp_moves_padded(backend: Backend, front: Front, v6: bool, target: &str, pad: usize) -> Result<()> {
    udp_moves_on(Bed::new(backend)?, backend, front, v6, target, pad)
}

/// `udp_moves_padded` on `bed`, which it owns (torn down when it returns).
#[expect(clippy::needless_pass_by_value, reason = "the test owns its bed")]
pub fn udp_moves_on(bed: Bed, backend: Backend, front: Front, v6: bool, target: &str, pad: usize) -> Result<()> {
    let to = bed.frontend(front, v6, Protocol::Udp);
    let pod = bed.cluster.pod(target);
    let pod_ip = pod.ip_like(to.ip());
    let (session, short) = session_id(pad);
    let conv = Conversation::landing_on(bed.client(), to, Some(&session), target)?;
    conv.expect_steady(5)?;

    let ct = bed.show_conntrack(&format!(
        "{target} serving session {short} {} -> {to}",
        conv.local_addr()
    ))?;
    let line = entry_of(&ct, conv.local_addr(), to)
        .with_context(|| format!("no conntrack entry for the session on node A:\n{ct}"))?;
    ensure!(
        reply_part(line).contains(&format!("src={pod_ip} ")),
        "the entry maps the session to {target} ({pod_ip}): {line}"
    );
    if let Some(peer) = bed.expected_peer(front, target, v6) {
        ensure!(
            bed.app(target).peers().iter().any(|p| p.ip() == peer),
            "{target} sees the session from {peer}: {:?}",
            bed.app(target).peers()
        );
    }

    let rest: Vec<&str> = ["a1", "a2", "b1"]
        .into_iter()
        .filter(|p| *p != target)
        .collect();
    bed.sync(&rest)?;
    if backend == Backend::Ipvs {
        ipvs_drops_the_entry(&bed, conv.local_addr(), to, pod_ip)?;
    } else {
        conv.expect_steady(5)
            .context("after the sync, before kube-proxy's UDP cleanup")?;
    }

    // kube-proxy's cleanup runs on every node; only node A has the entry.
    let events = bed.node_a().watch_conntrack()?;
    let deleted: usize = bed
        .proxies
        .iter()
        .map(|p| p.cleanup_udp_conntrack(pod_ip))
        .sum::<Result<usize>>()?;
    ensure!(
        deleted >= 1 || backend == Backend::Ipvs,
        "kube-proxy's UDP cleanup deleted the session's entry"
    );

    let moved = conv.wait_break(BREAK_WITHIN);
    let events = events.stop();
    eprintln!("--- node A conntrack events from the cleanup on ---\n{events}");
    let ct = bed.show_conntrack("after kube-proxy's UDP cleanup")?;
    eprintln!("replies: {:?}", conv.replies());
    match moved {
        Some(Reply::Pod(other)) => {
            ensure!(
                rest.contains(&other.as_str()),
                "answers come from a serving pod, got {other}"
            );
            eprintln!(
                "{backend:?} {front:?} v6={v6}: session {short} moved from {target} to {other}"
            );
            if let Some(line) = entry_of(&ct, conv.local_addr(), to) {
                eprintln!("its new conntrack entry: {line}");
            }
            // The new entry, from the events or (if the watcher missed them) the table.
            let to_pod = remapped_to(&events, conv.local_addr(), to, &bed).or_else(|| {
                let line = entry_of(&ct, conv.local_addr(), to)?;
                let src = reply_part(line).strip_prefix(" src=")?.split_whitespace().next()?;
                bed.cluster.pod_by_ip(src.parse().ok()?).map(kubeproxy::ClusterPod::name)
            });
            ensure!(
                to_pod == Some(other.as_str()),
                "a new conntrack entry maps the session to {other}; events:\n{events}\ntable:\n{ct}"
            );
            Ok(())
        }
        Some(Reply::Failed(how)) => bail!("the session failed instead of moving: {how}"),
        None => bail!(
            "session {short} still talks to {target} {BREAK_WITHIN:?} after kube-proxy's \
             UDP cleanup: the scenario does not reproduce"
        ),
    }
}

/// IPVS mode: the sync deleted the session's UDP real server at once (no
/// graceful termination for UDP), and IPVS, with `expire_nodest_conn=1`
/// (kernels from 5.9 flush a deleted real server's connections right away),
/// expires its connections and, with `vs.conntrack=1`, their conntrack
/// entries: the session's entry to `pod_ip` goes before kube-proxy's UDP
/// cleanup runs, which then finds nothing left. Seen in the guest (6.1):
/// the cleanup deleted no entry.
pub fn ipvs_drops_the_entry(
    bed: &Bed,
    client: SocketAddr,
    to: SocketAddr,
    pod_ip: IpAddr,
) -> Result<()> {
    let to_pod = format!("src={pod_ip} ");
    wait_until(
        "IPVS to drop the conntrack entry of the deleted UDP real server's session",
        TIMEOUT,
        || bed.node_a().conntrack(),
        |ct| entry_of(ct, client, to).is_none_or(|l| !reply_part(l).contains(&to_pod)),
    )?;
    eprintln!(
        "--- node A IPVS connections after the sync ---\n{}",
        bed.node_a().ipvs_connections()?
    );
    Ok(())
}

/// New flows go only to serving endpoints: kube-proxy already does this.
pub fn new_flows_avoid_removed(backend: Backend) -> Result<()> {
    let bed = Bed::new(backend)?;
    let fronts = [
        (Front::ClusterIp, false),
        (Front::ClusterIp, true),
        (Front::NodePort, false),
        (Front::NodePort, true),
    ];
    let mut session = 0;
    let mut probe = |to: SocketAddr, proto: Protocol| -> Result<String> {
        session += 1;
        let s = format!("n{session}");
        Conversation::probe(
            bed.client(),
            to,
            (proto == Protocol::Udp).then_some(s.as_str()),
        )
    };
    // Before: every pod gets flows.
    for (front, v6) in fronts {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let to = bed.frontend(front, v6, proto);
            let mut seen = BTreeSet::new();
            for _ in 0..200 {
                seen.insert(probe(to, proto)?);
                if seen.len() == 3 {
                    break;
                }
            }
            ensure!(
                seen.len() == 3,
                "{proto:?} flows to {to} reach all three pods: {seen:?}"
            );
        }
    }
    bed.sync(&["a2", "b1"])?;
    // As kube-proxy does after a sync: without it, a UDP probe that happens
    // to reuse an earlier probe's source port follows that probe's
    // conntrack entry to a1.
    for v6 in [false, true] {
        let a1 = bed.cluster.pod("a1").ip_like(bed.frontend(Front::ClusterIp, v6, Protocol::Udp).ip());
        for p in &bed.proxies {
            p.cleanup_udp_conntrack(a1)?;
        }
    }
    for (front, v6) in fronts {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let to = bed.frontend(front, v6, proto);
            let mut seen = BTreeSet::new();
            for _ in 0..30 {
                seen.insert(probe(to, proto)?);
            }
            ensure!(
                !seen.contains("a1"),
                "no new {proto:?} flow to {to} lands on the removed a1: {seen:?}"
            );
            // 30 random picks between two pods: all on one has odds 2^-29.
            ensure!(
                seen.len() == 2,
                "new {proto:?} flows to {to} reach both remaining pods: {seen:?}"
            );
        }
    }
    Ok(())
}

/// The emulation is faithful where it matters to steering: ClusterIP flows
/// keep the client's address, NodePort flows are masqueraded to node A's
/// address on the way to the pod (local: its veth gateway; remote: its
/// inter-node address), as kube-proxy does for `externalTrafficPolicy:
/// Cluster`.
pub fn masquerade_as_kube_proxy(backend: Backend) -> Result<()> {
    let bed = Bed::new(backend)?;
    for (front, v6, target) in [
        (Front::ClusterIp, false, "a1"),
        (Front::ClusterIp, false, "b1"),
        (Front::ClusterIp, true, "b1"),
        (Front::NodePort, false, "a1"),
        (Front::NodePort, false, "b1"),
        (Front::NodePort, true, "b1"),
    ] {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let to = bed.frontend(front, v6, proto);
            let session = format!("m{}", unique_tag());
            let udp = (proto == Protocol::Udp).then_some(session.as_str());
            let conv = Conversation::landing_on(bed.client(), to, udp, target)?;
            let ct = bed.node_a().conntrack()?;
            let line = entry_of(&ct, conv.local_addr(), to)
                .with_context(|| format!("no conntrack entry for {proto:?} to {to}:\n{ct}"))?;
            eprintln!("{backend:?} {proto:?} {front:?} -> {target}: {line}");
            let peer = expected_peer(front, bed.cluster.pod(target).node(), v6);
            if let Some(peer) = peer {
                ensure!(
                    bed.app(target).peers().iter().any(|p| p.ip() == peer),
                    "{target} sees {proto:?} to {to} from {peer}: {:?}",
                    bed.app(target).peers()
                );
                ensure!(
                    reply_part(line).contains(&format!("dst={peer} ")),
                    "the reply tuple goes to {peer}: {line}"
                );
            }
        }
    }
    Ok(())
}

/// IPVS mode, TCP through the ClusterIP, no agent: kube-proxy's graceful
/// termination gives the terminating pod's real server weight 0 while it has
/// connections, and IPVS keeps forwarding the stream from its own
/// connection table, also after the stream's conntrack entry is deleted (the
/// next segment gets a new entry, which IPVS points at the same pod). The
/// UDP real server is deleted at once.
pub fn ipvs_tcp_clusterip_graceful() -> Result<()> {
    let bed = Bed::new(Backend::Ipvs)?;
    let to = bed.frontend(Front::ClusterIp, false, Protocol::Tcp);
    let a1 = bed.cluster.pod("a1").ip_like(to.ip());
    let conv = Conversation::landing_on(bed.client(), to, None, "a1")?;
    conv.expect_steady(3)?;
    let ct = bed.show_conntrack("a1 serving the stream")?;
    let line = entry_of(&ct, conv.local_addr(), to).with_context(|| {
        format!("with net.ipv4.vs.conntrack=1, IPVS's connection has a conntrack entry:\n{ct}")
    })?;
    ensure!(
        reply_part(line).contains(&format!("src={a1} ")),
        "the entry maps the stream to a1 ({a1}), as an iptables DNAT would: {line}"
    );
    eprintln!(
        "--- node A IPVS connections ---\n{}",
        bed.node_a().ipvs_connections()?
    );

    bed.sync(&["a2", "b1"])?;
    let table = bed.node_a().ipvs_table()?;
    eprintln!(
        "--- node A rules after removing a1 ---\n{}",
        bed.node_a().ruleset()?
    );
    let rs = |proto: Protocol, port: u16| {
        table
            .iter()
            .find(|(vs, _)| vs.protocol == proto && vs.addr == SocketAddr::new(to.ip(), port))
            .and_then(|(_, rss)| rss.iter().find(|r| r.addr.ip() == a1).copied())
    };
    let tcp = rs(Protocol::Tcp, TCP_PORT)
        .context("a1 stays a TCP real server while it has a connection")?;
    ensure!(
        tcp.weight == 0 && tcp.active >= 1,
        "a1's TCP real server: weight 0, the stream active: {tcp:?}"
    );
    ensure!(
        rs(Protocol::Udp, UDP_PORT).is_none(),
        "a1's UDP real server is deleted at once"
    );
    conv.expect_steady(5)
        .context("weight 0: the stream goes on")?;

    let n = bed.node_a().delete_conntrack_of(a1)?;
    ensure!(
        n >= 1,
        "conntrack -D --reply-src {a1} deleted the stream's entry"
    );
    conv.expect_steady(5).context(
        "IPVS's own connection table keeps the stream on a1 after its conntrack entry is deleted",
    )?;
    let ct = bed.show_conntrack("after conntrack -D")?;
    if let Some(line) = entry_of(&ct, conv.local_addr(), to) {
        eprintln!("the stream's new conntrack entry: {line}");
    }
    Ok(())
}
