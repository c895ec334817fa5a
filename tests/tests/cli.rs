//! Bad input and bad situations: every one gets a non-zero exit and a clear
//! `conndrain: ...` line on stderr that names what was wrong, never a panic.
//!
//! Needs root (for the agent) and `target/debug/conndrain` (or `CONNDRAIN_BIN`).

use std::{os::unix::fs::PermissionsExt as _, process::Command, time::Duration};

use anyhow::{Context as _, Result, ensure};
use conndrain_tests::{
    Agent, Cli, Netns, Output, TIMEOUT, TempDir, Topology, conndrain_bin, require_root,
    run_with_timeout,
};

/// One pod `web` (not registered) and an agent.
fn agent() -> Result<(Topology, Agent, Cli)> {
    require_root()?;
    let topo = Topology::builder().pod("web").build()?;
    let agent = Agent::start(topo.node(), &[])?;
    let cli = agent.cli();
    Ok((topo, agent, cli))
}

/// A CLI error as the README has it: exit 1, one line, `conndrain: ...`.
fn expect_error(out: &Output, what: &str) -> Result<()> {
    ensure!(out.code == 1, "{what}: exit code 1, got {out:?}");
    no_panic(out, what)?;
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    ensure!(
        lines.len() == 1,
        "{what}: one line on stderr, got {:?}",
        out.stderr
    );
    ensure!(
        lines[0].starts_with("conndrain: "),
        "{what}: starts with `conndrain: `: {:?}",
        out.stderr
    );
    Ok(())
}

fn no_panic(out: &Output, what: &str) -> Result<()> {
    ensure!(
        !out.stderr.contains("panicked") && !out.stderr.contains("RUST_BACKTRACE"),
        "{what}: no panic, got {out:?}"
    );
    Ok(())
}

/// The error of a failed agent start: stderr minus the agent's log lines must
/// be exactly one `conndrain: ...` line (README: errors are one line).
fn error_line(out: &Output) -> Result<&str> {
    let rest: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !is_log_line(l))
        .collect();
    match rest[..] {
        [line] if line.starts_with("conndrain: ") => Ok(line),
        _ => anyhow::bail!(
            "one `conndrain: ...` error line besides log lines, got {:?}",
            out.stderr
        ),
    }
}

/// A `tracing` log line: `2026-01-01T00:00:00.000000Z  INFO target: message`.
fn is_log_line(line: &str) -> bool {
    line.starts_with(|c: char| c.is_ascii_digit())
        && line
            .split_whitespace()
            .nth(1)
            .is_some_and(|level| ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level))
}

#[test]
fn unknown_pod_is_named() -> Result<()> {
    let (_topo, _agent, cli) = agent()?;
    for args in [
        &["pod", "terminate", "ghost-7"][..],
        &["pod", "remove", "ghost-7"],
        &["why", "ghost-7"],
        &["wait", "ghost-7", "--timeout", "5"],
    ] {
        let what = format!("conndrain {}", args.join(" "));
        let out = cli.run(args)?;
        expect_error(&out, &what)?;
        ensure!(
            out.stderr.contains("ghost-7"),
            "{what}: names the pod: {:?}",
            out.stderr
        );
    }
    Ok(())
}

#[test]
fn invalid_ip_is_named() -> Result<()> {
    let (_topo, _agent, cli) = agent()?;
    let out = cli.run(&["pod", "add", "x", "--ip", "10.0.0.300"])?;
    ensure!(out.code != 0, "an invalid IP is refused: {out:?}");
    no_panic(&out, "pod add --ip 10.0.0.300")?;
    ensure!(
        out.stderr.contains("10.0.0.300"),
        "names the invalid value: {:?}",
        out.stderr
    );
    ensure!(
        !cli.pods()?.iter().any(|p| p.name == "x"),
        "nothing was registered"
    );
    Ok(())
}

#[test]
fn add_without_ip_is_refused() -> Result<()> {
    let (_topo, _agent, cli) = agent()?;
    let out = cli.run(&["pod", "add", "x"])?;
    ensure!(out.code != 0, "pod add needs --ip: {out:?}");
    no_panic(&out, "pod add x")?;
    ensure!(
        out.stderr.contains("--ip"),
        "says --ip is missing: {:?}",
        out.stderr
    );
    ensure!(
        !cli.pods()?.iter().any(|p| p.name == "x"),
        "nothing was registered"
    );
    Ok(())
}

#[test]
fn duplicate_add_already_exists() -> Result<()> {
    let (topo, _agent, cli) = agent()?;
    cli.add_pod(topo.pod("web"))?;
    let v4 = topo.pod("web").ipv4().to_string();
    let out = cli.run(&["pod", "add", "web", "--ip", &v4])?;
    expect_error(&out, "adding pod web twice")?;
    ensure!(out.stderr.contains("already exists"), "{:?}", out.stderr);
    ensure!(
        out.stderr.contains("web"),
        "names the pod: {:?}",
        out.stderr
    );
    ensure!(
        cli.pods()?.iter().filter(|p| p.name == "web").count() == 1,
        "still one pod web"
    );
    Ok(())
}

