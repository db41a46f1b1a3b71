//! One conformance suite for every `SessionStore`: each case runs against the
//! embedded store and against the real MongoDB-wire server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use std::collections::HashSet;
use std::sync::Arc;

use parley_service::Error;
use parley_service::store::{
    HistoryBudget, Message, MessageRole, NewSession, ObjectId, PageRequest, SessionStore,
    SessionSummary, SessionTail, TokenTotals, now,
};
use parley_service::turns::History;

store_conformance!(
    ping_answers,
    create_then_get_round_trips,
    unknown_session_is_not_found,
    list_is_newest_first_paginated_and_per_user,
    delete_removes_only_the_owners_session,
    rename_changes_only_the_owners_title,
    append_adds_messages_and_tokens,
    append_to_another_users_session_is_not_found,
    concurrent_appends_lose_nothing,
    text_survives_byte_for_byte,
    a_tail_read_returns_the_newest_messages_within_the_budget,
    tail_reads_between_appends_follow_the_session,
);

fn new_session(user: &str, title: &str, messages: Vec<Message>) -> NewSession {
    NewSession::new(
        user.into(),
        vec!["c1".into()],
        title.into(),
        "default".into(),
        messages,
    )
}

/// Session `id` as a reply reads it, once what was read is durable.
async fn read_tail(
    store: &dyn SessionStore,
    id: ObjectId,
    max_messages: u32,
    max_bytes: u64,
) -> SessionTail {
    let (tail, read) = store
        .get_tail_applied(
            id,
            HistoryBudget {
                max_messages,
                max_bytes,
            },
        )
        .await
        .unwrap();
    read.wait::<Error>().await.unwrap();
    tail
}

/// Waits until the millisecond clock moves, so timestamps compare strictly.
async fn next_millisecond() {
    let start = now();
    while now() <= start {
        tokio::task::yield_now().await;
    }
}

async fn ping_answers(store: Arc<dyn SessionStore>) {
    store.ping().await.unwrap();
}

async fn create_then_get_round_trips(store: Arc<dyn SessionStore>) {
    let first = Message::new(MessageRole::User, "hello");
    let created = store
        .create(new_session("alice", "Greetings", vec![first.clone()]))
        .await
        .unwrap();
    assert_eq!(created.summary.user_id, "alice");
    assert_eq!(created.summary.user_cohorts, ["c1"]);
    assert_eq!(created.summary.title, "Greetings");
    assert_eq!(created.summary.route, "default");
    assert_eq!(created.summary.message_count, 1);
    assert_eq!(created.summary.token_totals, TokenTotals::default());
    assert_eq!(created.messages, [first]);

    let fetched = store.get(created.summary.id).await.unwrap();
    assert_eq!(fetched, created);
}

async fn unknown_session_is_not_found(store: Arc<dyn SessionStore>) {
    let missing = ObjectId::new();
    assert!(matches!(
        store.get(missing).await,
        Err(Error::SessionNotFound)
    ));
    assert!(matches!(
        store.delete(missing, "alice").await,
        Err(Error::SessionNotFound)
    ));
    let appended = store
        .append_messages(missing, "alice", &[], TokenTotals::default())
        .await;
    assert!(matches!(appended, Err(Error::SessionNotFound)));
}

