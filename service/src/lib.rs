//! placeholder

pub mod providers;
