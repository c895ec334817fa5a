//! The property test.

use std::{
    cell::RefCell,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicU16, Ordering},
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, Map, MapData, MapInfo, PerCpuArray, PerCpuValues, loaded_maps},
    programs::loaded_programs,
};
use conndrain_common::{FlowKey, FlowValue, PROTO_TCP, PROTO_UDP, PodCounters, PodIpKey, maps, stats};
use proptest::{
    prelude::*,
    sample::Index,
    test_runner::{TestCaseError, TestRunner},
};

use super::{
    MACS, PEER4, PEER6, POD4, POD4_B, POD6, POD6_B, SLOTS, STRANGER4, STRANGER6, URG,
    frames::{Ext, L3, ip_frame, tcp_segment, udp_datagram},
    lab::{Check, Lab},
};
use crate::{
    harness::{Harness, POD_SLOT, Side},
    packets::{ACK, FIN, PSH, RST, SYN},
};

/// One of the few flows a random sequence is made of: both ends, ports from
/// small sets so that the direction guess from ports goes both ways.
#[derive(Clone, Debug)]
struct FlowSpec {
    v6: bool,
    /// The pod end: 0 pod A, 1 pod B, 2 an address of no pod.
    pod: u8,
    /// The peer end: 0 a peer, 1 pod B (pod to pod traffic, or pod B to itself).
    peer: u8,
    pod_port: u16,
    peer_port: u16,
}

impl FlowSpec {
    fn ends(&self) -> (SocketAddr, SocketAddr) {
        let pod = match (self.v6, self.pod) {
            (false, 0) => IpAddr::V4(POD4),
            (false, 1) => IpAddr::V4(POD4_B),
            (false, _) => IpAddr::V4(STRANGER4),
            (true, 0) => IpAddr::V6(POD6),
            (true, 1) => IpAddr::V6(POD6_B),
            (true, _) => IpAddr::V6(STRANGER6),
        };
        let peer = match (self.v6, self.peer) {
            (false, 0) => IpAddr::V4(PEER4),
            (false, _) => IpAddr::V4(POD4_B),
            (true, 0) => IpAddr::V6(PEER6),
            (true, _) => IpAddr::V6(POD6_B),
        };
        (
            SocketAddr::new(pod, self.pod_port),
            SocketAddr::new(peer, self.peer_port),
        )
    }
}

/// One packet of a random sequence.
#[derive(Clone, Debug)]
struct Step {
    /// Which of the case's flows (as an index into them).
    flow: Index,
    /// The program it goes through.
    side: Side,
    /// Built from the pod end rather than to it; usually matches `side`,
    /// sometimes not (a packet on the wrong side).
    from_pod: bool,
    body: Body,
    /// IPv4 option words (NOPs) or IPv6 destination-options headers.
    ext: u8,
    /// Bytes overwritten with garbage, anywhere in the frame.
    garbage: Vec<(Index, u8)>,
    /// Cut the frame at this point.
    cut: Option<Index>,
}

#[derive(Clone, Debug)]
enum Body {
    Tcp {
        flags: u8,
        payload: u8,
    },
    Udp {
        payload: u8,
    },
    /// Random bytes after the Ethernet header, under the flow's IP ethertype.
    Junk(Vec<u8>),
}

const POD_PORTS: [u16; 2] = [80, 40_001];
const PEER_PORTS: [u16; 2] = [80, 40_312];

impl Step {
    fn frame(&self, flow: &FlowSpec) -> Vec<u8> {
        let (pod, peer) = flow.ends();
        let (src, dst) = if self.from_pod {
            (pod, peer)
        } else {
            (peer, pod)
        };
        let l3 = if flow.v6 {
            L3::v6_exts(&vec![Ext::Dest(0); usize::from(self.ext)])
        } else {
            L3::v4_options(&vec![1; usize::from(self.ext) * 4])
        };
        let mut frame = match &self.body {
            Body::Tcp { flags, payload } => {
                let seg = tcp_segment(src, dst, *flags, &[], &vec![b'p'; usize::from(*payload)]);
                ip_frame(src.ip(), dst.ip(), &l3, PROTO_TCP, &seg)
            }
            Body::Udp { payload } => {
                let d = udp_datagram(src, dst, &vec![b'p'; usize::from(*payload)]);
                ip_frame(src.ip(), dst.ip(), &l3, PROTO_UDP, &d)
            }
            Body::Junk(bytes) => {
                let mut f = MACS.to_vec();
                f.extend_from_slice(if flow.v6 {
                    &[0x86, 0xdd]
                } else {
                    &[0x08, 0x00]
                });
                f.extend_from_slice(bytes);
                f
            }
        };
        for (at, byte) in &self.garbage {
            let i = at.index(frame.len());
            frame[i] = *byte;
        }
        if let Some(cut) = &self.cut {
            frame.truncate(cut.index(frame.len() + 1));
        }
        frame
    }
}

