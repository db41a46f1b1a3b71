//! Choosing targets and routes: per-target circuit breakers that let a
//! route skip a failing model at once, and the recommendation of a route for
//! a task.

pub mod breaker;
mod breaker_redis;
mod breaker_store;
pub mod recommend;

pub use breaker::Breakers;
pub use breaker_redis::RedisBreakers;
pub use breaker_store::{Admission, BreakerState, BreakerStore, LocalBreakers, Settings};
