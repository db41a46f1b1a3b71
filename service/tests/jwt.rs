//! Token verification against a real JWKS endpoint (an in-test HTTP server
//! serving keys from tests/keys/), and the attacks it must reject.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parley_service::Error;
use parley_service::auth::{AuthSettings, Authenticator, JwksSettings, Role};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "parley";
const RSA_PRIVATE: &[u8] = include_bytes!("keys/rsa-private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("keys/rsa-public.pem");
const RSA_ROTATED_PRIVATE: &[u8] = include_bytes!("keys/rsa-rotated-private.pem");
const EC_PRIVATE: &[u8] = include_bytes!("keys/ec-private.pem");

fn jwk(private_pem: &[u8], algorithm: Algorithm, kid: &str) -> Jwk {
    let key = match algorithm {
        Algorithm::ES256 => EncodingKey::from_ec_pem(private_pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(private_pem).unwrap(),
    };
    let mut jwk = Jwk::from_encoding_key(&key, algorithm).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    jwk
}

/// A JWKS endpoint whose key set the test can change, counting fetches;
/// it can also answer something else than keys, or go down.
struct Issuer {
    keys: Arc<Mutex<JwkSet>>,
    /// When set, the endpoint answers this status and body instead.
    override_answer: Arc<Mutex<Option<(StatusCode, &'static str)>>>,
    fetches: Arc<AtomicUsize>,
    url: String,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

type IssuerState = (
    Arc<Mutex<JwkSet>>,
    Arc<Mutex<Option<(StatusCode, &'static str)>>>,
    Arc<AtomicUsize>,
);

impl Issuer {
    async fn start(keys: Vec<Jwk>) -> Self {
        let keys = Arc::new(Mutex::new(JwkSet { keys }));
        let override_answer = Arc::new(Mutex::new(None));
        let fetches = Arc::new(AtomicUsize::new(0));
        let state = (
            Arc::clone(&keys),
            Arc::clone(&override_answer),
            Arc::clone(&fetches),
        );
        let router = axum::Router::new()
            .route(
                "/jwks.json",
                get(
                    |State((keys, answer, fetches)): State<IssuerState>| async move {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        if let Some((status, body)) = *answer.lock().unwrap() {
                            return (status, body).into_response();
                        }
                        let set = keys.lock().unwrap().clone();
                        Json(set).into_response()
                    },
                ),
            )
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
                .unwrap();
        });
        Self {
            keys,
            override_answer,
            fetches,
            url,
            stop,
            task: Some(task),
        }
    }

    /// From now on the endpoint answers `status` with `body`.
    fn answer(&self, status: StatusCode, body: &'static str) {
        *self.override_answer.lock().unwrap() = Some((status, body));
    }

    /// Stops the endpoint; connections to it are refused afterwards.
    async fn go_down(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }

    fn verifier(&self, min_refresh: Duration) -> Authenticator {
        Authenticator::new(AuthSettings {
            hs256_secret: Some(common::SECRET.to_vec()),
            jwks: Some(JwksSettings {
                url: self.url.clone(),
                min_refresh_interval: min_refresh,
                max_age: Duration::from_secs(3600),
            }),
            issuer: Some(ISSUER.into()),
            audience: Some(AUDIENCE.into()),
            leeway: Duration::from_secs(5),
        })
        .unwrap()
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims() -> Value {
    json!({
        "sub": "alice", "role": "user", "cohorts": ["c1"],
        "iss": ISSUER, "aud": AUDIENCE,
        "iat": now(), "nbf": now() - 10, "exp": now() + 600,
    })
}

fn sign(algorithm: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn rs256(claims: &Value) -> String {
    sign(
        Algorithm::RS256,
        Some("rsa-1"),
        claims,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap(),
    )
}

async fn issuer() -> Issuer {
    Issuer::start(vec![
        jwk(RSA_PRIVATE, Algorithm::RS256, "rsa-1"),
        jwk(EC_PRIVATE, Algorithm::ES256, "ec-1"),
    ])
    .await
}

fn assert_rejected(result: Result<parley_service::auth::Principal, Error>, reason: &str) {
    match result {
        Err(Error::InvalidToken(actual)) => assert_eq!(actual, reason),
        other => panic!("expected InvalidToken({reason}), got {other:?}"),
    }
}

#[tokio::test]
async fn valid_rs256_es256_and_hs256_tokens_are_accepted() {
    let issuer = issuer().await;
    let verifier = issuer.verifier(Duration::ZERO);
    let principal = verifier.verify(&rs256(&claims())).await.unwrap();
    assert_eq!(
        (principal.sub.as_str(), principal.role),
        ("alice", Role::User)
    );
    assert_eq!(principal.cohorts, ["c1"]);
    let es256 = sign(
        Algorithm::ES256,
        Some("ec-1"),
        &claims(),
        &EncodingKey::from_ec_pem(EC_PRIVATE).unwrap(),
    );
    verifier.verify(&es256).await.unwrap();
    let hs256 = sign(
        Algorithm::HS256,
        None,
        &claims(),
        &EncodingKey::from_secret(common::SECRET),
    );
    verifier.verify(&hs256).await.unwrap();
}

#[tokio::test]
async fn alg_none_is_rejected() {
    let issuer = issuer().await;
    let encode = |value: &Value| URL_SAFE_NO_PAD.encode(value.to_string());
    for header in [
        json!({"alg": "none", "typ": "JWT"}),
        json!({"alg": "None"}),
        json!({"alg": "NONE", "kid": "rsa-1"}),
    ] {
        let token = format!("{}.{}.", encode(&header), encode(&claims()));
        let result = issuer.verifier(Duration::ZERO).verify(&token).await;
        assert_rejected(result, "malformed token or unsupported algorithm");
    }
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_rejected() {
    let issuer = issuer().await;
    let token = sign(
        Algorithm::HS256,
        Some("rsa-1"),
        &claims(),
        &EncodingKey::from_secret(RSA_PUBLIC),
    );
    assert_rejected(
        issuer.verifier(Duration::ZERO).verify(&token).await,
        "bad signature",
    );

    // Without a shared secret configured, HS256 is not accepted at all.
    let jwks_only = Authenticator::new(AuthSettings {
        hs256_secret: None,
        jwks: Some(JwksSettings {
            url: issuer.url.clone(),
            min_refresh_interval: Duration::ZERO,
            max_age: Duration::from_secs(60),
        }),
        issuer: None,
        audience: None,
        leeway: Duration::ZERO,
    })
    .unwrap();
    assert_rejected(
        jwks_only.verify(&token).await,
        "HS256 tokens are not accepted here",
    );
}

#[tokio::test]
async fn a_key_of_another_type_than_the_alg_is_rejected() {
    let issuer = issuer().await;
    // ES256 header naming the RSA key id.
    let token = sign(
        Algorithm::ES256,
        Some("rsa-1"),
        &claims(),
        &EncodingKey::from_ec_pem(EC_PRIVATE).unwrap(),
    );
    assert_rejected(
        issuer.verifier(Duration::ZERO).verify(&token).await,
        "algorithm does not match the key",
    );
}

#[tokio::test]
async fn time_issuer_and_audience_claims_are_checked() {
    let issuer = issuer().await;
    let verifier = issuer.verifier(Duration::ZERO);
    let with = |field: &str, value: Value| {
        let mut claims = claims();
        claims[field] = value;
        rs256(&claims)
    };
    assert_rejected(
        verifier.verify(&with("exp", json!(now() - 60))).await,
        "token expired",
    );
    assert_rejected(
        verifier.verify(&with("nbf", json!(now() + 600))).await,
        "token not yet valid",
    );
    assert_rejected(
        verifier
            .verify(&with("iss", json!("https://evil.test")))
            .await,
        "wrong issuer",
    );
    assert_rejected(
        verifier.verify(&with("aud", json!("someone-else"))).await,
        "wrong audience",
    );
    assert_rejected(
        verifier.verify(&with("role", json!("root"))).await,
        "invalid claims",
    );
    let mut no_exp = claims();
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_rejected(
        verifier.verify(&rs256(&no_exp)).await,
        "a required claim is missing",
    );
    // Within the leeway, a just-expired token still passes.
    verifier
        .verify(&with("exp", json!(now() - 2)))
        .await
        .unwrap();
}

#[tokio::test]
async fn tampered_payload_is_rejected() {
    let issuer = issuer().await;
    let token = rs256(&claims());
    let mut parts: Vec<&str> = token.split('.').collect();
    let mut escalated = claims();
    escalated["role"] = json!("admin");
    let forged_payload = URL_SAFE_NO_PAD.encode(escalated.to_string());
    parts[1] = &forged_payload;
    let tampered = parts.join(".");
    assert_rejected(
        issuer.verifier(Duration::ZERO).verify(&tampered).await,
        "bad signature",
    );
}

#[tokio::test]
async fn unknown_kid_is_rejected_and_refreshes_are_rate_limited() {
    let issuer = issuer().await;
    let verifier = issuer.verifier(Duration::from_secs(3600));
    verifier.verify(&rs256(&claims())).await.unwrap();
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), 1);
    let key = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
    for n in 0..5 {
        let token = sign(
            Algorithm::RS256,
            Some(&format!("unknown-{n}")),
            &claims(),
            &key,
        );
        assert_rejected(verifier.verify(&token).await, "unknown key id");
    }
    // Within the minimum refresh interval, unknown kids do not reach the issuer.
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), 1);
    let missing_kid = sign(Algorithm::RS256, None, &claims(), &key);
    assert_rejected(verifier.verify(&missing_kid).await, "missing kid");
}

#[tokio::test]
async fn rotated_keys_are_fetched_on_an_unknown_kid() {
    let issuer = issuer().await;
    let verifier = issuer.verifier(Duration::ZERO);
    verifier.verify(&rs256(&claims())).await.unwrap();
    let rotated = sign(
        Algorithm::RS256,
        Some("rsa-2"),
        &claims(),
        &EncodingKey::from_rsa_pem(RSA_ROTATED_PRIVATE).unwrap(),
    );
    assert_rejected(verifier.verify(&rotated).await, "unknown key id");
    issuer
        .keys
        .lock()
        .unwrap()
        .keys
        .push(jwk(RSA_ROTATED_PRIVATE, Algorithm::RS256, "rsa-2"));
    verifier.verify(&rotated).await.unwrap();
}

#[tokio::test]
async fn concurrent_first_requests_share_one_fetch() {
    let issuer = issuer().await;
    let verifier = Arc::new(issuer.verifier(Duration::from_secs(3600)));
    let token = rs256(&claims());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let verifier = Arc::clone(&verifier);
        let token = token.clone();
        tasks.spawn(async move { verifier.verify(&token).await });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap().unwrap();
    }
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_unreachable_issuer_is_a_503_not_a_401() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    drop(listener);
    let verifier = Authenticator::new(AuthSettings {
        hs256_secret: None,
        jwks: Some(JwksSettings {
            url,
            min_refresh_interval: Duration::ZERO,
            max_age: Duration::from_secs(60),
        }),
        issuer: None,
        audience: None,
        leeway: Duration::ZERO,
    })
    .unwrap();
    let result = verifier.verify(&rs256(&claims())).await;
    assert!(
        matches!(result, Err(Error::AuthUnavailable(_))),
        "{result:?}"
    );
}

impl Issuer {
    /// A verifier that fetches the keys again whenever a token needs them.
    fn always_refreshing_verifier(&self) -> Authenticator {
        Authenticator::new(AuthSettings {
            hs256_secret: Some(common::SECRET.to_vec()),
            jwks: Some(JwksSettings {
                url: self.url.clone(),
                min_refresh_interval: Duration::ZERO,
                max_age: Duration::ZERO,
            }),
            issuer: Some(ISSUER.into()),
            audience: Some(AUDIENCE.into()),
            leeway: Duration::from_secs(5),
        })
        .unwrap()
    }
}

/// The API on an embedded store, verifying tokens with `verifier`.
async fn api(verifier: Authenticator) -> (axum::Router, tempfile::TempDir) {
    let (store, dir) = common::embedded_store().await;
    let mut state = common::state(&store).await;
    state.auth = Arc::new(verifier);
    (parley_service::app(state), dir)
}

async fn list_sessions(router: &axum::Router, token: &str) -> (StatusCode, Value) {
    let request = Request::builder()
        .uri("/api/chat/sessions")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    common::send(router, request).await
}

fn without(field: &str) -> Value {
    let mut claims = claims();
    claims.as_object_mut().unwrap().remove(field);
    claims
}

fn with(field: &str, value: Value) -> Value {
    let mut claims = claims();
    claims[field] = value;
    claims
}

/// Each attack, over HTTP: 401 `INVALID_TOKEN` naming the reason, and
/// nothing of the token, the keys, the secret or the issuer in the answer.
#[tokio::test]
async fn every_token_attack_is_a_401_that_leaks_nothing() {
    let issuer = issuer().await;
    let (router, _dir) = api(issuer.verifier(Duration::from_secs(3600))).await;
    // The keys are fetched once, so unknown key ids are refused, not fetched.
    let (status, _) = list_sessions(&router, &rs256(&claims())).await;
    assert_eq!(status, StatusCode::OK);

    let encode = |value: &Value| URL_SAFE_NO_PAD.encode(value.to_string());
    let rotated = EncodingKey::from_rsa_pem(RSA_ROTATED_PRIVATE).unwrap();
    let genuine = rs256(&claims());
    let mut tampered: Vec<String> = genuine.split('.').map(str::to_owned).collect();
    tampered[1] = encode(&with("role", json!("admin")));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "alg none",
            format!(
                "{}.{}.",
                encode(&json!({"alg": "none", "typ": "JWT"})),
                encode(&claims())
            ),
            "malformed token or unsupported algorithm",
        ),
        (
            "HS256 signed with the JWKS public key",
            sign(
                Algorithm::HS256,
                Some("rsa-1"),
                &claims(),
                &EncodingKey::from_secret(RSA_PUBLIC),
            ),
            "bad signature",
        ),
        (
            "RS256 by a key not in the JWKS, naming a JWKS key id",
            sign(Algorithm::RS256, Some("rsa-1"), &claims(), &rotated),
            "bad signature",
        ),
        (
            "RS256 naming a key id not in the JWKS",
            sign(Algorithm::RS256, Some("rsa-2"), &claims(), &rotated),
            "unknown key id",
        ),
        (
            "expired",
            rs256(&with("exp", json!(now() - 600))),
            "token expired",
        ),
        (
            "not yet valid",
            rs256(&with("nbf", json!(now() + 600))),
            "token not yet valid",
        ),
        (
            "wrong issuer",
            rs256(&with("iss", json!("https://evil.test"))),
            "wrong issuer",
        ),
        (
            "wrong audience",
            rs256(&with("aud", json!("other-app"))),
            "wrong audience",
        ),
        ("missing sub", rs256(&without("sub")), "invalid claims"),
        (
            "missing exp",
            rs256(&without("exp")),
            "a required claim is missing",
        ),
        ("missing role", rs256(&without("role")), "invalid claims"),
        (
            "unknown role",
            rs256(&with("role", json!("root"))),
            "invalid claims",
        ),
        (
            "empty sub",
            rs256(&with("sub", json!(""))),
            "sub must be 1 to 256 bytes",
        ),
        (
            "100 KB token",
            format!("{}{}", genuine, "A".repeat(100 * 1024)),
            "token too long",
        ),
        ("tampered payload", tampered.join("."), "bad signature"),
        (
            // RFC 7515: an extension marked critical that the verifier does
            // not implement (b64=false changes what is signed) is refused.
            "genuine signature, critical b64 extension",
            {
                let mut header = Header::new(Algorithm::RS256);
                header.kid = Some("rsa-1".into());
                header.crit = Some(vec!["b64".into()]);
                let key = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
                jsonwebtoken::encode(&header, &claims(), &key).unwrap()
            },
            "unsupported critical header",
        ),
        (
            "signature removed",
            format!("{}.", genuine.rsplit_once('.').unwrap().0),
            "bad signature",
        ),
        (
            "alg None, capitalised",
            format!(
                "{}.{}.",
                encode(&json!({"alg": "None", "typ": "JWT"})),
                encode(&claims())
            ),
            "malformed token or unsupported algorithm",
        ),
        (
            "alg NONE with a key id",
            format!(
                "{}.{}.",
                encode(&json!({"alg": "NONE", "kid": "rsa-1"})),
                encode(&claims())
            ),
            "malformed token or unsupported algorithm",
        ),
        (
            "key id as a path",
            sign(
                Algorithm::RS256,
                Some("../../../../dev/null"),
                &claims(),
                &rotated,
            ),
            "unknown key id",
        ),
        (
            "HS256 with an empty secret",
            sign(
                Algorithm::HS256,
                None,
                &claims(),
                &EncodingKey::from_secret(b""),
            ),
            "bad signature",
        ),
        (
            // Not a number: the verifier sees no exp at all.
            "exp as a string",
            rs256(&with("exp", json!((now() + 600).to_string()))),
            "a required claim is missing",
        ),
        (
            "sub of 257 bytes",
            rs256(&with("sub", json!("a".repeat(257)))),
            "sub must be 1 to 256 bytes",
        ),
        (
            "cohorts not a list",
            rs256(&with("cohorts", json!("c1"))),
            "invalid claims",
        ),
        (
            "role as a list",
            rs256(&with("role", json!(["admin"]))),
            "invalid claims",
        ),
        (
            "not a JWT",
            "not-a-jwt".into(),
            "malformed token or unsupported algorithm",
        ),
    ];
    for (attack, token, reason) in cases {
        let (status, body) = list_sessions(&router, &token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{attack}: {body}");
        assert_eq!(
            body,
            json!({"code": "INVALID_TOKEN", "message": format!("invalid bearer token: {reason}")}),
            "{attack}"
        );
        let text = body.to_string();
        let secret = std::str::from_utf8(common::SECRET).unwrap();
        for leak in [
            &token[..token.len().min(24)],
            secret,
            &issuer.url,
            ISSUER,
            "BEGIN",
        ] {
            assert!(!text.contains(leak), "{attack}: the answer shows `{leak}`");
        }
    }
}

/// Keys already fetched keep working while the issuer is down or failing;
/// a key id they do not have is 503 (retry later), never accepted.
#[tokio::test]
async fn an_issuer_that_goes_down_keeps_cached_keys_and_unknown_key_ids_get_503() {
    let mut issuer = issuer().await;
    let (router, _dir) = api(issuer.always_refreshing_verifier()).await;
    let valid = rs256(&claims());
    let unknown_kid = sign(
        Algorithm::RS256,
        Some("rsa-2"),
        &claims(),
        &EncodingKey::from_rsa_pem(RSA_ROTATED_PRIVATE).unwrap(),
    );
    assert_eq!(list_sessions(&router, &valid).await.0, StatusCode::OK);

    issuer.answer(StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded");
    assert_eq!(list_sessions(&router, &valid).await.0, StatusCode::OK);
    let (status, body) = list_sessions(&router, &unknown_kid).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "AUTH_UNAVAILABLE");

    issuer.go_down().await;
    let fetches = issuer.fetches.load(Ordering::SeqCst);
    assert_eq!(list_sessions(&router, &valid).await.0, StatusCode::OK);
    let (status, body) = list_sessions(&router, &unknown_kid).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        body,
        json!({"code": "AUTH_UNAVAILABLE", "message": "the identity provider is unavailable; retry later"})
    );
    assert_eq!(
        issuer.fetches.load(Ordering::SeqCst),
        fetches,
        "it was down"
    );
}

