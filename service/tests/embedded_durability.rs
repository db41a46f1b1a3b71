//! Group commit keeps the embedded database's promise: a write is answered
//! only once it is durable. A child process (this test binary, running the
//! ignored `write_until_killed`) writes sessions, messages and ledger holds
//! and settlements from many concurrent tasks and prints each acknowledged
//! write; it is SIGKILLed mid-stream, so redb gets no chance to flush on
//! close, and every acknowledged write must be in the file it left. Three
//! children in turn write to the same file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use parley_service::ledger::{
    Credits, EmbeddedLedger, HoldRequest, Ledger, LedgerSettings, Page, PriceSettlement,
    ReplyOutcome, Settlement,
};
use parley_service::store::{
    EmbeddedStore, Message, MessageRole, NewSession, ObjectId, SessionStore, TokenTotals,
};
use tokio::io::{AsyncBufReadExt, BufReader};

const SETTINGS: LedgerSettings = LedgerSettings {
    initial_balance: Credits::from_micros(1_000_000_000_000),
};
/// Where the child writes; set only for the child.
const DIR_VAR: &str = "PARLEY_TEST_DURABILITY_DIR";
const WRITERS: usize = 64;
/// Acknowledged writes seen before each kill.
const ACKS_BEFORE_KILL: usize = 1_500;
const KILLS: usize = 3;

async fn open(dir: &Path) -> (EmbeddedStore, EmbeddedLedger) {
    let store = EmbeddedStore::open(&dir.join("parley.redb")).await.unwrap();
    let ledger = EmbeddedLedger::new(Arc::clone(store.database()), SETTINGS)
        .await
        .unwrap();
    (store, ledger)
}

fn hold_request(request_id: &str, user: &str) -> HoldRequest {
    HoldRequest {
        request_id: request_id.to_owned(),
        user: user.to_owned(),
        session_id: "durability".to_owned(),
        route: "default".to_owned(),
        model: "simulated".to_owned(),
        amount: Credits::from_micros(5_000),
        lease: Duration::from_secs(3600),
        progress: None,
    }
}

fn settlement() -> PriceSettlement {
    Box::new(|_| {
        Ok(Settlement {
            route: "default".to_owned(),
            model: "simulated".to_owned(),
            input_tokens: 10,
            output_tokens: 20,
            cost: Credits::from_micros(3_000),
            outcome: ReplyOutcome::Completed,
            estimated: false,
        })
    })
}

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
    /// Records one line of the child's output; other lines (the test
    /// harness's own) are ignored.
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
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["write_until_killed", "--exact", "--ignored", "--nocapture"])
        .env(DIR_VAR, dir)
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
                .map(|message| message.content.as_str())
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

/// The child of `acknowledged_writes_survive_sigkill`: writes from many
/// tasks until it is killed, printing each write once it is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process: acknowledged_writes_survive_sigkill runs and kills it"]
async fn write_until_killed() {
    let dir = std::env::var(DIR_VAR).unwrap();
    let (store, ledger) = open(Path::new(&dir)).await;
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let store = store.clone();
            let ledger = ledger.clone();
            tokio::spawn(async move {
                let user = format!("user-{writer}");
                for round in 0.. {
                    let request_id = format!("request-{}-{writer}-{round}", std::process::id());
                    let session = NewSession::new(
                        user.clone(),
                        Vec::new(),
                        request_id.clone(),
                        "default".into(),
                        Vec::new(),
                    );
                    let session = store.create(session).await.unwrap();
                    let id = session.summary.id;
                    println!("ack-session {id} {user}");
                    ledger.hold(hold_request(&request_id, &user)).await.unwrap();
                    println!("ack-hold {request_id} {user}");
                    let reply = Message::new(MessageRole::Assistant, format!("reply-{request_id}"));
                    let content = reply.content.clone();
                    store
                        .append_messages(id, &user, &[reply], TokenTotals::default())
                        .await
                        .unwrap();
                    println!("ack-append {id} {content}");
                    ledger.settle(&request_id, settlement()).await.unwrap();
                    println!("ack-settle {request_id}");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
}
