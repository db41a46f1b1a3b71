//! JSON logs on stderr, filtered by `RUST_LOG` (default `info`); stdout
//! stays free for what the commands print (tokens).

use tracing_subscriber::EnvFilter;

/// Installs the global JSON log subscriber; a second call is a no-op.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Fails only when a subscriber is already installed, which is fine.
    let _ = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
