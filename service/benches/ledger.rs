//! Hold + settle throughput of both ledger stores, sequential and with 32
//! concurrent tasks. Run: `cargo bench -p parley-service --bench ledger`
//! (MongoDB from the test environment: `source .test-env/env`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_service::ledger::{
    Credits, EmbeddedLedger, HoldRequest, Ledger, LedgerSettings, MongoLedger, ReplyOutcome,
    Settlement,
};

const FLOWS: usize = 2_000;
const CONCURRENCY: usize = 32;
const PER_TASK: usize = FLOWS / CONCURRENCY;
const SETTINGS: LedgerSettings = LedgerSettings {
    initial_balance: Credits::from_micros(1_000_000_000_000),
};

/// One request's ledger work: hold its worst case, settle its actual cost.
async fn hold_and_settle(ledger: &dyn Ledger, user: &str, request_id: String) {
    let hold = HoldRequest {
        request_id: request_id.clone(),
        user: user.to_owned(),
        session_id: "bench".to_owned(),
        route: "default".to_owned(),
        model: "simulated".to_owned(),
        amount: Credits::from_micros(5_000),
        lease: Duration::from_secs(60),
    };
    ledger.hold(hold).await.unwrap();
    let settlement = Settlement {
        request_id,
        route: "default".to_owned(),
        model: "simulated".to_owned(),
        input_tokens: 100,
        output_tokens: 200,
        cost: Credits::from_micros(3_000),
        outcome: ReplyOutcome::Completed,
        estimated: false,
    };
    ledger.settle(settlement).await.unwrap();
}

async fn run(store: &str, ledger: Arc<dyn Ledger>) {
    let started = Instant::now();
    for i in 0..FLOWS {
        hold_and_settle(ledger.as_ref(), "bench-sequential", format!("seq-{i}")).await;
    }
    report(store, "sequential", FLOWS, started.elapsed());

    // Each task is its own user, as concurrent requests usually are.
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|task| {
            let ledger = Arc::clone(&ledger);
            tokio::spawn(async move {
                let user = format!("bench-user-{task}");
                for i in 0..PER_TASK {
                    hold_and_settle(ledger.as_ref(), &user, format!("par-{task}-{i}")).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    report(
        store,
        "32 tasks, 32 users",
        PER_TASK * CONCURRENCY,
        started.elapsed(),
    );

    // All tasks on one account: every operation contends for one balance.
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|task| {
            let ledger = Arc::clone(&ledger);
            tokio::spawn(async move {
                for i in 0..PER_TASK {
                    hold_and_settle(
                        ledger.as_ref(),
                        "bench-shared",
                        format!("shared-{task}-{i}"),
                    )
                    .await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    report(
        store,
        "32 tasks, 1 user",
        PER_TASK * CONCURRENCY,
        started.elapsed(),
    );
}

fn report(store: &str, mode: &str, flows: usize, elapsed: Duration) {
    println!(
        "{store:>8} {mode:<20} {flows} hold+settle in {:>7.3}s = {:>8.0} flows/s",
        elapsed.as_secs_f64(),
        flows as f64 / elapsed.as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(redb::Database::create(dir.path().join("bench.redb")).unwrap());
    run(
        "embedded",
        Arc::new(EmbeddedLedger::new(db, SETTINGS).await.unwrap()),
    )
    .await;

    let client = mongodb::Client::with_uri_str(parley_test_support::env::mongodb_uri())
        .await
        .unwrap();
    let db = client.database(&parley_test_support::env::unique_name("ledger-bench"));
    let ledger = MongoLedger::new(&db, SETTINGS);
    ledger.create_indexes().await.unwrap();
    run("mongodb", Arc::new(ledger)).await;
    db.drop().await.unwrap();
    client.shutdown().await;
}
