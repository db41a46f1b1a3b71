//! Streamed replies: SSE frames, the in-process stream hub, and the task
//! that generates a reply independently of any client connection.

pub mod billing;
pub mod frames;
pub mod hub;
pub mod metrics;
pub mod reply;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use hub::{Hub, ReplyStream};
pub use metrics::ReplyMetrics;
pub use reply::{FinishedReply, Paid, ReplyRequest};

use crate::model_routes::{ProviderRegistry, RoutesCell};

/// Everything the reply endpoints need, as one field of `AppState`.
pub struct Replies {
    pub routes: Arc<RoutesCell>,
    pub providers: ProviderRegistry,
    pub hub: Arc<Hub>,
    pub metrics: ReplyMetrics,
    pub settings: ReplySettings,
    /// Cancelled when the stream drain after SIGTERM is over: replies still
    /// running end with `SHUTTING_DOWN` and keep what they generated.
    pub shutdown: CancellationToken,
}

#[derive(Debug, Clone, Copy)]
pub struct ReplySettings {
    /// How long a reply keeps going without any attached owner connection.
    pub grace: Duration,
    /// Interval of `: ping` comments.
    pub ping: Duration,
}

impl Replies {
    /// `routes` (as loaded from their source) and providers from the
    /// environment, with their metrics on `registry`.
    pub async fn from_config(
        config: &crate::config::ReplyConfig,
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
        Ok(Self::new(
            routes,
            providers,
            ReplySettings {
                grace: Duration::from_secs(config.reattach_grace_seconds),
                ping: Duration::from_secs(config.sse_ping_seconds.max(1)),
            },
            registry,
        ))
    }

    pub fn new(
        routes: crate::model_routes::Routes,
        providers: ProviderRegistry,
        settings: ReplySettings,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Self {
        Self {
            routes: Arc::new(RoutesCell::new(routes, registry)),
            providers,
            hub: Arc::new(Hub::default()),
            metrics: ReplyMetrics::register(registry),
            settings,
            shutdown: CancellationToken::new(),
        }
    }
}
