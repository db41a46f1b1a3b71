//! The credits ledger's conformance suite, run against both stores (MongoDB
//! wire server and embedded redb), plus store-specific and pricing tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use parley_service::embedded_db::{DEFAULT_CACHE_BYTES, EmbeddedDb};
use parley_service::ledger::{
    Credits, EmbeddedLedger, HoldRequest, Ledger, LedgerError, LedgerSettings, MongoLedger, Page,
    PriceSettlement, Progress, ReplyOutcome, Settlement, price,
};

const INITIAL: Credits = Credits::from_micros(5_000_000);
const SETTINGS: LedgerSettings = LedgerSettings {
    initial_balance: INITIAL,
};
const LEASE: Duration = Duration::from_secs(60);

fn hold_request(request_id: &str, user: &str, amount: Credits) -> HoldRequest {
    HoldRequest {
        request_id: request_id.to_owned(),
        user: user.to_owned(),
        session_id: format!("session-of-{user}"),
        route: "default".to_owned(),
        model: "simulated".to_owned(),
        amount,
        lease: LEASE,
        progress: None,
    }
}

/// A settlement of a fixed cost, whatever the hold.
fn settlement(cost: Credits) -> PriceSettlement {
    Box::new(move |_| {
        Ok(Settlement {
            route: "default".to_owned(),
            model: "simulated-fallback".to_owned(),
            input_tokens: 120,
            output_tokens: 80,
            cost,
            outcome: ReplyOutcome::Completed,
            estimated: false,
        })
    })
}

fn progress(output_tokens: u64, cost: Credits) -> Progress {
    Progress {
        model: "simulated".to_owned(),
        input_tokens: 100,
        output_tokens,
        cost,
    }
}

/// A ledger on a fresh embedded database; the directory lives as long as this.
struct EmbeddedStore {
    ledger: Arc<dyn Ledger>,
    _dir: tempfile::TempDir,
}

impl EmbeddedStore {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(
            EmbeddedDb::open(&dir.path().join("parley.redb"), DEFAULT_CACHE_BYTES)
                .await
                .unwrap(),
        );
        let ledger = EmbeddedLedger::new(db, SETTINGS).await.unwrap();
        EmbeddedStore {
            ledger: Arc::new(ledger),
            _dir: dir,
        }
    }
}

/// A ledger on a database of its own on the test MongoDB server.
struct MongoStore {
    ledger: Arc<dyn Ledger>,
    client: mongodb::Client,
    db: mongodb::Database,
}

impl MongoStore {
    async fn start() -> Self {
        let client = mongodb::Client::with_uri_str(parley_test_support::env::mongodb_uri())
            .await
            .unwrap();
        let db = client.database(&parley_test_support::env::unique_name("ledger"));
        let ledger = MongoLedger::new(&db, SETTINGS);
        ledger.create_indexes().await.unwrap();
        MongoStore {
            ledger: Arc::new(ledger),
            client,
            db,
        }
    }

    async fn finish(self) {
        self.db.drop().await.unwrap();
        self.client.shutdown().await;
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let store = super::EmbeddedStore::start().await;
                    super::suite::$name(store.ledger.clone()).await;
                }
            )*
        }
        mod mongo {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let store = super::MongoStore::start().await;
                    super::suite::$name(store.ledger.clone()).await;
                    store.finish().await;
                }
            )*
        }
    };
}

conformance!(
    new_accounts_get_the_initial_balance_and_grants_add,
    concurrent_holds_never_overdraw_and_usage_sums_to_spending,
    hold_is_idempotent_by_request_id,
    settle_twice_charges_once,
    release_then_settle_charges_nothing,
    settle_then_release_keeps_the_settlement,
    concurrent_closes_of_one_hold_charge_once,
    settle_charges_at_most_the_hold_and_records_overage,
    holding_again_reprices_and_growth_needs_the_difference,
    holding_again_moves_the_lease_past_the_reaper,
    holding_again_records_progress_that_only_grows,
    settle_prices_from_the_open_hold,
    reaper_settles_from_recorded_progress_once,
    reaper_releases_and_reports_holds_without_usage,
    concurrent_reapers_close_each_hold_once,
    insufficient_credits_error_carries_the_amounts,
    operations_on_unknown_holds_fail,
    usage_pages_newest_first,
);

