//! A fake Kubernetes API server for tests.
//!
//! It speaks the apiserver's wire protocol (JSON over plain HTTP/1.1, bearer
//! token) closely enough for the real kube-rs stack: `kube::Client` from a
//! kubeconfig, `Api` get/list/create/patch/`patch_status`/delete,
//! `kube::runtime::watcher` and `reflector` (LIST, then WATCH with bookmarks,
//! resumption from a resourceVersion, 410 Expired after a compaction) and
//! `kube::runtime::events::Recorder` (events.k8s.io/v1 POST, then merge PATCH).
//!
//! It serves pods (and `pods/status`), services (and `services/status`),
//! discovery.k8s.io/v1 endpointslices, events.k8s.io/v1 events and core/v1
//! events, all namespaced, with the cluster-wide LIST and WATCH forms.
//!
//! The test drives the cluster with synchronous methods from any thread:
//! create, change and delete objects (each change bumps one global
//! resourceVersion and goes to open watches), take the API down, restart it
//! ([`stop`](FakeApiServer::stop) and [`resume`](FakeApiServer::resume)),
//! compact the history, restrict RBAC, and read back what clients sent.
//!
//! ```no_run
//! use conndrain_tests::fakeapi::FakeApiServer;
//! # fn main() -> std::io::Result<()> {
//! let server = FakeApiServer::start(std::net::TcpListener::bind("127.0.0.1:0")?);
//! server.write_kubeconfig("/tmp/kubeconfig".as_ref(), "127.0.0.1")?;
//! // ... run the agent with --kubeconfig /tmp/kubeconfig, then:
//! server.mark_pod_deleted("default", "web", 30);
//! # Ok(()) }
//! ```

mod agent;
mod fixtures;
mod http;
mod patch;
mod select;
mod store;

use std::{
    fmt::Write as _,
    net::{SocketAddr, TcpListener},
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
pub use k8s_openapi::api::rbac::v1::PolicyRule;
use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery, events::v1 as events};
use serde_json::Value;
use store::State;
pub use agent::AgentApi;
pub use fixtures::{agent_rbac, rule, rules_from, running_pod};
pub use store::{FakeResource, Resource};

/// The bearer token clients must send.
pub const TOKEN: &str = "fakeapi-token";

/// One request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// `GET`, `POST`, `PATCH`, ...
    pub method: String,
    /// The URL path, e.g. `/api/v1/namespaces/default/pods/web/status`.
    pub path: String,
    /// The raw (percent-encoded) query string, without `?`.
    pub query: String,
    /// The Kubernetes verb (`get`, `list`, `watch`, `create`, `update`,
    /// `patch`, `delete`), empty for non-resource paths and for requests
    /// refused before routing (outage, no token).
    pub verb: String,
    /// The HTTP status answered (200 for a watch, whatever it then streams).
    pub status: u16,
    pub content_type: Option<String>,
    /// The request body (UTF-8, lossy).
    pub body: String,
}

impl RecordedRequest {
    /// A decoded query parameter.
    #[must_use]
    pub fn param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
    }

    /// Whether this is a watch (`GET` with `watch=true`).
    #[must_use]
    pub fn is_watch(&self) -> bool {
        self.verb == "watch"
    }
}

/// How the API server fails during an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// Every request gets HTTP 503 with a `ServiceUnavailable` Status (an
    /// apiserver that is overloaded or starting, or a load balancer with no
    /// backend). kube clients retry these.
    Unavailable,
    /// Every request has its connection closed without an answer (an
    /// apiserver that is gone); it is recorded with status 0. kube clients
    /// fail at once.
    Reset,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    /// Bumped on every change, to wake watch streams.
    tick: tokio::sync::watch::Sender<u64>,
    token: String,
    open_watches: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        self.tick.send_modify(|t| *t = t.wrapping_add(1));
    }
}

/// The fake API server. It serves on its own thread with its own tokio
/// runtime, and stops when dropped.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// `None` between [`stop`](Self::stop) and [`resume`](Self::resume).
    serving: Mutex<Option<Serving>>,
}

