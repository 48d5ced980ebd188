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
    /// A map from any key to values of one shape.
    MapOf(&'static Shape),
    /// A list of one shape.
    ListOf(&'static Shape),
    /// An object with these fields and no others.
    Object(&'static [(&'static str, &'static Shape)]),
}

use Shape::*;

static SCALAR: Shape = Scalar;
static ANY: Shape = Any;
static STRING_MAP: Shape = MapOf(&SCALAR);
static STRING_LIST: Shape = ListOf(&SCALAR);

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
    ("name", &SCALAR),
    ("generateName", &SCALAR),
    ("namespace", &SCALAR),
    ("selfLink", &SCALAR),
    ("uid", &SCALAR),
    ("resourceVersion", &SCALAR),
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
    ("immutable", &SCALAR),
]);
static SECRET: Shape = Object(&[
    ("apiVersion", &SCALAR),
    ("kind", &SCALAR),
    ("metadata", &OBJECT_META),
    ("data", &STRING_MAP),
    ("stringData", &STRING_MAP),
    ("type", &SCALAR),
    ("immutable", &SCALAR),
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

/// Removes the fields `shape` does not have; returns their paths (`spec.foo`,
/// `metadata.ownerReferences[0].bad`) in document order.
pub fn prune(value: &mut Value, shape: &Shape) -> Vec<String> {
    let mut unknown = Vec::new();
    walk(value, shape, "", &mut unknown);
    unknown
}

fn walk(value: &mut Value, shape: &Shape, path: &str, unknown: &mut Vec<String>) {
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
                            walk(v, s, &child, unknown);
                        }
                    }
                    None => {
                        map.remove(&k);
                        unknown.push(child);
                    }
                }
            }
        }
        (MapOf(s), Value::Object(map)) => {
            for (k, v) in map.iter_mut() {
                walk(v, s, &format!("{path}.{k}"), unknown);
            }
        }
        (ListOf(s), Value::Array(items)) => {
            for (i, v) in items.iter_mut().enumerate() {
                walk(v, s, &format!("{path}[{i}]"), unknown);
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
