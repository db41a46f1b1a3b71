//! Command line and environment configuration. Every setting is both a flag
//! and a `PARLEY_*` variable; the names are part of the interface contract.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::error::Error;
use crate::identity::Role;
use crate::ledger::Credits;

#[derive(Debug, Parser)]
#[command(name = "parley-service", version, about = "Parley's chat service")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default when no subcommand is given).
    Serve,
    /// Print a JWT signed with the configured HS256 secret.
    Token(TokenArgs),
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The user id (`sub` claim).
    #[arg(long, env = "PARLEY_TOKEN_SUB")]
    pub sub: String,
    /// user, supervisor or admin.
    #[arg(long, env = "PARLEY_TOKEN_ROLE", default_value = "user")]
    pub role: Role,
    /// A cohort of the user (or supervised by the supervisor); repeatable.
    #[arg(long = "cohort", env = "PARLEY_TOKEN_COHORTS", value_delimiter = ',')]
    pub cohorts: Vec<String>,
    /// Lifetime, e.g. `90s`, `30m`, `1h`, `7d`.
    #[arg(long, env = "PARLEY_TOKEN_TTL", default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
}

/// Settings shared by `serve` and `token` (both resolve the HS256 secret the same way).
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address of the API, `/health`, `/ready` and `/metrics`.
    #[arg(
        long,
        env = "PARLEY_LISTEN",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    pub listen: SocketAddr,
    /// Threads for blocking work (embedded-store reads, except a reply's
    /// read of a session it replied to lately). Each holds its own
    /// allocator caches, so a small pool keeps memory down; reads are short,
    /// and on two cores more threads add switches, not throughput.
    #[arg(
        long,
        env = "PARLEY_BLOCKING_THREADS",
        default_value_t = 4,
        value_parser = clap::value_parser!(u16).range(1..),
        global = true
    )]
    pub blocking_threads: u16,
    /// Directory of the embedded store and of the generated dev secret.
    #[arg(
        long,
        env = "PARLEY_DATA_DIR",
        default_value = "./parley-data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// Page cache of the embedded store, in MiB. The store's file grows with
    /// every session; its cache does not.
    #[arg(
        long,
        env = "PARLEY_STORE_CACHE_MIB",
        default_value_t = (crate::embedded_db::DEFAULT_CACHE_BYTES >> 20) as u32,
        value_parser = clap::value_parser!(u32).range(1..),
        global = true
    )]
    pub store_cache_mib: u32,
    /// MongoDB URI; when set, MongoDB replaces the embedded store.
    #[arg(
        long,
        env = "PARLEY_MONGODB_URI",
        hide_env_values = true,
        global = true
    )]
    pub mongodb_uri: Option<String>,
    #[arg(
        long,
        env = "PARLEY_MONGODB_DATABASE",
        default_value = "parley",
        global = true
    )]
    pub mongodb_database: String,
    /// HS256 shared secret. Unset in local mode: a dev secret is generated in the data dir.
    #[arg(long, env = "PARLEY_JWT_SECRET", hide_env_values = true, global = true)]
    pub jwt_secret: Option<String>,
    /// JWKS URL of an OIDC issuer, for RS256/ES256 tokens.
    #[arg(long, env = "PARLEY_JWKS_URL", global = true)]
    pub jwks_url: Option<String>,
    /// Required `iss` claim, when set.
    #[arg(long, env = "PARLEY_JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, when set.
    #[arg(long, env = "PARLEY_JWT_AUDIENCE", global = true)]
    pub jwt_audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[arg(
        long,
        env = "PARLEY_JWT_LEEWAY_SECONDS",
        default_value_t = 30,
        global = true
    )]
    pub jwt_leeway_seconds: u64,
    /// Minimum time between two JWKS fetches triggered by unknown key ids.
    #[arg(
        long,
        env = "PARLEY_JWKS_MIN_REFRESH_SECONDS",
        default_value_t = 30,
        global = true
    )]
    pub jwks_min_refresh_seconds: u64,
    /// Age after which cached JWKS keys are fetched again.
    #[arg(
        long,
        env = "PARLEY_JWKS_MAX_AGE_SECONDS",
        default_value_t = 3600,
        global = true
    )]
    pub jwks_max_age_seconds: u64,
    /// Largest accepted request body.
    #[arg(long, env = "PARLEY_MAX_BODY_BYTES", default_value_t = 1024 * 1024, global = true)]
    pub max_body_bytes: usize,
    /// Longest accepted chat message, in characters.
    #[arg(
        long,
        env = "PARLEY_MAX_MESSAGE_CHARS",
        default_value_t = 32_000,
        global = true
    )]
    pub max_message_chars: usize,
    /// How long shutdown waits for open requests before closing them.
    #[arg(
        long,
        env = "PARLEY_SHUTDOWN_DRAIN_SECONDS",
        default_value_t = 30,
        global = true
    )]
    pub shutdown_drain_seconds: u64,
    /// A request's line and headers must arrive within this time, counted
    /// from the connection's accept or, on a kept-alive connection, from the
    /// request's first byte; slower clients are disconnected.
    #[arg(
        long,
        env = "PARLEY_HEADER_READ_TIMEOUT_SECONDS",
        default_value_t = 10,
        global = true
    )]
    pub header_read_timeout_seconds: u64,
    /// A kept-alive connection with no request in progress is closed after
    /// this time (longer than the 60 s idle timeout of common load balancers,
    /// so they close first). Responses in progress, streams included, are
    /// never cut by it.
    #[arg(
        long,
        env = "PARLEY_IDLE_CONNECTION_TIMEOUT_SECONDS",
        default_value_t = 75,
        global = true
    )]
    pub idle_connection_timeout_seconds: u64,
    /// A request body must arrive whole within this time after its headers;
    /// slower bodies are answered 408 and the connection is closed.
    #[arg(
        long,
        env = "PARLEY_BODY_READ_TIMEOUT_SECONDS",
        default_value_t = 30,
        global = true
    )]
    pub body_read_timeout_seconds: u64,
    /// Largest request line plus headers; larger ones are answered 431.
    #[arg(
        long,
        env = "PARLEY_MAX_HEADER_BYTES",
        default_value_t = 64 * 1024,
        global = true
    )]
    pub max_header_bytes: usize,
    /// Chat sessions one user may keep (0: unlimited); creating one more is
    /// refused with 409 `TOO_MANY_SESSIONS`.
    #[arg(
        long,
        env = "PARLEY_MAX_SESSIONS_PER_USER",
        default_value_t = 1000,
        global = true
    )]
    pub max_sessions_per_user: u64,
    /// Balance of a new account, in decimal credits (exact to the µcredit).
    /// Unset: 0, or 100 in local dev mode (generated dev secret) so the
    /// quick start can reply.
    #[arg(long, env = "PARLEY_INITIAL_CREDITS", value_parser = parse_credits, global = true)]
    pub initial_credits: Option<Credits>,
    /// How long a hold opened through the accounting API stays open before
    /// the reaper may close it.
    #[arg(
        long,
        env = "PARLEY_HOLD_LEASE_SECONDS",
        default_value_t = 600,
        global = true
    )]
    pub hold_lease_seconds: u64,
    /// Interval of the reaper that closes holds whose lease expired.
    #[arg(
        long,
        env = "PARLEY_REAPER_INTERVAL_SECONDS",
        default_value_t = 30,
        global = true
    )]
    pub reaper_interval_seconds: u64,
    /// Accounting server to use instead of the built-in ledger (`external`
    /// mode): its seed-compatible accounting API, called with the caller's token.
    #[arg(long, env = "PARLEY_ACCOUNTING_URL", global = true)]
    pub accounting_url: Option<String>,
    /// Timeout of one call to the external accounting server.
    #[arg(
        long,
        env = "PARLEY_ACCOUNTING_TIMEOUT_SECONDS",
        default_value_t = 10,
        global = true
    )]
    pub accounting_timeout_seconds: u64,
    /// Redis URL; when set, rate limits are shared by every replica.
    #[arg(long, env = "PARLEY_REDIS_URL", hide_env_values = true, global = true)]
    pub redis_url: Option<String>,
    /// API requests per user per minute (0: unlimited).
    #[arg(
        long,
        env = "PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE",
        default_value_t = 120,
        global = true
    )]
    pub rate_limit_requests_per_minute: u64,
    /// Model tokens per user per minute (0: unlimited).
    #[arg(
        long,
        env = "PARLEY_RATE_LIMIT_TOKENS_PER_MINUTE",
        default_value_t = 200_000,
        global = true
    )]
    pub rate_limit_tokens_per_minute: u64,
    /// Concurrent reply streams per user (0: unlimited).
    #[arg(
        long,
        env = "PARLEY_RATE_LIMIT_CONCURRENT_STREAMS",
        default_value_t = 4,
        global = true
    )]
    pub rate_limit_concurrent_streams: u64,
    /// Prefix of the rate-limit keys in Redis (replicas of one deployment share it).
    #[arg(
        long,
        env = "PARLEY_RATE_LIMIT_KEY_PREFIX",
        default_value = "parley:ratelimit",
        global = true
    )]
    pub rate_limit_key_prefix: String,
    #[command(flatten)]
    pub replies: ReplyConfig,
}

