//! Columns of the workload, node, storage and coordination kinds, and of custom resources
//! (their CRD's `additionalPrinterColumns`): each column a function of the object.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::{column, human_duration};

type Now = DateTime<Utc>;
type Cell = fn(&Value, Now) -> Value;

/// (name, type, priority, cell).
type Col = (&'static str, &'static str, i32, Cell);

fn text(obj: &Value, pointer: &str) -> String {
    match obj.pointer(pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(v) => v.to_string(),
    }
}

fn int(obj: &Value, pointer: &str) -> i64 {
    obj.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn or_none(s: String) -> Value {
    json!(if s.is_empty() {
        "<none>".to_string()
    } else {
        s
    })
}

fn age_of(obj: &Value, pointer: &str, now: Now) -> Value {
    obj.pointer(pointer)
        .and_then(Value::as_str)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| json!(human_duration((now - t.with_timezone(&Utc)).num_seconds())))
        .unwrap_or_else(|| json!("<unknown>"))
}

fn name(o: &Value, _: Now) -> Value {
    json!(text(o, "/metadata/name"))
}

fn age(o: &Value, now: Now) -> Value {
    age_of(o, "/metadata/creationTimestamp", now)
}

fn created_at(o: &Value, _: Now) -> Value {
    json!(text(o, "/metadata/creationTimestamp"))
}

fn template_containers(o: &Value, pointer: &str, field: &str) -> Value {
    let names: Vec<String> = o
        .pointer(pointer)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| text(c, &format!("/{field}")))
        .collect();
    json!(names.join(","))
}

fn containers(o: &Value, _: Now) -> Value {
    template_containers(o, "/spec/template/spec/containers", "name")
}

fn images(o: &Value, _: Now) -> Value {
    template_containers(o, "/spec/template/spec/containers", "image")
}

fn selector(o: &Value, _: Now) -> Value {
    let s = o.pointer("/spec/selector").cloned().unwrap_or(Value::Null);
    let labels = s.get("matchLabels").and_then(Value::as_object);
    let mut terms: Vec<String> = labels
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    if s.get("matchExpressions").is_some() {
        terms.push("...".into());
    }
    or_none(terms.join(","))
}

fn pod_ready(o: &Value, _: Now) -> Value {
    let total = o
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let ready = o
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|c| c["ready"] == json!(true))
        .count();
    json!(format!("{ready}/{total}"))
}

fn pod_status(o: &Value, _: Now) -> Value {
    if o.pointer("/metadata/deletionTimestamp").is_some() {
        return json!("Terminating");
    }
    let waiting = o
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find_map(|c| {
            c.pointer("/state/waiting/reason")
                .or_else(|| c.pointer("/state/terminated/reason"))
                .and_then(Value::as_str)
                .map(str::to_string)
        });
    let reason = text(o, "/status/reason");
    if !reason.is_empty() {
        return json!(reason);
    }
    json!(waiting.unwrap_or_else(|| text(o, "/status/phase")))
}

fn pod_restarts(o: &Value, _: Now) -> Value {
    let n: i64 = o
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| c["restartCount"].as_i64().unwrap_or(0))
        .sum();
    json!(n)
}

fn node_status(o: &Value, _: Now) -> Value {
    let ready = o
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .map(|c| c["status"].as_str().unwrap_or(""));
    let mut s = match ready {
        Some("True") => "Ready".to_string(),
        Some("False") => "NotReady".to_string(),
        _ => "Unknown".to_string(),
    };
    if o.pointer("/spec/unschedulable") == Some(&json!(true)) {
        s.push_str(",SchedulingDisabled");
    }
    json!(s)
}

fn node_roles(o: &Value, _: Now) -> Value {
    let roles: Vec<&str> = o
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/"))
        .collect();
    or_none(roles.join(","))
}

fn node_address(o: &Value, kind: &str) -> Value {
    let found = o
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|a| a["type"] == kind)
        .map(|a| text(a, "/address"))
        .unwrap_or_default();
    or_none(found)
}

fn ratio(a: i64, b: i64) -> Value {
    json!(format!("{a}/{b}"))
}

