//! Field ownership (`metadata.managedFields`) and server-side apply.
//!
//! Every write records which manager set which fields, in Kubernetes' FieldsV1 form
//! (`{"f:spec":{"f:replicas":{}}}`; list items by merge key `k:{"name":"web"}`, set members
//! `v:"x"`, `.` for an item itself). An apply (`application/apply-patch+yaml`) sends the
//! fields its manager wants: fields it set last time and no longer sends are removed (unless
//! another manager owns them), fields another manager owns with a different value are a
//! conflict (409, or taken over with `force=true`), the rest are merged into the object.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use crate::status::ApiError;

/// One path element, in FieldsV1 spelling (`f:name`, `k:{...}`, `v:...`).
type Path = Vec<String>;
type Set = BTreeSet<Path>;

/// Metadata fields only the server sets; never owned.
const SERVER_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// The merge key of a list (as strategic merge patch keys it), or None for an atomic list.
fn list_key(kind: &str, path: &[&str]) -> Option<&'static str> {
    crate::patch::merge_key(kind, path)
}

fn is_set_list(path: &[&str]) -> bool {
    crate::patch::merged_scalar_list(path)
}

/// The fields `obj` sets (status only for a status write; everything else otherwise).
pub fn fields_of(obj: &Value, kind: &str, status: bool) -> Set {
    let mut out = Set::new();
    let Some(map) = obj.as_object() else {
        return out;
    };
    for (k, v) in map {
        let keep = match k.as_str() {
            "apiVersion" | "kind" => false,
            "status" => status,
            _ => !status,
        };
        if !keep {
            continue;
        }
        if k == "metadata" {
            let Some(meta) = v.as_object() else { continue };
            for (mk, mv) in meta {
                if status || SERVER_META.contains(&mk.as_str()) {
                    continue;
                }
                walk(
                    mv,
                    kind,
                    &mut vec!["metadata", mk],
                    &mut vec!["f:metadata".into(), format!("f:{mk}")],
                    &mut out,
                );
            }
            continue;
        }
        walk(v, kind, &mut vec![k], &mut vec![format!("f:{k}")], &mut out);
    }
    out
}

/// The fields of an object (a struct, a map or a keyed list item), each under `f:<name>`.
fn walk_fields<'a>(
    m: &'a Map<String, Value>,
    kind: &str,
    names: &mut Vec<&'a str>,
    path: &mut Path,
    out: &mut Set,
) {
    for (k, child) in m {
        names.push(k);
        path.push(format!("f:{k}"));
        walk(child, kind, names, path, out);
        path.pop();
        names.pop();
    }
}

fn walk<'a>(v: &'a Value, kind: &str, names: &mut Vec<&'a str>, path: &mut Path, out: &mut Set) {
    match v {
        Value::Object(m) if !m.is_empty() => walk_fields(m, kind, names, path, out),
        Value::Array(items) if !items.is_empty() => {
            if let Some(key) = list_key(kind, names) {
                if items.iter().all(|i| i.get(key).is_some()) {
                    for item in items {
                        path.push(item_key(key, item));
                        out.insert(path.clone());
                        if let Some(m) = item.as_object() {
                            walk_fields(m, kind, names, path, out);
                        }
                        path.pop();
                    }
                    return;
                }
            }
            if is_set_list(names) && items.iter().all(|i| !i.is_object() && !i.is_array()) {
                for item in items {
                    path.push(format!("v:{item}"));
                    out.insert(path.clone());
                    path.pop();
                }
                return;
            }
            out.insert(path.clone());
        }
        _ => {
            out.insert(path.clone());
        }
    }
}

fn item_key(key: &str, item: &Value) -> String {
    let mut m = Map::new();
    m.insert(
        key.to_string(),
        item.get(key).cloned().unwrap_or(Value::Null),
    );
    format!("k:{}", Value::Object(m))
}

/// The value at a path, if the object has it.
fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut at = obj;
    for step in path {
        at = if let Some(f) = step.strip_prefix("f:") {
            at.get(f)?
        } else if let Some(k) = step.strip_prefix("k:") {
            let want: Map<String, Value> = serde_json::from_str(k).ok()?;
            at.as_array()?
                .iter()
                .find(|i| want.iter().all(|(k, v)| i.get(k) == Some(v)))?
        } else if let Some(v) = step.strip_prefix("v:") {
            let want: Value = serde_json::from_str(v).ok()?;
            at.as_array()?.iter().find(|i| **i == want)?
        } else {
            return None;
        };
    }
    Some(at)
}