async fn list_is_newest_first_paginated_and_per_user(store: Arc<dyn SessionStore>) {
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            store
                .create(new_session("alice", &format!("s{n}"), vec![]))
                .await
                .unwrap()
                .summary
                .id,
        );
        next_millisecond().await;
    }
    store
        .create(new_session("bob", "not alice's", vec![]))
        .await
        .unwrap();
    // Touching the oldest session makes it the most recent.
    store
        .append_messages(
            ids[0],
            "alice",
            &[Message::new(MessageRole::User, "up")],
            TokenTotals::default(),
        )
        .await
        .unwrap();

    let titles = |page: u32, limit: u32| {
        let store = Arc::clone(&store);
        async move {
            let found = store
                .list("alice", PageRequest { page, limit })
                .await
                .unwrap();
            assert_eq!(found.total, 5);
            assert!(found.sessions.iter().all(|s| s.user_id == "alice"));
            found
                .sessions
                .into_iter()
                .map(|s| s.title)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(titles(1, 2).await, ["s0", "s4"]);
    assert_eq!(titles(2, 2).await, ["s3", "s2"]);
    assert_eq!(titles(3, 2).await, ["s1"]);
    assert!(titles(4, 2).await.is_empty());
    assert_eq!(titles(1, 100).await, ["s0", "s4", "s3", "s2", "s1"]);

    let listed = store
        .list("alice", PageRequest { page: 1, limit: 1 })
        .await
        .unwrap();
    assert_eq!(listed.sessions[0].message_count, 1);
    let nobody = store
        .list("nobody", PageRequest { page: 1, limit: 10 })
        .await
        .unwrap();
    assert_eq!(nobody.total, 0);
    assert!(nobody.sessions.is_empty());
}

async fn delete_removes_only_the_owners_session(store: Arc<dyn SessionStore>) {
    let message = Message::new(MessageRole::User, "bye");
    let id = store
        .create(new_session("alice", "doomed", vec![message]))
        .await
        .unwrap()
        .summary
        .id;
    let kept = store
        .create(new_session("alice", "kept", vec![]))
        .await
        .unwrap()
        .summary
        .id;

    assert!(matches!(
        store.delete(id, "mallory").await,
        Err(Error::SessionNotFound)
    ));
    store.get(id).await.unwrap();

    store.delete(id, "alice").await.unwrap();
    assert!(matches!(store.get(id).await, Err(Error::SessionNotFound)));
    assert!(matches!(
        store.delete(id, "alice").await,
        Err(Error::SessionNotFound)
    ));
    let listed = store
        .list("alice", PageRequest { page: 1, limit: 10 })
        .await
        .unwrap();
    assert_eq!(listed.total, 1);
    assert_eq!(listed.sessions[0].id, kept);
}

async fn rename_changes_only_the_owners_title(store: Arc<dyn SessionStore>) {
    let message = Message::new(MessageRole::User, "hello");
    let created = store
        .create(new_session("alice", "before", vec![message.clone()]))
        .await
        .unwrap();
    let id = created.summary.id;
    next_millisecond().await;
    let newer = store
        .create(new_session("alice", "newer", vec![]))
        .await
        .unwrap()
        .summary
        .id;
    assert!(matches!(
        store.rename(id, "mallory", "taken").await,
        Err(Error::SessionNotFound)
    ));
    assert!(matches!(
        store.rename(ObjectId::new(), "alice", "ghost").await,
        Err(Error::SessionNotFound)
    ));

    let title = "after \"quoted\" 😀";
    let renamed = store.rename(id, "alice", title).await.unwrap();
    let expected = SessionSummary {
        title: title.into(),
        ..created.summary.clone()
    };
    assert_eq!(renamed, expected);
    let session = store.get(id).await.unwrap();
    assert_eq!(session.summary, expected);
    assert_eq!(session.messages, [message]);
    // The list order dates the conversation, not the title.
    let listed = store
        .list("alice", PageRequest { page: 1, limit: 10 })
        .await
        .unwrap();
    let order: Vec<_> = listed.sessions.iter().map(|s| s.id).collect();
    assert_eq!(order, [newer, id]);
    assert_eq!(listed.sessions[1], expected);
}

async fn append_adds_messages_and_tokens(store: Arc<dyn SessionStore>) {
    let created = store
        .create(new_session("alice", "t", vec![]))
        .await
        .unwrap();
    let id = created.summary.id;
    next_millisecond().await;
    let batch = [
        Message::new(MessageRole::User, "question"),
        Message::new(MessageRole::Assistant, "answer"),
    ];
    store
        .append_messages(
            id,
            "alice",
            &batch,
            TokenTotals {
                input: 12,
                output: 34,
            },
        )
        .await
        .unwrap();
    store
        .append_messages(
            id,
            "alice",
            &batch[1..],
            TokenTotals {
                input: 1,
                output: 2,
            },
        )
        .await
        .unwrap();

    let session = store.get(id).await.unwrap();
    assert_eq!(
        session.messages,
        [batch[0].clone(), batch[1].clone(), batch[1].clone()]
    );
    assert_eq!(session.summary.message_count, 3);
    assert_eq!(
        session.summary.token_totals,
        TokenTotals {
            input: 13,
            output: 36
        }
    );
    assert_eq!(session.summary.created_at, created.summary.created_at);
    assert!(session.summary.updated_at > created.summary.updated_at);
}

async fn append_to_another_users_session_is_not_found(store: Arc<dyn SessionStore>) {
    let id = store
        .create(new_session("alice", "mine", vec![]))
        .await
        .unwrap()
        .summary
        .id;
    let intrusion = [Message::new(MessageRole::User, "hi from mallory")];
    let result = store
        .append_messages(
            id,
            "mallory",
            &intrusion,
            TokenTotals {
                input: 5,
                output: 5,
            },
        )
        .await;
    assert!(matches!(result, Err(Error::SessionNotFound)));
    let session = store.get(id).await.unwrap();
    assert!(session.messages.is_empty());
    assert_eq!(session.summary.token_totals, TokenTotals::default());
}

async fn concurrent_appends_lose_nothing(store: Arc<dyn SessionStore>) {
    const WRITERS: usize = 16;
    let id = store
        .create(new_session("alice", "busy", vec![]))
        .await
        .unwrap()
        .summary
        .id;
    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            let pair = [
                Message::new(MessageRole::User, format!("q{writer}")),
                Message::new(MessageRole::Assistant, format!("a{writer}")),
            ];
            store
                .append_messages(
                    id,
                    "alice",
                    &pair,
                    TokenTotals {
                        input: 1,
                        output: 2,
                    },
                )
                .await
                .unwrap();
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap();
    }
    let session = store.get(id).await.unwrap();
    assert_eq!(session.summary.message_count, 2 * WRITERS as u64);
    assert_eq!(session.messages.len(), 2 * WRITERS);
    assert_eq!(
        session.summary.token_totals,
        TokenTotals {
            input: WRITERS as u64,
            output: 2 * WRITERS as u64
        }
    );
    // Each batch lands whole: every question is directly followed by its answer.
    let mut writers = HashSet::new();
    for pair in session.messages.chunks(2) {
        let writer = pair[0].content.strip_prefix('q').unwrap();
        assert_eq!(&*pair[1].content, format!("a{writer}"));
        assert!(writers.insert(writer.to_owned()));
    }
    assert_eq!(writers.len(), WRITERS);
}

