//! The fields each served kind has, for `fieldValidation` (Strict, Warn, Ignore), for
//! pruning what a kind does not have (as Kubernetes' typed decoding drops it), for type
//! checks, and for the OpenAPI documents `kubectl explain` reads.
//!
//! Built-in kinds take their schemas from `k8s-openapi` (Kubernetes 1.32); custom resources
//! from their CustomResourceDefinition's `openAPIV3Schema`. Both are turned into one compact
//! form: an arena of nodes (schemas are recursive: a CRD's own schema type refers to itself).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};

use serde_json::{Map, Value};

/// One schema node.
#[derive(Debug, Clone)]
pub enum Node {
    /// Anything (free-form JSON, `x-kubernetes-preserve-unknown-fields` without properties).
    Any,
    Str,
    Int,
    Num,
    Bool,
    /// An integer or a string (`x-kubernetes-int-or-string`).
    IntOrString,
    /// A resource quantity: a string, or a number kubectl users write unquoted (`cpu: 1`).
    Quantity,
    /// A map from any key to values of one node.
    Map(usize),
    List(usize),
    /// An object with these fields; `preserve` keeps fields it does not list.
    Object {
        fields: BTreeMap<String, usize>,
        required: Vec<String>,
        preserve: bool,
    },
}

/// Nodes, referring to each other by index.
#[derive(Debug, Default)]
pub struct Arena {
    nodes: Vec<Node>,
}

/// A schema: a node in an arena.
#[derive(Debug, Clone)]
pub struct Schema {
    arena: Arc<Arena>,
    root: usize,
}

impl Schema {
    pub fn node(&self) -> &Node {
        &self.arena.nodes[self.root]
    }

    /// The schema of a field of this object (or of this map's values).
    pub fn field(&self, name: &str) -> Option<Schema> {
        let at = match self.node() {
            Node::Object { fields, .. } => *fields.get(name)?,
            Node::Map(v) => *v,
            _ => return None,
        };
        Some(self.at(at))
    }

    /// The schema of this list's items.
    pub fn items(&self) -> Option<Schema> {
        match self.node() {
            Node::List(i) => Some(self.at(*i)),
            _ => None,
        }
    }

    fn at(&self, root: usize) -> Schema {
        Schema {
            arena: self.arena.clone(),
            root,
        }
    }
}

/// Turns JSON schemas (OpenAPI v3, with `$ref`s into `defs`) into arena nodes.
struct Builder<'a> {
    defs: &'a Map<String, Value>,
    nodes: Vec<Node>,
    by_ref: HashMap<String, usize>,
}

/// Definitions whose declared type is narrower than what Kubernetes accepts.
const QUANTITY: &str = "io.k8s.apimachinery.pkg.api.resource.Quantity";

impl Builder<'_> {
    fn node(&mut self, s: &Value) -> usize {
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            let name = r.rsplit('/').next().unwrap_or(r).to_string();
            if let Some(&at) = self.by_ref.get(&name) {
                return at;
            }
            let at = self.nodes.len();
            self.nodes.push(Node::Any);
            self.by_ref.insert(name.clone(), at);
            let node = if name == QUANTITY {
                Node::Quantity
            } else {
                match self.defs.get(&name) {
                    Some(def) => {
                        let def = def.clone();
                        self.build(&def)
                    }
                    None => Node::Any,
                }
            };
            self.nodes[at] = node;
            return at;
        }
        if let Some([only]) = s.get("allOf").and_then(Value::as_array).map(Vec::as_slice) {
            return self.node(only);
        }
        let node = self.build(s);
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    fn build(&mut self, s: &Value) -> Node {
        if s.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
            return Node::IntOrString;
        }
        let preserve = s.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        match s.get("type").and_then(Value::as_str) {
            Some("string") => Node::Str,
            Some("integer") => Node::Int,
            Some("number") => Node::Num,
            Some("boolean") => Node::Bool,
            Some("array") => match s.get("items") {
                Some(items) => Node::List(self.node(items)),
                None => Node::List(self.any()),
            },
            Some("object") | None => {
                if let Some(props) = s.get("properties").and_then(Value::as_object) {
                    let fields = props
                        .iter()
                        .map(|(k, v)| (k.clone(), self.node(v)))
                        .collect();
                    let required = s
                        .get("required")
                        .and_then(Value::as_array)
                        .map(|r| {
                            r.iter()
                                .filter_map(Value::as_str)
                                .map(str::to_string)
                                .collect()
                        })
                        .unwrap_or_default();
                    Node::Object {
                        fields,
                        required,
                        preserve,
                    }
                } else if let Some(values) = s.get("additionalProperties").filter(|v| v.is_object())
                {
                    Node::Map(self.node(values))
                } else {
                    Node::Any
                }
            }
            Some(_) => Node::Any,
        }
    }

    fn any(&mut self) -> usize {
        self.nodes.push(Node::Any);
        self.nodes.len() - 1
    }
}

