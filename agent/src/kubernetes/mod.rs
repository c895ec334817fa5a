//! Kubernetes mode: the cluster's view of this node's pods fills the node
//! model (`watch`), and drain outcomes go back to the API (`report`).

pub mod annotations;
mod report;
mod watch;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use kube::{Client, Config, config::KubeConfigOptions};

use crate::node::Node;

/// Every Kubernetes API call the agent makes, as RBAC rules: (API group,
/// resource, verbs). `deploy/`'s `ClusterRole` must grant exactly these (a test
/// checks it); add a line here with any new call.
pub const API_CALLS: &[(&str, &str, &[&str])] = &[
    // watch::run: watcher(Api::<Pod>::all) with a spec.nodeName field selector.
    ("", "pods", &["list", "watch"]),
    // report::condition: Api::<Pod>::patch_status (strategic merge).
    ("", "pods/status", &["patch"]),
    // report::event: kube::runtime::events::Recorder (create, then patch for repeats).
    ("events.k8s.io", "events", &["create", "patch"]),
    // watch::endpoints: watcher(Api::<EndpointSlice>::all): terminating backends on other nodes.
    ("discovery.k8s.io", "endpointslices", &["list", "watch"]),
];

/// Settings of the Kubernetes mode.
#[derive(Clone, Debug)]
pub struct Settings {
    pub node_name: String,
    /// Deadline = the kubelet's kill time (deletionTimestamp) minus this.
    pub deadline_margin: Duration,
    /// At most one condition update per pod per this interval while draining.
    pub min_write_interval: Duration,
    /// The deadline of a terminating backend on another node, from when it
    /// turned terminating (`EndpointSlices` carry no kill time): its new
    /// flows are pinned until then; pinned flows stay until its endpoint is
    /// gone (at most `--pin-limit` after this deadline).
    pub remote_pin_limit: Duration,
}

pub async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => Config::infer().await.context(
            "no Kubernetes configuration (not in a cluster, no $KUBECONFIG or ~/.kube/config): pass --kubeconfig, or run with --standalone",
        )?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// Runs until the watches end (they retry with backoff, so: forever).
/// `synced` is set once the first list of pods has been applied.
pub async fn run(
    client: Client,
    node: Arc<Node>,
    settings: Settings,
    synced: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    let reporter = report::Reporter::new(client.clone(), node.clone(), &settings);
    tokio::try_join!(
        watch::run(client.clone(), node.clone(), settings.clone(), reporter, synced),
        watch::endpoints(client, node, settings),
    )
    .map(drop)
}
