//! The kernel side as the agent sees it: loading and attaching the programs,
//! the maps they share with us, and the events they send.

mod addrs;
mod attach;
mod bpffs;
mod events;
pub mod features;
mod handles;
mod held;
pub mod intercept;
mod pins;
mod pods;
mod route;
mod sockets;

use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    net::IpAddr,
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData},
};
use conndrain_common::{Config, FlowKey, FlowValue, MAX_PODS, PINNED_MAPS, PodCounters, maps, stats};

pub use addrs::{ip_bytes, ip_from_bytes, ip_key, local_addrs};
pub use attach::{AttachMode, remove_clsact_filters};
pub use bpffs::{RemovedKept, remove_all as remove_kept_under};
pub use events::EventReader;
pub use features::Features;
pub use pods::Registered;

use handles::update;

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
    /// The shared maps, typed (`handles.rs`).
    maps: handles::Maps,
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
    /// What made that gap, for `conndrain why`.
    pub sockets_gap: SocketsGap,
    /// The tracepoint's misses counted so far (`check_sockets_misses`).
    sockets_misses: u64,
    /// Entries in `HELD` as the agent counts them: see `held_count`.
    held_entries: usize,
}

/// What started the sockets tracepoint's watch at `sockets_since_ns`.
#[derive(Clone, Copy, Debug)]
pub enum SocketsGap {
    /// This agent's start, without an earlier agent's pinned link.
    Start,
    /// The kernel skipped the program this many times (`check_sockets_misses`).
    Skipped(u64),
}

impl std::fmt::Display for SocketsGap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Start => f.write_str(
                "the sockets tracepoint was not attached all along since it was registered (agent restarted without \
                 its pinned link)",
            ),
            Self::Skipped(n) => write!(
                f,
                "the kernel skipped the sockets tracepoint {n} time(s) since it was registered (a BPF program or map \
                 operation held the CPU): a connection it opened may be unknown"
            ),
        }
    }
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
        loader.map_max_entries(maps::EVENTS, events::ring_bytes(opts.max_flows));
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
        let mut shared = handles::Maps::take(&mut ebpf)?;
        // Once, at load (a reused `HELD`); bounded by MAX_HELD, not the flow table.
        let held_entries = shared.held.keys().count();
        let earlier_since = shared.config().map_or(0, |c| c.sockets_since_ns);
        addrs::fill_node_addrs(&mut shared);
        let ingress = attach::ingress_program(features.steering);
        let mode = attach::load_programs(&mut ebpf, ingress, opts.attach)?;
        let (sockets_link, continuous) = sockets::attach(&mut ebpf, pins.as_ref())?;
        let kept = [maps::SOCKETS, maps::POD_SOCKETS, maps::CONFIG].iter().all(|m| checked.reused.contains(m));
        let sockets_since_ns =
            if continuous && kept && earlier_since != 0 { earlier_since } else { crate::clock::now_ns() };
        let sockets_misses = sockets::misses(&ebpf).unwrap_or(0);
        // Pins left by an earlier agent: no_pins 0 and the pin filter off (look
        // up every packet) until the steering loop has released them all.
        // None: the filter starts empty and on, and each pin sets its bit.
        let none = u32::from(shared.pins.keys().next().is_none());
        shared.set_config(Config {
            udp_timeout_ns: opts.udp_timeout_ns,
            no_pins: none,
            pin_filter_on: none,
            sockets_since_ns,
            ..Config::default()
        })?;
        let events = EventReader::new(&mut ebpf)?;
        let route = route::Router::new()?;
        let keep_on_exit = pins.is_some() && !opts.detach_on_exit;
        Ok((
            Self {
                ebpf,
                maps: shared,
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
                sockets_gap: SocketsGap::Start,
                sockets_misses,
                held_entries,
            },
            events,
        ))
    }

    /// Looks for socket state changes the kernel did not run the sockets
    /// tracepoint for (`sockets::misses`). Each may be an open `SOCKETS`
    /// lacks, so the sockets are known again only from now on: pods
    /// registered before go to their deadline unless their flows hold them
    /// longer (a missed close merely holds the pod).
    pub fn check_sockets_misses(&mut self) {
        let Some(misses) = sockets::misses(&self.ebpf) else { return };
        if misses <= self.sockets_misses {
            return;
        }
        let new = misses - self.sockets_misses;
        self.sockets_misses = misses;
        self.sockets_since_ns = crate::clock::now_ns();
        self.sockets_gap = SocketsGap::Skipped(new);
        // Kept for a restarted agent, which reuses CONFIG's `sockets_since_ns`.
        let saved = self
            .maps
            .config()
            .and_then(|c| self.maps.set_config(Config { sockets_since_ns: self.sockets_since_ns, ..c }));
        tracing::warn!(
            misses,
            saved = saved.is_ok(),
            "the kernel skipped the sockets tracepoint: pods registered before now cannot be confirmed drained by \
             their sockets (they go to their deadline)"
        );
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

    /// Ends a start with `--bpffs`, once the restored pods and pins are back:
    /// copies the flows of a resized flow table into the new one, and
    /// detaches the links pinned for interfaces nothing needs any more.
    pub fn finish_restore(&mut self) {
        if let Some(old) = self.old_flows.take() {
            // A second walk, only when --max-flows changed. The programs write
            // to the new table already (their links were swapped), so flows
            // they created since win: BPF_NOEXIST.
            let flows = &mut self.maps.flows;
            let copied = aya::maps::Map::from_map_data(old)
                .ok()
                .and_then(|m| HashMap::<_, FlowKey, FlowValue>::try_from(m).ok())
                .map_or(0, |old| {
                    old.iter()
                        .filter_map(Result::ok)
                        .filter(|(k, v)| flows.insert(*k, *v, update::NOEXIST).is_ok())
                        .count()
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

    pub fn interfaces(&self) -> impl Iterator<Item = &Interface> {
        self.interfaces.values()
    }

    pub fn counters(&self, slot: u32) -> Result<PodCounters, Error> {
        self.maps.pod_counters.get(&slot, 0).map_err(|source| Error::map(maps::POD_COUNTERS, source))
    }

    /// Point lookup of one flow: `HELD`, `FLOWS`, then `HELD` again. Flows
    /// only move from `FLOWS` to `HELD` (see `held.rs`), so a flow moved
    /// between the first two reads is found by the third, instead of looking
    /// evicted and leaving the index for good.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>, Error> {
        let m = &self.maps;
        for (name, table) in [(maps::HELD, &m.held), (maps::FLOWS, &m.flows), (maps::HELD, &m.held)] {
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
        let held: StdHashMap<FlowKey, FlowValue> = self.maps.held.iter().filter_map(Result::ok).collect();
        let mut out: Vec<(FlowKey, FlowValue)> =
            self.maps.flows.iter().filter_map(Result::ok).filter(|(k, _)| !held.contains_key(k)).collect();
        out.extend(held);
        Ok(out)
    }

    /// The datapath statistics, summed over CPUs, indexed by `stats::*`.
    pub fn stats(&self) -> Result<[u64; stats::COUNT as usize], Error> {
        let a = &self.maps.stats;
        let mut out = [0u64; stats::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            if let Ok(values) = a.get(&i, 0) {
                *slot = values.iter().sum();
            }
        }
        Ok(out)
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

pub const MAX_POD_SLOTS: u32 = MAX_PODS;

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut aya::maps::Map, Error> {
    ebpf.map_mut(name).ok_or(Error::MissingMap { name })
}
