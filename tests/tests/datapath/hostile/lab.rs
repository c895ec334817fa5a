//! The lab: a harness with registered pods, and the checks run after every
//! packet.
//!
//! Whatever a packet looks like, the programs must hand back their verdict
//! and the packet unchanged (the harness checks both on every run), and the
//! maps must stay consistent after every single packet (`Lab::send`):
//!
//! - for each pod slot, `active_inbound` (`active_outbound`) is the number of
//!   TCP flows in `FLOWS` with that slot, direction inbound (outbound) and
//!   state `ESTABLISHED` or `CLOSING`; the table never evicts here (it holds
//!   exactly the flows that were created), so this must hold exactly;
//! - every flow belongs to a registered pod IP, in that pod's slot, with a
//!   state in 1..=5, a known direction, protocol and family;
//! - one packet changes at most one flow and sends at most one event, which
//!   describes that flow as the table now holds it; a packet counted as
//!   unparsed or not-a-pod's changes nothing;
//! - `new_inbound_total` never decreases, and goes up by one exactly when a
//!   new inbound flow is announced.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use conndrain_common::{
    FAMILY_V4, FAMILY_V6, FlowEvent, FlowKey, FlowValue, PROTO_TCP, PROTO_UDP, PodCounters, direction, event_kind,
    stats, tcp_state,
};

use super::{
    PEER4, PEER6, POD4, POD4_B, POD6, POD6_B, SLOT_B, SLOTS,
    frames::{Flow, hex},
    property::OwnMaps,
};
use crate::{
    harness::{Harness, POD_SLOT, Side, mapped},
    packets::{ACK, SYN},
};

/// What one packet did.
#[derive(Debug)]
pub struct Outcome {
    /// The kernel ran the programs: `BPF_PROG_TEST_RUN` refuses frames
    /// shorter than an Ethernet header (and, on recent kernels, IP frames
    /// shorter than their IP header) before running anything.
    ran: bool,
    /// Counted in `STATS[UNPARSED]` / `STATS[NOT_POD]`.
    pub unparsed: bool,
    pub not_pod: bool,
    /// The flow it created or changed: key, value before, value after.
    pub changed: Option<(FlowKey, Option<FlowValue>, FlowValue)>,
    pub event: Option<FlowEvent>,
}

impl Outcome {
    /// The flow's value after the packet, if it changed one.
    pub fn after(&self) -> Option<&FlowValue> {
        self.changed.as_ref().map(|(_, _, v)| v)
    }

    pub fn event_kind(&self) -> Option<u8> {
        self.event.map(|e| e.kind)
    }
}

pub type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// Stats looked at around each packet.
const WATCHED_STATS: [u32; 6] = [
    stats::PACKETS,
    stats::UNPARSED,
    stats::NOT_POD,
    stats::FLOWS_CREATED,
    stats::INSERT_FAILED,
    stats::EVENTS_LOST,
];

/// A harness with two pods registered (`POD4`/`POD6` and `POD4_B`/`POD6_B`),
/// and its maps as they were after the last packet, so that every packet's
/// effect can be checked.
pub struct Lab {
    pub h: Harness,
    /// Registered pod addresses (as mapped) and their slots.
    pods: HashMap<[u8; 16], u32>,
    /// The table after the last packet.
    pub flows: HashMap<FlowKey, FlowValue>,
    counters: HashMap<u32, PodCounters>,
    stats: [u64; WATCHED_STATS.len()],
    next_peer_port: u16,
    next_pod_port: u16,
    tally: Tally,
    /// Found on the first `clear`.
    own: Option<OwnMaps>,
    /// Whether pod A drains too (random sequences start its drain midway).
    pub a_draining: bool,
}

/// What the packets a lab sent did, for the summary a test prints: shows
/// that a corpus or the random sequences reach the paths they are meant to.
#[derive(Debug, Default)]
struct Tally {
    sent: u64,
    /// Refused by the kernel before running the programs.
    refused: u64,
    unparsed: u64,
    not_pod: u64,
    /// Created a flow / changed an existing one.
    created: u64,
    updated: u64,
    /// Events by kind (`event_kind::*`).
    events: [u64; 4],
}

