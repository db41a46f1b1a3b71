use anyhow::Context;
use clap::Parser;
use parley_service::config::{Cli, Command};
use parley_service::{server, telemetry};
use tokio_util::sync::CancellationToken;

// glibc's malloc was a sixth of the reply path's instructions; mimalloc's
// thread-local free lists make the many small per-reply allocations cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(usize::from(cli.config.blocking_threads))
        .build()
        .context("starting the async runtime")?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
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