async fn text_survives_byte_for_byte(store: Arc<dyn SessionStore>) {
    let text =
        "line\nbreak \\ backslash \"quotes\" 🦀 emoji \u{0} nul ünïcödé\r\n$set {\"$inc\":1}";
    let title = "$where: 1 — ☃";
    let created = store
        .create(new_session(
            "ali.ce$",
            title,
            vec![Message::new(MessageRole::User, text)],
        ))
        .await
        .unwrap();
    let session = store.get(created.summary.id).await.unwrap();
    assert_eq!(&*session.messages[0].content, text);
    assert_eq!(session.summary.title, title);
    let listed = store
        .list("ali.ce$", PageRequest { page: 1, limit: 5 })
        .await
        .unwrap();
    assert_eq!(listed.total, 1);
}

async fn a_tail_read_returns_the_newest_messages_within_the_budget(store: Arc<dyn SessionStore>) {
    // Ten messages of 10 bytes each ("message 0." … "message 9."), the
    // first created with the session, the rest appended in pairs.
    let message = |index: usize| {
        let role = if index.is_multiple_of(2) {
            MessageRole::User
        } else {
            MessageRole::Assistant
        };
        Message::new(role, format!("message {index}."))
    };
    let all: Vec<Message> = (0..10).map(message).collect();
    let created = store
        .create(new_session("alice", "Long", all[..2].to_vec()))
        .await
        .unwrap();
    let id = created.summary.id;
    for pair in all[2..].chunks(2) {
        store
            .append_messages(id, "alice", pair, TokenTotals::default())
            .await
            .unwrap();
    }
    let tail = |max_messages: u32, max_bytes: u64| {
        let store = Arc::clone(&store);
        async move {
            let tail = read_tail(store.as_ref(), id, max_messages, max_bytes).await;
            assert_eq!(tail.summary.message_count, 10);
            assert_eq!(tail.summary.user_id, "alice");
            tail.newest_turns
        }
    };
    let turns = |messages: &[Message]| -> History { messages.iter().map(Message::turn).collect() };
    assert_eq!(
        tail(100, 1000).await,
        turns(&all),
        "a budget above the session: all"
    );
    assert_eq!(tail(3, 1000).await, turns(&all[7..]), "at most three");
    assert_eq!(
        tail(100, 30).await,
        turns(&all[7..]),
        "exactly 30 bytes: three"
    );
    assert_eq!(tail(100, 29).await, turns(&all[8..]), "29 bytes: two");
    assert_eq!(tail(10, 100).await, turns(&all), "both bounds met exactly");
    assert!(tail(0, 1000).await.is_empty(), "no messages");
    assert!(tail(100, 9).await.is_empty(), "not even the newest");
    let (tail, _) = store
        .get_tail_applied(id, HistoryBudget::NONE)
        .await
        .unwrap();
    assert_eq!(tail.summary, store.get(id).await.unwrap().summary);
    assert!(matches!(
        store
            .get_tail_applied(ObjectId::new(), HistoryBudget::NONE)
            .await,
        Err(Error::SessionNotFound)
    ));
}

