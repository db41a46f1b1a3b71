//! The reply path as a gateway: the release service binary in front of a
//! zero-latency OpenAI-compatible mock upstream (N-token streamed replies),
//! with everything a deployment does on (JWT, credits held and settled,
//! rate limits counted, replies stored in the embedded store), driven by
//! closed-loop clients that each stream replies one after another in one
//! chat session of their own.
//!
//! Run: `cargo bench -p parley-service --bench gateway` (optionally
//! `PARLEY_BENCH_CONCURRENCY=1,10,100`, `PARLEY_BENCH_SECONDS=10` per level,
//! `PARLEY_BENCH_TOKENS=64` per reply, `PARLEY_BENCH_SESSION_REPLIES=500`, or
//! 0 to leave the long session out).
//! For each level it prints replies/s, time to first token p50/p99 through
//! the service and straight from the mock (the same clients, the same run),
//! the service's CPU time per reply (from /proc), its peak RSS, and the mean
//! size of the request it sent the mock (the prompt); then the mock alone
//! (the harness's floor); then the cost of the 1st and the last replies of
//! one long session, which should not grow with its length; and
//! last, whatever the service logged at warning level or above (the cause
//! of any failed reply).
//!
//! Times on a shared machine move 20–30% from run to run. Two settings make
//! comparisons steadier: `PARLEY_BENCH_SERVICE=<path>` runs another build of
//! the service (an A/B in one sitting), and `PARLEY_BENCH_CALLGRIND=1` runs
//! the service under valgrind's callgrind and adds the instructions it
//! executed per reply, a count the machine's load does not move (times
//! under valgrind are many times slower and mean nothing then).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use parley_service::auth::{Principal, Role, mint_token};
use tokio::process::{Child, Command};

const SECRET: &str = "bench-secret";
const MODEL: &str = "mock-64";

#[tokio::main]
async fn main() {
    let levels = parley_test_support::bench::numbers("PARLEY_BENCH_CONCURRENCY", &[1, 10, 100]);
    let seconds = parley_test_support::bench::numbers("PARLEY_BENCH_SECONDS", &[10])[0];
    let tokens = parley_test_support::bench::numbers("PARLEY_BENCH_TOKENS", &[64])[0];
    let session_replies =
        parley_test_support::bench::numbers("PARLEY_BENCH_SESSION_REPLIES", &[500])[0];
    let duration = Duration::from_secs(seconds as u64);
    let mock = Mock::start(tokens).await;
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .build()
        .unwrap();
    let server = Server::start(&mock.base).await;
    let counted = server.callgrind.is_some();
    println!(
        "{tokens}-token replies, {seconds} s per level, each client one session; \
         the mock and the clients share the machine with the service"
    );
    println!(
        "| clients | replies/s | TTFT p50 / p99 through Parley | TTFT p50 / p99 from the mock | added p50 | CPU per reply (user + system) | peak RSS | request to the mock | failed replies |{}",
        if counted {
            " instructions per reply |"
        } else {
            ""
        }
    );
    println!(
        "|---|---|---|---|---|---|---|---|---|{}",
        if counted { "---|" } else { "" }
    );
    for clients in levels.iter().copied() {
        let direct = closed_loop(clients, duration, |_| {
            let (client, base) = (client.clone(), mock.base.clone());
            move |_: usize| {
                let (client, base) = (client.clone(), base.clone());
                async move { direct_reply(&client, &base).await }
            }
        })
        .await;
        let sessions = server.sessions(&client, clients).await;
        let cpu_before = server.cpu_seconds();
        server.zero_instructions();
        mock.take_received();
        let through = closed_loop(clients, duration, |index| {
            let (client, base) = (client.clone(), server.base.clone());
            let (token, session) = sessions[index].clone();
            move |_: usize| {
                let (client, base, token, session) =
                    (client.clone(), base.clone(), token.clone(), session.clone());
                async move { service_reply(&client, &base, &token, &session).await }
            }
        })
        .await;
        let cpu = server.cpu_seconds() - cpu_before;
        let request_bytes = mock.take_received();
        let instructions = server
            .instructions()
            .map(|count| format!(" {:.0} |", count as f64 / through.replies() as f64))
            .unwrap_or_default();
        println!(
            "| {clients} | {:.0} | {:.2} / {:.2} ms | {:.2} / {:.2} ms | +{:.2} ms | {} | {:.0} MiB | {:.1} KiB | {} |{instructions}",
            through.rate(),
            through.ttft(0.50) * 1e3,
            through.ttft(0.99) * 1e3,
            direct.ttft(0.50) * 1e3,
            direct.ttft(0.99) * 1e3,
            (through.ttft(0.50) - direct.ttft(0.50)) * 1e3,
            cpu.per_reply(through.replies()),
            server.peak_rss_bytes() as f64 / 1048576.0,
            request_bytes / 1024.0,
            through.failures(),
        );
    }
    let floor = closed_loop(*levels.last().unwrap(), duration, |_| {
        let (client, base) = (client.clone(), mock.base.clone());
        move |_: usize| {
            let (client, base) = (client.clone(), base.clone());
            async move { direct_reply(&client, &base).await }
        }
    })
    .await;
    println!(
        "the mock alone at {} clients: {:.0} replies/s",
        levels.last().unwrap(),
        floor.rate()
    );

    // PARLEY_BENCH_SESSION_REPLIES=0 leaves the long session out.
    if session_replies > 0 {
        growing_session(&server, &client, session_replies, counted).await;
    }
    if let Some(counts) = &server.callgrind {
        println!(
            "callgrind's counts, one file per level and per tenth: {}.*",
            counts.display()
        );
    }
    // A failed reply is rare here; the service's log says why.
    let logged = server.logged();
    if !logged.is_empty() {
        println!(
            "the service's log at warning level and above ({} lines; up to 10 shown):",
            logged.len()
        );
        for line in logged.iter().take(10) {
            println!("  {line}");
        }
    }
    server.stop().await;
}

