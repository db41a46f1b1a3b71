//! The routes a caller may use (`GET /api/models`), with the state of each
//! route's first target, and the route to use for a task
//! (`POST /api/models/recommend`): the best one the caller may use and can
//! afford now, ranked by [`crate::routing::recommend`].

use axum::Json;
use axum::extract::State;
use parley_crds::{Credits, ModelRouteSpec};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ApiJson;
use super::sessions::validate_message;
use crate::accounting::Caller;
use crate::accounting::contract::AccountQuery;
use crate::auth::Principal;
use crate::error::{Error, ErrorBody};
use crate::ledger::{Credits as Amount, LedgerError, decimal_credits};
use crate::model_routes::RoutePrice;
use crate::providers::{ChatTurn, Role as TurnRole, estimate_turn_tokens};
use crate::routing::BreakerState;
use crate::routing::recommend::{Candidate, Priority, recommend};
use crate::state::AppState;

/// Longest `task` of a recommendation, in characters.
pub const MAX_TASK_CHARS: usize = 200;

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PriceView {
    /// Credits per 1000 input tokens.
    #[schema(value_type = f64)]
    input_per_1k: Credits,
    /// Credits per 1000 output tokens.
    #[schema(value_type = f64)]
    output_per_1k: Credits,
}

/// The circuit breaker state of a route's first target.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    /// Answering normally.
    Closed,
    /// Cooled down after failures: the next request tries it again.
    HalfOpen,
    /// Failing: replies skip it and the route's next target answers.
    Open,
}

