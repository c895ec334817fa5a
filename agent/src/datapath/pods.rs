//! A pod's place in the datapath: its IPs in `POD_IPS` under its slot, its
//! counters, probe and ignored ports, and the interfaces attached for it.

use std::net::IpAddr;

use conndrain_common::{FlowKey, PodCounters, PodIpKey, PodSockets, ProbeKey, SockValue, maps, port_flags};

use super::{Datapath, addrs::ip_from_bytes, addrs::ip_key, handles::update, route, sockets};
use crate::error::Error;

/// What registering a pod found.
#[derive(Debug)]
pub struct Registered {
    pub ifindexes: Vec<u32>,
    /// Why no attached interface sees this pod's own traffic, if none does.
    pub unseen: Option<String>,
}

impl Datapath {
    /// Registers a pod restored from the saved state under its old `slot`:
    /// like `register_pod`, but keeps its counters (the programs kept them
    /// while we were away), adopts the links pinned for its interfaces, and
    /// keeps going without the interfaces it cannot find (the pod's network
    /// may be gone; its removal will follow).
    pub async fn restore_pod(&mut self, slot: u32, ips: &[IpAddr]) -> Vec<u32> {
        let mut ifindexes = Vec::new();
        for ip in ips {
            match self.attach_points(*ip).await {
                Ok(route::AttachPoints::Interfaces(found)) => {
                    ifindexes.extend(found.into_iter().filter(|i| !ifindexes.contains(i)).collect::<Vec<_>>());
                }
                Ok(route::AttachPoints::Unseen(_)) => {}
                Err(e) => {
                    tracing::warn!(%ip, error = %e, "restoring a pod: no interface for this IP")
                }
            }
        }
        let mut attached = Vec::new();
        for ifindex in ifindexes {
            match self.attach(ifindex) {
                Ok(()) => attached.push(ifindex),
                Err(e) => tracing::warn!(ifindex, error = %e, "restoring a pod: cannot attach"),
            }
        }
        for ip in ips {
            if let Err(e) = self.maps.pod_ips.insert(ip_key(*ip), slot, update::ANY) {
                tracing::warn!(%ip, error = %e, "restoring a pod IP");
            }
        }
        attached
    }

