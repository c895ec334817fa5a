//! The manifests in `deploy/` stay true to the code:
//!
//! - every YAML document parses into its k8s-openapi type, and nothing is lost
//!   on the way back: a field the types do not know (a typo, a wrong level)
//!   disappears in the round trip and is named;
//! - the ClusterRole grants exactly `conndrain::kubernetes::API_CALLS`;
//! - no container is privileged or adds capabilities beyond what the agent needs;
//! - every `conndrain` command line (container command and args, exec hooks and
//!   probes) parses with the real CLI, and every `CONNDRAIN_*`, `NODE_NAME` and
//!   `HOST_IP` variable given to a container is read by the command it runs;
//! - the ConfigMap has every agent setting with the CLI's default, and the
//!   ports agree between the ConfigMap, the DaemonSet and the CLI's defaults;
//! - every preStop hook can reach the agent and drain: a `conndrain wait`
//!   (HOST_IP, port, a grace period longer than its fallback sleep) or the
//!   kubelet's `httpGet` to the pod itself on the agent's intercept port and
//!   path (the agent pinning its intercept under `--bpffs`, so that the GET
//!   waits through an agent restart); no readiness probe more frequent than
//!   the quiet period (each probe is a new inbound connection); the example
//!   app uses the `httpGet` hook only;
//! - `deploy/install.yaml` is what `cargo xtask manifests` renders (with the
//!   real `kubectl kustomize`), and a changed setting renames the generated
//!   ConfigMap, so the DaemonSet rolls;
//! - the agent runs on Linux nodes only, with no CPU limit.
//!
//! The base's own files are checked through `install.yaml`, which kustomize
//! renders from them (with the generated ConfigMap, which has no file).

#![allow(clippy::doc_markdown, reason = "Kubernetes kinds (ConfigMap, DaemonSet) are plain words here")]

#[path = "../../xtask/src/manifests.rs"]
#[allow(dead_code, reason = "`run` is the xtask's")]
mod manifests;

#[path = "manifests/agent_settings.rs"]
mod agent_settings;
#[path = "manifests/commands.rs"]
mod commands;
#[path = "manifests/hooks.rs"]
mod hooks;
#[path = "manifests/install.rs"]
mod install;
#[path = "manifests/permissions.rs"]
mod permissions;

use std::{
    collections::BTreeSet,
    ffi::OsStr,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde_json::Value;

use install::PodMonitor;

/// Capabilities a container in `deploy/` may add (see the DaemonSet's comments).
const ALLOWED_CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"];

/// Variables conndrain reads without clap, and the source file that reads them.
const NOT_CLAP: &[(&str, &str)] = &[("CONNDRAIN_LOG", "agent/src/telemetry.rs")];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// One YAML document of a file under `deploy/`.
struct Doc {
    /// `deploy/...#N` (N counts from 1).
    at: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> (&str, &str) {
        (self.value["apiVersion"].as_str().unwrap_or_default(), self.value["kind"].as_str().unwrap_or_default())
    }

    fn typed<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_value(self.value.clone()).unwrap_or_else(|e| panic!("{}: {e}", self.at))
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml")
            && path.file_name() != Some(OsStr::new("kustomization.yaml"))
        {
            out.push(path);
        }
    }
}

/// Every document of `install.yaml` and of every YAML file in a directory
/// under `deploy/` (the example): not the base's files, whose rendering by
/// kustomize `install.yaml` is.
fn documents() -> Vec<Doc> {
    let root = workspace();
    let mut files = Vec::new();
    yaml_files(&root.join("deploy"), &mut files);
    files.retain(|f| f.parent() != Some(&root.join("deploy")) || f.ends_with(manifests::INSTALL));
    files.sort();
    assert!(files.len() >= 2, "expected install.yaml and the example, found {files:?}");
    let mut docs = Vec::new();
    for file in files {
        let name = file.strip_prefix(&root).unwrap().display().to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        let values: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{name}: not YAML: {e}"));
        for (i, value) in values.into_iter().enumerate() {
            if !value.is_null() {
                docs.push(Doc { at: format!("{name}#{}", i + 1), value });
            }
        }
    }
    docs
}

fn documents_of<T: serde::de::DeserializeOwned>(docs: &[Doc], kind: &str) -> Vec<(String, T)> {
    docs.iter().filter(|d| d.kind().1 == kind).map(|d| (d.at.clone(), d.typed())).collect()
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

/// Where `back` (the round trip) differs from `orig` (the file); a null in
/// the file is the same as no value.
fn diff(path: &str, orig: &Value, back: &Value, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (k, v) in o {
                let at = format!("{path}.{k}");
                match b.get(k) {
                    _ if v.is_null() => {}
                    None => out.push(format!("{at}: not a field of the type (lost in the round trip)")),
                    Some(bv) => diff(&at, v, bv, out),
                }
            }
            for k in b.keys().filter(|k| o.get(*k).is_none_or(Value::is_null)) {
                out.push(format!("{path}.{k}: added by the round trip"));
            }
        }
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => {
            for (i, (ov, bv)) in o.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), ov, bv, out);
            }
        }
        _ if orig == back => {}
        _ => out.push(format!("{path}: {orig} became {back}")),
    }
}

#[test]
fn every_document_round_trips_through_its_k8s_openapi_type() {
    let docs = documents();
    let mut problems = Vec::new();
    for doc in &docs {
        let back = match doc.kind() {
            ("v1", "Namespace") => round_trip::<Namespace>(&doc.value),
            ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(&doc.value),
            ("v1", "ConfigMap") => round_trip::<ConfigMap>(&doc.value),
            ("v1", "Service") => round_trip::<Service>(&doc.value),
            ("apps/v1", "DaemonSet") => round_trip::<DaemonSet>(&doc.value),
            ("apps/v1", "Deployment") => round_trip::<Deployment>(&doc.value),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(&doc.value),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => round_trip::<ClusterRoleBinding>(&doc.value),
            ("monitoring.coreos.com/v1", "PodMonitor") => round_trip::<PodMonitor>(&doc.value),
            (api, kind) => Err(format!("unexpected apiVersion {api:?} kind {kind:?}: add its type to this test")),
        };
        match back {
            Ok(back) => {
                let mut found = Vec::new();
                diff("", &doc.value, &back, &mut found);
                problems.extend(found.into_iter().map(|p| format!("{}: {p}", doc.at)));
            }
            Err(e) => problems.push(format!("{}: {e}", doc.at)),
        }
    }
    assert!(problems.is_empty(), "manifests the k8s-openapi types do not accept:\n{}", problems.join("\n"));
    let kinds: BTreeSet<&str> = docs.iter().map(|d| d.kind().1).collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Deployment",
        "Service",
    ] {
        assert!(kinds.contains(kind), "no {kind} under deploy/");
    }
}

#[test]
fn the_round_trip_names_an_unknown_field() {
    let doc: Value = serde_saphyr::from_str(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n  lables:\n    x: y\nautomountServiceAccountToken: false\n",
    )
    .unwrap();
    let back = round_trip::<ServiceAccount>(&doc).unwrap();
    let mut found = Vec::new();
    diff("", &doc, &back, &mut found);
    assert_eq!(found, [".metadata.lables: not a field of the type (lost in the round trip)"]);
}
