//! `/cp SRC DST`: the one tool in the conndrain image besides `/conndrain`.
//!
//! The image has no shell and no coreutils, so an init container cannot run
//! `cp` to put the static `conndrain` binary into an emptyDir for the app
//! container's preStop hook (see deploy/examples/). This does just that:
//! copies SRC to DST (or into DST, if DST is a directory) with mode 0755,
//! through a temporary file and a rename, so a restarted init container never
//! leaves a half-written binary behind.
//!
//! `cargo xtask image` compiles it with plain rustc for
//! x86_64-unknown-linux-musl (statically linked, no dependencies).

use std::{
    env,
    ffi::OsString,
    fs, io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

fn main() -> ExitCode {
    let args: Vec<OsString> = env::args_os().skip(1).collect();
    let [src, dst] = args.as_slice() else {
        eprintln!("usage: cp SRC DST (copies SRC to DST, or into the directory DST, with mode 0755)");
        return ExitCode::from(2);
    };
    let (src, dst) = (Path::new(src), Path::new(dst));
    match copy(src, dst) {
        Ok((to, bytes)) => {
            println!("cp: {} -> {} ({bytes} bytes)", src.display(), to.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cp: {} -> {}: {e}", src.display(), dst.display());
            ExitCode::FAILURE
        }
    }
}

fn copy(src: &Path, dst: &Path) -> io::Result<(PathBuf, u64)> {
    let to = if dst.is_dir() {
        let name = src
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "SRC has no file name"))?;
        dst.join(name)
    } else {
        dst.to_path_buf()
    };
    let mut tmp = to.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let bytes = fs::copy(src, &tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    fs::rename(&tmp, &to)?;
    Ok((to, bytes))
}
