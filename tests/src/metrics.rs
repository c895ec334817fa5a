//! Reading the agent's `/metrics` as a scraper would.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
};

use anyhow::{Context as _, Result};

use crate::{Netns, TIMEOUT, run_in};

/// `GET path` from inside `ns`, as (status code, body).
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let path = path.to_owned();
    run_in(ns, move || -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let code = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("an HTTP status line in {resp:?}"))?;
        let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        Ok((code, body))
    })?
}

/// The metrics page at `addr`, read from inside `ns`; an error unless 200.
pub fn scrape(ns: &Netns, addr: SocketAddr) -> Result<String> {
    let (code, body) = http_get(ns, addr, "/metrics")?;
    anyhow::ensure!(code == 200, "GET /metrics from {}: {code} {body}", ns.name());
    Ok(body)
}

/// The value of one series in a metrics page: `name` alone, or with its
/// labels as the agent writes them (`name{outcome="drained"}`).
#[must_use]
pub fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}
