//! Unit tests of learning and of the pin state machine, against an
//! in-memory `PINS` map ([`Fake`]) instead of the kernel.

use std::{collections::HashMap, future::ready, net::IpAddr};

use conndrain_common::{PROTO_TCP, PROTO_UDP, Pin, WireKey, pin_flags};

use super::*;
use crate::error::Error;
fn t(orig_src: &str, orig_dst: &str, reply_src: &str, reply_dst: &str, live: bool) -> Translation {
    Translation {
        proto: PROTO_TCP,
        orig_src: orig_src.parse().unwrap(),
        orig_dst: orig_dst.parse().unwrap(),
        reply_src: reply_src.parse().unwrap(),
        reply_dst: reply_dst.parse().unwrap(),
        live,
    }
}

/// Node A of the steering tests: uplink, inter-node link, pod gateway.
fn node() -> Vec<IpAddr> {
    ["172.18.0.10", "172.19.0.1", "10.244.1.1", "fd00:18::10", "127.0.0.1"].map(|a| a.parse().unwrap()).to_vec()
}

#[test]
fn a_peers_flow_through_a_service_is_pinnable() {
    let clusterip = t("172.18.0.2:44910", "10.96.0.10:80", "10.244.1.2:8080", "172.18.0.2:44910", true);
    assert!(pinnable(&clusterip, &node()));
    // A NodePort masqueraded to the node's own address: the SNAT side is the node, the client is not.
    let nodeport = t("172.18.0.2:42302", "172.18.0.10:30080", "10.244.2.2:8080", "172.19.0.1:54505", true);
    assert!(pinnable(&nodeport, &node()));
}

#[test]
fn a_flow_the_node_itself_opened_is_not_pinnable() {
    for client in ["172.18.0.10:40000", "10.244.1.1:40000", "127.0.0.1:40000"] {
        let flow = t(client, "10.96.0.10:80", "10.244.1.2:8080", client, true);
        assert!(!pinnable(&flow, &node()), "{client}");
    }
    let v6 = t("[fd00:18::10]:40000", "[fd00:96::10]:80", "[fd00:244:1::2]:8080", "[fd00:18::10]:40000", true);
    assert!(!pinnable(&v6, &node()));
    // As conntrack may report IPv4 in an IPv4-mapped form.
    let mapped = t(
        "[::ffff:172.18.0.10]:40000",
        "[::ffff:10.96.0.10]:80",
        "[::ffff:10.244.1.2]:8080",
        "[::ffff:172.18.0.10]:40000",
        true,
    );
    assert!(!pinnable(&mapped, &node()));
}

#[test]
fn untranslated_or_finished_flows_are_not_pinnable() {
    let direct = t("172.18.0.2:44910", "10.244.1.2:8080", "10.244.1.2:8080", "172.18.0.2:44910", true);
    assert!(!pinnable(&direct, &node()));
    let closed = t("172.18.0.2:44910", "10.96.0.10:80", "10.244.1.2:8080", "172.18.0.2:44910", false);
    assert!(!pinnable(&closed, &node()));
}

/// The `PINS` map in memory; every route is the destination itself on ifindex 1.
#[derive(Default)]
struct Fake {
    pins: HashMap<WireKey, Pin>,
    everywhere: bool,
    /// Inserts fail (a full map).
    full: bool,
}

impl PinDatapath for Fake {
    fn pin(&self, key: &WireKey) -> Option<Pin> {
        self.pins.get(key).copied()
    }
    fn all_pins(&self) -> Vec<(WireKey, Pin)> {
        self.pins.iter().map(|(k, p)| (*k, *p)).collect()
    }
    fn pin_insert(&mut self, key: &WireKey, pin: &Pin) -> Result<(), Error> {
        if self.full && !self.pins.contains_key(key) {
            return Err(Error::Netlink { op: "fake insert", reason: "map full".into() });
        }
        self.pins.insert(*key, *pin);
        Ok(())
    }
    fn pin_update(&mut self, key: &WireKey, pin: &Pin) -> Result<(), Error> {
        match self.pins.get_mut(key) {
            Some(p) => {
                *p = *pin;
                Ok(())
            }
            None => Err(Error::Netlink { op: "fake update", reason: "no such entry".into() }),
        }
    }
    fn pin_remove(&mut self, key: &WireKey) {
        self.pins.remove(key);
    }
    fn note_pins_gone(&mut self) {}
    fn attach_everywhere(&mut self) -> Result<(), Error> {
        self.everywhere = true;
        Ok(())
    }
    fn route(&mut self, ip: IpAddr) -> impl Future<Output = Result<(u32, IpAddr), Error>> + Send {
        ready(Ok((1, ip)))
    }
    fn route_from(
        &mut self,
        ip: IpAddr,
        _src: IpAddr,
        _iif: u32,
    ) -> impl Future<Output = Result<(u32, IpAddr), Error>> + Send {
        ready(Ok((1, ip)))
    }
}

