//! operator/rbac/cluster-role.yaml grants what the operator does and no more.
//! (The integration tests also run the operator as a user holding only it.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;

use k8s_openapi::api::rbac::v1::ClusterRole;

fn granted() -> BTreeSet<(String, String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("rbac/cluster-role.yaml");
    let role: ClusterRole = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.unwrap() {
            for resource in rule.resources.clone().unwrap() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    granted
}

#[test]
fn cluster_role_covers_every_request_the_operator_makes() {
    let granted = granted();
    let watch = ["get", "list", "watch"];
    let apply = ["get", "list", "watch", "create", "patch"];
    let mut needed: Vec<(&str, &str, &[&str])> = vec![
        ("parley.dev", "chatdeployments", &watch),
        ("parley.dev", "modelroutes", &watch),
        ("parley.dev", "chatdeployments/status", &["patch"]),
        ("parley.dev", "modelroutes/status", &["patch"]),
        ("events.k8s.io", "events", &["create", "patch"]),
        (
            "coordination.k8s.io",
            "leases",
            &["get", "create", "update"],
        ),
    ];
    for (group, resource) in [
        ("", "serviceaccounts"),
        ("", "configmaps"),
        ("", "services"),
        ("apps", "deployments"),
        ("rbac.authorization.k8s.io", "roles"),
        ("rbac.authorization.k8s.io", "rolebindings"),
        ("autoscaling", "horizontalpodautoscalers"),
        ("policy", "poddisruptionbudgets"),
        ("monitoring.coreos.com", "servicemonitors"),
    ] {
        needed.push((group, resource, &apply));
    }
    for (group, resource, verbs) in needed {
        for verb in verbs {
            let key = (group.to_owned(), resource.to_owned(), (*verb).to_owned());
            assert!(
                granted.contains(&key),
                "missing {verb} on {group}/{resource}"
            );
        }
    }
}

#[test]
fn cluster_role_is_least_privilege() {
    for (group, resource, verb) in granted() {
        assert!(
            !group.contains('*') && !resource.contains('*') && !verb.contains('*'),
            "wildcard in {group}/{resource} {verb}"
        );
        assert_ne!(resource, "secrets", "the operator never reads Secrets");
        assert!(
            ![
                "delete",
                "deletecollection",
                "escalate",
                "bind",
                "impersonate"
            ]
            .contains(&verb.as_str()),
            "{verb} on {group}/{resource} is not needed: children are garbage-collected"
        );
    }
}
