//! The registry of pods: adding one (under a free slot, its IPs in the
//! datapath), starting its drain, removing it.

use std::{collections::BTreeSet, net::IpAddr};

use conndrain_common::FlowKey;
use tokio::sync::watch;

use crate::{
    datapath,
    drain::{PodState, Termination},
};

use super::{Inner, Node, Pod, PodError, PodSpec, TerminateSpec, nanos, now_ns, secs, valid_name};

impl Node {
    pub async fn add_pod(&self, name: &str, ips: &[IpAddr], spec: &PodSpec) -> Result<(), PodError> {
        if !valid_name(name) {
            return Err(PodError::BadName(name.to_owned()));
        }
        if ips.is_empty() {
            return Err(PodError::NoIps(name.to_owned()));
        }
        let mut inner = self.inner.lock().await;
        if inner.restored.remove(name)
            && let Some(pod) = inner.pods.get(name)
        {
            let (had, has): (BTreeSet<&IpAddr>, BTreeSet<&IpAddr>) = (pod.ips.iter().collect(), ips.iter().collect());
            if had == has {
                tracing::info!(pod = name, "pod declared again after a restart: keeping its saved state");
                drop(inner);
                return self.set_settings(name, &spec.settings).await;
            }
            tracing::info!(pod = name, "a new pod under the name of a restored one: the restored one is removed");
            inner.remove(name)?;
        }
        if inner.pods.contains_key(name) {
            return Err(PodError::Exists(name.to_owned()));
        }
        for ip in ips {
            if let Some((other, _)) = inner.pods.iter().find(|(_, p)| p.ips.contains(ip)) {
                return Err(PodError::IpTaken { ip: *ip, pod: other.clone() });
            }
        }
        let slot = (0..datapath::MAX_POD_SLOTS)
            .find(|s| !inner.by_slot.contains_key(s))
            .ok_or(PodError::Full(datapath::MAX_POD_SLOTS))?;
        let mut ips = ips.to_vec();
        ips.dedup();
        // Under the lock the event path needs: the route lookups and TC
        // attachments (netlink) of the pod's IPs. Planning them unlocked
        // needs a route handle outside `Datapath`, and the slot and IPs
        // checked again after relocking (a concurrent add of the same IP).
        let registered =
            inner.datapath.register_pod(slot, &ips, &spec.probe_ports, &spec.settings.ignore_ports).await?;
        tracing::info!(pod = name, ?ips, slot, probes = ?spec.probe_ports, settings = ?spec.settings, "pod added");
        if let Some(why) = &registered.unseen {
            tracing::warn!(pod = name, reason = %why, "pod skipped: conndrain cannot see its traffic");
        }
        inner.by_slot.insert(slot, name.to_owned());
        inner.index.add_slot(slot);
        let (state, _) =
            watch::channel(if registered.unseen.is_some() { PodState::Skipped } else { PodState::Serving });
        inner.pods.insert(
            name.to_owned(),
            Pod {
                slot,
                ips,
                ifindexes: registered.ifindexes,
                termination: None,
                state,
                hold_until_ns: 0,
                registered_ns: if spec.preexisting { 0 } else { now_ns() },
                probes: spec.probe_ports.clone(),
                settings: spec.settings.clone(),
                unseen: registered.unseen,
            },
        );
        inner.touch();
        inner.save();
        Ok(())
    }

    /// Starts a pod's drain. Its quiet period is the spec's, else the
    /// pod's own setting, else the agent's default.
    pub async fn terminate(&self, name: &str, spec: &TerminateSpec) -> Result<(), PodError> {
        let deadline = nanos(spec.deadline.unwrap_or(self.settings.default_deadline));
        let asked = spec.quiet_period;
        let mut inner = self.inner.lock().await;
        let (slot, own) = inner
            .pods
            .get(name)
            .map(|p| (p.slot, p.settings.quiet_period))
            .ok_or_else(|| PodError::Unknown(name.to_owned()))?;
        let quiet = nanos(asked.or(own).unwrap_or(self.settings.default_quiet_period));
        if inner.restored_drains.remove(name) {
            tracing::info!(pod = name, "termination declared again after a restart: the saved drain goes on");
            return Ok(());
        }
        let counters = inner.datapath.counters(slot)?;
        let pod = inner.pods.get_mut(name).ok_or_else(|| PodError::Unknown(name.to_owned()))?;
        if pod.termination.is_some() {
            return Err(PodError::AlreadyTerminating(name.to_owned()));
        }
        let now = now_ns();
        pod.termination = Some(Termination {
            started_ns: now,
            deadline_ns: now.saturating_add(deadline),
            quiet_period_ns: quiet,
            new_inbound_at_start: counters.new_inbound_total,
            outcome: None,
        });
        if pod.unseen.is_none() {
            pod.state.send_replace(PodState::Draining);
        }
        let ips = pod.ips.clone();
        inner.hold(name, slot);
        if inner.datapath.features.steering {
            inner.steering.add_backend(name, &ips, now.saturating_add(deadline), now);
        }
        tracing::info!(pod = name, deadline_s = secs(deadline), quiet_s = secs(quiet), "drain started");
        inner.touch();
        inner.save();
        drop(inner);
        self.wake.notify_one();
        // Pin its established flows before we answer, so a caller may cut the
        // rules right after.
        self.refresh_pins(false).await;
        Ok(())
    }

    pub async fn remove_pod(&self, name: &str) -> Result<(), PodError> {
        let mut inner = self.inner.lock().await;
        inner.remove(name)?;
        inner.save();
        Ok(())
    }
}

impl Inner {
    pub(super) fn remove(&mut self, name: &str) -> Result<(), PodError> {
        let pod = self.pods.remove(name).ok_or_else(|| PodError::Unknown(name.to_owned()))?;
        self.restored.remove(name);
        self.restored_drains.remove(name);
        self.touch();
        {
            let Inner { steering, datapath, .. } = &mut *self;
            steering.mark_dead(datapath, &pod.ips, now_ns());
        }
        self.by_slot.remove(&pod.slot);
        let known: Vec<FlowKey> = self.index.remove_slot(pod.slot);
        self.datapath.unregister_pod(pod.slot, &pod.ips, &pod.ifindexes, &known);
        tracing::info!(pod = name, "pod removed");
        Ok(())
    }

    /// Keeps a draining pod's flows out of the LRU's reach (see
    /// `datapath/held.rs`).
    pub(super) fn hold(&mut self, name: &str, slot: u32) {
        let known: Vec<FlowKey> = self.index.keys(slot);
        match self.datapath.hold_pod(slot, &known) {
            Ok(moved) => tracing::debug!(pod = name, moved, "flows held for the drain"),
            Err(e) => tracing::warn!(
                pod = name,
                error = %e,
                "cannot protect the pod's flows from eviction: a flood of new flows may make it look drained early"
            ),
        }
    }
}
