//! The embedded database's durability test: a child process writes sessions,
//! messages and ledger holds and settlements from many concurrent tasks and
//! prints each write once it is acknowledged; the test SIGKILLs it and finds
//! every acknowledged write in the file (`tests/tests/embedded_durability.rs`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parley_service::embedded_db::DEFAULT_CACHE_BYTES;
use parley_service::ledger::{
    Credits, EmbeddedLedger, HoldRequest, Ledger, LedgerSettings, PriceSettlement, ReplyOutcome,
    Settlement,
};
use parley_service::store::{
    EmbeddedStore, Message, MessageRole, NewSession, SessionStore, TokenTotals,
};

pub const SETTINGS: LedgerSettings = LedgerSettings {
    initial_balance: Credits::from_micros(1_000_000_000_000),
};
const WRITERS: usize = 64;

pub async fn open(dir: &Path) -> (EmbeddedStore, EmbeddedLedger) {
    let store = EmbeddedStore::open(&dir.join("parley.redb"), DEFAULT_CACHE_BYTES)
        .await
        .unwrap();
    let ledger = EmbeddedLedger::new(Arc::clone(store.database()), SETTINGS)
        .await
        .unwrap();
    (store, ledger)
}

pub fn hold_request(request_id: &str, user: &str) -> HoldRequest {
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

pub fn settlement() -> PriceSettlement {
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

/// The child: writes to the database in `dir` from many tasks until it is
/// killed, printing each write once it is acknowledged.
pub async fn write_until_killed(dir: &Path) {
    let (store, ledger) = open(dir).await;
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
