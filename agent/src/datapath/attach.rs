//! Attaching the TC programs: tcx where the kernel has it (6.6+, commit
//! e420bed02507 "bpf: Add fd-based tcx multi-prog infra"), clsact otherwise.
//! Either way we add our programs next to whatever is there and never
//! replace another tool's.

use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
    },
};
use conndrain_common::programs;

use crate::error::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Tcx,
    Clsact,
}

#[derive(Debug)]
pub struct Links {
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
}

pub fn load_programs(ebpf: &mut Ebpf) -> Result<AttachMode, Error> {
    for name in [programs::INGRESS, programs::EGRESS] {
        program(ebpf, name)?
            .load()
            .map_err(|source| Error::Program { name, op: "loading", source: Box::new(source) })?;
    }
    Ok(if super::features::kernel_at_least(6, 6) { AttachMode::Tcx } else { AttachMode::Clsact })
}

pub fn attach(ebpf: &mut Ebpf, iface: &str, mode: AttachMode) -> Result<Links, Error> {
    let options = || match mode {
        AttachMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
        AttachMode::Clsact => TcAttachOptions::Netlink(NlOptions::default()),
    };
    if mode == AttachMode::Clsact {
        // Adding clsact where it exists fails with EEXIST; that is fine.
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            tracing::debug!(%iface, error = %e, "clsact qdisc (probably already there)");
        }
    }
    let attach_one = |ebpf: &mut Ebpf, name: &'static str, ty| {
        program(ebpf, name)?
            .attach_with_options(iface, ty, options())
            .map_err(|source| Error::Attach { iface: iface.to_owned(), source: Box::new(source) })
    };
    let ingress = attach_one(ebpf, programs::INGRESS, TcAttachType::Ingress)?;
    let egress = match attach_one(ebpf, programs::EGRESS, TcAttachType::Egress) {
        Ok(l) => l,
        Err(e) => {
            if let Ok(p) = program(ebpf, programs::INGRESS) {
                let _ = p.detach(ingress);
            }
            return Err(e);
        }
    };
    Ok(Links { ingress, egress })
}

pub fn detach(ebpf: &mut Ebpf, links: Links) {
    let Links { ingress, egress } = links;
    for (name, link) in [(programs::INGRESS, ingress), (programs::EGRESS, egress)] {
        match program(ebpf, name) {
            // The interface may be gone with its pod; the kernel already dropped the link then.
            Ok(p) => {
                if let Err(e) = p.detach(link) {
                    tracing::debug!(program = name, error = %e, "detaching");
                }
            }
            Err(e) => tracing::warn!(error = %e, "detaching"),
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
