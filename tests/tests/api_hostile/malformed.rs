//! Malformed requests to both APIs: bytes that are not HTTP, broken request
//! lines and headers, oversized heads and bodies, bad paths, queries and JSON
//! bodies; each is refused and the agent keeps serving.

use anyhow::{Context as _, Result, ensure};

use super::{
    METRICS_PORT, Reply, WAIT_PORT, ask, ask_local, healthy, node_addr, pre_stop_drains, setup, still_serving,
};

/// A GET request that closes its connection after the answer.
pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n").into_bytes()
}

/// A POST with a JSON body (`content_type` None: no Content-Type header).
fn post(path: &str, content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let ct = content_type
        .map(|c| format!("Content-Type: {c}\r\n"))
        .unwrap_or_default();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: conndrain\r\n{ct}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

/// One header too big for any request head the agent accepts.
fn huge_header(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: node\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    )
    .into_bytes()
}

/// More header lines than any request head the agent accepts.
fn many_headers(path: &str) -> Vec<u8> {
    let lines = (0..200)
        .map(|i| format!("X-H{i}: {i}"))
        .collect::<Vec<_>>()
        .join("\r\n");
    format!("GET {path} HTTP/1.1\r\nHost: node\r\n{lines}\r\nConnection: close\r\n\r\n").into_bytes()
}

