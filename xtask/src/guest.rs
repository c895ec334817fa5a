//! The guest stage: the kernel tests again on Debian's Linux 6.1 (no tcx, so
//! the clsact path; IPVS), booted under qemu by virtme-ng over this machine's
//! own root filesystem.
//!
//! 1. The test binaries are built on the host (`cargo test --no-run
//!    --message-format=json` names their files).
//! 2. A script in `target/guest/` (a `--rwdir` of the guest, so the host sees
//!    what it writes) loads the modules, mounts what the tests need, and runs
//!    each binary with its name filters, writing libtest's output to
//!    `target/guest/tests.log`.
//! 3. The guest boots once (`vng --disable-kvm`: with KVM, qemu fails on this
//!    machine kind, see `shared/TOOLCHAIN.md`), runs the script and powers off.
//!    The host prints `tests.log` as it grows and adds up the `test result:`
//!    lines like the host stage does.
//!
//! Missing pieces (kernel image, `vng`) fail the stage: it never skips itself.
//! Only `CONNDRAIN_SKIP_GUEST=1` skips it, and says so.

use std::{
    fmt::Write as _,
    fs,
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, test::Totals};

/// The Debian package of the guest kernel.
pub const KERNEL_PACKAGE: &str = "linux-image-6.1.0-47-amd64-unsigned";
/// Its release (`uname -r` in the guest) and image.
const KERNEL_RELEASE: &str = "6.1.0-47-amd64";

/// Guest memory. The tests run up to two agents and a dozen namespaces at once.
const MEMORY: &str = "3G";
const CPUS: &str = "2";
/// The whole guest run, boot included, is killed after this (and the stage
/// fails): the plan takes well under it, and a hung test must not hold CI.
const GUEST_TIMEOUT: Duration = Duration::from_secs(25 * 60);

/// The modules the tests use; the guest kernel has them as modules, and the
/// guest's root filesystem is the host's, whose `/lib/modules` has them since
/// the kernel package is installed.
const MODULES: &[&str] = &[
    "veth",
    "dummy",
    "sch_ingress",
    "cls_bpf",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_nat",
    "nf_tables",
    "nft_nat",
    "nft_ct",
    "nft_numgen",
    "nft_reject_inet",
    "nft_chain_nat",
    "iptable_nat",
    "iptable_filter",
    "ip6table_nat",
    "ip6table_filter",
    "xt_conntrack",
    "xt_comment",
    "xt_mark",
    "xt_MASQUERADE",
    "xt_statistic",
    "xt_addrtype",
    "xt_set",
    "ip_set",
    "ip_vs",
    "ip_vs_rr",
    // /dev/net/tun: the L3 link the steering tests stand in for ipip and WireGuard.
    "tun",
];

