//! The test harness, after katran's `BpfTester` and Cilium's bpf tests: one
//! fresh `Ebpf` (fresh maps) per test, packets run through the real programs
//! with `BPF_PROG_TEST_RUN`, and typed reads of every map.
//!
//! `run_checked` checks the two promises the programs make for every packet
//! of a flow that is not pinned (tracking): they return `TC_ACT_UNSPEC` and
//! hand the packet back byte for byte unchanged. A pinned flow's packets are
//! rewritten and redirected (steering); `steer.rs` runs those with `try_run`
//! and checks the verdict and the rewritten bytes instead.

use std::{borrow::Cow, mem::size_of, net::IpAddr};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, TestRunResult},
};
use conndrain_common::{
    Config, FlowEvent, FlowKey, FlowValue, PodCounters, PodIpKey, maps, pod_flags, programs, stats,
};

/// `TC_ACT_UNSPEC` (-1, as the kernel reports it: u32): the only verdict the
/// programs may return for a flow that is not pinned ("go on": the next
/// program, or the normal path).
pub const TC_ACT_UNSPEC: u32 = u32::MAX;

/// The slot the tests register their pod in. Deliberately not 0, so a program
/// that counted into the wrong slot would show up in `counters(0)`.
pub const POD_SLOT: u32 = 7;

/// The agent resizes `FLOWS` at load time (`--max-flows`); the tests do the same
/// so that many of them can run in parallel without preallocating the default
/// 256 Ki entries each. Large enough for every test here.
const FLOW_TABLE_SIZE: u32 = 4096;

/// Environment variable naming an eBPF object to test instead of the embedded one.
const OBJECT_OVERRIDE: &str = "CONNDRAIN_TEST_EBPF_OBJECT";

/// Which program a packet goes through.
#[derive(Clone, Copy, Debug)]
pub enum Side {
    /// `conndrain_ingress`: the pod sent it.
    FromPod,
    /// `conndrain_egress`: it goes to the pod.
    ToPod,
}

impl Side {
    fn program(self) -> &'static str {
        match self {
            Side::FromPod => programs::INGRESS,
            Side::ToPod => programs::EGRESS,
        }
    }
}

pub struct Harness {
    ebpf: Ebpf,
    events: RingBuf<MapData>,
}

impl Harness {
    /// Loads the embedded object with fresh maps and loads its programs.
    ///
    /// `CONNDRAIN_TEST_EBPF_OBJECT=PATH` loads the object at PATH instead of
    /// the embedded one (to run these tests against a modified datapath, e.g.
    /// a deliberately broken one, without rebuilding the agent).
    pub fn new() -> Self {
        Self::with_flow_table(FLOW_TABLE_SIZE)
    }

    /// Like `new`, with a flow table of `flows` entries (as `--max-flows`).
    pub fn with_flow_table(flows: u32) -> Self {
        Self::loading(
            flows,
            &[programs::INGRESS, programs::INGRESS_TRACK, programs::EGRESS, programs::INGRESS_L3, programs::EGRESS_L3],
        )
    }

    /// Like `new`, with only `names` loaded: each load is the verifier's
    /// whole search, seconds on Linux 6.1 under the guest stage's TCG, so a
    /// test that makes a harness per case loads only the program it runs.
    pub fn with_programs(names: &[&str]) -> Self {
        Self::loading(FLOW_TABLE_SIZE, names)
    }