mod suite {
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use chrono::Utc;
    use futures::future::join_all;
    use parley_service::ledger::{
        Credits, Ledger, LedgerError, Page, Settlement, UsageOutcome, UsageRecord,
    };
    use tokio::sync::Barrier;

    use super::{INITIAL, hold_request, progress, settlement};

    fn credits(micros: u64) -> Credits {
        Credits::from_micros(micros)
    }

    /// Gives `user` exactly `amount` available credits.
    async fn fund(ledger: &dyn Ledger, user: &str, amount: Credits) {
        let balance = ledger
            .grant(user, amount.checked_sub(INITIAL).unwrap())
            .await
            .unwrap();
        assert_eq!(balance.available, amount);
    }

    async fn all_usage(ledger: &dyn Ledger, user: &str) -> Vec<UsageRecord> {
        ledger
            .usage(
                user,
                Page {
                    number: 0,
                    size: 500,
                },
            )
            .await
            .unwrap()
    }

    pub async fn new_accounts_get_the_initial_balance_and_grants_add(ledger: Arc<dyn Ledger>) {
        let before = ledger.balance("alice").await.unwrap();
        assert_eq!(
            (before.balance, before.held, before.available),
            (INITIAL, Credits::ZERO, INITIAL)
        );
        let after = ledger.grant("alice", credits(2_500_000)).await.unwrap();
        assert_eq!(after.balance, credits(7_500_000));
        assert_eq!(ledger.balance("alice").await.unwrap(), after);
        assert_eq!(ledger.balance("bob").await.unwrap().balance, INITIAL);
    }