fn job_status(o: &Value, _: Now) -> Value {
    let conditions: Vec<&Value> = o
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|c| c["status"] == "True")
        .collect();
    let has = |t: &str| conditions.iter().any(|c| c["type"] == t);
    json!(if has("Complete") {
        "Complete"
    } else if has("Failed") {
        "Failed"
    } else if has("Suspended") {
        "Suspended"
    } else if o.pointer("/metadata/deletionTimestamp").is_some() {
        "Terminating"
    } else {
        "Running"
    })
}

fn job_duration(o: &Value, now: Now) -> Value {
    let at = |p: &str| {
        o.pointer(p)
            .and_then(Value::as_str)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    match (at("/status/startTime"), at("/status/completionTime")) {
        (Some(start), Some(end)) => json!(human_duration((end - start).num_seconds())),
        (Some(start), None) => json!(human_duration((now - start).num_seconds())),
        _ => json!(""),
    }
}

fn access_modes(o: &Value, pointer: &str) -> Value {
    let modes: Vec<&str> = o
        .pointer(pointer)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|m| match m {
            "ReadWriteOnce" => "RWO",
            "ReadOnlyMany" => "ROX",
            "ReadWriteMany" => "RWX",
            "ReadWriteOncePod" => "RWOP",
            other => other,
        })
        .collect();
    json!(modes.join(","))
}

fn unset(s: String) -> Value {
    json!(if s.is_empty() {
        "<unset>".to_string()
    } else {
        s
    })
}

const NAME: Col = ("Name", "string", 0, name);
const AGE: Col = ("Age", "string", 0, age);
const CONTAINERS: Col = ("Containers", "string", 1, containers);
const IMAGES: Col = ("Images", "string", 1, images);
const SELECTOR: Col = ("Selector", "string", 1, selector);

