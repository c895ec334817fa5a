//! The fake Kubernetes API server against the real kube-rs client stack:
//! `Client` from a kubeconfig, list with selectors, watcher and reflector,
//! `patch_status`, the event `Recorder`, compaction, an outage, and RBAC.
//!
//! Every server binds 127.0.0.1:0 in the root network namespace (loopback
//! only). Every wait is bounded; nothing asserts on durations.

use std::{future::Future, net::TcpListener, time::Duration};

use conndrain_tests::fakeapi::{self, FakeApiServer, Outage, agent_rbac};
use futures::{Stream, StreamExt as _};
use k8s_openapi::{
    api::{
        core::v1::{Pod, PodCondition, PodSpec, PodStatus},
        events::v1::Event as K8sEvent,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource as _, ResourceExt as _,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{
        WatchStreamExt as _,
        events::{Event as RecordedEvent, EventType, Recorder},
        reflector, watcher,
    },
};
use serde_json::json;

/// The bound on every wait.
const WAIT: Duration = Duration::from_secs(20);

#[test]
fn the_server_handle_can_move_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<FakeApiServer>();
}

fn server() -> FakeApiServer {
    FakeApiServer::start(TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
}

fn pod(ns: &str, name: &str, node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some([("app".to_string(), name.to_string())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec { node_name: Some(node.into()), ..PodSpec::default() }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.0.0.1".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        }),
    }
}

fn names(pods: impl IntoIterator<Item = impl std::borrow::Borrow<Pod>>) -> Vec<String> {
    let mut v: Vec<String> = pods.into_iter().map(|p| p.borrow().name_any()).collect();
    v.sort();
    v
}

fn conditions(p: &Pod) -> Vec<(String, String)> {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|c| c.iter().map(|c| (c.type_.clone(), c.status.clone())).collect())
        .unwrap_or_default()
}

async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Polls `f` until it returns `Some`, for at most [`WAIT`].
async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    bounded(what, async {
        loop {
            if let Some(x) = f() {
                return x;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await
}

/// The next item of `s` for which `f` returns `Some`, within [`WAIT`].
async fn next_where<S, I, T>(what: &str, s: &mut S, mut f: impl FnMut(&I) -> Option<T>) -> T
where
    S: Stream<Item = I> + Unpin,
{
    bounded(what, async {
        loop {
            let item = s.next().await.unwrap_or_else(|| panic!("stream ended waiting for {what}"));
            if let Some(x) = f(&item) {
                return x;
            }
        }
    })
    .await
}

type Events = futures::stream::BoxStream<'static, watcher::Result<watcher::Event<Pod>>>;

/// A reflector driven by its own task (so its watch stays open while the
/// test does other things), and the watcher events it saw.
fn spawn_reflector(api: Api<Pod>, cfg: watcher::Config) -> (reflector::Store<Pod>, Events, tokio::task::JoinHandle<()>) {
    let (reader, writer) = reflector::store();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = reflector(writer, watcher(api, cfg)).default_backoff();
    let task = tokio::spawn(stream.for_each(move |e| {
        let _ = tx.send(e);
        async {}
    }));
    let events = futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed();
    (reader, events, task)
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[tokio::test]
async fn kubeconfig_file_works_with_the_kube_client() {
    let server = server();
    let dir = std::env::temp_dir().join(format!("fakeapi-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    server.write_kubeconfig(&path, "127.0.0.1").unwrap();

    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).unwrap();
    let version = bounded("GET /version", client.apiserver_version()).await.unwrap();
    assert_eq!(version.major, "1");

    server.create_pod(pod("default", "web", "node-a"));
    let pods: Api<Pod> = Api::default_namespaced(client);
    let got = bounded("GET pod", pods.get("web")).await.unwrap();
    assert_eq!(got.spec.unwrap().node_name.as_deref(), Some("node-a"));
    let requests = server.requests();
    let get = requests.iter().find(|r| r.path == "/api/v1/namespaces/default/pods/web").unwrap();
    assert_eq!((get.verb.as_str(), get.status), ("get", 200));
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn list_pods_with_a_field_selector() {
    let server = server();
    for (ns, name, node) in [("default", "a1", "node-a"), ("other", "a2", "node-a"), ("default", "b1", "node-b")] {
        server.create_pod(pod(ns, name, node));
    }
    let client = server.client().await;
    let all: Api<Pod> = Api::all(client.clone());

    let list = bounded("list", all.list(&ListParams::default().fields("spec.nodeName=node-a"))).await.unwrap();
    assert_eq!(names(&list.items), ["a1", "a2"]);
    let rv: u64 = list.metadata.resource_version.unwrap().parse().unwrap();
    assert_eq!(rv, server.resource_version());
    let first = &list.items[0];
    assert!(first.metadata.uid.is_some() && first.metadata.creation_timestamp.is_some());

    let list = bounded("list", all.list(&ListParams::default().fields("metadata.name=b1"))).await.unwrap();
    assert_eq!(names(&list.items), ["b1"]);
    let list = bounded("list", all.list(&ListParams::default().labels("app in (a2, b1)"))).await.unwrap();
    assert_eq!(names(&list.items), ["a2", "b1"]);

    let default: Api<Pod> = Api::namespaced(client.clone(), "default");
    let list = bounded("list", default.list(&ListParams::default().fields("spec.nodeName=node-a"))).await.unwrap();
    assert_eq!(names(&list.items), ["a1"]);
    let meta = bounded("list metadata", default.list_metadata(&ListParams::default())).await.unwrap();
    assert_eq!(meta.items.len(), 2);

    let err = bounded("get", default.get("missing")).await.unwrap_err();
    assert_eq!(api_code(&err), Some(404), "{err:?}");
}

#[tokio::test]
async fn watcher_and_reflector_see_create_modify_delete() {
    let server = server();
    server.create_pod(pod("default", "before", "node-a"));
    let client = server.client().await;
    let api: Api<Pod> = Api::all(client);
    let (reader, writer) = reflector::store();
    let cfg = watcher::Config::default().fields("spec.nodeName=node-a").timeout(5);
    let stream = reflector(writer, watcher(api, cfg)).default_backoff();
    let task = tokio::spawn(stream.for_each(|_| async {}));

    bounded("store ready", reader.wait_until_ready()).await.unwrap();
    assert_eq!(names(reader.state()), ["before"]);

    server.create_pod(pod("default", "web", "node-a"));
    server.create_pod(pod("default", "elsewhere", "node-b"));
    until("web in the store", || (names(reader.state()) == ["before", "web"]).then_some(())).await;

    server.update_pod("default", "web", |p| {
        p.labels_mut().insert("version".into(), "2".into());
    });
    until("the label change", || {
        let web = reader.state().into_iter().find(|p| p.name_any() == "web")?;
        (web.labels().get("version").map(String::as_str) == Some("2")).then_some(())
    })
    .await;

    // Moving off the node is a DELETED for this watcher, moving on an ADDED.
    server.update_pod("default", "before", |p| p.spec.as_mut().unwrap().node_name = Some("node-b".into()));
    server.update_pod("default", "elsewhere", |p| p.spec.as_mut().unwrap().node_name = Some("node-a".into()));
    until("the move", || (names(reader.state()) == ["elsewhere", "web"]).then_some(())).await;

    let marked = server.mark_pod_deleted("default", "web", 30);
    assert_eq!(marked.metadata.deletion_grace_period_seconds, Some(30));
    until("deletionTimestamp", || {
        let web = reader.state().into_iter().find(|p| p.name_any() == "web")?;
        web.metadata.deletion_timestamp.is_some().then_some(())
    })
    .await;
    server.delete_pod("default", "web").unwrap();
    until("web gone", || (names(reader.state()) == ["elsewhere"]).then_some(())).await;

    let requests = server.requests();
    let watch = requests.iter().find(|r| r.is_watch()).expect("a watch request");
    assert_eq!(watch.param("allowWatchBookmarks").as_deref(), Some("true"));
    assert_eq!(watch.param("fieldSelector").as_deref(), Some("spec.nodeName=node-a"));
    assert!(watch.param("resourceVersion").is_some());
    task.abort();
}

#[tokio::test]
async fn patch_status_merges_conditions_by_type() {
    let server = server();
    server.create_pod(pod("default", "web", "node-a"));
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client, "default");
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    next_where("InitDone", &mut events, |e| matches!(e, Ok(watcher::Event::InitDone)).then_some(())).await;

    let patch = json!({"status": {"conditions": [{
        "type": "conndrain.io/Drained", "status": "True", "reason": "NoActiveFlows",
        "lastTransitionTime": "2025-01-01T00:00:00Z",
    }]}});
    let patched = bounded("patch_status", api.patch_status("web", &PatchParams::default(), &Patch::Strategic(&patch)))
        .await
        .unwrap();
    let want = [("Ready".to_string(), "True".to_string()), ("conndrain.io/Drained".into(), "True".into())];
    assert_eq!(conditions(&patched), want);
    assert_eq!(patched.status.as_ref().unwrap().phase.as_deref(), Some("Running"));

    let seen = next_where("the MODIFIED pod", &mut events, |e| match e {
        Ok(watcher::Event::Apply(p)) => Some(p.clone()),
        _ => None,
    })
    .await;
    assert_eq!(conditions(&seen), want);
    assert_eq!(seen.resource_version(), patched.resource_version());

    // Server-side apply merges by type too; /status ignores spec changes.
    let apply = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
        "spec": {"nodeName": "somewhere-else"},
        "status": {"conditions": [{"type": "conndrain.io/Drained", "status": "False"}]},
    });
    let applied = bounded("apply status", api.patch_status("web", &PatchParams::apply("conndrain").force(), &Patch::Apply(&apply)))
        .await
        .unwrap();
    assert_eq!(conditions(&applied)[1], ("conndrain.io/Drained".into(), "False".into()));
    assert_eq!(conditions(&applied)[0].0, "Ready");
    assert_eq!(applied.spec.unwrap().node_name.as_deref(), Some("node-a"));

    // A stale resourceVersion in the patch is a 409 Conflict.
    let stale = json!({"metadata": {"resourceVersion": "1"}, "status": {"phase": "Failed"}});
    let err = bounded("stale patch", api.patch_status("web", &PatchParams::default(), &Patch::Merge(&stale)))
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some(409), "{err:?}");

    // A patch that changes nothing keeps the resourceVersion.
    bounded("patch_status", api.patch_status("web", &PatchParams::default(), &Patch::Strategic(&patch)))
        .await
        .unwrap();
    let rv = server.resource_version();
    bounded("no-op patch", api.patch_status("web", &PatchParams::default(), &Patch::Strategic(&patch)))
        .await
        .unwrap();
    assert_eq!(server.resource_version(), rv);

    let stored = server.pod("default", "web").unwrap();
    assert_eq!(conditions(&stored), want);
    let requests = server.requests();
    let status_patch = requests.iter().find(|r| r.path.ends_with("/pods/web/status")).unwrap();
    assert_eq!(status_patch.method, "PATCH");
    assert_eq!(status_patch.content_type.as_deref(), Some("application/strategic-merge-patch+json"));
}

#[tokio::test]
async fn recorder_events_are_stored() {
    let server = server();
    let pod = server.create_pod(pod("default", "web", "node-a"));
    let client = server.client().await;
    let recorder = Recorder::new(client.clone(), "conndrain".into());
    let event = RecordedEvent {
        type_: EventType::Normal,
        reason: "Drained".into(),
        note: Some("no active flows".into()),
        action: "Drain".into(),
        secondary: None,
    };
    bounded("publish", recorder.publish(&event, &pod.object_ref(&()))).await.unwrap();
    let events = server.events();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.reason.as_deref(), Some("Drained"));
    assert_eq!(e.note.as_deref(), Some("no active flows"));
    assert_eq!(e.regarding.as_ref().unwrap().name.as_deref(), Some("web"));
    assert_eq!(e.reporting_controller.as_deref(), Some("conndrain"));
    assert!(e.series.is_none());

    // The same event again is a merge PATCH that adds a series.
    bounded("publish again", recorder.publish(&event, &pod.object_ref(&()))).await.unwrap();
    let events = server.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].series.as_ref().map(|s| s.count), Some(2));

    let listed = bounded("list events", Api::<K8sEvent>::namespaced(client, "default").list(&ListParams::default()))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);

    let writes: Vec<(String, String, u16)> = server
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/apis/events.k8s.io/v1/namespaces/default/events"))
        .map(|r| (r.method, r.verb, r.status))
        .collect();
    assert_eq!(writes[..2], [
        ("POST".to_string(), "create".to_string(), 201),
        ("PATCH".to_string(), "patch".to_string(), 200)
    ]);
}

