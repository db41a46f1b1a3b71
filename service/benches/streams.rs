//! Streamed replies through the real service binary over loopback HTTP,
//! against the simulated model, with everything a deployment does on: every
//! reply held and settled in the credits ledger and stored in the embedded
//! store, each client a user of its own, its requests and tokens counted by
//! the rate limiter (under limits high enough for hundreds of replies a
//! minute).
//! Run: `cargo bench -p parley-service --bench streams` (optionally
//! `PARLEY_BENCH_STREAMS=10,1000,10000`, and `PARLEY_BENCH_REPLIES`, default
//! 2000: each of the N clients streams max(1, REPLIES / N) replies one after
//! another, each in a new session, so that small N still gives enough
//! samples). For each N it prints:
//! - time to first token (TTFT) p50/p99 through the service and calling the
//!   simulated provider directly with the same clients, and the difference;
//! - completed replies per second with N concurrent clients;
//! - the same two for streamed `/v1/chat/completions` (the OpenAI-compatible
//!   API, no session: each reply held, settled and recorded as usage), on a
//!   fresh server;
//! - the server's RSS per open stream with N streams open at once.
//!
//! The server runs as a child process, so its RSS is its own;
//! `PARLEY_BENCH_SERVICE=<path>` runs another build of it (an A/B in one
//! sitting).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use parley_service::auth::{Principal, Role, mint_token};
use parley_service::providers::{
    ChatTurn, CompletionRequest, PromptTurns, Provider, ProviderEvent, Role as TurnRole, Sampling,
    SimulatedProvider, SimulatedSettings,
};
use parley_service::turns::History;
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

const SECRET: &str = "bench-secret";
const FIRST_TOKEN_MILLIS: u64 = 20;
/// Fast replies for throughput: 20 tokens, unpaced after the first.
const FAST_REPLY_TOKENS: u32 = 20;
/// Slow replies to hold streams open: 1 token/s for a minute.
const SLOW_REPLY_TOKENS: u32 = 60;
const SETUP_CONCURRENCY: usize = 64;
const QUESTION: &str = "one two three four five";

#[tokio::main]
async fn main() {
    let counts = parley_test_support::bench::numbers("PARLEY_BENCH_STREAMS", &[10, 1000, 10000]);
    let replies = parley_test_support::bench::numbers("PARLEY_BENCH_REPLIES", &[2000])[0];
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .build()
        .unwrap();
    for n in counts {
        let rounds = (replies / n).max(1);
        println!("--- {n} concurrent streams ({rounds} replies each)");
        let fast = Server::start(0, FAST_REPLY_TOKENS).await;
        let direct = direct_ttft(n, rounds, FAST_REPLY_TOKENS).await;
        let clients = fast.sessions(&client, n, rounds).await;
        let started = Instant::now();
        let through = run_streams(fast.base.clone(), &client, clients, None).await;
        let elapsed = started.elapsed();
        report_ttft("direct (provider)", &direct);
        report_throughput("chat API", &direct, &through, elapsed);
        fast.stop().await;

        let fast = Server::start(0, FAST_REPLY_TOKENS).await;
        let clients = (0..n)
            .map(|user| (user_token(user), vec![Reply::Completion; rounds]))
            .collect();
        let started = Instant::now();
        let through = run_streams(fast.base.clone(), &client, clients, None).await;
        report_throughput("/v1/chat/completions", &direct, &through, started.elapsed());
        fast.stop().await;

        let slow = Server::start(1, SLOW_REPLY_TOKENS).await;
        let sessions = slow.sessions(&client, n, 1).await;
        let idle_rss = slow.rss_bytes();
        let all_open = Arc::new(tokio::sync::Barrier::new(n + 1));
        let streams = run_streams(
            slow.base.clone(),
            &client,
            sessions,
            Some(Arc::clone(&all_open)),
        );
        tokio::pin!(streams);
        // Biased: once everyone is at the barrier the streams end too, and
        // an unbiased select could pick that branch.
        tokio::select! {
            biased;
            _ = all_open.wait() => {}
            _ = &mut streams => panic!("streams ended before all were open"),
        }
        let open_rss = slow.rss_bytes();
        println!(
            "server RSS: {:.1} MiB idle, {:.1} MiB with {n} open streams: {:.1} KiB per open stream",
            idle_rss as f64 / 1048576.0,
            open_rss as f64 / 1048576.0,
            open_rss.saturating_sub(idle_rss) as f64 / 1024.0 / n as f64
        );
        slow.stop().await;
    }
}

struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(tokens_per_second: u32, reply_tokens: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let binary =
            parley_test_support::bench::service_binary(env!("CARGO_BIN_EXE_parley-service"));
        let child = Command::new(binary)
            .env("PARLEY_LISTEN", format!("127.0.0.1:{port}"))
            .env("PARLEY_DATA_DIR", dir.path())
            .env("PARLEY_JWT_SECRET", SECRET)
            .env("PARLEY_INITIAL_CREDITS", "1000")
            .env(
                "PARLEY_SIMULATED_FIRST_TOKEN_MILLIS",
                FIRST_TOKEN_MILLIS.to_string(),
            )
            .env(
                "PARLEY_SIMULATED_TOKENS_PER_SECOND",
                tokens_per_second.to_string(),
            )
            .env("PARLEY_SIMULATED_REPLY_TOKENS", reply_tokens.to_string())
            // Limits stay on (every request is counted) but high enough
            // for a client streaming hundreds of replies a minute.
            .env("PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE", "1000000")
            .env("PARLEY_RATE_LIMIT_TOKENS_PER_MINUTE", "100000000")
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
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("{}/health", server.base))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    /// `rounds` sessions for each of `n` users: (token, a reply in each).
    async fn sessions(
        &self,
        client: &reqwest::Client,
        n: usize,
        rounds: usize,
    ) -> Vec<(String, Vec<Reply>)> {
        let permits = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
        let tasks: Vec<_> = (0..n * rounds)
            .map(|index| {
                let (client, token, permits) = (
                    client.clone(),
                    user_token(index / rounds),
                    Arc::clone(&permits),
                );
                let url = format!("{}/api/chat/sessions", self.base);
                tokio::spawn(async move {
                    let _permit = permits.acquire().await.unwrap();
                    let body: serde_json::Value = client
                        .post(url)
                        .bearer_auth(&token)
                        .json(&serde_json::json!({}))
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    (token, body["sessionId"].as_str().unwrap().to_owned())
                })
            })
            .collect();
        let mut clients: Vec<(String, Vec<Reply>)> = Vec::with_capacity(n);
        for (index, task) in tasks.into_iter().enumerate() {
            let (token, session) = task.await.unwrap();
            if index % rounds == 0 {
                clients.push((token, Vec::with_capacity(rounds)));
            }
            clients.last_mut().unwrap().1.push(Reply::Session(session));
        }
        clients
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

    async fn stop(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }
}

/// One streamed reply a client asks for.
#[derive(Clone)]
enum Reply {
    /// In a chat session (`POST /api/chat/sessions/{id}/stream`).
    Session(String),
    /// A streamed `POST /v1/chat/completions` of the default route.
    Completion,
}

/// Each client streams its replies one after another, all clients at once;
/// the TTFT (request to first chunk) of every reply.
/// With `all_open`, each stream waits there after its first chunk and then
/// is dropped (the client disconnects).
async fn run_streams(
    base: String,
    client: &reqwest::Client,
    clients: Vec<(String, Vec<Reply>)>,
    all_open: Option<Arc<tokio::sync::Barrier>>,
) -> Vec<f64> {
    let mut tasks = tokio::task::JoinSet::new();
    for (token, replies) in clients {
        let (client, base, all_open) = (client.clone(), base.clone(), all_open.clone());
        tasks.spawn(async move {
            let mut ttft = Vec::with_capacity(replies.len());
            for reply in &replies {
                ttft.push(stream_one(&client, &base, reply, &token, all_open.as_deref()).await);
            }
            ttft
        });
    }
    // In the order they end, so that a stream that failed is reported at
    // once: with `all_open`, the others wait for it at the barrier forever.
    let mut ttft = Vec::new();
    while let Some(ended) = tasks.join_next().await {
        ttft.extend(ended.unwrap());
    }
    ttft
}