    pub async fn concurrent_holds_never_overdraw_and_usage_sums_to_spending(
        ledger: Arc<dyn Ledger>,
    ) {
        const FLOWS: usize = 1_000;
        const AFFORDABLE: usize = 100;
        let worst_case = credits(1_234_567);
        let start = credits(worst_case.micros() * AFFORDABLE as u64);
        fund(ledger.as_ref(), "carol", start).await;

        // Every flow holds, then waits until all holds were attempted, so
        // that settling cannot free credits for a later hold.
        let barrier = Arc::new(Barrier::new(FLOWS));
        let running = Arc::new(AtomicBool::new(true));
        let watcher = {
            let ledger = Arc::clone(&ledger);
            let running = Arc::clone(&running);
            tokio::spawn(async move {
                let mut observations = 0_u32;
                while running.load(Ordering::Relaxed) || observations == 0 {
                    // Balance::new refuses held > balance, so every Ok here
                    // has a non-negative available amount.
                    let seen = ledger.balance("carol").await.unwrap();
                    assert!(seen.held <= seen.balance && seen.balance <= start);
                    observations += 1;
                    tokio::task::yield_now().await;
                }
                observations
            })
        };
        let flows = (0..FLOWS).map(|i| {
            let ledger = Arc::clone(&ledger);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                let request_id = format!("flow-{i}");
                let held = ledger
                    .hold(hold_request(&request_id, "carol", worst_case))
                    .await;
                barrier.wait().await;
                match held {
                    Ok(_) => {
                        // Some replies cost less than the hold, some more.
                        let cost = credits(worst_case.micros() / 3 + (i as u64 % 7) * 400_000);
                        let closed = ledger.settle(&request_id, settlement(cost)).await.unwrap();
                        assert!(!closed.replayed);
                        assert_eq!(closed.record.charged, cost.min(worst_case));
                        Ok(closed.record.charged)
                    }
                    Err(error) => Err(error),
                }
            })
        });
        let results: Vec<_> = join_all(flows)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        running.store(false, Ordering::Relaxed);
        assert!(watcher.await.unwrap() > 0);

        let charged: Vec<Credits> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        assert_eq!(charged.len(), AFFORDABLE);
        for refused in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                matches!(refused, LedgerError::InsufficientCredits { required, .. } if *required == worst_case),
                "{refused:?}"
            );
        }
        let final_balance = ledger.balance("carol").await.unwrap();
        assert_eq!(final_balance.held, Credits::ZERO);
        let records = all_usage(ledger.as_ref(), "carol").await;
        assert_eq!(records.len(), AFFORDABLE);
        let recorded: u64 = records.iter().map(|r| r.charged.micros()).sum();
        let spent: u64 = charged.iter().map(|c| c.micros()).sum();
        assert_eq!(recorded, spent);
        assert_eq!(
            final_balance.balance,
            start.checked_sub(credits(spent)).unwrap()
        );
    }

    pub async fn hold_is_idempotent_by_request_id(ledger: Arc<dyn Ledger>) {
        let first = ledger
            .hold(hold_request("r1", "dave", credits(1_000_000)))
            .await
            .unwrap();
        let again = ledger
            .hold(hold_request("r1", "dave", credits(1_000_000)))
            .await
            .unwrap();
        // The same hold, its lease renewed from now.
        assert_eq!(
            (&again.request_id, again.amount, again.created_at),
            (&first.request_id, first.amount, first.created_at)
        );
        assert!(again.lease_expires_at >= first.lease_expires_at);
        let concurrent =
            join_all((0..8).map(|_| ledger.hold(hold_request("r2", "dave", credits(500_000)))))
                .await;
        assert!(
            concurrent
                .iter()
                .all(|h| h.as_ref().unwrap().request_id == "r2")
        );
        let balance = ledger.balance("dave").await.unwrap();
        assert_eq!(balance.held, credits(1_500_000));

        ledger
            .settle("r1", settlement(credits(300_000)))
            .await
            .unwrap();
        let reopened = ledger
            .hold(hold_request("r1", "dave", credits(1_000_000)))
            .await;
        assert!(
            matches!(reopened, Err(LedgerError::HoldClosed { .. })),
            "{reopened:?}"
        );
        assert_eq!(ledger.balance("dave").await.unwrap().held, credits(500_000));
    }

    pub async fn settle_twice_charges_once(ledger: Arc<dyn Ledger>) {
        ledger
            .hold(hold_request("r1", "erin", credits(2_000_000)))
            .await
            .unwrap();
        let first = ledger
            .settle("r1", settlement(credits(750_000)))
            .await
            .unwrap();
        assert!(!first.replayed);
        assert_eq!(first.balance.balance, credits(4_250_000));
        assert_eq!(first.balance.held, Credits::ZERO);
        let second = ledger
            .settle("r1", settlement(credits(1_900_000)))
            .await
            .unwrap();
        assert!(second.replayed);
        assert_eq!(second.record, first.record);
        assert_eq!(
            ledger.balance("erin").await.unwrap().balance,
            credits(4_250_000)
        );
        assert_eq!(all_usage(ledger.as_ref(), "erin").await, vec![first.record]);
    }

    pub async fn release_then_settle_charges_nothing(ledger: Arc<dyn Ledger>) {
        ledger
            .hold(hold_request("r1", "finn", credits(2_000_000)))
            .await
            .unwrap();
        let released = ledger.release("r1").await.unwrap();
        assert!(!released.replayed);
        assert_eq!(released.record.outcome, UsageOutcome::Released);
        assert_eq!(released.record.charged, Credits::ZERO);
        assert_eq!(released.balance.available, INITIAL);
        let settled = ledger
            .settle("r1", settlement(credits(750_000)))
            .await
            .unwrap();
        assert!(settled.replayed);
        assert_eq!(settled.record, released.record);
        let again = ledger.release("r1").await.unwrap();
        assert!(again.replayed);
        let balance = ledger.balance("finn").await.unwrap();
        assert_eq!((balance.balance, balance.held), (INITIAL, Credits::ZERO));
        assert_eq!(all_usage(ledger.as_ref(), "finn").await.len(), 1);
    }

    pub async fn settle_then_release_keeps_the_settlement(ledger: Arc<dyn Ledger>) {
        ledger
            .hold(hold_request("r1", "gail", credits(2_000_000)))
            .await
            .unwrap();
        let settled = ledger
            .settle("r1", settlement(credits(600_000)))
            .await
            .unwrap();
        let released = ledger.release("r1").await.unwrap();
        assert!(released.replayed);
        assert_eq!(released.record, settled.record);
        assert_eq!(released.record.outcome, UsageOutcome::Completed);
        assert_eq!(
            ledger.balance("gail").await.unwrap().balance,
            credits(4_400_000)
        );
    }

    pub async fn concurrent_closes_of_one_hold_charge_once(ledger: Arc<dyn Ledger>) {
        ledger
            .hold(hold_request("r1", "hana", credits(3_000_000)))
            .await
            .unwrap();
        let closes = (0..16).map(|i| {
            let ledger = Arc::clone(&ledger);
            tokio::spawn(async move {
                if i % 4 == 0 {
                    ledger.release("r1").await
                } else {
                    ledger
                        .settle("r1", settlement(credits(1_000_000 + i * 1_000)))
                        .await
                }
            })
        });
        let outcomes: Vec<_> = join_all(closes)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        let winners: Vec<_> = outcomes.iter().filter(|c| !c.replayed).collect();
        assert_eq!(winners.len(), 1);
        let record = &winners[0].record;
        assert!(outcomes.iter().all(|c| &c.record == record));
        let balance = ledger.balance("hana").await.unwrap();
        assert_eq!(
            balance.balance,
            INITIAL.checked_sub(record.charged).unwrap()
        );
        assert_eq!(balance.held, Credits::ZERO);
        assert_eq!(all_usage(ledger.as_ref(), "hana").await.len(), 1);
    }

    pub async fn settle_charges_at_most_the_hold_and_records_overage(ledger: Arc<dyn Ledger>) {
        ledger
            .hold(hold_request("r1", "ivan", credits(1_000_000)))
            .await
            .unwrap();
        let closed = ledger
            .settle("r1", settlement(credits(1_400_001)))
            .await
            .unwrap();
        let record = &closed.record;
        assert_eq!(
            (record.held, record.charged, record.overage),
            (credits(1_000_000), credits(1_000_000), credits(400_001))
        );
        assert_eq!(
            (
                record.user.as_str(),
                record.session_id.as_str(),
                record.model.as_str()
            ),
            ("ivan", "session-of-ivan", "simulated-fallback")
        );
        assert_eq!(
            (record.input_tokens, record.output_tokens, record.estimated),
            (120, 80, false)
        );
        assert_eq!(closed.balance.balance, credits(4_000_000));
    }

    pub async fn holding_again_reprices_and_growth_needs_the_difference(ledger: Arc<dyn Ledger>) {
        ledger
            .hold(hold_request("r1", "jade", credits(2_000_000)))
            .await
            .unwrap();
        ledger
            .hold(hold_request("r2", "jade", credits(2_000_000)))
            .await
            .unwrap();
        let mut fallback = hold_request("r1", "jade", credits(2_500_000));
        fallback.model = "simulated-fallback".to_owned();
        let grown = ledger.hold(fallback).await.unwrap();
        assert_eq!(
            (grown.amount, grown.model.as_str()),
            (credits(2_500_000), "simulated-fallback")
        );
        let too_much = ledger
            .hold(hold_request("r1", "jade", credits(3_500_001)))
            .await;
        match too_much {
            Err(LedgerError::InsufficientCredits {
                balance,
                available,
                required,
            }) => {
                assert_eq!(
                    (balance, available, required),
                    (INITIAL, credits(500_000), credits(1_000_001))
                );
            }
            other => panic!("expected InsufficientCredits, got {other:?}"),
        }
        let shrunk = ledger
            .hold(hold_request("r1", "jade", credits(1_000_000)))
            .await
            .unwrap();
        assert_eq!(shrunk.amount, credits(1_000_000));
        assert_eq!(
            ledger.balance("jade").await.unwrap().held,
            credits(3_000_000)
        );
        let closed = ledger
            .settle("r1", settlement(credits(1_200_000)))
            .await
            .unwrap();
        assert_eq!(
            (closed.record.held, closed.record.charged),
            (credits(1_000_000), credits(1_000_000))
        );
    }

    pub async fn holding_again_moves_the_lease_past_the_reaper(ledger: Arc<dyn Ledger>) {
        let mut request = hold_request("r1", "kira", credits(1_000_000));
        request.lease = Duration::from_secs(1);
        let hold = ledger.hold(request.clone()).await.unwrap();
        request.lease = Duration::from_secs(3_600);
        let renewed = ledger.hold(request.clone()).await.unwrap();
        assert!(renewed.lease_expires_at > hold.lease_expires_at);
        // Past the first lease, before the renewed one: nothing to reap.
        let report = ledger
            .reap(hold.lease_expires_at + chrono::Duration::seconds(60))
            .await
            .unwrap();
        assert!(report.settled.is_empty() && report.released_without_usage.is_empty());
        assert_eq!(
            ledger.balance("kira").await.unwrap().held,
            credits(1_000_000)
        );
        let report = ledger.reap(renewed.lease_expires_at).await.unwrap();
        assert_eq!(report.released_without_usage.len(), 1);
        let late = ledger.hold(request).await;
        assert!(
            matches!(late, Err(LedgerError::HoldClosed { .. })),
            "{late:?}"
        );
    }

    pub async fn holding_again_records_progress_that_only_grows(ledger: Arc<dyn Ledger>) {
        let mut request = hold_request("r1", "lena", credits(2_000_000));
        request.progress = Some(progress(0, credits(100_000)));
        let opened = ledger.hold(request.clone()).await.unwrap();
        assert_eq!(opened.progress, request.progress);
        request.progress = Some(progress(30, credits(250_000)));
        ledger.hold(request.clone()).await.unwrap();
        // A late retry of an earlier refresh does not take output back.
        request.progress = Some(progress(10, credits(150_000)));
        let kept = ledger.hold(request.clone()).await.unwrap();
        assert_eq!(kept.progress, Some(progress(30, credits(250_000))));
        // Held again without news: the recorded progress stays.
        request.progress = None;
        let unchanged = ledger.hold(request).await.unwrap();
        assert_eq!(unchanged.progress, Some(progress(30, credits(250_000))));
        assert_eq!(
            ledger.balance("lena").await.unwrap().held,
            credits(2_000_000)
        );
    }

    pub async fn settle_prices_from_the_open_hold(ledger: Arc<dyn Ledger>) {
        let mut request = hold_request("r1", "milo", credits(2_000_000));
        request.route = "tutor".to_owned();
        request.progress = Some(progress(12, credits(50_000)));
        ledger.hold(request).await.unwrap();
        let closed = ledger
            .settle(
                "r1",
                Box::new(|hold| {
                    let recorded = hold.progress.clone().unwrap();
                    Ok(Settlement {
                        route: hold.route.clone(),
                        model: recorded.model,
                        input_tokens: recorded.input_tokens,
                        output_tokens: 20,
                        cost: credits(hold.amount.micros() / 4),
                        outcome: parley_service::ledger::ReplyOutcome::Completed,
                        estimated: true,
                    })
                }),
            )
            .await
            .unwrap();
        let record = &closed.record;
        assert_eq!(
            (
                record.route.as_str(),
                record.model.as_str(),
                record.input_tokens
            ),
            ("tutor", "simulated", 100)
        );
        assert_eq!((record.charged, record.estimated), (credits(500_000), true));
        // Once closed, the price is not worked out again.
        let replayed = ledger
            .settle("r1", Box::new(|_| panic!("priced a closed hold")))
            .await
            .unwrap();
        assert!(replayed.replayed);
        // A refusal to price leaves the hold open.
        ledger
            .hold(hold_request("r2", "milo", credits(1_000_000)))
            .await
            .unwrap();
        let refused = ledger
            .settle("r2", Box::new(|_| Err(LedgerError::AmountOutOfRange)))
            .await;
        assert!(
            matches!(refused, Err(LedgerError::AmountOutOfRange)),
            "{refused:?}"
        );
        assert_eq!(
            ledger.balance("milo").await.unwrap().held,
            credits(1_000_000)
        );
    }

    pub async fn reaper_settles_from_recorded_progress_once(ledger: Arc<dyn Ledger>) {
        let mut request = hold_request("r1", "liam", credits(2_000_000));
        ledger.hold(request.clone()).await.unwrap();
        request.progress = Some(progress(40, credits(321_000)));
        ledger.hold(request).await.unwrap();
        let later = Utc::now() + chrono::Duration::hours(1);
        let report = ledger.reap(later).await.unwrap();
        assert_eq!(report.settled.len(), 1);
        assert!(report.released_without_usage.is_empty());
        let record = &report.settled[0];
        assert_eq!(
            (record.outcome, record.estimated, record.charged),
            (UsageOutcome::Reaped, true, credits(321_000))
        );
        assert_eq!((record.input_tokens, record.output_tokens), (100, 40));
        assert_eq!(ledger.reap(later).await.unwrap(), Default::default());
        // The replica comes back and settles: the reaped outcome stands.
        let late = ledger
            .settle("r1", settlement(credits(900_000)))
            .await
            .unwrap();
        assert!(late.replayed);
        assert_eq!(&late.record, record);
        let balance = ledger.balance("liam").await.unwrap();
        assert_eq!(
            (balance.balance, balance.held),
            (credits(4_679_000), Credits::ZERO)
        );
    }

    pub async fn reaper_releases_and_reports_holds_without_usage(ledger: Arc<dyn Ledger>) {
        ledger
            .hold(hold_request("r1", "mona", credits(2_000_000)))
            .await
            .unwrap();
        let mut live = hold_request("live", "mona", credits(1_000_000));
        live.lease = Duration::from_secs(7_200);
        ledger.hold(live).await.unwrap();
        let report = ledger
            .reap(Utc::now() + chrono::Duration::hours(1))
            .await
            .unwrap();
        assert!(report.settled.is_empty());
        assert_eq!(report.released_without_usage.len(), 1);
        let record = &report.released_without_usage[0];
        assert_eq!(
            (record.request_id.as_str(), record.outcome, record.charged),
            ("r1", UsageOutcome::Expired, Credits::ZERO)
        );
        let balance = ledger.balance("mona").await.unwrap();
        assert_eq!(
            (balance.balance, balance.held),
            (INITIAL, credits(1_000_000))
        );
    }

    pub async fn concurrent_reapers_close_each_hold_once(ledger: Arc<dyn Ledger>) {
        const HOLDS: u64 = 20;
        for i in 0..HOLDS {
            let request_id = format!("r{i}");
            let user = format!("user{}", i % 3);
            let mut request = hold_request(&request_id, &user, credits(200_000));
            if i % 2 == 0 {
                request.progress = Some(progress(i, credits(1_000 * (i + 1))));
            }
            ledger.hold(request).await.unwrap();
        }
        let later = Utc::now() + chrono::Duration::hours(1);
        let reapers = (0..4).map(|_| {
            let ledger = Arc::clone(&ledger);
            tokio::spawn(async move { ledger.reap(later).await })
        });
        let reports: Vec<_> = join_all(reapers)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        let settled: Vec<_> = reports.iter().flat_map(|r| &r.settled).collect();
        let released: Vec<_> = reports
            .iter()
            .flat_map(|r| &r.released_without_usage)
            .collect();
        assert_eq!(
            (settled.len(), released.len()),
            (HOLDS as usize / 2, HOLDS as usize / 2)
        );
        let ids: HashSet<_> = settled
            .iter()
            .chain(&released)
            .map(|r| r.request_id.as_str())
            .collect();
        assert_eq!(ids.len(), HOLDS as usize);
        for user in ["user0", "user1", "user2"] {
            let balance = ledger.balance(user).await.unwrap();
            let charged: u64 = settled
                .iter()
                .filter(|r| r.user == user)
                .map(|r| r.charged.micros())
                .sum();
            assert_eq!(balance.held, Credits::ZERO);
            assert_eq!(
                balance.balance,
                INITIAL.checked_sub(credits(charged)).unwrap()
            );
            let records = all_usage(ledger.as_ref(), user).await;
            assert_eq!(
                records.iter().map(|r| r.charged.micros()).sum::<u64>(),
                charged
            );
        }
    }

    pub async fn insufficient_credits_error_carries_the_amounts(ledger: Arc<dyn Ledger>) {
        ledger
            .hold(hold_request("r1", "nora", credits(3_000_000)))
            .await
            .unwrap();
        let refused = ledger
            .hold(hold_request("r2", "nora", credits(2_000_001)))
            .await;
        match refused {
            Err(LedgerError::InsufficientCredits {
                balance,
                available,
                required,
            }) => {
                assert_eq!(
                    (balance, available, required),
                    (INITIAL, credits(2_000_000), credits(2_000_001))
                );
            }
            other => panic!("expected InsufficientCredits, got {other:?}"),
        }
        // The refused request left nothing behind.
        assert_eq!(
            ledger.balance("nora").await.unwrap().held,
            credits(3_000_000)
        );
        let exact = ledger
            .hold(hold_request("r3", "nora", credits(2_000_000)))
            .await
            .unwrap();
        assert_eq!(exact.amount, credits(2_000_000));
        assert_eq!(
            ledger.balance("nora").await.unwrap().available,
            Credits::ZERO
        );
    }

    pub async fn operations_on_unknown_holds_fail(ledger: Arc<dyn Ledger>) {
        fn not_found<T>(result: Result<T, LedgerError>) -> bool {
            matches!(result, Err(LedgerError::HoldNotFound { .. }))
        }
        assert!(not_found(
            ledger.settle("nope", settlement(credits(1))).await
        ));
        assert!(not_found(ledger.release("nope").await));
        let empty = ledger.hold(hold_request("", "olga", credits(1))).await;
        assert!(
            matches!(empty, Err(LedgerError::InvalidRequest(_))),
            "{empty:?}"
        );
        let bad_page = ledger.usage("olga", Page { number: 0, size: 0 }).await;
        assert!(
            matches!(bad_page, Err(LedgerError::InvalidRequest(_))),
            "{bad_page:?}"
        );
    }

    pub async fn usage_pages_newest_first(ledger: Arc<dyn Ledger>) {
        for i in 0..5 {
            let request_id = format!("r{i}");
            ledger
                .hold(hold_request(&request_id, "pia", credits(100_000)))
                .await
                .unwrap();
            ledger
                .settle(&request_id, settlement(credits(10_000)))
                .await
                .unwrap();
        }
        let mut pages = Vec::new();
        for number in 0..4 {
            pages.push(ledger.usage("pia", Page { number, size: 2 }).await.unwrap());
        }
        assert_eq!(
            pages.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![2, 2, 1, 0]
        );
        let all: Vec<_> = pages.iter().flatten().collect();
        assert!(all.windows(2).all(|w| w[0].settled_at >= w[1].settled_at));
        let ids: HashSet<_> = all.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(ids.len(), 5);
        assert!(all_usage(ledger.as_ref(), "someone-else").await.is_empty());
    }
}

