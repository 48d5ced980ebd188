//! The resource types this server serves, and what discovery says of them: the built-in
//! kinds (a fixed table) and custom resources (from CustomResourceDefinitions, registered
//! while the server runs).

use std::sync::RwLock;

use serde_json::{json, Value};

/// One served resource.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resource {
    /// API group ("" for the core group).
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Fields a field selector may name beyond `metadata.name` and `metadata.namespace`.
    pub field_labels: &'static [&'static str],
    /// `status`, `scale`, `binding`: the subresources served.
    pub subresources: &'static [&'static str],
    /// The kind's schema: a built-in definition name, or "" for a custom resource (its
    /// schema is registered with it).
    pub schema: &'static str,
    /// Categories (`all` makes `kubectl get all` list it).
    pub categories: &'static [&'static str],
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Whether the resource is defined by a CustomResourceDefinition.
    pub fn is_custom(&self) -> bool {
        self.schema.is_empty()
    }

    pub fn has(&self, subresource: &str) -> bool {
        self.subresources.contains(&subresource)
    }

    /// The store key prefix of every object of this resource (in `namespace`, if given):
    /// Kubernetes' `/registry/<resource>/<namespace>/<name>` layout (custom resources and
    /// CRDs under their group).
    pub fn prefix(&self, namespace: Option<&str>) -> String {
        let dir = if self.is_custom() || self.plural == "customresourcedefinitions" {
            format!("{}/{}", self.group, self.plural)
        } else {
            self.plural.to_string()
        };
        match namespace {
            Some(ns) if self.namespaced => format!("/registry/{dir}/{ns}/"),
            _ => format!("/registry/{dir}/"),
        }
    }

    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.prefix(namespace))
    }

    /// The APIResource entries of discovery: the resource and its subresources.
    pub fn discovery(&self) -> Vec<Value> {
        let mut out = vec![json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            "shortNames": self.short_names,
            "categories": self.categories,
            "storageVersionHash": "",
        })];
        for sub in self.subresources {
            let (kind, verbs, group, version) = match *sub {
                "scale" => (
                    "Scale",
                    json!(["get", "patch", "update"]),
                    "autoscaling",
                    "v1",
                ),
                "binding" => ("Binding", json!(["create"]), "", "v1"),
                _ => (
                    self.kind,
                    json!(["get", "patch", "update"]),
                    self.group,
                    self.version,
                ),
            };
            out.push(json!({
                "name": format!("{}/{sub}", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": kind,
                "group": group,
                "version": version,
                "verbs": verbs,
            }));
        }
        out
    }

    /// Which names the resource accepts: a DNS-1123 label for namespaces, a subdomain for
    /// the rest. The error text is Kubernetes'.
    pub fn check_name(&self, name: &str) -> Result<(), String> {
        if self.plural == "namespaces" {
            dns1123_label(name)
        } else {
            dns1123_subdomain(name)
        }
    }

    /// The schema objects of this resource are checked against.
    pub fn schema(&self) -> Option<crate::schema::Schema> {
        if self.is_custom() {
            custom_schema(self)
        } else {
            crate::schema::builtin(self.schema)
        }
    }
}

#[allow(clippy::too_many_arguments)]
const fn builtin(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    subresources: &'static [&'static str],
    schema: &'static str,
) -> Resource {
    Resource {
        group,
        version,
        plural,
        singular,
        kind,
        namespaced,
        short_names,
        field_labels: &[],
        subresources,
        schema,
        categories: &[],
    }
}

const STATUS: &[&str] = &["status"];
const STATUS_SCALE: &[&str] = &["status", "scale"];
const ALL: &[&str] = &["all"];

