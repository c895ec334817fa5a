//! Learning: which conntrack entries of a terminating backend to pin, and
//! writing their two `PINS` entries (one per direction) from the kernel's
//! own translation and the routes netfilter's path would have taken.

use std::net::{IpAddr, SocketAddr};

use conndrain_common::{MAX_PINS, Pin, WireKey};

use super::{PinDatapath, PinnedFlow, Steering, Translation, canonical, wire_key};
use crate::datapath;

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
async fn flow_route(
    dp: &mut impl PinDatapath,
    dst: IpAddr,
    src: IpAddr,
    by_dst: (u32, IpAddr),
    iif: u32,
) -> (u32, IpAddr) {
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

impl Steering {
    /// Pins every live, translated flow of a terminating backend not pinned
    /// yet, except flows a process of this node opened (`node_addrs`: the
    /// node's own addresses), see [`pinnable`].
    pub async fn apply(
        &mut self,
        dp: &mut impl PinDatapath,
        translations: &[Translation],
        node_addrs: &[IpAddr],
        now: u64,
    ) {
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
            if let Err(e) = write_pin(dp, t, fwd, rev, now).await {
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
            let pinned = PinnedFlow::new(rev, t.clone(), pod, deadline_ns, now);
            tracing::info!(client = %pinned.client(), frontend = %pinned.frontend(), backend = %pinned.backend(), "pinned flow");
            self.changes += 1;
            self.by_rev.insert(rev, fwd);
            self.pins.insert(fwd, pinned);
        }
    }
}

/// Writes the two `PINS` entries of `t`: `fwd` (client → frontend, rewritten
/// to snat-or-client → backend) and `rev` (the backend's replies, rewritten
/// back to frontend → client).
pub(super) async fn write_pin(
    dp: &mut impl PinDatapath,
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
