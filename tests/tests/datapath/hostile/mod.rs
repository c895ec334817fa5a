//! Hostile and malformed packets: a corpus of broken headers, and a property
//! test of random packet sequences, all run through the real programs.
//!
//! Modules: `frames` (the raw frame builders), `lab` (the harness with
//! registered pods and the checks run after every packet), the corpus by
//! header (`ipv4`, `ipv6`, `transport`), and `property` (the random
//! sequences).
//!
//! Where the README or the parser's documented bounds say what a packet does
//! (a chain of more than `MAX_EXT_HEADERS` extension headers, a header cut
//! short, the TCP flag rules), the tests check that too. Where nothing does,
//! only consistency is checked: today the parser reads through an IPv4 total
//! length or IPv6 payload length that ends before the transport header (or
//! runs past the frame), a TCP data offset past the end of the segment, a UDP
//! length of 0, IPv4 options with bad lengths and a hop-by-hop header that is
//! not first, and tracks those packets like well-formed ones, although the
//! kernel's own stack would drop them.

mod frames;
mod ipv4;
mod ipv6;
mod lab;
mod property;
mod transport;

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::harness::POD_SLOT;

const URG: u8 = 0x20;
const ECE: u8 = 0x40;
const CWR: u8 = 0x80;

const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

// IPv6 extension header numbers.
const HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DEST: u8 = 60;

/// The parser's bound on IPv6 extension headers (`parse.rs`).
const MAX_EXT_HEADERS: usize = 6;

/// A second pod, in its own slot.
const SLOT_B: u32 = POD_SLOT + 1;
/// Slot 0 (never registered: must stay zero) and the pods' slots.
const SLOTS: [u32; 3] = [0, POD_SLOT, SLOT_B];
const POD4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const POD4_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 3);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, 2);
const POD6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, 3);
/// Addresses of no registered pod.
const STRANGER4: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 9);
const STRANGER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, 9);
const PEER4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

/// The MAC addresses `packets` uses: destination (host), then source (pod).
const MACS: [u8; 12] = [0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
