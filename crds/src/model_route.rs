//! `ModelRoute`: a named, ordered fallback chain of model targets.
//!
//! Its spec is also one entry of the routes file (see [`crate::RoutesFile`]),
//! so unknown fields are rejected: a typo in a hand-written routes file is an
//! error, not a silently ignored setting.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::content_policy::ContentPolicy;
use crate::credits::Credits;

/// A named fallback chain of model targets that clients ask for by `alias`.
// Each `printcolumn(...)` repeats the same keys, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "parley.dev",
    version = "v1alpha1",
    kind = "ModelRoute",
    namespaced,
    status = "ModelRouteStatus",
    derive = "PartialEq",
    shortname = "mroute",
    shortname = "mr",
    category = "parley",
    doc = "A named, ordered fallback chain of LLM targets with per-target prices.",
    printcolumn(name = "Alias", type_ = "string", json_path = ".spec.alias"),
    printcolumn(
        name = "Primary",
        type_ = "string",
        json_path = ".spec.targets[0].model",
        description = "Model tried first"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelRouteSpec {
    /// What clients ask for (`route` or `modelId`), e.g. `default`, `fast`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
    )]
    pub alias: String,
    /// Roles allowed to use this route; defaults to every role.
    #[serde(default = "Role::all")]
    #[schemars(length(min = 1))]
    pub allowed_roles: Vec<Role>,
    /// Provider error classes that move on to the next target. Fallback only
    /// happens before the first byte reaches the client.
    #[serde(default = "FallbackCondition::defaults")]
    pub fallback_on: Vec<FallbackCondition>,
    /// When the caller cannot afford the first target, use the first later
    /// target they can afford instead of answering 402.
    #[serde(default)]
    pub downgrade_when_unaffordable: bool,
    /// Targets, tried in order.
    #[schemars(length(min = 1, max = 16))]
    pub targets: Vec<RouteTarget>,
    /// Instructions sent first with every reply on this route (a system
    /// message), always kept however short a target's context window; it
    /// counts towards each reply's input tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub system_prompt: Option<String>,
    /// Per-user limits on this route, on top of the deployment's per-user
    /// limits; omitted means only the deployment's limits apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<RouteLimits>,
    /// What the route is good at, as short tags (e.g. `fast`, `code`,
    /// `long-context`); `POST /api/models/recommend` matches a task against them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub capabilities: Vec<String>,
    /// Rules every message sent on this route, and every reply, must pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_policy: Option<ContentPolicy>,
}

/// What each user may do on one route. Every field defaults to 0, which
/// means unlimited; a route's limits only narrow what the deployment allows.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteLimits {
    /// Replies a user may start on this route per minute; 0: unlimited.
    #[serde(default)]
    pub requests_per_minute: u32,
    /// Tokens (input and output) a user's replies on this route may use per
    /// minute; once spent, new replies on the route are refused until the
    /// minute ends. 0: unlimited.
    #[serde(default)]
    pub tokens_per_minute: u32,
    /// Replies a user may have generating on this route at once; 0: unlimited.
    #[serde(default)]
    pub concurrent_streams: u32,
}

/// One model behind a route.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteTarget {
    pub provider: Provider,
    /// Provider model id, e.g. `amazon.nova-micro-v1:0`.
    #[schemars(length(min = 1, max = 256))]
    pub model: String,
    pub pricing: Pricing,
    /// Upper bound on generated tokens; also what a request is held for.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_output_tokens: u32,
    /// Seconds before an unanswered request counts as `timeout`.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: u32,
    /// When this target stops being tried for a while; omitted: the defaults.
    #[serde(default, skip_serializing_if = "CircuitBreaker::is_default")]
    pub circuit_breaker: CircuitBreaker,
    /// Bedrock Guardrail applied to every request to this target (bedrock
    /// targets only; needs `guardrailVersion`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub guardrail_identifier: Option<String>,
    /// Version of the guardrail, e.g. `1` or `DRAFT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub guardrail_version: Option<String>,
    /// The model's context window in tokens: prompt and reply together. A
    /// reply's prompt keeps the newest turns of the conversation that fit
    /// beside `maxOutputTokens`; omitted means 8192, or `maxOutputTokens` +
    /// 4096 when that is more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 10_000_000))]
    pub context_tokens: Option<u32>,
}

impl RouteTarget {
    /// The context window replies are fitted to: the declared one, else
    /// [`DEFAULT_CONTEXT_TOKENS`], widened for a target whose maximum output
    /// would leave less than [`DEFAULT_MIN_PROMPT_TOKENS`] of it.
    pub fn context_tokens(&self) -> u32 {
        self.context_tokens.unwrap_or_else(|| {
            DEFAULT_CONTEXT_TOKENS.max(
                self.max_output_tokens
                    .saturating_add(DEFAULT_MIN_PROMPT_TOKENS),
            )
        })
    }
}