#[test]
fn terminate_twice_keeps_the_first_termination() -> Result<()> {
    let (topo, _agent, cli) = agent()?;
    cli.add_pod(topo.pod("web"))?;
    cli.terminate("web", 30.0, 60.0)?;
    let first = cli.pod("web")?;
    ensure!(first.state == "draining", "{first:?}");

    let out = cli.run(&[
        "pod",
        "terminate",
        "web",
        "--quiet-period",
        "30",
        "--deadline",
        "60",
    ])?;
    no_panic(&out, "terminating web twice")?;
    // Either accepted as a no-op or refused with a clear line naming the pod.
    if out.code != 0 {
        expect_error(&out, "terminating web twice")?;
        ensure!(
            out.stderr.contains("web"),
            "names the pod: {:?}",
            out.stderr
        );
    }
    let again = cli.pod("web")?;
    ensure!(again.state == "draining", "still draining: {again:?}");
    ensure!(
        again.terminating_for_secs.unwrap_or(0.0) >= first.terminating_for_secs.unwrap_or(f64::MAX),
        "the second terminate does not restart the termination: {first:?} then {again:?}"
    );
    Ok(())
}

#[test]
fn removed_pod_is_gone() -> Result<()> {
    let (topo, _agent, cli) = agent()?;
    cli.add_pod(topo.pod("web"))?;
    cli.ok(&["pod", "remove", "web"])?;
    ensure!(cli.pods()?.is_empty(), "no pods left");
    let status = cli.status()?;
    let interfaces = status["interfaces"]
        .as_array()
        .context("status has interfaces")?;
    ensure!(
        interfaces.is_empty(),
        "the last pod's interface is detached: {status:#}"
    );
    expect_error(&cli.run(&["why", "web"])?, "why of a removed pod")
}

#[test]
fn no_agent_behind_the_socket() -> Result<()> {
    let dir = TempDir::new()?;
    let socket = dir.path().join("nobody-home.sock");
    let shown = socket.display().to_string();
    let cli = Cli::new(&socket);
    for args in [
        &["pods"][..],
        &["status"],
        &["pod", "add", "x", "--ip", "10.200.1.2"],
    ] {
        let what = format!("conndrain {} without an agent", args.join(" "));
        let out = cli.run(args)?;
        expect_error(&out, &what)?;
        for needle in ["cannot reach the agent", shown.as_str(), "conndrain agent"] {
            ensure!(
                out.stderr.contains(needle),
                "{what}: mentions {needle:?}: {:?}",
                out.stderr
            );
        }
    }
    // The same through CONNDRAIN_SOCKET.
    let out = run(Command::new(conndrain_bin())
        .arg("pods")
        .env("CONNDRAIN_SOCKET", &socket))?;
    expect_error(&out, "CONNDRAIN_SOCKET without an agent")?;
    ensure!(
        out.stderr.contains(&shown),
        "names the socket from CONNDRAIN_SOCKET: {:?}",
        out.stderr
    );
    Ok(())
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().context("running conndrain")?;
    Ok(Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

#[test]
fn agent_socket_path_not_writable() -> Result<()> {
    require_root()?;
    let node = Netns::unique("node")?;
    let bad = "/proc/nope/x.sock";
    let mut cmd = node.command(&conndrain_bin().to_string_lossy());
    cmd.args(["--socket", bad, "agent", "--standalone"]);
    let out = run_with_timeout(cmd, TIMEOUT)?;
    ensure!(out.code != 0, "the agent fails: {out:?}");
    no_panic(&out, "agent with an unusable socket path")?;
    let line = error_line(&out)?;
    ensure!(line.contains(bad), "the error names {bad}: {line:?}");
    Ok(())
}

#[test]
fn agent_without_privileges() -> Result<()> {
    require_root()?;
    let node = Netns::unique("node")?;
    // A dir nobody can write, so the failure is about privileges, not the socket.
    let dir = TempDir::new()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    let bin = usable_by_anyone(&dir)?;
    let socket = dir.path().join("agent.sock");

    let mut cmd = node.command("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]);
    cmd.arg(&bin)
        .arg("--socket")
        .arg(&socket)
        .args(["agent", "--standalone"]);
    let out = run_with_timeout(cmd, TIMEOUT)?;
    ensure!(out.code != 0, "the agent fails without privileges: {out:?}");
    no_panic(&out, "agent without privileges")?;
    // One line per missing piece (issue: "one clear line each"), each prefixed.
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !is_log_line(l))
        .collect();
    ensure!(!lines.is_empty(), "an error line: {:?}", out.stderr);
    for line in &lines {
        ensure!(line.starts_with("conndrain: "), "every error line is prefixed: {line:?}");
        let lower = line.to_lowercase();
        ensure!(
            ["cap_bpf", "cap_net_admin", "cap_perfmon", "root", "not permitted", "permission"]
                .iter()
                .any(|w| lower.contains(w)),
            "each line names a missing privilege: {line:?}"
        );
    }
    // Each missing capability has its own line (tests/environment.rs drops
    // them one by one from root).
    ensure!(lines.len() == 3, "three lines: {lines:#?}");
    for cap in ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"] {
        ensure!(
            lines.iter().filter(|l| l.contains(cap)).count() == 1,
            "{cap} is named in one line: {lines:#?}"
        );
    }
    Ok(())
}

/// The conndrain binary, or a copy of it in `dir` if user nobody cannot run
/// it where it is (a workspace under a private home, say).
fn usable_by_anyone(dir: &TempDir) -> Result<std::path::PathBuf> {
    let bin = std::fs::canonicalize(conndrain_bin()).context("finding the conndrain binary")?;
    let mode = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.permissions().mode());
    if mode(&bin) & 0o005 == 0o005 && bin.ancestors().skip(1).all(|d| mode(d) & 0o001 != 0) {
        return Ok(bin);
    }
    let copy = dir.path().join("conndrain");
    std::fs::copy(&bin, &copy).context("copying the conndrain binary")?;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
    Ok(copy)
}

