//! The `scale` subresource (autoscaling/v1 Scale over a workload's `spec.replicas`) and
//! pods' `binding` (what the scheduler posts to put a pod on a node).

use std::collections::HashMap;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use serde_json::{json, Value};

use super::{
    apply_patch, decode, json_response, now_rfc3339, parse_patch, write_object, Body, State, Target,
};
use crate::etcd::Written;
use crate::status::ApiError;

/// A LabelSelector as the string form Scale's `status.selector` carries.
fn selector_string(selector: &Value) -> String {
    let mut terms: Vec<String> = selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    for e in selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = e["key"].as_str().unwrap_or("");
        let values = crate::kinds::requirement_values(e);
        terms.push(match e["operator"].as_str().unwrap_or("") {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_string(),
            _ => format!("!{key}"),
        });
    }
    terms.join(",")
}

/// The Scale view of a workload.
fn scale_of(obj: &Value) -> Value {
    let meta = &obj["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"],
            "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(0)},
        "status": {
            "replicas": obj["status"]["replicas"].as_i64().unwrap_or(0),
            "selector": selector_string(&obj["spec"]["selector"]),
        },
    })
}

/// GET, PUT and PATCH of `<workload>/scale`: only `spec.replicas` is written.
pub(super) async fn scale(
    state: &State,
    t: &Target,
    name: &str,
    q: &HashMap<String, String>,
    method: &Method,
    content_type: &str,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let (plural, group) = (t.resource.plural, t.resource.group);
    let key = t.resource.key(t.namespace.as_deref(), name);
    let patch = match *method {
        Method::PATCH => Some(parse_patch(content_type, &body)?),
        Method::PUT => None,
        Method::GET => {
            let (current, _) = state.store.get(&key).await?;
            let current = current.ok_or_else(|| ApiError::not_found(plural, group, name))?;
            let obj = decode(&state.codec, &current)?;
            return Ok(json_response(StatusCode::OK, &scale_of(&obj)));
        }
        _ => return Err(ApiError::method_not_allowed(method.as_str())),
    };
    let invalid = |field: &str, msg: String| {
        ApiError::invalid("Scale", "autoscaling", name, vec![(field.into(), msg)])
    };
    for _ in 0..5 {
        let (current, _) = state.store.get(&key).await?;
        let current = current.ok_or_else(|| ApiError::not_found(plural, group, name))?;
        let old = decode(&state.codec, &current)?;
        let wanted = match &patch {
            Some((patch_type, patch)) => {
                let mut scale = scale_of(&old);
                apply_patch(t, name, &mut scale, *patch_type, patch)?;
                scale
            }
            None => serde_json::from_slice::<Value>(&body).map_err(|e| {
                ApiError::bad_request(format!("the Scale body is not valid JSON: {e}"))
            })?,
        };
        let replicas = match &wanted["spec"]["replicas"] {
            Value::Null => 0,
            v => v.as_i64().ok_or_else(|| {
                invalid(
                    "spec.replicas",
                    format!("Invalid value: {v}: must be an integer"),
                )
            })?,
        };
        if replicas < 0 {
            return Err(invalid(
                "spec.replicas",
                format!("Invalid value: {replicas}: must be greater than or equal to 0"),
            ));
        }
        let now = current.mod_revision.to_string();
        let precondition = wanted["metadata"]["resourceVersion"]
            .as_str()
            .filter(|rv| !rv.is_empty() && *rv != now)
            .map(|rv| {
                rv.parse::<i64>()
                    .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))
            })
            .transpose()?;
        let mut obj = old.clone();
        obj["spec"]["replicas"] = json!(replicas);
        let expected = precondition.unwrap_or(current.mod_revision);
        match write_object(state, t, name, &key, old, obj, expected, q, true).await {
            Err(e) if e.reason == "Conflict" && precondition.is_none() => continue,
            Err(e) => return Err(e),
            Ok(written) => return Ok(json_response(StatusCode::OK, &scale_of(&written))),
        }
    }
    Err(ApiError::conflict(plural, group, name))
}

/// POST `pods/<name>/binding`: sets the pod's node, once.
pub(super) async fn bind(
    state: &State,
    t: &Target,
    name: &str,
    binding: Value,
) -> Result<Response<Body>, ApiError> {
    let node = binding["target"]["name"].as_str().unwrap_or("");
    if node.is_empty() {
        return Err(ApiError::invalid(
            "Binding",
            "",
            name,
            vec![("target.name".into(), "Required value".into())],
        ));
    }
    let key = t.resource.key(t.namespace.as_deref(), name);
    for _ in 0..5 {
        let (current, _) = state.store.get(&key).await?;
        let current = current.ok_or_else(|| ApiError::not_found("pods", "", name))?;
        let mut pod = decode(&state.codec, &current)?;
        if let Some(uid) = binding["metadata"]["uid"].as_str() {
            if pod["metadata"]["uid"].as_str() != Some(uid) {
                return Err(ApiError::conflict_because(
                    "pods",
                    "",
                    name,
                    "the pod's UID does not match the binding's",
                ));
            }
        }
        if pod["metadata"].get("deletionTimestamp").is_some() {
            return Err(ApiError::conflict_because(
                "pods",
                "",
                name,
                "the pod is being deleted",
            ));
        }
        match pod["spec"]["nodeName"].as_str() {
            Some(have) if !have.is_empty() => {
                return Err(ApiError::conflict_because(
                    "pods",
                    "",
                    name,
                    &format!("pod {name} is already assigned to node \"{have}\""),
                ))
            }
            _ => {}
        }
        pod["spec"]["nodeName"] = json!(node);
        let condition = json!({
            "type": "PodScheduled", "status": "True",
            "lastProbeTime": null, "lastTransitionTime": now_rfc3339(),
        });
        let status = &mut pod["status"];
        match status.get_mut("conditions").and_then(Value::as_array_mut) {
            Some(cs) => {
                cs.retain(|c| c["type"] != "PodScheduled");
                cs.push(condition);
            }
            None => status["conditions"] = json!([condition]),
        }
        let sealed = state.codec.seal("pods", &key, super::stored_form(&pod))?;
        match state
            .store
            .put_if(&key, sealed, current.mod_revision)
            .await?
        {
            Written::Done { .. } => {
                return Ok(json_response(
                    StatusCode::CREATED,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                ));
            }
            Written::Conflict(_) => continue,
        }
    }
    Err(ApiError::conflict("pods", "", name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_reads_replicas_and_a_selector_string() {
        let d = json!({"metadata": {"name": "w", "namespace": "d", "resourceVersion": "7"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "w"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}},
            "status": {"replicas": 2}});
        let s = scale_of(&d);
        assert_eq!(s["spec"]["replicas"], 3);
        assert_eq!(s["status"]["replicas"], 2);
        assert_eq!(s["status"]["selector"], "app=w,tier in (a,b)");
        assert_eq!(s["metadata"]["resourceVersion"], "7");
    }
}
