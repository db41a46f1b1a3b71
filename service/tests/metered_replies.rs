//! Replies against the credits ledger under load: 1,000 concurrent replies
//! against a balance that covers exactly 100 worst-case holds. Exactly 100
//! run, the balance never goes below zero, and the usage records add up to
//! what was spent — on the embedded store and on MongoDB.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use futures::StreamExt;
use parley_service::auth::Role;
use parley_service::ledger::{
    Credits, EmbeddedLedger, Ledger, LedgerSettings, MongoLedger, Page, UsageOutcome,
};
use parley_service::model_routes::{ProviderRegistry, Routes};
use parley_service::providers::{SimulatedProvider, SimulatedSettings};
use parley_service::stream::{Replies, ReplySettings};
use prometheus_client::registry::Registry;
use serde_json::json;

const REPLIES: usize = 1_000;
const AFFORDABLE: u64 = 100;
const OUTPUT_TOKENS: u32 = 8;
/// Every reply sends this to a fresh session: 18 bytes, 5 tokens and 4 for
/// the turn, as holds estimate them and as the simulated model reports them.
const PROMPT: &str = "what is the answer";
/// Worst case of one reply: 9 input tokens at 1.5/1k plus 8 output tokens at
/// 3/1k = 0.0375 credits. The simulated model always writes exactly the
/// maximum output, so every reply costs its worst case and settling frees
/// nothing: however the replies interleave, exactly 100 can be paid for.
const WORST_CASE: Credits = Credits::from_micros(37_500);
const ROUTES: &str = "
routes:
  - alias: default
    targets:
      - provider: simulated
        model: sim
        pricing: {inputPer1k: 1.5, outputPer1k: 3}
        maxOutputTokens: 8
";

fn settings() -> LedgerSettings {
    LedgerSettings {
        initial_balance: Credits::from_micros(WORST_CASE.micros() * AFFORDABLE),
    }
}

fn app<S: common::TestStore>(sessions: Arc<S>, ledger: Arc<dyn Ledger>) -> Router {
    let mut registry = Registry::default();
    let simulated = SimulatedProvider::new(SimulatedSettings {
        first_token_latency: Duration::ZERO,
        tokens_per_second: None,
        reply_tokens: Some(OUTPUT_TOKENS),
    });
    let replies = Replies::new(
        Routes::from_yaml(ROUTES).unwrap(),
        ProviderRegistry::new(Arc::new(simulated), None, None),
        ReplySettings::new(),
        &mut registry,
    );
    let mut state = common::state_with_replies(sessions, ledger, registry, replies);
    // One user's thousand sessions: far more than one user may keep.
    state.limits.max_sessions_per_user = REPLIES as u64;
    parley_service::app(state)
}

async fn a_thousand_replies_against_a_hundred_holds(router: Router, ledger: &dyn Ledger) {
    let token = common::token("dana", Role::User, &[]);
    let sessions: Vec<String> = futures::stream::iter(0..REPLIES)
        .map(|_| common::create_session(&router, &token, json!({})))
        .buffer_unordered(32)
        .collect()
        .await;

    let replies = sessions.into_iter().map(|session| {
        let router = router.clone();
        let token = token.clone();
        tokio::spawn(async move {
            common::send(
                &router,
                common::request(
                    "POST",
                    &format!("/api/chat/sessions/{session}/messages"),
                    Some(&token),
                    Some(json!({"message": PROMPT})),
                ),
            )
            .await
        })
    });
    let answers = futures::future::join_all(replies).await;
    let mut paid = Vec::new();
    let mut refused = 0;
    for answer in answers {
        let (status, body) = answer.unwrap();
        match status {
            StatusCode::OK => paid.push(body),
            StatusCode::PAYMENT_REQUIRED => {
                assert_eq!(body["code"], "INSUFFICIENT_CREDITS");
                refused += 1;
            }
            other => panic!("unexpected answer {other}: {body}"),
        }
    }
    assert_eq!(paid.len() as u64, AFFORDABLE, "replies that ran");
    assert_eq!(refused, REPLIES - paid.len());
    for body in &paid {
        assert_eq!(body["credits"]["charged"], json!(0.0375), "{body}");
        assert_eq!(body["usage"], json!({"inputTokens": 9, "outputTokens": 8}));
    }

    let balance = ledger.balance("dana").await.unwrap();
    assert_eq!(balance.balance, Credits::ZERO);
    assert_eq!(balance.held, Credits::ZERO);
    let records = ledger
        .usage(
            "dana",
            Page {
                number: 0,
                size: 500,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        records.len() as u64,
        AFFORDABLE,
        "one usage record per reply"
    );
    let mut spent = 0;
    for record in &records {
        assert_eq!(record.outcome, UsageOutcome::Completed);
        assert_eq!(record.charged, WORST_CASE);
        assert!(!record.estimated);
        spent += record.charged.micros();
    }
    assert_eq!(spent, settings().initial_balance.micros());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_affordable_replies_run_on_the_embedded_store() {
    let (store, _dir) = common::embedded_store().await;
    let ledger: Arc<dyn Ledger> = Arc::new(
        EmbeddedLedger::new(Arc::clone(store.database()), settings())
            .await
            .unwrap(),
    );
    let router = app(Arc::new(store), Arc::clone(&ledger));
    a_thousand_replies_against_a_hundred_holds(router, ledger.as_ref()).await;
}

/// The ledger on MongoDB; the sessions stay on the embedded store, as the
/// ledger is what this proves (SecantusDB serves a few hundred writes/s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_affordable_replies_run_on_mongodb() {
    let (sessions, _dir) = common::embedded_store().await;
    let store = common::mongo_store().await;
    let ledger = MongoLedger::new(store.database(), settings());
    ledger.create_indexes().await.unwrap();
    let ledger: Arc<dyn Ledger> = Arc::new(ledger);
    let router = app(Arc::new(sessions), Arc::clone(&ledger));
    a_thousand_replies_against_a_hundred_holds(router, ledger.as_ref()).await;
    common::drop_mongo(store).await;
}