/// Which tests run in the guest: a test binary (a `[[test]]` target of
/// `conndrain-tests`) and libtest name filters (any of them; none = all).
/// These are the tests whose outcome depends on the kernel, cut to what fits:
/// the stage must stay under about 20 minutes with the boot, and under TCG
/// a test takes several times as long as on the host.
///
/// - `environment`: the kernel probes and the clsact path: attach, tracking,
///   steering, and the adoption of clsact filters across a restart (the
///   start-up checks' wording does not depend on the kernel: host only).
/// - `datapath`: the programs pass 6.1's verifier and a few packet paths
///   (TCP both families, FIN, RST, UDP, mid-stream pickup, IPv4 options),
///   the steering table (rewrites, checksums, TTL, resets, the L3 rows), and
///   the L3 programs' tracking of packets without an Ethernet header.
///   The hostile corpus (thousands of `BPF_PROG_TEST_RUN` calls, far too
///   slow under TCG) runs on the host only: it tests the same object's
///   parsing, which does not depend on the kernel once the verifier took it.
/// - `e2e` and `drained`: tracking and drain through real sockets (and the
///   `sock:inet_sock_set_state` tracepoint) on a bridge and a ptp network.
/// - `steering`: the agent's fixes in iptables and nftables mode (their
///   breaks without it run on the host), NodePort over an L3 link (a TUN
///   device standing in for ipip/WireGuard: the `_l3` programs push an
///   Ethernet header before `bpf_redirect_neigh`), a pin that follows a
///   source-routing rule, and all of the IPVS mode, breaks and fixes (only
///   here: the host kernel has no IPVS).
/// - `prestop`: the preStop intercept's cgroup programs pass 6.1's verifier,
///   and the kubelet's `httpGet` gets its pod's drain (docs/prestop.md).
///
/// `cargo xtask test-guest -- FILTER` replaces these filters with FILTER.
pub const PLAN: &[(&str, &[&str])] = &[
    (
        "environment",
        &[
            "auto_attach_follows_the_probed_tcx_support",
            "clsact_",
            "programs_have_no_core_relocations_so_kernel_btf_is_optional",
            "switching_attach_mode_across_restarts_leaves_one_copy",
        ],
    ),
    (
        "datapath",
        &[
            "tcp_inbound_handshake_and_data",
            "tcp_fin_both_ways_closes",
            "tcp_rst_closes_established",
            "udp_first_packet_opens_inbound_flow_and_reply_counts",
            "midstream_pickup_guesses_direction_from_ports",
            "ipv4_with_options_is_tracked",
            "steer::steering_table",
            "l3::l3_programs_track_bare_ipv4_like_the_ethernet_ones",
        ],
    ),
    (
        "e2e",
        &[
            "tcp_flows_are_counted_and_released_ipv4",
            "terminating_pod_drains_after_last_close",
            "udp_session_holds_pod_until_idle",
        ],
    ),
    (
        "drained",
        &["connections_from_a_pod_on_the_same_bridge_hold_the_pod", "ptp_pods_drain_after_their_last_connection"],
    ),
    (
        "steering",
        &[
            "iptables::with_agent_clusterip_tcp_v4_holds_when_conntrack_entries_go",
            "iptables::with_agent_clusterip_udp_v4_session_stays_after_kube_proxy_cleanup",
            "nftables::with_agent_nodeport_remote_tcp_holds_on_conntrack_flush",
            "nftables::with_agent_clusterip_udp_v6_session_stays_after_kube_proxy_cleanup",
            "iptables::with_agent_clusterip_udp_v4_fragmented_session_stays_after_kube_proxy_cleanup",
            "iptables::with_agent_nodeport_remote_tcp_over_l3_link_holds_on_conntrack_flush",
            "policy_routing::with_agent_a_pinned_flow_follows_a_source_rule",
            "ipvs::",
        ],
    ),
    ("prestop", &["kubelet_http_get_to_a_pod_ip_returns_when_that_pod_drains"]),
];

pub fn kernel_image() -> PathBuf {
    PathBuf::from(format!("/boot/vmlinuz-{KERNEL_RELEASE}"))
}

/// Runs the guest stage: `test_binaries` are the binaries of [`PLAN`] (from
/// [`build`]), `conndrain` the agent they test; `extra` goes to every test
/// binary (after the filters).
pub fn run(
    root: &Path,
    conndrain: &Path,
    test_binaries: &[(String, PathBuf)],
    extra: &[String],
) -> (Totals, Result<()>) {
    let mut totals = Totals::default();
    let result = run_counting(root, conndrain, test_binaries, extra, &mut totals);
    (totals, result)
}

