//! The drain rule, as pure functions of what the datapath reports: which
//! flows hold a pod, and when a terminating pod is drained.
//!
//! Times are `CLOCK_MONOTONIC` nanoseconds, the clock of `bpf_ktime_get_ns`.

use conndrain_common::{FlowKey, FlowValue, PROTO_TCP, direction, flow_flags, tcp_state};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodState {
    Serving,
    Draining,
    Drained,
    Deadline,
    /// Known but not tracked: a hostNetwork pod shares the node's IPs, or
    /// the pod's traffic passes no interface conndrain can attach to. Its
    /// preStop `wait` falls back to sleeping.
    Skipped,
}

impl PodState {
    /// Drained and deadline are final: once reported, a release is under way.
    #[must_use]
    pub fn is_final(self) -> bool {
        matches!(self, Self::Drained | Self::Deadline)
    }
}

/// Timeouts that decide how a flow counts.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// An established inbound TCP flow quiet this long is an idle keep-alive.
    pub idle_ns: u64,
    /// A UDP flow quiet this long is over.
    pub udp_ns: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowClass {
    /// Inbound and live: holds the pod.
    Active,
    /// Inbound TCP established or half-closed, idle past the idle timeout,
    /// with no request in flight (its last data came from the pod): does not
    /// hold the pod.
    Idle,
    /// The pod is the client: does not hold the pod.
    Outbound,
    /// Inbound, live, to one of the ports the pod's settings ignore (a
    /// metrics scrape port): does not hold the pod.
    Ignored,
    /// Closed, half-open, or timed out.
    Inactive,
}

/// How one flow counts at `now`, and when to look at it again without an
/// event: the time it turns idle or times out, or, for a request in flight,
/// within the idle timeout (its answer sends no event).
#[must_use]
pub fn classify(proto: u8, v: &FlowValue, now: u64, t: Timeouts) -> (FlowClass, Option<u64>) {
    let quiet = now.saturating_sub(v.last_seen_ns);
    let live_until = if proto == PROTO_TCP {
        if !tcp_state::is_active(v.state) {
            return (FlowClass::Inactive, None);
        }
        None
    } else {
        if quiet > t.udp_ns {
            return (FlowClass::Inactive, None);
        }
        Some(v.last_seen_ns + t.udp_ns + 1)
    };
    if v.direction == direction::OUTBOUND {
        return (FlowClass::Outbound, live_until);
    }
    if proto == PROTO_TCP {
        // Data went to the pod last and none came back: a request in
        // flight (a slow handler, a long poll), however long it is quiet.
        // Its answer sends the agent no event (that would be one per
        // response), so look again within the idle timeout: an answer at
        // any time until then is seen before its flow could turn idle.
        if v.flags & flow_flags::AWAITING_REPLY != 0 {
            return (FlowClass::Active, Some(now.saturating_add(t.idle_ns)));
        }
        if quiet > t.idle_ns {
            return (FlowClass::Idle, None);
        }
        return (FlowClass::Active, Some(v.last_seen_ns + t.idle_ns + 1));
    }
    (FlowClass::Active, live_until)
}

/// How one pod's flows count: the agent's timeouts and the pod's own
/// ignored ports.
#[derive(Clone, Copy, Debug)]
pub struct Counting<'a> {
    pub timeouts: Timeouts,
    pub ignore_ports: &'a [u16],
}

