//! Command line and environment.

use std::net::SocketAddr;

use clap::Parser;

/// parley-operator: reconciles ChatDeployment and ModelRoute resources.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Args {
    /// Address of /health, /ready and /metrics.
    #[arg(long, env = "PARLEY_OPERATOR_LISTEN", default_value = "0.0.0.0:8081")]
    pub listen: SocketAddr,
    /// Watch only this namespace (default: every namespace).
    #[arg(long, env = "PARLEY_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,
    /// Run controllers only while holding the leader Lease (needed when more than one replica runs).
    #[arg(long, env = "PARLEY_OPERATOR_LEADER_ELECTION", default_value_t = false)]
    pub leader_election: bool,
    /// Namespace of the leader Lease (normally the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity in the Lease and in published events.
    #[arg(long, env = "POD_NAME", default_value = "parley-operator")]
    pub identity: String,
    /// How often API discovery runs again, so that an optional API installed
    /// later (the ServiceMonitor CRD) is used without a restart.
    #[arg(long, env = "PARLEY_OPERATOR_DISCOVERY_SECONDS", default_value_t = 30)]
    pub discovery_seconds: u64,
}