pub const RESOURCES: &[Resource] = &[
    Resource {
        field_labels: &["status.phase"],
        ..builtin(
            "",
            "v1",
            "namespaces",
            "namespace",
            "Namespace",
            false,
            &["ns"],
            STATUS,
            "io.k8s.api.core.v1.Namespace",
        )
    },
    Resource {
        field_labels: &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        categories: ALL,
        ..builtin(
            "",
            "v1",
            "pods",
            "pod",
            "Pod",
            true,
            &["po"],
            &["status", "binding"],
            "io.k8s.api.core.v1.Pod",
        )
    },
    Resource {
        field_labels: &["spec.unschedulable"],
        ..builtin(
            "",
            "v1",
            "nodes",
            "node",
            "Node",
            false,
            &["no"],
            STATUS,
            "io.k8s.api.core.v1.Node",
        )
    },
    builtin(
        "",
        "v1",
        "configmaps",
        "configmap",
        "ConfigMap",
        true,
        &["cm"],
        &[],
        "io.k8s.api.core.v1.ConfigMap",
    ),
    Resource {
        field_labels: &["type"],
        ..builtin(
            "",
            "v1",
            "secrets",
            "secret",
            "Secret",
            true,
            &[],
            &[],
            "io.k8s.api.core.v1.Secret",
        )
    },
    builtin(
        "",
        "v1",
        "serviceaccounts",
        "serviceaccount",
        "ServiceAccount",
        true,
        &["sa"],
        &[],
        "io.k8s.api.core.v1.ServiceAccount",
    ),
    Resource {
        categories: ALL,
        ..builtin(
            "",
            "v1",
            "services",
            "service",
            "Service",
            true,
            &["svc"],
            STATUS,
            "io.k8s.api.core.v1.Service",
        )
    },
    builtin(
        "",
        "v1",
        "endpoints",
        "endpoints",
        "Endpoints",
        true,
        &["ep"],
        &[],
        "io.k8s.api.core.v1.Endpoints",
    ),
    Resource {
        field_labels: &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        ..builtin(
            "",
            "v1",
            "events",
            "event",
            "Event",
            true,
            &["ev"],
            &[],
            "io.k8s.api.core.v1.Event",
        )
    },
    builtin(
        "",
        "v1",
        "persistentvolumes",
        "persistentvolume",
        "PersistentVolume",
        false,
        &["pv"],
        STATUS,
        "io.k8s.api.core.v1.PersistentVolume",
    ),
    builtin(
        "",
        "v1",
        "persistentvolumeclaims",
        "persistentvolumeclaim",
        "PersistentVolumeClaim",
        true,
        &["pvc"],
        STATUS,
        "io.k8s.api.core.v1.PersistentVolumeClaim",
    ),
    builtin(
        "",
        "v1",
        "resourcequotas",
        "resourcequota",
        "ResourceQuota",
        true,
        &["quota"],
        STATUS,
        "io.k8s.api.core.v1.ResourceQuota",
    ),
    builtin(
        "",
        "v1",
        "limitranges",
        "limitrange",
        "LimitRange",
        true,
        &["limits"],
        &[],
        "io.k8s.api.core.v1.LimitRange",
    ),
    builtin(
        "",
        "v1",
        "podtemplates",
        "podtemplate",
        "PodTemplate",
        true,
        &[],
        &[],
        "io.k8s.api.core.v1.PodTemplate",
    ),
    Resource {
        categories: ALL,
        ..builtin(
            "apps",
            "v1",
            "deployments",
            "deployment",
            "Deployment",
            true,
            &["deploy"],
            STATUS_SCALE,
            "io.k8s.api.apps.v1.Deployment",
        )
    },
    Resource {
        categories: ALL,
        ..builtin(
            "apps",
            "v1",
            "replicasets",
            "replicaset",
            "ReplicaSet",
            true,
            &["rs"],
            STATUS_SCALE,
            "io.k8s.api.apps.v1.ReplicaSet",
        )
    },
    Resource {
        categories: ALL,
        ..builtin(
            "apps",
            "v1",
            "statefulsets",
            "statefulset",
            "StatefulSet",
            true,
            &["sts"],
            STATUS_SCALE,
            "io.k8s.api.apps.v1.StatefulSet",
        )
    },
    Resource {
        categories: ALL,
        ..builtin(
            "apps",
            "v1",
            "daemonsets",
            "daemonset",
            "DaemonSet",
            true,
            &["ds"],
            STATUS,
            "io.k8s.api.apps.v1.DaemonSet",
        )
    },
    builtin(
        "apps",
        "v1",
        "controllerrevisions",
        "controllerrevision",
        "ControllerRevision",
        true,
        &[],
        &[],
        "io.k8s.api.apps.v1.ControllerRevision",
    ),
    Resource {
        field_labels: &["status.successful"],
        categories: ALL,
        ..builtin(
            "batch",
            "v1",
            "jobs",
            "job",
            "Job",
            true,
            &[],
            STATUS,
            "io.k8s.api.batch.v1.Job",
        )
    },
    Resource {
        categories: ALL,
        ..builtin(
            "batch",
            "v1",
            "cronjobs",
            "cronjob",
            "CronJob",
            true,
            &["cj"],
            STATUS,
            "io.k8s.api.batch.v1.CronJob",
        )
    },
    Resource {
        categories: ALL,
        ..builtin(
            "autoscaling",
            "v2",
            "horizontalpodautoscalers",
            "horizontalpodautoscaler",
            "HorizontalPodAutoscaler",
            true,
            &["hpa"],
            STATUS,
            "io.k8s.api.autoscaling.v2.HorizontalPodAutoscaler",
        )
    },
    // The same Events as the core group's, converted at the edge (events.rs).
    builtin(
        "events.k8s.io",
        "v1",
        "events",
        "event",
        "Event",
        true,
        &["ev"],
        &[],
        "io.k8s.api.events.v1.Event",
    ),
    builtin(
        "coordination.k8s.io",
        "v1",
        "leases",
        "lease",
        "Lease",
        true,
        &[],
        &[],
        "io.k8s.api.coordination.v1.Lease",
    ),
    Resource {
        field_labels: &["addressType"],
        ..builtin(
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            "endpointslice",
            "EndpointSlice",
            true,
            &[],
            &[],
            "io.k8s.api.discovery.v1.EndpointSlice",
        )
    },
    builtin(
        "storage.k8s.io",
        "v1",
        "storageclasses",
        "storageclass",
        "StorageClass",
        false,
        &["sc"],
        &[],
        "io.k8s.api.storage.v1.StorageClass",
    ),
    builtin(
        "policy",
        "v1",
        "poddisruptionbudgets",
        "poddisruptionbudget",
        "PodDisruptionBudget",
        true,
        &["pdb"],
        STATUS,
        "io.k8s.api.policy.v1.PodDisruptionBudget",
    ),
    builtin(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "customresourcedefinition",
        "CustomResourceDefinition",
        false,
        &["crd", "crds"],
        STATUS,
        "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.CustomResourceDefinition",
    ),
];

