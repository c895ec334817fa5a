//! Pinning established flows to their old backend while kube-proxy removes
//! its rules (design: docs/steering.md).
//!
//! When a backend starts terminating, the agent reads the kernel's own
//! translation of each of its flows from conntrack (client → frontend became
//! peer → backend, with kube-proxy's SNAT for NodePort traffic to another
//! node) and writes it into the `PINS` map, one entry per direction. From then
//! on the TC programs rewrite and redirect those packets themselves, ahead of
//! netfilter, so rule rewrites, `conntrack -F` or kube-proxy's UDP cleanup no
//! longer move them. New flows never match a pin and go wherever the rules
//! send them.
//!
//! Learning is repeated every second while a backend terminates, so flows that
//! still reach it through stale rules elsewhere are pinned too. A pin is
//! released when its flow closes (FIN both ways or RST), when a UDP flow is
//! idle for the UDP timeout, or shortly after its pod is removed (then TCP
//! segments are answered with a RST meanwhile). Not at the backend's
//! deadline: a pinned flow's packets never met kube-proxy's conntrack entry,
//! whose TCP window is stale by then, so released alive its next segments
//! (the final FIN too) would be dropped as INVALID. Only if the pod is never
//! seen gone, a live pin is released `--pin-limit` after the deadline.
//!
//! With `--bpffs`, the node saves this state (`save`) on every change and a
//! restarted agent takes it back (`restore`): the `PINS` entries themselves
//! stayed in the pinned map and kept steering while no agent ran.

//!
//! - `kernel`: what the state machine needs of the datapath ([`PinDatapath`])
//! - `learn`: which conntrack entries to pin and how ([`Steering::apply`])
//! - `pins`: a pin's life until it is released ([`Steering::sweep`])
//! - `saved`: the state saved across restarts ([`SavedSteering`])

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use conndrain_common::{FAMILY_V4, FAMILY_V6, WireKey};

pub use crate::conntrack::Translation;
use crate::datapath;

mod kernel;
mod learn;
mod pins;
mod saved;
#[cfg(test)]
mod tests;

pub use kernel::PinDatapath;
pub use learn::pinnable;
pub use pins::{PinnedFlow, Release};
pub use saved::{SavedBackend, SavedPin, SavedPinView, SavedSteering};

struct Backend {
    pod: String,
    deadline_ns: u64,
    /// When this agent started learning its flows (`CLOCK_MONOTONIC` ns).
    since_ns: u64,
}

/// For how long after a backend starts terminating its flows are learned
/// every second. New flows reach it through this node's rules only until
/// kube-proxy's next sync removes its endpoint (a second or two; longer in
/// very large clusters), so afterwards a round every [`LEARN_SLOW_ROUNDS`]
/// seconds is a safety net, not a race: with 100k conntrack entries each
/// round costs the kernel a walk of the table per backend.
const LEARN_FAST_NS: u64 = 60_000_000_000;
/// Once past [`LEARN_FAST_NS`], every this many rounds (seconds).
pub const LEARN_SLOW_ROUNDS: u64 = 10;

#[derive(Default)]
pub struct Steering {
    backends: HashMap<IpAddr, Backend>,
    /// By forward key.
    pins: HashMap<WireKey, PinnedFlow>,
    /// Reverse key → forward key, to label flows seen from the pod's side.
    by_rev: HashMap<WireKey, WireKey>,
    /// Counts changes to what `save` returns, so the node saves only then.
    changes: u64,
    /// Flows that could not be pinned (no route to their peer, a full map):
    /// learning retries them every round, and says so once, not every second.
    unpinnable: HashSet<WireKey>,
}

fn wire_key(proto: u8, src: SocketAddr, dst: SocketAddr) -> WireKey {
    WireKey {
        src: datapath::ip_bytes(src.ip()),
        dst: datapath::ip_bytes(dst.ip()),
        sport: src.port(),
        dport: dst.port(),
        proto,
        family: if src.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 },
        _pad: [0; 2],
    }
}

/// An address with IPv4 unmapped, as conntrack may report IPv4 in an IPv4-mapped form.
#[must_use]
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
        IpAddr::V4(_) => a,
    }
}

impl Steering {
    #[must_use]
    pub fn has_backends(&self) -> bool {
        !self.backends.is_empty()
    }

    /// The terminating backends whose flows to learn now: those that started
    /// terminating less than [`LEARN_FAST_NS`] ago, or with `all`, every one.
    #[must_use]
    pub fn backends_to_learn(&self, now: u64, all: bool) -> Vec<IpAddr> {
        self.backends
            .iter()
            .filter(|(_, b)| all || now.saturating_sub(b.since_ns) < LEARN_FAST_NS)
            .map(|(ip, _)| *ip)
            .collect()
    }

    pub fn pinned(&self) -> usize {
        self.pins.len()
    }

    /// Goes up with every change to the saved state.
    #[must_use]
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Starts pinning the flows of `ips` (a terminating pod) until `deadline_ns`.
    pub fn add_backend(&mut self, pod: &str, ips: &[IpAddr], deadline_ns: u64, now: u64) {
        for ip in ips {
            let since_ns = self.backends.get(ip).map_or(now, |b| b.since_ns);
            self.backends.insert(*ip, Backend { pod: pod.to_owned(), deadline_ns, since_ns });
        }
        self.changes += 1;
    }

    /// The pin of a flow seen from its pod's side (pod → peer is the reverse direction).
    #[must_use]
    pub fn for_pod_flow(&self, pod: SocketAddr, peer: SocketAddr, proto: u8) -> Option<&PinnedFlow> {
        let rev = wire_key(proto, pod, peer);
        self.by_rev.get(&rev).and_then(|f| self.pins.get(f))
    }

    /// Every pinned flow, in no order.
    pub fn pins(&self) -> impl Iterator<Item = &PinnedFlow> {
        self.pins.values()
    }
}
