//! API keys for programs, kept by the same stores as the sessions
//! (embedded and MongoDB), through one trait with one conformance suite.
//!
//! A store keeps the SHA-256 of a key's secret, never the secret; making
//! and checking secrets is `auth::keys`'s job.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::ObjectId;
use crate::error::Error;
use crate::identity::Role;

/// One key: who made it, what it may do (the creator's role and cohorts
/// when it was made), and the hash of its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: ObjectId,
    /// The creator, on whose behalf the key acts.
    pub user_id: String,
    pub name: String,
    pub role: Role,
    pub cohorts: Vec<String>,
    /// SHA-256 of the secret.
    pub secret_sha256: [u8; 32],
    pub created_at: DateTime<Utc>,
    /// `None`: the key works until it is deleted.
    pub expires_at: Option<DateTime<Utc>>,
}

#[async_trait]
pub trait ApiKeyStore: Send + Sync {
    async fn create_key(&self, key: &ApiKey) -> Result<(), Error>;

    /// Key `id`; `None` once it is deleted (or if it never existed).
    async fn key(&self, id: ObjectId) -> Result<Option<ApiKey>, Error>;

    /// `user_id`'s keys, newest first.
    async fn keys_of(&self, user_id: &str) -> Result<Vec<ApiKey>, Error>;

    /// Deletes key `id` — only if `owner` made it, when `owner` is given;
    /// whether a key was deleted.
    async fn delete_key(&self, id: ObjectId, owner: Option<&str>) -> Result<bool, Error>;
}

/// A SHA-256 digest as lowercase hexadecimal, as both stores keep it.
pub(super) fn digest_hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

pub(super) fn digest_from_hex(text: &str) -> Result<[u8; 32], Error> {
    let corrupt = || Error::Store("a stored key hash is not 64 hexadecimal characters".into());
    if text.len() != 64 || !text.is_ascii() {
        return Err(corrupt());
    }
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).map_err(|_| corrupt())?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| corrupt())?;
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_round_trip_through_hex() {
        let digest: [u8; 32] = std::array::from_fn(|i| (i * 37) as u8);
        assert_eq!(digest_from_hex(&digest_hex(&digest)).unwrap(), digest);
        assert!(digest_from_hex("zz").is_err());
        assert!(digest_from_hex(&"g".repeat(64)).is_err());
    }
}
