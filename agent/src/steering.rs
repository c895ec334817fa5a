//! Pinning established flows to their old backend while kube-proxy removes
//! its rules (design: docs/steering.md).
//!
//! When a backend starts terminating, the agent reads the kernel's own
//! translation of each of its flows from conntrack (client → frontend became
//! peer → backend, with kube-proxy's SNAT for NodePort traffic to another
//! node) and writes it into the `PINS` map, one entry per direction. From then
//! on the TC programs rewrite and redirect those packets themselves, ahead of
//! netfilter, so rule rewrites, `conntrack -F` or kube-proxy's UDP cleanup no
//! longer move them. New flows never match a pin and go wherever the rules
//! send them.
//!
//! Learning is repeated every second while a backend terminates, so flows that
//! still reach it through stale rules elsewhere are pinned too. A pin is
//! released when its flow closes (FIN both ways or RST), when a UDP flow is
//! idle for the UDP timeout, or shortly after its pod is removed (then TCP
//! segments are answered with a RST meanwhile). Not at the backend's
//! deadline: a pinned flow's packets never met kube-proxy's conntrack entry,
//! whose TCP window is stale by then, so released alive its next segments
//! (the final FIN too) would be dropped as INVALID. Only if the pod is never
//! seen gone, a live pin is released `--pin-limit` after the deadline.
//!
//! With `--bpffs`, the node saves this state (`save`) on every change and a
//! restarted agent takes it back (`restore`): the `PINS` entries themselves
//! stayed in the pinned map and kept steering while no agent ran.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use conndrain_common::{FAMILY_V4, FAMILY_V6, MAX_PINS, PROTO_TCP, PROTO_UDP, Pin, WireKey, pin_flags};
use serde::{Deserialize, Serialize};

pub use crate::conntrack::Translation;
use crate::datapath::{self, Datapath};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PinView {
    pub proto: String,
    pub client: String,
    pub frontend: String,
    pub backend: String,
    /// The address the backend sees as its peer (the client, or kube-proxy's SNAT address).
    pub backend_peer: String,
    pub pod: String,
    pub dead: bool,
}

impl PinView {
    fn of(t: &Translation, pod: String, dead: bool) -> Self {
        Self {
            proto: if t.proto == PROTO_TCP { "tcp" } else { "udp" }.into(),
            client: canonical(t.orig_src).to_string(),
            frontend: canonical(t.orig_dst).to_string(),
            backend: canonical(t.reply_src).to_string(),
            backend_peer: canonical(t.reply_dst).to_string(),
            pod,
            dead,
        }
    }
}

struct Backend {
    pod: String,
    deadline_ns: u64,
    /// When this agent started learning its flows (`CLOCK_MONOTONIC` ns).
    since_ns: u64,
}

/// For how long after a backend starts terminating its flows are learned
/// every second. New flows reach it through this node's rules only until
/// kube-proxy's next sync removes its endpoint (a second or two; longer in
/// very large clusters), so afterwards a round every [`LEARN_SLOW_ROUNDS`]
/// seconds is a safety net, not a race: with 100k conntrack entries each
/// round costs the kernel a walk of the table per backend.
const LEARN_FAST_NS: u64 = 60_000_000_000;
/// Once past [`LEARN_FAST_NS`], every this many rounds (seconds).
pub const LEARN_SLOW_ROUNDS: u64 = 10;

struct Pinned {
    rev: WireKey,
    /// What the pin was made from: enough to make it again.
    translation: Translation,
    view: PinView,
    backend_ip: IpAddr,
    deadline_ns: u64,
    pinned_ns: u64,
    closed_ns: Option<u64>,
    dead_ns: Option<u64>,
    /// Its conntrack entry was deleted (the flow is over).
    ct_forgotten: bool,
}

/// How long a closed or dead pin lingers: late FIN/ACKs still go the pinned
/// way, and a dead pod's clients still get their RST.
const LINGER_NS: u64 = 2_000_000_000;
const DEAD_LINGER_NS: u64 = 10_000_000_000;

#[derive(Default)]
pub struct Steering {
    backends: HashMap<IpAddr, Backend>,
    /// By forward key.
    pins: HashMap<WireKey, Pinned>,
    /// Reverse key → forward key, to label flows seen from the pod's side.
    by_rev: HashMap<WireKey, WireKey>,
    /// Counts changes to what `save` returns, so the node saves only then.
    changes: u64,
    /// Flows that could not be pinned (no route to their peer, a full map):
    /// learning retries them every round, and says so once, not every second.
    unpinnable: std::collections::HashSet<WireKey>,
}

