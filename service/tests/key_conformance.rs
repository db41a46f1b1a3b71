//! One conformance suite for every `ApiKeyStore`: each case runs against the
//! embedded store and against the real MongoDB-wire server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use chrono::Duration;
use parley_service::auth::Role;
use parley_service::store::{ApiKey, ApiKeyStore, ObjectId, now};

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (store, _dir) = crate::common::embedded_store().await;
                    crate::$case(std::sync::Arc::new(store)).await;
                }
            )*
        }
        mod mongo {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let store = crate::common::mongo_store().await;
                    crate::$case(std::sync::Arc::new(store.clone())).await;
                    crate::common::drop_mongo(store).await;
                }
            )*
        }
    };
}

conformance!(
    a_key_is_found_until_its_owner_deletes_it,
    an_unowned_delete_needs_no_owner_and_a_wrong_owner_deletes_nothing,
    keys_are_listed_per_user_newest_first,
);

/// A key of `user` created `minutes_ago`.
fn key(user: &str, name: &str, minutes_ago: i64) -> ApiKey {
    ApiKey {
        id: ObjectId::new(),
        user_id: user.into(),
        name: name.into(),
        role: Role::Supervisor,
        cohorts: vec!["c1".into(), "c2".into()],
        secret_sha256: std::array::from_fn(|i| (i * 7 + name.len()) as u8),
        created_at: now() - Duration::minutes(minutes_ago),
        expires_at: None,
    }
}

async fn a_key_is_found_until_its_owner_deletes_it(keys: Arc<dyn ApiKeyStore>) {
    let forever = key("alice", "ci", 2);
    let expiring = ApiKey {
        expires_at: Some(now() + Duration::days(30)),
        ..key("alice", "notebook", 1)
    };
    keys.create_key(&forever).await.unwrap();
    keys.create_key(&expiring).await.unwrap();
    assert_eq!(keys.key(forever.id).await.unwrap().as_ref(), Some(&forever));
    assert_eq!(
        keys.key(expiring.id).await.unwrap().as_ref(),
        Some(&expiring)
    );
    assert_eq!(keys.key(ObjectId::new()).await.unwrap(), None);

    assert!(keys.delete_key(forever.id, Some("alice")).await.unwrap());
    assert_eq!(keys.key(forever.id).await.unwrap(), None);
    assert!(!keys.delete_key(forever.id, Some("alice")).await.unwrap());
    assert_eq!(keys.keys_of("alice").await.unwrap(), [expiring]);
}

async fn an_unowned_delete_needs_no_owner_and_a_wrong_owner_deletes_nothing(
    keys: Arc<dyn ApiKeyStore>,
) {
    let alices = key("alice", "ci", 1);
    keys.create_key(&alices).await.unwrap();
    assert!(!keys.delete_key(alices.id, Some("bob")).await.unwrap());
    assert_eq!(keys.key(alices.id).await.unwrap().as_ref(), Some(&alices));
    // What an admin does: no owner to match.
    assert!(keys.delete_key(alices.id, None).await.unwrap());
    assert_eq!(keys.key(alices.id).await.unwrap(), None);
    assert!(keys.keys_of("alice").await.unwrap().is_empty());
    assert!(!keys.delete_key(ObjectId::new(), None).await.unwrap());
}

async fn keys_are_listed_per_user_newest_first(keys: Arc<dyn ApiKeyStore>) {
    let oldest = key("alice", "a", 30);
    let bobs = key("bob", "b", 20);
    let middle = key("alice", "c", 10);
    let newest = key("alice", "d", 0);
    for each in [&oldest, &bobs, &middle, &newest] {
        keys.create_key(each).await.unwrap();
    }
    assert_eq!(
        keys.keys_of("alice").await.unwrap(),
        [newest, middle, oldest]
    );
    assert_eq!(keys.keys_of("bob").await.unwrap(), [bobs]);
    assert!(keys.keys_of("carol").await.unwrap().is_empty());
}