/// The thread that serves, and how to stop it.
struct Serving {
    shutdown: tokio::sync::oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl Serving {
    fn spawn(listener: TcpListener, shared: Arc<Shared>) -> Self {
        let addr = listener.local_addr().expect("listener address");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let (shutdown, stop) = tokio::sync::oneshot::channel();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        let thread = std::thread::Builder::new()
            .name(format!("fakeapi-{}", addr.port()))
            .spawn(move || {
                rt.block_on(serve(listener, shared, stop));
                // Dropping the runtime drops every watch task left.
                rt.shutdown_timeout(Duration::from_millis(200));
            })
            .expect("fakeapi thread");
        Self { shutdown, thread }
    }

    fn stop(self) {
        let _ = self.shutdown.send(());
        let _ = self.thread.join();
    }
}

// The test controls change the cluster and return the object for
// convenience; ignoring it is normal, so no `#[must_use]` on those.
#[allow(clippy::must_use_candidate)]
impl FakeApiServer {
    /// Serves on `listener`, which the caller bound (in whichever network
    /// namespace: the socket keeps it).
    ///
    /// # Panics
    ///
    /// If the listener or the runtime cannot be set up.
    #[must_use]
    pub fn start(listener: TcpListener) -> FakeApiServer {
        let addr = listener.local_addr().expect("listener address");
        let (tick, _) = tokio::sync::watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            tick,
            token: TOKEN.to_string(),
            open_watches: AtomicUsize::new(0),
        });
        let serving = Serving::spawn(listener, Arc::clone(&shared));
        FakeApiServer { shared, addr, serving: Mutex::new(Some(serving)) }
    }

    /// The address it listens on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<host>:<port>`; `host` is how clients reach it (an IPv6
    /// address gets brackets).
    #[must_use]
    pub fn url(&self, host: &str) -> String {
        let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_string() };
        format!("http://{host}:{}", self.addr.port())
    }

    /// A kubeconfig (YAML) for `http://<host>:<port>` with the bearer token,
    /// namespace `default`.
    #[must_use]
    pub fn kubeconfig(&self, host: &str) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fakeapi\n  cluster:\n    server: {url}\n\
             users:\n- name: fakeapi\n  user:\n    token: {token}\n\
             contexts:\n- name: fakeapi\n  context:\n    cluster: fakeapi\n    user: fakeapi\n    namespace: default\n\
             current-context: fakeapi\npreferences: {{}}\n",
            url = self.url(host),
            token = self.shared.token,
        );
        s
    }

    /// Writes [`kubeconfig`](Self::kubeconfig) to `path`.
    pub fn write_kubeconfig(&self, path: &Path, host: &str) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig(host))
    }

    /// A `kube::Config` read from the kubeconfig for `host` (through the same
    /// parser as `--kubeconfig`).
    pub async fn kube_config(&self, host: &str) -> Result<kube::Config, kube::config::KubeconfigError> {
        let kc = kube::config::Kubeconfig::from_yaml(&self.kubeconfig(host))?;
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await
    }

    /// A client for it, reaching it at 127.0.0.1 or the listener's address.
    ///
    /// # Panics
    ///
    /// If the kubeconfig does not load (a bug).
    pub async fn client(&self) -> kube::Client {
        let ip = self.addr.ip();
        let host = if ip.is_unspecified() { "127.0.0.1".to_string() } else { ip.to_string() };
        let config = self.kube_config(&host).await.expect("fakeapi kubeconfig");
        kube::Client::try_from(config).expect("kube client")
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    /// Runs `f` on the state and wakes watches.
    fn change<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.lock());
        self.shared.notify();
        out
    }

    // ---- objects, generic ----

    /// Creates an object (namespace `default` if it has none), filling in
    /// uid, creationTimestamp and resourceVersion; returns it as stored.
    ///
    /// # Panics
    ///
    /// If it exists already or does not decode.
    #[allow(clippy::needless_pass_by_value)] // takes the object like `Api::create` would
    pub fn create<K: FakeResource>(&self, obj: K) -> K {
        let v = serde_json::to_value(&obj).expect("object serializes");
        let ns = v["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
        let out = self.change(|st| st.create(K::RESOURCE, &ns, v));
        from(Ok(out.unwrap_or_else(|e| panic!("fakeapi create: {}", e.message))))
    }

    /// Changes an object with `f` (any field, status included; identity
    /// fields are kept); a MODIFIED event goes out if anything changed.
    ///
    /// # Panics
    ///
    /// If it does not exist.
    pub fn update<K: FakeResource>(&self, ns: &str, name: &str, f: impl FnOnce(&mut K)) -> K {
        self.change(|st| {
            let cur = st
                .get(K::RESOURCE, ns, name)
                .cloned()
                .unwrap_or_else(|| panic!("fakeapi update: {ns}/{name} not found"));
            let mut k: K = from(Ok(cur));
            f(&mut k);
            let v = serde_json::to_value(&k).expect("object serializes");
            from(st.replace(K::RESOURCE, ns, name, v))
        })
    }

    /// Removes an object at once (a DELETED event); returns its last state.
    pub fn delete<K: FakeResource>(&self, ns: &str, name: &str) -> Option<K> {
        self.change(|st| st.remove(K::RESOURCE, ns, name)).ok().map(|v| from(Ok(v)))
    }

    #[must_use]
    pub fn get<K: FakeResource>(&self, ns: &str, name: &str) -> Option<K> {
        self.lock().get(K::RESOURCE, ns, name).cloned().map(|v| from(Ok(v)))
    }

    /// Every object of a kind, sorted by namespace and name.
    #[must_use]
    pub fn list<K: FakeResource>(&self) -> Vec<K> {
        self.lock().list(K::RESOURCE, None).cloned().map(|v| from(Ok(v))).collect()
    }

    // ---- pods ----

    pub fn create_pod(&self, pod: core::Pod) -> core::Pod {
        self.create(pod)
    }

    pub fn update_pod(&self, ns: &str, name: &str, f: impl FnOnce(&mut core::Pod)) -> core::Pod {
        self.update(ns, name, f)
    }

    pub fn delete_pod(&self, ns: &str, name: &str) -> Option<core::Pod> {
        self.delete(ns, name)
    }

    /// What the apiserver does on a graceful delete: `deletionTimestamp` =
    /// now + `grace_seconds` and `deletionGracePeriodSeconds` (a MODIFIED
    /// event). The pod stays until [`delete_pod`](Self::delete_pod).
    ///
    /// # Panics
    ///
    /// If the pod does not exist.
    pub fn mark_pod_deleted(&self, ns: &str, name: &str, grace_seconds: i64) -> core::Pod {
        let out = self.change(|st| st.mark_deleted(Resource::Pods, ns, name, grace_seconds));
        from(out)
    }

    #[must_use]
    pub fn pod(&self, ns: &str, name: &str) -> Option<core::Pod> {
        self.get(ns, name)
    }

    #[must_use]
    pub fn pods(&self) -> Vec<core::Pod> {
        self.list()
    }

    // ---- services and endpointslices ----

    pub fn create_service(&self, svc: core::Service) -> core::Service {
        self.create(svc)
    }

    pub fn update_service(&self, ns: &str, name: &str, f: impl FnOnce(&mut core::Service)) -> core::Service {
        self.update(ns, name, f)
    }

    pub fn delete_service(&self, ns: &str, name: &str) -> Option<core::Service> {
        self.delete(ns, name)
    }

    #[must_use]
    pub fn service(&self, ns: &str, name: &str) -> Option<core::Service> {
        self.get(ns, name)
    }

    pub fn create_endpoint_slice(&self, slice: discovery::EndpointSlice) -> discovery::EndpointSlice {
        self.create(slice)
    }

    pub fn update_endpoint_slice(
        &self,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut discovery::EndpointSlice),
    ) -> discovery::EndpointSlice {
        self.update(ns, name, f)
    }

    pub fn delete_endpoint_slice(&self, ns: &str, name: &str) -> Option<discovery::EndpointSlice> {
        self.delete(ns, name)
    }

    #[must_use]
    pub fn endpoint_slice(&self, ns: &str, name: &str) -> Option<discovery::EndpointSlice> {
        self.get(ns, name)
    }

    // ---- events ----

    /// events.k8s.io/v1 events (what `kube::runtime::events::Recorder` writes).
    #[must_use]
    pub fn events(&self) -> Vec<events::Event> {
        self.list()
    }

    /// core/v1 events (kept apart from the events.k8s.io ones).
    #[must_use]
    pub fn core_events(&self) -> Vec<core::Event> {
        self.list()
    }

    // ---- the server ----

    /// The current global resourceVersion.
    #[must_use]
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Every request answered so far, in order.
    #[must_use]
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    /// How many watch streams are open now.
    #[must_use]
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// An API outage ([`Outage::Unavailable`]): while down, every request
    /// gets 503 `ServiceUnavailable`, and going down cuts every open watch
    /// stream (the connection closes mid-stream).
    ///
    /// kube 5 clients retry a 503 by themselves (up to 15 times, backing off
    /// exponentially from 5 ms), so a call made during the outage usually
    /// blocks and then succeeds once the server is back; the watcher's
    /// re-watch does too. Use [`set_outage`](Self::set_outage) with
    /// [`Outage::Reset`] for calls that fail at once.
    pub fn set_down(&self, down: bool) {
        self.set_outage(down.then_some(Outage::Unavailable));
    }

    /// Starts (`Some`) or ends (`None`) an outage. Starting one cuts every
    /// open watch stream.
    pub fn set_outage(&self, outage: Option<Outage>) {
        self.change(|st| {
            if outage.is_some() && st.outage != outage {
                st.epoch += 1;
            }
            st.outage = outage;
        });
    }

    /// Whether an outage is on.
    #[must_use]
    pub fn is_down(&self) -> bool {
        self.lock().outage.is_some()
    }

    fn serving(&self) -> MutexGuard<'_, Option<Serving>> {
        self.serving.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops serving, as when the apiserver process exits (a restart, a
    /// crash): the listener closes, so new connections are refused, and
    /// every open connection is reset (RST), watches included. What etcd
    /// holds stays: the objects, the history (watches can resume from their
    /// resourceVersion), RBAC and the recorded requests. The test can go on
    /// changing objects meanwhile, as other apiservers of the cluster would.
    /// [`resume`](Self::resume) serves again. Does nothing if stopped.
    pub fn stop(&self) {
        let serving = self.serving().take();
        if let Some(s) = serving {
            s.stop();
        }
    }

    /// Serves again after [`stop`](Self::stop), on `listener`, which the
    /// caller bound to [`addr`](Self::addr) again (in the same network
    /// namespace), with everything the store held.
    ///
    /// # Panics
    ///
    /// If the server is serving, or `listener` is on another address (the
    /// clients' kubeconfig names this one).
    pub fn resume(&self, listener: TcpListener) {
        let addr = listener.local_addr().expect("listener address");
        assert_eq!(addr, self.addr, "fakeapi resume: bind the address the server had");
        let mut serving = self.serving();
        assert!(serving.is_none(), "fakeapi resume: the server is serving; stop it first");
        *serving = Some(Serving::spawn(listener, Arc::clone(&self.shared)));
    }

    /// Whether it is serving (not between [`stop`](Self::stop) and
    /// [`resume`](Self::resume)).
    #[must_use]
    pub fn is_serving(&self) -> bool {
        self.serving().is_some()
    }

    /// Forgets the history, as an etcd compaction does: a watch from any
    /// resourceVersion before now gets a 410 Expired ERROR event, and open
    /// watches end, so every watcher re-watches, gets it and re-lists.
    pub fn compact(&self) {
        self.change(State::compact);
    }

    /// Restricts requests to `rules` (RBAC: verb, apiGroup, resource or
    /// resource/subresource, `*` wildcards); anything else gets 403.
    pub fn set_rbac(&self, rules: Vec<PolicyRule>) {
        self.lock().rbac = Some(rules);
    }

    /// Drops the RBAC rules and the denials: everything is allowed again.
    pub fn allow_all(&self) {
        let mut st = self.lock();
        st.rbac = None;
        st.denied.clear();
    }

    /// Denies `verb` on `resource` (`pods`, `pods/status`, `events`, `*`) in
    /// every API group, on top of the rules.
    pub fn deny(&self, verb: &str, resource: &str) {
        self.lock().denied.push((verb.to_string(), resource.to_string()));
    }
}

