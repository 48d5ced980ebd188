//! What the server does for particular built-in kinds beyond storing them: defaulting (the
//! values Kubernetes fills in, so `kubectl get -o yaml` shows what users expect), validation
//! (each bad field a cause of a 422 Invalid), and what a create resets.

use serde_json::{json, Map, Value};

/// A field error: (path, message), as Kubernetes' field errors read.
pub type Cause = (String, String);

fn set_default(obj: &mut Value, field: &str, value: Value) {
    if let Some(m) = obj.as_object_mut() {
        // An empty string is unset too (Go's zero value, which protobuf bodies carry).
        if m.get(field)
            .is_none_or(|v| v.is_null() || v.as_str() == Some(""))
        {
            m.insert(field.to_string(), value);
        }
    }
}

/// The object at `field`, made an (empty) object if absent.
fn child<'a>(obj: &'a mut Value, field: &str) -> &'a mut Value {
    if obj.get(field).is_none_or(|v| !v.is_object()) {
        obj[field] = Value::Object(Map::new());
    }
    &mut obj[field]
}

fn each_in(obj: &mut Value, field: &str, mut f: impl FnMut(&mut Value)) {
    if let Some(items) = obj.get_mut(field).and_then(Value::as_array_mut) {
        items.iter_mut().for_each(&mut f);
    }
}

/// Fills in Kubernetes' defaults for an object of `kind` (apps/v1, batch/v1, core/v1).
pub fn default(kind: &str, obj: &mut Value) {
    match kind {
        "Pod" => {
            let spec = child(obj, "spec");
            pod_spec(spec);
            set_default(spec, "serviceAccountName", json!("default"));
            let sa = spec["serviceAccountName"].clone();
            set_default(spec, "serviceAccount", sa);
            set_default(spec, "priority", json!(0));
            set_default(spec, "enableServiceLinks", json!(true));
            set_default(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
        }
        "PodTemplate" => template(child(obj, "template")),
        "Deployment" => {
            let spec = child(obj, "spec");
            set_default(spec, "replicas", json!(1));
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(spec, "progressDeadlineSeconds", json!(600));
            let strategy = child(spec, "strategy");
            set_default(strategy, "type", json!("RollingUpdate"));
            if strategy["type"] == "RollingUpdate" {
                let ru = child(strategy, "rollingUpdate");
                set_default(ru, "maxUnavailable", json!("25%"));
                set_default(ru, "maxSurge", json!("25%"));
            }
            template(child(spec, "template"));
        }
        "ReplicaSet" => {
            let spec = child(obj, "spec");
            set_default(spec, "replicas", json!(1));
            template(child(spec, "template"));
        }
        "StatefulSet" => {
            let spec = child(obj, "spec");
            set_default(spec, "replicas", json!(1));
            set_default(spec, "podManagementPolicy", json!("OrderedReady"));
            set_default(spec, "revisionHistoryLimit", json!(10));
            let strategy = child(spec, "updateStrategy");
            set_default(strategy, "type", json!("RollingUpdate"));
            if strategy["type"] == "RollingUpdate" {
                set_default(child(strategy, "rollingUpdate"), "partition", json!(0));
            }
            let retention = child(spec, "persistentVolumeClaimRetentionPolicy");
            set_default(retention, "whenDeleted", json!("Retain"));
            set_default(retention, "whenScaled", json!("Retain"));
            each_in(spec, "volumeClaimTemplates", |pvc| {
                set_default(child(pvc, "spec"), "volumeMode", json!("Filesystem"));
            });
            template(child(spec, "template"));
        }
        "DaemonSet" => {
            let spec = child(obj, "spec");
            set_default(spec, "revisionHistoryLimit", json!(10));
            let strategy = child(spec, "updateStrategy");
            set_default(strategy, "type", json!("RollingUpdate"));
            if strategy["type"] == "RollingUpdate" {
                let ru = child(strategy, "rollingUpdate");
                set_default(ru, "maxUnavailable", json!(1));
                set_default(ru, "maxSurge", json!(0));
            }
            template(child(spec, "template"));
        }
        "Job" => job_spec(child(obj, "spec")),
        "CronJob" => {
            let spec = child(obj, "spec");
            set_default(spec, "concurrencyPolicy", json!("Allow"));
            set_default(spec, "suspend", json!(false));
            set_default(spec, "successfulJobsHistoryLimit", json!(3));
            set_default(spec, "failedJobsHistoryLimit", json!(1));
            let job = child(child(spec, "jobTemplate"), "spec");
            template(child(job, "template"));
        }
        "PersistentVolumeClaim" => {
            set_default(child(obj, "spec"), "volumeMode", json!("Filesystem"));
        }
        "PersistentVolume" => {
            let spec = child(obj, "spec");
            set_default(spec, "persistentVolumeReclaimPolicy", json!("Retain"));
            set_default(spec, "volumeMode", json!("Filesystem"));
        }
        "StorageClass" => {
            set_default(obj, "reclaimPolicy", json!("Delete"));
            set_default(obj, "volumeBindingMode", json!("Immediate"));
        }
        "HorizontalPodAutoscaler" => set_default(child(obj, "spec"), "minReplicas", json!(1)),
        "CustomResourceDefinition" => crate::crd::set_status(obj),
        "EndpointSlice" => each_in(obj, "ports", |p| {
            set_default(p, "protocol", json!("TCP"));
        }),
        _ => {}
    }
}

fn job_spec(spec: &mut Value) {
    if spec.get("completions").is_none() && spec.get("parallelism").is_none() {
        spec["completions"] = json!(1);
    }
    set_default(spec, "parallelism", json!(1));
    set_default(spec, "backoffLimit", json!(6));
    set_default(spec, "completionMode", json!("NonIndexed"));
    set_default(spec, "suspend", json!(false));
    set_default(spec, "manualSelector", json!(false));
    set_default(spec, "podReplacementPolicy", json!("TerminatingOrFailed"));
    template(child(spec, "template"));
}

fn template(t: &mut Value) {
    child(t, "metadata");
    pod_spec(child(t, "spec"));
}

fn pod_spec(spec: &mut Value) {
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "securityContext", json!({}));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    for list in ["containers", "initContainers"] {
        each_in(spec, list, container);
    }
    each_in(spec, "volumes", |v| {
        for source in ["configMap", "secret"] {
            if let Some(s) = v.get_mut(source).filter(|s| s.is_object()) {
                set_default(s, "defaultMode", json!(420));
            }
        }
    });
}