fn flow_strategy() -> impl Strategy<Value = FlowSpec> {
    (
        any::<bool>(),
        prop_oneof![6 => Just(0u8), 2 => Just(1u8), 1 => Just(2u8)],
        prop_oneof![4 => Just(0u8), 1 => Just(1u8)],
        proptest::sample::select(POD_PORTS.to_vec()),
        proptest::sample::select(PEER_PORTS.to_vec()),
    )
        .prop_map(|(v6, pod, peer, pod_port, peer_port)| FlowSpec {
            v6,
            pod,
            peer,
            pod_port,
            peer_port,
        })
}

fn flags_strategy() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => proptest::sample::select(vec![
            SYN, SYN | ACK, ACK, PSH | ACK, FIN | ACK, FIN, RST, RST | ACK, SYN | FIN, URG | ACK,
        ]),
        1 => any::<u8>(),
    ]
}

fn body_strategy() -> impl Strategy<Value = Body> {
    prop_oneof![
        12 => (flags_strategy(), prop_oneof![3 => Just(0u8), 1 => any::<u8>()])
            .prop_map(|(flags, payload)| Body::Tcp { flags, payload }),
        3 => (0u8..32).prop_map(|payload| Body::Udp { payload }),
        1 => proptest::collection::vec(any::<u8>(), 0..80).prop_map(Body::Junk),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    (
        any::<Index>(),
        (
            any::<bool>(),
            prop_oneof![9 => Just(true), 1 => Just(false)],
        ),
        body_strategy(),
        prop_oneof![12 => Just(0u8), 1 => 1u8..=10],
        prop_oneof![
            12 => Just(vec![]),
            1 => proptest::collection::vec((any::<Index>(), any::<u8>()), 1..4),
        ],
        prop_oneof![12 => Just(None), 1 => any::<Index>().prop_map(Some)],
    )
        .prop_map(
            |(flow, (from_pod, consistent), body, ext, garbage, cut)| Step {
                flow,
                side: if from_pod == consistent {
                    Side::FromPod
                } else {
                    Side::ToPod
                },
                from_pod,
                body,
                ext,
                garbage,
                cut,
            },
        )
}

/// One case: whether UDP flows time out at once (every UDP packet then
/// opens a new flow), 1 to 3 flows, and 1 to 39 packets on them.
#[derive(Clone, Debug)]
struct Case {
    udp_times_out: bool,
    /// Before which step pod A starts draining, if it does.
    a_drains_at: Option<Index>,
    flows: Vec<FlowSpec>,
    steps: Vec<Step>,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop_oneof![4 => Just(false), 1 => Just(true)],
        prop_oneof![1 => Just(None), 1 => any::<Index>().prop_map(Some)],
        proptest::collection::vec(flow_strategy(), 1..4),
        proptest::collection::vec(step_strategy(), 1..40),
    )
        .prop_map(|(udp_times_out, a_drains_at, flows, steps)| Case {
            udp_times_out,
            a_drains_at,
            flows,
            steps,
        })
}