/// An issuer serving junk: before any good fetch every RS256 token is 503;
/// junk keys are skipped (a symmetric key named like the RSA key must not
/// verify an HS256 token signed with it); after a good fetch, junk changes
/// nothing for the cached keys.
#[tokio::test]
async fn an_issuer_that_serves_junk_never_lets_a_token_in() {
    let valid = rs256(&claims());
    for junk in [
        "<html>maintenance</html>",
        "{\"keys\": \"nope\"}",
        "{}",
        "[]",
        "",
    ] {
        let issuer = issuer().await;
        issuer.answer(StatusCode::OK, junk);
        let (router, _dir) = api(issuer.always_refreshing_verifier()).await;
        let (status, body) = list_sessions(&router, &valid).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{junk}: {body}");
        assert_eq!(body["code"], "AUTH_UNAVAILABLE", "{junk}");
    }

    let issuer = issuer().await;
    issuer.answer(
        StatusCode::OK,
        r#"{"keys": [
            {"kty": "RSA", "kid": "rsa-1", "n": "!!not base64!!", "e": "AQAB"},
            {"kty": "oct", "kid": "rsa-1", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "rsa-1", "crv": "P-999", "x": "AA", "y": "AA"},
            "not an object"
        ]}"#,
    );
    let (router, _dir) = api(issuer.always_refreshing_verifier()).await;
    let (status, body) = list_sessions(&router, &valid).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["message"], "invalid bearer token: unknown key id");
    let with_the_oct_key = sign(
        Algorithm::HS256,
        Some("rsa-1"),
        &claims(),
        &EncodingKey::from_secret(b"secret"),
    );
    let (status, body) = list_sessions(&router, &with_the_oct_key).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    let issuer = self::issuer().await;
    let (router, _dir) = api(issuer.always_refreshing_verifier()).await;
    assert_eq!(list_sessions(&router, &valid).await.0, StatusCode::OK);
    issuer.answer(StatusCode::OK, "<html>maintenance</html>");
    assert_eq!(list_sessions(&router, &valid).await.0, StatusCode::OK);
    let unknown_kid = sign(
        Algorithm::RS256,
        Some("rsa-2"),
        &claims(),
        &EncodingKey::from_rsa_pem(RSA_ROTATED_PRIVATE).unwrap(),
    );
    let (status, body) = list_sessions(&router, &unknown_kid).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
}