const S: u64 = 1_000_000_000;
const DEADLINE: u64 = 30 * S;
const UDP_TIMEOUT: u64 = 30 * S;
const PIN_LIMIT: u64 = 3600 * S;

fn backend() -> IpAddr {
    "10.244.1.2".parse().unwrap()
}

/// A client's flow to a `ClusterIP`, translated to the backend.
fn flow() -> Translation {
    t("172.18.0.2:44910", "10.96.0.10:80", "10.244.1.2:8080", "172.18.0.2:44910", true)
}

fn udp_flow() -> Translation {
    let f = t("172.18.0.2:44911", "10.96.0.10:80", "10.244.1.2:8080", "172.18.0.2:44911", true);
    Translation { proto: PROTO_UDP, ..f }
}

fn keys(t: &Translation) -> (WireKey, WireKey) {
    (wire_key(t.proto, t.orig_src, t.orig_dst), wire_key(t.proto, t.reply_src, t.reply_dst))
}

fn run<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
}

/// `web` terminates (deadline in 30 s) and `flows` are learned at time 0.
fn pinned(flows: &[Translation]) -> (Steering, Fake) {
    let (mut s, mut dp) = (Steering::default(), Fake::default());
    s.add_backend("web", &[backend()], DEADLINE, 0);
    run(s.apply(&mut dp, flows, &node(), 0));
    (s, dp)
}

/// Sets `flags` on the pin entry `key` as the programs would.
fn flag(dp: &mut Fake, key: &WireKey, flags: u32) {
    dp.pins.get_mut(key).unwrap().flags |= flags;
}

#[test]
fn a_terminating_backends_flow_is_pinned_both_ways() {
    let (s, dp) = pinned(&[flow()]);
    assert_eq!(s.pinned(), 1);
    assert!(dp.everywhere);
    let (fwd, rev) = keys(&flow());
    let (f, r) = (dp.pins[&fwd], dp.pins[&rev]);
    assert_eq!(crate::datapath::ip_from_bytes(f.new_dst, fwd.family), backend());
    assert_eq!(f.new_dport, 8080);
    assert_eq!(crate::datapath::ip_from_bytes(r.new_src, rev.family), "10.96.0.10".parse::<IpAddr>().unwrap());
    assert_eq!(r.new_sport, 80);
    // Seen from the pod's side: pod → client is the reverse direction.
    let p = s.for_pod_flow("10.244.1.2:8080".parse().unwrap(), "172.18.0.2:44910".parse().unwrap(), PROTO_TCP);
    let p = p.expect("the pod's flow is pinned");
    assert_eq!((p.pod(), p.dead()), ("web", false));
    assert_eq!(p.client().to_string(), "172.18.0.2:44910");
    assert_eq!(p.backend().to_string(), "10.244.1.2:8080");
}

#[test]
fn flows_of_other_backends_or_of_the_node_or_past_the_deadline_are_not_pinned() {
    let other = t("172.18.0.2:44911", "10.96.0.10:80", "10.244.1.3:8080", "172.18.0.2:44911", true);
    let own = t("172.18.0.10:40000", "10.96.0.10:80", "10.244.1.2:8080", "172.18.0.10:40000", true);
    let (mut s, mut dp) = pinned(&[other, own]);
    assert_eq!((s.pinned(), dp.pins.len()), (0, 0));
    run(s.apply(&mut dp, &[flow()], &node(), DEADLINE));
    assert_eq!((s.pinned(), dp.pins.len()), (0, 0));
}

#[test]
fn a_flow_that_cannot_be_pinned_is_retried_and_pinned_once_it_can() {
    let (mut s, mut dp) = (Steering::default(), Fake { full: true, ..Fake::default() });
    s.add_backend("web", &[backend()], DEADLINE, 0);
    run(s.apply(&mut dp, &[flow()], &node(), 0));
    assert_eq!((s.pinned(), dp.pins.len()), (0, 0));
    dp.full = false;
    run(s.apply(&mut dp, &[flow()], &node(), S));
    assert_eq!((s.pinned(), dp.pins.len()), (1, 2));
}

