//! A pod's own drain settings, from the `conndrain.io/` annotations of its
//! template (named like the `conndrain.io/Drained` condition the agent
//! writes). Every value is checked; a bad one is refused with a message
//! naming the annotation, the value and what to write instead (reported as
//! a Warning event on the pod), and the setting keeps its default, which
//! never makes a drain end sooner.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

use crate::node::PodSettings;

/// How long with no new inbound flow before the terminating pod may count
/// as drained, as a duration ("5s", "1m30s"); shorter than its grace period.
pub const QUIET_PERIOD: &str = "conndrain.io/quiet-period";
/// The pod's own listening ports whose inbound connections never hold it,
/// by number or container port name ("9090,metrics").
pub const IGNORE_PORTS: &str = "conndrain.io/ignore-ports";
/// "true": the agent does not track the pod; its preStop wait answers
/// `skipped` at once and no condition is written.
pub const SKIP: &str = "conndrain.io/skip";
const PREFIX: &str = "conndrain.io/";
/// Most ignored ports per pod (they share the kernel's `PROBES` map).
pub const MAX_IGNORE_PORTS: usize = 16;
/// The Kubernetes default of `terminationGracePeriodSeconds`.
const DEFAULT_GRACE_SECS: i64 = 30;

/// What a pod's annotations ask for.
#[derive(Debug, PartialEq, Eq)]
pub struct Annotated {
    /// Opted out (`conndrain.io/skip: "true"`).
    pub skip: bool,
    /// Its settings; refused values are named in `settings.problems`.
    pub settings: PodSettings,
}

/// Reads the pod's `conndrain.io/` annotations. `default_quiet` is the
/// agent's `--quiet-period`, named in the messages about a refused value.
#[must_use]
pub fn read(pod: &Pod, default_quiet: Duration) -> Annotated {
    let empty = std::collections::BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let spec = pod.spec.as_ref();
    let grace = spec.and_then(|s| s.termination_grace_period_seconds).unwrap_or(DEFAULT_GRACE_SECS);
    let named = |name: &str| {
        spec.into_iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok())
    };
    parse(annotations.iter().map(|(k, v)| (k.as_str(), v.as_str())), grace, &named, default_quiet)
}

fn parse<'a>(
    annotations: impl Iterator<Item = (&'a str, &'a str)>,
    grace_secs: i64,
    named_port: &dyn Fn(&str) -> Option<u16>,
    default_quiet: Duration,
) -> Annotated {
    let mut out = Annotated { skip: false, settings: PodSettings::default() };
    let problems = &mut out.settings.problems;
    for (key, value) in annotations {
        let bad = |what: String, instead: String| format!("{key}: {value:?} {what}; {instead}");
        match key {
            QUIET_PERIOD => match quiet_period(value, grace_secs) {
                Ok(d) => {
                    out.settings.quiet_period = Some(d);
                    out.settings.quiet_period_from = format!("annotation {QUIET_PERIOD}");
                }
                Err(what) => problems.push(bad(
                    what,
                    format!("using the agent's default quiet period ({})", human(default_quiet)),
                )),
            },
            IGNORE_PORTS => match ports(value, named_port) {
                Ok(p) => out.settings.ignore_ports = p,
                Err(what) => problems.push(bad(what, "no port is ignored".to_owned())),
            },
            SKIP => match value.trim().to_ascii_lowercase().as_str() {
                "true" => out.skip = true,
                "false" => {}
                _ => problems.push(bad(
                    "is neither \"true\" nor \"false\"".to_owned(),
                    "write \"true\" to opt the pod out; the pod is tracked".to_owned(),
                )),
            },
            _ if key.starts_with(PREFIX) => problems.push(format!(
                "{key} is not an annotation conndrain reads ({QUIET_PERIOD}, {IGNORE_PORTS} and {SKIP} are); it has no effect"
            )),
            _ => {}
        }
    }
    out
}

/// A quiet period: a positive duration shorter than the grace period (a
/// longer one could never end before the kubelet kills the pod).
fn quiet_period(value: &str, grace_secs: i64) -> Result<Duration, String> {
    let d = duration(value)?;
    if d.is_zero() {
        return Err("is zero; write a positive duration such as \"5s\"".to_owned());
    }
    let grace = Duration::from_secs(u64::try_from(grace_secs).unwrap_or(0));
    if d >= grace {
        return Err(format!(
            "is not shorter than the pod's grace period (terminationGracePeriodSeconds: {grace_secs}), so the drain would always run to its deadline; write a shorter duration such as \"5s\""
        ));
    }
    Ok(d)
}

/// A duration in the Go/Kubernetes form: numbers with units, "500ms",
/// "5s", "1.5m", "1h30m".
fn duration(value: &str) -> Result<Duration, String> {
    const WRITE: &str = "write a duration with a unit, such as \"5s\", \"500ms\" or \"1m30s\"";
    let v = value.trim();
    if v.is_empty() {
        return Err(format!("is empty; {WRITE}"));
    }
    if v.bytes().all(|b| b.is_ascii_digit() || b == b'.') && v.parse::<f64>().is_ok() {
        return Err(format!("has no unit; write \"{v}s\" for seconds"));
    }
    let mut total = 0.0_f64;
    let mut rest = v;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let secs_per = match unit {
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("is not a duration; {WRITE}")),
        };
        let n: f64 = number.parse().map_err(|_| format!("is not a duration; {WRITE}"))?;
        total += n * secs_per;
        rest = tail;
    }
    Duration::try_from_secs_f64(total).map_err(|_| format!("is out of range; {WRITE}"))
}

