//! Flow-table scale: kernel memory per tracked flow and the insert rate, from
//! the object loaded with `FLOWS` sized as `--max-flows` would size it, filled
//! from user space.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, Map};
use conndrain_common::{FlowKey, FlowValue, direction, maps, tcp_state};

use crate::{
    report::{Section, Table, count},
    testrun::{Object, flow_key},
};

/// Target of issue 6.
const TARGET_BYTES_PER_FLOW: f64 = 150.0;
/// `struct htab_elem` of an LRU hash map (kernel/bpf/hashtab.c), before the key.
const ELEM_HEADER: f64 = 48.0;
/// `struct bucket`: a list head and a raw spinlock.
const BUCKET_BYTES: f64 = 16.0;
/// Key and value of one entry (both multiples of 8, as the kernel rounds them).
#[expect(clippy::cast_precision_loss, reason = "80-odd bytes")]
const ENTRY: f64 = (size_of::<FlowKey>() + size_of::<FlowValue>()) as f64;

pub fn run(sizes: &[u32], new_flow_ns: Option<(f64, f64)>) -> Result<Section> {
    let mut table = Table::new(&[
        "`--max-flows`",
        "flows inserted",
        "flows in the table",
        "memlock empty",
        "memlock full",
        "bytes per flow",
        "user-space inserts/s",
    ]);
    let mut worst: f64 = 0.0;
    let mut worst_buckets: f64 = 0.0;
    for &max in sizes {
        crate::check_interrupted()?;
        let mut ebpf = Object::maps_only(max)?;
        let map = ebpf.map_mut(maps::FLOWS).context("no FLOWS map")?;
        let fd = match &*map {
            Map::LruHashMap(data) => data.fd().as_fd().as_raw_fd(),
            _ => bail!("FLOWS is not an LRU hash map"),
        };
        let empty = memlock(fd)?;
        let mut flows: HashMap<_, FlowKey, FlowValue> = HashMap::try_from(map)?;
        let value = FlowValue {
            first_seen_ns: 1,
            last_seen_ns: 1,
            pod_slot: 7,
            state: tcp_state::ESTABLISHED,
            direction: direction::INBOUND,
            ..FlowValue::default()
        };
        let start = Instant::now();
        for i in 0..max {
            if i % 65_536 == 0 {
                crate::check_interrupted()?;
            }
            flows.insert(flow_key(i), value, 0)?;
        }
        let rate = f64::from(max) / start.elapsed().as_secs_f64();
        let full = memlock(fd)?;
        let present = flows.keys().flatten().count() as u64;
        let per_flow = full as f64 / f64::from(max);
        if per_flow > worst {
            worst = per_flow;
            worst_buckets = BUCKET_BYTES * f64::from(max.next_power_of_two()) / f64::from(max);
        }
        table.row(vec![
            count(u64::from(max)),
            count(u64::from(max)),
            count(present),
            mib(empty),
            mib(full),
            format!("{per_flow:.0}"),
            format!("{:.2} M", rate / 1e6),
        ]);
    }

    let mut notes = vec![format!(
        "Bytes per flow = memlock / `--max-flows`. `FLOWS` is a preallocated LRU hash: the kernel \
         charges every entry when the agent loads the object, so memlock is the same empty and full. \
         It adds up as the kernel lays the map out: per entry, a {ELEM_HEADER:.0}-byte element header \
         (hash node, LRU node, hash) + the {}-byte `FlowKey` + the {}-byte `FlowValue` = {:.0} bytes; \
         per bucket {BUCKET_BYTES:.0} bytes (list head and lock), with the bucket count rounded up to a \
         power of two ({worst_buckets:.0} bytes per flow at the worst size here). The LRU evicts a few \
         entries before the table is full (its free lists are per CPU), hence \"in the table\" \
         below \"inserted\".",
        size_of::<FlowKey>(),
        size_of::<FlowValue>(),
        ELEM_HEADER + ENTRY
    )];
    notes.push(if worst <= TARGET_BYTES_PER_FLOW {
        format!("Target (at most {TARGET_BYTES_PER_FLOW:.0} bytes of kernel memory per tracked flow): **met** ({worst:.0} bytes at worst).")
    } else {
        format!(
            "Target (at most {TARGET_BYTES_PER_FLOW:.0} bytes of kernel memory per tracked flow): **missed** \
             ({worst:.0} bytes at worst). The entries alone ({:.0} bytes) are within it; the bucket array \
             pushes it over. `--max-flows` a power of two (e.g. 131072 or 1048576) gives {:.0} bytes; \
             meeting it at any size needs {:.0} bytes less per entry (entries are rounded up to 8 bytes).",
            ELEM_HEADER + ENTRY,
            ELEM_HEADER + ENTRY + BUCKET_BYTES,
            ((worst - TARGET_BYTES_PER_FLOW) / 8.0).ceil() * 8.0
        )
    });
    if let Some((ns, idle_ns)) = new_flow_ns {
        notes.push(format!(
            "User-space inserts are one `bpf()` syscall each, so they measure the syscall more than the table. \
             The datapath's own insert (a new inbound SYN: flow insert, per-pod counters, ring-buffer event) \
             costs {ns:.0} ns above an empty classifier in a burst (section above), about {:.1} M new flows/s \
             per core, and {idle_ns:.0} ns when the agent is idle (events are written without a wakeup, \
             which used to cost about 8 µs there).",
            1e3 / ns
        ));
    }
    Ok(Section {
        title: "Flow table: kernel memory per flow, insert rate".into(),
        name: "flowtable",
        intro: "The embedded object is loaded with `FLOWS` sized as `--max-flows N` sizes it, then filled \
                with N distinct flows by map updates from user space. memlock is the map's `memlock:` \
                from `/proc/self/fdinfo` (what `bpftool map show` reports as `bytes_memlock`)."
            .into(),
        table,
        notes,
    })
}

/// The `memlock:` of a BPF object fd in `/proc/self/fdinfo`.
fn memlock(fd: i32) -> Result<u64> {
    let path = format!("/proc/self/fdinfo/{fd}");
    let info = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no memlock in {path}: {info}"))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1024.0 / 1024.0)
}
