//! The flow index and the evidence a verdict rests on, over any [`Tables`]:
//! the kernel maps in the agent, an in-memory stand-in in the unit tests
//! below (the way kube-runtime tests its reflector store).
//!
//! Two sources, one rule. The index is fed by the programs' events and
//! counts each pod's flows by point lookups in the flow tables (never a
//! walk); it is fast, but it only knows what passed an attached interface
//! and what the event ring had room for. The sockets tracepoint keeps the
//! pods' open inbound TCP sockets whatever path their packets took. A pod
//! is confirmed drained only when every one of its open inbound sockets is
//! a flow the index knows as an idle keep-alive: any other open socket
//! holds it. See `docs/drained.md`.

use std::collections::HashMap;

use conndrain_common::{FlowEvent, FlowKey, FlowValue, PROTO_UDP, PodSockets, SockValue, event_kind, flow_flags};

use crate::{
    drain::{self, Counting, FlowClass, FlowCounts},
    error::Error,
};

/// What the index reads from the kernel.
pub trait Tables {
    /// One flow, from `HELD` or `FLOWS`.
    fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>, Error>;
    /// A pod's socket counters.
    fn pod_sockets(&self, slot: u32) -> Result<PodSockets, Error>;
    /// A pod's open inbound sockets.
    fn open_sockets(&self, slot: u32) -> Result<Vec<SockValue>, Error>;
}

impl Tables for crate::datapath::Datapath {
    fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>, Error> {
        Self::flow(self, key)
    }
    fn pod_sockets(&self, slot: u32) -> Result<PodSockets, Error> {
        Self::pod_sockets(self, slot)
    }
    fn open_sockets(&self, slot: u32) -> Result<Vec<SockValue>, Error> {
        Self::open_sockets(self, slot)
    }
}

/// Live flows per pod slot, with the `first_seen_ns` that identifies their
/// incarnation.
#[derive(Clone, Default)]
pub struct FlowIndex {
    by_slot: HashMap<u32, HashMap<FlowKey, u64>>,
    /// Each pod's latest full count, and when it was made: what a listing
    /// shows for a pod too large to count afresh (`node/census.rs`).
    counted: HashMap<u32, Counted>,
    /// Flows found gone or replaced while still indexed (LRU evictions).
    pub evicted: u64,
    /// Flows found in the tables through an open socket, that no event had
    /// brought (the event ring was full).
    pub reconciled: u64,
}

/// A pod's flows counted at `at_ns`.
#[derive(Clone, Copy, Debug)]
pub struct Counted {
    pub counts: FlowCounts,
    pub at_ns: u64,
}

/// What `FlowIndex::classify_range` found.
#[derive(Debug, Default)]
pub struct Classified {
    pub counts: FlowCounts,
    /// The next time one of these flows changes class on its own.
    pub next: Option<u64>,
    /// The flows themselves, when asked for.
    pub flows: Vec<(FlowKey, FlowValue, FlowClass)>,
    /// Flows looked up.
    pub visited: usize,
    /// Of those, the ones found gone and dropped from the index.
    pub removed: usize,
}

/// One open inbound socket that holds its pod, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldBySocket {
    pub key: FlowKey,
    pub why: SocketHold,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketHold {
    /// The packet path never saw this connection (another path, evicted, or
    /// another network namespace with the pod's address).
    Unseen,
    /// The packet path has it as closed or as the pod's own outbound flow,
    /// but the socket says it is open and was opened by a peer.
    Misread,
}

/// What the pod's sockets say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SocketEvidence {
    /// Open inbound TCP sockets.
    pub open: u64,
    /// Those not accounted for by an active or idle flow of the index.
    pub holding: Vec<HeldBySocket>,
    /// Why the sockets cannot confirm a drain at all, if they cannot.
    pub incomplete: Option<String>,
}

impl FlowIndex {
    pub fn add_slot(&mut self, slot: u32) {
        self.by_slot.insert(slot, HashMap::new());
        self.counted.remove(&slot);
    }

    /// Forgets a slot; returns the keys it had.
    pub fn remove_slot(&mut self, slot: u32) -> Vec<FlowKey> {
        self.counted.remove(&slot);
        self.by_slot.remove(&slot).map(|m| m.into_keys().collect()).unwrap_or_default()
    }

