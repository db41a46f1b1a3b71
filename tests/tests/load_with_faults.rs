//! Load with a fault: many users stream replies from one service while one
//! dependency becomes unreachable for a while (a TCP proxy in front of it
//! closes every connection and refuses new ones, as a crashed server would)
//! and then comes back on the same address:
//! - 200 users for 60 s on the embedded store, the upstream model server
//!   down for 10 s;
//! - 50 users for 30 s on MongoDB, MongoDB down for 10 s (past the driver's
//!   5 s server selection timeout, so requests fail rather than wait). The
//!   test MongoDB-wire server is a Python program that sustains a few dozen
//!   replies a second on this machine, so more users would measure its
//!   queue, not Parley.
//!
//! Proven afterwards, from the clients' view and from the service's ledger:
//! - every failed request failed closed, with a code documented for that
//!   outage, and only while it lasted (plus a bounded recovery);
//! - the service served again by itself once the dependency was back;
//! - the ledger balances to the micro-credit: for every user, the balance's
//!   change is the sum of their usage records' charges, nothing stays held,
//!   and each reply a client saw complete was charged what the client was
//!   told, once;
//! - every completed reply is stored exactly once with the text the client
//!   received, a cut reply at most once with the part the client received,
//!   and no turn is stored half (a reply whose storing answered
//!   `STORE_UNAVAILABLE` may be stored: MongoDB can apply a write whose
//!   answer the outage lost);
//! - the service logged no panic.
//!
//! Each prints a report (requests, failures by code, recovery time, ledger
//! totals). The first one's size: `PARLEY_LOAD_USERS` (200),
//! `PARLEY_LOAD_SECONDS` (60). They run alone (nextest profile `load`):
//! `scripts/test-load.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use parley_e2e::{Process, logged_address, mint_token};
use parley_test_support::bench::numbers;
use parley_test_support::env;
use parley_test_support::openai::OpenAiStandIn;
use parley_test_support::proxy::{TcpProxy, host_port};
use parley_test_support::script::Script;
use parley_test_support::sse::{PROMPTLY, data, events};
use serde_json::{Value, json};
use tokio::time::Instant;

const SECRET: &str = "e2e-load-secret-of-enough-length-0123456789";
const MODEL: &str = "load-model";
const INITIAL_CREDITS: i64 = 1_000;
const LEASE_SECONDS: u64 = 5;
const OUTAGE: Duration = Duration::from_secs(10);
/// Bound for requests to succeed again after the dependency is back: the
/// MongoDB driver's server selection timeout and heartbeat, with room for a
/// loaded machine.
const RECOVERY_LIMIT: Duration = Duration::from_secs(30);
/// Bound for every hold to be closed after the load: the lease, reaper
/// ticks and the store catching up.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);
/// A client that failed waits this long before its next request.
const BACKOFF: Duration = Duration::from_millis(200);
/// Largest page of usage records the API serves.
const USAGE_PAGE: usize = 100;

/// The dependency that goes away.
#[derive(Clone, Copy)]
enum Dependency {
    Upstream,
    MongoDb,
}

impl Dependency {
    fn name(self) -> &'static str {
        match self {
            Self::Upstream => "the upstream model server",
            Self::MongoDb => "MongoDB",
        }
    }

    /// The codes documented for its outage: 503 before a reply starts, or
    /// a started reply's `error` event.
    fn outage_codes(self) -> &'static [&'static str] {
        match self {
            Self::Upstream => &["MODEL_UNAVAILABLE"],
            Self::MongoDb => &["STORE_UNAVAILABLE", "LEDGER_UNAVAILABLE"],
        }
    }
}

struct Scenario {
    dependency: Dependency,
    users: usize,
    seconds: u64,
}

/// One request of one user, as the client saw it.
enum Outcome {
    Completed {
        message_id: String,
        text: String,
        charged_micros: i64,
    },
    /// Refused, or ended by an `error` event after `part`.
    Failed { code: String, part: String },
}

struct Request {
    started: Instant,
    ended: Instant,
    outcome: Outcome,
}

struct User {
    name: String,
    token: String,
    session: String,
}

fn micros(credits: &Value) -> i64 {
    (credits.as_f64().unwrap() * 1e6).round() as i64
}

