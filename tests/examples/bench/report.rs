//! What the benchmark writes: sections of Markdown (a title, the command that
//! produced it, one table, notes), the machine it ran on, and small statistics
//! helpers.

use std::{fmt::Write as _, process::Command, time::Duration};

pub use conndrain_tests::quantile;

/// One measurement: printed as it finishes, and a section of `BENCHMARKS.md`.
pub struct Section {
    pub title: String,
    /// What was measured and how, before the table.
    pub intro: String,
    /// The `--sections` name that reruns just this part.
    pub name: &'static str,
    pub table: Table,
    /// Targets met or missed, and caveats, after the table.
    pub notes: Vec<String>,
}

impl Section {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## {}\n", self.title);
        if !self.intro.is_empty() {
            let _ = writeln!(s, "{}\n", self.intro.trim());
        }
        let _ = writeln!(
            s,
            "Command: `cargo xtask bench -- --sections {}`\n",
            self.name
        );
        s.push_str(&self.table.markdown());
        for note in &self.notes {
            let _ = writeln!(s, "\n{}", note.trim());
        }
        s.push('\n');
        s
    }
}

pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(ToString::to_string).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        assert_eq!(cells.len(), self.header.len(), "row width");
        self.rows.push(cells);
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        s.push_str(&line(&self.header));
        let align: Vec<String> = self
            .header
            .iter()
            .enumerate()
            .map(|(i, _)| if i == 0 { "---".into() } else { "---:".into() })
            .collect();
        s.push_str(&line(&align));
        for r in &self.rows {
            s.push_str(&line(r));
        }
        s
    }
}

/// The machine, for the header of `BENCHMARKS.md`.
pub struct Machine {
    pub cpus: usize,
    pub model: String,
    pub kernel: String,
    pub date: String,
    pub commit: String,
    pub memory: String,
    pub load: String,
}

impl Machine {
    pub fn detect() -> Self {
        let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_owned(), |(_, m)| m.trim().to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned());
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .map_or_else(|| "unknown".into(), |kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0));
        let date = output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let mut commit = output(Command::new("git").args(["-C", root, "rev-parse", "--short", "HEAD"]));
        let dirty = output(Command::new("git").args(["-C", root, "status", "--porcelain", "--untracked-files=no"]));
        if !dirty.is_empty() && commit != "unknown" {
            commit.push_str(" + uncommitted changes");
        }
        Self {
            load: loadavg(),
            cpus,
            model,
            kernel,
            date,
            commit,
            memory,
        }
    }

    /// `end_load`: the load average when the run ended.
    pub fn markdown(&self, end_load: &str) -> String {
        format!(
            "| | |\n|---|---|\n| date | {} |\n| CPUs (`nproc`) | {} |\n| CPU model | {} |\n| memory | {} |\n| kernel | {} |\n| commit | {} |\n| load average (1, 5, 15 min) at start / end | {} / {} |\n",
            self.date, self.cpus, self.model, self.memory, self.kernel, self.commit, self.load, end_load
        )
    }
}

/// The first three fields of `/proc/loadavg`.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(", "),
    )
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

pub fn median<T: Copy + PartialOrd>(samples: &mut [T]) -> T {
    quantile(samples, 0.5)
}

pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

pub fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// `a / b` as `0.97×`.
pub fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        return "–".into();
    }
    format!("{:.2}×", a / b)
}

/// A count with thousands separators: 1,048,576.
pub fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
