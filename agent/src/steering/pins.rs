//! The pin state machine: a pinned flow (its translation, pod and state)
//! from pinned to released, as [`Steering::mark_dead`] and
//! [`Steering::sweep`] move it.

use std::net::{IpAddr, SocketAddr};

use conndrain_common::{PROTO_UDP, WireKey, pin_flags};

use super::{PinDatapath, Steering, Translation, canonical};

/// A pinned flow, as the agent keeps it.
#[derive(Clone, Debug)]
pub struct PinnedFlow {
    pub(super) rev: WireKey,
    /// What the pin was made from: enough to make it again.
    pub(super) translation: Translation,
    pub(super) pod: String,
    pub(super) backend_ip: IpAddr,
    pub(super) deadline_ns: u64,
    pub(super) pinned_ns: u64,
    pub(super) closed_ns: Option<u64>,
    pub(super) dead_ns: Option<u64>,
    /// Its conntrack entry was deleted (the flow is over).
    pub(super) ct_forgotten: bool,
}

impl PinnedFlow {
    pub(super) fn new(rev: WireKey, translation: Translation, pod: String, deadline_ns: u64, now: u64) -> Self {
        Self {
            rev,
            backend_ip: canonical(translation.reply_src).ip(),
            translation,
            pod,
            deadline_ns,
            pinned_ns: now,
            closed_ns: None,
            dead_ns: None,
            ct_forgotten: false,
        }
    }

    #[must_use]
    pub fn translation(&self) -> &Translation {
        &self.translation
    }

    /// The terminating pod the flow is pinned to.
    #[must_use]
    pub fn pod(&self) -> &str {
        &self.pod
    }

    /// Its pod is gone (TCP segments are answered with a RST).
    #[must_use]
    pub fn dead(&self) -> bool {
        self.dead_ns.is_some()
    }

    #[must_use]
    pub fn client(&self) -> SocketAddr {
        canonical(self.translation.orig_src)
    }

    #[must_use]
    pub fn frontend(&self) -> SocketAddr {
        canonical(self.translation.orig_dst)
    }

    #[must_use]
    pub fn backend(&self) -> SocketAddr {
        canonical(self.translation.reply_src)
    }

    /// The address the backend sees as its peer (the client, or kube-proxy's SNAT address).
    #[must_use]
    pub fn backend_peer(&self) -> SocketAddr {
        canonical(self.translation.reply_dst)
    }
}

/// Why a pin is released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// The programs dropped it: a new connection reused the tuple.
    TupleReused,
    /// FIN both ways or RST, [`LINGER_NS`] ago.
    Closed,
    /// A UDP flow without a packet for the UDP timeout.
    Idle,
    /// Alive `--pin-limit` past its backend's deadline, its pod never seen gone.
    PinLimit,
    /// Its pod is gone, [`DEAD_LINGER_NS`] ago.
    PodGone,
}

impl Release {
    /// As the "released pinned flow" log line says it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TupleReused => "tuple reused",
            Self::Closed => "closed",
            Self::Idle => "idle",
            Self::PinLimit => "pin limit",
            Self::PodGone => "pod gone",
        }
    }
}

/// How long a closed or dead pin lingers: late FIN/ACKs still go the pinned
/// way, and a dead pod's clients still get their RST.
const LINGER_NS: u64 = 2_000_000_000;
const DEAD_LINGER_NS: u64 = 10_000_000_000;

impl Steering {
    /// The pod is gone: its pinned TCP flows get a RST on their next segment.
    pub fn mark_dead(&mut self, dp: &mut impl PinDatapath, ips: &[IpAddr], now: u64) {
        for ip in ips {
            if self.backends.remove(ip).is_some() {
                self.changes += 1;
            }
        }
        for (fwd, p) in &mut self.pins {
            if ips.contains(&p.backend_ip) && p.dead_ns.is_none() {
                self.changes += 1;
                p.dead_ns = Some(now);
                if let Some(mut pin) = dp.pin(fwd) {
                    pin.flags |= pin_flags::DEAD;
                    if let Err(e) = dp.pin_update(fwd, &pin) {
                        tracing::warn!(error = %e, "marking pin dead");
                    }
                }
            }
        }
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
    pub fn sweep(
        &mut self,
        dp: &mut impl PinDatapath,
        now: u64,
        udp_timeout_ns: u64,
        pin_limit_ns: u64,
    ) -> Vec<Translation> {
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
                let why = Release::TupleReused.as_str();
                tracing::info!(client = %p.client(), backend = %p.backend(), why, "released pinned flow");
                release.push((*fwd, Release::TupleReused));
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
                Some(Release::Closed)
            } else if fwd.proto == PROTO_UDP && now.saturating_sub(last) > udp_timeout_ns {
                Some(Release::Idle)
            } else if p.dead_ns.is_none() && now >= p.deadline_ns.saturating_add(pin_limit_ns) {
                Some(Release::PinLimit)
            } else if p.dead_ns.is_some_and(|d| now >= d + DEAD_LINGER_NS) {
                Some(Release::PodGone)
            } else {
                None
            };
            if let Some(why) = why {
                tracing::info!(client = %p.client(), backend = %p.backend(), why = why.as_str(), "released pinned flow");
                // Closed and dead flows were forgotten above; one released
                // at the pin limit may still be alive: its entry keeps sending
                // it to the old backend, as without us (stale window and all).
                release.push((*fwd, why));
            }
        }
        for (fwd, why) in release {
            if let Some(p) = self.pins.remove(&fwd) {
                self.changes += 1;
                self.by_rev.remove(&p.rev);
                dp.pin_remove(&fwd);
                dp.pin_remove(&p.rev);
                if why == Release::Idle && !p.ct_forgotten {
                    over.push(p.translation);
                }
            }
        }
        dp.note_pins_gone();
        over
    }
}
