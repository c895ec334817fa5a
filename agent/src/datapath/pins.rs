//! `PINS`: the steered flows, wire tuple to backend (`steering/` decides
//! them; the programs follow them).

use conndrain_common::{Config, Pin, WireKey, maps};

use super::{Datapath, handles::update};
use crate::error::Error;

impl Datapath {
    pub fn pin_insert(&mut self, key: &WireKey, pin: &Pin) -> Result<(), Error> {
        // Before the pin exists, the programs must be looking for it.
        let mut c = self.maps.config()?;
        let before = c;
        c.no_pins = 0;
        if c.pin_filter_on != 0 {
            c.note_pin(key);
        }
        if c != before {
            self.maps.set_config(c)?;
        }
        self.maps.pins.insert(*key, *pin, update::ANY).map_err(|source| Error::map(maps::PINS, source))
    }

    /// Rewrites an existing pin only (`BPF_EXIST`): one the programs dropped
    /// meanwhile (its tuple reused by a new connection) stays gone.
    pub fn pin_update(&mut self, key: &WireKey, pin: &Pin) -> Result<(), Error> {
        self.maps.pins.insert(*key, *pin, update::EXIST).map_err(|source| Error::map(maps::PINS, source))
    }

    /// After pins were removed (or at start): when none is left, lets the
    /// programs skip the `PINS` lookup, and starts the filter afresh. Only
    /// then: a stale bit costs a lookup, a missing one would lose a pinned
    /// flow, and the filter of an earlier agent's pins is not known (an
    /// agent starts with it off: look up every packet).
    pub fn note_pins_gone(&mut self) {
        if self.maps.pins.keys().next().is_some() {
            return;
        }
        let set = self.maps.config().and_then(|c| {
            let fresh =
                Config { no_pins: 1, pin_filter_on: 1, pin_filter: [0; conndrain_common::PIN_FILTER_WORDS], ..c };
            if fresh == c { Ok(()) } else { self.maps.set_config(fresh) }
        });
        if let Err(e) = set {
            tracing::warn!(error = %e, "telling the programs that no flow is pinned");
        }
    }

    pub fn pin(&self, key: &WireKey) -> Option<Pin> {
        self.maps.pins.get(key, 0).ok()
    }

    /// Every entry of `PINS` (at most `MAX_PINS`): only at start, to find
    /// entries the saved state does not know.
    #[must_use]
    pub fn all_pins(&self) -> Vec<(WireKey, Pin)> {
        self.maps.pins.iter().filter_map(Result::ok).collect()
    }

    pub fn pin_remove(&mut self, key: &WireKey) {
        let _ = self.maps.pins.remove(key);
    }
}
