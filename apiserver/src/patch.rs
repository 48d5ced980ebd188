//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and Kubernetes'
//! strategic merge patch (lists merged by their merge keys, `$patch` directives).

use serde_json::{Map, Value};

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Some(t) = target.as_object_mut() {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// The merge key of a list field, as Kubernetes' types declare it (`patchMergeKey`), for the
/// kinds served: lists of objects keyed by it are merged element by element.
pub(crate) fn merge_key(kind: &str, path: &[&str]) -> Option<&'static str> {
    let field = *path.last()?;
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ownerReferences" => "uid",
        "conditions" => "type",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        "ports" if kind == "Service" && path == ["spec", "ports"] => "port",
        "ports" => "containerPort",
        _ => return None,
    })
}

/// Lists of scalars merged as sets (`patchStrategy: merge`).
pub(crate) fn merged_scalar_list(path: &[&str]) -> bool {
    matches!(path.last(), Some(&"finalizers"))
}

/// Kubernetes' strategic merge patch, for an object of `kind`.
pub fn strategic(target: &mut Value, patch: &Value, kind: &str) -> Result<(), String> {
    strategic_at(target, patch, kind, &mut Vec::new())
}

fn strategic_at<'a>(
    target: &mut Value,
    patch: &'a Value,
    kind: &str,
    path: &mut Vec<&'a str>,
) -> Result<(), String> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut replaced = p.clone();
            replaced.remove("$patch");
            *target = Value::Object(replaced);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Null;
            return Ok(());
        }
        Some(other) if other != "merge" => return Err(format!("unknown patch type: {other}")),
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let retain: Option<Vec<String>> = p.get("$retainKeys").and_then(Value::as_array).map(|keys| {
        keys.iter()
            .filter_map(|k| k.as_str().map(str::to_string))
            .collect()
    });
    for (k, v) in p {
        if k == "$patch" || k == "$retainKeys" || k.starts_with("$setElementOrder/") {
            continue;
        }
        let Some(t) = target.as_object_mut() else {
            break;
        };
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(gone)) = (t.get_mut(field), v.as_array()) {
                list.retain(|item| !gone.contains(item));
            }
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        path.push(k.as_str());
        let slot = t.entry(k.clone()).or_insert(Value::Null);
        match v {
            Value::Array(items) => merge_list(slot, items, kind, path)?,
            Value::Object(_) => {
                strategic_at(slot, v, kind, path)?;
                if slot.is_null() {
                    t.remove(k);
                }
            }
            other => *slot = other.clone(),
        }
        path.pop();
    }
    if let (Some(keep), Some(t)) = (retain, target.as_object_mut()) {
        t.retain(|k, _| keep.contains(k));
    }
    Ok(())
}

fn merge_list<'a>(
    slot: &mut Value,
    items: &'a [Value],
    kind: &str,
    path: &mut Vec<&'a str>,
) -> Result<(), String> {
    if merged_scalar_list(path) {
        let mut list = slot.as_array().cloned().unwrap_or_default();
        for item in items {
            if !list.contains(item) {
                list.push(item.clone());
            }
        }
        *slot = Value::Array(list);
        return Ok(());
    }
    let replaced = || {
        Value::Array(
            items
                .iter()
                .filter(|i| i.get("$patch").is_none())
                .cloned()
                .collect(),
        )
    };
    // Without a merge key, or with `$patch: replace`, the list is replaced (directives aside).
    let Some(key) = merge_key(kind, path) else {
        *slot = replaced();
        return Ok(());
    };
    if items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        *slot = replaced();
        return Ok(());
    }
    let mut list = slot.as_array().cloned().unwrap_or_default();
    for item in items {
        let id = item.get(key).cloned();
        let at = list
            .iter()
            .position(|e| id.is_some() && e.get(key) == id.as_ref());
        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(i) = at {
                list.remove(i);
            }
            continue;
        }
        match at {
            Some(i) => strategic_at(&mut list[i], item, kind, path)?,
            None => {
                let mut fresh = Value::Null;
                strategic_at(&mut fresh, item, kind, path)?;
                list.push(fresh);
            }
        }
    }
    *slot = Value::Array(list);
    Ok(())
}

/// Splits a JSON pointer into its unescaped tokens.
fn tokens(pointer: &str) -> Result<Vec<String>, String> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err(format!("invalid JSON pointer {pointer:?}"));
    };
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn parent<'a>(doc: &'a mut Value, path: &[String], pointer: &str) -> Result<&'a mut Value, String> {
    let mut cur = doc;
    for t in path {
        cur = match cur {
            Value::Object(m) => m.get_mut(t),
            Value::Array(a) => t.parse::<usize>().ok().and_then(move |i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("doc is missing path: {pointer:?}"))?;
    }
    Ok(cur)
}

