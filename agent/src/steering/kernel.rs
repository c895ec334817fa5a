//! What the pin state machine needs of the kernel, as a narrow trait: the
//! `PINS` map, attaching everywhere, and route lookups. [`Datapath`] is the
//! real one; the unit tests use an in-memory one, so the state machine is
//! tested without a kernel.

use std::{future::Future, net::IpAddr};

use conndrain_common::{Pin, WireKey};

use crate::{datapath::Datapath, error::Error};

pub trait PinDatapath {
    /// The `PINS` entry of `key`.
    fn pin(&self, key: &WireKey) -> Option<Pin>;
    /// Every `PINS` entry.
    fn all_pins(&self) -> Vec<(WireKey, Pin)>;
    /// Writes an entry (the programs are told to look for pins first).
    fn pin_insert(&mut self, key: &WireKey, pin: &Pin) -> Result<(), Error>;
    /// Rewrites an existing entry only.
    fn pin_update(&mut self, key: &WireKey, pin: &Pin) -> Result<(), Error>;
    fn pin_remove(&mut self, key: &WireKey);
    /// Tells the programs when no flow is pinned any more.
    fn note_pins_gone(&mut self);
    /// Pinned packets are rewritten on every interface: the programs must be there.
    fn attach_everywhere(&mut self) -> Result<(), Error>;
    /// The route to `ip`: (ifindex, next hop).
    fn route(&mut self, ip: IpAddr) -> impl Future<Output = Result<(u32, IpAddr), Error>> + Send;
    /// The route to `ip` of a packet from `src` that came in on `iif`.
    fn route_from(
        &mut self,
        ip: IpAddr,
        src: IpAddr,
        iif: u32,
    ) -> impl Future<Output = Result<(u32, IpAddr), Error>> + Send;
}

impl PinDatapath for Datapath {
    fn pin(&self, key: &WireKey) -> Option<Pin> {
        Datapath::pin(self, key)
    }
    fn all_pins(&self) -> Vec<(WireKey, Pin)> {
        Datapath::all_pins(self)
    }
    fn pin_insert(&mut self, key: &WireKey, pin: &Pin) -> Result<(), Error> {
        Datapath::pin_insert(self, key, pin)
    }
    fn pin_update(&mut self, key: &WireKey, pin: &Pin) -> Result<(), Error> {
        Datapath::pin_update(self, key, pin)
    }
    fn pin_remove(&mut self, key: &WireKey) {
        Datapath::pin_remove(self, key);
    }
    fn note_pins_gone(&mut self) {
        Datapath::note_pins_gone(self);
    }
    fn attach_everywhere(&mut self) -> Result<(), Error> {
        Datapath::attach_everywhere(self)
    }
    fn route(&mut self, ip: IpAddr) -> impl Future<Output = Result<(u32, IpAddr), Error>> + Send {
        Datapath::route(self, ip)
    }
    fn route_from(
        &mut self,
        ip: IpAddr,
        src: IpAddr,
        iif: u32,
    ) -> impl Future<Output = Result<(u32, IpAddr), Error>> + Send {
        Datapath::route_from(self, ip, src, iif)
    }
}
