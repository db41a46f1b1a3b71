//! Create-session and append-message on both stores, at several
//! concurrencies: N tasks each create sessions, then append replies to them.
//! Run: `cargo bench -p parley-service --bench store` (needs the test
//! MongoDB-wire server: `source .test-env/env`). Knobs:
//! `PARLEY_BENCH_CONCURRENCY` (default `1,32,256`), `PARLEY_BENCH_OPS`
//! (creates and as many appends per run, default 2000), `PARLEY_BENCH_STORES`
//! (default `embedded,mongodb`). Prints p50/p99 per operation and writes/s.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_service::embedded_db::DEFAULT_CACHE_BYTES;
use parley_service::store::{
    EmbeddedStore, Message, MessageRole, MongoStore, NewSession, SessionStore, TokenTotals,
};
use parley_test_support::bench;

const WARMUP: usize = 20;
/// Each task appends to this many of its sessions in turn.
const SESSIONS_APPENDED_PER_TASK: usize = 5;

#[tokio::main]
async fn main() {
    if bench::store_selected("embedded") {
        let dir = tempfile::tempdir().unwrap();
        let embedded = EmbeddedStore::open(&dir.path().join("bench.redb"), DEFAULT_CACHE_BYTES)
            .await
            .unwrap();
        run("embedded (redb)", Arc::new(embedded)).await;
    }
    if bench::store_selected("mongodb") {
        let uri = parley_test_support::env::mongodb_uri();
        let database = parley_test_support::env::unique_name("parley_bench").replace('-', "_");
        let mongo = MongoStore::connect(&uri, &database).await.unwrap();
        run("mongodb (SecantusDB)", Arc::new(mongo.clone())).await;
        mongo.database().drop().await.unwrap();
        mongo.database().client().clone().shutdown().await;
    }
}

async fn run(name: &str, store: Arc<dyn SessionStore>) {
    let ops = bench::numbers("PARLEY_BENCH_OPS", &[2_000])[0];
    let mut ignored = (Vec::new(), Vec::new());
    create_and_append(store.as_ref(), "warmup", WARMUP, &mut ignored).await;
    for concurrency in bench::numbers("PARLEY_BENCH_CONCURRENCY", &[1, 32, 256]) {
        let per_task = (ops / concurrency).max(1);
        let started = Instant::now();
        let tasks: Vec<_> = (0..concurrency)
            .map(|task| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let mut latencies = (Vec::new(), Vec::new());
                    let user = format!("user{task}");
                    create_and_append(store.as_ref(), &user, per_task, &mut latencies).await;
                    latencies
                })
            })
            .collect();
        let (mut create, mut append) = (Vec::new(), Vec::new());
        for task in tasks {
            let (creates, appends) = task.await.unwrap();
            create.extend(creates);
            append.extend(appends);
        }
        let elapsed = started.elapsed();
        let writes = create.len() + append.len();
        println!(
            "{name:<22} {concurrency:>4} tasks: {writes} writes in {:>7.3}s = {:>7.0} writes/s",
            elapsed.as_secs_f64(),
            writes as f64 / elapsed.as_secs_f64(),
        );
        report(name, "create-session", &mut create);
        report(name, "append-message", &mut append);
    }
}

/// Creates `count` sessions of `user`, then appends `count` replies to the
/// first few of them; pushes each operation's latency.
async fn create_and_append(
    store: &dyn SessionStore,
    user: &str,
    count: usize,
    (create, append): &mut (Vec<Duration>, Vec<Duration>),
) {
    let mut ids = Vec::with_capacity(count);
    for n in 0..count {
        let session = NewSession::new(
            user.to_owned(),
            vec!["c1".into()],
            format!("bench {n}"),
            "default".into(),
            vec![Message::new(MessageRole::User, "hello, how are you?")],
        );
        let started = Instant::now();
        let created = store.create(session).await.unwrap();
        create.push(started.elapsed());
        ids.push(created.summary.id);
    }
    let reply = "A reply of a typical length, a few sentences long. ".repeat(8);
    for n in 0..count {
        let id = ids[n % ids.len().min(SESSIONS_APPENDED_PER_TASK)];
        let messages = [Message::new(MessageRole::Assistant, reply.clone())];
        let started = Instant::now();
        store
            .append_messages(
                id,
                user,
                &messages,
                TokenTotals {
                    input: 12,
                    output: 80,
                },
            )
            .await
            .unwrap();
        append.push(started.elapsed());
    }
}

fn report(store: &str, operation: &str, samples: &mut [Duration]) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{store:<22}        {operation:<15} n={} p50={:>8.3} ms p99={:>8.3} ms",
        samples.len(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
    );
}
