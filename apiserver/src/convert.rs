//! Resources served in one form and stored in another, converted at the edge: a request is
//! put into the stored form (body, patch, field selector), served by the resource that
//! stores it, and the answer (object, list, each watch event, error) put back.
//!
//! Two conversions exist: events.k8s.io/v1 Events over the core Events (`events.rs`), and
//! a custom resource's served versions over its storage version (conversion strategy
//! `None`: only `apiVersion` differs). A custom version is validated and pruned with the
//! storage version's schema.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::{Method, Response};
use serde_json::Value;

use crate::handler::{Body, State, Target};
use crate::resources::{self, Resource};
use crate::status::ApiError;

pub enum Conversion {
    /// events.k8s.io/v1 Events, stored as core/v1 Events.
    Events,
    /// A custom resource's version, stored as its storage version: the two apiVersions.
    Version { served: String, stored: String },
}

/// The conversion a request for `resource` needs, with the resource that stores it.
pub fn of(resource: &'static Resource) -> Option<(Conversion, &'static Resource)> {
    if resource.group == "events.k8s.io" {
        return Some((Conversion::Events, resources::find("", "v1", "events")?));
    }
    if resource.is_custom() {
        let version = resources::storage_version(resource)?;
        if version != resource.version {
            let stored = resources::find(resource.group, &version, resource.plural)?;
            let conversion = Conversion::Version {
                served: resource.api_version(),
                stored: stored.api_version(),
            };
            return Some((conversion, stored));
        }
    }
    None
}

impl Conversion {
    /// A created or replaced object, into the stored form.
    fn request(&self, obj: &mut Value, name: &str) -> Result<(), ApiError> {
        let served = match self {
            Conversion::Events => crate::events::API_VERSION,
            Conversion::Version { served, .. } => served.as_str(),
        };
        let given = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        if obj.is_object() && !given.is_empty() && given != served {
            return Err(ApiError::bad_request(format!(
                "the API version {given:?} of the object does not match the request's {served}"
            )));
        }
        match self {
            Conversion::Events => {
                if obj.get("kind").and_then(Value::as_str) == Some("Event") {
                    let causes = crate::events::validate(obj);
                    if !causes.is_empty() {
                        let named = obj
                            .pointer("/metadata/name")
                            .and_then(Value::as_str)
                            .unwrap_or(name);
                        return Err(ApiError::invalid("Event", "events.k8s.io", named, causes));
                    }
                    crate::events::to_core(obj);
                }
            }
            Conversion::Version { stored, .. } => {
                if !given.is_empty() {
                    obj["apiVersion"] = Value::String(stored.clone());
                }
            }
        }
        // Anything else is refused by the storing resource (no kind, no apiVersion).
        Ok(())
    }

    /// A patch, into the stored form.
    fn patch(&self, content_type: &str, body: Bytes) -> Result<Bytes, ApiError> {
        match self {
            Conversion::Events => crate::events::core_patch(content_type, &body),
            Conversion::Version { served, stored } => {
                // Only an apply configuration (or a patch that names it) carries the version.
                match serde_json::from_slice::<Value>(&body) {
                    Ok(mut v) if v.get("apiVersion").and_then(Value::as_str) == Some(served) => {
                        v["apiVersion"] = Value::String(stored.clone());
                        Ok(Bytes::from(serde_json::to_vec(&v).unwrap_or_default()))
                    }
                    _ => Ok(body),
                }
            }
        }
    }

    fn query(&self, q: &mut HashMap<String, String>) {
        if let (Conversion::Events, Some(s)) = (self, q.get_mut("fieldSelector")) {
            *s = crate::events::core_field_selector(s);
        }
    }

    /// One object of the answer, into the served form.
    fn object(&self, v: &mut Value) {
        match self {
            Conversion::Events => crate::events::answer_from_core(v),
            Conversion::Version { served, stored } => {
                if v.get("apiVersion").and_then(Value::as_str) == Some(stored) {
                    v["apiVersion"] = Value::String(served.clone());
                }
            }
        }
    }

