//! Authentication: JWT bearer tokens, HS256 with a shared secret and/or
//! RS256/ES256 with keys from a JWKS URL, and API keys (`keys`), accepted
//! wherever a JWT is. Authorization rules live in `policy`.

pub mod dev;
mod jwks;
pub mod keys;
pub mod policy;
mod verified;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{FromRef, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use jwks::JwksClient;
pub use jwks::JwksSettings;
use verified::VerifiedTokens;

pub use crate::identity::{Principal, Role};

use crate::config::Config;
use crate::error::Error;
use crate::store::ApiKeyStore;

/// Tokens longer than this are rejected before any parsing.
const MAX_TOKEN_BYTES: usize = 8 * 1024;
const DEV_SECRET_FILE: &str = "dev-jwt-secret";

/// The claims Parley mints (`token` subcommand, dev token).
#[derive(Debug, Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    role: Role,
    cohorts: &'a [String],
    iat: u64,
    nbf: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Where the HS256 secret came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `PARLEY_JWT_SECRET`.
    Configured,
    /// Generated for local mode and kept in this file.
    DevFile { path: PathBuf, created: bool },
}

#[derive(Debug, Clone)]
pub struct Hs256Secret {
    pub bytes: Vec<u8>,
    pub source: SecretSource,
}

/// Resolves the HS256 secret the same way for `serve` and `token`:
/// the configured one; else, in local mode, a generated dev secret kept in
/// the data dir; else none (JWKS only). Outside local mode, some way to
/// verify tokens must be configured.
pub async fn resolve_hs256_secret(config: &Config) -> Result<Option<Hs256Secret>, Error> {
    if let Some(secret) = &config.jwt_secret {
        if secret.is_empty() {
            return Err(Error::Config("PARLEY_JWT_SECRET is empty".into()));
        }
        return Ok(Some(Hs256Secret {
            bytes: secret.as_bytes().to_vec(),
            source: SecretSource::Configured,
        }));
    }
    if config.jwks_url.is_some() {
        return Ok(None);
    }
    if !config.is_local() {
        return Err(Error::Config(
            "no token verification configured: set PARLEY_JWT_SECRET and/or PARLEY_JWKS_URL".into(),
        ));
    }
    load_or_create_dev_secret(&config.data_dir).await.map(Some)
}

async fn load_or_create_dev_secret(data_dir: &Path) -> Result<Hs256Secret, Error> {
    let path = data_dir.join(DEV_SECRET_FILE);
    match tokio::fs::read_to_string(&path).await {
        Ok(text) if !text.trim().is_empty() => {
            return Ok(Hs256Secret {
                bytes: text.trim().as_bytes().to_vec(),
                source: SecretSource::DevFile {
                    path,
                    created: false,
                },
            });
        }
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(Error::io(format!("reading {}", path.display()), error)),
    }
    tokio::fs::create_dir_all(data_dir)
        .await
        .map_err(|error| Error::io(format!("creating {}", data_dir.display()), error))?;
    let mut random = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut random);
    let secret: String = random.iter().map(|byte| format!("{byte:02x}")).collect();
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true).mode(0o600);
    let mut file = options
        .open(&path)
        .await
        .map_err(|error| Error::io(format!("creating {}", path.display()), error))?;
    tokio::io::AsyncWriteExt::write_all(&mut file, secret.as_bytes())
        .await
        .map_err(|error| Error::io(format!("writing {}", path.display()), error))?;
    tokio::io::AsyncWriteExt::flush(&mut file)
        .await
        .map_err(|error| Error::io(format!("writing {}", path.display()), error))?;
    Ok(Hs256Secret {
        bytes: secret.into_bytes(),
        source: SecretSource::DevFile {
            path,
            created: true,
        },
    })
}

/// What a verifier accepts.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub hs256_secret: Option<Vec<u8>>,
    pub jwks: Option<JwksSettings>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
}

impl AuthSettings {
    pub fn from_config(config: &Config, hs256_secret: Option<Vec<u8>>) -> Self {
        Self {
            hs256_secret,
            jwks: config.jwks_url.clone().map(|url| JwksSettings {
                url,
                min_refresh_interval: Duration::from_secs(config.jwks_min_refresh_seconds),
                max_age: Duration::from_secs(config.jwks_max_age_seconds),
            }),
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
            leeway: Duration::from_secs(config.jwt_leeway_seconds),
        }
    }
}

