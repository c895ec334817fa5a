//! The benchmark as a regression gate (`cargo xtask bench --check`, issue 16):
//! the `TEST_RUN` table of `BENCHMARKS.md` read back, and a fresh run compared
//! with it. Pure functions, so that `cargo test` checks them on real table
//! text; the measuring is in `tests/examples/bench/gate.rs`.
//!
//! Each row is compared as a ratio, never in ns: the path's ns/packet ÷ the
//! ns of the empty classifier measured in the same run and the same way (the
//! same family; for the single-run "¹" rows, the single-run empty
//! classifier). Both are in the row itself: ns/packet, and ns/packet − "above
//! empty". Rows are matched by program and path text (footnote marks aside):
//! a path whose meaning changes must change its text, and then it is reported
//! on each side as a row the other side lacks, not compared.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail, ensure};

/// The title of the `TEST_RUN` section, as `tests/examples/bench/testrun.rs` writes it.
pub const TESTRUN_TITLE: &str = "Datapath cost per packet (BPF_PROG_TEST_RUN)";

/// A path that got more than this much slower (as a ratio against the empty
/// classifier) is a regression.
pub const THRESHOLD: f64 = 0.25;

/// One row of the `TEST_RUN` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The program, without backticks: `conndrain_ingress`.
    pub program: String,
    /// The path without its footnote marks.
    pub path: String,
    /// A "¹" row: single runs, against the empty classifier run singly.
    pub single: bool,
    /// ns per packet.
    pub ns: f64,
    /// ns per packet of the empty classifier it is measured against.
    pub floor: f64,
}

impl Row {
    /// How the gate names the row: program, path, and "¹" for single runs.
    #[must_use]
    pub fn label(&self) -> String {
        format!("`{}` {}{}", self.program, self.path, if self.single { " ¹" } else { "" })
    }

    /// ns/packet ÷ the empty classifier's.
    #[must_use]
    pub fn ratio(&self) -> f64 {
        self.ns / self.floor
    }

    fn key(&self) -> (String, String, bool) {
        (self.program.clone(), self.path.clone(), self.single)
    }
}

/// The rows of the `TEST_RUN` table in `doc` (a whole `BENCHMARKS.md`, or the
/// section alone as the benchmark prints it), without the empty
/// classifier's own rows (they are the floor of the others).
pub fn parse(doc: &str) -> Result<Vec<Row>> {
    let title = format!("## {TESTRUN_TITLE}");
    let mut lines = doc.lines().skip_while(|l| l.trim() != title);
    ensure!(lines.next().is_some(), "no section \"{title}\"");
    let table: Vec<&str> = lines
        .take_while(|l| !l.starts_with("## "))
        .skip_while(|l| !l.trim_start().starts_with('|'))
        .take_while(|l| l.trim_start().starts_with('|'))
        .collect();
    ensure!(!table.is_empty(), "no table under \"{title}\"");
    let header = cells(table[0]);
    let column = |name: &str| {
        header.iter().position(|h| h.starts_with(name)).with_context(|| {
            format!("the table under \"{title}\" has no column \"{name}\" (its header: {})", table[0].trim())
        })
    };
    let (program, path, ns, above) =
        (column("program")?, column("path")?, column("ns/packet")?, column("above empty")?);
    let mut rows: Vec<Row> = Vec::new();
    for line in &table[1..] {
        let c = cells(line);
        if c.iter().all(|c| !c.is_empty() && c.chars().all(|ch| matches!(ch, '-' | ':'))) {
            continue; // the alignment line
        }
        ensure!(
            c.len() == header.len(),
            "this row has {} cells, the header {}: {}",
            c.len(),
            header.len(),
            line.trim()
        );
        let number = |i: usize| {
            c[i].parse::<f64>().ok().filter(|x| x.is_finite()).with_context(|| {
                format!("\"{}\" is not a number in the column \"{}\" of this row: {}", c[i], header[i], line.trim())
            })
        };
        if c[above] == "–" {
            continue; // the empty classifier: the floor of the other rows
        }
        let (row_ns, row_above) = (number(ns)?, number(above)?);
        let row = Row {
            program: c[program].trim_matches('`').to_owned(),
            path: c[path].replace(['¹', '²'], "").trim().to_owned(),
            single: c[path].contains('¹'),
            ns: row_ns,
            floor: row_ns - row_above,
        };
        ensure!(row.floor > 0.0, "ns/packet minus \"above empty\" is not positive in this row: {}", line.trim());
        if rows.iter().any(|r| r.key() == row.key()) {
            bail!("two rows for {}: the gate cannot tell them apart", row.label());
        }
        rows.push(row);
    }
    ensure!(!rows.is_empty(), "the table under \"{title}\" has no rows");
    Ok(rows)
}

fn cells(line: &str) -> Vec<String> {
    let line = line.trim();
    let line = line.strip_prefix('|').unwrap_or(line);
    let line = line.strip_suffix('|').unwrap_or(line);
    line.split('|').map(|c| c.trim().to_owned()).collect()
}

