//! Streamed replies: SSE frames, the stream hub (in-process, or across
//! replicas through Redis), the task that generates a reply independently
//! of any client connection, and live observation.

pub mod billing;
pub mod events;
pub mod frames;
pub mod hub;
pub mod metrics;
pub mod observe;
pub mod relay;
pub mod reply;
pub mod shared;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use events::ReplyEvent;
pub use hub::{Hub, HubSettings, ReplyStream};
pub use metrics::{HubMetrics, ReplyMetrics};
pub use relay::{Relay, RelaySettings};
pub use reply::{Api, Audience, ContentCheck, FinishedReply, Paid, ReplyRequest, SessionRecord};
pub use shared::{Announcement, ReplyInfo};

use crate::model_routes::{ProviderRegistry, RoutesCell};
use crate::routing::Breakers;

/// How long a reply's events stay in Redis when replies have no time limit.
const UNLIMITED_REPLY_KEPT: Duration = Duration::from_secs(24 * 3600);
/// Least time an ended reply's events stay in Redis, whatever the re-attach
/// grace: other replicas' mirrors still reading must find its last events
/// and its end, or they would report it lost.
const MIN_RELAY_LINGER: Duration = Duration::from_secs(60);

/// Everything the reply endpoints need, as one field of the handlers' `Services`.
pub struct Replies {
    pub routes: Arc<RoutesCell>,
    pub providers: ProviderRegistry,
    /// Per-target circuit breakers: a failing target is skipped at once.
    pub breakers: Breakers,
    pub hub: Arc<Hub>,
    pub metrics: ReplyMetrics,
    pub settings: ReplySettings,
    /// Cancelled when the stream drain after SIGTERM is over: replies still
    /// running end with `SHUTTING_DOWN` and keep what they generated.
    pub shutdown: CancellationToken,
    /// Cancelled at SIGTERM, when the drain begins: the replica is no longer
    /// ready and starts no reply; observers and consoles end at once (they
    /// reconnect to another replica); running replies go on.
    pub draining: CancellationToken,
    /// The tasks generating replies on this replica, settlement included.
    /// The shutdown waits for them (within the stream drain), not only for
    /// open connections: a reply whose client re-attached on another replica
    /// has no connection here but still generates here.
    pub generating: TaskTracker,
}

#[derive(Debug, Clone, Copy)]
pub struct ReplySettings {
    /// How long a reply keeps going without any attached owner connection.
    pub grace: Duration,
    /// Interval of `: ping` comments.
    pub ping: Duration,
    /// Longest a reply may stream (`None`: no limit).
    pub max_duration: Option<Duration>,
    /// Whether supervisors and admins may observe replies.
    pub observation: bool,
    /// Live events an observer may fall behind before it is cut.
    pub observer_buffer: usize,
}

impl ReplySettings {
    /// Local defaults: 30 s grace, 15 s pings, 5 min replies, observation on,
    /// observers cut 1,024 events behind.
    pub fn new() -> Self {
        Self {
            grace: Duration::from_secs(30),
            ping: Duration::from_secs(15),
            max_duration: Some(Duration::from_secs(300)),
            observation: true,
            observer_buffer: 1024,
        }
    }
}

impl Default for ReplySettings {
    fn default() -> Self {
        Self::new()
    }
}

impl Replies {
    /// `routes` (as loaded from their source) and providers from the
    /// environment, with their metrics on `registry`.
    /// With `redis_url`, replies span replicas through Redis.
    pub async fn from_config(
        config: &crate::config::ReplyConfig,
        redis_url: Option<&str>,
        routes: crate::model_routes::Routes,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<Self, crate::error::Error> {
        use crate::providers::{OpenAiProvider, Provider, SimulatedProvider, SimulatedSettings};

        let simulated = SimulatedProvider::new(SimulatedSettings {
            first_token_latency: Duration::from_millis(config.simulated_first_token_millis),
            tokens_per_second: std::num::NonZeroU32::new(config.simulated_tokens_per_second),
            reply_tokens: (config.simulated_reply_tokens > 0)
                .then_some(config.simulated_reply_tokens),
        });
        let openai = match &config.openai_base_url {
            None => None,
            Some(base_url) => {
                let provider = OpenAiProvider::new(base_url, config.openai_api_key.clone())
                    .map_err(|error| {
                        crate::error::Error::Config(format!("PARLEY_OPENAI_BASE_URL: {error}"))
                    })?;
                Some(Arc::new(provider) as Arc<dyn Provider>)
            }
        };
        let providers = ProviderRegistry::new(
            Arc::new(simulated),
            openai,
            config.bedrock_endpoint_url.clone(),
        );
        let settings = ReplySettings {
            grace: Duration::from_secs(config.reattach_grace_seconds),
            ping: Duration::from_secs(config.sse_ping_seconds.max(1)),
            max_duration: (config.max_stream_seconds > 0)
                .then(|| Duration::from_secs(config.max_stream_seconds)),
            observation: config.observation == crate::config::Switch::On,
            observer_buffer: config.observer_buffer_events,
        };
        let hub_metrics = HubMetrics::register(registry);
        let relay = match redis_url {
            None => None,
            Some(url) => {
                let relay_settings = RelaySettings {
                    prefix: config.hub_key_prefix.clone(),
                    heartbeat: Duration::from_millis(config.hub_heartbeat_millis.max(10)),
                    max_events: config.hub_stream_max_events.max(1),
                    linger: settings.grace.max(MIN_RELAY_LINGER),
                    max_duration: settings.max_duration.unwrap_or(UNLIMITED_REPLY_KEPT),
                };
                let relay = Relay::connect(url, relay_settings, hub_metrics.clone()).await?;
                tracing::info!(prefix = %config.hub_key_prefix, "replies span replicas through Redis");
                Some(relay)
            }
        };
        // Every replica sees one breaker per target when they share Redis.
        let breakers = match redis_url {
            None => Breakers::local(registry),
            Some(url) => {
                let prefix = format!("{}:breakers", config.hub_key_prefix);
                Breakers::shared(url, &prefix, registry).await?
            }
        };
        Ok(Self::with_relay(
            routes,
            providers,
            breakers,
            settings,
            relay,
            hub_metrics,
            registry,
        ))
    }

    /// Replies kept in this process only (no relay, breakers of its own).
    pub fn new(
        routes: crate::model_routes::Routes,
        providers: ProviderRegistry,
        settings: ReplySettings,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Self {
        let hub_metrics = HubMetrics::register(registry);
        let breakers = Breakers::local(registry);
        Self::with_relay(
            routes,
            providers,
            breakers,
            settings,
            None,
            hub_metrics,
            registry,
        )
    }

    pub fn with_relay(
        routes: crate::model_routes::Routes,
        providers: ProviderRegistry,
        breakers: Breakers,
        settings: ReplySettings,
        relay: Option<Relay>,
        hub_metrics: HubMetrics,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Self {
        let hub_settings = HubSettings {
            grace: settings.grace,
            observer_buffer: settings.observer_buffer,
            ping: settings.ping,
        };
        Self {
            routes: Arc::new(RoutesCell::new(routes, registry)),
            providers,
            breakers,
            hub: Hub::new(hub_settings, relay, hub_metrics),
            metrics: ReplyMetrics::register(registry),
            settings,
            shutdown: CancellationToken::new(),
            draining: CancellationToken::new(),
            generating: TaskTracker::new(),
        }
    }
}
