//! Per-pod flow counts for listings (`conndrain pods`, the metrics scrape)
//! whatever the number of flows.
//!
//! Counting a pod's flows takes a kernel lookup per flow (a few µs each):
//! fine for one pod's view, its `why` or its drain, but a listing that
//! counted every pod afresh held the agent's lock for 4.6 s at 1M flows
//! (BENCHMARKS.md, "The agent at scale"), stalling drains meanwhile. So a
//! listing counts pods afresh only up to [`LISTING_LOOKUPS`] lookups in all;
//! a pod beyond that shows its latest full count with its age
//! (`counted_secs_ago`): the drain evaluator's for a terminating pod (made
//! at each of its passes), else the census's, which recounts such pods in
//! the background in steps of [`STEP`] lookups, releasing the lock between
//! steps. A pod never counted yet is counted at once whatever its size: a
//! listing never shows a made-up zero. Drain verdicts never use these counts.

use std::time::{Duration, Instant};

use crate::drain::{Counting, FlowCounts};

use super::{Node, now_ns};

/// Lookups a listing may spend counting pods afresh (about 20 ms).
pub const LISTING_LOOKUPS: usize = 4096;

/// Lookups per hold of the lock during a census.
const STEP: usize = 2048;

/// The census's shortest period.
const MIN_PERIOD: Duration = Duration::from_secs(5);

/// The wait after a round, as a multiple of the round's time: the census
/// uses at most a tenth of a core (at 1M flows, a round of about 4 s, then
/// 40 s of rest).
const REST_FACTOR: u32 = 10;

impl Node {
    /// Recounts the pods too large for a listing to count, until the node
    /// is dropped.
    pub async fn run_census(&self) {
        let mut period = MIN_PERIOD;
        loop {
            tokio::time::sleep(period).await;
            let took = self.census_round().await;
            period = MIN_PERIOD.max(took * REST_FACTOR);
        }
    }

    /// One full count of every serving pod with more flows than a listing
    /// counts; returns the time it took.
    pub(super) async fn census_round(&self) -> Duration {
        let start = Instant::now();
        let pods: Vec<(String, u32, Vec<u16>)> = {
            let inner = self.inner.lock().await;
            inner
                .pods
                .iter()
                // A draining pod is counted by the evaluator at each pass.
                .filter(|(_, p)| p.unseen.is_none() && p.termination.as_ref().is_none_or(|t| t.outcome.is_some()))
                .filter(|(_, p)| inner.index.len(p.slot) > LISTING_LOOKUPS)
                .map(|(name, p)| (name.clone(), p.slot, p.settings.ignore_ports.clone()))
                .collect()
        };
        let t = self.settings.timeouts;
        for (name, slot, ignore) in pods {
            let c = Counting { timeouts: t, ignore_ports: &ignore };
            let mut total = FlowCounts::default();
            let mut from = 0;
            loop {
                let mut inner = self.inner.lock().await;
                if inner.by_slot.get(&slot) != Some(&name) {
                    break; // removed meanwhile (its slot may be another pod's now)
                }
                let now = now_ns();
                let super::Inner { index, datapath, .. } = &mut *inner;
                let part = index.classify_range(datapath, slot, from, STEP, now, c, false);
                total += part.counts;
                // The flows found gone left the index: the next step starts
                // that many places earlier.
                from += part.visited - part.removed;
                inner.publish_evictions();
                if part.visited < STEP {
                    inner.index.remember(slot, total, now);
                    break;
                }
                drop(inner);
                tokio::task::yield_now().await;
            }
        }
        start.elapsed()
    }
}