/// How one flow of a pod counts with the pod's ignored ports: a live inbound
/// flow to one of them is `Ignored`. Only inbound flows are (a peer opened
/// them, so `pod_port` is the pod's listening port); the pod's own outbound
/// flows never hold it anyway, whatever their port.
#[must_use]
pub fn classify_for(key: &FlowKey, v: &FlowValue, now: u64, c: Counting<'_>) -> (FlowClass, Option<u64>) {
    let (class, changes_at) = classify(key.proto, v, now, c.timeouts);
    if matches!(class, FlowClass::Active | FlowClass::Idle) && c.ignore_ports.contains(&key.pod_port) {
        return (FlowClass::Ignored, None);
    }
    (class, changes_at)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounts {
    pub active: u64,
    pub idle: u64,
    pub outbound: u64,
    /// Live inbound flows to ports the pod's settings ignore.
    pub ignored: u64,
}

impl std::ops::AddAssign for FlowCounts {
    fn add_assign(&mut self, o: Self) {
        self.active += o.active;
        self.idle += o.idle;
        self.outbound += o.outbound;
        self.ignored += o.ignored;
    }
}

/// A pod's termination: when it began, its limits, and its outcome once known.
#[derive(Clone, Debug)]
pub struct Termination {
    pub started_ns: u64,
    pub deadline_ns: u64,
    pub quiet_period_ns: u64,
    /// `PodCounters::new_inbound_total` when termination began.
    pub new_inbound_at_start: u64,
    /// Set once drained or at the deadline, with the time; never changes after.
    pub outcome: Option<(PodState, u64)>,
}

/// What the datapath says about a terminating pod right now.
#[derive(Clone, Copy, Debug)]
pub struct Observation {
    pub now_ns: u64,
    pub counts: FlowCounts,
    pub new_inbound_total: u64,
    pub last_new_inbound_ns: u64,
    /// Open inbound sockets of the pod that no active or idle flow accounts
    /// for (the sockets tracepoint's ground truth against the flow index).
    pub sockets_holding: u64,
    /// The sockets can confirm a drain: the tracepoint has watched this pod
    /// since before its first connection and lost none of its sockets.
    pub sockets_complete: bool,
}

/// How often a pod whose verdict waits on its sockets is looked at again
/// when no event comes (the close events are a wake-up, not the truth).
pub const SOCKET_RECHECK_NS: u64 = 250_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub state: PodState,
    /// Since when no new inbound flow has arrived (termination start at the earliest).
    pub quiet_since_ns: u64,
    /// When to look again if nothing happens before (quiet period or deadline).
    pub next_check_ns: Option<u64>,
}

impl Termination {
    #[must_use]
    pub fn new_since(&self, new_inbound_total: u64) -> u64 {
        new_inbound_total.saturating_sub(self.new_inbound_at_start)
    }

