//! `ChatDeployment`: one installation of the chat service.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::content_policy::CohortPolicy;

/// Desired state of one chat service installation.
// Each `printcolumn(...)` repeats the same keys, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "parley.dev",
    version = "v1alpha1",
    kind = "ChatDeployment",
    namespaced,
    status = "ChatDeploymentStatus",
    derive = "PartialEq",
    shortname = "chatdep",
    shortname = "cd",
    category = "parley",
    doc = "A Parley chat service: Deployment, Service, autoscaling and hot-reloaded model routes.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.readyReplicas"
    ),
    printcolumn(
        name = "Routes",
        type_ = "string",
        json_path = ".status.routes[*].alias",
        priority = 1
    ),
    printcolumn(
        name = "Image",
        type_ = "string",
        json_path = ".spec.image",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ChatDeploymentSpec {
    /// Container image of parley-service; defaults to the image of this
    /// release of the CRDs, `ghcr.io/parley-dev/parley-service:<version>`.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    #[serde(default)]
    pub replicas: ReplicasSpec,
    #[serde(default)]
    pub autoscaling: AutoscalingSpec,
    /// Container resources; unset leaves the cluster's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Selects the ModelRoutes (in this namespace) the service offers; empty selects all.
    #[serde(default)]
    pub route_selector: LabelSelector,
    /// Alias used when a request names no route.
    #[serde(default = "default_route")]
    #[schemars(length(min = 1, max = 63))]
    pub default_route: String,
    pub storage: StorageSpec,
    /// Redis for rate limits and stream hubs across replicas; required when `replicas.max > 1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,
    #[serde(default)]
    pub auth: AuthSpec,
    #[serde(default)]
    pub accounting: AccountingSpec,
    #[serde(default)]
    pub providers: ProvidersSpec,
    #[serde(default)]
    pub rate_limits: RateLimitsSpec,
    #[serde(default)]
    pub observation: ObservationSpec,
    /// Longest a reply may stream: a longer one ends with `MAX_DURATION`, keeping
    /// (and charging for) what it generated. Pods also get this long, plus a
    /// margin, to let replies finish on shutdown.
    #[serde(default = "default_max_stream_duration_seconds")]
    #[schemars(range(min = 10, max = 86400))]
    pub max_stream_duration_seconds: u32,
    /// Content policies for users of some cohorts, applied on every route on
    /// top of each route's own `contentPolicy`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub cohort_policies: Vec<CohortPolicy>,
}

/// The parley-service image of this release: what a ChatDeployment that
/// names no image runs.
pub const DEFAULT_SERVICE_IMAGE: &str = concat!(
    "ghcr.io/parley-dev/parley-service:",
    env!("CARGO_PKG_VERSION")
);

fn default_image() -> String {
    DEFAULT_SERVICE_IMAGE.to_owned()
}

fn default_route() -> String {
    crate::routes_file::IMPLICIT_DEFAULT_ROUTE.to_owned()
}

fn default_max_stream_duration_seconds() -> u32 {
    300
}

/// Replica bounds; the HorizontalPodAutoscaler scales between them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicasSpec {
    #[schemars(range(min = 1, max = 1000))]
    pub min: i32,
    #[schemars(range(min = 1, max = 1000))]
    pub max: i32,
}

impl Default for ReplicasSpec {
    fn default() -> Self {
        Self { min: 1, max: 1 }
    }
}

/// Autoscaling targets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Average CPU utilization (percent of requests) to keep pods at.
    #[serde(default = "default_cpu_utilization")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization_percentage: i32,
    /// Average `parley_active_streams` per pod to keep (needs a custom-metrics adapter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_active_streams_per_pod: Option<i32>,
}

fn default_cpu_utilization() -> i32 {
    70
}

impl Default for AutoscalingSpec {
    fn default() -> Self {
        Self {
            target_cpu_utilization_percentage: default_cpu_utilization(),
            target_active_streams_per_pod: None,
        }
    }
}

/// A key of a Secret in the ChatDeployment's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A Secret in the ChatDeployment's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Where sessions, the ledger, usage and audit records live: exactly one of
/// `mongodb` or `embedded`. (A struct rather than an enum so that every
/// YAML and JSON library reads it the same way; the schema's `oneOf`
/// enforces the choice.)
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [{"required": ["mongodb"]}, {"required": ["embedded"]}]))]
pub struct StorageSpec {
    /// MongoDB (production).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mongodb: Option<MongodbStorage>,
    /// The embedded store on a pod-local volume: for development, one replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedded: Option<EmbeddedStorage>,
}

