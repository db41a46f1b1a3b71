//! The accounting API over HTTP: the seeds' payloads, field-level errors,
//! exactly-once charging on both stores, outages, external mode against a
//! second instance, and per-user rate limits, deployment-wide and per route
//! (in-process and through Redis).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use common::{TestApp, request, send, token};
use parley_service::accounting::Caller;
use parley_service::auth::{Principal, Role};
use parley_service::config::Config;
use parley_service::ledger::{Ledger, MongoLedger};
use parley_service::ratelimit::{
    LocalRateLimiter, RateLimitMetrics, RateLimiter, RateLimits, RedisRateLimiter, Scope,
};
use parley_service::server::serve_listener;
use parley_test_support::proxy::{TcpProxy, host_port};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SEED_MESSAGE: &str = "What are the three primary colors?";

fn alice() -> String {
    token("alice", Role::User, &["c1"])
}

async fn post(router: &Router, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
    send(router, request("POST", path, Some(token), Some(body))).await
}

async fn get(router: &Router, path: &str, token: &str) -> (StatusCode, Value) {
    send(router, request("GET", path, Some(token), None)).await
}

/// A reply keeps its caller for as long as it streams; the built-in
/// accounting reads only the principal, so the token is not kept (external
/// mode keeps it: `external_mode_*` below settles with it).
#[tokio::test]
async fn the_built_in_accounting_keeps_no_token_for_a_reply() {
    let (store, _dir) = common::embedded_store().await;
    let state = common::state(&store).await;
    let principal = Principal {
        sub: "alice".into(),
        role: Role::User,
        cohorts: vec!["c1".into()],
    };
    let caller = Caller {
        principal: principal.clone(),
        token: alice(),
    };
    let retained = state.accounting.retained(caller);
    assert_eq!(retained.principal, principal);
    assert_eq!(retained.token, "");
}