impl From<BreakerState> for TargetState {
    fn from(state: BreakerState) -> Self {
        match state {
            BreakerState::Closed => Self::Closed,
            BreakerState::HalfOpen => Self::HalfOpen,
            BreakerState::Open => Self::Open,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelView {
    /// What to pass as `route` / `modelId`.
    alias: String,
    /// The first target's model.
    model: String,
    provider: &'static str,
    /// Price of the first target (fallbacks may cost more or less).
    pricing: PriceView,
    max_output_tokens: u32,
    is_default: bool,
    /// The circuit breaker of the first target: `open` while it fails, when
    /// replies skip it for the route's next target.
    primary_state: TargetState,
    /// `primaryState` is `open`.
    primary_open: bool,
    /// What the route is good for (`chat`, `code`, `fast`…), from the routes file.
    capabilities: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelsView {
    models: Vec<ModelView>,
}

#[utoipa::path(
    get,
    path = "/api/models",
    tag = "replies",
    responses(
        (status = 200, description = "Routes the caller may use, with prices and the state of each one's first target", body = ModelsView),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_models(State(state): State<AppState>, caller: Principal) -> Json<ModelsView> {
    let routes = state.replies.routes.snapshot();
    let default_alias = routes.default_alias();
    let mut models = Vec::new();
    for route in routes.usable_by(caller.role) {
        let Some(first) = route.targets.first() else {
            continue;
        };
        let primary_state = state.replies.breakers.state(&route.alias, first).await;
        models.push(ModelView {
            alias: route.alias.clone(),
            model: first.model.clone(),
            provider: first.provider.as_str(),
            pricing: PriceView {
                input_per_1k: first.pricing.input_per_1k,
                output_per_1k: first.pricing.output_per_1k,
            },
            max_output_tokens: first.max_output_tokens,
            is_default: route.alias == default_alias,
            primary_state: primary_state.into(),
            primary_open: primary_state == BreakerState::Open,
            capabilities: route.capabilities.clone(),
        });
    }
    Json(ModelsView { models })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecommendRequest {
    /// What the route is for, e.g. `chat` or `write some code`: a route
    /// whose capabilities name it, or one of its words, comes first. Not
    /// blank, at most 200 characters.
    #[schema(min_length = 1, max_length = 200)]
    task: String,
    /// What matters most: `quality` (the most capable, dearest route that
    /// fits), `cost` (the cheapest) or `speed` (routes tagged `fast`).
    priority: Priority,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecommendationView {
    /// The route to pass as `route` / `modelId`.
    alias: String,
    /// The target that would answer now (the next one when the first's
    /// breaker is open).
    model: String,
    /// The most a reply to a message as long as the task costs on that target.
    #[serde(with = "decimal_credits")]
    #[schema(value_type = f64)]
    worst_case: Amount,
    /// The caller's available credits (balance minus open holds).
    #[serde(with = "decimal_credits")]
    #[schema(value_type = f64)]
    available: Amount,
    /// The state of the route's first target.
    primary_state: TargetState,
    /// Why this route, in one sentence.
    reason: String,
}

#[utoipa::path(
    post,
    path = "/api/models/recommend",
    tag = "replies",
    request_body = RecommendRequest,
    responses(
        (status = 200, description = "The best route the caller may use and can afford now, and why", body = RecommendationView),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 402, description = "`INSUFFICIENT_CREDITS`: no route the caller may use is affordable now; the body has the balance, the available credits and the cheapest route's worst case", body = ErrorBody),
        (status = 422, description = "`INVALID_BODY` (a missing field, an unknown priority) or `VALIDATION_FAILED` (a blank or too long task)", body = ErrorBody),
        (status = 503, description = "`NO_ROUTE_AVAILABLE`: every target of every route the caller may use has its circuit breaker open; or the ledger or accounting service is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn recommend_route(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(request): ApiJson<RecommendRequest>,
) -> Result<Json<RecommendationView>, Error> {
    validate_message(&request.task, MAX_TASK_CHARS, "task")?;
    let balance = state
        .accounting
        .balance(&caller, AccountQuery::default())
        .await?
        .balance;
    let available = balance.available;
    let routes = state.replies.routes.snapshot();
    let default_alias = routes.default_alias();
    let mut candidates = Vec::new();
    let mut primary_states = Vec::new();
    let mut cheapest_refused: Option<Amount> = None;
    for route in routes.usable_by(caller.principal.role) {
        let states = target_states(&state, route).await;
        let reach = answering_target(route, &states, &request.task, available)?;
        if let Reach::Unaffordable(required) = reach {
            cheapest_refused = Some(cheapest_refused.map_or(required, |c| c.min(required)));
        }
        let primary_state = states.first().copied().unwrap_or_default();
        primary_states.push(primary_state);
        candidates.push(Candidate {
            route,
            answering: match reach {
                Reach::Answers(index, worst_case) => Some((index, worst_case)),
                Reach::Unaffordable(_) | Reach::AllOpen => None,
            },
            primary_open: primary_state == BreakerState::Open,
            is_default: route.alias == default_alias,
        });
    }
    let Some(best) = recommend(&candidates, &request.task, request.priority, available) else {
        return Err(match cheapest_refused {
            Some(required) => Error::Ledger(LedgerError::InsufficientCredits {
                balance: balance.balance,
                available,
                required,
            }),
            None => Error::NoRouteAvailable,
        });
    };
    let primary_state = candidates
        .iter()
        .zip(&primary_states)
        .find(|(candidate, _)| candidate.route.alias == best.alias)
        .map_or(BreakerState::Closed, |(_, state)| *state);
    Ok(Json(RecommendationView {
        alias: best.alias,
        model: best.model,
        worst_case: best.worst_case,
        available,
        primary_state: primary_state.into(),
        reason: best.reason,
    }))
}

/// The breaker state of each of `route`'s targets, in chain order.
async fn target_states(state: &AppState, route: &ModelRouteSpec) -> Vec<BreakerState> {
    let mut states = Vec::with_capacity(route.targets.len());
    for target in &route.targets {
        states.push(state.replies.breakers.state(&route.alias, target).await);
    }
    states
}

/// Whether a reply on a route would be answered, and by which target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// This target answers, at this worst case.
    Answers(usize, Amount),
    /// The caller cannot afford it; the worst case that did not fit.
    Unaffordable(Amount),
    /// Every target the reply could reach has its breaker open.
    AllOpen,
}

/// Which target of `route` answers a message like `task` from a caller with
/// `available` credits, as a reply would go: the hold is priced for the
/// first target (or, on a route that downgrades, the first one the caller
/// can afford), then targets whose breaker is open are skipped and the hold
/// is re-priced for the one that answers, which must fit too.
fn answering_target(
    route: &ModelRouteSpec,
    states: &[BreakerState],
    task: &str,
    available: Amount,
) -> Result<Reach, Error> {
    let mut input_tokens = estimate_turn_tokens(&ChatTurn::new(TurnRole::User, task));
    if let Some(prompt) = &route.system_prompt {
        input_tokens = input_tokens.saturating_add(estimate_turn_tokens(&ChatTurn::new(
            TurnRole::System,
            prompt.as_str(),
        )));
    }
    let worst_cases = route
        .targets
        .iter()
        .map(|target| RoutePrice::of(route, target).worst_case(u64::from(input_tokens), None))
        .collect::<Result<Vec<Amount>, LedgerError>>()?;
    // Credits would not help a route no target of which answers now.
    let all_open = states.iter().all(|state| *state == BreakerState::Open);
    let Some(&first_cost) = worst_cases.first().filter(|_| !all_open) else {
        return Ok(Reach::AllOpen);
    };
    let held = if route.downgrade_when_unaffordable {
        match worst_cases.iter().position(|cost| *cost <= available) {
            Some(index) => index,
            None => return Ok(Reach::Unaffordable(first_cost)),
        }
    } else if first_cost <= available {
        0
    } else {
        return Ok(Reach::Unaffordable(first_cost));
    };
    let answering =
        (held..route.targets.len()).find(|index| states.get(*index) != Some(&BreakerState::Open));
    Ok(match answering {
        None => Reach::AllOpen,
        Some(index) => {
            let cost = worst_cases[index];
            if cost <= available {
                Reach::Answers(index, cost)
            } else {
                Reach::Unaffordable(cost)
            }
        }
    })
}
