//! The churn's timeline (the two API server restarts) and the checks after it.

use super::{
    bed::{TcpFlow, tcp_flows},
    *,
};

/// The pid of the agent serving `socket` (`ip netns exec` execs it, so it is
/// the process whose arguments are `... --socket SOCKET agent ...`).
pub(crate) fn agent_pid(socket: &Path) -> Result<u32> {
    let socket = socket.to_string_lossy();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.windows(3).any(|w| w[0] == "--socket" && w[1] == socket && w[2] == "agent") {
            return Ok(pid);
        }
    }
    bail!("no agent process with --socket {socket}")
}

/// VmRSS of `pid`, in KiB.
pub(crate) fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status: has the agent exited?"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// An apiserver restart: gone for `DOWNTIME` (with `meanwhile` done to the
/// store then), back on the same address. Returns the index of the first
/// request after it.
pub(crate) fn restart(bed: &Bed, meanwhile: impl FnOnce(&FakeApiServer)) -> Result<usize> {
    bed.api().stop();
    meanwhile(bed.api());
    thread::sleep(DOWNTIME);
    let first = bed.api().requests().len();
    bed.k8s.resume(bed.topo.node())?;
    Ok(first)
}

pub(crate) fn soak_secs() -> Result<u64> {
    match std::env::var("CONNDRAIN_SOAK_SECS") {
        Err(_) => Ok(DEFAULT_SECS),
        Ok(s) => s.trim().parse().ok().filter(|n| *n >= 10).with_context(|| {
            format!("CONNDRAIN_SOAK_SECS={s:?}: give a whole number of seconds, at least 10 (default {DEFAULT_SECS})")
        }),
    }
}

/// What [`churn`] saw.
pub(crate) struct Churned {
    /// The agent's RSS: (seconds since start, KiB).
    pub(crate) samples: Vec<(f64, u64)>,
    /// Its RSS after the warm-up, in KiB.
    pub(crate) warm: u64,
    /// Request indexes: after restart 1, before restart 2, after restart 2.
    pub(crate) marks: [usize; 3],
}

