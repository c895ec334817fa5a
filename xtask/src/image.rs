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

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};
use flate2::{Compression, read::GzDecoder, write::GzEncoder};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::cmd;

/// The Rust target of the image's binaries.
pub const TARGET: &str = "x86_64-unknown-linux-musl";
/// Where the agent's `DaemonSet` and the example pull the image from.
const IMAGE_NAME: &str = "ghcr.io/conndrain/conndrain";
/// The workspace's version, which `conndrain --version` prints too.
const VERSION: &str = env!("CARGO_PKG_VERSION");
const SOURCE: &str = env!("CARGO_PKG_REPOSITORY");

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A file of the image's only layer.
pub struct File {
    /// Path in the image, without the leading `/`.
    pub path: &'static str,
    pub data: Vec<u8>,
}

/// What the image says about itself.
pub struct Meta {
    pub version: String,
    /// Seconds since the epoch, for `created` and the layer's mtimes.
    pub created: u64,
    pub revision: Option<String>,
}

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

/// Reads the image with skopeo and umoci (Debian packages, installed by
/// setup): `skopeo inspect` must see a linux/amd64 image of our version
/// whose manifest is the one our index names, and the entrypoint of the
/// bundle `umoci unpack` makes must run. Returns what it printed for `--version`.
fn check_with_tools(tarball_path: &Path, tarball: &[u8], work: &Path) -> Result<String> {
    let index: Value = serde_json::from_slice(Layout::read(tarball)?.file("index.json")?)?;
    let manifest_digest = index["manifests"][0]["digest"].clone();

    let inspect = cmd::stdout(
        cmd::command("skopeo")
            .arg("inspect")
            .arg(format!("oci-archive:{}", tarball_path.display())),
    )?;
    let inspected: Value =
        serde_json::from_str(&inspect).context("skopeo inspect printed no JSON")?;
    ensure!(
        inspected["Os"] == "linux" && inspected["Architecture"] == "amd64",
        "skopeo inspect: not linux/amd64: {inspected}"
    );
    ensure!(
        inspected["Labels"]["org.opencontainers.image.version"] == VERSION,
        "skopeo inspect: version label is not {VERSION}: {inspected}"
    );
    ensure!(
        inspected["Digest"] == manifest_digest,
        "skopeo inspect: manifest digest {} is not the index's {manifest_digest}",
        inspected["Digest"]
    );
    eprintln!("image: skopeo inspect: linux/amd64, version {VERSION}, manifest {manifest_digest}");

    // umoci reads an image layout directory: the tarball, unpacked.
    match std::fs::remove_dir_all(work) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", work.display()));
        }
        _ => {}
    }
    let layout = work.join("layout");
    std::fs::create_dir_all(&layout).with_context(|| format!("creating {}", layout.display()))?;
    tar::Archive::new(tarball)
        .unpack(&layout)
        .with_context(|| format!("unpacking the image tarball into {}", layout.display()))?;
    let bundle = work.join("bundle");
    let mut image_ref = layout.into_os_string();
    image_ref.push(format!(":{VERSION}"));
    cmd::run(
        cmd::command("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(&image_ref)
            .arg(&bundle),
    )?;
    let runtime: Value = serde_json::from_slice(
        &std::fs::read(bundle.join("config.json")).context("umoci unpack wrote no config.json")?,
    )?;
    let program = runtime["process"]["args"][0]
        .as_str()
        .context("the bundle's config.json has no process.args")?;
    let line = version(
        &bundle.join("rootfs").join(program.trim_start_matches('/')),
        &[],
    )?;
    eprintln!("image: umoci unpack: {program} --version in the bundle: {line}");
    Ok(line)
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

fn sha256(data: &[u8]) -> String {
    let mut hex = String::with_capacity(64);
    for b in Sha256::digest(data) {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// RFC 3339 in UTC for seconds since the epoch (days to civil date: Howard Hinnant's algorithm).
fn rfc3339(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A tar archive of `entries` (path, mode, data; a path ending in `/` is a
/// directory), with fixed owner and mtime so the same input gives the same bytes.
fn tar(entries: &[(&str, u32, &[u8])], mtime: u64) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for &(path, mode, data) in entries {
        let mut header = tar::Header::new_ustar();
        header
            .set_path(path)
            .with_context(|| format!("tar path {path}"))?;
        header.set_entry_type(if path.ends_with('/') {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(mtime);
        header.set_cksum();
        builder
            .append(&header, data)
            .with_context(|| format!("adding {path} to a tar archive"))?;
    }
    builder.into_inner().context("finishing a tar archive")
}

fn descriptor(media_type: &str, blob: &[u8]) -> Value {
    json!({ "mediaType": media_type, "digest": format!("sha256:{}", sha256(blob)), "size": blob.len() })
}

/// The OCI image layout of `files`, as a tarball.
pub fn layout_tar(files: &[File], meta: &Meta) -> Result<Vec<u8>> {
    let created = rfc3339(meta.created);
    let entries: Vec<(&str, u32, &[u8])> = files
        .iter()
        .map(|f| (f.path, 0o755, f.data.as_slice()))
        .collect();
    let layer_tar = tar(&entries, meta.created)?;
    let mut gz = GzEncoder::new(Vec::new(), Compression::best());
    gz.write_all(&layer_tar).context("compressing the layer")?;
    let layer = gz.finish().context("compressing the layer")?;

    let mut labels = json!({
        "org.opencontainers.image.title": "conndrain",
        "org.opencontainers.image.description": "Node agent and CLI that drain Kubernetes pods by their real connections",
        "org.opencontainers.image.version": meta.version,
        "org.opencontainers.image.source": SOURCE,
        "org.opencontainers.image.licenses": env!("CARGO_PKG_LICENSE"),
        "org.opencontainers.image.created": created,
    });
    if let Some(rev) = &meta.revision {
        labels["org.opencontainers.image.revision"] = json!(rev);
    }
    let config = serde_json::to_vec(&json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/conndrain"],
            "Cmd": ["--help"],
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{}", sha256(&layer_tar))] },
        "history": [{ "created": created, "created_by": "cargo xtask image" }],
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": descriptor(MEDIA_CONFIG, &config),
        "layers": [descriptor(MEDIA_LAYER, &layer)],
        "annotations": labels,
    }))?;
    let mut manifest_descriptor = descriptor(MEDIA_MANIFEST, &manifest);
    manifest_descriptor["platform"] = json!({ "architecture": "amd64", "os": "linux" });
    manifest_descriptor["annotations"] = json!({
        // The tag, for `skopeo`/`podman` (oci-archive:FILE:TAG) ...
        "org.opencontainers.image.ref.name": meta.version,
        // ... and the full name, for `ctr images import`.
        "io.containerd.image.name": format!("{IMAGE_NAME}:{}", meta.version),
    });
    let index = serde_json::to_vec_pretty(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [manifest_descriptor],
    }))?;
    let oci_layout = br#"{"imageLayoutVersion":"1.0.0"}"#;

    let blob = |data: &[u8]| format!("blobs/sha256/{}", sha256(data));
    let (layer_path, config_path, manifest_path) = (blob(&layer), blob(&config), blob(&manifest));
    tar(
        &[
            ("oci-layout", 0o644, oci_layout),
            ("index.json", 0o644, &index),
            ("blobs/", 0o755, &[]),
            ("blobs/sha256/", 0o755, &[]),
            (&manifest_path, 0o644, &manifest),
            (&config_path, 0o644, &config),
            (&layer_path, 0o644, &layer),
        ],
        meta.created,
    )
}

/// Reads an OCI layout tarball back as a runtime would, unpacks its layers
/// under `work/rootfs` and runs the entrypoint with `--version`; returns what
/// it printed. The entrypoint's `install DIR` is run as the example's init
/// container runs it, and the copy with `--version` as well.
pub fn verify(tarball: &[u8], work: &Path) -> Result<String> {
    let layout = Layout::read(tarball)?;
    let rootfs = work.join("rootfs");
    match std::fs::remove_dir_all(work) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", work.display()));
        }
        _ => {}
    }
    std::fs::create_dir_all(&rootfs).with_context(|| format!("creating {}", rootfs.display()))?;
    let config = layout.unpack(&rootfs)?;

    let entrypoint: Vec<&str> = config["config"]["Entrypoint"]
        .as_array()
        .context("the config has no Entrypoint")?
        .iter()
        .map(|v| v.as_str().context("Entrypoint is not a list of strings"))
        .collect::<Result<_>>()?;
    let (program, args) = entrypoint
        .split_first()
        .context("the Entrypoint is empty")?;
    let in_rootfs = |p: &str| rootfs.join(p.trim_start_matches('/'));
    let line = version(&in_rootfs(program), args)?;
    eprintln!("image: {program} --version in the unpacked image: {line}");

    // The example's init container: /conndrain install /conndrain-bin.
    let bin = work.join("conndrain-bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    cmd::run(
        cmd::command(in_rootfs(program))
            .args(args)
            .arg("install")
            .arg(&bin),
    )?;
    let copied = version(&bin.join("conndrain"), &[])?;
    ensure!(
        copied == line,
        "the copy made by `{program} install` printed {copied:?}, not {line:?}"
    );
    eprintln!(
        "image: `{program} install DIR` made a working copy, as the example's init container does"
    );
    Ok(line)
}