/// Verifies bearer tokens. The token's `alg` picks the key source, so a
/// token can never be checked against a key of another family: HS256 only
/// against the shared secret, RS256/ES256 only against JWKS keys of that type.
pub struct Authenticator {
    hs256: Option<DecodingKey>,
    jwks: Option<JwksClient>,
    /// The claims each algorithm's tokens must carry, built once: a
    /// `Validation` holds sets of strings, too dear to build per request.
    hs256_validation: Validation,
    rs256_validation: Validation,
    es256_validation: Validation,
    /// Where API keys are looked up; without it, keys are refused.
    keys: Option<Arc<dyn ApiKeyStore>>,
    /// HS256 tokens verified lately, checked again for their times only.
    verified: VerifiedTokens,
}

/// A verified token's claims: the principal, and the times within which
/// the token may be taken again without checking its signature. Claims are
/// read before they are validated, so a time that is missing or not whole
/// seconds reads as `None` here, and the validation refuses it as before.
#[derive(Deserialize)]
struct VerifiedClaims {
    #[serde(flatten)]
    principal: Principal,
    #[serde(default, deserialize_with = "seconds")]
    exp: Option<u64>,
    #[serde(default, deserialize_with = "seconds")]
    nbf: Option<u64>,
}

fn seconds<'de, D: serde::Deserializer<'de>>(claim: D) -> Result<Option<u64>, D::Error> {
    Ok(serde_json::Value::deserialize(claim)?.as_u64())
}

impl Authenticator {
    pub fn new(settings: AuthSettings) -> Result<Self, Error> {
        if settings.hs256_secret.is_none() && settings.jwks.is_none() {
            return Err(Error::Config(
                "an HS256 secret or a JWKS URL is required".into(),
            ));
        }
        Ok(Self {
            hs256_validation: validation(Algorithm::HS256, &settings),
            rs256_validation: validation(Algorithm::RS256, &settings),
            es256_validation: validation(Algorithm::ES256, &settings),
            hs256: settings
                .hs256_secret
                .as_deref()
                .map(DecodingKey::from_secret),
            jwks: settings.jwks.map(JwksClient::new).transpose()?,
            keys: None,
            verified: VerifiedTokens::new(settings.leeway.as_secs()),
        })
    }

    /// Also accepts the API keys in `keys`.
    pub fn with_api_keys(mut self, keys: Arc<dyn ApiKeyStore>) -> Self {
        self.keys = Some(keys);
        self
    }

    pub async fn verify(&self, token: &str) -> Result<Principal, Error> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Error::InvalidToken("token too long"));
        }
        if keys::is_api_key(token) {
            let store = self
                .keys
                .as_deref()
                .ok_or(Error::InvalidToken("API keys are not accepted here"))?;
            return keys::verify(store, token).await;
        }
        let now = unix_now();
        if let Some(verified) = now.and_then(|now| self.verified.get(token, now)) {
            return verified;
        }
        // Unsupported algorithms (including `none`) fail to parse here.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Error::InvalidToken("malformed token or unsupported algorithm"))?;
        // RFC 7515 §4.1.11: extensions marked critical must be understood,
        // and this verifier implements none (`b64: false`, for one, changes
        // what the signature covers).
        if header.crit.is_some() {
            return Err(Error::InvalidToken("unsupported critical header"));
        }
        let jwks_key;
        let (key, validation) = match header.alg {
            Algorithm::HS256 => (
                self.hs256
                    .as_ref()
                    .ok_or(Error::InvalidToken("HS256 tokens are not accepted here"))?,
                &self.hs256_validation,
            ),
            Algorithm::RS256 | Algorithm::ES256 => {
                let jwks = self.jwks.as_ref().ok_or(Error::InvalidToken(
                    "RS256/ES256 tokens need a configured JWKS URL",
                ))?;
                let kid = header
                    .kid
                    .as_deref()
                    .ok_or(Error::InvalidToken("missing kid"))?;
                jwks_key = jwks.key(kid, header.alg).await?;
                let validation = if header.alg == Algorithm::RS256 {
                    &self.rs256_validation
                } else {
                    &self.es256_validation
                };
                (jwks_key.as_ref(), validation)
            }
            _ => return Err(Error::InvalidToken("unsupported algorithm")),
        };
        let claims = jsonwebtoken::decode::<VerifiedClaims>(token, key, validation)
            .map_err(|error| Error::InvalidToken(rejection_reason(error.kind())))?
            .claims;
        let principal = claims.principal;
        if principal.sub.is_empty() || principal.sub.len() > 256 {
            return Err(Error::InvalidToken("sub must be 1 to 256 bytes"));
        }
        if let (Algorithm::HS256, Some(now), Some(exp)) = (header.alg, now, claims.exp) {
            self.verified
                .insert(token, principal.clone(), exp, claims.nbf, now);
        }
        Ok(principal)
    }
}

