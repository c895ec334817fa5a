//! Who may read `/metrics`: where its listener binds (`--metrics-bind-address`,
//! like kube-proxy's) and which callers it answers (`--metrics-allow`). The
//! same rule holds for every caller, a pod on this node as much as one on
//! another node: the metrics name pods and count their flows, which any
//! scraper allowed here may read, so the policy says who that is.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

/// `IP` or `IP:PORT` (`[IPv6]:PORT`); without a port, `--metrics-port` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindAddress {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl BindAddress {
    #[must_use]
    pub fn with_default_port(self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, self.port.unwrap_or(port))
    }
}

impl FromStr for BindAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self { ip, port: None });
        }
        let bare = s.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(Self { ip, port: None });
        }
        s.parse::<SocketAddr>().map(|a| Self { ip: a.ip(), port: Some(a.port()) }).map_err(|_| {
            format!("{s:?} is not an address to listen on: IP or IP:PORT, e.g. 0.0.0.0:9465, [::]:9465 or 10.0.0.5")
        })
    }
}

/// A network, `ADDRESS/PREFIX`; a bare address is a network of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        let same = |net: u128, ip: u128, width: u32| {
            let host_bits = width - u32::from(self.prefix);
            // A prefix of 0 on IPv6 shifts by all 128 bits: nothing is left to compare.
            net.checked_shr(host_bits).unwrap_or(0) == ip.checked_shr(host_bits).unwrap_or(0)
        };
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => same(u32::from(net).into(), u32::from(ip).into(), 32),
            (IpAddr::V6(net), IpAddr::V6(ip)) => same(net.into(), ip.into(), 128),
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a network: ADDRESS/PREFIX, e.g. 10.0.0.0/8 or fd00::/8");
        let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() { width } else { prefix.parse::<u8>().map_err(|_| bad())? };
        if prefix > width {
            return Err(format!(
                "{s:?}: a prefix of an IPv{} address is at most {width}",
                if width == 32 { 4 } else { 6 }
            ));
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The callers `/metrics` answers: those in one of these networks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsAllow(Vec<Cidr>);

impl MetricsAllow {
    #[must_use]
    pub fn allows(&self, caller: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(caller))
    }
}

impl FromStr for MetricsAllow {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let nets =
            s.split(',').map(str::trim).filter(|n| !n.is_empty()).map(Cidr::from_str).collect::<Result<Vec<_>, _>>()?;
        if nets.is_empty() {
            return Err("no network: list at least one (0.0.0.0/0,::/0 for every caller)".to_owned());
        }
        Ok(Self(nets))
    }
}

impl fmt::Display for MetricsAllow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nets: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&nets.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(s: &str) -> MetricsAllow {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_contain_their_addresses_and_nothing_else() {
        let a = allow("10.244.1.0/24, 192.168.0.7, fd00:10::/64");
        for yes in ["10.244.1.0", "10.244.1.255", "192.168.0.7", "fd00:10::1", "::ffff:10.244.1.9"] {
            assert!(a.allows(ip(yes)), "{yes}");
        }
        for no in ["10.244.2.1", "192.168.0.8", "fd00:11::1", "::1", "127.0.0.1"] {
            assert!(!a.allows(ip(no)), "{no}");
        }
    }

    #[test]
    fn the_default_allows_every_caller() {
        let a = allow("0.0.0.0/0,::/0");
        for any in ["10.0.0.1", "255.255.255.255", "::1", "fd00::1", "::ffff:1.2.3.4"] {
            assert!(a.allows(ip(any)), "{any}");
        }
        assert_eq!(a.to_string(), "0.0.0.0/0,::/0");
        assert!(!allow("0.0.0.0/0").allows(ip("fd00::1")), "an IPv4 network holds no IPv6 caller");
    }

    #[test]
    fn bad_networks_say_what_is_wrong() {
        for bad in ["", " , ", "10.0.0.0/33", "fd00::/129", "10.0.0/8", "10.0.0.0/x", "any"] {
            assert!(bad.parse::<MetricsAllow>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bind_addresses_like_kube_proxys() {
        let b = |s: &str| s.parse::<BindAddress>().unwrap().with_default_port(9465).to_string();
        assert_eq!(b("0.0.0.0:10249"), "0.0.0.0:10249");
        assert_eq!(b("127.0.0.1"), "127.0.0.1:9465");
        assert_eq!(b("::"), "[::]:9465");
        assert_eq!(b("[::]"), "[::]:9465");
        assert_eq!(b("[fd00::1]:80"), "[fd00::1]:80");
        assert!("localhost:9465".parse::<BindAddress>().is_err());
    }
}
