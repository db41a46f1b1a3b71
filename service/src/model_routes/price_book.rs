//! Prices of the routes a deployment serves, by route alias or model id.
//!
//! Built from each routes snapshot (the routes file or ConfigMap), so the
//! prices the accounting API quotes, holds and charges are the prices of the
//! targets that answer replies, reloaded with them.

use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};
use parley_crds::{ModelRouteSpec, Pricing, RouteTarget};

use crate::error::Error;
use crate::ledger::{Credits, LedgerError, price};

/// The price of one target of one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePrice {
    /// What clients ask for (`default`, `fast`).
    pub alias: String,
    pub model: String,
    pub pricing: Pricing,
    pub max_output_tokens: u64,
}

impl RoutePrice {
    pub fn of(route: &ModelRouteSpec, target: &RouteTarget) -> Self {
        RoutePrice {
            alias: route.alias.clone(),
            model: target.model.clone(),
            pricing: target.pricing,
            max_output_tokens: u64::from(target.max_output_tokens),
        }
    }

    /// The most a request with `input_tokens` may cost: the hold. A request
    /// asking for at most `max_output_tokens` is held for the smaller of that
    /// and the target's maximum.
    pub fn worst_case(
        &self,
        input_tokens: u64,
        max_output_tokens: Option<u64>,
    ) -> Result<Credits, LedgerError> {
        let output_tokens = max_output_tokens.map_or(self.max_output_tokens, |asked| {
            asked.min(self.max_output_tokens)
        });
        self.cost(input_tokens, output_tokens)
    }

    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> Result<Credits, LedgerError> {
        price(&self.pricing, input_tokens, output_tokens)
    }
}

/// Route aliases and model ids to their prices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceBook {
    /// An alias prices its first target; a model id its first listing.
    by_name: HashMap<String, Arc<RoutePrice>>,
    /// Every target of every route, by (alias, model).
    by_target: HashMap<(String, String), Arc<RoutePrice>>,
    /// Every accepted name, sorted, for `UNKNOWN_MODEL` answers.
    names: Vec<String>,
}

impl PriceBook {
    /// Aliases win over model ids; among routes sharing a model id, the
    /// first listed prices it.
    pub fn new<'a>(routes: impl IntoIterator<Item = &'a ModelRouteSpec>) -> Self {
        let mut by_target = HashMap::new();
        let mut firsts = Vec::new();
        let mut listings = Vec::new();
        for route in routes {
            for (index, target) in route.targets.iter().enumerate() {
                let entry = Arc::new(RoutePrice::of(route, target));
                by_target
                    .entry((route.alias.clone(), target.model.clone()))
                    .or_insert_with(|| Arc::clone(&entry));
                if index == 0 {
                    firsts.push(Arc::clone(&entry));
                }
                listings.push(entry);
            }
        }
        let mut by_name = HashMap::with_capacity(firsts.len() + listings.len());
        for entry in firsts {
            by_name.insert(entry.alias.clone(), entry);
        }
        for entry in listings {
            by_name.entry(entry.model.clone()).or_insert(entry);
        }
        let mut names: Vec<String> = by_name.keys().cloned().collect();
        names.sort_unstable();
        PriceBook {
            by_name,
            by_target,
            names,
        }
    }

    /// A route alias (its first target) or a model id.
    pub fn lookup(&self, name: &str) -> Result<&Arc<RoutePrice>, Error> {
        self.by_name.get(name).ok_or_else(|| self.unknown(name))
    }

    /// `model` as a target of route `alias` (a fallback is priced as its
    /// own route lists it, not as another route might).
    pub fn lookup_target(&self, alias: &str, model: &str) -> Result<&Arc<RoutePrice>, Error> {
        self.by_target
            .get(&(alias.to_owned(), model.to_owned()))
            .ok_or_else(|| self.unknown(model))
    }

    fn unknown(&self, name: &str) -> Error {
        Error::UnknownModel {
            model: name.to_owned(),
            allowed: self.names.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use parley_crds::{Credits as Price, Provider};

    use super::*;

    fn target(model: &str, input: i64, output: i64) -> RouteTarget {
        RouteTarget {
            provider: Provider::Simulated,
            model: model.into(),
            pricing: Pricing {
                input_per_1k: Price::from_micros(input),
                output_per_1k: Price::from_micros(output),
            },
            max_output_tokens: 1000,
            timeout_seconds: 60,
            circuit_breaker: parley_crds::CircuitBreaker::default(),
            guardrail_identifier: None,
            guardrail_version: None,
            context_tokens: None,
        }
    }

    fn route(alias: &str, targets: Vec<RouteTarget>) -> ModelRouteSpec {
        ModelRouteSpec {
            alias: alias.into(),
            allowed_roles: parley_crds::Role::all(),
            fallback_on: Vec::new(),
            downgrade_when_unaffordable: false,
            limits: None,
            targets,
            capabilities: Vec::new(),
            content_policy: None,
            system_prompt: None,
        }
    }

    #[test]
    fn aliases_model_ids_and_targets_resolve_and_unknown_names_list_the_allowed() {
        let routes = [
            route(
                "smart",
                vec![
                    target("big", 3_000_000, 15_000_000),
                    target("nova", 800_000, 3_200_000),
                ],
            ),
            route("fast", vec![target("nova", 500_000, 1_500_000)]),
        ];
        let book = PriceBook::new(&routes);
        assert_eq!(book.lookup("smart").unwrap().model, "big");
        assert_eq!(book.lookup("fast").unwrap().model, "nova");
        // A model id prices as its first listing; a target as its route lists it.
        assert_eq!(book.lookup("nova").unwrap().alias, "smart");
        let fast_nova = book.lookup_target("fast", "nova").unwrap();
        assert_eq!(fast_nova.pricing.input_per_1k, Price::from_micros(500_000));
        // 9 input tokens at 0.5/1k plus 1000 output tokens at 1.5/1k.
        assert_eq!(
            fast_nova.worst_case(9, None).unwrap(),
            Credits::from_micros(1_504_500)
        );
        // Asking for fewer output tokens holds less; asking for more, no more.
        assert_eq!(
            fast_nova.worst_case(9, Some(10)).unwrap(),
            Credits::from_micros(19_500)
        );
        assert_eq!(
            fast_nova.worst_case(9, Some(5000)).unwrap(),
            Credits::from_micros(1_504_500)
        );
        assert!(book.lookup_target("fast", "big").is_err());
        let Err(Error::UnknownModel { model, allowed }) = book.lookup("gpt-9") else {
            panic!("unknown model accepted");
        };
        assert_eq!(model, "gpt-9");
        assert_eq!(allowed, ["big", "fast", "nova", "smart"]);
    }
}
