use anyhow::Context;
use clap::Parser;
use parley_service::config::{Cli, Command};
use parley_service::{server, telemetry};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init_logging();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let shutdown = CancellationToken::new();
            tokio::spawn(server::cancel_on_signal(shutdown.clone()));
            server::serve(cli.config, shutdown)
                .await
                .context("parley-service failed")
        }
        Command::Token(args) => {
            let token = server::mint_cli_token(&cli.config, &args).await?;
            println!("{token}");
            Ok(())
        }
    }
}