#[test]
fn route_prices_convert_to_ledger_amounts_exactly() {
    use parley_crds::{Credits as Price, Pricing};
    let pricing = Pricing {
        input_per_1k: Price::parse_decimal("1").unwrap(),
        output_per_1k: Price::parse_decimal("4").unwrap(),
    };
    assert_eq!(
        price(&pricing, 1_000, 1_000).unwrap(),
        Credits::from_micros(5_000_000)
    );
    assert_eq!(price(&pricing, 1, 0).unwrap(), Credits::from_micros(1_000));
    assert_eq!(
        price(&pricing, 1_009, 1_024).unwrap(),
        Credits::from_micros(5_105_000)
    );
    let huge = Pricing {
        input_per_1k: Price::from_micros(i64::MAX),
        output_per_1k: Price::from_micros(i64::MAX),
    };
    assert!(matches!(
        price(&huge, u64::MAX, u64::MAX),
        Err(LedgerError::AmountOutOfRange)
    ));
    // Validation refuses such routes; the ledger refuses them too.
    let negative = Pricing {
        input_per_1k: Price::from_micros(-1),
        output_per_1k: Price::ZERO,
    };
    assert!(price(&negative, 1_000, 0).is_err());
    let too_fine = Pricing {
        input_per_1k: Price::parse_decimal("0.0000001").unwrap(),
        output_per_1k: Price::ZERO,
    };
    assert!(Credits::try_from(too_fine.input_per_1k).is_err());
}

