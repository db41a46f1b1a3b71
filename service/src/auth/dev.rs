//! Dev sign-in: tokens minted on request with the generated dev secret, so
//! that the web page can sign in without a copy-pasted token.
//!
//! Offered only when the service runs in local mode on its generated dev
//! secret (never with a configured secret or JWKS) and listens on a loopback
//! address: then only processes of this machine can reach it, and they could
//! already mint any token with `parley-service token`. Requests must also
//! name a loopback host (and origin, when they carry one), so a web page of
//! another site cannot reach it through DNS rebinding. See service/README.md.

use std::net::IpAddr;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::http::header::{HOST, ORIGIN};

use super::{Principal, mint_token};
use crate::error::Error;

/// Lifetime of dev tokens (the printed one and the minted ones).
pub const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Mints dev tokens with the generated dev secret.
pub struct DevTokens {
    secret: Vec<u8>,
    issuer: Option<String>,
    audience: Option<String>,
}

impl DevTokens {
    pub fn new(secret: Vec<u8>, issuer: Option<String>, audience: Option<String>) -> Self {
        Self {
            secret,
            issuer,
            audience,
        }
    }

    /// A token for `principal`, valid for [`DEV_TOKEN_TTL`].
    pub fn mint(&self, principal: &Principal) -> Result<String, Error> {
        mint_token(
            &self.secret,
            principal,
            DEV_TOKEN_TTL,
            self.issuer.as_deref(),
            self.audience.as_deref(),
        )
    }
}

/// Refuses a request whose `Host` (or `Origin`, when present) is not a
/// loopback name: a page of another site that rebinds its DNS name to
/// 127.0.0.1 still sends its own name.
pub fn require_loopback_request(headers: &HeaderMap) -> Result<(), Error> {
    const REFUSED: Error = Error::Forbidden("dev sign-in answers only requests to a loopback host");
    let host = headers
        .get(HOST)
        .and_then(|value| value.to_str().ok())
        .ok_or(REFUSED)?;
    if !is_loopback_authority(host) {
        return Err(REFUSED);
    }
    if let Some(origin) = headers.get(ORIGIN) {
        let authority = origin
            .to_str()
            .ok()
            .and_then(|origin| origin.split_once("://"))
            .map(|(_, authority)| authority)
            .ok_or(REFUSED)?;
        if !is_loopback_authority(authority) {
            return Err(REFUSED);
        }
    }
    Ok(())
}

/// `localhost`, `127.0.0.1`, `[::1]` and the like, with or without a port.
fn is_loopback_authority(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((host, "")) => host,
            Some((host, port)) if port.strip_prefix(':').is_some_and(is_port) => host,
            _ => return false,
        },
        None => match authority.rsplit_once(':') {
            Some((host, port)) if is_port(port) => host,
            Some(_) => return false,
            None => authority,
        },
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

fn is_port(digits: &str) -> bool {
    !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_authorities_pass() {
        for good in [
            "localhost",
            "localhost:8080",
            "LOCALHOST:1",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.1.2.3:9",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(is_loopback_authority(good), "{good}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.1:8080",
            "[::2]:80",
            "[::1]x",
            "127.0.0.1:",
            "127.0.0.1:80:80",
            "user@127.0.0.1",
        ] {
            assert!(!is_loopback_authority(bad), "{bad}");
        }
    }
}