/// An event against the flow change the same packet made.
fn check_event(ev: &FlowEvent, changed: Option<&(FlowKey, Option<FlowValue>, FlowValue)>) -> Check {
    let Some((key, _, v)) = changed else {
        return Err(format!("event {ev:?} with no change in the table"));
    };
    ensure!(
        ev.key == *key,
        "event {ev:?} is not about the changed flow {key:?}"
    );
    ensure!(
        (
            ev.first_seen_ns,
            ev.pod_slot,
            ev.direction,
            ev.state,
            ev.flags
        ) == (v.first_seen_ns, v.pod_slot, v.direction, v.state, v.flags),
        "event {ev:?} does not match the flow {v:?}"
    );
    let kind_ok = match ev.kind {
        event_kind::NEW => {
            v.first_seen_ns == v.last_seen_ns
                && v.state
                    == if key.proto == PROTO_TCP {
                        tcp_state::SYN_SENT
                    } else {
                        tcp_state::ESTABLISHED
                    }
        }
        event_kind::ESTABLISHED => tcp_state::is_active(v.state),
        event_kind::CLOSED => v.state == tcp_state::CLOSED,
        _ => false,
    };
    ensure!(kind_ok, "event {ev:?} does not fit the flow {v:?}");
    Ok(())
}

impl Lab {
    /// `POD4` and `POD6` in `POD_SLOT`, `POD4_B` and `POD6_B` in `SLOT_B`.
    pub fn new() -> Self {
        let mut h = Harness::new();
        let mut pods = HashMap::new();
        for (ip, slot) in [
            (IpAddr::V4(POD4), POD_SLOT),
            (IpAddr::V6(POD6), POD_SLOT),
            (IpAddr::V4(POD4_B), SLOT_B),
            (IpAddr::V6(POD6_B), SLOT_B),
        ] {
            h.add_pod_ip(ip, slot);
            pods.insert(mapped(ip), slot);
        }
        // Pod B drains: its flows live in HELD, pod A's in the LRU table, so
        // every corpus and random sequence runs both paths.
        h.set_draining(SLOT_B, true);
        let mut lab = Self {
            h,
            pods,
            flows: HashMap::new(),
            counters: HashMap::new(),
            stats: [0; WATCHED_STATS.len()],
            next_peer_port: 20_000,
            next_pod_port: 40_000,
            tally: Tally::default(),
            own: None,
            a_draining: false,
        };
        for slot in SLOTS {
            lab.counters.insert(slot, PodCounters::default());
        }
        lab
    }

    /// A fresh flow where the pod serves: pod port 8080, a new peer port.
    pub fn server_flow(&mut self, v6: bool) -> Flow {
        let port = self.next_peer_port;
        self.next_peer_port += 1;
        let (pod, peer) = if v6 {
            (IpAddr::V6(POD6), IpAddr::V6(PEER6))
        } else {
            (IpAddr::V4(POD4), IpAddr::V4(PEER4))
        };
        Flow {
            pod: SocketAddr::new(pod, 8080),
            peer: SocketAddr::new(peer, port),
        }
    }

    /// A fresh flow where the pod is the client: a new pod port, peer port 443.
    pub fn client_flow(&mut self, v6: bool) -> Flow {
        let port = self.next_pod_port;
        self.next_pod_port += 1;
        let (pod, peer) = if v6 {
            (IpAddr::V6(POD6), IpAddr::V6(PEER6))
        } else {
            (IpAddr::V4(POD4), IpAddr::V4(PEER4))
        };
        Flow {
            pod: SocketAddr::new(pod, port),
            peer: SocketAddr::new(peer, 443),
        }
    }

    fn read_stats(&self) -> [u64; WATCHED_STATS.len()] {
        WATCHED_STATS.map(|s| self.h.stat(s))
    }

