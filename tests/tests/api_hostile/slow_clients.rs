//! Slow clients and connection floods: clients that trickle a request or
//! never read the answer are dropped, connections beyond the limit are closed
//! at once, and a waiter that hangs up frees its slot.

use std::{
    io::{ErrorKind, Read, Write},
    os::unix::net::UnixStream,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use conndrain::api::{prestop::MAX_CONNECTIONS as NODE_MAX_CONNECTIONS, server::MAX_CONNECTIONS as LOCAL_MAX_CONNECTIONS};
use conndrain_tests::{TIMEOUT, wait_until};

use super::{
    DROP_WITHIN, METRICS_PORT, ReadTimeout, Reply, WAIT_PORT, ask, ask_local, connections, healthy, malformed::get,
    node_addr, pre_stop_drains, read_until_closed, setup, still_serving, tcp, unix,
};

/// A connection that sends a request head one byte at a time and never ends
/// it, on its own thread; returns once the server closes it, or fails after
/// [`DROP_WITHIN`].
fn trickle<S: Read + Write + ReadTimeout + Send + 'static>(mut s: S) -> thread::JoinHandle<Result<usize>> {
    thread::spawn(move || {
        // The read timeout paces the bytes: one per round.
        s.set_timeout(Duration::from_millis(100))?;
        let head = b"GET /v1/wait HTTP/1.1\r\nHost: node\r\nX-Slow: ";
        let start = Instant::now();
        let mut buf = [0u8; 1024];
        for sent in 0.. {
            let byte = head.get(sent).copied().unwrap_or(b'a');
            if s.write_all(&[byte]).is_err() {
                return Ok(sent);
            }
            match s.read(&mut buf) {
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                // An answer (there is none to a head never finished), an EOF or a reset: dropped.
                Ok(_) | Err(_) => return Ok(sent + 1),
            }
            if start.elapsed() >= DROP_WITHIN {
                bail!(
                    "a client sending its request head byte by byte was still connected after {DROP_WITHIN:?} ({sent} bytes)"
                );
            }
        }
        unreachable!("the loop only ends by returning")
    })
}

/// Each connection is closed by the server within [`DROP_WITHIN`] (all of
/// them together: they were opened at about the same time).
fn all_closed<S: Read + ReadTimeout>(what: &str, conns: Vec<S>) -> Result<()> {
    let start = Instant::now();
    for (i, mut s) in conns.into_iter().enumerate() {
        let left = DROP_WITHIN
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(100));
        read_until_closed(&mut s, left).with_context(|| format!("{what}: connection {i}"))?;
    }
    Ok(())
}

#[test]
fn slow_clients_of_the_node_api_are_dropped_and_block_no_one() -> Result<()> {
    let (topo, mut agent, cli) = setup(&["a", "b"], &[])?;
    let b = topo.pod("b");
    // Pod b holds many connections: request heads cut short, and nothing at all.
    let partial = connections(
        b.ns(),
        node_addr(WAIT_PORT),
        100,
        b"GET /v1/wait HTTP/1.1\r\nHost: node\r\n",
    )?;
    let silent = connections(b.ns(), node_addr(WAIT_PORT), 20, b"")?;
    // Callers that send a whole request and never read the answer.
    let deaf = connections(
        topo.client(),
        node_addr(WAIT_PORT),
        20,
        b"GET /v1/wait HTTP/1.1\r\nHost: node\r\n\r\n",
    )?;
    let trickler = trickle(tcp(b.ns(), node_addr(WAIT_PORT))?);
    let slow_metrics = connections(b.ns(), node_addr(METRICS_PORT), 20, b"GET /metrics HTTP/1.1\r\n")?;

    // Meanwhile, everyone else is served.
    healthy(&topo)?;
    cli.status().context("the local API answers during the flood")?;
    pre_stop_drains(&cli, topo.pod("a"))?;

    // And every slow connection is dropped in bounded time.
    all_closed("a request head cut short", partial)?;
    all_closed("a connection that sent nothing", silent)?;
    all_closed("a caller that never reads", deaf)?;
    all_closed("a request head cut short on the metrics port", slow_metrics)?;
    let sent = trickler.join().expect("the trickling thread does not panic")?;
    ensure!(sent > 0, "the trickling client sent something before it was dropped");
    ensure!(
        !agent.log().contains("preStop wait pod=b"),
        "no slow request got as far as a wait:\n{}",
        agent.log()
    );
    still_serving(&mut agent, &cli)
}

