//! Live observation over real HTTP on loopback: who may observe, observers
//! that arrive before or during a reply, observers too slow to keep up, the
//! audit of every observation, and replies that run too long.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use eventsource_stream::{Event, Eventsource};
use futures::StreamExt;
use parley_service::auth::Role;
use parley_service::model_routes::{ProviderRegistry, Routes};
use parley_service::providers::{SimulatedProvider, SimulatedSettings};
use parley_service::stream::{Replies, ReplySettings};
use parley_test_support::sse::{Events, PROMPTLY, data, events, next, until};
use prometheus_client::registry::Registry;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const ROUTES: &str = "
routes:
  - alias: default
    targets:
      - provider: simulated
        model: sim
        pricing: {inputPer1k: 0.001, outputPer1k: 0.001}
        maxOutputTokens: 500000
";

struct Harness {
    address: SocketAddr,
    client: reqwest::Client,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(settings: ReplySettings, model: SimulatedSettings) -> Self {
        let (store, dir) = common::embedded_store().await;
        let ledger = common::embedded_ledger(&store).await;
        let mut registry = Registry::default();
        let replies = Replies::new(
            Routes::from_yaml(ROUTES).unwrap(),
            ProviderRegistry::new(Arc::new(SimulatedProvider::new(model)), None, None),
            settings,
            &mut registry,
        );
        let state = common::state_with_replies(Arc::new(store), ledger, registry, replies);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let until = shutdown.clone().cancelled_owned();
        let app = parley_service::app(state);
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(until)
                .await
                .unwrap();
        });
        Self {
            address,
            client: reqwest::Client::new(),
            shutdown,
            _dir: dir,
        }
    }

    /// Replies of `tokens` tokens at 50 tokens/s, pings every 100 ms.
    async fn paced(tokens: u32) -> Self {
        Self::start(settings(), paced(tokens)).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    async fn session(&self, token: &str) -> String {
        let response = self
            .client
            .post(self.url("/api/chat/sessions"))
            .bearer_auth(token)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.unwrap();
        body["sessionId"].as_str().unwrap().to_owned()
    }

    async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    /// Starts a reply; its SSE events.
    async fn reply(&self, token: &str, session: &str) -> Events {
        let response = self
            .client
            .post(self.url(&format!("/api/chat/sessions/{session}/stream")))
            .bearer_auth(token)
            .json(&json!({"message": "tell me about observation"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        events(response)
    }

    /// Connects an observer of `session`; its SSE events (pings dropped).
    async fn observe(&self, token: &str, session: &str) -> Events {
        let response = self
            .get(
                &format!("/api/chat/sessions/{session}/observe"),
                Some(token),
            )
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        events(response)
    }

    async fn audit(&self, token: &str, query: &str) -> Value {
        let response = self
            .get(&format!("/api/observe/audit{query}"), Some(token))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    /// The audit's observations once every one of them has ended (the end
    /// is written when the server notices the observer left).
    async fn ended_observations(&self, token: &str, expected: usize) -> Vec<Value> {
        tokio::time::timeout(PROMPTLY, async {
            loop {
                let audit = self.audit(token, "").await;
                let observations = audit["observations"].as_array().unwrap().clone();
                if observations.len() == expected
                    && observations.iter().all(|o| o.get("endedAt").is_some())
                {
                    return observations;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the observations were not recorded as ended")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn settings() -> ReplySettings {
    ReplySettings {
        ping: Duration::from_millis(100),
        ..ReplySettings::new()
    }
}

fn paced(tokens: u32) -> SimulatedSettings {
    SimulatedSettings {
        first_token_latency: Duration::ZERO,
        tokens_per_second: NonZeroU32::new(50),
        reply_tokens: Some(tokens),
    }
}

/// The reply events (`id`, `event`, `data`) among `events`.
fn reply_events(events: &[Event]) -> Vec<(String, String, String)> {
    events
        .iter()
        .filter(|e| !e.id.is_empty() && e.event != "observe")
        .map(|e| (e.id.clone(), e.event.clone(), e.data.clone()))
        .collect()
}

fn alice() -> String {
    common::token("alice", Role::User, &["c1"])
}
fn bob() -> String {
    common::token("bob", Role::User, &["c1"])
}
fn sam() -> String {
    common::token("sam", Role::Supervisor, &["c1"])
}
fn sue() -> String {
    common::token("sue", Role::Supervisor, &["c2"])
}
fn ada() -> String {
    common::token("ada", Role::Admin, &[])
}

#[tokio::test]
async fn only_admins_and_supervisors_of_the_owners_cohort_may_observe() {
    let harness = Harness::paced(5).await;
    let session = harness.session(&alice()).await;
    let observe = format!("/api/chat/sessions/{session}/observe");
    let missing = "/api/chat/sessions/0123456789abcdef01234567/observe";
    let cases: [(&str, Option<String>, StatusCode, StatusCode, StatusCode); 6] = [
        // who, token, observe, live, audit
        (
            "nobody",
            None,
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
        ),
        (
            "the owner",
            Some(alice()),
            StatusCode::NOT_FOUND,
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN,
        ),
        (
            "another user",
            Some(bob()),
            StatusCode::NOT_FOUND,
            StatusCode::FORBIDDEN,
            StatusCode::FORBIDDEN,
        ),
        (
            "a supervisor of the owner's cohort",
            Some(sam()),
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
        ),
        (
            "a supervisor of another cohort",
            Some(sue()),
            StatusCode::NOT_FOUND,
            StatusCode::OK,
            StatusCode::OK,
        ),
        (
            "an admin",
            Some(ada()),
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
        ),
    ];
    for (who, token, observe_status, live_status, audit_status) in cases {
        let token = token.as_deref();
        for (path, expected) in [
            (observe.as_str(), observe_status),
            ("/api/observe/live", live_status),
            ("/api/observe/audit", audit_status),
        ] {
            let response = harness.get(path, token).await;
            assert_eq!(response.status(), expected, "{who} on {path}");
        }
    }
    // A supervisor outside the cohort cannot tell the session exists.
    let hidden = harness.get(&observe, Some(&sue())).await;
    let hidden: Value = hidden.json().await.unwrap();
    let absent = harness.get(missing, Some(&sue())).await;
    let absent_status = absent.status();
    let absent: Value = absent.json().await.unwrap();
    assert_eq!(absent_status, StatusCode::NOT_FOUND);
    assert_eq!(hidden, absent);
    assert_eq!(hidden["code"], "SESSION_NOT_FOUND");
}

#[tokio::test]
async fn an_observer_that_arrives_first_sees_the_whole_next_reply() {
    let harness = Harness::paced(10).await;
    let session = harness.session(&alice()).await;
    // The response head means the observer is attached and waiting.
    let mut observer = harness.observe(&sam(), &session).await;
    let mut owner = harness.reply(&alice(), &session).await;
    let owned = until(&mut owner, &["complete"]).await;
    let observed = until(&mut observer, &["observe"]).await;
    assert_eq!(data(&observed[0])["state"], "started");
    // The question comes before the answer.
    assert_eq!(data(&observed[0])["message"], "tell me about observation");
    let mut observed = observed;
    observed.extend(until(&mut observer, &["observe"]).await);
    let last = observed.last().unwrap();
    assert_eq!(data(last)["state"], "ended");
    assert_eq!(data(last)["outcome"], "completed");
    assert_eq!(data(last)["userId"], "alice");
    assert_eq!(data(last)["sessionId"], session);
    // Every event of the owner's, with the same ids, in order.
    assert_eq!(reply_events(&observed), reply_events(&owned));

    // The observer stays for the next reply of the session.
    let mut owner = harness.reply(&alice(), &session).await;
    let owned = until(&mut owner, &["complete"]).await;
    let mut observed = until(&mut observer, &["observe"]).await;
    observed.extend(until(&mut observer, &["observe"]).await);
    assert_eq!(reply_events(&observed), reply_events(&owned));
}

#[tokio::test]
async fn an_observer_that_joins_mid_reply_gets_the_replay_then_live_events() {
    let harness = Harness::paced(40).await;
    let session = harness.session(&alice()).await;
    let mut owner = harness.reply(&alice(), &session).await;
    let mut owned = Vec::new();
    // Join once the owner has seen a few chunks.
    while owned.iter().filter(|e: &&Event| e.event == "chunk").count() < 5 {
        owned.push(next(&mut owner).await);
    }
    let mut observer = harness.observe(&ada(), &session).await;
    owned.extend(until(&mut owner, &["complete"]).await);
    let mut observed = until(&mut observer, &["observe"]).await;
    observed.extend(until(&mut observer, &["observe"]).await);
    // No gap, no duplicate: the same events as the owner's.
    assert_eq!(reply_events(&observed), reply_events(&owned));
    let ids: Vec<u64> = reply_events(&observed)
        .iter()
        .map(|(id, _, _)| id.parse().unwrap())
        .collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_console_lists_the_replies_of_its_cohorts_as_they_start_and_end() {
    let harness = Harness::paced(5).await;
    let alices = harness.session(&alice()).await;
    let carol = common::token("carol", Role::User, &["c2"]);
    let carols = harness.session(&carol).await;

    let live = |token: String| {
        let harness = &harness;
        async move {
            let response = harness.get("/api/observe/live", Some(&token)).await;
            assert_eq!(response.status(), StatusCode::OK);
            events(response)
        }
    };
    let mut sams = live(sam()).await;
    let mut sues = live(sue()).await;
    for console in [&mut sams, &mut sues] {
        let first = next(console).await;
        assert_eq!(first.event, "replies");
        assert_eq!(data(&first)["replies"], json!([]));
    }

    // Alice (c1) is answered: Sam sees it start and end, Sue does not.
    let mut owner = harness.reply(&alice(), &alices).await;
    let started = next(&mut sams).await;
    assert_eq!(started.event, "started");
    assert_eq!(data(&started)["reply"]["sessionId"], alices);
    assert_eq!(data(&started)["reply"]["userId"], "alice");
    assert_eq!(
        data(&started)["reply"]["message"],
        "tell me about observation"
    );
    // A console connecting now lists it.
    let mut adas = live(ada()).await;
    let listed = next(&mut adas).await;
    assert_eq!(listed.event, "replies");
    assert_eq!(data(&listed)["replies"][0]["sessionId"], alices);
    until(&mut owner, &["complete"]).await;
    let ended = next(&mut sams).await;
    assert_eq!(ended.event, "ended");
    assert_eq!(data(&ended)["outcome"], "completed");

    // Carol (c2) is answered: Sue's next event is Carol's, not Alice's.
    let mut owner = harness.reply(&carol, &carols).await;
    let started = next(&mut sues).await;
    assert_eq!(started.event, "started");
    assert_eq!(data(&started)["reply"]["userId"], "carol");
    until(&mut owner, &["complete"]).await;
}

#[tokio::test]
async fn every_observation_is_audited_and_its_owner_sees_who_watched() {
    let harness = Harness::paced(5).await;
    let session = harness.session(&alice()).await;
    let carol = common::token("carol", Role::User, &["c2"]);
    let carols = harness.session(&carol).await;
    {
        let mut observer = harness.observe(&sam(), &session).await;
        let mut owner = harness.reply(&alice(), &session).await;
        until(&mut owner, &["complete"]).await;
        until(&mut observer, &["observe"]).await;
        let _admins = harness.observe(&ada(), &carols).await;
        // Both observers leave here.
    }
    let observations = harness.ended_observations(&ada(), 2).await;
    let newest = &observations[0];
    assert_eq!(newest["observerId"], "ada");
    assert_eq!(newest["observerRole"], "admin");
    assert_eq!(newest["observedUserId"], "carol");
    assert_eq!(newest["sessionId"], carols);
    assert_eq!(newest["outcome"], "left");
    let oldest = &observations[1];
    assert_eq!(oldest["observerId"], "sam");
    assert_eq!(oldest["observedUserId"], "alice");
    assert!(oldest["startedAt"].as_str() <= oldest["endedAt"].as_str());

    // Supervisors see their cohorts only; a user filter narrows further.
    let sams = harness.audit(&sam(), "").await;
    assert_eq!(sams["pagination"]["total"], 1);
    assert_eq!(sams["observations"][0]["observedUserId"], "alice");
    assert_eq!(harness.audit(&sue(), "").await["pagination"]["total"], 1);
    let filtered = harness.audit(&ada(), "?userId=carol&limit=1").await;
    assert_eq!(filtered["pagination"]["total"], 1);

    // The owner sees who watched.
    let stored: Value = harness
        .get(&format!("/api/chat/sessions/{session}"), Some(&alice()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(stored["observedBy"].as_array().unwrap().len(), 1);
    assert_eq!(stored["observedBy"][0]["observerId"], "sam");
    assert_eq!(stored["observedBy"][0]["observerRole"], "supervisor");
}

#[tokio::test]
async fn audit_queries_are_validated() {
    let harness = Harness::paced(5).await;
    for (query, status) in [
        ("?bogus=1", StatusCode::BAD_REQUEST),
        ("?page=0", StatusCode::UNPROCESSABLE_ENTITY),
        ("?limit=101", StatusCode::UNPROCESSABLE_ENTITY),
        ("?page=x", StatusCode::BAD_REQUEST),
    ] {
        let response = harness
            .get(&format!("/api/observe/audit{query}"), Some(&ada()))
            .await;
        assert_eq!(response.status(), status, "{query}");
    }
}

/// Reads the raw HTTP response of `socket` until its chunked body ends; the
/// decoded body.
async fn read_chunked_body(socket: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buffer = vec![0; 64 * 1024];
    tokio::time::timeout(PROMPTLY * 3, async {
        while !raw.ends_with(b"\r\n0\r\n\r\n") {
            let read = socket.read(&mut buffer).await.unwrap();
            assert!(read > 0, "the connection closed before the body ended");
            raw.extend_from_slice(&buffer[..read]);
        }
    })
    .await
    .expect("the observer's stream did not end");
    let start = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut rest = &raw[start..];
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16).unwrap();
        if size == 0 {
            return body;
        }
        let data = &rest[line_end + 2..];
        body.extend_from_slice(&data[..size]);
        rest = &data[size + 2..];
    }
}

#[tokio::test]
async fn an_observer_that_reads_nothing_is_cut_and_never_slows_the_owner() {
    // A long reply, unpaced: far more than the kernel's socket buffers hold.
    let harness = Harness::start(
        ReplySettings {
            observer_buffer: 64,
            ..settings()
        },
        SimulatedSettings {
            first_token_latency: Duration::ZERO,
            tokens_per_second: None,
            reply_tokens: Some(200_000),
        },
    )
    .await;
    let session = harness.session(&alice()).await;
    // An observer with a small receive window that reads nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut observer = socket.connect(harness.address).await.unwrap();
    let request = format!(
        "GET /api/chat/sessions/{session}/observe HTTP/1.1\r\nHost: parley\r\nAuthorization: Bearer {}\r\n\r\n",
        sam()
    );
    observer.write_all(request.as_bytes()).await.unwrap();
    // Attached once its head can be read: wait for the first bytes.
    let mut head = [0u8; 12];
    observer.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    let owner = harness.reply(&alice(), &session).await;
    let owned: Vec<Event> = tokio::time::timeout(PROMPTLY * 3, owner.collect())
        .await
        .expect("the owner's reply was held up by the observer");
    assert_eq!(owned.last().unwrap().event, "complete");
    assert_eq!(owned.iter().filter(|e| e.event == "chunk").count(), 200_000);

    // The observer reads at last: what it got ends with the cut.
    let body = read_chunked_body(&mut observer).await;
    let observed: Vec<Event> = futures::stream::iter([Ok::<_, std::io::Error>(body)])
        .eventsource()
        .map(|event| event.unwrap())
        .collect()
        .await;
    let last = observed.last().unwrap();
    assert_eq!(last.event, "error");
    assert_eq!(data(last)["code"], "OBSERVER_TOO_SLOW");
    let chunks = observed.iter().filter(|e| e.event == "chunk").count();
    assert!(
        chunks < 200_000,
        "the observer got the whole reply: not cut"
    );
    drop(observer);
    let observations = harness.ended_observations(&ada(), 1).await;
    assert_eq!(observations[0]["outcome"], "too_slow");
}

#[tokio::test]
async fn a_reply_longer_than_allowed_ends_with_max_duration_and_keeps_its_part() {
    let harness = Harness::start(
        ReplySettings {
            max_duration: Some(Duration::from_millis(500)),
            ..settings()
        },
        paced(1000),
    )
    .await;
    let session = harness.session(&alice()).await;
    let mut owner = harness.reply(&alice(), &session).await;
    let events = until(&mut owner, &["error"]).await;
    let error = events.last().unwrap();
    assert_eq!(data(error)["code"], "MAX_DURATION");
    let chunks = events.iter().filter(|e| e.event == "chunk").count();
    assert!(chunks > 0 && chunks < 1000, "{chunks} chunks");
    let stored: Value = harness
        .get(&format!("/api/chat/sessions/{session}"), Some(&alice()))
        .await
        .json()
        .await
        .unwrap();
    let reply = &stored["messages"][1];
    assert_eq!(reply["incomplete"], true);
    assert_eq!(
        reply["content"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count(),
        chunks
    );
    // Paid for what it generated: more than nothing, less than the hold.
    let balance: Value = harness
        .get("/api/credits/balance", Some(&alice()))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(balance["held"], 0.0);
    let spent = 10.0 - balance["balance"].as_f64().unwrap();
    assert!(spent > 0.0, "nothing was charged");
}

#[tokio::test]
async fn observation_can_be_turned_off() {
    let harness = Harness::start(
        ReplySettings {
            observation: false,
            ..settings()
        },
        paced(5),
    )
    .await;
    let session = harness.session(&alice()).await;
    for path in [
        format!("/api/chat/sessions/{session}/observe"),
        "/api/observe/live".to_owned(),
    ] {
        let response = harness.get(&path, Some(&ada())).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "OBSERVATION_DISABLED");
    }
    // The audit of earlier observations stays readable.
    assert_eq!(harness.audit(&ada(), "").await["pagination"]["total"], 0);
}
