//! The object store: objects as JSON keyed by (resource, namespace, name), a
//! global resourceVersion, and the change history that watches replay.

use std::{
    collections::{BTreeMap, VecDeque},
    time::Instant,
};

use k8s_openapi::{
    api::{core, discovery, events, rbac::v1::PolicyRule},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::{SignedDuration, Timestamp},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Map, Value, json};

use super::{FakeApiServer, Outage, RecordedRequest};

/// The resources the fake API server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    /// core/v1 `pods` (with the `status` subresource)
    Pods,
    /// core/v1 `services` (with the `status` subresource)
    Services,
    /// discovery.k8s.io/v1 `endpointslices`
    EndpointSlices,
    /// events.k8s.io/v1 `events`
    Events,
    /// core/v1 `events` (kept apart from events.k8s.io ones)
    CoreEvents,
}

impl Resource {
    pub const ALL: [Resource; 5] =
        [Self::Pods, Self::Services, Self::EndpointSlices, Self::Events, Self::CoreEvents];

    /// The API group, `""` for core.
    #[must_use]
    pub fn group(self) -> &'static str {
        match self {
            Self::Pods | Self::Services | Self::CoreEvents => "",
            Self::EndpointSlices => "discovery.k8s.io",
            Self::Events => "events.k8s.io",
        }
    }

    #[must_use]
    #[allow(clippy::unused_self)] // every served resource is v1 today
    pub fn version(self) -> &'static str {
        "v1"
    }

    /// `apiVersion` as it appears in objects.
    #[must_use]
    pub fn api_version(self) -> &'static str {
        match self {
            Self::Pods | Self::Services | Self::CoreEvents => "v1",
            Self::EndpointSlices => "discovery.k8s.io/v1",
            Self::Events => "events.k8s.io/v1",
        }
    }

    #[must_use]
    pub fn plural(self) -> &'static str {
        match self {
            Self::Pods => "pods",
            Self::Services => "services",
            Self::EndpointSlices => "endpointslices",
            Self::Events | Self::CoreEvents => "events",
        }
    }

    #[must_use]
    pub fn kind(self) -> &'static str {
        match self {
            Self::Pods => "Pod",
            Self::Services => "Service",
            Self::EndpointSlices => "EndpointSlice",
            Self::Events | Self::CoreEvents => "Event",
        }
    }

    /// Whether the resource has a `status` subresource (and so the main
    /// resource ignores status changes, and `/status` ignores everything else).
    #[must_use]
    pub fn has_status(self) -> bool {
        matches!(self, Self::Pods | Self::Services)
    }

    #[must_use]
    pub fn lookup(group: &str, version: &str, plural: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|r| r.group() == group && r.version() == version && r.plural() == plural)
    }

    /// Decodes and re-encodes through the k8s-openapi type, as the apiserver
    /// decodes every object it stores: a malformed object is rejected, unknown
    /// fields are dropped.
    pub(crate) fn normalize(self, v: Value) -> Result<Value, String> {
        fn rt<K: Serialize + DeserializeOwned>(v: Value) -> Result<Value, String> {
            let k: K = serde_json::from_value(v).map_err(|e| e.to_string())?;
            serde_json::to_value(k).map_err(|e| e.to_string())
        }
        match self {
            Self::Pods => rt::<core::v1::Pod>(v),
            Self::Services => rt::<core::v1::Service>(v),
            Self::EndpointSlices => rt::<discovery::v1::EndpointSlice>(v),
            Self::Events => rt::<events::v1::Event>(v),
            Self::CoreEvents => rt::<core::v1::Event>(v),
        }
    }
}

/// A typed object the fake API server stores. Implemented for the k8s-openapi
/// types of every [`Resource`].
pub trait FakeResource:
    k8s_openapi::Resource + k8s_openapi::Metadata + Serialize + DeserializeOwned + Clone
{
    const RESOURCE: Resource;
}

