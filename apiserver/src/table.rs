//! Server-side `meta.k8s.io/v1 Table`s: the columns `kubectl get` prints for each type.

use serde_json::{json, Value};

use crate::resources::Resource;

mod kinds;

/// Whether the client asked for a Table (`Accept: application/json;as=Table;...`).
pub fn wanted(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.split(';').any(|p| p.trim() == "as=Table"))
}

fn column(name: &str, kind: &str, format: &str, description: &str, priority: i32) -> Value {
    json!({
        "name": name,
        "type": kind,
        "format": format,
        "description": description,
        "priority": priority,
    })
}

pub fn columns(r: &Resource) -> Vec<Value> {
    if let Some((defs, _)) = kinds::columns_and_cells(r, None, chrono::Utc::now()) {
        return defs;
    }
    let name = column(
        "Name",
        "string",
        "name",
        "Name must be unique within a namespace.",
        0,
    );
    let age = column(
        "Age",
        "string",
        "",
        "CreationTimestamp is when the object was created.",
        0,
    );
    match r.plural {
        "namespaces" => vec![
            name,
            column("Status", "string", "", "The phase of the namespace.", 0),
            age,
        ],
        "configmaps" => vec![
            name,
            column(
                "Data",
                "string",
                "",
                "The number of keys in data and binaryData.",
                0,
            ),
            age,
        ],
        "secrets" => vec![
            name,
            column("Type", "string", "", "The type of the secret.", 0),
            column("Data", "string", "", "The number of keys in data.", 0),
            age,
        ],
        "serviceaccounts" => vec![
            name,
            column("Secrets", "string", "", "The number of secrets.", 0),
            age,
        ],
        "services" => vec![
            name,
            column("Type", "string", "", "How the service is exposed.", 0),
            column("Cluster-IP", "string", "", "The service's virtual IP.", 0),
            column(
                "External-IP",
                "string",
                "",
                "Addresses outside the cluster.",
                0,
            ),
            column("Port(s)", "string", "", "The service's ports.", 0),
            age,
            column(
                "Selector",
                "string",
                "",
                "The pods the service routes to.",
                1,
            ),
        ],
        "endpoints" => vec![
            name,
            column(
                "Endpoints",
                "string",
                "",
                "The ready addresses and ports.",
                0,
            ),
            age,
        ],
        "events" => vec![
            column(
                "Last Seen",
                "string",
                "",
                "When the event was last seen.",
                0,
            ),
            column("Type", "string", "", "Normal or Warning.", 0),
            column("Reason", "string", "", "Why the event happened.", 0),
            column("Object", "string", "", "The object the event is about.", 0),
            column("Message", "string", "", "What happened.", 0),
        ],
        _ => vec![name, age],
    }
}

fn count(obj: &Value, fields: &[&str]) -> usize {
    fields
        .iter()
        .filter_map(|f| obj.get(*f))
        .map(|v| match v {
            Value::Object(m) => m.len(),
            Value::Array(a) => a.len(),
            _ => 0,
        })
        .sum()
}

/// A Table row: cells and the object's metadata (as PartialObjectMetadata).
fn row_of(cells: Vec<Value>, obj: &Value) -> Value {
    json!({
        "cells": cells,
        "object": {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
        },
    })
}

