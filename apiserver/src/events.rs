//! `events.k8s.io/v1` Events: the same objects as the core group's Events, stored once in
//! the core form (as Kubernetes stores them, under `/registry/events/`) and converted at
//! the edge. The two forms differ only in the names of some top-level fields, so requests
//! (bodies, patches, field selectors) are renamed into the core form, served by the core
//! resource, and answers (objects, lists, watch events, errors) renamed back.
//!
//! Not converted: managedFields entries keep the core field names they were recorded with.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::status::ApiError;

/// Top-level fields named differently: (events.k8s.io/v1, core/v1).
const RENAMES: [(&str, &str); 7] = [
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

pub const API_VERSION: &str = "events.k8s.io/v1";

fn core_name(name: &str) -> &str {
    RENAMES
        .iter()
        .find(|(new, _)| *new == name)
        .map_or(name, |(_, core)| core)
}

fn new_name(name: &str) -> &str {
    RENAMES
        .iter()
        .find(|(_, core)| *core == name)
        .map_or(name, |(new, _)| new)
}

fn rename_keys(m: &mut Map<String, Value>, rename: fn(&str) -> &str) {
    let keys: Vec<String> = m.keys().cloned().collect();
    for k in keys {
        let to = rename(&k);
        if to != k {
            if let Some(v) = m.remove(&k) {
                m.insert(to.to_string(), v);
            }
        }
    }
}

/// An events.k8s.io/v1 Event (or a partial one: a patch) in the core form.
pub fn to_core(obj: &mut Value) {
    if let Some(m) = obj.as_object_mut() {
        rename_keys(m, core_name);
        if m.contains_key("apiVersion") {
            m.insert("apiVersion".into(), Value::String("v1".into()));
        }
    }
}

/// A core Event in the events.k8s.io/v1 form.
pub fn from_core(obj: &mut Value) {
    if let Some(m) = obj.as_object_mut() {
        rename_keys(m, new_name);
        m.insert("apiVersion".into(), Value::String(API_VERSION.into()));
    }
}

/// What Kubernetes requires of an events.k8s.io/v1 Event it is given.
pub fn validate(obj: &Value) -> Vec<(String, String)> {
    let mut causes = Vec::new();
    let text = |f: &str| obj.get(f).and_then(Value::as_str).unwrap_or("");
    if obj.get("eventTime").is_none_or(Value::is_null) {
        causes.push(("eventTime".into(), "Required value".into()));
    }
    for field in [
        "reportingController",
        "reportingInstance",
        "action",
        "reason",
    ] {
        let v = text(field);
        if v.is_empty() {
            causes.push((field.into(), "Required value".into()));
        } else if v.len() > 128 && field != "reportingController" {
            causes.push((
                field.into(),
                "Too long: may not be more than 128 bytes".into(),
            ));
        }
    }
    let kind = text("type");
    if kind != "Normal" && kind != "Warning" {
        causes.push((
            "type".into(),
            format!("Unsupported value: \"{kind}\": supported values: \"Normal\", \"Warning\""),
        ));
    }
    if text("note").len() > 1024 {
        causes.push((
            "note".into(),
            "Too long: may not be more than 1024 bytes".into(),
        ));
    }
    if let Some(series) = obj.get("series").filter(|s| !s.is_null()) {
        if series.get("count").and_then(Value::as_i64).unwrap_or(0) < 2 {
            causes.push((
                "series.count".into(),
                "Invalid value: should be at least 2".into(),
            ));
        }
        if series.get("lastObservedTime").is_none_or(Value::is_null) {
            causes.push(("series.lastObservedTime".into(), "Required value".into()));
        }
    }
    causes
}

/// A field selector's field names in the core form (`regarding.name` is
/// `involvedObject.name`).
pub fn core_field_selector(s: &str) -> String {
    s.split(',')
        .map(|term| {
            let t = term.trim_start();
            let end = t.find(['=', '!']).unwrap_or(t.len());
            let (field, rest) = t.split_at(end);
            let (head, tail) = field
                .split_once('.')
                .map_or((field, ""), |(h, _)| (h, &field[h.len()..]));
            format!("{}{tail}{rest}", core_name(head))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A patch in the core form: a JSON patch's paths, or a merge patch's top-level keys.
pub fn core_patch(content_type: &str, body: &[u8]) -> Result<Bytes, ApiError> {
    let mut patch: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the patch could not be read as JSON: {e}")))?;
    if content_type.starts_with("application/json-patch+json") {
        for op in patch.as_array_mut().into_iter().flatten() {
            // An operation on the whole document carries a whole Event.
            if op.get("path").and_then(Value::as_str) == Some("") {
                if let Some(v) = op.get_mut("value") {
                    to_core(v);
                }
                continue;
            }
            for field in ["path", "from"] {
                if let Some(path) = op.get(field).and_then(Value::as_str) {
                    let rest = path.strip_prefix('/').unwrap_or(path);
                    let (head, tail) = rest
                        .split_once('/')
                        .map_or((rest, ""), |(h, _)| (h, &rest[h.len()..]));
                    op[field] = Value::String(format!("/{}{tail}", core_name(head)));
                }
            }
        }
    } else {
        to_core(&mut patch);
    }
    Ok(Bytes::from(serde_json::to_vec(&patch).unwrap_or_default()))
}

/// An error from the core resource as the events.k8s.io resource reports it.
pub fn error_from_core(mut e: ApiError) -> ApiError {
    for (core, new) in [
        ("events \"", "events.events.k8s.io \""),
        ("Event \"", "Event.events.k8s.io \""),
    ] {
        if e.message.contains(core) {
            e.message = e.message.replacen(core, new, 1);
            break;
        }
    }
    if let Some(d) = e.details.as_mut().and_then(Value::as_object_mut) {
        if d.get("group").and_then(Value::as_str) == Some("") {
            d.insert("group".into(), Value::String("events.k8s.io".into()));
        }
        for cause in d
            .get_mut("causes")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(field) = cause.get("field").and_then(Value::as_str) {
                let (head, tail) = field
                    .split_once('.')
                    .map_or((field, ""), |(h, _)| (h, &field[h.len()..]));
                cause["field"] = Value::String(format!("{}{tail}", new_name(head)));
            }
        }
    }
    e
}

/// A JSON object answered by the core resource in the events.k8s.io form.
pub fn answer_from_core(v: &mut Value) {
    if v.get("kind").and_then(Value::as_str) == Some("Event")
        && v.get("apiVersion").and_then(Value::as_str) == Some("v1")
    {
        from_core(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_two_forms_convert_both_ways() {
        let new = json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e", "namespace": "default"},
            "eventTime": "2026-01-01T00:00:00.000000Z", "reason": "Started", "type": "Normal",
            "action": "Start", "note": "it started", "reportingController": "flotilla/agent",
            "reportingInstance": "node-1", "regarding": {"kind": "Pod", "name": "p"},
            "deprecatedCount": 3, "series": {"count": 2, "lastObservedTime": "2026-01-01T00:00:01.000000Z"},
        });
        let mut core = new.clone();
        to_core(&mut core);
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["message"], "it started");
        assert_eq!(core["involvedObject"]["name"], "p");
        assert_eq!(core["reportingComponent"], "flotilla/agent");
        assert_eq!(core["count"], 3);
        assert!(core.get("note").is_none() && core.get("regarding").is_none());
        let mut back = core;
        from_core(&mut back);
        assert_eq!(back, new);
        assert!(validate(&new).is_empty());
    }

    #[test]
    fn what_kubernetes_requires_of_a_new_event() {
        let causes = validate(&json!({"type": "Info", "note": "x".repeat(1025)}));
        let fields: Vec<&str> = causes.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "eventTime",
                "reportingController",
                "reportingInstance",
                "action",
                "reason",
                "type",
                "note"
            ]
        );
    }

    #[test]
    fn selectors_patches_and_errors_are_renamed() {
        assert_eq!(
            core_field_selector("regarding.name=p, type!=Normal,reportingController==c"),
            "involvedObject.name=p,type!=Normal,reportingComponent==c"
        );
        let p = core_patch(
            "application/json-patch+json",
            br#"[{"op":"replace","path":"/note","value":"n"},{"op":"move","from":"/regarding/name","path":"/related/name"}]"#,
        )
        .expect("a patch");
        let p: Value = serde_json::from_slice(&p).expect("json");
        assert_eq!(p[0]["path"], "/message");
        assert_eq!(p[1]["from"], "/involvedObject/name");
        let p = core_patch("application/merge-patch+json", br#"{"note":"n"}"#).expect("a patch");
        assert_eq!(&p[..], br#"{"message":"n"}"#);
        let e = error_from_core(ApiError::not_found("events", "", "e1"));
        assert_eq!(e.message, "events.events.k8s.io \"e1\" not found");
    }
}
