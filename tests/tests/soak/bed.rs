//! The test bed the workers share, and one pod's life from creation to removal.

use super::*;

/// What the workers did, for the checks at the end.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) pods: BTreeMap<Plan, u32>,
    /// (pod side, peer side) of TCP connections still open when their pod
    /// was removed: the only TCP flows that may stay live in `FLOWS` (their
    /// pod's removal takes them out, but a packet that slips in before the
    /// pod's IPs are unregistered may make one again).
    pub(crate) open_at_removal: BTreeSet<(SocketAddr, SocketAddr)>,
    /// IPs of force-deleted pods, whose preStop connection to the node API
    /// was open at their removal too.
    pub(crate) force_removed: BTreeSet<IpAddr>,
}

pub(crate) struct Bed<'a> {
    pub(crate) topo: &'a Topology,
    pub(crate) k8s: &'a AgentApi,
    pub(crate) bpffs: &'a Bpffs,
    pub(crate) cli: Cli,
    /// The last `conndrain pods -o json`, read by one thread for everybody.
    pub(crate) seen: Mutex<Result<Vec<PodStatus>, String>>,
    pub(crate) stop: AtomicBool,
    pub(crate) failures: Mutex<Vec<String>>,
    pub(crate) tally: Mutex<Tally>,
}

impl Bed<'_> {
    pub(crate) fn api(&self) -> &FakeApiServer {
        &self.k8s.api
    }

    pub(crate) fn fail(&self, e: &anyhow::Error) {
        self.failures.lock().expect("failures lock").push(format!("{e:#}"));
        self.stop.store(true, Ordering::SeqCst);
    }

    pub(crate) fn look(&self) {
        let seen = self.cli.pods().map_err(|e| format!("{e:#}"));
        *self.seen.lock().expect("seen lock") = seen;
    }

    /// Waits until the agent lists pod `name` and `done` accepts it (`None`: until it lists it no more).
    pub(crate) fn wait_seen(
        &self,
        name: &str,
        what: &str,
        mut done: impl FnMut(Option<&PodStatus>) -> bool,
    ) -> Result<()> {
        let full = format!("{NS}/{name}");
        wait_until(
            &format!("the agent to list {full}: {what}"),
            SLOW,
            || {
                let seen = self.seen.lock().expect("seen lock");
                let pods = seen.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(pods.iter().find(|p| p.name == full).cloned())
            },
            |p| done(p.as_ref()),
        )
        .map(drop)
    }

    /// Waits until the TCP flows of the pod with `ips` that the datapath
    /// still has open (not closed) are exactly `held`, by pod side and peer
    /// side. Read from the pinned flow tables; only entries first seen since
    /// `born` (`CLOCK_MONOTONIC` ns) count, so that nothing an earlier pod
    /// with the same IPs left behind is taken for this pod's.
    pub(crate) fn wait_tcp_flows(&self, name: &str, ips: [IpAddr; 2], born: u64, held: &[TcpConn]) -> Result<()> {
        let want: BTreeSet<(SocketAddr, SocketAddr)> = held.iter().map(|c| (c.peer_addr(), c.local_addr())).collect();
        wait_until(
            &format!("the datapath to have closed every TCP flow of {name} but the {} held ones", held.len()),
            SLOW,
            || {
                // One table walk per look, not one per POLL.
                thread::sleep(LOOK_EVERY);
                Ok(tcp_flows(self.bpffs)?
                    .into_iter()
                    .filter(|f| ips.contains(&f.pod.ip()) && f.first_seen >= born && f.state != tcp_state::CLOSED)
                    .map(|f| (f.pod, f.peer))
                    .collect::<BTreeSet<_>>())
            },
            |open| *open == want,
        )
        .map(drop)
    }
}

/// A TCP entry of the pinned flow tables.
pub(crate) struct TcpFlow {
    pub(crate) pod: SocketAddr,
    pub(crate) peer: SocketAddr,
    pub(crate) state: u8,
    pub(crate) first_seen: u64,
}

/// Both tables: `FLOWS`, and `HELD`, where a draining pod's flows go.
pub(crate) fn tcp_flows(bpffs: &Bpffs) -> Result<Vec<TcpFlow>> {
    let mut entries = bpffs.entries::<FlowKey, FlowValue>(maps::FLOWS)?;
    entries.extend(bpffs.entries::<FlowKey, FlowValue>(maps::HELD)?);
    Ok(entries
        .into_iter()
        .filter(|(k, _)| k.proto == PROTO_TCP)
        .map(|(k, v)| TcpFlow {
            pod: SocketAddr::new(ip_from_bytes(k.pod_addr, k.family), k.pod_port),
            peer: SocketAddr::new(ip_from_bytes(k.peer_addr, k.family), k.peer_port),
            state: v.state,
            first_seen: v.first_seen_ns,
        })
        .collect())
}

