//! Parley's chat service: `app(state)` is the HTTP API, `serve` runs it.

pub mod accounting;
pub mod auth;
pub mod config;
pub mod connections;
pub mod context_window;
pub mod embedded_db;
pub mod embedded_tables;
pub mod error;
pub mod identity;
pub mod ledger;
pub mod metrics;
pub mod model_routes;
pub mod policy;
pub mod providers;
pub mod ratelimit;
pub mod routes;
pub mod routing;
pub mod server;
pub mod shared_redis;
pub mod shared_text;
pub mod state;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod turns;

pub use error::Error;
pub use routes::app;
pub use server::serve;
pub use state::{AppState, Services};