    fn loading(flows: u32, names: &[&str]) -> Self {
        let object: Cow<'static, [u8]> = match std::env::var_os(OBJECT_OVERRIDE) {
            Some(path) => Cow::Owned(
                std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("{OBJECT_OVERRIDE}={}: {e}", path.display())),
            ),
            None => Cow::Borrowed(conndrain::EBPF_OBJECT),
        };
        assert!(
            !object.is_empty(),
            "conndrain was built without its eBPF object: build with CONNDRAIN_REQUIRE_EBPF=1"
        );
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::FLOWS, flows)
            .load(&object)
            .expect("loading the eBPF object");
        for &name in names {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("no program {name} in the object"))
                .try_into()
                .unwrap_or_else(|e| panic!("{name} is not a SchedClassifier: {e}"));
            prog.load()
                .unwrap_or_else(|e| panic!("loading {name}: {e:?}"));
        }
        let events = RingBuf::try_from(ebpf.take_map(maps::EVENTS).expect("no EVENTS map"))
            .expect("EVENTS is not a ring buffer");
        Self { ebpf, events }
    }

    /// The loaded object, for maps and programs this harness has no helper for.
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// A harness with one pod in `POD_SLOT` owning `ips`.
    pub fn with_pod(ips: &[IpAddr]) -> Self {
        let mut h = Self::new();
        for ip in ips {
            h.add_pod_ip(*ip, POD_SLOT);
        }
        h
    }

    pub fn add_pod_ip(&mut self, ip: IpAddr, slot: u32) {
        let mut pod_ips: HashMap<_, PodIpKey, u32> =
            HashMap::try_from(self.ebpf.map_mut(maps::POD_IPS).expect("no POD_IPS map")).unwrap();
        pod_ips
            .insert(PodIpKey { addr: mapped(ip) }, slot, 0)
            .expect("registering the pod IP");
    }

    /// Marks the pod in `slot` draining (or not), as the agent does when its
    /// drain starts (without moving its flows: that is the agent's part).
    pub fn set_draining(&mut self, slot: u32, draining: bool) {
        let mut flags: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut(maps::POD_FLAGS).expect("no POD_FLAGS map")).unwrap();
        let value = if draining { pod_flags::DRAINING } else { 0 };
        flags.set(slot, value, 0).expect("writing POD_FLAGS");
    }

    pub fn set_udp_timeout_ns(&mut self, udp_timeout_ns: u64) {
        let mut config: Array<_, Config> =
            Array::try_from(self.ebpf.map_mut(maps::CONFIG).expect("no CONFIG map")).unwrap();
        config
            .set(0, Config { udp_timeout_ns, ..Config::default() }, 0)
            .expect("writing CONFIG[0]");
    }

    /// Runs `frame` through `conndrain_ingress`: the pod sent it.
    pub fn send_from_pod(&self, frame: &[u8]) {
        self.run_checked(programs::INGRESS, frame);
    }

    /// Runs `frame` through `conndrain_egress`: it is on its way to the pod.
    pub fn send_to_pod(&self, frame: &[u8]) {
        self.run_checked(programs::EGRESS, frame);
    }

    /// Runs `frame` through both programs (for packets that must be ignored
    /// whichever way they travel).
    pub fn send_both_ways(&self, frame: &[u8]) {
        self.send_from_pod(frame);
        self.send_to_pod(frame);
    }

    /// Runs `frame` like `send_from_pod`/`send_to_pod` and returns true, or
    /// returns false if the kernel refused to run it (EINVAL: too short for
    /// `BPF_PROG_TEST_RUN`). Any other outcome fails the test.
    pub fn send_or_refused(&self, side: Side, frame: &[u8]) -> bool {
        self.run_unless_refused(side.program(), frame)
    }

    pub fn run_checked(&self, prog: &str, frame: &[u8]) {
        assert!(
            self.run_unless_refused(prog, frame),
            "BPF_PROG_TEST_RUN refused (EINVAL) to run {prog} on a {}-byte frame",
            frame.len()
        );
    }

    fn run_unless_refused(&self, prog: &str, frame: &[u8]) -> bool {
        // Room to spare: a program that grew the packet would show in the size.
        let mut out = vec![0xa5u8; frame.len() + 256];
        let res = match self.try_run(prog, frame, &mut out) {
            Err(ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EINVAL) =>
            {
                return false;
            }
            Err(e) => panic!(
                "BPF_PROG_TEST_RUN of {prog} on a {}-byte frame: {e:?}",
                frame.len()
            ),
            Ok(res) => res,
        };
        assert_eq!(
            res.return_value, TC_ACT_UNSPEC,
            "{prog} must return TC_ACT_UNSPEC for a flow that is not pinned"
        );
        let n = usize::try_from(res.data_size_out).unwrap();
        assert_eq!(n, frame.len(), "{prog} changed the packet length");
        assert!(
            out[..n] == *frame,
            "{prog} changed the packet:\n in: {frame:02x?}\nout: {:02x?}",
            &out[..n]
        );
        true
    }

    /// One raw test run, for frames the kernel itself may refuse.
    pub fn try_run(
        &self,
        prog: &str,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<TestRunResult, ProgramError> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(prog)
            .expect("no such program")
            .try_into()
            .unwrap();
        prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(out),
            ..TestRunOptions::default()
        })
    }

    pub fn flow(&self, key: &FlowKey) -> Option<FlowValue> {
        match self.flows_map().get(key, 0) {
            Ok(v) => Some(v),
            Err(MapError::KeyNotFound) => None,
            Err(e) => panic!("reading FLOWS: {e:?}"),
        }
    }

    /// The flow under `key`, which must exist.
    pub fn expect_flow(&self, key: &FlowKey) -> FlowValue {
        self.flow(key)
            .unwrap_or_else(|| panic!("no flow {key:?}; table: {:#?}", self.flows()))
    }

    pub fn flows(&self) -> Vec<(FlowKey, FlowValue)> {
        self.flows_map()
            .iter()
            .map(|r| r.expect("iterating FLOWS"))
            .collect()
    }

    /// The flow under `key` in the held table (draining pods' flows).
    pub fn held(&self, key: &FlowKey) -> Option<FlowValue> {
        match self.held_map().get(key, 0) {
            Ok(v) => Some(v),
            Err(MapError::KeyNotFound) => None,
            Err(e) => panic!("reading HELD: {e:?}"),
        }
    }

    pub fn held_flows(&self) -> Vec<(FlowKey, FlowValue)> {
        self.held_map()
            .iter()
            .map(|r| r.expect("iterating HELD"))
            .collect()
    }

    fn held_map(&self) -> HashMap<&MapData, FlowKey, FlowValue> {
        HashMap::try_from(self.ebpf.map(maps::HELD).expect("no HELD map"))
            .expect("HELD is not a hash map")
    }

    fn flows_map(&self) -> HashMap<&MapData, FlowKey, FlowValue> {
        HashMap::try_from(self.ebpf.map(maps::FLOWS).expect("no FLOWS map"))
            .expect("FLOWS is not a hash map")
    }

    pub fn counters(&self, slot: u32) -> PodCounters {
        let counters: Array<_, PodCounters> = Array::try_from(
            self.ebpf
                .map(maps::POD_COUNTERS)
                .expect("no POD_COUNTERS map"),
        )
        .unwrap();
        counters.get(&slot, 0).expect("reading POD_COUNTERS")
    }

    /// `STATS[index]` summed over CPUs.
    pub fn stat(&self, index: u32) -> u64 {
        let stats: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(maps::STATS).expect("no STATS map")).unwrap();
        stats.get(&index, 0).expect("reading STATS").iter().sum()
    }

    /// Every event produced since the last call, oldest first.
    pub fn events(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            assert_eq!(
                item.len(),
                size_of::<FlowEvent>(),
                "event of the wrong size"
            );
            // SAFETY: the length was checked; FlowEvent is plain integers and
            // byte arrays, so any bit pattern is a valid value.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
        }
        out
    }

    /// Asserts the state of a harness that has seen `packets` packets, none of
    /// which it could or should track: no flow, no counter, no event, and each
    /// packet counted in `STATS[why]`.
    pub fn assert_untouched(&mut self, packets: u64, why: u32) {
        assert!(
            self.flows().is_empty(),
            "flows were created: {:#?}",
            self.flows()
        );
        for slot in [0, POD_SLOT] {
            assert_eq!(
                self.counters(slot),
                PodCounters::default(),
                "POD_COUNTERS[{slot}] changed"
            );
        }
        assert_eq!(self.events(), [], "events were emitted");
        assert_eq!(self.stat(stats::PACKETS), packets, "STATS[PACKETS]");
        assert_eq!(self.stat(why), packets, "STATS[{why}]");
        assert_eq!(self.stat(stats::FLOWS_CREATED), 0, "STATS[FLOWS_CREATED]");
        assert_eq!(self.stat(stats::INSERT_FAILED), 0, "STATS[INSERT_FAILED]");
    }
}

/// An address as the maps store it: IPv4 as IPv4-mapped IPv6.
pub fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// `CLOCK_MONOTONIC` in ns, the clock of `bpf_ktime_get_ns`.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    u64::try_from(ts.tv_sec).unwrap() * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap()
}
