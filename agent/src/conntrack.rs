//! The kernel's conntrack table over netlink (ctnetlink): the dumps steering
//! learns translations from, and the deletes of finished pinned flows'
//! entries.
//!
//! A dump asks the kernel for the entries of one terminating backend only
//! (`CTA_FILTER` on the reply tuple's source address, Linux 5.8+), so the
//! agent copies and parses a handful of entries instead of the whole table
//! every second while a backend terminates (IPv6 backends: the IPv6 entries,
//! see `dump_translations`): with 100k entries that is the
//! difference `cargo xtask bench` measures (BENCHMARKS.md, "Steering at
//! scale"). A kernel that does not know the filter ignores it and sends the
//! whole table; the agent notices (an entry of another backend comes back),
//! says so once and dumps the table once per round instead.
//!
//! Messages are built and parsed with netlink-packet-netfilter. The
//! `conntrack` crate, used before, only dumps the whole table.

use std::{
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context as _, Result, bail};
use conndrain_common::{PROTO_TCP, PROTO_UDP};
use netlink_packet_core_09::{
    DefaultNla, NLA_F_NESTED, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple, Protocol, Tuple},
};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_NETFILTER};
use serde::{Deserialize, Serialize};

/// What conntrack says one flow was translated to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Translation {
    pub proto: u8,
    pub orig_src: SocketAddr,
    pub orig_dst: SocketAddr,
    pub reply_src: SocketAddr,
    pub reply_dst: SocketAddr,
    /// TCP established, or any UDP entry.
    pub live: bool,
}

// From linux/netfilter/nfnetlink_conntrack.h (not in netlink-packet-netfilter).
const CTA_FILTER: u16 = 25;
const CTA_FILTER_REPLY_FLAGS: u16 = 2;
const CTA_FILTER_F_CTA_IP_SRC: u32 = 1 << 0;
const TCP_CONNTRACK_ESTABLISHED: u8 = 3;

/// Set once a dump came back unfiltered (a kernel before 5.8): from then on
/// one whole-table dump per round instead of one per backend.
static FILTER_IGNORED: AtomicBool = AtomicBool::new(false);

/// How the table is read: one filtered dump per backend (the default), or
/// the whole table (what the agent did before; kept for the benchmark's
/// baseline and for kernels that ignore the filter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DumpMode {
    Filtered,
    Full,
}

/// The translated flows whose backend (reply source) is one of `backends`.
/// Blocking: run it with `spawn_blocking`.
pub fn dump_translations(backends: &[IpAddr], mode: DumpMode) -> Result<Vec<Translation>> {
    if backends.is_empty() {
        return Ok(Vec::new());
    }
    let mut socket = open()?;
    let of_backend = |t: &Translation| backends.contains(&canonical_ip(t.reply_src.ip()));
    if mode == DumpMode::Full || FILTER_IGNORED.load(Ordering::Relaxed) {
        let mut all = dump(&mut socket, NetfilterProtoFamily::Unspec, None)?;
        all.retain(of_backend);
        return Ok(all);
    }
    let mut out = Vec::new();
    let mut v6 = false;
    for ip in backends {
        let ip = canonical_ip(*ip);
        if ip.is_ipv6() {
            v6 = true;
            continue;
        }
        let got = dump(&mut socket, NetfilterProtoFamily::IPv4, Some(ip))?;
        if got.iter().any(|t| canonical_ip(t.reply_src.ip()) != ip) {
            tracing::info!("this kernel ignores conntrack dump filters (before Linux 5.8): reading the whole table");
            FILTER_IGNORED.store(true, Ordering::Relaxed);
            let mut all = dump(&mut socket, NetfilterProtoFamily::Unspec, None)?;
            all.retain(of_backend);
            return Ok(all);
        }
        out.extend(got);
    }
    if v6 {
        // IPv6 is filtered here, from one dump of the IPv6 entries only: the
        // kernel's IPv6 address filter is inverted (`!ipv6_addr_cmp` skips the
        // entries that match; seen on 6.18), so it would return every entry
        // but the backend's.
        let mut got = dump(&mut socket, NetfilterProtoFamily::IPv6, None)?;
        got.retain(of_backend);
        out.extend(got);
    }
    Ok(out)
}

fn open() -> Result<Socket> {
    let mut socket = Socket::new(NETLINK_NETFILTER).context("opening ctnetlink")?;
    socket.bind_auto().context("binding ctnetlink")?;
    socket.connect(&NlAddr::new(0, 0)).context("connecting ctnetlink")?;
    Ok(socket)
}

