//! Taking back what an earlier agent left (the state file and the pinned
//! maps), and leaving things for the next one on exit.

use std::{collections::HashMap, net::IpAddr, path::PathBuf};

use conndrain_common::{PROTO_UDP, maps, tcp_state};
use tokio::sync::watch;

use crate::{
    datapath,
    drain::{PodState, Termination},
};

use super::{
    Inner, Node, Pod, now_ns,
    persist::{Persist, SavedPod, boot_id, read_saved},
};

impl Node {
    /// Takes back what an earlier agent left, before the node serves anyone.
    /// Only with `--bpffs` (`state_file` is then where the state is saved;
    /// without it nothing outlives the agent and nothing is saved).
    ///
    /// The pods, their terminations and the steering state come from the
    /// saved file; the flows, counters and pins from the pinned maps, which
    /// the programs kept up to date while no agent ran. The flow index is
    /// rebuilt from one walk of `FLOWS`.
    pub async fn restore(&self, state_file: Option<PathBuf>) {
        let Some(path) = state_file else { return };
        let mut inner = self.inner.lock().await;
        let boot_id = boot_id();
        let saved = read_saved(&path, &boot_id);
        inner.persist = Some(Persist { path, boot_id, dirty: true, steering_changes: 0 });
        let now = now_ns();
        if let Some(saved) = saved {
            inner.restore_pods(saved.pods, now).await;
            let Inner { steering, datapath, .. } = &mut *inner;
            *steering = crate::steering::Steering::restore(saved.steering, datapath, now).await;
            if (saved.everywhere || steering.pinned() > 0)
                && let Err(e) = datapath.attach_everywhere()
            {
                tracing::warn!(error = %e, "attaching to every interface again (steering)");
            }
        }
        // IPs of pods the state does not know (it was lost, or we were killed
        // between registering and saving) would count into slots that may be
        // handed out again.
        let known: HashMap<IpAddr, u32> =
            inner.pods.values().flat_map(|p| p.ips.iter().map(|ip| (*ip, p.slot))).collect();
        inner.datapath.retain_pod_ips(|ip, slot| known.get(&ip) == Some(&slot));
        inner.datapath.finish_restore();
        // The flow index, as the events built it: live UDP flows and
        // established or closing TCP flows of our pods. This walk of FLOWS,
        // once at start, is the only full-table walk the agent makes on its
        // own (listings walk it when someone asks); afterwards events and
        // point lookups keep the index, as they always do.
        let mut indexed = 0usize;
        match inner.datapath.all_flows() {
            Ok(flows) => {
                for (k, v) in flows {
                    let live = k.proto == PROTO_UDP || tcp_state::is_active(v.state);
                    if live && inner.by_slot.contains_key(&v.pod_slot) {
                        inner.index.insert(v.pod_slot, k, v.first_seen_ns);
                        indexed += 1;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the flow table to rebuild the flow index")
            }
        }
        // The flags are pinned with the maps, but not across a layout change.
        let draining: Vec<(String, u32)> =
            inner.pods.iter().filter(|(_, p)| p.termination.is_some()).map(|(n, p)| (n.clone(), p.slot)).collect();
        for (name, slot) in draining {
            inner.hold(&name, slot);
        }
        tracing::info!(
            pods = inner.pods.len(),
            terminating = inner.pods.values().filter(|p| p.termination.is_some()).count(),
            pinned_flows = inner.steering.pinned(),
            indexed_flows = indexed,
            interfaces = inner.datapath.interfaces().count(),
            "state restored"
        );
        inner.save();
        drop(inner);
        self.wake.notify_one();
    }

    /// Removes the pods restored from the saved state that nobody declared
    /// again: Kubernetes mode calls it after its first pod sync, which
    /// declares every pod still on the node.
    pub async fn forget_undeclared(&self) {
        let mut inner = self.inner.lock().await;
        let names: Vec<String> = inner.restored.iter().cloned().collect();
        for name in names {
            tracing::info!(pod = %name, "a restored pod was not declared again (deleted while the agent was down): removing it");
            let _ = inner.remove(&name);
        }
        inner.save();
    }

    /// Whether the programs stay attached (and the state saved) when the agent exits.
    pub async fn keeps_attached_on_exit(&self) -> bool {
        self.inner.lock().await.datapath.keeps_attached_on_exit()
    }

    /// `--detach-on-exit`: unregisters every pod (detaching the programs),
    /// then removes the pinned maps and the saved state, so the next agent
    /// starts afresh.
    pub async fn detach_all(&self) {
        for name in self.names().await {
            let _ = self.remove_pod(&name).await;
        }
        let mut inner = self.inner.lock().await;
        inner.datapath.remove_kept();
        if let Some(p) = inner.persist.take()
            && let Err(e) = std::fs::remove_file(&p.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %p.path.display(), error = %e, "removing the saved state");
        }
    }
}

impl Inner {
    /// Registers the saved pods again, under their old slots, with their drains.
    pub(super) async fn restore_pods(&mut self, pods: Vec<SavedPod>, now: u64) {
        // The counters were kept if their map was: else the snapshots
        // taken at termination refer to counts that are gone.
        let counters_kept = self.datapath.reused(maps::POD_COUNTERS);
        // Likewise the flows: if the table is new (a layout change), the
        // live flows come back only at their next packet.
        let flows_kept = self.datapath.flows_kept();
        for p in pods {
            if p.slot >= datapath::MAX_POD_SLOTS
                || self.by_slot.contains_key(&p.slot)
                || self.pods.contains_key(&p.name)
            {
                tracing::warn!(pod = %p.name, slot = p.slot, "ignoring a saved pod that clashes with another");
                continue;
            }
            let ifindexes = self.datapath.restore_pod(p.slot, &p.ips).await;
            let termination = p.termination.map(|t| Termination {
                started_ns: t.started_ns,
                deadline_ns: t.deadline_ns,
                quiet_period_ns: t.quiet_period_ns,
                new_inbound_at_start: if counters_kept { t.new_inbound_at_start } else { 0 },
                outcome: t.outcome,
            });
            let state = match &termination {
                None => PodState::Serving,
                Some(t) => t.outcome.map_or(PodState::Draining, |(s, _)| s),
            };
            self.by_slot.insert(p.slot, p.name.clone());
            self.index.add_slot(p.slot);
            if (!p.probes.is_empty() || !p.settings.ignore_ports.is_empty())
                && let Err(e) = self.datapath.set_ports(p.slot, &p.probes, &p.settings.ignore_ports)
            {
                tracing::warn!(pod = %p.name, error = %e, "restoring the pod's probe and ignored ports");
            }
            self.restored.insert(p.name.clone());
            if termination.is_some() {
                self.restored_drains.insert(p.name.clone());
            }
            let (state, _) = watch::channel(state);
            let hold_until_ns = match &termination {
                Some(t) if !flows_kept && t.outcome.is_none() => {
                    tracing::warn!(
                        pod = %p.name,
                        "the flow table is new: the drain waits one quiet period for the pod's flows to show again"
                    );
                    now.saturating_add(t.quiet_period_ns)
                }
                _ => 0,
            };
            self.pods.insert(
                p.name,
                Pod {
                    slot: p.slot,
                    ips: p.ips,
                    ifindexes,
                    termination,
                    state,
                    hold_until_ns,
                    registered_ns: p.registered_ns,
                    probes: p.probes,
                    settings: p.settings,
                    unseen: None,
                },
            );
        }
    }
}