#[test]
fn decimal_credits_parse_exactly_or_not_at_all() {
    assert_eq!(
        Credits::parse_decimal("0.25").unwrap(),
        Credits::from_micros(250_000)
    );
    assert_eq!(
        Credits::parse_decimal("2.000001").unwrap(),
        Credits::from_micros(2_000_001)
    );
    assert_eq!(
        Credits::parse_decimal("3.10").unwrap(),
        Credits::from_micros(3_100_000)
    );
    assert_eq!(
        Credits::from_credits_f64(0.1).unwrap(),
        Credits::from_micros(100_000)
    );
    assert_eq!(
        Credits::from_credits_f64(4.0).unwrap(),
        Credits::from_micros(4_000_000)
    );
    for bad in [
        "",
        "-1",
        "1.0000001",
        "1e3",
        "abc",
        ".5",
        "1.2.3",
        "99999999999999999999",
    ] {
        assert!(Credits::parse_decimal(bad).is_err(), "{bad:?} parsed");
    }
    // Past a billion credits a double no longer carries every µcredit.
    for bad in [
        -0.5,
        f64::NAN,
        f64::INFINITY,
        1e-7,
        9_719_925_474.993_1,
        1e9 + 1.0,
    ] {
        assert!(Credits::from_credits_f64(bad).is_err(), "{bad} converted");
    }
    assert_eq!(
        Credits::from_credits_f64(999_999_999.999_999).unwrap(),
        Credits::from_micros(999_999_999_999_999)
    );
    assert_eq!(Credits::from_micros(1_500_000).to_string(), "1.5");
    assert_eq!(Credits::from_micros(1).to_string(), "0.000001");
    assert_eq!(Credits::from_micros(3_000_000).to_string(), "3");
}