/// Ports separated by commas, by number or container port name.
fn ports(value: &str, named_port: &dyn Fn(&str) -> Option<u16>) -> Result<Vec<u16>, String> {
    const WRITE: &str =
        "write port numbers 1-65535 or container port names, separated by commas, such as \"9090,9100\"";
    let mut out = Vec::new();
    for token in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let port = if token.bytes().all(|b| b.is_ascii_digit()) {
            match token.parse::<u32>() {
                Ok(p @ 1..=65535) => u16::try_from(p).map_err(|_| format!("has port {token} out of range; {WRITE}"))?,
                _ => return Err(format!("has port {token} out of range; {WRITE}")),
            }
        } else {
            named_port(token)
                .ok_or_else(|| format!("names {token:?}, which is no named port of the pod's containers; {WRITE}"))?
        };
        out.push(port);
    }
    out.sort_unstable();
    out.dedup();
    if out.len() > MAX_IGNORE_PORTS {
        return Err(format!("has {} ports; write at most {MAX_IGNORE_PORTS}", out.len()));
    }
    Ok(out)
}

fn human(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: Duration = Duration::from_secs(3);

    fn annotated(pairs: &[(&str, &str)]) -> Annotated {
        let named = |name: &str| (name == "metrics").then_some(9100);
        parse(pairs.iter().copied(), 30, &named, DEFAULT)
    }

    #[test]
    fn good_values_are_applied() {
        let a = annotated(&[(QUIET_PERIOD, "12s500ms"), (IGNORE_PORTS, " 9100, 9090,metrics,"), ("other.io/x", "y")]);
        assert!(!a.skip);
        assert_eq!(a.settings.quiet_period, Some(Duration::from_millis(12_500)));
        assert!(a.settings.problems.is_empty(), "{:?}", a.settings.problems);
        assert_eq!(a.settings.ignore_ports, vec![9090, 9100]);
        assert_eq!(a.settings.quiet_period_from, "annotation conndrain.io/quiet-period");
        assert!(annotated(&[(SKIP, "True")]).skip);
        assert!(!annotated(&[(SKIP, "false")]).skip);
        assert_eq!(annotated(&[]).settings, PodSettings::default());
    }

    #[test]
    fn durations() {
        let d = |s: &str| duration(s).ok();
        assert_eq!(d("5s"), Some(Duration::from_secs(5)));
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("1.5m"), Some(Duration::from_secs(90)));
        assert_eq!(d("1h30m"), Some(Duration::from_mins(90)));
        assert_eq!(d(" 2s "), Some(Duration::from_secs(2)));
        for bad in ["", "5", "5 s", "s", "5sec", "-5s", "5x", "1..5s", "1e400s"] {
            assert_eq!(d(bad), None, "{bad:?}");
        }
        assert!(duration("5").unwrap_err().contains("write \"5s\""));
    }

    #[test]
    fn a_bad_quiet_period_is_named_with_what_to_write_and_the_default_is_kept() {
        for (value, says) in [
            ("abc", "is not a duration; write a duration with a unit"),
            ("5", "has no unit; write \"5s\""),
            ("0s", "is zero"),
            ("30s", "not shorter than the pod's grace period (terminationGracePeriodSeconds: 30)"),
            ("2h", "not shorter than the pod's grace period"),
        ] {
            let a = annotated(&[(QUIET_PERIOD, value)]);
            assert_eq!(a.settings.quiet_period, None, "{value}: the default is kept");
            let [p] = a.settings.problems.as_slice() else {
                panic!("one problem for {value}: {:?}", a.settings.problems)
            };
            assert!(p.starts_with(&format!("conndrain.io/quiet-period: {value:?} ")), "{p}");
            assert!(p.contains(says), "{p}");
            assert!(p.ends_with("using the agent's default quiet period (3s)"), "{p}");
        }
        // The grace period is the pod's own.
        let named = |_: &str| None;
        let a = parse([(QUIET_PERIOD, "45s")].into_iter(), 60, &named, DEFAULT);
        assert_eq!(a.settings.quiet_period, Some(Duration::from_secs(45)));
        let a = parse([(QUIET_PERIOD, "1s")].into_iter(), 0, &named, DEFAULT);
        assert_eq!(a.settings.quiet_period, None, "a zero grace period leaves no room");
    }

    #[test]
    fn bad_ports_ignore_none_of_them() {
        for (value, says) in [
            ("9090,70000", "port 70000 out of range"),
            ("0", "port 0 out of range"),
            ("9090,web", "names \"web\", which is no named port"),
            ("-1", "names \"-1\""),
            ("1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17", "has 17 ports; write at most 16"),
        ] {
            let a = annotated(&[(IGNORE_PORTS, value)]);
            assert!(a.settings.ignore_ports.is_empty(), "{value}: nothing is ignored");
            let [p] = a.settings.problems.as_slice() else { panic!("one problem for {value}") };
            assert!(p.starts_with("conndrain.io/ignore-ports: "), "{p}");
            assert!(p.contains(says) && p.ends_with("no port is ignored"), "{p}");
        }
        assert_eq!(annotated(&[(IGNORE_PORTS, "")]).settings.problems.len(), 0, "empty: no port");
    }

    #[test]
    fn a_bad_skip_value_keeps_the_pod_tracked_and_unknown_keys_are_named() {
        let a = annotated(&[(SKIP, "yes"), ("conndrain.io/quiet_period", "5s")]);
        assert!(!a.skip);
        assert_eq!(a.settings.problems.len(), 2, "{:?}", a.settings.problems);
        assert!(a.settings.problems.iter().any(|p| p.starts_with("conndrain.io/skip: \"yes\" is neither")));
        assert!(a.settings.problems.iter().any(|p| p.starts_with("conndrain.io/quiet_period is not an annotation")));
        assert_eq!(a.settings.quiet_period, None);
    }
}
