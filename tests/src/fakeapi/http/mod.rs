//! The HTTP side: routing, the verbs, and watch streams.

mod watch;

use std::{
    collections::HashMap,
    io,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    header::{self, HeaderValue},
};
use serde_json::{Value, json};
use tokio::{sync::mpsc, time::Instant};

use super::{
    Outage, RecordedRequest, Shared,
    patch::{merge_patch, strategic_merge},
    select::Selector,
    store::{ApiError, ChangeKind, Resource, State, meta_mut, meta_str, qualified},
};

use watch::watch_start;

pub(crate) type Body = UnsyncBoxBody<Bytes, io::Error>;

/// The user every request is authenticated as (it appears in 403 messages).
pub(crate) const USER: &str = "system:serviceaccount:kube-system:conndrain";

/// How often a watch that allows bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

/// The apiserver's default watch timeout when the client asks for none.
const DEFAULT_WATCH_TIMEOUT: u64 = 1800;

struct Ctx {
    method: Method,
    path: String,
    query: String,
    params: HashMap<String, String>,
    content_type: Option<String>,
    accept: String,
    host: String,
    body: Bytes,
}

impl Ctx {
    fn param(&self, k: &str) -> Option<&str> {
        self.params.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// Whether the client asked for `PartialObjectMetadata` (metadata-only
    /// list and watch).
    fn partial(&self) -> bool {
        self.accept.contains("as=PartialObjectMetadata")
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_vec(v).expect("json")));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    r
}

fn error(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

pub(crate) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, io::Error> {
    let hdr = |name: header::HeaderName| {
        req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
    };
    let content_type = hdr(header::CONTENT_TYPE);
    let accept = hdr(header::ACCEPT).unwrap_or_default();
    let host = hdr(header::HOST).unwrap_or_default();
    let auth = hdr(header::AUTHORIZATION);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let body = req.into_body().collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
    let params = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let ctx = Ctx { method, path, query, params, content_type, accept, host, body };

    let outage = shared.lock().outage;
    let (verb, resp) = if outage == Some(Outage::Reset) {
        let rec = RecordedRequest {
            method: ctx.method.to_string(),
            path: ctx.path,
            query: ctx.query,
            verb: String::new(),
            status: 0,
            content_type: ctx.content_type,
            body: String::from_utf8_lossy(&ctx.body).into_owned(),
        };
        shared.lock().record(rec);
        // hyper closes the connection without an answer.
        return Err(io::Error::other("the fake apiserver is unreachable"));
    } else if outage == Some(Outage::Unavailable) {
        let e = ApiError::new(503, "ServiceUnavailable", "the fake apiserver is down");
        (String::new(), error(&e))
    } else if auth.as_deref() != Some(&format!("Bearer {}", shared.token)) {
        (String::new(), error(&ApiError::new(401, "Unauthorized", "Unauthorized")))
    } else {
        dispatch(&shared, &ctx)
    };

    let rec = RecordedRequest {
        method: ctx.method.to_string(),
        path: ctx.path,
        query: ctx.query,
        verb,
        status: resp.status().as_u16(),
        content_type: ctx.content_type,
        body: String::from_utf8_lossy(&ctx.body).into_owned(),
    };
    shared.lock().record(rec);
    Ok(resp)
}

struct Target {
    resource: Resource,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

enum Route {
    Version,
    Api,
    Apis,
    Resources(String, String),
    Target(Target),
    NotFound,
}

fn route(path: &str) -> Route {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["version"] => Route::Version,
        ["api"] => Route::Api,
        ["apis"] => Route::Apis,
        ["api", v] => Route::Resources(String::new(), (*v).to_string()),
        ["apis", g, v] => Route::Resources((*g).to_string(), (*v).to_string()),
        ["api", v, rest @ ..] => target("", v, rest),
        ["apis", g, v, rest @ ..] => target(g, v, rest),
        _ => Route::NotFound,
    }
}

fn target(group: &str, version: &str, rest: &[&str]) -> Route {
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match (rest, &ns) {
        ([plural], _) => (*plural, None, None),
        ([plural, name], Some(_)) => (*plural, Some((*name).to_string()), None),
        ([plural, name, sub], Some(_)) => (*plural, Some((*name).to_string()), Some((*sub).to_string())),
        _ => return Route::NotFound,
    };
    match Resource::lookup(group, version, plural) {
        Some(resource) => Route::Target(Target { resource, ns, name, sub }),
        None => Route::NotFound,
    }
}

fn not_found() -> ApiError {
    let mut e = ApiError::new(404, "NotFound", "the server could not find the requested resource");
    e.details = Some(json!({}));
    e
}

fn dispatch(shared: &Arc<Shared>, ctx: &Ctx) -> (String, Response<Body>) {
    if ctx.method != Method::GET
        && !matches!(route(&ctx.path), Route::Target(_))
    {
        return (String::new(), error(&not_found()));
    }
    let body = match route(&ctx.path) {
        Route::Version => json!({
            "major": "1", "minor": "35", "gitVersion": "v1.35.0-fakeapi",
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24.0", "compiler": "gc",
            "platform": "linux/amd64",
        }),
        Route::Api => json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ctx.host}],
        }),
        Route::Apis => {
            let mut groups: Vec<&str> = Resource::ALL.iter().map(|r| r.group()).filter(|g| !g.is_empty()).collect();
            groups.dedup();
            let groups: Vec<Value> = groups
                .into_iter()
                .map(|g| {
                    let gv = json!({"groupVersion": format!("{g}/v1"), "version": "v1"});
                    json!({"name": g, "versions": [gv], "preferredVersion": gv})
                })
                .collect();
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        }
        Route::Resources(g, v) => {
            let mut resources = Vec::new();
            for r in Resource::ALL.into_iter().filter(|r| r.group() == g && r.version() == v) {
                resources.push(json!({
                    "name": r.plural(), "singularName": r.kind().to_lowercase(), "namespaced": true,
                    "kind": r.kind(),
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                }));
                if r.has_status() {
                    resources.push(json!({
                        "name": format!("{}/status", r.plural()), "singularName": "", "namespaced": true,
                        "kind": r.kind(), "verbs": ["get", "patch", "update"],
                    }));
                }
            }
            if resources.is_empty() {
                return (String::new(), error(&not_found()));
            }
            let gv = if g.is_empty() { v } else { format!("{g}/{v}") };
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
        }
        Route::Target(t) => return resource(shared, ctx, &t),
        Route::NotFound => return (String::new(), error(&not_found())),
    };
    (String::new(), json_response(200, &body))
}

