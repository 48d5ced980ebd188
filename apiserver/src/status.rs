//! Kubernetes `Status` errors: the reason, code and message kubectl prints as
//! `Error from server (Reason): message`.

use serde_json::{json, Value};

/// A failed request, answered as a `meta/v1 Status`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, details: Value) -> ApiError {
        self.details = Some(details);
        self
    }

    pub fn not_found(plural: &str, group: &str, name: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified(plural, group)),
        )
        .with_details(json!({"name": name, "group": group, "kind": plural}))
    }

    pub fn already_exists(plural: &str, group: &str, name: &str) -> ApiError {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", qualified(plural, group)),
        )
        .with_details(json!({"name": name, "group": group, "kind": plural}))
    }

    pub fn conflict(plural: &str, group: &str, name: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                qualified(plural, group)
            ),
        )
        .with_details(json!({"name": name, "group": group, "kind": plural}))
    }

    /// 409 Conflict with a reason of its own (a failed precondition).
    pub fn conflict_because(plural: &str, group: &str, name: &str, why: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                qualified(plural, group)
            ),
        )
        .with_details(json!({"name": name, "group": group, "kind": plural}))
    }

    /// 409: a server-side apply would change fields other managers own.
    pub fn apply_conflicts(conflicts: &[(String, String, String)]) -> ApiError {
        let lines: Vec<String> = conflicts
            .iter()
            .map(|(manager, api_version, field)| {
                format!("conflict with \"{manager}\" using {api_version}: {field}")
            })
            .collect();
        let message = if lines.len() == 1 {
            format!("Apply failed with 1 conflict: {}", lines[0])
        } else {
            format!(
                "Apply failed with {} conflicts: {}",
                lines.len(),
                lines.join("\n")
            )
        };
        ApiError::new(409, "Conflict", message).with_details(json!({
            "causes": conflicts.iter().map(|(manager, api_version, field)| json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with \"{manager}\" using {api_version}"),
                "field": field,
            })).collect::<Vec<_>>(),
        }))
    }

    /// 422 with one cause per bad field, as Kubernetes' validation reports them.
    pub fn invalid(kind: &str, group: &str, name: &str, causes: Vec<(String, String)>) -> ApiError {
        let summary = causes
            .iter()
            .map(|(field, msg)| format!("{field}: {msg}"))
            .collect::<Vec<_>>()
            .join(", ");
        let what = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        ApiError::new(
            422,
            "Invalid",
            format!("{what} \"{name}\" is invalid: {summary}"),
        )
        .with_details(json!({
            "name": name,
            "group": group,
            "kind": kind,
            "causes": causes.iter().map(|(field, msg)| json!({
                "reason": "FieldValueInvalid",
                "message": msg,
                "field": field,
            })).collect::<Vec<_>>(),
        }))
    }

    pub fn forbidden(plural: &str, name: &str, why: &str) -> ApiError {
        ApiError::new(
            403,
            "Forbidden",
            format!("{plural} \"{name}\" is forbidden: {why}"),
        )
        .with_details(json!({"name": name, "kind": plural}))
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn method_not_allowed(method: &str) -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }

    pub fn not_found_path() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: limit is {limit}"),
        )
    }

    pub fn unsupported_media_type(content_type: &str) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json, application/vnd.kubernetes.protobuf (and the patch types); got {content_type}"),
        )
    }

    pub fn gone(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    /// A read not older than a revision the store has not reached (Kubernetes' 504).
    pub fn too_large_resource_version(wanted: i64, current: i64) -> ApiError {
        ApiError::new(
            504,
            "Timeout",
            format!("Too large resource version: {wanted}, current: {current}"),
        )
        .with_details(json!({
            "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
            "retryAfterSeconds": 1,
        }))
    }

    pub fn too_many_requests() -> ApiError {
        ApiError::new(
            429,
            "TooManyRequests",
            "too many requests, please try again later",
        )
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "InternalError", message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(503, "ServiceUnavailable", message)
    }

    /// The Status object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            status["details"] = d.clone();
        }
        status
    }
}

/// `configmaps` or `deployments.apps`, as Kubernetes names a resource in messages.
fn qualified(plural: &str, group: &str) -> String {
    if group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{group}")
    }
}
