//! Replies that any replica can serve: two real service processes sharing
//! one MongoDB-wire server and one Redis. An owner re-attaches on the other
//! replica with no gap and no duplicate, observers and consoles on one
//! replica follow replies generated on the other, one reply per session
//! holds across replicas, a terminating replica finishes the replies it
//! generates for owners re-attached elsewhere, and a replica killed mid-reply
//! is reported lost while the reaper settles its hold exactly once. The
//! replicas also share each target's circuit breaker: failures seen by one
//! open it for both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use eventsource_stream::Event;
use parley_e2e::{Process, logged_address, mint_token};
use parley_test_support::bedrock::BedrockStandIn;
use parley_test_support::env;
use parley_test_support::script::{Rejection, Script};
use parley_test_support::sse::{Events, PROMPTLY, data, events, next, until};
use serde_json::{Value, json};

const SECRET: &str = "e2e-hub-secret-of-enough-length-0123456789";
/// Heartbeats of the hub locks: a dead replica's reply is lost after five.
const HEARTBEAT_MILLIS: u64 = 200;
const LEASE_SECONDS: u64 = 3;

struct Replicas {
    a: Replica,
    b: Replica,
    http: reqwest::Client,
}

struct Replica {
    process: Process,
    base: String,
}

impl Replicas {
    /// Two replicas of one deployment: same store, Redis, key prefixes and secret.
    async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// [`Replicas::start`], with `overrides` of the environment.
    async fn start_with(overrides: &[(&'static str, &str)]) -> Self {
        let database = env::unique_name("parley_hub").replace('-', "_");
        let prefix = env::unique_name("hub");
        let environment = vec![
            ("PARLEY_LISTEN", "127.0.0.1:0".to_owned()),
            ("PARLEY_MONGODB_URI", env::mongodb_uri()),
            ("PARLEY_MONGODB_DATABASE", database),
            ("PARLEY_REDIS_URL", env::redis_url()),
            ("PARLEY_HUB_KEY_PREFIX", format!("{prefix}:hub")),
            ("PARLEY_RATE_LIMIT_KEY_PREFIX", format!("{prefix}:limits")),
            ("PARLEY_HUB_HEARTBEAT_MILLIS", HEARTBEAT_MILLIS.to_string()),
            ("PARLEY_JWT_SECRET", SECRET.to_owned()),
            ("PARLEY_INITIAL_CREDITS", "10".to_owned()),
            ("PARLEY_HOLD_LEASE_SECONDS", LEASE_SECONDS.to_string()),
            ("PARLEY_REAPER_INTERVAL_SECONDS", "1".to_owned()),
            ("PARLEY_SSE_PING_SECONDS", "1".to_owned()),
            ("PARLEY_SIMULATED_FIRST_TOKEN_MILLIS", "0".to_owned()),
            ("PARLEY_SIMULATED_TOKENS_PER_SECOND", "20".to_owned()),
            ("PARLEY_SIMULATED_REPLY_TOKENS", "60".to_owned()),
        ];
        let mut environment = environment;
        for (name, value) in overrides {
            environment.retain(|(existing, _)| existing != name);
            environment.push((*name, (*value).to_owned()));
        }
        let (a, b) = tokio::join!(Replica::start(&environment), Replica::start(&environment));
        Self {
            a,
            b,
            http: reqwest::Client::new(),
        }
    }

    async fn session(&self, on: &Replica, token: &str) -> String {
        let response = self
            .http
            .post(format!("{}/api/chat/sessions", on.base))
            .bearer_auth(token)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        body["sessionId"].as_str().unwrap().to_owned()
    }

    async fn post_stream(&self, on: &Replica, token: &str, session: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/api/chat/sessions/{session}/stream", on.base))
            .bearer_auth(token)
            .json(&json!({"message": "tell me about replicas"}))
            .send()
            .await
            .unwrap()
    }

    async fn reply(&self, on: &Replica, token: &str, session: &str) -> Events {
        let response = self.post_stream(on, token, session).await;
        assert_eq!(response.status(), 200);
        events(response)
    }

    async fn sse(
        &self,
        on: &Replica,
        path: &str,
        token: &str,
        last_event_id: Option<u64>,
    ) -> Events {
        let mut request = self
            .http
            .get(format!("{}{path}", on.base))
            .bearer_auth(token);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        events(response)
    }

    async fn get(&self, on: &Replica, path: &str, token: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", on.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.unwrap()
    }
}

impl Replica {
    async fn start(environment: &[(&'static str, String)]) -> Self {
        let mut process = Process::start("parley-service", &[], environment);
        let serving = process.wait_for_line("\"serving\"").await;
        let base = format!("http://{}", logged_address(&serving));
        Self { process, base }
    }
}

async fn token(sub: &str, role: &str, cohort: &str) -> String {
    mint_token(SECRET, &["--sub", sub, "--role", role, "--cohort", cohort]).await
}

/// `(id, event, data)` of the reply's own events.
fn reply_events(events: &[Event]) -> Vec<(u64, String, String)> {
    events
        .iter()
        .filter(|e| !e.id.is_empty() && e.event != "observe")
        .map(|e| (e.id.parse().unwrap(), e.event.clone(), e.data.clone()))
        .collect()
}

fn text(events: &[(u64, String, String)]) -> String {
    events
        .iter()
        .filter(|(_, name, _)| name == "chunk")
        .map(|(_, _, data)| {
            let data: Value = serde_json::from_str(data).unwrap();
            data["text"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test]
async fn an_owner_reattaches_on_the_other_replica_with_no_gap_and_no_duplicate() {
    let replicas = Replicas::start().await;
    let alice = token("alice", "user", "c1").await;
    let session = replicas.session(&replicas.a, &alice).await;
    let mut on_a = replicas.reply(&replicas.a, &alice, &session).await;
    let mut first = Vec::new();
    while first.iter().filter(|e: &&Event| e.event == "chunk").count() < 10 {
        first.push(next(&mut on_a).await);
    }
    // One reply per session, whichever replica is asked.
    let second = replicas.post_stream(&replicas.b, &alice, &session).await;
    assert_eq!(second.status(), 409);
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["code"], "REPLY_IN_PROGRESS");

    // The connection to A drops; the client re-attaches on B.
    drop(on_a);
    let last_seen = first.last().unwrap().id.parse::<u64>().unwrap();
    let path = format!("/api/chat/sessions/{session}/stream");
    let mut on_b = replicas
        .sse(&replicas.b, &path, &alice, Some(last_seen))
        .await;
    let rest = until(&mut on_b, &["complete", "error"]).await;
    assert_eq!(rest.last().unwrap().event, "complete", "{rest:?}");

    let mut whole = reply_events(&first);
    whole.extend(reply_events(&rest));
    let ids: Vec<u64> = whole.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "a gap or a duplicate"
    );
    // What the client pieced together is what was stored.
    let stored = replicas
        .get(
            &replicas.b,
            &format!("/api/chat/sessions/{session}"),
            &alice,
        )
        .await;
    assert_eq!(stored["messages"][1]["content"], text(&whole));
    assert!(
        stored["messages"][1].get("incomplete").is_none(),
        "{stored}"
    );
}

/// Alice's reply starts on A; after five chunks her connection drops and
/// she re-attaches on B while A is sent SIGTERM (and exits cleanly). Her
/// token, the session, and the events read on A and then on B, with no gap
/// and no duplicate across the two.
async fn reattach_on_b_while_a_terminates(
    replicas: &mut Replicas,
) -> (String, String, Vec<Event>, Vec<Event>) {
    let alice = token("alice", "user", "c1").await;
    let session = replicas.session(&replicas.a, &alice).await;
    let mut on_a = replicas.reply(&replicas.a, &alice, &session).await;
    let mut first = Vec::new();
    while first.iter().filter(|e: &&Event| e.event == "chunk").count() < 5 {
        first.push(next(&mut on_a).await);
    }
    drop(on_a);
    let last_seen = first.last().unwrap().id.parse::<u64>().unwrap();
    let path = format!("/api/chat/sessions/{session}/stream");
    let mut on_b = replicas
        .sse(&replicas.b, &path, &alice, Some(last_seen))
        .await;
    let (exit, rest) = tokio::join!(
        replicas.a.process.terminate(),
        until(&mut on_b, &["complete", "error"])
    );
    assert!(exit.success(), "{exit}");
    let mut whole = reply_events(&first);
    whole.extend(reply_events(&rest));
    let ids: Vec<u64> = whole.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
    (alice, session, first, rest)
}

/// A rolling update: the owner's connection left the replica being replaced
/// (its load balancer dropped it) and re-attached on the other one. The old
/// replica has no connection left, yet it generates the reply, so its
/// shutdown lets the reply finish (within the stream drain) before it exits.
#[tokio::test]
async fn a_terminating_replica_finishes_a_reply_whose_owner_reattached_elsewhere() {
    let mut replicas = Replicas::start().await;
    let (alice, _, _, rest) = reattach_on_b_while_a_terminates(&mut replicas).await;
    assert_eq!(rest.last().unwrap().event, "complete", "{rest:?}");
    // Charged once, for the whole reply.
    let usage = replicas
        .get(&replicas.b, "/api/credits/usage", &alice)
        .await;
    let records = usage["records"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{usage}");
    assert_eq!(records[0]["outcome"], "completed", "{usage}");
}

/// The same past the stream drain: the reply ends with `SHUTTING_DOWN` for
/// its owner on the other replica, keeping its part, charged once for it.
#[tokio::test]
async fn past_the_stream_drain_a_terminating_replica_ends_the_reply_and_settles_it() {
    let mut replicas = Replicas::start_with(&[
        ("PARLEY_STREAM_DRAIN_SECONDS", "1"),
        // 50 s at 20 tokens a second: far longer than the drain.
        ("PARLEY_SIMULATED_REPLY_TOKENS", "1000"),
    ])
    .await;
    let (alice, session, first, rest) = reattach_on_b_while_a_terminates(&mut replicas).await;
    let ended = rest.last().unwrap();
    assert_eq!(data(ended)["code"], "SHUTTING_DOWN", "{ended:?}");
    let mut whole = reply_events(&first);
    whole.extend(reply_events(&rest));
    let stored = replicas
        .get(
            &replicas.b,
            &format!("/api/chat/sessions/{session}"),
            &alice,
        )
        .await;
    assert_eq!(stored["messages"][1]["content"], text(&whole));
    assert_eq!(stored["messages"][1]["incomplete"], true, "{stored}");
    let usage = replicas
        .get(&replicas.b, "/api/credits/usage", &alice)
        .await;
    let records = usage["records"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{usage}");
    assert!(records[0]["charged"].as_f64().unwrap() > 0.0, "{usage}");
    let balance = replicas
        .get(&replicas.b, "/api/credits/balance", &alice)
        .await;
    assert_eq!(balance["held"], json!(0.0), "{balance}");
}

#[tokio::test]
async fn observers_and_consoles_on_one_replica_follow_replies_on_the_other() {
    let replicas = Replicas::start().await;
    let alice = token("alice", "user", "c1").await;
    let sam = token("sam", "supervisor", "c1").await;
    let session = replicas.session(&replicas.a, &alice).await;
    let observe = format!("/api/chat/sessions/{session}/observe");
    // Both wait on B before the reply starts on A.
    let mut observer = replicas.sse(&replicas.b, &observe, &sam, None).await;
    let mut console = replicas
        .sse(&replicas.b, "/api/observe/live", &sam, None)
        .await;
    assert_eq!(next(&mut console).await.event, "replies");

    let mut owner = replicas.reply(&replicas.a, &alice, &session).await;
    let started = next(&mut console).await;
    assert_eq!(started.event, "started");
    assert_eq!(data(&started)["reply"]["sessionId"], session);
    let owned = until(&mut owner, &["complete"]).await;
    let mut observed = until(&mut observer, &["observe"]).await;
    assert_eq!(data(&observed[0])["state"], "started");
    observed.extend(until(&mut observer, &["observe"]).await);
    assert_eq!(data(observed.last().unwrap())["state"], "ended");
    assert_eq!(reply_events(&observed), reply_events(&owned));
    let ended = next(&mut console).await;
    assert_eq!(ended.event, "ended");
    assert_eq!(data(&ended)["outcome"], "completed");

    // An observer joining on B mid-reply gets the replay from Redis.
    let mut owner = replicas.reply(&replicas.a, &alice, &session).await;
    let mut owned = Vec::new();
    while owned.iter().filter(|e: &&Event| e.event == "chunk").count() < 5 {
        owned.push(next(&mut owner).await);
    }
    let mut late = replicas.sse(&replicas.b, &observe, &sam, None).await;
    owned.extend(until(&mut owner, &["complete"]).await);
    let mut observed = until(&mut late, &["observe"]).await;
    observed.extend(until(&mut late, &["observe"]).await);
    assert_eq!(reply_events(&observed), reply_events(&owned));
}

#[tokio::test]
async fn a_fast_reply_ends_for_observers_elsewhere_even_without_a_reattach_grace() {
    // Without a grace period nothing lingers for re-attaches, but the other
    // replica's mirror, still reading, must find the reply's last events and
    // its end rather than report it lost.
    let replicas = Replicas::start_with(&[
        ("PARLEY_REATTACH_GRACE_SECONDS", "0"),
        ("PARLEY_SIMULATED_TOKENS_PER_SECOND", "0"),
        ("PARLEY_SIMULATED_REPLY_TOKENS", "5000"),
        // Unpaced, the whole reply is one burst: room for all of it.
        ("PARLEY_OBSERVER_BUFFER_EVENTS", "8192"),
    ])
    .await;
    let alice = token("alice", "user", "c1").await;
    let sam = token("sam", "supervisor", "c1").await;
    let session = replicas.session(&replicas.a, &alice).await;
    let observe = format!("/api/chat/sessions/{session}/observe");
    let mut observers = Vec::new();
    for _ in 0..20 {
        observers.push(replicas.sse(&replicas.b, &observe, &sam, None).await);
    }
    let mut owner = replicas.reply(&replicas.a, &alice, &session).await;
    let owned = until(&mut owner, &["complete"]).await;
    for mut observer in observers {
        let mut observed = until(&mut observer, &["observe"]).await;
        observed.extend(until(&mut observer, &["observe"]).await);
        assert_eq!(data(observed.last().unwrap())["state"], "ended");
        assert_eq!(reply_events(&observed), reply_events(&owned));
    }
}

#[tokio::test]
async fn the_owner_stops_a_reply_through_the_other_replica() {
    let replicas = Replicas::start().await;
    let alice = token("alice", "user", "c1").await;
    let session = replicas.session(&replicas.a, &alice).await;
    let mut on_a = replicas.reply(&replicas.a, &alice, &session).await;
    let mut seen = Vec::new();
    while seen.iter().filter(|e: &&Event| e.event == "chunk").count() < 3 {
        seen.push(next(&mut on_a).await);
    }
    let stopped = replicas
        .http
        .delete(format!(
            "{}/api/chat/sessions/{session}/stream",
            replicas.b.base
        ))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(stopped.status(), 200);
    seen.extend(until(&mut on_a, &["complete", "error"]).await);
    let last = seen.last().unwrap();
    assert_eq!(data(last)["code"], "CANCELLED", "{seen:?}");
    // Answered once the part was stored.
    let stored = replicas
        .get(
            &replicas.b,
            &format!("/api/chat/sessions/{session}"),
            &alice,
        )
        .await;
    assert_eq!(stored["messages"][1]["incomplete"], true, "{stored}");
    assert_eq!(stored["messages"][1]["content"], text(&reply_events(&seen)));
}

#[tokio::test]
async fn a_replica_killed_mid_reply_is_reported_lost_and_its_hold_settled_once() {
    let mut replicas = Replicas::start().await;
    let alice = token("alice", "user", "c1").await;
    let ada = token("ada", "admin", "c0").await;
    let session = replicas.session(&replicas.a, &alice).await;
    let observe = format!("/api/chat/sessions/{session}/observe");
    let mut observer = replicas.sse(&replicas.b, &observe, &ada, None).await;
    let mut owner = replicas.reply(&replicas.a, &alice, &session).await;
    // Past the first hold renewal (a third of the lease), which records the
    // output so far for the reaper.
    let mut chunks = 0;
    while chunks < 25 {
        if next(&mut owner).await.event == "chunk" {
            chunks += 1;
        }
    }
    replicas.a.process.kill().await;
    let killed = tokio::time::Instant::now();
    drop(owner);

    let observed = until(&mut observer, &["error"]).await;
    let lost = observed.last().unwrap();
    assert_eq!(data(lost)["code"], "REPLY_LOST", "{observed:?}");
    eprintln!(
        "REPLY_LOST reached the observer {:?} after the kill",
        killed.elapsed()
    );
    // The owner re-attaching on B hears the same.
    let path = format!("/api/chat/sessions/{session}/stream");
    let mut reattached = replicas.sse(&replicas.b, &path, &alice, Some(3)).await;
    let events = until(&mut reattached, &["error", "complete"]).await;
    assert_eq!(data(events.last().unwrap())["code"], "REPLY_LOST");

    // B's reaper settles the hold A left, once, for what A recorded.
    let records = tokio::time::timeout(PROMPTLY, async {
        loop {
            let usage = replicas
                .get(&replicas.b, "/api/credits/usage", &alice)
                .await;
            let records = usage["records"].as_array().unwrap().clone();
            if !records.is_empty() {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the reaper did not settle the lost reply's hold");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["outcome"], "reaped", "{records:?}");
    assert!(records[0]["outputTokens"].as_u64().unwrap() > 0);
    let balance = replicas
        .get(&replicas.b, "/api/credits/balance", &alice)
        .await;
    assert_eq!(balance["held"], json!(0.0), "{balance}");
    // Later reaper passes charge nothing more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let usage = replicas
        .get(&replicas.b, "/api/credits/usage", &alice)
        .await;
    assert_eq!(usage["records"].as_array().unwrap().len(), 1);
    assert_eq!(
        replicas
            .get(&replicas.b, "/api/credits/balance", &alice)
            .await,
        balance
    );
    // The session is free again: a new reply runs on B.
    let mut again = replicas.reply(&replicas.b, &alice, &session).await;
    let ended = until(&mut again, &["complete", "error"]).await;
    assert_eq!(ended.last().unwrap().event, "complete");
    assert!(replicas.b.process.terminate().await.success());
}

const BREAKER_ROUTES: &str = "
routes:
  - alias: default
    fallbackOn: [throttled, unavailable, timeout]
    targets:
      - provider: bedrock
        model: shared-primary
        pricing: {inputPer1k: 1, outputPer1k: 1}
        maxOutputTokens: 64
        circuitBreaker: {failureThreshold: 2, cooldownSeconds: 600}
      - provider: bedrock
        model: shared-secondary
        pricing: {inputPer1k: 1, outputPer1k: 1}
        maxOutputTokens: 64
";

#[tokio::test]
async fn failures_seen_by_one_replica_open_the_breaker_for_both() {
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.yaml");
    std::fs::write(&routes, BREAKER_ROUTES).unwrap();
    let bedrock = BedrockStandIn::start().await.unwrap();
    bedrock.set_script("shared-primary", Script::rejected(Rejection::Throttled));
    bedrock.set_script("shared-secondary", Script::reply(["from ", "the second"]));
    let routes = routes.display().to_string();
    let endpoint = bedrock.base_url();
    let replicas = Replicas::start_with(&[
        ("PARLEY_ROUTES_FILE", &routes),
        ("PARLEY_BEDROCK_ENDPOINT_URL", &endpoint),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "AKIDSTANDIN"),
        ("AWS_SECRET_ACCESS_KEY", "secret"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ])
    .await;
    let user = token("breaker-user", "user", "c1").await;
    let answered_by = |replica: &'static str| {
        let replicas = &replicas;
        let user = &user;
        async move {
            let on = if replica == "a" {
                &replicas.a
            } else {
                &replicas.b
            };
            let session = replicas.session(on, user).await;
            let mut stream = replicas.reply(on, user, &session).await;
            let model = next(&mut stream).await;
            assert_eq!(model.event, "model");
            data(&model)["model"].as_str().unwrap().to_owned()
        }
    };
    let primary_calls = || {
        bedrock
            .calls()
            .iter()
            .filter(|call| call.model == "shared-primary")
            .count()
    };
    // Two throttles on replica A open the primary's breaker...
    for _ in 0..2 {
        assert_eq!(answered_by("a").await, "shared-secondary");
    }
    assert_eq!(primary_calls(), 2);
    // ...and replica B, which never saw a failure, skips it at once.
    assert_eq!(answered_by("b").await, "shared-secondary");
    assert_eq!(primary_calls(), 2);
    let metrics = replicas
        .http
        .get(format!("{}/metrics", replicas.b.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let open = "parley_target_state{route=\"default\",model=\"shared-primary\"} 2";
    assert!(metrics.contains(open), "{metrics}");
}