#[test]
fn slow_clients_of_the_local_api_are_dropped_and_block_no_one() -> Result<()> {
    let (_topo, mut agent, cli) = setup(&["web"], &[])?;
    let open = |n: usize, bytes: &[u8]| -> Result<Vec<UnixStream>> {
        (0..n)
            .map(|_| {
                let mut s = unix(&agent)?;
                s.write_all(bytes)?;
                Ok(s)
            })
            .collect()
    };
    let partial = open(40, b"GET /v1/status HTTP/1.1\r\nHost: c\r\n")?;
    let silent = open(20, b"")?;
    let deaf = open(20, b"GET /v1/status HTTP/1.1\r\nHost: c\r\n\r\n")?;
    // A body announced and sent only in part.
    let slow_body = open(
        1,
        b"POST /v1/pods HTTP/1.1\r\nHost: c\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{\"name\":",
    )?;
    let trickler = trickle(unix(&agent)?);

    let pods = cli.pods().context("the CLI is served during the flood")?;
    ensure!(pods.len() == 1, "{pods:?}");
    cli.status().context("the CLI is served during the flood")?;

    all_closed("a request head cut short", partial)?;
    all_closed("a connection that sent nothing", silent)?;
    all_closed("a caller that never reads", deaf)?;
    let mut slow_body = slow_body.into_iter().next().expect("one");
    let got = read_until_closed(&mut slow_body, DROP_WITHIN).context("a body sent in part")?;
    let got = String::from_utf8_lossy(&got);
    ensure!(
        got.is_empty() || got.starts_with("HTTP/1.1 4"),
        "a body sent in part is refused or dropped, not served: {got:?}"
    );
    trickler.join().expect("the trickling thread does not panic")?;

    let pods = cli.pods()?;
    ensure!(pods.len() == 1, "the partial POST added no pod: {pods:?}");
    still_serving(&mut agent, &cli)
}

#[test]
fn callers_that_never_read_their_answers_lose_their_slots() -> Result<()> {
    // Answers bigger than the socket buffers (here: thousands of pipelined
    // status requests, on every connection the local API allows) that the
    // caller never reads: the agent gives up writing after CLIENT_TIMEOUT.
    let (_topo, mut agent, cli) = setup(&["web"], &[])?;
    let request = b"GET /v1/status HTTP/1.1\r\nHost: c\r\n\r\n".repeat(8192);
    let deaf: Vec<UnixStream> = (0..LOCAL_MAX_CONNECTIONS)
        .map(|_| {
            let mut s = unix(&agent)?;
            // As much as the socket takes at once; the rest is never sent.
            s.set_nonblocking(true)?;
            let sent = s.write(&request).context("pipelining requests")?;
            s.set_nonblocking(false)?;
            ensure!(sent > 100 * 1024, "sent only {sent} bytes of requests");
            Ok(s)
        })
        .collect::<Result<_>>()?;
    let reply = ask_local(&agent, &get("/v1/status"))?;
    ensure!(reply == Reply::Closed, "every slot is taken: {reply:?}");

    wait_until("a slot freed by the agent", DROP_WITHIN, || ask_local(&agent, &get("/v1/status")), |r| {
        r.code() == Some(200)
    })
    .context("the agent stops writing to callers that do not read")?;
    all_closed("a caller that never reads its answers", deaf)?;
    still_serving(&mut agent, &cli)
}

