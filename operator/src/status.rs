//! Pure status computation: spec checks, conditions and their transitions.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use parley_crds::{
    AccountingMode, ChatDeploymentSpec, ChatDeploymentStatus, OffChild, Storage,
    collect_cohort_policy_problems,
};

use crate::build::{Capabilities, unconfigured_providers};
use crate::routes::CompiledRoutes;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const ROUTES_VALID: &str = "RoutesValid";
pub const ACCEPTED: &str = "Accepted";

/// A problem a person can fix, with a condition reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

fn problem(reason: &'static str, message: String) -> Problem {
    Problem { reason, message }
}

/// Spec errors that stop the operator from applying children (the schema
/// cannot express them without CEL, which older API servers lack).
pub fn spec_problems(spec: &ChatDeploymentSpec) -> Vec<Problem> {
    let mut problems = Vec::new();
    let replicas = &spec.replicas;
    if replicas.min > replicas.max {
        problems.push(problem(
            "ReplicasMinAboveMax",
            format!(
                "replicas.min ({}) is above replicas.max ({})",
                replicas.min, replicas.max
            ),
        ));
    }
    if replicas.max > 1 && spec.redis.is_none() {
        problems.push(problem(
            "RedisRequired",
            format!(
                "replicas.max is {}: more than one replica needs spec.redis so streams and \
                 rate limits span pods; set spec.redis.urlSecretRef or replicas.max: 1",
                replicas.max
            ),
        ));
    }
    let storage = spec.storage.chosen();
    if storage.is_none() {
        problems.push(problem(
            "StorageNotChosen",
            "set exactly one of storage.mongodb and storage.embedded".to_owned(),
        ));
    }
    if replicas.max > 1 && matches!(storage, Some(Storage::Embedded(_))) {
        problems.push(problem(
            "EmbeddedStorageSingleReplica",
            "embedded storage is per pod; use storage.mongodb or replicas.max: 1".to_owned(),
        ));
    }
    if spec.accounting.mode == AccountingMode::External && spec.accounting.external_url.is_none() {
        problems.push(problem(
            "ExternalAccountingUrlMissing",
            "accounting.mode is external but accounting.externalUrl is not set".to_owned(),
        ));
    }
    // A broken policy stops the rollout, so the policy in force (the last
    // routes ConfigMap applied) stays rather than being dropped.
    let mut policy_problems = Vec::new();
    collect_cohort_policy_problems(
        &spec.cohort_policies,
        "cohortPolicies",
        &mut policy_problems,
    );
    if !policy_problems.is_empty() {
        let messages: Vec<String> = policy_problems.iter().map(ToString::to_string).collect();
        problems.push(problem("InvalidCohortPolicy", messages.join("; ")));
    }
    if spec.auth.jwt_secret_ref.is_none() && spec.auth.jwks_url.is_none() {
        problems.push(problem(
            "AuthNotConfigured",
            "set auth.jwtSecretRef (HS256) and/or auth.jwksUrl so tokens can be verified"
                .to_owned(),
        ));
    }
    problems
}

/// Problems with the routes a ChatDeployment offers. These degrade it but
/// never stop it: the accepted routes are still served.
pub fn route_problems(spec: &ChatDeploymentSpec, routes: &CompiledRoutes) -> Vec<Problem> {
    let mut problems: Vec<Problem> = routes
        .rejected
        .iter()
        .map(|rejected| {
            problem(
                rejected.rejection.reason,
                format!(
                    "ModelRoute {}: {}",
                    rejected.name, rejected.rejection.message
                ),
            )
        })
        .collect();
    if routes.file.routes.is_empty() {
        problems.push(problem(
            "NoRoutes",
            "routeSelector selects no accepted ModelRoute in this namespace".to_owned(),
        ));
    } else if routes.file.route(&spec.default_route).is_none() {
        problems.push(problem(
            "DefaultRouteMissing",
            format!(
                "defaultRoute `{}` is not among the accepted routes ({})",
                spec.default_route,
                aliases(routes)
            ),
        ));
    }
    for provider in unconfigured_providers(spec, routes) {
        problems.push(problem(
            "ProviderNotConfigured",
            format!(
                "routes use provider {} but spec.providers.{} is not set",
                provider.as_str(),
                provider.as_str()
            ),
        ));
    }
    problems
}

fn aliases(routes: &CompiledRoutes) -> String {
    let names: Vec<&str> = routes.resolved.iter().map(|r| r.alias.as_str()).collect();
    names.join(", ")
}

/// What the Deployment reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rollout {
    pub ready_replicas: i32,
    pub complete: bool,
}

impl Rollout {
    pub fn of(deployment: &Deployment) -> Self {
        let generation = deployment.metadata.generation;
        let wanted = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1);
        let Some(status) = &deployment.status else {
            return Self::default();
        };
        let ready = status.ready_replicas.unwrap_or(0);
        let updated = status.updated_replicas.unwrap_or(0);
        Self {
            ready_replicas: ready,
            complete: status.observed_generation == generation
                && updated >= wanted
                && ready >= wanted
                && status.replicas.unwrap_or(0) == updated,
        }
    }
}