impl FakeResource for core::v1::Pod {
    const RESOURCE: Resource = Resource::Pods;
}
impl FakeResource for core::v1::Service {
    const RESOURCE: Resource = Resource::Services;
}
impl FakeResource for discovery::v1::EndpointSlice {
    const RESOURCE: Resource = Resource::EndpointSlices;
}
impl FakeResource for events::v1::Event {
    const RESOURCE: Resource = Resource::Events;
}
impl FakeResource for core::v1::Event {
    const RESOURCE: Resource = Resource::CoreEvents;
}

/// An error answered as a `Status` object.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into(), details: None }
    }

    pub fn with_details(mut self, r: Resource, name: Option<&str>) -> Self {
        let mut d = json!({ "kind": r.plural() });
        if !r.group().is_empty() {
            d["group"] = json!(r.group());
        }
        if let Some(name) = name {
            d["name"] = json!(name);
        }
        self.details = Some(d);
        self
    }

    pub fn not_found(r: Resource, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{} \"{name}\" not found", qualified(r)))
            .with_details(r, Some(name))
    }

    pub fn already_exists(r: Resource, name: &str) -> Self {
        Self::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", qualified(r)))
            .with_details(r, Some(name))
    }

    pub fn conflict(r: Resource, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                qualified(r)
            ),
        )
        .with_details(r, Some(name))
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn invalid(r: Resource, name: &str, message: impl Into<String>) -> Self {
        Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {}", r.kind(), message.into()),
        )
        .with_details(r, Some(name))
    }

    /// The `Status` object, as the apiserver writes it.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

/// `pods` or `endpointslices.discovery.k8s.io`, as apiserver messages spell it.
pub(crate) fn qualified(r: Resource) -> String {
    if r.group().is_empty() {
        r.plural().to_string()
    } else {
        format!("{}.{}", r.plural(), r.group())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One entry of the history log. `new` is the object after the change (for a
/// deletion: the last state, carrying the deletion's resourceVersion).
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub resource: Resource,
    pub kind: ChangeKind,
    pub old: Option<Value>,
    pub new: Value,
}

pub(crate) type Key = (Resource, String, String);

/// How many changes the history keeps before it compacts itself.
const HISTORY_LIMIT: usize = 50_000;

#[derive(Default)]
pub(crate) struct State {
    /// The global resourceVersion: the last one handed out.
    pub rv: u64,
    /// A watch from a resourceVersion older than this gets 410 Expired.
    pub compacted_rv: u64,
    /// Bumped to end every open watch (outage, compaction).
    pub epoch: u64,
    pub outage: Option<Outage>,
    pub objects: BTreeMap<Key, Value>,
    pub history: VecDeque<Change>,
    /// `None`: everything is allowed.
    pub rbac: Option<Vec<PolicyRule>>,
    /// (verb, resource[/subresource]) pairs denied on top of `rbac`.
    pub denied: Vec<(String, String)>,
    pub requests: Vec<RecordedRequest>,
    /// When each request was recorded, appended in step with `requests`.
    /// Clearing the requests leaves these, so they are matched from the end.
    request_times: Vec<Instant>,
    counter: u64,
}

pub(crate) fn now() -> Value {
    serde_json::to_value(Time(Timestamp::now())).expect("time serializes")
}

pub(crate) fn now_plus(secs: i64) -> Value {
    let t = Timestamp::now()
        .checked_add(SignedDuration::from_secs(secs))
        .unwrap_or(Timestamp::MAX);
    serde_json::to_value(Time(t)).expect("time serializes")
}

pub(crate) fn meta(obj: &Value) -> &Value {
    &obj["metadata"]
}

pub(crate) fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    let m = obj.as_object_mut().expect("object");
    let md = m.entry("metadata").or_insert_with(|| json!({}));
    if !md.is_object() {
        *md = json!({});
    }
    md.as_object_mut().expect("object")
}

pub(crate) fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    meta(obj)[field].as_str()
}

impl State {
    /// Records a request, answered (and applied to the store) now.
    pub fn record(&mut self, rec: RecordedRequest) {
        self.requests.push(rec);
        self.request_times.push(Instant::now());
    }

