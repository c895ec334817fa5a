//! The ring buffer of flow events, read as it becomes readable (epoll via
//! `AsyncFd`), so a close reaches the drain logic within milliseconds.

use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use conndrain_common::{FlowEvent, maps};
use tokio::io::unix::AsyncFd;

use crate::error::Error;

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

    /// Waits for events and returns all that are ready.
    pub async fn next_batch(&mut self) -> Result<Vec<FlowEvent>, Error> {
        loop {
            let mut guard = self.ring.readable_mut().await.map_err(|source| Error::Io {
                op: "polling",
                path: "EVENTS ring buffer".into(),
                source,
            })?;
            let ring = guard.get_inner_mut();
            let mut out = Vec::new();
            while let Some(item) = ring.next() {
                if item.len() >= size_of::<FlowEvent>() {
                    // SAFETY: the programs write whole FlowEvents; read_unaligned
                    // because the ring gives no alignment guarantee to Rust.
                    out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
                }
            }
            guard.clear_ready();
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}
