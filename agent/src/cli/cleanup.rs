//! `conndrain cleanup`: removes from a node what agents leave behind on
//! purpose (an exit is taken for a restart or an upgrade, see the README's
//! Reliability section): the pinned maps and links under `--bpffs`, whose
//! removal detaches the programs; the clsact filters (kernels before 6.6, or
//! `--attach clsact`), which stay attached without any process; the saved
//! state; a stale socket. For after an uninstall, on each node.

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::datapath::{remove_clsact_filters, remove_kept_under};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The agents' --bpffs directory: every pin under it is removed.
    #[arg(long, env = "CONNDRAIN_BPFFS", default_value = "/sys/fs/bpf/conndrain")]
    pub bpffs: PathBuf,
    /// The agents' --state-dir (state.json is removed). Default: the socket's directory.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

const STOP_IT: &str = "stop it first (in a cluster: delete the DaemonSet, e.g. kubectl delete -k deploy/), then run \
                       conndrain cleanup again; nothing was removed";

pub async fn run(args: &Args, socket: &Path) -> anyhow::Result<()> {
    if tokio::net::UnixStream::connect(socket).await.is_ok() {
        bail!("an agent is running on this node: it answers on {}; {STOP_IT}", socket.display());
    }
    // Checks the lock a running agent holds on the directory, then removes.
    let Some(pins) = remove_kept_under(&args.bpffs)? else {
        bail!("an agent is running on this node with --bpffs {}; {STOP_IT}", args.bpffs.display());
    };
    let mut done = Vec::new();
    for layout in &pins.layouts {
        done.push(format!("removed {}", layout.display()));
    }
    if pins.maps > 0 || !pins.links.is_empty() {
        done.push(format!(
            "  {} pinned map(s) freed, {} pinned link(s) removed{}",
            pins.maps,
            pins.links.len(),
            if pins.links.is_empty() {
                String::new()
            } else {
                format!(" ({}): the programs they kept attached are detached", pins.links.join(", "))
            }
        ));
    }
    let filters = remove_clsact_filters();
    if !filters.is_empty() {
        done.push(format!("removed conndrain's clsact filters: {}", filters.join(", ")));
    }
    let state = super::agent::state_path(args.state_dir.as_deref(), socket);
    let stale_socket = socket.exists().then(|| socket.to_path_buf());
    for (what, path) in [("the saved state", Some(state)), ("the stale socket", stale_socket)] {
        let Some(path) = path else { continue };
        match std::fs::remove_file(&path) {
            Ok(()) => done.push(format!("removed {what} {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("removing {what} {}: {e}", path.display()),
        }
    }
    if done.is_empty() {
        println!(
            "nothing to clean up: no pins under {}, no conndrain clsact filter in this network namespace, no saved state",
            args.bpffs.display()
        );
    }
    for line in done {
        println!("{line}");
    }
    Ok(())
}
