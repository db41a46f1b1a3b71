//! Harness for black-box tests: starts Parley's real binaries as child
//! processes and stops them the way Kubernetes does (SIGTERM), or kills them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod durability;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Upper bound for a process to report that it listens; a bound, not a wait.
const STARTUP_LIMIT: Duration = Duration::from_secs(60);

/// Path of a workspace binary, next to the test executable's `deps/` folder.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins --tests` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A running binary whose output lines (stdout and stderr, where the JSON
/// logs go) the test can read in order of arrival.
pub struct Process {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

fn forward_lines(
    output: impl AsyncRead + Unpin + Send + 'static,
    to: mpsc::UnboundedSender<String>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(output).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("  | {line}");
            if to.send(line).is_err() {
                break;
            }
        }
    });
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
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in envs {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap();
        let (sender, lines) = mpsc::unbounded_channel();
        forward_lines(child.stdout.take().unwrap(), sender.clone());
        forward_lines(child.stderr.take().unwrap(), sender);
        Process { child, lines }
    }

    /// Reads output until a line contains `needle`, and returns that line.
    pub async fn wait_for_line(&mut self, needle: &str) -> String {
        let read = async {
            while let Some(line) = self.lines.recv().await {
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

    /// Reads output until a line containing each of `needles` has been seen,
    /// in any order (stdout and stderr are read separately, so lines of the
    /// two do not arrive in the order they were written); those lines, in the
    /// order of `needles`.
    pub async fn wait_for_lines(&mut self, needles: &[&str]) -> Vec<String> {
        let mut found: Vec<Option<String>> = vec![None; needles.len()];
        let read = async {
            while found.iter().any(Option::is_none) {
                let Some(line) = self.lines.recv().await else {
                    panic!("process ended before printing lines containing {needles:?}");
                };
                if let Some(slot) =
                    needles
                        .iter()
                        .zip(found.iter_mut())
                        .find_map(|(needle, slot)| {
                            (slot.is_none() && line.contains(needle)).then_some(slot)
                        })
                {
                    *slot = Some(line);
                }
            }
        };
        tokio::time::timeout(STARTUP_LIMIT, read)
            .await
            .unwrap_or_else(|_| panic!("no lines containing {needles:?} within {STARTUP_LIMIT:?}"));
        found.into_iter().flatten().collect()
    }

    /// The output lines that arrived and were not read yet, without waiting.
    pub fn lines_so_far(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.try_recv() {
            lines.push(line);
        }
        lines
    }

    /// Kills the process with SIGKILL, as a crashed node or an OOM kill
    /// would: no shutdown code runs.
    pub async fn kill(&mut self) {
        self.child.kill().await.unwrap();
    }

    /// Sends SIGTERM and returns the exit status once the process has ended.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .unwrap();
        assert!(status.success(), "kill -TERM {pid} failed");
        tokio::time::timeout(STARTUP_LIMIT, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!("process {pid} did not stop within {STARTUP_LIMIT:?} of SIGTERM")
            })
            .unwrap()
    }
}

/// The `address` field of a JSON log line such as `{"fields":{"message":"serving","address":"…"}}`.
pub fn logged_address(line: &str) -> String {
    let log: serde_json::Value = serde_json::from_str(line).unwrap();
    log["fields"]["address"].as_str().unwrap().to_owned()
}

/// A token signed with `secret`, minted by the service's own `token`
/// command (`args` such as `["--sub", "carol", "--role", "user"]`).
pub async fn mint_token(secret: &str, args: &[&str]) -> String {
    let minted = Command::new(binary("parley-service"))
        .arg("token")
        .args(args)
        .env_clear()
        .env("PARLEY_JWT_SECRET", secret)
        .output()
        .await
        .unwrap();
    assert!(
        minted.status.success(),
        "parley-service token {args:?}: {}",
        String::from_utf8_lossy(&minted.stderr)
    );
    String::from_utf8(minted.stdout).unwrap().trim().to_owned()
}
