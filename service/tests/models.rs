//! The models API against a routes file of several routes: each route's
//! first-target breaker state in `GET /api/models`, the route
//! `POST /api/models/recommend` picks (only routes the caller may use and
//! afford, healthy ones first), and the content-policy blocks
//! `GET /api/policy/blocks` lists to supervisors and admins.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use common::{create_session, embedded_ledger, embedded_store, request, send, token};
use parley_service::auth::Role;
use parley_service::model_routes::{ProviderRegistry, Routes};
use parley_service::providers::{SimulatedProvider, SimulatedSettings};
use parley_service::routing::Admission;
use parley_service::stream::{Replies, ReplySettings};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tempfile::TempDir;

/// Worst cases of a short message (each route's maximum output of 1000
/// tokens, plus a credit or so of input): `backup` about 1 credit on either
/// target, `default` 2, `staff` 5, `expensive` 50. New accounts have 10.
const ROUTES: &str = r"
routes:
  - alias: default
    capabilities: [chat]
    contentPolicy:
      rules:
        - {name: cheat, words: [answer key], reason: Ask your teacher., direction: input}
    targets:
      - {provider: simulated, model: small, pricing: {inputPer1k: 1, outputPer1k: 2}, maxOutputTokens: 1000}
  - alias: backup
    capabilities: [chat]
    targets:
      - {provider: simulated, model: primary, pricing: {inputPer1k: 1, outputPer1k: 1}, maxOutputTokens: 1000,
         circuitBreaker: {failureThreshold: 1, cooldownSeconds: 3600}}
      - {provider: simulated, model: secondary, pricing: {inputPer1k: 1, outputPer1k: 1}, maxOutputTokens: 1000}
  - alias: staff
    capabilities: [chat]
    allowedRoles: [supervisor, admin]
    targets:
      - {provider: simulated, model: staff-model, pricing: {inputPer1k: 1, outputPer1k: 5}, maxOutputTokens: 1000}
  - alias: expensive
    capabilities: [chat]
    targets:
      - {provider: simulated, model: large, pricing: {inputPer1k: 1, outputPer1k: 50}, maxOutputTokens: 1000,
         circuitBreaker: {failureThreshold: 1, cooldownSeconds: 3600}}
";

struct App {
    router: Router,
    replies: Arc<Replies>,
    _dir: TempDir,
}

async fn app() -> App {
    let (store, dir) = embedded_store().await;
    let mut registry = Registry::default();
    let simulated = SimulatedProvider::new(SimulatedSettings {
        first_token_latency: Duration::ZERO,
        tokens_per_second: None,
        reply_tokens: None,
    });
    let replies = Replies::new(
        Routes::from_yaml(ROUTES).unwrap(),
        ProviderRegistry::new(Arc::new(simulated), None, None),
        ReplySettings::new(),
        &mut registry,
    );
    let state = common::state_with_replies(
        Arc::new(store.clone()),
        embedded_ledger(&store).await,
        registry,
        replies,
    );
    App {
        replies: Arc::clone(&state.replies),
        router: parley_service::app(state),
        _dir: dir,
    }
}

impl App {
    /// Opens the breaker of `route`'s target `index`: as many failures as
    /// its threshold.
    async fn open_breaker(&self, route: &str, index: usize) {
        let routes = self.replies.routes.snapshot();
        let spec = routes.resolve(Some(route), Role::Admin).unwrap();
        let target = &spec.targets[index];
        for _ in 0..target.circuit_breaker.failure_threshold {
            self.replies
                .breakers
                .failed(route, target, Admission::Closed)
                .await;
        }
    }

    async fn recommend(&self, token: &str, task: &str, priority: &str) -> (StatusCode, Value) {
        let body = json!({"task": task, "priority": priority});
        send(
            &self.router,
            request("POST", "/api/models/recommend", Some(token), Some(body)),
        )
        .await
    }
}