fn send(socket: &mut Socket, flags: u16, seq: u32, family: NetfilterProtoFamily, msg: ConntrackMessage) -> Result<()> {
    socket.send(&serialize(flags, seq, family, msg), 0).context("sending to ctnetlink")?;
    Ok(())
}

fn serialize(flags: u16, seq: u32, family: NetfilterProtoFamily, msg: ConntrackMessage) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let body = NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), msg);
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(body));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// One dump: of `family`, and with `reply_src`, only the entries whose
/// reply comes from that address.
fn dump(socket: &mut Socket, family: NetfilterProtoFamily, reply_src: Option<IpAddr>) -> Result<Vec<Translation>> {
    let mut attrs = Vec::new();
    if let Some(ip) = reply_src {
        attrs.push(ConntrackAttribute::CtaTupleReply(vec![Tuple::Ip(vec![IPTuple::SourceAddress(ip)])]));
        // CTA_FILTER { CTA_FILTER_REPLY_FLAGS: u32 }: compare only the reply
        // tuple's source address. Written by hand: the crate has no type for it.
        let mut flags = Vec::with_capacity(8);
        flags.extend_from_slice(&8u16.to_ne_bytes());
        flags.extend_from_slice(&CTA_FILTER_REPLY_FLAGS.to_ne_bytes());
        flags.extend_from_slice(&CTA_FILTER_F_CTA_IP_SRC.to_ne_bytes());
        attrs.push(ConntrackAttribute::Other(DefaultNla::new(CTA_FILTER, flags)));
    }
    let mut msg = serialize(NLM_F_REQUEST | NLM_F_DUMP, 1, family, ConntrackMessage::Get(attrs));
    if reply_src.is_some() {
        // The kernel parses CTA_FILTER strictly, which wants NLA_F_NESTED on it;
        // DefaultNla drops that flag, so set it in place: CTA_FILTER is the
        // message's last attribute, 12 bytes (4 of header, 8 of value).
        let at = msg.len() - 12 + 2;
        let kind = u16::from_ne_bytes([msg[at], msg[at + 1]]) | NLA_F_NESTED;
        msg[at..at + 2].copy_from_slice(&kind.to_ne_bytes());
    }
    socket.send(&msg, 0).context("asking ctnetlink for a dump")?;
    let mut out = Vec::new();
    let mut undecoded = 0usize;
    // Large enough for the biggest message a dump sends (one skb, at most 32 KiB).
    let mut buf = Vec::with_capacity(1 << 16);
    loop {
        buf.clear();
        socket.recv(&mut buf, 0).context("reading a conntrack dump")?;
        let mut off = 0;
        while off + 16 <= buf.len() {
            let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
            if len < 16 || off + len > buf.len() {
                bail!("a truncated netlink message in a conntrack dump ({len} bytes at {off} of {})", buf.len());
            }
            match NetlinkMessage::<NetfilterMessage>::deserialize(&buf[off..off + len]) {
                Ok(msg) => match msg.payload {
                    NetlinkPayload::Done(_) => {
                        if undecoded > 0 {
                            tracing::warn!(undecoded, "conntrack entries that could not be decoded were skipped");
                        }
                        return Ok(out);
                    }
                    NetlinkPayload::Error(e) => {
                        if let Some(code) = e.code {
                            bail!("conntrack dump: {}", std::io::Error::from_raw_os_error(-code.get()));
                        }
                    }
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)),
                        ..
                    }) => out.extend(translation(&attrs)),
                    _ => {}
                },
                Err(_) => undecoded += 1,
            }
            off += (len + 3) & !3;
        }
    }
}