/// How often `needle` occurs in `log`.
fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[test]
fn connections_beyond_the_limit_are_closed_at_once() -> Result<()> {
    let many = (2 * NODE_MAX_CONNECTIONS).to_string();
    // One pod fills the listener, so it may hold that many waits.
    let (topo, mut agent, cli) = setup(&["a"], &["--max-waiters", &many, "--max-waiters-per-pod", &many])?;
    let a = topo.pod("a");

    // Node API: a (not terminating) fills every connection with a wait, a
    // request that stays in flight (unlike a slow client's, which times out).
    let waits = connections(a.ns(), node_addr(WAIT_PORT), NODE_MAX_CONNECTIONS, &get("/v1/wait"))?;
    wait_until(
        "the agent to take every wait",
        TIMEOUT,
        || Ok(count(&agent.log(), "preStop wait pod=a")),
        |n| *n == NODE_MAX_CONNECTIONS,
    )?;
    let reply = ask(topo.client(), node_addr(WAIT_PORT), &get("/v1/wait"))?;
    ensure!(
        reply == Reply::Closed,
        "a connection beyond the limit is closed without an answer: {reply:?}"
    );
    ensure!(
        agent.log().contains("too many connections"),
        "the agent says why:\n{}",
        agent.log()
    );
    // The other listener has its own connections.
    healthy(&topo)?;

    // Local API: the same, with waits for a through the CLI's endpoint.
    let local: Vec<UnixStream> = (0..LOCAL_MAX_CONNECTIONS)
        .map(|_| {
            let mut s = unix(&agent)?;
            s.write_all(&get("/v1/pods/a/wait"))?;
            Ok(s)
        })
        .collect::<Result<_>>()?;
    // A status request gets in only while a slot is free, so poll until one is refused.
    let refused = wait_until(
        "a local connection beyond the limit",
        TIMEOUT,
        || ask_local(&agent, &get("/v1/status")),
        |r| *r == Reply::Closed,
    );
    refused.context("the local API closes connections beyond its limit")?;

    // Hanging up frees a slot: the CLI gets in again, and a drains, which
    // answers every node API wait, so those connections end too.
    drop(local);
    wait_until(
        "the local API to serve again",
        TIMEOUT,
        || cli.run(&["pod", "terminate", "a", "--quiet-period", "0.5", "--deadline", "60"]),
        |o| o.code == 0,
    )?;
    cli.wait_state("a", "drained")?;
    all_closed("a wait answered with a's drain", waits)?;
    wait_until(
        "the node API to serve again",
        TIMEOUT,
        || ask(topo.client(), node_addr(WAIT_PORT), &get("/v1/wait")),
        |r| r.code() == Some(403),
    )?;
    still_serving(&mut agent, &cli)
}

#[test]
fn a_waiter_that_hangs_up_frees_its_slot() -> Result<()> {
    // That waiters beyond --max-waiters get 429 is node_api::concurrent_waiters_are_bounded;
    // here: a hostile pod cannot keep the slots by opening waits and walking away.
    let (topo, agent, cli) = setup(&["a", "b"], &["--max-waiters", "1"])?;
    let (a, b) = (topo.pod("a"), topo.pod("b"));
    // a is drained, so its wait is answered as soon as it gets a slot.
    cli.terminate("a", 0.5, 60.0)?;
    cli.wait_state("a", "drained")?;
    let mut b_wait = tcp(b.ns(), node_addr(WAIT_PORT))?;
    b_wait.write_all(&get("/v1/wait"))?;
    wait_until(
        "the agent to take b's wait",
        TIMEOUT,
        || Ok(agent.log().contains("preStop wait pod=b")),
        |taken| *taken,
    )?;
    let ask_a = || ask(a.ns(), node_addr(WAIT_PORT), &get("/v1/wait"));
    let reply = ask_a()?;
    ensure!(reply.code() == Some(429), "b holds the only slot: {reply:?}");

    drop(b_wait);
    let reply = wait_until("a's wait to get the slot b hung up on", TIMEOUT, ask_a, |r| {
        r.code() != Some(429)
    })?;
    ensure!(
        matches!(&reply, Reply::Http(200, body) if body.contains(r#""pod":"a""#) && body.contains("drained")),
        "a's wait is answered with a's drain: {reply:?}"
    );
    ensure!(
        !agent.log().contains("preStop wait done pod=b"),
        "b's wait was dropped, not answered:\n{}",
        agent.log()
    );
    Ok(())
}
