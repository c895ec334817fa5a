//! The kernel side as the agent sees it: loading and attaching the programs,
//! the maps they share with us, and the events they send.

mod attach;
mod events;
pub mod features;
mod held;
pub mod intercept;
mod bpffs;
mod route;
mod sockets;

use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    net::IpAddr,
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
};
use conndrain_common::{
    Config, FlowKey, FlowValue, MAX_PODS, PINNED_MAPS, Pin, PodCounters, PodIpKey, PodSockets, ProbeKey, SockValue,
    WireKey, maps, port_flags, stats,
};

pub use attach::{AttachMode, remove_clsact_filters};
pub use events::EventReader;
pub use features::Features;
pub use bpffs::{RemovedKept, remove_all as remove_kept_under};

use crate::error::Error;

/// Settings fixed at load time.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Size of the flow table (LRU: when full, the least recently used flow goes).
    pub max_flows: u32,
    /// A UDP flow idle this long is over.
    pub udp_timeout_ns: u64,
    /// Where to pin the maps and links (bpffs), if anywhere: see `bpffs.rs`.
    pub bpffs: Option<PathBuf>,
    /// With `bpffs`: detach and unpin everything when the agent exits, instead
    /// of leaving the programs running for the next agent.
    pub detach_on_exit: bool,
    /// tcx or clsact; `None`: tcx where the kernel has it, clsact otherwise.
    pub attach: Option<AttachMode>,
}

/// An interface we attached to, and how many registered pods route through it.
#[derive(Debug)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    pub pods: usize,
    links: attach::Links,
}

pub struct Datapath {
    ebpf: Ebpf,
    pub features: Features,
    pub mode: AttachMode,
    /// The ingress program loaded: with steering, or tracking only.
    ingress: &'static str,
    pub max_flows: u32,
    interfaces: StdHashMap<u32, Interface>,
    route: route::Router,
    /// Attached to every interface (for steering).
    everywhere: bool,
    /// `--bpffs`: where the maps and links are pinned.
    pins: Option<bpffs::KeptDir>,
    /// The pinned maps that came back from an earlier agent (the others are new).
    reused: BTreeSet<&'static str>,
    /// The earlier flow table, when its size changed: copied at `finish_restore`.
    old_flows: Option<MapData>,
    /// On exit (drop), leave the programs attached for the next agent.
    keep_on_exit: bool,
    /// The sockets tracepoint (`sockets.rs`).
    sockets_link: Option<sockets::SocketsLink>,
    /// Since when (`CLOCK_MONOTONIC` ns) the sockets tracepoint has run
    /// without a gap: sockets opened before it are not known.
    pub sockets_since_ns: u64,
}

/// What registering a pod found.
#[derive(Debug)]
pub struct Registered {
    pub ifindexes: Vec<u32>,
    /// Why no attached interface sees this pod's own traffic, if none does.
    pub unseen: Option<String>,
}

