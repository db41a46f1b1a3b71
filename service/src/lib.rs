//! placeholder

pub mod ledger;
pub mod providers;