    /// Runs `frame` through `side` and checks everything; panics on a failure.
    fn send(&mut self, side: Side, frame: &[u8]) -> Outcome {
        match self.try_send(side, frame) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like `send`, for a frame the kernel must run.
    pub fn run(&mut self, side: Side, frame: &[u8]) -> Outcome {
        let o = self.send(side, frame);
        assert!(o.ran, "{side:?}: the kernel refused {}", hex(frame));
        o
    }

    /// Runs `frame` through `side` and checks every invariant (see the
    /// module doc); the error names the frame.
    pub fn try_send(&mut self, side: Side, frame: &[u8]) -> Result<Outcome, String> {
        let ran = self.h.send_or_refused(side, frame);
        let o = self
            .check_packet(ran)
            .map_err(|e| format!("after {side:?} {} ({} bytes): {e}", hex(frame), frame.len()))?;
        let t = &mut self.tally;
        t.sent += 1;
        t.refused += u64::from(!o.ran);
        t.unparsed += u64::from(o.unparsed);
        t.not_pod += u64::from(o.not_pod);
        match &o.changed {
            Some((_, None, _)) => t.created += 1,
            Some((_, Some(_), _)) => t.updated += 1,
            None => {}
        }
        if let Some(ev) = &o.event {
            t.events[usize::from(ev.kind)] += 1;
        }
        Ok(o)
    }

    fn check_packet(&mut self, ran: bool) -> Result<Outcome, String> {
        let stats = self.read_stats();
        let delta: Vec<u64> = stats.iter().zip(self.stats).map(|(a, b)| a - b).collect();
        self.stats = stats;
        let [
            packets,
            unparsed,
            not_pod,
            created,
            insert_failed,
            events_lost,
        ] = delta[..]
        else {
            unreachable!()
        };
        ensure!(
            packets == u64::from(ran),
            "STATS[PACKETS] went up by {packets}"
        );
        ensure!(
            unparsed + not_pod <= 1,
            "counted both unparsed and not a pod's"
        );
        ensure!(insert_failed == 0, "a flow insert failed");
        ensure!(events_lost == 0, "an event was lost");

        let events = self.h.events();
        ensure!(
            events.len() <= 1,
            "one packet sent {} events: {events:#?}",
            events.len()
        );
        let event = events.first().copied();

        let flows = self.both_tables()?;
        ensure!(
            u64::try_from(flows.len()).unwrap() == self.stats[3],
            "the table holds {} flows but {} were created: it evicted, the test is wrong",
            flows.len(),
            self.stats[3]
        );
        for k in self.flows.keys() {
            ensure!(flows.contains_key(k), "flow {k:?} disappeared");
        }
        let changed: Vec<_> = flows
            .iter()
            .filter(|(k, v)| self.flows.get(*k) != Some(*v))
            .map(|(k, v)| (*k, self.flows.get(k).copied(), *v))
            .collect();
        ensure!(
            changed.len() <= 1,
            "one packet changed {} flows: {changed:#?}",
            changed.len()
        );
        let changed = changed.into_iter().next();
        ensure!(
            created <= 1 && (created == 0 || changed.as_ref().is_some_and(|c| c.1.is_none())),
            "FLOWS_CREATED went up by {created}, changes: {changed:?}"
        );
        if unparsed + not_pod + u64::from(!ran) > 0 {
            ensure!(
                changed.is_none() && event.is_none(),
                "a packet that was not tracked changed {changed:?}, sent {event:?}"
            );
        }
        if let Some(ev) = &event {
            check_event(ev, changed.as_ref())?;
        }
        self.check_table(&flows)?;
        self.check_new_inbound(event)?;

        self.flows = flows;
        Ok(Outcome {
            ran,
            unparsed: unparsed == 1,
            not_pod: not_pod == 1,
            changed,
            event,
        })
    }

    /// FLOWS and HELD as one table, checking that each flow is in the one
    /// its pod's drain state says, and in one only.
    fn both_tables(&self) -> Result<HashMap<FlowKey, FlowValue>, String> {
        let mut flows: HashMap<FlowKey, FlowValue> = self.h.flows().into_iter().collect();
        let draining = |slot| slot == SLOT_B || (slot == POD_SLOT && self.a_draining);
        for (k, v) in &flows {
            // Flows of a pod that started draining move at their next packet;
            // a draining pod's new flows are born in HELD.
            let may_stay = v.pod_slot == POD_SLOT && self.flows.contains_key(k);
            ensure!(
                !draining(v.pod_slot) || may_stay,
                "a draining pod's flow in FLOWS: {k:?} {v:?}"
            );
        }
        for (k, v) in self.h.held_flows() {
            ensure!(
                draining(v.pod_slot),
                "a flow of a pod that is not draining in HELD: {k:?} {v:?}"
            );
            ensure!(
                flows.insert(k, v).is_none(),
                "a flow in both FLOWS and HELD: {k:?}"
            );
        }
        Ok(flows)
    }

    /// `new_inbound_total` goes up by one exactly when a new inbound flow is
    /// announced, and `last_new_inbound_ns` moves with it.
    fn check_new_inbound(&mut self, event: Option<FlowEvent>) -> Check {
        for slot in SLOTS {
            let c = self.h.counters(slot);
            let old = self.counters[&slot];
            let announced = event.is_some_and(|e| {
                e.kind == event_kind::NEW && e.direction == direction::INBOUND && e.pod_slot == slot
            });
            ensure!(
                c.new_inbound_total == old.new_inbound_total + u64::from(announced),
                "slot {slot}: new_inbound_total went from {} to {} (new inbound event: {announced})",
                old.new_inbound_total,
                c.new_inbound_total
            );
            if announced {
                ensure!(
                    c.last_new_inbound_ns == event.unwrap().ts_ns,
                    "slot {slot}: last_new_inbound_ns {} is not the event's time",
                    c.last_new_inbound_ns
                );
            } else {
                ensure!(
                    c.last_new_inbound_ns == old.last_new_inbound_ns,
                    "slot {slot}: last_new_inbound_ns moved without a new inbound flow"
                );
            }
            self.counters.insert(slot, c);
        }
        Ok(())
    }

    /// The table against itself and the counters.
    fn check_table(&self, flows: &HashMap<FlowKey, FlowValue>) -> Check {
        let mut active: HashMap<u32, (u64, u64)> = HashMap::new();
        for (k, v) in flows {
            let Some(&slot) = self.pods.get(&k.pod_addr) else {
                return Err(format!("flow of an unregistered pod address: {k:?} {v:?}"));
            };
            ensure!(
                v.pod_slot == slot,
                "flow in slot {} of a pod in slot {slot}: {k:?}",
                v.pod_slot
            );
            ensure!(
                (tcp_state::SYN_SENT..=tcp_state::CLOSED).contains(&v.state),
                "state {} out of range: {k:?} {v:?}",
                v.state
            );
            ensure!(
                v.direction == direction::INBOUND || v.direction == direction::OUTBOUND,
                "direction {}: {k:?} {v:?}",
                v.direction
            );
            ensure!(
                v.flags & !0x1f == 0,
                "unknown flags {:#x}: {k:?} {v:?}",
                v.flags
            );
            ensure!(k._pad == [0; 2], "key padding {k:?}");
            ensure!(v._pad == 0, "value padding {v:?}");
            ensure!(
                v.first_seen_ns <= v.last_seen_ns,
                "first seen after last seen: {k:?} {v:?}"
            );
            // At least one frame, and every frame has an Ethernet header.
            ensure!(
                v.bytes_in + v.bytes_out >= 14,
                "byte counts: {k:?} {v:?}"
            );
            match k.family {
                FAMILY_V4 => ensure!(
                    k.pod_addr[..12] == mapped(IpAddr::V4(Ipv4Addr::UNSPECIFIED))[..12]
                        && k.peer_addr[..12] == k.pod_addr[..12],
                    "an IPv4 flow with non-IPv4 addresses: {k:?}"
                ),
                FAMILY_V6 => {}
                f => return Err(format!("family {f}: {k:?}")),
            }
            match k.proto {
                PROTO_TCP => {
                    if tcp_state::is_active(v.state) {
                        let e = active.entry(slot).or_default();
                        if v.direction == direction::INBOUND {
                            e.0 += 1;
                        } else {
                            e.1 += 1;
                        }
                    }
                }
                PROTO_UDP => ensure!(
                    v.state == tcp_state::ESTABLISHED && v.flags == 0,
                    "UDP flow in state {} flags {}: {k:?}",
                    v.state,
                    v.flags
                ),
                p => return Err(format!("protocol {p}: {k:?}")),
            }
        }
        for slot in SLOTS {
            let c = self.h.counters(slot);
            let want = active.get(&slot).copied().unwrap_or_default();
            ensure!(
                (c.active_inbound, c.active_outbound) == want,
                "slot {slot}: counters say {} inbound / {} outbound active, the table holds {} / {}",
                c.active_inbound,
                c.active_outbound,
                want.0,
                want.1
            );
        }
        Ok(())
    }

    /// An established TCP flow (handshake from the right opener), checked.
    pub fn established(&mut self, flow: &Flow, inbound: bool) {
        let (opener, responder) = if inbound {
            (Side::ToPod, Side::FromPod)
        } else {
            (Side::FromPod, Side::ToPod)
        };
        self.run(opener, &flow.tcp(opener, SYN));
        self.run(responder, &flow.tcp(responder, SYN | ACK));
        let o = self.run(opener, &flow.tcp(opener, ACK));
        assert_eq!(o.event_kind(), Some(event_kind::ESTABLISHED), "{flow:?}");
        let v = self.flows[&flow.tcp_key()];
        assert_eq!(v.state, tcp_state::ESTABLISHED);
        let dir = if inbound {
            direction::INBOUND
        } else {
            direction::OUTBOUND
        };
        assert_eq!(v.direction, dir);
    }

    /// The frame must run and be counted as unparsed, changing nothing.
    pub fn expect_unparsed(&mut self, side: Side, frame: &[u8], what: &str) {
        let o = self.run(side, frame);
        assert!(
            o.unparsed,
            "{what}: {side:?} {} was not counted unparsed: {o:?}",
            hex(frame)
        );
    }

    /// The frame must be either refused by the kernel or run unparsed.
    pub fn expect_refused_or_unparsed(&mut self, side: Side, frame: &[u8], what: &str) {
        let o = self.send(side, frame);
        assert!(
            !o.ran || o.unparsed,
            "{what}: {side:?} {} was tracked: {o:?}",
            hex(frame)
        );
    }

    /// The frame must create `key` in `state`.
    pub fn expect_new(&mut self, side: Side, frame: &[u8], key: &FlowKey, state: u8, what: &str) {
        let o = self.run(side, frame);
        match &o.changed {
            Some((k, None, v)) if k == key && v.state == state => {}
            _ => panic!(
                "{what}: {side:?} {} should have created {key:?} in state {state}: {o:?}",
                hex(frame)
            ),
        }
    }

    /// Brings the maps back to a fresh harness's state, the pods still
    /// registered (much faster than a new harness).
    pub fn clear(&mut self) {
        self.own
            .get_or_insert_with(|| OwnMaps::find(&mut self.h))
            .clear();
        self.h.set_draining(POD_SLOT, false);
        self.a_draining = false;
        self.h.events();
        self.reset_view();
    }

    /// Clears the maps once the table holds 64 flows: every check walks the
    /// whole table, so a long corpus would slow down as it grows. Returns
    /// whether it cleared.
    pub fn keep_small(&mut self) -> bool {
        let full = self.flows.len() >= 64;
        if full {
            self.clear();
        }
        full
    }

    /// Forgets what the lab saw, after its maps were cleared.
    fn reset_view(&mut self) {
        self.flows.clear();
        for c in self.counters.values_mut() {
            *c = PodCounters::default();
        }
        self.stats = [0; WATCHED_STATS.len()];
        assert_eq!(self.read_stats(), self.stats, "STATS not cleared");
        assert!(self.h.flows().is_empty(), "FLOWS not cleared");
        assert!(self.h.held_flows().is_empty(), "HELD not cleared");
    }

    pub fn summary(&self) -> String {
        let t = &self.tally;
        format!(
            "{} packets: {} refused by the kernel, {} unparsed, {} not a pod's, {} created a \
             flow, {} updated one; events new/established/closed {}/{}/{}; {} flows in the table",
            t.sent,
            t.refused,
            t.unparsed,
            t.not_pod,
            t.created,
            t.updated,
            t.events[1],
            t.events[2],
            t.events[3],
            self.flows.len()
        )
    }
}
