//! The official `openai` Python client (pinned in
//! scripts/requirements-test.txt) against the real `parley-service` binary,
//! its Bedrock routes served by the Bedrock stand-in: the models listed,
//! whole and streamed completions, fallback, the client's own exceptions for
//! 402, 404 and 429 (and its retry after `Retry-After`), API keys (revoked
//! and expired ones refused), credits charged exactly as the usage records
//! say, and a client leaving mid-stream. The client's side is
//! tests/python/openai_client.py; this side sets up the service and the
//! stand-in and checks the ledger.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use parley_e2e::{Process, logged_address};
use parley_service::auth::keys::mint as mint_key;
use parley_service::auth::{Principal, Role, mint_token};
use parley_service::store::{ApiKeyStore, MongoStore};
use parley_test_support::bedrock::BedrockStandIn;
use parley_test_support::env;
use parley_test_support::script::{Fault, Rejection, Script};
use serde_json::{Value, json};

const SECRET: &str = "e2e-openai-client-secret-of-enough-length";
const PRIMARY: &str = "anthropic.claude-3-haiku-20240307-v1:0";
const SECONDARY: &str = "amazon.nova-micro-v1:0";
const RETRIED: &str = "meta.llama3-8b-instruct-v1:0";
const SLOW: &str = "mistral.mistral-7b-instruct-v0:2";
/// Upper bound for anything that should happen promptly; never a wait.
const PROMPTLY: Duration = Duration::from_secs(30);

const ROUTES: &str = "
routes:
  - alias: default
    fallbackOn: [throttled]
    targets:
      - provider: bedrock
        model: anthropic.claude-3-haiku-20240307-v1:0
        pricing: {inputPer1k: 1, outputPer1k: 2}
        maxOutputTokens: 256
      - provider: bedrock
        model: amazon.nova-micro-v1:0
        pricing: {inputPer1k: 0.5, outputPer1k: 1}
        maxOutputTokens: 256
  - alias: retried
    targets:
      - provider: bedrock
        model: meta.llama3-8b-instruct-v1:0
        pricing: {inputPer1k: 1, outputPer1k: 1}
        maxOutputTokens: 64
  - alias: slow
    targets:
      - provider: bedrock
        model: mistral.mistral-7b-instruct-v0:2
        pricing: {inputPer1k: 1, outputPer1k: 5}
        maxOutputTokens: 64
  - alias: sim
    targets:
      - provider: simulated
        model: sim-model
        pricing: {inputPer1k: 1, outputPer1k: 3}
        maxOutputTokens: 64
  - alias: dear
    targets:
      - provider: simulated
        model: sim-dear
        pricing: {inputPer1k: 1, outputPer1k: 1000}
        maxOutputTokens: 1000
  - alias: rationed
    limits: {requestsPerMinute: 1}
    targets:
      - provider: simulated
        model: sim-rationed
        pricing: {inputPer1k: 0, outputPer1k: 0}
        maxOutputTokens: 64
";

