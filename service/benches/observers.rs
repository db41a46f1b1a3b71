//! Live observation through the real service binary over loopback HTTP:
//! one reply watched by N observers, on the replica generating it and on
//! another replica through Redis; and what the Redis hub adds to time to
//! first token.
//!
//! Run with the test servers up (`source .test-env/env`; the two-replica
//! runs need PARLEY_TEST_REDIS_URL and PARLEY_TEST_MONGODB_URI):
//! `cargo bench -p parley-service --bench observers`, optionally with
//! `PARLEY_BENCH_OBSERVERS=1,100,1000` and `PARLEY_BENCH_TTFT_CLIENTS=10`.
//! For each N and each layout it prints:
//! - delivery lag p50/p99: for every event, when an observer received it
//!   minus when the owner received it (both clients in this process);
//! - the server's own `parley_hub_delivery_lag_seconds` (event produced ->
//!   handed to an observer's connection), p50/p99 as histogram bucket bounds;
//! - the observing server's RSS per observer, waiting and during the reply.
//!
//! Then, with 10 clients streaming replies one after another, TTFT p50/p99
//! with and without `PARLEY_REDIS_URL` (embedded store both times).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use parley_service::auth::{Principal, Role, mint_token};
use parley_test_support::env;
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

const SECRET: &str = "bench-secret";
/// One observed reply: 200 tokens at 100 tokens/s.
const OBSERVED_TOKENS: u32 = 200;
const OBSERVED_PACE: u32 = 100;
/// Replies for the TTFT comparison: 20 tokens, unpaced after the first.
const TTFT_REPLIES_PER_CLIENT: usize = 200;
const CONNECT_CONCURRENCY: usize = 64;

#[tokio::main]
async fn main() {
    let counts = parley_test_support::bench::numbers("PARLEY_BENCH_OBSERVERS", &[1, 100, 1000]);
    let ttft_clients = parley_test_support::bench::numbers("PARLEY_BENCH_TTFT_CLIENTS", &[10])[0];
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .build()
        .unwrap();
    for n in counts {
        println!("--- one reply, {n} observers");
        let one = Server::start(&Shared::none(), OBSERVED_PACE, OBSERVED_TOKENS).await;
        observe(&client, &one, &one, n, "one replica").await;
        one.stop().await;

        let shared = Shared::redis_and_mongodb();
        let a = Server::start(&shared, OBSERVED_PACE, OBSERVED_TOKENS).await;
        let b = Server::start(&shared, OBSERVED_PACE, OBSERVED_TOKENS).await;
        observe(&client, &a, &b, n, "two replicas through Redis").await;
        a.stop().await;
        b.stop().await;
    }

    println!(
        "--- TTFT at {ttft_clients} concurrent clients, {TTFT_REPLIES_PER_CLIENT} replies each"
    );
    let mut results = Vec::new();
    for (name, shared) in [
        ("in-process hub", Shared::none()),
        ("Redis hub", Shared::redis_only()),
    ] {
        let server = Server::start(&shared, 0, 20).await;
        let ttft = stream_replies(&client, &server, ttft_clients).await;
        println!(
            "TTFT with the {name}: p50 {:.2} ms, p99 {:.2} ms",
            percentile(&ttft, 0.50) * 1e3,
            percentile(&ttft, 0.99) * 1e3
        );
        results.push(ttft);
        server.stop().await;
    }
    println!(
        "the Redis hub adds: p50 {:.2} ms, p99 {:.2} ms",
        (percentile(&results[1], 0.50) - percentile(&results[0], 0.50)) * 1e3,
        (percentile(&results[1], 0.99) - percentile(&results[0], 0.99)) * 1e3
    );
}

/// What replicas share: the hub (Redis) and the store (MongoDB).
struct Shared {
    environment: Vec<(&'static str, String)>,
}

impl Shared {
    fn none() -> Self {
        Self {
            environment: Vec::new(),
        }
    }

    fn redis_only() -> Self {
        let prefix = env::unique_name("bench");
        Self {
            environment: vec![
                ("PARLEY_REDIS_URL", env::redis_url()),
                ("PARLEY_HUB_KEY_PREFIX", format!("{prefix}:hub")),
                ("PARLEY_RATE_LIMIT_KEY_PREFIX", format!("{prefix}:limits")),
            ],
        }
    }

