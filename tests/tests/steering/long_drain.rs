//! Long drains: a pinned flow that outlives its pod's deadline.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use conndrain_tests::kubeproxy::{Backend, Conversation, Protocol, Reply};
use conndrain_tests::{Agent, Cli, Netns, TIMEOUT, wait_until};
use serde_json::Value;

use super::{
    BREAK_WITHIN,
    bed::{Bed, Front, entry_of},
    with_agent::{entry_gone, kubernetes_agent, steered_packets, web_slice},
};

/// What the long-drain stream sends, and gets back, while pinned: far more
/// than one TCP window. kube-proxy's conntrack entry saw the first exchange
/// only (windows of a few hundred KiB at most; `tcp_rmem` lets one grow to
/// 6 MiB here), and none of these bytes.
const BULK: usize = 24 << 20;

/// The long-drain tests' drain deadline, in seconds: the bulk transfer (well
/// under a second here) is over long before it, and the stream is still
/// active (traffic within the 30 s idle timeout) when it passes.
const LONG_DRAIN_DEADLINE: &str = "8";

/// A TCP connection from the client through a Service for bulk transfers
/// (a [`Conversation`] only exchanges short lines). The pod's app answers a
/// line with `<pod>:<line>`, so a long line comes back as long.
struct BulkStream {
    reader: std::io::BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
    local: SocketAddr,
    seq: u64,
}

impl BulkStream {
    /// Connects until a connection lands on pod `want`.
    fn landing_on(client: &Netns, to: SocketAddr, want: &str) -> Result<Self> {
        let mut seen = BTreeSet::new();
        for _ in 0..100 {
            let tcp = conndrain_tests::run_in(client, || std::net::TcpStream::connect_timeout(&to, TIMEOUT))?
                .with_context(|| format!("connecting to {to}"))?;
            tcp.set_read_timeout(Some(TIMEOUT))?;
            tcp.set_write_timeout(Some(TIMEOUT))?;
            let mut s = Self {
                local: tcp.local_addr()?,
                writer: tcp.try_clone()?,
                reader: std::io::BufReader::new(tcp),
                seq: 0,
            };
            let pod = s.echo(1)?;
            if pod == want {
                return Ok(s);
            }
            seen.insert(pod);
        }
        bail!("100 connections to {to} never landed on {want}; they landed on {seen:?}")
    }

    /// Sends a line of about `n` bytes and reads it back whole; returns the pod that answered.
    fn echo(&mut self, n: usize) -> Result<String> {
        use std::io::{BufRead as _, Write as _};
        self.seq += 1;
        let line = format!("{}{}", "x".repeat(n), self.seq);
        self.writer.write_all(format!("{line}\n").as_bytes()).with_context(|| format!("sending {n} bytes"))?;
        let mut answer = String::new();
        self.reader.read_line(&mut answer).with_context(|| format!("reading the echo of {n} bytes"))?;
        let (pod, echoed) = answer
            .trim_end()
            .split_once(':')
            .with_context(|| format!("an answer `<pod>:<line>`, got {} bytes", answer.len()))?;
        ensure!(echoed == line, "the echo of {} bytes came back whole, got {} bytes", line.len(), echoed.len());
        Ok(pod.to_owned())
    }

    /// Closes the client's side: its FIN goes out.
    fn close(&self) -> Result<()> {
        self.writer.shutdown(std::net::Shutdown::Write).context("shutting the client's side down")
    }

    /// Whether the pod's close (EOF) comes within `within`; a RST is an error.
    fn eof_within(&mut self, within: Duration) -> Result<bool> {
        use std::io::Read as _;
        self.reader.get_ref().set_read_timeout(Some(within))?;
        let mut buf = [0u8; 64];
        match self.reader.read(&mut buf) {
            Ok(0) => Ok(true),
            Ok(n) => bail!("{n} unexpected bytes instead of the pod's close"),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Ok(false),
            Err(e) => Err(e).context("waiting for the pod's close"),
        }
    }
}

/// Packets node A's conntrack found INVALID so far (`conntrack -S`, summed
/// over the CPUs): a TCP segment outside the window its entry tracks is one.
fn conntrack_invalid(bed: &Bed) -> Result<u64> {
    let stats = bed.cluster.node_a().exec("conntrack", &["-S"])?;
    Ok(stats.split_whitespace().filter_map(|f| f.strip_prefix("invalid=")).map(|n| n.parse::<u64>().unwrap_or(0)).sum())
}

