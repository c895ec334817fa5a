//! `cargo xtask setup`: installs what is missing, and nothing else.
//!
//! 1. `rust-src` for the nightly toolchain (aya-build builds `core` for the BPF target);
//! 2. bpf-linker, built against the nightly's own libLLVM, in `target/tools`;
//! 3. the Debian packages the tests, the demo and the image check use;
//! 4. the second kernel's guest: qemu, busybox, Debian's Linux 6.1 image and
//!    ipvsadm (Debian packages), and virtme-ng (`vng`, from PyPI, in a
//!    virtualenv under `target/tools`);
//! 5. a check (not an install) of kubectl with kustomize v5, which renders `deploy/`.

use std::{
    fs, io,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

const BPF_LINKER_VERSION: &str = "0.13.0";

const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "nftables",
    "conntrack",
    "bpftool",
    "iperf3",
    "wrk",
    "procps",
    // Real pod networks for the tests: /usr/lib/cni/{bridge,ptp,macvlan,host-local}.
    "containernetworking-plugins",
    // `cargo xtask image`: musl-gcc for the C code of `ring` in the static
    // binary; skopeo and umoci read the image back as real tools would.
    "musl-tools",
    "skopeo",
    "umoci",
    // The guest stage (`cargo xtask test-guest`): Linux 6.1 under qemu, booted by
    // virtme-ng over this machine's root filesystem, and IPVS's admin tool.
    "qemu-system-x86",
    "busybox-static",
    crate::guest::KERNEL_PACKAGE,
    "ipvsadm",
    // `python3 -m venv` for virtme-ng.
    "python3-venv",
];

/// virtme-ng from PyPI, in `target/tools/virtme-ng` (a virtualenv).
const VIRTME_NG_VERSION: &str = "1.42";

/// Where setup installs its tools: `<workspace>/target/tools`.
pub fn tools_dir(root: &Path) -> PathBuf {
    root.join("target").join("tools")
}

pub fn run(root: &Path) -> Result<()> {
    rust_src()?;
    bpf_linker(&tools_dir(root))?;
    debian_packages()?;
    virtme_ng(&tools_dir(root))?;
    // Not installed here: Debian's kubectl (bookworm: 1.20) is too old, and
    // the machine image has a recent one. Only `cargo xtask manifests` and
    // the manifests test need it, so its absence is a warning.
    match crate::manifests::kustomize_version() {
        Ok(v) => eprintln!("setup: kubectl with kustomize {v} ok"),
        Err(e) => eprintln!(
            "setup: warning: {e:#} (`cargo xtask manifests` and tests/tests/manifests.rs need it)"
        ),
    }
    Ok(())
}

/// `vng`, the virtme-ng launcher that boots the guest kernel.
pub fn vng(root: &Path) -> PathBuf {
    tools_dir(root).join("virtme-ng").join("bin").join("vng")
}

