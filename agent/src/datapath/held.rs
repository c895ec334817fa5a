//! `HELD`: the flows of draining pods, out of the LRU flow table's reach.
//!
//! `FLOWS` is an LRU map so that a flood of new flows can never make the
//! datapath fail to track; the price is that the flood evicts the least
//! recently used flows, and an idle keep-alive or a quiet stream of a
//! draining pod would vanish, making the pod look drained while it still
//! serves. So once a pod drains, its flows live in `HELD`, a plain hash map
//! nothing evicts: the programs put its new flows there and move the others
//! at their next packet; the agent moves the ones it knows when the drain
//! starts (idle flows may send no packet before the flood), sweeps out the
//! finished ones, and removes the rest with the pod.

use conndrain_common::{FlowKey, FlowValue, PROTO_TCP, maps, pod_flags, tcp_state};

use super::{
    Datapath,
    handles::{Maps, update},
};
use crate::error::Error;

/// A closed TCP flow stays this long, so that its last segments (and the
/// peer's retransmissions) match it instead of opening a phantom flow; as
/// long as Linux's `TIME_WAIT`, twice.
const CLOSED_LINGER_NS: u64 = 120_000_000_000;
/// A handshake that did not complete in this long is over (SYN floods
/// against a draining pod must not fill `HELD` for good).
const HALF_OPEN_LINGER_NS: u64 = 30_000_000_000;

impl Datapath {
    pub(super) fn set_pod_flags(&mut self, slot: u32, flags: u32) -> Result<(), Error> {
        self.maps.pod_flags.set(slot, flags, update::ANY).map_err(|source| Error::map(maps::POD_FLAGS, source))
    }

    fn pod_draining(&self, slot: u32) -> bool {
        self.maps.pod_flags.get(&slot, 0).is_ok_and(|f| f & pod_flags::DRAINING != 0)
    }

    /// The pod drains: from now on the programs keep its flows in `HELD`;
    /// its flows in `known` are moved there now. Returns how many moved.
    ///
    /// The flag goes first, so the programs already move any of these flows
    /// that sends a packet meanwhile; our copy then finds it in `HELD` and
    /// leaves it. What can still race is a packet handled on a CPU that read
    /// the flag just before we set it: its update of `FLOWS` may be lost,
    /// which the flow's next packet repairs.
    pub fn hold_pod(&mut self, slot: u32, known: &[FlowKey]) -> Result<usize, Error> {
        self.set_pod_flags(slot, pod_flags::DRAINING)?;
        let Maps { flows, held, .. } = &mut self.maps;
        let mut moved = 0;
        for key in known {
            let Ok(v) = flows.get(key, 0) else { continue };
            match held.insert(key, v, update::NOEXIST) {
                Ok(()) => moved += 1,
                // Moved by the programs already; anything else: `HELD` is
                // full, and the flow stays where it is.
                Err(_) if held.get(key, 0).is_ok() => {}
                Err(e) => {
                    tracing::warn!(error = %e, "HELD has no room: a draining pod's flow stays in the LRU table");
                    continue;
                }
            }
            let _ = flows.remove(key);
        }
        self.held_entries += moved;
        Ok(moved)
    }

    /// The pod is gone: clears its flag and removes its flows from both
    /// tables (`known` from `FLOWS`; `HELD` is small and searched whole).
    pub(super) fn forget_pod_flows(&mut self, slot: u32, known: &[FlowKey]) {
        if let Err(e) = self.set_pod_flags(slot, 0) {
            tracing::warn!(slot, error = %e, "clearing a removed pod's flags");
        }
        let Maps { flows, held, .. } = &mut self.maps;
        for key in known {
            let _ = flows.remove(key);
        }
        let entries: Vec<(FlowKey, FlowValue)> = held.iter().filter_map(Result::ok).collect();
        let stale = entries.iter().filter(|(_, v)| v.pod_slot == slot);
        let removed = stale.filter(|(key, _)| held.remove(key).is_ok()).count();
        // This walk counted them all: exact again, like after a sweep.
        self.held_entries = entries.len().saturating_sub(removed);
    }

    /// Removes from `HELD` what no drain waits for any more: flows of pods
    /// that are not draining (removed while no agent ran), and flows long
    /// over (closed, half-open, UDP past its timeout). Returns those that
    /// went, with their pod slots, for the flow index to forget.
    pub fn sweep_held(&mut self, now_ns: u64, udp_timeout_ns: u64) -> Vec<(u32, FlowKey)> {
        let entries: Vec<(FlowKey, FlowValue)> = self.maps.held.iter().filter_map(Result::ok).collect();
        let seen = entries.len();
        let over: Vec<(u32, FlowKey)> = entries
            .into_iter()
            .filter(|(k, v)| !self.pod_draining(v.pod_slot) || finished(k, v, now_ns, udp_timeout_ns))
            .map(|(k, v)| (v.pod_slot, k))
            .collect();
        let swept: Vec<(u32, FlowKey)> = over.into_iter().filter(|(_, k)| self.maps.held.remove(k).is_ok()).collect();
        self.held_entries = seen.saturating_sub(swept.len());
        swept
    }

    /// Entries in `HELD` as the agent counts them, without a walk: as many as
    /// its last walk of `HELD` left (`sweep_held` every 5 s, or a pod's
    /// removal), plus the flows it moved there since. Flows the programs put there
    /// since the last sweep (new flows of a draining pod, moved at their next
    /// packet) count from the next sweep.
    #[must_use]
    pub fn held_count(&self) -> usize {
        self.held_entries
    }
}

/// Whether a held flow is over for good.
fn finished(k: &FlowKey, v: &FlowValue, now_ns: u64, udp_timeout_ns: u64) -> bool {
    let idle = now_ns.saturating_sub(v.last_seen_ns);
    if k.proto != PROTO_TCP {
        // Its next packet would open a new flow anyway.
        return idle > udp_timeout_ns;
    }
    if v.state == tcp_state::CLOSED {
        return idle > CLOSED_LINGER_NS;
    }
    if v.state == tcp_state::SYN_SENT || v.state == tcp_state::SYN_RECV {
        return idle > HALF_OPEN_LINGER_NS;
    }
    // Established TCP stays however long it idles: the drain's deadline
    // decides about it.
    false
}