fn run_counting(
    root: &Path,
    conndrain: &Path,
    test_binaries: &[(String, PathBuf)],
    extra: &[String],
    totals_out: &mut Totals,
) -> Result<()> {
    let vng = crate::setup::vng(root);
    let image = kernel_image();
    if !image.is_file() {
        bail!(
            "no guest kernel at {}: `cargo xtask setup` installs it (Debian package {KERNEL_PACKAGE})",
            image.display()
        );
    }
    if !vng.is_file() {
        bail!("no virtme-ng at {}: `cargo xtask setup` installs it", vng.display());
    }
    if !conndrain.is_file() {
        bail!("no conndrain binary at {}", conndrain.display());
    }

    let out = root.join("target").join("guest");
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let script = script(root, &out, conndrain, test_binaries, extra)?;
    let script_path = out.join("run.sh");
    fs::write(&script_path, script).with_context(|| format!("writing {}", script_path.display()))?;

    let mut vng_cmd = cmd::command(&vng);
    // vng runs virtme-run and friends from PATH: the virtualenv's bin first.
    let venv_bin = vng.parent().expect("vng is in a bin directory").to_path_buf();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(venv_bin).chain(std::env::split_paths(&path)))
        .context("the virtualenv's path contains a ':'")?;
    vng_cmd
        .env("PATH", path)
        .args(["--disable-kvm", "--memory", MEMORY, "--cpus", CPUS, "--rwdir"])
        .arg(&out)
        .arg("-r")
        .arg(&image)
        .arg("--")
        .arg(format!("sh {}", script_path.display()));
    let shown = cmd::show(&vng_cmd);
    eprintln!("$ {shown}");
    let vng_log = out.join("vng.log");
    let vng_out = fs::File::create(&vng_log).with_context(|| format!("creating {}", vng_log.display()))?;
    let start = Instant::now();
    let mut child = vng_cmd
        .stdin(Stdio::null())
        .stdout(vng_out.try_clone()?)
        .stderr(vng_out)
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;

    // Print the tests' output as the guest writes it, and add it up.
    let log = out.join("tests.log");
    let mut follow = Follow::default();
    let status = loop {
        follow.poll(&log)?;
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() > GUEST_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    follow.poll(&log)?;
    follow.finish();
    let elapsed = start.elapsed();

    // Exit codes the script recorded, one `NAME CODE` line per binary.
    let exits = fs::read_to_string(out.join("exit-codes")).unwrap_or_default();
    let mut failed_binaries: Vec<String> = exits.lines().filter(|l| !l.ends_with(" 0")).map(str::to_owned).collect();
    let ran = exits.lines().count();
    let totals = follow.totals;
    *totals_out = totals;
    let verdict_ok = status.is_some_and(|s| s.success()) && failed_binaries.is_empty() && ran == test_binaries.len();
    println!(
        "guest: {}: {} passed, {} failed, {} ignored in {} test binaries on Linux {KERNEL_RELEASE} ({:.0} s with the boot)",
        if verdict_ok { "ok" } else { "FAILED" },
        totals.passed,
        totals.failed,
        totals.ignored,
        totals.binaries,
        elapsed.as_secs_f64()
    );
    if status.is_none() {
        bail!("the guest did not finish within {GUEST_TIMEOUT:?}; its console is in {}", vng_log.display());
    }
    if ran != test_binaries.len() {
        failed_binaries.push(format!("{ran} of {} test binaries ran", test_binaries.len()));
    }
    if !verdict_ok {
        let console = fs::read_to_string(&vng_log).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(30).collect();
        eprintln!("--- the guest's console (last lines, all in {}) ---", vng_log.display());
        for l in tail.into_iter().rev() {
            eprintln!("{l}");
        }
        bail!(
            "the guest stage failed ({}; vng {}): see above and {}",
            if failed_binaries.is_empty() { "no test failed".to_owned() } else { failed_binaries.join(", ") },
            status.map_or_else(|| "timed out".to_owned(), |s| s.to_string()),
            out.display()
        );
    }
    Ok(())
}

