//! What loading conndrain's tc programs costs the running kernel's verifier:
//! for each program, the instructions it processed (`verified_insns`, 5.16+)
//! and the wall time of the load.
//!
//! `cargo run --example verifier_cost [OBJECT...]` (as root): the embedded
//! object, or each object file given. The guest stage's time on Linux 6.1
//! under TCG is mostly this, so run it there (`vng ... -- target/debug/examples/verifier_cost`)
//! when a datapath change may have made the verifier's search wider.
use std::{borrow::Cow, time::Instant};

use anyhow::{Context, Result};
use aya::{Ebpf, programs::SchedClassifier};
use conndrain_common::programs;

fn main() -> Result<()> {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    let objects: Vec<(String, Cow<'static, [u8]>)> = if paths.is_empty() {
        vec![("embedded".into(), Cow::Borrowed(conndrain::EBPF_OBJECT))]
    } else {
        paths
            .into_iter()
            .map(|p| std::fs::read(&p).map(|b| (p.clone(), Cow::Owned(b))).with_context(|| format!("reading {p}")))
            .collect::<Result<_>>()?
    };
    for (name, object) in objects {
        let mut ebpf = Ebpf::load(&object).with_context(|| format!("loading {name}"))?;
        for prog in
            [programs::INGRESS, programs::INGRESS_TRACK, programs::EGRESS, programs::INGRESS_L3, programs::EGRESS_L3]
        {
            let p: &mut SchedClassifier =
                ebpf.program_mut(prog).with_context(|| format!("{name}: no {prog}"))?.try_into()?;
            let start = Instant::now();
            p.load().with_context(|| format!("{name}: loading {prog}"))?;
            let took = start.elapsed();
            let insns = p.info()?.verified_instruction_count().unwrap_or(0);
            println!("{name} {prog}: verified_insns {insns} in {:.1} s", took.as_secs_f64());
        }
    }
    Ok(())
}