    fn next_counter(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    fn uid(&mut self) -> String {
        let n = self.next_counter();
        let t = Timestamp::now().as_nanosecond().unsigned_abs();
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            std::process::id(),
            (t >> 16) & 0xffff,
            (t >> 4) & 0xfff,
            n & 0xfff,
            n
        )
    }

    fn name_suffix(&mut self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        #[allow(clippy::cast_possible_truncation)] // only mixing bits
        let mut x = self
            .next_counter()
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(Timestamp::now().as_nanosecond().unsigned_abs() as u64);
        (0..5)
            .map(|_| {
                let c = ALPHABET[usize::try_from(x % ALPHABET.len() as u64).unwrap_or(0)] as char;
                x /= ALPHABET.len() as u64;
                c
            })
            .collect()
    }

    fn push(&mut self, change: Change) {
        self.history.push_back(change);
        while self.history.len() > HISTORY_LIMIT {
            if let Some(c) = self.history.pop_front() {
                self.compacted_rv = c.rv;
            }
        }
    }

    pub fn get(&self, r: Resource, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(r, ns.to_string(), name.to_string()))
    }

    /// Every object of `r`, in `ns` if given, sorted by namespace and name.
    pub fn list(&self, r: Resource, ns: Option<&str>) -> impl Iterator<Item = &Value> {
        self.objects
            .iter()
            .filter(move |((res, n, _), _)| *res == r && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v)
    }

    /// Creates an object in `ns`, filling in what the apiserver fills in.
    pub fn create(&mut self, r: Resource, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body of the request is not a JSON object"));
        }
        if let Some(k) = obj["kind"].as_str()
            && k != r.kind()
        {
            return Err(ApiError::bad_request(format!(
                "the kind {k:?} does not match the resource {}",
                qualified(r)
            )));
        }
        let name = match (meta_str(&obj, "name"), meta_str(&obj, "generateName")) {
            (Some(n), _) if !n.is_empty() => n.to_string(),
            (_, Some(g)) if !g.is_empty() => {
                let g = g.to_string();
                format!("{g}{}", self.name_suffix())
            }
            _ => {
                return Err(ApiError::invalid(
                    r,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
        };
        match meta_str(&obj, "namespace") {
            Some(n) if !n.is_empty() && n != ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => {}
        }
        if self.get(r, ns, &name).is_some() {
            return Err(ApiError::already_exists(r, &name));
        }
        let uid = self.uid();
        let rv = self.rv + 1;
        {
            let m = obj.as_object_mut().expect("object");
            m.insert("kind".into(), json!(r.kind()));
            m.insert("apiVersion".into(), json!(r.api_version()));
        }
        let md = meta_mut(&mut obj);
        md.insert("name".into(), json!(name));
        md.insert("namespace".into(), json!(ns));
        md.insert("uid".into(), json!(uid));
        md.insert("resourceVersion".into(), json!(rv.to_string()));
        md.insert("creationTimestamp".into(), now());
        md.remove("managedFields");
        md.remove("selfLink");
        let obj = r.normalize(obj).map_err(|e| ApiError::invalid(r, &name, e))?;
        self.rv = rv;
        self.objects.insert((r, ns.to_string(), name), obj.clone());
        self.push(Change { rv, resource: r, kind: ChangeKind::Added, old: None, new: obj.clone() });
        Ok(obj)
    }

    /// Stores a new state of an existing object. Identity fields are kept from
    /// the stored object; an update that changes nothing is a no-op that keeps
    /// the resourceVersion, as on a real apiserver.
    pub fn replace(&mut self, r: Resource, ns: &str, name: &str, mut new: Value) -> Result<Value, ApiError> {
        let Some(old) = self.get(r, ns, name).cloned() else {
            return Err(ApiError::not_found(r, name));
        };
        if !new.is_object() {
            return Err(ApiError::bad_request("the body of the request is not a JSON object"));
        }
        {
            let m = new.as_object_mut().expect("object");
            m.insert("kind".into(), json!(r.kind()));
            m.insert("apiVersion".into(), json!(r.api_version()));
        }
        let md = meta_mut(&mut new);
        for f in ["name", "namespace", "uid", "creationTimestamp", "resourceVersion"] {
            match old["metadata"].get(f) {
                Some(v) => md.insert(f.into(), v.clone()),
                None => md.remove(f),
            };
        }
        md.remove("selfLink");
        let new = r.normalize(new).map_err(|e| ApiError::invalid(r, name, e))?;
        if new == old {
            return Ok(old);
        }
        self.rv += 1;
        let rv = self.rv;
        let mut new = new;
        meta_mut(&mut new).insert("resourceVersion".into(), json!(rv.to_string()));
        self.objects.insert((r, ns.to_string(), name.to_string()), new.clone());
        self.push(Change { rv, resource: r, kind: ChangeKind::Modified, old: Some(old), new: new.clone() });
        Ok(new)
    }

    /// Removes an object; its last state, with the deletion's
    /// resourceVersion, goes to watchers in a DELETED event.
    pub fn remove(&mut self, r: Resource, ns: &str, name: &str) -> Result<Value, ApiError> {
        let Some(old) = self.objects.remove(&(r, ns.to_string(), name.to_string())) else {
            return Err(ApiError::not_found(r, name));
        };
        self.rv += 1;
        let rv = self.rv;
        let mut gone = old.clone();
        meta_mut(&mut gone).insert("resourceVersion".into(), json!(rv.to_string()));
        self.push(Change { rv, resource: r, kind: ChangeKind::Deleted, old: Some(old), new: gone.clone() });
        Ok(gone)
    }

    /// Graceful pod deletion: sets `deletionTimestamp` (now + grace) and
    /// `deletionGracePeriodSeconds`. A second call only ever shortens it.
    pub fn mark_deleted(&mut self, r: Resource, ns: &str, name: &str, grace: i64) -> Result<Value, ApiError> {
        let Some(mut obj) = self.get(r, ns, name).cloned() else {
            return Err(ApiError::not_found(r, name));
        };
        let md = meta_mut(&mut obj);
        let current = md.get("deletionGracePeriodSeconds").and_then(Value::as_i64);
        if md.contains_key("deletionTimestamp") && current.is_some_and(|c| c <= grace) {
            return Ok(obj);
        }
        md.insert("deletionTimestamp".into(), now_plus(grace));
        md.insert("deletionGracePeriodSeconds".into(), json!(grace));
        self.replace(r, ns, name, obj)
    }

    /// Forgets the history: every watch from a resourceVersion before now
    /// gets 410 Expired, and open watches end.
    pub fn compact(&mut self) {
        self.rv += 1;
        self.compacted_rv = self.rv;
        self.history.clear();
        self.epoch += 1;
    }

    /// Whether (verb, group, resource[/sub]) is allowed by the RBAC rules.
    pub fn allowed(&self, verb: &str, group: &str, resource: &str) -> bool {
        let hit = |list: &[String], want: &str| list.iter().any(|x| x == "*" || x == want);
        if self
            .denied
            .iter()
            .any(|(v, res)| (v == "*" || v == verb) && (res == "*" || res == resource))
        {
            return false;
        }
        let Some(rules) = &self.rbac else { return true };
        rules.iter().any(|rule| {
            hit(&rule.verbs, verb)
                && rule.api_groups.as_deref().is_some_and(|g| hit(g, group))
                && rule.resources.as_deref().is_some_and(|rs| {
                    rs.iter().any(|x| {
                        x == "*"
                            || x == resource
                            || (x.starts_with("*/") && resource.split_once('/').is_some_and(|(_, s)| s == &x[2..]))
                    })
                })
        })
    }
}

impl FakeApiServer {
    /// Every request answered so far, in order, with when it was recorded:
    /// after its answer was made, so for a write, once the store has it.
    #[must_use]
    pub fn requests_at(&self) -> Vec<(Instant, RecordedRequest)> {
        let st = self.lock();
        let skip = st.request_times.len().saturating_sub(st.requests.len());
        st.request_times[skip..].iter().copied().zip(st.requests.iter().cloned()).collect()
    }
}