/// Streams one reply; its TTFT.
async fn stream_one(
    client: &reqwest::Client,
    base: &str,
    reply: &Reply,
    token: &str,
    all_open: Option<&tokio::sync::Barrier>,
) -> f64 {
    let (url, body) = match reply {
        Reply::Session(session) => (
            format!("{base}/api/chat/sessions/{session}/stream"),
            serde_json::json!({"message": QUESTION}),
        ),
        Reply::Completion => (
            format!("{base}/v1/chat/completions"),
            serde_json::json!({
                "model": "default",
                "messages": [{"role": "user", "content": QUESTION}],
                "stream": true,
            }),
        ),
    };
    let started = Instant::now();
    let response = client
        .post(url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    if status != reqwest::StatusCode::OK {
        panic!("reply refused: {status} {}", response.text().await.unwrap());
    }
    let mut events = response.bytes_stream().eventsource();
    let mut first_token = None;
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        // Both APIs as one: the chat API's named events, and the OpenAI
        // protocol's unnamed chunks ended by `[DONE]`.
        let kind = match (event.event.as_str(), event.data.as_str()) {
            ("message", "[DONE]") => "complete",
            ("message", data) => completion_event(data),
            (kind, _) => kind,
        };
        match kind {
            "chunk" if first_token.is_none() => {
                first_token = Some(started.elapsed().as_secs_f64());
                if let Some(all_open) = all_open {
                    all_open.wait().await;
                    break;
                }
            }
            "complete" => break,
            "error" => panic!("reply failed: {}", event.data),
            _ => {}
        }
    }
    first_token.unwrap()
}

/// A streamed completion's chunk as the chat API would name it: `chunk`
/// when it has text (not the first one, which has only the role), `error`.
fn completion_event(data: &str) -> &'static str {
    let chunk: serde_json::Value = serde_json::from_str(data).unwrap();
    if chunk.get("error").is_some() {
        "error"
    } else if chunk["choices"][0]["delta"]["content"]
        .as_str()
        .is_some_and(|text| !text.is_empty())
    {
        "chunk"
    } else {
        "other"
    }
}

fn user_token(user: usize) -> String {
    mint_token(
        SECRET.as_bytes(),
        &Principal {
            sub: format!("bench-{user}"),
            role: Role::User,
            cohorts: Vec::new(),
        },
        Duration::from_secs(3600),
        None,
        None,
    )
    .unwrap()
}

/// TTFT of the simulated provider itself: N clients at once, each streaming
/// `rounds` replies one after another.
async fn direct_ttft(n: usize, rounds: usize, reply_tokens: u32) -> Vec<f64> {
    let provider = Arc::new(SimulatedProvider::new(SimulatedSettings {
        first_token_latency: Duration::from_millis(FIRST_TOKEN_MILLIS),
        tokens_per_second: None,
        reply_tokens: Some(reply_tokens),
    }));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let provider = Arc::clone(&provider);
            tokio::spawn(async move {
                let mut ttft = Vec::with_capacity(rounds);
                for _ in 0..rounds {
                    let started = Instant::now();
                    let mut stream = provider
                        .stream(CompletionRequest {
                            model: "sim".into(),
                            turns: PromptTurns::new(
                                Arc::from([]),
                                History::default(),
                                ChatTurn::new(TurnRole::User, QUESTION),
                            ),
                            max_output_tokens: 1024,
                            timeout: Duration::from_secs(60),
                            guardrail: None,
                            sampling: Sampling::default(),
                        })
                        .await
                        .unwrap();
                    let mut first = None;
                    while let Some(event) = stream.next().await {
                        if let ProviderEvent::Delta(_) = event.unwrap() {
                            first.get_or_insert(started.elapsed().as_secs_f64());
                        }
                    }
                    ttft.push(first.expect("no delta"));
                }
                ttft
            })
        })
        .collect();
    let mut ttft = Vec::with_capacity(n * rounds);
    for task in tasks {
        ttft.extend(task.await.unwrap());
    }
    ttft
}

fn percentile(samples: &[f64], q: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index]
}

/// TTFT through the service, what it adds to the provider's, and completed
/// replies per second.
fn report_throughput(api: &str, direct: &[f64], through: &[f64], elapsed: Duration) {
    report_ttft(&format!("through the {api}"), through);
    println!(
        "added TTFT ({api}): p50 {:.2} ms, p99 {:.2} ms",
        (percentile(through, 0.50) - percentile(direct, 0.50)) * 1e3,
        (percentile(through, 0.99) - percentile(direct, 0.99)) * 1e3,
    );
    println!(
        "completed replies/s ({api}): {:.0} ({} replies of {FAST_REPLY_TOKENS} tokens in {:.2} s)",
        through.len() as f64 / elapsed.as_secs_f64(),
        through.len(),
        elapsed.as_secs_f64()
    );
}

fn report_ttft(name: &str, samples: &[f64]) {
    println!(
        "TTFT {name}: p50 {:.2} ms, p99 {:.2} ms",
        percentile(samples, 0.50) * 1e3,
        percentile(samples, 0.99) * 1e3
    );
}