/// A row: the cells and the object's metadata (as PartialObjectMetadata).
pub fn row(r: &Resource, obj: &Value, now: chrono::DateTime<chrono::Utc>) -> Value {
    if let Some((_, cells)) = kinds::columns_and_cells(r, Some(obj), now) {
        return row_of(cells, obj);
    }
    let name = obj
        .pointer("/metadata/name")
        .cloned()
        .unwrap_or(Value::Null);
    let age = obj
        .pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| human_duration((now - t.with_timezone(&chrono::Utc)).num_seconds()))
        .unwrap_or_else(|| "<unknown>".into());
    if r.plural == "events" {
        let seen = [
            "/lastTimestamp",
            "/eventTime",
            "/metadata/creationTimestamp",
        ]
        .iter()
        .filter_map(|p| obj.pointer(p).and_then(Value::as_str))
        .find_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| human_duration((now - t.with_timezone(&chrono::Utc)).num_seconds()))
        .unwrap_or_else(|| "<unknown>".into());
        let text = |p: &str| {
            obj.pointer(p)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let object = format!(
            "{}/{}",
            text("/involvedObject/kind").to_lowercase(),
            text("/involvedObject/name")
        );
        let cells = [
            seen,
            text("/type"),
            text("/reason"),
            object,
            text("/message"),
        ];
        return row_of(cells.into_iter().map(Value::String).collect(), obj);
    }
    let mut cells = vec![name];
    match r.plural {
        "namespaces" => cells.push(
            obj.pointer("/status/phase")
                .cloned()
                .unwrap_or(Value::String(String::new())),
        ),
        "configmaps" => cells.push(json!(count(obj, &["data", "binaryData"]))),
        "secrets" => {
            cells.push(
                obj.get("type")
                    .cloned()
                    .unwrap_or(Value::String("Opaque".into())),
            );
            cells.push(json!(count(obj, &["data"])));
        }
        "serviceaccounts" => cells.push(json!(count(obj, &["secrets"]))),
        "services" => {
            let text = |p: &str| {
                obj.pointer(p)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            cells.push(json!(text("/spec/type")));
            cells.push(json!(text("/spec/clusterIP")));
            let external: Vec<String> = obj
                .pointer("/spec/externalIPs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            cells.push(json!(if external.is_empty() {
                "<none>".to_string()
            } else {
                external.join(",")
            }));
            cells.push(json!(crate::services::ports_cell(obj)));
            let selector: Vec<String> = obj
                .pointer("/spec/selector")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect();
            let selector = if selector.is_empty() {
                "<none>".to_string()
            } else {
                selector.join(",")
            };
            cells.push(Value::String(age));
            cells.push(json!(selector));
            return row_of(cells, obj);
        }
        "endpoints" => {
            let mut eps = Vec::new();
            for subset in obj
                .get("subsets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for a in subset
                    .get("addresses")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let ip = a.get("ip").and_then(Value::as_str).unwrap_or("");
                    for p in subset
                        .get("ports")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        eps.push(format!(
                            "{ip}:{}",
                            p.get("port").and_then(Value::as_i64).unwrap_or(0)
                        ));
                    }
                }
            }
            cells.push(json!(if eps.is_empty() {
                "<none>".to_string()
            } else {
                eps.join(",")
            }));
        }
        _ => {}
    }
    cells.push(Value::String(age));
    row_of(cells, obj)
}

/// A Table of `items`, with the list's metadata (resourceVersion, continue).
pub fn table(r: &Resource, items: &[Value], list_meta: Value) -> Value {
    let now = chrono::Utc::now();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": columns(r),
        "rows": items.iter().map(|o| row(r, o, now)).collect::<Vec<_>>(),
    })
}

/// Kubernetes' short human durations ("45s", "3m12s", "5h", "12d", "2y30d").
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let s = seconds.max(0);
    let (m, h) = (s / 60, s / 3600);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        if h % 24 == 0 {
            format!("{}d", h / 24)
        } else {
            format!("{}d{}h", h / 24, h % 24)
        }
    } else if h < 24 * 365 * 2 {
        format!("{}d", h / 24)
    } else if h < 24 * 365 * 8 {
        format!("{}y{}d", h / (24 * 365), (h / 24) % 365)
    } else {
        format!("{}y", h / (24 * 365))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_kubectl_prints_them() {
        assert_eq!(human_duration(45), "45s");
        assert_eq!(human_duration(192), "3m12s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(5 * 3600 + 60), "5h1m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86400 + 7200), "3d2h");
        assert_eq!(human_duration(40 * 86400), "40d");
    }

    #[test]
    fn only_a_table_first_in_accept_asks_for_one() {
        assert!(wanted(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
        ));
        assert!(!wanted("application/json"));
    }
}