    /// Keeps `counts`, a full count of the pod's flows made at `at_ns`.
    pub fn remember(&mut self, slot: u32, counts: FlowCounts, at_ns: u64) {
        if self.by_slot.contains_key(&slot) {
            self.counted.insert(slot, Counted { counts, at_ns });
        }
    }

    /// The pod's latest full count, if it was counted since it got its slot.
    #[must_use]
    pub fn counted(&self, slot: u32) -> Option<Counted> {
        self.counted.get(&slot).copied()
    }

    #[must_use]
    pub fn keys(&self, slot: u32) -> Vec<FlowKey> {
        self.by_slot.get(&slot).map(|m| m.keys().copied().collect()).unwrap_or_default()
    }

    /// Flows the index knows of, over all pods: the established TCP and the
    /// UDP flows the events reported, less those seen closed or gone. A flow
    /// the LRU evicted (no event says so) stays counted until its pod's flows
    /// are next counted. O(pods), never a walk of the tables.
    #[must_use]
    pub fn tracked(&self) -> usize {
        self.by_slot.values().map(HashMap::len).sum()
    }

    #[must_use]
    pub fn is_empty(&self, slot: u32) -> bool {
        self.by_slot.get(&slot).is_none_or(HashMap::is_empty)
    }

    /// The agent took these flows out of the tables (`Datapath::sweep_held`):
    /// gone, but not evicted.
    pub fn forget(&mut self, swept: &[(u32, FlowKey)]) {
        for (slot, key) in swept {
            if let Some(flows) = self.by_slot.get_mut(slot) {
                flows.remove(key);
            }
        }
    }

    pub fn insert(&mut self, slot: u32, key: FlowKey, first_seen_ns: u64) {
        if let Some(flows) = self.by_slot.get_mut(&slot) {
            flows.insert(key, first_seen_ns);
        }
    }

    /// Applies one datapath event.
    pub fn on_event(&mut self, ev: &FlowEvent) {
        let Some(flows) = self.by_slot.get_mut(&ev.pod_slot) else {
            return;
        };
        match ev.kind {
            // Half-open TCP flows are not indexed: a SYN flood must not grow it.
            event_kind::NEW if ev.key.proto == PROTO_UDP => {
                flows.insert(ev.key, ev.first_seen_ns);
            }
            event_kind::ESTABLISHED => {
                flows.insert(ev.key, ev.first_seen_ns);
            }
            event_kind::CLOSED => {
                flows.remove(&ev.key);
            }
            _ => {}
        }
    }

    /// Counts the pod's indexed flows by point lookups. Drops entries whose
    /// flow is gone or was replaced (evicted or timed out). Inbound flows to
    /// `ignore_ports` (the pod's settings) are counted apart and hold
    /// nothing. Returns the counts, the next time a flow changes class on
    /// its own, and the flows themselves when `collect`.
    pub fn classify_pod(
        &mut self,
        tables: &impl Tables,
        slot: u32,
        now: u64,
        c: Counting<'_>,
        collect: bool,
    ) -> (FlowCounts, Option<u64>, Vec<(FlowKey, FlowValue, FlowClass)>) {
        let part = self.classify_range(tables, slot, 0, usize::MAX, now, c, collect);
        (part.counts, part.next, part.flows)
    }

    /// The pod's indexed flows.
    #[must_use]
    pub fn len(&self, slot: u32) -> usize {
        self.by_slot.get(&slot).map_or(0, HashMap::len)
    }