#[tokio::test]
async fn the_seeds_payloads_get_correct_answers() {
    let app = TestApp::new().await;
    let router = &app.router;
    let alice = alice();

    // Seed log: calculate {modelId, message} -> {modelId, tokens, requiredCredits}.
    let (status, body) = post(
        router,
        "/api/credits/calculate",
        &alice,
        json!({"modelId": "default", "message": SEED_MESSAGE}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // 34 characters -> 9 tokens, plus 1024 output tokens; 1/1k in, 2/1k out.
    assert_eq!(
        body,
        json!({"modelId": "default", "tokens": 1033, "inputTokens": 9,
               "maxOutputTokens": 1024, "requiredCredits": 2.057})
    );
    let (status, body) = post(
        router,
        "/api/credits/calculate",
        &alice,
        json!({"modelId": "parley-simulated", "tokens": 1000}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["requiredCredits"], json!(3.048));

    // test_send_messages.py: {"userId", "requiredCredits": 5}.
    let (status, body) = post(
        router,
        "/api/credits/check",
        &alice,
        json!({"userId": "alice", "requiredCredits": 5}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"userId": "alice", "sufficient": true, "requiredCredits": 5.0,
               "balance": 10.0, "held": 0.0, "available": 10.0})
    );
    let (_, body) = post(
        router,
        "/api/credits/check",
        &alice,
        json!({"userId": "alice", "requiredCredits": 10.000001, "modelId": "default"}),
    )
    .await;
    assert_eq!(body["sufficient"], false);

    // streaming-session.service.ts: initialize {sessionId, userId, modelId, estimatedTokens}.
    let (status, body) = post(
        router,
        "/api/streaming-sessions/initialize",
        &alice,
        json!({"sessionId": "stream-1747817188300-f36e1673", "userId": "alice",
               "modelId": "default", "estimatedTokens": 500}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["sessionId"], "stream-1747817188300-f36e1673");
    assert_eq!(body["allocatedCredits"], json!(2.548));
    let (_, balance) = get(router, "/api/credits/balance", &alice).await;
    assert_eq!(
        balance,
        json!({"userId": "alice", "balance": 10.0, "held": 2.548, "available": 7.452})
    );

    // streaming.service.ts: finalize {sessionId, actualTokens, success, duration}.
    let (status, body) = post(
        router,
        "/api/streaming-sessions/finalize",
        &alice,
        json!({"sessionId": "stream-1747817188300-f36e1673", "actualTokens": 100,
               "success": true, "duration": 6849}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The recorded 500 input tokens (0.5) plus 100 output tokens (0.2).
    assert_eq!(body["chargedCredits"], json!(0.7));
    assert_eq!(body["outcome"], "completed");
    assert_eq!(body["replayed"], false);
    assert_eq!(body["balance"], json!(9.3));
    assert_eq!(body["held"], json!(0.0));

    // abort {sessionId, tokensGenerated, error} after an error.
    post(
        router,
        "/api/streaming-sessions/initialize",
        &alice,
        json!({"sessionId": "stream-2", "modelId": "default", "estimatedTokens": 10}),
    )
    .await;
    let (status, body) = post(
        router,
        "/api/streaming-sessions/abort",
        &alice,
        json!({"sessionId": "stream-2", "tokensGenerated": 0, "error": "throttled"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "released");
    assert_eq!(body["chargedCredits"], json!(0.0));
    assert_eq!(body["available"], json!(9.3));

    let (status, usage) = get(router, "/api/credits/usage", &alice).await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    let records = usage["records"].as_array().unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[1]["sessionId"], "stream-1747817188300-f36e1673");
    assert_eq!(records[1]["charged"], json!(0.7));
    assert_eq!(records[1]["inputTokens"], 500);
    assert_eq!(records[1]["outputTokens"], 100);
}

#[tokio::test]
async fn missing_and_unknown_fields_are_named_and_never_allowed() {
    let app = TestApp::new().await;
    let alice = alice();
    // The old chat service's payload: 400 naming the fields, never "allowed".
    let (status, body) = post(
        &app.router,
        "/api/credits/check",
        &alice,
        json!({"credits": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "INVALID_FIELDS");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("missing fields: userId, requiredCredits; unknown fields: credits"),
        "{body}"
    );
    assert_eq!(
        body["fields"],
        json!(["userId", "requiredCredits", "credits"])
    );
    assert!(body.get("sufficient").is_none());

    for (path, payload, missing) in [
        (
            "/api/credits/check",
            json!({"userId": "alice", "operation": "streaming", "modelId": "default"}),
            "missing fields: requiredCredits; unknown fields: operation",
        ),
        (
            "/api/credits/calculate",
            json!({"tokens": 5}),
            "missing fields: modelId",
        ),
        (
            "/api/streaming-sessions/initialize",
            json!({"userId": "alice", "modelId": "default", "messageHistory": []}),
            "missing fields: sessionId, estimatedTokens; unknown fields: messageHistory",
        ),
        (
            "/api/streaming-sessions/finalize",
            json!({"sessionId": "s", "actualTokens": null}),
            "missing fields: actualTokens, success",
        ),
        (
            "/api/streaming-sessions/abort",
            json!({"sessionId": "s"}),
            "missing fields: tokensGenerated",
        ),
        (
            "/api/admin/credits/grant",
            json!({}),
            "missing fields: userId, credits",
        ),
    ] {
        let (status, body) = post(&app.router, path, &alice, payload).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["code"], "INVALID_FIELDS", "{path}");
        assert!(
            body["message"].as_str().unwrap().starts_with(missing),
            "{path}: {body}"
        );
    }

    let (status, body) = post(
        &app.router,
        "/api/credits/check",
        &alice,
        json!({"userId": "alice", "requiredCredits": "lots"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = post(
        &app.router,
        "/api/credits/calculate",
        &alice,
        json!({"modelId": "gpt-9"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "UNKNOWN_MODEL");
    assert_eq!(body["allowed"], json!(["default", "parley-simulated"]));
    let (status, _) = send(
        &app.router,
        request(
            "POST",
            "/api/credits/check",
            None,
            Some(json!({"userId": "alice", "requiredCredits": 1})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn users_use_their_own_account_and_admins_any() {
    let app = TestApp::new().await;
    let router = &app.router;
    let alice = alice();
    let admin = token("root", Role::Admin, &[]);
    let supervisor = token("sam", Role::Supervisor, &["c1"]);

    let (status, body) = post(
        router,
        "/api/credits/check",
        &alice,
        json!({"userId": "bob", "requiredCredits": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = get(router, "/api/credits/usage?userId=alice", &supervisor).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = post(
        router,
        "/api/admin/credits/grant",
        &alice,
        json!({"userId": "alice", "credits": 100}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, body) = post(
        router,
        "/api/admin/credits/grant",
        &admin,
        json!({"userId": "alice", "credits": 2.5}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["balance"], json!(12.5));
    let (status, body) = get(router, "/api/credits/balance?userId=alice", &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["available"], json!(12.5));

    // Holds are per account: bob cannot finalize alice's session, even by name.
    post(
        router,
        "/api/streaming-sessions/initialize",
        &alice,
        json!({"sessionId": "mine", "modelId": "default", "estimatedTokens": 1}),
    )
    .await;
    let bob = token("bob", Role::User, &[]);
    let (status, body) = post(
        router,
        "/api/streaming-sessions/finalize",
        &bob,
        json!({"sessionId": "mine", "actualTokens": 1, "success": true}),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["code"], "STREAMING_SESSION_NOT_FOUND");
    let (status, _) = post(
        router,
        "/api/streaming-sessions/finalize",
        &bob,
        json!({"sessionId": "mine", "actualTokens": 1, "success": true, "userId": "alice"}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = post(
        router,
        "/api/streaming-sessions/abort",
        &admin,
        json!({"sessionId": "mine", "tokensGenerated": 0, "userId": "alice"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, usage) = get(router, "/api/credits/usage?userId=alice&limit=1", &admin).await;
    assert_eq!(usage["records"][0]["outcome"], "released");
}

#[tokio::test]
async fn insufficient_credits_is_402_with_balance_and_price_and_counted() {
    let app = TestApp::new().await;
    let alice = alice();
    // 10 credits; 5000 input tokens + 1024 output = 7.048 each.
    let initialize = |session: &str| json!({"sessionId": session, "modelId": "default", "estimatedTokens": 5000});
    let (status, _) = post(
        &app.router,
        "/api/streaming-sessions/initialize",
        &alice,
        initialize("first"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = post(
        &app.router,
        "/api/streaming-sessions/initialize",
        &alice,
        initialize("second"),
    )
    .await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    assert_eq!(body["code"], "INSUFFICIENT_CREDITS");
    assert_eq!(body["balance"], json!(10.0));
    assert_eq!(body["available"], json!(2.952));
    assert_eq!(body["requiredCredits"], json!(7.048));

    post(
        &app.router,
        "/api/streaming-sessions/finalize",
        &alice,
        json!({"sessionId": "first", "actualTokens": 10, "success": true}),
    )
    .await;
    let (_, metrics) = send(&app.router, request("GET", "/metrics", None, None)).await;
    assert!(metrics.is_null(), "metrics are text");
    let text = metrics_text(&app.router).await;
    assert!(
        text.contains(r#"parley_ledger_denials_total{reason="insufficient_credits"} 1"#),
        "{text}"
    );
    // 5 input credits + 0.02 output.
    assert!(
        text.contains(
            r#"parley_credits_charged_total{route="default",model="parley-simulated"} 5.02"#
        ),
        "{text}"
    );
}

async fn metrics_text(router: &Router) -> String {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let response = router
        .clone()
        .oneshot(request("GET", "/metrics", None, None))
        .await
        .unwrap();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// finalize and abort, repeated, reordered and concurrent, charge once.
async fn exactly_once_over_http(router: &Router) {
    let alice = alice();
    let start =
        |session: &str| json!({"sessionId": session, "modelId": "default", "estimatedTokens": 100});
    let finalize = |session: &str, tokens: u64| json!({"sessionId": session, "actualTokens": tokens, "success": true});
    let abort = |session: &str, tokens: u64| json!({"sessionId": session, "tokensGenerated": tokens, "error": "upstream failed"});
    for session in ["twice", "released-first", "aborted-first", "racing"] {
        let (status, body) = post(
            router,
            "/api/streaming-sessions/initialize",
            &alice,
            start(session),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let finalize_path = "/api/streaming-sessions/finalize";
    let abort_path = "/api/streaming-sessions/abort";

    let (_, first) = post(router, finalize_path, &alice, finalize("twice", 100)).await;
    assert_eq!(first["chargedCredits"], json!(0.3));
    let (status, again) = post(router, finalize_path, &alice, finalize("twice", 900)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["replayed"], true);
    assert_eq!(again["chargedCredits"], json!(0.3));
    assert_eq!(again["outputTokens"], 100);
    let (_, late_abort) = post(router, abort_path, &alice, abort("twice", 50)).await;
    assert_eq!(late_abort["replayed"], true);
    assert_eq!(late_abort["outcome"], "completed");

    let (_, released) = post(router, abort_path, &alice, abort("released-first", 0)).await;
    assert_eq!(released["outcome"], "released");
    let (_, late) = post(
        router,
        finalize_path,
        &alice,
        finalize("released-first", 100),
    )
    .await;
    assert_eq!(late["replayed"], true);
    assert_eq!(late["chargedCredits"], json!(0.0));

    let (_, aborted) = post(router, abort_path, &alice, abort("aborted-first", 40)).await;
    assert_eq!(aborted["outcome"], "failed");
    assert_eq!(aborted["chargedCredits"], json!(0.18));
    let (_, late) = post(
        router,
        finalize_path,
        &alice,
        finalize("aborted-first", 200),
    )
    .await;
    assert_eq!(late["replayed"], true);
    assert_eq!(late["chargedCredits"], json!(0.18));

    let racers = (0..8).map(|i| {
        let router = router.clone();
        let alice = alice.clone();
        let body = if i % 2 == 0 {
            finalize("racing", 100)
        } else {
            abort("racing", 100)
        };
        let path = if i % 2 == 0 {
            finalize_path
        } else {
            abort_path
        };
        tokio::spawn(async move { post(&router, path, &alice, body).await })
    });
    let answers = futures::future::join_all(racers).await;
    let first_closers = answers
        .iter()
        .map(|answer| answer.as_ref().unwrap())
        .inspect(|(status, body)| assert_eq!(*status, StatusCode::OK, "{body}"))
        .filter(|(_, body)| body["replayed"] == false)
        .count();
    assert_eq!(first_closers, 1);

    let (_, balance) = get(router, "/api/credits/balance", &alice).await;
    // 10 - 0.3 - 0 - 0.18 - 0.3
    assert_eq!(
        balance,
        json!({"userId": "alice", "balance": 9.22, "held": 0.0, "available": 9.22})
    );
    let (_, usage) = get(router, "/api/credits/usage", &alice).await;
    assert_eq!(usage["records"].as_array().unwrap().len(), 4);
    let (status, body) = post(router, finalize_path, &alice, finalize("never-started", 1)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = post(
        router,
        "/api/streaming-sessions/initialize",
        &alice,
        start("twice"),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a closed session id is not reused: {body}"
    );
}

#[tokio::test]
async fn finalize_and_abort_charge_once_on_the_embedded_store() {
    let app = TestApp::new().await;
    exactly_once_over_http(&app.router).await;
}

#[tokio::test]
async fn finalize_and_abort_charge_once_on_mongodb() {
    let store = common::mongo_store().await;
    let ledger = MongoLedger::new(store.database(), common::LEDGER_SETTINGS);
    ledger.create_indexes().await.unwrap();
    let ledger: Arc<dyn Ledger> = Arc::new(ledger);
    let router = parley_service::app(common::state_with(
        Arc::new(store.clone()),
        Arc::clone(&ledger),
    ));
    exactly_once_over_http(&router).await;
    assert_eq!(ledger.open_holds().await.unwrap(), 0);
    common::drop_mongo(store).await;
}

#[tokio::test]
async fn in_process_request_limits_are_per_user_with_retry_after() {
    let (store, _dir) = common::embedded_store().await;
    let mut state = common::state(&store).await;
    let mut registry = prometheus_client::registry::Registry::default();
    let limits = RateLimits {
        requests_per_minute: 3,
        tokens_per_minute: 0,
        concurrent_streams: 0,
    };
    state.rate_limiter = Arc::new(LocalRateLimiter::new(
        limits,
        RateLimitMetrics::register(&mut registry),
    ));
    let router = parley_service::app(state);
    let (alice, bob) = (alice(), token("bob", Role::User, &[]));
    for _ in 0..3 {
        let (status, _) = get(&router, "/api/credits/balance", &alice).await;
        assert_eq!(status, StatusCode::OK);
    }
    use tower::ServiceExt;
    let response = router
        .clone()
        .oneshot(request("GET", "/api/credits/balance", Some(&alice), None))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    common::assert_retry_within_a_window(response.headers());
    let (status, _) = get(&router, "/api/credits/balance", &bob).await;
    assert_eq!(status, StatusCode::OK, "bob has his own window");
    let (status, _) = send(&router, request("GET", "/health", None, None)).await;
    assert_eq!(status, StatusCode::OK, "probes are not limited");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"parley_rate_limited_total{limit="requests"} 1"#),
        "{text}"
    );
}

/// The stream-slot and token rules every limiter shares.
async fn streams_and_tokens(limiter: &dyn RateLimiter, user: &str) {
    let first = limiter.acquire_stream(Scope::User(user)).await.unwrap();
    let second = limiter.acquire_stream(Scope::User(user)).await.unwrap();
    let refused = limiter
        .acquire_stream(Scope::User(user))
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(
        limiter
            .acquire_stream(Scope::User(&format!("{user}-other")))
            .await
            .is_ok()
    );
    second.release().await;
    let third = limiter.acquire_stream(Scope::User(user)).await.unwrap();
    drop(first);
    drop(third);
    // Dropped guards free their slots too (in the background for Redis):
    // both slots come back, and a third is still refused.
    let mut held = Vec::new();
    while held.len() < 2 {
        if let Ok(guard) = limiter.acquire_stream(Scope::User(user)).await {
            held.push(guard);
        } else {
            tokio::task::yield_now().await;
        }
    }
    assert!(limiter.acquire_stream(Scope::User(user)).await.is_err());

    limiter.admit_request(Scope::User(user)).await.unwrap();
    limiter.charge_tokens(Scope::User(user), 60).await.unwrap();
    let over = limiter
        .charge_tokens(Scope::User(user), 50)
        .await
        .unwrap_err();
    assert!(matches!(
        over,
        parley_service::Error::RateLimited {
            limit: "tokens",
            ..
        }
    ));
    let refused = limiter.admit_request(Scope::User(user)).await.unwrap_err();
    assert!(matches!(
        refused,
        parley_service::Error::RateLimited {
            limit: "tokens",
            ..
        }
    ));
}

const STREAM_LIMITS: RateLimits = RateLimits {
    requests_per_minute: 0,
    tokens_per_minute: 100,
    concurrent_streams: 2,
};

#[tokio::test]
async fn in_process_stream_slots_and_token_budget() {
    let limiter = LocalRateLimiter::new(STREAM_LIMITS, RateLimitMetrics::default());
    streams_and_tokens(&limiter, "alice").await;
}

#[tokio::test]
async fn redis_stream_slots_and_token_budget() {
    let limiter = RedisRateLimiter::connect(
        &parley_test_support::env::redis_url(),
        &parley_test_support::env::unique_name("parley-limits"),
        STREAM_LIMITS,
        RateLimitMetrics::default(),
    )
    .await
    .unwrap();
    streams_and_tokens(&limiter, "alice").await;
}

/// The user-wide limits of the route-scope tests: a route count that leaked
/// into them would show.
const DEPLOYMENT_LIMITS: RateLimits = RateLimits {
    requests_per_minute: 2,
    tokens_per_minute: 100,
    concurrent_streams: 1,
};

fn on_route<'a>(user: &'a str, route: &'a str) -> Scope<'a> {
    Scope::Route {
        user,
        route,
        limits: RateLimits {
            requests_per_minute: 1,
            tokens_per_minute: 50,
            concurrent_streams: 1,
        },
    }
}

/// The limit that refused `result`.
fn refused_limit<T>(result: Result<T, parley_service::Error>) -> &'static str {
    match result {
        Err(parley_service::Error::RateLimited { limit, .. }) => limit,
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("admitted"),
    }
}

/// Route scopes count apart per route and per user, never in the user's
/// deployment scope, and no user id names a route scope's counters.
async fn route_scopes(limiter: &dyn RateLimiter) {
    let fast = limiter
        .acquire_stream(on_route("alice", "fast"))
        .await
        .unwrap();
    assert_eq!(
        refused_limit(limiter.acquire_stream(on_route("alice", "fast")).await),
        "streams"
    );
    let mut held = vec![
        limiter
            .acquire_stream(on_route("alice", "smart"))
            .await
            .unwrap(),
        limiter
            .acquire_stream(on_route("bob", "fast"))
            .await
            .unwrap(),
        // A user named like alice's scope on `fast` has counters of its own.
        limiter
            .acquire_stream(Scope::User("route:4:fast:alice"))
            .await
            .unwrap(),
        // Were the alias not length-prefixed, these two would share a key.
        limiter.acquire_stream(on_route("b:c", "a")).await.unwrap(),
        limiter.acquire_stream(on_route("c", "a:b")).await.unwrap(),
        // Alice's one deployment-wide slot is still free.
        limiter.acquire_stream(Scope::User("alice")).await.unwrap(),
    ];
    assert_eq!(
        refused_limit(limiter.acquire_stream(Scope::User("alice")).await),
        "streams"
    );
    held.push(fast);
    for guard in held {
        guard.release().await;
    }
    limiter
        .acquire_stream(on_route("alice", "fast"))
        .await
        .unwrap()
        .release()
        .await;

    limiter
        .admit_request(on_route("alice", "fast"))
        .await
        .unwrap();
    assert_eq!(
        refused_limit(limiter.admit_request(on_route("alice", "fast")).await),
        "requests"
    );
    limiter
        .admit_request(on_route("alice", "smart"))
        .await
        .unwrap();
    limiter
        .admit_request(on_route("bob", "fast"))
        .await
        .unwrap();
    // Both of alice's deployment-wide requests are left.
    for _ in 0..2 {
        limiter.admit_request(Scope::User("alice")).await.unwrap();
    }
    assert_eq!(
        refused_limit(limiter.admit_request(Scope::User("alice")).await),
        "requests"
    );

    // A spent route budget refuses requests on that route, and only there.
    limiter
        .charge_tokens(on_route("bob", "smart"), 50)
        .await
        .unwrap();
    assert_eq!(
        refused_limit(limiter.charge_tokens(on_route("bob", "smart"), 1).await),
        "tokens"
    );
    assert_eq!(
        refused_limit(limiter.admit_request(on_route("bob", "smart")).await),
        "tokens"
    );
    limiter
        .admit_request(on_route("bob", "other"))
        .await
        .unwrap();
    // Bob's deployment budget saw none of the 51 route tokens.
    limiter
        .charge_tokens(Scope::User("bob"), 100)
        .await
        .unwrap();
    assert_eq!(
        refused_limit(limiter.charge_tokens(Scope::User("bob"), 1).await),
        "tokens"
    );
}

#[tokio::test]
async fn in_process_route_scopes_are_separate() {
    let limiter = LocalRateLimiter::new(DEPLOYMENT_LIMITS, RateLimitMetrics::default());
    route_scopes(&limiter).await;
}

#[tokio::test]
async fn redis_route_scopes_are_separate() {
    let limiter = RedisRateLimiter::connect(
        &parley_test_support::env::redis_url(),
        &parley_test_support::env::unique_name("parley-limits"),
        DEPLOYMENT_LIMITS,
        RateLimitMetrics::default(),
    )
    .await
    .unwrap();
    route_scopes(&limiter).await;
}

#[tokio::test]
async fn redis_down_fails_closed_with_503_and_is_used_again_when_back() {
    let proxy = TcpProxy::start(
        host_port(&parley_test_support::env::redis_url())
            .unwrap()
            .to_owned(),
        None,
    )
    .await
    .unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let limiter = RedisRateLimiter::connect(
        &format!("redis://{}", proxy.address()),
        &parley_test_support::env::unique_name("parley-limits"),
        STREAM_LIMITS,
        RateLimitMetrics::register(&mut registry),
    )
    .await
    .unwrap();
    limiter.admit_request(Scope::User("alice")).await.unwrap();
    proxy.stop().await;
    let error = limiter
        .admit_request(Scope::User("alice"))
        .await
        .unwrap_err();
    assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error.code(), "RATE_LIMITER_UNAVAILABLE");
    assert!(limiter.acquire_stream(Scope::User("alice")).await.is_err());
    assert!(
        limiter
            .charge_tokens(Scope::User("alice"), 1)
            .await
            .is_err()
    );
    let mut metrics = String::new();
    prometheus_client::encoding::text::encode(&mut metrics, &registry).unwrap();
    assert!(
        metrics.contains("parley_rate_limiter_unavailable_total 3"),
        "{metrics}"
    );

    // Redis back on the same address: the limiter uses it again by itself,
    // answering 503 (never admitting) until it does.
    let redis = host_port(&parley_test_support::env::redis_url())
        .unwrap()
        .to_owned();
    let _proxy = TcpProxy::start(redis, Some(proxy.address())).await.unwrap();
    let mut attempts = 0;
    while let Err(error) = limiter.admit_request(Scope::User("alice")).await {
        assert_eq!(error.code(), "RATE_LIMITER_UNAVAILABLE");
        attempts += 1;
        assert!(
            attempts < 200,
            "the limiter did not use Redis again in 10 s"
        );
        // A failed attempt returns at once; space them so 200 cover 10 s.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(limiter.acquire_stream(Scope::User("alice")).await.is_ok());
}

// ---------------------------------------------------------------------------
// Real servers on loopback.

struct RunningServer {
    address: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), parley_service::Error>>,
}

impl RunningServer {
    async fn start(data_dir: &Path, extra: &[&str]) -> Self {
        let data_dir = data_dir.to_str().unwrap();
        let mut args = vec![
            "parley-service",
            "--data-dir",
            data_dir,
            "--jwt-secret",
            std::str::from_utf8(common::SECRET).unwrap(),
            "--initial-credits",
            "10",
            "--shutdown-drain-seconds",
            "5",
        ];
        args.extend_from_slice(extra);
        let config = Config::from_args(args).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve_listener(listener, config, shutdown.clone()));
        // Connections queue on the bound listener until the app serves.
        let health = reqwest::get(format!("http://{address}/health"))
            .await
            .unwrap();
        assert_eq!(health.status(), reqwest::StatusCode::OK);
        Self {
            address,
            shutdown,
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    async fn call(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Answer {
        let client = reqwest::Client::new();
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut builder = client.request(method, self.url(path)).bearer_auth(token);
        if let Some(body) = body {
            builder = builder.json(&body);
        }
        let response = builder.send().await.unwrap();
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|value| value.to_str().unwrap().to_owned());
        let body = response.json().await.unwrap_or(Value::Null);
        Answer {
            status,
            body,
            retry_after,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
    retry_after: Option<String>,
}

#[tokio::test]
async fn a_ledger_outage_is_503_and_recovers_without_a_restart() {
    let real = parley_test_support::env::mongodb_uri();
    let proxy = TcpProxy::start(host_port(&real).unwrap().to_owned(), None)
        .await
        .unwrap();
    let database = parley_test_support::env::unique_name("parley-ledger-outage").replace('-', "_");
    let uri = format!(
        "mongodb://{}/?directConnection=true&serverSelectionTimeoutMS=300&connectTimeoutMS=300&heartbeatFrequencyMS=500",
        proxy.address()
    );
    let dir = tempfile::tempdir().unwrap();
    let server = RunningServer::start(
        dir.path(),
        &["--mongodb-uri", &uri, "--mongodb-database", &database],
    )
    .await;
    let alice = alice();
    let check = json!({"userId": "alice", "requiredCredits": 1});
    let start = json!({"sessionId": "s1", "modelId": "default", "estimatedTokens": 10});
    let answer = server
        .call("POST", "/api/credits/check", &alice, Some(check.clone()))
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");

    proxy.stop().await;
    for (method, path, body) in [
        ("POST", "/api/credits/check", Some(check.clone())),
        (
            "POST",
            "/api/streaming-sessions/initialize",
            Some(start.clone()),
        ),
        (
            "POST",
            "/api/streaming-sessions/finalize",
            Some(json!({"sessionId": "s1", "actualTokens": 1, "success": true})),
        ),
        (
            "POST",
            "/api/streaming-sessions/abort",
            Some(json!({"sessionId": "s1", "tokensGenerated": 0})),
        ),
        ("GET", "/api/credits/balance", None),
        ("GET", "/api/credits/usage", None),
    ] {
        let answer = server.call(method, path, &alice, body).await;
        assert_eq!(answer.status, 503, "{method} {path}: {answer:?}");
        assert_eq!(answer.body["code"], "LEDGER_UNAVAILABLE", "{path}");
        assert!(
            !answer.body["message"]
                .as_str()
                .unwrap()
                .contains("127.0.0.1")
        );
    }

    // The same port again: the driver reconnects by itself.
    let proxy = TcpProxy::start(host_port(&real).unwrap().to_owned(), Some(proxy.address()))
        .await
        .unwrap();
    let mut answer = server
        .call(
            "POST",
            "/api/streaming-sessions/initialize",
            &alice,
            Some(start.clone()),
        )
        .await;
    // Each attempt waits for the driver's server selection (300 ms at most);
    // the heartbeat (500 ms) finds the server again within a few attempts.
    for _ in 0..40 {
        if answer.status != 503 {
            break;
        }
        answer = server
            .call(
                "POST",
                "/api/streaming-sessions/initialize",
                &alice,
                Some(start.clone()),
            )
            .await;
    }
    assert_eq!(answer.status, 200, "{answer:?}");
    let answer = server
        .call("GET", "/api/credits/balance", &alice, None)
        .await;
    assert_eq!(answer.body["held"], json!(2.058));
    server.stop().await;
    proxy.stop().await;
    let cleanup = parley_service::store::MongoStore::connect(&real, &database)
        .await
        .unwrap();
    common::drop_mongo(cleanup).await;
}

#[tokio::test]
async fn external_mode_lands_in_the_accounting_instance_and_fails_closed() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let accounting = RunningServer::start(dir_b.path(), &[]).await;
    let chat = RunningServer::start(dir_a.path(), &["--accounting-url", &accounting.url("")]).await;
    let alice = alice();

    let answer = chat
        .call(
            "POST",
            "/api/credits/check",
            &alice,
            Some(json!({"userId": "alice", "requiredCredits": 5})),
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["sufficient"], true);
    let answer = chat
        .call(
            "POST",
            "/api/streaming-sessions/initialize",
            &alice,
            Some(json!({"sessionId": "s1", "modelId": "default", "estimatedTokens": 500})),
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["allocatedCredits"], json!(2.548));
    let held = accounting
        .call("GET", "/api/credits/balance", &alice, None)
        .await;
    assert_eq!(held.body["held"], json!(2.548), "the hold is in B's ledger");

    let answer = chat
        .call(
            "POST",
            "/api/streaming-sessions/finalize",
            &alice,
            Some(json!({"sessionId": "s1", "actualTokens": 100, "success": true})),
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["chargedCredits"], json!(0.7));
    let on_b = accounting
        .call("GET", "/api/credits/balance", &alice, None)
        .await;
    assert_eq!(
        on_b.body,
        json!({"userId": "alice", "balance": 9.3, "held": 0.0, "available": 9.3})
    );
    let usage = accounting
        .call("GET", "/api/credits/usage", &alice, None)
        .await;
    assert_eq!(usage.body["records"][0]["sessionId"], "s1");

    // B's refusals come through typed: 402 with the amounts, 400 for models, 403.
    let answer = chat
        .call(
            "POST",
            "/api/streaming-sessions/initialize",
            &alice,
            Some(json!({"sessionId": "s2", "modelId": "default", "estimatedTokens": 9000})),
        )
        .await;
    assert_eq!(answer.status, 402, "{answer:?}");
    assert_eq!(answer.body["available"], json!(9.3));
    assert_eq!(answer.body["requiredCredits"], json!(11.048));
    let answer = chat
        .call(
            "POST",
            "/api/credits/calculate",
            &alice,
            Some(json!({"modelId": "nope"})),
        )
        .await;
    assert_eq!(answer.status, 400);
    assert_eq!(
        answer.body["allowed"],
        json!(["default", "parley-simulated"])
    );
    let answer = chat
        .call(
            "POST",
            "/api/credits/check",
            &alice,
            Some(json!({"userId": "bob", "requiredCredits": 1})),
        )
        .await;
    assert_eq!(answer.status, 403);

    accounting.stop().await;
    for (path, body) in [
        (
            "/api/credits/check",
            json!({"userId": "alice", "requiredCredits": 1}),
        ),
        (
            "/api/streaming-sessions/initialize",
            json!({"sessionId": "s3", "modelId": "default", "estimatedTokens": 1}),
        ),
    ] {
        let answer = chat.call("POST", path, &alice, Some(body)).await;
        assert_eq!(answer.status, 503, "{path}: {answer:?}");
        assert_eq!(answer.body["code"], "ACCOUNTING_UNAVAILABLE");
    }
    let metrics = reqwest::get(chat.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"parley_ledger_denials_total{reason="accounting_unavailable"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"parley_ledger_denials_total{reason="insufficient_credits"} 1"#),
        "{metrics}"
    );
    chat.stop().await;
}

#[tokio::test]
async fn external_mode_replies_are_held_and_settled_in_the_accounting_instance() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let accounting = RunningServer::start(dir_b.path(), &[]).await;
    let chat = RunningServer::start(
        dir_a.path(),
        &[
            "--accounting-url",
            &accounting.url(""),
            "--simulated-first-token-millis",
            "0",
            "--simulated-tokens-per-second",
            "0",
        ],
    )
    .await;
    let alice = alice();
    let session = chat
        .call("POST", "/api/chat/sessions", &alice, Some(json!({})))
        .await;
    let session = session.body["sessionId"].as_str().unwrap().to_owned();
    let reply = chat
        .call(
            "POST",
            &format!("/api/chat/sessions/{session}/messages"),
            &alice,
            Some(json!({"message": "paid elsewhere"})),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    // "paid elsewhere": 8 tokens in (4 for the text, 4 for the turn) at
    // 1/1k, 2 words out at 2/1k.
    assert_eq!(
        reply.body["credits"],
        json!({"charged": 0.012, "remaining": 9.988})
    );
    let on_b = accounting
        .call("GET", "/api/credits/balance", &alice, None)
        .await;
    assert_eq!(
        on_b.body,
        json!({"userId": "alice", "balance": 9.988, "held": 0.0, "available": 9.988})
    );
    let usage = accounting
        .call("GET", "/api/credits/usage", &alice, None)
        .await;
    let record = &usage.body["records"][0];
    assert_eq!(record["outcome"], "completed", "{usage:?}");
    assert!(
        record["sessionId"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{session}/"))
    );

    // Without the accounting server nothing runs: 503 before the model.
    accounting.stop().await;
    let refused = chat
        .call(
            "POST",
            &format!("/api/chat/sessions/{session}/stream"),
            &alice,
            Some(json!({"message": "and now?"})),
        )
        .await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.body["code"], "ACCOUNTING_UNAVAILABLE");
    let stored = chat
        .call(
            "GET",
            &format!("/api/chat/sessions/{session}"),
            &alice,
            None,
        )
        .await;
    assert_eq!(stored.body["messages"].as_array().unwrap().len(), 2);
    chat.stop().await;
}

#[tokio::test]
async fn redis_request_limits_hold_across_two_instances() {
    let redis = parley_test_support::env::redis_url();
    let prefix = parley_test_support::env::unique_name("parley-limits");
    let flags = [
        "--redis-url",
        redis.as_str(),
        "--rate-limit-key-prefix",
        prefix.as_str(),
        "--rate-limit-requests-per-minute",
        "5",
    ];
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = RunningServer::start(dir_a.path(), &flags).await;
    let b = RunningServer::start(dir_b.path(), &flags).await;
    let alice = alice();
    let mut allowed = 0;
    let mut limited = 0;
    for i in 0..10 {
        let server = if i % 2 == 0 { &a } else { &b };
        let answer = server
            .call("GET", "/api/credits/balance", &alice, None)
            .await;
        match answer.status {
            200 => allowed += 1,
            429 => {
                limited += 1;
                assert_eq!(answer.body["code"], "RATE_LIMITED");
                let seconds: u64 = answer.retry_after.unwrap().parse().unwrap();
                assert!((1..=60).contains(&seconds));
            }
            other => panic!("unexpected {other}: {answer:?}"),
        }
    }
    assert_eq!((allowed, limited), (5, 5));
    let bob = token("bob", Role::User, &[]);
    assert_eq!(
        b.call("GET", "/api/credits/balance", &bob, None)
            .await
            .status,
        200
    );
    a.stop().await;
    b.stop().await;
}

/// The reaper's gauge counts open holds on both stores, and it stops on shutdown.
#[tokio::test]
async fn the_reaper_counts_open_holds_and_stops_on_shutdown() {
    use parley_service::accounting::{AccountingMetrics, reaper};
    use parley_service::ledger::{Credits, EmbeddedLedger, HoldRequest};

    let (store, _dir) = common::embedded_store().await;
    let embedded: Arc<dyn Ledger> = Arc::new(
        EmbeddedLedger::new(Arc::clone(store.database()), common::LEDGER_SETTINGS)
            .await
            .unwrap(),
    );
    let mongo_store = common::mongo_store().await;
    let mongo = MongoLedger::new(mongo_store.database(), common::LEDGER_SETTINGS);
    mongo.create_indexes().await.unwrap();
    let mongo: Arc<dyn Ledger> = Arc::new(mongo);
    for ledger in [&embedded, &mongo] {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = AccountingMetrics::register(&mut registry);
        reaper::reap_once(ledger.as_ref(), &metrics).await;
        for (request_id, user) in [("r1", "alice"), ("r2", "alice"), ("r3", "bob")] {
            ledger
                .hold(HoldRequest {
                    request_id: request_id.into(),
                    user: user.into(),
                    session_id: "s".into(),
                    route: "default".into(),
                    model: "parley-simulated".into(),
                    amount: Credits::from_micros(1),
                    lease: std::time::Duration::from_secs(600),
                    progress: None,
                })
                .await
                .unwrap();
        }
        reaper::reap_once(ledger.as_ref(), &metrics).await;
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("parley_credit_holds_open 3"), "{text}");

        let shutdown = CancellationToken::new();
        let task = tokio::spawn(reaper::run(
            Arc::clone(ledger),
            metrics,
            std::time::Duration::from_secs(3600),
            shutdown.clone(),
        ));
        shutdown.cancel();
        task.await.unwrap();
    }
    common::drop_mongo(mongo_store).await;
}