/// Removes the value at a path (a field, a list item, a set member).
fn remove_at(obj: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = obj;
    for step in parents {
        let next = if let Some(f) = step.strip_prefix("f:") {
            at.get_mut(f)
        } else if let Some(k) = step.strip_prefix("k:") {
            let Ok(want) = serde_json::from_str::<Map<String, Value>>(k) else {
                return;
            };
            at.as_array_mut().and_then(|a| {
                a.iter_mut()
                    .find(|i| want.iter().all(|(k, v)| i.get(k) == Some(v)))
            })
        } else {
            None
        };
        match next {
            Some(n) => at = n,
            None => return,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = at.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(k) = last.strip_prefix("k:") {
        if let (Ok(want), Some(a)) = (
            serde_json::from_str::<Map<String, Value>>(k),
            at.as_array_mut(),
        ) {
            a.retain(|i| !want.iter().all(|(k, v)| i.get(k) == Some(v)));
        }
    } else if let Some(v) = last.strip_prefix("v:") {
        if let (Ok(want), Some(a)) = (serde_json::from_str::<Value>(v), at.as_array_mut()) {
            a.retain(|i| *i != want);
        }
    }
}

/// FieldsV1 JSON for a set.
fn to_fields_v1(set: &Set) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut at = &mut root;
        for step in path {
            let next = at
                .entry(step.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            at = match next {
                Value::Object(m) => m,
                _ => return Value::Object(root),
            };
        }
        // A path that is also a parent of other paths owns its node itself: `.`.
        if !at.is_empty() {
            at.insert(".".into(), json!({}));
        }
    }
    // Nodes that became parents after being leaves get their `.` too.
    fn mark(m: &mut Map<String, Value>, path: &mut Path, set: &Set) {
        for (k, v) in m.iter_mut() {
            if k == "." {
                continue;
            }
            path.push(k.clone());
            if let Value::Object(child) = v {
                if !child.is_empty() && set.contains(path) && !child.contains_key(".") {
                    child.insert(".".into(), json!({}));
                }
                mark(child, path, set);
            }
            path.pop();
        }
    }
    mark(&mut root, &mut Vec::new(), set);
    Value::Object(root)
}

fn from_fields_v1(v: &Value) -> Set {
    fn go(v: &Value, path: &mut Path, out: &mut Set) {
        let Some(m) = v.as_object() else { return };
        if m.is_empty() || m.contains_key(".") {
            if !path.is_empty() {
                out.insert(path.clone());
            }
        }
        for (k, child) in m {
            if k == "." {
                continue;
            }
            path.push(k.clone());
            go(child, path, out);
            path.pop();
        }
    }
    let mut out = Set::new();
    go(v, &mut Vec::new(), &mut out);
    out
}

/// One managedFields entry.
#[derive(Debug, Clone)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    subresource: String,
    time: Value,
    set: Set,
}

impl Entry {
    /// A new entry for `w`, stamped now.
    fn new(w: &Writer, operation: &str, set: Set) -> Entry {
        Entry {
            manager: w.manager.clone(),
            operation: operation.into(),
            api_version: w.api_version.clone(),
            subresource: w.subresource.clone(),
            time: now(),
            set,
        }
    }
}

fn entries_of(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| Entry {
            manager: e["manager"].as_str().unwrap_or("").to_string(),
            operation: e["operation"].as_str().unwrap_or("Update").to_string(),
            api_version: e["apiVersion"].as_str().unwrap_or("").to_string(),
            subresource: e["subresource"].as_str().unwrap_or("").to_string(),
            time: e.get("time").cloned().unwrap_or(Value::Null),
            set: from_fields_v1(&e["fieldsV1"]),
        })
        .collect()
}

fn store_entries(obj: &mut Value, entries: Vec<Entry>) {
    let list: Vec<Value> = entries
        .into_iter()
        .filter(|e| !e.set.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.set),
            });
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

fn now() -> Value {
    json!(chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string())
}

/// Who is writing: a request's `fieldManager`, or its User-Agent's program name.
#[derive(Debug, Clone)]
pub struct Writer {
    pub manager: String,
    pub api_version: String,
    pub subresource: String,
}

