//! ModelRoute controller: validates each route and writes its `Accepted`
//! condition, only when it changes.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use parley_crds::{ChatDeployment, ModelRoute, ModelRouteStatus};
use tokio_util::sync::CancellationToken;

use super::Context;
use crate::Error;
use crate::build::FIELD_MANAGER;
use crate::routes::{self, Rejection};
use crate::status::{ACCEPTED, ConditionSet};

pub const CONTROLLER: &str = "modelroute";

/// Runs the controller until `shutdown`.
pub async fn run(context: Arc<Context>, shutdown: CancellationToken) {
    let controller = Controller::new(context.scoped::<ModelRoute>(), watcher::Config::default());
    // Alias uniqueness depends on the other routes and on which
    // ChatDeployments select them: re-check a namespace's routes when either changes.
    let same_namespace = |store: kube::runtime::reflector::Store<ModelRoute>| {
        move |namespace: Option<String>| {
            store
                .state()
                .into_iter()
                .filter(|route| route.namespace() == namespace)
                .map(|route| ObjectRef::from_obj(&*route))
                .collect::<Vec<_>>()
        }
    };
    let siblings = same_namespace(controller.store());
    let selected = same_namespace(controller.store());
    controller
        .watches(
            context.scoped::<ModelRoute>(),
            watcher::Config::default(),
            move |route| siblings(route.namespace()),
        )
        .watches(
            context.scoped::<ChatDeployment>(),
            watcher::Config::default(),
            move |chat| selected(chat.namespace()),
        )
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, context.clone())
        .for_each(|result| {
            super::on_result(&context, CONTROLLER, result);
            std::future::ready(())
        })
        .await;
}

pub fn error_policy(route: Arc<ModelRoute>, error: &Error, context: Arc<Context>) -> Action {
    tracing::warn!(
        name = %route.name_any(),
        namespace = ?route.namespace(),
        kind = error.kind(),
        %error,
        "reconcile failed"
    );
    Action::requeue(context.retry_delay(CONTROLLER, &*route, error))
}

pub async fn reconcile(route: Arc<ModelRoute>, context: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&route, &context).await;
    let observed = route.status.as_ref().and_then(|s| s.observed_generation);
    context.record_outcome(
        CONTROLLER,
        &*route,
        observed,
        started,
        &result.as_ref().map(|_| ()),
    );
    result
}

/// The route's verdict in every ChatDeployment that selects it (the first
/// rejection wins), or on its own when none does.
pub fn judge(
    route: &ModelRoute,
    chats: &[ChatDeployment],
    all_routes: &[ModelRoute],
) -> Result<(), Rejection> {
    for chat in chats.iter().filter(|chat| routes::selects(chat, route)) {
        let selection: Vec<&ModelRoute> = all_routes
            .iter()
            .filter(|other| routes::selects(chat, other))
            .collect();
        routes::verdict(route, &selection, &chat.name_any())?;
    }
    routes::verdict(route, &[route], "")
}

/// The status for a verdict, keeping the transition time when unchanged.
pub fn route_status(
    route: &ModelRoute,
    verdict: &Result<(), Rejection>,
    now: &Time,
) -> ModelRouteStatus {
    let old = route
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let mut conditions = ConditionSet::new(old, route.metadata.generation, now);
    match verdict {
        Ok(()) => conditions.set(
            ACCEPTED,
            true,
            "Valid",
            format!("route `{}` is valid and may be served", route.spec.alias),
        ),
        Err(rejection) => {
            conditions.set(ACCEPTED, false, rejection.reason, rejection.message.clone())
        }
    }
    ModelRouteStatus {
        observed_generation: route.metadata.generation,
        conditions: conditions.into_vec(),
    }
}

async fn reconcile_inner(route: &ModelRoute, context: &Context) -> Result<Action, Error> {
    let namespace = route.namespace().ok_or(Error::MissingNamespace)?;
    let chats: Api<ChatDeployment> = Api::namespaced(context.client.clone(), &namespace);
    let routes: Api<ModelRoute> = Api::namespaced(context.client.clone(), &namespace);
    let chats = chats.list(&ListParams::default()).await?.items;
    let all_routes = routes.list(&ListParams::default()).await?.items;
    let verdict = judge(route, &chats, &all_routes);
    let now = Time(Timestamp::now());
    let new_status = route_status(route, &verdict, &now);
    if route.status.as_ref() != Some(&new_status) {
        let patch = serde_json::json!({
            "apiVersion": "parley.dev/v1alpha1",
            "kind": "ModelRoute",
            "status": new_status,
        });
        routes
            .patch_status(
                &route.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        let was_accepted = route
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == ACCEPTED))
            .map(|c| c.status == "True");
        let accepted = verdict.is_ok();
        if was_accepted != Some(accepted) {
            match &verdict {
                Ok(()) => {
                    context
                        .publish(route, false, "Accepted", "route accepted".to_owned())
                        .await;
                }
                Err(rejection) => {
                    context
                        .publish(route, true, rejection.reason, rejection.message.clone())
                        .await;
                }
            }
        }
    }
    Ok(Action::await_change())
}
