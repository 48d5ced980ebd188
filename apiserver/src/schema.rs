//! The fields each served kind has, for `fieldValidation` (Strict, Warn, Ignore) and for
//! pruning what a kind does not have, as Kubernetes' typed decoding drops it.
//!
//! Written out for the four core kinds served so far; the kinds with large specs (pods,
//! deployments) will take theirs from `k8s-openapi`'s schemas.

use serde_json::Value;

/// A field's shape.
pub enum Shape {
    /// Anything (free-form JSON).
    Any,
    /// A scalar (string, number or bool); its type is not checked here.
    Scalar,
    /// A string.
    Str,
    /// A boolean.
    Bool,
    /// A map from any key to values of one shape.
    MapOf(&'static Shape),
    /// A list of one shape.
    ListOf(&'static Shape),
    /// An object with these fields and no others.
    Object(&'static [(&'static str, &'static Shape)]),
}

use Shape::*;

static SCALAR: Shape = Scalar;
static STR: Shape = Str;
static BOOL: Shape = Bool;
static ANY: Shape = Any;
static STRING_MAP: Shape = MapOf(&STR);
static STRING_LIST: Shape = ListOf(&STR);

static OWNER_REFERENCE: Shape = Object(&[
    ("apiVersion", &SCALAR),
    ("kind", &SCALAR),
    ("name", &SCALAR),
    ("uid", &SCALAR),
    ("controller", &SCALAR),
    ("blockOwnerDeletion", &SCALAR),
]);
static OWNER_REFERENCES: Shape = ListOf(&OWNER_REFERENCE);
static MANAGED_FIELDS_ENTRY: Shape = Object(&[
    ("apiVersion", &SCALAR),
    ("fieldsType", &SCALAR),
    ("fieldsV1", &ANY),
    ("manager", &SCALAR),
    ("operation", &SCALAR),
    ("subresource", &SCALAR),
    ("time", &SCALAR),
]);
static MANAGED_FIELDS: Shape = ListOf(&MANAGED_FIELDS_ENTRY);

pub static OBJECT_META: Shape = Object(&[
    ("name", &STR),
    ("generateName", &STR),
    ("namespace", &STR),
    ("selfLink", &STR),
    ("uid", &STR),
    ("resourceVersion", &STR),
    ("generation", &SCALAR),
    ("creationTimestamp", &SCALAR),
    ("deletionTimestamp", &SCALAR),
    ("deletionGracePeriodSeconds", &SCALAR),
    ("labels", &STRING_MAP),
    ("annotations", &STRING_MAP),
    ("ownerReferences", &OWNER_REFERENCES),
    ("finalizers", &STRING_LIST),
    ("managedFields", &MANAGED_FIELDS),
]);

static OBJECT_REFERENCE: Shape = Object(&[
    ("apiVersion", &SCALAR),
    ("fieldPath", &SCALAR),
    ("kind", &SCALAR),
    ("name", &SCALAR),
    ("namespace", &SCALAR),
    ("resourceVersion", &SCALAR),
    ("uid", &SCALAR),
]);
static LOCAL_OBJECT_REFERENCE: Shape = Object(&[("name", &SCALAR)]);
static NAMESPACE_CONDITION: Shape = Object(&[
    ("type", &SCALAR),
    ("status", &SCALAR),
    ("lastTransitionTime", &SCALAR),
    ("reason", &SCALAR),
    ("message", &SCALAR),
]);

static CONFIG_MAP: Shape = Object(&[
    ("apiVersion", &SCALAR),
    ("kind", &SCALAR),
    ("metadata", &OBJECT_META),
    ("data", &STRING_MAP),
    ("binaryData", &STRING_MAP),
    ("immutable", &BOOL),
]);
static SECRET: Shape = Object(&[
    ("apiVersion", &SCALAR),
    ("kind", &SCALAR),
    ("metadata", &OBJECT_META),
    ("data", &STRING_MAP),
    ("stringData", &STRING_MAP),
    ("type", &STR),
    ("immutable", &BOOL),
]);
static NAMESPACE: Shape = Object(&[
    ("apiVersion", &SCALAR),
    ("kind", &SCALAR),
    ("metadata", &OBJECT_META),
    ("spec", &Object(&[("finalizers", &STRING_LIST)])),
    (
        "status",
        &Object(&[
            ("phase", &SCALAR),
            ("conditions", &ListOf(&NAMESPACE_CONDITION)),
        ]),
    ),
]);
static SERVICE_ACCOUNT: Shape = Object(&[
    ("apiVersion", &SCALAR),
    ("kind", &SCALAR),
    ("metadata", &OBJECT_META),
    ("secrets", &ListOf(&OBJECT_REFERENCE)),
    ("imagePullSecrets", &ListOf(&LOCAL_OBJECT_REFERENCE)),
    ("automountServiceAccountToken", &SCALAR),
]);

/// The shape of a kind, if known.
pub fn of_kind(kind: &str) -> Option<&'static Shape> {
    match kind {
        "ConfigMap" => Some(&CONFIG_MAP),
        "Secret" => Some(&SECRET),
        "Namespace" => Some(&NAMESPACE),
        "ServiceAccount" => Some(&SERVICE_ACCOUNT),
        _ => None,
    }
}

/// What a check found.
#[derive(Debug, Default, PartialEq)]
pub struct Findings {
    /// Fields the kind does not have (removed): `spec.foo`, `metadata.ownerReferences[0].bad`.
    pub unknown: Vec<String>,
    /// Fields of the wrong JSON type: `data.a: expected a string, got a number`.
    pub wrong: Vec<String>,
}

/// Removes the fields `shape` does not have and checks the types it knows.
pub fn check(value: &mut Value, shape: &Shape) -> Findings {
    let mut found = Findings::default();
    walk(value, shape, "", &mut found);
    found
}

/// The unknown fields only (for tests and callers that need no types).
pub fn prune(value: &mut Value, shape: &Shape) -> Vec<String> {
    check(value, shape).unknown
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn walk(value: &mut Value, shape: &Shape, path: &str, found: &mut Findings) {
    let unknown = &mut found.unknown;
    match (shape, &*value) {
        (Str, Value::String(_)) | (Bool, Value::Bool(_)) | (_, Value::Null) => return,
        (Str, v) => {
            found
                .wrong
                .push(format!("{path}: expected a string, got {}", json_type(v)));
            return;
        }
        (Bool, v) => {
            found
                .wrong
                .push(format!("{path}: expected a boolean, got {}", json_type(v)));
            return;
        }
        (Object(_) | MapOf(_), v) if !v.is_object() => {
            found
                .wrong
                .push(format!("{path}: expected an object, got {}", json_type(v)));
            return;
        }
        (ListOf(_), v) if !v.is_array() => {
            found
                .wrong
                .push(format!("{path}: expected a list, got {}", json_type(v)));
            return;
        }
        _ => {}
    }
    let _ = unknown;
    match (shape, value) {
        (Object(fields), Value::Object(map)) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match fields.iter().find(|(name, _)| *name == k) {
                    Some((_, s)) => {
                        if let Some(v) = map.get_mut(&k) {
                            walk(v, s, &child, found);
                        }
                    }
                    None => {
                        map.remove(&k);
                        found.unknown.push(child);
                    }
                }
            }
        }
        (MapOf(s), Value::Object(map)) => {
            for (k, v) in map.iter_mut() {
                walk(v, s, &format!("{path}.{k}"), found);
            }
        }
        (ListOf(s), Value::Array(items)) => {
            for (i, v) in items.iter_mut().enumerate() {
                walk(v, s, &format!("{path}[{i}]"), found);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wrong_types_are_found() {
        let mut cm = json!({"kind": "ConfigMap", "metadata": {"name": 5, "labels": {"a": 1}}, "data": {"x": true}, "immutable": "yes"});
        let found = check(&mut cm, of_kind("ConfigMap").expect("known"));
        assert_eq!(
            found.wrong,
            [
                "data.x: expected a string, got a boolean",
                "immutable: expected a boolean, got a string",
                "metadata.labels.a: expected a string, got a number",
                "metadata.name: expected a string, got a number",
            ]
        );
    }

    #[test]
    fn unknown_fields_are_found_and_pruned() {
        let mut cm = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "x", "labelz": {}, "ownerReferences": [{"name": "o", "bad": 1}]},
            "data": {"a": "b"},
            "spec": {"replicas": 1},
        });
        let shape = of_kind("ConfigMap").expect("known");
        let unknown = prune(&mut cm, shape);
        assert_eq!(
            unknown,
            ["metadata.labelz", "metadata.ownerReferences[0].bad", "spec"]
        );
        assert_eq!(
            cm,
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "x", "ownerReferences": [{"name": "o"}]},
                "data": {"a": "b"},
            })
        );
    }
}
