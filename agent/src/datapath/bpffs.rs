//! What `--bpffs DIR` keeps across agent restarts and upgrades:
//!
//! ```text
//! DIR/v<LAYOUT_VERSION>/FLOWS, HELD, POD_IPS, POD_COUNTERS, POD_FLAGS, PINS, CONFIG, STATS   the maps
//! DIR/v<LAYOUT_VERSION>/links/<ifname>-ingress, <ifname>-egress          the tcx links
//! DIR/v<LAYOUT_VERSION>/intercept/connect4, connect6, sockops, syn-hold   the preStop intercept's cgroup links
//! ```
//!
//! The links keep the programs attached while no agent runs (kill -9, crash,
//! upgrade), and the programs keep using the pinned maps, so tracking and
//! steering go on. The next agent reuses the maps and adopts the links (see
//! `attach.rs`). The layout version is in the path so that an agent never
//! reads maps written in another layout: it removes them instead, with one
//! log line. Pins of the same layout are checked too (type, key and value
//! sizes, entries), because aya reuses whatever is pinned at a path.
//!
//! A running agent holds a shared `flock` on DIR, so that `conndrain cleanup`
//! (`remove_all`), which takes it exclusively, never pulls the maps and links
//! from under one. Agents do not exclude each other: an upgrade's next agent
//! may start while the old one exits.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapInfo, MapType};
use conndrain_common::{
    Config, FlowKey, FlowValue, INTERCEPT_ENTRIES, InterceptConfig, InterceptDst, InterceptPeer, LAYOUT_VERSION,
    MAX_HELD, MAX_PINS, MAX_PODS, MAX_SOCKETS, PINNED_MAPS, Pin, PodCounters, PodIpKey, PodSockets, ProbeKey,
    SockValue, WireKey, maps, stats,
};

use crate::error::Error;

/// The pin directory of this layout version.
#[derive(Debug)]
pub struct KeptDir {
    dir: PathBuf,
    links: PathBuf,
    intercept: PathBuf,
    /// Pin directories of other layouts, removed by `remove_other_layouts`.
    others: Vec<PathBuf>,
    /// DIR, open with a shared lock for as long as the agent runs.
    _lock: std::fs::File,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io { op, path: path.to_path_buf(), source }
}

impl KeptDir {
    /// Makes `root/v<LAYOUT_VERSION>/links`. The pins of other layouts under
    /// `root` are only noted here, and removed by `remove_other_layouts` once
    /// our programs are attached: until then the old programs keep steering
    /// the pinned flows (ahead of ours in each tcx chain; their maps are
    /// never read by us), so an upgrade that changes the layout leaves no
    /// moment without steering. `root` must be on a bpffs.
    pub fn prepare(root: &Path) -> Result<Self, Error> {
        super::features::require_bpffs(root)?;
        std::fs::create_dir_all(root).map_err(io("creating", root))?;
        let lock = lock(root, libc::LOCK_SH)?.ok_or_else(|| Error::Io {
            op: "locking",
            path: root.to_path_buf(),
            source: std::io::Error::other("`conndrain cleanup` is removing the pins; start the agent again after it"),
        })?;
        let current = format!("v{LAYOUT_VERSION}");
        let mut legacy = Vec::new();
        let mut others = Vec::new();
        for entry in std::fs::read_dir(root).map_err(io("reading", root))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && name != current && name.strip_prefix('v').is_some_and(|n| n.parse::<u32>().is_ok()) {
                tracing::warn!(
                    dir = %path.display(),
                    "replacing maps of layout {name}: this agent uses layout {current} and does not read them; \
                     their flow table and counters are dropped (pods, drains and pinned flows come back from the \
                     saved state), and the programs they kept attached are detached once ours are"
                );
                others.push(path);
            } else if !is_dir && PINNED_MAPS.contains(&name.as_str()) {
                legacy.push(path);
            }
        }
        // Agents before layout versions pinned FLOWS, POD_IPS and POD_COUNTERS
        // right under the directory; nothing ever read them back.
        if !legacy.is_empty() {
            tracing::warn!(
                dir = %root.display(),
                maps = ?legacy.iter().filter_map(|p| p.file_name()).collect::<Vec<_>>(),
                "replacing maps of layout v0 (unversioned pins): this agent uses layout {current}; they are removed"
            );
            for p in legacy {
                let _ = std::fs::remove_file(p);
            }
        }
        let dir = root.join(current);
        let links = dir.join("links");
        std::fs::create_dir_all(&links).map_err(io("creating", &links))?;
        let intercept = dir.join("intercept");
        std::fs::create_dir_all(&intercept).map_err(io("creating", &intercept))?;
        Ok(Self { dir, links, intercept, others, _lock: lock })
    }

    /// Removes the pins of other layouts (see `prepare`): their links go,
    /// and with them the old programs and maps.
    pub fn remove_other_layouts(&mut self) {
        for path in self.others.drain(..) {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(dir = %path.display(), "removed the maps and links of the other layout")
                }
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "removing maps of another layout")
                }
            }
        }
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    #[must_use]
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    #[must_use]
    pub fn link_path(&self, ifname: &str, direction: &str) -> PathBuf {
        self.links.join(format!("{ifname}-{direction}"))
    }

    /// Where the sockets tracepoint's link is pinned (not in `links/`, which
    /// holds the TC links, one per interface and direction).
    #[must_use]
    pub fn sockets_link_path(&self) -> PathBuf {
        self.dir.join("sockets-link")
    }

    /// Where the preStop intercept's cgroup links are pinned
    /// (`intercept::LINK_PINS`; not in `links/`, whose pins are per interface).
    #[must_use]
    pub fn intercept_dir(&self) -> &Path {
        &self.intercept
    }

    /// Every link pinned now.
    #[must_use]
    pub fn kept_links(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.links).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
    }
}