/// Whether a conntrack entry is a flow the programs can steer both ways:
/// - the kernel translated it (a Service: its original destination is not
///   the backend), and it is live;
/// - a peer of the node opened it, not a process of the node itself
///   (hostNetwork pods, the kubelet). Such a client's packets go through
///   OUTPUT and leave without ever meeting a TC ingress hook, so they would
///   still be translated by netfilter while only the replies were steered:
///   after a conntrack flush, the requests go to another pod and the
///   replies come from the old one. Its flow is left alone, as without the
///   agent (known gap: docs/steering.md).
#[must_use]
pub fn pinnable(t: &Translation, node_addrs: &[IpAddr]) -> bool {
    let client = canonical(t.orig_src).ip();
    t.live
        && canonical(t.orig_dst) != canonical(t.reply_src)
        && !node_addrs.iter().any(|a| canonical(SocketAddr::new(*a, 0)).ip() == client)
}

/// Where the packets of a flow to `dst` from `src` leave, as netfilter's path
/// routed them before the pin: a forwarded packet is routed after PREROUTING
/// (kube-proxy's DNAT, and the un-SNAT of a reply, are done) and before
/// POSTROUTING (its masquerade, and the un-DNAT of a reply, are not), so with
/// the destination `dst` (the backend, or the client) and the source `src`
/// (the client, or the backend), coming in on `iif`, where packets from
/// `src` come in (the interface to it, as symmetric routing and `rp_filter`
/// expect). Policy rules on the source (source-based tables, as the AWS VPC
/// CNI adds for pods on secondary ENIs) then choose the same interface as
/// they did. If that lookup fails (a source the kernel refuses on that
/// interface), `by_dst`: the route by destination only.
async fn flow_route(dp: &mut Datapath, dst: IpAddr, src: IpAddr, by_dst: (u32, IpAddr), iif: u32) -> (u32, IpAddr) {
    if dst.is_ipv4() != src.is_ipv4() {
        return by_dst;
    }
    match dp.route_from(dst, src, iif).await {
        Ok(r) => {
            if r != by_dst {
                tracing::debug!(%dst, %src, iif, oif = r.0, "policy routing sends the pinned flow another way than its destination's route");
            }
            r
        }
        Err(e) => {
            tracing::debug!(error = %e, %dst, %src, iif, "routing as a forwarded packet failed; by destination only");
            by_dst
        }
    }
}

fn wire_key(proto: u8, src: SocketAddr, dst: SocketAddr) -> WireKey {
    WireKey {
        src: datapath::ip_bytes(src.ip()),
        dst: datapath::ip_bytes(dst.ip()),
        sport: src.port(),
        dport: dst.port(),
        proto,
        family: if src.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 },
        _pad: [0; 2],
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
        IpAddr::V4(_) => a,
    }
}

impl Steering {
    #[must_use]
    pub fn has_backends(&self) -> bool {
        !self.backends.is_empty()
    }

    /// The terminating backends whose flows to learn now: those that started
    /// terminating less than [`LEARN_FAST_NS`] ago, or with `all`, every one.
    #[must_use]
    pub fn backends_to_learn(&self, now: u64, all: bool) -> Vec<IpAddr> {
        self.backends
            .iter()
            .filter(|(_, b)| all || now.saturating_sub(b.since_ns) < LEARN_FAST_NS)
            .map(|(ip, _)| *ip)
            .collect()
    }

    pub fn pinned(&self) -> usize {
        self.pins.len()
    }

    /// Goes up with every change to the saved state.
    #[must_use]
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Starts pinning the flows of `ips` (a terminating pod) until `deadline_ns`.
    pub fn add_backend(&mut self, pod: &str, ips: &[IpAddr], deadline_ns: u64, now: u64) {
        for ip in ips {
            let since_ns = self.backends.get(ip).map_or(now, |b| b.since_ns);
            self.backends.insert(*ip, Backend { pod: pod.to_owned(), deadline_ns, since_ns });
        }
        self.changes += 1;
    }

