// Empty on purpose: the agent's build script depends on this crate so that
// cargo rebuilds the agent when the programs change; the programs are the
// `conndrain-ebpf` binary target (src/main.rs).
#![no_std]
