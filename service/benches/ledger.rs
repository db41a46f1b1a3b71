//! Hold + settle throughput of both ledger stores at several concurrencies:
//! N tasks each on its own account, then N tasks on one shared account.
//! Run: `cargo bench -p parley-service --bench ledger` (MongoDB from the test
//! environment: `source .test-env/env`). Knobs: `PARLEY_BENCH_CONCURRENCY`
//! (default `1,32,256`), `PARLEY_BENCH_FLOWS` (flows per run, default 4000),
//! `PARLEY_BENCH_STORES` (default `embedded,mongodb`). A flow is two ledger
//! writes (hold, settle); each is acknowledged only once durable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_service::embedded_db::{DEFAULT_CACHE_BYTES, EmbeddedDb};
use parley_service::ledger::{
    Credits, EmbeddedLedger, Hold, HoldRequest, Ledger, LedgerSettings, MongoLedger, Progress,
    ReplyOutcome, Settlement,
};
use parley_test_support::bench;

const SETTINGS: LedgerSettings = LedgerSettings {
    initial_balance: Credits::from_micros(1_000_000_000_000),
};

/// One reply's ledger work: hold its worst case with the prompt as progress,
/// settle its actual cost.
async fn hold_and_settle(ledger: &dyn Ledger, user: &str, request_id: String) {
    let hold = HoldRequest {
        request_id: request_id.clone(),
        user: user.to_owned(),
        session_id: "bench".to_owned(),
        route: "default".to_owned(),
        model: "simulated".to_owned(),
        amount: Credits::from_micros(5_000),
        lease: Duration::from_secs(60),
        progress: Some(Progress {
            model: "simulated".to_owned(),
            input_tokens: 100,
            output_tokens: 0,
            cost: Credits::from_micros(100),
        }),
    };
    ledger.hold(hold).await.unwrap();
    let settlement = Box::new(|_: &Hold| {
        Ok(Settlement {
            route: "default".to_owned(),
            model: "simulated".to_owned(),
            input_tokens: 100,
            output_tokens: 200,
            cost: Credits::from_micros(3_000),
            outcome: ReplyOutcome::Completed,
            estimated: false,
        })
    });
    ledger.settle(&request_id, settlement).await.unwrap();
}

async fn run(store: &str, ledger: Arc<dyn Ledger>) {
    let flows = bench::numbers("PARLEY_BENCH_FLOWS", &[4_000])[0];
    for concurrency in bench::numbers("PARLEY_BENCH_CONCURRENCY", &[1, 32, 256]) {
        // Each task is its own user, as concurrent requests usually are.
        run_tasks(store, &ledger, concurrency, flows, |task| {
            format!("bench-user-{task}")
        })
        .await;
        if concurrency > 1 {
            // All tasks on one account: every operation contends for one balance.
            run_tasks(store, &ledger, concurrency, flows, |_| {
                "bench-shared".to_owned()
            })
            .await;
        }
    }
}

/// `concurrency` tasks share `flows` flows; `user` names each task's account.
async fn run_tasks(
    store: &str,
    ledger: &Arc<dyn Ledger>,
    concurrency: usize,
    flows: usize,
    user: impl Fn(usize) -> String,
) {
    let per_task = (flows / concurrency).max(1);
    let users: Vec<String> = (0..concurrency).map(&user).collect();
    let accounts = if users.windows(2).any(|pair| pair[0] != pair[1]) {
        format!("{concurrency} users")
    } else {
        "1 user".to_owned()
    };
    let run = uuid::Uuid::new_v4().simple().to_string();
    let started = Instant::now();
    let tasks: Vec<_> = users
        .into_iter()
        .enumerate()
        .map(|(task, user)| {
            let ledger = Arc::clone(ledger);
            let run = run.clone();
            tokio::spawn(async move {
                for i in 0..per_task {
                    hold_and_settle(ledger.as_ref(), &user, format!("{run}-{task}-{i}")).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    let done = per_task * concurrency;
    println!(
        "{store:>8} {concurrency:>4} tasks, {accounts:<10} {done} hold+settle in {:>7.3}s = {:>7.0} flows/s = {:>7.0} writes/s",
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64(),
        2.0 * done as f64 / elapsed.as_secs_f64(),
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if bench::store_selected("embedded") {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(
            EmbeddedDb::open(&dir.path().join("bench.redb"), DEFAULT_CACHE_BYTES)
                .await
                .unwrap(),
        );
        run(
            "embedded",
            Arc::new(EmbeddedLedger::new(db, SETTINGS).await.unwrap()),
        )
        .await;
    }
    if !bench::store_selected("mongodb") {
        return;
    }
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
