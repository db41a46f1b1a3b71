//! ChatDeployment controller: compile routes, build children, apply them,
//! write status.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use parley_crds::{ChatDeployment, ModelRoute};
use tokio_util::sync::CancellationToken;

use super::{Context, apply, service_monitor};
use crate::Error;
use crate::build::{self, Desired, FIELD_MANAGER, MANAGED_BY_LABEL};
use crate::routes;
use crate::status::{self, Observation, Problem, Rollout};

pub const CONTROLLER: &str = "chatdeployment";
/// Periodic re-check, on top of watch events, to repair drift the watches missed.
const RESYNC: Duration = Duration::from_secs(300);

/// Runs the controller until `shutdown`.
pub async fn run(context: Arc<Context>, shutdown: CancellationToken) {
    let children =
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={FIELD_MANAGER}"));
    let mut controller = Controller::new(
        context.scoped::<ChatDeployment>(),
        watcher::Config::default(),
    )
    .owns(context.scoped::<ServiceAccount>(), children.clone())
    .owns(context.scoped::<Role>(), children.clone())
    .owns(context.scoped::<RoleBinding>(), children.clone())
    .owns(context.scoped::<ConfigMap>(), children.clone())
    .owns(context.scoped::<Service>(), children.clone())
    .owns(context.scoped::<Deployment>(), children.clone());
    if context.capabilities.autoscaling_v2 {
        controller = controller.owns(
            context.scoped::<HorizontalPodAutoscaler>(),
            children.clone(),
        );
    }
    if context.capabilities.policy_v1 {
        controller = controller.owns(context.scoped::<PodDisruptionBudget>(), children.clone());
    }
    if context.capabilities.service_monitor {
        let monitors = build::service_monitor_resource();
        let api: Api<DynamicObject> = match &context.namespace {
            Some(namespace) => Api::namespaced_with(context.client.clone(), namespace, &monitors),
            None => Api::all_with(context.client.clone(), &monitors),
        };
        controller = controller.owns_with(api, monitors, children.clone());
    }
    // A route change re-reconciles every ChatDeployment of its namespace:
    // matching against the new labels alone would miss a route that just
    // stopped being selected.
    let chats = controller.store();
    controller = controller.watches(
        context.scoped::<ModelRoute>(),
        watcher::Config::default(),
        move |route: ModelRoute| {
            let namespace = route.namespace();
            chats
                .state()
                .into_iter()
                .filter(|chat| chat.namespace() == namespace)
                .map(|chat| ObjectRef::from_obj(&*chat))
                .collect::<Vec<_>>()
        },
    );
    controller
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, context.clone())
        .for_each(|result| {
            super::on_result(&context, CONTROLLER, result);
            std::future::ready(())
        })
        .await;
}

/// Retry delay by error kind.
pub fn error_policy(chat: Arc<ChatDeployment>, error: &Error, context: Arc<Context>) -> Action {
    tracing::warn!(
        name = %chat.name_any(),
        namespace = ?chat.namespace(),
        kind = error.kind(),
        %error,
        "reconcile failed"
    );
    Action::requeue(context.retry_delay(CONTROLLER, &*chat, error))
}

pub async fn reconcile(chat: Arc<ChatDeployment>, context: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&chat, &context).await;
    let observed = chat.status.as_ref().and_then(|s| s.observed_generation);
    context.record_outcome(
        CONTROLLER,
        &*chat,
        observed,
        started,
        &result.as_ref().map(|_| ()),
    );
    result
}

async fn reconcile_inner(chat: &ChatDeployment, context: &Context) -> Result<Action, Error> {
    let namespace = chat.namespace().ok_or(Error::MissingNamespace)?;
    let mut spec_problems = status::spec_problems(&chat.spec);
    let selected = match routes::route_selector(chat) {
        Ok(selector) => {
            let api: Api<ModelRoute> = Api::namespaced(context.client.clone(), &namespace);
            api.list(&ListParams::default().labels_from(&selector))
                .await?
                .items
        }
        Err(error) => {
            spec_problems.push(Problem {
                reason: "InvalidRouteSelector",
                message: error.to_string(),
            });
            Vec::new()
        }
    };
    let selected: Vec<&ModelRoute> = selected.iter().collect();
    let compiled = routes::compile(chat, &selected);
    let route_problems = status::route_problems(&chat.spec, &compiled);
    let rollout = if spec_problems.is_empty() {
        let desired = build::build(chat, &compiled, context.capabilities)?;
        Some(apply_children(context, &desired).await?)
    } else {
        None
    };
    let now = Time(Timestamp::now());
    let observation = Observation {
        generation: chat.metadata.generation,
        min_replicas: chat.spec.replicas.min,
        spec_problems: &spec_problems,
        route_problems: &route_problems,
        routes: &compiled,
        rollout,
        capabilities: context.capabilities,
    };
    let new_status = status::chat_status(&observation, chat.status.as_ref(), &now);
    let old_conditions = chat
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    if chat.status.as_ref() != Some(&new_status) {
        let api: Api<ChatDeployment> = Api::namespaced(context.client.clone(), &namespace);
        let patch = serde_json::json!({
            "apiVersion": "parley.dev/v1alpha1",
            "kind": "ChatDeployment",
            "status": new_status,
        });
        api.patch_status(
            &chat.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        for condition in status::transitions(old_conditions, &new_status.conditions) {
            let bad = match condition.type_.as_str() {
                status::DEGRADED => condition.status == "True",
                status::PROGRESSING => false,
                _ => condition.status == "False",
            };
            let note = format!(
                "{} is {}: {}",
                condition.type_, condition.status, condition.message
            );
            context.publish(chat, bad, &condition.reason, note).await;
        }
    }
    Ok(Action::requeue(RESYNC))
}

/// Applies every child; returns what the Deployment reports.
async fn apply_children(context: &Context, desired: &Desired) -> Result<Rollout, Error> {
    let client = &context.client;
    apply(client, &desired.service_account).await?;
    apply(client, &desired.role).await?;
    apply(client, &desired.role_binding).await?;
    apply(client, &desired.routes).await?;
    apply(client, &desired.service).await?;
    let deployment = apply(client, &desired.deployment).await?;
    if let Some(autoscaler) = &desired.autoscaler {
        apply(client, autoscaler).await?;
    }
    if let Some(budget) = &desired.disruption_budget {
        apply(client, budget).await?;
    }
    if let Some(monitor) = &desired.service_monitor {
        service_monitor::apply(client, monitor).await?;
    }
    Ok(Rollout::of(&deployment))
}
