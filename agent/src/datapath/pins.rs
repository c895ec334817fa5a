//! `PINS`: the steered flows, wire tuple to backend (`steering/` decides
//! them; the programs follow them).

use conndrain_common::{Pin, WireKey, maps};

use super::{Datapath, handles::update};
use crate::error::Error;

impl Datapath {
    pub fn pin_insert(&mut self, key: &WireKey, pin: &Pin) -> Result<(), Error> {
        // Before the pin exists, the programs must be looking for pins.
        self.set_no_pins(false)?;
        self.maps.pins.insert(*key, *pin, update::ANY).map_err(|source| Error::map(maps::PINS, source))
    }

    /// Rewrites an existing pin only (`BPF_EXIST`): one the programs dropped
    /// meanwhile (its tuple reused by a new connection) stays gone.
    pub fn pin_update(&mut self, key: &WireKey, pin: &Pin) -> Result<(), Error> {
        self.maps.pins.insert(*key, *pin, update::EXIST).map_err(|source| Error::map(maps::PINS, source))
    }

    /// Tells the programs whether they may skip the `PINS` lookup.
    fn set_no_pins(&mut self, none: bool) -> Result<(), Error> {
        let mut c = self.maps.config()?;
        let want = u32::from(none);
        if c.no_pins != want {
            c.no_pins = want;
            self.maps.set_config(c)?;
        }
        Ok(())
    }

    /// After pins were removed (or at start): lets the programs skip the
    /// `PINS` lookup when none is left.
    pub fn note_pins_gone(&mut self) {
        let empty = self.maps.pins.keys().next().is_none();
        if empty && let Err(e) = self.set_no_pins(true) {
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
