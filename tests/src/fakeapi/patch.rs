//! Patches: JSON merge patch (RFC 7386), strategic merge patch, and
//! server-side apply approximated as a strategic merge.

use serde_json::{Map, Value};

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// The merge key of a list field, by its path from the object's root (list
/// elements add no path segment), as the Kubernetes types declare it
/// (`patchMergeKey` / `listMapKeys`).
fn merge_key(path: &str) -> Option<&'static str> {
    Some(match path {
        "status.conditions" => "type",
        "spec.containers" | "spec.initContainers" | "spec.ephemeralContainers" | "spec.volumes"
        | "spec.containers.env" | "spec.initContainers.env" | "spec.ephemeralContainers.env"
        | "status.containerStatuses" | "status.initContainerStatuses" => "name",
        "spec.containers.ports" | "spec.initContainers.ports" => "containerPort",
        "spec.containers.volumeMounts" | "spec.initContainers.volumeMounts" => "mountPath",
        "spec.ports" => "port",
        "status.podIPs" | "status.hostIPs" => "ip",
        "metadata.ownerReferences" => "uid",
        _ => return None,
    })
}

/// Lists of scalars merged as sets.
fn is_set(path: &str) -> bool {
    path == "metadata.finalizers"
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

fn directive(v: &Value) -> Option<&str> {
    v.get("$patch").and_then(Value::as_str)
}

/// Drops `$`-directives from a value that is inserted as a whole.
fn strip(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip).collect()),
        v => v.clone(),
    }
}

/// Kubernetes strategic merge patch, for the fields listed in `merge_key`;
/// other lists are replaced, maps are merged, `null` deletes. Supports the
/// `$patch: replace|delete` and `$deleteFromPrimitiveList/<field>` directives
/// and ignores `$setElementOrder/...` and `$retainKeys`.
pub(crate) fn strategic_merge(target: &mut Value, patch: &Value) {
    merge_at(target, patch, "");
}

fn merge_at(target: &mut Value, patch: &Value, at: &str) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if directive(patch) == Some("replace") || !target.is_object() {
        *target = strip(patch);
        return;
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in fields {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(cur)), Value::Array(del)) = (t.get_mut(field), v) {
                cur.retain(|x| !del.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        let sub = child(at, k);
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(_) if directive(v) == Some("delete") => {
                t.remove(k);
            }
            Value::Array(items) => {
                let cur = t.entry(k.clone()).or_insert(Value::Null);
                if let Some(key) = merge_key(&sub) {
                    merge_list(cur, items, key, &sub);
                } else if is_set(&sub) {
                    if !cur.is_array() {
                        *cur = Value::Array(Vec::new());
                    }
                    let cur = cur.as_array_mut().expect("array");
                    for x in items {
                        if !cur.contains(x) {
                            cur.push(x.clone());
                        }
                    }
                } else {
                    *cur = strip(v);
                }
            }
            Value::Object(_) => merge_at(t.entry(k.clone()).or_insert(Value::Null), v, &sub),
            v => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

fn merge_list(cur: &mut Value, items: &[Value], key: &str, path: &str) {
    if items.iter().any(|i| directive(i) == Some("replace")) {
        *cur = Value::Array(
            items.iter().filter(|i| directive(i).is_none()).map(strip).collect(),
        );
        return;
    }
    if !cur.is_array() {
        *cur = Value::Array(Vec::new());
    }
    let list = cur.as_array_mut().expect("array");
    for item in items {
        let Some(id) = item.get(key) else {
            list.push(strip(item));
            continue;
        };
        let pos = list.iter().position(|x| x.get(key) == Some(id));
        match (pos, directive(item)) {
            (Some(i), Some("delete")) => {
                list.remove(i);
            }
            (None, Some("delete")) => {}
            (Some(i), _) => merge_at(&mut list[i], item, path),
            (None, _) => list.push(strip(item)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
    }

    #[test]
    fn strategic_conditions_by_type() {
        let mut t = json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True"}, {"type": "X", "status": "False"}]}});
        strategic_merge(&mut t, &json!({"status": {"conditions": [
            {"type": "X", "status": "True"}, {"type": "conndrain.io/Drained", "status": "True"}]}}));
        assert_eq!(t, json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True"}, {"type": "X", "status": "True"},
            {"type": "conndrain.io/Drained", "status": "True"}]}}));
        strategic_merge(&mut t, &json!({"status": {"conditions": [{"type": "X", "$patch": "delete"}],
            "$setElementOrder/conditions": [{"type": "Ready"}]}}));
        assert_eq!(t["status"]["conditions"].as_array().unwrap().len(), 2);
    }
}