/// What `program args... --version` prints.
fn version(program: &Path, args: &[&str]) -> Result<String> {
    let out = cmd::command(program)
        .args(args)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", program.display()))?;
    ensure!(
        out.status.success(),
        "{} --version failed with {}",
        program.display(),
        out.status
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The files of an OCI layout tarball, by path.
struct Layout(HashMap<String, Vec<u8>>);

impl Layout {
    fn read(tarball: &[u8]) -> Result<Self> {
        let mut files = HashMap::new();
        let mut archive = tar::Archive::new(tarball);
        for entry in archive.entries().context("reading the image tarball")? {
            let mut entry = entry.context("reading the image tarball")?;
            let path = entry.path()?.to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            files.insert(path, data);
        }
        let layout = Self(files);
        let version: Value = serde_json::from_slice(layout.file("oci-layout")?)?;
        ensure!(
            version["imageLayoutVersion"] == "1.0.0",
            "oci-layout: {version}"
        );
        Ok(layout)
    }

    fn file(&self, path: &str) -> Result<&[u8]> {
        self.0
            .get(path)
            .map(Vec::as_slice)
            .with_context(|| format!("the image has no {path}"))
    }

    /// A descriptor's blob, checked against its media type, digest and size.
    fn fetch(&self, d: &Value, media_type: &str) -> Result<&[u8]> {
        ensure!(
            d["mediaType"] == media_type,
            "expected a {media_type}, got {d}"
        );
        let digest = d["digest"].as_str().context("descriptor without digest")?;
        let hex = digest
            .strip_prefix("sha256:")
            .context("digest is not sha256")?;
        let data = self.file(&format!("blobs/sha256/{hex}"))?;
        ensure!(
            sha256(data) == hex,
            "blob {digest} does not match its digest"
        );
        ensure!(
            d["size"] == data.len(),
            "blob {digest} is not of its size {}",
            d["size"]
        );
        Ok(data)
    }

    /// Follows index.json to the one linux/amd64 manifest, checks its config
    /// and layers, and unpacks the layers into `rootfs`; returns the config.
    fn unpack(&self, rootfs: &Path) -> Result<Value> {
        let index: Value = serde_json::from_slice(self.file("index.json")?)?;
        let manifests = index["manifests"]
            .as_array()
            .context("index.json has no manifests")?;
        ensure!(
            manifests.len() == 1,
            "expected one manifest, found {}",
            manifests.len()
        );
        let manifest: Value = serde_json::from_slice(self.fetch(&manifests[0], MEDIA_MANIFEST)?)?;
        let config: Value = serde_json::from_slice(self.fetch(&manifest["config"], MEDIA_CONFIG)?)?;
        ensure!(
            config["architecture"] == "amd64" && config["os"] == "linux",
            "not a linux/amd64 image"
        );
        for label in [
            "org.opencontainers.image.version",
            "org.opencontainers.image.source",
        ] {
            ensure!(
                config["config"]["Labels"][label].is_string(),
                "the config has no label {label}"
            );
        }
        let layers = manifest["layers"]
            .as_array()
            .context("the manifest has no layers")?;
        let diff_ids = config["rootfs"]["diff_ids"]
            .as_array()
            .context("the config has no diff_ids")?;
        ensure!(
            layers.len() == diff_ids.len(),
            "{} layers but {} diff_ids",
            layers.len(),
            diff_ids.len()
        );
        for (layer, diff_id) in layers.iter().zip(diff_ids) {
            let mut tar_bytes = Vec::new();
            GzDecoder::new(self.fetch(layer, MEDIA_LAYER)?)
                .read_to_end(&mut tar_bytes)
                .context("decompressing a layer")?;
            ensure!(
                diff_id == &format!("sha256:{}", sha256(&tar_bytes)),
                "a layer does not match its diff_id"
            );
            let mut archive = tar::Archive::new(tar_bytes.as_slice());
            archive.set_preserve_permissions(true);
            archive.unpack(rootfs).context("unpacking a layer")?;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