/// One session growing reply by reply: the cost of its first and its last
/// tenth of `replies`, which should not grow with its length.
async fn growing_session(server: &Server, client: &reqwest::Client, replies: usize, counted: bool) {
    let (token, session) = server.sessions(client, 1).await.remove(0);
    let tenth = (replies / 10).max(1);
    let mut costs = Vec::new();
    for part in 0..10 {
        let ran_before = server.thread_run_nanos();
        server.zero_instructions();
        let mut ttft = Vec::with_capacity(tenth);
        for _ in 0..tenth {
            // A failed reply (printed) is no sample.
            match service_reply(client, &server.base, &token, &session).await {
                Ok(first) => ttft.push(first),
                Err(code) => eprintln!("one session: a reply failed: {code}"),
            }
        }
        let cpu = server.cpu_seconds_since(&ran_before);
        let instructions = server
            .instructions()
            .map_or(0.0, |count| count as f64 / tenth as f64);
        costs.push((
            cpu / tenth as f64,
            percentile(&mut ttft, 0.50),
            instructions,
        ));
        if part == 0 || part == 9 {
            println!(
                "one session, replies {}-{}: CPU per reply {:.3} ms, TTFT p50 {:.2} ms{}",
                part * tenth + 1,
                (part + 1) * tenth,
                costs[part].0 * 1e3,
                costs[part].1 * 1e3,
                if counted {
                    format!(", {instructions:.0} instructions per reply")
                } else {
                    String::new()
                }
            );
        }
    }
    println!(
        "last tenth / first tenth: CPU per reply x{:.2}, TTFT p50 x{:.2}{}",
        costs[9].0 / costs[0].0,
        costs[9].1 / costs[0].1,
        if counted {
            format!(", instructions per reply x{:.2}", costs[9].2 / costs[0].2)
        } else {
            String::new()
        }
    );
}

/// TTFTs of completed replies, the failed ones by error code, and the time
/// they took.
struct Run {
    ttft: Vec<f64>,
    failed: BTreeMap<String, usize>,
    elapsed: Duration,
}

impl Run {
    fn replies(&self) -> usize {
        self.ttft.len()
    }

    fn rate(&self) -> f64 {
        self.replies() as f64 / self.elapsed.as_secs_f64()
    }

    fn failures(&self) -> String {
        if self.failed.is_empty() {
            return "none".to_owned();
        }
        let counts: Vec<String> = self
            .failed
            .iter()
            .map(|(code, count)| format!("{count} {code}"))
            .collect();
        counts.join(", ")
    }

    fn ttft(&self, q: f64) -> f64 {
        percentile(&mut self.ttft.clone(), q)
    }
}

