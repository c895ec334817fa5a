//! Kernel and environment (issue 7, item 5): the agent checks at start what
//! it needs of the node and exits with one clear line per missing piece (all
//! of them at once, exit 1, no panic); it attaches with clsact where tcx is
//! missing or `--attach clsact` asks for it, and that path works end to end:
//! tracking, a drain, removing its filters on exit, and adopting them in
//! place across a restart with `--bpffs`.
//!
//! The agents that must fail run with `CONNDRAIN_LOG=off`, so that whatever
//! they print is their error lines. Like the other end-to-end tests these
//! assert states and their order, never durations.
//!
//! Needs root and `target/debug/conndrain` (or `CONNDRAIN_BIN`).

use std::net::SocketAddr;

use anyhow::{Context as _, Result, ensure};
use aya::programs::{SchedClassifier, TcAttachType};
use conndrain_tests::kubeproxy::{
    Backend, Cluster, Conversation, KubeProxy, NODE_A_V4, Node, PodApp, Protocol, Service,
    ServicePort,
};
use conndrain_tests::{
    Agent, Bpffs, Netns, Output, TIMEOUT, TcpConn, TcpServer, TempDir, Topology, conndrain_bin,
    require_root, run_with_timeout, wait_until,
};

const PORT: u16 = 8080;

/// An address no namespace of ours has (TEST-NET-1): binding to it fails,
/// and nothing is ever sent to it.
const NOT_HERE: &str = "192.0.2.1";

/// `conndrain agent <args>` in `ns`, run through `wrapper` (e.g. `setpriv`
/// and its arguments) if any, expected to exit on its own: its error lines.
fn failed_start(ns: &Netns, wrapper: &[&str], args: &[&str]) -> Result<Vec<String>> {
    let socket_dir = TempDir::new()?;
    let bin = conndrain_bin();
    let mut cmd = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut cmd = ns.command(program);
            cmd.args(rest).arg("--").arg(&bin);
            cmd
        }
        None => ns.command(&bin.to_string_lossy()),
    };
    cmd.arg("--socket")
        .arg(socket_dir.path().join("agent.sock"))
        .arg("agent")
        .args(args)
        .env("CONNDRAIN_LOG", "off");
    let out: Output = run_with_timeout(cmd, TIMEOUT)?;
    ensure!(out.code == 1, "the agent exits 1: {out:?}");
    ensure!(
        !out.stderr.contains("panicked") && !out.stderr.contains("backtrace"),
        "no panic, no backtrace: {out:?}"
    );
    let lines: Vec<String> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    ensure!(!lines.is_empty(), "an error line: {out:?}");
    for line in &lines {
        ensure!(
            line.starts_with("conndrain: "),
            "every line is prefixed: {lines:#?}"
        );
    }
    Ok(lines)
}

/// Each of `needles` is in exactly one line, and every line has one of them.
fn one_line_each(lines: &[String], needles: &[&str]) -> Result<()> {
    ensure!(
        lines.len() == needles.len(),
        "one line for each of {needles:?}: {lines:#?}"
    );
    for needle in needles {
        let n = lines.iter().filter(|l| l.contains(needle)).count();
        ensure!(n == 1, "{needle} is named in exactly one line: {lines:#?}");
    }
    Ok(())
}

#[test]
fn bpffs_that_is_not_a_bpf_filesystem_is_one_line() -> Result<()> {
    require_root()?;
    let node = Netns::unique("node")?;
    let plain = TempDir::new()?;
    // The directory itself, and one under it that does not exist yet.
    for dir in [plain.path().to_path_buf(), plain.path().join("conndrain")] {
        let shown = dir.to_string_lossy().into_owned();
        let lines = failed_start(&node, &[], &["--standalone", "--bpffs", &shown])?;
        ensure!(lines.len() == 1, "one line: {lines:#?}");
        for needle in [
            shown.as_str(),
            "not on a bpf filesystem",
            "mount -t bpf bpf /sys/fs/bpf",
            "deploy/",
        ] {
            ensure!(
                lines[0].contains(needle),
                "the line says {needle:?}: {lines:?}"
            );
        }
    }
    Ok(())
}