impl Datapath {
    /// Loads the embedded programs and maps; attaches nothing yet.
    pub fn load(opts: &LoadOptions) -> Result<(Self, EventReader), Error> {
        if crate::EBPF_OBJECT.is_empty() {
            return Err(Error::NoEbpfObject);
        }
        features::raise_memlock();
        let features = Features::detect();
        features.require()?;
        let pins = opts.bpffs.as_deref().map(bpffs::KeptDir::prepare).transpose()?;
        let checked = pins.as_ref().map(|p| bpffs::check_maps(p, opts.max_flows)).unwrap_or_default();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(maps::FLOWS, opts.max_flows);
        let paths: Vec<(&str, PathBuf)> =
            pins.iter().flat_map(|p| PINNED_MAPS.iter().map(|name| (*name, p.map_path(name)))).collect();
        for (name, path) in &paths {
            // Opened if pinned there (checked above), else created and pinned there.
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(crate::EBPF_OBJECT).map_err(|source| Error::Load { source: Box::new(source) })?;
        if let Some(p) = &pins {
            tracing::info!(
                dir = %p.dir().display(),
                reused = ?checked.reused,
                new = ?PINNED_MAPS.iter().filter(|m| !checked.reused.contains(*m)).collect::<Vec<_>>(),
                "maps pinned"
            );
        }
        let earlier_since = {
            let config: Array<_, Config> =
                Array::try_from(map(&ebpf, maps::CONFIG)?).map_err(|source| Error::map(maps::CONFIG, source))?;
            config.get(&0, 0).map(|c| c.sockets_since_ns).unwrap_or(0)
        };
        fill_node_addrs(&mut ebpf)?;
        let ingress = attach::ingress_program(features.steering);
        let mode = attach::load_programs(&mut ebpf, ingress, opts.attach)?;
        let (sockets_link, continuous) = sockets::attach(&mut ebpf, pins.as_ref())?;
        let kept = [maps::SOCKETS, maps::POD_SOCKETS, maps::CONFIG].iter().all(|m| checked.reused.contains(m));
        let sockets_since_ns =
            if continuous && kept && earlier_since != 0 { earlier_since } else { crate::clock::now_ns() };
        {
            let mut config: Array<_, Config> = Array::try_from(map_mut(&mut ebpf, maps::CONFIG)?)
                .map_err(|source| Error::map(maps::CONFIG, source))?;
            config
                // no_pins 0: pins may be left from an earlier agent; the
                // steering loop says otherwise once it knows.
                .set(0, Config { udp_timeout_ns: opts.udp_timeout_ns, no_pins: 0, _pad: 0, sockets_since_ns }, 0)
                .map_err(|source| Error::map(maps::CONFIG, source))?;
        }
        let events = EventReader::new(&mut ebpf)?;
        let route = route::Router::new()?;
        let keep_on_exit = pins.is_some() && !opts.detach_on_exit;
        Ok((
            Self {
                ebpf,
                features,
                mode,
                ingress,
                max_flows: opts.max_flows,
                interfaces: StdHashMap::new(),
                route,
                everywhere: false,
                pins,
                reused: checked.reused,
                old_flows: checked.old_flows,
                keep_on_exit,
                sockets_link: Some(sockets_link),
                sockets_since_ns,
            },
            events,
        ))
    }

    /// Whether the pinned map `name` came back from an earlier agent with its
    /// contents (false: it is new and empty).
    #[must_use]
    pub fn reused(&self, name: &str) -> bool {
        self.reused.contains(name)
    }

    /// Whether the flows tracked before the start are in the flow table: it
    /// was reused, or resized and copied (at `finish_restore`).
    #[must_use]
    pub fn flows_kept(&self) -> bool {
        self.reused.contains(maps::FLOWS) || self.old_flows.is_some()
    }

    /// Whether the programs stay attached when we exit.
    #[must_use]
    pub fn keeps_attached_on_exit(&self) -> bool {
        self.keep_on_exit
    }

    #[must_use]
    pub fn everywhere(&self) -> bool {
        self.everywhere
    }

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
        if let Ok(mut pod_ips) = self.pod_ips_mut() {
            for ip in ips {
                if let Err(e) = pod_ips.insert(ip_key(*ip), slot, 0) {
                    tracing::warn!(%ip, error = %e, "restoring a pod IP");
                }
            }
        }
        attached
    }