/// The schema of a structural JSON schema without references (a CRD version's
/// `openAPIV3Schema`), with `metadata` taken as Kubernetes' ObjectMeta.
pub fn from_json(schema: &Value) -> Schema {
    let mut b = Builder {
        defs: &BUILTIN.definitions,
        nodes: Vec::new(),
        by_ref: HashMap::new(),
    };
    let mut schema = schema.clone();
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        props.insert(
            "metadata".into(),
            serde_json::json!({"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}),
        );
        for f in ["apiVersion", "kind"] {
            props.insert(f.into(), serde_json::json!({"type": "string"}));
        }
    }
    let root = b.node(&schema);
    Schema {
        arena: Arc::new(Arena { nodes: b.nodes }),
        root,
    }
}

/// The built-in kinds' schemas, built once.
pub struct Builtin {
    /// OpenAPI v3 definitions by name (`io.k8s.api.apps.v1.Deployment`), as served.
    pub definitions: Map<String, Value>,
    arena: Arc<Arena>,
    roots: HashMap<String, usize>,
}

pub static BUILTIN: LazyLock<Builtin> = LazyLock::new(|| {
    use k8s_openapi::api::{apps, autoscaling, batch, coordination, core, discovery, events};
    use k8s_openapi::api::{policy, storage};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions;
    let mut gen = schemars::gen::SchemaSettings::openapi3().into_generator();
    macro_rules! add {
        ($($t:ty),* $(,)?) => { $( gen.subschema_for::<$t>(); )* };
    }
    add!(
        core::v1::Namespace,
        core::v1::Pod,
        core::v1::Binding,
        core::v1::Node,
        core::v1::Service,
        core::v1::Endpoints,
        core::v1::ConfigMap,
        core::v1::Secret,
        core::v1::ServiceAccount,
        core::v1::Event,
        core::v1::PersistentVolume,
        core::v1::PersistentVolumeClaim,
        core::v1::ResourceQuota,
        core::v1::LimitRange,
        core::v1::PodTemplate,
        apps::v1::Deployment,
        apps::v1::ReplicaSet,
        apps::v1::StatefulSet,
        apps::v1::DaemonSet,
        apps::v1::ControllerRevision,
        batch::v1::Job,
        batch::v1::CronJob,
        autoscaling::v1::Scale,
        autoscaling::v2::HorizontalPodAutoscaler,
        coordination::v1::Lease,
        discovery::v1::EndpointSlice,
        events::v1::Event,
        storage::v1::StorageClass,
        policy::v1::PodDisruptionBudget,
        apiextensions::v1::CustomResourceDefinition,
    );
    let definitions: Map<String, Value> = gen
        .definitions()
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or(Value::Null)))
        .collect();
    let mut b = Builder {
        defs: &definitions,
        nodes: Vec::new(),
        by_ref: HashMap::new(),
    };
    let names: Vec<String> = definitions.keys().cloned().collect();
    for name in &names {
        b.node(&serde_json::json!({"$ref": format!("#/components/schemas/{name}")}));
    }
    let (nodes, roots) = (b.nodes, b.by_ref);
    Builtin {
        definitions,
        arena: Arc::new(Arena { nodes }),
        roots,
    }
});

/// The schema of a built-in definition (`io.k8s.api.core.v1.ConfigMap`).
pub fn builtin(name: &str) -> Option<Schema> {
    let b = &*BUILTIN;
    b.roots.get(name).map(|&root| Schema {
        arena: b.arena.clone(),
        root,
    })
}

/// What a check found.
#[derive(Debug, Default, PartialEq)]
pub struct Findings {
    /// Fields the kind does not have (removed): `spec.foo`, `metadata.ownerReferences[0].bad`.
    pub unknown: Vec<String>,
    /// Fields of the wrong JSON type: `data.a: expected a string, got a number`.
    pub wrong: Vec<String>,
}

/// Removes the fields `schema` does not have and checks the types it knows.
pub fn check(value: &mut Value, schema: &Schema) -> Findings {
    let mut found = Findings::default();
    walk(value, &schema.arena, schema.root, "", &mut found);
    found
}