/// `setpriv` arguments that start root without `caps` (effective and
/// bounding sets: root's effective set is its bounding set at exec).
fn without(caps: &[&str]) -> Vec<String> {
    let list = caps
        .iter()
        .map(|c| format!("-{c}"))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        "setpriv".into(),
        format!("--inh-caps={list}"),
        format!("--bounding-set={list}"),
    ]
}

#[test]
fn each_missing_capability_is_its_own_line() -> Result<()> {
    require_root()?;
    let node = Netns::unique("node")?;
    for (dropped, named) in [
        (&["net_admin"][..], &["CAP_NET_ADMIN"][..]),
        (&["perfmon", "sys_admin"], &["CAP_PERFMON"]),
        (&["bpf", "sys_admin"], &["CAP_BPF"]),
        (
            &["bpf", "sys_admin", "net_admin", "perfmon"],
            &["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"],
        ),
    ] {
        let wrapper = without(dropped);
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let lines = failed_start(&node, &wrapper, &["--standalone"])
            .with_context(|| format!("without {dropped:?}"))?;
        one_line_each(&lines, named).with_context(|| format!("without {dropped:?}"))?;
        for line in &lines {
            ensure!(
                line.contains("grant it"),
                "says what to do: {line:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn several_missing_pieces_are_all_named_at_once() -> Result<()> {
    require_root()?;
    let node = Netns::unique("node")?;
    let plain = TempDir::new()?;
    let bpffs = plain.path().to_string_lossy().into_owned();
    let wrapper = without(&["bpf", "sys_admin", "net_admin", "perfmon"]);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let lines = failed_start(
        &node,
        &wrapper,
        &["--standalone", "--bpffs", &bpffs, "--host-ip", NOT_HERE],
    )?;
    one_line_each(
        &lines,
        &["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON", "--bpffs", "--host-ip"],
    )
}

/// Kubernetes mode in a namespace that is not the node's: the node IP it was
/// given is not an address here, and there is no interface but `lo`. Both
/// are named before the agent reads any kubeconfig.
#[test]
fn kubernetes_mode_outside_the_node_network_namespace_is_named() -> Result<()> {
    require_root()?;
    let node = Netns::unique("node")?;
    let lines = failed_start(&node, &[], &["--node-name", "n1", "--host-ip", NOT_HERE])?;
    one_line_each(&lines, &["--host-ip", "no interface but lo"])?;
    for line in &lines {
        ensure!(line.contains("hostNetwork"), "says what to do: {line:?}");
    }
    // Standalone, pods may come later: only the address is wrong.
    let lines = failed_start(&node, &[], &["--standalone", "--host-ip", NOT_HERE])?;
    one_line_each(&lines, &["--host-ip"])
}

/// A pod whose IP no interface of the agent's network namespace routes to
/// (the pod is elsewhere, or the agent is not in the node's namespace): one
/// line naming the IP and what to check, and nothing registered.
#[test]
fn a_pod_ip_no_interface_routes_to_is_named() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").build()?;
    let agent = Agent::start(topo.node(), &[])?;
    let cli = agent.cli();
    // TEST-NET-3: the node has no route to it (and no default route); only
    // looked up, never sent to.
    let out = cli.run(&["pod", "add", "ghost", "--ip", "203.0.113.7"])?;
    ensure!(out.code == 1, "refused: {out:?}");
    let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(lines.len() == 1, "one line: {lines:#?}");
    for needle in ["conndrain: ", "203.0.113.7", "hostNetwork"] {
        ensure!(lines[0].contains(needle), "the line says {needle:?}: {lines:?}");
    }
    ensure!(
        !cli.pods()?.iter().any(|p| p.name == "ghost"),
        "nothing was registered"
    );
    Ok(())
}

/// Our filters on `iface`'s clsact hooks in `ns`, as `tc` shows them:
/// (direction, pref, handle, program id), sorted.
fn our_filters(ns: &Netns, iface: &str) -> Result<Vec<(String, String, String, String)>> {
    let mut out = Vec::new();
    for dir in ["ingress", "egress"] {
        let shown = ns.exec("tc", &["filter", "show", "dev", iface, dir])?;
        for line in shown.lines().filter(|l| l.contains("conndrain_")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let after = |key: &str| {
                words
                    .iter()
                    .position(|w| *w == key)
                    .and_then(|i| words.get(i + 1))
                    .map(|w| (*w).to_owned())
                    .with_context(|| format!("no {key} in `{line}`"))
            };
            out.push((dir.to_owned(), after("pref")?, after("handle")?, after("id")?));
        }
    }
    out.sort();
    Ok(out)
}

/// How many of our programs tcx runs on `iface` in `ns`, both directions.
fn our_tcx_programs(ns: &Netns, iface: &str) -> Result<usize> {
    if !conndrain_tests::kernel_has_tcx() {
        // Before 6.6 (the guest stage's 6.1) there is no tcx to query, and
        // nothing of ours can be on it.
        return Ok(0);
    }
    let iface = iface.to_owned();
    ns.run(move || -> Result<usize> {
        let mut n = 0;
        for ty in [TcAttachType::Ingress, TcAttachType::Egress] {
            let (_, progs) = SchedClassifier::query_tcx(&iface, ty)
                .with_context(|| format!("querying the tcx programs of {iface}"))?;
            n += progs
                .iter()
                .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("conndrain_")))
                .count();
        }
        Ok(n)
    })?
}

