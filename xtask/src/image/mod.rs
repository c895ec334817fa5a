//! `cargo xtask image`: the container image, built without a container engine.
//!
//! 1. `conndrain` for `x86_64-unknown-linux-musl` in release mode, statically
//!    linked, with the real eBPF object embedded (`CONNDRAIN_REQUIRE_EBPF=1`).
//!    The image has no shell: the example app's init container runs
//!    `/conndrain install DIR`, which copies the binary itself.
//! 2. An OCI image layout as a tarball, `target/image/conndrain-<version>-oci.tar`:
//!    one gzip layer holding `/conndrain` (mode 0755, owner 0:0), a
//!    config with `/conndrain` as entrypoint and the version and source labels,
//!    a manifest, `index.json` and `oci-layout`, every blob named by its
//!    sha256. Timestamps come from `SOURCE_DATE_EPOCH`, else the last
//!    commit, so the same commit gives the same bytes.
//! 3. A check of the result as a runtime would see it: the tarball is read
//!    back, every digest and size compared, the layer unpacked, and the
//!    config's entrypoint run with `--version`; `install DIR` is run the way
//!    the init container runs it, and its copy with `--version` too.
//! 4. The same with real tools from Debian, so the layout is not only what
//!    our own reader accepts: `skopeo inspect oci-archive:...` (platform,
//!    labels, manifest digest), then `umoci unpack` of the layout into a
//!    runtime bundle, whose `process.args[0]` is run with `--version`.
//!
//! `cargo xtask test` runs all of this as its image stage ([`stage`]), after
//! the cargo tests, and fails if it fails: the static musl build is what we
//! ship, and nothing else builds it.
//!
//! Load it with e.g. `skopeo copy oci-archive:target/image/conndrain-0.1.0-oci.tar
//! docker://ghcr.io/conndrain/conndrain:0.1.0`, `podman load -i ...`, or
//! `ctr -n k8s.io images import ...` on a node.

mod oci;
mod verify;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};

pub use oci::{File, Meta, layout_tar};
use verify::check_with_tools;
pub use verify::verify;

use crate::cmd;

/// The Rust target of the image's binaries.
pub const TARGET: &str = "x86_64-unknown-linux-musl";
/// Where the agent's `DaemonSet` and the example pull the image from.
const IMAGE_NAME: &str = "ghcr.io/conndrain/conndrain";
/// The workspace's version, which `conndrain --version` prints too.
const VERSION: &str = env!("CARGO_PKG_VERSION");
const SOURCE: &str = env!("CARGO_PKG_REPOSITORY");

/// What [`run`] built and checked.
pub struct Built {
    pub path: PathBuf,
    pub mib: f64,
    /// What the image's entrypoint printed for `--version`.
    pub version: String,
}

/// `cargo xtask test`'s image stage: [`run`], timed, ending with one line,
/// `image: ok ...` or `image: FAILED ...`.
pub fn stage(root: &Path) -> Result<()> {
    let start = Instant::now();
    let built = run(root);
    let secs = start.elapsed().as_secs_f64();
    match built {
        Ok(b) => {
            println!(
                "image: ok: {} ({:.1} MiB): skopeo inspect and umoci unpack read it, its entrypoint prints \"{}\" ({secs:.0} s)",
                b.path.display(),
                b.mib,
                b.version
            );
            Ok(())
        }
        Err(e) => {
            println!("image: FAILED: {e:#} ({secs:.0} s)");
            Err(e.context("the image stage failed"))
        }
    }
}

pub fn run(root: &Path) -> Result<Built> {
    musl_setup(root)?;
    let conndrain = build_conndrain(root)?;
    let out_dir = root.join("target").join("image");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let data =
        std::fs::read(&conndrain).with_context(|| format!("reading {}", conndrain.display()))?;
    require_static(&data)
        .with_context(|| format!("{} is not a static executable", conndrain.display()))?;
    let files = [File {
        path: "conndrain",
        data,
    }];

    let meta = Meta {
        version: VERSION.to_owned(),
        created: source_date(root),
        revision: revision(root),
    };
    let tarball = layout_tar(&files, &meta)?;
    let path = out_dir.join(format!("conndrain-{VERSION}-oci.tar"));
    std::fs::write(&path, &tarball).with_context(|| format!("writing {}", path.display()))?;
    #[expect(clippy::cast_precision_loss, reason = "a size for people")]
    let mib = tarball.len() as f64 / f64::from(1 << 20);
    eprintln!("image: wrote {} ({mib:.1} MiB)", path.display());

    let line = verify(&tarball, &out_dir.join("verify"))?;
    ensure!(
        line == format!("conndrain {VERSION}"),
        "the image's entrypoint printed {line:?} for --version, not \"conndrain {VERSION}\""
    );
    eprintln!("image: our reader verified it; the entrypoint runs: {line}");
    let by_tools = check_with_tools(&path, &tarball, &out_dir.join("check"))?;
    ensure!(
        by_tools == line,
        "the entrypoint umoci unpacked printed {by_tools:?} for --version, not {line:?}"
    );
    Ok(Built {
        path,
        mib,
        version: line,
    })
}