    /// An answer (an object, a list, a watch event) into the served form; Status and
    /// Table answers are left as they are.
    fn answer(&self, v: &mut Value) {
        let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
        if kind.is_empty() && v.get("type").is_some() {
            if let Some(obj) = v.get_mut("object") {
                self.answer(obj);
            }
            return;
        }
        if kind.ends_with("List") && v.get("items").is_some() {
            let api_version = match self {
                Conversion::Events => crate::events::API_VERSION.to_string(),
                Conversion::Version { served, .. } => served.clone(),
            };
            v["apiVersion"] = Value::String(api_version);
            for item in v
                .get_mut("items")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                self.object(item);
            }
            return;
        }
        self.object(v);
    }

    fn error(&self, e: ApiError) -> ApiError {
        match self {
            Conversion::Events => crate::events::error_from_core(e),
            Conversion::Version { .. } => e,
        }
    }

    fn bytes(&self, b: &Bytes) -> Bytes {
        match serde_json::from_slice::<Value>(b) {
            Ok(mut v) => {
                self.answer(&mut v);
                let mut out = serde_json::to_vec(&v).unwrap_or_default();
                if b.ends_with(b"\n") {
                    out.push(b'\n');
                }
                Bytes::from(out)
            }
            Err(_) => b.clone(),
        }
    }
}

/// Serves a request for a converted resource through the resource that stores it.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    state: &Arc<State>,
    mut t: Target,
    conversion: Conversion,
    stored: &'static Resource,
    method: &Method,
    mut query: HashMap<String, String>,
    content_type: &str,
    body: Bytes,
    as_table: bool,
    watch: bool,
) -> Result<Response<Body>, ApiError> {
    let name = t.name.clone().unwrap_or_default();
    t.resource = stored;
    conversion.query(&mut query);
    let (body, content_type) = match *method {
        Method::POST | Method::PUT => {
            let mut obj = crate::handler::parse_json(content_type, &body)?;
            conversion.request(&mut obj, &name)?;
            (
                Bytes::from(serde_json::to_vec(&obj).unwrap_or_default()),
                "application/json",
            )
        }
        Method::PATCH => (conversion.patch(content_type, body)?, content_type),
        _ => (body, content_type),
    };
    let resp = crate::handler::serve(state, &t, method, &query, content_type, body, as_table)
        .await
        .map_err(|e| conversion.error(e))?;
    let (parts, body) = resp.into_parts();
    let conversion = Arc::new(conversion);
    if watch {
        // Each frame of a watch stream is one event.
        let body = body.map_frame(move |f| match f.into_data() {
            Ok(b) => Frame::data(conversion.bytes(&b)),
            Err(f) => f,
        });
        return Ok(Response::from_parts(parts, BodyExt::boxed(body)));
    }
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Ok(Response::from_parts(
        parts,
        http_body_util::Full::new(conversion.bytes(&bytes)).boxed(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_are_put_in_the_served_form() {
        let events = Conversion::Events;
        let line = Bytes::from(
            "{\"type\":\"ADDED\",\"object\":{\"kind\":\"Event\",\"apiVersion\":\"v1\",\"message\":\"m\"}}\n",
        );
        let out = events.bytes(&line);
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["object"]["note"], "m");
        assert_eq!(v["object"]["apiVersion"], crate::events::API_VERSION);
        assert!(out.ends_with(b"\n"));

        let version = Conversion::Version {
            served: "example.com/v1beta1".into(),
            stored: "example.com/v1".into(),
        };
        let mut list = json!({"kind": "WidgetList", "apiVersion": "example.com/v1",
            "items": [{"kind": "Widget", "apiVersion": "example.com/v1"}]});
        version.answer(&mut list);
        assert_eq!(list["apiVersion"], "example.com/v1beta1");
        assert_eq!(list["items"][0]["apiVersion"], "example.com/v1beta1");
        let mut status = json!({"kind": "Status", "apiVersion": "v1", "status": "Success"});
        version.answer(&mut status);
        assert_eq!(status["apiVersion"], "v1");
        let mut obj = json!({"kind": "Widget", "apiVersion": "example.com/v1beta1"});
        version.request(&mut obj, "w").expect("converted");
        assert_eq!(obj["apiVersion"], "example.com/v1");
        let mut stored_form = json!({"kind": "Widget", "apiVersion": "example.com/v1"});
        assert!(
            version.request(&mut stored_form, "w").is_err(),
            "another version's body"
        );
        let mut core = json!({"kind": "Event", "apiVersion": "v1"});
        assert!(
            Conversion::Events.request(&mut core, "e").is_err(),
            "a core Event"
        );
        let patch = version
            .patch(
                "application/apply-patch+yaml",
                Bytes::from(r#"{"apiVersion":"example.com/v1beta1","kind":"Widget"}"#),
            )
            .expect("a patch");
        assert_eq!(
            &patch[..],
            br#"{"apiVersion":"example.com/v1","kind":"Widget"}"#
        );
    }
}
