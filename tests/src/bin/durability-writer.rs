//! The child process of `tests/tests/embedded_durability.rs`: writes to the
//! embedded database in the directory given as its argument until it is
//! killed, printing each acknowledged write.

use std::path::PathBuf;
use std::process::ExitCode;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: durability-writer DIR");
        return ExitCode::FAILURE;
    };
    parley_e2e::durability::write_until_killed(&dir).await;
    ExitCode::SUCCESS
}