/// The storage a ChatDeployment chose.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Storage<'a> {
    Mongodb(&'a MongodbStorage),
    Embedded(&'a EmbeddedStorage),
}

impl StorageSpec {
    /// The chosen storage; `None` unless exactly one is set.
    pub fn chosen(&self) -> Option<Storage<'_>> {
        match (&self.mongodb, &self.embedded) {
            (Some(mongodb), None) => Some(Storage::Mongodb(mongodb)),
            (None, Some(embedded)) => Some(Storage::Embedded(embedded)),
            _ => None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MongodbStorage {
    /// Secret key holding the `mongodb://` URI.
    pub uri_secret_ref: SecretKeyRef,
    #[serde(default = "default_database")]
    #[schemars(length(min = 1, max = 63))]
    pub database: String,
}

fn default_database() -> String {
    "parley".to_owned()
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmbeddedStorage {
    /// Size limit of the pod's data volume (an emptyDir).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<Quantity>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// Secret key holding the `redis://` URL.
    pub url_secret_ref: SecretKeyRef,
}

/// How bearer tokens are verified: an HS256 secret and/or a JWKS URL.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret_ref: Option<SecretKeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub jwks_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub audience: Option<String>,
}

/// Credits ledger.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccountingSpec {
    #[serde(default)]
    pub mode: AccountingMode,
    /// Base URL of the external accounting service; required when `mode: external`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub external_url: Option<String>,
    /// Whole credits a new account starts with.
    #[serde(default = "default_initial_credits")]
    pub initial_credits: u64,
}

fn default_initial_credits() -> u64 {
    100
}

impl Default for AccountingSpec {
    fn default() -> Self {
        Self {
            mode: AccountingMode::default(),
            external_url: None,
            initial_credits: default_initial_credits(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AccountingMode {
    /// The service's own ledger in its storage.
    #[default]
    Builtin,
    /// An accounting service speaking the seed's HTTP contract.
    External,
}

/// Provider connection settings (routes only name providers and models).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProvidersSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bedrock: Option<BedrockProvider>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openai: Option<OpenAiProvider>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BedrockProvider {
    #[schemars(length(min = 1))]
    pub region: String,
    /// Endpoint override (e.g. a VPC endpoint or a local stand-in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub endpoint_url: Option<String>,
    /// Secret with keys `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
    /// optionally `AWS_SESSION_TOKEN`; leave unset to use IRSA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// Annotations for the pods' ServiceAccount, e.g. `eks.amazonaws.com/role-arn` for IRSA.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_account_annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OpenAiProvider {
    /// Base URL of an OpenAI-compatible API, e.g. `http://vllm:8000/v1`.
    #[schemars(length(min = 1))]
    pub base_url: String,
    /// API key; unset for servers that need none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,
}

/// Per-user limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitsSpec {
    #[serde(default = "default_requests_per_minute")]
    #[schemars(range(min = 1))]
    pub requests_per_minute: u32,
    #[serde(default = "default_tokens_per_minute")]
    #[schemars(range(min = 1))]
    pub tokens_per_minute: u32,
    #[serde(default = "default_concurrent_streams")]
    #[schemars(range(min = 1, max = 1000))]
    pub concurrent_streams: u32,
}

fn default_requests_per_minute() -> u32 {
    60
}
fn default_tokens_per_minute() -> u32 {
    100_000
}
fn default_concurrent_streams() -> u32 {
    3
}

impl Default for RateLimitsSpec {
    fn default() -> Self {
        Self {
            requests_per_minute: default_requests_per_minute(),
            tokens_per_minute: default_tokens_per_minute(),
            concurrent_streams: default_concurrent_streams(),
        }
    }
}

/// Supervisor observation of live replies.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservationSpec {
    /// Whether supervisors (of a user's cohorts) and admins may watch replies
    /// live; every observation is audited.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// Seconds a reply keeps generating after its client disconnects, so it can re-attach.
    #[serde(default = "default_reattach_grace_seconds")]
    #[schemars(range(min = 0, max = 3600))]
    pub reattach_grace_seconds: u32,
}

fn enabled_by_default() -> bool {
    true
}
fn default_reattach_grace_seconds() -> u32 {
    30
}

impl Default for ObservationSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            reattach_grace_seconds: default_reattach_grace_seconds(),
        }
    }
}

/// Observed state of a ChatDeployment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatDeploymentStatus {
    /// The `metadata.generation` the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`, `RoutesValid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Routes compiled into the routes ConfigMap.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<ResolvedRoute>,
    /// Optional children the operator does not create, and why (e.g. no
    /// ServiceMonitor while the cluster lacks the Prometheus operator's CRD).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub off_children: Vec<OffChild>,
}

/// An optional child that is off.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OffChild {
    /// `HorizontalPodAutoscaler`, `PodDisruptionBudget` or `ServiceMonitor`.
    pub kind: String,
    /// CamelCase reason, e.g. `ApiNotServed`.
    pub reason: String,
    pub message: String,
}

/// A route the service offers and the ModelRoute it came from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedRoute {
    pub alias: String,
    pub model_route: String,
}
