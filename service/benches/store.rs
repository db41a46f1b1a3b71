//! Latency of create-session and append-message on both stores.
//! Run: `cargo bench -p parley-service --bench store` (needs the test
//! MongoDB-wire server: `source .test-env/env`). Prints p50/p99 per operation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_service::store::{
    EmbeddedStore, Message, MessageRole, MongoStore, NewSession, SessionStore, TokenTotals,
};

const WARMUP: usize = 20;
const SAMPLES: usize = 500;

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let embedded = EmbeddedStore::open(&dir.path().join("bench.redb"))
        .await
        .unwrap();
    run("embedded (redb)", Arc::new(embedded)).await;

    let uri = parley_test_support::env::mongodb_uri();
    let database = parley_test_support::env::unique_name("parley_bench").replace('-', "_");
    let mongo = MongoStore::connect(&uri, &database).await.unwrap();
    run("mongodb (SecantusDB)", Arc::new(mongo.clone())).await;
    mongo.database().drop().await.unwrap();
    mongo.database().client().clone().shutdown().await;
}

async fn run(name: &str, store: Arc<dyn SessionStore>) {
    let mut create = Vec::with_capacity(SAMPLES);
    let mut ids = Vec::with_capacity(SAMPLES);
    for n in 0..WARMUP + SAMPLES {
        let session = NewSession::new(
            format!("user{}", n % 10),
            vec!["c1".into()],
            format!("bench {n}"),
            "default".into(),
            vec![Message::new(
                MessageRole::User,
                "hello, how are you?".into(),
            )],
        );
        let started = Instant::now();
        let created = store.create(session).await.unwrap();
        if n >= WARMUP {
            create.push(started.elapsed());
        }
        ids.push((created.summary.id, created.summary.user_id));
    }
    let mut append = Vec::with_capacity(SAMPLES);
    let reply = "A reply of a typical length, a few sentences long. ".repeat(8);
    for n in 0..WARMUP + SAMPLES {
        let (id, user) = &ids[n % 50];
        let messages = [Message::new(MessageRole::Assistant, reply.clone())];
        let started = Instant::now();
        store
            .append_messages(
                *id,
                user,
                &messages,
                TokenTotals {
                    input: 12,
                    output: 80,
                },
            )
            .await
            .unwrap();
        if n >= WARMUP {
            append.push(started.elapsed());
        }
    }
    report(name, "create-session", &mut create);
    report(name, "append-message", &mut append);
}

fn report(store: &str, operation: &str, samples: &mut [Duration]) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{store:<22} {operation:<15} n={} p50={:>8.3} ms p99={:>8.3} ms",
        samples.len(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
    );
}