/// A custom resource served, with its schema.
#[derive(Clone)]
pub struct Custom {
    pub resource: &'static Resource,
    pub schema: crate::schema::Schema,
    /// The CRD version's `openAPIV3Schema`, for the OpenAPI documents.
    pub openapi: Value,
    /// The CRD version's `additionalPrinterColumns`.
    pub columns: Vec<Value>,
    /// The CRD's storage version (objects of every version are stored in it).
    pub storage_version: String,
}

/// The custom resources served now, kept in step with the stored CRDs (see `crd.rs`).
static CUSTOM: RwLock<Vec<Custom>> = RwLock::new(Vec::new());

/// The registration of a custom resource.
pub fn custom(r: &Resource) -> Option<Custom> {
    let custom = CUSTOM.read().unwrap_or_else(|e| e.into_inner());
    custom.iter().find(|c| *c.resource == *r).cloned()
}

/// The version a custom resource's objects are stored in.
pub fn storage_version(r: &Resource) -> Option<String> {
    custom(r).map(|c| c.storage_version)
}

fn custom_schema(r: &Resource) -> Option<crate::schema::Schema> {
    custom(r).map(|c| c.schema)
}

/// What a CustomResourceDefinition defines for one served version.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomDef {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub subresources: Vec<&'static str>,
    /// The CRD's storage version (not part of the served resource).
    pub storage_version: String,
}

impl CustomDef {
    fn describes(&self, r: &Resource) -> bool {
        self.group == r.group
            && self.version == r.version
            && self.plural == r.plural
            && self.singular == r.singular
            && self.kind == r.kind
            && self.namespaced == r.namespaced
            && self.short_names.iter().eq(r.short_names.iter())
            && self.categories.iter().eq(r.categories.iter())
            && self.subresources.iter().eq(r.subresources.iter())
    }

    /// A resource for this definition, for the life of the process.
    fn leak(self) -> &'static Resource {
        fn s(v: String) -> &'static str {
            Box::leak(v.into_boxed_str())
        }
        fn list(v: Vec<String>) -> &'static [&'static str] {
            Box::leak(v.into_iter().map(s).collect::<Vec<_>>().into_boxed_slice())
        }
        Box::leak(Box::new(Resource {
            group: s(self.group),
            version: s(self.version),
            plural: s(self.plural),
            singular: s(self.singular),
            kind: s(self.kind),
            namespaced: self.namespaced,
            short_names: list(self.short_names),
            field_labels: &[],
            subresources: Box::leak(self.subresources.into_boxed_slice()),
            schema: "",
            categories: list(self.categories),
        }))
    }
}