fn proptest_config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(512);
    ProptestConfig {
        cases,
        // Shrinking re-runs the sequence each time; bound it.
        max_shrink_iters: 4096,
        // No regression files written into the source tree: the failure
        // message carries the minimal sequence.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs one random sequence on a lab cleared for it.
fn run_case(lab: &mut Lab, case: &Case) -> Check {
    lab.clear();
    // 1 ns: every UDP packet after the first of a flow finds it timed out.
    lab.h.set_udp_timeout_ns(u64::from(case.udp_times_out));
    let drain_at = case.a_drains_at.map(|at| at.index(case.steps.len()));
    for (i, step) in case.steps.iter().enumerate() {
        if drain_at == Some(i) {
            lab.h.set_draining(POD_SLOT, true);
            lab.a_draining = true;
        }
        let flow = &case.flows[step.flow.index(case.flows.len())];
        let frame = step.frame(flow);
        lab.try_send(step.side, &frame).map_err(|e| {
            format!(
                "step {i} of {}, {step:?} on {flow:?}: {e}",
                case.steps.len()
            )
        })?;
    }
    Ok(())
}

/// Random sequences of 1 to 39 packets on 1 to 3 flows (two pods and an
/// address of none; pod B draining, pod A starting its drain midway in half
/// the cases, so flows move to HELD under random traffic; pod to pod too, two ports each end, both families, TCP
/// and UDP, both ways and sometimes the wrong way, random TCP flags, IPv4
/// options and IPv6 extension headers up to past the parser's bound, garbage
/// bytes, cuts, junk after the Ethernet header), with every check of
/// `Lab::send` after every packet. A failure shrinks to a minimal sequence.
#[test]
fn random_packet_sequences_keep_the_maps_consistent() {
    let lab = RefCell::new(Lab::new());
    let config = proptest_config();
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case_strategy(), |case| {
        run_case(&mut lab.borrow_mut(), &case).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!(
        "random sequences: {cases} cases, {}",
        lab.borrow().summary()
    );
}

/// Handles on a lab's own `FLOWS`, `POD_COUNTERS` and `STATS`, to clear them
/// (between the cases of the property test, and in the longer corpora): the
/// harness has no way to, and loading the object afresh costs about 0.3 s,
/// far too much per case.
///
/// They are found by id: a marker address registered through the harness
/// tells which `POD_IPS` in the system is this harness's, and the programs
/// that use that map name the others.
pub struct OwnMaps {
    flows: BpfHashMap<MapData, FlowKey, FlowValue>,
    held: BpfHashMap<MapData, FlowKey, FlowValue>,
    counters: Array<MapData, PodCounters>,
    stats: PerCpuArray<MapData, u64>,
}

impl OwnMaps {
    pub fn find(h: &mut Harness) -> Self {
        static NEXT: AtomicU16 = AtomicU16::new(1);
        let pid = std::process::id();
        let marker = Ipv6Addr::new(
            0xfd00,
            0xdead,
            u16::try_from(pid >> 16).unwrap(),
            u16::try_from(pid & 0xffff).unwrap(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            0,
            0,
            1,
        );
        h.add_pod_ip(IpAddr::V6(marker), 0);
        let marker = PodIpKey {
            addr: marker.octets(),
        };
        let open = |id: u32| MapData::from_id(id).and_then(Map::from_map_data).ok();
        let (pod_ips_id, mut pod_ips) = loaded_maps()
            .filter_map(Result::ok)
            .filter(|m| m.name_as_str() == Some(maps::POD_IPS))
            .find_map(|m| {
                let map = BpfHashMap::<MapData, PodIpKey, u32>::try_from(open(m.id())?).ok()?;
                map.get(&marker, 0).is_ok().then_some((m.id(), map))
            })
            .expect("no POD_IPS map holds the marker");
        pod_ips.remove(&marker).expect("removing the marker");
        let ids = loaded_programs()
            .filter_map(Result::ok)
            .find_map(|p| {
                p.map_ids()
                    .ok()
                    .flatten()
                    .filter(|ids| ids.contains(&pod_ips_id))
            })
            .expect("no program uses this POD_IPS");
        let by_name = |name: &str| {
            ids.iter()
                .copied()
                .find(|&id| MapInfo::from_id(id).is_ok_and(|i| i.name_as_str() == Some(name)))
                .and_then(open)
                .unwrap_or_else(|| panic!("no {name} map next to this POD_IPS"))
        };
        Self {
            flows: BpfHashMap::try_from(by_name(maps::FLOWS)).unwrap(),
            held: BpfHashMap::try_from(by_name(maps::HELD)).unwrap(),
            counters: Array::try_from(by_name(maps::POD_COUNTERS)).unwrap(),
            stats: PerCpuArray::try_from(by_name(maps::STATS)).unwrap(),
        }
    }

    pub fn clear(&mut self) {
        let keys: Vec<FlowKey> = self.flows.keys().map(Result::unwrap).collect();
        for k in &keys {
            self.flows.remove(k).expect("clearing FLOWS");
        }
        let keys: Vec<FlowKey> = self.held.keys().map(Result::unwrap).collect();
        for k in &keys {
            self.held.remove(k).expect("clearing HELD");
        }
        for slot in SLOTS {
            self.counters
                .set(slot, PodCounters::default(), 0)
                .expect("clearing POD_COUNTERS");
        }
        for s in 0..stats::COUNT {
            let cpus = self.stats.get(&s, 0).expect("reading STATS").len();
            let zeros = PerCpuValues::try_from(vec![0u64; cpus]).unwrap();
            self.stats.set(s, zeros, 0).expect("clearing STATS");
        }
    }
}