fn from<K: FakeResource>(v: Result<Value, store::ApiError>) -> K {
    let v = v.unwrap_or_else(|e| panic!("fakeapi: {}", e.message));
    serde_json::from_value(v).expect("stored object decodes")
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accepts and serves until `stop`; then resets every connection still open
/// and returns, which closes the listener.
async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: tokio::sync::oneshot::Receiver<()>) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let (reset, _) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = conns.join_next() => {}
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                // A second handle on the socket, to reset it on stop while hyper owns the first.
                let Ok((stream, twin)) = twins(stream) else { continue };
                let shared = Arc::clone(&shared);
                let mut reset = reset.subscribe();
                conns.spawn(async move {
                    let svc = service_fn(move |req| http::handle(Arc::clone(&shared), req));
                    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = &mut conn => {}
                        _ = reset.changed() => {
                            // Linger 0: the last close sends a RST, as for the sockets
                            // of a process that dies with data in flight.
                            if let Ok(twin) = tokio::net::TcpStream::from_std(twin) {
                                let _ = twin.set_zero_linger();
                            }
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    reset.send_replace(true);
    while conns.join_next().await.is_some() {}
}

/// The stream, and a duplicate of its file descriptor.
fn twins(stream: tokio::net::TcpStream) -> std::io::Result<(tokio::net::TcpStream, std::net::TcpStream)> {
    let stream = stream.into_std()?;
    let twin = stream.try_clone()?;
    Ok((tokio::net::TcpStream::from_std(stream)?, twin))
}

#[cfg(test)]
mod tests;
