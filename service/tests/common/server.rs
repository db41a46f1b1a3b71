//! The real server in-process: `serve_listener` on a loopback port.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use parley_service::auth::Role;
use parley_service::config::{Config, TokenArgs};
use parley_service::server::{mint_cli_token, serve_listener};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct RunningServer {
    pub address: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), parley_service::Error>>,
}

impl RunningServer {
    pub async fn start(config: Config) -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), config).await
    }

    /// Serves on `listener`; one bound to every interface is called on loopback.
    pub async fn start_on(listener: TcpListener, config: Config) -> Self {
        let mut address = listener.local_addr().unwrap();
        if address.ip().is_unspecified() {
            address.set_ip([127, 0, 0, 1].into());
        }
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve_listener(listener, config, shutdown.clone()));
        let server = Self {
            address,
            shutdown,
            task,
        };
        server.wait_until_serving().await;
        server
    }

    /// The listener is bound before `serve_listener` runs, so connections
    /// queue until the app is up; the first answer says it serves.
    async fn wait_until_serving(&self) {
        let response = reqwest::get(self.url("/health")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// The configuration from these flags, on `data_dir`, with a 5 s drain.
pub fn config(data_dir: &Path, extra: &[&str]) -> Config {
    let data_dir = data_dir.to_str().unwrap();
    let mut args = vec![
        "parley-service",
        "--data-dir",
        data_dir,
        "--shutdown-drain-seconds",
        "5",
    ];
    args.extend_from_slice(extra);
    Config::from_args(args).unwrap()
}

/// A token of user `sub` in cohort c1, as the `token` subcommand mints it.
pub async fn cli_token(config: &Config, sub: &str) -> String {
    let args = TokenArgs {
        sub: sub.into(),
        role: Role::User,
        cohorts: vec!["c1".into()],
        ttl: Duration::from_secs(600),
    };
    mint_cli_token(config, &args).await.unwrap()
}

/// Status and JSON body (`Value::Null` when not JSON) of one call.
pub async fn call(
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let client = reqwest::Client::new();
    let mut builder = client.request(method, url).bearer_auth(token);
    if let Some(body) = body {
        builder = builder.json(&body);
    }
    let response = builder.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}