/// Records an update (create, PUT, PATCH): the fields it changed or added become the
/// writer's (an Update entry), and no longer anyone else's; fields it removed are no one's.
/// A request that itself changed `managedFields` has them taken as sent.
pub fn record_update(old: Option<&Value>, new: &mut Value, kind: &str, w: &Writer) {
    let status = w.subresource == "status";
    let sent = new.pointer("/metadata/managedFields").cloned();
    let kept = old.and_then(|o| o.pointer("/metadata/managedFields").cloned());
    let mut entries = if sent.is_some() && sent != kept {
        entries_of(new)
    } else {
        old.map(entries_of).unwrap_or_default()
    };
    let before = old.map(|o| fields_of(o, kind, status)).unwrap_or_default();
    let after = fields_of(new, kind, status);
    let null = Value::Null;
    let changed: Set = after
        .iter()
        .filter(|p| {
            !before.contains(*p)
                || (!is_item(p)
                    && old.and_then(|o| value_at(o, p)).unwrap_or(&null)
                        != value_at(new, p).unwrap_or(&null))
        })
        .cloned()
        .collect();
    let removed: Set = before.difference(&after).cloned().collect();
    for e in entries.iter_mut() {
        if (e.subresource == "status") != status {
            continue;
        }
        e.set
            .retain(|p| !removed.contains(p) && !changed.contains(p));
    }
    if !changed.is_empty() {
        let mine = entries.iter_mut().find(|e| {
            e.manager == w.manager && e.operation == "Update" && e.subresource == w.subresource
        });
        match mine {
            Some(e) => {
                e.set.extend(changed);
                e.time = now();
                e.api_version = w.api_version.clone();
            }
            None => entries.push(Entry::new(w, "Update", changed)),
        }
    }
    store_entries(new, entries);
}

/// A list item or set member path (its "value" is the item, compared field by field).
fn is_item(p: &Path) -> bool {
    p.last()
        .is_some_and(|s| s.starts_with("k:") || s.starts_with("v:"))
}