    /// `classify_pod` of at most `limit` of the pod's flows, from the
    /// `from`th in the index's order: a census of a large pod in steps, each
    /// a short hold of the agent's lock (`node/census.rs`). The order holds
    /// between steps unless flows are added meanwhile; a census is a count
    /// for display, never a drain verdict, so a flow counted twice or missed
    /// then is acceptable.
    pub fn classify_range(
        &mut self,
        tables: &impl Tables,
        slot: u32,
        from: usize,
        limit: usize,
        now: u64,
        c: Counting<'_>,
        collect: bool,
    ) -> Classified {
        let mut part = Classified::default();
        let Some(flows) = self.by_slot.get_mut(&slot) else {
            return part;
        };
        let mut gone = Vec::new();
        for (key, first_seen) in flows.iter().skip(from).take(limit) {
            part.visited += 1;
            let v = match tables.flow(key) {
                Ok(Some(v)) if v.first_seen_ns == *first_seen => v,
                // Replaced: a new incarnation on the same tuple (a reused port,
                // a UDP session after its timeout) means the old one ended; its
                // event may still be on its way. Only one the programs picked
                // up mid-stream shows the old flow was lost while live.
                Ok(Some(v)) => {
                    if v.flags & flow_flags::PICKED_UP != 0 {
                        self.evicted += 1;
                    }
                    gone.push(*key);
                    continue;
                }
                // Nothing else takes a flow out while it is indexed (the agent's
                // sweeps and the pod's removal tell the index first).
                Ok(None) => {
                    self.evicted += 1;
                    gone.push(*key);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "flow lookup");
                    // Unknown: count it as holding rather than lose it.
                    part.counts.active += 1;
                    continue;
                }
            };
            let (class, changes_at) = drain::classify_for(key, &v, now, c);
            match class {
                FlowClass::Active => part.counts.active += 1,
                FlowClass::Idle => part.counts.idle += 1,
                FlowClass::Outbound => part.counts.outbound += 1,
                FlowClass::Ignored => part.counts.ignored += 1,
                FlowClass::Inactive => {
                    gone.push(*key);
                    continue;
                }
            }
            if let Some(c) = changes_at {
                part.next = Some(part.next.map_or(c, |n: u64| n.min(c)));
            }
            if collect {
                part.flows.push((*key, v, class));
            }
        }
        part.removed = gone.len();
        for k in gone {
            flows.remove(&k);
        }
        part
    }

    /// Checks the pod's open inbound sockets against the index. A socket
    /// whose flow the tables hold but the index lacks (its event was lost)
    /// is indexed now. A socket on one of `ignore_ports` holds nothing: it
    /// is a connection a peer opened to that listening port of the pod (the
    /// tracepoint records passive opens only), exactly what the pod's
    /// settings ignore. Reads `SOCKETS` only when the pod's counter says it
    /// has open sockets.
    pub fn sockets(&mut self, tables: &impl Tables, slot: u32, now: u64, c: Counting<'_>) -> SocketEvidence {
        let counters = match tables.pod_sockets(slot) {
            Ok(c) => c,
            Err(e) => return incomplete(format!("its socket counters cannot be read ({e})")),
        };
        if counters.lost > 0 {
            return incomplete(format!(
                "{} of its sockets did not fit the sockets table (SOCKETS is full)",
                counters.lost
            ));
        }
        let mut ev = SocketEvidence { open: counters.open, ..SocketEvidence::default() };
        if counters.open == 0 {
            return ev;
        }
        let open = match tables.open_sockets(slot) {
            Ok(o) => o,
            Err(e) => return incomplete(format!("its sockets cannot be read ({e})")),
        };
        ev.open = open.len() as u64;
        for s in open {
            let indexed = self.by_slot.get(&slot).and_then(|m| m.get(&s.key)).copied();
            let flow = match tables.flow(&s.key) {
                Ok(f) => f,
                Err(e) => return incomplete(format!("a flow cannot be read ({e})")),
            };
            let why = match flow {
                None => Some(SocketHold::Unseen),
                Some(v) => {
                    if indexed != Some(v.first_seen_ns) {
                        self.insert(slot, s.key, v.first_seen_ns);
                        self.reconciled += 1;
                    }
                    match drain::classify(s.key.proto, &v, now, c.timeouts).0 {
                        // Already counted as active flows.
                        FlowClass::Active | FlowClass::Idle | FlowClass::Ignored => None,
                        FlowClass::Outbound | FlowClass::Inactive => Some(SocketHold::Misread),
                    }
                }
            };
            if let Some(why) = why
                && !c.ignore_ports.contains(&s.key.pod_port)
            {
                ev.holding.push(HeldBySocket { key: s.key, why });
            }
        }
        ev
    }
}