    /// Applies the drain rule: drained when no inbound flow is active, no
    /// open inbound socket is unaccounted for, the sockets can confirm it,
    /// and no new flow has arrived for the quiet period; otherwise
    /// `deadline` once it passes. Missing evidence means "still draining".
    pub fn evaluate(&mut self, obs: &Observation) -> Verdict {
        let quiet_since_ns = if obs.new_inbound_total > self.new_inbound_at_start {
            self.started_ns.max(obs.last_new_inbound_ns)
        } else {
            self.started_ns
        };
        if let Some((state, _)) = self.outcome {
            return Verdict { state, quiet_since_ns, next_check_ns: None };
        }
        let quiet_end = quiet_since_ns + self.quiet_period_ns;
        let flows_done = obs.counts.active == 0 && obs.now_ns >= quiet_end;
        let confirmed = obs.sockets_complete && obs.sockets_holding == 0;
        if flows_done && confirmed {
            self.outcome = Some((PodState::Drained, obs.now_ns));
            return Verdict { state: PodState::Drained, quiet_since_ns, next_check_ns: None };
        }
        if obs.now_ns >= self.deadline_ns {
            self.outcome = Some((PodState::Deadline, obs.now_ns));
            return Verdict { state: PodState::Deadline, quiet_since_ns, next_check_ns: None };
        }
        let next = if flows_done && obs.sockets_complete {
            // Only sockets hold it: look again soon (their closes also wake us).
            (obs.now_ns + SOCKET_RECHECK_NS).min(self.deadline_ns)
        } else if obs.counts.active == 0 {
            quiet_end.min(self.deadline_ns)
        } else {
            self.deadline_ns
        };
        Verdict { state: PodState::Draining, quiet_since_ns, next_check_ns: Some(next) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn term() -> Termination {
        Termination {
            started_ns: 100 * S,
            deadline_ns: 130 * S,
            quiet_period_ns: 3 * S,
            new_inbound_at_start: 5,
            outcome: None,
        }
    }

    fn obs(now: u64, active: u64, new_total: u64, last_new: u64) -> Observation {
        Observation {
            now_ns: now,
            counts: FlowCounts { active, ..FlowCounts::default() },
            new_inbound_total: new_total,
            last_new_inbound_ns: last_new,
            sockets_holding: 0,
            sockets_complete: true,
        }
    }

    #[test]
    fn an_open_socket_the_flows_do_not_explain_holds_the_pod() {
        let mut t = term();
        let o = Observation { sockets_holding: 1, ..obs(104 * S, 0, 5, 0) };
        let v = t.evaluate(&o);
        assert_eq!((v.state, v.next_check_ns), (PodState::Draining, Some(104 * S + SOCKET_RECHECK_NS)));
        assert_eq!(t.evaluate(&obs(105 * S, 0, 5, 0)).state, PodState::Drained);
    }

    #[test]
    fn incomplete_socket_evidence_never_drains() {
        let mut t = term();
        let o = |now| Observation { sockets_complete: false, ..obs(now, 0, 5, 0) };
        assert_eq!(t.evaluate(&o(110 * S)).state, PodState::Draining);
        assert_eq!(t.evaluate(&o(130 * S)).state, PodState::Deadline);
    }

    #[test]
    fn drains_after_quiet_period_with_no_active_flows() {
        let mut t = term();
        let v = t.evaluate(&obs(101 * S, 0, 5, 50 * S));
        assert_eq!(v.state, PodState::Draining);
        assert_eq!(v.next_check_ns, Some(103 * S));
        assert_eq!(t.evaluate(&obs(103 * S, 0, 5, 50 * S)).state, PodState::Drained);
    }

    #[test]
    fn active_flow_holds_until_deadline() {
        let mut t = term();
        let v = t.evaluate(&obs(110 * S, 1, 5, 0));
        assert_eq!((v.state, v.next_check_ns), (PodState::Draining, Some(130 * S)));
        assert_eq!(t.evaluate(&obs(130 * S, 1, 5, 0)).state, PodState::Deadline);
        // Final: closing the flow afterwards does not turn it into drained.
        assert_eq!(t.evaluate(&obs(131 * S, 0, 5, 0)).state, PodState::Deadline);
    }

    #[test]
    fn new_inbound_flow_restarts_quiet_period() {
        let mut t = term();
        let v = t.evaluate(&obs(103 * S, 0, 6, 102 * S));
        assert_eq!(v.state, PodState::Draining);
        assert_eq!(v.quiet_since_ns, 102 * S);
        assert_eq!(t.evaluate(&obs(105 * S, 0, 6, 102 * S)).state, PodState::Drained);
    }

    #[test]
    fn old_new_inbound_time_is_ignored() {
        // last_new_inbound_ns from before termination must not shorten the quiet period.
        let mut t = term();
        assert_eq!(t.evaluate(&obs(102 * S, 0, 5, 99 * S)).state, PodState::Draining);
    }

    fn flow(state: u8, dir: u8, last_seen: u64) -> FlowValue {
        FlowValue { state, direction: dir, last_seen_ns: last_seen, ..FlowValue::default() }
    }

    #[test]
    fn classification() {
        let t = Timeouts { idle_ns: 30 * S, udp_ns: 10 * S };
        let now = 100 * S;
        let tcp = PROTO_TCP;
        let udp = conndrain_common::PROTO_UDP;
        let ib = direction::INBOUND;
        let ob = direction::OUTBOUND;
        assert_eq!(classify(tcp, &flow(tcp_state::ESTABLISHED, ib, 95 * S), now, t).0, FlowClass::Active);
        assert_eq!(classify(tcp, &flow(tcp_state::ESTABLISHED, ib, 60 * S), now, t).0, FlowClass::Idle);
        // Half-closed and quiet with the last word the pod's: idle, like a keep-alive.
        assert_eq!(classify(tcp, &flow(tcp_state::CLOSING, ib, 10 * S), now, t).0, FlowClass::Idle);
        assert_eq!(classify(tcp, &flow(tcp_state::CLOSING, ib, 95 * S), now, t).0, FlowClass::Active);
        // A request in flight holds however long the handler takes.
        let waiting = FlowValue { flags: flow_flags::AWAITING_REPLY, ..flow(tcp_state::ESTABLISHED, ib, 10 * S) };
        assert_eq!(classify(tcp, &waiting, now, t), (FlowClass::Active, Some(now + t.idle_ns)));
        // Answered at any time before that look: still active then, idle only later.
        let answered = |at| FlowValue { flags: 0, ..flow(tcp_state::ESTABLISHED, ib, at) };
        for at in [now, now + t.idle_ns] {
            let (class, next) = classify(tcp, &answered(at), now + t.idle_ns, t);
            assert_eq!((class, next), (FlowClass::Active, Some(at + t.idle_ns + 1)));
        }
        assert_eq!(classify(tcp, &flow(tcp_state::SYN_SENT, ib, now), now, t).0, FlowClass::Inactive);
        assert_eq!(classify(tcp, &flow(tcp_state::CLOSED, ib, now), now, t).0, FlowClass::Inactive);
        assert_eq!(classify(tcp, &flow(tcp_state::ESTABLISHED, ob, now), now, t).0, FlowClass::Outbound);
        assert_eq!(
            classify(udp, &flow(tcp_state::ESTABLISHED, ib, 95 * S), now, t),
            (FlowClass::Active, Some(105 * S + 1))
        );
        assert_eq!(classify(udp, &flow(tcp_state::ESTABLISHED, ib, 80 * S), now, t).0, FlowClass::Inactive);
    }

    #[test]
    fn only_live_inbound_flows_to_an_ignored_port_are_ignored() {
        let t = Timeouts { idle_ns: 30 * S, udp_ns: 10 * S };
        let now = 100 * S;
        let key = |pod_port, proto| FlowKey { pod_port, peer_port: 40000, proto, family: 4, ..FlowKey::default() };
        let (ib, ob) = (direction::INBOUND, direction::OUTBOUND);
        let live = flow(tcp_state::ESTABLISHED, ib, 99 * S);
        let ignore = [9090];
        let class =
            |k: &FlowKey, v: &FlowValue| classify_for(k, v, now, Counting { timeouts: t, ignore_ports: &ignore }).0;
        assert_eq!(class(&key(9090, PROTO_TCP), &live), FlowClass::Ignored);
        let waiting = FlowValue { flags: flow_flags::AWAITING_REPLY, ..live };
        assert_eq!(class(&key(9090, PROTO_TCP), &waiting), FlowClass::Ignored, "a scrape in flight does not hold");
        assert_eq!(class(&key(8080, PROTO_TCP), &live), FlowClass::Active, "another port holds");
        assert_eq!(class(&key(9090, conndrain_common::PROTO_UDP), &live), FlowClass::Ignored);
        // The pod's own connection from that port is outbound, as before.
        assert_eq!(class(&key(9090, PROTO_TCP), &flow(tcp_state::ESTABLISHED, ob, 99 * S)), FlowClass::Outbound);
        assert_eq!(class(&key(9090, PROTO_TCP), &flow(tcp_state::CLOSED, ib, 99 * S)), FlowClass::Inactive);
        let none = Counting { timeouts: t, ignore_ports: &[] };
        assert_eq!(classify_for(&key(9090, PROTO_TCP), &live, now, none).0, FlowClass::Active);
    }
}