#[tokio::test]
async fn after_compaction_the_watcher_relists_and_loses_nothing() {
    let server = server();
    server.create_pod(pod("default", "a", "node-a"));
    server.create_pod(pod("default", "b", "node-a"));
    let client = server.client().await;
    let (reader, mut events, task) = spawn_reflector(Api::all(client), watcher::Config::default());
    next_where("InitDone", &mut events, |e| matches!(e, Ok(watcher::Event::InitDone)).then_some(())).await;
    until("the watch", || (server.open_watches() > 0).then_some(())).await;

    // The compaction ends the open watch; these changes land after it.
    server.compact();
    server.delete_pod("default", "a");
    server.update_pod("default", "b", |p| {
        p.labels_mut().insert("changed".into(), "yes".into());
    });
    server.create_pod(pod("default", "c", "node-a"));

    let code = next_where("the 410", &mut events, |e| match e {
        Err(watcher::Error::WatchError(s)) => Some(s.code),
        _ => None,
    })
    .await;
    assert_eq!(code, 410);
    next_where("the relist", &mut events, |e| matches!(e, Ok(watcher::Event::Init)).then_some(())).await;
    next_where("InitDone", &mut events, |e| matches!(e, Ok(watcher::Event::InitDone)).then_some(())).await;

    assert_eq!(names(reader.state()), ["b", "c"]);
    let b = reader.state().into_iter().find(|p| p.name_any() == "b").unwrap();
    assert_eq!(b.labels().get("changed").map(String::as_str), Some("yes"));
    assert_eq!(server.requests().iter().filter(|r| r.verb == "list").count(), 2);

    // And it keeps watching from the new list.
    server.delete_pod("default", "b");
    next_where("DELETED b", &mut events, |e| {
        matches!(e, Ok(watcher::Event::Delete(p)) if p.name_any() == "b").then_some(())
    })
    .await;
    assert_eq!(names(reader.state()), ["c"]);
    task.abort();
}

