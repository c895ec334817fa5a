//! `conndrain status`: what the agent found and attached.

use super::{Format, print_data};
use crate::api::{Status, client::Client};

pub async fn run(client: &Client, output: Format) -> anyhow::Result<()> {
    let s: Status = client.get("/v1/status").await?;
    if let Some(data) = output.data() {
        return print_data(&s, data);
    }
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!("conndrain {} ({} mode)", s.version, s.mode);
    println!(
        "kernel:      {} (BTF: {}, tcx: {}, steering: {}); attach mode: {:?}",
        s.kernel.release,
        yes(s.kernel.btf),
        yes(s.kernel.tcx),
        yes(s.kernel.steering),
        s.attach_mode
    );
    if let Some(line) = s.kernel.steering_off() {
        println!("steering:    off ({line})");
    }
    println!(
        "privileges:  CAP_BPF {}, CAP_NET_ADMIN {}, CAP_PERFMON {}",
        yes(s.kernel.cap_bpf),
        yes(s.kernel.cap_net_admin),
        yes(s.kernel.cap_perfmon)
    );
    if s.interfaces.is_empty() {
        println!("interfaces:  none yet (attached when a pod is added)");
    }
    for i in &s.interfaces {
        println!("interface:   {} (ifindex {}), {} pod(s), ingress+egress", i.name, i.ifindex, i.pods);
    }
    println!(
        "flow table:  {} entries; {} flows known to the agent (from events, not a count of the table)",
        s.maps.flows.max, s.maps.flows.used
    );
    println!(
        "held flows:  {} / {} entries at the last sweep (draining pods' flows, never evicted; {} held so far, {} found no room)",
        s.maps.held.used, s.maps.held.max, s.stats.held, s.stats.hold_failed
    );
    println!("pods:        {} / {}", s.maps.pods.used, s.maps.pods.max);
    println!(
        "datapath:    {} packets, {} not parsed (passed), {} of no pod, {} flows created, {} inserts failed",
        s.stats.packets, s.stats.unparsed, s.stats.not_pod, s.stats.flows_created, s.stats.insert_failed
    );
    println!("evictions:   {} live flows evicted from the flow table", s.stats.flows_evicted);
    println!("events:      {} received, {} lost", s.events_received, s.events_lost);
    println!(
        "steering:    {} pinned flows, {} packets steered, {} resets sent, {} not steerable",
        s.steering.pinned_flows, s.steering.steered_packets, s.steering.resets_sent, s.steering.steer_failed
    );
    for p in &s.steering.pins {
        println!(
            "  pinned {} {} -> {} => {} ({}){}",
            p.proto,
            p.client,
            p.frontend,
            p.backend,
            p.pod,
            if p.dead { ", pod gone: answering with RST" } else { "" }
        );
    }
    println!("timeouts:    idle keep-alive {}s, UDP {}s", s.idle_timeout_secs, s.udp_timeout_secs);
    Ok(())
}
