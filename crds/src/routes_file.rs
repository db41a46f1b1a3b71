//! The routes file: the one document the operator writes (ConfigMap key
//! `routes.yaml`) and the service reads (`PARLEY_ROUTES_FILE`), and the
//! validation both sides run before they accept routes.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::content_policy::{CohortPolicy, collect_rule_problems};
use crate::model_route::{ModelRouteSpec, Provider};
use crate::problems::is_valid_name;
pub use crate::problems::{ALIAS_MAX_LEN, ProblemKind, RouteProblem, RouteProblems};
use crate::tokens::{TOKENS_PER_TURN, estimate_tokens};

/// Key of the routes document in the operator's `<name>-routes` ConfigMap.
pub const ROUTES_CONFIGMAP_KEY: &str = "routes.yaml";
/// Alias a client gets when it names no route and the file names no default.
pub const IMPLICIT_DEFAULT_ROUTE: &str = "default";
/// Bounds shared by the CRD schema and [`ModelRouteSpec::validate`].
pub const MAX_OUTPUT_TOKENS_LIMIT: u32 = 1_000_000;
pub const TIMEOUT_SECONDS_LIMIT: u32 = 3600;
pub const FAILURE_THRESHOLD_LIMIT: u32 = 1000;
pub const CONTEXT_TOKENS_LIMIT: u32 = 10_000_000;
/// Characters of a route's system prompt.
pub const SYSTEM_PROMPT_MAX_CHARS: usize = 65_536;
/// Longest capability tag.
pub const CAPABILITY_MAX_LEN: usize = 32;

/// Every route a chat service offers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutesFile {
    /// Alias used when a request names no route; unset means `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_route: Option<String>,
    pub routes: Vec<ModelRouteSpec>,
    /// Content policies for users of some cohorts, on every route (the
    /// operator copies them from `ChatDeployment.spec.cohortPolicies`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cohort_policies: Vec<CohortPolicy>,
}

impl RoutesFile {
    /// Parses a routes document, rejecting unknown fields. Parsing does not
    /// validate: call [`RoutesFile::validate`] before using the routes.
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        serde_yaml::from_str(text).map_err(Error::RoutesYaml)
    }

    pub fn to_yaml(&self) -> Result<String, Error> {
        serde_yaml::to_string(self).map_err(Error::RoutesYaml)
    }

    /// The alias requests without a route get.
    pub fn default_alias(&self) -> &str {
        self.default_route
            .as_deref()
            .unwrap_or(IMPLICIT_DEFAULT_ROUTE)
    }

    pub fn route(&self, alias: &str) -> Option<&ModelRouteSpec> {
        self.routes.iter().find(|route| route.alias == alias)
    }

    /// Checks every route and the file as a whole, reporting every problem.
    pub fn validate(&self) -> Result<(), RouteProblems> {
        let mut problems = Vec::new();
        let mut first_index_of_alias: HashMap<&str, usize> = HashMap::new();
        for (index, route) in self.routes.iter().enumerate() {
            let path = format!("routes[{index}]");
            route.collect_problems(&path, &mut problems);
            if let Some(first) = first_index_of_alias.insert(&route.alias, index) {
                first_index_of_alias.insert(&route.alias, first);
                problems.push(RouteProblem::new(
                    format!("{path}.alias"),
                    ProblemKind::DuplicateAlias,
                    format!("alias `{}` is already used by routes[{first}]", route.alias),
                ));
            }
        }
        collect_cohort_policy_problems(&self.cohort_policies, "cohortPolicies", &mut problems);
        if let Some(default) = &self.default_route
            && !first_index_of_alias.contains_key(default.as_str())
        {
            problems.push(RouteProblem::new(
                "defaultRoute".to_owned(),
                ProblemKind::UnknownDefaultRoute,
                format!("default route `{default}` is not one of the routes"),
            ));
        }
        RouteProblems::result(problems)
    }
}

impl ModelRouteSpec {
    /// Checks this route on its own (alias uniqueness needs the other routes:
    /// see [`RoutesFile::validate`]).
    pub fn validate(&self) -> Result<(), RouteProblems> {
        let mut problems = Vec::new();
        self.collect_problems("spec", &mut problems);
        RouteProblems::result(problems)
    }

