//! Packets per second of small UDP datagrams over many flows, for the live
//! section: where a TCP stream hands the programs 64 KiB GSO/GRO
//! super-packets, here every packet of the wire is one program run.
//!
//! A Rust sender in the client namespace writes `PAYLOAD`-byte datagrams
//! round-robin over `FLOWS` connected sockets (one source port, so one flow,
//! each) as fast as it can; the pod has a socket bound to the port that never
//! reads (datagrams past its buffer are dropped there, without an ICMP
//! answer). Counted: the packets the pod's interface received, i.e. what came
//! through the node's forwarding and the programs on the pod's veth.

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use conndrain_tests::{Netns, Pod, run_in};
use serde_json::Value;

/// Distinct source ports, so distinct flows.
pub const FLOWS: usize = 256;
/// Bytes of UDP payload (`iperf3 -u -l 64` sends as much).
pub const PAYLOAD: usize = 64;
const PORT: u16 = 5301;

/// The sender's sockets and the pod's sink.
pub struct Blaster {
    senders: Vec<UdpSocket>,
    _sink: UdpSocket,
}

impl Blaster {
    pub fn new(client: &Netns, pod: &Pod) -> Result<Self> {
        let to = pod.addr_v4(PORT);
        let sink = run_in(pod.ns(), || UdpSocket::bind(to))?.with_context(|| format!("binding {to} in the pod"))?;
        let senders = run_in(client, || -> std::io::Result<Vec<UdpSocket>> {
            (0..FLOWS)
                .map(|_| {
                    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
                    s.connect(to)?;
                    Ok(s)
                })
                .collect()
        })?
        .context("making the sender's UDP sockets")?;
        Ok(Self { senders, _sink: sink })
    }

    /// Sends for `secs` seconds: packets per second received by the pod.
    pub fn run(&self, pod: &Pod, secs: u32) -> Result<f64> {
        let payload = [b'x'; PAYLOAD];
        // Warm-up, and every flow created before the count starts.
        for s in &self.senders {
            let _ = s.send(&payload);
        }
        let before = rx_packets(pod)?;
        let (start, until) = (Instant::now(), Duration::from_secs(secs.into()));
        'send: loop {
            for _ in 0..16 {
                for s in &self.senders {
                    // ENOBUFS and the like: the packet is not counted by the pod.
                    let _ = s.send(&payload);
                }
            }
            if start.elapsed() >= until {
                break 'send;
            }
            crate::check_interrupted()?;
        }
        let wall = start.elapsed();
        let received = rx_packets(pod)?.saturating_sub(before);
        Ok(received as f64 / wall.as_secs_f64())
    }
}

/// Packets received so far by the pod's end of its veth.
fn rx_packets(pod: &Pod) -> Result<u64> {
    let out = pod.ns().exec("ip", &["-s", "-j", "link", "show", "dev", pod.pod_if()])?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("ip -s -j link printed {out}"))?;
    v[0]["stats64"]["rx"]["packets"].as_u64().with_context(|| format!("no stats64.rx.packets in {out}"))
}

/// The per-cycle ratios `a[i] / b[i]` (run i of each mode is in the same cycle).
pub fn per_cycle(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).filter(|(_, b)| **b > 0.0).map(|(a, b)| a / b).collect()
}

/// A ratio's median with its spread: `0.98× (0.95–1.01×, IQR 0.97–0.99×)`.
pub fn spread(ratios: &[f64]) -> String {
    if ratios.is_empty() {
        return "–".into();
    }
    let q = |p: f64| crate::report::quantile(&mut ratios.to_vec(), p);
    let (lo, hi) = ratios.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    format!("{:.3}× ({lo:.3}–{hi:.3}×, IQR {:.3}–{:.3}×)", q(0.5), q(0.25), q(0.75))
}
