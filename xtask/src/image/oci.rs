//! The OCI image layout, written by hand: a tar of `oci-layout`,
//! `index.json` and sha256-named blobs (a gzip layer, the config, the
//! manifest). Reproducible: fixed owners and mtimes, so the same commit
//! gives the same bytes. (The oci-spec crate has the JSON types but no
//! writer of the layout tarball; these few lines of `serde_json` are all the
//! spec asks for here.)

use std::{fmt::Write as _, io::Write as _};

use anyhow::{Context as _, Result};
use flate2::{Compression, write::GzEncoder};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::{IMAGE_NAME, SOURCE};

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(super) const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(super) const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub(super) const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

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

pub(super) fn sha256(data: &[u8]) -> String {
    let mut hex = String::with_capacity(64);
    for b in Sha256::digest(data) {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// RFC 3339 in UTC for seconds since the epoch (days to civil date: Howard Hinnant's algorithm).
pub(super) fn rfc3339(secs: u64) -> String {
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
