//! The rendered install: the PodMonitor scrapes every agent, `install.yaml` is
//! what `cargo xtask manifests` renders, the agent runs on Linux nodes only
//! with no CPU limit, and a changed setting renames the generated ConfigMap.


use k8s_openapi::api::apps::v1::DaemonSet;
use serde_json::Value;

use super::{
    agent_settings::{agents, port},
    documents, documents_of, manifests, workspace,
};

/// The Prometheus operator's PodMonitor (monitoring.coreos.com/v1), as far as
/// `deploy/examples` uses it. k8s-openapi has no types for CRDs, so the fields
/// are listed here; an unknown one fails the round trip like any other.
#[derive(serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodMonitor {
    api_version: String,
    kind: String,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: PodMonitorSpec,
}

#[derive(serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PodMonitorSpec {
    selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    namespace_selector: NamespaceSelector,
    pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

#[derive(serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NamespaceSelector {
    match_names: Vec<String>,
}

#[derive(serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PodMetricsEndpoint {
    port: String,
    path: String,
    interval: String,
    #[serde(default)]
    relabelings: Vec<Relabeling>,
}

#[derive(serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Relabeling {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source_labels: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target_label: Option<String>,
}

#[test]
fn the_pod_monitor_scrapes_every_agent_on_its_metrics_port() {
    let docs = documents();
    let monitors = documents_of::<PodMonitor>(&docs, "PodMonitor");
    assert!(!monitors.is_empty(), "an example PodMonitor under deploy/examples");
    for (at, pm) in &monitors {
        assert!(at.starts_with("deploy/examples/"), "{at}: it needs the operator's CRDs, so only as an example");
        for (ds_at, ds) in documents_of::<DaemonSet>(&docs, "DaemonSet") {
            let ns = ds.metadata.namespace.clone().unwrap();
            assert!(pm.spec.namespace_selector.match_names.contains(&ns), "{at}: selects {ds_at}'s namespace");
            let pod_labels = ds.spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap();
            let wanted = pm.spec.selector.match_labels.clone().unwrap_or_default();
            assert!(!wanted.is_empty() && pm.spec.selector.match_expressions.is_none(), "{at}");
            for (k, v) in &wanted {
                assert_eq!(pod_labels.get(k), Some(v), "{at}: selects {ds_at}'s pods ({k})");
            }
            let pod = ds.spec.template.spec.unwrap();
            let agent = pod.containers.iter().find(|c| c.name == "agent").unwrap();
            for e in &pm.spec.pod_metrics_endpoints {
                // `port` panics unless the agent has a port of that name.
                assert_eq!(port(agent, &e.port), port(agent, "metrics"), "{at}: scrapes the metrics port");
                assert_eq!(e.path, "/metrics", "{at}");
            }
        }
    }
    let install = std::fs::read_to_string(workspace().join(manifests::INSTALL)).unwrap();
    assert!(!install.contains("kind: PodMonitor"), "the install works without the operator's CRDs");
}

#[test]
fn install_yaml_is_rendered_from_the_base() {
    let root = workspace();
    let rendered = manifests::render(&root.join("deploy")).unwrap();
    let current = std::fs::read_to_string(root.join(manifests::INSTALL)).unwrap();
    assert!(
        rendered == current,
        "{} is stale: run `cargo xtask manifests` to render it again from deploy/kustomization.yaml",
        manifests::INSTALL
    );
}

#[test]
fn the_agent_runs_on_linux_nodes_with_no_cpu_limit() {
    let docs = documents();
    for (at, pod, c, _) in agents(&docs) {
        let os = pod.node_selector.unwrap_or_default().get("kubernetes.io/os").cloned();
        assert_eq!(os.as_deref(), Some("linux"), "{at}: nodeSelector kubernetes.io/os: linux");
        let resources = c.resources.unwrap_or_default();
        let (requests, limits) = (resources.requests.unwrap_or_default(), resources.limits.unwrap_or_default());
        assert!(requests.contains_key("cpu") && requests.contains_key("memory"), "{at}: requests {requests:?}");
        assert!(limits.contains_key("memory"), "{at}: a memory limit (the flow table is charged to it)");
        assert!(!limits.contains_key("cpu"), "{at}: a CPU limit throttles the agent in a burst of deletions");
    }
}

/// The name of the ConfigMap the DaemonSet of `rendered` loads, after
/// checking that the ConfigMap is there under that name.
fn agent_config_map(rendered: &str) -> String {
    let docs: Vec<Value> = serde_saphyr::from_multiple(rendered).unwrap();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
    let name = ds["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"]
        .as_str()
        .expect("the agent's envFrom configMapRef")
        .to_owned();
    assert!(
        docs.iter().any(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name.as_str()),
        "the DaemonSet loads ConfigMap {name}, which the rendering lacks"
    );
    name
}

#[test]
fn a_changed_setting_renames_the_config_map_so_the_daemon_set_rolls() {
    let deploy = workspace().join("deploy");
    let copy = std::env::temp_dir().join(format!("conndrain-deploy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&copy);
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(&deploy).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
        }
    }
    let before = agent_config_map(&manifests::kustomize(&copy).unwrap());
    assert!(
        before.starts_with("conndrain-") && before.len() > "conndrain-".len(),
        "the generated ConfigMap carries a hash of its data: {before}"
    );
    let env = std::fs::read_to_string(copy.join("agent.env")).unwrap();
    let changed = env.replace("CONNDRAIN_QUIET_PERIOD=3\n", "CONNDRAIN_QUIET_PERIOD=5\n");
    assert_ne!(env, changed, "agent.env sets CONNDRAIN_QUIET_PERIOD=3");
    std::fs::write(copy.join("agent.env"), changed).unwrap();
    let after = agent_config_map(&manifests::kustomize(&copy).unwrap());
    let _ = std::fs::remove_dir_all(&copy);
    assert_ne!(before, after, "a changed setting must change the DaemonSet's pod template");
    let installed = std::fs::read_to_string(workspace().join(manifests::INSTALL)).unwrap();
    assert_eq!(agent_config_map(&installed), before, "install.yaml loads the generated ConfigMap");
}