fn incomplete(why: String) -> SocketEvidence {
    SocketEvidence { incomplete: Some(why), ..SocketEvidence::default() }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use conndrain_common::{PROTO_TCP, direction, tcp_state};

    use crate::drain::Timeouts;

    use super::*;

    const S: u64 = 1_000_000_000;
    const T: Timeouts = Timeouts { idle_ns: 30 * S, udp_ns: 30 * S };

    fn ignoring(ports: &[u16]) -> Counting<'_> {
        Counting { timeouts: T, ignore_ports: ports }
    }

    fn all() -> Counting<'static> {
        ignoring(&[])
    }

    /// The kernel tables in memory.
    #[derive(Default)]
    struct Mem {
        flows: RefCell<HashMap<FlowKey, FlowValue>>,
        sockets: Vec<SockValue>,
        lost: u64,
    }

    impl Tables for Mem {
        fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>, Error> {
            Ok(self.flows.borrow().get(key).copied())
        }
        fn pod_sockets(&self, slot: u32) -> Result<PodSockets, Error> {
            let open = self.sockets.iter().filter(|s| s.pod_slot == slot).count() as u64;
            Ok(PodSockets { open, lost: self.lost })
        }
        fn open_sockets(&self, slot: u32) -> Result<Vec<SockValue>, Error> {
            Ok(self.sockets.iter().filter(|s| s.pod_slot == slot).copied().collect())
        }
    }

    fn key(peer_port: u16) -> FlowKey {
        FlowKey { pod_port: 8080, peer_port, proto: PROTO_TCP, family: 4, ..FlowKey::default() }
    }

    fn tcp(first: u64, last: u64, dir: u8, flags: u8) -> FlowValue {
        FlowValue {
            first_seen_ns: first,
            last_seen_ns: last,
            state: tcp_state::ESTABLISHED,
            direction: dir,
            flags,
            ..FlowValue::default()
        }
    }

    fn socket(peer_port: u16) -> SockValue {
        SockValue { key: key(peer_port), opened_ns: S, pod_slot: 1, _pad: 0 }
    }

    fn event(kind: u8, k: FlowKey, first: u64) -> FlowEvent {
        FlowEvent { key: k, first_seen_ns: first, pod_slot: 1, kind, ..FlowEvent::default() }
    }

    #[test]
    fn events_build_the_index_and_lookups_count_it() {
        let mem = Mem::default();
        mem.flows.borrow_mut().insert(key(1), tcp(S, 99 * S, direction::INBOUND, 0));
        mem.flows.borrow_mut().insert(key(2), tcp(S, 10 * S, direction::INBOUND, 0));
        let mut ix = FlowIndex::default();
        ix.add_slot(1);
        ix.on_event(&event(event_kind::ESTABLISHED, key(1), S));
        ix.on_event(&event(event_kind::ESTABLISHED, key(2), S));
        ix.on_event(&event(event_kind::NEW, key(3), S)); // half-open TCP: not indexed
        assert_eq!(ix.tracked(), 2);
        let (c, _, _) = ix.classify_pod(&mem, 1, 100 * S, all(), false);
        assert_eq!((c.active, c.idle), (1, 1));
        ix.on_event(&event(event_kind::CLOSED, key(1), S));
        assert_eq!(ix.keys(1), vec![key(2)]);
        assert_eq!(ix.tracked(), 1);
    }

    #[test]
    fn a_flow_picked_up_again_mid_stream_counts_as_evicted() {
        let mem = Mem::default();
        mem.flows.borrow_mut().insert(key(1), tcp(5 * S, 99 * S, direction::INBOUND, flow_flags::PICKED_UP));
        let mut ix = FlowIndex::default();
        ix.add_slot(1);
        ix.insert(1, key(1), S);
        let (c, _, _) = ix.classify_pod(&mem, 1, 100 * S, all(), false);
        assert_eq!((c.active, ix.evicted, ix.is_empty(1)), (0, 1, true));
    }

    /// A closed flow's port reused before its CLOSED event was read: the old
    /// flow leaves the index, and no eviction is counted (the soak asserts
    /// none with a table far from full).
    #[test]
    fn a_reused_port_is_not_an_eviction() {
        let mem = Mem::default();
        mem.flows.borrow_mut().insert(key(1), tcp(5 * S, 99 * S, direction::INBOUND, 0));
        let mut ix = FlowIndex::default();
        ix.add_slot(1);
        ix.insert(1, key(1), S);
        let (_, _, _) = ix.classify_pod(&mem, 1, 100 * S, all(), false);
        assert_eq!((ix.evicted, ix.is_empty(1)), (0, true));
    }

    #[test]
    fn a_vanished_flow_counts_as_evicted_unless_the_agent_swept_it() {
        let mem = Mem::default();
        let mut ix = FlowIndex::default();
        ix.add_slot(1);
        ix.insert(1, key(1), S);
        ix.insert(1, key(2), S);
        ix.forget(&[(1, key(2))]);
        let (_, _, _) = ix.classify_pod(&mem, 1, 100 * S, all(), false);
        assert_eq!((ix.evicted, ix.is_empty(1)), (1, true));
    }

    #[test]
    fn no_open_socket_means_nothing_holds() {
        let mut ix = FlowIndex::default();
        ix.add_slot(1);
        let ev = ix.sockets(&Mem::default(), 1, 100 * S, all());
        assert_eq!(ev, SocketEvidence::default());
    }

    #[test]
    fn a_socket_the_packet_path_never_saw_holds_the_pod() {
        // Pod to pod across a bridge, or a CNI that bypasses the hook.
        let mem = Mem { sockets: vec![socket(7)], ..Mem::default() };
        let mut ix = FlowIndex::default();
        ix.add_slot(1);
        let ev = ix.sockets(&mem, 1, 100 * S, all());
        assert_eq!(ev.holding, vec![HeldBySocket { key: key(7), why: SocketHold::Unseen }]);
    }

    #[test]
    fn a_lost_event_is_reconciled_from_the_socket() {
        // The flow is in the table but its ESTABLISHED event was lost.
        let mem = Mem { sockets: vec![socket(7)], ..Mem::default() };
        mem.flows.borrow_mut().insert(key(7), tcp(S, 99 * S, direction::INBOUND, 0));
        let mut ix = FlowIndex::default();
        ix.add_slot(1);
        let ev = ix.sockets(&mem, 1, 100 * S, all());
        assert!(ev.holding.is_empty(), "active: counted by the index now");
        assert_eq!(ix.reconciled, 1);
        let (c, _, _) = ix.classify_pod(&mem, 1, 100 * S, all(), false);
        assert_eq!(c.active, 1);
    }

    #[test]
    fn an_idle_keep_alive_socket_does_not_hold_but_a_request_in_flight_does() {
        let mem = Mem { sockets: vec![socket(7), socket(8)], ..Mem::default() };
        mem.flows.borrow_mut().insert(key(7), tcp(S, 10 * S, direction::INBOUND, 0));
        mem.flows.borrow_mut().insert(key(8), tcp(S, 10 * S, direction::INBOUND, flow_flags::AWAITING_REPLY));
        let mut ix = FlowIndex::default();
        ix.add_slot(1);
        assert!(ix.sockets(&mem, 1, 100 * S, all()).holding.is_empty());
        let (c, _, _) = ix.classify_pod(&mem, 1, 100 * S, all(), false);
        assert_eq!((c.active, c.idle), (1, 1), "the slow request is active, the keep-alive idle");
    }

    #[test]
    fn a_socket_misread_as_outbound_or_closed_holds() {
        let mem = Mem { sockets: vec![socket(7), socket(8)], ..Mem::default() };
        mem.flows.borrow_mut().insert(key(7), tcp(S, 99 * S, direction::OUTBOUND, flow_flags::PICKED_UP));
        let mut closed = tcp(S, 99 * S, direction::INBOUND, 0);
        closed.state = tcp_state::CLOSED;
        mem.flows.borrow_mut().insert(key(8), closed);
        let mut ix = FlowIndex::default();
        ix.add_slot(1);
        let ev = ix.sockets(&mem, 1, 100 * S, all());
        assert_eq!(ev.holding.len(), 2);
        assert!(ev.holding.iter().all(|h| h.why == SocketHold::Misread));
    }

    #[test]
    fn flows_and_sockets_on_an_ignored_port_hold_nothing() {
        // A scrape in flight on 9090, its socket, and a socket on 9090 the
        // packet path never saw; a connection on 8080 still holds.
        let scrape = FlowKey { pod_port: 9090, ..key(7) };
        let unseen = FlowKey { pod_port: 9090, ..key(8) };
        let mut sockets = vec![socket(7), socket(8), socket(9)];
        sockets[0].key = scrape;
        sockets[1].key = unseen;
        let mem = Mem { sockets, ..Mem::default() };
        mem.flows.borrow_mut().insert(scrape, tcp(S, 99 * S, direction::INBOUND, flow_flags::AWAITING_REPLY));
        mem.flows.borrow_mut().insert(key(9), tcp(S, 99 * S, direction::INBOUND, 0));
        let mut ix = FlowIndex::default();
        ix.add_slot(1);
        let ev = ix.sockets(&mem, 1, 100 * S, ignoring(&[9090]));
        assert!(ev.holding.is_empty(), "{ev:?}");
        let (c, _, _) = ix.classify_pod(&mem, 1, 100 * S, ignoring(&[9090]), false);
        assert_eq!((c.active, c.ignored), (1, 1));
        // Without the setting, the same tables hold the pod by both.
        let ev = ix.sockets(&mem, 1, 100 * S, all());
        assert_eq!(ev.holding, vec![HeldBySocket { key: unseen, why: SocketHold::Unseen }]);
        let (c, _, _) = ix.classify_pod(&mem, 1, 100 * S, all(), false);
        assert_eq!((c.active, c.ignored), (2, 0));
    }

    #[test]
    fn lost_sockets_make_the_evidence_incomplete() {
        let mem = Mem { lost: 1, ..Mem::default() };
        let mut ix = FlowIndex::default();
        ix.add_slot(1);
        assert!(ix.sockets(&mem, 1, 100 * S, all()).incomplete.is_some());
    }

    /// A census in steps (`node/census.rs`): the steps' counts add up to the
    /// whole pod's, even when flows found gone leave the index between them
    /// (the next step starts that many places earlier).
    #[test]
    fn counting_in_steps_adds_up_to_counting_at_once() {
        let mem = Mem::default();
        let mut ix = FlowIndex::default();
        ix.add_slot(1);
        for port in 1..=100 {
            ix.insert(1, key(port), S);
            // Every third is gone from the tables (evicted); the others
            // alternate between active and idle.
            if port % 3 != 0 {
                let last = if port % 2 == 0 { 99 * S } else { 10 * S };
                mem.flows.borrow_mut().insert(key(port), tcp(S, last, direction::INBOUND, 0));
            }
        }
        let mut whole = ix.clone();
        let (want, _, _) = whole.classify_pod(&mem, 1, 100 * S, all(), false);
        assert_eq!(want.active + want.idle, 67);
        let (mut got, mut from, mut steps) = (FlowCounts::default(), 0, 0);
        loop {
            let part = ix.classify_range(&mem, 1, from, 7, 100 * S, all(), false);
            got += part.counts;
            from += part.visited - part.removed;
            steps += 1;
            if part.visited < 7 {
                break;
            }
        }
        assert_eq!(got, want);
        assert_eq!((ix.len(1), ix.evicted), (67, 33));
        assert!(steps >= 100 / 7, "{steps} steps");
    }

    /// A slot's remembered count goes with the slot: a pod that gets it next
    /// is never shown its predecessor's flows.
    #[test]
    fn a_remembered_count_goes_with_its_slot() {
        let mut ix = FlowIndex::default();
        ix.add_slot(1);
        ix.remember(1, FlowCounts { active: 5, ..FlowCounts::default() }, S);
        assert_eq!(ix.counted(1).map(|c| c.counts.active), Some(5));
        ix.remember(2, FlowCounts::default(), S); // no such slot: not kept
        assert!(ix.counted(2).is_none());
        ix.remove_slot(1);
        ix.add_slot(1);
        assert!(ix.counted(1).is_none());
    }
}