    /// Providers this route's targets use.
    pub fn providers(&self) -> impl Iterator<Item = Provider> + '_ {
        self.targets.iter().map(|target| target.provider)
    }

    fn collect_problems(&self, path: &str, problems: &mut Vec<RouteProblem>) {
        if let Some(policy) = &self.content_policy {
            collect_rule_problems(&policy.rules, &format!("{path}.contentPolicy"), problems);
        }
        let mut push = |field: String, kind, message: String| {
            problems.push(RouteProblem::new(field, kind, message));
        };
        for (index, tag) in self.capabilities.iter().enumerate() {
            if !is_valid_tag(tag) {
                push(
                    format!("{path}.capabilities[{index}]"),
                    ProblemKind::InvalidCapability,
                    format!(
                        "capability `{tag}` must be 1-{CAPABILITY_MAX_LEN} lowercase letters, \
                         digits or `-`"
                    ),
                );
            }
        }
        if !is_valid_name(&self.alias) {
            push(
                format!("{path}.alias"),
                ProblemKind::InvalidAlias,
                format!(
                    "alias `{}` must be 1-{ALIAS_MAX_LEN} lowercase letters, digits, `.`, `_` \
                     or `-`, starting and ending with a letter or digit",
                    self.alias
                ),
            );
        }
        if self.allowed_roles.is_empty() {
            push(
                format!("{path}.allowedRoles"),
                ProblemKind::NoAllowedRoles,
                "allowedRoles is empty, so nobody could use the route; omit it to allow every role"
                    .to_owned(),
            );
        }
        if self.targets.is_empty() {
            push(
                format!("{path}.targets"),
                ProblemKind::EmptyChain,
                "the route has no targets; list at least one".to_owned(),
            );
        }
        if let Some(system_prompt) = &self.system_prompt
            && (system_prompt.trim().is_empty()
                || system_prompt.chars().count() > SYSTEM_PROMPT_MAX_CHARS)
        {
            push(
                format!("{path}.systemPrompt"),
                ProblemKind::LimitOutOfRange,
                format!(
                    "systemPrompt must be 1-{SYSTEM_PROMPT_MAX_CHARS} characters, not blank; \
                     omit it for none"
                ),
            );
        }
        let mut seen_targets = HashSet::new();
        for (index, target) in self.targets.iter().enumerate() {
            let target_path = format!("{path}.targets[{index}]");
            if target.model.trim().is_empty() {
                push(
                    format!("{target_path}.model"),
                    ProblemKind::EmptyModel,
                    "model id is empty".to_owned(),
                );
            } else if !seen_targets.insert((target.provider, target.model.as_str())) {
                push(
                    target_path.clone(),
                    ProblemKind::DuplicateTarget,
                    format!(
                        "{} model `{}` appears twice in the chain",
                        target.provider.as_str(),
                        target.model
                    ),
                );
            }
            for (field, price) in [
                ("inputPer1k", target.pricing.input_per_1k),
                ("outputPer1k", target.pricing.output_per_1k),
            ] {
                if price.is_negative() {
                    push(
                        format!("{target_path}.pricing.{field}"),
                        ProblemKind::NegativePrice,
                        format!("price {price} is negative"),
                    );
                }
                if !price.is_exact() {
                    push(
                        format!("{target_path}.pricing.{field}"),
                        ProblemKind::TooPrecise,
                        "price has more than six decimal places; credits are exact to a \
                         millionth"
                            .to_owned(),
                    );
                }
            }
            if target.max_output_tokens == 0 || target.max_output_tokens > MAX_OUTPUT_TOKENS_LIMIT {
                push(
                    format!("{target_path}.maxOutputTokens"),
                    ProblemKind::LimitOutOfRange,
                    format!(
                        "maxOutputTokens {} must be between 1 and {MAX_OUTPUT_TOKENS_LIMIT}",
                        target.max_output_tokens
                    ),
                );
            }
            // The window holds the prompt and the reply: one no larger than
            // the reply's maximum could never take a message.
            if let Some(context_tokens) = target.context_tokens
                && (context_tokens <= target.max_output_tokens
                    || context_tokens > CONTEXT_TOKENS_LIMIT)
            {
                push(
                    format!("{target_path}.contextTokens"),
                    ProblemKind::LimitOutOfRange,
                    format!(
                        "contextTokens {context_tokens} must be more than maxOutputTokens ({}) \
                         and at most {CONTEXT_TOKENS_LIMIT}",
                        target.max_output_tokens
                    ),
                );
            }
            // The system prompt goes with every reply: with the reply's
            // maximum output it must leave some room in the window for the
            // message (a window no larger than the output is reported above).
            if let Some(system_prompt) = &self.system_prompt
                && target.context_tokens() > target.max_output_tokens
            {
                let prompt_tokens = estimate_tokens(system_prompt).saturating_add(TOKENS_PER_TURN);
                let needed = prompt_tokens.saturating_add(target.max_output_tokens);
                let window = target.context_tokens();
                if needed >= window {
                    push(
                        format!("{path}.systemPrompt"),
                        ProblemKind::LimitOutOfRange,
                        format!(
                            "the system prompt (about {prompt_tokens} tokens) and maxOutputTokens \
                             ({}) leave no room for a message in the context window of \
                             targets[{index}] ({window} tokens); shorten the prompt, lower \
                             maxOutputTokens or raise contextTokens",
                            target.max_output_tokens
                        ),
                    );
                }
            }
            if target.timeout_seconds == 0 || target.timeout_seconds > TIMEOUT_SECONDS_LIMIT {
                push(
                    format!("{target_path}.timeoutSeconds"),
                    ProblemKind::LimitOutOfRange,
                    format!(
                        "timeoutSeconds {} must be between 1 and {TIMEOUT_SECONDS_LIMIT}",
                        target.timeout_seconds
                    ),
                );
            }
            let breaker = &target.circuit_breaker;
            for (field, value, max) in [
                (
                    "failureThreshold",
                    breaker.failure_threshold,
                    FAILURE_THRESHOLD_LIMIT,
                ),
                (
                    "windowSeconds",
                    breaker.window_seconds,
                    TIMEOUT_SECONDS_LIMIT,
                ),
                (
                    "cooldownSeconds",
                    breaker.cooldown_seconds,
                    TIMEOUT_SECONDS_LIMIT,
                ),
            ] {
                if value == 0 || value > max {
                    push(
                        format!("{target_path}.circuitBreaker.{field}"),
                        ProblemKind::LimitOutOfRange,
                        format!("{field} {value} must be between 1 and {max}"),
                    );
                }
            }
            match (&target.guardrail_identifier, &target.guardrail_version) {
                (None, None) => {}
                (Some(_), Some(_)) if target.provider == Provider::Bedrock => {}
                (Some(_), Some(_)) => push(
                    format!("{target_path}.guardrailIdentifier"),
                    ProblemKind::InvalidGuardrail,
                    format!(
                        "guardrails are Bedrock's; this target's provider is {}",
                        target.provider.as_str()
                    ),
                ),
                _ => push(
                    format!("{target_path}.guardrailIdentifier"),
                    ProblemKind::InvalidGuardrail,
                    "set both guardrailIdentifier and guardrailVersion (e.g. `1` or `DRAFT`)"
                        .to_owned(),
                ),
            }
        }
    }
}

