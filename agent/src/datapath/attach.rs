//! Attaching the TC programs: tcx where the kernel has it (6.6+, commit
//! e420bed02507 "bpf: Add fd-based tcx multi-prog infra"), clsact otherwise.
//! Either way we add our programs next to whatever is there and never
//! replace another tool's.
//!
//! With `--bpffs`, each tcx link is pinned (`pinning.rs`), so the programs
//! stay attached while no agent runs. A starting agent adopts a link pinned
//! for the interface by swapping its program for the newly loaded one in
//! place: `bpf_link_update` (aya's `SchedClassifier::attach_to_link`), which
//! is atomic. So there is never a moment with two copies of our programs on
//! one interface (which would count every packet twice) nor one with none
//! (which would miss packets), and the link keeps its position among other
//! tools' programs. We swap even when the program is the same: the new
//! program writes its events to this agent's ring buffer, and one code path
//! serves restarts and upgrades alike.
//!
//! clsact filters cannot be pinned, and they stay attached without any
//! process anyway. A starting agent removes the filters an earlier agent
//! left on the interface, then attaches its own: during those two netlink
//! calls that interface is not tracked (tcx has no such gap).

use std::path::PathBuf;

use aya::{
    Ebpf,
    programs::{
        LinkOrder, MultiProgLink as _, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
    },
};
use conndrain_common::programs;

use super::pinning::{self, PinDir};
use crate::error::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Tcx,
    Clsact,
}

/// One attached program on one interface, owned by us (taken out of aya's
/// program so that dropping it is ours to decide).
#[derive(Debug)]
struct Held {
    link: SchedClassifierLink,
    /// Where the link is pinned (tcx with `--bpffs`).
    pin: Option<PathBuf>,
}

#[derive(Debug)]
pub struct Links {
    ingress: Held,
    egress: Held,
    /// Whether the links were adopted from an earlier agent.
    pub adopted: bool,
}

impl Links {
    /// The paths these links are pinned at.
    pub fn pins(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.ingress.pin, &self.egress.pin].into_iter().flatten()
    }
}

pub fn load_programs(ebpf: &mut Ebpf) -> Result<AttachMode, Error> {
    for name in [programs::INGRESS, programs::EGRESS] {
        program(ebpf, name)?
            .load()
            .map_err(|source| Error::Program { name, op: "loading", source: Box::new(source) })?;
    }
    Ok(if super::features::kernel_at_least(6, 6) { AttachMode::Tcx } else { AttachMode::Clsact })
}

pub fn attach(ebpf: &mut Ebpf, iface: &str, ifindex: u32, mode: AttachMode, pins: Option<&PinDir>) -> Result<Links, Error> {
    if mode == AttachMode::Clsact {
        // Adding clsact where it exists fails with EEXIST; that is fine.
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            tracing::debug!(%iface, error = %e, "clsact qdisc (probably already there)");
        }
    }
    let ingress = attach_one(ebpf, programs::INGRESS, iface, ifindex, TcAttachType::Ingress, mode, pins)?;
    let egress = match attach_one(ebpf, programs::EGRESS, iface, ifindex, TcAttachType::Egress, mode, pins) {
        Ok(l) => l,
        Err(e) => {
            detach_one(ingress.0);
            return Err(e);
        }
    };
    Ok(Links { adopted: ingress.1 || egress.1, ingress: ingress.0, egress: egress.0 })
}

fn direction(ty: TcAttachType) -> &'static str {
    if ty == TcAttachType::Ingress { "ingress" } else { "egress" }
}

fn attach_one(
    ebpf: &mut Ebpf,
    name: &'static str,
    iface: &str,
    ifindex: u32,
    ty: TcAttachType,
    mode: AttachMode,
    pins: Option<&PinDir>,
) -> Result<(Held, bool), Error> {
    let attach_err = |source| Error::Attach { iface: iface.to_owned(), source: Box::new(source) };
    let pin = pins.filter(|_| mode == AttachMode::Tcx).map(|p| p.link_path(iface, direction(ty)));
    let prog = program(ebpf, name)?;
    if let Some(path) = &pin
        && path.exists()
    {
        if let Some(old) = pinned_link(path, ifindex, ty) {
            // Atomic: the interface goes from the old program to ours
            // between two packets (see the module comment).
            match prog.attach_to_link(old).and_then(|id| prog.take_link(id)) {
                Ok(link) => return Ok((Held { link, pin }, true)),
                Err(e) => tracing::warn!(
                    interface = iface,
                    error = %e,
                    "cannot swap our program into the link an earlier agent pinned; replacing the link"
                ),
            }
        } else {
            tracing::info!(
                interface = iface,
                path = %path.display(),
                "a pinned link is for an interface that is gone (or renamed); replacing it"
            );
        }
        // The old link goes with its last reference (this pin).
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "removing a stale link pin");
        }
    }
    if mode == AttachMode::Clsact {
        // Filters an earlier agent left (it was killed, or ran with --bpffs).
        if tc::qdisc_detach_program(iface, ty, name).is_ok() {
            tracing::info!(interface = iface, program = name, "replaced the filter an earlier agent left");
        }
    }
    let options = match mode {
        AttachMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
        AttachMode::Clsact => TcAttachOptions::Netlink(NlOptions::default()),
    };
    let id = prog.attach_with_options(iface, ty, options).map_err(attach_err)?;
    let link = prog.take_link(id).map_err(attach_err)?;
    let Some(path) = pin else { return Ok((Held { link, pin: None }, false)) };
    let pin_failed = |reason: String| Error::Io {
        op: "pinning the link at",
        path: path.clone(),
        source: std::io::Error::other(reason),
    };
    // On an error below the link is dropped, which detaches it.
    let fd: FdLink = link.try_into().map_err(|e: LinkError| pin_failed(e.to_string()))?;
    let pinned = fd.pin(&path).map_err(|e| pin_failed(e.to_string()))?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| pin_failed(e.to_string()))?;
    Ok((Held { link, pin: Some(path) }, false))
}

/// The link pinned at `path`, if it is a tcx link on `ifindex` in direction `ty`.
fn pinned_link(path: &std::path::Path, ifindex: u32, ty: TcAttachType) -> Option<SchedClassifierLink> {
    let pinned = PinnedLink::from_pin(path).ok()?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).ok()?;
    let target = pinning::tcx_link_target(link.fd().ok()?)?;
    (target == (ifindex, direction(ty))).then_some(link)
}

fn detach_one(held: Held) {
    if let Some(path) = &held.pin
        && let Err(e) = std::fs::remove_file(path)
    {
        tracing::debug!(path = %path.display(), error = %e, "unpinning link");
    }
    // Dropping the last reference detaches: closes a tcx link's fd, removes a
    // clsact filter. The interface may be gone with its pod; then the kernel
    // already dropped the program.
    drop(held.link);
}

pub fn detach(links: Links) {
    detach_one(links.ingress);
    detach_one(links.egress);
}

/// Lets the programs run on after we exit: a pinned tcx link stays attached
/// by its pin once our fd is closed; a clsact filter stays attached unless
/// removed, so its handle is forgotten instead of dropped.
pub fn leave_attached(links: Links) {
    for held in [links.ingress, links.egress] {
        if held.pin.is_some() {
            drop(held.link);
        } else {
            std::mem::forget(held.link);
        }
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, Error> {
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram { name })?
        .try_into()
        .map_err(|source| Error::Program { name, op: "finding", source: Box::new(source) })
}

pub fn ifname(ifindex: u32) -> Result<String, Error> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf is IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(Error::Interface { ifindex, source: std::io::Error::last_os_error() });
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}
