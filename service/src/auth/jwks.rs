//! Keys from an OIDC issuer's JWKS URL: fetched on first use, cached by key
//! id, fetched again when they are older than `max_age` or when a token names
//! an unknown key id (at most once per `min_refresh_interval`, so forged key
//! ids cannot make us hammer the issuer). Concurrent lookups share one fetch.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use foldhash::HashMap;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use crate::error::Error;

const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct JwksSettings {
    pub url: String,
    pub min_refresh_interval: Duration,
    pub max_age: Duration,
}

/// A verification key and the one algorithm it may verify.
#[derive(Clone)]
struct VerifyingKey {
    algorithm: Algorithm,
    key: Arc<DecodingKey>,
}

type KeySet = HashMap<String, VerifyingKey>;
type Refresh = Shared<BoxFuture<'static, Result<Arc<KeySet>, String>>>;

#[derive(Clone)]
pub(super) struct JwksClient {
    inner: Arc<Inner>,
}

struct Inner {
    settings: JwksSettings,
    http: reqwest::Client,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    keys: Arc<KeySet>,
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    in_flight: Option<Refresh>,
}

impl JwksClient {
    pub(super) fn new(settings: JwksSettings) -> Result<Self, Error> {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|error| Error::Config(format!("building the JWKS HTTP client: {error}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                settings,
                http,
                state: Mutex::default(),
            }),
        })
    }

    /// The key with id `kid`, provided it verifies `algorithm`.
    pub(super) async fn key(
        &self,
        kid: &str,
        algorithm: Algorithm,
    ) -> Result<Arc<DecodingKey>, Error> {
        let refresh = {
            let mut state = self.inner.lock();
            let fresh = state
                .fetched_at
                .is_some_and(|at| at.elapsed() < self.inner.settings.max_age);
            if fresh && let Some(key) = state.keys.get(kid) {
                return accept(key, algorithm);
            }
            if let Some(refresh) = state.in_flight.clone() {
                refresh
            } else {
                let may_fetch = state
                    .last_attempt
                    .is_none_or(|at| at.elapsed() >= self.inner.settings.min_refresh_interval);
                if !may_fetch {
                    return match state.keys.get(kid) {
                        Some(stale) => accept(stale, algorithm),
                        None if state.fetched_at.is_none() => {
                            Err(Error::AuthUnavailable("JWKS not fetched yet".into()))
                        }
                        None => Err(Error::InvalidToken("unknown key id")),
                    };
                }
                let refresh = self.start_refresh();
                state.in_flight = Some(refresh.clone());
                state.last_attempt = Some(Instant::now());
                refresh
            }
        };
        match refresh.await {
            Ok(keys) => keys
                .get(kid)
                .ok_or(Error::InvalidToken("unknown key id"))
                .and_then(|key| accept(key, algorithm)),
            Err(fetch_error) => {
                tracing::warn!(url = %self.inner.settings.url, error = %fetch_error, "JWKS fetch failed");
                // Keys we already had stay usable while the issuer is down.
                match self.inner.lock().keys.get(kid) {
                    Some(stale) => accept(stale, algorithm),
                    None => Err(Error::AuthUnavailable(fetch_error)),
                }
            }
        }
    }

    fn start_refresh(&self) -> Refresh {
        let inner = Arc::clone(&self.inner);
        async move {
            let result = inner.fetch().await.map(Arc::new);
            let mut state = inner.lock();
            state.in_flight = None;
            if let Ok(keys) = &result {
                state.keys = Arc::clone(keys);
                state.fetched_at = Some(Instant::now());
            }
            result
        }
        .boxed()
        .shared()
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is one assignment.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        #[derive(Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let response = self
            .http
            .get(&self.settings.url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|error| format!("fetching {}: {error}", self.settings.url))?;
        let document: Document = response
            .json()
            .await
            .map_err(|error| format!("parsing JWKS from {}: {error}", self.settings.url))?;
        let keys: KeySet = document
            .keys
            .into_iter()
            .filter_map(|value| serde_json::from_value::<Jwk>(value).ok())
            .filter_map(|jwk| {
                let algorithm = signing_algorithm(&jwk)?;
                let kid = jwk.common.key_id.clone()?;
                let key = DecodingKey::from_jwk(&jwk).ok()?;
                Some((
                    kid,
                    VerifyingKey {
                        algorithm,
                        key: Arc::new(key),
                    },
                ))
            })
            .collect();
        tracing::info!(url = %self.settings.url, keys = keys.len(), "fetched JWKS");
        Ok(keys)
    }
}

/// RS256 for RSA keys, ES256 for P-256 keys; anything else (encryption keys,
/// other curves, symmetric keys, a declared `alg` that disagrees) is ignored.
fn signing_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return None;
    }
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        _ => return None,
    };
    let declared_matches = match jwk.common.key_algorithm {
        None => true,
        Some(KeyAlgorithm::RS256) => algorithm == Algorithm::RS256,
        Some(KeyAlgorithm::ES256) => algorithm == Algorithm::ES256,
        Some(_) => false,
    };
    declared_matches.then_some(algorithm)
}

fn accept(key: &VerifyingKey, algorithm: Algorithm) -> Result<Arc<DecodingKey>, Error> {
    if key.algorithm == algorithm {
        Ok(Arc::clone(&key.key))
    } else {
        Err(Error::InvalidToken("algorithm does not match the key"))
    }
}