/// Problems of cohort policies (at `path`, e.g. `spec.cohortPolicies`).
pub fn collect_cohort_policy_problems(
    policies: &[CohortPolicy],
    path: &str,
    problems: &mut Vec<RouteProblem>,
) {
    for (index, policy) in policies.iter().enumerate() {
        let policy_path = format!("{path}[{index}]");
        if policy.cohorts.is_empty() || policy.cohorts.iter().any(|c| c.trim().is_empty()) {
            problems.push(RouteProblem::new(
                format!("{policy_path}.cohorts"),
                ProblemKind::InvalidContentRule,
                "list at least one cohort, none of them empty".to_owned(),
            ));
        }
        collect_rule_problems(&policy.rules, &policy_path, problems);
    }
}

/// Capability tags: 1-32 lowercase letters, digits or `-`.
fn is_valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= CAPABILITY_MAX_LEN
        && tag
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DEFAULT_CONTEXT_TOKENS, DEFAULT_MIN_PROMPT_TOKENS, RouteLimits};

    const CONTRACT_EXAMPLE: &str = r#"
routes:
  - alias: default
    allowedRoles: [user, supervisor, admin]
    fallbackOn: [throttled, unavailable, timeout]
    downgradeWhenUnaffordable: false
    targets:
      - provider: bedrock
        model: amazon.nova-micro-v1:0
        pricing: {inputPer1k: 1, outputPer1k: 4}
        maxOutputTokens: 1024
        timeoutSeconds: 60
