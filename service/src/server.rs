//! Process wiring shared by `main` and the end-to-end tests: build the state
//! from the configuration, serve until cancelled, drain, return.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accounting::{
    Accounting, AccountingMetrics, ExternalAccounting, LocalAccounting, reaper,
};
use crate::auth::dev::DevTokens;
use crate::auth::{
    AuthSettings, Authenticator, Hs256Secret, Principal, Role, SecretSource, mint_token,
    resolve_hs256_secret,
};
use crate::config::{Config, TokenArgs};
use crate::connections::{self, ConnectionLimits};
use crate::error::Error;
use crate::ledger::{
    Credits, EmbeddedLedger, InstrumentedLedger, Ledger, LedgerSettings, MICROS_PER_CREDIT,
    MongoLedger,
};
use crate::metrics::{HttpMetrics, OperationMetrics};
use crate::model_routes::RoutesSource;
use crate::policy::BlockRecorder;
use crate::ratelimit::{
    LocalRateLimiter, RateLimitMetrics, RateLimiter, RateLimits, RedisRateLimiter,
};
use crate::routes::app;
use crate::state::{AppState, Limits, Services};
use crate::store::{
    ApiKeyStore, BlockAudit, EmbeddedStore, InstrumentedStore, MongoStore, ObservationAudit,
    SessionStore,
};
use crate::stream::Replies;

/// File of the embedded database inside the data dir.
pub const EMBEDDED_DB_FILE: &str = "parley.redb";
/// Balance of a new account in local dev mode when none is configured.
const DEV_INITIAL_CREDITS: Credits = Credits::from_micros(100 * MICROS_PER_CREDIT);

/// The selected storage backend; other stores (ledger, usage, audit) open
/// on the same database.
pub enum Backend {
    Embedded(EmbeddedStore),
    Mongo(MongoStore),
}

impl Backend {
    pub async fn open(config: &Config) -> Result<Self, Error> {
        match &config.mongodb_uri {
            Some(uri) => {
                let store = MongoStore::connect(uri, &config.mongodb_database).await?;
                tracing::info!(database = %config.mongodb_database, "using the MongoDB store");
                Ok(Self::Mongo(store))
            }
            None => {
                let path = config.data_dir.join(EMBEDDED_DB_FILE);
                let cache_bytes = usize::try_from(config.store_cache_mib)
                    .unwrap_or(usize::MAX)
                    .saturating_mul(1 << 20);
                let store = EmbeddedStore::open(&path, cache_bytes).await?;
                tracing::info!(path = %path.display(), "using the embedded store");
                Ok(Self::Embedded(store))
            }
        }
    }

    /// Closes connections cleanly (MongoDB ends its server sessions).
    pub async fn close(self) {
        match self {
            Self::Embedded(_) => {}
            Self::Mongo(store) => store.database().client().clone().shutdown().await,
        }
    }

    /// The credits ledger on the same database (MongoDB: indexes created).
    pub async fn ledger(&self, settings: LedgerSettings) -> Result<Arc<dyn Ledger>, Error> {
        match self {
            Self::Embedded(store) => {
                let ledger = EmbeddedLedger::new(Arc::clone(store.database()), settings).await?;
                Ok(Arc::new(ledger))
            }
            Self::Mongo(store) => {
                let ledger = MongoLedger::new(store.database(), settings);
                ledger.create_indexes().await?;
                Ok(Arc::new(ledger))
            }
        }
    }

    pub fn sessions(&self) -> Arc<dyn SessionStore> {
        match self {
            Self::Embedded(store) => Arc::new(store.clone()),
            Self::Mongo(store) => Arc::new(store.clone()),
        }
    }

    pub fn audit(&self) -> Arc<dyn ObservationAudit> {
        match self {
            Self::Embedded(store) => Arc::new(store.clone()),
            Self::Mongo(store) => Arc::new(store.clone()),
        }
    }

    pub fn block_audit(&self) -> Arc<dyn BlockAudit> {
        match self {
            Self::Embedded(store) => Arc::new(store.clone()),
            Self::Mongo(store) => Arc::new(store.clone()),
        }
    }

    pub fn keys(&self) -> Arc<dyn ApiKeyStore> {
        match self {
            Self::Embedded(store) => Arc::new(store.clone()),
            Self::Mongo(store) => Arc::new(store.clone()),
        }
    }
}

/// Binds `config.listen` and serves until `shutdown` is cancelled.
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|error| Error::io(format!("binding {}", config.listen), error))?;
    serve_listener(listener, config, shutdown).await
}

