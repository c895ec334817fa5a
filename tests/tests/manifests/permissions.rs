//! What the agent may do: the ClusterRole grants exactly
//! `conndrain::kubernetes::API_CALLS` to the DaemonSet's service account, and
//! no container is privileged or adds capabilities beyond what the agent needs.

use std::collections::BTreeSet;

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{Container, PodSpec},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};

use super::{ALLOWED_CAPABILITIES, Doc, documents, documents_of};

#[test]
fn cluster_role_grants_exactly_the_api_calls_of_the_code() {
    let want: BTreeSet<(String, String, String)> = conndrain::kubernetes::API_CALLS
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs.iter().map(|v| ((*group).to_owned(), (*resource).to_owned(), (*v).to_owned()))
        })
        .collect();
    let docs = documents();
    let roles = documents_of::<ClusterRole>(&docs, "ClusterRole");
    assert!(!roles.is_empty(), "no ClusterRole under deploy/");
    for (at, role) in roles {
        let mut got = BTreeSet::new();
        for rule in role.rules.unwrap_or_default() {
            assert!(
                rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
                "{at}: the agent uses neither resourceNames nor nonResourceURLs"
            );
            for group in rule.api_groups.unwrap_or_default() {
                for resource in rule.resources.clone().unwrap_or_default() {
                    for verb in &rule.verbs {
                        got.insert((group.clone(), resource.clone(), verb.clone()));
                    }
                }
            }
        }
        let extra: Vec<_> = got.difference(&want).collect();
        let missing: Vec<_> = want.difference(&got).collect();
        assert!(
            extra.is_empty() && missing.is_empty(),
            "{at}: rules differ from conndrain::kubernetes::API_CALLS: grants more {extra:?}, lacks {missing:?}"
        );
    }
}

#[test]
fn the_binding_gives_the_role_to_the_daemonsets_service_account() {
    let docs = documents();
    for (at, binding) in documents_of::<ClusterRoleBinding>(&docs, "ClusterRoleBinding") {
        assert_eq!(binding.role_ref.kind, "ClusterRole", "{at}");
        assert_eq!(binding.role_ref.name, "conndrain", "{at}");
        let subjects = binding.subjects.unwrap_or_default();
        assert_eq!(subjects.len(), 1, "{at}");
        assert_eq!(
            (subjects[0].kind.as_str(), subjects[0].name.as_str(), subjects[0].namespace.as_deref()),
            ("ServiceAccount", "conndrain", Some("conndrain")),
            "{at}"
        );
    }
    for (at, ds) in documents_of::<DaemonSet>(&docs, "DaemonSet") {
        let pod = ds.spec.template.spec.unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some("conndrain"), "{at}");
        assert_eq!(ds.metadata.namespace.as_deref(), Some("conndrain"), "{at}");
    }
}

/// Every pod spec under `deploy/`, with where it is.
pub fn pod_specs(docs: &[Doc]) -> Vec<(String, PodSpec)> {
    let mut pods = Vec::new();
    for (at, ds) in documents_of::<DaemonSet>(docs, "DaemonSet") {
        pods.push((at, ds.spec.template.spec.unwrap()));
    }
    for (at, d) in documents_of::<Deployment>(docs, "Deployment") {
        pods.push((at, d.spec.template.spec.unwrap()));
    }
    pods
}

pub fn containers(pod: &PodSpec) -> impl Iterator<Item = &Container> {
    pod.init_containers.iter().flatten().chain(&pod.containers)
}

#[test]
fn no_container_is_privileged_or_adds_more_capabilities_than_the_agent_needs() {
    let docs = documents();
    let pods = pod_specs(&docs);
    assert!(pods.len() >= 2, "the DaemonSet (install.yaml) and the example");
    for (at, pod) in &pods {
        assert!(pod.host_pid != Some(true) && pod.host_ipc != Some(true), "{at}: hostPID/hostIPC");
        for c in containers(pod) {
            let sc = c.security_context.clone().unwrap_or_default();
            assert_ne!(sc.privileged, Some(true), "{at}: container {} is privileged", c.name);
            let caps = sc.capabilities.unwrap_or_default();
            for cap in caps.add.iter().flatten() {
                assert!(
                    ALLOWED_CAPABILITIES.contains(&cap.as_str()),
                    "{at}: container {} adds {cap}; allowed: {ALLOWED_CAPABILITIES:?}",
                    c.name
                );
            }
            if caps.add.as_ref().is_some_and(|a| !a.is_empty()) {
                // Whoever adds capabilities drops the rest and cannot gain more.
                assert!(caps.drop.is_some_and(|d| d.iter().any(|x| x == "ALL")), "{at}: {} must drop ALL", c.name);
                assert_eq!(sc.allow_privilege_escalation, Some(false), "{at}: {}", c.name);
                assert_eq!(sc.read_only_root_filesystem, Some(true), "{at}: {}", c.name);
            }
            if caps.add.iter().flatten().any(|c| c == "BPF") {
                // On SELinux nodes container_t may not call bpf(2) or write the pins.
                let selinux = sc.se_linux_options.as_ref().and_then(|o| o.type_.as_deref());
                assert_eq!(selinux, Some("spc_t"), "{at}: {} loads programs: seLinuxOptions type spc_t", c.name);
            }
        }
    }
}