    /// Removes the pod IPs for which `keep(ip, slot)` is false: IPs an
    /// earlier agent registered and this one does not know.
    pub fn retain_pod_ips(&mut self, keep: impl Fn(IpAddr, u32) -> bool) {
        let Ok(mut pod_ips) = self.pod_ips_mut() else {
            return;
        };
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

    /// Ends a start with `--bpffs`, once the restored pods and pins are back:
    /// copies the flows of a resized flow table into the new one, and
    /// detaches the links pinned for interfaces nothing needs any more.
    pub fn finish_restore(&mut self) {
        if let Some(old) = self.old_flows.take() {
            // A second walk, only when --max-flows changed. The programs write
            // to the new table already (their links were swapped), so flows
            // they created since win: BPF_NOEXIST.
            let copied = aya::maps::Map::from_map_data(old)
                .ok()
                .and_then(|m| HashMap::<_, FlowKey, FlowValue>::try_from(m).ok())
                .map_or(0, |old| {
                    let Ok(mut flows) = self.flows_mut() else {
                        return 0;
                    };
                    old.iter().filter_map(Result::ok).filter(|(k, v)| flows.insert(*k, *v, BPF_NOEXIST).is_ok()).count()
                });
            tracing::info!(copied, max_flows = self.max_flows, "flows copied into the resized flow table");
        }
        let Some(pins) = &mut self.pins else { return };
        let in_use: BTreeSet<&PathBuf> = self.interfaces.values().flat_map(|i| i.links.pins()).collect();
        for path in pins.kept_links() {
            if !in_use.contains(&path) {
                tracing::info!(link = %path.display(), "detaching a link left for an interface no pod uses any more");
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "removing a link pin");
                }
            }
        }
        pins.remove_other_layouts();
    }

    /// Unpins everything (`--detach-on-exit`): the next agent starts afresh.
    pub fn remove_kept(&mut self) {
        if let Some(p) = &self.pins
            && let Err(e) = std::fs::remove_dir_all(p.dir())
        {
            tracing::warn!(dir = %p.dir().display(), error = %e, "removing the pinned maps");
        }
        self.keep_on_exit = false;
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
        self.pod_counters_mut()?
            .set(slot, PodCounters::default(), 0)
            .map_err(|source| Error::map(maps::POD_COUNTERS, source))?;
        self.set_pod_flags(slot, 0)?;
        sockets::reset_slot(&mut self.ebpf, slot)?;
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
        let mut pod_ips = self.pod_ips_mut()?;
        for ip in ips {
            if let Err(source) = pod_ips.insert(ip_key(*ip), slot, 0) {
                for ip in ips {
                    let _ = pod_ips.remove(&ip_key(*ip));
                }
                drop(pod_ips);
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
        let mut m: HashMap<_, ProbeKey, u8> = HashMap::try_from(map_mut(&mut self.ebpf, maps::PROBES)?)
            .map_err(|source| Error::map(maps::PROBES, source))?;
        let old: Vec<ProbeKey> = m.keys().filter_map(Result::ok).filter(|k| k.pod_slot == slot).collect();
        for k in old {
            let _ = m.remove(&k);
        }
        for &port in probes {
            let flags = port_flags::PROBE | if ignored.contains(&port) { port_flags::IGNORED } else { 0 };
            m.insert(ProbeKey { pod_slot: slot, port, _pad: 0 }, flags, 0)
                .map_err(|source| Error::map(maps::PROBES, source))?;
        }
        for &port in ignored.iter().filter(|p| !probes.contains(p)) {
            if let Err(e) = m.insert(ProbeKey { pod_slot: slot, port, _pad: 0 }, port_flags::IGNORED, 0) {
                tracing::warn!(slot, port, error = %e, "no room for an ignored port: its new connections restart the quiet period");
            }
        }
        Ok(())
    }

    /// A pod's open inbound TCP sockets, as the sockets tracepoint counts them.
    pub fn pod_sockets(&self, slot: u32) -> Result<PodSockets, Error> {
        sockets::pod_sockets(&self.ebpf, slot)
    }

    /// A pod's open inbound TCP sockets themselves (a walk of `SOCKETS`).
    pub fn open_sockets(&self, slot: u32) -> Result<Vec<SockValue>, Error> {
        sockets::open_sockets(&self.ebpf, slot)
    }

    /// Unregisters a pod and removes its flows (`known`: the keys the agent
    /// indexed; `HELD` is searched whole), so no entry outlives it.
    pub fn unregister_pod(&mut self, slot: u32, ips: &[IpAddr], ifindexes: &[u32], known: &[FlowKey]) {
        if let Ok(mut pod_ips) = self.pod_ips_mut() {
            for ip in ips {
                if let Err(e) = pod_ips.remove(&ip_key(*ip)) {
                    tracing::warn!(%ip, error = %e, "removing pod IP from the datapath");
                }
            }
        }
        // After the IPs: the programs no longer create flows for it.
        self.forget_pod_flows(slot, known);
        if let Err(e) = sockets::reset_slot(&mut self.ebpf, slot).and_then(|()| self.set_ports(slot, &[], &[])) {
            tracing::warn!(slot, error = %e, "forgetting a removed pod's sockets and probes");
        }
        for &i in ifindexes {
            self.release(i);
        }
    }

    fn attach(&mut self, ifindex: u32) -> Result<(), Error> {
        if let Some(iface) = self.interfaces.get_mut(&ifindex) {
            iface.pods += 1;
            return Ok(());
        }
        let name = attach::ifname(ifindex)?;
        let l3 = attach::is_l3(&name);
        if l3 && self.ingress != conndrain_common::programs::INGRESS {
            // The `_l3` programs steer; without steering there are none, and
            // the Ethernet ones would read an ethertype where there is none.
            tracing::warn!(interface = %name, ifindex, "an L3 device, not attached: this kernel cannot steer");
            return Ok(());
        }
        let links = attach::attach(&mut self.ebpf, self.ingress, l3, &name, ifindex, self.mode, self.pins.as_ref())?;
        if links.adopted {
            tracing::info!(interface = %name, ifindex, mode = ?self.mode, "attached: took over the links an earlier agent pinned");
        } else {
            tracing::info!(interface = %name, ifindex, mode = ?self.mode, l3, "attached");
        }
        self.interfaces.insert(ifindex, Interface { name, ifindex, pods: 1, links });
        Ok(())
    }

    fn release(&mut self, ifindex: u32) {
        let Some(iface) = self.interfaces.get_mut(&ifindex) else {
            return;
        };
        iface.pods -= 1;
        if iface.pods > 0 {
            return;
        }
        if let Some(iface) = self.interfaces.remove(&ifindex) {
            attach::detach(iface.links);
            tracing::info!(interface = %iface.name, "detached");
        }
    }

    /// Attaches to every interface of this network namespace but loopback, so
    /// that pinned flows are steered wherever their packets come in (uplinks
    /// included). Once; the interfaces stay attached.
    pub fn attach_everywhere(&mut self) -> Result<(), Error> {
        if self.everywhere {
            return Ok(());
        }
        // SAFETY: if_nameindex returns a list terminated by a zero entry, freed below.
        let list = unsafe { libc::if_nameindex() };
        if list.is_null() {
            return Err(Error::Interface { ifindex: 0, source: std::io::Error::last_os_error() });
        }
        let mut indexes = Vec::new();
        let mut p = list;
        // SAFETY: walking the list up to its terminator.
        unsafe {
            while (*p).if_index != 0 {
                let name = std::ffi::CStr::from_ptr((*p).if_name).to_string_lossy();
                // Not bridges: their ports are attached, and a packet must
                // not meet the programs twice (on the bridge and its port).
                let bridge = std::path::Path::new("/sys/class/net").join(&*name).join("bridge").exists();
                if name != "lo" && !bridge {
                    indexes.push((*p).if_index);
                }
                p = p.add(1);
            }
            libc::if_freenameindex(list);
        }
        for i in indexes {
            self.attach(i)?;
        }
        self.everywhere = true;
        Ok(())
    }

    /// Starts the preStop intercept (`intercept.rs`). The caller keeps what
    /// it returns for as long as the intercept is to run.
    pub fn intercept(&mut self, opts: &intercept::InterceptOptions) -> Result<intercept::Intercept, Error> {
        let pins = self.pins.as_ref().map(bpffs::KeptDir::intercept_dir);
        intercept::start(&mut self.ebpf, opts, pins)
    }

    /// With `--bpffs`, when this agent runs without the intercept: detaches
    /// the intercept links an earlier agent pinned, so that no connection is
    /// sent (and held) to a loopback port nobody will listen on.
    pub fn remove_kept_intercept(&mut self) {
        let Some(pins) = &self.pins else { return };
        for name in intercept::LINK_PINS {
            let path = pins.intercept_dir().join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(link = %path.display(), "detached the preStop intercept an earlier agent left");
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "removing an intercept link pin"),
            }
        }
    }

    /// Route lookup: the interface and neighbour for `ip`.
    pub async fn route(&mut self, ip: IpAddr) -> Result<(u32, IpAddr), Error> {
        self.route.lookup(ip).await
    }

    /// The route to `ip` of a packet from `src` that came in on `iif`, as
    /// the kernel routes a forwarded packet (policy rules included).
    pub async fn route_from(&mut self, ip: IpAddr, src: IpAddr, iif: u32) -> Result<(u32, IpAddr), Error> {
        self.route.lookup_from(ip, Some((src, iif))).await
    }

    pub fn pin_insert(&mut self, key: &WireKey, pin: &Pin) -> Result<(), Error> {
        // Before the pin exists, the programs must be looking for pins.
        self.set_no_pins(false)?;
        self.pins_mut()?.insert(*key, *pin, 0).map_err(|source| Error::map(maps::PINS, source))
    }

    /// Rewrites an existing pin only (`BPF_EXIST`): one the programs dropped
    /// meanwhile (its tuple reused by a new connection) stays gone.
    pub fn pin_update(&mut self, key: &WireKey, pin: &Pin) -> Result<(), Error> {
        const BPF_EXIST: u64 = 2;
        self.pins_mut()?.insert(*key, *pin, BPF_EXIST).map_err(|source| Error::map(maps::PINS, source))
    }

    /// Tells the programs whether they may skip the `PINS` lookup.
    fn set_no_pins(&mut self, none: bool) -> Result<(), Error> {
        let mut config: Array<_, Config> = Array::try_from(map_mut(&mut self.ebpf, maps::CONFIG)?)
            .map_err(|source| Error::map(maps::CONFIG, source))?;
        let mut c = config.get(&0, 0).map_err(|source| Error::map(maps::CONFIG, source))?;
        let want = u32::from(none);
        if c.no_pins != want {
            c.no_pins = want;
            config.set(0, c, 0).map_err(|source| Error::map(maps::CONFIG, source))?;
        }
        Ok(())
    }

    /// After pins were removed (or at start): lets the programs skip the
    /// `PINS` lookup when none is left.
    pub fn note_pins_gone(&mut self) {
        let empty = self.pins_mut().is_ok_and(|p| p.keys().next().is_none());
        if empty && let Err(e) = self.set_no_pins(true) {
            tracing::warn!(error = %e, "telling the programs that no flow is pinned");
        }
    }

    pub fn pin(&self, key: &WireKey) -> Option<Pin> {
        let pins: HashMap<&MapData, WireKey, Pin> = HashMap::try_from(map(&self.ebpf, maps::PINS).ok()?).ok()?;
        pins.get(key, 0).ok()
    }

    /// Every entry of `PINS` (at most `MAX_PINS`): only at start, to find
    /// entries the saved state does not know.
    #[must_use]
    pub fn all_pins(&self) -> Vec<(WireKey, Pin)> {
        map(&self.ebpf, maps::PINS)
            .ok()
            .and_then(|m| HashMap::<&MapData, WireKey, Pin>::try_from(m).ok())
            .map(|pins| pins.iter().filter_map(Result::ok).collect())
            .unwrap_or_default()
    }

    pub fn pin_remove(&mut self, key: &WireKey) {
        if let Ok(mut pins) = self.pins_mut() {
            let _ = pins.remove(key);
        }
    }

    fn pins_mut(&mut self) -> Result<HashMap<&mut MapData, WireKey, Pin>, Error> {
        HashMap::try_from(map_mut(&mut self.ebpf, maps::PINS)?).map_err(|source| Error::map(maps::PINS, source))
    }

    pub fn interfaces(&self) -> impl Iterator<Item = &Interface> {
        self.interfaces.values()
    }

    pub fn counters(&self, slot: u32) -> Result<PodCounters, Error> {
        let a: Array<_, PodCounters> = Array::try_from(map(&self.ebpf, maps::POD_COUNTERS)?)
            .map_err(|source| Error::map(maps::POD_COUNTERS, source))?;
        a.get(&slot, 0).map_err(|source| Error::map(maps::POD_COUNTERS, source))
    }

    /// Point lookup of one flow: `HELD`, `FLOWS`, then `HELD` again. Flows
    /// only move from `FLOWS` to `HELD` (see `held.rs`), so a flow moved
    /// between the first two reads is found by the third, instead of looking
    /// evicted and leaving the index for good.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>, Error> {
        for (name, table) in [(maps::HELD, self.held()?), (maps::FLOWS, self.flows()?), (maps::HELD, self.held()?)] {
            match table.get(key, 0) {
                Ok(v) => return Ok(Some(v)),
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(Error::map(name, source)),
            }
        }
        Ok(None)
    }

    /// Every flow in both tables. Only for listings and recovery, never on
    /// the drain path.
    pub fn all_flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, Error> {
        let held: StdHashMap<FlowKey, FlowValue> = self.held()?.iter().filter_map(Result::ok).collect();
        let mut out: Vec<(FlowKey, FlowValue)> =
            self.flows()?.iter().filter_map(Result::ok).filter(|(k, _)| !held.contains_key(k)).collect();
        out.extend(held);
        Ok(out)
    }

    pub fn pod_ip_count(&self) -> usize {
        self.pod_ips().map(|m| m.keys().count()).unwrap_or(0)
    }

    /// The datapath statistics, summed over CPUs, indexed by `stats::*`.
    pub fn stats(&self) -> Result<[u64; stats::COUNT as usize], Error> {
        let a: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map(&self.ebpf, maps::STATS)?).map_err(|source| Error::map(maps::STATS, source))?;
        let mut out = [0u64; stats::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            if let Ok(values) = a.get(&i, 0) {
                *slot = values.iter().sum();
            }
        }
        Ok(out)
    }

    fn flows(&self) -> Result<HashMap<&MapData, FlowKey, FlowValue>, Error> {
        HashMap::try_from(map(&self.ebpf, maps::FLOWS)?).map_err(|source| Error::map(maps::FLOWS, source))
    }

    fn flows_mut(&mut self) -> Result<HashMap<&mut MapData, FlowKey, FlowValue>, Error> {
        HashMap::try_from(map_mut(&mut self.ebpf, maps::FLOWS)?).map_err(|source| Error::map(maps::FLOWS, source))
    }

    fn held(&self) -> Result<HashMap<&MapData, FlowKey, FlowValue>, Error> {
        HashMap::try_from(map(&self.ebpf, maps::HELD)?).map_err(|source| Error::map(maps::HELD, source))
    }

    fn pod_ips(&self) -> Result<HashMap<&MapData, PodIpKey, u32>, Error> {
        HashMap::try_from(map(&self.ebpf, maps::POD_IPS)?).map_err(|source| Error::map(maps::POD_IPS, source))
    }

    fn pod_ips_mut(&mut self) -> Result<HashMap<&mut MapData, PodIpKey, u32>, Error> {
        HashMap::try_from(map_mut(&mut self.ebpf, maps::POD_IPS)?).map_err(|source| Error::map(maps::POD_IPS, source))
    }

    fn pod_counters_mut(&mut self) -> Result<Array<&mut MapData, PodCounters>, Error> {
        Array::try_from(map_mut(&mut self.ebpf, maps::POD_COUNTERS)?)
            .map_err(|source| Error::map(maps::POD_COUNTERS, source))
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        let keep = self.keep_on_exit;
        if let Some(link) = self.sockets_link.take() {
            sockets::release(link, keep);
        }
        for (_, iface) in self.interfaces.drain() {
            if keep {
                attach::leave_attached(iface.links);
            } else {
                attach::detach(iface.links);
            }
        }
    }
}

