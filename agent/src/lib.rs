//! conndrain: the agent and CLI as a library, so tests reach the same code.
//!
//! Dependencies point one way, each layer using only those before it:
//! - `clock`: the monotonic clock the programs share (a leaf)
//! - `datapath`: the eBPF programs, their maps and events, as the agent sees them
//! - `drain`: the drain rule (pure); `steering`: pinning flows to terminating backends
//! - `views`: the serde views the API serves and the CLI prints (uses only
//!   plain types of `datapath` and `drain`)
//! - `node`: pod lifecycle on this node, fed by the datapath
//! - `api`: the local API (server and client); `kubernetes`: the pod watch
//! - `cli`: the command line

pub mod api;
pub mod cli;
pub mod clock;
pub mod conntrack;
pub mod datapath;
pub mod drain;
pub mod error;
pub mod flowindex;
pub mod kubernetes;
pub mod metrics;
pub mod node;
pub mod steering;
pub mod telemetry;
pub mod views;

/// The compiled eBPF object (`ebpf/conndrain-ebpf`), embedded at build time.
/// Empty when the binary was built without the eBPF toolchain (see build.rs).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/conndrain-ebpf"));
