//! Steering (`ebpf/conndrain-ebpf/src/steer.rs`) as a table, after Katran's
//! `KatranBaseTestFixtures.h` and Cilium's `bpf/tests`: each row is the pins
//! the agent wrote, an input frame, the verdict `conndrain_ingress` must
//! return, and the frame it must hand back.
//!
//! Every row also checks, whatever the expected frame says:
//! - the output's IPv4 header checksum and TCP/UDP checksum, recomputed here
//!   from scratch (the expected frames come from etherparse, a second,
//!   independent implementation);
//! - `skb->csum`: the rows run with `BPF_F_TEST_SKB_CHECKSUM_COMPLETE`
//!   (Linux 6.11, "bpf: add `CHECKSUM_COMPLETE` to bpf test progs"), under which
//!   the kernel hands the program a `CHECKSUM_COMPLETE` skb and fails the run
//!   with EBADMSG when the program left `skb->csum` out of step with the
//!   packet: what a NIC or veth that sums received packets would see. On older
//!   kernels the rows run without it, and say so;
//! - the `STEERED` and `STEER_FAILED` counters, and how many pins are left.
//!
//! Under `BPF_PROG_TEST_RUN`, `bpf_redirect_neigh` records the target and the
//! program returns `TC_ACT_REDIRECT`; nothing is sent, and the output is the
//! rewritten packet (MACs untouched: the neighbour lookup fills them later).
//!
//! The rows marked L3 run `conndrain_in_l3`, the program for devices without
//! an Ethernet header (ipip, `WireGuard`), on the same packets without their
//! Ethernet header; a steered one must come back with a zeroed Ethernet
//! header pushed in front (ethertype set), for `bpf_redirect_neigh`. They run
//! without `CHECKSUM_COMPLETE`: the test run sums from the skb's network
//! header, which it sets 14 bytes in whatever the program, so its `skb->csum`
//! would leave out the first 14 bytes of the IP header, unlike an L3 device's.

mod frames;
mod rows;
mod run;

use aya::maps::HashMap;
use conndrain_common::{Pin, WireKey, maps, programs, stats};

use crate::harness::Harness;

use rows::{Row, rows};
use run::{checksum_complete_supported, run_ingress, verify_checksums};

/// `TC_ACT_REDIRECT`: what `bpf_redirect_neigh` returns and the program passes on.
const TC_ACT_REDIRECT: u32 = 7;
/// linux/bpf.h, Linux 6.11.
const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;
const BPF_PROG_TEST_RUN: libc::c_long = 10;

const IFINDEX_TO_BACKEND: u32 = 5;
const IFINDEX_TO_CLIENT: u32 = 3;

#[test]
fn steering_table() {
    let mut failures = Vec::new();
    let mut rows = rows();
    assert!(rows.len() > 20);
    // `CONNDRAIN_STEER_ROWS=text`: only the rows whose name contains it (the
    // whole table takes minutes under the guest stage's TCG).
    if let Ok(only) = std::env::var("CONNDRAIN_STEER_ROWS") {
        rows.retain(|r| r.name.contains(&only));
    }
    for row in &rows {
        if let Err(e) = check_row(row) {
            failures.push(format!("{}: {e}", row.name));
        }
    }
    if !checksum_complete_supported() {
        eprintln!("note: this kernel has no BPF_F_TEST_SKB_CHECKSUM_COMPLETE (6.11+): skb->csum was not checked");
    }
    assert!(failures.is_empty(), "{} of {} rows failed:\n{}", failures.len(), rows.len(), failures.join("\n"));
}

fn check_row(row: &Row) -> Result<(), String> {
    let Row {
        name: _,
        pins,
        earlier,
        input,
        verdict,
        output,
        steered,
        steer_failed,
        resets_sent,
        pins_left,
        skb_csum,
        l3,
    } = row;
    let prog = if *l3 { programs::INGRESS_L3 } else { programs::INGRESS };
    let mut h = Harness::with_programs(&[prog]);
    {
        let mut map: HashMap<_, WireKey, Pin> = HashMap::try_from(h.ebpf_mut().map_mut(maps::PINS).unwrap()).unwrap();
        for (k, v) in pins {
            map.insert(k, v, 0).unwrap();
        }
    }
    for frame in earlier {
        run_ingress(&h, prog, frame, *skb_csum).map_err(|e| format!("an earlier frame: {e}"))?;
    }
    let (got_verdict, got) = run_ingress(&h, prog, input, *skb_csum)?;
    let want = output.as_deref().unwrap_or(input);
    if got_verdict != *verdict {
        return Err(format!("verdict {got_verdict:#x}, want {verdict:#x}"));
    }
    if got != want {
        return Err(format!("output frame\n  got: {got:02x?}\n want: {want:02x?}\n   in: {input:02x?}"));
    }
    if output.is_some() {
        verify_checksums(&got)?;
    }
    for (what, index, want) in [
        ("STEERED", stats::STEERED, *steered),
        ("STEER_FAILED", stats::STEER_FAILED, *steer_failed),
        ("RESETS_SENT", stats::RESETS_SENT, *resets_sent),
    ] {
        let n = h.stat(index);
        if n != want {
            return Err(format!("{what} = {n}, want {want}"));
        }
    }
    let map: HashMap<_, WireKey, Pin> = HashMap::try_from(h.ebpf().map(maps::PINS).unwrap()).unwrap();
    let left = map.keys().count();
    if left != *pins_left {
        return Err(format!("{left} pins left, want {pins_left}"));
    }
    Ok(())
}