/// Serves on an already bound listener (tests bind port 0 and read the address).
pub async fn serve_listener(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let address = listener
        .local_addr()
        .map_err(|error| Error::io("reading the listen address", error))?;
    let secret = resolve_hs256_secret(&config).await?;
    log_secret_source(secret.as_ref());
    let backend = Backend::open(&config).await?;
    let mut registry = Registry::default();
    let http_metrics = HttpMetrics::register(&mut registry);
    let store_metrics = OperationMetrics::register(
        &mut registry,
        "parley_store_operation_duration_seconds",
        "Time the chat session store takes to answer, by operation and outcome",
    );
    let ledger_metrics = OperationMetrics::register(
        &mut registry,
        "parley_ledger_operation_duration_seconds",
        "Time the credits ledger takes to answer, by operation and outcome",
    );
    let background = TaskTracker::new();
    let background_stop = shutdown.child_token();
    let routes_source = RoutesSource::from_config(&config.replies).await?;
    let routes = routes_source.load().await?;
    let replies = Arc::new(
        Replies::from_config(
            &config.replies,
            config.redis_url.as_deref(),
            routes,
            &mut registry,
        )
        .await?,
    );
    background.spawn(routes_source.watch(
        Arc::clone(&replies.routes),
        Duration::from_millis(config.replies.routes_poll_millis.max(10)),
        background_stop.clone(),
    ));
    let keys = backend.keys();
    let auth = Authenticator::new(AuthSettings::from_config(
        &config,
        secret.as_ref().map(|secret| secret.bytes.clone()),
    ))?
    .with_api_keys(Arc::clone(&keys));
    let rate_limiter = rate_limiter(&config, RateLimitMetrics::register(&mut registry)).await?;
    let accounting_metrics = AccountingMetrics::register(&mut registry);
    let accounting: Arc<dyn Accounting> = match &config.accounting_url {
        Some(url) => {
            tracing::info!(%url, "external accounting: credits are kept by another service");
            Arc::new(ExternalAccounting::new(
                url,
                Duration::from_secs(config.accounting_timeout_seconds),
                accounting_metrics,
            )?)
        }
        None => {
            let ledger: Arc<dyn Ledger> = Arc::new(InstrumentedLedger::new(
                backend
                    .ledger(LedgerSettings {
                        initial_balance: initial_credits(&config, secret.as_ref()),
                    })
                    .await?,
                ledger_metrics,
            ));
            background.spawn(reaper::run(
                Arc::clone(&ledger),
                accounting_metrics.clone(),
                Duration::from_secs(config.reaper_interval_seconds.max(1)),
                background_stop.clone(),
            ));
            Arc::new(LocalAccounting::new(
                ledger,
                Arc::clone(&replies.routes),
                Duration::from_secs(config.hold_lease_seconds),
                accounting_metrics,
            ))
        }
    };
    let dev_tokens = dev_tokens(&config, secret.as_ref());
    if let Some(dev_tokens) = &dev_tokens {
        announce_dev_token(dev_tokens, address)?;
    }
    let blocks = Arc::new(BlockRecorder::new(backend.block_audit(), &mut registry));
    let state = AppState::from(Services {
        blocks,
        dev_tokens: offer_dev_sign_in(dev_tokens, address),
        sessions: Arc::new(InstrumentedStore::new(backend.sessions(), store_metrics)),
        audit: backend.audit(),
        keys,
        auth: Arc::new(auth),
        registry: Arc::new(registry),
        http_metrics,
        limits: Limits {
            max_body_bytes: config.max_body_bytes,
            max_message_chars: config.max_message_chars,
            max_sessions_per_user: config.max_sessions_per_user,
        },
        accounting,
        rate_limiter,
        replies: Arc::clone(&replies),
    });

    let server = connections::serve(
        listener,
        app(state),
        ConnectionLimits::from_config(&config),
        shutdown.clone(),
    );
    tokio::pin!(server);
    tracing::info!(%address, "serving");
    // Shutdown first: with no connection open, the server's graceful stop
    // is ready at once too, and picking it would skip the replies' drain.
    tokio::select! {
        biased;
        () = shutdown.cancelled() => {
            replies.draining.cancel();
            let drain = Duration::from_secs(config.shutdown_drain_seconds);
            tracing::info!(drain_seconds = drain.as_secs(), "shutting down; draining open requests");
            // Replies get the stream drain to finish, also those whose
            // clients re-attached on another replica (no connection here
            // waits for them); then they end with SHUTTING_DOWN (keeping
            // what they generated) so their connections can close within
            // the request drain.
            let stream_drain = Duration::from_secs(config.replies.stream_drain_seconds);
            replies.generating.close();
            let replies_ended = async {
                if tokio::time::timeout(stream_drain, replies.generating.wait()).await.is_err() {
                    tracing::info!(active = replies.hub.active(), "stream drain is over; ending the remaining replies");
                    replies.shutdown.cancel();
                    replies.generating.wait().await;
                }
            };
            let drained = tokio::time::timeout(drain, async {
                let ((), ()) = tokio::join!(&mut server, replies_ended);
            });
            if drained.await.is_err() {
                tracing::warn!("drain time is up; closing the remaining connections");
            }
            replies.shutdown.cancel();
        }
        () = &mut server => {}
    }
    // The server ends only after `shutdown`; background tasks end with it.
    background_stop.cancel();
    background.close();
    background.wait().await;
    // Mirrors, heartbeats, and the audit records of observers that just left.
    replies.hub.close().await;
    backend.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn rate_limiter(
    config: &Config,
    metrics: RateLimitMetrics,
) -> Result<Arc<dyn RateLimiter>, Error> {
    let limits = RateLimits {
        requests_per_minute: config.rate_limit_requests_per_minute,
        tokens_per_minute: config.rate_limit_tokens_per_minute,
        concurrent_streams: config.rate_limit_concurrent_streams,
    };
    match &config.redis_url {
        Some(url) => {
            let limiter =
                RedisRateLimiter::connect(url, &config.rate_limit_key_prefix, limits, metrics)
                    .await?;
            tracing::info!(?limits, "rate limits shared through Redis");
            Ok(Arc::new(limiter))
        }
        None => {
            tracing::info!(?limits, "rate limits kept in this process");
            Ok(Arc::new(LocalRateLimiter::new(limits, metrics)))
        }
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT; returns early if it is cancelled otherwise.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the server");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = terminate => tracing::info!("SIGTERM received"),
        result = tokio::signal::ctrl_c() => match result {
            Ok(()) => tracing::info!("SIGINT received"),
            Err(error) => tracing::warn!(%error, "cannot listen for SIGINT"),
        },
        () = shutdown.cancelled() => return,
    }
    shutdown.cancel();
}

/// The `token` subcommand: a token for the configured (or dev) HS256 secret.
pub async fn mint_cli_token(config: &Config, args: &TokenArgs) -> Result<String, Error> {
    let secret = resolve_hs256_secret(config).await?.ok_or_else(|| {
        Error::Config("minting needs an HS256 secret: set PARLEY_JWT_SECRET".into())
    })?;
    let principal = Principal {
        sub: args.sub.clone(),
        role: args.role,
        cohorts: args.cohorts.clone(),
    };
    mint_token(
        &secret.bytes,
        &principal,
        args.ttl,
        config.jwt_issuer.as_deref(),
        config.jwt_audience.as_deref(),
    )
}

fn log_secret_source(secret: Option<&Hs256Secret>) {
    match secret.map(|secret| &secret.source) {
        None => tracing::info!("HS256 tokens disabled; tokens are verified with the JWKS only"),
        Some(SecretSource::Configured) => tracing::info!("HS256 secret from PARLEY_JWT_SECRET"),
        Some(SecretSource::DevFile { path, created }) => tracing::warn!(
            path = %path.display(),
            created,
            "local mode: using a generated dev HS256 secret; set PARLEY_JWT_SECRET in production"
        ),
    }
}

/// Local mode: print a ready-to-use token and a curl line creating a session.
/// What a new account starts with: as configured; unset, nothing — except
/// in local dev mode, where the dev user needs credits to try replies.
fn initial_credits(config: &Config, secret: Option<&Hs256Secret>) -> Credits {
    match (config.initial_credits, secret) {
        (Some(credits), _) => credits,
        (
            None,
            Some(Hs256Secret {
                source: SecretSource::DevFile { .. },
                ..
            }),
        ) => DEV_INITIAL_CREDITS,
        (None, _) => Credits::ZERO,
    }
}

/// A minter of dev tokens when the secret is the generated dev secret.
fn dev_tokens(config: &Config, secret: Option<&Hs256Secret>) -> Option<DevTokens> {
    match secret {
        Some(Hs256Secret {
            bytes,
            source: SecretSource::DevFile { .. },
        }) => Some(DevTokens::new(
            bytes.clone(),
            config.jwt_issuer.clone(),
            config.jwt_audience.clone(),
        )),
        _ => None,
    }
}

/// Dev sign-in is offered only on a loopback listener (`auth::dev` says why).
fn offer_dev_sign_in(dev_tokens: Option<DevTokens>, address: SocketAddr) -> Option<Arc<DevTokens>> {
    let dev_tokens = dev_tokens?;
    if address.ip().is_loopback() {
        Some(Arc::new(dev_tokens))
    } else {
        tracing::warn!(%address, "local mode on a non-loopback address: no dev sign-in on the web page; use the printed token or `parley-service token`");
        None
    }
}

fn announce_dev_token(dev_tokens: &DevTokens, address: SocketAddr) -> Result<(), Error> {
    let dev = Principal {
        sub: "dev".into(),
        role: Role::User,
        cohorts: Vec::new(),
    };
    let token = dev_tokens.mint(&dev)?;
    let host = if address.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], address.port()))
    } else {
        address
    };
    let curl = format!(
        "curl -s -X POST http://{host}/api/chat/sessions -H 'Authorization: Bearer {token}' \
         -H 'Content-Type: application/json' -d '{{\"title\":\"Hello\"}}'"
    );
    tracing::info!(
        user = "dev",
        role = "user",
        %curl,
        "dev token (24 h) for local use; mint others with `parley-service token --sub NAME --role user|supervisor|admin --cohort C`"
    );
    println!("Dev token for user `dev` (role user, valid 24 h):\n{token}");
    println!(
        "Other users: parley-service token --sub NAME --role user|supervisor|admin --cohort C"
    );
    println!("Create a chat session:\n{curl}");
    println!("Web chat (dev sign-in on loopback): http://{host}/");
    Ok(())
}
