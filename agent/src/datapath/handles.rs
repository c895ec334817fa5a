//! Typed handles on the maps the agent shares with the programs, taken out
//! of the loaded object once, right after the load: aya checks each key and
//! value size against the object there, so a layout mismatch (an agent built
//! against other `conndrain-common` types) fails the start with the map's
//! name, not a scrape or a drain later.
//!
//! The preStop intercept's maps stay with `intercept.rs` (loaded only when
//! the intercept runs), and the event ring with `events.rs`.

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
};
use conndrain_common::{
    Config, FlowKey, FlowValue, Pin, PodCounters, PodIpKey, PodSockets, ProbeKey, SockValue, WireKey, maps,
};

use crate::error::Error;

/// Flags of `bpf_map_update_elem` (linux/bpf.h); aya takes them as a `u64`
/// and does not name them.
pub mod update {
    /// Create or replace.
    pub const ANY: u64 = 0;
    /// Create only: fails if the key is there.
    pub const NOEXIST: u64 = 1;
    /// Replace only: fails if the key is not there.
    pub const EXIST: u64 = 2;
}

pub type FlowTable = HashMap<MapData, FlowKey, FlowValue>;

pub struct Maps {
    /// LRU: every tracked flow of the node's pods.
    pub flows: FlowTable,
    /// The flows of draining pods, out of the LRU's reach (`held.rs`).
    pub held: FlowTable,
    pub pod_flags: Array<MapData, u32>,
    pub pod_ips: HashMap<MapData, PodIpKey, u32>,
    pub pod_counters: Array<MapData, PodCounters>,
    pub config: Array<MapData, Config>,
    pub stats: PerCpuArray<MapData, u64>,
    /// Steered flows: wire tuple to backend.
    pub pins: HashMap<MapData, WireKey, Pin>,
    pub node_addrs: HashMap<MapData, PodIpKey, u8>,
    /// Open inbound sockets by socket cookie (`sockets.rs`).
    pub sockets: HashMap<MapData, u64, SockValue>,
    pub pod_sockets: Array<MapData, PodSockets>,
    /// Per pod and port: probe or ignored (`port_flags`).
    pub probes: HashMap<MapData, ProbeKey, u8>,
}

impl Maps {
    /// Takes the maps out of `ebpf`, typed.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, Error> {
        Ok(Self {
            flows: take(ebpf, maps::FLOWS)?,
            held: take(ebpf, maps::HELD)?,
            pod_flags: take(ebpf, maps::POD_FLAGS)?,
            pod_ips: take(ebpf, maps::POD_IPS)?,
            pod_counters: take(ebpf, maps::POD_COUNTERS)?,
            config: take(ebpf, maps::CONFIG)?,
            stats: take(ebpf, maps::STATS)?,
            pins: take(ebpf, maps::PINS)?,
            node_addrs: take(ebpf, maps::NODE_ADDRS)?,
            sockets: take(ebpf, maps::SOCKETS)?,
            pod_sockets: take(ebpf, maps::POD_SOCKETS)?,
            probes: take(ebpf, maps::PROBES)?,
        })
    }

    /// The one `Config` entry.
    pub fn config(&self) -> Result<Config, Error> {
        self.config.get(&0, 0).map_err(|source| Error::map(maps::CONFIG, source))
    }

    pub fn set_config(&mut self, c: Config) -> Result<(), Error> {
        self.config.set(0, c, 0).map_err(|source| Error::map(maps::CONFIG, source))
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let m = ebpf.take_map(name).ok_or(Error::MissingMap { name })?;
    T::try_from(m).map_err(|source| Error::map(name, source))
}
