//! Content rules compiled once per routes snapshot, and the rules that apply
//! to one reply: its route's policy and the policies of the user's cohorts.

use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};
use parley_crds::{ContentRule, RoutesFile, RuleAction, RuleDirection, RuleMatcher};
use regex::Regex;

use super::prefix::PrefixDfa;

/// What a user is told when a rule without a `reason` blocks.
const DEFAULT_REASON: &str = "this content is not allowed here";

/// Where a rule comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleSource {
    /// The route's `contentPolicy`.
    Route,
    /// A cohort policy of the deployment.
    Cohort,
}

/// A rule's test, ready to run.
#[derive(Debug)]
pub enum RuleTest {
    /// `words` or `pattern`; `prefix` is there when the rule applies to
    /// replies, which are checked as they stream.
    Pattern {
        regex: Regex,
        prefix: Option<Box<PrefixDfa>>,
    },
    /// `maxLength`, in characters.
    MaxLength(usize),
}

#[derive(Debug)]
pub struct CompiledRule {
    pub name: String,
    pub source: RuleSource,
    pub action: RuleAction,
    pub direction: RuleDirection,
    /// What a blocked user is told.
    pub reason: String,
    pub test: RuleTest,
}

impl CompiledRule {
    fn compile(rule: &ContentRule, source: RuleSource) -> Result<Self, String> {
        let test = match rule.matcher().map_err(|(_, message)| message)? {
            RuleMatcher::MaxLength(max) => RuleTest::MaxLength(max),
            RuleMatcher::Pattern { regex, .. } => {
                let prefix = if rule.direction.covers_output() {
                    Some(Box::new(PrefixDfa::new(regex.as_str())?))
                } else {
                    None
                };
                RuleTest::Pattern { regex, prefix }
            }
        };
        Ok(Self {
            name: rule.name.clone(),
            source,
            action: rule.action,
            direction: rule.direction,
            reason: rule
                .reason
                .clone()
                .unwrap_or_else(|| DEFAULT_REASON.to_owned()),
            test,
        })
    }
}

type Rules = Arc<[Arc<CompiledRule>]>;

fn compile_all(rules: &[ContentRule], source: RuleSource) -> Result<Rules, String> {
    rules
        .iter()
        .map(|rule| {
            CompiledRule::compile(rule, source)
                .map(Arc::new)
                .map_err(|error| format!("rule `{}`: {error}", rule.name))
        })
        .collect()
}

/// Every policy of a routes snapshot, compiled.
#[derive(Debug, Default)]
pub struct PolicyBook {
    by_route: HashMap<String, Rules>,
    cohorts: Vec<(Vec<String>, Rules)>,
}

impl PolicyBook {
    /// Compiles the policies of a validated routes file.
    pub fn compile(file: &RoutesFile) -> Result<Self, String> {
        let mut by_route = HashMap::new();
        for route in &file.routes {
            if let Some(policy) = &route.content_policy {
                let rules = compile_all(&policy.rules, RuleSource::Route)
                    .map_err(|error| format!("route `{}`: {error}", route.alias))?;
                by_route.insert(route.alias.clone(), rules);
            }
        }
        let cohorts = file
            .cohort_policies
            .iter()
            .map(|policy| {
                compile_all(&policy.rules, RuleSource::Cohort)
                    .map(|rules| (policy.cohorts.clone(), rules))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { by_route, cohorts })
    }

    /// The rules of a reply on `route` for a user in `cohorts`: the route's,
    /// then those of every cohort policy naming one of the user's cohorts.
    pub fn for_reply(&self, route: &str, cohorts: &[String]) -> ReplyPolicy {
        let mut rules: Vec<Arc<CompiledRule>> = self
            .by_route
            .get(route)
            .map(|rules| rules.to_vec())
            .unwrap_or_default();
        for (policy_cohorts, policy_rules) in &self.cohorts {
            if policy_cohorts.iter().any(|cohort| cohorts.contains(cohort)) {
                rules.extend(policy_rules.iter().cloned());
            }
        }
        ReplyPolicy {
            route: route.to_owned(),
            rules: rules.into(),
        }
    }
}

/// The rules that apply to one reply.
#[derive(Debug, Clone)]
pub struct ReplyPolicy {
    pub route: String,
    pub rules: Rules,
}

impl ReplyPolicy {
    pub fn input_rules(&self) -> impl Iterator<Item = &Arc<CompiledRule>> {
        self.rules
            .iter()
            .filter(|rule| rule.direction.covers_input())
    }

    pub fn output_rules(&self) -> impl Iterator<Item = &Arc<CompiledRule>> {
        self.rules
            .iter()
            .filter(|rule| rule.direction.covers_output())
    }
}