    /// Removes the pod IPs for which `keep(ip, slot)` is false: IPs an
    /// earlier agent registered and this one does not know.
    pub fn retain_pod_ips(&mut self, keep: impl Fn(IpAddr, u32) -> bool) {
        let pod_ips = &mut self.maps.pod_ips;
        let stale: Vec<PodIpKey> = pod_ips
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, slot)| !keep(ip_from_bytes(k.addr, conndrain_common::FAMILY_V4), *slot))
            .map(|(k, _)| k)
            .collect();
        for k in &stale {
            let _ = pod_ips.remove(k);
        }
        if !stale.is_empty() {
            tracing::info!(count = stale.len(), "removed pod IPs no registered pod has");
        }
    }

    /// Registers a pod's IPs under `slot` and attaches to the interfaces that
    /// route to them. Returns the interface indexes, to hand back to
    /// `unregister_pod`. On error nothing stays registered.
    pub async fn register_pod(
        &mut self,
        slot: u32,
        ips: &[IpAddr],
        probes: &[u16],
        ignored: &[u16],
    ) -> Result<Registered, Error> {
        let mut ifindexes = Vec::new();
        let mut unseen = None;
        for ip in ips {
            match self.attach_points(*ip).await? {
                route::AttachPoints::Interfaces(found) => {
                    for i in found {
                        if !ifindexes.contains(&i) {
                            ifindexes.push(i);
                        }
                    }
                }
                route::AttachPoints::Unseen(why) => unseen = Some(why),
            }
        }
        // Zero the counters, sockets and flags: the slot may have belonged to a removed pod.
        self.maps
            .pod_counters
            .set(slot, PodCounters::default(), update::ANY)
            .map_err(|source| Error::map(maps::POD_COUNTERS, source))?;
        self.set_pod_flags(slot, 0)?;
        sockets::reset_slot(&mut self.maps, slot)?;
        self.set_ports(slot, probes, ignored)?;
        let mut attached = Vec::new();
        for &ifindex in &ifindexes {
            if let Err(e) = self.attach(ifindex) {
                for i in attached {
                    self.release(i);
                }
                return Err(e);
            }
            attached.push(ifindex);
        }
        let pod_ips = &mut self.maps.pod_ips;
        for ip in ips {
            if let Err(source) = pod_ips.insert(ip_key(*ip), slot, update::ANY) {
                for ip in ips {
                    let _ = pod_ips.remove(&ip_key(*ip));
                }
                for i in attached {
                    self.release(i);
                }
                return Err(Error::map(maps::POD_IPS, source));
            }
        }
        Ok(Registered { ifindexes, unseen })
    }

    /// Where to attach for `ip` (see `route::attach_points`).
    async fn attach_points(&mut self, ip: IpAddr) -> Result<route::AttachPoints, Error> {
        let oif = self.route.oif(ip).await?;
        let links = self.route.links().await?;
        Ok(route::attach_points(oif, &links))
    }

    /// A pod's ports whose new inbound connections do not restart the quiet
    /// period (replacing any it had): the kubelet's probe ports, and the
    /// ports its settings ignore. An ignored port the map has no room for is
    /// left out with a log line: its new connections then restart the quiet
    /// period, which delays a drain and never hastens one.
    pub fn set_ports(&mut self, slot: u32, probes: &[u16], ignored: &[u16]) -> Result<(), Error> {
        let m = &mut self.maps.probes;
        let old: Vec<ProbeKey> = m.keys().filter_map(Result::ok).filter(|k| k.pod_slot == slot).collect();
        for k in old {
            let _ = m.remove(&k);
        }
        for &port in probes {
            let flags = port_flags::PROBE | if ignored.contains(&port) { port_flags::IGNORED } else { 0 };
            m.insert(ProbeKey { pod_slot: slot, port, _pad: 0 }, flags, update::ANY)
                .map_err(|source| Error::map(maps::PROBES, source))?;
        }
        for &port in ignored.iter().filter(|p| !probes.contains(p)) {
            if let Err(e) = m.insert(ProbeKey { pod_slot: slot, port, _pad: 0 }, port_flags::IGNORED, update::ANY) {
                tracing::warn!(slot, port, error = %e, "no room for an ignored port: its new connections restart the quiet period");
            }
        }
        Ok(())
    }

    /// A pod's open inbound TCP sockets, as the sockets tracepoint counts them.
    pub fn pod_sockets(&self, slot: u32) -> Result<PodSockets, Error> {
        sockets::pod_sockets(&self.maps, slot)
    }

    /// A pod's open inbound TCP sockets themselves (a walk of `SOCKETS`).
    pub fn open_sockets(&self, slot: u32) -> Result<Vec<SockValue>, Error> {
        sockets::open_sockets(&self.maps, slot)
    }

    /// Unregisters a pod and removes its flows (`known`: the keys the agent
    /// indexed; `HELD` is searched whole), so no entry outlives it.
    pub fn unregister_pod(&mut self, slot: u32, ips: &[IpAddr], ifindexes: &[u32], known: &[FlowKey]) {
        for ip in ips {
            if let Err(e) = self.maps.pod_ips.remove(&ip_key(*ip)) {
                tracing::warn!(%ip, error = %e, "removing pod IP from the datapath");
            }
        }
        // After the IPs: the programs no longer create flows for it.
        self.forget_pod_flows(slot, known);
        if let Err(e) = sockets::reset_slot(&mut self.maps, slot).and_then(|()| self.set_ports(slot, &[], &[])) {
            tracing::warn!(slot, error = %e, "forgetting a removed pod's sockets and probes");
        }
        for &i in ifindexes {
            self.release(i);
        }
    }
}