/// The script the guest runs.
fn script(
    root: &Path,
    out: &Path,
    conndrain: &Path,
    binaries: &[(String, PathBuf)],
    extra: &[String],
) -> Result<String> {
    let q = |p: &Path| quote(&p.to_string_lossy());
    let log = q(&out.join("tests.log"));
    let exits = q(&out.join("exit-codes"));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Written by `cargo xtask test-guest`; run inside the guest by vng.\n\
         exec >{} 2>&1\n\
         set -x\n\
         uname -a\n\
         for m in {}; do modprobe $m || echo \"guest: cannot load module $m\"; done\n\
         mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf\n\
         mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing\n\
         mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug\n\
         mkdir -p /run/netns /var/run/netns\n\
         ulimit -l unlimited\n\
         ulimit -n 65536\n\
         export CONNDRAIN_BIN={} CONNDRAIN_GUEST=1 CONNDRAIN_REQUIRE_IPVS=1 CONNDRAIN_TIME_SCALE=5 RUST_BACKTRACE=1\n\
         export TMPDIR=/tmp\n\
         cd {}\n\
         set +x",
        q(&out.join("console.log")),
        MODULES.join(" "),
        q(conndrain),
        q(&root.join("tests"))
    );
    for (name, path) in binaries {
        // Name filters given on the command line replace the plan's.
        let mut args: Vec<String> = if has_filter(extra) {
            Vec::new()
        } else {
            PLAN.iter().find(|(n, _)| n == name).map(|(_, f)| *f).unwrap_or_default().iter().map(|f| quote(f)).collect()
        };
        args.extend(extra.iter().map(|a| quote(a)));
        if !extra.iter().any(|a| a.starts_with("--test-threads")) {
            args.push("--test-threads=2".into());
        }
        let _ = writeln!(
            s,
            "echo \"guest: running {name}\" >>{log}\n\
             t0=$(date +%s)\n\
             {} {} >>{log} 2>&1\n\
             code=$?\n\
             echo \"guest: {name} took $(( $(date +%s) - t0 )) s\" >>{log}\n\
             echo \"{name} $code\" >>{exits}",
            q(path),
            args.join(" ")
        );
    }
    Ok(s)
}

/// Prints a file as it grows and adds up its `test result:` lines.
#[derive(Default)]
struct Follow {
    offset: u64,
    partial: Vec<u8>,
    totals: Totals,
}

impl Follow {
    fn poll(&mut self, path: &Path) -> Result<()> {
        let Ok(mut f) = fs::File::open(path) else {
            return Ok(());
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        let mut stdout = std::io::stdout();
        stdout.write_all(&buf)?;
        stdout.flush()?;
        for &b in &buf {
            if b == b'\n' {
                self.totals.add(&String::from_utf8_lossy(&self.partial));
                self.partial.clear();
            } else {
                self.partial.push(b);
            }
        }
        Ok(())
    }

    fn finish(&mut self) {
        self.totals.add(&String::from_utf8_lossy(&self.partial));
        self.partial.clear();
    }
}

/// Builds the test binaries of [`PLAN`] and returns their paths.
pub fn build(cargo_test: &mut Command) -> Result<Vec<(String, PathBuf)>> {
    cargo_test.args(["--no-run", "--message-format=json-render-diagnostics", "--package", "conndrain-tests"]);
    for (name, _) in PLAN {
        cargo_test.args(["--test", name]);
    }
    let shown = cmd::show(cargo_test);
    eprintln!("$ {shown}");
    let out = cargo_test.stderr(Stdio::inherit()).output().with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!("`{shown}` failed with {}", out.status);
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or_default().to_owned();
        let kinds = msg["target"]["kind"].as_array().cloned().unwrap_or_default();
        if kinds.iter().any(|k| k == "test") && PLAN.iter().any(|(n, _)| *n == name) {
            found.push((name, PathBuf::from(exe)));
        }
    }
    for (name, _) in PLAN {
        if !found.iter().any(|(n, _)| n == name) {
            bail!("`{shown}` built no test binary named {name}");
        }
    }
    // In the order of the plan.
    found.sort_by_key(|(n, _)| PLAN.iter().position(|(p, _)| p == n));
    Ok(found)
}

/// Whether libtest arguments name a test filter (a word that is not an
/// option nor the value of `--skip`).
fn has_filter(args: &[String]) -> bool {
    let mut after_skip = false;
    for a in args {
        if a == "--skip" {
            after_skip = true;
            continue;
        }
        if !after_skip && !a.starts_with('-') {
            return true;
        }
        after_skip = false;
    }
    false
}

/// Single-quotes `word` for sh.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}
