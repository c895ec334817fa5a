//! A cgroup (v2) of the test's own, for programs attached to a cgroup: the
//! agent's preStop intercept attaches to it (`--intercept-cgroup`) instead
//! of the machine's root, and the test's "kubelet" runs in it.
//!
//! The cgroup2 hierarchy is mounted again on a temp dir (like the test bpffs):
//! `ip netns exec` remounts `/sys`, so the agent it starts sees no cgroup
//! under `/sys/fs/cgroup`, but it sees this mount. It is the machine's one
//! cgroup2 hierarchy, so a cgroup made here is a cgroup like any other.

use std::{
    ffi::CString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::{POLL, TempDir, run_cmd, unique_tag};

/// A cgroup of the test's own, removed on drop (its processes killed first,
/// so a failed test cannot leave it behind), with its private mount.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    mount: TempDir,
}

impl Cgroup {
    /// `<private cgroup2 mount>/<unique tag>-<role>`.
    pub fn unique(role: &str) -> Result<Self> {
        let mount = TempDir::new()?;
        run_cmd(Command::new("mount").args(["-t", "cgroup2", "none"]).arg(mount.path()))
            .context("mounting cgroup2 for the test")?;
        let path = mount.path().join(format!("{}-{role}", unique_tag()));
        let cgroup = Self { path, mount };
        std::fs::create_dir(&cgroup.path).with_context(|| format!("creating cgroup {}", cgroup.path.display()))?;
        Ok(cgroup)
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the process `cmd` spawns join this cgroup before it runs anything.
    pub fn join_on_spawn(&self, cmd: &mut Command) -> Result<()> {
        let procs = CString::new(self.path.join("cgroup.procs").into_os_string().into_encoded_bytes())?;
        // SAFETY: open/write/close are async-signal-safe; the path was made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                // "0": the writing process.
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
        Ok(())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // cgroup.kill (Linux 5.14+) ends whatever is left; then the directory can go.
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        let removed = (0..200).any(|_| {
            let gone = !self.path.exists() || std::fs::remove_dir(&self.path).is_ok();
            if !gone {
                std::thread::sleep(POLL);
            }
            gone
        });
        if !removed {
            eprintln!("testbed: removing cgroup {}: still busy", self.path.display());
        }
        // Lazily: the agent's mount namespace may still hold it.
        if let Err(e) = run_cmd(Command::new("umount").arg("-l").arg(self.mount.path())) {
            eprintln!("testbed: unmounting the test cgroup2: {e:#}");
        }
    }
}
