//! Objects tests build: RBAC rules, and a pod as the kubelet runs it.

use k8s_openapi::api::{core::v1 as core, rbac::v1::PolicyRule};

/// A rule as in a (Cluster)Role: `rule(&[""], &["pods"], &["get", "list"])`.
#[must_use]
pub fn rule(api_groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let v = |s: &[&str]| s.iter().map(|x| (*x).to_string()).collect::<Vec<_>>();
    PolicyRule {
        api_groups: Some(v(api_groups)),
        resources: Some(v(resources)),
        verbs: v(verbs),
        ..PolicyRule::default()
    }
}

/// Rules from (API group, resource[/subresource], verbs) triples, the shape
/// of the agent's `conndrain::kubernetes::API_CALLS`:
/// `server.set_rbac(rules_from(API_CALLS))`.
#[must_use]
pub fn rules_from(calls: &[(&str, &str, &[&str])]) -> Vec<PolicyRule> {
    calls.iter().map(|(group, resource, verbs)| rule(&[group], &[resource], verbs)).collect()
}

/// The rules of the agent's `ClusterRole`: pods get/list/watch, pods/status
/// patch, services and endpointslices list/watch, events create/patch.
#[must_use]
pub fn agent_rbac() -> Vec<PolicyRule> {
    vec![
        rule(&[""], &["pods"], &["get", "list", "watch"]),
        rule(&[""], &["pods/status"], &["patch"]),
        rule(&[""], &["services"], &["list", "watch"]),
        rule(&["discovery.k8s.io"], &["endpointslices"], &["list", "watch"]),
        rule(&["", "events.k8s.io"], &["events"], &["create", "patch"]),
    ]
}

/// A pod as it looks once the kubelet runs it: in namespace `default`,
/// bound to `node`, phase Running, Ready, with `ips` (the first is `podIP`).
#[must_use]
pub fn running_pod(name: &str, node: &str, ips: &[std::net::IpAddr], host_network: bool) -> core::Pod {
    let pod_ips: Vec<core::PodIP> = ips.iter().map(|ip| core::PodIP { ip: ip.to_string() }).collect();
    core::Pod {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some("default".to_string()),
            ..Default::default()
        },
        spec: Some(core::PodSpec {
            node_name: Some(node.to_string()),
            host_network: Some(host_network),
            containers: vec![core::Container { name: "app".into(), image: Some("app".into()), ..Default::default() }],
            ..Default::default()
        }),
        status: Some(core::PodStatus {
            phase: Some("Running".into()),
            pod_ip: ips.first().map(ToString::to_string),
            pod_ips: Some(pod_ips),
            conditions: Some(vec![core::PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}