/// Another tool's filter on `iface`'s clsact ingress, there before us: ours
/// go next to it, never replace it. (Classic BPF that never matches: the
/// kernel here may have no matchall nor actions.) Returns whether it is
/// still there, to ask again later.
fn foreign_filter<'a>(node: &'a Netns, iface: &str) -> Result<impl Fn() -> Result<bool> + 'a> {
    node.exec("tc", &["qdisc", "add", "dev", iface, "clsact"])?;
    let foreign = ["dev", iface, "ingress", "pref", "50000", "bpf", "bytecode", "1,6 0 0 0,"];
    node.exec("tc", &[&["filter", "add"][..], &foreign].concat())?;
    let iface = iface.to_owned();
    Ok(move || -> Result<bool> {
        let shown = node.exec("tc", &["filter", "show", "dev", &iface, "ingress"])?;
        Ok(shown.contains("pref 50000 bpf chain 0 handle"))
    })
}

#[test]
fn clsact_path_tracks_drains_and_removes_its_filters_on_exit() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").build()?;
    let web = topo.pod("web");
    let node = topo.node();
    let foreign_there = foreign_filter(node, web.node_if())?;
    let mut agent = Agent::start(node, &["--attach", "clsact"])?;
    let cli = agent.cli();
    ensure!(
        cli.status()?["attach_mode"] == "clsact",
        "status says clsact: {}",
        cli.status()?
    );
    cli.add_pod(web)?;
    let filters = our_filters(topo.node(), web.node_if())?;
    ensure!(
        filters.iter().map(|f| f.0.as_str()).collect::<Vec<_>>() == ["egress", "ingress"],
        "one filter of ours each way on {}: {filters:?}",
        web.node_if()
    );
    ensure!(
        our_tcx_programs(topo.node(), web.node_if())? == 0,
        "nothing of ours on tcx"
    );
    ensure!(foreign_there()?, "the other tool's filter is still there");

    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let mut conns = TcpConn::connect_many(topo.client(), server.addr(), 2)?;
    cli.wait_pod("web", "2 active flows", |p| p.active_flows == 2)?;
    cli.terminate("web", 1.0, 60.0)?;
    let mut wait = cli.spawn(&["wait", "web", "--timeout", "30"])?;
    conns.pop().expect("two").close()?;
    let pod = cli.wait_pod("web", "1 active flow", |p| p.active_flows == 1)?;
    ensure!(pod.state == "draining", "one open flow holds the pod: {pod:?}");
    conns.pop().expect("one").close()?;
    let pod = cli.wait_state("web", "drained")?;
    ensure!(pod.active_flows == 0, "{pod:?}");
    let out = wait.wait_exit(TIMEOUT)?;
    ensure!(out.code == 0, "`conndrain wait` exits 0 once drained: {out:?}");

    let status = agent.stop()?;
    ensure!(status.success(), "a clean exit: {status}");
    no_filters_left(node)?;
    ensure!(foreign_there()?, "the other tool's filter is still there");
    Ok(())
}

