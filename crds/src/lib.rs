//! Parley's custom resources (`ChatDeployment`, `ModelRoute`, group
//! `parley.dev/v1alpha1`) and the routes file shared by the operator, which
//! writes it, and the service, which hot-reloads it.

mod chat_deployment;
mod content_policy;
mod credits;
mod model_route;
mod problems;
mod routes_file;
mod tokens;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use chat_deployment::{
    AccountingMode, AccountingSpec, AuthSpec, AutoscalingSpec, BedrockProvider, ChatDeployment,
    ChatDeploymentSpec, ChatDeploymentStatus, DEFAULT_SERVICE_IMAGE, EmbeddedStorage,
    MongodbStorage, ObservationSpec, OffChild, OpenAiProvider, ProvidersSpec, RateLimitsSpec,
    RedisSpec, ReplicasSpec, ResolvedRoute, SecretKeyRef, SecretRef, Storage, StorageSpec,
};
pub use content_policy::{
    CohortPolicy, ContentPolicy, ContentRule, OUTPUT_MATCH_MAX_BYTES, PATTERN_SIZE_LIMIT,
    RuleAction, RuleDirection, RuleMatcher,
};
pub use credits::{Credits, CreditsParseError, MICROS_PER_CREDIT};
pub use model_route::{
    CircuitBreaker, DEFAULT_CONTEXT_TOKENS, DEFAULT_MIN_PROMPT_TOKENS, FallbackCondition,
    ModelRoute, ModelRouteSpec, ModelRouteStatus, Pricing, Provider, Role, RouteLimits,
    RouteTarget,
};
pub use routes_file::{
    ALIAS_MAX_LEN, CONTEXT_TOKENS_LIMIT, IMPLICIT_DEFAULT_ROUTE, MAX_OUTPUT_TOKENS_LIMIT,
    ProblemKind, ROUTES_CONFIGMAP_KEY, RouteProblem, RouteProblems, RoutesFile,
    SYSTEM_PROMPT_MAX_CHARS, TIMEOUT_SECONDS_LIMIT, collect_cohort_policy_problems,
};
pub use tokens::{BYTES_PER_TOKEN, TOKENS_PER_TURN, estimate_tokens, estimate_tokens_of_bytes};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid routes file: {0}")]
    RoutesYaml(#[source] serde_yaml::Error),
    #[error("cannot render CRD {name} as JSON: {source}")]
    CrdJson {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot render CRD {name} as YAML: {source}")]
    CrdYaml {
        name: String,
        #[source]
        source: serde_yaml::Error,
    },
}

/// Every CRD this crate defines.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![ChatDeployment::crd(), ModelRoute::crd()]
}

/// [`crds`] as one multi-document YAML stream: exactly what `crdgen` prints
/// and what `crds/generated/crds.yaml` holds.
pub fn crds_yaml() -> Result<String, Error> {
    let mut out = String::new();
    for crd in crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        // Sorted keys keep the output identical whether or not another crate in
        // the build turns on serde_json's `preserve_order`.
        let mut value = serde_json::to_value(&crd).map_err(|source| Error::CrdJson {
            name: name.clone(),
            source,
        })?;
        value.sort_all_objects();
        let document =
            serde_yaml::to_string(&value).map_err(|source| Error::CrdYaml { name, source })?;
        out.push_str("---\n");
        out.push_str(&document);
    }
    Ok(out)
}