#[test]
fn a_live_flow_stays_pinned_past_its_deadline_until_the_pin_limit() {
    let (mut s, mut dp) = pinned(&[flow()]);
    assert!(s.sweep(&mut dp, 10 * S, UDP_TIMEOUT, PIN_LIMIT).is_empty());
    assert!(s.sweep(&mut dp, DEADLINE + 600 * S, UDP_TIMEOUT, PIN_LIMIT).is_empty());
    assert_eq!((s.pinned(), dp.pins.len()), (1, 2));
    assert!(!s.has_backends(), "no new flow is pinned past the deadline");
    // Never seen gone: released at the limit, its conntrack entry kept (it may be alive).
    assert!(s.sweep(&mut dp, DEADLINE + PIN_LIMIT, UDP_TIMEOUT, PIN_LIMIT).is_empty());
    assert_eq!((s.pinned(), dp.pins.len()), (0, 0));
}

#[test]
fn a_closed_flow_is_forgotten_at_once_and_released_after_lingering() {
    for (fwd_flags, rev_flags) in [(pin_flags::FIN, pin_flags::FIN), (0, pin_flags::RST)] {
        let (mut s, mut dp) = pinned(&[flow()]);
        let (fwd, rev) = keys(&flow());
        flag(&mut dp, &fwd, fwd_flags);
        flag(&mut dp, &rev, rev_flags);
        assert_eq!(s.sweep(&mut dp, 5 * S, UDP_TIMEOUT, PIN_LIMIT), vec![flow()]);
        assert_eq!(s.pinned(), 1, "lingers for late segments");
        assert!(s.sweep(&mut dp, 6 * S, UDP_TIMEOUT, PIN_LIMIT).is_empty(), "forgotten once");
        assert_eq!(s.pinned(), 1);
        assert!(s.sweep(&mut dp, 7 * S, UDP_TIMEOUT, PIN_LIMIT).is_empty());
        assert_eq!((s.pinned(), dp.pins.len()), (0, 0));
    }
    // FIN one way only is not closed.
    let (mut s, mut dp) = pinned(&[flow()]);
    flag(&mut dp, &keys(&flow()).0, pin_flags::FIN);
    assert!(s.sweep(&mut dp, 60 * S, UDP_TIMEOUT, PIN_LIMIT).is_empty());
    assert_eq!(s.pinned(), 1);
}

#[test]
fn an_idle_udp_flow_is_released_and_forgotten() {
    let (mut s, mut dp) = pinned(&[udp_flow()]);
    let (fwd, _) = keys(&udp_flow());
    dp.pins.get_mut(&fwd).unwrap().last_seen_ns = 20 * S;
    assert!(s.sweep(&mut dp, 20 * S + UDP_TIMEOUT, UDP_TIMEOUT, PIN_LIMIT).is_empty(), "not idle yet");
    assert_eq!(s.sweep(&mut dp, 21 * S + UDP_TIMEOUT, UDP_TIMEOUT, PIN_LIMIT), vec![udp_flow()]);
    assert_eq!((s.pinned(), dp.pins.len()), (0, 0));
    // An idle TCP flow is not released.
    let (mut s, mut dp) = pinned(&[flow()]);
    assert!(s.sweep(&mut dp, 10 * UDP_TIMEOUT, UDP_TIMEOUT, PIN_LIMIT).is_empty());
    assert_eq!(s.pinned(), 1);
}

#[test]
fn a_dead_pods_flows_get_resets_then_are_released() {
    let (mut s, mut dp) = pinned(&[flow()]);
    let (fwd, _) = keys(&flow());
    s.mark_dead(&mut dp, &[backend()], 5 * S);
    assert!(dp.pins[&fwd].flags & pin_flags::DEAD != 0, "its TCP segments get a RST");
    assert!(s.pins().all(PinnedFlow::dead));
    assert!(!s.has_backends());
    assert_eq!(s.sweep(&mut dp, 5 * S, UDP_TIMEOUT, PIN_LIMIT), vec![flow()], "forgotten at once");
    assert!(s.sweep(&mut dp, 14 * S, UDP_TIMEOUT, PIN_LIMIT).is_empty());
    assert_eq!(s.pinned(), 1, "lingers for the clients' RST");
    assert!(s.sweep(&mut dp, 15 * S, UDP_TIMEOUT, PIN_LIMIT).is_empty());
    assert_eq!((s.pinned(), dp.pins.len()), (0, 0));
}

