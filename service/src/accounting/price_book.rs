//! Prices of the models a deployment serves, by route alias or model id.
//!
//! Filled from a plain list of [`RoutePrice`]s: today the built-in `default`
//! route (simulated model); later the routes file, one entry per route.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::Error;
use crate::ledger::{Credits, LedgerError, Pricing};

/// The built-in route when no routes file is configured.
pub const DEFAULT_ROUTE: &str = "default";
/// Model id of the built-in simulated model.
pub const SIMULATED_MODEL: &str = "simulated";

/// The price of one route: its first target's model, price and output cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePrice {
    /// What clients ask for (`default`, `fast`).
    pub alias: String,
    pub model: String,
    pub pricing: Pricing,
    pub max_output_tokens: u64,
}

impl RoutePrice {
    /// The built-in `default` route on the simulated model: 1 credit per 1k
    /// input tokens, 2 per 1k output tokens, at most 1024 output tokens.
    pub fn builtin_default() -> Self {
        RoutePrice {
            alias: DEFAULT_ROUTE.to_owned(),
            model: SIMULATED_MODEL.to_owned(),
            pricing: Pricing {
                input_per_1k: Credits::from_micros(1_000_000),
                output_per_1k: Credits::from_micros(2_000_000),
            },
            max_output_tokens: 1024,
        }
    }

    /// The most a request with `input_tokens` may cost: the hold.
    pub fn worst_case(&self, input_tokens: u64) -> Result<Credits, LedgerError> {
        self.pricing
            .worst_case(input_tokens, self.max_output_tokens)
    }
}

/// Route aliases and model ids to their prices.
#[derive(Debug, Clone)]
pub struct PriceBook {
    by_name: HashMap<String, Arc<RoutePrice>>,
    /// Every accepted name, sorted, for `UNKNOWN_MODEL` answers.
    names: Vec<String>,
}

impl PriceBook {
    /// Aliases win over model ids; among routes sharing a model id, the
    /// first listed prices it.
    pub fn new(routes: impl IntoIterator<Item = RoutePrice>) -> Self {
        let routes: Vec<Arc<RoutePrice>> = routes.into_iter().map(Arc::new).collect();
        let mut by_name = HashMap::with_capacity(routes.len() * 2);
        for route in &routes {
            by_name.insert(route.alias.clone(), Arc::clone(route));
        }
        for route in &routes {
            by_name
                .entry(route.model.clone())
                .or_insert_with(|| Arc::clone(route));
        }
        let mut names: Vec<String> = by_name.keys().cloned().collect();
        names.sort_unstable();
        PriceBook { by_name, names }
    }

    /// The built-in book: the `default` route on the simulated model.
    pub fn builtin() -> Self {
        PriceBook::new([RoutePrice::builtin_default()])
    }

    pub fn lookup(&self, name: &str) -> Result<&Arc<RoutePrice>, Error> {
        self.by_name.get(name).ok_or_else(|| Error::UnknownModel {
            model: name.to_owned(),
            allowed: self.names.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_and_model_ids_resolve_and_unknown_names_list_the_allowed() {
        let fast = RoutePrice {
            alias: "fast".into(),
            model: "amazon.nova-micro-v1:0".into(),
            pricing: Pricing {
                input_per_1k: Credits::from_micros(500_000),
                output_per_1k: Credits::from_micros(1_500_000),
            },
            max_output_tokens: 1000,
        };
        let book = PriceBook::new([RoutePrice::builtin_default(), fast.clone()]);
        assert_eq!(book.lookup("fast").unwrap().as_ref(), &fast);
        assert_eq!(book.lookup("amazon.nova-micro-v1:0").unwrap().alias, "fast");
        assert_eq!(book.lookup("simulated").unwrap().alias, "default");
        // 9 input tokens at 0.5/1k plus 1000 output tokens at 1.5/1k.
        assert_eq!(
            book.lookup("fast").unwrap().worst_case(9).unwrap(),
            Credits::from_micros(1_504_500)
        );
        let Err(Error::UnknownModel { model, allowed }) = book.lookup("gpt-9") else {
            panic!("unknown model accepted");
        };
        assert_eq!(model, "gpt-9");
        assert_eq!(
            allowed,
            ["amazon.nova-micro-v1:0", "default", "fast", "simulated"]
        );
    }
}
