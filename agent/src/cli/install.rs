//! `conndrain install DIR`: copies this binary to `DIR/conndrain`, for an
//! init container that puts it in an emptyDir the app container's exec
//! preStop hook runs it from (`deploy/examples`). The image has no shell and
//! no `cp`, so the binary copies itself.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The directory to copy the binary into, as DIR/conndrain (mode 0755),
    /// e.g. an emptyDir shared with the app container.
    pub dir: PathBuf,
}

/// The running executable, even if its file was replaced meanwhile.
const SELF_EXE: &str = "/proc/self/exe";

pub fn run(args: &Args) -> anyhow::Result<()> {
    let (to, bytes) = install(Path::new(SELF_EXE), &args.dir)?;
    println!("installed conndrain {} as {} ({bytes} bytes)", env!("CARGO_PKG_VERSION"), to.display());
    Ok(())
}

/// Copies `exe` to `dir/conndrain` through a temporary file and a rename, so
/// that a restarted init container never leaves a half-written binary.
fn install(exe: &Path, dir: &Path) -> anyhow::Result<(PathBuf, u64)> {
    if !dir.is_dir() {
        bail!(
            "{} is not a directory: give the directory to install into (e.g. an emptyDir mounted in the init \
             container), not the file",
            dir.display()
        );
    }
    let to = dir.join("conndrain");
    let tmp = dir.join(".conndrain.tmp");
    let copy = || -> std::io::Result<u64> {
        let bytes = fs::copy(exe, &tmp)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        fs::rename(&tmp, &to)?;
        Ok(bytes)
    };
    match copy() {
        Ok(bytes) => Ok((to, bytes)),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e).with_context(|| format!("copying {} to {}", exe.display(), to.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::install;

    #[test]
    fn copies_an_executable_into_the_directory_and_refuses_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("src");
        std::fs::write(&exe, b"binary").unwrap();
        let into = dir.path().join("bin");
        std::fs::create_dir(&into).unwrap();
        let (to, bytes) = install(&exe, &into).unwrap();
        assert_eq!((to.clone(), bytes), (into.join("conndrain"), 6));
        assert_eq!(std::fs::metadata(&to).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(std::fs::read_dir(&into).unwrap().count(), 1, "no temporary file left");
        let err = install(&exe, &to).unwrap_err().to_string();
        assert!(err.contains("is not a directory"), "{err}");
    }
}
