//! API keys for programs: `pk_<id>_<secret>`, where the id (24 hexadecimal
//! characters) finds the key in the store and the secret (32 random bytes,
//! 64 hexadecimal characters) proves it. The store keeps only the secret's
//! SHA-256, compared in constant time; a key this strong needs no slow hash.
//!
//! A key acts as its creator with the role and cohorts the creator had when
//! it was made. Every request looks the key up, so a deleted key stops
//! working at once, on every replica.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::Error;
use crate::identity::Principal;
use crate::store::{ApiKey, ApiKeyStore, ObjectId};

/// What every API key starts with (a JWT never does).
pub const PREFIX: &str = "pk_";
const SECRET_BYTES: usize = 32;

/// A key just made: what the store keeps, and the whole key, shown once.
pub struct NewKey {
    pub key: ApiKey,
    pub secret: String,
}

/// Makes a key acting as `owner`, named `name`, valid until `expires_at`.
pub fn mint(owner: &Principal, name: String, expires_at: Option<DateTime<Utc>>) -> NewKey {
    let mut random = [0u8; SECRET_BYTES];
    rand::Rng::fill(&mut rand::rng(), &mut random);
    let id = ObjectId::new();
    let secret = format!("{PREFIX}{}_{}", id.to_hex(), hex(&random));
    let key = ApiKey {
        id,
        user_id: owner.sub.clone(),
        name,
        role: owner.role,
        cohorts: owner.cohorts.clone(),
        secret_sha256: digest(&random),
        created_at: crate::store::now(),
        expires_at,
    };
    NewKey { key, secret }
}

/// Whether a bearer token is an API key rather than a JWT.
pub fn is_api_key(token: &str) -> bool {
    token.starts_with(PREFIX)
}

/// The caller a presented key stands for: an unknown, deleted or wrong key,
/// or one that expired, is refused the same way as a bad token.
pub async fn verify(keys: &dyn ApiKeyStore, token: &str) -> Result<Principal, Error> {
    let refused = Error::InvalidToken("unknown or revoked API key");
    let (id, secret) = parse(token).ok_or(Error::InvalidToken("malformed API key"))?;
    let key = keys.key(id).await?.ok_or(refused)?;
    let matches: bool = key.secret_sha256.ct_eq(&digest(&secret)).into();
    if !matches {
        return Err(Error::InvalidToken("unknown or revoked API key"));
    }
    if key.expires_at.is_some_and(|expiry| expiry <= Utc::now()) {
        return Err(Error::InvalidToken("API key expired"));
    }
    Ok(Principal {
        sub: key.user_id,
        role: key.role,
        cohorts: key.cohorts,
    })
}

fn parse(token: &str) -> Option<(ObjectId, [u8; SECRET_BYTES])> {
    let (id, secret) = token.strip_prefix(PREFIX)?.split_once('_')?;
    let id = ObjectId::parse_str(id).ok()?;
    if secret.len() != 2 * SECRET_BYTES || !secret.is_ascii() {
        return None;
    }
    let mut bytes = [0u8; SECRET_BYTES];
    for (byte, pair) in bytes.iter_mut().zip(secret.as_bytes().chunks_exact(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some((id, bytes))
}

fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;

    #[test]
    fn a_minted_key_parses_back_to_its_id_and_secret_hash() {
        let owner = Principal {
            sub: "alice".into(),
            role: Role::Supervisor,
            cohorts: vec!["c1".into()],
        };
        let new = mint(&owner, "ci".into(), None);
        assert!(is_api_key(&new.secret));
        assert_eq!(new.secret.len(), PREFIX.len() + 24 + 1 + 64);
        let (id, secret) = parse(&new.secret).unwrap();
        assert_eq!(id, new.key.id);
        assert_eq!(digest(&secret), new.key.secret_sha256);
        assert!(!new.secret.contains(&hex(&new.key.secret_sha256)));
        assert_eq!(
            (new.key.role, new.key.cohorts.as_slice()),
            (Role::Supervisor, &["c1".to_owned()][..])
        );
        for malformed in [
            "pk_",
            "pk_nothex_00",
            &new.secret[..new.secret.len() - 1],
            &format!("{}x", new.secret),
            &new.secret.replace('_', "-"),
        ] {
            assert!(parse(malformed).is_none(), "{malformed}");
        }
    }
}
