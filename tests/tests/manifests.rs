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

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    path::{Path, PathBuf},
};

use clap::{CommandFactory as _, Parser as _};
use conndrain::cli::Cli;
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde_json::Value;

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
fn pod_specs(docs: &[Doc]) -> Vec<(String, PodSpec)> {
    let mut pods = Vec::new();
    for (at, ds) in documents_of::<DaemonSet>(docs, "DaemonSet") {
        pods.push((at, ds.spec.template.spec.unwrap()));
    }
    for (at, d) in documents_of::<Deployment>(docs, "Deployment") {
        pods.push((at, d.spec.template.spec.unwrap()));
    }
    pods
}

fn containers(pod: &PodSpec) -> impl Iterator<Item = &Container> {
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

/// A `conndrain` command line found in a container.
struct Invocation {
    at: String,
    container: String,
    /// The subcommand it runs, e.g. `["agent"]` or `["pod", "add"]`.
    subcommand: Vec<String>,
}

/// The command lines of `c` that run `conndrain` (by file name).
fn conndrain_argvs(c: &Container) -> Vec<Vec<String>> {
    let mut argvs = Vec::new();
    let main: Vec<String> = c.command.iter().flatten().chain(c.args.iter().flatten()).cloned().collect();
    argvs.push(main);
    let hooks = c.lifecycle.iter().flat_map(|l| [&l.pre_stop, &l.post_start]).flatten();
    argvs.extend(hooks.filter_map(|h| h.exec.as_ref()?.command.clone()));
    let probes = [&c.liveness_probe, &c.readiness_probe, &c.startup_probe];
    argvs.extend(probes.into_iter().flatten().filter_map(|p| p.exec.as_ref()?.command.clone()));
    argvs.retain(|argv| argv.first().is_some_and(|p| Path::new(p).file_name() == Some(OsStr::new("conndrain"))));
    argvs
}

/// Walks `argv` through the CLI's commands; every flag must be an argument of
/// the command it is given to. Returns the subcommand path.
fn walk(root: &clap::Command, argv: &[String]) -> Result<Vec<String>, String> {
    let mut cmd = root;
    let mut path = Vec::new();
    let mut tokens = argv.iter().skip(1);
    while let Some(tok) = tokens.next() {
        let arg = if let Some(long) = tok.strip_prefix("--") {
            let (name, inline) = long.split_once('=').map_or((long, false), |(n, _)| (n, true));
            let arg = cmd.get_arguments().find(|a| a.get_long() == Some(name));
            let arg =
                arg.ok_or_else(|| format!("`{}` has no flag --{name}", cmd.get_bin_name().unwrap_or("conndrain")))?;
            (!inline).then_some(arg)
        } else if let Some(short) = tok.strip_prefix('-').filter(|s| s.chars().count() == 1) {
            let c = short.chars().next().unwrap();
            Some(cmd.get_arguments().find(|a| a.get_short() == Some(c)).ok_or_else(|| format!("no flag -{c}"))?)
        } else if cmd.has_subcommands() && cmd.get_positionals().next().is_none() {
            cmd = cmd.find_subcommand(tok).ok_or_else(|| format!("no subcommand {tok:?}"))?;
            path.push(cmd.get_name().to_owned());
            None
        } else {
            None
        };
        if arg.is_some_and(|a| a.get_action().takes_values()) {
            tokens.next().ok_or_else(|| format!("{tok} needs a value"))?;
        }
    }
    Ok(path)
}

fn cli() -> clap::Command {
    let mut cli = Cli::command();
    // Propagates the global arguments (and --help, --version) to the subcommands.
    cli.build();
    cli
}

fn subcommand<'a>(cli: &'a clap::Command, path: &[String]) -> &'a clap::Command {
    path.iter().fold(cli, |c, name| c.find_subcommand(name).unwrap())
}

fn invocations(docs: &[Doc]) -> Vec<Invocation> {
    let cli = cli();
    let mut found = Vec::new();
    for (at, pod) in pod_specs(docs) {
        for c in containers(&pod) {
            for argv in conndrain_argvs(c) {
                let subcommand =
                    walk(&cli, &argv).unwrap_or_else(|e| panic!("{at}: container {}: {argv:?}: {e}", c.name));
                if let Err(e) = Cli::try_parse_from(&argv) {
                    panic!("{at}: container {}: {argv:?} does not parse: {e}", c.name);
                }
                found.push(Invocation { at: at.clone(), container: c.name.clone(), subcommand });
            }
        }
    }
    found
}

#[test]
fn every_conndrain_command_line_parses_with_the_cli() {
    let docs = documents();
    let found = invocations(&docs);
    let runs = |sub: &str| found.iter().filter(|i| i.subcommand == [sub]).count();
    assert!(runs("agent") >= 1, "the DaemonSet (install.yaml) runs `conndrain agent`");
    // The checker itself: a flag the CLI lacks is caught, on the right subcommand.
    let cli = cli();
    let argv = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(walk(&cli, &argv("/conndrain agent --max-flows 4096")).unwrap(), ["agent"]);
    assert_eq!(walk(&cli, &argv("conndrain pod add web --ip 10.0.0.1")).unwrap(), ["pod", "add"]);
    assert!(walk(&cli, &argv("conndrain agent --fallback-sleep 3")).is_err());
    assert!(walk(&cli, &argv("conndrain wait --max-flows 3")).is_err());
}