/// No filter of ours on any interface of `ns`: the pods', and any the agent
/// attached to for steering.
fn no_filters_left(ns: &Netns) -> Result<()> {
    for line in ns.ip(&["-o", "link", "show"])?.lines() {
        // `3: name@peer: <FLAGS> ...`
        let Some(iface) = line.split(": ").nth(1).and_then(|n| n.split('@').next()) else {
            continue;
        };
        let left = our_filters(ns, iface)?;
        ensure!(left.is_empty(), "the agent removed its filters from {iface}: {left:?}");
    }
    Ok(())
}

/// Steering works from clsact too (`bpf_redirect_neigh`): a stream pinned to
/// a terminating pod keeps it after kube-proxy dropped the pod and conntrack
/// forgot the flow. On exit the agent removes its filters from every
/// interface, also those it attached to only for steering.
#[test]
fn clsact_path_steers_a_pinned_flow_and_leaves_no_filter() -> Result<()> {
    require_root()?;
    let cluster = Cluster::build(&[("a1", Node::A), ("a2", Node::A)])?;
    let _apps = cluster
        .pods()
        .iter()
        .map(|p| PodApp::start(p, PORT, PORT + 1))
        .collect::<Result<Vec<_>>>()?;
    let vip = SocketAddr::new("10.96.0.10".parse()?, 80);
    let http = ServicePort {
        name: "http".into(),
        protocol: Protocol::Tcp,
        port: vip.port(),
        target_port: PORT,
        node_port: None,
    };
    let service = Service {
        namespace: "default".into(),
        name: "web".into(),
        cluster_ips: vec![vip.ip()],
        ports: vec![http],
    };
    let proxy = KubeProxy::start(cluster.node_a(), Backend::Iptables, &service, &[NODE_A_V4.into()])?;
    proxy.sync(&[cluster.pod("a1").ipv4().into(), cluster.pod("a2").ipv4().into()])?;

    let mut agent = Agent::start(cluster.node_a(), &["--attach", "clsact"])?;
    let cli = agent.cli();
    let a1 = cluster.pod("a1").ipv4().to_string();
    cli.ok(&["pod", "add", "a1", "--ip", &a1])?;
    let conv = Conversation::landing_on(cluster.client(), vip, None, "a1")?;
    conv.expect_steady(3)?;
    cli.ok(&["pod", "terminate", "a1", "--deadline", "300", "--quiet-period", "1"])?;
    wait_until("the stream pinned", TIMEOUT, || cli.status(), |s| {
        s["steering"]["pinned_flows"].as_u64() >= Some(1)
    })?;
    proxy.sync(&[cluster.pod("a2").ipv4().into()])?;
    proxy.delete_conntrack_of(cluster.pod("a1").ipv4().into())?;
    conv.expect_steady(10)
        .context("the pinned stream keeps its pod after its endpoint and conntrack entry are gone")?;
    let steered = cli.status()?["steering"]["steered_packets"].as_u64().unwrap_or(0);
    ensure!(steered > 0, "the clsact programs steered the stream");

    agent.stop()?;
    no_filters_left(cluster.node_a())
}