    /// The pod is gone: its pinned TCP flows get a RST on their next segment.
    pub fn mark_dead(&mut self, dp: &mut Datapath, ips: &[IpAddr], now: u64) {
        for ip in ips {
            if self.backends.remove(ip).is_some() {
                self.changes += 1;
            }
        }
        for (fwd, p) in &mut self.pins {
            if ips.contains(&p.backend_ip) && p.dead_ns.is_none() {
                self.changes += 1;
                p.dead_ns = Some(now);
                p.view.dead = true;
                if let Some(mut pin) = dp.pin(fwd) {
                    pin.flags |= pin_flags::DEAD;
                    if let Err(e) = dp.pin_update(fwd, &pin) {
                        tracing::warn!(error = %e, "marking pin dead");
                    }
                }
            }
        }
    }

    /// Pins every live, translated flow of a terminating backend not pinned
    /// yet, except flows a process of this node opened (`node_addrs`: the
    /// node's own addresses), see [`pinnable`].
    pub async fn apply(&mut self, dp: &mut Datapath, translations: &[Translation], node_addrs: &[IpAddr], now: u64) {
        for t in translations {
            let backend_ip = canonical(t.reply_src).ip();
            let Some(b) = self.backends.get(&backend_ip) else { continue };
            if now >= b.deadline_ns || !pinnable(t, node_addrs) {
                continue;
            }
            let fwd = wire_key(t.proto, t.orig_src, t.orig_dst);
            if self.pins.contains_key(&fwd) {
                continue;
            }
            let rev = wire_key(t.proto, t.reply_src, t.reply_dst);
            let (pod, deadline_ns) = (b.pod.clone(), b.deadline_ns);
            if let Err(e) = self.pin(dp, t, fwd, rev, now).await {
                if self.unpinnable.len() >= MAX_PINS as usize {
                    self.unpinnable.clear();
                }
                if self.unpinnable.insert(fwd) {
                    tracing::warn!(error = %e, flow = ?t, "cannot pin flow (retried every second, logged once)");
                } else {
                    tracing::debug!(error = %e, flow = ?t, "cannot pin flow");
                }
                continue;
            }
            self.unpinnable.remove(&fwd);
            let view = PinView::of(t, pod, false);
            tracing::info!(client = %view.client, frontend = %view.frontend, backend = %view.backend, "pinned flow");
            self.changes += 1;
            self.by_rev.insert(rev, fwd);
            self.pins.insert(
                fwd,
                Pinned {
                    rev,
                    translation: t.clone(),
                    view,
                    backend_ip,
                    deadline_ns,
                    pinned_ns: now,
                    closed_ns: None,
                    dead_ns: None,
                    ct_forgotten: false,
                },
            );
        }
    }

    async fn pin(
        &mut self,
        dp: &mut Datapath,
        t: &Translation,
        fwd: WireKey,
        rev: WireKey,
        now: u64,
    ) -> Result<(), crate::error::Error> {
        dp.attach_everywhere()?;
        let (backend, client) = (t.reply_src.ip(), t.orig_src.ip());
        let (by_backend, by_client) = (dp.route(backend).await?, dp.route(client).await?);
        let (to_backend, backend_nh) = flow_route(dp, backend, client, by_backend, by_client.0).await;
        let (to_client, client_nh) = flow_route(dp, client, backend, by_client, by_backend.0).await;
        let forward = Pin {
            new_src: datapath::ip_bytes(t.reply_dst.ip()),
            new_dst: datapath::ip_bytes(t.reply_src.ip()),
            new_sport: t.reply_dst.port(),
            new_dport: t.reply_src.port(),
            ifindex: to_backend,
            nexthop: datapath::ip_bytes(backend_nh),
            last_seen_ns: now,
            ..Pin::default()
        };
        let reverse = Pin {
            new_src: datapath::ip_bytes(t.orig_dst.ip()),
            new_dst: datapath::ip_bytes(t.orig_src.ip()),
            new_sport: t.orig_dst.port(),
            new_dport: t.orig_src.port(),
            ifindex: to_client,
            nexthop: datapath::ip_bytes(client_nh),
            last_seen_ns: now,
            ..Pin::default()
        };
        // Reverse first: once the forward entry exists, replies must already be handled.
        dp.pin_insert(&rev, &reverse)?;
        if let Err(e) = dp.pin_insert(&fwd, &forward) {
            dp.pin_remove(&rev);
            return Err(e);
        }
        Ok(())
    }