/// Model routes, providers and streamed replies.
#[derive(Debug, Clone, Args)]
pub struct ReplyConfig {
    /// Routes file (YAML), for local runs; unset (and no routes ConfigMap):
    /// one `default` route on the simulated model.
    #[arg(long, env = "PARLEY_ROUTES_FILE", global = true)]
    pub routes_file: Option<PathBuf>,
    /// Routes ConfigMap (key `routes.yaml`) watched through the Kubernetes API,
    /// in a cluster; not together with PARLEY_ROUTES_FILE.
    #[arg(long, env = "PARLEY_ROUTES_CONFIGMAP", global = true)]
    pub routes_configmap: Option<String>,
    /// Namespace of the routes ConfigMap; unset: the kube client's default
    /// (in a pod: its own namespace).
    #[arg(long, env = "POD_NAMESPACE", global = true)]
    pub routes_configmap_namespace: Option<String>,
    /// How often the routes file is checked for changes.
    #[arg(
        long,
        env = "PARLEY_ROUTES_POLL_MILLIS",
        default_value_t = 1000,
        global = true
    )]
    pub routes_poll_millis: u64,
    /// Bedrock Runtime endpoint override; region and credentials come from the standard AWS chain.
    #[arg(long, env = "PARLEY_BEDROCK_ENDPOINT_URL", global = true)]
    pub bedrock_endpoint_url: Option<String>,
    /// Base URL of an OpenAI-compatible server (e.g. `http://vllm:8000/v1`); unset: no openai targets.
    #[arg(long, env = "PARLEY_OPENAI_BASE_URL", global = true)]
    pub openai_base_url: Option<String>,
    #[arg(
        long,
        env = "PARLEY_OPENAI_API_KEY",
        hide_env_values = true,
        global = true
    )]
    pub openai_api_key: Option<String>,
    /// Simulated model: time to the first token.
    #[arg(
        long,
        env = "PARLEY_SIMULATED_FIRST_TOKEN_MILLIS",
        default_value_t = 200,
        global = true
    )]
    pub simulated_first_token_millis: u64,
    /// Simulated model: tokens per second after the first (0: unpaced).
    #[arg(
        long,
        env = "PARLEY_SIMULATED_TOKENS_PER_SECOND",
        default_value_t = 50,
        global = true
    )]
    pub simulated_tokens_per_second: u32,
    /// Simulated model: reply length in tokens (0: echo the prompt once).
    #[arg(
        long,
        env = "PARLEY_SIMULATED_REPLY_TOKENS",
        default_value_t = 0,
        global = true
    )]
    pub simulated_reply_tokens: u32,
    /// How long a reply keeps generating after its client disconnected, so it can re-attach.
    #[arg(
        long,
        env = "PARLEY_REATTACH_GRACE_SECONDS",
        default_value_t = 30,
        global = true
    )]
    pub reattach_grace_seconds: u64,
    /// Interval of `: ping` comments on idle SSE streams.
    #[arg(
        long,
        env = "PARLEY_SSE_PING_SECONDS",
        default_value_t = 15,
        global = true
    )]
    pub sse_ping_seconds: u64,
    /// Longest a reply may stream; a longer one ends with `MAX_DURATION`,
    /// keeping (and paying for) what it generated. 0: no limit.
    #[arg(
        long,
        env = "PARLEY_MAX_STREAM_SECONDS",
        default_value_t = 300,
        global = true
    )]
    pub max_stream_seconds: u64,
    /// Whether supervisors and admins may observe replies live.
    #[arg(
        long,
        env = "PARLEY_OBSERVATION",
        value_enum,
        default_value_t = Switch::On,
        global = true
    )]
    pub observation: Switch,
    /// Live events an observer may fall behind before it is cut with `OBSERVER_TOO_SLOW`.
    #[arg(
        long,
        env = "PARLEY_OBSERVER_BUFFER_EVENTS",
        default_value_t = 1024,
        global = true
    )]
    pub observer_buffer_events: usize,
    /// Prefix of the reply hub's Redis keys (replicas of one deployment share it).
    #[arg(
        long,
        env = "PARLEY_HUB_KEY_PREFIX",
        default_value = "parley:hub",
        global = true
    )]
    pub hub_key_prefix: String,
    /// How often a replica renews the hub locks of its replies; other
    /// replicas report a reply lost after five missed renewals.
    #[arg(
        long,
        env = "PARLEY_HUB_HEARTBEAT_MILLIS",
        default_value_t = 1000,
        global = true
    )]
    pub hub_heartbeat_millis: u64,
    /// Events kept in Redis per reply (replays beyond them are reported lost).
    #[arg(
        long,
        env = "PARLEY_HUB_STREAM_MAX_EVENTS",
        default_value_t = 20_000,
        global = true
    )]
    pub hub_stream_max_events: usize,
    /// After SIGTERM, how long replies may finish before they end with `SHUTTING_DOWN`
    /// (keep it below PARLEY_SHUTDOWN_DRAIN_SECONDS).
    #[arg(
        long,
        env = "PARLEY_STREAM_DRAIN_SECONDS",
        default_value_t = 20,
        global = true
    )]
    pub stream_drain_seconds: u64,
}