/// The environment of `c`: its `env` and the ConfigMaps of its `envFrom`
/// (looked up among `docs`), by name.
fn environment(docs: &[Doc], at: &str, c: &Container) -> Env {
    let file = at.split('#').next().unwrap();
    let maps = documents_of::<ConfigMap>(docs, "ConfigMap");
    let mut env = BTreeMap::new();
    for from in c.env_from.iter().flatten() {
        let Some(r) = &from.config_map_ref else {
            continue;
        };
        // In the same file (install.yaml), else in the same directory.
        let named = |m: &ConfigMap| m.metadata.name.as_deref() == Some(&r.name);
        let dir = |f: &str| Path::new(f).parent().map(Path::to_path_buf);
        let (_, map) = maps
            .iter()
            .find(|(map_at, m)| map_at.split('#').next() == Some(file) && named(m))
            .or_else(|| maps.iter().find(|(map_at, m)| dir(map_at.split('#').next().unwrap()) == dir(file) && named(m)))
            .unwrap_or_else(|| panic!("{at}: container {}: no ConfigMap {} beside {file}", c.name, r.name));
        for (k, v) in map.data.clone().unwrap_or_default() {
            env.insert(format!("{}{k}", from.prefix.as_deref().unwrap_or_default()), Some(v));
        }
    }
    for e in c.env.iter().flatten() {
        env.insert(e.name.clone(), e.value.clone());
    }
    env
}

fn relevant(key: &str) -> bool {
    key.starts_with("CONNDRAIN_") || key == "NODE_NAME" || key == "HOST_IP"
}