    /// Releases pins whose flow closed, went idle (UDP), or whose pod is gone;
    /// forgets backends past their deadline (no new flow of theirs is pinned).
    /// A live flow stays pinned past its backend's deadline, until its pod is
    /// gone: kube-proxy's conntrack entry saw none of its packets since the
    /// pin, so its TCP window is stale, and released, the flow's next
    /// segments (the final FIN or RST too) would be dropped as INVALID and
    /// the client would hang. Only a pod never seen gone (a missed delete, a
    /// standalone pod never removed) lets a pin outlive its deadline by more
    /// than `pin_limit_ns`: then it is released, as before this rule.
    /// Returns the flows that are over (closed, without a pod, or released
    /// idle), whose conntrack entries are stale: for [`crate::conntrack::forget_translations`].
    #[must_use = "the stale conntrack entries of finished flows are to be forgotten"]
    pub fn sweep(&mut self, dp: &mut Datapath, now: u64, udp_timeout_ns: u64, pin_limit_ns: u64) -> Vec<Translation> {
        let before = self.backends.len();
        self.backends.retain(|_, b| now < b.deadline_ns);
        if self.backends.len() != before {
            self.changes += 1;
        }
        let mut release = Vec::new();
        let mut over = Vec::new();
        for (fwd, p) in &mut self.pins {
            let Some(f) = dp.pin(fwd) else {
                // The programs dropped it: a new connection (a pure SYN)
                // reused the tuple. Its conntrack entry is the new one's now.
                tracing::info!(client = %p.view.client, backend = %p.view.backend, why = "tuple reused", "released pinned flow");
                release.push((*fwd, false));
                continue;
            };
            let r = dp.pin(&p.rev).unwrap_or_default();
            let last = f.last_seen_ns.max(r.last_seen_ns).max(p.pinned_ns);
            let closed = (f.flags & r.flags & pin_flags::FIN != 0) || ((f.flags | r.flags) & pin_flags::RST != 0);
            if closed && p.closed_ns.is_none() {
                p.closed_ns = Some(now);
                self.changes += 1;
            }
            // Stale from the moment the flow is over (closed, or its pod
            // gone), not only once the pin lingered out: a new connection
            // that reuses the tuple meanwhile must not follow it.
            if !p.ct_forgotten && (p.closed_ns.is_some() || p.dead_ns.is_some()) {
                p.ct_forgotten = true;
                over.push(p.translation.clone());
            }
            let why = if p.closed_ns.is_some_and(|c| now >= c + LINGER_NS) {
                Some("closed")
            } else if fwd.proto == PROTO_UDP && now.saturating_sub(last) > udp_timeout_ns {
                Some("idle")
            } else if p.dead_ns.is_none() && now >= p.deadline_ns.saturating_add(pin_limit_ns) {
                Some("pin limit")
            } else if p.dead_ns.is_some_and(|d| now >= d + DEAD_LINGER_NS) {
                Some("pod gone")
            } else {
                None
            };
            if let Some(why) = why {
                tracing::info!(client = %p.view.client, backend = %p.view.backend, why, "released pinned flow");
                // Closed and dead flows were forgotten above; one released
                // at the pin limit may still be alive: its entry keeps sending
                // it to the old backend, as without us (stale window and all).
                release.push((*fwd, why == "idle"));
            }
        }
        for (fwd, idle) in release {
            if let Some(p) = self.pins.remove(&fwd) {
                self.changes += 1;
                self.by_rev.remove(&p.rev);
                dp.pin_remove(&fwd);
                dp.pin_remove(&p.rev);
                if idle && !p.ct_forgotten {
                    over.push(p.translation);
                }
            }
        }
        dp.note_pins_gone();
        over
    }

    /// The pin of a flow seen from its pod's side (pod → peer is the reverse direction).
    #[must_use]
    pub fn for_pod_flow(&self, pod: SocketAddr, peer: SocketAddr, proto: u8) -> Option<&PinView> {
        let rev = wire_key(proto, pod, peer);
        self.by_rev.get(&rev).and_then(|f| self.pins.get(f)).map(|p| &p.view)
    }

    pub fn views(&self) -> Vec<PinView> {
        let mut v: Vec<PinView> = self.pins.values().map(|p| p.view.clone()).collect();
        v.sort_by(|a, b| (&a.pod, &a.client).cmp(&(&b.pod, &b.client)));
        v
    }