/// The columns of a built-in kind this module prints, if it is one.
fn built_in(plural: &str) -> Option<&'static [Col]> {
    Some(match plural {
        "pods" => &[
            NAME,
            ("Ready", "string", 0, pod_ready),
            ("Status", "string", 0, pod_status),
            ("Restarts", "string", 0, pod_restarts),
            AGE,
            ("IP", "string", 1, |o, _| or_none(text(o, "/status/podIP"))),
            ("Node", "string", 1, |o, _| {
                or_none(text(o, "/spec/nodeName"))
            }),
            ("Nominated Node", "string", 1, |o, _| {
                or_none(text(o, "/status/nominatedNodeName"))
            }),
            ("Readiness Gates", "string", 1, |_, _| json!("<none>")),
        ],
        "nodes" => &[
            NAME,
            ("Status", "string", 0, node_status),
            ("Roles", "string", 0, node_roles),
            AGE,
            ("Version", "string", 0, |o, _| {
                json!(text(o, "/status/nodeInfo/kubeletVersion"))
            }),
            ("Internal-IP", "string", 1, |o, _| {
                node_address(o, "InternalIP")
            }),
            ("External-IP", "string", 1, |o, _| {
                node_address(o, "ExternalIP")
            }),
            ("OS-Image", "string", 1, |o, _| {
                json!(text(o, "/status/nodeInfo/osImage"))
            }),
            ("Kernel-Version", "string", 1, |o, _| {
                json!(text(o, "/status/nodeInfo/kernelVersion"))
            }),
            ("Container-Runtime", "string", 1, |o, _| {
                json!(text(o, "/status/nodeInfo/containerRuntimeVersion"))
            }),
        ],
        "deployments" => &[
            NAME,
            ("Ready", "string", 0, |o, _| {
                ratio(int(o, "/status/readyReplicas"), int(o, "/spec/replicas"))
            }),
            ("Up-to-date", "integer", 0, |o, _| {
                json!(int(o, "/status/updatedReplicas"))
            }),
            ("Available", "integer", 0, |o, _| {
                json!(int(o, "/status/availableReplicas"))
            }),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        "replicasets" => &[
            NAME,
            ("Desired", "integer", 0, |o, _| {
                json!(int(o, "/spec/replicas"))
            }),
            ("Current", "integer", 0, |o, _| {
                json!(int(o, "/status/replicas"))
            }),
            ("Ready", "integer", 0, |o, _| {
                json!(int(o, "/status/readyReplicas"))
            }),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        "statefulsets" => &[
            NAME,
            ("Ready", "string", 0, |o, _| {
                ratio(int(o, "/status/readyReplicas"), int(o, "/spec/replicas"))
            }),
            AGE,
            CONTAINERS,
            IMAGES,
        ],
        "daemonsets" => &[
            NAME,
            ("Desired", "integer", 0, |o, _| {
                json!(int(o, "/status/desiredNumberScheduled"))
            }),
            ("Current", "integer", 0, |o, _| {
                json!(int(o, "/status/currentNumberScheduled"))
            }),
            ("Ready", "integer", 0, |o, _| {
                json!(int(o, "/status/numberReady"))
            }),
            ("Up-to-date", "integer", 0, |o, _| {
                json!(int(o, "/status/updatedNumberScheduled"))
            }),
            ("Available", "integer", 0, |o, _| {
                json!(int(o, "/status/numberAvailable"))
            }),
            ("Node Selector", "string", 0, |o, _| {
                let terms: Vec<String> = o
                    .pointer("/spec/template/spec/nodeSelector")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect();
                or_none(terms.join(","))
            }),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        "jobs" => &[
            NAME,
            ("Status", "string", 0, job_status),
            ("Completions", "string", 0, |o, _| {
                let want = o.pointer("/spec/completions").and_then(Value::as_i64);
                let done = int(o, "/status/succeeded");
                match want {
                    Some(n) => ratio(done, n),
                    None => json!(format!("{done}/1 of {}", int(o, "/spec/parallelism"))),
                }
            }),
            ("Duration", "string", 0, job_duration),
            AGE,
            CONTAINERS,
            IMAGES,
            SELECTOR,
        ],
        "cronjobs" => &[
            NAME,
            ("Schedule", "string", 0, |o, _| {
                json!(text(o, "/spec/schedule"))
            }),
            ("Timezone", "string", 0, |o, _| {
                or_none(text(o, "/spec/timeZone"))
            }),
            ("Suspend", "boolean", 0, |o, _| {
                json!(o.pointer("/spec/suspend") == Some(&json!(true)))
            }),
            ("Active", "integer", 0, |o, _| {
                json!(o
                    .pointer("/status/active")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len))
            }),
            ("Last Schedule", "string", 0, |o, now| {
                if o.pointer("/status/lastScheduleTime").is_some() {
                    age_of(o, "/status/lastScheduleTime", now)
                } else {
                    json!("<none>")
                }
            }),
            AGE,
            ("Containers", "string", 1, |o, _| {
                template_containers(o, "/spec/jobTemplate/spec/template/spec/containers", "name")
            }),
            ("Images", "string", 1, |o, _| {
                template_containers(
                    o,
                    "/spec/jobTemplate/spec/template/spec/containers",
                    "image",
                )
            }),
        ],
        "horizontalpodautoscalers" => &[
            NAME,
            ("Reference", "string", 0, |o, _| {
                json!(format!(
                    "{}/{}",
                    text(o, "/spec/scaleTargetRef/kind"),
                    text(o, "/spec/scaleTargetRef/name")
                ))
            }),
            ("Targets", "string", 0, |o, _| {
                let n = o
                    .pointer("/spec/metrics")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len);
                json!(if n == 0 {
                    "<none>".to_string()
                } else {
                    format!("{n} metric(s)")
                })
            }),
            ("MinPods", "string", 0, |o, _| {
                json!(int(o, "/spec/minReplicas"))
            }),
            ("MaxPods", "integer", 0, |o, _| {
                json!(int(o, "/spec/maxReplicas"))
            }),
            ("Replicas", "integer", 0, |o, _| {
                json!(int(o, "/status/currentReplicas"))
            }),
            AGE,
        ],
        "leases" => &[
            NAME,
            ("Holder", "string", 0, |o, _| {
                json!(text(o, "/spec/holderIdentity"))
            }),
            AGE,
        ],
        "endpointslices" => &[
            NAME,
            ("AddressType", "string", 0, |o, _| {
                json!(text(o, "/addressType"))
            }),
            ("Ports", "string", 0, |o, _| {
                let ports: Vec<String> = o
                    .get("ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|p| text(p, "/port"))
                    .collect();
                json!(if ports.is_empty() {
                    "<unset>".to_string()
                } else {
                    ports.join(",")
                })
            }),
            ("Endpoints", "string", 0, |o, _| {
                let addrs: Vec<String> = o
                    .get("endpoints")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .flat_map(|e| {
                        e["addresses"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default()
                            .into_iter()
                            .filter_map(|a| a.as_str().map(str::to_string))
                    })
                    .collect();
                unset(addrs.join(","))
            }),
            AGE,
        ],
        "persistentvolumes" => &[
            NAME,
            ("Capacity", "string", 0, |o, _| {
                json!(text(o, "/spec/capacity/storage"))
            }),
            ("Access Modes", "string", 0, |o, _| {
                access_modes(o, "/spec/accessModes")
            }),
            ("Reclaim Policy", "string", 0, |o, _| {
                json!(text(o, "/spec/persistentVolumeReclaimPolicy"))
            }),
            ("Status", "string", 0, |o, _| {
                json!(text(o, "/status/phase"))
            }),
            ("Claim", "string", 0, |o, _| {
                let ns = text(o, "/spec/claimRef/namespace");
                let n = text(o, "/spec/claimRef/name");
                json!(if n.is_empty() {
                    String::new()
                } else {
                    format!("{ns}/{n}")
                })
            }),
            ("StorageClass", "string", 0, |o, _| {
                json!(text(o, "/spec/storageClassName"))
            }),
            ("VolumeAttributesClass", "string", 0, |o, _| {
                unset(text(o, "/spec/volumeAttributesClassName"))
            }),
            ("Reason", "string", 0, |o, _| {
                json!(text(o, "/status/reason"))
            }),
            AGE,
        ],
        "persistentvolumeclaims" => &[
            NAME,
            ("Status", "string", 0, |o, _| {
                json!(text(o, "/status/phase"))
            }),
            ("Volume", "string", 0, |o, _| {
                json!(text(o, "/spec/volumeName"))
            }),
            ("Capacity", "string", 0, |o, _| {
                json!(text(o, "/status/capacity/storage"))
            }),
            ("Access Modes", "string", 0, |o, _| {
                access_modes(o, "/status/accessModes")
            }),
            ("StorageClass", "string", 0, |o, _| {
                json!(text(o, "/spec/storageClassName"))
            }),
            ("VolumeAttributesClass", "string", 0, |o, _| {
                unset(text(o, "/spec/volumeAttributesClassName"))
            }),
            AGE,
        ],
        "storageclasses" => &[
            NAME,
            ("Provisioner", "string", 0, |o, _| {
                json!(text(o, "/provisioner"))
            }),
            ("ReclaimPolicy", "string", 0, |o, _| {
                json!(text(o, "/reclaimPolicy"))
            }),
            ("VolumeBindingMode", "string", 0, |o, _| {
                json!(text(o, "/volumeBindingMode"))
            }),
            ("AllowVolumeExpansion", "string", 0, |o, _| {
                json!(o.get("allowVolumeExpansion") == Some(&json!(true)))
            }),
            AGE,
        ],
        "controllerrevisions" => &[
            NAME,
            ("Controller", "string", 0, |o, _| {
                let owner = o
                    .pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .and_then(|refs| refs.iter().find(|r| r["controller"] == json!(true)))
                    .map(|r| format!("{}/{}", text(r, "/kind").to_lowercase(), text(r, "/name")));
                or_none(owner.unwrap_or_default())
            }),
            ("Revision", "integer", 0, |o, _| json!(int(o, "/revision"))),
            AGE,
        ],
        "poddisruptionbudgets" => &[
            NAME,
            ("Min Available", "string", 0, |o, _| {
                json!(o
                    .pointer("/spec/minAvailable")
                    .map_or("N/A".to_string(), |v| {
                        v.as_str().map_or(v.to_string(), str::to_string)
                    }))
            }),
            ("Max Unavailable", "string", 0, |o, _| {
                json!(o
                    .pointer("/spec/maxUnavailable")
                    .map_or("N/A".to_string(), |v| {
                        v.as_str().map_or(v.to_string(), str::to_string)
                    }))
            }),
            ("Allowed Disruptions", "integer", 0, |o, _| {
                json!(int(o, "/status/disruptionsAllowed"))
            }),
            AGE,
        ],
        "customresourcedefinitions" | "limitranges" | "resourcequotas" => {
            &[NAME, ("Created At", "date", 0, created_at)]
        }
        _ => return None,
    })
}

/// A simple JSONPath (`.spec.size`, `.status.conditions[0].type`) as a JSON pointer.
fn json_path_pointer(path: &str) -> String {
    let mut out = String::new();
    for part in path.trim_start_matches('.').split('.') {
        let (field, rest) = part.split_once('[').unwrap_or((part, ""));
        out.push('/');
        out.push_str(&field.replace('~', "~0").replace('/', "~1"));
        for index in rest.split('[').filter(|s| !s.is_empty()) {
            out.push('/');
            out.push_str(index.trim_end_matches(']'));
        }
    }
    out
}

/// The columns (definitions) and the cells of `obj`, for a kind this module prints.
pub fn columns_and_cells(
    r: &crate::resources::Resource,
    obj: Option<&Value>,
    now: Now,
) -> Option<(Vec<Value>, Vec<Value>)> {
    if r.is_custom() {
        let printer = crate::resources::custom(r)
            .map(|c| c.columns)
            .unwrap_or_default();
        let mut defs = vec![column("Name", "string", "name", "", 0)];
        let mut cells = vec![obj.map(|o| name(o, now)).unwrap_or(Value::Null)];
        for c in &printer {
            let path = c["jsonPath"].as_str().unwrap_or("");
            defs.push(column(
                c["name"].as_str().unwrap_or(""),
                c["type"].as_str().unwrap_or("string"),
                c["format"].as_str().unwrap_or(""),
                c["description"].as_str().unwrap_or(""),
                c["priority"].as_i64().unwrap_or(0) as i32,
            ));
            let v = obj
                .and_then(|o| o.pointer(&json_path_pointer(path)))
                .cloned()
                .unwrap_or(Value::Null);
            // A date column prints as an age, as kubectl does.
            let v = match (c["type"].as_str(), &v) {
                (Some("date"), Value::String(_)) => obj
                    .map(|o| age_of(o, &json_path_pointer(path), now))
                    .unwrap_or(v),
                _ => v,
            };
            cells.push(v);
        }
        if !printer.iter().any(|c| c["name"] == "Age") {
            defs.push(column("Age", "date", "", "", 0));
            cells.push(obj.map(|o| age(o, now)).unwrap_or(Value::Null));
        }
        return Some((defs, cells));
    }
    let cols = built_in(r.plural)?;
    let defs = cols
        .iter()
        .map(|(n, ty, p, _)| column(n, ty, if *n == "Name" { "name" } else { "" }, "", *p))
        .collect();
    let cells = match obj {
        Some(o) => cols.iter().map(|(_, _, _, cell)| cell(o, now)).collect(),
        None => Vec::new(),
    };
    Some((defs, cells))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_print_ready_status_and_restarts() {
        let r = crate::resources::find("", "v1", "pods").expect("pods");
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{}, {}], "nodeName": "n1"},
            "status": {"phase": "Running", "containerStatuses": [
                {"ready": true, "restartCount": 2}, {"ready": false, "restartCount": 1,
                 "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        let (defs, cells) = columns_and_cells(r, Some(&pod), Utc::now()).expect("printed");
        assert_eq!(defs.len(), cells.len());
        assert_eq!(
            cells[..4],
            [
                json!("p"),
                json!("1/2"),
                json!("CrashLoopBackOff"),
                json!(3)
            ]
        );
        assert_eq!(cells[6], json!("n1"));
    }

    #[test]
    fn json_paths_become_pointers() {
        assert_eq!(json_path_pointer(".spec.size"), "/spec/size");
        assert_eq!(
            json_path_pointer(".status.conditions[0].type"),
            "/status/conditions/0/type"
        );
    }
}