/// The window assumed for a target that declares none: small enough that
/// every current chat model has at least this much (so an undeclared model
/// is not sent more than it takes), large enough for a useful history.
pub const DEFAULT_CONTEXT_TOKENS: u32 = 8192;
/// The prompt room an undeclared window keeps beside the target's maximum
/// output: a model that may write that much has a window at least that much
/// larger, and routes written before windows were declared keep working.
pub const DEFAULT_MIN_PROMPT_TOKENS: u32 = 4096;

fn default_timeout_seconds() -> u32 {
    60
}

/// A per-target circuit breaker. Throttled, unavailable and timed-out calls
/// are failures; `failureThreshold` of them within `windowSeconds` open the
/// breaker, and an open target is skipped at once (the route's next target
/// answers) for `cooldownSeconds`; then one probe request is let through:
/// its success closes the breaker, its failure opens it again.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreaker {
    /// `false`: the target is always tried.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// Failures within the window that open the breaker.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 1000))]
    pub failure_threshold: u32,
    /// The sliding window failures are counted in.
    #[serde(default = "default_window_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub window_seconds: u32,
    /// How long an open breaker skips the target before a probe.
    #[serde(default = "default_cooldown_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub cooldown_seconds: u32,
}

fn enabled_by_default() -> bool {
    true
}
fn default_failure_threshold() -> u32 {
    5
}
fn default_window_seconds() -> u32 {
    60
}
fn default_cooldown_seconds() -> u32 {
    30
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            enabled: enabled_by_default(),
            failure_threshold: default_failure_threshold(),
            window_seconds: default_window_seconds(),
            cooldown_seconds: default_cooldown_seconds(),
        }
    }
}

impl CircuitBreaker {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Credits charged per 1000 tokens.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pricing {
    pub input_per_1k: Credits,
    pub output_per_1k: Credits,
}

impl Pricing {
    /// Exact price of a request: the sum is rounded up once to the next
    /// micro-credit, so rounding never undercharges and two fractional parts
    /// never both round up. `None` when it does not fit a credit amount.
    /// This is the one pricing rule: holds, charges and quotes all use it.
    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> Option<Credits> {
        let per_1k_micros = i128::from(input_tokens)
            .checked_mul(i128::from(self.input_per_1k.micros()))?
            .checked_add(
                i128::from(output_tokens).checked_mul(i128::from(self.output_per_1k.micros()))?,
            )?;
        let micros = per_1k_micros.checked_add(999)?.div_euclid(1000);
        i64::try_from(micros).ok().map(Credits::from_micros)
    }
}

/// Which provider implementation serves a target.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Provider {
    /// AWS Bedrock Converse API.
    Bedrock,
    /// Any OpenAI-compatible server.
    Openai,
    /// Deterministic built-in model.
    Simulated,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Bedrock => "bedrock",
            Provider::Openai => "openai",
            Provider::Simulated => "simulated",
        }
    }
}

/// Provider error classes that may trigger fallback to the next target.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FallbackCondition {
    Throttled,
    Unavailable,
    Timeout,
    ContextWindow,
    Auth,
}

impl FallbackCondition {
    fn defaults() -> Vec<Self> {
        vec![Self::Throttled, Self::Unavailable, Self::Timeout]
    }
}

/// A caller's role, from the JWT `role` claim.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    User,
    Supervisor,
    Admin,
}

impl Role {
    pub fn all() -> Vec<Self> {
        vec![Self::User, Self::Supervisor, Self::Admin]
    }
}

/// Observed state of a ModelRoute.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelRouteStatus {
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`: whether the route is valid and may be compiled into routes files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_is_exact_and_rounds_up() {
        let pricing = Pricing {
            input_per_1k: Credits::from_whole(1),
            output_per_1k: Credits::parse_decimal("0.3").unwrap(),
        };
        // 1500 input tokens at 1/1k = 1.5; 10 output tokens at 0.3/1k = 0.003
        assert_eq!(
            pricing.cost(1500, 10),
            Some(Credits::parse_decimal("1.503").unwrap())
        );
        let tiny = Pricing {
            input_per_1k: Credits::from_micros(1),
            output_per_1k: Credits::ZERO,
        };
        assert_eq!(tiny.cost(1, 0), Some(Credits::from_micros(1)));
        assert_eq!(tiny.cost(0, 0), Some(Credits::ZERO));
        // 0.001 + 0.001 µcredits: rounded up once to 1, not twice to 2.
        let fine = Pricing {
            input_per_1k: Credits::from_micros(1),
            output_per_1k: Credits::from_micros(1),
        };
        assert_eq!(fine.cost(1, 1), Some(Credits::from_micros(1)));
        let huge = Pricing {
            input_per_1k: Credits::from_micros(i64::MAX),
            output_per_1k: Credits::from_micros(i64::MAX),
        };
        assert_eq!(huge.cost(u64::MAX, u64::MAX), None);
    }
}