/// Keys a token names itself (an embedded `jwk`, a `jku` or `x5u` URL) are
/// never fetched nor used: the attacker's key set is not even asked, and the
/// token is a 401.
#[tokio::test]
async fn keys_named_by_the_token_itself_are_never_used() {
    let issuer = issuer().await;
    let (router, _dir) = api(issuer.always_refreshing_verifier()).await;
    // The attacker's key set holds its key under both names.
    let attacker = Issuer::start(vec![
        jwk(RSA_ROTATED_PRIVATE, Algorithm::RS256, "rsa-1"),
        jwk(RSA_ROTATED_PRIVATE, Algorithm::RS256, "rsa-2"),
    ])
    .await;
    let attacker_key = EncodingKey::from_rsa_pem(RSA_ROTATED_PRIVATE).unwrap();
    let token = |kid: &str, set: fn(&mut Header, &Issuer)| {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_owned());
        set(&mut header, &attacker);
        jsonwebtoken::encode(&header, &claims(), &attacker_key).unwrap()
    };
    let cases: [(&str, String, &str); 5] = [
        (
            "embedded jwk, a JWKS key id",
            token("rsa-1", |h, _| {
                h.jwk = Some(jwk(RSA_ROTATED_PRIVATE, Algorithm::RS256, "rsa-1"));
            }),
            "bad signature",
        ),
        (
            "embedded jwk, its own key id",
            token("rsa-2", |h, _| {
                h.jwk = Some(jwk(RSA_ROTATED_PRIVATE, Algorithm::RS256, "rsa-2"));
            }),
            "unknown key id",
        ),
        (
            "jku of the attacker's key set, a JWKS key id",
            token("rsa-1", |h, a| h.jku = Some(a.url.clone())),
            "bad signature",
        ),
        (
            "jku of the attacker's key set, its own key id",
            token("rsa-2", |h, a| h.jku = Some(a.url.clone())),
            "unknown key id",
        ),
        (
            "x5u of the attacker",
            token("rsa-2", |h, a| h.x5u = Some(a.url.clone())),
            "unknown key id",
        ),
    ];
    for (attack, token, reason) in cases {
        let (status, body) = list_sessions(&router, &token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{attack}: {body}");
        assert_eq!(
            body["message"],
            format!("invalid bearer token: {reason}"),
            "{attack}"
        );
        assert!(!body.to_string().contains(&attacker.url), "{attack}");
    }
    assert_eq!(
        attacker.fetches.load(Ordering::SeqCst),
        0,
        "the attacker's key set was fetched"
    );
}