    /// The state to persist (times are `CLOCK_MONOTONIC` ns, valid until a reboot).
    #[must_use]
    pub fn save(&self) -> SavedSteering {
        let mut backends: Vec<SavedBackend> = self
            .backends
            .iter()
            .map(|(ip, b)| SavedBackend { ip: *ip, pod: b.pod.clone(), deadline_ns: b.deadline_ns })
            .collect();
        backends.sort_by_key(|b| b.ip);
        let mut pins: Vec<SavedPin> = self
            .pins
            .values()
            .map(|p| SavedPin {
                translation: p.translation.clone(),
                view: p.view.clone(),
                deadline_ns: p.deadline_ns,
                pinned_ns: p.pinned_ns,
                closed_ns: p.closed_ns,
                dead_ns: p.dead_ns,
            })
            .collect();
        pins.sort_by(|a, b| (&a.view.pod, &a.view.client).cmp(&(&b.view.pod, &b.view.client)));
        SavedSteering { backends, pins }
    }

    /// Takes back a saved state at start. The pinned `PINS` map is the truth
    /// for which flows are pinned: a saved pin missing from it (the map is
    /// new: first start with `--bpffs`, or a layout change) is written again;
    /// an entry the state does not know (we were killed between writing it
    /// and saving) is adopted when its backend is known, else removed.
    pub async fn restore(saved: SavedSteering, dp: &mut Datapath, now: u64) -> Self {
        let mut s = Self::default();
        for b in saved.backends {
            // Learned every second again for a while: what happened while no agent ran is unknown.
            s.backends.insert(b.ip, Backend { pod: b.pod, deadline_ns: b.deadline_ns, since_ns: now });
        }
        let mut rewritten = 0;
        for p in saved.pins {
            let t = p.translation;
            let fwd = wire_key(t.proto, t.orig_src, t.orig_dst);
            let rev = wire_key(t.proto, t.reply_src, t.reply_dst);
            if dp.pin(&fwd).is_none() || dp.pin(&rev).is_none() {
                // Seen now: when it last carried a packet is unknown (the old
                // map is gone), and its idle clock must not start in the past.
                if let Err(e) = s.pin(dp, &t, fwd, rev, now).await {
                    tracing::warn!(error = %e, client = %p.view.client, "cannot pin a saved flow again; it is dropped");
                    continue;
                }
                if p.dead_ns.is_some()
                    && let Some(mut pin) = dp.pin(&fwd)
                {
                    pin.flags |= pin_flags::DEAD;
                    let _ = dp.pin_insert(&fwd, &pin);
                }
                rewritten += 1;
            }
            s.by_rev.insert(rev, fwd);
            let backend_ip = canonical(t.reply_src).ip();
            s.pins.insert(
                fwd,
                Pinned {
                    rev,
                    translation: t,
                    view: p.view,
                    backend_ip,
                    deadline_ns: p.deadline_ns,
                    pinned_ns: p.pinned_ns,
                    closed_ns: p.closed_ns,
                    dead_ns: p.dead_ns,
                    ct_forgotten: false,
                },
            );
        }
        let (adopted, removed) = s.adopt_unsaved(dp, now);
        s.changes = 1;
        if rewritten + adopted + removed > 0 {
            tracing::info!(
                rewritten,
                adopted,
                removed,
                "pinned flows reconciled with the PINS map (rewritten: saved but missing from the map; \
                 adopted: in the map but not saved; removed: in the map with no known backend)"
            );
        }
        s
    }