#[test]
fn every_conndrain_variable_is_read_by_the_command_the_container_runs() {
    let docs = documents();
    let cli = cli();
    let found = invocations(&docs);
    let mut checked = 0;
    for (at, pod) in pod_specs(&docs) {
        for c in containers(&pod) {
            let runs: Vec<&clap::Command> = found
                .iter()
                .filter(|i| i.at == at && i.container == c.name)
                .map(|i| subcommand(&cli, &i.subcommand))
                .collect();
            for key in environment(&docs, &at, c).into_keys().filter(|k| relevant(k)) {
                let by_clap = runs.iter().any(|cmd| cmd.get_arguments().any(|a| a.get_env() == Some(OsStr::new(&key))));
                let by_code = NOT_CLAP.iter().find(|(k, _)| *k == key).is_some_and(|(_, file)| {
                    let source = std::fs::read_to_string(workspace().join(file)).unwrap();
                    source.contains(&format!("\"{key}\"")) && !runs.is_empty()
                });
                assert!(
                    by_clap || by_code,
                    "{at}: container {} sets {key}, which none of its conndrain commands ({:?}) reads",
                    c.name,
                    runs.iter().map(|c| c.get_name()).collect::<Vec<_>>()
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 14, "expected the agent's settings to be checked, checked {checked}");
}

/// A container's environment: a value, or `None` when it comes from the downward API.
type Env = BTreeMap<String, Option<String>>;

/// The DaemonSet's agent container, its environment and the ConfigMap data.
fn agents(docs: &[Doc]) -> Vec<(String, PodSpec, Container, Env)> {
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

fn port(c: &Container, name: &str) -> i32 {
    let p = c.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name));
    let p = p.unwrap_or_else(|| panic!("container {} has no port named {name}", c.name));
    assert_eq!(p.host_port.unwrap_or(p.container_port), p.container_port, "hostNetwork: hostPort = containerPort");
    p.container_port
}

fn field_ref(c: &Container, var: &str) -> Option<String> {
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
fn agent_setting<T: std::str::FromStr>(docs: &[Doc], var: &str) -> T {
    let (at, _, _, env) = &agents(docs)[0];
    let value = env[var].clone().unwrap_or_else(|| panic!("{at}: {var} has no value"));
    value.parse().unwrap_or_else(|_| panic!("{at}: {var}={value:?}"))
}

fn default_of(cmd: &clap::Command, long: &str) -> String {
    let arg = cmd.get_arguments().find(|a| a.get_long() == Some(long)).unwrap();
    arg.get_default_values()[0].to_str().unwrap().to_owned()
}

#[test]
fn every_pre_stop_hook_reaches_the_agent_and_can_drain() {
    let docs = documents();
    let agent_port: i32 = agent_setting(&docs, "CONNDRAIN_WAIT_PORT");
    let intercept_port: i32 = agent_setting(&docs, "CONNDRAIN_INTERCEPT_PORT");
    let bpffs: String = agent_setting(&docs, "CONNDRAIN_BPFFS");
    let quiet_period: f64 = agent_setting(&docs, "CONNDRAIN_QUIET_PERIOD");
    let (mut waits, mut gets) = (0, 0);
    let cli = cli();
    let wait = subcommand(&cli, &["wait".to_owned()]);
    for (at, pod) in pod_specs(&docs) {
        for c in containers(&pod) {
            let Some(hook) = c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()) else { continue };
            if let Some(get) = &hook.http_get {
                // The kubelet's GET to the pod's own IP (no host), on the port
                // the agent intercepts, at the path it answers.
                assert_eq!(get.host, None, "{at}: {}'s preStop httpGet must go to the pod's IP", c.name);
                assert_eq!(get.path.as_deref(), Some("/v1/wait"), "{at}: {}", c.name);
                assert_eq!(get.scheme.as_deref().unwrap_or("HTTP"), "HTTP", "{at}: {}", c.name);
                assert_eq!(
                    get.port,
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(intercept_port),
                    "{at}: {}: the agent's intercept port",
                    c.name
                );
                let serves =
                    containers(&pod).flat_map(|c| c.ports.iter().flatten()).any(|p| p.container_port == intercept_port);
                assert!(!serves, "{at}: the app serves on the intercept port {intercept_port}, which the agent takes");
                // Pinned under --bpffs, the intercept outlives an agent
                // restart, and the GET waits for the next agent instead of
                // being refused (docs/prestop.md, Failure modes).
                assert!(!bpffs.is_empty(), "the agent must run with --bpffs for the httpGet hook to fail open");
                gets += 1;
            } else {
                let Some(argv) = hook.exec.as_ref().and_then(|e| e.command.clone()) else { continue };
                if !conndrain_argvs(c).contains(&argv) {
                    continue;
                }
                // A `conndrain wait` (no pod name) reaches the agent: HOST_IP
                // from the downward API, the agent's port, and a grace period
                // that outlasts the fail-open sleep.
                assert_eq!(field_ref(c, "HOST_IP").as_deref(), Some("status.hostIP"), "{at}: {}", c.name);
                let env = environment(&docs, &at, c);
                let default_port = default_of(wait, "port");
                let port: i32 =
                    env.get("CONNDRAIN_WAIT_PORT").cloned().flatten().unwrap_or(default_port).parse().unwrap();
                assert_eq!(port, agent_port, "{at}: {} waits on another port than the agent's", c.name);
                let default_fallback: f64 = default_of(wait, "fallback-sleep").parse().unwrap();
                let fallback = argv
                    .iter()
                    .position(|a| a == "--fallback-sleep")
                    .map_or(default_fallback, |i| argv[i + 1].parse::<f64>().unwrap());
                #[expect(clippy::cast_precision_loss, reason = "seconds")]
                let grace = pod.termination_grace_period_seconds.unwrap_or(30) as f64;
                assert!(
                    grace > fallback,
                    "{at}: the grace period ({grace} s) must outlast --fallback-sleep ({fallback} s)"
                );
                waits += 1;
            }
            // The kubelet keeps running readiness probes on a terminating pod,
            // from the node: each one is a new inbound flow, which restarts the
            // quiet period. More frequent than that, the pod never drains.
            for probe in c.readiness_probe.iter().filter(|p| p.exec.is_none()) {
                let period = f64::from(probe.period_seconds.unwrap_or(10));
                assert!(
                    period > quiet_period,
                    "{at}: {}'s readiness probe (every {period} s) restarts the quiet period ({quiet_period} s) forever",
                    c.name
                );
            }
        }
    }
    assert!(gets >= 1, "the example's preStop is the kubelet's httpGet");
    assert_eq!(waits, 0, "the example uses the httpGet hook only, no `conndrain wait`");
}

/// The example app carries nothing of conndrain: no init container, no
/// emptyDir for the binary, no `HOST_IP`, no exec hook.
#[test]
fn the_example_app_needs_no_binary_volume_or_variable() {
    let docs = documents();
    let mut checked = 0;
    for (at, pod) in pod_specs(&docs).into_iter().filter(|(at, _)| at.starts_with("deploy/examples/")) {
        assert!(pod.init_containers.as_ref().is_none_or(Vec::is_empty), "{at}: no init container");
        assert!(pod.volumes.iter().flatten().all(|v| v.empty_dir.is_none()), "{at}: no emptyDir");
        for c in containers(&pod) {
            assert_eq!(field_ref(c, "HOST_IP"), None, "{at}: {}: no HOST_IP", c.name);
            let hook = c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref());
            assert!(hook.is_none_or(|h| h.exec.is_none()), "{at}: {}: no exec hook", c.name);
        }
        checked += 1;
    }
    assert!(checked >= 1, "the example app is checked");
}

/// The Prometheus operator's PodMonitor (monitoring.coreos.com/v1), as far as
/// `deploy/examples` uses it. k8s-openapi has no types for CRDs, so the fields
/// are listed here; an unknown one fails the round trip like any other.
#[derive(serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PodMonitor {
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