fn virtme_ng(tools: &Path) -> Result<()> {
    let venv = tools.join("virtme-ng");
    let vng = venv.join("bin").join("vng");
    let stamp = venv.join(format!("installed-{VIRTME_NG_VERSION}"));
    if vng.exists() && stamp.exists() {
        eprintln!("setup: virtme-ng {VIRTME_NG_VERSION} ok");
        return Ok(());
    }
    eprintln!("setup: installing virtme-ng {VIRTME_NG_VERSION} in {}", venv.display());
    // Debian's own python3 (python3-venv is one of the packages above), so a
    // python3 of another origin first on PATH does not matter.
    cmd::run(cmd::command("/usr/bin/python3").args(["-m", "venv", "--clear"]).arg(&venv))?;
    cmd::run(
        cmd::command(venv.join("bin").join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")),
    )?;
    fs::write(&stamp, "").with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

fn rust_src() -> Result<()> {
    let installed = cmd::stdout(cmd::command("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        eprintln!("setup: rust-src ok");
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    cmd::run(cmd::command("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn bpf_linker(tools: &Path) -> Result<()> {
    let bin = tools.join("bin").join("bpf-linker");
    if bin.exists() {
        let out = cmd::output(cmd::command(&bin).arg("--version"))?;
        let version = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && version.split_whitespace().any(|w| w == BPF_LINKER_VERSION) {
            eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} ok");
            return Ok(());
        }
    }

    // bpf-linker must use the same LLVM as the nightly rustc that emits the
    // bitcode, so link it against the nightly's own libLLVM.
    let sysroot = cmd::stdout(cmd::command("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let nightly_lib = Path::new(sysroot.trim()).join("lib");
    let (llvm_file, major) = find_libllvm(&nightly_lib)?;
    let llvm_lib = tools.join("llvm").join("lib");
    fs::create_dir_all(&llvm_lib).with_context(|| format!("creating {}", llvm_lib.display()))?;
    // The build links `libLLVM.so`; the built binary NEEDs the soname (the
    // file's own name) and finds it through its RUNPATH to this directory.
    let target = nightly_lib.join(&llvm_file);
    for name in [Path::new("libLLVM.so"), Path::new(&llvm_file)] {
        replace_symlink(&target, &llvm_lib.join(name))?;
    }

    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (about a minute)"
    );
    cmd::run(
        cmd::cargo()
            .current_dir(tools)
            .env("LLVM_PREFIX", tools.join("llvm"))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
                "--root",
            ])
            .arg(tools),
    )?;
    eprintln!(
        "setup: bpf-linker {BPF_LINKER_VERSION} installed in {}",
        tools.join("bin").display()
    );
    Ok(())
}

/// Finds `libLLVM.so.<MAJOR>.<minor>-rust-<version>-nightly` in `dir` and returns
/// its file name and LLVM major version.
fn find_libllvm(dir: &Path) -> Result<(String, u32)> {
    let entries = fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let name = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .file_name();
        if let Some((name, major)) = name.to_str().and_then(|n| Some((n, llvm_major(n)?))) {
            return Ok((name.to_owned(), major));
        }
    }
    bail!(
        "no libLLVM.so.<MAJOR>.<minor>-rust-*-nightly in {}: is the nightly toolchain installed with rustup?",
        dir.display()
    )
}

/// The LLVM major version in a file name like `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn llvm_major(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix("libLLVM.so.")?;
    if !(rest.contains("-rust-") && rest.ends_with("-nightly")) {
        return None;
    }
    rest.split(['.', '-']).next()?.parse().ok()
}

fn replace_symlink(target: &Path, link: &Path) -> Result<()> {
    match fs::remove_file(link) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", link.display())),
    }
    symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

fn debian_packages() -> Result<()> {
    // dpkg-query exits 1 when one of the packages is unknown; its output still
    // lists the others, so only the output counts.
    let out = cmd::output(
        cmd::command("dpkg-query")
            .args(["-W", "-f=${Package} ${Status}\\n"])
            .args(DEBIAN_PACKAGES),
    )?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = listed
        .lines()
        .filter(|l| l.ends_with(" install ok installed"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect();
    if missing.is_empty() {
        eprintln!("setup: Debian packages ok");
        return Ok(());
    }
    if !crate::is_root() {
        bail!(
            "missing Debian packages: {}; run `cargo xtask setup` as root, or install them with \
             `apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    cmd::run(cmd::command("apt-get").arg("update"))?;
    cmd::run(
        cmd::command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            // Wait for another apt run to finish instead of failing at once.
            .args(["-o", "DPkg::Lock::Timeout=600"])
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
}

#[cfg(test)]
mod tests {
    use super::llvm_major;

    #[test]
    fn llvm_major_from_file_name() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(llvm_major("libLLVM.so.23.0-rust-1.99.0-nightly"), Some(23));
        assert_eq!(llvm_major("libLLVM-22-rust-1.97.0-nightly.so"), None);
        assert_eq!(llvm_major("libLLVM.so.20.1-rust-1.95.0-stable"), None);
        assert_eq!(llvm_major("librustc_driver-b5a965480ee51f9a.so"), None);
    }
}