/// Merges an applied configuration into `live` (None: the object does not exist yet) and
/// returns the object to write, with managedFields updated; a 409 lists the conflicts.
pub fn apply(
    live: Option<&Value>,
    applied: &Value,
    kind: &str,
    w: &Writer,
    force: bool,
) -> Result<Value, ApiError> {
    let status = w.subresource == "status";
    let wanted = fields_of(applied, kind, status);
    let Some(live) = live else {
        let mut obj = applied.clone();
        store_entries(&mut obj, vec![Entry::new(w, "Apply", wanted)]);
        return Ok(obj);
    };
    let mut entries = entries_of(live);
    let mine = |e: &Entry| {
        e.manager == w.manager && e.operation == "Apply" && e.subresource == w.subresource
    };
    // Conflicts: a field another manager owns, which this apply sets to another value.
    let null = Value::Null;
    let mut conflicts: Vec<(String, String, String)> = Vec::new();
    for e in entries.iter_mut().filter(|e| !mine(e)) {
        let clashing: Vec<Path> = e
            .set
            .intersection(&wanted)
            .filter(|p| {
                !is_item(p)
                    && value_at(applied, p).unwrap_or(&null) != value_at(live, p).unwrap_or(&null)
            })
            .cloned()
            .collect();
        for p in &clashing {
            conflicts.push((e.manager.clone(), e.api_version.clone(), dotted(p)));
        }
        if force {
            e.set.retain(|p| !clashing.contains(p));
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(ApiError::apply_conflicts(&conflicts));
    }
    let mut obj = live.clone();
    // What this manager applied before and no longer does goes, unless someone else has it.
    let before: Set = entries
        .iter()
        .find(|e| mine(e))
        .map(|e| e.set.clone())
        .unwrap_or_default();
    let others: Vec<&Set> = entries
        .iter()
        .filter(|e| !mine(e))
        .map(|e| &e.set)
        .collect();
    let mut dropped: Vec<&Path> = before.difference(&wanted).collect();
    dropped.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in dropped {
        let owned_elsewhere = others.iter().any(|s| s.iter().any(|q| q.starts_with(p)));
        if !owned_elsewhere {
            remove_at(&mut obj, p);
        }
    }
    merge(&mut obj, applied, kind, &mut Vec::new());
    entries.retain(|e| !mine(e));
    entries.push(Entry::new(w, "Apply", wanted));
    store_entries(&mut obj, entries);
    Ok(obj)
}

/// `.spec.template.spec.containers[name="web"].image`, as Kubernetes prints a conflict.
fn dotted(p: &Path) -> String {
    let mut out = String::new();
    for step in p {
        if let Some(f) = step.strip_prefix("f:") {
            out.push('.');
            out.push_str(f);
        } else if let Some(k) = step.strip_prefix("k:") {
            let m: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let terms: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", terms.join(",")));
        } else if let Some(v) = step.strip_prefix("v:") {
            out.push_str(&format!("[{v}]"));
        }
    }
    out
}

/// Merges `applied` into `live`: objects field by field, keyed lists item by item, set
/// lists as unions, anything else replaced.
fn merge<'a>(live: &mut Value, applied: &'a Value, kind: &str, names: &mut Vec<&'a str>) {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            for (k, av) in a {
                if av.is_null() {
                    l.remove(k);
                    continue;
                }
                names.push(k);
                match l.get_mut(k) {
                    Some(lv) => merge(lv, av, kind, names),
                    None => {
                        l.insert(k.clone(), av.clone());
                    }
                }
                names.pop();
            }
        }
        (Value::Array(l), Value::Array(a)) => {
            if let Some(key) = list_key(kind, names) {
                if a.iter().chain(l.iter()).all(|i| i.get(key).is_some()) {
                    for item in a {
                        match l.iter_mut().find(|i| i.get(key) == item.get(key)) {
                            Some(li) => merge(li, item, kind, &mut Vec::new()),
                            None => l.push(item.clone()),
                        }
                    }
                    return;
                }
            }
            if is_set_list(names) {
                for item in a {
                    if !l.contains(item) {
                        l.push(item.clone());
                    }
                }
                return;
            }
            *l = a.clone();
        }
        (live, applied) => *live = applied.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(m: &str) -> Writer {
        Writer {
            manager: m.into(),
            api_version: "apps/v1".into(),
            subresource: String::new(),
        }
    }

    fn deployment(replicas: i64, image: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"replicas": replicas, "template": {"spec": {"containers": [
                {"name": "web", "image": image}]}}}})
    }

    #[test]
    fn fields_v1_round_trips_with_item_markers() {
        let set = fields_of(&deployment(1, "a"), "Deployment", false);
        let v1 = to_fields_v1(&set);
        let c = &v1["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"];
        assert!(c.get(".").is_some());
        assert!(c.get("f:image").is_some());
        assert_eq!(from_fields_v1(&v1), set);
    }

    #[test]
    fn apply_conflicts_with_another_manager_unless_forced() {
        let created = apply(
            None,
            &deployment(1, "a"),
            "Deployment",
            &writer("alice"),
            false,
        )
        .expect("created");
        // bob updates replicas; alice re-applies her value: a conflict on that field only.
        let mut live = created.clone();
        live["spec"]["replicas"] = json!(5);
        record_update(Some(&created), &mut live, "Deployment", &writer("bob"));
        let err = apply(
            Some(&live),
            &deployment(1, "b"),
            "Deployment",
            &writer("alice"),
            false,
        )
        .expect_err("conflict");
        assert_eq!(err.code, 409);
        assert!(err.message.contains(".spec.replicas"), "{}", err.message);
        assert!(err.message.contains("\"bob\""), "{}", err.message);
        // An apply that leaves replicas out does not conflict, and keeps bob's value.
        let mut partial = deployment(1, "b");
        partial["spec"]
            .as_object_mut()
            .map(|m| m.remove("replicas"));
        let merged =
            apply(Some(&live), &partial, "Deployment", &writer("alice"), false).expect("applies");
        assert_eq!(merged["spec"]["replicas"], 5);
        assert_eq!(
            merged["spec"]["template"]["spec"]["containers"][0]["image"],
            "b"
        );
        // Forced: alice takes replicas over.
        let forced = apply(
            Some(&live),
            &deployment(2, "b"),
            "Deployment",
            &writer("alice"),
            true,
        )
        .expect("forced");
        assert_eq!(forced["spec"]["replicas"], 2);
        let bob = forced["metadata"]["managedFields"]
            .as_array()
            .expect("entries")
            .iter()
            .any(|e| e["manager"] == "bob");
        assert!(!bob, "bob owned only replicas, which he lost");
    }

    #[test]
    fn fields_dropped_from_an_apply_are_removed() {
        let mut first = deployment(1, "a");
        first["metadata"]["labels"]["tier"] = json!("front");
        let live = apply(None, &first, "Deployment", &writer("alice"), false).expect("created");
        let again = apply(
            Some(&live),
            &deployment(1, "a"),
            "Deployment",
            &writer("alice"),
            false,
        )
        .expect("applies");
        assert_eq!(again["metadata"]["labels"], json!({"app": "web"}));
    }
}
