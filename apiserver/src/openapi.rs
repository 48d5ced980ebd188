//! `/openapi/v2` and `/openapi/v3`: what kubectl downloads before `create -f`, `apply` and
//! `edit`.
//!
//! kubectl validates with the server when the server says it can: for each kind it looks in
//! the OpenAPI v3 document of the kind's group version for a PATCH operation tagged with the
//! kind that takes the `fieldValidation` query parameter, and if there is one it sends
//! `fieldValidation=Strict` and leaves the checking to the server. The v2 document must
//! still download and parse (as protobuf); it carries no definitions, so kubectl's own
//! schema check has nothing to hold a manifest against.

use serde_json::{json, Map, Value};

use crate::resources::{self, Resource};

/// The v2 document, as protobuf (gnostic's `openapi.v2.Document`): `swagger` (field 1) and
/// `info` (field 2: `title` 1, `version` 2).
pub fn v2_protobuf() -> Vec<u8> {
    fn field(out: &mut Vec<u8>, number: u8, bytes: &[u8]) {
        out.push((number << 3) | 2);
        let mut len = bytes.len();
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        out.extend_from_slice(bytes);
    }
    let mut info = Vec::new();
    field(&mut info, 1, b"Kubernetes");
    field(&mut info, 2, kubernetes_version().as_bytes());
    let mut doc = Vec::new();
    field(&mut doc, 1, b"2.0");
    field(&mut doc, 2, &info);
    doc
}

pub fn v2_json() -> Value {
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": kubernetes_version()},
        "paths": {},
        "definitions": {},
    })
}

fn kubernetes_version() -> String {
    let (major, minor) = crate::handler::KUBERNETES_VERSION;
    format!("v{major}.{minor}.0")
}

/// `api/v1` or `apis/<group>/<version>`.
fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// The v3 discovery document: one entry per group version.
pub fn v3_root() -> Value {
    let mut paths = Map::new();
    for (group, version) in resources::group_versions() {
        let path = gv_path(group, version);
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={}", hash())}),
        );
    }
    json!({"paths": paths})
}

/// Changes whenever the served document could change (a new build).
fn hash() -> &'static str {
    concat!("flotilla-", env!("CARGO_PKG_VERSION"))
}

fn operation(r: &Resource, verb: &str, with_field_validation: bool) -> Value {
    let mut params = vec![json!({
        "name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true},
    })];
    if with_field_validation {
        params.push(json!({
            "name": "fieldValidation",
            "in": "query",
            "description": "Ignore, Warn or Strict: what to do with unknown or duplicate fields.",
            "schema": {"type": "string", "uniqueItems": true},
        }));
    }
    json!({
        "operationId": format!("{verb}{}", r.kind),
        "x-kubernetes-action": verb,
        "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
        "parameters": params,
        "responses": {"200": {"description": "OK"}},
    })
}