#[tokio::test]
async fn a_watch_from_a_compacted_version_gets_410() {
    let server = server();
    server.create_pod(pod("default", "a", "node-a"));
    let old = server.resource_version().to_string();
    server.compact();
    let client = server.client().await;
    let api: Api<Pod> = Api::all(client);
    let mut stream = bounded("watch", api.watch(&kube::api::WatchParams::default(), &old)).await.unwrap().boxed();
    let first = bounded("the ERROR event", stream.next()).await.unwrap().unwrap();
    let kube::api::WatchEvent::Error(status) = first else { panic!("not an ERROR event") };
    assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
    assert!(bounded("the end of the stream", stream.next()).await.is_none());
}

#[tokio::test]
async fn a_raw_watch_streams_events_and_bookmarks_then_times_out() {
    use kube::api::{WatchEvent, WatchParams};
    let server = server();
    server.create_pod(pod("default", "a", "node-a"));
    let from = server.resource_version().to_string();
    let client = server.client().await;
    let api: Api<Pod> = Api::namespaced(client, "default");
    let wp = WatchParams::default().fields("spec.nodeName=node-a").timeout(3);
    let mut stream = bounded("watch", api.watch(&wp, &from)).await.unwrap().boxed();

    server.create_pod(pod("default", "b", "node-a"));
    server.create_pod(pod("default", "elsewhere", "node-b"));
    server.update_pod("default", "a", |p| p.spec.as_mut().unwrap().node_name = Some("node-b".into()));
    server.create_pod(pod("other", "c", "node-a"));
    let last = server.resource_version().to_string();
    let mut seen = Vec::new();
    next_where("a bookmark at the last version", &mut stream, |e| match e.as_ref().unwrap() {
        WatchEvent::Added(p) => {
            seen.push(format!("ADDED {}", p.name_any()));
            None
        }
        WatchEvent::Modified(p) => {
            seen.push(format!("MODIFIED {}", p.name_any()));
            None
        }
        WatchEvent::Deleted(p) => {
            seen.push(format!("DELETED {}", p.name_any()));
            None
        }
        WatchEvent::Bookmark(b) => (b.metadata.resource_version == last).then_some(()),
        WatchEvent::Error(e) => panic!("{e:?}"),
    })
    .await;
    // Namespaced: c is not seen; a stopped matching the selector: DELETED.
    assert_eq!(seen, ["ADDED b", "DELETED a"]);
    bounded("the end after timeoutSeconds", async {
        while let Some(e) = stream.next().await {
            assert!(matches!(e, Ok(WatchEvent::Bookmark(_))), "{e:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn calls_during_a_503_outage_block_and_the_watcher_recovers() {
    let server = server();
    server.create_pod(pod("default", "a", "node-a"));
    let client = server.client().await;
    let api: Api<Pod> = Api::all(client.clone());
    let (reader, _events, task) = spawn_reflector(api.clone(), watcher::Config::default());
    bounded("store ready", reader.wait_until_ready()).await.unwrap();
    until("the watch", || (server.open_watches() > 0).then_some(())).await;

    server.set_down(true);
    assert!(server.is_down());
    until("the watch to be cut", || (server.open_watches() == 0).then_some(())).await;
    server.clear_requests();
    // kube retries a 503 itself: the call blocks while the server is down.
    let list = tokio::spawn(async move { api.list(&ListParams::default()).await });
    until("a retried LIST", || {
        let failed = server.requests().iter().filter(|r| r.status == 503 && !r.query.contains("watch=true")).count();
        (failed >= 2).then_some(())
    })
    .await;
    assert!(!list.is_finished());

    server.delete_pod("default", "a");
    server.create_pod(pod("default", "b", "node-a"));
    until("a failed re-watch", || {
        server.requests().iter().any(|r| r.status == 503 && r.query.contains("watch=true")).then_some(())
    })
    .await;
    server.set_down(false);

    let listed = bounded("the blocked LIST", list).await.unwrap().unwrap();
    assert_eq!(names(&listed.items), ["b"]);
    until("the watcher to catch up", || (names(reader.state()) == ["b"]).then_some(())).await;
    server.create_pod(pod("default", "c", "node-a"));
    until("new changes after recovery", || (names(reader.state()) == ["b", "c"]).then_some(())).await;
    task.abort();
}

#[tokio::test]
async fn calls_fail_while_unreachable_and_the_watcher_recovers() {
    let server = server();
    server.create_pod(pod("default", "a", "node-a"));
    let client = server.client().await;
    let api: Api<Pod> = Api::all(client.clone());
    let (reader, mut events, task) = spawn_reflector(api.clone(), watcher::Config::default());
    next_where("InitDone", &mut events, |e| matches!(e, Ok(watcher::Event::InitDone)).then_some(())).await;
    until("the watch", || (server.open_watches() > 0).then_some(())).await;

    server.set_outage(Some(Outage::Reset));
    let err = bounded("list while unreachable", api.list(&ListParams::default())).await.unwrap_err();
    assert!(api_code(&err).is_none(), "{err:?}");
    let err = bounded("get while unreachable", api.get("a")).await.unwrap_err();
    assert!(api_code(&err).is_none(), "{err:?}");

    server.delete_pod("default", "a");
    server.create_pod(pod("default", "b", "node-a"));
    next_where("the watcher's error", &mut events, |e| e.is_err().then_some(())).await;
    server.set_outage(None);

    until("the watcher to catch up", || (names(reader.state()) == ["b"]).then_some(())).await;
    server.create_pod(pod("default", "c", "node-a"));
    until("new changes after recovery", || (names(reader.state()) == ["b", "c"]).then_some(())).await;
    task.abort();
}

#[tokio::test]
async fn rbac_denials_are_403() {
    let server = server();
    server.create_pod(pod("default", "web", "node-a"));
    let client = server.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    server.set_rbac(agent_rbac());

    bounded("list", pods.list(&ListParams::default())).await.unwrap();
    let patch = json!({"status": {"conditions": [{"type": "conndrain.io/Drained", "status": "True"}]}});
    bounded("patch_status", pods.patch_status("web", &PatchParams::default(), &Patch::Strategic(&patch)))
        .await
        .unwrap();

    // Not in the ClusterRole: deleting pods, patching the pod itself, getting services.
    let err = bounded("delete", pods.delete("web", &DeleteParams::default())).await.unwrap_err();
    let kube::Error::Api(status) = &err else { panic!("not an API error: {err:?}") };
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
    assert!(status.message.contains("cannot delete resource \"pods\""), "{}", status.message);
    let err = bounded("patch", pods.patch("web", &PatchParams::default(), &Patch::Merge(&patch))).await.unwrap_err();
    assert_eq!(api_code(&err), Some(403));
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), "default");
    let err = bounded("get service", services.get("x")).await.unwrap_err();
    assert_eq!(api_code(&err), Some(403));

    // Rules in the shape of the agent's API_CALLS.
    server.set_rbac(fakeapi::rules_from(&[("", "pods", &["list", "watch"]), ("", "pods/status", &["patch"])]));
    let err = bounded("get", pods.get("web")).await.unwrap_err();
    assert_eq!(api_code(&err), Some(403));
    bounded("list", pods.list(&ListParams::default())).await.unwrap();

    // A denial on top of the rules.
    server.deny("patch", "pods/status");
    let err = bounded("patch_status", pods.patch_status("web", &PatchParams::default(), &Patch::Strategic(&patch)))
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some(403));

    // A denied watch: the watcher reports the 403 and retries.
    server.deny("watch", "pods");
    let mut events = watcher(pods.clone(), watcher::Config::default()).boxed();
    let err = next_where("the 403", &mut events, |e| match e {
        Err(watcher::Error::WatchStartFailed(e)) => api_code(e),
        _ => None,
    })
    .await;
    assert_eq!(err, 403);

    server.allow_all();
    bounded("delete", pods.delete("web", &DeleteParams::default())).await.unwrap();
    // Bound to a node: a graceful delete, the pod stays with a deletionTimestamp.
    let p = server.pod("default", "web").unwrap();
    assert!(p.metadata.deletion_timestamp.is_some());
    assert_eq!(p.metadata.deletion_grace_period_seconds, Some(30));
}

#[tokio::test]
async fn create_conflicts_and_unknown_paths() {
    let server = server();
    let client = server.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let created = bounded("create", pods.create(&PostParams::default(), &pod("default", "web", ""))).await.unwrap();
    assert!(created.metadata.uid.is_some());
    let err = bounded("create again", pods.create(&PostParams::default(), &pod("default", "web", "")))
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some(409));
    // Not bound to a node: deleted at once.
    bounded("delete", pods.delete("web", &DeleteParams::default())).await.unwrap();
    assert!(server.pod("default", "web").is_none());

    let req = hyper::Request::get("/apis/example.com/v1/widgets").body(Vec::new()).unwrap();
    let err = bounded("unknown path", client.request::<serde_json::Value>(req)).await.unwrap_err();
    assert_eq!(api_code(&err), Some(404));
}
