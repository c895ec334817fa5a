//! The steering state saved across restarts (in the node's `state.json`),
//! and taking it back against the pinned `PINS` map. Its format is kept
//! apart from both memory and the API: field names here are what state files
//! already written hold, so they stay (or get a serde alias) when either changes.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
};

use conndrain_common::{PROTO_TCP, WireKey, pin_flags};
use serde::{Deserialize, Serialize};

use super::{Backend, PinDatapath, PinnedFlow, Steering, Translation, learn::write_pin, wire_key};
use crate::datapath;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SavedSteering {
    pub backends: Vec<SavedBackend>,
    pub pins: Vec<SavedPin>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedBackend {
    pub ip: IpAddr,
    pub pod: String,
    pub deadline_ns: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedPin {
    pub translation: Translation,
    pub view: SavedPinView,
    pub deadline_ns: u64,
    pub pinned_ns: u64,
    pub closed_ns: Option<u64>,
    pub dead_ns: Option<u64>,
}

/// The pin as first saved (it was the API's view, addresses as text): only
/// `pod` is read back, the rest follows from the translation; all of it is
/// still written, for an older agent that reads this state after a downgrade.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedPinView {
    /// "tcp" or "udp".
    pub proto: String,
    pub client: SocketAddr,
    pub frontend: SocketAddr,
    pub backend: SocketAddr,
    pub backend_peer: SocketAddr,
    pub pod: String,
    pub dead: bool,
}

impl SavedPinView {
    fn of(p: &PinnedFlow) -> Self {
        let proto = if p.translation.proto == PROTO_TCP { "tcp" } else { "udp" };
        let (client, frontend, backend, backend_peer) = (p.client(), p.frontend(), p.backend(), p.backend_peer());
        Self { proto: proto.into(), client, frontend, backend, backend_peer, pod: p.pod.clone(), dead: p.dead() }
    }
}

impl Steering {
    /// The state to persist (times are `CLOCK_MONOTONIC` ns, valid until a reboot).
    #[must_use]
    pub fn save(&self) -> SavedSteering {
        let mut backends: Vec<SavedBackend> = self
            .backends
            .iter()
            .map(|(ip, b)| SavedBackend { ip: *ip, pod: b.pod.clone(), deadline_ns: b.deadline_ns })
            .collect();
        backends.sort_by_key(|b| b.ip);
        let mut pins: Vec<SavedPin> = self
            .pins
            .values()
            .map(|p| SavedPin {
                translation: p.translation.clone(),
                view: SavedPinView::of(p),
                deadline_ns: p.deadline_ns,
                pinned_ns: p.pinned_ns,
                closed_ns: p.closed_ns,
                dead_ns: p.dead_ns,
            })
            .collect();
        // By pod and client as text, as before.
        pins.sort_by_cached_key(|p| (p.view.pod.clone(), p.view.client.to_string()));
        SavedSteering { backends, pins }
    }

    /// Takes back a saved state at start. The pinned `PINS` map is the truth
    /// for which flows are pinned: a saved pin missing from it (the map is
    /// new: first start with `--bpffs`, or a layout change) is written again;
    /// an entry the state does not know (we were killed between writing it
    /// and saving) is adopted when its backend is known, else removed.
    pub async fn restore(saved: SavedSteering, dp: &mut impl PinDatapath, now: u64) -> Self {
        let mut s = Self::default();
        for b in saved.backends {
            // Learned every second again for a while: what happened while no agent ran is unknown.
            s.backends.insert(b.ip, Backend { pod: b.pod, deadline_ns: b.deadline_ns, since_ns: now });
        }
        let mut rewritten = 0;
        for p in saved.pins {
            let t = p.translation;
            let fwd = wire_key(t.proto, t.orig_src, t.orig_dst);
            let rev = wire_key(t.proto, t.reply_src, t.reply_dst);
            if dp.pin(&fwd).is_none() || dp.pin(&rev).is_none() {
                // Seen now: when it last carried a packet is unknown (the old
                // map is gone), and its idle clock must not start in the past.
                if let Err(e) = write_pin(dp, &t, fwd, rev, now).await {
                    tracing::warn!(error = %e, client = %p.view.client, "cannot pin a saved flow again; it is dropped");
                    continue;
                }
                if p.dead_ns.is_some()
                    && let Some(mut pin) = dp.pin(&fwd)
                {
                    pin.flags |= pin_flags::DEAD;
                    let _ = dp.pin_insert(&fwd, &pin);
                }
                rewritten += 1;
            }
            s.by_rev.insert(rev, fwd);
            let mut pinned = PinnedFlow::new(rev, t, p.view.pod, p.deadline_ns, p.pinned_ns);
            pinned.closed_ns = p.closed_ns;
            pinned.dead_ns = p.dead_ns;
            s.pins.insert(fwd, pinned);
        }
        let (adopted, removed) = s.adopt_unsaved(dp, now);
        s.changes = 1;
        if rewritten + adopted + removed > 0 {
            tracing::info!(
                rewritten,
                adopted,
                removed,
                "pinned flows reconciled with the PINS map (rewritten: saved but missing from the map; \
                 adopted: in the map but not saved; removed: in the map with no known backend)"
            );
        }
        s
    }

    /// The `PINS` entries the saved state does not know: adopted as forward
    /// entries when their backend is known and their reverse entry is there,
    /// else removed (they would steer forever). Returns (adopted, removed).
    fn adopt_unsaved(&mut self, dp: &mut impl PinDatapath, now: u64) -> (usize, usize) {
        let (mut adopted, mut removed) = (0, 0);
        let entries = dp.all_pins();
        let present: HashSet<WireKey> = entries.iter().map(|(k, _)| *k).collect();
        for (key, pin) in &entries {
            if self.pins.contains_key(key) || self.by_rev.contains_key(key) {
                continue;
            }
            // Read as a forward entry: client → frontend, rewritten to snat-or-client → backend.
            let ip = |b| datapath::ip_from_bytes(b, key.family);
            let t = Translation {
                proto: key.proto,
                orig_src: SocketAddr::new(ip(key.src), key.sport),
                orig_dst: SocketAddr::new(ip(key.dst), key.dport),
                reply_src: SocketAddr::new(ip(pin.new_dst), pin.new_dport),
                reply_dst: SocketAddr::new(ip(pin.new_src), pin.new_sport),
                live: true,
            };
            let rev = wire_key(t.proto, t.reply_src, t.reply_dst);
            let Some(b) = self.backends.get(&super::canonical(t.reply_src).ip()) else { continue };
            if !present.contains(&rev) {
                continue;
            }
            let mut pinned = PinnedFlow::new(rev, t, b.pod.clone(), b.deadline_ns, now);
            pinned.dead_ns = (pin.flags & pin_flags::DEAD != 0).then_some(now);
            self.by_rev.insert(rev, *key);
            self.pins.insert(*key, pinned);
            adopted += 1;
        }
        for (key, _) in &entries {
            if !self.pins.contains_key(key) && !self.by_rev.contains_key(key) {
                dp.pin_remove(key);
                removed += 1;
            }
        }
        (adopted, removed)
    }
}
