//! Token verification against a real JWKS endpoint (an in-test HTTP server
//! serving keys from tests/keys/), and the attacks it must reject.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
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

/// A JWKS endpoint whose key set the test can change, counting fetches.
struct Issuer {
    keys: Arc<Mutex<JwkSet>>,
    fetches: Arc<AtomicUsize>,
    url: String,
    stop: CancellationToken,
}

impl Issuer {
    async fn start(keys: Vec<Jwk>) -> Self {
        let keys = Arc::new(Mutex::new(JwkSet { keys }));
        let fetches = Arc::new(AtomicUsize::new(0));
        let state = (Arc::clone(&keys), Arc::clone(&fetches));
        let router = axum::Router::new()
            .route(
                "/jwks.json",
                get(|State((keys, fetches)): State<(Arc<Mutex<JwkSet>>, Arc<AtomicUsize>)>| async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    let set = keys.lock().unwrap().clone();
                    Json(set)
                }),
            )
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
                .unwrap();
        });
        Self {
            keys,
            fetches,
            url,
            stop,
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