/// The unknown fields only (for tests and callers that need no types).
pub fn prune(value: &mut Value, schema: &Schema) -> Vec<String> {
    check(value, schema).unknown
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

fn is_integer(v: &Value) -> bool {
    v.as_i64().is_some() || v.as_u64().is_some()
}

fn walk(value: &mut Value, arena: &Arena, at: usize, path: &str, found: &mut Findings) {
    let node = &arena.nodes[at];
    let expected = match (node, &*value) {
        (_, Value::Null) | (Node::Any, _) => return,
        (Node::Str, Value::String(_)) | (Node::Bool, Value::Bool(_)) => return,
        (Node::Num, Value::Number(_)) => return,
        (Node::Int, v) if is_integer(v) => return,
        (Node::IntOrString, v) if v.is_string() || is_integer(v) => return,
        (Node::Quantity, v) if v.is_string() || v.is_number() => return,
        (Node::Str, _) => "a string",
        (Node::Bool, _) => "a boolean",
        (Node::Num, _) => "a number",
        (Node::Int, _) => "an integer",
        (Node::IntOrString, _) => "an integer or a string",
        (Node::Quantity, _) => "a quantity",
        (Node::Object { .. } | Node::Map(_), v) if !v.is_object() => "an object",
        (Node::List(_), v) if !v.is_array() => "a list",
        _ => "",
    };
    if !expected.is_empty() {
        found.wrong.push(format!(
            "{}: expected {expected}, got {}",
            if path.is_empty() { "." } else { path },
            json_type(value)
        ));
        return;
    }
    match (node, value) {
        (
            Node::Object {
                fields, preserve, ..
            },
            Value::Object(map),
        ) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match fields.get(&k) {
                    Some(&s) => {
                        if let Some(v) = map.get_mut(&k) {
                            walk(v, arena, s, &child, found);
                        }
                    }
                    None if *preserve => {}
                    None => {
                        map.remove(&k);
                        found.unknown.push(child);
                    }
                }
            }
        }
        (Node::Map(s), Value::Object(map)) => {
            for (k, v) in map.iter_mut() {
                walk(v, arena, *s, &format!("{path}.{k}"), found);
            }
        }
        (Node::List(s), Value::Array(items)) => {
            for (i, v) in items.iter_mut().enumerate() {
                walk(v, arena, *s, &format!("{path}[{i}]"), found);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config_map() -> Schema {
        builtin("io.k8s.api.core.v1.ConfigMap").expect("known")
    }

    #[test]
    fn wrong_types_are_found() {
        let mut cm = json!({"kind": "ConfigMap", "metadata": {"name": 5, "labels": {"a": 1}}, "data": {"x": true}, "immutable": "yes"});
        let found = check(&mut cm, &config_map());
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
        let unknown = prune(&mut cm, &config_map());
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

    #[test]
    fn deployments_check_deep_fields_quantities_and_int_or_strings() {
        let schema = builtin("io.k8s.api.apps.v1.Deployment").expect("known");
        let mut d = json!({
            "spec": {
                "replicas": "3",
                "strategy": {"rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}},
                "template": {"spec": {"containers": [{
                    "name": "web", "image": "x", "imagePullPolicy": "Never", "typo": 1,
                    "resources": {"limits": {"cpu": 1, "memory": "64Mi"}},
                    "ports": [{"containerPort": "80"}],
                }]}},
            },
        });
        let found = check(&mut d, &schema);
        assert_eq!(found.unknown, ["spec.template.spec.containers[0].typo"]);
        assert_eq!(
            found.wrong,
            [
                "spec.replicas: expected an integer, got a string",
                "spec.template.spec.containers[0].ports[0].containerPort: expected an integer, got a string",
            ]
        );
    }

    #[test]
    fn custom_schemas_are_recursive_safe_and_preserve_unknown_fields_where_asked() {
        let crd = builtin(
            "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.CustomResourceDefinition",
        )
        .expect("known");
        let props = crd
            .field("spec")
            .and_then(|s| s.field("versions"))
            .and_then(|s| s.items())
            .and_then(|s| s.field("schema"))
            .and_then(|s| s.field("openAPIV3Schema"))
            .and_then(|s| s.field("properties"))
            .and_then(|s| s.field("anything"))
            .and_then(|s| s.field("properties"));
        assert!(props.is_some(), "JSONSchemaProps refers to itself");
        let schema = from_json(&json!({
            "type": "object",
            "properties": {
                "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            },
        }));
        let mut cr = json!({"apiVersion": "x/v1", "kind": "W", "metadata": {"name": "a", "bad": 1},
            "spec": {"size": 1, "colour": "red"}, "extra": {"free": [1]}});
        let found = check(&mut cr, &schema);
        assert_eq!(found.unknown, ["metadata.bad", "spec.colour"]);
        assert!(found.wrong.is_empty());
        assert_eq!(cr["extra"]["free"][0], 1);
    }
}