/// `clients` tasks, each running `reply` one after another until `duration`
/// is over; every TTFT.
async fn closed_loop<M, R, F>(clients: usize, duration: Duration, make: M) -> Run
where
    M: Fn(usize) -> R,
    R: Fn(usize) -> F + Send + 'static,
    F: std::future::Future<Output = Result<f64, String>> + Send,
{
    let over = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|index| {
            let reply = make(index);
            let over = Arc::clone(&over);
            tokio::spawn(async move {
                let mut ttft = Vec::new();
                let mut failed = Vec::new();
                let mut round = 0;
                while !over.load(Ordering::Relaxed) {
                    match reply(round).await {
                        Ok(first) => ttft.push(first),
                        Err(code) => failed.push(code),
                    }
                    round += 1;
                }
                (ttft, failed)
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    over.store(true, Ordering::Relaxed);
    let mut ttft = Vec::new();
    let mut failed = BTreeMap::new();
    for task in tasks {
        let (first, codes) = task.await.unwrap();
        ttft.extend(first);
        for code in codes {
            *failed.entry(code).or_insert(0) += 1;
        }
    }
    Run {
        ttft,
        failed,
        elapsed: started.elapsed(),
    }
}

/// Streams one reply through the service; its TTFT (request to first chunk),
/// or the error code it failed with.
async fn service_reply(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    session: &str,
) -> Result<f64, String> {
    let started = Instant::now();
    let response = client
        .post(format!("{base}/api/chat/sessions/{session}/stream"))
        .bearer_auth(token)
        .json(&serde_json::json!({"message": "one two three four five six seven eight"}))
        .send()
        .await
        .unwrap();
    if response.status() != 200 {
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        return Err(body["code"].as_str().unwrap_or("HTTP error").to_owned());
    }
    let mut events = response.bytes_stream().eventsource();
    let mut first = None;
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        match event.event.as_str() {
            "chunk" => {
                first.get_or_insert(started.elapsed().as_secs_f64());
            }
            "complete" => break,
            "error" => {
                let body: serde_json::Value = serde_json::from_str(&event.data).unwrap_or_default();
                return Err(body["code"].as_str().unwrap_or("error event").to_owned());
            }
            _ => {}
        }
    }
    Ok(first.expect("no chunk"))
}

/// Streams one reply straight from the mock; its TTFT.
async fn direct_reply(client: &reqwest::Client, base: &str) -> Result<f64, String> {
    let started = Instant::now();
    let response = client
        .post(format!("{base}/chat/completions"))
        .json(&serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "one two three four five six seven eight"}],
            "max_tokens": 64,
            "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut events = response.bytes_stream().eventsource();
    let mut first = None;
    while let Some(event) = events.next().await {
        let event = event.unwrap();
        if event.data == "[DONE]" {
            break;
        }
        first.get_or_insert(started.elapsed().as_secs_f64());
    }
    Ok(first.expect("no chunk"))
}

/// A zero-latency OpenAI-compatible upstream: every streamed reply is the
/// same `tokens` chunks, a finish and usage, sent at once.
struct Mock {
    base: String,
    received: Arc<Received>,
}

/// Request bodies the mock received since [`Mock::take_received`].
#[derive(Default)]
struct Received {
    requests: AtomicU64,
    bytes: AtomicU64,
}

impl Mock {
    async fn start(tokens: usize) -> Self {
        let mut body = String::new();
        let chunk = |delta: &str, finish: &str| {
            format!(
                "data: {{\"id\":\"mock\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"{MODEL}\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]}}\n\n"
            )
        };
        body.push_str(&chunk("{\"role\":\"assistant\",\"content\":\"\"}", "null"));
        for index in 0..tokens {
            body.push_str(&chunk(&format!("{{\"content\":\" t{index}\"}}"), "null"));
        }
        body.push_str(&chunk("{}", "\"stop\""));
        body.push_str(&format!(
            "data: {{\"id\":\"mock\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"{MODEL}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":{tokens},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
            tokens + 12
        ));
        let body = Bytes::from(body);
        let received = Arc::new(Received::default());
        let counters = Arc::clone(&received);
        // The request is read whole, as by any real server: a server that
        // answers without reading it closes the connection, and the service
        // then meets a broken pooled connection now and then (a failed reply).
        let app = Router::new().route(
            "/v1/chat/completions",
            post(move |request: Bytes| {
                counters.requests.fetch_add(1, Ordering::Relaxed);
                let bytes = request.len() as u64;
                counters.bytes.fetch_add(bytes, Ordering::Relaxed);
                let body = body.clone();
                async move { ([("content-type", "text/event-stream")], body) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            base: format!("http://{address}/v1"),
            received,
        }
    }

    /// The mean size of the request bodies received since the last call.
    fn take_received(&self) -> f64 {
        let requests = self.received.requests.swap(0, Ordering::Relaxed);
        let bytes = self.received.bytes.swap(0, Ordering::Relaxed);
        bytes as f64 / requests.max(1) as f64
    }
}

struct Server {
    child: Child,
    base: String,
    /// Where callgrind writes its counts, when the service runs under it.
    callgrind: Option<std::path::PathBuf>,
    /// The service's log (`RUST_LOG=warn`: empty unless something failed).
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(upstream: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let routes = dir.path().join("routes.yaml");
        let log = dir.path().join("service.log");
        std::fs::write(
            &routes,
            format!(
                "routes:\n  - alias: default\n    targets:\n      - provider: openai\n        model: {MODEL}\n        pricing: {{inputPer1k: 0.001, outputPer1k: 0.001}}\n        maxOutputTokens: 64\n"
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let binary =
            parley_test_support::bench::service_binary(env!("CARGO_BIN_EXE_parley-service"));
        // Kept after the run, for `callgrind_annotate`.
        let callgrind = std::env::var_os("PARLEY_BENCH_CALLGRIND")
            .is_some_and(|value| value == "1")
            .then(|| {
                let kept = tempfile::Builder::new()
                    .prefix("parley-gateway-callgrind.")
                    .tempdir()
                    .unwrap()
                    .keep();
                kept.join("callgrind.out")
            });
        let mut command = match &callgrind {
            Some(counts) => {
                let mut command = Command::new("valgrind");
                command
                    .arg("--tool=callgrind")
                    .arg(format!("--callgrind-out-file={}", counts.display()))
                    .arg(format!("--log-file={}.log", counts.display()))
                    .arg(&binary);
                command
            }
            None => Command::new(&binary),
        };
        let child = command
            .env("PARLEY_LISTEN", format!("127.0.0.1:{port}"))
            .env("PARLEY_DATA_DIR", dir.path().join("data"))
            .env("PARLEY_ROUTES_FILE", &routes)
            .env("PARLEY_OPENAI_BASE_URL", upstream)
            .env("PARLEY_JWT_SECRET", SECRET)
            .env("PARLEY_INITIAL_CREDITS", "1000000")
            // Limits stay on (every request and token is counted) but are
            // never reached.
            .env("PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE", "1000000000")
            .env("PARLEY_RATE_LIMIT_TOKENS_PER_MINUTE", "1000000000000")
            .env("PARLEY_RATE_LIMIT_CONCURRENT_STREAMS", "1000")
            .env("PARLEY_REATTACH_GRACE_SECONDS", "0")
            .env("PARLEY_SHUTDOWN_DRAIN_SECONDS", "2")
            .env("PARLEY_STREAM_DRAIN_SECONDS", "0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let server = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            callgrind,
            log,
            _dir: dir,
        };
        parley_test_support::bench::wait_until_ready(&server.base).await;
        server
    }

    /// A user and a session of its own for each of `clients`.
    async fn sessions(&self, client: &reqwest::Client, clients: usize) -> Vec<(String, String)> {
        let mut sessions = Vec::with_capacity(clients);
        for index in 0..clients {
            let token = mint_token(
                SECRET.as_bytes(),
                &Principal {
                    sub: format!("gateway-{index}-{}", uuid::Uuid::new_v4().simple()),
                    role: Role::User,
                    cohorts: Vec::new(),
                },
                Duration::from_secs(3600),
                None,
                None,
            )
            .unwrap();
            let session: serde_json::Value = client
                .post(format!("{}/api/chat/sessions", self.base))
                .bearer_auth(&token)
                .json(&serde_json::json!({}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            sessions.push((token, session["sessionId"].as_str().unwrap().to_owned()));
        }
        sessions
    }

    fn proc_status_kib(&self, field: &str) -> u64 {
        let pid = self.child.id().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Under callgrind: counting starts again from zero.
    fn zero_instructions(&self) {
        if self.callgrind.is_some() {
            self.callgrind_control("-z");
        }
    }

    /// Under callgrind: the instructions the service executed since the
    /// counts were last zeroed.
    fn instructions(&self) -> Option<u64> {
        let counts = self.callgrind.as_ref()?;
        self.callgrind_control("-d");
        // Each dump is a file of its own: `<out>.<n>`, the newest the highest.
        let prefix = format!("{}.", counts.file_name()?.to_str()?);
        let newest = std::fs::read_dir(counts.parent()?)
            .unwrap()
            .filter_map(|entry| {
                let name = entry.unwrap().file_name().into_string().ok()?;
                let number: u32 = name.strip_prefix(&prefix)?.parse().ok()?;
                Some((number, counts.with_file_name(name)))
            })
            .max()?
            .1;
        let dump = std::fs::read_to_string(newest).unwrap();
        dump.lines()
            .find_map(|line| {
                line.strip_prefix("summary: ")
                    .or(line.strip_prefix("totals: "))
            })
            .and_then(|count| count.split_whitespace().next())
            .map(|count| count.parse().unwrap())
    }

    fn callgrind_control(&self, action: &str) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("callgrind_control")
            .args([action, &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("callgrind_control (valgrind) runs");
        assert!(status.success(), "callgrind_control {action} {pid} failed");
    }

    fn peak_rss_bytes(&self) -> u64 {
        self.proc_status_kib("VmHWM:") * 1024
    }

    /// The service's CPU time so far, in user space and in the kernel.
    fn cpu_seconds(&self) -> CpuSeconds {
        let pid = self.child.id().unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // Fields after the command name (which may contain spaces).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        // Linux reports CPU time in clock ticks of 1/100 s.
        let seconds = |field: &str| field.parse::<f64>().unwrap() / 100.0;
        CpuSeconds {
            user: seconds(fields[11]),
            system: seconds(fields[12]),
        }
    }

    /// How long each of the service's threads has run so far, in
    /// nanoseconds, by thread id: the scheduler's own count
    /// (`/proc/<pid>/task/<tid>/schedstat`). `/proc/<pid>/stat` counts whole
    /// clock ticks of 10 ms, a quarter of what a tenth of the long session
    /// takes.
    fn thread_run_nanos(&self) -> BTreeMap<u32, u64> {
        let pid = self.child.id().unwrap();
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|task| {
                let task = task.ok()?;
                let tid = task.file_name().to_str()?.parse().ok()?;
                // Gone since it was listed: it ran nothing more.
                let schedstat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
                let nanos = schedstat.split_whitespace().next()?.parse().ok()?;
                Some((tid, nanos))
            })
            .collect()
    }

    /// The CPU seconds the service's threads ran since `before` (from
    /// [`Server::thread_run_nanos`]). A thread that ended meanwhile is not
    /// counted: the blocking pool's, the only ones that end, end after ten
    /// seconds idle.
    fn cpu_seconds_since(&self, before: &BTreeMap<u32, u64>) -> f64 {
        let ran: u64 = self
            .thread_run_nanos()
            .into_iter()
            .map(|(tid, nanos)| nanos.saturating_sub(before.get(&tid).copied().unwrap_or(0)))
            .sum();
        ran as f64 / 1e9
    }

    /// The lines the service has logged so far.
    fn logged(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    async fn stop(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }
}

/// CPU time in user space and in the kernel (system calls, the network
/// stack, page faults): they call for different remedies.
#[derive(Clone, Copy)]
struct CpuSeconds {
    user: f64,
    system: f64,
}

impl std::ops::Sub for CpuSeconds {
    type Output = CpuSeconds;

    fn sub(self, earlier: CpuSeconds) -> CpuSeconds {
        CpuSeconds {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }
}

impl CpuSeconds {
    fn total(self) -> f64 {
        self.user + self.system
    }

    /// Milliseconds per reply: the total, then user + system.
    fn per_reply(self, replies: usize) -> String {
        let per = |seconds: f64| seconds / replies as f64 * 1e3;
        format!(
            "{:.3} ms ({:.3} + {:.3})",
            per(self.total()),
            per(self.user),
            per(self.system)
        )
    }
}

fn percentile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples[index]
}
