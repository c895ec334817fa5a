//! The kernel side as the agent sees it: loading and attaching the programs,
//! the maps they share with us, and the events they send.

mod attach;
mod events;
pub mod features;
mod route;

use std::{
    collections::HashMap as StdHashMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
};
use conndrain_common::{
    Config, FlowKey, FlowValue, MAX_PODS, Pin, PodCounters, PodIpKey, WireKey, maps, stats,
};

pub use attach::AttachMode;
pub use events::EventReader;
pub use features::Features;

use crate::error::Error;

/// Settings fixed at load time.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Size of the flow table (LRU: when full, the least recently used flow goes).
    pub max_flows: u32,
    /// A UDP flow idle this long is over.
    pub udp_timeout_ns: u64,
    /// Where to pin the maps (bpffs), if anywhere.
    pub bpffs: Option<PathBuf>,
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
    pub max_flows: u32,
    interfaces: StdHashMap<u32, Interface>,
    route: route::Router,
    /// Attached to every interface (for steering).
    everywhere: bool,
}

impl Datapath {
    /// Loads the embedded programs and maps; attaches nothing yet.
    pub fn load(opts: &LoadOptions) -> Result<(Self, EventReader), Error> {
        if crate::EBPF_OBJECT.is_empty() {
            return Err(Error::NoEbpfObject);
        }
        let features = Features::detect();
        features.require()?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::FLOWS, opts.max_flows)
            .load(crate::EBPF_OBJECT)
            .map_err(|source| Error::Load { source: Box::new(source) })?;
        {
            let mut config: Array<_, Config> = Array::try_from(map_mut(&mut ebpf, maps::CONFIG)?)
                .map_err(|source| Error::map(maps::CONFIG, source))?;
            config
                .set(0, Config { udp_timeout_ns: opts.udp_timeout_ns }, 0)
                .map_err(|source| Error::map(maps::CONFIG, source))?;
        }
        if let Some(dir) = &opts.bpffs {
            pin_maps(&ebpf, dir)?;
        }
        let mode = attach::load_programs(&mut ebpf)?;
        let events = EventReader::new(&mut ebpf)?;
        let route = route::Router::new()?;
        Ok((
            Self { ebpf, features, mode, max_flows: opts.max_flows, interfaces: StdHashMap::new(), route, everywhere: false },
            events,
        ))
    }

    /// Registers a pod's IPs under `slot` and attaches to the interfaces that
    /// route to them. Returns the interface indexes, to hand back to
    /// `unregister_pod`. On error nothing stays registered.
    pub async fn register_pod(&mut self, slot: u32, ips: &[IpAddr]) -> Result<Vec<u32>, Error> {
        let mut ifindexes = Vec::new();
        for ip in ips {
            let ifindex = self.route.oif(*ip).await?;
            if !ifindexes.contains(&ifindex) {
                ifindexes.push(ifindex);
            }
        }
        // Zero the counters: the slot may have belonged to a removed pod.
        self.pod_counters_mut()?
            .set(slot, PodCounters::default(), 0)
            .map_err(|source| Error::map(maps::POD_COUNTERS, source))?;
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
        Ok(ifindexes)
    }

    pub fn unregister_pod(&mut self, ips: &[IpAddr], ifindexes: &[u32]) {
        if let Ok(mut pod_ips) = self.pod_ips_mut() {
            for ip in ips {
                if let Err(e) = pod_ips.remove(&ip_key(*ip)) {
                    tracing::warn!(%ip, error = %e, "removing pod IP from the datapath");
                }
            }
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
        let links = attach::attach(&mut self.ebpf, &name, self.mode)?;
        tracing::info!(interface = %name, ifindex, mode = ?self.mode, "attached");
        self.interfaces.insert(ifindex, Interface { name, ifindex, pods: 1, links });
        Ok(())
    }

    fn release(&mut self, ifindex: u32) {
        let Some(iface) = self.interfaces.get_mut(&ifindex) else { return };
        iface.pods -= 1;
        if iface.pods > 0 {
            return;
        }
        if let Some(iface) = self.interfaces.remove(&ifindex) {
            attach::detach(&mut self.ebpf, iface.links);
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
                if name != "lo" {
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

    /// Route lookup: the interface and neighbour for `ip`.
    pub async fn route(&mut self, ip: IpAddr) -> Result<(u32, IpAddr), Error> {
        self.route.lookup(ip).await
    }

    pub fn pin_insert(&mut self, key: &WireKey, pin: &Pin) -> Result<(), Error> {
        self.pins_mut()?.insert(*key, *pin, 0).map_err(|source| Error::map(maps::PINS, source))
    }

    pub fn pin(&self, key: &WireKey) -> Option<Pin> {
        let pins: HashMap<&MapData, WireKey, Pin> = HashMap::try_from(map(&self.ebpf, maps::PINS).ok()?).ok()?;
        pins.get(key, 0).ok()
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

    /// Point lookup of one flow.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>, Error> {
        let flows = self.flows()?;
        match flows.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(Error::map(maps::FLOWS, source)),
        }
    }

    /// Every flow in the table. Only for listings and recovery, never on the
    /// drain path.
    pub fn all_flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, Error> {
        let flows = self.flows()?;
        Ok(flows.iter().filter_map(Result::ok).collect())
    }

    pub fn pod_ip_count(&self) -> usize {
        self.pod_ips().map(|m| m.keys().count()).unwrap_or(0)
    }

    /// The datapath statistics, summed over CPUs, indexed by `stats::*`.
    pub fn stats(&self) -> Result<[u64; stats::COUNT as usize], Error> {
        let a: PerCpuArray<_, u64> = PerCpuArray::try_from(map(&self.ebpf, maps::STATS)?)
            .map_err(|source| Error::map(maps::STATS, source))?;
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

    fn pod_ips(&self) -> Result<HashMap<&MapData, PodIpKey, u32>, Error> {
        HashMap::try_from(map(&self.ebpf, maps::POD_IPS)?).map_err(|source| Error::map(maps::POD_IPS, source))
    }

    fn pod_ips_mut(&mut self) -> Result<HashMap<&mut MapData, PodIpKey, u32>, Error> {
        HashMap::try_from(map_mut(&mut self.ebpf, maps::POD_IPS)?)
            .map_err(|source| Error::map(maps::POD_IPS, source))
    }

    fn pod_counters_mut(&mut self) -> Result<Array<&mut MapData, PodCounters>, Error> {
        Array::try_from(map_mut(&mut self.ebpf, maps::POD_COUNTERS)?)
            .map_err(|source| Error::map(maps::POD_COUNTERS, source))
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        let ifaces: Vec<u32> = self.interfaces.keys().copied().collect();
        for i in ifaces {
            if let Some(iface) = self.interfaces.remove(&i) {
                attach::detach(&mut self.ebpf, iface.links);
            }
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

/// Pins the flow and pod maps under `dir` so `bpftool` and later agents can
/// find them. `dir` must be on a bpffs.
fn pin_maps(ebpf: &Ebpf, dir: &Path) -> Result<(), Error> {
    features::require_bpffs(dir)?;
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { op: "creating", path: dir.to_path_buf(), source })?;
    for name in [maps::FLOWS, maps::POD_IPS, maps::POD_COUNTERS] {
        let path = dir.join(name);
        // A pin left by an earlier agent: ours replaces it.
        let _ = std::fs::remove_file(&path);
        map(ebpf, name)?
            .pin(&path)
            .map_err(|e| Error::Pin { path: path.clone(), reason: e.to_string() })?;
    }
    Ok(())
}
