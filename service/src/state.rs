//! What every handler can reach. Trait objects, so tests and later features
//! swap implementations without touching the handlers.

use std::ops::Deref;
use std::sync::Arc;

use axum::extract::FromRef;
use prometheus_client::registry::Registry;

use crate::accounting::Accounting;
use crate::auth::Authenticator;
use crate::auth::dev::DevTokens;
use crate::metrics::HttpMetrics;
use crate::policy::BlockRecorder;
use crate::ratelimit::RateLimiter;
use crate::store::{ApiKeyStore, ObservationAudit, SessionStore};
use crate::stream::Replies;

/// What every handler reaches, behind one `Arc`: the router clones its
/// state for every request (the requests limit and the handler each take
/// one), and one shared count to raise and lower beats eleven, which both
/// cores raise and lower in turn.
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl From<Services> for AppState {
    fn from(services: Services) -> Self {
        Self(Arc::new(services))
    }
}

impl Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

/// For the extractors that verify the caller.
impl FromRef<AppState> for Arc<Authenticator> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.auth)
    }
}

pub struct Services {
    pub sessions: Arc<dyn SessionStore>,
    /// Who observed whose replies, in the same store as the sessions.
    pub audit: Arc<dyn ObservationAudit>,
    /// Content-policy blocks: their audit (same store) and metric.
    pub blocks: Arc<BlockRecorder>,
    /// API keys, in the same store as the sessions (the authenticator
    /// looks them up too).
    pub keys: Arc<dyn ApiKeyStore>,
    pub auth: Arc<Authenticator>,
    /// Every metric of the process, encoded by `/metrics`.
    pub registry: Arc<Registry>,
    pub http_metrics: HttpMetrics,
    pub limits: Limits,
    /// The built-in ledger or the external accounting service.
    pub accounting: Arc<dyn Accounting>,
    pub rate_limiter: Arc<dyn RateLimiter>,
    /// Routes, providers and the stream hub.
    pub replies: Arc<Replies>,
    /// Set only in local mode on the generated dev secret, listening on
    /// loopback: then `/api/dev/token` exists (dev sign-in).
    pub dev_tokens: Option<Arc<DevTokens>>,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_message_chars: usize,
    /// Chat sessions one user may keep (0: unlimited).
    pub max_sessions_per_user: u64,
}