/// The endpoints of worker `slot`'s EndpointSlice: its pod on this node and
/// a pod on another node, both `terminating` or not; none if `ips` is empty.
pub(crate) fn endpoints(ips: &[(IpAddr, &str)], terminating: bool) -> Result<EndpointSlice> {
    let eps: Vec<serde_json::Value> = ips
        .iter()
        .map(|(ip, node)| {
            serde_json::json!({
                "addresses": [ip.to_string()],
                "nodeName": node,
                "conditions": {"ready": !terminating, "serving": true, "terminating": terminating},
            })
        })
        .collect();
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"namespace": NS, "labels": {"kubernetes.io/service-name": "soak"}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "port": TCP_PORT, "protocol": "TCP"}],
    }))?)
}

pub(crate) fn set_endpoints(api: &FakeApiServer, slice: &str, ips: &[(IpAddr, &str)], terminating: bool) -> Result<()> {
    let new = endpoints(ips, terminating)?;
    api.update_endpoint_slice(NS, slice, |s| s.endpoints = new.endpoints);
    Ok(())
}

pub(crate) fn condition(api: &FakeApiServer, name: &str) -> Option<(String, String)> {
    let conds = api.pod(NS, name)?.status?.conditions?;
    conds.into_iter().find(|c| c.type_ == CONDITION).map(|c| (c.status, c.reason.unwrap_or_default()))
}

pub(crate) fn pre_stop(ns: &Netns) -> Result<Running> {
    let mut cmd = ns.command(&conndrain_bin().to_string_lossy());
    cmd.args(["wait", "--fallback-sleep", "0"]).env("HOST_IP", NODE_V4.to_string());
    Running::spawn(cmd)
}

/// The preStop hook returned with `state`'s message, and the condition is
/// final with `reason` (it never became final with another).
pub(crate) fn expect_outcome(bed: &Bed, name: &str, hook: &mut Running, state: &str, reason: &str) -> Result<()> {
    let out = hook.wait_exit(SLOW).context("the preStop `conndrain wait` returns")?;
    let said = match state {
        "drained" => out.stdout.contains("drained after"),
        _ => out.stderr.contains("reached its deadline"),
    };
    ensure!(out.code == 0 && said, "the preStop `conndrain wait` of {name} reports {state}: {out:?}");
    let last = wait_until(
        &format!("{CONDITION} of {name} to become final (no condition may stay at Draining)"),
        SLOW,
        || Ok(condition(bed.api(), name)),
        |c| c.as_ref().is_some_and(|(s, _)| s == "True"),
    )?;
    ensure!(
        last.as_ref().is_some_and(|(_, r)| r == reason),
        "{CONDITION} of {name} is {reason}, as its preStop said: {last:?}"
    );
    Ok(())
}

/// The app in one pod namespace: TCP and UDP servers on both addresses.
/// Started once: the pods that take turns in the namespace run the same app.
pub(crate) struct App {
    pub(crate) tcp: [TcpServer; 2],
    pub(crate) udp: [UdpServer; 2],
}

impl App {
    pub(crate) fn start(p: &conndrain_tests::Pod) -> Result<Self> {
        Ok(Self {
            tcp: [TcpServer::start(p.ns(), p.addr_v4(TCP_PORT))?, TcpServer::start(p.ns(), p.addr_v6(TCP_PORT))?],
            udp: [UdpServer::start(p.ns(), p.addr_v4(UDP_PORT))?, UdpServer::start(p.ns(), p.addr_v6(UDP_PORT))?],
        })
    }
}

