//! A private bpffs for tests that run the agent with `--bpffs`: mounted on a
//! temporary directory, so no test sees another's pins (nor the node's
//! `/sys/fs/bpf`), and unmounted on drop.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};
use conndrain_common::LAYOUT_VERSION;

use crate::{TempDir, run_cmd};

pub struct Bpffs(TempDir);

impl Bpffs {
    pub fn mount() -> Result<Self> {
        let dir = TempDir::new()?;
        run_cmd(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir.path()))
            .context("mounting a bpffs for the test")?;
        Ok(Self(dir))
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// The value for `--bpffs`.
    #[must_use]
    pub fn arg(&self) -> String {
        self.path().to_string_lossy().into_owned()
    }

    /// The pin directory of this agent's map layout (`DIR/v<LAYOUT_VERSION>`).
    #[must_use]
    pub fn layout_dir(&self) -> PathBuf {
        self.path().join(format!("v{LAYOUT_VERSION}"))
    }

    /// The pinned tcx links, by file name (`<ifname>-ingress`, `<ifname>-egress`).
    #[must_use]
    pub fn links(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.layout_dir().join("links"))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// A pinned map of the current layout.
    pub fn open(&self, name: &str) -> Result<aya::maps::Map> {
        let path = self.layout_dir().join(name);
        aya::maps::MapData::from_pin(&path)
            .and_then(aya::maps::Map::from_map_data)
            .with_context(|| format!("opening the pinned map {}", path.display()))
    }

    /// `(key, value)` of a pinned hash map.
    pub fn entries<K: aya::Pod, V: aya::Pod>(&self, name: &str) -> Result<Vec<(K, V)>> {
        let hash = aya::maps::HashMap::<_, K, V>::try_from(self.open(name)?)?;
        Ok(hash.iter().filter_map(Result::ok).collect())
    }

    /// `(index, value)` of a pinned `Array<u32>`.
    pub fn slots(&self, name: &str) -> Result<Vec<(u32, u32)>> {
        let array = aya::maps::Array::<_, u32>::try_from(self.open(name)?)?;
        Ok((0..).zip(array.iter().filter_map(Result::ok)).collect())
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Lazily: the agent's mount namespace may still hold it.
        if let Err(e) = run_cmd(Command::new("umount").arg("-l").arg(self.path())) {
            eprintln!("testbed: unmounting the test bpffs: {e:#}");
        }
    }
}
