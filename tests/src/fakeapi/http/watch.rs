//! WATCH: the event stream, bookmarks, 410 Expired after a compaction.

use super::*;

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).expect("json");
    b.push(b'\n');
    Bytes::from(b)
}

fn expired(rv: u64, oldest: u64) -> Bytes {
    let e = ApiError::new(410, "Expired", format!("too old resource version: {rv} ({oldest})"));
    line(&json!({"type": "ERROR", "object": e.status()}))
}

fn bookmark(r: Resource, rv: u64, initial_end: bool) -> Bytes {
    let mut md = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(&json!({"type": "BOOKMARK", "object": {"kind": r.kind(), "apiVersion": r.api_version(), "metadata": md}}))
}

fn streaming(rx: mpsc::Receiver<Result<Bytes, io::Error>>) -> Response<Body> {
    let mut rx = rx;
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(|r| r.map(Frame::data));
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    resp
}

struct WatchSpec {
    resource: Resource,
    sel: Selector,
    partial: bool,
    bookmarks: bool,
    deadline: Instant,
    epoch: u64,
}

impl WatchSpec {
    /// The event a watcher with this selector sees for a change, if any: an
    /// object that stops matching is DELETED for it, one that starts to
    /// match is ADDED.
    fn event(&self, kind: ChangeKind, old: Option<&Value>, new: &Value) -> Option<Bytes> {
        let was = old.is_some_and(|o| self.sel.matches(o));
        let is = self.sel.matches(new);
        let ty = match kind {
            ChangeKind::Added if is => "ADDED",
            ChangeKind::Modified => match (was, is) {
                (true, true) => "MODIFIED",
                (true, false) => "DELETED",
                (false, true) => "ADDED",
                (false, false) => return None,
            },
            ChangeKind::Deleted if was || is => "DELETED",
            _ => return None,
        };
        let obj = if self.partial { partial(new) } else { new.clone() };
        Some(line(&json!({"type": ty, "object": obj})))
    }
}

pub(super) fn watch_start(shared: &Arc<Shared>, ctx: &Ctx, t: &Target) -> Response<Body> {
    let sel = match selector(ctx, t) {
        Ok(s) => s,
        Err(e) => return error(&e),
    };
    let timeout = ctx.param("timeoutSeconds").and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_WATCH_TIMEOUT);
    let rv = ctx.param("resourceVersion").unwrap_or("0");
    let start = if rv == "0" {
        None
    } else {
        match rv.parse::<u64>() {
            Ok(v) => Some(v),
            Err(_) => return error(&ApiError::bad_request(format!("invalid resource version: {rv}"))),
        }
    };
    let send_initial = ctx.param("sendInitialEvents") == Some("true");
    let (tx, rx) = mpsc::channel(256);

    let st = shared.lock();
    let spec = WatchSpec {
        resource: t.resource,
        sel,
        partial: ctx.partial(),
        bookmarks: ctx.param("allowWatchBookmarks") == Some("true"),
        deadline: Instant::now() + Duration::from_secs(timeout),
        epoch: st.epoch,
    };
    let mut initial = Vec::new();
    let pos = match start {
        Some(s) if s < st.compacted_rv => {
            let _ = tx.try_send(Ok(expired(s, st.compacted_rv)));
            return streaming(rx);
        }
        Some(s) => s,
        None => {
            // From "0" (or none): synthetic ADDED events for what exists now.
            for o in st.list(t.resource, t.ns.as_deref()) {
                initial.extend(spec.event(ChangeKind::Added, None, o));
            }
            if send_initial {
                initial.push(bookmark(t.resource, st.rv, true));
            }
            st.rv
        }
    };
    drop(st);
    let open = OpenWatch::new(shared);
    tokio::spawn(async move {
        run_watch(&open.0, &tx, &spec, pos, initial).await;
    });
    streaming(rx)
}

/// Counts an open watch while it lives: also when its task is dropped
/// unfinished (the server stopped).
struct OpenWatch(Arc<Shared>);

impl OpenWatch {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.open_watches.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(shared))
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

enum End {
    Clean,
    Abort,
    Expired(u64, u64),
}

async fn run_watch(
    shared: &Shared,
    tx: &mpsc::Sender<Result<Bytes, io::Error>>,
    spec: &WatchSpec,
    mut pos: u64,
    initial: Vec<Bytes>,
) {
    for l in initial {
        if tx.send(Ok(l)).await.is_err() {
            return;
        }
    }
    let mut tick = shared.tick.subscribe();
    let mut next_bookmark = Instant::now() + BOOKMARK_EVERY;
    loop {
        tick.borrow_and_update();
        let (lines, end) = {
            let st = shared.lock();
            if st.epoch != spec.epoch {
                (Vec::new(), Some(if st.outage.is_some() { End::Abort } else { End::Clean }))
            } else if pos < st.compacted_rv {
                (Vec::new(), Some(End::Expired(pos, st.compacted_rv)))
            } else {
                let from = st.history.partition_point(|c| c.rv <= pos);
                let lines = st
                    .history
                    .range(from..)
                    .filter(|c| c.resource == spec.resource)
                    .filter_map(|c| spec.event(c.kind, c.old.as_ref(), &c.new))
                    .collect();
                pos = pos.max(st.rv);
                (lines, None)
            }
        };
        for l in lines {
            if tx.send(Ok(l)).await.is_err() {
                return;
            }
        }
        match end {
            None => {}
            Some(End::Clean) => return,
            Some(End::Abort) => {
                let _ = tx.send(Err(io::Error::other("the fake apiserver went down"))).await;
                return;
            }
            Some(End::Expired(rv, oldest)) => {
                let _ = tx.send(Ok(expired(rv, oldest))).await;
                return;
            }
        }
        tokio::select! {
            changed = tick.changed() => if changed.is_err() { return },
            () = tokio::time::sleep_until(next_bookmark), if spec.bookmarks => {
                next_bookmark = Instant::now() + BOOKMARK_EVERY;
                if tx.send(Ok(bookmark(spec.resource, pos, false))).await.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep_until(spec.deadline) => return,
            () = tx.closed() => return,
        }
    }
}
