//! The evaluator: datapath events into the flow index, and the drain rule
//! run for every terminating pod as they arrive; `wait` for its outcome.

use std::time::Duration;

use conndrain_common::{FlowEvent, event_kind};

use crate::{
    drain::{Counting, Observation, PodState},
    metrics::OutcomeLabels,
    views::WaitOutcome,
};

use super::{Inner, Node, PodError, now_ns, secs};

impl Node {
    /// Feeds datapath events into the flow index and wakes the evaluator when
    /// a terminating pod is concerned.
    pub async fn on_events(&self, events: &[FlowEvent]) {
        let mut inner = self.inner.lock().await;
        inner.events_received += events.len() as u64;
        let mut wake = false;
        let mut steer = false;
        for ev in events {
            let Some(name) = inner.by_slot.get(&ev.pod_slot) else {
                continue;
            };
            if inner.pods.get(name).is_some_and(|p| p.termination.is_some()) {
                wake = true;
                steer |= ev.kind == event_kind::NEW || ev.kind == event_kind::ESTABLISHED;
            }
            inner.index.on_event(ev);
        }
        drop(inner);
        if wake {
            self.wake.notify_one();
        }
        if steer {
            self.steer_wake.notify_one();
        }
    }

    /// Runs the drain rule for every terminating pod until the node is dropped:
    /// on each wake-up from events, and at the next instant a pod can change
    /// on its own (end of quiet period, deadline, a flow turning idle, a
    /// request in flight answered).
    pub async fn run_evaluator(&self) {
        loop {
            let next = self.evaluate().await;
            let sleep = next.map_or(Duration::from_secs(3600), |t| Duration::from_nanos(t.saturating_sub(now_ns())));
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    pub(super) async fn evaluate(&self) -> Option<u64> {
        let mut inner = self.inner.lock().await;
        let now = now_ns();
        let t = self.settings.timeouts;
        let mut next: Option<u64> = None;
        let mut changed = false;
        let names: Vec<String> = inner
            .pods
            .iter()
            .filter(|(_, p)| p.termination.as_ref().is_some_and(|t| t.outcome.is_none()))
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let Some((slot, ignore)) =
                inner.pods.get(&name).filter(|p| p.unseen.is_none()).map(|p| (p.slot, p.settings.ignore_ports.clone()))
            else {
                continue;
            };
            let Ok(counters) = inner.datapath.counters(slot) else {
                continue;
            };
            let Inner { index, datapath, .. } = &mut *inner;
            // Sockets first: one whose event was lost is indexed by it, and counted below.
            let c = Counting { timeouts: t, ignore_ports: &ignore };
            let sockets = index.sockets(datapath, slot, now, c);
            // After the read: a socket event the kernel skipped before it shows here.
            datapath.check_sockets_misses();
            let (counts, flow_next, _) = index.classify_pod(datapath, slot, now, c, false);
            index.remember(slot, counts, now);
            let unknown = inner.pods.get(&name).and_then(|p| p.sockets_unknown(&inner.datapath));
            let Some(pod) = inner.pods.get_mut(&name) else {
                continue;
            };
            if now < pod.hold_until_ns {
                next = Some(next.map_or(pod.hold_until_ns, |n: u64| n.min(pod.hold_until_ns)));
                continue;
            }
            let Some(term) = pod.termination.as_mut() else {
                continue;
            };
            let verdict = term.evaluate(&Observation {
                now_ns: now,
                counts,
                new_inbound_total: counters.new_inbound_total,
                last_new_inbound_ns: counters.last_new_inbound_ns,
                sockets_holding: sockets.holding.len() as u64,
                sockets_complete: unknown.is_none() && sockets.incomplete.is_none(),
            });
            if verdict.state != *pod.state.borrow() {
                tracing::info!(
                    pod = %name,
                    state = ?verdict.state,
                    after_s = secs(now - term.started_ns),
                    active = counts.active,
                    open_sockets = sockets.open,
                    sockets_holding = sockets.holding.len(),
                    "drain state"
                );
                pod.state.send_replace(verdict.state);
                changed = true;
                if verdict.state.is_final() {
                    let outcome = if verdict.state == PodState::Drained { "drained" } else { "deadline" };
                    self.metrics.drains.get_or_create(&OutcomeLabels { outcome }).inc();
                    self.metrics.drain_duration.observe(secs(now - term.started_ns));
                }
            }
            for t in
                [verdict.next_check_ns, if verdict.state.is_final() { None } else { flow_next }].into_iter().flatten()
            {
                next = Some(next.map_or(t, |n: u64| n.min(t)));
            }
        }
        inner.publish_evictions();
        if changed {
            inner.touch();
            inner.save();
        }
        next
    }

    /// Blocks until the pod is drained or at its deadline, or `timeout` passes.
    pub async fn wait(&self, name: &str, timeout: Option<Duration>) -> Result<WaitOutcome, PodError> {
        let start = now_ns();
        let mut rx = {
            let inner = self.inner.lock().await;
            match inner.pods.get(name) {
                Some(p) => p.state.subscribe(),
                // Known but not tracked (opted out, hostNetwork): the caller falls back at once.
                None if inner.skipped.contains_key(name) => {
                    return Ok(WaitOutcome {
                        pod: name.to_owned(),
                        state: PodState::Skipped,
                        active_flows: 0,
                        waited_secs: 0.0,
                        timed_out: false,
                    });
                }
                None => return Err(PodError::Unknown(name.to_owned())),
            }
        };
        // Skipped (its traffic cannot be seen) answers at once: the caller falls back.
        let waited = async {
            rx.wait_for(|s| s.is_final() || *s == PodState::Skipped)
                .await
                .map(|s| *s)
                .map_err(|_| PodError::Removed(name.to_owned()))
        };
        let (state, timed_out) = match timeout {
            Some(t) => match tokio::time::timeout(t, waited).await {
                Ok(r) => (r?, false),
                Err(_) => (*rx.borrow(), true),
            },
            None => (waited.await?, false),
        };
        let active_flows = self.pod(name).await.map(|p| p.active_flows).unwrap_or(0);
        Ok(WaitOutcome { pod: name.to_owned(), state, active_flows, waited_secs: secs(now_ns() - start), timed_out })
    }
}