/// A request that announces a body of 100 GB and sends none of it.
fn announced_huge_body(method: &str, path: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: node\r\nContent-Type: application/json\r\nContent-Length: 100000000000\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// What a malformed request must get: any of `codes`, or (`closed_ok`) a
/// closed connection, which is what non-HTTP garbage may get.
struct Case {
    what: &'static str,
    request: Vec<u8>,
    codes: &'static [u16],
    closed_ok: bool,
    /// The JSON error body must contain this.
    says: Option<&'static str>,
}

fn case(what: &'static str, request: impl Into<Vec<u8>>, codes: &'static [u16]) -> Case {
    Case {
        what,
        request: request.into(),
        codes,
        closed_ok: false,
        says: None,
    }
}

impl Case {
    fn or_closed(mut self) -> Self {
        self.closed_ok = true;
        self
    }
    fn saying(mut self, says: &'static str) -> Self {
        self.says = Some(says);
        self
    }
    fn check(&self, reply: &Reply) -> Result<()> {
        let ok = match reply {
            Reply::Closed => self.closed_ok,
            Reply::Http(code, body) => {
                self.codes.contains(code)
                    && self
                        .says
                        .is_none_or(|s| body.contains("\"error\":") && body.contains(s))
            }
        };
        ensure!(
            ok,
            "{}: expected {:?}{}{}, got {reply:?}",
            self.what,
            self.codes,
            if self.closed_ok { " or a closed connection" } else { "" },
            self.says
                .map(|s| format!(" with a JSON error saying {s:?}"))
                .unwrap_or_default()
        );
        Ok(())
    }
}

/// Bytes that are not HTTP at all, the start of a TLS `ClientHello` among them.
fn garbage() -> Vec<Case> {
    vec![
        case(
            "a TLS ClientHello",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00\r\n\r\n".to_vec(),
            &[400],
        )
        .or_closed(),
        case("binary garbage", b"\x00\xff\xfe\x00\x01\x02\r\n\r\n".to_vec(), &[400]).or_closed(),
        case(
            "an HTTP/2 preface without HTTP/2",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            &[400, 505],
        )
        .or_closed(),
        case("a request line without a path", b"GET\r\n\r\n".to_vec(), &[400]),
        case(
            "an unknown HTTP version",
            b"GET / HTTP/7.1\r\nHost: node\r\n\r\n".to_vec(),
            &[400, 505],
        ),
        case(
            "a header line without a colon",
            b"GET / HTTP/1.1\r\nno colon here\r\n\r\n".to_vec(),
            &[400],
        ),
        case(
            "an invalid Content-Length",
            b"GET / HTTP/1.1\r\nHost: node\r\nContent-Length: lots\r\n\r\n".to_vec(),
            &[400],
        ),
    ]
}

#[test]
fn malformed_requests_to_the_node_api_are_refused_and_it_keeps_serving() -> Result<()> {
    let (topo, mut agent, cli) = setup(&["web"], &[])?;
    let web = topo.pod("web");
    let mut cases = garbage();
    cases.extend([
        case(
            "a method that is no HTTP token",
            b"G(T /v1/wait HTTP/1.1\r\nHost: node\r\n\r\n".to_vec(),
            &[400],
        ),
        case(
            "a method /v1/wait does not take",
            b"BREW /v1/wait HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n".to_vec(),
            &[405],
        )
        .saying("this port serves GET /v1/wait"),
        case(
            "DELETE /v1/wait",
            b"DELETE /v1/wait HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n".to_vec(),
            &[405],
        )
        .saying("this port serves GET /v1/wait"),
        case("an unknown path", get("/v1/pods/web/terminate"), &[404]).saying("this port serves GET /v1/wait"),
        case("a path with a bad escape", get("/v1/%zz%00"), &[404]).saying("this port serves GET /v1/wait"),
        case("a header of 64 KiB", huge_header("/v1/wait"), &[431]),
        case("200 header lines", many_headers("/v1/wait"), &[431]),
        case(
            "a 100 GB body announced and not sent",
            announced_huge_body("GET", "/v1/wait"),
            &[413],
        ),
        case("a query string naming nothing", get("/v1/wait?%ff%fe=&&="), &[400]).saying("takes no parameters"),
    ]);
    // From the pod itself: a request that got through would be its own wait.
    for c in &cases {
        c.check(&ask(web.ns(), node_addr(WAIT_PORT), &c.request).with_context(|| c.what)?)?;
    }
    // The metrics listener is served by the same code; a few there too.
    for c in [
        case("an unknown path on the metrics port", get("/v1/wait"), &[404]).saying("serves GET /metrics"),
        case("POST /metrics", post("/metrics", Some("text/plain"), b"x"), &[405]).saying("serves GET /metrics"),
        case(
            "a header of 64 KiB on the metrics port",
            huge_header("/metrics"),
            &[431],
        ),
    ]
    .iter()
    .chain(&garbage())
    {
        c.check(&ask(topo.client(), node_addr(METRICS_PORT), &c.request).with_context(|| c.what)?)?;
    }

    still_serving(&mut agent, &cli)?;
    ensure!(
        !agent.log().contains("preStop wait pod=web"),
        "no malformed request got as far as a wait:\n{}",
        agent.log()
    );
    healthy(&topo)?;
    pre_stop_drains(&cli, web)
}

#[test]
fn malformed_requests_to_the_local_api_are_refused_and_it_keeps_serving() -> Result<()> {
    let (topo, mut agent, cli) = setup(&["web"], &[])?;
    let json = Some("application/json");
    let mut cases = garbage();
    cases.extend([
        case(
            "a method /v1/pods does not take",
            b"PUT /v1/pods HTTP/1.1\r\nHost: c\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            &[405],
        )
        .saying("the local API is for the conndrain CLI"),
        case("an unknown path", get("/v2/everything"), &[404]).saying("the local API is for the conndrain CLI"),
        case("a header of 64 KiB", huge_header("/v1/status"), &[431]),
        case("200 header lines", many_headers("/v1/status"), &[431]),
        case("a body that is not JSON", post("/v1/pods", json, b"{not json"), &[400]),
        case(
            "JSON of the wrong shape",
            post("/v1/pods", json, br#"{"name": 5, "ips": "all"}"#),
            &[422],
        ),
        case(
            "JSON without a Content-Type",
            post("/v1/pods", None, br#"{"name":"x","ips":["10.9.9.9"]}"#),
            &[415],
        ),
        case(
            "an IP that is no IP",
            post("/v1/pods", json, br#"{"name":"x","ips":["10.9.9.300"]}"#),
            &[422],
        ),
        case(
            "a pod name of 10 KiB",
            post(
                "/v1/pods",
                json,
                format!(r#"{{"name":"{}","ips":["10.9.9.9"]}}"#, "a".repeat(10 * 1024)).as_bytes(),
            ),
            &[400],
        ),
        case(
            "a body of 1 MiB",
            post(
                "/v1/pods",
                json,
                format!(r#"{{"name":"x","ips":[],"pad":"{}"}}"#, "a".repeat(1 << 20)).as_bytes(),
            ),
            &[413],
        ),
        case(
            "a 100 GB body announced and not sent",
            announced_huge_body("POST", "/v1/pods/web/terminate"),
            &[413],
        ),
        case(
            "a timeout that is no number",
            get("/v1/pods/web/wait?timeout_secs=soon"),
            &[400],
        ),
        case("a negative timeout", get("/v1/pods/web/wait?timeout_secs=-1"), &[400]).saying("timeout"),
        case("a NaN timeout", get("/v1/pods/web/wait?timeout_secs=NaN"), &[400]).saying("timeout"),
        case(
            "an endless timeout",
            get("/v1/pods/web/wait?timeout_secs=1e999"),
            &[400],
        )
        .saying("timeout"),
        case("a pod name that is not UTF-8", get("/v1/pods/%ff%fe/wait"), &[400]),
        // Query strings are decoded lossily: this names a pod that cannot exist.
        case("a filter that is not UTF-8", get("/v1/flows?pod=%ff"), &[404]).saying("no pod named"),
    ]);
    for c in &cases {
        c.check(&ask_local(&agent, &c.request).with_context(|| c.what)?)?;
    }

    still_serving(&mut agent, &cli)?;
    let pods = cli.pods()?;
    ensure!(
        pods.len() == 1 && pods[0].name == "web",
        "no malformed request added a pod: {pods:?}"
    );
    ensure!(
        pods[0].state == "serving",
        "no malformed request terminated web: {pods:?}"
    );
    pre_stop_drains(&cli, topo.pod("web"))
}