/// One streamed reply, read to its end.
async fn one_reply(http: &reqwest::Client, base: &str, user: &User, n: usize) -> Outcome {
    let response = http
        .post(format!("{base}/api/chat/sessions/{}/stream", user.session))
        .bearer_auth(&user.token)
        .json(&json!({"message": format!("question {n} from {}", user.name)}))
        .send()
        .await
        .unwrap();
    if response.status() != 200 {
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        let code = body["code"].as_str().unwrap().to_owned();
        assert_eq!(status, 503, "{code}");
        return Outcome::Failed {
            code,
            part: String::new(),
        };
    }
    let mut events = events(response);
    let mut part = String::new();
    loop {
        let code = match tokio::time::timeout(PROMPTLY, events.next()).await {
            Err(_) => "NO_EVENT_WITHIN_30_S",
            Ok(None) => "STREAM_ENDED_WITHOUT_END_EVENT",
            Ok(Some(event)) => match event.event.as_str() {
                "chunk" => {
                    part.push_str(data(&event)["text"].as_str().unwrap());
                    continue;
                }
                "complete" => {
                    let complete = data(&event);
                    return Outcome::Completed {
                        message_id: complete["messageId"].as_str().unwrap().to_owned(),
                        text: part,
                        charged_micros: micros(&complete["credits"]["charged"]),
                    };
                }
                "error" => {
                    return Outcome::Failed {
                        code: data(&event)["code"].as_str().unwrap().to_owned(),
                        part,
                    };
                }
                _ => continue,
            },
        };
        return Outcome::Failed {
            code: code.to_owned(),
            part,
        };
    }
}

/// Replies one after another until `until`.
async fn closed_loop(
    http: reqwest::Client,
    base: Arc<str>,
    user: Arc<User>,
    until: Instant,
) -> Vec<Request> {
    let mut requests = Vec::new();
    while Instant::now() < until {
        let started = Instant::now();
        let outcome = one_reply(&http, &base, &user, requests.len()).await;
        let failed = matches!(outcome, Outcome::Failed { .. });
        requests.push(Request {
            started,
            ended: Instant::now(),
            outcome,
        });
        if failed {
            tokio::time::sleep(BACKOFF).await;
        }
    }
    requests
}