fn pin_of<'a>(status: &'a Value, client: SocketAddr) -> Option<&'a Value> {
    status["steering"]["pins"].as_array()?.iter().find(|p| p["client"] == client.to_string())
}

/// The long drain up to its deadline: a stream through the ClusterIP lands on
/// a1, a1 terminates (deadline [`LONG_DRAIN_DEADLINE`]) and the agent pins the
/// stream, kube-proxy removes a1 from the rules, and the stream echoes
/// [`BULK`] bytes each way, steered past netfilter: kube-proxy's conntrack
/// entry, still ESTABLISHED, sees none of them. Then a1's deadline passes.
fn long_drain_past_deadline(bed: &Bed, agent_args: &[&str]) -> Result<(Agent, Cli, BulkStream, SocketAddr)> {
    let agent = Agent::start(bed.cluster.node_a(), agent_args)?;
    let cli = agent.cli();
    let [v4, v6] = bed.cluster.pod("a1").ips();
    cli.ok(&["pod", "add", "a1", "--ip", &v4.to_string(), "--ip", &v6.to_string()])?;
    let to = bed.frontend(Front::ClusterIp, false, Protocol::Tcp);
    let mut stream = BulkStream::landing_on(bed.client(), to, "a1")?;
    let client = stream.local;
    cli.ok(&["pod", "terminate", "a1", "--deadline", LONG_DRAIN_DEADLINE, "--quiet-period", "1"])?;
    ensure!(pin_of(&cli.status()?, client).is_some(), "the stream {client} -> {to} is pinned: {:#}", cli.status()?);
    bed.sync(&["a2", "b1"])?;

    let steered = steered_packets(&cli)?;
    ensure!(stream.echo(BULK)? == "a1", "the bulk transfer is answered by a1");
    ensure!(steered_packets(&cli)? > steered, "the bulk transfer was steered");
    let pod = cli.pod("a1")?;
    ensure!(
        pod.state == "draining",
        "the bulk transfer was over before a1's deadline ({LONG_DRAIN_DEADLINE} s; this machine is too slow?): {pod:?}"
    );
    let ct = bed.show_conntrack("after the bulk transfer, while pinned")?;
    let entry = entry_of(&ct, client, to).with_context(|| format!("the stream's conntrack entry:\n{ct}"))?;
    ensure!(entry.contains("ESTABLISHED"), "kube-proxy's entry of the stream stays ESTABLISHED: {entry}");

    wait_until("a1's deadline to pass", TIMEOUT, || cli.pod("a1"), |p| p.state == "deadline")?;
    Ok((agent, cli, stream, to))
}

/// Without the fix (a pin released while its flow lives, as the agent did at
/// the backend's deadline; here by `--pin-limit` set to almost nothing, its
/// fallback for a pod never seen gone): the stream sent more than a window
/// past kube-proxy's conntrack entry while pinned, so once the pin is gone
/// the entry's TCP window is stale. The client's FIN is out of that window:
/// conntrack finds it INVALID and it never reaches a1 (kube-proxy's iptables
/// mode drops INVALID forwarded packets; here no route even takes the
/// untranslated ClusterIP packet). The client hangs in its close.
#[test]
fn a_pin_released_at_the_deadline_leaves_a_long_drain_hanging_in_its_close() -> Result<()> {
    let bed = Bed::new(Backend::Iptables)?;
    let (_agent, cli, mut stream, to) = long_drain_past_deadline(&bed, &["--pin-limit", "0.1"])?;
    let client = stream.local;
    wait_until("the pin to be released at the deadline", TIMEOUT, || cli.status(), |s| pin_of(s, client).is_none())?;

    let invalid = conntrack_invalid(&bed)?;
    stream.close()?;
    wait_until(
        "node A's conntrack to find the client's FIN invalid",
        TIMEOUT,
        || conntrack_invalid(&bed),
        |n| *n > invalid,
    )
    .context("the stale window makes the stream's next segment INVALID")?;
    ensure!(!stream.eof_within(Duration::from_secs(3))?, "a1 never saw the FIN, so it never closes its side");
    let ct = bed.show_conntrack("after the client's close")?;
    let entry = entry_of(&ct, client, to).with_context(|| format!("the stream's conntrack entry:\n{ct}"))?;
    ensure!(entry.contains("ESTABLISHED"), "conntrack never took the FIN: the entry stays ESTABLISHED: {entry}");
    eprintln!(
        "the client's close hangs; its FIN is INVALID to node A's conntrack ({} so far)",
        conntrack_invalid(&bed)?
    );
    Ok(())
}

