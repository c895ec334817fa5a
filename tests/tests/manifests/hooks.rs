//! Every preStop hook can reach the agent and drain, and the example app needs
//! no binary, volume or variable of conndrain's.


use super::{
    agent_settings::{agent_setting, default_of, field_ref},
    commands::{cli, conndrain_argvs, environment, subcommand},
    documents,
    permissions::{containers, pod_specs},
};

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
