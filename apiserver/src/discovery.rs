//! Aggregated discovery (`apidiscovery.k8s.io/v2`): every group, version and resource in
//! one answer to `/api` (the core group) and `/apis` (the others), which kubectl asks for
//! first; the legacy per-group documents are served too.

use serde_json::{json, Value};

use crate::resources::{self, Resource};

/// The media type of an aggregated discovery answer.
pub const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

const VERBS: [&str; 7] = [
    "create", "delete", "get", "list", "patch", "update", "watch",
];

fn resource(r: &Resource) -> Value {
    let subresources: Vec<Value> = r
        .subresources
        .iter()
        .map(|sub| {
            let (kind, group, version, verbs) = match *sub {
                "scale" => (
                    "Scale",
                    "autoscaling",
                    "v1",
                    json!(["get", "patch", "update"]),
                ),
                "binding" => ("Binding", "", "v1", json!(["create"])),
                _ => (
                    r.kind,
                    r.group,
                    r.version,
                    json!(["get", "patch", "update"]),
                ),
            };
            json!({
                "subresource": sub,
                "responseKind": {"group": group, "version": version, "kind": kind},
                "verbs": verbs,
            })
        })
        .collect();
    json!({
        "resource": r.plural,
        "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": r.singular,
        "verbs": VERBS,
        "shortNames": r.short_names,
        "categories": r.categories,
        "subresources": subresources,
    })
}

/// The APIGroupDiscoveryList of the core group (`core`) or of every other group.
pub fn aggregated(core: bool) -> Value {
    let all = resources::all();
    let mut items = Vec::new();
    for (group, versions) in resources::groups() {
        if group.is_empty() != core {
            continue;
        }
        // Most preferred first.
        let versions: Vec<Value> = versions
            .iter()
            .map(|version| {
                let list: Vec<Value> = all
                    .iter()
                    .filter(|r| r.group == group && r.version == *version)
                    .map(|r| resource(r))
                    .collect();
                json!({"version": version, "resources": list, "freshness": "Current"})
            })
            .collect();
        items.push(json!({
            "metadata": {"name": group, "creationTimestamp": null},
            "versions": versions,
        }));
    }
    if !core {
        items.push(json!({
            "metadata": {"name": "authentication.k8s.io", "creationTimestamp": null},
            "versions": [{"version": "v1", "freshness": "Current", "resources": [{
                "resource": "selfsubjectreviews",
                "responseKind": {"group": "authentication.k8s.io", "version": "v1", "kind": "SelfSubjectReview"},
                "scope": "Cluster",
                "singularResource": "selfsubjectreview",
                "verbs": ["create"],
            }]}],
        }));
    }
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_core_and_the_named_groups_are_answered_apart() {
        let core = aggregated(true);
        let items = core["items"].as_array().expect("items");
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["metadata"]["name"], "");
        let apis = aggregated(false);
        let apps = apis["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|g| g["metadata"]["name"] == "apps")
            .expect("apps");
        let deployments = apps["versions"][0]["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .find(|r| r["resource"] == "deployments")
            .expect("deployments");
        assert_eq!(deployments["scope"], "Namespaced");
        assert_eq!(
            deployments["subresources"][1]["responseKind"]["kind"],
            "Scale"
        );
    }
}