/// clsact filters cannot be pinned, but need not be: after a kill -9 they
/// run on with the pinned maps (a connection opened meanwhile is tracked),
/// and the next agent swaps its programs into them in place, at the same
/// priority and handle, with no second copy.
#[test]
fn clsact_filters_are_adopted_in_place_across_a_restart() -> Result<()> {
    require_root()?;
    let bpffs = Bpffs::mount()?;
    let topo = Topology::builder().pod("web").build()?;
    let web = topo.pod("web");
    let bpf = bpffs.arg();
    // The connections carry no traffic: under the guest's emulated CPU a
    // restart (the 6.1 verifier) outlasted the default 30 s idle timeout,
    // and they were counted idle, not active.
    let args = ["--attach", "clsact", "--bpffs", &bpf, "--idle-timeout", "600"];
    let mut agent = Agent::start(topo.node(), &args)?;
    let cli = agent.cli();
    cli.add_pod(web)?;
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    let first = TcpConn::connect(topo.client(), server.addr())?;
    cli.wait_pod("web", "1 active flow", |p| p.active_flows == 1)?;
    let before = our_filters(topo.node(), web.node_if())?;
    ensure!(before.len() == 2, "one filter of ours each way: {before:?}");

    agent.kill9()?;
    let meanwhile = our_filters(topo.node(), web.node_if())?;
    ensure!(meanwhile == before, "the filters outlive the agent: {meanwhile:?}");
    let second = TcpConn::connect(topo.client(), server.addr())?;

    agent.restart(topo.node(), &args)?;
    cli.wait_pod(
        "web",
        "2 active flows, one opened while no agent ran",
        |p| p.active_flows == 2,
    )?;
    let after = our_filters(topo.node(), web.node_if())?;
    ensure!(after.len() == 2, "still one filter of ours each way: {after:?}");
    for (old, new) in before.iter().zip(&after) {
        ensure!(
            (&old.0, &old.1, &old.2) == (&new.0, &new.1, &new.2),
            "the same filter (direction, pref, handle): {before:?} then {after:?}"
        );
        ensure!(old.3 != new.3, "with the new agent's program in it: {before:?} then {after:?}");
    }
    ensure!(
        agent.log().contains("took over"),
        "the adoption is logged: {}",
        agent.log()
    );
    // The new programs track the closes.
    first.close()?;
    second.close()?;
    cli.wait_pod("web", "0 active flows", |p| p.active_flows == 0)?;

    // --detach-on-exit cleans up after the last agent.
    agent.stop()?;
    agent.restart(topo.node(), &[&args[..], &["--detach-on-exit"]].concat())?;
    agent.stop()?;
    let left = our_filters(topo.node(), web.node_if())?;
    ensure!(left.is_empty(), "--detach-on-exit removes the filters: {left:?}");
    Ok(())
}

/// Switching `--attach` between restarts with `--bpffs` leaves one copy of
/// our programs: the new mode's, never both (which would count twice).
#[test]
fn switching_attach_mode_across_restarts_leaves_one_copy() -> Result<()> {
    require_root()?;
    if !conndrain_tests::kernel_has_tcx() {
        // Nothing to switch to: `--attach tcx` is refused there, which
        // `auto_attach_follows_the_probed_tcx_support` checks.
        eprintln!("skipped: no tcx in this kernel (6.6+), so only the clsact mode exists");
        return Ok(());
    }
    let bpffs = Bpffs::mount()?;
    let topo = Topology::builder().pod("web").build()?;
    let (node, iface) = (topo.node(), topo.pod("web").node_if());
    let bpf = bpffs.arg();
    let mut agent = Agent::start(node, &["--attach", "clsact", "--bpffs", &bpf])?;
    let cli = agent.cli();
    cli.add_pod(topo.pod("web"))?;
    for mode in ["tcx", "clsact", "tcx"] {
        agent.stop()?;
        agent.restart(node, &["--attach", mode, "--bpffs", &bpf])?;
        let filters = our_filters(node, iface)?.len();
        let tcx = our_tcx_programs(node, iface)?;
        let expected = if mode == "tcx" { (0, 2) } else { (2, 0) };
        ensure!(
            (filters, tcx) == expected,
            "after a restart with --attach {mode}: {filters} clsact filters and {tcx} tcx programs of ours"
        );
        ensure!(cli.status()?["attach_mode"] == mode, "status says {mode}");
    }
    Ok(())
}

/// `--attach auto` follows the probed tcx support, and `--attach tcx` is
/// refused with one line where the kernel has none.
#[test]
fn auto_attach_follows_the_probed_tcx_support() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").build()?;
    let agent = Agent::start(topo.node(), &[])?;
    let status = agent.cli().status()?;
    let tcx = status["kernel"]["tcx"]
        .as_bool()
        .context("status has kernel.tcx")?;
    let expected = if tcx { "tcx" } else { "clsact" };
    ensure!(
        status["attach_mode"] == expected,
        "auto attaches with {expected}: {status:#}"
    );
    ensure!(
        status["kernel"]["btf"].is_boolean(),
        "BTF is reported: {status:#}"
    );
    drop(agent);
    if !tcx {
        let lines = failed_start(topo.node(), &[], &["--standalone", "--attach", "tcx"])?;
        one_line_each(&lines, &["--attach tcx"])?;
    }
    Ok(())
}

