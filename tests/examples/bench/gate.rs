//! `--check` (`cargo xtask bench --check`): the `TEST_RUN` section measured
//! again and compared, row by row, with the table committed in
//! `BENCHMARKS.md` (`conndrain_tests::benchgate` reads and compares them).
//! Fails when a path got more than 25 % slower against the empty classifier
//! of its own run; a row over the threshold is measured again, up to
//! `REMEASURE` more times, and its best ratio kept, before it counts.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use conndrain_tests::benchgate::{self, Row, THRESHOLD};

use crate::{
    report::{Table, count},
    testrun,
};

/// More runs of the whole section while a row is over the threshold.
const REMEASURE: usize = 2;

pub fn check(sizes: &testrun::Sizes, committed_file: &Path) -> Result<()> {
    let what_to_do = "run a full `cargo xtask bench` to regenerate it";
    let doc = std::fs::read_to_string(committed_file)
        .with_context(|| format!("reading {} ({what_to_do})", committed_file.display()))?;
    let committed = benchgate::parse(&doc).with_context(|| {
        format!("{}: the gate cannot read its TEST_RUN table ({what_to_do})", committed_file.display())
    })?;
    let measure = || -> Result<Vec<Row>> {
        let (section, _) = testrun::run(sizes)?;
        benchgate::parse(&section.markdown()).context("reading back the table just measured")
    };
    let mut measured = measure()?;
    let mut runs = 1;
    loop {
        let over = benchgate::compare(&committed, &measured).regressed().len();
        if over == 0 || runs > REMEASURE {
            break;
        }
        runs += 1;
        eprintln!(
            "bench: --check: {over} row(s) more than {:.0} % slower; measuring the section again ({runs} of {}), the best ratio of each row is kept",
            THRESHOLD * 100.0,
            REMEASURE + 1
        );
        measured = benchgate::best(&measured, &measure()?);
    }

    let cmp = benchgate::compare(&committed, &measured);
    let mut table = Table::new(&[
        "row",
        "committed ns (floor)",
        "measured ns (floor)",
        "committed ratio",
        "measured ratio",
        "change",
        "verdict",
    ]);
    let ns = |r: &Row| format!("{:.0} ({:.0})", r.ns, r.floor);
    for r in &cmp.rows {
        let verdict = if r.regressed() {
            "**regressed**"
        } else if r.change() < -THRESHOLD {
            "faster"
        } else {
            "ok"
        };
        table.row(vec![
            r.label(),
            ns(&r.committed),
            ns(&r.measured),
            format!("{:.2}×", r.committed.ratio()),
            format!("{:.2}×", r.measured.ratio()),
            format!("{:+.1} %", r.change() * 100.0),
            verdict.into(),
        ]);
    }
    println!(
        "Regression gate: TEST_RUN ratios (ns/packet ÷ the empty classifier of the same run and family; \
         ¹ rows against the single-run empty classifier) measured now vs committed in {}; \
         a row fails when it is more than {:.0} % slower. {} (repeat = {}, {} rounds, {} single runs).\n",
        committed_file.display(),
        THRESHOLD * 100.0,
        if runs == 1 {
            "Measured once".to_owned()
        } else {
            format!("Measured {runs} times (rows over the threshold re-measured), best ratio per row")
        },
        count(u64::from(sizes.repeat)),
        sizes.rounds,
        count(sizes.singles as u64),
    );
    print!("{}", table.markdown());
    for label in &cmp.only_committed {
        println!("\nOnly in {} (a path removed or renamed; not compared): {label}", committed_file.display());
    }
    for label in &cmp.only_measured {
        println!("\nNew path, not in {} (not compared): {label}", committed_file.display());
    }
    let regressed = cmp.regressed();
    if regressed.is_empty() {
        println!("\nbench --check: passed: no path more than {:.0} % slower.", THRESHOLD * 100.0);
        return Ok(());
    }
    let names: Vec<String> =
        regressed.iter().map(|r| format!("{} ({:+.0} %)", r.label(), r.change() * 100.0)).collect();
    bail!(
        "{} path(s) more than {:.0} % slower than in {} after {runs} measurement(s): {}",
        regressed.len(),
        THRESHOLD * 100.0,
        committed_file.display(),
        names.join("; ")
    )
}
