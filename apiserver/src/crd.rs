//! CustomResourceDefinitions: checking them, their status, and serving the resources they
//! define. Every apiserver keeps its set of served custom resources in step with the
//! stored CRDs through one store watch; the apiserver that writes a CRD updates its own set
//! at once.

use std::time::Duration;

use serde_json::{json, Value};

use crate::etcd::Store;
use crate::kinds::Cause;
use crate::resources::{self, CustomDef};

/// The CRDs' store prefix.
fn prefix() -> String {
    resources::find("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        .map(|r| r.prefix(None))
        .unwrap_or_else(|| "/registry/apiextensions.k8s.io/customresourcedefinitions/".into())
}

/// Validates a CRD as Kubernetes does, the parts that matter for serving it; `old` is the
/// stored CRD on update.
pub fn validate(crd: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    if let Some(old) = old {
        for field in ["scope", "group"] {
            if old["spec"][field] != crd["spec"][field] {
                causes.push((
                    format!("spec.{field}"),
                    format!("Invalid value: {}: field is immutable", crd["spec"][field]),
                ));
            }
        }
        if old["spec"]["names"]["plural"] != crd["spec"]["names"]["plural"] {
            causes.push((
                "spec.names.plural".into(),
                format!(
                    "Invalid value: {}: field is immutable",
                    crd["spec"]["names"]["plural"]
                ),
            ));
        }
    }
    let spec = &crd["spec"];
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    let (group, plural, kind) = (
        text(&spec["group"]),
        text(&spec["names"]["plural"]),
        text(&spec["names"]["kind"]),
    );
    if group.is_empty() {
        causes.push(("spec.group".into(), "Required value".into()));
    } else if group.ends_with(".k8s.io") || group.ends_with(".kubernetes.io") {
        causes.push((
            "spec.group".into(),
            format!("Invalid value: \"{group}\": the k8s.io and kubernetes.io groups are Kubernetes' own"),
        ));
    } else if !group.contains('.') {
        causes.push((
            "spec.group".into(),
            format!("Invalid value: \"{group}\": should be a domain with at least one dot"),
        ));
    }
    if plural.is_empty() {
        causes.push(("spec.names.plural".into(), "Required value".into()));
    } else if let Err(msg) = resources::dns1123_label(&plural) {
        causes.push((
            "spec.names.plural".into(),
            format!("Invalid value: \"{plural}\": {msg}"),
        ));
    }
    if kind.is_empty() {
        causes.push(("spec.names.kind".into(), "Required value".into()));
    }
    let name = text(&crd["metadata"]["name"]);
    if !plural.is_empty() && !group.is_empty() && name != format!("{plural}.{group}") {
        causes.push((
            "metadata.name".into(),
            format!("Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"),
        ));
    }
    match spec["scope"].as_str() {
        Some("Namespaced" | "Cluster") => {}
        Some(other) => causes.push((
            "spec.scope".into(),
            format!(
                "Unsupported value: \"{other}\": supported values: \"Cluster\", \"Namespaced\""
            ),
        )),
        None => causes.push(("spec.scope".into(), "Required value".into())),
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        causes.push((
            "spec.versions".into(),
            "Invalid value: []: must have exactly one version marked as storage version".into(),
        ));
    }
    let storage = versions
        .iter()
        .filter(|v| v["storage"] == json!(true))
        .count();
    if !versions.is_empty() && storage != 1 {
        causes.push((
            "spec.versions".into(),
            format!(
                "Invalid value: {storage}: must have exactly one version marked as storage version"
            ),
        ));
    }
    for (i, v) in versions.iter().enumerate() {
        if v["name"].as_str().is_none_or(str::is_empty) {
            causes.push((format!("spec.versions[{i}].name"), "Required value".into()));
        }
        if v["schema"]["openAPIV3Schema"].get("type").is_none() {
            causes.push((
                format!("spec.versions[{i}].schema.openAPIV3Schema.type"),
                "Required value: must not be empty at the root".into(),
            ));
        }
    }
    causes
}

/// The status the server gives a CRD: its names accepted and itself established.
pub fn set_status(crd: &mut Value) {
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let condition = |t: &str, reason: &str, message: &str| json!({"type": t, "status": "True", "lastTransitionTime": now, "reason": reason, "message": message});
    let stored: Vec<Value> = crd["spec"]["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["storage"] == json!(true))
        .map(|v| v["name"].clone())
        .collect();
    crd["status"] = json!({
        "acceptedNames": crd["spec"]["names"],
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "storedVersions": stored,
    });
}

/// What a stored CRD serves: one entry per served version.
fn served(crd: &Value) -> Vec<(CustomDef, crate::schema::Schema, Value, Vec<Value>)> {
    if !validate(crd, None).is_empty() {
        return Vec::new();
    }
    let spec = &crd["spec"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect()
    };
    let names = &spec["names"];
    let kind = names["kind"].as_str().unwrap_or("").to_string();
    let singular = names["singular"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| kind.to_lowercase());
    let storage_version = spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["storage"] == json!(true))
        .and_then(|v| v["name"].as_str())
        .unwrap_or("")
        .to_string();
    // Versions differ only in apiVersion (conversion strategy None, converted at the edge:
    // convert.rs); a conversion webhook cannot be called, so such a CRD serves its storage
    // version only.
    let webhook = spec["conversion"]["strategy"] == "Webhook";
    spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["served"] != json!(false))
        .filter(|v| !webhook || v["storage"] == json!(true))
        .map(|v| {
            let mut subresources = Vec::new();
            if v["subresources"].get("status").is_some() {
                subresources.push("status");
            }
            let def = CustomDef {
                group: spec["group"].as_str().unwrap_or("").to_string(),
                version: v["name"].as_str().unwrap_or("").to_string(),
                plural: names["plural"].as_str().unwrap_or("").to_string(),
                singular: singular.clone(),
                kind: kind.clone(),
                namespaced: spec["scope"] == "Namespaced",
                short_names: strings(&names["shortNames"]),
                categories: strings(&names["categories"]),
                subresources,
                storage_version: storage_version.clone(),
            };
            let openapi = v["schema"]["openAPIV3Schema"].clone();
            let schema = crate::schema::from_json(&openapi);
            let columns = v["additionalPrinterColumns"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            (def, schema, openapi, columns)
        })
        .collect()
}

/// Reads every CRD and serves what they define; returns the revision read at.
pub async fn refresh(
    store: &Store,
    codec: &crate::crypt::Codec,
) -> Result<i64, crate::status::ApiError> {
    let (kvs, _, revision) = store.list(&prefix(), &[], 0, 0).await?;
    let mut now = Vec::new();
    for kv in &kvs {
        let value = codec.open(&kv.key, &kv.value)?;
        if let Ok(crd) = serde_json::from_slice::<Value>(&value) {
            now.extend(served(&crd));
        }
    }
    resources::set_custom(now);
    Ok(revision)
}

/// Keeps this apiserver's custom resources in step with the stored CRDs, for as long as
/// the process runs: a full read, then a watch; any change reads them all again.
pub async fn follow(store: Store, codec: std::sync::Arc<crate::crypt::Codec>) {
    loop {
        let outcome: Result<(), crate::status::ApiError> = async {
            let revision = refresh(&store, &codec).await?;
            let (mut stream, _progress) = store.watch(&prefix(), revision + 1).await?;
            while let Some(resp) = stream
                .message()
                .await
                .map_err(|e| crate::status::ApiError::unavailable(e.to_string()))?
            {
                if resp.canceled {
                    break;
                }
                if !resp.events.is_empty() {
                    refresh(&store, &codec).await?;
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = outcome {
            tracing::debug!(error = %e, "following CustomResourceDefinitions; retrying");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn widget() -> Value {
        json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                        "spec": {"type": "object", "properties": {"size": {"type": "integer"}}}}}},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [{"name": "Size", "type": "integer", "jsonPath": ".spec.size"}]}]}})
    }

    #[test]
    fn a_good_crd_serves_its_versions() {
        let crd = widget();
        assert!(validate(&crd, None).is_empty());
        let served = served(&crd);
        assert_eq!(served.len(), 1);
        let (def, _, _, columns) = &served[0];
        assert_eq!(
            (def.group.as_str(), def.version.as_str()),
            ("example.com", "v1")
        );
        assert_eq!(def.subresources, ["status"]);
        assert_eq!(columns.len(), 1);
    }

    #[test]
    fn a_bad_crd_lists_its_causes() {
        let mut crd = widget();
        crd["metadata"]["name"] = json!("widgets");
        crd["spec"]["versions"][0]["storage"] = json!(false);
        let fields: Vec<String> = validate(&crd, None).into_iter().map(|c| c.0).collect();
        assert_eq!(fields, ["metadata.name", "spec.versions"]);
    }
}
