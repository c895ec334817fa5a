//! The CLI's output habits on a real agent: `-o json|yaml|wide` on the
//! commands that print objects (`pods`, `flows`, `why`, `status`), `pods
//! --watch`, and the agent's `--log-format json`.
//!
//! Needs root and `target/debug/conndrain` built with its eBPF object (or
//! `CONNDRAIN_BIN`).

use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use conndrain_tests::{Agent, Cli, TIMEOUT, TcpConn, TcpServer, Topology, require_root, sleep, wait_until};
use serde_json::Value;

const PORT: u16 = 8080;

/// One pod `web` with a server, registered with a fresh agent started with `agent_args`.
fn one_pod(agent_args: &[&str]) -> Result<(Topology, Agent, Cli, TcpServer)> {
    require_root()?;
    let topo = Topology::builder().pod("web").build()?;
    let agent = Agent::start(topo.node(), agent_args)?;
    let cli = agent.cli();
    let web = topo.pod("web");
    cli.add_pod(web)?;
    let server = TcpServer::start(web.ns(), web.addr_v4(PORT))?;
    Ok((topo, agent, cli, server))
}

/// `conndrain ARGS -o yaml`, read back.
fn yaml(cli: &Cli, args: &[&str]) -> Result<Value> {
    let args = [args, &["-o", "yaml"]].concat();
    let out = cli.ok(&args)?;
    serde_saphyr::from_str(&out).with_context(|| format!("`conndrain {}` printed no YAML: {out}", args.join(" ")))
}

/// The keys of an object, or of each object of an array, recursively: what
/// JSON and YAML must agree on when the values are clocks that move.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(shape).collect()),
        Value::Null => Value::Null,
        _ => Value::Bool(true),
    }
}

/// `conndrain ARGS -o json`, and whether `-o yaml` gives an object of the
/// same shape (`part` of it: the whole with `""`). The two are read one after
/// the other, and between them a field may appear or a list change as the
/// drain moves on (a socket, a quiet period starting): a pair that differs is
/// read again, a few times, before the formats are said to differ.
fn same_shape(cli: &Cli, args: &[&str], part: &str) -> Result<Value> {
    let pick = |v: Value| if part.is_empty() { v } else { v[part].clone() };
    let mut last = None;
    for _ in 0..5 {
        let json = cli.json(&[args, &["-o", "json"]].concat())?;
        let yaml = yaml(cli, args)?;
        if shape(&pick(json.clone())) == shape(&pick(yaml.clone())) {
            return Ok(json);
        }
        last = Some((json, yaml));
    }
    let (json, yaml) = last.unwrap_or_default();
    bail!("`conndrain {}`: JSON and YAML differ in their fields:\n{json:#}\n{yaml:#}", args.join(" "))
}

#[test]
fn json_and_yaml_give_the_same_objects_and_wide_more_columns() -> Result<()> {
    let (topo, _agent, cli, server) = one_pod(&[])?;
    // A serving pod has no clocks: its JSON and YAML are the same values.
    let pods = cli.json(&["pods", "-o", "json"])?;
    ensure!(pods[0]["name"] == "web" && pods[0]["state"] == "serving", "{pods:#}");
    ensure!(yaml(&cli, &["pods"])? == pods, "pods: YAML is the JSON's objects");

    let conn = TcpConn::connect(topo.client(), server.addr())?;
    cli.wait_pod("web", "1 active flow", |p| p.active_flows == 1)?;
    cli.terminate("web", 1.0, 300.0)?;
    let flows = same_shape(&cli, &["flows", "--pod", "web"], "")?;
    ensure!(flows.as_array().map(Vec::len) == Some(1) && flows[0]["active"] == true, "{flows:#}");

    let why = same_shape(&cli, &["why", "web"], "")?;
    ensure!(why["pod"]["name"] == "web" && why["pod"]["state"] == "draining", "{why:#}");
    let holding = why["holding"].as_array().context("holding is a list")?;
    ensure!(holding.len() == 1 && holding[0]["peer_addr"] == flows[0]["peer_addr"], "the flow holds it: {why:#}");

    let status = same_shape(&cli, &["status"], "maps")?;
    ensure!(status["interfaces"][0]["name"] == topo.pod("web").node_if(), "{status:#}");

    let header = |args: &[&str]| -> Result<String> { Ok(cli.ok(args)?.lines().next().unwrap_or_default().into()) };
    let (pods_wide, flows_wide) = (header(&["pods", "-o", "wide"])?, header(&["flows", "-o", "wide"])?);
    ensure!(pods_wide.contains("SOCKETS") && pods_wide.contains("INTERFACES"), "{pods_wide}");
    ensure!(!header(&["pods"])?.contains("SOCKETS"), "the default table is the narrow one");
    ensure!(flows_wide.contains("BYTES IN") && flows_wide.contains("BYTES OUT"), "{flows_wide}");
    let wrong = cli.run(&["why", "web", "-o", "wide"])?;
    ensure!(wrong.code == 2 && wrong.stderr.contains("possible values: text, json, yaml"), "{wrong:?}");
    conn.close()?;
    Ok(())
}

/// `pods --watch` prints once, again on a change (a connection), not while
/// nothing changes, and exits 0 on Ctrl-C.
#[test]
fn pods_watch_prints_again_on_a_change_until_ctrl_c() -> Result<()> {
    let (topo, _agent, cli, server) = one_pod(&[])?;
    let mut watch = cli.spawn(&["pods", "--watch"])?;
    let tables = |w: &conndrain_tests::Running| w.stdout_so_far().matches("NAME ").count();
    wait_until("the first table", TIMEOUT, || Ok(tables(&watch)), |n| *n == 1)?;
    sleep(Duration::from_secs(1))?;
    ensure!(tables(&watch) == 1, "nothing changed, nothing printed: {}", watch.stdout_so_far());
    let conn = TcpConn::connect(topo.client(), server.addr())?;
    // The last table's ACTIVE column for web.
    let active = |w: &conndrain_tests::Running| -> Option<String> {
        let out = w.stdout_so_far();
        let last = out.rsplit("NAME ").next()?;
        let row = last.lines().find(|l| l.starts_with("web "))?;
        row.split_whitespace().nth(2).map(str::to_owned)
    };
    wait_until("a table with the connection", TIMEOUT, || Ok(active(&watch)), |a| a.as_deref() == Some("1"))?;
    ensure!(tables(&watch) >= 2, "printed again: {}", watch.stdout_so_far());
    watch.interrupt()?;
    let out = watch.wait_exit(TIMEOUT)?;
    ensure!(out.code == 0 && out.stderr.is_empty(), "Ctrl-C ends the watch quietly: {out:?}");
    conn.close()?;
    Ok(())
}

/// `--log-format json`: every line the agent logs is a JSON object with a
/// timestamp, a level, a message and its fields at the top level.
#[test]
fn agent_logs_json_lines() -> Result<()> {
    let (_topo, agent, cli, _server) = one_pod(&["--log-format", "json"])?;
    cli.ok(&["pod", "remove", "web"])?;
    let log = agent.log();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON line: {l}")))
        .collect::<Result<_>>()?;
    let started = lines.iter().find(|l| l["message"] == "agent started").context("an `agent started` line")?;
    for key in ["timestamp", "level", "target", "kernel", "mode"] {
        ensure!(!started[key].is_null(), "{key} in {started}");
    }
    ensure!(started["level"] == "INFO" && started["mode"] == "standalone", "{started}");
    Ok(())
}
