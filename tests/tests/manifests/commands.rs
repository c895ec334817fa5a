//! Every `conndrain` command line (container command and args, exec hooks and
//! probes) parses with the real CLI, and every `CONNDRAIN_*`, `NODE_NAME` and
//! `HOST_IP` variable given to a container is read by the command it runs.

use std::{collections::BTreeMap, ffi::OsStr, path::Path};

use clap::{CommandFactory as _, Parser as _};
use conndrain::cli::Cli;
use k8s_openapi::api::core::v1::{ConfigMap, Container};

use super::{
    Doc, NOT_CLAP, documents, documents_of,
    permissions::{containers, pod_specs},
    workspace,
};

/// A `conndrain` command line found in a container.
struct Invocation {
    at: String,
    container: String,
    /// The subcommand it runs, e.g. `["agent"]` or `["pod", "add"]`.
    subcommand: Vec<String>,
}

/// The command lines of `c` that run `conndrain` (by file name).
pub fn conndrain_argvs(c: &Container) -> Vec<Vec<String>> {
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

pub fn cli() -> clap::Command {
    let mut cli = Cli::command();
    // Propagates the global arguments (and --help, --version) to the subcommands.
    cli.build();
    cli
}

pub fn subcommand<'a>(cli: &'a clap::Command, path: &[String]) -> &'a clap::Command {
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
pub fn environment(docs: &[Doc], at: &str, c: &Container) -> Env {
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
pub type Env = BTreeMap<String, Option<String>>;
