//! The ConfigMap has every agent setting with the CLI's default, and the ports,
//! probes and node identity agree between the ConfigMap, the DaemonSet and the
//! code.

use std::{collections::BTreeSet, ffi::OsStr, path::Path};

use clap::Parser as _;
use conndrain::cli::Cli;
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Container, PodSpec},
};

use super::{
    Doc,
    commands::{Env, cli, environment, subcommand},
    documents, documents_of,
};

/// The DaemonSet's agent container, its environment and the ConfigMap data.
pub fn agents(docs: &[Doc]) -> Vec<(String, PodSpec, Container, Env)> {
    let mut out = Vec::new();
    for (at, ds) in documents_of::<DaemonSet>(docs, "DaemonSet") {
        let pod = ds.spec.template.spec.unwrap();
        assert_eq!(pod.containers.len(), 1, "{at}");
        let c = pod.containers[0].clone();
        let env = environment(docs, &at, &c);
        out.push((at, pod, c, env));
    }
    assert!(!out.is_empty());
    out
}

#[test]
fn the_agent_gets_every_setting_with_the_clis_default() {
    let docs = documents();
    let cli = cli();
    let agent = subcommand(&cli, &["agent".to_owned()]);
    for (at, _, _, env) in agents(&docs) {
        let mut flags = vec!["conndrain".to_owned(), "agent".to_owned()];
        for arg in agent.get_arguments() {
            let Some(var) = arg.get_env().and_then(OsStr::to_str) else {
                continue;
            };
            let value = env.get(var).unwrap_or_else(|| {
                panic!("{at}: the agent's setting {var} (--{}) is not set", arg.get_long().unwrap())
            });
            let Some(value) = value else { continue }; // from the downward API
            if let Some(default) = arg.get_default_values().first().and_then(|d| d.to_str()) {
                let same = match (value.parse::<f64>(), default.parse::<f64>()) {
                    (Ok(a), Ok(b)) => (a - b).abs() < f64::EPSILON,
                    _ => value == default,
                };
                assert!(same, "{at}: {var} is {value:?} but the agent's default is {default:?}");
            }
            flags.push(format!("--{}={value}", arg.get_long().unwrap()));
        }
        // The values are valid for the agent's parsers (ranges, positive seconds).
        if let Err(e) = Cli::try_parse_from(&flags) {
            panic!("{at}: the agent would refuse its settings {flags:?}: {e}");
        }
    }
}

pub fn port(c: &Container, name: &str) -> i32 {
    let p = c.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name));
    let p = p.unwrap_or_else(|| panic!("container {} has no port named {name}", c.name));
    assert_eq!(p.host_port.unwrap_or(p.container_port), p.container_port, "hostNetwork: hostPort = containerPort");
    p.container_port
}

pub fn field_ref(c: &Container, var: &str) -> Option<String> {
    let e = c.env.iter().flatten().find(|e| e.name == var)?;
    Some(e.value_from.as_ref()?.field_ref.as_ref()?.field_path.clone())
}

#[test]
fn the_agents_ports_probes_and_node_identity_agree_with_the_code() {
    let docs = documents();
    let mut wait_ports = BTreeSet::new();
    for (at, pod, c, env) in agents(&docs) {
        assert_eq!(pod.host_network, Some(true), "{at}");
        assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"), "{at}");
        assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"), "{at}");
        let tolerates_all = pod
            .tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none());
        assert!(tolerates_all, "{at}: tolerate every taint");
        assert_eq!(field_ref(&c, "NODE_NAME").as_deref(), Some("spec.nodeName"), "{at}");
        assert_eq!(field_ref(&c, "HOST_IP").as_deref(), Some("status.hostIP"), "{at}");
        let setting = |k: &str| env[k].clone().unwrap().parse::<i32>().unwrap();
        assert_eq!(port(&c, "wait"), setting("CONNDRAIN_WAIT_PORT"), "{at}");
        assert_eq!(port(&c, "metrics"), setting("CONNDRAIN_METRICS_PORT"), "{at}");
        wait_ports.insert(setting("CONNDRAIN_WAIT_PORT"));
        for (probe, path) in [(&c.readiness_probe, "/readyz"), (&c.liveness_probe, "/healthz")] {
            let get =
                probe.as_ref().and_then(|p| p.http_get.clone()).unwrap_or_else(|| panic!("{at}: no {path} probe"));
            assert_eq!(get.path.as_deref(), Some(path), "{at}");
            let to_metrics = match get.port {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s == "metrics",
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => p == port(&c, "metrics"),
            };
            assert!(to_metrics, "{at}: {path} is served on the metrics port");
        }
        let mounts: BTreeSet<&str> = c.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
        for var in ["CONNDRAIN_BPFFS", "CONNDRAIN_SOCKET"] {
            let path = env[var].clone().unwrap();
            assert!(mounts.iter().any(|m| Path::new(&path).starts_with(m)), "{at}: {var}={path} is on no volume mount");
        }
    }
    assert_eq!(wait_ports.len(), 1, "every copy of the agent agrees on its port");
    assert_eq!(
        wait_ports.first().copied(),
        Some(i32::from(conndrain::api::DEFAULT_WAIT_PORT)),
        "the example's `conndrain wait` relies on the default port"
    );
}

/// The agent's setting `var`, as a number.
pub fn agent_setting<T: std::str::FromStr>(docs: &[Doc], var: &str) -> T {
    let (at, _, _, env) = &agents(docs)[0];
    let value = env[var].clone().unwrap_or_else(|| panic!("{at}: {var} has no value"));
    value.parse().unwrap_or_else(|_| panic!("{at}: {var}={value:?}"))
}

pub fn default_of(cmd: &clap::Command, long: &str) -> String {
    let arg = cmd.get_arguments().find(|a| a.get_long() == Some(long)).unwrap();
    arg.get_default_values()[0].to_str().unwrap().to_owned()
}
