//! Harness for black-box tests: starts Parley's real binaries as child
//! processes and stops them the way Kubernetes does (SIGTERM).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// Upper bound for a process to report that it listens; a bound, not a wait.
const STARTUP_LIMIT: Duration = Duration::from_secs(60);

/// Path of a workspace binary, next to the test executable's `deps/` folder.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A running binary whose JSON log lines on stdout the test can read.
pub struct Process {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Process {
    /// Starts `name` with `args` and `envs` on a clean environment (only PATH
    /// and HOME are inherited, so a developer's settings cannot leak in).
    pub fn start(name: &str, args: &[&str], envs: &[(&str, String)]) -> Self {
        let mut command = Command::new(binary(name));
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (key, value) in envs {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Process { child, lines }
    }

    /// Reads stdout until a line contains `needle`, and returns that line.
    pub async fn wait_for_line(&mut self, needle: &str) -> String {
        let read = async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                if line.contains(needle) {
                    return line;
                }
            }
            panic!("process ended before printing a line containing {needle:?}");
        };
        tokio::time::timeout(STARTUP_LIMIT, read)
            .await
            .unwrap_or_else(|_| panic!("no line containing {needle:?} within {STARTUP_LIMIT:?}"))
    }

    /// Sends SIGTERM and returns the exit status once the process has ended.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "kill -TERM {pid} failed");
        // Drain stdout so the child never blocks on a full pipe while stopping.
        let drain = async { while let Ok(Some(_)) = self.lines.next_line().await {} };
        let (_, status) = tokio::join!(drain, self.child.wait());
        status.unwrap()
    }
}
