//! Applying the ServiceMonitor, whose CRD can be deleted under a running
//! operator.
//!
//! While a CRD is being deleted, its finalizer deletes every instance and
//! then waits until none is left (it polls for a minute, then starts over).
//! The API server refuses to create an instance meanwhile, but a server-side
//! apply of a missing object is a patch, and a patch may create. An operator
//! that answered the finalizer's deletion by applying the monitor again
//! would hold the CRD's removal up for minutes, and for as long as it kept
//! winning that race. So an apply here never creates: a missing monitor is
//! created with a create, which the API server refuses while the CRD
//! terminates, and an existing one is applied carrying its uid, which the API
//! server takes as a precondition (an apply naming a uid that no longer
//! exists is a conflict, not a create).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::Error;
use crate::build::{self, FIELD_MANAGER};

/// Creates or applies `desired`, unless its CRD is being deleted.
pub async fn apply(client: &kube::Client, desired: &DynamicObject) -> Result<(), Error> {
    let namespace = desired
        .metadata
        .namespace
        .as_deref()
        .ok_or(Error::MissingNamespace)?;
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace,
        &build::service_monitor_resource(),
    );
    let name = desired.name_any();
    let Some(live) = api.get_opt(&name).await? else {
        let create = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PostParams::default()
        };
        return match api.create(&create, desired).await {
            Ok(created) => own_as_applied(&api, &name, &created.metadata).await,
            // 405 is the API server's answer to a create while the CRD
            // terminates; once it is gone, discovery turns the monitor off.
            Err(kube::Error::Api(status)) if status.code == 405 => {
                tracing::info!(namespace, name, message = %status.message, "ServiceMonitor not created");
                Ok(())
            }
            Err(error) => Err(error.into()),
        };
    };
    own_as_applied(&api, &name, &live.metadata).await?;
    let uid = live.metadata.uid.ok_or(Error::MissingUid)?;
    let mut applied = desired.clone();
    applied.metadata.uid = Some(uid);
    match api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&applied),
        )
        .await
    {
        // With `force`, a conflict can only be the uid: the monitor was
        // deleted since it was read, and that deletion reconciles again.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            tracing::debug!(namespace, name, "ServiceMonitor deleted while applying it");
            Ok(())
        }
        Err(error) => Err(error.into()),
        Ok(_) => Ok(()),
    }
}

/// Hands the fields a create gave the operator to its apply, so that a later
/// apply that leaves a field out removes it.
async fn own_as_applied(
    api: &Api<DynamicObject>,
    name: &str,
    live: &ObjectMeta,
) -> Result<(), Error> {
    let Some(patch) = ownership_as_applied(live) else {
        return Ok(());
    };
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// The merge patch that turns the operator's `Update` entry among `live`'s
/// managed fields (what a create leaves) into its `Apply` entry, guarded by
/// the resource version it was read at; `None` when there is nothing to turn.
fn ownership_as_applied(live: &ObjectMeta) -> Option<Value> {
    let entries = live.managed_fields.as_deref()?;
    let ours = |entry: &ManagedFieldsEntry, operation: &str| {
        entry.manager.as_deref() == Some(FIELD_MANAGER)
            && entry.operation.as_deref() == Some(operation)
    };
    if !entries.iter().any(|e| ours(e, "Update")) || entries.iter().any(|e| ours(e, "Apply")) {
        return None;
    }
    let turned: Vec<ManagedFieldsEntry> = entries
        .iter()
        .map(|entry| {
            let mut entry = entry.clone();
            if ours(&entry, "Update") {
                entry.operation = Some("Apply".to_owned());
            }
            entry
        })
        .collect();
    Some(json!({
        "metadata": {
            "resourceVersion": live.resource_version,
            "managedFields": turned,
        }
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(manager: &str, operation: &str) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.to_owned()),
            operation: Some(operation.to_owned()),
            api_version: Some("monitoring.coreos.com/v1".to_owned()),
            ..ManagedFieldsEntry::default()
        }
    }

    fn meta(entries: Vec<ManagedFieldsEntry>) -> ObjectMeta {
        ObjectMeta {
            name: Some("demo".to_owned()),
            resource_version: Some("42".to_owned()),
            managed_fields: Some(entries),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn a_created_monitor_is_handed_to_the_apply_at_its_version() {
        let patch = ownership_as_applied(&meta(vec![
            entry("prometheus-operator", "Update"),
            entry(FIELD_MANAGER, "Update"),
        ]))
        .unwrap();
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        let turned: Vec<(&str, &str)> = patch["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["manager"].as_str().unwrap(),
                    e["operation"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            turned,
            [("prometheus-operator", "Update"), (FIELD_MANAGER, "Apply")]
        );
    }

    #[test]
    fn an_applied_monitor_needs_no_handing_over() {
        assert!(ownership_as_applied(&meta(vec![entry(FIELD_MANAGER, "Apply")])).is_none());
        assert!(ownership_as_applied(&meta(vec![entry("someone", "Update")])).is_none());
        assert!(ownership_as_applied(&meta(Vec::new())).is_none());
        // Both: turning the Update would make a second Apply entry.
        assert!(
            ownership_as_applied(&meta(vec![
                entry(FIELD_MANAGER, "Apply"),
                entry(FIELD_MANAGER, "Update"),
            ]))
            .is_none()
        );
    }
}