/// The musl target for the active toolchain (`musl-gcc`, for the C in
/// `ring`, is a Debian package that setup installs; cc-rs finds it by name).
fn musl_setup(root: &Path) -> Result<()> {
    let installed = cmd::stdout(cmd::command("rustup").current_dir(root).args([
        "target",
        "list",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.trim() == TARGET) {
        eprintln!("image: rust target {TARGET} ok");
        return Ok(());
    }
    cmd::run(
        cmd::command("rustup")
            .current_dir(root)
            .args(["target", "add", TARGET]),
    )
}

fn build_conndrain(root: &Path) -> Result<PathBuf> {
    let mut build = crate::cargo(root, "build", true);
    build.args([
        "--target",
        TARGET,
        "--package",
        "conndrain",
        "--bin",
        "conndrain",
    ]);
    let cc = format!("CC_{}", TARGET.replace('-', "_"));
    if std::env::var_os(&cc).is_none() {
        build.env(cc, "musl-gcc");
    }
    cmd::run(&mut build)?;
    Ok(root
        .join("target")
        .join(TARGET)
        .join("release")
        .join("conndrain"))
}

/// An ELF executable without a program interpreter (`PT_INTERP`): it runs
/// in an image that has no dynamic loader and no libc.
fn require_static(elf: &[u8]) -> Result<()> {
    const PT_INTERP: u32 = 3;
    ensure!(
        elf.len() >= 64 && elf[..4] == *b"\x7fELF",
        "not an ELF file"
    );
    ensure!(
        elf[4] == 2 && elf[5] == 1,
        "not a 64-bit little-endian ELF file"
    );
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]);
    let u64_at = |o: usize| -> Result<u64> {
        Ok(u64::from_le_bytes(
            elf.get(o..o + 8)
                .context("truncated ELF file")?
                .try_into()?,
        ))
    };
    ensure!(u16_at(18) == 62, "not an x86_64 executable");
    let phoff = usize::try_from(u64_at(32)?)?;
    let (phentsize, phnum) = (usize::from(u16_at(54)), usize::from(u16_at(56)));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let kind = elf
            .get(at..at + 4)
            .context("truncated ELF program headers")?;
        if u32::from_le_bytes(kind.try_into()?) == PT_INTERP {
            bail!("it asks for a dynamic loader (PT_INTERP), which the image does not have");
        }
    }
    Ok(())
}

/// `SOURCE_DATE_EPOCH`, else the time of the last commit, else 0.
fn source_date(root: &Path) -> u64 {
    if let Some(t) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return t;
    }
    git(root, &["log", "-1", "--format=%ct"])
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

/// The commit, with `-dirty` when the work tree has changes it does not hold.
fn revision(root: &Path) -> Option<String> {
    let head = git(root, &["rev-parse", "HEAD"])?;
    let dirty = git(root, &["status", "--porcelain", "--untracked-files=no"]).is_some();
    Some(if dirty { format!("{head}-dirty") } else { head })
}

fn git(root: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .current_dir(root)
        .args(args)
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::{oci::rfc3339, *};

    fn script(s: &str) -> Vec<u8> {
        format!("#!/bin/sh\n{s}\n").into_bytes()
    }

    #[test]
    fn layout_round_trips_and_is_reproducible() {
        let files = || {
            vec![File {
                path: "conndrain",
                data: script(
                    "if [ \"$1\" = install ]; then cp \"$0\" \"$2/conndrain\"; \
                         else echo conndrain 9.9.9; fi",
                ),
            }]
        };
        let meta = || Meta {
            version: "9.9.9".into(),
            created: 1_700_000_000,
            revision: Some("abc".into()),
        };
        let a = layout_tar(&files(), &meta()).unwrap();
        assert_eq!(
            a,
            layout_tar(&files(), &meta()).unwrap(),
            "same input, same bytes"
        );
        let work = std::env::temp_dir().join(format!("xtask-image-test-{}", std::process::id()));
        let line = verify(&a, &work).unwrap();
        std::fs::remove_dir_all(&work).unwrap();
        assert_eq!(line, "conndrain 9.9.9");
    }

    #[test]
    fn verify_notices_a_corrupt_blob() {
        let files = [File {
            path: "conndrain",
            data: script("echo conndrain 1"),
        }];
        let meta = Meta {
            version: "1".into(),
            created: 0,
            revision: None,
        };
        let good = layout_tar(&files, &meta).unwrap();
        let mut archive = tar::Archive::new(good.as_slice());
        let blobs: Vec<(u64, u64)> = archive
            .entries()
            .unwrap()
            .map(Result::unwrap)
            .filter(|e| e.path().unwrap().starts_with("blobs/sha256/") && e.size() > 0)
            .map(|e| (e.raw_file_position(), e.size()))
            .collect();
        assert_eq!(blobs.len(), 3, "manifest, config, layer");
        // Flip one byte in the middle of each blob in turn.
        for (position, size) in blobs {
            let mut bad = good.clone();
            bad[usize::try_from(position + size / 2).unwrap()] ^= 0x20;
            let work =
                std::env::temp_dir().join(format!("xtask-image-corrupt-{}", std::process::id()));
            let err = verify(&bad, &work).unwrap_err();
            let _ = std::fs::remove_dir_all(&work);
            assert!(
                format!("{err:#}").contains("does not match its digest"),
                "{err:#}"
            );
        }
    }

    #[test]
    fn dates_and_static_check() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert!(require_static(b"#!/bin/sh\n").is_err());
        let own = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // The test binary is dynamically linked against glibc.
        assert!(require_static(&own).is_err());
    }
}