async fn get(http: &reqwest::Client, url: String, token: &str) -> Value {
    let response = http.get(url).bearer_auth(token).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// A user's ledger, as the service reports it.
struct Account {
    balance_micros: i64,
    held_micros: i64,
    /// `(outcome, charged)` of every usage record.
    records: Vec<(String, i64)>,
}

async fn account(http: &reqwest::Client, base: &str, user: &User) -> Account {
    let balance = get(http, format!("{base}/api/credits/balance"), &user.token).await;
    let mut records = Vec::new();
    for page in 1.. {
        let usage = get(
            http,
            format!("{base}/api/credits/usage?page={page}&limit={USAGE_PAGE}"),
            &user.token,
        )
        .await;
        let page_records = usage["records"].as_array().unwrap();
        records.extend(page_records.iter().map(|record| {
            (
                record["outcome"].as_str().unwrap().to_owned(),
                micros(&record["charged"]),
            )
        }));
        if page_records.len() < USAGE_PAGE {
            break;
        }
    }
    Account {
        balance_micros: micros(&balance["balance"]),
        held_micros: micros(&balance["held"]),
        records,
    }
}

/// Every user's account once none holds credits, or a panic after
/// [`SETTLE_LIMIT`].
async fn settled_accounts(http: &reqwest::Client, base: &str, users: &[Arc<User>]) -> Vec<Account> {
    let deadline = Instant::now() + SETTLE_LIMIT;
    loop {
        let mut accounts = Vec::new();
        for user in users {
            accounts.push(account(http, base, user).await);
        }
        let holding = accounts
            .iter()
            .filter(|account| account.held_micros != 0)
            .count();
        if holding == 0 {
            return accounts;
        }
        assert!(
            Instant::now() < deadline,
            "{holding} users still hold credits {SETTLE_LIMIT:?} after the load"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn run(scenario: Scenario) {
    let dependency = scenario.dependency;
    let upstream = OpenAiStandIn::start().await.unwrap();
    let deltas: Vec<String> = (0..16).map(|i| format!("word{i} ")).collect();
    upstream.set_script(
        MODEL,
        Script::reply(deltas).with_delta_delay(Duration::from_millis(50)),
    );
    let target = match dependency {
        Dependency::Upstream => upstream.addr().to_string(),
        Dependency::MongoDb => host_port(&env::mongodb_uri()).unwrap().to_owned(),
    };
    let mut proxy = TcpProxy::start(target.clone(), None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "routes:\n  - alias: default\n    targets:\n      - provider: openai\n        model: {MODEL}\n        pricing: {{inputPer1k: 1, outputPer1k: 2}}\n        maxOutputTokens: 64\n"
        ),
    )
    .unwrap();
    let mut environment = vec![
        ("PARLEY_LISTEN", "127.0.0.1:0".to_owned()),
        ("PARLEY_ROUTES_FILE", routes.display().to_string()),
        ("PARLEY_JWT_SECRET", SECRET.to_owned()),
        ("PARLEY_INITIAL_CREDITS", INITIAL_CREDITS.to_string()),
        ("PARLEY_HOLD_LEASE_SECONDS", LEASE_SECONDS.to_string()),
        ("PARLEY_REAPER_INTERVAL_SECONDS", "1".to_owned()),
        (
            "PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE",
            "1000000000".to_owned(),
        ),
        (
            "PARLEY_RATE_LIMIT_TOKENS_PER_MINUTE",
            "1000000000000".to_owned(),
        ),
        ("PARLEY_RATE_LIMIT_CONCURRENT_STREAMS", "1000".to_owned()),
        // Per-request logs of thousands of replies would drown the report.
        ("RUST_LOG", "warn,parley_service::server=info".to_owned()),
    ];
    match dependency {
        Dependency::Upstream => {
            environment.push((
                "PARLEY_OPENAI_BASE_URL",
                format!("http://{}/v1", proxy.address()),
            ));
            environment.push((
                "PARLEY_DATA_DIR",
                dir.path().join("data").display().to_string(),
            ));
        }
        Dependency::MongoDb => {
            environment.push(("PARLEY_OPENAI_BASE_URL", upstream.base_url()));
            // Directly: a replica set member names its own address, and the
            // driver would go around the proxy.
            environment.push((
                "PARLEY_MONGODB_URI",
                format!("mongodb://{}/?directConnection=true", proxy.address()),
            ));
            environment.push((
                "PARLEY_MONGODB_DATABASE",
                env::unique_name("parley_load").replace('-', "_"),
            ));
        }
    }
    let mut service = Process::start("parley-service", &[], &environment);
    let base: Arc<str> = format!(
        "http://{}",
        logged_address(&service.wait_for_line("\"serving\"").await)
    )
    .into();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(scenario.users)
        .build()
        .unwrap();

    let names: Vec<String> = (0..scenario.users)
        .map(|i| format!("load-user-{i}"))
        .collect();
    let tokens = futures::future::join_all(names.iter().map(|name| async move {
        mint_token(SECRET, &["--sub", name, "--role", "user", "--ttl", "1h"]).await
    }))
    .await;
    let mut users = Vec::new();
    for (name, token) in names.into_iter().zip(tokens) {
        let response = http
            .post(format!("{base}/api/chat/sessions"))
            .bearer_auth(&token)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let session: Value = response.json().await.unwrap();
        users.push(Arc::new(User {
            name,
            token,
            session: session["sessionId"].as_str().unwrap().to_owned(),
        }));
    }

    let load_started = Instant::now();
    let until = load_started + Duration::from_secs(scenario.seconds);
    let clients: Vec<_> = users
        .iter()
        .map(|user| {
            tokio::spawn(closed_loop(
                http.clone(),
                Arc::clone(&base),
                Arc::clone(user),
                until,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(scenario.seconds) / 3).await;
    let outage_started = Instant::now();
    proxy.stop().await;
    tokio::time::sleep(OUTAGE).await;
    proxy = TcpProxy::start(target, Some(proxy.address()))
        .await
        .unwrap();
    let outage_ended = Instant::now();
    let mut requests_by_user = Vec::new();
    for client in clients {
        requests_by_user.push(client.await.unwrap());
    }
    let load_seconds = load_started.elapsed().as_secs_f64();

    // The clients' view: failures only in the outage, only with its codes.
    let mut failures_by_code: BTreeMap<String, usize> = BTreeMap::new();
    let mut unexpected = Vec::new();
    let mut last_failure_after_return = Duration::ZERO;
    let mut first_success_after_return: Option<Duration> = None;
    for request in requests_by_user.iter().flatten() {
        match &request.outcome {
            Outcome::Failed { code, .. } => {
                *failures_by_code.entry(code.clone()).or_default() += 1;
                let in_outage = request.ended >= outage_started
                    && request.started <= outage_ended + RECOVERY_LIMIT;
                if !in_outage || !dependency.outage_codes().contains(&code.as_str()) {
                    unexpected.push(format!(
                        "{code}: started {:.2} s after the outage began, ended {:.2} s after",
                        request
                            .started
                            .saturating_duration_since(outage_started)
                            .as_secs_f64(),
                        request
                            .ended
                            .saturating_duration_since(outage_started)
                            .as_secs_f64(),
                    ));
                }
                last_failure_after_return = last_failure_after_return
                    .max(request.ended.saturating_duration_since(outage_ended));
            }
            Outcome::Completed { .. } if request.started >= outage_ended => {
                let completed_after = request.ended - outage_ended;
                first_success_after_return = Some(
                    first_success_after_return
                        .map_or(completed_after, |seen| seen.min(completed_after)),
                );
            }
            Outcome::Completed { .. } => {}
        }
    }
    let requests: usize = requests_by_user.iter().map(Vec::len).sum();
    let failed: usize = failures_by_code.values().sum();

    // The ledger: each user's balance moved by exactly their records'
    // charges, and the completed replies were charged what the clients saw.
    let accounts = settled_accounts(&http, &base, &users).await;
    let mut violations = Vec::new();
    let mut records_by_outcome: BTreeMap<String, usize> = BTreeMap::new();
    let (mut balance_change_total, mut charged_total) = (0, 0);
    for ((user, account), requests) in users.iter().zip(&accounts).zip(&requests_by_user) {
        let change = INITIAL_CREDITS * 1_000_000 - account.balance_micros;
        let charged: i64 = account.records.iter().map(|(_, charged)| charged).sum();
        if change != charged {
            violations.push(format!(
                "{}: the balance moved {change} µcredits, the usage records charged {charged}",
                user.name
            ));
        }
        balance_change_total += change;
        charged_total += charged;
        for (outcome, _) in &account.records {
            *records_by_outcome.entry(outcome.clone()).or_default() += 1;
        }
        // Each reply the client saw complete is a completed record of the
        // same charge. A reply generated and streamed in full whose storing
        // then failed is charged too (its tokens were made and shown) while
        // its client got `error` `STORE_UNAVAILABLE`: the only other
        // completed records there may be. One exception: when the ledger
        // stayed down from the reply's end until its lease lapsed, the
        // reaper may close the hold first (charging the recorded progress),
        // and the reply's settlement, retried, is told that charge: a
        // reaped record of the same charge.
        let charges_of = |wanted: &str| -> Vec<i64> {
            account
                .records
                .iter()
                .filter(|(outcome, _)| outcome == wanted)
                .map(|(_, charged)| *charged)
                .collect()
        };
        let mut unmatched = charges_of("completed");
        let mut reaped = charges_of("reaped");
        let mut unstored = 0;
        for request in requests {
            match &request.outcome {
                Outcome::Completed { charged_micros, .. } => {
                    if let Some(at) = unmatched
                        .iter()
                        .position(|charged| charged == charged_micros)
                    {
                        unmatched.swap_remove(at);
                    } else if let Some(at) =
                        reaped.iter().position(|charged| charged == charged_micros)
                    {
                        reaped.swap_remove(at);
                    } else {
                        violations.push(format!(
                            "{}: a reply seen complete, charged {charged_micros} µcredits, has no completed or reaped record of that charge",
                            user.name
                        ));
                    }
                }
                Outcome::Failed { code, part }
                    if code == "STORE_UNAVAILABLE" && !part.is_empty() =>
                {
                    unstored += 1;
                }
                Outcome::Failed { .. } => {}
            }
        }
        if unmatched.len() > unstored {
            violations.push(format!(
                "{}: completed records {unmatched:?} for no reply seen complete, and only {unstored} replies unstored",
                user.name
            ));
        }
    }

    // The sessions: each completed reply once, cut ones at most once.
    let (mut stored_messages, mut incomplete_stored) = (0, 0);
    for (user, requests) in users.iter().zip(&requests_by_user) {
        let name = &user.name;
        let mut completed: HashMap<&str, &str> = HashMap::new();
        let mut parts: Vec<&str> = Vec::new();
        // Replies streamed whole whose storing answered an error: MongoDB
        // may still have applied the write (its answer was lost with the
        // connection), so the turn may be in the session.
        let mut unstored: Vec<&str> = Vec::new();
        for request in requests {
            match &request.outcome {
                Outcome::Completed {
                    message_id, text, ..
                } => {
                    if completed.insert(message_id, text).is_some() {
                        violations.push(format!("{name}: message {message_id} completed twice"));
                    }
                }
                Outcome::Failed { code, part }
                    if code == "STORE_UNAVAILABLE" && !part.is_empty() =>
                {
                    unstored.push(part);
                }
                Outcome::Failed { part, .. } if !part.is_empty() => parts.push(part),
                Outcome::Failed { .. } => {}
            }
        }
        let session = get(
            &http,
            format!("{base}/api/chat/sessions/{}", user.session),
            &user.token,
        )
        .await;
        let messages = session["messages"].as_array().unwrap();
        stored_messages += messages.len();
        let mut ids = HashSet::new();
        for message in messages {
            if !ids.insert(message["id"].as_str().unwrap()) {
                violations.push(format!("{name}: a message stored twice: {message}"));
            }
        }
        // Turns are stored whole: a question, then its reply.
        for turn in messages.chunks(2) {
            let roles: Vec<&Value> = turn.iter().map(|message| &message["role"]).collect();
            if roles != [&json!("user"), &json!("assistant")] {
                violations.push(format!("{name}: a half turn: {turn:?}"));
            }
        }
        let mut completed_stored = 0;
        for reply in messages
            .iter()
            .filter(|message| message["role"] == "assistant")
        {
            let content = reply["content"].as_str().unwrap();
            if reply["incomplete"] == true {
                incomplete_stored += 1;
                match parts.iter().position(|part| *part == content) {
                    Some(seen) => {
                        parts.swap_remove(seen);
                    }
                    None => violations.push(format!(
                        "{name}: a cut reply stored with a part no client saw: {reply}"
                    )),
                }
                continue;
            }
            let id = reply["id"].as_str().unwrap();
            if completed.get(id).copied() == Some(content) {
                completed_stored += 1;
            } else if let Some(seen) = unstored.iter().position(|part| *part == content) {
                unstored.swap_remove(seen);
            } else {
                violations.push(format!(
                    "{name}: stored reply {id} is not one the client saw complete, with its text"
                ));
            }
        }
        if completed_stored != completed.len() {
            violations.push(format!(
                "{name}: {} replies seen complete, {completed_stored} of them stored",
                completed.len()
            ));
        }
    }

    let panics: Vec<String> = service
        .lines_so_far()
        .into_iter()
        .filter(|line| line.contains("panicked"))
        .collect();
    let status = service.terminate().await;
    proxy.stop().await;

    println!("=== load with {} down", dependency.name());
    println!(
        "{} users, {load_seconds:.1} s of load; {} unreachable for {OUTAGE:?} from {:.1} s",
        scenario.users,
        dependency.name(),
        (outage_started - load_started).as_secs_f64()
    );
    println!(
        "requests {requests}: completed {} ({:.1} replies/s), failed {failed}",
        requests - failed,
        (requests - failed) as f64 / load_seconds,
    );
    for (code, count) in &failures_by_code {
        println!("  failed with {code}: {count}");
    }
    println!(
        "recovery: the last failure ended {:.2} s after the return; the first reply started after it completed {:.2} s after",
        last_failure_after_return.as_secs_f64(),
        first_success_after_return.map_or(f64::NAN, |after| after.as_secs_f64())
    );
    println!("usage records by outcome: {records_by_outcome:?}");
    println!(
        "ledger: balances moved {:.6} credits = usage records charged {:.6} credits; nothing held",
        balance_change_total as f64 / 1e6,
        charged_total as f64 / 1e6
    );
    println!("stored messages {stored_messages}, of which cut replies {incomplete_stored}");

    assert!(violations.is_empty(), "{violations:#?}");
    assert!(
        unexpected.is_empty(),
        "failures outside the outage or with undocumented codes: {unexpected:#?}"
    );
    assert!(
        failed > 0,
        "the outage failed no request: it did not happen"
    );
    assert!(
        first_success_after_return.is_some_and(|after| after < RECOVERY_LIMIT),
        "no reply completed within {RECOVERY_LIMIT:?} of the return"
    );
    assert!(panics.is_empty(), "the service panicked: {panics:#?}");
    assert!(
        status.success(),
        "the service did not stop cleanly: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_outage_under_load_fails_closed_recovers_and_the_ledger_balances() {
    run(Scenario {
        dependency: Dependency::Upstream,
        users: numbers("PARLEY_LOAD_USERS", &[200])[0],
        seconds: numbers("PARLEY_LOAD_SECONDS", &[60])[0] as u64,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mongodb_outage_under_load_fails_closed_recovers_and_the_ledger_balances() {
    run(Scenario {
        dependency: Dependency::MongoDb,
        users: 50,
        seconds: 30,
    })
    .await;
}