/// The kernel's BTF is only reported, not required, because the programs
/// have no CO-RE relocations: nothing in them is rewritten for the running
/// kernel's types. If that changes, `features.rs` must require BTF.
#[test]
fn programs_have_no_core_relocations_so_kernel_btf_is_optional() -> Result<()> {
    let obj = conndrain::EBPF_OBJECT;
    ensure!(!obj.is_empty(), "built with its eBPF object (cargo xtask build)");
    let ext = elf_section(obj, ".BTF.ext")?.context("the object has .BTF.ext")?;
    // btf_ext_header: magic, version, flags, hdr_len, then offsets and
    // lengths of func_info, line_info and (when hdr_len >= 32) core_relo.
    let u32_at = |at: usize| -> Result<usize> {
        let b = ext.get(at..at + 4).context(".BTF.ext header cut short")?;
        Ok(u32::from_le_bytes(b.try_into()?) as usize)
    };
    ensure!(ext.get(..2) == Some(&[0x9f, 0xeb][..]), "BTF magic");
    let hdr_len = u32_at(4)?;
    let core_relo_len = if hdr_len >= 32 { u32_at(28)? } else { 0 };
    ensure!(
        core_relo_len == 0,
        "the programs have {core_relo_len} bytes of CO-RE relocations: they need the kernel's BTF now"
    );
    Ok(())
}

/// The contents of the section `name` of a little-endian ELF64 object.
fn elf_section<'a>(elf: &'a [u8], name: &str) -> Result<Option<&'a [u8]>> {
    ensure!(elf.get(..4) == Some(b"\x7fELF"), "an ELF object");
    let field = |at: usize, len: usize| -> Result<usize> {
        let b = elf.get(at..at + len).context("ELF cut short")?;
        let mut v = [0u8; 8];
        v[..len].copy_from_slice(b);
        Ok(usize::try_from(u64::from_le_bytes(v))?)
    };
    let (shoff, shentsize, shnum, shstrndx) =
        (field(0x28, 8)?, field(0x3a, 2)?, field(0x3c, 2)?, field(0x3e, 2)?);
    // Section header: name offset at 0, file offset at 0x18, size at 0x20.
    let header = |i: usize| -> Result<(usize, usize, usize)> {
        let at = shoff + i * shentsize;
        Ok((field(at, 4)?, field(at + 0x18, 8)?, field(at + 0x20, 8)?))
    };
    let (_, names_at, _) = header(shstrndx)?;
    for i in 0..shnum {
        let (name_off, off, size) = header(i)?;
        let start = names_at + name_off;
        let end = elf[start..].iter().position(|&b| b == 0).map(|n| start + n);
        if end.is_some_and(|end| &elf[start..end] == name.as_bytes()) {
            return Ok(Some(elf.get(off..off + size).context("section beyond the file")?));
        }
    }
    Ok(None)
}

/// `conndrain cleanup` after a clsact agent died (kill -9): its filters,
/// which no pin holds and which outlive it, are removed from every interface
/// and named; another tool's filter stays.
#[test]
fn cleanup_removes_the_clsact_filters_a_dead_agent_left() -> Result<()> {
    require_root()?;
    let topo = Topology::builder().pod("web").build()?;
    let web = topo.pod("web");
    let node = topo.node();
    let foreign_there = foreign_filter(node, web.node_if())?;
    let mut agent = Agent::start(node, &["--attach", "clsact"])?;
    agent.cli().add_pod(web)?;
    agent.kill9()?;
    ensure!(our_filters(node, web.node_if())?.len() == 2, "kill -9 leaves the filters");
    let mut cmd = node.command(&conndrain_bin().to_string_lossy());
    cmd.arg("--socket").arg(agent.socket()).args(["cleanup", "--bpffs", "/nonexistent/conndrain"]);
    let out = run_with_timeout(cmd, TIMEOUT)?;
    ensure!(out.code == 0, "cleanup: {out:?}");
    let iface = web.node_if();
    ensure!(
        out.stdout.contains(&format!("removed conndrain's clsact filters: {iface} ingress, {iface} egress")),
        "names what it removed: {out:?}"
    );
    no_filters_left(node)?;
    ensure!(foreign_there()?, "the other tool's filter stays");
    Ok(())
}
