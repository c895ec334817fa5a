//! One error type for the library; every variant names the operation and the
//! object so a log line is enough to know what failed where.

use std::{net::IpAddr, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "this conndrain binary was built without its eBPF programs (bpf-linker was missing); build it with `cargo xtask build`"
    )]
    NoEbpfObject,
    #[error("{}", missing.join("\n"))]
    Unsupported { missing: Vec<String> },
    #[error("loading the eBPF programs: {source}")]
    Load { source: Box<aya::EbpfError> },
    #[error("eBPF object has no map {name}")]
    MissingMap { name: &'static str },
    #[error("eBPF object has no program {name}")]
    MissingProgram { name: &'static str },
    #[error("{op} program {name}: {source}")]
    Program { name: &'static str, op: &'static str, source: Box<aya::programs::ProgramError> },
    #[error("attaching to interface {iface}: {source}")]
    Attach { iface: String, source: Box<aya::programs::ProgramError> },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: Box<aya::maps::MapError> },
    #[error("pinning map at {}: {reason}", path.display())]
    Pin { path: PathBuf, reason: String },
    #[error(
        "--bpffs {} is not on a bpf filesystem: mount one (mount -t bpf bpf /sys/fs/bpf) and point --bpffs under it, or in Kubernetes mount the node's /sys/fs/bpf into the pod (hostPath, see deploy/daemonset.yaml)",
        path.display()
    )]
    NotBpffs { path: PathBuf },
    #[error("netlink {op}: {reason}")]
    Netlink { op: &'static str, reason: String },
    #[error(
        "no route to {ip} in the agent's network namespace ({reason}): if it is a pod IP, is the pod running on this node with its network set up, and does the agent run in the node's network namespace (hostNetwork)?"
    )]
    NoRoute { ip: IpAddr, reason: String },
    #[error("interface index {ifindex}: {source}")]
    Interface { ifindex: u32, source: std::io::Error },
    #[error("{op} {}: {source}", path.display())]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
}

impl Error {
    #[must_use]
    pub fn map(name: &'static str, source: aya::maps::MapError) -> Self {
        Self::Map { name, source: Box::new(source) }
    }
}
