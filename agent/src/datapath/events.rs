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