fn forbidden(verb: &str, t: &Target, rbac_resource: &str) -> ApiError {
    let r = t.resource;
    let subject = match &t.name {
        Some(n) => format!("{} \"{n}\"", qualified(r)),
        None => qualified(r),
    };
    let scope = match &t.ns {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_string(),
    };
    ApiError::new(
        403,
        "Forbidden",
        format!(
            "{subject} is forbidden: User \"{USER}\" cannot {verb} resource \"{rbac_resource}\" in API group \"{}\" {scope}",
            r.group()
        ),
    )
    .with_details(r, t.name.as_deref())
}

fn resource(shared: &Arc<Shared>, ctx: &Ctx, t: &Target) -> (String, Response<Body>) {
    let watch = matches!(ctx.param("watch"), Some("true" | "1"));
    let verb = match (&ctx.method, t.name.is_some()) {
        (&Method::GET, false) if watch => "watch",
        (&Method::GET, false) => "list",
        (&Method::GET, true) => "get",
        (&Method::POST, false) => "create",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => {
            let e = ApiError::new(405, "MethodNotAllowed", "the server does not allow this method on the requested resource");
            return (String::new(), error(&e));
        }
    };
    let r = t.resource;
    let rbac_resource = match &t.sub {
        None => r.plural().to_string(),
        Some(s) if s == "status" && r.has_status() && matches!(verb, "get" | "update" | "patch") => {
            format!("{}/{s}", r.plural())
        }
        Some(_) => return (verb.into(), error(&not_found())),
    };
    if !shared.lock().allowed(verb, r.group(), &rbac_resource) {
        return (verb.into(), error(&forbidden(verb, t, &rbac_resource)));
    }
    let result = match verb {
        "watch" => return (verb.into(), watch_start(shared, ctx, t)),
        "list" => list(shared, ctx, t),
        "get" => get(&shared.lock(), t),
        "create" => create(shared, ctx, t),
        "update" => update(shared, ctx, t),
        "patch" => patch(shared, ctx, t),
        "delete" => delete(shared, ctx, t),
        _ => Err(ApiError::new(405, "MethodNotAllowed", format!("{verb} is not supported by the fake apiserver"))),
    };
    let resp = match result {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => error(&e),
    };
    (verb.into(), resp)
}

