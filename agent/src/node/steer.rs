//! The node's side of steering: terminating backends, local and remote, and
//! the loop that learns and releases their pins (`crate::steering` is the
//! state machine; conntrack and the routes are read here).

use std::{net::IpAddr, time::Duration};

use super::{Inner, Node, now_ns};

impl Node {
    /// A backend on another node is terminating (Kubernetes mode: its
    /// EndpointSlice endpoint says so): pin the flows this node translated to it.
    pub async fn pin_remote(&self, ip: IpAddr, limit: Duration) {
        {
            let mut inner = self.inner.lock().await;
            if !inner.datapath.features.steering {
                return;
            }
            let now = now_ns();
            let deadline = now.saturating_add(u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX));
            inner.steering.add_backend(&format!("remote {ip}"), &[ip], deadline, now);
            inner.save();
        }
        self.refresh_pins(false).await;
    }

    /// A remote backend's endpoint is gone (its pod was deleted): its pinned
    /// TCP flows get a RST on their next segment.
    pub async fn remote_gone(&self, ip: IpAddr) {
        let mut inner = self.inner.lock().await;
        let Inner { steering, datapath, .. } = &mut *inner;
        steering.mark_dead(datapath, &[ip], now_ns());
        inner.save();
    }

    /// Learns the translations of terminating backends' flows from conntrack
    /// and pins the new ones: of the backends that started terminating
    /// lately, or with `all` (and with `--conntrack-dump full`), of every one.
    pub async fn refresh_pins(&self, all: bool) {
        let all = all || self.settings.conntrack_dump == crate::conntrack::DumpMode::Full;
        let backends = self.inner.lock().await.steering.backends_to_learn(now_ns(), all);
        if backends.is_empty() {
            return;
        }
        let mode = self.settings.conntrack_dump;
        let dump = move || crate::conntrack::dump_translations(&backends, mode);
        let translations = match tokio::task::spawn_blocking(dump).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading conntrack");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading conntrack");
                return;
            }
        };
        // getifaddrs is a netlink dump: done before the lock the event path needs.
        let node_addrs = crate::datapath::local_addrs();
        let mut inner = self.inner.lock().await;
        let Inner { steering, datapath, .. } = &mut *inner;
        // Still under the lock: each new pin's route lookups (netlink) and,
        // for the first one, attaching everywhere. Looking the routes up
        // unlocked needs a route handle outside `Datapath` and a re-check of
        // the backends after relocking. They are done once per new flow, not
        // per round.
        steering.apply(datapath, &translations, &node_addrs, now_ns()).await;
        inner.save();
    }

    /// Keeps pins current: learns new ones while backends terminate, releases
    /// closed, idle, expired and orphaned ones. Runs until the node is dropped.
    pub async fn run_steering(&self) {
        let mut last_all = 0u64;
        for round in 0u64.. {
            // Every second, or at once when a new flow reaches a terminating
            // pod (it must be pinned before kube-proxy's cleanup can move it).
            let woken = tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => false,
                () = self.steer_wake.notified() => true,
            };
            // Each second the backends that started terminating lately; all of
            // them when woken, and every LEARN_SLOW_ROUNDS seconds.
            let now = now_ns();
            let all = woken || now.saturating_sub(last_all) >= crate::steering::LEARN_SLOW_ROUNDS * 1_000_000_000;
            if all {
                last_all = now;
            }
            self.refresh_pins(all).await;
            let mut inner = self.inner.lock().await;
            if round % 30 == 0 {
                // Under the lock: it reads the addresses (netlink) and writes
                // them into the programs' map in one `Datapath` call.
                inner.datapath.refresh_node_addrs();
            }
            let Inner { steering, datapath, index, .. } = &mut *inner;
            let over = steering.sweep(datapath, now_ns(), self.settings.timeouts.udp_ns, self.settings.pin_limit_ns);
            if round % 5 == 0 {
                let swept = datapath.sweep_held(now_ns(), self.settings.timeouts.udp_ns);
                if !swept.is_empty() {
                    index.forget(&swept);
                    tracing::debug!(swept = swept.len(), "finished flows of draining pods removed from HELD");
                }
            }
            inner.save();
            drop(inner);
            if !over.is_empty() {
                let n = over.len();
                let forgotten = tokio::task::spawn_blocking(move || crate::conntrack::forget_translations(&over)).await;
                match forgotten.map_err(anyhow::Error::from).and_then(|r| r) {
                    Ok(deleted) => {
                        tracing::debug!(over = n, deleted, "stale conntrack entries of finished flows deleted")
                    }
                    Err(e) => tracing::warn!(error = %e, "deleting stale conntrack entries"),
                }
            }
        }
    }
}