/// A TCP or UDP entry with both tuples complete.
fn translation(attrs: &[ConntrackAttribute]) -> Option<Translation> {
    let (mut orig, mut reply, mut tcp_state) = (None, None, None);
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = tuple(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = tuple(t),
            ConntrackAttribute::CtaProtoInfo(infos) => {
                for info in infos {
                    if let ProtoInfo::TCP(tcp) = info {
                        for t in tcp {
                            if let ProtoInfoTCP::State(s) = t {
                                tcp_state = Some(*s);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let ((proto, orig_src, orig_dst), (_, reply_src, reply_dst)) = (orig?, reply?);
    // Any UDP entry counts: one that has not seen its reply yet is a session
    // starting now, and pinning it costs nothing if it never answers (it goes
    // idle and is released).
    let live = proto == PROTO_UDP || tcp_state == Some(TCP_CONNTRACK_ESTABLISHED);
    Some(Translation { proto, orig_src, orig_dst, reply_src, reply_dst, live })
}

fn tuple(t: &[Tuple]) -> Option<(u8, SocketAddr, SocketAddr)> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, None, None);
    for part in t {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(Protocol::Tcp) => proto = Some(PROTO_TCP),
                        ProtoTuple::Protocol(Protocol::Udp) => proto = Some(PROTO_UDP),
                        ProtoTuple::Protocol(_) => return None,
                        ProtoTuple::SourcePort(p) => sport = Some(*p),
                        ProtoTuple::DestinationPort(p) => dport = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((proto?, SocketAddr::new(src?, sport?), SocketAddr::new(dst?, dport?)))
}

/// IPv4 as IPv4, whichever form it came in.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Deletes the conntrack entries of these flows (by their original tuple).
/// A pinned flow's packets bypass netfilter, so its entry never sees the flow
/// close: it would stay ESTABLISHED for days, fill the table, and send a new
/// connection that reuses the tuple to the old backend. Blocking: run it with
/// `spawn_blocking`. Returns how many entries were deleted (one already gone
/// is no error).
pub fn forget_translations(flows: &[Translation]) -> Result<usize> {
    if flows.is_empty() {
        return Ok(0);
    }
    let mut socket = open()?;
    let mut deleted = 0;
    for (seq, t) in (1u32..).zip(flows) {
        let family = if t.orig_src.is_ipv4() { NetfilterProtoFamily::IPv4 } else { NetfilterProtoFamily::IPv6 };
        let proto = if t.proto == PROTO_TCP { Protocol::Tcp } else { Protocol::Udp };
        let tuple = ConntrackAttribute::CtaTupleOrig(vec![
            Tuple::Ip(vec![IPTuple::SourceAddress(t.orig_src.ip()), IPTuple::DestinationAddress(t.orig_dst.ip())]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(proto),
                ProtoTuple::SourcePort(t.orig_src.port()),
                ProtoTuple::DestinationPort(t.orig_dst.port()),
            ]),
        ]);
        send(&mut socket, NLM_F_REQUEST | NLM_F_ACK, seq, family, ConntrackMessage::Delete(vec![tuple]))
            .context("sending a conntrack delete")?;
        let mut reply = Vec::with_capacity(4096);
        socket.recv(&mut reply, 0).context("reading conntrack's answer")?;
        let reply = NetlinkMessage::<NetfilterMessage>::deserialize(&reply)
            .map_err(|e| anyhow::anyhow!("decoding conntrack's answer: {e}"))?;
        if let NetlinkPayload::Error(e) = reply.payload {
            match e.code {
                None => deleted += 1,
                Some(c) if c.get() == -libc::ENOENT => {}
                Some(c) => bail!(
                    "deleting the conntrack entry of {} -> {}: {}",
                    t.orig_src,
                    t.orig_dst,
                    std::io::Error::from_raw_os_error(-c.get())
                ),
            }
        }
    }
    Ok(deleted)
}

/// Creates conntrack entries for these flows, as if the kernel had
/// translated them (UDP, and TCP `ESTABLISHED`), expiring after `timeout_secs`.
/// The agent never creates entries: the tests and the benchmark fill a
/// network namespace's table with it. Returns how many were created.
pub fn create(flows: &[Translation], timeout_secs: u32) -> Result<usize> {
    let mut socket = open()?;
    let mut reply = Vec::with_capacity(4096);
    for (seq, t) in (1u32..).zip(flows) {
        let p = if t.proto == PROTO_TCP { Protocol::Tcp } else { Protocol::Udp };
        let tuple = |a: SocketAddr, b: SocketAddr| {
            vec![
                Tuple::Ip(vec![IPTuple::SourceAddress(a.ip()), IPTuple::DestinationAddress(b.ip())]),
                Tuple::Proto(vec![
                    ProtoTuple::Protocol(p),
                    ProtoTuple::SourcePort(a.port()),
                    ProtoTuple::DestinationPort(b.port()),
                ]),
            ]
        };
        let mut attrs = vec![
            ConntrackAttribute::CtaTupleOrig(tuple(t.orig_src, t.orig_dst)),
            ConntrackAttribute::CtaTupleReply(tuple(t.reply_src, t.reply_dst)),
            ConntrackAttribute::CtaTimeout(timeout_secs),
        ];
        if t.proto == PROTO_TCP {
            let established = ProtoInfoTCP::State(TCP_CONNTRACK_ESTABLISHED);
            attrs.push(ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![established])]));
        }
        let family = if t.orig_src.is_ipv4() { NetfilterProtoFamily::IPv4 } else { NetfilterProtoFamily::IPv6 };
        send(&mut socket, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE, seq, family, ConntrackMessage::New(attrs))?;
        reply.clear();
        socket.recv(&mut reply, 0).context("reading conntrack's answer")?;
        let reply = NetlinkMessage::<NetfilterMessage>::deserialize(&reply)
            .map_err(|e| anyhow::anyhow!("decoding conntrack's answer: {e}"))?;
        if let NetlinkPayload::Error(e) = reply.payload
            && let Some(c) = e.code
        {
            bail!(
                "creating the conntrack entry of {} -> {}: {}",
                t.orig_src,
                t.orig_dst,
                std::io::Error::from_raw_os_error(-c.get())
            );
        }
    }
    Ok(flows.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    /// On the real kernel, in a network namespace of its own (the thread's):
    /// a filtered dump returns exactly the backend's entries, as the
    /// whole-table dump filtered here does, and the kernel applied the filter.
    #[test]
    fn filtered_dumps_return_exactly_the_backends_entries() {
        assert!(is_root(), "needs root (a network namespace and its conntrack table)");
        std::thread::spawn(|| {
            // SAFETY: plain syscall; it moves this thread only into a new, empty network namespace,
            // which goes away with the thread.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "{}", std::io::Error::last_os_error());
            let mut s = open().expect("ctnetlink");
            let (b1, b2) = (sa("10.244.1.5:8080"), sa("10.244.2.7:8080"));
            let b6 = sa("[fd00:244::5]:8080");
            let t = |proto, src: &str, dst: &str, backend| Translation {
                proto,
                orig_src: sa(src),
                orig_dst: sa(dst),
                reply_src: backend,
                reply_dst: sa(src),
                live: true,
            };
            let mut flows = vec![
                t(PROTO_TCP, "192.0.2.10:40000", "10.96.0.10:80", b1),
                t(PROTO_UDP, "192.0.2.10:40001", "10.96.0.10:53", b1),
                t(PROTO_TCP, "192.0.2.11:40002", "10.96.0.10:80", b2),
                t(PROTO_TCP, "[2001:db8::10]:40003", "[fd00:96::10]:80", b6),
                t(PROTO_TCP, "[2001:db8::11]:40004", "[fd00:96::10]:80", sa("[fd00:244::6]:8080")),
            ];
            for n in 0..50u16 {
                flows.push(t(PROTO_UDP, &format!("192.0.2.20:{}", 30000 + n), "10.96.0.11:53", sa("10.244.3.9:8080")));
            }
            assert_eq!(create(&flows, 600).expect("create"), flows.len());

            let raw = dump(&mut s, NetfilterProtoFamily::IPv4, Some(b1.ip())).expect("filtered dump");
            assert_eq!(raw.len(), 2, "the kernel filters the dump: {raw:?}");
            assert!(raw.iter().all(|t| t.reply_src == b1));

            for mode in [DumpMode::Filtered, DumpMode::Full] {
                let mut got = dump_translations(&[b1.ip(), b6.ip()], mode).expect("dump");
                got.sort_by_key(|t| t.orig_src);
                let srcs: Vec<_> = got.iter().map(|t| (t.orig_src, t.reply_src, t.live)).collect();
                assert_eq!(
                    srcs,
                    [
                        (sa("192.0.2.10:40000"), b1, true),
                        (sa("192.0.2.10:40001"), b1, true),
                        (sa("[2001:db8::10]:40003"), b6, true),
                    ],
                    "{mode:?}"
                );
            }
            assert!(!FILTER_IGNORED.load(Ordering::Relaxed), "this kernel (5.8+) applies the filter");
            assert!(dump_translations(&[], DumpMode::Filtered).expect("no backends").is_empty());
        })
        .join()
        .expect("the test thread");
    }

    fn is_root() -> bool {
        // SAFETY: no arguments, cannot fail.
        unsafe { libc::geteuid() == 0 }
    }
}