type Answer = Result<(u16, Value), ApiError>;

fn ns_name(t: &Target) -> (&str, &str) {
    (t.ns.as_deref().unwrap_or("default"), t.name.as_deref().unwrap_or(""))
}

fn body_json(ctx: &Ctx) -> Result<Value, ApiError> {
    serde_json::from_slice(&ctx.body)
        .map_err(|e| ApiError::bad_request(format!("the body of the request could not be decoded: {e}")))
}

fn selector(ctx: &Ctx, t: &Target) -> Result<Selector, ApiError> {
    Selector::parse(t.ns.as_deref(), ctx.param("fieldSelector"), ctx.param("labelSelector"))
        .map_err(ApiError::bad_request)
}

fn partial(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]})
}

fn list(shared: &Arc<Shared>, ctx: &Ctx, t: &Target) -> Answer {
    let sel = selector(ctx, t)?;
    let st = shared.lock();
    let items: Vec<Value> = st
        .list(t.resource, t.ns.as_deref())
        .filter(|o| sel.matches(o))
        .map(|o| if ctx.partial() { partial(o) } else { o.clone() })
        .collect();
    let (kind, api_version) = if ctx.partial() {
        ("PartialObjectMetadataList".to_string(), "meta.k8s.io/v1")
    } else {
        (format!("{}List", t.resource.kind()), t.resource.api_version())
    };
    Ok((200, json!({
        "kind": kind, "apiVersion": api_version,
        "metadata": {"resourceVersion": st.rv.to_string()},
        "items": items,
    })))
}

fn get(st: &State, t: &Target) -> Answer {
    let (ns, name) = ns_name(t);
    st.get(t.resource, ns, name)
        .map(|o| (200, o.clone()))
        .ok_or_else(|| ApiError::not_found(t.resource, name))
}

fn create(shared: &Arc<Shared>, ctx: &Ctx, t: &Target) -> Answer {
    let Some(ns) = t.ns.as_deref() else {
        return Err(ApiError::new(405, "MethodNotAllowed", "create needs a namespace"));
    };
    let obj = body_json(ctx)?;
    let created = shared.lock().create(t.resource, ns, obj)?;
    shared.notify();
    Ok((201, created))
}

/// Applies the status-subresource rule: `/status` only changes status, the
/// main resource never does.
fn restrict(t: &Target, old: &Value, mut new: Value) -> Value {
    if !t.resource.has_status() {
        return new;
    }
    if t.sub.is_some() {
        let mut out = old.clone();
        match new.get("status") {
            Some(s) => out["status"] = s.clone(),
            None => {
                out.as_object_mut().map(|o| o.remove("status"));
            }
        }
        out
    } else {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                new.as_object_mut().map(|o| o.remove("status"));
            }
        }
        new
    }
}

fn check_rv(t: &Target, old: &Value, given: Option<&str>) -> Result<(), ApiError> {
    match given {
        Some(rv) if Some(rv) != meta_str(old, "resourceVersion") => {
            Err(ApiError::conflict(t.resource, ns_name(t).1))
        }
        _ => Ok(()),
    }
}

fn store(shared: &Arc<Shared>, ctx: &Ctx, t: &Target, st: &mut State, new: Value) -> Answer {
    let (ns, name) = ns_name(t);
    if ctx.param("dryRun").is_some() {
        let mut v = t.resource.normalize(new).map_err(|e| ApiError::invalid(t.resource, name, e))?;
        let old_rv = st.get(t.resource, ns, name).and_then(|o| meta_str(o, "resourceVersion")).map(str::to_string);
        if let Some(rv) = old_rv {
            meta_mut(&mut v).insert("resourceVersion".into(), json!(rv));
        }
        return Ok((200, v));
    }
    let v = st.replace(t.resource, ns, name, new)?;
    shared.notify();
    Ok((200, v))
}