/// One pod's life, on worker `slot`'s namespace.
pub(crate) fn one_pod(bed: &Bed, App { tcp, udp }: &App, slot: usize, generation: u32, plan: Plan) -> Result<()> {
    let p = &bed.topo.pods()[slot];
    let client = bed.topo.client();
    let api = bed.api();
    let name = format!("soak-{slot}-{generation}");
    let slice = format!("soak-{slot}");
    let remote = IpAddr::V4(Ipv4Addr::new(10, 250, u8::try_from(slot)?, u8::try_from(generation % 250 + 1)?));
    let eps = [(IpAddr::V4(p.ipv4()), NODE), (remote, "node-b")];

    // The pod (Ready), then its endpoints.
    let born = now_ns();
    api.create_pod(running_pod(&name, NODE, &p.ips(), false));
    set_endpoints(api, &slice, &eps, false)?;
    bed.wait_seen(&name, "tracked, attached", |p| p.is_some_and(|p| p.state == "serving" && !p.interfaces.is_empty()))?;

    for server in tcp {
        let mut conn = TcpConn::connect(client, server.addr())?;
        conn.request("GET /fast")?;
        conn.close()?;
    }
    for server in udp {
        UdpClient::connect(client, server.addr())?.echo(b"soak")?;
    }
    let mut held = match plan {
        Plan::Drain => vec![TcpConn::connect(client, tcp[0].addr())?, TcpConn::connect(client, tcp[1].addr())?],
        Plan::Deadline => vec![TcpConn::connect(client, tcp[0].addr())?],
        Plan::Force => vec![TcpConn::connect(client, tcp[1].addr())?],
        Plan::Quiet => Vec::new(),
    };
    let n = u64::try_from(held.len())?;
    bed.wait_seen(&name, "the held connections counted active", |p| p.is_some_and(|p| p.active_flows >= n))?;

    // kubectl delete: the kubelet's kill time is the grace period from now
    // (the drain's deadline is 1 s before it), and it runs the preStop hook.
    let grace = if plan == Plan::Deadline { 4 } else { 30 };
    api.mark_pod_deleted(NS, &name, grace);
    set_endpoints(api, &slice, &eps, true)?;
    let mut hook = pre_stop(p.ns())?;
    match plan {
        Plan::Drain => {
            bed.wait_seen(&name, "draining", |p| p.is_some_and(|p| p.state == "draining"))?;
            for conn in held.drain(..) {
                conn.close()?;
            }
            expect_outcome(bed, &name, &mut hook, "drained", "NoConnections")?;
        }
        Plan::Quiet => expect_outcome(bed, &name, &mut hook, "drained", "NoConnections")?,
        Plan::Deadline => expect_outcome(bed, &name, &mut hook, "deadline", "DeadlineReached")?,
        Plan::Force => {
            bed.wait_seen(&name, "draining", |p| p.is_some_and(|p| p.state == "draining"))?;
            api.delete_pod(NS, &name);
            set_endpoints(api, &slice, &[], false)?;
            let out = hook.wait_exit(SLOW).context("the preStop `conndrain wait` of a force-deleted pod returns")?;
            ensure!(out.code == 0, "preStop exits 0 whatever happens: {out:?}");
            let mut tally = bed.tally.lock().expect("tally lock");
            tally.force_removed.extend(p.ips());
            tally.open_at_removal.extend(held.iter().map(|c| (c.peer_addr(), c.local_addr())));
            drop(tally);
            for conn in held {
                conn.reset()?;
            }
            return Ok(());
        }
    }
    // The hook returned; the kubelet stops the containers, whose connections
    // close (but the ones this plan holds on purpose), and removes the pod.
    bed.wait_tcp_flows(&name, p.ips(), born, &held)?;
    bed.tally.lock().expect("tally lock").open_at_removal.extend(held.iter().map(|c| (c.peer_addr(), c.local_addr())));
    api.delete_pod(NS, &name);
    set_endpoints(api, &slice, &[], false)?;
    for conn in held {
        conn.reset()?;
    }
    Ok(())
}

pub(crate) fn worker(bed: &Bed, slot: usize) -> Result<()> {
    let slice = format!("soak-{slot}");
    let mut obj = endpoints(&[], false)?;
    obj.metadata.name = Some(slice.clone());
    bed.api().create_endpoint_slice(obj);
    let app = App::start(&bed.topo.pods()[slot])?;
    let mut generation = 0u32;
    while !bed.stop.load(Ordering::SeqCst) {
        let plan = PLANS[(slot + generation as usize) % PLANS.len()];
        one_pod(bed, &app, slot, generation, plan)
            .with_context(|| format!("pod soak-{slot}-{generation} ({plan:?})"))?;
        *bed.tally.lock().expect("tally lock").pods.entry(plan).or_default() += 1;
        generation += 1;
    }
    bed.api().delete_endpoint_slice(NS, &slice);
    Ok(())
}
