//! The circuit breaker's state machine, run as one scenario against each
//! store: this process's own, and Redis as every replica shares it (two
//! connections standing for two replicas, which must agree at every step).
//! Times are given, not slept: the stores take `now` as an argument.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use parley_service::routing::{
    Admission, BreakerState, BreakerStore, LocalBreakers, RedisBreakers, Settings,
};
use parley_test_support::env;

const SETTINGS: Settings = Settings {
    threshold: 2,
    window_ms: 1_000,
    cooldown_ms: 500,
    probe_lease_ms: 300,
};
const KEY: &str = "7:default:model-a";

/// `a` and `b` are two replicas' views of the same breakers.
async fn scenario(a: &dyn BreakerStore, b: &dyn BreakerStore) {
    let admit = |store: &'static str, now: u64| async move {
        let view = if store == "a" { a } else { b };
        view.admit(KEY, &SETTINGS, now).await.unwrap()
    };

    // Closed: tried. Failures further apart than the window never add up.
    assert_eq!(admit("a", 0).await, (Admission::Closed, false));
    assert_eq!(a.failed(KEY, &SETTINGS, false, 0).await.unwrap(), None);
    assert_eq!(b.failed(KEY, &SETTINGS, false, 1_500).await.unwrap(), None);
    assert_eq!(b.state(KEY, 1_500).await.unwrap(), BreakerState::Closed);

    // The threshold within the window opens it, for both replicas.
    assert_eq!(
        a.failed(KEY, &SETTINGS, false, 1_600).await.unwrap(),
        Some(BreakerState::Open)
    );
    assert_eq!(admit("b", 1_700).await, (Admission::Open, false));
    assert_eq!(b.state(KEY, 1_700).await.unwrap(), BreakerState::Open);
    // Failures of calls admitted before it opened change nothing.
    assert_eq!(b.failed(KEY, &SETTINGS, false, 1_800).await.unwrap(), None);

    // After the cooldown a reader sees it half-open; exactly one request
    // probes, the other replica's requests still skip the target.
    assert_eq!(a.state(KEY, 2_100).await.unwrap(), BreakerState::HalfOpen);
    assert_eq!(admit("b", 2_100).await, (Admission::Probe, true));
    assert_eq!(admit("a", 2_150).await, (Admission::Open, false));
    assert_eq!(a.state(KEY, 2_150).await.unwrap(), BreakerState::HalfOpen);
    // Only the probe decides a half-open breaker.
    assert_eq!(a.failed(KEY, &SETTINGS, false, 2_200).await.unwrap(), None);
    assert_eq!(
        b.failed(KEY, &SETTINGS, true, 2_200).await.unwrap(),
        Some(BreakerState::Open)
    );
    assert_eq!(admit("a", 2_300).await, (Admission::Open, false));

    // A probe that never reports holds the half-open state for its lease
    // only; then another request probes.
    assert_eq!(admit("a", 2_700).await, (Admission::Probe, true));
    assert_eq!(admit("b", 2_900).await, (Admission::Open, false));
    assert_eq!(admit("b", 3_000).await, (Admission::Probe, false));

    // A successful probe closes it for everyone; a second success is no change.
    assert_eq!(
        b.probe_succeeded(KEY).await.unwrap(),
        Some(BreakerState::Closed)
    );
    assert_eq!(a.probe_succeeded(KEY).await.unwrap(), None);
    assert_eq!(admit("a", 3_100).await, (Admission::Closed, false));
    assert_eq!(b.state(KEY, 3_100).await.unwrap(), BreakerState::Closed);
    // Closed afresh: earlier failures are forgotten.
    assert_eq!(a.failed(KEY, &SETTINGS, false, 3_200).await.unwrap(), None);
}

#[tokio::test]
async fn the_state_machine_in_one_process() {
    let breakers = LocalBreakers::default();
    scenario(&breakers, &breakers).await;
}

#[tokio::test]
async fn two_replicas_sharing_redis_agree_at_every_step() {
    let url = env::redis_url();
    let prefix = env::unique_name("breakers");
    let a = RedisBreakers::connect(&url, &prefix).await.unwrap();
    let b = RedisBreakers::connect(&url, &prefix).await.unwrap();
    scenario(&a, &b).await;
}