/// `BPF_NOEXIST` (linux/bpf.h): insert only if the key is not there.
const BPF_NOEXIST: u64 = 1;

/// The node's own addresses, from `getifaddrs` in this network namespace.
#[must_use]
pub fn local_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below; we only read sockaddrs it owns.
    unsafe {
        if libc::getifaddrs(&raw mut list) != 0 {
            return out;
        }
        let mut p = list;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                match i32::from((*a).sa_family) {
                    libc::AF_INET => {
                        let sin = &*a.cast::<libc::sockaddr_in>();
                        out.push(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*a.cast::<libc::sockaddr_in6>();
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

/// Fills `NODE_ADDRS`, so that connections from the node itself (the
/// kubelet's probes) do not restart a terminating pod's quiet period.
fn fill_node_addrs(ebpf: &mut Ebpf) -> Result<(), Error> {
    let mut m: HashMap<&mut MapData, PodIpKey, u8> =
        HashMap::try_from(map_mut(ebpf, maps::NODE_ADDRS)?).map_err(|source| Error::map(maps::NODE_ADDRS, source))?;
    for ip in local_addrs() {
        if let Err(e) = m.insert(ip_key(ip), 1, 0) {
            tracing::warn!(%ip, error = %e, "recording a node address");
        }
    }
    Ok(())
}

impl Datapath {
    /// Re-reads the node's addresses (they may change while we run).
    pub fn refresh_node_addrs(&mut self) {
        if let Err(e) = fill_node_addrs(&mut self.ebpf) {
            tracing::warn!(error = %e, "refreshing node addresses");
        }
    }
}

/// The map key of a pod IP: IPv4 as IPv4-mapped IPv6, as the programs see it.
#[must_use]
pub fn ip_key(ip: IpAddr) -> PodIpKey {
    PodIpKey { addr: ip_bytes(ip) }
}

#[must_use]
pub fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Back from the map's 16 bytes to an address of the flow's family.
#[must_use]
pub fn ip_from_bytes(bytes: [u8; 16], family: u8) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(bytes);
    match (family, v6.to_ipv4_mapped()) {
        (conndrain_common::FAMILY_V4, Some(v4)) => IpAddr::V4(v4),
        _ => IpAddr::V6(v6),
    }
}

pub const MAX_POD_SLOTS: u32 = MAX_PODS;

fn map<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a aya::maps::Map, Error> {
    ebpf.map(name).ok_or(Error::MissingMap { name })
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut aya::maps::Map, Error> {
    ebpf.map_mut(name).ok_or(Error::MissingMap { name })
}