fn container(c: &mut Value) {
    set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
    set_default(c, "terminationMessagePolicy", json!("File"));
    set_default(c, "resources", json!({}));
    let image = c.get("image").and_then(Value::as_str).unwrap_or("");
    // An image without a tag, or tagged latest, is pulled every time.
    let last = image.rsplit('/').next().unwrap_or(image);
    let policy = if image.contains('@') || (last.contains(':') && !last.ends_with(":latest")) {
        "IfNotPresent"
    } else {
        "Always"
    };
    set_default(c, "imagePullPolicy", json!(policy));
    each_in(c, "ports", |p| set_default(p, "protocol", json!("TCP")));
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        if let Some(p) = c.get_mut(probe).filter(|p| p.is_object()) {
            set_default(p, "timeoutSeconds", json!(1));
            set_default(p, "periodSeconds", json!(10));
            set_default(p, "successThreshold", json!(1));
            set_default(p, "failureThreshold", json!(3));
            if let Some(h) = p.get_mut("httpGet").filter(|h| h.is_object()) {
                set_default(h, "scheme", json!("HTTP"));
                set_default(h, "path", json!("/"));
            }
        }
    }
}

/// The QoS class of a pod (`status.qosClass`).
fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = ["containers", "initContainers"]
        .iter()
        .filter_map(|l| spec.get(*l).and_then(Value::as_array))
        .flatten()
        .collect();
    let (mut any, mut guaranteed) = (false, true);
    for c in &containers {
        let requests = c.pointer("/resources/requests");
        let limits = c.pointer("/resources/limits");
        let has = |v: Option<&Value>| v.and_then(Value::as_object).is_some_and(|m| !m.is_empty());
        any |= has(requests) || has(limits);
        for r in ["cpu", "memory"] {
            let limit = limits.and_then(|l| l.get(r));
            let request = requests.and_then(|q| q.get(r)).or(limit);
            if limit.is_none() || request != limit {
                guaranteed = false;
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// What a create sets that clients do not: the status starts empty (pods, volumes and
/// claims: Pending; a node registers with its own); a Job's selector and labels tie it to
/// its pods by uid.
pub fn on_create(kind: &str, obj: &mut Value, has_status: bool) {
    let keeps_status = matches!(kind, "Namespace" | "CustomResourceDefinition" | "Node");
    if has_status && !keeps_status {
        if let Some(m) = obj.as_object_mut() {
            m.remove("status");
        }
    }
    match kind {
        "Pod" => {
            let qos = qos_class(&obj["spec"]);
            obj["status"] = json!({"phase": "Pending", "qosClass": qos});
        }
        "Service" => obj["status"] = json!({"loadBalancer": {}}),
        "PersistentVolume" | "PersistentVolumeClaim" => obj["status"] = json!({"phase": "Pending"}),
        "Job" => {
            let uid = obj["metadata"]["uid"].clone();
            let name = obj["metadata"]["name"].clone();
            let spec = child(obj, "spec");
            if spec["manualSelector"] != json!(true) {
                spec["selector"] =
                    json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
                let labels = child(child(child(spec, "template"), "metadata"), "labels");
                for (k, v) in [
                    ("batch.kubernetes.io/controller-uid", &uid),
                    ("batch.kubernetes.io/job-name", &name),
                    ("controller-uid", &uid),
                    ("job-name", &name),
                ] {
                    labels[k] = v.clone();
                }
            }
        }
        _ => {}
    }
}

fn required(causes: &mut Vec<Cause>, path: &str) {
    causes.push((path.to_string(), "Required value".into()));
}

/// Validates an object of `kind` (after defaulting); `old` is the stored object on update.
pub fn validate(kind: &str, obj: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    let spec = &obj["spec"];
    match kind {
        "Pod" => {
            pod_spec_valid(spec, "spec", &["Always", "OnFailure", "Never"], &mut causes);
            if let Some(old) = old {
                pod_update_valid(&old["spec"], spec, &mut causes);
            }
        }
        "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" => {
            workload_valid(spec, &mut causes);
            if let Some(old) = old {
                if old["spec"]["selector"] != spec["selector"] {
                    causes.push((
                        "spec.selector".into(),
                        format!("Invalid value: {}: field is immutable", spec["selector"]),
                    ));
                }
            }
        }
        "Job" => {
            pod_spec_valid(
                &spec["template"]["spec"],
                "spec.template.spec",
                &["OnFailure", "Never"],
                &mut causes,
            );
            non_negative(spec, "spec", "parallelism", &mut causes);
            non_negative(spec, "spec", "completions", &mut causes);
            non_negative(spec, "spec", "backoffLimit", &mut causes);
            if let Some(old) = old {
                if old["spec"]["selector"] != spec["selector"] {
                    causes.push((
                        "spec.selector".into(),
                        format!("Invalid value: {}: field is immutable", spec["selector"]),
                    ));
                }
            }
        }
        "CronJob" => {
            match spec.get("schedule").and_then(Value::as_str) {
                None | Some("") => required(&mut causes, "spec.schedule"),
                Some(s) if !schedule_valid(s) => causes.push((
                    "spec.schedule".into(),
                    format!(
                        "Invalid value: \"{s}\": expected exactly 5 fields, found {}",
                        s.split_whitespace().count()
                    ),
                )),
                _ => {}
            }
            pod_spec_valid(
                &spec["jobTemplate"]["spec"]["template"]["spec"],
                "spec.jobTemplate.spec.template.spec",
                &["OnFailure", "Never"],
                &mut causes,
            );
        }
        "CustomResourceDefinition" => causes.extend(crate::crd::validate(obj, old)),
        "ConfigMap" | "Secret" => {
            for field in ["data", "binaryData"] {
                for key in obj
                    .get(field)
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                {
                    if !config_key_valid(key.0) {
                        causes.push((
                            format!("{field}[{}]", key.0),
                            format!(
                                "Invalid value: \"{}\": a valid config key must consist of \
                                 alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or \
                                 'KEY_NAME',  or 'key-name', regex used for validation is \
                                 '[-._a-zA-Z0-9]+')",
                                key.0
                            ),
                        ));
                    }
                }
            }
            if let Some(old) = old {
                if old["immutable"] == json!(true)
                    && (old.get("data") != obj.get("data")
                        || old.get("binaryData") != obj.get("binaryData"))
                {
                    causes.push((
                        "data".into(),
                        "Forbidden: field is immutable when `immutable` is set".into(),
                    ));
                }
            }
        }
        _ => {}
    }
    labels_valid(obj, &mut causes);
    causes
}

fn schedule_valid(s: &str) -> bool {
    s.starts_with('@') || s.split_whitespace().count() == 5
}

fn config_key_valid(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && key != "."
        && key != ".."
}

fn non_negative(spec: &Value, path: &str, field: &str, causes: &mut Vec<Cause>) {
    if let Some(n) = spec.get(field).and_then(Value::as_i64) {
        if n < 0 {
            causes.push((
                format!("{path}.{field}"),
                format!("Invalid value: {n}: must be greater than or equal to 0"),
            ));
        }
    }
}

fn workload_valid(spec: &Value, causes: &mut Vec<Cause>) {
    non_negative(spec, "spec", "replicas", causes);
    let selector = &spec["selector"];
    if !selector.is_object() {
        required(causes, "spec.selector");
    } else if selector
        .get("matchLabels")
        .is_none_or(|m| m.as_object().is_none_or(Map::is_empty))
        && selector
            .get("matchExpressions")
            .is_none_or(|m| m.as_array().is_none_or(Vec::is_empty))
    {
        causes.push((
            "spec.selector".into(),
            "Invalid value: v1.LabelSelector{MatchLabels:map[string]string(nil), \
             MatchExpressions:[]v1.LabelSelectorRequirement(nil)}: empty selector is invalid for deployment"
                .into(),
        ));
    } else if !selector_matches(selector, &spec["template"]["metadata"]["labels"]) {
        causes.push((
            "spec.template.metadata.labels".into(),
            format!(
                "Invalid value: {}: `selector` does not match template `labels`",
                spec["template"]["metadata"]["labels"]
            ),
        ));
    }
    pod_spec_valid(
        &spec["template"]["spec"],
        "spec.template.spec",
        &["Always"],
        causes,
    );
}

/// The `values` of a LabelSelector requirement.
pub fn requirement_values(requirement: &Value) -> Vec<&str> {
    requirement["values"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// Whether a LabelSelector (matchLabels and matchExpressions) selects these labels.
pub fn selector_matches(selector: &Value, labels: &Value) -> bool {
    let label = |k: &str| labels.get(k).and_then(Value::as_str);
    let by_labels = selector
        .get("matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .all(|(k, v)| label(k) == v.as_str());
    let by_expressions = selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e["key"].as_str().unwrap_or("");
            let values = requirement_values(e);
            match e["operator"].as_str().unwrap_or("") {
                "In" => label(key).is_some_and(|v| values.contains(&v)),
                "NotIn" => label(key).is_none_or(|v| !values.contains(&v)),
                "Exists" => label(key).is_some(),
                "DoesNotExist" => label(key).is_none(),
                _ => false,
            }
        });
    by_labels && by_expressions
}

fn pod_spec_valid(spec: &Value, path: &str, restart: &[&str], causes: &mut Vec<Cause>) {
    let containers = spec.get("containers").and_then(Value::as_array);
    if containers.is_none_or(Vec::is_empty) {
        required(causes, &format!("{path}.containers"));
    }
    let mut names = std::collections::HashSet::new();
    for list in ["initContainers", "containers"] {
        for (i, c) in spec
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let at = format!("{path}.{list}[{i}]");
            match c.get("name").and_then(Value::as_str) {
                None | Some("") => required(causes, &format!("{at}.name")),
                Some(n) => {
                    if let Err(msg) = crate::resources::dns1123_label(n) {
                        causes.push((
                            format!("{at}.name"),
                            format!("Invalid value: \"{n}\": {msg}"),
                        ));
                    }
                    if !names.insert(n.to_string()) {
                        causes.push((format!("{at}.name"), format!("Duplicate value: \"{n}\"")));
                    }
                }
            }
            if c.get("image")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                required(causes, &format!("{at}.image"));
            }
            for (j, p) in c
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let port = p.get("containerPort").and_then(Value::as_i64).unwrap_or(0);
                if !(1..=65535).contains(&port) {
                    causes.push((
                        format!("{at}.ports[{j}].containerPort"),
                        format!("Invalid value: {port}: must be between 1 and 65535, inclusive"),
                    ));
                }
            }
        }
    }
    if let Some(policy) = spec.get("restartPolicy").and_then(Value::as_str) {
        if !restart.contains(&policy) {
            let supported: Vec<String> = restart.iter().map(|p| format!("\"{p}\"")).collect();
            causes.push((
                format!("{path}.restartPolicy"),
                format!(
                    "Unsupported value: \"{policy}\": supported values: {}",
                    supported.join(", ")
                ),
            ));
        }
    }
}

/// A pod's spec may change only in its images, activeDeadlineSeconds and added
/// tolerations; its node is set once (by binding).
fn pod_update_valid(old: &Value, new: &Value, causes: &mut Vec<Cause>) {
    let strip = |spec: &Value| {
        let mut s = spec.clone();
        for list in ["containers", "initContainers"] {
            if let Some(items) = s.get_mut(list).and_then(Value::as_array_mut) {
                for c in items {
                    if let Some(m) = c.as_object_mut() {
                        m.remove("image");
                    }
                }
            }
        }
        if let Some(m) = s.as_object_mut() {
            m.remove("activeDeadlineSeconds");
            m.remove("tolerations");
            m.remove("terminationGracePeriodSeconds");
        }
        s
    };
    if old.get("nodeName").is_some() && old.get("nodeName") != new.get("nodeName") {
        causes.push((
            "spec.nodeName".into(),
            "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, \
             `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` \
             (only additions to existing tolerations) or `spec.terminationGracePeriodSeconds`"
                .into(),
        ));
    } else if strip(old) != strip(new) {
        let mut o = strip(old);
        let mut n = strip(new);
        for s in [&mut o, &mut n] {
            if let Some(m) = s.as_object_mut() {
                m.remove("nodeName");
            }
        }
        if o != n {
            causes.push((
                "spec".into(),
                "Forbidden: pod updates may not change fields other than \
                 `spec.containers[*].image`, `spec.initContainers[*].image`, \
                 `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing \
                 tolerations) or `spec.terminationGracePeriodSeconds`"
                    .into(),
            ));
        }
    }
}

/// Label keys and values as Kubernetes accepts them.
fn labels_valid(obj: &Value, causes: &mut Vec<Cause>) {
    let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) else {
        return;
    };
    for (k, v) in labels {
        let name = k.rsplit('/').next().unwrap_or(k);
        let prefix_ok = match k.rsplit_once('/') {
            Some((p, _)) => crate::resources::dns1123_subdomain(p).is_ok(),
            None => true,
        };
        if !prefix_ok || !label_value_valid(name) || name.is_empty() {
            causes.push((
                "metadata.labels".into(),
                format!(
                    "Invalid value: \"{k}\": name part must consist of alphanumeric characters, \
                     '-', '_' or '.', and must start and end with an alphanumeric character \
                     (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is \
                     '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
                ),
            ));
        }
        let v = v.as_str().unwrap_or("");
        if !label_value_valid(v) {
            causes.push((
                "metadata.labels".into(),
                format!(
                    "Invalid value: \"{v}\": a valid label must be an empty string or consist of \
                     alphanumeric characters, '-', '_' or '.', and must start and end with an \
                     alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex \
                     used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
                ),
            ));
        }
    }
}