/// Opens `dir` and takes `flock` `op` on it without waiting: `None` when
/// another process holds a conflicting lock.
fn lock(dir: &Path, op: libc::c_int) -> Result<Option<std::fs::File>, Error> {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::File::open(dir).map_err(io("opening", dir))?;
    // SAFETY: flock on an fd we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock { Ok(None) } else { Err(io("locking", dir)(e)) }
}

/// What `remove_all` found and removed under a pin root.
#[derive(Debug, Default)]
pub struct RemovedKept {
    /// The layout directories (`v3`, ...) removed, with their maps and links.
    pub layouts: Vec<PathBuf>,
    /// The pinned maps removed.
    pub maps: usize,
    /// The pinned links removed (tcx links, and the sockets tracepoint's).
    pub links: Vec<String>,
}

/// `conndrain cleanup`: removes every pin under `root` (each layout's maps
/// and links, and the unversioned pins of the first agents), which detaches
/// the programs the links held and frees the maps. `Ok(None)`: an agent is
/// running with this `--bpffs` (it holds `root`'s lock), and nothing was
/// touched. A `root` that does not exist has nothing to remove.
pub fn remove_all(root: &Path) -> Result<Option<RemovedKept>, Error> {
    let mut removed = RemovedKept::default();
    if !root.exists() {
        return Ok(Some(removed));
    }
    super::features::require_bpffs(root)?;
    let Some(_lock) = lock(root, libc::LOCK_EX)? else {
        return Ok(None);
    };
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    };
    for entry in std::fs::read_dir(root).map_err(io("reading", root))?.flatten() {
        let (name, path) = (entry.file_name().to_string_lossy().into_owned(), entry.path());
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && name.strip_prefix('v').is_some_and(|n| n.parse::<u32>().is_ok()) {
            let pins = names(&path);
            removed.maps += pins.iter().filter(|n| PINNED_MAPS.contains(&n.as_str())).count();
            removed.links.extend(pins.into_iter().filter(|n| n == "sockets-link"));
            removed.links.extend(names(&path.join("links")));
            removed.links.extend(names(&path.join("intercept")).into_iter().map(|n| format!("intercept/{n}")));
            std::fs::remove_dir_all(&path).map_err(io("removing", &path))?;
            removed.layouts.push(path);
        } else if !is_dir && PINNED_MAPS.contains(&name.as_str()) {
            std::fs::remove_file(&path).map_err(io("removing", &path))?;
            removed.maps += 1;
        }
    }
    removed.links.sort();
    Ok(Some(removed))
}

/// What a pinned map must be for this agent to reuse it.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Shape {
    ty: &'static str,
    key: u32,
    value: u32,
    entries: u32,
}

fn size<T>() -> u32 {
    u32::try_from(size_of::<T>()).unwrap_or(u32::MAX)
}

