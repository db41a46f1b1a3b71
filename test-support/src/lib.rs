//! Test-only support code shared by the workspace's test suites: the real test
//! servers' coordinates and in-process stand-ins for upstream services.
//!
//! This crate is never a dependency of a shipped binary.

pub mod bedrock;
pub mod env;
pub mod openai;
pub mod proxy;
pub mod script;
mod serve;

pub use serve::StandIn;
