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

/// The protobuf form kubectl asks for first.
pub const V2_PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";

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
    for r in resources::RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
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
    let mut schemas = Map::new();
    for r in resources::RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let mut schema = match crate::schema::of_kind(r.kind) {
            Some(shape) => schema_of(shape),
            // Kinds without a written-out shape take any fields for now.
            None => json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        };
        schema["description"] = json!(description(r.kind));
        schema["x-kubernetes-group-version-kind"] =
            json!([{"group": r.group, "version": r.version, "kind": r.kind}]);
        schemas.insert(schema_name(r), schema);
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": kubernetes_version()},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// `io.k8s.api.core.v1.ConfigMap`, as Kubernetes names a kind's schema.
fn schema_name(r: &Resource) -> String {
    let group = if r.group.is_empty() { "core" } else { r.group };
    format!("io.k8s.api.{group}.{}.{}", r.version, r.kind)
}

fn description(kind: &str) -> &'static str {
    match kind {
        "Namespace" => "Namespace provides a scope for names.",
        "ConfigMap" => "ConfigMap holds configuration data for pods to consume.",
        "Secret" => "Secret holds secret data of a certain type; the server stores it encrypted.",
        "ServiceAccount" => "ServiceAccount binds together a name, secrets and pull secrets.",
        "Service" => {
            "Service is a named abstraction of a set of pods, with a virtual IP and ports."
        }
        "Endpoints" => "Endpoints is the set of addresses and ports that implement a service.",
        "Event" => "Event is a report of an event somewhere in the cluster.",
        _ => "",
    }
}

/// An OpenAPI v3 schema for a shape (the fields `kubectl explain` walks).
fn schema_of(shape: &crate::schema::Shape) -> Value {
    use crate::schema::Shape;
    match shape {
        Shape::Any => json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        // A scalar whose JSON type is not pinned down yet (strings, numbers, booleans).
        Shape::Scalar => json!({"type": "string"}),
        Shape::Str => json!({"type": "string"}),
        Shape::Bool => json!({"type": "boolean"}),
        Shape::MapOf(inner) => json!({"type": "object", "additionalProperties": schema_of(inner)}),
        Shape::ListOf(inner) => json!({"type": "array", "items": schema_of(inner)}),
        Shape::Object(fields) => {
            let properties: Map<String, Value> = fields
                .iter()
                .map(|(name, s)| (name.to_string(), schema_of(s)))
                .collect();
            json!({"type": "object", "properties": properties})
        }
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
            cm["properties"]["metadata"]["properties"]["name"]["type"],
            "string"
        );
        assert!(schemas.contains_key("io.k8s.api.core.v1.Service"));
    }

    #[test]
    fn the_v2_document_is_a_small_protobuf_message() {
        let doc = v2_protobuf();
        assert_eq!(&doc[..5], &[0x0a, 3, b'2', b'.', b'0']);
        assert_eq!(doc[5], 0x12);
    }
}
