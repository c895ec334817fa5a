//! conndrain: the agent and CLI as a library, so tests can reach the same code.

/// The compiled eBPF object (`ebpf/conndrain-ebpf`), embedded at build time.
/// Empty when the binary was built without the eBPF toolchain (see build.rs).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/conndrain-ebpf"));