fn update(shared: &Arc<Shared>, ctx: &Ctx, t: &Target) -> Answer {
    let (ns, name) = ns_name(t);
    let body = body_json(ctx)?;
    if let Some(n) = meta_str(&body, "name")
        && n != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({name})"
        )));
    }
    let mut st = shared.lock();
    let old = st.get(t.resource, ns, name).cloned().ok_or_else(|| ApiError::not_found(t.resource, name))?;
    let Some(rv) = meta_str(&body, "resourceVersion").filter(|s| !s.is_empty()) else {
        return Err(ApiError::invalid(
            t.resource,
            name,
            "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
        ));
    };
    check_rv(t, &old, Some(rv))?;
    let new = restrict(t, &old, body);
    store(shared, ctx, t, &mut st, new)
}

fn patch(shared: &Arc<Shared>, ctx: &Ctx, t: &Target) -> Answer {
    let (ns, name) = ns_name(t);
    let ct = ctx.content_type.as_deref().unwrap_or("");
    let ct = ct.split(';').next().unwrap_or("").trim();
    let apply = match ct {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => false,
        "application/apply-patch+yaml" => true,
        _ => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format ({ct}) - accepted media types include: \
                     application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml"
                ),
            ));
        }
    };
    let body = serde_json::from_slice::<Value>(&ctx.body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body of the request could not be decoded as JSON (the fake apiserver takes apply patches as JSON only): {e}"
        ))
    })?;
    if !body.is_object() {
        return Err(ApiError::bad_request("the patch is not a JSON object"));
    }
    if apply && ctx.param("fieldManager").is_none() {
        return Err(ApiError::new(
            422,
            "Invalid",
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    }
    let mut st = shared.lock();
    let Some(old) = st.get(t.resource, ns, name).cloned() else {
        if apply && t.sub.is_none() {
            let mut obj = body;
            let md = meta_mut(&mut obj);
            md.insert("name".into(), json!(name));
            md.entry("namespace").or_insert_with(|| json!(ns));
            if ctx.param("dryRun").is_some() {
                return Ok((201, obj));
            }
            let created = st.create(t.resource, ns, obj)?;
            drop(st);
            shared.notify();
            return Ok((201, created));
        }
        return Err(ApiError::not_found(t.resource, name));
    };
    check_rv(t, &old, meta_str(&body, "resourceVersion"))?;
    let mut merged = old.clone();
    if ct == "application/merge-patch+json" {
        merge_patch(&mut merged, &body);
    } else {
        strategic_merge(&mut merged, &body);
    }
    let new = restrict(t, &old, merged);
    store(shared, ctx, t, &mut st, new)
}

fn delete(shared: &Arc<Shared>, ctx: &Ctx, t: &Target) -> Answer {
    let (ns, name) = ns_name(t);
    let opts: Value = if ctx.body.is_empty() { json!({}) } else { body_json(ctx)? };
    let mut st = shared.lock();
    let obj = st.get(t.resource, ns, name).cloned().ok_or_else(|| ApiError::not_found(t.resource, name))?;
    if let Some(rv) = opts["preconditions"]["resourceVersion"].as_str() {
        check_rv(t, &obj, Some(rv))?;
    }
    if let Some(uid) = opts["preconditions"]["uid"].as_str()
        && Some(uid) != meta_str(&obj, "uid")
    {
        return Err(ApiError::conflict(t.resource, name));
    }
    let out = if ctx.param("dryRun").is_some() {
        obj
    } else if t.resource == Resource::Pods {
        // The apiserver deletes a pod gracefully when it is bound to a node
        // and the grace period is not 0: the kubelet finishes the deletion.
        let grace = opts["gracePeriodSeconds"]
            .as_i64()
            .or_else(|| obj["spec"]["terminationGracePeriodSeconds"].as_i64())
            .unwrap_or(30);
        let bound = obj["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty());
        if bound && grace > 0 {
            st.mark_deleted(t.resource, ns, name, grace)?
        } else {
            st.remove(t.resource, ns, name)?
        }
    } else {
        st.remove(t.resource, ns, name)?
    };
    drop(st);
    shared.notify();
    Ok((200, out))
}