/// Runs the churn for `secs`, with the two restarts, while the workers run.
pub(crate) fn churn(bed: &Bed, pid: u32, start: Instant, secs: u64) -> Result<Churned> {
    let total = Duration::from_secs(secs);
    let mut samples = Vec::new();
    let mut warm = None;
    let mut marks = Vec::new();
    let mut next_sample = start;
    while start.elapsed() < total && !bed.stop.load(Ordering::SeqCst) {
        let at = start.elapsed();
        if Instant::now() >= next_sample {
            samples.push((at.as_secs_f64(), rss_kib(pid)?));
            next_sample += Duration::from_secs(5);
        }
        if warm.is_none() && at >= total / 5 {
            warm = Some(rss_kib(pid)?);
        }
        if marks.is_empty() && at >= total * 7 / 20 {
            // Restart 1: the history is kept, so the watches resume from their
            // resourceVersion and must replay what happened meanwhile.
            marks.push(restart(bed, |api| {
                api.create_pod(running_pod(HOSTNET, NODE, &[NODE_V4.into()], true));
            })?);
            bed.wait_seen(HOSTNET, "skipped (created while the API server was down)", |p| {
                p.is_some_and(|p| p.state == "skipped")
            })?;
        }
        if marks.len() == 1 && at >= total * 13 / 20 {
            // Restart 2, after a compaction: the watches get 410 Gone and relist.
            marks.push(bed.api().requests().len());
            marks.push(restart(bed, |api| {
                api.delete_pod(NS, HOSTNET);
                api.compact();
            })?);
            bed.wait_seen(HOSTNET, "forgotten (deleted while the API server was down)", |p| p.is_none())?;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let warm = warm.context("the soak ended before the warm-up sample")?;
    let marks: [usize; 3] =
        marks.try_into().map_err(|m| anyhow::anyhow!("the soak ended before both restarts: {m:?}"))?;
    Ok(Churned { samples, warm, marks })
}

/// After the churn: nothing of the pods is left in the agent.
pub(crate) fn check_nothing_left(bed: &Bed, agent: &Agent, bpffs: &Bpffs) -> Result<()> {
    wait_until("the agent to list no pod", SLOW, || bed.cli.pods(), Vec::is_empty)?;
    let status = wait_until(
        "the agent's status to show no pod, interface or pin",
        SLOW,
        || bed.cli.status(),
        |s| {
            s["maps"]["pods"]["used"] == 0
                && s["maps"]["held"]["used"] == 0
                && s["interfaces"].as_array().is_some_and(Vec::is_empty)
                && s["steering"]["pinned_flows"] == 0
                && s["steering"]["pins"].as_array().is_some_and(Vec::is_empty)
        },
    )?;
    println!("soak: agent status at the end: maps {}, stats {}", status["maps"], status["stats"]);
    ensure!(
        status["stats"]["flows_evicted"] == 0 && status["stats"]["insert_failed"] == 0 && status["events_lost"] == 0,
        "no flow evicted from the index, failed to insert, or event lost (the table is far from full): {status}"
    );

    let pod_ips = bpffs.entries::<PodIpKey, u32>(maps::POD_IPS)?;
    ensure!(pod_ips.is_empty(), "POD_IPS keeps {} entries of removed pods", pod_ips.len());
    let pins = bpffs.entries::<conndrain_common::WireKey, conndrain_common::Pin>(maps::PINS)?;
    ensure!(pins.is_empty(), "PINS keeps {} entries", pins.len());
    let held = bpffs.entries::<FlowKey, FlowValue>(maps::HELD)?;
    ensure!(held.is_empty(), "HELD keeps {} flows of removed pods", held.len());
    let flagged: Vec<(u32, u32)> = bpffs.slots(maps::POD_FLAGS)?.into_iter().filter(|(_, f)| *f != 0).collect();
    ensure!(flagged.is_empty(), "POD_FLAGS keeps removed pods' slots flagged (slot, flags): {flagged:?}");
    let flows = tcp_flows(bpffs)?;
    let tally = bed.tally.lock().expect("tally lock");
    let node_api = SocketAddr::new(NODE_V4.into(), DEFAULT_WAIT_PORT);
    let live: Vec<&TcpFlow> = flows.iter().filter(|f| tcp_state::is_active(f.state)).collect();
    let unexplained: Vec<_> = live
        .iter()
        .filter(|f| {
            let held = tally.open_at_removal.contains(&(f.pod, f.peer));
            let hook = f.peer == node_api && tally.force_removed.contains(&f.pod.ip());
            !held && !hook
        })
        .map(|f| (f.pod, f.peer, f.state))
        .collect();
    println!(
        "soak: FLOWS and HELD hold {} TCP entries, {} of them live: flows whose pod was removed with them open",
        flows.len(),
        live.len()
    );
    ensure!(
        unexplained.is_empty(),
        "FLOWS or HELD keeps TCP flows live that were closed while their pod was registered (pod, peer, state): {unexplained:?}"
    );
    drop(tally);

    let path = agent.dir().join("state.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading the saved state {}", path.display()))?;
    let saved: serde_json::Value = serde_json::from_str(&text)?;
    ensure!(
        saved["pods"].as_array().is_some_and(Vec::is_empty)
            && saved["steering"]["backends"].as_array().is_some_and(Vec::is_empty)
            && saved["steering"]["pins"].as_array().is_some_and(Vec::is_empty),
        "the saved state keeps pods, steering backends or pins: {saved}"
    );
    Ok(())
}

/// The restarts did what they say: after the first, the agent watched pods
/// again without relisting (the store and its history were kept); after the
/// compaction, it relisted.
pub(crate) fn check_restarts(api: &FakeApiServer, [back1, down2, back2]: [usize; 3]) -> Result<()> {
    let reqs = api.requests();
    let pods = |from: usize, to: usize, verb: &str| {
        reqs[from..to].iter().filter(|r| r.path == "/api/v1/pods" && r.verb == verb).count()
    };
    let (watch1, list1) = (pods(back1, down2, "watch"), pods(back1, down2, "list"));
    ensure!(
        watch1 > 0 && list1 == 0,
        "after restart 1 the pod watch resumes, no relist: {watch1} watches, {list1} lists"
    );
    let list2 = pods(back2, reqs.len(), "list");
    ensure!(list2 > 0, "after the compaction and restart 2 the pods are listed again");
    let denied: Vec<_> = reqs.iter().filter(|r| r.status == 403).collect();
    ensure!(denied.is_empty(), "the agent only makes calls its RBAC allows: {denied:#?}");
    Ok(())
}
