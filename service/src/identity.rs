//! Who a caller is: the identity a verified token carries. Plain data at the
//! bottom of the crate, so configuration, routes and stores can name roles
//! without depending on how tokens are verified (`auth`).

use serde::{Deserialize, Serialize};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Supervisor,
    Admin,
}

/// The authenticated caller, taken from a verified token's claims.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Principal {
    pub sub: String,
    pub role: Role,
    /// A user's cohorts; for a supervisor, the cohorts it supervises.
    #[serde(default)]
    pub cohorts: Vec<String>,
}