#[test]
fn a_remote_backend_gone_releases_its_pins_like_a_dead_pod() {
    let remote: IpAddr = "10.244.2.2".parse().unwrap();
    let f = t("172.18.0.2:44910", "10.96.0.10:80", "10.244.2.2:8080", "172.18.0.2:44910", true);
    let (mut s, mut dp) = (Steering::default(), Fake::default());
    s.add_backend("remote 10.244.2.2", &[remote], DEADLINE, 0);
    run(s.apply(&mut dp, std::slice::from_ref(&f), &node(), 0));
    assert_eq!(s.pins().map(PinnedFlow::pod).collect::<Vec<_>>(), ["remote 10.244.2.2"]);
    s.mark_dead(&mut dp, &[backend()], S);
    assert!(!s.pins().any(PinnedFlow::dead), "another backend's death leaves it");
    s.mark_dead(&mut dp, &[remote], S);
    assert_eq!(s.sweep(&mut dp, S, UDP_TIMEOUT, PIN_LIMIT), vec![f]);
    assert!(s.sweep(&mut dp, 11 * S, UDP_TIMEOUT, PIN_LIMIT).is_empty());
    assert_eq!((s.pinned(), dp.pins.len()), (0, 0));
}

#[test]
fn a_reused_tuple_releases_the_pin() {
    let (mut s, mut dp) = pinned(&[flow()]);
    let (fwd, _) = keys(&flow());
    dp.pins.remove(&fwd);
    assert!(s.sweep(&mut dp, S, UDP_TIMEOUT, PIN_LIMIT).is_empty(), "its conntrack entry is the new flow's");
    assert_eq!((s.pinned(), dp.pins.len()), (0, 0));
}

#[test]
fn release_reasons_read_as_the_log_line_says() {
    let all = [Release::TupleReused, Release::Closed, Release::Idle, Release::PinLimit, Release::PodGone];
    assert_eq!(all.map(Release::as_str), ["tuple reused", "closed", "idle", "pin limit", "pod gone"]);
}

#[test]
fn a_restored_state_keeps_its_pins_and_rewrites_missing_entries() {
    let (mut s, mut dp) = pinned(&[flow(), udp_flow()]);
    s.mark_dead(&mut dp, &[backend()], 5 * S);
    let json = serde_json::to_string(&s.save()).unwrap();
    let saved = || serde_json::from_str::<SavedSteering>(&json).unwrap();
    // The map survived: taken as it is.
    let before = dp.pins.clone();
    let r = run(Steering::restore(saved(), &mut dp, 100 * S));
    assert_eq!((r.pinned(), &dp.pins), (2, &before));
    assert!(r.pins().all(|p| p.dead() && p.pod() == "web"));
    // A new map: both entries written again, the dead flag too.
    let mut fresh = Fake::default();
    let r = run(Steering::restore(saved(), &mut fresh, 100 * S));
    assert_eq!((r.pinned(), fresh.pins.len()), (2, 4));
    assert!(fresh.pins[&keys(&flow()).0].flags & pin_flags::DEAD != 0);
    assert_eq!(serde_json::to_string(&r.save()).unwrap(), json, "saves the same state again");
}

#[test]
fn restore_adopts_unsaved_entries_of_known_backends_and_removes_the_rest() {
    let (s, mut dp) = pinned(&[flow()]);
    let mut saved = s.save();
    saved.pins.clear();
    let r = run(Steering::restore(saved.clone(), &mut dp, 10 * S));
    assert_eq!((r.pinned(), dp.pins.len()), (1, 2), "adopted: its backend is known");
    assert_eq!(r.pins().next().unwrap().pod(), "web");
    saved.backends.clear();
    let r = run(Steering::restore(saved, &mut dp, 10 * S));
    assert_eq!((r.pinned(), dp.pins.len()), (0, 0), "removed: it would steer forever");
}

/// A state file as agents before the split wrote it (the pin's `view` was the API's view).
#[test]
fn a_state_written_before_reads_back() {
    let json = r#"{"backends":[{"ip":"10.244.1.2","pod":"web","deadline_ns":30000000000}],
        "pins":[{"translation":{"proto":6,"orig_src":"172.18.0.2:44910","orig_dst":"10.96.0.10:80",
        "reply_src":"10.244.1.2:8080","reply_dst":"172.18.0.2:44910","live":true},
        "view":{"proto":"tcp","client":"172.18.0.2:44910","frontend":"10.96.0.10:80","backend":"10.244.1.2:8080",
        "backend_peer":"172.18.0.2:44910","pod":"web","dead":false},
        "deadline_ns":30000000000,"pinned_ns":0,"closed_ns":null,"dead_ns":null}]}"#;
    let saved: SavedSteering = serde_json::from_str(json).unwrap();
    let mut dp = Fake::default();
    let r = run(Steering::restore(saved, &mut dp, S));
    assert_eq!((r.pinned(), dp.pins.len()), (1, 2));
    let compact: String = json.split_whitespace().collect();
    assert_eq!(serde_json::to_string(&r.save()).unwrap(), compact, "and is written the same");
}