/// For each row, the better (lower ratio) of two measurements; rows in only
/// one of them are kept.
#[must_use]
pub fn best(a: &[Row], b: &[Row]) -> Vec<Row> {
    let mut out: Vec<Row> = a.to_vec();
    for row in b {
        match out.iter_mut().find(|r| r.key() == row.key()) {
            Some(r) if row.ratio() < r.ratio() => *r = row.clone(),
            Some(_) => {}
            None => out.push(row.clone()),
        }
    }
    out
}

/// A row in both tables.
#[derive(Debug, Clone, PartialEq)]
pub struct Compared {
    pub committed: Row,
    pub measured: Row,
}

impl Compared {
    #[must_use]
    pub fn label(&self) -> String {
        self.committed.label()
    }

    /// The measured ratio ÷ the committed one − 1: +0.30 is 30 % slower.
    #[must_use]
    pub fn change(&self) -> f64 {
        self.measured.ratio() / self.committed.ratio() - 1.0
    }

    #[must_use]
    pub fn regressed(&self) -> bool {
        self.change() > THRESHOLD
    }
}

/// The committed rows against the measured ones.
#[derive(Debug, Default)]
pub struct Comparison {
    /// In the committed order.
    pub rows: Vec<Compared>,
    /// Rows only in the committed table (a path removed or renamed).
    pub only_committed: Vec<String>,
    /// Rows only in the measured one (a new path).
    pub only_measured: Vec<String>,
}

impl Comparison {
    #[must_use]
    pub fn regressed(&self) -> Vec<&Compared> {
        self.rows.iter().filter(|r| r.regressed()).collect()
    }
}

