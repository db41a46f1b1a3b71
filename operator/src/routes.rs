//! Which ModelRoutes a ChatDeployment offers: selection, per-route
//! validation and alias uniqueness. Shared by both controllers so that the
//! `Accepted` condition of a route and the routes ConfigMap always agree.

use std::cmp::Ordering;

use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use parley_crds::{ChatDeployment, ModelRoute, ResolvedRoute, RoutesFile};

use crate::Error;

/// The label selector of a ChatDeployment's `routeSelector`.
pub fn route_selector(chat: &ChatDeployment) -> Result<Selector, Error> {
    Selector::try_from(chat.spec.route_selector.clone()).map_err(|source| Error::InvalidSelector {
        message: source.to_string(),
    })
}

/// Whether `chat` selects `route` (same namespace, labels match).
pub fn selects(chat: &ChatDeployment, route: &ModelRoute) -> bool {
    chat.namespace() == route.namespace()
        && route_selector(chat).is_ok_and(|selector| selector.matches(route.labels()))
}

/// Why a route is not offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: &'static str,
    pub message: String,
}

/// Oldest first (then by name): the order in which a duplicated alias is won.
fn precedence(a: &ModelRoute, b: &ModelRoute) -> Ordering {
    a.creation_timestamp()
        .cmp(&b.creation_timestamp())
        .then_with(|| a.name_any().cmp(&b.name_any()))
}

/// Verdict on `route` given the other routes selected alongside it by
/// `chat_name`: the route's own problems first, then alias uniqueness (the
/// oldest route keeps an alias; later ones are rejected).
pub fn verdict(
    route: &ModelRoute,
    selection: &[&ModelRoute],
    chat_name: &str,
) -> Result<(), Rejection> {
    if let Err(problems) = route.spec.validate() {
        return Err(Rejection {
            reason: problems.reason(),
            message: problems.to_string(),
        });
    }
    let holder = selection
        .iter()
        .filter(|other| other.spec.alias == route.spec.alias && other.spec.validate().is_ok())
        .min_by(|a, b| precedence(a, b));
    match holder {
        Some(holder) if holder.name_any() != route.name_any() => Err(Rejection {
            reason: "DuplicateAlias",
            message: format!(
                "alias `{}` is already offered by ModelRoute {} in ChatDeployment {chat_name}; \
                 rename one of them",
                route.spec.alias,
                holder.name_any()
            ),
        }),
        _ => Ok(()),
    }
}

/// A rejected route and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRoute {
    pub name: String,
    pub rejection: Rejection,
}

/// The routes file of a ChatDeployment and what went into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledRoutes {
    pub file: RoutesFile,
    pub resolved: Vec<ResolvedRoute>,
    pub rejected: Vec<RejectedRoute>,
}

/// Compiles the accepted routes among `selected` (the routes `chat`
/// selects) into a routes file, sorted by alias so that the ConfigMap only
/// changes when the routes do.
pub fn compile(chat: &ChatDeployment, selected: &[&ModelRoute]) -> CompiledRoutes {
    let chat_name = chat.name_any();
    let mut accepted: Vec<&ModelRoute> = Vec::new();
    let mut rejected = Vec::new();
    for route in selected {
        match verdict(route, selected, &chat_name) {
            Ok(()) => accepted.push(route),
            Err(rejection) => rejected.push(RejectedRoute {
                name: route.name_any(),
                rejection,
            }),
        }
    }
    accepted.sort_by(|a, b| a.spec.alias.cmp(&b.spec.alias));
    rejected.sort_by(|a, b| a.name.cmp(&b.name));
    CompiledRoutes {
        file: RoutesFile {
            default_route: Some(chat.spec.default_route.clone()),
            routes: accepted.iter().map(|route| route.spec.clone()).collect(),
            cohort_policies: chat.spec.cohort_policies.clone(),
        },
        resolved: accepted
            .iter()
            .map(|route| ResolvedRoute {
                alias: route.spec.alias.clone(),
                model_route: route.name_any(),
            })
            .collect(),
        rejected,
    }
}
