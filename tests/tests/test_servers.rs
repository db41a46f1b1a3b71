//! The real servers of the test environment answer the clients Parley uses:
//! the official `mongodb` driver against the MongoDB-wire server, and `redis`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use parley_test_support::env;

async fn mongo_database() -> (mongodb::Client, mongodb::Database) {
    let client = mongodb::Client::with_uri_str(env::mongodb_uri())
        .await
        .unwrap();
    let database = client.database(&env::unique_name("servers"));
    (client, database)
}

#[tokio::test]
async fn mongodb_insert_find_update() {
    let (client, db) = mongo_database().await;
    let sessions = db.collection::<Document>("sessions");

    let inserted = sessions
        .insert_one(doc! { "userId": "alice", "messages": [], "tokens": 0 })
        .await
        .unwrap();
    let id = inserted.inserted_id;

    sessions
        .update_one(
            doc! { "_id": &id },
            doc! { "$push": { "messages": "hello\n\"world\" ✓" }, "$inc": { "tokens": 7 } },
        )
        .await
        .unwrap();

    let found = sessions
        .find_one(doc! { "_id": &id })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.get_str("userId").unwrap(), "alice");
    assert_eq!(found.get_i32("tokens").unwrap(), 7);
    let messages = found.get_array("messages").unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].as_str().unwrap(), "hello\n\"world\" ✓");

    let all: Vec<Document> = sessions
        .find(doc! { "userId": "alice" })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 1);

    db.drop().await.unwrap();
    client.shutdown().await;
}

async fn balance(accounts: &mongodb::Collection<Document>, id: &str) -> i32 {
    let account = accounts
        .find_one(doc! { "_id": id })
        .await
        .unwrap()
        .unwrap();
    account.get_i32("balance").unwrap()
}

/// Moves `amount` from account a to account b inside one transaction.
async fn transfer_in_transaction(client: &mongodb::Client, db: &mongodb::Database, commit: bool) {
    let accounts = db.collection::<Document>("accounts");
    accounts
        .insert_many([
            doc! { "_id": "a", "balance": 10 },
            doc! { "_id": "b", "balance": 0 },
        ])
        .await
        .unwrap();

    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    accounts
        .update_one(doc! { "_id": "a" }, doc! { "$inc": { "balance": -4 } })
        .session(&mut session)
        .await
        .unwrap();
    accounts
        .update_one(doc! { "_id": "b" }, doc! { "$inc": { "balance": 4 } })
        .session(&mut session)
        .await
        .unwrap();
    if commit {
        session.commit_transaction().await.unwrap();
    } else {
        session.abort_transaction().await.unwrap();
    }
}

#[tokio::test]
async fn mongodb_committed_transaction_applies_every_write() {
    let (client, db) = mongo_database().await;
    transfer_in_transaction(&client, &db, true).await;
    let accounts = db.collection::<Document>("accounts");
    assert_eq!(balance(&accounts, "a").await, 6);
    assert_eq!(balance(&accounts, "b").await, 4);
    db.drop().await.unwrap();
    client.shutdown().await;
}

#[tokio::test]
async fn mongodb_aborted_transaction_applies_no_write() {
    let (client, db) = mongo_database().await;
    transfer_in_transaction(&client, &db, false).await;
    let accounts = db.collection::<Document>("accounts");
    assert_eq!(balance(&accounts, "a").await, 10);
    assert_eq!(balance(&accounts, "b").await, 0);
    db.drop().await.unwrap();
    client.shutdown().await;
}

#[tokio::test]
async fn redis_round_trip() {
    let client = redis::Client::open(env::redis_url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let key = env::unique_name("parley-test");

    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("hello ✓")
        .arg("EX")
        .arg(60)
        .query_async(&mut connection)
        .await
        .unwrap();
    let value: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(value, "hello ✓");

    let deleted: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
}