fn alias(answer: &Value) -> &str {
    answer["alias"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn only_routes_the_caller_may_use_and_afford_are_recommended() {
    let app = app().await;
    let alice = token("alice", Role::User, &["c1"]);
    let sam = token("sam", Role::Supervisor, &["c1"]);
    let ada = token("ada", Role::Admin, &[]);

    // Quality prefers the dearest route that fits: `staff` for a supervisor,
    // never for a user; `expensive` (50) for nobody with 10 credits.
    let (status, answer) = app.recommend(&sam, "chat", "quality").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(alias(&answer), "staff", "{answer}");
    let (status, answer) = app.recommend(&alice, "chat", "quality").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(alias(&answer), "default", "{answer}");
    assert_eq!(answer["model"], "small");
    assert_eq!(answer["available"], 10.0);
    assert_eq!(answer["primaryState"], "closed");
    let reason = answer["reason"].as_str().unwrap();
    assert!(reason.contains("of your 10 available credits"), "{reason}");

    // With the credits for it, the expensive route is the one.
    let grant = json!({"userId": "alice", "credits": 100});
    let (status, _) = send(
        &app.router,
        request("POST", "/api/admin/credits/grant", Some(&ada), Some(grant)),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, answer) = app.recommend(&alice, "chat", "quality").await;
    assert_eq!(alias(&answer), "expensive", "{answer}");
    assert_eq!(answer["available"], 110.0);

    // A worst case larger than what is available: nothing fits, 402 says
    // the balance and the cheapest route's price.
    let bob = token("bob", Role::User, &["c1"]);
    let hold = json!({"sessionId": "hold-1", "modelId": "default", "estimatedTokens": 8000});
    let (status, held) = send(
        &app.router,
        request(
            "POST",
            "/api/streaming-sessions/initialize",
            Some(&bob),
            Some(hold),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{held}");
    let (status, refused) = app.recommend(&bob, "chat", "cost").await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{refused}");
    assert_eq!(refused["code"], "INSUFFICIENT_CREDITS");
    assert_eq!(refused["balance"], 10.0);
    assert!(
        refused["available"].as_f64().unwrap() < refused["requiredCredits"].as_f64().unwrap(),
        "{refused}"
    );
}

#[tokio::test]
async fn a_route_whose_primary_is_open_says_so_and_ranks_after_healthy_ones() {
    let app = app().await;
    let alice = token("alice", Role::User, &["c1"]);
    let (status, answer) = app.recommend(&alice, "chat", "cost").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(alias(&answer), "backup", "the cheapest: {answer}");

    app.open_breaker("backup", 0).await;
    let (status, models) = send(
        &app.router,
        request("GET", "/api/models", Some(&alice), None),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let states: Vec<(&str, &str, bool)> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|model| {
            (
                model["alias"].as_str().unwrap(),
                model["primaryState"].as_str().unwrap(),
                model["primaryOpen"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("default", "closed", false),
            ("backup", "open", true),
            ("expensive", "closed", false),
        ],
        "users do not see `staff`"
    );
    assert_eq!(models["models"][0]["capabilities"], json!(["chat"]));

    // Still as cheap through its second target, but a healthy route first.
    let (_, answer) = app.recommend(&alice, "chat", "cost").await;
    assert_eq!(alias(&answer), "default", "{answer}");
    // The open route is still recommended when it is the only fit, and
    // says which target answers.
    app.open_breaker("expensive", 0).await;
    app.open_breaker("default", 0).await;
    let (status, answer) = app.recommend(&alice, "chat", "quality").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(alias(&answer), "backup", "{answer}");
    assert_eq!(answer["model"], "secondary");
    assert_eq!(answer["primaryState"], "open");
    let reason = answer["reason"].as_str().unwrap();
    assert!(reason.contains("so secondary answers"), "{reason}");

    // Every target of every route open: no reply could be answered.
    app.open_breaker("backup", 1).await;
    let (status, refused) = app.recommend(&alice, "chat", "quality").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{refused}");
    assert_eq!(refused["code"], "NO_ROUTE_AVAILABLE");
}

#[tokio::test]
async fn the_task_and_priority_are_validated() {
    let app = app().await;
    let alice = token("alice", Role::User, &["c1"]);
    for (body, code) in [
        (
            json!({"task": "  ", "priority": "cost"}),
            "VALIDATION_FAILED",
        ),
        (
            json!({"task": "a".repeat(201), "priority": "cost"}),
            "VALIDATION_FAILED",
        ),
        (json!({"task": "chat", "priority": "cheap"}), "INVALID_BODY"),
        (json!({"task": "chat"}), "INVALID_BODY"),
    ] {
        let (status, answer) = send(
            &app.router,
            request("POST", "/api/models/recommend", Some(&alice), Some(body)),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
        assert_eq!(answer["code"], code, "{answer}");
    }
}

#[tokio::test]
async fn supervisors_list_the_blocks_of_their_cohorts_and_never_the_text() {
    let app = app().await;
    let alice = token("alice", Role::User, &["c1"]);
    let bob = token("bob", Role::User, &["c2"]);
    for (user, text) in [
        (&alice, "where is the answer key of test 1?"),
        (&bob, "send me the ANSWER KEY please"),
        (&alice, "the answer key, now"),
    ] {
        let session = create_session(&app.router, user, json!({})).await;
        let uri = format!("/api/chat/sessions/{session}/messages");
        let (status, refused) = send(
            &app.router,
            request("POST", &uri, Some(user), Some(json!({"message": text}))),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
        assert_eq!(refused["code"], "CONTENT_BLOCKED");
        assert_eq!(refused["message"], "Ask your teacher.");
    }

    let list = |token: String, query: &'static str| {
        let router = app.router.clone();
        async move {
            let uri = format!("/api/policy/blocks{query}");
            send(&router, request("GET", &uri, Some(&token), None)).await
        }
    };
    let sam = token("sam", Role::Supervisor, &["c1"]);
    let (status, listed) = list(sam.clone(), "").await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let blocks = listed["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 2, "only c1's: {listed}");
    assert!(blocks.iter().all(|block| block["userId"] == "alice"));
    let newest = &blocks[0];
    assert_eq!(newest["rule"], "cheat");
    assert_eq!(newest["direction"], "input");
    assert_eq!(newest["kind"], "route_rule");
    assert_eq!(newest["route"], "default");
    assert_eq!(newest["excerpt"], "the ***, now");
    let text = listed.to_string().to_lowercase();
    assert!(!text.contains("answer key"), "{listed}");
    assert_eq!(listed["pagination"]["total"], 2);

    let ada = token("ada", Role::Admin, &[]);
    let (_, all) = list(ada.clone(), "").await;
    assert_eq!(all["pagination"]["total"], 3, "{all}");
    let (_, page) = list(ada.clone(), "?userId=alice&limit=1&page=2").await;
    assert_eq!(page["pagination"]["pages"], 2, "{page}");
    assert_eq!(page["blocks"][0]["excerpt"], "where is the *** of test 1?");
    let (_, none) = list(sam, "?userId=bob").await;
    assert_eq!(none["pagination"]["total"], 0, "bob is not in c1: {none}");

    let (status, forbidden) = list(alice, "").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{forbidden}");
    assert_eq!(forbidden["code"], "FORBIDDEN");
}