#[tokio::test]
async fn embedded_ledger_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("parley.redb");
    {
        let db = Arc::new(EmbeddedDb::open(&path, DEFAULT_CACHE_BYTES).await.unwrap());
        let ledger = EmbeddedLedger::new(db, SETTINGS).await.unwrap();
        ledger
            .grant("quinn", Credits::from_micros(1_000_000))
            .await
            .unwrap();
        ledger
            .hold(hold_request("r1", "quinn", Credits::from_micros(2_000_000)))
            .await
            .unwrap();
    }
    let db = Arc::new(EmbeddedDb::open(&path, DEFAULT_CACHE_BYTES).await.unwrap());
    let ledger = EmbeddedLedger::new(db, SETTINGS).await.unwrap();
    let balance = ledger.balance("quinn").await.unwrap();
    assert_eq!(
        (balance.balance, balance.held),
        (
            Credits::from_micros(6_000_000),
            Credits::from_micros(2_000_000)
        )
    );
    assert!(!ledger.release("r1").await.unwrap().replayed);
}

/// A MongoDB that cannot be reached: every operation is an error, none
/// "defaults to allow".
#[tokio::test]
async fn unreachable_mongodb_fails_every_operation() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri =
        format!("mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=200&connectTimeoutMS=200");
    let client = mongodb::Client::with_uri_str(uri).await.unwrap();
    let ledger = MongoLedger::new(&client.database("parley"), SETTINGS);
    fn store_error<T: std::fmt::Debug>(result: Result<T, LedgerError>) -> bool {
        matches!(result, Err(LedgerError::Mongo(_)))
    }
    assert!(store_error(ledger.create_indexes().await));
    assert!(store_error(
        ledger
            .hold(hold_request("r1", "rex", Credits::from_micros(1)))
            .await
    ));
    assert!(store_error(
        ledger
            .settle("r1", settlement(Credits::from_micros(1)))
            .await
    ));
    assert!(store_error(ledger.release("r1").await));
    assert!(store_error(ledger.balance("rex").await));
    assert!(store_error(
        ledger.grant("rex", Credits::from_micros(1)).await
    ));
    assert!(store_error(
        ledger
            .usage(
                "rex",
                Page {
                    number: 0,
                    size: 10
                }
            )
            .await
    ));
    assert!(store_error(ledger.reap(chrono::Utc::now()).await));
    client.shutdown().await;
}