/// The v3 document of one group version, or None if it is not served.
pub fn v3_group_version(group: &str, version: &str) -> Option<Value> {
    if !resources::group_versions().contains(&(group, version)) {
        return None;
    }
    let mut paths = Map::new();
    let served: Vec<&Resource> = resources::all()
        .into_iter()
        .filter(|r| r.group == group && r.version == version)
        .collect();
    for r in &served {
        let base = format!("/{}", gv_path(group, version));
        let (collection, item) = if r.namespaced {
            (
                format!("{base}/namespaces/{{namespace}}/{}", r.plural),
                format!("{base}/namespaces/{{namespace}}/{}/{{name}}", r.plural),
            )
        } else {
            (
                format!("{base}/{}", r.plural),
                format!("{base}/{}/{{name}}", r.plural),
            )
        };
        paths.insert(
            collection,
            json!({
                "get": operation(r, "list", false),
                "post": operation(r, "post", true),
            }),
        );
        paths.insert(
            item,
            json!({
                "get": operation(r, "get", false),
                "put": operation(r, "put", true),
                "patch": operation(r, "patch", true),
                "delete": operation(r, "delete", false),
            }),
        );
    }
    let schemas = schemas_of(&served);
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": kubernetes_version()},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// The component schemas of a group version's kinds: each kind's definition tagged with
/// its group, version and kind, and every definition it refers to.
fn schemas_of(served: &[&Resource]) -> Map<String, Value> {
    let defs = &crate::schema::BUILTIN.definitions;
    let mut schemas = Map::new();
    let mut pending: Vec<String> = Vec::new();
    let gvk = |r: &Resource| json!([{"group": r.group, "version": r.version, "kind": r.kind}]);
    for r in served {
        if r.is_custom() {
            let Some(custom) = resources::custom(r) else {
                continue;
            };
            let mut schema = custom.openapi.clone();
            if !schema.is_object() {
                schema = json!({"type": "object"});
            }
            schema["properties"]["metadata"] = json!({"$ref": format!("{REF}{OBJECT_META}")});
            schema["properties"]["apiVersion"] = json!({"type": "string"});
            schema["properties"]["kind"] = json!({"type": "string"});
            schema["x-kubernetes-group-version-kind"] = gvk(r);
            pending.push(OBJECT_META.into());
            schemas.insert(
                format!("{}.{}.{}", reverse(r.group), r.version, r.kind),
                schema,
            );
        } else if let Some(def) = defs.get(r.schema) {
            let mut schema = def.clone();
            schema["x-kubernetes-group-version-kind"] = gvk(r);
            collect_refs(&schema, &mut pending);
            schemas.insert(r.schema.to_string(), schema);
        }
    }
    while let Some(name) = pending.pop() {
        if schemas.contains_key(&name) {
            continue;
        }
        if let Some(def) = defs.get(&name) {
            collect_refs(def, &mut pending);
            schemas.insert(name, def.clone());
        }
    }
    for schema in schemas.values_mut() {
        wrap_refs(schema);
    }
    schemas
}

/// A reference with a description beside it becomes `allOf: [reference]`, the form
/// Kubernetes serves (OpenAPI 3.0 ignores a `$ref`'s siblings).
fn wrap_refs(v: &mut Value) {
    match v {
        Value::Object(m) => {
            // (A `$ref` that is not a string is a property named so: JSONSchemaProps has one.)
            if m.len() > 1 && m.get("$ref").is_some_and(Value::is_string) {
                if let Some(r) = m.remove("$ref") {
                    m.insert("allOf".into(), json!([{"$ref": r}]));
                }
            }
            m.values_mut().for_each(wrap_refs);
        }
        Value::Array(a) => a.iter_mut().for_each(wrap_refs),
        _ => {}
    }
}

const REF: &str = "#/components/schemas/";
const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";

/// `com.example.stable` for `stable.example.com`, as Kubernetes names custom schemas.
fn reverse(group: &str) -> String {
    group.split('.').rev().collect::<Vec<_>>().join(".")
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => {
                        out.push(r.trim_start_matches(REF).to_string());
                    }
                    _ => collect_refs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_kind_has_a_patch_operation_taking_field_validation() {
        for r in resources::RESOURCES {
            let doc = v3_group_version(r.group, r.version).expect("served");
            let found = doc["paths"].as_object().expect("paths").values().any(|p| {
                p["patch"]["x-kubernetes-group-version-kind"]["kind"] == r.kind
                    && p["patch"]["parameters"]
                        .as_array()
                        .is_some_and(|ps| ps.iter().any(|p| p["name"] == "fieldValidation"))
            });
            assert!(found, "{}", r.kind);
        }
    }

    #[test]
    fn every_served_kind_has_a_schema_tagged_with_its_kind() {
        let doc = v3_group_version("", "v1").expect("core");
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        let cm = &schemas["io.k8s.api.core.v1.ConfigMap"];
        assert_eq!(
            cm["x-kubernetes-group-version-kind"][0]["kind"],
            "ConfigMap"
        );
        assert_eq!(
            cm["properties"]["data"]["additionalProperties"]["type"],
            "string"
        );
        assert_eq!(
            cm["properties"]["metadata"]["allOf"][0]["$ref"],
            "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
        );
        let meta = &schemas["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"];
        assert_eq!(meta["properties"]["name"]["type"], "string");
        assert!(schemas.contains_key("io.k8s.api.core.v1.Service"));
    }

    #[test]
    fn a_property_named_ref_stays_a_property() {
        let doc = v3_group_version("apiextensions.k8s.io", "v1").expect("served");
        let props = &doc["components"]["schemas"]
            ["io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.JSONSchemaProps"]
            ["properties"];
        assert_eq!(props["$ref"]["type"], "string");
    }

    #[test]
    fn the_v2_document_is_a_small_protobuf_message() {
        let doc = v2_protobuf();
        assert_eq!(&doc[..5], &[0x0a, 3, b'2', b'.', b'0']);
        assert_eq!(doc[5], 0x12);
    }
}