    fn redis_and_mongodb() -> Self {
        let mut shared = Self::redis_only();
        shared
            .environment
            .push(("PARLEY_MONGODB_URI", env::mongodb_uri()));
        shared.environment.push((
            "PARLEY_MONGODB_DATABASE",
            env::unique_name("bench").replace('-', "_"),
        ));
        shared
    }
}

struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(shared: &Shared, tokens_per_second: u32, reply_tokens: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_parley-service"))
            .envs(shared.environment.iter().map(|(k, v)| (k, v)))
            .env("PARLEY_LISTEN", format!("127.0.0.1:{port}"))
            .env("PARLEY_DATA_DIR", dir.path())
            .env("PARLEY_JWT_SECRET", SECRET)
            .env("PARLEY_INITIAL_CREDITS", "1000")
            .env("PARLEY_SIMULATED_FIRST_TOKEN_MILLIS", "20")
            .env(
                "PARLEY_SIMULATED_TOKENS_PER_SECOND",
                tokens_per_second.to_string(),
            )
            .env("PARLEY_SIMULATED_REPLY_TOKENS", reply_tokens.to_string())
            .env("PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE", "1000000")
            .env("PARLEY_RATE_LIMIT_TOKENS_PER_MINUTE", "100000000")
            .env("PARLEY_OBSERVER_BUFFER_EVENTS", "4096")
            .env("PARLEY_REATTACH_GRACE_SECONDS", "0")
            .env("PARLEY_SHUTDOWN_DRAIN_SECONDS", "2")
            .env("PARLEY_STREAM_DRAIN_SECONDS", "0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let server = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        parley_test_support::bench::wait_until_ready(&server.base).await;
        server
    }

    fn rss_bytes(&self) -> u64 {
        let pid = self.child.id().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap();
        kib * 1024
    }

    /// The p50 and p99 bucket bounds of `parley_hub_delivery_lag_seconds`.
    async fn delivery_lag(&self) -> (f64, f64) {
        let text = reqwest::get(format!("{}/metrics", self.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let buckets: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|line| line.strip_prefix("parley_hub_delivery_lag_seconds_bucket{le=\""))
            .filter_map(|rest| {
                let (bound, count) = rest.split_once("\"} ")?;
                let bound = if bound == "+Inf" {
                    f64::INFINITY
                } else {
                    bound.parse().ok()?
                };
                Some((bound, count.trim().parse().ok()?))
            })
            .collect();
        let total = buckets.last().map_or(0.0, |(_, count)| *count);
        let quantile = |q: f64| {
            buckets
                .iter()
                .find(|(_, count)| *count >= total * q)
                .map_or(f64::NAN, |(bound, _)| *bound)
        };
        (quantile(0.50), quantile(0.99))
    }

    async fn stop(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }
}

/// One reply generated on `owner_side`, watched by `n` observers on
/// `observer_side`.
async fn observe(
    client: &reqwest::Client,
    owner_side: &Server,
    observer_side: &Server,
    n: usize,
    layout: &str,
) {
    let user = token("owner", Role::User, "c1");
    let supervisor = token("supervisor", Role::Supervisor, "c1");
    let session: serde_json::Value = client
        .post(format!("{}/api/chat/sessions", owner_side.base))
        .bearer_auth(&user)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = session["sessionId"].as_str().unwrap().to_owned();
    let idle_rss = observer_side.rss_bytes();
    let url = format!("{}/api/chat/sessions/{session}/observe", observer_side.base);
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let connecting: Vec<_> = (0..n)
        .map(|_| {
            let (client, url, supervisor, permits) = (
                client.clone(),
                url.clone(),
                supervisor.clone(),
                Arc::clone(&permits),
            );
            tokio::spawn(async move {
                let _permit = permits.acquire().await.unwrap();
                let response = client
                    .get(url)
                    .bearer_auth(supervisor)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200);
                response
            })
        })
        .collect();
    let mut observers = Vec::with_capacity(n);
    for connecting in connecting {
        observers.push(connecting.await.unwrap());
    }
    let waiting_rss = observer_side.rss_bytes();
    let receiving: Vec<_> = observers
        .into_iter()
        .map(|response| tokio::spawn(receive_until_ended(response)))
        .collect();

    let response = client
        .post(format!(
            "{}/api/chat/sessions/{session}/stream",
            owner_side.base
        ))
        .bearer_auth(&user)
        .json(&serde_json::json!({"message": "observe this reply"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut owner_received = HashMap::new();
    let mut events = response.bytes_stream().eventsource();
    let mut peak_rss = observer_side.rss_bytes();
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        if let Ok(id) = event.id.parse::<u64>() {
            owner_received.insert(id, Instant::now());
        }
        if event.event == "chunk" && owner_received.len() % 50 == 0 {
            peak_rss = peak_rss.max(observer_side.rss_bytes());
        }
        if event.event == "complete" || event.event == "error" {
            break;
        }
    }
    let mut lags = Vec::new();
    for receiving in receiving {
        for (id, at) in receiving.await.unwrap() {
            let owner_at = owner_received[&id];
            lags.push(at.saturating_duration_since(owner_at).as_secs_f64());
        }
    }
    let (server_p50, server_p99) = observer_side.delivery_lag().await;
    println!(
        "{layout}: delivery lag after the owner p50 {:.2} ms, p99 {:.2} ms over {} deliveries; \
         server-side lag p50 <= {:.2} ms, p99 <= {:.2} ms",
        percentile(&lags, 0.50) * 1e3,
        percentile(&lags, 0.99) * 1e3,
        lags.len(),
        server_p50 * 1e3,
        server_p99 * 1e3,
    );
    println!(
        "{layout}: observing server RSS {:.1} MiB idle; {:.1} KiB per waiting observer; {:.1} KiB per observer during the reply",
        idle_rss as f64 / 1048576.0,
        waiting_rss.saturating_sub(idle_rss) as f64 / 1024.0 / n as f64,
        peak_rss.saturating_sub(idle_rss) as f64 / 1024.0 / n as f64,
    );
}

/// The ids an observer received and when, until its `observe ended`.
async fn receive_until_ended(response: reqwest::Response) -> Vec<(u64, Instant)> {
    let mut received = Vec::new();
    let mut events = response.bytes_stream().eventsource();
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        if let Ok(id) = event.id.parse::<u64>() {
            received.push((id, Instant::now()));
        }
        if event.event == "observe" && event.data.contains("\"ended\"") {
            break;
        }
        assert_ne!(event.event, "error", "an observer failed: {}", event.data);
    }
    received
}

/// `clients` users each streaming replies one after another; every TTFT.
async fn stream_replies(client: &reqwest::Client, server: &Server, clients: usize) -> Vec<f64> {
    let tasks: Vec<_> = (0..clients)
        .map(|index| {
            let (client, base) = (client.clone(), server.base.clone());
            tokio::spawn(async move {
                let user = token(&format!("ttft-{index}"), Role::User, "c1");
                let mut ttft = Vec::with_capacity(TTFT_REPLIES_PER_CLIENT);
                for _ in 0..TTFT_REPLIES_PER_CLIENT {
                    let session: serde_json::Value = client
                        .post(format!("{base}/api/chat/sessions"))
                        .bearer_auth(&user)
                        .json(&serde_json::json!({}))
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    let session = session["sessionId"].as_str().unwrap();
                    let started = Instant::now();
                    let response = client
                        .post(format!("{base}/api/chat/sessions/{session}/stream"))
                        .bearer_auth(&user)
                        .json(&serde_json::json!({"message": "one two three"}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                    let mut events = response.bytes_stream().eventsource();
                    let mut first = None;
                    while let Some(event) = events.next().await {
                        let event = event.unwrap();
                        if event.event == "chunk" {
                            first.get_or_insert(started.elapsed().as_secs_f64());
                        }
                        if event.event == "complete" {
                            break;
                        }
                        assert_ne!(event.event, "error", "{}", event.data);
                    }
                    ttft.push(first.expect("no chunk"));
                }
                ttft
            })
        })
        .collect();
    let mut ttft = Vec::new();
    for task in tasks {
        ttft.extend(task.await.unwrap());
    }
    ttft
}

fn token(sub: &str, role: Role, cohort: &str) -> String {
    mint_token(
        SECRET.as_bytes(),
        &Principal {
            sub: sub.to_owned(),
            role,
            cohorts: vec![cohort.to_owned()],
        },
        Duration::from_secs(3600),
        None,
        None,
    )
    .unwrap()
}

fn percentile(samples: &[f64], q: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index]
}