fn add(doc: &mut Value, pointer: &str, value: Value) -> Result<(), String> {
    let toks = tokens(pointer)?;
    let Some((last, path)) = toks.split_last() else {
        *doc = value;
        return Ok(());
    };
    match parent(doc, path, pointer)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(a) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>()
                    .map_err(|_| format!("invalid array index {last:?} in {pointer:?}"))?
            };
            if i > a.len() {
                return Err(format!("array index {i} out of bounds in {pointer:?}"));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("doc is missing path: {pointer:?}")),
    }
}

fn remove(doc: &mut Value, pointer: &str) -> Result<Value, String> {
    let toks = tokens(pointer)?;
    let Some((last, path)) = toks.split_last() else {
        return Err("cannot remove the whole document".into());
    };
    match parent(doc, path, pointer)? {
        Value::Object(m) => m
            .remove(last)
            .ok_or_else(|| format!("unable to remove nonexistent key: {last}: missing value")),
        Value::Array(a) => {
            let i = last
                .parse::<usize>()
                .map_err(|_| format!("invalid array index {last:?} in {pointer:?}"))?;
            if i >= a.len() {
                return Err(format!("array index {i} out of bounds in {pointer:?}"));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!("doc is missing path: {pointer:?}")),
    }
}

/// RFC 6902: applies every operation in order; any failure leaves `doc` untouched.
pub fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), String> {
    let ops = patch
        .as_array()
        .ok_or("a JSON patch must be an array of operations")?;
    let mut work = doc.clone();
    for op in ops {
        let kind = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or("an operation has no \"op\"")?;
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("operation {kind:?} has no \"path\""))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| format!("operation {kind:?} has no \"value\""))
        };
        let from = || {
            op.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("operation {kind:?} has no \"from\""))
        };
        match kind {
            "add" => add(&mut work, path, value()?)?,
            "remove" => {
                remove(&mut work, path)?;
            }
            "replace" => {
                remove(&mut work, path)?;
                add(&mut work, path, value()?)?;
            }
            "move" => {
                let v = remove(&mut work, from()?)?;
                add(&mut work, path, v)?;
            }
            "copy" => {
                let v = work.pointer(from()?).cloned().ok_or_else(|| {
                    format!("doc is missing from path: {:?}", from().unwrap_or(""))
                })?;
                add(&mut work, path, v)?;
            }
            "test" => {
                if work.pointer(path) != Some(&value()?) {
                    return Err(format!("testing value {path} failed"));
                }
            }
            other => return Err(format!("unexpected kind: {other}")),
        }
    }
    *doc = work;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge(&mut t, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(t, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }

    #[test]
    fn strategic_merge_patch_merges_lists_by_key() {
        let mut svc = json!({
            "metadata": {"finalizers": ["a"], "labels": {"x": "1"}},
            "spec": {"ports": [{"port": 80, "protocol": "TCP", "targetPort": 80},
                               {"port": 443, "protocol": "TCP"}],
                     "selector": {"app": "web"}},
        });
        strategic(
            &mut svc,
            &json!({
                "metadata": {"finalizers": ["b"], "labels": {"x": null}},
                "spec": {
                    "$setElementOrder/ports": [{"port": 80}, {"port": 8080}],
                    "ports": [{"port": 80, "targetPort": 8000}, {"port": 8080},
                              {"$patch": "delete", "port": 443}],
                    "selector": {"$patch": "replace", "app": "api"},
                },
            }),
            "Service",
        )
        .unwrap();
        assert_eq!(
            svc,
            json!({
                "metadata": {"finalizers": ["a", "b"], "labels": {}},
                "spec": {"ports": [{"port": 80, "protocol": "TCP", "targetPort": 8000},
                                   {"port": 8080}],
                         "selector": {"app": "api"}},
            })
        );
    }

    #[test]
    fn json_patch_follows_rfc_6902() {
        let mut doc = json!({"metadata": {"labels": {"a/b": "1"}}, "list": [1, 2]});
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/metadata/labels/new", "value": "x"},
                {"op": "remove", "path": "/metadata/labels/a~1b"},
                {"op": "add", "path": "/list/-", "value": 3},
                {"op": "replace", "path": "/list/0", "value": 0},
                {"op": "copy", "from": "/list/2", "path": "/three"},
                {"op": "test", "path": "/three", "value": 3},
            ]),
        )
        .unwrap();
        assert_eq!(
            doc,
            json!({"metadata": {"labels": {"new": "x"}}, "list": [0, 2, 3], "three": 3})
        );
        let before = doc.clone();
        assert!(json_patch(&mut doc, &json!([{"op": "remove", "path": "/nope"}])).is_err());
        assert!(json_patch(
            &mut doc,
            &json!([{"op": "test", "path": "/three", "value": 4}])
        )
        .is_err());
        assert_eq!(doc, before);
    }
}