struct Service {
    _process: Process,
    base: String,
    bedrock: BedrockStandIn,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Service {
    /// The service on its embedded store.
    async fn start() -> Self {
        Self::start_with(Vec::new()).await
    }

    /// The service on a MongoDB database of its own, which the test can
    /// also write to.
    async fn start_on_mongodb() -> (Self, MongoStore) {
        let database = env::unique_name("parley_openai").replace('-', "_");
        let store = MongoStore::connect(&env::mongodb_uri(), &database)
            .await
            .unwrap();
        let service = Self::start_with(vec![
            ("PARLEY_MONGODB_URI", env::mongodb_uri()),
            ("PARLEY_MONGODB_DATABASE", database),
        ])
        .await;
        (service, store)
    }

    async fn start_with(store: Vec<(&'static str, String)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let routes = dir.path().join("routes.yaml");
        std::fs::write(&routes, ROUTES).unwrap();
        let bedrock = BedrockStandIn::start().await.unwrap();
        let mut envs = vec![
            ("PARLEY_LISTEN", "127.0.0.1:0".to_owned()),
            ("PARLEY_DATA_DIR", dir.path().display().to_string()),
            ("PARLEY_JWT_SECRET", SECRET.to_owned()),
            ("PARLEY_INITIAL_CREDITS", "10".to_owned()),
            ("PARLEY_ROUTES_FILE", routes.display().to_string()),
            ("PARLEY_BEDROCK_ENDPOINT_URL", bedrock.base_url()),
            ("PARLEY_SIMULATED_FIRST_TOKEN_MILLIS", "0".to_owned()),
            // Owners' re-attach grace: an OpenAI client never re-attaches,
            // so its leaving must end the reply without waiting for this.
            ("PARLEY_REATTACH_GRACE_SECONDS", "3600".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ACCESS_KEY_ID", "AKIDSTANDIN".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "secret".to_owned()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        ];
        envs.extend(store);
        let mut process = Process::start("parley-service", &[], &envs);
        let serving = process.wait_for_line("\"serving\"").await;
        Self {
            _process: process,
            base: format!("http://{}", logged_address(&serving)),
            bedrock,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    /// Runs one case of the Python client with `key` (a JWT or an API key);
    /// what it printed.
    async fn client(&self, case: &str, key: &str) -> Value {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/openai_client.py");
        let ran = tokio::time::timeout(
            PROMPTLY,
            tokio::process::Command::new(env::python())
                .arg(&script)
                .arg(case)
                .env("PARLEY_OPENAI_BASE_URL", format!("{}/v1", self.base))
                .env("PARLEY_OPENAI_KEY", key)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("the client's case {case} did not end"))
        .unwrap_or_else(|error| {
            panic!("running PARLEY_TEST_PYTHON failed ({error}); run `scripts/test-env.sh install`")
        });
        let stdout = String::from_utf8_lossy(&ran.stdout);
        assert!(
            ran.status.success(),
            "the client's case {case} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&ran.stderr)
        );
        serde_json::from_str(stdout.trim()).unwrap()
    }

    async fn get(&self, path: &str, token: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.unwrap()
    }

    /// Available credits, in micro-credits.
    async fn available(&self, token: &str) -> i64 {
        micros(&self.get("/api/credits/balance", token).await["available"])
    }

    /// The newest usage record, once there are `count`.
    async fn newest_usage(&self, token: &str, count: usize) -> Value {
        tokio::time::timeout(PROMPTLY, async {
            loop {
                let usage = self.get("/api/credits/usage", token).await;
                let records = usage["records"].as_array().unwrap();
                if records.len() >= count {
                    return records[0].clone();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("no usage record")
    }

    /// A new API key of `token`'s user: (id, key).
    async fn api_key(&self, token: &str) -> (String, String) {
        let response = self
            .http
            .post(format!("{}/api/keys", self.base))
            .bearer_auth(token)
            .json(&json!({"name": "python"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let created: Value = response.json().await.unwrap();
        (
            created["id"].as_str().unwrap().to_owned(),
            created["secret"].as_str().unwrap().to_owned(),
        )
    }
}

fn principal(sub: &str) -> Principal {
    Principal {
        sub: sub.to_owned(),
        role: Role::User,
        cohorts: vec!["c1".to_owned()],
    }
}

fn token(sub: &str) -> String {
    mint_token(
        SECRET.as_bytes(),
        &principal(sub),
        Duration::from_secs(3600),
        None,
        None,
    )
    .unwrap()
}

fn micros(credits: &Value) -> i64 {
    (credits.as_f64().unwrap() * 1e6).round() as i64
}

#[tokio::test]
async fn whole_and_streamed_completions_cost_exactly_what_their_usage_records_say() {
    let service = Service::start().await;
    let alice = token("alice");

    let models = service.client("models", &alice).await;
    assert_eq!(
        models["models"],
        json!(["dear", "default", "rationed", "retried", "sim", "slow"])
    );

    let before = service.available(&alice).await;
    let whole = service.client("whole", &alice).await;
    assert_eq!(whole["content"], "one two three");
    assert_eq!(whole["model"], "sim-model");
    assert_eq!(whole["finish_reason"], "stop");
    let record = service.newest_usage(&alice, 1).await;
    assert_eq!(record["outputTokens"], whole["completion_tokens"]);
    assert_eq!(record["inputTokens"], whole["prompt_tokens"]);
    let after_whole = service.available(&alice).await;
    assert!(micros(&record["charged"]) > 0);
    assert_eq!(before - after_whole, micros(&record["charged"]));

    let streamed = service.client("streamed", &alice).await;
    assert_eq!(streamed["content"], "four five six seven");
    assert_eq!(streamed["completion_tokens"], 4);
    let record = service.newest_usage(&alice, 2).await;
    assert_eq!(record["outputTokens"], 4);
    assert_eq!(record["inputTokens"], streamed["prompt_tokens"]);
    assert_eq!(
        after_whole - service.available(&alice).await,
        micros(&record["charged"])
    );

    // A throttled first target hands over to the second, whole or streamed.
    service
        .bedrock
        .set_script(PRIMARY, Script::rejected(Rejection::Throttled));
    service.bedrock.set_script(
        SECONDARY,
        Script::reply(["from ", "the ", "second"]).with_usage(7, 3),
    );
    let fallback = service.client("fallback", &alice).await;
    for mode in ["whole", "streamed"] {
        assert_eq!(fallback[mode]["model"], SECONDARY, "{mode}");
        assert_eq!(fallback[mode]["content"], "from the second", "{mode}");
        assert_eq!(fallback[mode]["prompt_tokens"], 7, "{mode}");
    }
    let record = service.newest_usage(&alice, 4).await;
    assert_eq!(record["modelId"], SECONDARY);
}

#[tokio::test]
async fn the_client_raises_its_own_exceptions_and_retries_a_throttled_call() {
    let service = Service::start().await;
    let bob = token("bob");
    let refused = service.client("insufficient", &bob).await;
    assert_eq!(refused["exception"], "APIStatusError");
    let unknown = service.client("unknown_model", &bob).await;
    assert_eq!(unknown["exception"], "NotFoundError");
    let limited = service.client("rate_limited", &bob).await;
    assert_eq!(limited["exception"], "RateLimitError");

    service
        .bedrock
        .push_script(RETRIED, Script::rejected(Rejection::Throttled));
    service
        .bedrock
        .set_script(RETRIED, Script::reply(["second ", "time"]));
    let retried = service.client("retried", &bob).await;
    assert_eq!(retried["content"], "second time");
    let calls = service
        .bedrock
        .calls()
        .into_iter()
        .filter(|call| call.model == RETRIED)
        .count();
    assert_eq!(calls, 2, "one throttled call, one retry");
}

#[tokio::test]
async fn api_keys_work_until_revoked_or_expired() {
    let (service, store) = Service::start_on_mongodb().await;
    let carol = token("carol");
    let (id, key) = service.api_key(&carol).await;
    let whole = service.client("whole", &key).await;
    assert_eq!(whole["content"], "one two three");
    // Charged to the key's creator.
    service.newest_usage(&carol, 1).await;

    let response = service
        .http
        .delete(format!("{}/api/keys/{id}", service.base))
        .bearer_auth(&carol)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let refused = service.client("refused", &key).await;
    assert!(
        refused["message"].as_str().unwrap().contains("revoked"),
        "{refused}"
    );

    // A key whose expiry has passed, as the service stores it (the API
    // refuses to create one already expired).
    let lapsed = mint_key(
        &principal("carol"),
        "lapsed".to_owned(),
        Some(chrono::Utc::now() - chrono::Duration::seconds(1)),
    );
    store.create_key(&lapsed.key).await.unwrap();
    let refused = service.client("refused", &lapsed.secret).await;
    assert!(
        refused["message"].as_str().unwrap().contains("expired"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_client_leaving_mid_stream_cancels_the_reply_upstream_and_pays_for_the_part() {
    let service = Service::start().await;
    let dave = token("dave");
    service.bedrock.set_script(
        SLOW,
        Script::reply(["first ", "never"]).with_fault(Fault::Stall { after_deltas: 1 }),
    );
    let before = service.available(&dave).await;
    let left = service.client("leave", &dave).await;
    assert_eq!(left["content"], "first ");
    // Promptly, though the owners' grace period is an hour.
    tokio::time::timeout(PROMPTLY, service.bedrock.wait_for_dropped_streams(1))
        .await
        .expect("the upstream stream was not cancelled");
    let record = service.newest_usage(&dave, 1).await;
    assert_eq!(record["outcome"], "cancelled");
    assert_eq!(record["outputTokens"], 1);
    assert!(micros(&record["charged"]) > 0);
    assert_eq!(
        before - service.available(&dave).await,
        micros(&record["charged"])
    );
}
