//! Choosing targets and routes: per-target circuit breakers that let a
//! route skip a failing model at once, and the recommendation of a route for
//! a task.

pub mod breaker;
mod breaker_redis;
pub mod recommend;

pub use breaker::{Admission, BreakerState, BreakerStore, Breakers, LocalBreakers, Settings};
pub use breaker_redis::RedisBreakers;
