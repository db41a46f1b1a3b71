//! Which route to recommend for a task: the best one the caller may use and
//! can afford now.
//!
//! Candidates are the routes the caller's role may use whose answering
//! target's worst case (the message's input plus the target's maximum
//! output, at its price) fits the caller's available credits (balance minus
//! open holds). The answering target is the first one whose breaker is not
//! open — or, on a route that downgrades when unaffordable, the first such
//! one the caller can afford. Candidates are ranked by, in order:
//!
//! 1. the task: routes with a capability equal to the task, or to one of its
//!    words, first;
//! 2. health: routes whose first target's breaker is closed first;
//! 3. the priority: `cost` — the lowest worst case; `speed` — routes tagged
//!    `fast` first, then the lowest worst case; `quality` — the highest worst
//!    case (price stands for model size);
//! 4. the deployment's default route, then the alias.

use parley_crds::ModelRouteSpec;

use crate::ledger::Credits;

/// What the caller cares about most.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum Priority {
    #[default]
    Cost,
    Speed,
    Quality,
}

/// The capability tag `speed` prefers.
pub const FAST_TAG: &str = "fast";

/// A route the caller may use, as it stands now.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub route: &'a ModelRouteSpec,
    /// The target that would answer, and its worst case; `None` when the
    /// caller cannot afford any target that would answer.
    pub answering: Option<(usize, Credits)>,
    /// The route's first target is skipped now (its breaker is open).
    pub primary_open: bool,
    pub is_default: bool,
}

/// The recommended route and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recommendation {
    pub alias: String,
    pub model: String,
    pub worst_case: Credits,
    pub reason: String,
}

/// Whether `route` has a capability equal to `task` or to one of its words.
pub fn matches_task(route: &ModelRouteSpec, task: &str) -> bool {
    let task = task.trim().to_lowercase();
    if task.is_empty() {
        return false;
    }
    let words: Vec<&str> = task
        .split(|c: char| !(c.is_alphanumeric() || c == '-'))
        .filter(|word| !word.is_empty())
        .collect();
    route
        .capabilities
        .iter()
        .any(|tag| *tag == task || words.contains(&tag.as_str()))
}

/// The best affordable candidate, or `None` when none is affordable.
pub fn recommend(
    candidates: &[Candidate<'_>],
    task: &str,
    priority: Priority,
    available: Credits,
) -> Option<Recommendation> {
    let affordable: Vec<(&Candidate<'_>, usize, Credits)> = candidates
        .iter()
        .filter_map(|c| c.answering.map(|(index, cost)| (c, index, cost)))
        .collect();
    let (best, index, worst_case) = affordable.iter().copied().min_by(|a, b| {
        let key = |(candidate, _, cost): &(&Candidate<'_>, usize, Credits)| {
            let fast = candidate.route.capabilities.iter().any(|t| t == FAST_TAG);
            (
                !matches_task(candidate.route, task),
                candidate.primary_open,
                match priority {
                    Priority::Cost | Priority::Quality => false,
                    Priority::Speed => !fast,
                },
                match priority {
                    Priority::Quality => -i128::from(cost.micros()),
                    Priority::Cost | Priority::Speed => i128::from(cost.micros()),
                },
                !candidate.is_default,
                candidate.route.alias.clone(),
            )
        };
        key(a).cmp(&key(b))
    })?;
    let model = best.route.targets.get(index)?.model.clone();
    let mut reasons = Vec::new();
    if matches_task(best.route, task) {
        reasons.push(format!("its capabilities match the task `{}`", task.trim()));
    } else if !task.trim().is_empty() {
        reasons.push(format!(
            "no route you may use lists the task `{}` among its capabilities",
            task.trim()
        ));
    }
    reasons.push(match priority {
        Priority::Cost => "it is the cheapest that fits".to_owned(),
        Priority::Speed => {
            if best.route.capabilities.iter().any(|t| t == FAST_TAG) {
                "it is tagged `fast`".to_owned()
            } else {
                "no route that fits is tagged `fast`; it is the cheapest".to_owned()
            }
        }
        Priority::Quality => "it is the most capable (dearest) that fits".to_owned(),
    });
    if best.primary_open {
        reasons.push(format!(
            "its first target is unavailable for now, so {model} answers"
        ));
    }
    reasons.push(format!(
        "a reply costs at most {worst_case} of your {available} available credits"
    ));
    Some(Recommendation {
        alias: best.route.alias.clone(),
        model,
        worst_case,
        reason: format!("{}: {}.", best.route.alias, reasons.join("; ")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Vec<ModelRouteSpec> {
        let file = parley_crds::RoutesFile::from_yaml(
            "routes:
  - alias: default
    capabilities: [chat]
    targets: [{provider: simulated, model: small, pricing: {inputPer1k: 1, outputPer1k: 1}, maxOutputTokens: 1000}]
  - alias: coder
    capabilities: [code, long-context]
    targets: [{provider: simulated, model: big, pricing: {inputPer1k: 1, outputPer1k: 10}, maxOutputTokens: 1000}]
  - alias: quick
    capabilities: [fast, chat, code]
    targets: [{provider: simulated, model: tiny, pricing: {inputPer1k: 1, outputPer1k: 2}, maxOutputTokens: 1000}]
",
        )
        .unwrap();
        file.routes
    }

    fn candidates(routes: &[ModelRouteSpec], available: u64) -> Vec<Candidate<'_>> {
        routes
            .iter()
            .map(|route| {
                let cost = route.targets[0].pricing.cost(0, 1000).unwrap();
                Candidate {
                    route,
                    answering: {
                        let micros = u64::try_from(cost.micros()).unwrap();
                        (micros <= available * 1_000_000)
                            .then_some((0, Credits::from_micros(micros)))
                    },
                    primary_open: false,
                    is_default: route.alias == "default",
                }
            })
            .collect()
    }

    fn pick(available: u64, task: &str, priority: Priority) -> Option<String> {
        let routes = routes();
        let candidates = candidates(&routes, available);
        recommend(
            &candidates,
            task,
            priority,
            Credits::from_micros(available * 1_000_000),
        )
        .map(|r| r.alias)
    }

    #[test]
    fn the_task_comes_first_then_the_priority_among_what_is_affordable() {
        assert_eq!(
            pick(100, "code", Priority::Quality).as_deref(),
            Some("coder")
        );
        assert_eq!(pick(100, "code", Priority::Cost).as_deref(), Some("quick"));
        assert_eq!(
            pick(100, "write some code", Priority::Speed).as_deref(),
            Some("quick")
        );
        assert_eq!(
            pick(100, "chat", Priority::Cost).as_deref(),
            Some("default")
        );
        // Unaffordable routes are never recommended, whatever the task.
        assert_eq!(pick(5, "code", Priority::Quality).as_deref(), Some("quick"));
        assert_eq!(pick(0, "chat", Priority::Cost), None);
        // No route lists the task: the priority alone decides.
        assert_eq!(
            pick(100, "poetry", Priority::Quality).as_deref(),
            Some("coder")
        );
    }

    #[test]
    fn a_route_whose_first_target_is_open_comes_after_healthy_ones() {
        let routes = routes();
        let mut candidates = candidates(&routes, 100);
        candidates[2].primary_open = true;
        let best = recommend(
            &candidates,
            "code",
            Priority::Cost,
            Credits::from_micros(100_000_000),
        )
        .unwrap();
        assert_eq!(best.alias, "coder");
        assert!(
            best.reason.contains("match the task `code`"),
            "{}",
            best.reason
        );
        assert!(
            best.reason.contains("at most 10 of your 100"),
            "{}",
            best.reason
        );
    }
}
