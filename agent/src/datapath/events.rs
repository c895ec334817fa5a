//! The ring buffer of flow events, read every `POLL_INTERVAL` and whenever
//! the programs wake us (epoll via `AsyncFd`), so a close reaches the drain
//! logic within milliseconds.
//!
//! The programs write events without a wakeup (`maps::output_event` in the
//! eBPF crate): by default the kernel wakes the reader for the first event
//! after it caught up, i.e. for every new flow on a quiet node, and each
//! wakeup costs the packet several microseconds. They wake us only when a
//! backlog builds up, so a burst is still read before the ring fills.

use std::time::Duration;

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use conndrain_common::{FlowEvent, maps};
use tokio::io::unix::AsyncFd;

use crate::error::Error;

/// The longest an event waits in the ring: the bound on the delay batching
/// adds to drain detection (issue 16: its p99 under 10 ms).
pub const POLL_INTERVAL: Duration = Duration::from_millis(4);

/// The ring's size as the programs declare it: the least it gets.
const MIN_RING_BYTES: u32 = 256 * 1024;
/// The most it gets, whatever the flow table's size.
const MAX_RING_BYTES: u32 = 32 * 1024 * 1024;

/// The ring buffer's size for a flow table of `max_flows` entries: room for
/// one event per 16 entries (with each record's 8-byte header), as a power of
/// two (the kernel's rule for a ring; from 256 KiB up it is also a multiple of
/// the page size), from 256 KiB to 32 MiB. The default table (262,144 flows)
/// gets 2 MiB, about 29,000 events: 0.6 s of 50,000 new flows per second
/// while the agent is busy elsewhere; 1M flows get 8 MiB.
#[must_use]
pub fn ring_bytes(max_flows: u32) -> u32 {
    let record = u32::try_from(size_of::<FlowEvent>() + 8).unwrap_or(u32::MAX).next_multiple_of(8);
    let want = (max_flows / 16).saturating_mul(record);
    want.checked_next_power_of_two().unwrap_or(MAX_RING_BYTES).clamp(MIN_RING_BYTES, MAX_RING_BYTES)
}

pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl EventReader {
    pub(super) fn new(ebpf: &mut Ebpf) -> Result<Self, Error> {
        let map = ebpf.take_map(maps::EVENTS).ok_or(Error::MissingMap { name: maps::EVENTS })?;
        let ring = RingBuf::try_from(map).map_err(|source| Error::map(maps::EVENTS, source))?;
        // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns
        // the RingBuf, and always returns that same fd.
        let ring = unsafe { AsyncFd::register(ring) }.map_err(|e| Error::Io {
            op: "polling",
            path: "EVENTS ring buffer".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(Self { ring })
    }

    /// Waits for events and returns all that are ready: those the ring holds
    /// when the programs wake us or `POLL_INTERVAL` has passed.
    pub async fn next_batch(&mut self) -> Result<Vec<FlowEvent>, Error> {
        loop {
            let mut out = Vec::new();
            match tokio::time::timeout(POLL_INTERVAL, self.ring.readable_mut()).await {
                Ok(guard) => {
                    let mut guard = guard.map_err(|source| Error::Io {
                        op: "polling",
                        path: "EVENTS ring buffer".into(),
                        source,
                    })?;
                    read_all(guard.get_inner_mut(), &mut out);
                    guard.clear_ready();
                }
                // No wakeup: read what was written without one.
                Err(_) => read_all(self.ring.get_mut(), &mut out),
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

fn read_all(ring: &mut RingBuf<MapData>, out: &mut Vec<FlowEvent>) {
    while let Some(item) = ring.next() {
        if item.len() >= size_of::<FlowEvent>() {
            // SAFETY: the programs write whole FlowEvents; read_unaligned
            // because the ring gives no alignment guarantee to Rust.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_grows_with_the_flow_table_in_powers_of_two() {
        assert_eq!(ring_bytes(1024), MIN_RING_BYTES);
        assert_eq!(ring_bytes(conndrain_common::DEFAULT_MAX_FLOWS), 2 * 1024 * 1024);
        assert_eq!(ring_bytes(1 << 20), 8 * 1024 * 1024);
        assert_eq!(ring_bytes(16_777_216), MAX_RING_BYTES);
        for flows in [1024, 5000, 262_144, 300_000, 1 << 20, 16_777_216] {
            let bytes = ring_bytes(flows);
            assert!(bytes.is_power_of_two() && bytes.is_multiple_of(4096), "{flows}: {bytes}");
        }
    }
}
