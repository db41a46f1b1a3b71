//! Test-only support code shared by the workspace's test suites and benchmarks:
//! the real test servers' coordinates, in-process stand-ins for upstream
//! services, reading SSE responses, and benchmark knobs.
//!
//! This crate is never a dependency of a shipped binary.

pub mod bedrock;
pub mod bench;
pub mod env;
pub mod openai;
pub mod proxy;
pub mod script;
mod serve;
pub mod sse;

pub use serve::StandIn;