/// Replaces the custom resources served with `now`. A resource whose definition did not
/// change keeps its entry; a new or changed one is allocated once and kept for the life of
/// the process (CRD changes are rare, and a handful of strings each).
pub fn set_custom(now: Vec<(CustomDef, crate::schema::Schema, Value, Vec<Value>)>) {
    let mut custom = CUSTOM.write().unwrap_or_else(|e| e.into_inner());
    let old = std::mem::take(&mut *custom);
    for (def, schema, openapi, columns) in now {
        let storage_version = def.storage_version.clone();
        let resource = match old.iter().find(|c| def.describes(c.resource)) {
            Some(c) => c.resource,
            None => def.leak(),
        };
        custom.push(Custom {
            resource,
            schema,
            openapi,
            columns,
            storage_version,
        });
    }
}

/// Every resource served now: built-in, then custom.
pub fn all() -> Vec<&'static Resource> {
    let custom = CUSTOM.read().unwrap_or_else(|e| e.into_inner());
    RESOURCES
        .iter()
        .chain(custom.iter().map(|c| c.resource))
        .collect()
}

pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    if let Some(r) = RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
    {
        return Some(r);
    }
    let custom = CUSTOM.read().unwrap_or_else(|e| e.into_inner());
    custom
        .iter()
        .map(|c| c.resource)
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The group versions served, for `/api` and `/apis`.
pub fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = all().iter().map(|r| (r.group, r.version)).collect();
    out.sort();
    out.dedup();
    out
}

/// Every served group with its versions, most preferred first (Kubernetes' order: GA
/// before beta before alpha, higher numbers first, then other names alphabetically).
pub fn groups() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut out: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    for (group, version) in group_versions() {
        match out.iter_mut().find(|(g, _)| *g == group) {
            Some((_, versions)) => versions.push(version),
            None => out.push((group, vec![version])),
        }
    }
    for (_, versions) in &mut out {
        versions.sort_by_key(|v| version_priority(v));
    }
    out
}

/// A sort key for a Kubernetes version name: smaller sorts first (is preferred).
fn version_priority(v: &str) -> (u8, i64, i64, String) {
    let parsed = v.strip_prefix('v').and_then(|rest| {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let major: i64 = rest[..digits].parse().ok()?;
        let tail = &rest[digits..];
        let (stage, minor) = if tail.is_empty() {
            (0, "0")
        } else if let Some(m) = tail.strip_prefix("beta") {
            (1, m)
        } else if let Some(m) = tail.strip_prefix("alpha") {
            (2, m)
        } else {
            return None;
        };
        let minor: i64 = if minor.is_empty() {
            0
        } else {
            minor.parse().ok()?
        };
        Some((stage, major, minor))
    });
    match parsed {
        Some((stage, major, minor)) => (stage, -major, -minor, String::new()),
        None => (3, 0, 0, v.to_string()),
    }
}

const LABEL_MAX: usize = 63;
const SUBDOMAIN_MAX: usize = 253;

pub fn dns1123_label(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= LABEL_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else if name.len() > LABEL_MAX {
        Err(format!("must be no more than {LABEL_MAX} characters"))
    } else {
        Err(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or \
             '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or \
             '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
                .into(),
        )
    }
}

pub fn dns1123_subdomain(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= SUBDOMAIN_MAX
        && name.split('.').all(|part| dns1123_label(part).is_ok());
    if ok {
        Ok(())
    } else if name.len() > SUBDOMAIN_MAX {
        Err(format!("must be no more than {SUBDOMAIN_MAX} characters"))
    } else {
        Err(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
             '-' or '.', and must start and end with an alphanumeric character (e.g. \
             'example.com', regex used for validation is \
             '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
                .into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_as_kubernetes_prefers_them() {
        let mut v = vec![
            "v1alpha1", "foo", "v1beta1", "v2", "v1", "v1beta2", "v10", "bar",
        ];
        v.sort_by_key(|v| version_priority(v));
        assert_eq!(
            v,
            ["v10", "v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "bar", "foo"]
        );
    }

    #[test]
    fn names_follow_rfc_1123() {
        assert!(dns1123_label("web-1").is_ok());
        assert!(dns1123_label("Web").is_err());
        assert!(dns1123_label("-a").is_err());
        assert!(dns1123_subdomain("a.b-c.d").is_ok());
        assert!(dns1123_subdomain("a..b").is_err());
        assert!(dns1123_subdomain(&"a".repeat(254)).is_err());
    }

    #[test]
    fn keys_follow_the_registry_layout() {
        let cm = find("", "v1", "configmaps").expect("configmaps");
        assert_eq!(
            cm.key(Some("default"), "x"),
            "/registry/configmaps/default/x"
        );
        let ns = find("", "v1", "namespaces").expect("namespaces");
        assert_eq!(
            ns.key(None, "kube-system"),
            "/registry/namespaces/kube-system"
        );
    }
}
