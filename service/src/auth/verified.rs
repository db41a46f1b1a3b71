//! HS256 tokens verified lately. A client sends the same token with every
//! request until it expires, and checking it again (base64, the claims'
//! JSON, HMAC-SHA256) was about 5% of the instructions a reply costs. A
//! token found here was verified against the same secret and the same
//! issuer and audience rules, all fixed for the process's life, so only its
//! times are checked again. Tokens verified against JWKS keys are not kept:
//! a key can be withdrawn, and a kept verification would outlive it.

use std::sync::{Mutex, PoisonError};

use foldhash::HashMap;

use crate::error::Error;
use crate::identity::Principal;

/// Enough for the clients of a busy replica; past it, entries are dropped
/// (see [`VerifiedTokens::insert`]), so memory stays bounded whatever the
/// number of users.
const CAPACITY: usize = 1024;

pub(super) struct VerifiedTokens {
    by_token: Mutex<HashMap<Box<str>, Verified>>,
    /// Seconds of clock skew allowed on `exp` and `nbf`, as the verifier allows.
    leeway: u64,
}

struct Verified {
    principal: Principal,
    exp: u64,
    nbf: Option<u64>,
}

impl VerifiedTokens {
    pub(super) fn new(leeway: u64) -> Self {
        Self {
            by_token: Mutex::default(),
            leeway,
        }
    }

    /// `token`'s principal when it was verified and its times still hold at
    /// `now` (Unix seconds); the verifier's own error when they no longer do;
    /// `None` when it is not here.
    pub(super) fn get(&self, token: &str, now: u64) -> Option<Result<Principal, Error>> {
        let mut by_token = self.by_token.lock().unwrap_or_else(PoisonError::into_inner);
        let verified = by_token.get(token)?;
        // The same tests, with the same leeway, as the verifier's.
        if verified.exp < now.saturating_sub(self.leeway) {
            by_token.remove(token);
            return Some(Err(Error::InvalidToken("token expired")));
        }
        if verified.nbf.is_some_and(|nbf| nbf > now + self.leeway) {
            return Some(Err(Error::InvalidToken("token not yet valid")));
        }
        Some(Ok(verified.principal.clone()))
    }

    /// Keeps `token`, just verified. When full, the expired entries go, and
    /// if none had, all of them: one sweep for every `CAPACITY` insertions.
    pub(super) fn insert(
        &self,
        token: &str,
        principal: Principal,
        exp: u64,
        nbf: Option<u64>,
        now: u64,
    ) {
        let mut by_token = self.by_token.lock().unwrap_or_else(PoisonError::into_inner);
        if by_token.len() >= CAPACITY && !by_token.contains_key(token) {
            let oldest_valid = now.saturating_sub(self.leeway);
            by_token.retain(|_, verified| verified.exp >= oldest_valid);
            if by_token.len() >= CAPACITY {
                by_token.clear();
            }
        }
        by_token.insert(
            token.into(),
            Verified {
                principal,
                exp,
                nbf,
            },
        );
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;

    fn principal(sub: &str) -> Principal {
        Principal {
            sub: sub.into(),
            role: Role::User,
            cohorts: vec!["c1".into()],
        }
    }

    #[test]
    fn a_kept_token_holds_until_its_expiry_and_leeway() {
        let verified = VerifiedTokens::new(5);
        verified.insert("t", principal("alice"), 100, Some(90), 95);
        assert_eq!(verified.get("t", 95).unwrap().unwrap(), principal("alice"));
        assert_eq!(verified.get("t", 105).unwrap().unwrap(), principal("alice"));
        let expired = verified.get("t", 106).unwrap().unwrap_err();
        assert!(
            matches!(expired, Error::InvalidToken("token expired")),
            "{expired:?}"
        );
        // Dropped once expired, so it is verified again (and refused).
        assert!(verified.get("t", 106).is_none());
        assert!(verified.get("other", 95).is_none());
    }

    #[test]
    fn a_clock_gone_back_before_nbf_refuses_as_the_verifier_would() {
        let verified = VerifiedTokens::new(0);
        verified.insert("t", principal("alice"), 100, Some(90), 95);
        let early = verified.get("t", 80).unwrap().unwrap_err();
        assert!(
            matches!(early, Error::InvalidToken("token not yet valid")),
            "{early:?}"
        );
    }

    #[test]
    fn a_full_cache_drops_the_expired_first_then_everything() {
        let verified = VerifiedTokens::new(0);
        for n in 0..CAPACITY {
            // Half of them expire at 10.
            let exp = if n % 2 == 0 { 10 } else { 1000 };
            verified.insert(&format!("t{n}"), principal("u"), exp, None, 5);
        }
        assert_eq!(verified.len(), CAPACITY);
        verified.insert("new", principal("u"), 1000, None, 20);
        assert_eq!(verified.len(), CAPACITY / 2 + 1);
        assert!(verified.get("t1", 20).is_some());
        assert!(verified.get("t0", 20).is_none());
        for n in 0..CAPACITY {
            verified.insert(&format!("more{n}"), principal("u"), 1000, None, 20);
        }
        assert!(verified.len() <= CAPACITY);
        assert!(verified.get("more1023", 20).is_some());
    }
}