/// The twin, with the agent as it is: a1's deadline passes, a1 is still
/// there, and the stream stays pinned. It sends more, closes, and a1's close
/// comes back; then the pin goes and the agent deletes the stale entry.
#[test]
fn with_agent_a_long_drain_stays_pinned_past_the_deadline_and_closes_cleanly() -> Result<()> {
    let bed = Bed::new(Backend::Iptables)?;
    let (_agent, cli, mut stream, to) = long_drain_past_deadline(&bed, &[])?;
    let client = stream.local;
    // A sweep runs every second: let a few run after the deadline.
    std::thread::sleep(Duration::from_secs(3));
    ensure!(stream.echo(BULK)? == "a1", "the stream goes on past the deadline");
    ensure!(
        pin_of(&cli.status()?, client).is_some(),
        "the live stream stays pinned past a1's deadline: {:#}",
        cli.status()?
    );

    stream.close()?;
    ensure!(stream.eof_within(TIMEOUT)?, "the client's close reaches a1, and a1's close comes back");
    wait_until("the closed stream's pin to be released", TIMEOUT, || cli.status(), |s| pin_of(s, client).is_none())?;
    entry_gone(&bed, "the closed stream", client, to)?;
    Ok(())
}

/// Kubernetes mode, a long drain on another node: the flow to b1 stays
/// pinned past b1's deadline (`--remote-pin-limit 1`: EndpointSlices carry
/// no kill time) while b1's endpoint is still there, terminating. Then b1's
/// address is listed again, not terminating: a terminating pod never turns
/// back, so that is a new pod with the address, and b1 is gone: the pin
/// turns dead and the client gets a RST. (The agent before released the pin
/// at that deadline: with the conntrack entry flushed, the stream then broke
/// at once on another pod's RST.)
#[test]
fn with_agent_kubernetes_mode_a_remote_pin_outlives_its_deadline_until_the_endpoint_is_gone() -> Result<()> {
    let bed = Bed::new(Backend::Iptables)?;
    let (k8s, _agent, cli) = kubernetes_agent(&bed, &["--remote-pin-limit", "1"])?;
    let api = &k8s.api;
    api.create_endpoint_slice(web_slice(&bed, false)?);
    let to = bed.frontend(Front::ClusterIp, false, Protocol::Tcp);
    let conv = Conversation::landing_on(bed.client(), to, None, "b1")?;
    conv.expect_steady(5)?;
    let client = conv.local_addr();

    api.update_endpoint_slice("default", "web-v4", |s| *s = web_slice(&bed, true).expect("slice"));
    wait_until("the agent to pin the flow to b1", TIMEOUT, || cli.status(), |s| pin_of(s, client).is_some())?;
    bed.sync(&["a1", "a2"])?;
    bed.node_a().flush_conntrack()?;
    // Well past b1's deadline (1 s), a sweep each second meanwhile.
    conv.expect_steady(30).context("the stream keeps b1 past its deadline while its endpoint is there")?;
    ensure!(pin_of(&cli.status()?, client).is_some(), "still pinned past the deadline: {:#}", cli.status()?);

    // b1 is gone (its node's side stops answering), and its address is
    // listed again, not terminating.
    let host_if = bed.cluster.pod("b1").host_if().to_owned();
    bed.cluster.node_b().ip(&["link", "set", &host_if, "down"])?;
    api.update_endpoint_slice("default", "web-v4", |s| *s = web_slice(&bed, false).expect("slice"));
    wait_until(
        "the pin to turn dead",
        TIMEOUT,
        || cli.status(),
        |s| pin_of(s, client).is_some_and(|p| p["dead"] == true),
    )?;
    match conv.wait_break(BREAK_WITHIN) {
        Some(Reply::Failed(how)) => ensure!(how.contains("reset"), "the client gets a RST, not a timeout: {how}"),
        other => bail!("the stream must fail fast with a RST, got {other:?}"),
    }
    Ok(())
}