/// The time as token claims give it, in seconds since 1970; `None` for a
/// clock before then, which keeps no verification.
fn unix_now() -> Option<u64> {
    let since_1970 = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    Some(since_1970.as_secs())
}

/// What a token signed with `algorithm` must carry to be accepted.
fn validation(algorithm: Algorithm, settings: &AuthSettings) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = settings.leeway.as_secs();
    validation.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    if let Some(issuer) = &settings.issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    match &settings.audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}

fn rejection_reason(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "token expired",
        ErrorKind::ImmatureSignature => "token not yet valid",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::InvalidAlgorithm => "algorithm does not match the key",
        ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
        ErrorKind::Json(_) | ErrorKind::InvalidClaimFormat(_) => "invalid claims",
        _ => "invalid token",
    }
}

/// Mints an HS256 token for `sub`, valid from now for `ttl`.
pub fn mint_token(
    secret: &[u8],
    principal: &Principal,
    ttl: Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<String, Error> {
    let now = unix_now().ok_or_else(|| Error::Config("system clock is before 1970".into()))?;
    let claims = MintedClaims {
        sub: &principal.sub,
        role: principal.role,
        cohorts: &principal.cohorts,
        iat: now,
        nbf: now,
        exp: now.saturating_add(ttl.as_secs()),
        iss: issuer,
        aud: audience,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|error| Error::Config(format!("signing the token failed: {error}")))
}

impl<S> FromRequestParts<S> for Principal
where
    S: Send + Sync,
    Arc<Authenticator>: FromRef<S>,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // Set by middleware that already verified this request's token (rate limiting).
        if let Some(principal) = parts.extensions.get::<Principal>() {
            return Ok(principal.clone());
        }
        let token = bearer_token(&parts.headers)?;
        Arc::<Authenticator>::from_ref(state).verify(token).await
    }
}

/// The token of the one `Authorization: Bearer <token>` header. Several
/// Authorization headers are refused: a proxy that checked another one than
/// the service would disagree about who is calling.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, Error> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let header = values.next().ok_or(Error::MissingToken)?;
    if values.next().is_some() {
        return Err(Error::InvalidToken("more than one Authorization header"));
    }
    let value = header
        .to_str()
        .map_err(|_| Error::InvalidToken("malformed Authorization"))?;
    let (scheme, token) = value.split_once(' ').ok_or(Error::InvalidToken(
        "expected `Authorization: Bearer <token>`",
    ))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Error::InvalidToken(
            "expected `Authorization: Bearer <token>`",
        ));
    }
    Ok(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Principal {
        Principal {
            sub: "alice".into(),
            role: Role::User,
            cohorts: vec!["c1".into()],
        }
    }

    fn verifier(secret: &[u8]) -> Authenticator {
        Authenticator::new(AuthSettings {
            hs256_secret: Some(secret.to_vec()),
            jwks: None,
            issuer: Some("parley".into()),
            audience: Some("chat".into()),
            leeway: Duration::from_secs(5),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn minted_tokens_verify_round_trip() {
        let token = mint_token(
            b"k",
            &alice(),
            Duration::from_secs(60),
            Some("parley"),
            Some("chat"),
        )
        .unwrap();
        assert_eq!(verifier(b"k").verify(&token).await.unwrap(), alice());
        let forged = verifier(b"other").verify(&token).await.unwrap_err();
        assert!(
            matches!(forged, Error::InvalidToken("bad signature")),
            "{forged:?}"
        );
    }

    #[tokio::test]
    async fn a_token_taken_again_is_refused_once_it_expires() {
        let verifier = Authenticator::new(AuthSettings {
            hs256_secret: Some(b"k".to_vec()),
            jwks: None,
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
        })
        .unwrap();
        let token = mint_token(b"k", &alice(), Duration::from_secs(1), None, None).unwrap();
        assert_eq!(verifier.verify(&token).await.unwrap(), alice());
        assert_eq!(verifier.verify(&token).await.unwrap(), alice());
        // `exp` is a whole second: past it by more than a second is expired.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let expired = verifier.verify(&token).await.unwrap_err();
        assert!(
            matches!(expired, Error::InvalidToken("token expired")),
            "{expired:?}"
        );
    }

    #[tokio::test]
    async fn dev_secret_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_dev_secret(dir.path()).await.unwrap();
        let second = load_or_create_dev_secret(dir.path()).await.unwrap();
        assert_eq!(first.bytes, second.bytes);
        assert_eq!(first.bytes.len(), 64);
        assert!(matches!(
            first.source,
            SecretSource::DevFile { created: true, .. }
        ));
        assert!(matches!(
            second.source,
            SecretSource::DevFile { created: false, .. }
        ));
    }
}