    /// The `PINS` entries the saved state does not know: adopted as forward
    /// entries when their backend is known and their reverse entry is there,
    /// else removed (they would steer forever). Returns (adopted, removed).
    fn adopt_unsaved(&mut self, dp: &mut Datapath, now: u64) -> (usize, usize) {
        let (mut adopted, mut removed) = (0, 0);
        let entries = dp.all_pins();
        let present: std::collections::HashSet<WireKey> = entries.iter().map(|(k, _)| *k).collect();
        for (key, pin) in &entries {
            if self.pins.contains_key(key) || self.by_rev.contains_key(key) {
                continue;
            }
            // Read as a forward entry: client → frontend, rewritten to snat-or-client → backend.
            let ip = |b| datapath::ip_from_bytes(b, key.family);
            let t = Translation {
                proto: key.proto,
                orig_src: SocketAddr::new(ip(key.src), key.sport),
                orig_dst: SocketAddr::new(ip(key.dst), key.dport),
                reply_src: SocketAddr::new(ip(pin.new_dst), pin.new_dport),
                reply_dst: SocketAddr::new(ip(pin.new_src), pin.new_sport),
                live: true,
            };
            let backend_ip = canonical(t.reply_src).ip();
            let rev = wire_key(t.proto, t.reply_src, t.reply_dst);
            let Some(b) = self.backends.get(&backend_ip) else { continue };
            if !present.contains(&rev) {
                continue;
            }
            let view = PinView::of(&t, b.pod.clone(), pin.flags & pin_flags::DEAD != 0);
            let deadline_ns = b.deadline_ns;
            self.by_rev.insert(rev, *key);
            self.pins.insert(
                *key,
                Pinned {
                    rev,
                    translation: t,
                    view,
                    backend_ip,
                    deadline_ns,
                    pinned_ns: now,
                    closed_ns: None,
                    dead_ns: (pin.flags & pin_flags::DEAD != 0).then_some(now),
                    ct_forgotten: false,
                },
            );
            adopted += 1;
        }
        for (key, _) in &entries {
            if !self.pins.contains_key(key) && !self.by_rev.contains_key(key) {
                dp.pin_remove(key);
                removed += 1;
            }
        }
        (adopted, removed)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SavedSteering {
    pub backends: Vec<SavedBackend>,
    pub pins: Vec<SavedPin>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedBackend {
    pub ip: IpAddr,
    pub pod: String,
    pub deadline_ns: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedPin {
    pub translation: Translation,
    pub view: PinView,
    pub deadline_ns: u64,
    pub pinned_ns: u64,
    pub closed_ns: Option<u64>,
    pub dead_ns: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(orig_src: &str, orig_dst: &str, reply_src: &str, reply_dst: &str, live: bool) -> Translation {
        Translation {
            proto: PROTO_TCP,
            orig_src: orig_src.parse().unwrap(),
            orig_dst: orig_dst.parse().unwrap(),
            reply_src: reply_src.parse().unwrap(),
            reply_dst: reply_dst.parse().unwrap(),
            live,
        }
    }

    /// Node A of the steering tests: uplink, inter-node link, pod gateway.
    fn node() -> Vec<IpAddr> {
        ["172.18.0.10", "172.19.0.1", "10.244.1.1", "fd00:18::10", "127.0.0.1"].map(|a| a.parse().unwrap()).to_vec()
    }

    #[test]
    fn a_peers_flow_through_a_service_is_pinnable() {
        let clusterip = t("172.18.0.2:44910", "10.96.0.10:80", "10.244.1.2:8080", "172.18.0.2:44910", true);
        assert!(pinnable(&clusterip, &node()));
        // A NodePort masqueraded to the node's own address: the SNAT side is the node, the client is not.
        let nodeport = t("172.18.0.2:42302", "172.18.0.10:30080", "10.244.2.2:8080", "172.19.0.1:54505", true);
        assert!(pinnable(&nodeport, &node()));
    }

    #[test]
    fn a_flow_the_node_itself_opened_is_not_pinnable() {
        for client in ["172.18.0.10:40000", "10.244.1.1:40000", "127.0.0.1:40000"] {
            let flow = t(client, "10.96.0.10:80", "10.244.1.2:8080", client, true);
            assert!(!pinnable(&flow, &node()), "{client}");
        }
        let v6 = t("[fd00:18::10]:40000", "[fd00:96::10]:80", "[fd00:244:1::2]:8080", "[fd00:18::10]:40000", true);
        assert!(!pinnable(&v6, &node()));
        // As conntrack may report IPv4 in an IPv4-mapped form.
        let mapped = t(
            "[::ffff:172.18.0.10]:40000",
            "[::ffff:10.96.0.10]:80",
            "[::ffff:10.244.1.2]:8080",
            "[::ffff:172.18.0.10]:40000",
            true,
        );
        assert!(!pinnable(&mapped, &node()));
    }

    #[test]
    fn untranslated_or_finished_flows_are_not_pinnable() {
        let direct = t("172.18.0.2:44910", "10.244.1.2:8080", "10.244.1.2:8080", "172.18.0.2:44910", true);
        assert!(!pinnable(&direct, &node()));
        let closed = t("172.18.0.2:44910", "10.96.0.10:80", "10.244.1.2:8080", "172.18.0.2:44910", false);
        assert!(!pinnable(&closed, &node()));
    }
}
