//! Tables.

use std::{collections::BTreeMap, fmt::Write as _};

use conndrain_tests::quantile;

use crate::{
    Config, FIRST_VERSION, MONITOR_INTERVAL, NODE_PORT_INTERVAL, NODE_PORT_LOAD, SAME_NODE_INTERVAL, SAME_NODE_LOAD,
    loads::{Counted, Kind, Load},
    run::Outcome,
};

impl Outcome {
    pub fn print(&self, cfg: &Config) {
        println!("timeline (s since the loads started):");
        for (t, e) in &self.timeline {
            println!("  {t:6.2}  {e}");
        }
        println!();
        println!(
            "  {:<48} {:>7} {:>6} {:>8} {:>6} {:>8} {:>6} {:>6} {:>6}",
            "load", "sent", "failed", "refused", "reset", "timeout", "wrong", "closed", "moved"
        );
        for l in &self.loads {
            let t = l.tally.lock().expect("tally");
            let k = |k: Kind| t.failed.get(&k).copied().unwrap_or(0);
            let failed: u64 = t.failed.values().sum();
            println!(
                "  {:<48} {:>7} {:>6} {:>8} {:>6} {:>8} {:>6} {:>6} {:>6}{}",
                l.name,
                t.sent,
                failed,
                k(Kind::Refused),
                k(Kind::Reset),
                k(Kind::Timeout),
                k(Kind::WrongVersion),
                k(Kind::ClosedByServer),
                k(Kind::Moved),
                if k(Kind::Other) > 0 {
                    format!("  (+{} other)", k(Kind::Other))
                } else {
                    String::new()
                }
            );
        }
        println!("  (for streams and UDP sessions: sent = opened, failed = broken)");
        println!("  {}", self.monitor_line());
        for l in &self.loads {
            let t = l.tally.lock().expect("tally");
            for s in &t.samples {
                println!(
                    "    e.g. {}: {s}",
                    l.name.split(" (").next().unwrap_or(l.name)
                );
            }
        }
        for r in &self.releases {
            println!(
                "  {} deleted at {:.2}s: preStop {:.2}s ({}), released {:.2}s after deletion{}",
                r.pod,
                r.deleted_at,
                r.prestop_secs,
                r.prestop_note,
                r.release_secs,
                if r.killed {
                    " (SIGKILL at the grace period)"
                } else {
                    ""
                }
            );
        }
        let _ = cfg;
    }

    fn requests(&self) -> (u64, BTreeMap<Kind, u64>) {
        let mut sent = 0;
        let mut failed = BTreeMap::new();
        for l in self.loads.iter().filter(|l| l.counted == Counted::Requests) {
            let t = l.tally.lock().expect("tally");
            sent += t.sent;
            for (k, v) in &t.failed {
                *failed.entry(*k).or_insert(0) += v;
            }
        }
        (sent, failed)
    }

    /// Seed 000's monitor: (requests sent, failed).
    fn monitor_counts(&self) -> (u64, u64) {
        self.counts(|l| l.counted == Counted::Monitor)
    }

    fn monitor_line(&self) -> String {
        let m = &self.monitor;
        let (sent, failed) = self.monitor_counts();
        let mut line = format!(
            "seed 000 monitor: {sent} requests, {failed} without a good answer in {} gap(s); longest time \
             without a good answer {:.1}s",
            m.gaps, m.longest_gap,
        );
        for (version, &at) in (FIRST_VERSION + 1..).zip(&self.updated_at) {
            let after = |t: Option<f64>| t.map_or_else(|| "never".to_owned(), |t| format!("{:.1}s", t - at));
            let _ = write!(
                line,
                "; update to v{version}: v{version} first answered {} after it, v{} last answered {} after it",
                after(m.answered.get(&version).map(|a| a.0)),
                version - 1,
                after(m.answered.get(&(version - 1)).map(|a| a.1)),
            );
        }
        line
    }

    /// Streams or sessions of the loads named `name_start...`: (opened, broken).
    fn sessions(&self, name_start: &str) -> (u64, u64) {
        self.counts(|l| l.name.starts_with(name_start))
    }

    /// (sent, failed) over the loads that `pick` picks.
    fn counts(&self, pick: impl Fn(&Load) -> bool) -> (u64, u64) {
        self.loads
            .iter()
            .filter(|l| pick(l))
            .map(|l| {
                let t = l.tally.lock().expect("tally");
                (t.sent, t.failed.values().sum::<u64>())
            })
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }
}

pub fn summary(cfg: &Config, results: &[Outcome]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| strategy | requests sent | failed | refused | reset | timeout | wrong version | streams broken | UDP sessions broken | NodePort (masqueraded) failed | same-node pod failed | seed 000 monitor failed | monitor's longest gap | release p50 | release max |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in results {
        let (sent, failed) = r.requests();
        let k = |k: Kind| failed.get(&k).copied().unwrap_or(0);
        let total: u64 = failed.values().sum();
        let (so, sb) = r.sessions("TCP streams");
        let (uo, ub) = r.sessions("UDP sessions");
        let (ms, mf) = r.monitor_counts();
        let (ns, nf) = r.counts(|l| l.name == NODE_PORT_LOAD);
        let (ss, sf) = r.counts(|l| l.name == SAME_NODE_LOAD);
        let mut rel: Vec<f64> = r.releases.iter().map(|x| x.release_secs).collect();
        let (p50, max) = if rel.is_empty() {
            (f64::NAN, f64::NAN)
        } else {
            (quantile(&mut rel, 0.5), quantile(&mut rel, 1.0))
        };
        let _ = writeln!(
            out,
            "| {} | {sent} | {total} | {} | {} | {} | {} | {sb}/{so} | {ub}/{uo} | {nf}/{ns} | {sf}/{ss} | {mf}/{ms} | {:.1}s | {:.1}s | {:.1}s |",
            r.strategy.label(cfg),
            k(Kind::Refused),
            k(Kind::Reset),
            k(Kind::Timeout),
            k(Kind::WrongVersion),
            r.monitor.longest_gap,
            p50,
            max,
        );
    }
    let _ = writeln!(
        out,
        "\nRelease: from `kubectl delete pod` to the pod's app ending (preStop + graceful shutdown), \
         over {} pod(s) per strategy ({} rolling update(s) of {} pod(s), v{FIRST_VERSION} to v{}). Failed requests are HTTP requests (keep-alive, Connection: close, /slow) \
         from the client through the cluster IP; \
         a stream or UDP session is broken if it could not be opened, failed, or was answered by another pod. \
         The NodePort client (one Connection: close request every {} ms to node A's NodePort, masqueraded to a node A \
         address whichever node the pod is on) and the same-node client (a pod on node A, not an endpoint, calling the \
         cluster IP with a pooled keep-alive connection and with Connection: close, a request every {} ms each) \
         are counted apart: failed/sent HTTP requests. \
         Seed 000's monitor is counted apart: a pooled keep-alive client, like the seed's Go `http.Client`, \
         numbering its requests 1, 2, 3, ... every {} ms; a request fails unless its answer echoes its number, \
         comes from a pod not yet released and carries a version the Deployment has had. \
         Its longest gap is the longest time it went without a good answer (one interval plus a round trip \
         when nothing fails).",
        cfg.replacements * cfg.rollouts,
        cfg.rollouts,
        cfg.replacements,
        cfg.last_version(),
        NODE_PORT_INTERVAL.as_millis(),
        SAME_NODE_INTERVAL.as_millis(),
        MONITOR_INTERVAL.as_millis()
    );
    out
}