/// A feature turned on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl Config {
    /// Local mode: no external store and no external identity provider.
    pub fn is_local(&self) -> bool {
        self.mongodb_uri.is_none() && self.jwks_url.is_none()
    }

    /// The configuration that `Cli` would produce from these arguments, with
    /// no environment variables consulted beyond clap's own.
    pub fn from_args<I, T>(args: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Cli::try_parse_from(args)
            .map(|cli| cli.config)
            .map_err(|error| Error::Config(error.to_string()))
    }
}

/// Parses decimal credits exactly (`2`, `0.25`; at most six decimals).
pub fn parse_credits(text: &str) -> Result<Credits, String> {
    Credits::parse_decimal(text.trim()).map_err(|error| error.to_string())
}

/// Parses `<number><unit>` with unit `s`, `m`, `h` or `d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 30m or 1h"))?;
    let unit_seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "unknown unit `{unit}` in `{text}` (use s, m, h or d)"
            ));
        }
    };
    number
        .checked_mul(unit_seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{text}` is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn memory_settings_have_bounded_defaults_and_refuse_zero() {
        let cli = Cli::try_parse_from(["parley-service"]).unwrap();
        assert_eq!(cli.config.blocking_threads, 4);
        assert_eq!(cli.config.store_cache_mib, 5);
        let cli = Cli::try_parse_from([
            "parley-service",
            "--blocking-threads",
            "16",
            "--store-cache-mib",
            "256",
        ])
        .unwrap();
        assert_eq!(cli.config.blocking_threads, 16);
        assert_eq!(cli.config.store_cache_mib, 256);
        assert!(Cli::try_parse_from(["parley-service", "--blocking-threads", "0"]).is_err());
        assert!(Cli::try_parse_from(["parley-service", "--store-cache-mib", "0"]).is_err());
    }

    #[test]
    fn serve_is_the_default_and_token_takes_global_flags() {
        let cli = Cli::try_parse_from(["parley-service"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.config.listen.to_string(), "127.0.0.1:8080");

        let cli = Cli::try_parse_from([
            "parley-service",
            "token",
            "--sub",
            "alice",
            "--role",
            "supervisor",
            "--cohort",
            "c1",
            "--cohort",
            "c2",
            "--ttl",
            "2h",
            "--jwt-secret",
            "s3cret",
        ])
        .unwrap();
        let Some(Command::Token(args)) = cli.command else {
            panic!("expected the token subcommand");
        };
        assert_eq!(args.sub, "alice");
        assert_eq!(args.role, Role::Supervisor);
        assert_eq!(args.cohorts, ["c1", "c2"]);
        assert_eq!(args.ttl, Duration::from_secs(7200));
        assert_eq!(cli.config.jwt_secret.as_deref(), Some("s3cret"));
    }
}