/// What a reply reads, reply after reply (the embedded store answers from
/// its cache of session tails then): always the newest messages of the
/// whole session within the budget, whichever budget, and nothing once the
/// session is deleted.
async fn tail_reads_between_appends_follow_the_session(store: Arc<dyn SessionStore>) {
    let created = store
        .create(new_session("alice", "Growing", Vec::new()))
        .await
        .unwrap();
    let id = created.summary.id;
    let budgets = [(6, 1_000), (6, 1_000), (100, 1_000), (3, 1_000), (100, 45)];
    for round in 0..25 {
        let question = Message::new(MessageRole::User, format!("question {round}"));
        let mut answer = Message::new(MessageRole::Assistant, "answer ".repeat(round % 4));
        answer.incomplete = round % 3 == 0;
        let pair = [question, answer];
        store
            .append_messages(id, "alice", &pair, TokenTotals::default())
            .await
            .unwrap();
        let (max_messages, max_bytes) = budgets[round % budgets.len()];
        let tail = read_tail(store.as_ref(), id, max_messages, max_bytes).await;
        let mut expected = Vec::new();
        let mut bytes = 0;
        for message in store.get(id).await.unwrap().messages.into_iter().rev() {
            bytes += message.content.len() as u64;
            if expected.len() == max_messages as usize || bytes > max_bytes {
                break;
            }
            expected.insert(0, message.turn());
        }
        assert_eq!(tail.newest_turns, History::from(expected), "round {round}");
        assert_eq!(tail.summary.message_count, 2 * (round as u64 + 1));
    }
    store.delete(id, "alice").await.unwrap();
    assert!(matches!(
        store.get_tail_applied(id, HistoryBudget::NONE).await,
        Err(Error::SessionNotFound)
    ));
}
