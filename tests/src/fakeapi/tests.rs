//! The fake API server against the real kube-rs stack.

use std::io::{ErrorKind, Read as _, Write as _};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt, api::ListParams};

use super::*;

fn pod(name: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": []},
    }))
    .expect("pod")
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(std::time::Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A raw watch: its first bytes read, so the server has taken it.
fn raw_watch(addr: SocketAddr) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    write!(s, "GET /api/v1/pods?watch=true HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n")
        .expect("request");
    let mut buf = [0u8; 512];
    assert!(s.read(&mut buf).expect("first bytes") > 0);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resets_connections_and_keeps_the_store() {
    let server = FakeApiServer::start(TcpListener::bind("127.0.0.1:0").expect("bind"));
    let addr = server.addr();
    server.create_pod(pod("before"));
    let mut watch = raw_watch(addr);
    until("the watch to open", || server.open_watches() == 1);

    server.stop();
    assert!(!server.is_serving());
    let mut rest = Vec::new();
    let err = watch.read_to_end(&mut rest).expect_err("a reset, not a clean end");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    // A child that another test forks at this instant holds a copy of the
    // listener's descriptor until its exec closes it (CLOEXEC), and the
    // socket listens as long as any copy is open: wait for refused
    // rather than expect it on the first try. A listener that stays
    // open still fails here.
    until(
        "connections to be refused",
        || matches!(std::net::TcpStream::connect(addr), Err(e) if e.kind() == ErrorKind::ConnectionRefused),
    );
    assert_eq!(server.open_watches(), 0, "the watch is counted out");
    let rv = server.resource_version();
    server.create_pod(pod("while-down"));

    server.resume(TcpListener::bind(addr).expect("bind the same address again"));
    assert!(server.is_serving());
    let api: Api<Pod> = Api::namespaced(server.client().await, "default");
    let names: Vec<String> =
        api.list(&ListParams::default()).await.expect("list").iter().map(ResourceExt::name_any).collect();
    assert_eq!(names, ["before", "while-down"], "the store is kept");
    // The history too: a watch resumes from a resourceVersion of before the stop.
    let wp = kube::api::WatchParams::default().timeout(1);
    let mut events = Box::pin(api.watch(&wp, &rv.to_string()).await.expect("watch"));
    let first = futures::StreamExt::next(&mut events).await.expect("an event").expect("no error");
    assert!(matches!(&first, kube::api::WatchEvent::Added(p) if p.name_any() == "while-down"), "{first:?}");
}
