//! Field and label selectors, as LIST and WATCH take them.

use serde_json::Value;

#[derive(Debug, Clone)]
enum FieldReq {
    Eq(String, String),
    Ne(String, String),
}

#[derive(Debug, Clone)]
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// What a LIST or WATCH selects: a namespace, fields and labels.
#[derive(Debug, Clone, Default)]
pub(crate) struct Selector {
    namespace: Option<String>,
    fields: Vec<FieldReq>,
    labels: Vec<LabelReq>,
}

/// A field of the object by its dotted path, as a string; a missing field is
/// the empty string (as for `spec.nodeName=` on an unscheduled pod).
fn field(obj: &Value, path: &str) -> String {
    let v = path.split('.').fold(obj, |v, k| &v[k]);
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    }
}

/// Splits on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter().map(str::trim).filter(|x| !x.is_empty()).collect()
}

fn set(s: &str) -> Result<Vec<String>, String> {
    let s = s.trim();
    let inner = s
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("unable to parse requirement: found '{s}', expected: '('"))?;
    Ok(inner.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect())
}

impl Selector {
    pub fn parse(namespace: Option<&str>, fields: Option<&str>, labels: Option<&str>) -> Result<Self, String> {
        let mut sel = Selector { namespace: namespace.map(str::to_string), ..Self::default() };
        for term in split_top(fields.unwrap_or("")) {
            let req = if let Some((k, v)) = term.split_once("!=") {
                FieldReq::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once("==") {
                FieldReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once('=') {
                FieldReq::Eq(k.trim().into(), v.trim().into())
            } else {
                return Err(format!("invalid selector: '{term}'; can't understand '{term}'"));
            };
            sel.fields.push(req);
        }
        for term in split_top(labels.unwrap_or("")) {
            let req = if let Some(k) = term.strip_prefix('!') {
                LabelReq::NotExists(k.trim().into())
            } else if let Some((k, v)) = term.split_once(" notin ") {
                LabelReq::NotIn(k.trim().into(), set(v)?)
            } else if let Some((k, v)) = term.split_once(" in ") {
                LabelReq::In(k.trim().into(), set(v)?)
            } else if let Some((k, v)) = term.split_once("!=") {
                LabelReq::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once("==") {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once('=') {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else {
                LabelReq::Exists(term.into())
            };
            sel.labels.push(req);
        }
        Ok(sel)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && obj["metadata"]["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        let fields_ok = self.fields.iter().all(|r| match r {
            FieldReq::Eq(k, v) => field(obj, k) == *v,
            FieldReq::Ne(k, v) => field(obj, k) != *v,
        });
        let labels = &obj["metadata"]["labels"];
        let label = |k: &str| labels[k].as_str();
        fields_ok
            && self.labels.iter().all(|r| match r {
                LabelReq::Eq(k, v) => label(k) == Some(v),
                LabelReq::Ne(k, v) => label(k) != Some(v),
                LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
                LabelReq::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
                LabelReq::Exists(k) => label(k).is_some(),
                LabelReq::NotExists(k) => label(k).is_none(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn selectors() {
        let pod = json!({"metadata": {"name": "a", "namespace": "ns", "labels": {"app": "web", "tier": "fe"}},
                         "spec": {"nodeName": "node-1"}});
        let m = |ns: Option<&str>, f: &str, l: &str| {
            Selector::parse(ns, Some(f), Some(l)).unwrap().matches(&pod)
        };
        assert!(m(None, "spec.nodeName=node-1", ""));
        assert!(m(Some("ns"), "spec.nodeName==node-1,metadata.name=a", ""));
        assert!(!m(Some("other"), "", ""));
        assert!(!m(None, "spec.nodeName!=node-1", ""));
        assert!(m(None, "", "app=web,tier in (fe, be),!missing,env notin (prod)"));
        assert!(!m(None, "", "app in (db)"));
        assert!(m(None, "", "app"));
    }
}