#[must_use]
pub fn compare(committed: &[Row], measured: &[Row]) -> Comparison {
    let now: BTreeMap<_, &Row> = measured.iter().map(|r| (r.key(), r)).collect();
    let mut out = Comparison::default();
    for c in committed {
        match now.get(&c.key()) {
            Some(m) => out.rows.push(Compared { committed: c.clone(), measured: (*m).clone() }),
            None => out.only_committed.push(c.label()),
        }
    }
    out.only_measured =
        measured.iter().filter(|m| !committed.iter().any(|c| c.key() == m.key())).map(Row::label).collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The section as `BENCHMARKS.md` had it at f24ba9a (measured at 8264ea9).
    const COMMITTED: &str = "\
## Datapath cost per packet (BPF_PROG_TEST_RUN)

Each program and path is run with `BPF_PROG_TEST_RUN`, `repeat` = 100,000 per call, 11 calls per path interleaved.

Command: `cargo xtask bench -- --sections testrun`.

| program | path | ns/packet | above empty (ns) | × unrelated |
| --- | ---: | ---: | ---: | ---: |
| `empty classifier` | any packet (the floor) | 28 | – | – |
| `conndrain_ingress` | unrelated traffic (no pod IP) | 201 | 173 | 1.00× |
| `conndrain_egress` | unrelated traffic (no pod IP) | 148 | 120 | 1.00× |
| `conndrain_ingress` | tracked TCP flow, data packet from the pod | 289 | 261 | 1.44× |
| `conndrain_ingress` | client -> Service, pinned: rewritten + bpf_redirect_neigh | 496 | 468 | 2.47× |
| `empty classifier` | any packet (the floor) (IPv6) | 31 | – | – |
| `conndrain_ingress` | unrelated traffic (no pod IP) (IPv6) | 215 | 184 | 1.00× |
| `conndrain_egress` | new inbound TCP flow: SYN to the pod (insert + event) ¹ | 771 | 671 | 2.66× |
| `conndrain_egress` | new inbound TCP flow, agent idle: the event wakes it ¹ ² | 8423 | 8323 | 29.04× |

¹ Paths that create a flow cannot be repeated on one packet.

## Flow table: kernel memory per flow, insert rate

| sizes | memlock |
| --- | ---: |
| 100,000 | 12 MiB |
";

    /// The first row on `path` (`conndrain_ingress`'s where both programs have one).
    fn row<'a>(rows: &'a [Row], path: &str) -> &'a Row {
        rows.iter().find(|r| r.path == path).unwrap_or_else(|| panic!("no row {path}"))
    }

    #[test]
    fn parses_the_committed_table() {
        let rows = parse(COMMITTED).unwrap();
        assert_eq!(rows.len(), 7, "the empty classifier's rows are floors, not rows");
        let r = rows.iter().find(|r| r.program == "conndrain_egress" && !r.single).unwrap();
        assert_eq!((r.ns, r.floor), (148.0, 28.0));
        let v6 = row(&rows, "unrelated traffic (no pod IP) (IPv6)");
        assert_eq!(v6.floor, 31.0, "an IPv6 row is against the IPv6 floor");
        let idle = row(&rows, "new inbound TCP flow, agent idle: the event wakes it");
        assert!(idle.single, "{idle:?}");
        assert_eq!(idle.floor, 100.0, "a ¹ row is against the single-run floor");
        assert_eq!(idle.label(), "`conndrain_egress` new inbound TCP flow, agent idle: the event wakes it ¹");
    }

    #[test]
    fn the_committed_benchmarks_file_parses() {
        let doc = include_str!("../../BENCHMARKS.md");
        let rows = parse(doc).unwrap();
        assert!(rows.iter().any(|r| r.program == "conndrain_ingress"), "{rows:?}");
        assert!(rows.iter().all(|r| r.ratio() > 1.0), "{rows:?}");
    }

    #[test]
    fn unreadable_tables_say_what_is_wrong() {
        let err = |doc: &str| format!("{:#}", parse(doc).unwrap_err());
        assert!(err("# Benchmarks\n").contains("no section"));
        let no_table = format!("## {TESTRUN_TITLE}\n\nprose\n\n## Flow table\n\n| a | b |\n");
        assert!(err(&no_table).contains("no table"), "{}", err(&no_table));
        let renamed = COMMITTED.replace("above empty (ns)", "over the floor");
        assert!(err(&renamed).contains("no column \"above empty\""), "{}", err(&renamed));
        let garbled = COMMITTED.replace("| 148 | 120 |", "| 148 | n/a |");
        assert!(err(&garbled).contains("\"n/a\" is not a number"), "{}", err(&garbled));
        let short = COMMITTED.replace("| 148 | 120 | 1.00× |", "| 148 | 120 |");
        assert!(err(&short).contains("4 cells, the header 5"), "{}", err(&short));
    }

    /// The committed table with the ns/packet of `conndrain_ingress` on `path` changed.
    fn with_ns(path: &str, ns: u32) -> Vec<Row> {
        let mut rows = parse(COMMITTED).unwrap();
        let r = rows.iter_mut().find(|r| r.program == "conndrain_ingress" && r.path == path).unwrap();
        r.ns = f64::from(ns);
        rows
    }

    #[test]
    fn a_path_more_than_25_percent_slower_regresses() {
        let committed = parse(COMMITTED).unwrap();
        assert!(compare(&committed, &committed).regressed().is_empty());
        // 201 / 28 = 7.18; 7.18 × 1.25 × 28 = 251.25.
        let slower = with_ns("unrelated traffic (no pod IP)", 252);
        let cmp = compare(&committed, &slower);
        let names: Vec<String> = cmp.regressed().iter().map(|r| r.label()).collect();
        assert_eq!(names, ["`conndrain_ingress` unrelated traffic (no pod IP)"]);
        assert!((cmp.regressed()[0].change() - (252.0 / 201.0 - 1.0)).abs() < 1e-9);
        assert!(compare(&committed, &with_ns("unrelated traffic (no pod IP)", 251)).regressed().is_empty());
    }

    #[test]
    fn the_ratio_is_against_the_floor_of_the_same_run() {
        let committed = parse(COMMITTED).unwrap();
        // Everything 40 % slower, the floor too (a slower machine): no regression.
        let slower_machine: Vec<Row> =
            committed.iter().map(|r| Row { ns: r.ns * 1.4, floor: r.floor * 1.4, ..r.clone() }).collect();
        assert!(compare(&committed, &slower_machine).regressed().is_empty());
    }

    #[test]
    fn renamed_paths_are_reported_not_failed() {
        let committed = parse(COMMITTED).unwrap();
        let renamed = COMMITTED.replace("agent idle: the event wakes it ¹ ²", "agent idle: notification batched ¹");
        let cmp = compare(&committed, &parse(&renamed).unwrap());
        assert!(cmp.regressed().is_empty());
        assert_eq!(cmp.only_committed, ["`conndrain_egress` new inbound TCP flow, agent idle: the event wakes it ¹"]);
        assert_eq!(cmp.only_measured, ["`conndrain_egress` new inbound TCP flow, agent idle: notification batched ¹"]);
        // Dropping the "²" alone keeps the row the same path.
        let unmarked = COMMITTED.replace("wakes it ¹ ²", "wakes it ¹");
        let cmp = compare(&committed, &parse(&unmarked).unwrap());
        assert!(cmp.only_committed.is_empty() && cmp.only_measured.is_empty(), "{cmp:?}");
        // A row that turned from single runs to repeated runs has another floor: not compared.
        let repeated = COMMITTED.replace("(insert + event) ¹", "(insert + event)");
        assert_eq!(compare(&committed, &parse(&repeated).unwrap()).only_committed.len(), 1);
    }

    #[test]
    fn best_keeps_the_lower_ratio_per_row() {
        let first = with_ns("tracked TCP flow, data packet from the pod", 400);
        let second = with_ns("unrelated traffic (no pod IP) (IPv6)", 300);
        let kept = best(&first, &second);
        assert_eq!(row(&kept, "tracked TCP flow, data packet from the pod").ns, 289.0);
        assert_eq!(row(&kept, "unrelated traffic (no pod IP) (IPv6)").ns, 215.0);
        let committed = parse(COMMITTED).unwrap();
        assert!(compare(&committed, &kept).regressed().is_empty());
    }
}
