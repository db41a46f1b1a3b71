//! Group commit keeps the embedded database's promise: a write is answered
//! only once it is durable. A child process (`durability-writer`) writes
//! sessions, messages and ledger holds and settlements from many concurrent
//! tasks and prints each acknowledged write; it is SIGKILLed mid-stream, so
//! redb gets no chance to flush on close, and every acknowledged write must
//! be in the file it left. Three children in turn write to the same file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;

use futures::future::join_all;
use parley_e2e::durability::{SETTINGS, open, settlement};
use parley_service::ledger::{Credits, Ledger, Page};
use parley_service::store::{ObjectId, SessionStore};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Acknowledged writes seen before each kill.
const ACKS_BEFORE_KILL: usize = 1_500;
const KILLS: usize = 3;

/// What the child acknowledged, read from its output.
#[derive(Default)]
struct Acknowledged {
    /// Session id → its user and the contents of its acknowledged appends.
    sessions: BTreeMap<ObjectId, (String, Vec<String>)>,
    /// Request id → its user.
    holds: BTreeMap<String, String>,
    settled: BTreeSet<String>,
    count: usize,
}

impl Acknowledged {
    /// Records one line of the child's output; other lines are
    /// ignored.
    fn record(&mut self, line: &str) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["ack-session", id, user] => {
                let id = ObjectId::parse_str(id).unwrap();
                self.sessions.insert(id, ((*user).to_owned(), Vec::new()));
            }
            ["ack-append", id, content] => {
                let id = ObjectId::parse_str(id).unwrap();
                let (_, contents) = self.sessions.get_mut(&id).unwrap();
                contents.push((*content).to_owned());
            }
            ["ack-hold", request_id, user] => {
                self.holds
                    .insert((*request_id).to_owned(), (*user).to_owned());
            }
            ["ack-settle", request_id] => {
                assert!(self.holds.contains_key(*request_id));
                self.settled.insert((*request_id).to_owned());
            }
            _ => return,
        }
        self.count += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut acknowledged = Acknowledged::default();
    // Each kill lands at a random point of a batch; several make a write
    // acknowledged before its batch is durable very likely to be caught.
    for _ in 0..KILLS {
        write_and_kill(dir.path(), &mut acknowledged).await;
        verify(dir.path(), &acknowledged).await;
    }
    assert!(acknowledged.settled.len() >= KILLS * ACKS_BEFORE_KILL / 5);
}

/// Runs the child on `dir` and SIGKILLs it after `ACKS_BEFORE_KILL`
/// acknowledged writes; records every write it acknowledged.
async fn write_and_kill(dir: &Path, acknowledged: &mut Acknowledged) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_durability-writer"))
        .arg(dir)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let seen_before = acknowledged.count;
    while acknowledged.count < seen_before + ACKS_BEFORE_KILL {
        let line = lines.next_line().await.unwrap();
        let line = line.unwrap_or_else(|| {
            panic!(
                "the child stopped after {} acknowledged writes",
                acknowledged.count - seen_before
            )
        });
        acknowledged.record(&line);
    }
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    // What it printed before it died is still in the pipe.
    while let Some(line) = lines.next_line().await.unwrap() {
        acknowledged.record(&line);
    }
}

/// Every acknowledged write is in the file; settlements moved their money.
async fn verify(dir: &Path, acknowledged: &Acknowledged) {
    let (store, ledger) = open(dir).await;
    join_all(acknowledged.sessions.iter().map(|(id, (user, appended))| {
        let store = &store;
        async move {
            let session = store.get(*id).await.unwrap();
            assert_eq!(&session.summary.user_id, user);
            let contents: BTreeSet<&str> = session
                .messages
                .iter()
                .map(|message| &*message.content)
                .collect();
            for content in appended {
                assert!(contents.contains(content.as_str()), "{content} lost");
            }
        }
    }))
    .await;
    join_all(acknowledged.settled.iter().map(|request_id| {
        let ledger = &ledger;
        async move {
            let closed = ledger.settle(request_id, settlement()).await.unwrap();
            assert!(closed.replayed, "settlement {request_id} lost");
        }
    }))
    .await;
    // Open or settled, never missing (this releases the open ones).
    join_all(acknowledged.holds.iter().map(|(request_id, user)| {
        let ledger = &ledger;
        async move {
            let closed = ledger.release(request_id).await.unwrap();
            assert_eq!(&closed.record.user, user);
        }
    }))
    .await;
    let users: BTreeSet<&String> = acknowledged.holds.values().collect();
    for user in users {
        let mut charged = Credits::ZERO;
        for number in 0.. {
            let page = ledger
                .usage(user, Page { number, size: 500 })
                .await
                .unwrap();
            for record in &page {
                charged = charged.checked_add(record.charged).unwrap();
            }
            if page.len() < 500 {
                break;
            }
        }
        let balance = ledger.balance(user).await.unwrap();
        assert_eq!(
            balance.balance,
            SETTINGS.initial_balance.checked_sub(charged).unwrap()
        );
    }
}