fn label_value_valid(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && v.as_bytes()[0].is_ascii_alphanumeric()
            && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployments_get_kubernetes_defaults() {
        let mut d = json!({"spec": {"selector": {"matchLabels": {"app": "w"}}, "template": {
            "metadata": {"labels": {"app": "w"}},
            "spec": {"containers": [{"name": "w", "image": "busybox", "ports": [{"containerPort": 80}]}]}}}});
        default("Deployment", &mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["imagePullPolicy"], "Always");
        assert_eq!(c["ports"][0]["protocol"], "TCP");
        assert_eq!(d["spec"]["template"]["spec"]["restartPolicy"], "Always");
        assert!(validate("Deployment", &d, None).is_empty());
    }

    #[test]
    fn bad_workloads_list_every_cause() {
        let d = json!({"metadata": {"labels": {"a": "-x"}}, "spec": {"replicas": -1,
            "selector": {"matchLabels": {"app": "w"}},
            "template": {"metadata": {"labels": {"app": "v"}},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "W"}]}}}});
        let fields: Vec<String> = validate("Deployment", &d, None)
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(
            fields,
            [
                "spec.replicas",
                "spec.template.metadata.labels",
                "spec.template.spec.containers[0].name",
                "spec.template.spec.containers[0].image",
                "spec.template.spec.restartPolicy",
                "metadata.labels",
            ]
        );
    }

    #[test]
    fn qos_follows_requests_and_limits() {
        let c = |r: Value| json!({"containers": [{"resources": r}]});
        assert_eq!(qos_class(&c(json!({}))), "BestEffort");
        assert_eq!(
            qos_class(&c(json!({"limits": {"cpu": "1", "memory": "1Gi"}}))),
            "Guaranteed"
        );
        assert_eq!(
            qos_class(&c(json!({"requests": {"cpu": "1"}}))),
            "Burstable"
        );
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let s = json!({"matchLabels": {"a": "1"}, "matchExpressions": [
            {"key": "b", "operator": "In", "values": ["x", "y"]},
            {"key": "c", "operator": "DoesNotExist"}]});
        assert!(selector_matches(&s, &json!({"a": "1", "b": "y"})));
        assert!(!selector_matches(&s, &json!({"a": "1", "b": "z"})));
        assert!(!selector_matches(&s, &json!({"a": "1", "b": "x", "c": ""})));
    }
}
