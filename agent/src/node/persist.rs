//! The state file (`--bpffs` only): what the pinned maps do not hold, saved
//! as JSON on every change and read back at start.

use std::{net::IpAddr, path::PathBuf};

use conndrain_common::LAYOUT_VERSION;
use serde::{Deserialize, Serialize};

use crate::drain::PodState;

use super::{Inner, PodSettings};

pub(super) struct Persist {
    pub(super) path: PathBuf,
    pub(super) boot_id: String,
    /// Something changed since the last write (besides steering, which counts its own changes).
    pub(super) dirty: bool,
    /// `Steering::changes` at the last write.
    pub(super) steering_changes: u64,
}

/// Version of the format of `Saved`; bump it when a change would misread
/// an older file (new optional fields need no bump).
pub(super) const STATE_VERSION: u32 = 1;

/// The agent's own state, saved as JSON on every change when the maps are
/// pinned, and taken back at start: what the pinned maps do not hold.
#[derive(Serialize, Deserialize)]
pub(super) struct Saved {
    /// `STATE_VERSION`.
    pub(super) version: u32,
    /// `LAYOUT_VERSION` of the maps this state went with. The state does not
    /// depend on it: after a layout change the maps are new, and the pods,
    /// drains and pins are written into them again from this state.
    pub(super) layout: u32,
    /// `/proc/sys/kernel/random/boot_id`: the times below are
    /// `CLOCK_MONOTONIC`, which survives a restart of the agent but not of the node.
    pub(super) boot_id: String,
    pub(super) pods: Vec<SavedPod>,
    /// Attached to every interface (steering).
    pub(super) everywhere: bool,
    pub(super) steering: crate::steering::SavedSteering,
}

#[derive(Serialize, Deserialize)]
pub(super) struct SavedPod {
    pub(super) name: String,
    pub(super) slot: u32,
    pub(super) ips: Vec<IpAddr>,
    #[serde(default)]
    pub(super) registered_ns: u64,
    #[serde(default)]
    pub(super) probes: Vec<u16>,
    #[serde(default)]
    pub(super) settings: PodSettings,
    pub(super) termination: Option<SavedTermination>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct SavedTermination {
    pub(super) started_ns: u64,
    pub(super) deadline_ns: u64,
    pub(super) quiet_period_ns: u64,
    pub(super) new_inbound_at_start: u64,
    pub(super) outcome: Option<(PodState, u64)>,
}

/// The saved state at `path`, if there is one this agent can take back.
pub(super) fn read_saved(path: &std::path::Path, boot_id: &str) -> Option<Saved> {
    match std::fs::read_to_string(path) {
        Ok(text) => match serde_json::from_str::<Saved>(&text) {
            Ok(s) if s.version != STATE_VERSION => {
                tracing::warn!(
                    path = %path.display(),
                    "ignoring a saved state of format v{}: this agent reads v{STATE_VERSION}",
                    s.version
                );
                None
            }
            Ok(s) if s.boot_id != *boot_id => {
                tracing::info!(path = %path.display(), "ignoring the state saved before the node rebooted");
                None
            }
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable saved state");
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the saved state");
            None
        }
    }
}

/// Writes a file only root can read, like the socket next to it.
pub(super) fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}

pub(super) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map_or_else(|_| String::new(), |s| s.trim().to_owned())
}

impl Inner {
    /// Marks the state changed, to be saved by the next `save`.
    pub(super) fn touch(&mut self) {
        if let Some(p) = self.persist.as_mut() {
            p.dirty = true;
        }
    }

    /// Writes the state if it changed since the last write (`--bpffs` only).
    /// Written to a temporary file and renamed, so a kill -9 leaves the old
    /// state or the new one, never half of one. Not synced to disk: the
    /// state is worth nothing after a reboot anyway (see `Saved::boot_id`).
    pub(super) fn save(&mut self) {
        let Some(p) = &self.persist else { return };
        if !p.dirty && p.steering_changes == self.steering.changes() {
            return;
        }
        let saved = Saved {
            version: STATE_VERSION,
            layout: LAYOUT_VERSION,
            boot_id: p.boot_id.clone(),
            pods: self
                .pods
                .iter()
                .map(|(name, pod)| SavedPod {
                    name: name.clone(),
                    slot: pod.slot,
                    ips: pod.ips.clone(),
                    registered_ns: pod.registered_ns,
                    probes: pod.probes.clone(),
                    settings: pod.settings.clone(),
                    termination: pod.termination.as_ref().map(|t| SavedTermination {
                        started_ns: t.started_ns,
                        deadline_ns: t.deadline_ns,
                        quiet_period_ns: t.quiet_period_ns,
                        new_inbound_at_start: t.new_inbound_at_start,
                        outcome: t.outcome,
                    }),
                })
                .collect(),
            everywhere: self.datapath.everywhere(),
            steering: self.steering.save(),
        };
        let text = match serde_json::to_string_pretty(&saved) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "serializing the state");
                return;
            }
        };
        let changes = self.steering.changes();
        let Some(p) = self.persist.as_mut() else {
            return;
        };
        let tmp = p.path.with_extension("json.tmp");
        let written = write_private(&tmp, text.as_bytes()).and_then(|()| std::fs::rename(&tmp, &p.path));
        match written {
            Ok(()) => {
                p.dirty = false;
                p.steering_changes = changes;
            }
            Err(e) => tracing::warn!(path = %p.path.display(), error = %e, "saving the state"),
        }
    }
}