"#;

    #[test]
    fn parses_the_interface_contract_example() {
        let file = RoutesFile::from_yaml(CONTRACT_EXAMPLE).unwrap();
        file.validate().unwrap();
        let route = file.route("default").unwrap();
        assert_eq!(route.targets[0].provider, Provider::Bedrock);
        assert_eq!(route.targets[0].pricing.output_per_1k.micros(), 4_000_000);
        assert_eq!(file.default_alias(), "default");
        let again = RoutesFile::from_yaml(&file.to_yaml().unwrap()).unwrap();
        assert_eq!(again, file);
    }

    #[test]
    fn optional_fields_take_documented_defaults() {
        let file = RoutesFile::from_yaml(
            "routes:\n- alias: fast\n  targets:\n  - {provider: simulated, model: sim, \
             pricing: {inputPer1k: 0.5, outputPer1k: 1}, maxOutputTokens: 10}\n",
        )
        .unwrap();
        let route = &file.routes[0];
        assert_eq!(route.allowed_roles.len(), 3);
        assert_eq!(route.fallback_on.len(), 3);
        assert!(!route.downgrade_when_unaffordable);
        assert_eq!(route.targets[0].timeout_seconds, 60);
        assert_eq!(route.targets[0].context_tokens, None);
        assert_eq!(route.targets[0].context_tokens(), DEFAULT_CONTEXT_TOKENS);
        // A target that may write more keeps room for a prompt beside it.
        let mut wordy = route.targets[0].clone();
        wordy.max_output_tokens = 6000;
        assert_eq!(wordy.context_tokens(), 6000 + DEFAULT_MIN_PROMPT_TOKENS);
        assert_eq!(route.system_prompt, None);
        assert_eq!(route.limits, None);
        // Written back without the optional fields: files without them stay
        // as they were.
        let written = file.to_yaml().unwrap();
        for field in ["limits", "contextTokens", "systemPrompt"] {
            assert!(!written.contains(field), "{written}");
        }
    }

    #[test]
    fn route_limits_default_each_field_to_unlimited() {
        let file = RoutesFile::from_yaml(
            "routes:\n- alias: fast\n  limits: {concurrentStreams: 2}\n  targets:\n  \
             - {provider: simulated, model: sim, pricing: {inputPer1k: 0.5, outputPer1k: 1}, \
             maxOutputTokens: 10}\n",
        )
        .unwrap();
        file.validate().unwrap();
        assert_eq!(
            file.routes[0].limits,
            Some(RouteLimits {
                requests_per_minute: 0,
                tokens_per_minute: 0,
                concurrent_streams: 2,
            })
        );
        let typo = file
            .to_yaml()
            .unwrap()
            .replace("concurrentStreams", "streams");
        let err = RoutesFile::from_yaml(&typo).unwrap_err().to_string();
        assert!(err.contains("unknown field `streams`"), "{err}");
    }

    #[test]
    fn rejects_unknown_fields_and_providers() {
        let typo = CONTRACT_EXAMPLE.replace("fallbackOn", "fallbackOnn");
        let err = RoutesFile::from_yaml(&typo).unwrap_err().to_string();
        assert!(err.contains("fallbackOnn"), "{err}");
        let typo = CONTRACT_EXAMPLE.replace("maxOutputTokens", "maxTokens");
        assert!(RoutesFile::from_yaml(&typo).is_err());
        let provider = CONTRACT_EXAMPLE.replace("provider: bedrock", "provider: gemini");
        let err = RoutesFile::from_yaml(&provider).unwrap_err().to_string();
        assert!(err.contains("gemini"), "{err}");
    }

    #[test]
    fn validate_reports_every_problem_with_its_path() {
        let text = r#"
defaultRoute: missing
routes:
  - alias: default
    allowedRoles: []
    targets: []
  - alias: default
    targets:
      - {provider: openai, model: m, pricing: {inputPer1k: -1, outputPer1k: 0}, maxOutputTokens: 0}
      - {provider: openai, model: m, pricing: {inputPer1k: 1, outputPer1k: -0.5}, maxOutputTokens: 5, timeoutSeconds: 0}
      - {provider: simulated, model: " ", pricing: {inputPer1k: 0.0000005, outputPer1k: 1}, maxOutputTokens: 5}
  - alias: Bad_Alias
    targets:
      - {provider: simulated, model: s, pricing: {inputPer1k: 1, outputPer1k: 1}, maxOutputTokens: 2000000}
"#;
        let problems = RoutesFile::from_yaml(text).unwrap().validate().unwrap_err();
        let found: Vec<(&str, ProblemKind)> = problems
            .0
            .iter()
            .map(|problem| (problem.path.as_str(), problem.kind))
            .collect();
        assert_eq!(
            found,
            vec![
                ("routes[0].allowedRoles", ProblemKind::NoAllowedRoles),
                ("routes[0].targets", ProblemKind::EmptyChain),
                (
                    "routes[1].targets[0].pricing.inputPer1k",
                    ProblemKind::NegativePrice
                ),
                (
                    "routes[1].targets[0].maxOutputTokens",
                    ProblemKind::LimitOutOfRange
                ),
                ("routes[1].targets[1]", ProblemKind::DuplicateTarget),
                (
                    "routes[1].targets[1].pricing.outputPer1k",
                    ProblemKind::NegativePrice
                ),
                (
                    "routes[1].targets[1].timeoutSeconds",
                    ProblemKind::LimitOutOfRange
                ),
                ("routes[1].targets[2].model", ProblemKind::EmptyModel),
                (
                    "routes[1].targets[2].pricing.inputPer1k",
                    ProblemKind::TooPrecise
                ),
                ("routes[1].alias", ProblemKind::DuplicateAlias),
                ("routes[2].alias", ProblemKind::InvalidAlias),
                (
                    "routes[2].targets[0].maxOutputTokens",
                    ProblemKind::LimitOutOfRange
                ),
                ("defaultRoute", ProblemKind::UnknownDefaultRoute),
            ]
        );
        assert_eq!(problems.reason(), "NoAllowedRoles");
        let message = problems.to_string();
        assert!(message.contains("routes[1].targets[0].pricing.inputPer1k: price -1 is negative"));
        assert!(message.contains("alias `default` is already used by routes[0]"));
    }

    #[test]
    fn policies_breakers_capabilities_and_guardrails_are_validated() {
        let text = r#"
cohortPolicies:
  - cohorts: [grade-5]
    rules:
      - {name: profanity, words: [heck], action: mask}
      - {name: profanity, pattern: '('}
  - cohorts: []
    rules:
      - {name: long, maxLength: 10}
routes:
  - alias: default
    capabilities: [fast, Long Context]
    contentPolicy:
      rules:
        - {name: ssn, pattern: '\d{3}-\d{2}-\d{4}', action: mask}
        - {name: digits, pattern: '\d+'}
    targets:
      - provider: bedrock
        model: m
        pricing: {inputPer1k: 1, outputPer1k: 1}
        maxOutputTokens: 5
        guardrailIdentifier: gr-1
        circuitBreaker: {failureThreshold: 0, cooldownSeconds: 10}
      - provider: simulated
        model: s
        pricing: {inputPer1k: 1, outputPer1k: 1}
        maxOutputTokens: 5
        guardrailIdentifier: gr-1
        guardrailVersion: "1"
"#;
        let file = RoutesFile::from_yaml(text).unwrap();
        let breaker = file.routes[0].targets[0].circuit_breaker;
        assert_eq!(
            (
                breaker.enabled,
                breaker.window_seconds,
                breaker.cooldown_seconds
            ),
            (true, 60, 10)
        );
        let problems = file.validate().unwrap_err();
        let found: Vec<(&str, ProblemKind)> = problems
            .0
            .iter()
            .map(|problem| (problem.path.as_str(), problem.kind))
            .collect();
        assert_eq!(
            found,
            vec![
                (
                    "routes[0].contentPolicy.rules[1]",
                    ProblemKind::InvalidPattern
                ),
                ("routes[0].capabilities[1]", ProblemKind::InvalidCapability),
                (
                    "routes[0].targets[0].circuitBreaker.failureThreshold",
                    ProblemKind::LimitOutOfRange
                ),
                (
                    "routes[0].targets[0].guardrailIdentifier",
                    ProblemKind::InvalidGuardrail
                ),
                (
                    "routes[0].targets[1].guardrailIdentifier",
                    ProblemKind::InvalidGuardrail
                ),
                (
                    "cohortPolicies[0].rules[1].name",
                    ProblemKind::InvalidContentRule
                ),
                ("cohortPolicies[0].rules[1]", ProblemKind::InvalidPattern),
                ("cohortPolicies[1].cohorts", ProblemKind::InvalidContentRule),
            ]
        );
        // Defaults are not written back, so files without breakers stay as they were.
        let plain = RoutesFile::from_yaml(CONTRACT_EXAMPLE).unwrap();
        let written = plain.to_yaml().unwrap();
        for absent in [
            "circuitBreaker",
            "capabilities",
            "contentPolicy",
            "cohortPolicies",
        ] {
            assert!(!written.contains(absent), "{written}");
        }
    }

    #[test]
    fn a_system_prompt_must_leave_room_for_a_message_in_every_window() {
        // 400 bytes: 100 tokens, 104 with its turn; with 100 of output that
        // is 204, so a window of 204 has no room left for any message.
        let route = |window: u32| {
            format!(
                "routes:\n  - alias: default\n    systemPrompt: {}\n    targets:\n      \
                 - {{provider: openai, model: a, pricing: {{inputPer1k: 1, outputPer1k: 1}}, \
                 maxOutputTokens: 100, contextTokens: {window}}}\n",
                "x".repeat(400)
            )
        };
        RoutesFile::from_yaml(&route(209))
            .unwrap()
            .validate()
            .unwrap();
        let problems = RoutesFile::from_yaml(&route(204))
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(problems.0.len(), 1, "{problems}");
        assert_eq!(problems.0[0].path, "routes[0].systemPrompt");
        assert!(
            problems.0[0]
                .message
                .contains("about 104 tokens) and maxOutputTokens (100) leave no room"),
            "{problems}"
        );
    }

    #[test]
    fn context_windows_and_system_prompts_are_read_and_checked() {
        let text = r#"
routes:
  - alias: default
    systemPrompt: "You are terse."
    targets:
      - {provider: openai, model: a, pricing: {inputPer1k: 1, outputPer1k: 1}, maxOutputTokens: 100, contextTokens: 4096}
      - {provider: openai, model: b, pricing: {inputPer1k: 1, outputPer1k: 1}, maxOutputTokens: 100, contextTokens: 100}
      - {provider: openai, model: c, pricing: {inputPer1k: 1, outputPer1k: 1}, maxOutputTokens: 100, contextTokens: 10000001}
  - alias: blank
    systemPrompt: "  "
    targets:
      - {provider: simulated, model: s, pricing: {inputPer1k: 1, outputPer1k: 1}, maxOutputTokens: 10}
"#;
        let file = RoutesFile::from_yaml(text).unwrap();
        assert_eq!(
            file.routes[0].system_prompt.as_deref(),
            Some("You are terse.")
        );
        assert_eq!(file.routes[0].targets[0].context_tokens(), 4096);
        let again = RoutesFile::from_yaml(&file.to_yaml().unwrap()).unwrap();
        assert_eq!(again, file);
        let problems = file.validate().unwrap_err();
        let found: Vec<&str> = problems.0.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            found,
            [
                "routes[0].targets[1].contextTokens",
                "routes[0].targets[2].contextTokens",
                "routes[1].systemPrompt",
            ]
        );
        assert!(
            problems
                .0
                .iter()
                .all(|p| p.kind == ProblemKind::LimitOutOfRange),
            "{problems}"
        );
        assert!(
            problems
                .to_string()
                .contains("must be more than maxOutputTokens (100)"),
            "{problems}"
        );
    }

    #[test]
    fn alias_rules() {
        for good in ["default", "fast", "a", "gpt-4.1", "x_y", "0"] {
            assert!(is_valid_name(good), "{good}");
        }
        let too_long = "a".repeat(ALIAS_MAX_LEN + 1);
        for bad in ["", "-a", "a-", "A", "a b", too_long.as_str()] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }
}