/// Everything the ChatDeployment status is computed from.
pub struct Observation<'a> {
    pub generation: Option<i64>,
    pub min_replicas: i32,
    pub spec_problems: &'a [Problem],
    pub route_problems: &'a [Problem],
    pub routes: &'a CompiledRoutes,
    /// `None` when the spec is invalid (see `spec_problems`) and nothing was applied.
    pub rollout: Option<Rollout>,
    /// What the cluster serves: which optional children exist.
    pub capabilities: Capabilities,
}

/// The optional children the cluster's APIs leave out, and why.
pub fn off_children(capabilities: Capabilities) -> Vec<OffChild> {
    let off = |kind: &str, message: &str| OffChild {
        kind: kind.to_owned(),
        reason: "ApiNotServed".to_owned(),
        message: message.to_owned(),
    };
    let mut children = Vec::new();
    if !capabilities.autoscaling_v2 {
        children.push(off(
            "HorizontalPodAutoscaler",
            "the cluster does not serve autoscaling/v2 (Kubernetes 1.23 or later): the \
             Deployment runs replicas.min",
        ));
    }
    if !capabilities.policy_v1 {
        children.push(off(
            "PodDisruptionBudget",
            "the cluster does not serve policy/v1 (Kubernetes 1.21 or later)",
        ));
    }
    if !capabilities.service_monitor {
        children.push(off(
            "ServiceMonitor",
            "the cluster does not serve monitoring.coreos.com/v1 servicemonitors: install \
             the Prometheus operator's CRDs and the operator creates it without a restart",
        ));
    }
    children
}

/// The status to write; conditions keep their `lastTransitionTime` unless
/// their status flips, so an unchanged world yields an identical status.
pub fn chat_status(
    observation: &Observation<'_>,
    previous: Option<&ChatDeploymentStatus>,
    now: &Time,
) -> ChatDeploymentStatus {
    let old = previous
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let mut conditions = ConditionSet::new(old, observation.generation, now);
    let summary = |problems: &[Problem]| {
        let messages: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        messages.join("; ")
    };
    match observation.route_problems.first() {
        None => conditions.set(
            ROUTES_VALID,
            true,
            "RoutesCompiled",
            format!("serving routes: {}", aliases(observation.routes)),
        ),
        Some(first) => conditions.set(
            ROUTES_VALID,
            false,
            first.reason,
            summary(observation.route_problems),
        ),
    }
    let ready_replicas = observation.rollout.map(|r| r.ready_replicas);
    match observation.rollout {
        None => {
            let reason = observation
                .spec_problems
                .first()
                .map_or("InvalidSpec", |p| p.reason);
            let message = summary(observation.spec_problems);
            conditions.set(READY, false, "InvalidSpec", message.clone());
            conditions.set(
                PROGRESSING,
                false,
                "InvalidSpec",
                "fix the spec to continue".to_owned(),
            );
            conditions.set(DEGRADED, true, reason, message);
        }
        Some(rollout) => {
            let ready = rollout.ready_replicas >= observation.min_replicas;
            conditions.set(
                READY,
                ready,
                if ready {
                    "ReplicasReady"
                } else {
                    "ReplicasNotReady"
                },
                format!(
                    "{} of at least {} replicas ready",
                    rollout.ready_replicas, observation.min_replicas
                ),
            );
            if rollout.complete {
                conditions.set(
                    PROGRESSING,
                    false,
                    "RolloutComplete",
                    "rollout complete".into(),
                );
            } else {
                conditions.set(
                    PROGRESSING,
                    true,
                    "RollingOut",
                    "waiting for the Deployment to roll out".into(),
                );
            }
            match observation.route_problems.first() {
                Some(first) => conditions.set(
                    DEGRADED,
                    true,
                    first.reason,
                    "some routes are not served; see RoutesValid".to_owned(),
                ),
                None => conditions.set(DEGRADED, false, "AsExpected", "all routes served".into()),
            }
        }
    }
    ChatDeploymentStatus {
        observed_generation: observation.generation,
        conditions: conditions.into_vec(),
        ready_replicas,
        routes: observation.routes.resolved.clone(),
        off_children: off_children(observation.capabilities),
    }
}

/// Builds conditions, carrying over transition times of unchanged ones.
pub struct ConditionSet<'a> {
    old: &'a [Condition],
    generation: Option<i64>,
    now: &'a Time,
    conditions: Vec<Condition>,
}

impl<'a> ConditionSet<'a> {
    pub fn new(old: &'a [Condition], generation: Option<i64>, now: &'a Time) -> Self {
        Self {
            old,
            generation,
            now,
            conditions: Vec::new(),
        }
    }

    pub fn set(&mut self, type_: &str, status: bool, reason: &str, message: String) {
        let status = if status { "True" } else { "False" };
        let last_transition_time = self
            .old
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map_or_else(|| self.now.clone(), |c| c.last_transition_time.clone());
        self.conditions.push(Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            last_transition_time,
            observed_generation: self.generation,
        });
    }

    pub fn into_vec(self) -> Vec<Condition> {
        self.conditions
    }
}

/// Conditions whose status changed from `old` to `new` (for events).
pub fn transitions<'a>(old: &[Condition], new: &'a [Condition]) -> Vec<&'a Condition> {
    new.iter()
        .filter(|c| {
            !old.iter()
                .any(|o| o.type_ == c.type_ && o.status == c.status && o.reason == c.reason)
        })
        .collect()
}