/// `wait --timeout` on a pod that cannot drain in time exits 3.
#[test]
fn wait_timeout_exits_3() -> Result<()> {
    let (topo, _agent, cli) = agent()?;
    cli.add_pod(topo.pod("web"))?;
    cli.terminate("web", 60.0, 120.0)?;
    let out = cli
        .spawn(&["wait", "web", "--timeout", "1"])?
        .wait_exit(TIMEOUT + Duration::from_secs(1))?;
    ensure!(
        out.code == 3,
        "`wait --timeout 1` on a pod with a 60 s quiet period exits 3: {out:?}"
    );
    no_panic(&out, "wait --timeout")
}

/// `pod add --quiet-period/--ignore-port` (standalone mode's per-pod
/// settings): bad values are refused with one line naming them; good ones
/// show in `pods -o json` and `why`, and `pod terminate --quiet-period`
/// overrides the pod's own.
#[test]
fn pod_settings_flags_are_checked_and_shown() -> Result<()> {
    let (topo, _agent, cli) = agent()?;
    let ip = topo.pod("web").ipv4().to_string();
    let out = cli.run(&["pod", "add", "web", "--ip", &ip, "--quiet-period", "0"])?;
    expect_error(&out, "pod add --quiet-period 0")?;
    ensure!(out.stderr.contains("quiet period 0"), "names the value: {:?}", out.stderr);
    let out = cli.run(&["pod", "add", "web", "--ip", &ip, "--ignore-port", "0"])?;
    expect_error(&out, "pod add --ignore-port 0")?;
    ensure!(out.stderr.contains("port 0"), "names the value: {:?}", out.stderr);
    ensure!(!cli.pods()?.iter().any(|p| p.name == "web"), "nothing was registered");

    cli.ok(&[
        "pod",
        "add",
        "web",
        "--ip",
        &ip,
        "--quiet-period",
        "5",
        "--ignore-port",
        "9090",
        "--ignore-port",
        "9100",
    ])?;
    let pods = cli.pods_json()?;
    let settings = &pods[0]["settings"];
    ensure!(settings["quiet_period_secs"] == 5.0, "{pods}");
    ensure!(settings["quiet_period_from"] == "pod add --quiet-period", "{pods}");
    ensure!(settings["ignore_ports"] == serde_json::json!([9090, 9100]), "{pods}");
    let why = cli.ok(&["why", "web"])?;
    ensure!(why.contains("quiet period 5.0s (pod add --quiet-period); ignored ports: 9090, 9100"), "why: {why}");
    cli.terminate("web", 2.0, 30.0)?;
    let p = cli.pod("web")?;
    ensure!(p.quiet_period_secs == Some(2.0), "the terminate request wins: {p:?}");
    let why = cli.ok(&["why", "web"])?;
    ensure!(why.contains("quiet period 2.0s (pod terminate --quiet-period)"), "why: {why}");
    Ok(())
}

/// `conndrain install DIR` (what the example's init container runs, instead of
/// a `cp` the image does not have): a working copy, mode 0755; a file for DIR
/// is one clear line.
#[test]
fn install_copies_a_working_binary_and_names_a_bad_directory() -> Result<()> {
    let dir = TempDir::new()?;
    let cli = Cli::new(&dir.path().join("no.sock"));
    let out = cli.run(&["install", &dir.path().display().to_string()])?;
    ensure!(out.code == 0, "install: {out:?}");
    let copy = dir.path().join("conndrain");
    let mode = std::fs::metadata(&copy).context("the copy")?.permissions().mode();
    ensure!(mode & 0o777 == 0o755, "mode {mode:o}");
    ensure!(out.stdout.contains(&copy.display().to_string()), "names the copy: {out:?}");
    let version = run(Command::new(&copy).arg("--version"))?;
    ensure!(version.code == 0 && version.stdout.starts_with("conndrain "), "the copy runs: {version:?}");
    let into_file = cli.run(&["install", &copy.display().to_string()])?;
    expect_error(&into_file, "install into a file")?;
    ensure!(into_file.stderr.contains("is not a directory"), "{into_file:?}");
    Ok(())
}