fn expected(name: &str, max_flows: u32) -> Option<Shape> {
    let s = |ty, key, value, entries| Some(Shape { ty, key, value, entries });
    match name {
        maps::FLOWS => s("lru_hash", size::<FlowKey>(), size::<FlowValue>(), max_flows),
        maps::HELD => s("hash", size::<FlowKey>(), size::<FlowValue>(), MAX_HELD),
        maps::POD_FLAGS => s("array", 4, 4, MAX_PODS),
        maps::POD_IPS => s("hash", size::<PodIpKey>(), 4, MAX_PODS * 2),
        maps::POD_COUNTERS => s("array", 4, size::<PodCounters>(), MAX_PODS),
        maps::PINS => s("hash", size::<WireKey>(), size::<Pin>(), MAX_PINS),
        maps::CONFIG => s("array", 4, size::<Config>(), 1),
        maps::STATS => s("percpu_array", 4, 8, stats::COUNT),
        maps::SOCKETS => s("hash", 8, size::<SockValue>(), MAX_SOCKETS),
        maps::POD_SOCKETS => s("array", 4, size::<PodSockets>(), MAX_PODS),
        maps::PROBES => s("hash", size::<ProbeKey>(), 1, MAX_PODS * 4),
        maps::INTERCEPT_CONFIG => s("array", 4, size::<InterceptConfig>(), 1),
        maps::INTERCEPT_CONNECTS => s("lru_hash", 8, size::<InterceptDst>(), INTERCEPT_ENTRIES),
        maps::INTERCEPT_PEERS => s("lru_hash", size::<InterceptPeer>(), size::<InterceptDst>(), INTERCEPT_ENTRIES),
        _ => None,
    }
}

fn type_name(t: &Result<MapType, aya::maps::MapError>) -> &'static str {
    match t {
        Ok(MapType::LruHash) => "lru_hash",
        Ok(MapType::Hash) => "hash",
        Ok(MapType::Array) => "array",
        Ok(MapType::PerCpuArray) => "percpu_array",
        _ => "other",
    }
}

fn shape_of(info: &MapInfo) -> Shape {
    Shape {
        ty: type_name(&info.map_type()),
        key: info.key_size(),
        value: info.value_size(),
        entries: info.max_entries(),
    }
}

/// The outcome of checking the pins before loading.
#[derive(Default)]
pub struct Checked {
    /// Maps found pinned in the right shape: aya reuses them as they are.
    pub reused: BTreeSet<&'static str>,
    /// The previous flow table, when only its size differs (`--max-flows`
    /// changed): its pin is removed so that aya makes a new table, and its
    /// flows are copied into it once the programs use the new one.
    pub old_flows: Option<MapData>,
}

/// Checks every pinned map against what this agent needs; removes the pins
/// it cannot use, each with one log line, so that aya creates them anew
/// instead of reusing a map it would misread.
pub fn check_maps(dir: &KeptDir, max_flows: u32) -> Checked {
    let mut out = Checked::default();
    for name in PINNED_MAPS {
        let path = dir.map_path(name);
        if !path.exists() {
            continue;
        }
        let Some(want) = expected(name, max_flows) else {
            continue;
        };
        let found = match MapInfo::from_pin(&path) {
            Ok(info) => shape_of(&info),
            Err(e) => {
                tracing::warn!(map = name, path = %path.display(), error = %e, "replacing pinned map: cannot read it");
                let _ = std::fs::remove_file(&path);
                continue;
            }
        };
        if found == want {
            out.reused.insert(name);
            continue;
        }
        if name == maps::FLOWS && (Shape { entries: want.entries, ..found }) == want {
            tracing::warn!(
                map = name,
                entries = found.entries,
                max_flows,
                "replacing pinned map FLOWS: it has {} entries and --max-flows is {max_flows}; \
                 a new table is made and the tracked flows are copied into it",
                found.entries
            );
            match MapData::from_pin(&path) {
                Ok(old) => out.old_flows = Some(old),
                Err(e) => {
                    tracing::warn!(error = %e, "opening the old flow table; its flows are dropped")
                }
            }
        } else {
            tracing::warn!(
                map = name,
                found = ?found,
                expected = ?want,
                "replacing pinned map {name}: its shape is not this version's; its contents are dropped"
            );
        }
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "removing a pinned map");
        }
    }
    out
}

/// The interface index and direction of a tcx link, from its fdinfo (aya's
/// `LinkInfo` does not expose them). `None` when the kernel does not say.
pub fn tcx_link_target(fd: std::os::fd::BorrowedFd<'_>) -> Option<(u32, &'static str)> {
    use std::os::fd::AsRawFd as _;
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    let mut ifindex = None;
    let mut direction = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("ifindex:") {
            ifindex = v.trim().parse::<u32>().ok();
        } else if let Some(v) = line.strip_prefix("attach_type:") {
            // "46 (ingress)" / "47 (egress)" on 6.6+.
            direction = if v.contains("ingress") {
                Some("ingress")
            } else if v.contains("egress") {
                Some("egress")
            } else {
                match v.split_whitespace().next() {
                    Some("46") => Some("ingress"),
                    Some("47") => Some("egress"),
                    _ => None,
                }
            };
        }
    }
    Some((ifindex?, direction?))
}
