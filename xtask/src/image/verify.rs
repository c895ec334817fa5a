//! Checks of the built image as a runtime would see it: our own reader of
//! the layout (every digest and size, the layer unpacked, the entrypoint
//! run), then Debian's skopeo and umoci.

use std::{collections::HashMap, io::Read as _, path::Path};

use anyhow::{Context as _, Result, ensure};
use flate2::read::GzDecoder;
use serde_json::Value;

use super::{
    VERSION,
    oci::{MEDIA_CONFIG, MEDIA_LAYER, MEDIA_MANIFEST, sha256},
};
use crate::cmd;

/// Reads the image with skopeo and umoci (Debian packages, installed by
/// setup): `skopeo inspect` must see a linux/amd64 image of our version
/// whose manifest is the one our index names, and the entrypoint of the
/// bundle `umoci unpack` makes must run. Returns what it printed for `--version`.
pub(super) fn check_with_tools(tarball_path: &Path, tarball: &[u8], work: &Path) -> Result<String> {
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
