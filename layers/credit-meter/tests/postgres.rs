//! `PostgresLedger` on the real server (`DATABASE_URL`, default 127.0.0.1:5432), each test in
//! a fresh schema: the shared behaviour suite, restarts, two replicas racing, a crashed
//! replica's holds, an unreachable server.
#![cfg(feature = "postgres")]

mod common;
mod suite;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::OnceCell;
use tollgate_core::time::{add_one_month_ms, ms_from_rfc3339};
use tollgate_core::{BackendErrorKind, CreditReceipt, CreditSettlement, ManualClock, OrgId, Plan};
use tollgate_credit_meter::{
    CommitOutcome, CreditMeterLayer, EntryKind, HoldOutcome, Ledger, PostgresLedger,
};
use tollgate_postgres::testing::{unreachable_url, TestDb};
use tower::{service_fn, ServiceBuilder, ServiceExt};

use common::{ok_json, replay, request, status, users_me, T0};
use suite::{eventually, held, pots, Backend};

/// Ledgers over one fresh schema; each call of [`Backend::ledger`] is a new instance with
/// its own pool (a replica, or the same one after a restart).
struct Pg {
    db: TestDb,
    migrated: OnceCell<()>,
}

impl Pg {
    async fn new() -> Option<Pg> {
        Some(Pg {
            db: TestDb::new().await?,
            migrated: OnceCell::new(),
        })
    }

    async fn migrated(&self) {
        self.migrated
            .get_or_init(|| async {
                PostgresLedger::migrate(self.db.pool())
                    .await
                    .expect("migrations apply");
            })
            .await;
    }

    async fn instance(&self, clock: &ManualClock, hold_ttl: Duration) -> Arc<PostgresLedger> {
        self.migrated().await;
        let ledger = PostgresLedger::new(self.db.new_pool(), clock.clone()).with_hold_ttl(hold_ttl);
        ledger.refresh_open_holds().await.unwrap();
        Arc::new(ledger)
    }

    async fn cleanup(self) {
        self.db.cleanup().await;
    }
}

impl Backend for Pg {
    async fn ledger(&self, clock: &ManualClock, hold_ttl: Duration) -> Arc<dyn Ledger> {
        self.instance(clock, hold_ttl).await
    }
}

macro_rules! postgres_suite {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let Some(pg) = Pg::new().await else { return };
                suite::$name(&pg).await;
                pg.cleanup().await;
            }
        )*
    };
}

postgres_suite!(
    subscribing_starts_a_period_with_the_plans_credits,
    changing_plan_starts_a_new_period_and_keeps_top_ups,
    cancelling_drops_plan_credits_keeps_top_ups_and_refuses_holds,
    unknown_orgs,
    a_hold_belongs_to_its_org,
    top_ups_and_adjustments,
    a_top_up_with_a_reference_is_applied_once,
    holds_count_against_the_available_balance,
    a_hold_is_settled_once,
    a_detached_release_gives_the_credits_back,
    renewal_resets_plan_credits_and_keeps_top_ups,
    renewal_happens_on_the_request_path,
    an_idle_gap_renews_every_period_it_missed,
    renew_due_counts_accounts_and_skips_cancelled_ones,
    unlimited_plans_hold_nothing,
    a_hold_open_across_a_downgrade_never_goes_negative,
    every_change_has_a_row_that_replays,
    charges_take_plan_credits_first_then_top_ups,
    the_sweeper_releases_expired_holds,
    a_late_commit_of_a_swept_hold_whose_credits_were_taken_charges_nothing,
    a_swept_hold_is_forgotten_after_another_ttl,
    a_released_swept_hold_cannot_be_charged_later,
    the_periodic_job_renews_and_sweeps_without_requests,
    subscribing_again_to_the_same_plan_changes_nothing,
    extended_holds_are_not_swept,
    a_withheld_committed_hold_is_refunded_once,
    a_key_limit_counts_spend_and_open_holds_per_period,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_holds_charge_exactly_the_balance() {
    let Some(pg) = Pg::new().await else { return };
    suite::racing_holds_charge_exactly_the_balance(&pg).await;
    pg.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_holds_of_a_limited_key_stop_at_its_limit() {
    let Some(pg) = Pg::new().await else { return };
    suite::racing_holds_of_a_limited_key_stop_at_its_limit(&pg).await;
    pg.cleanup().await;
}

#[tokio::test]
async fn a_restarted_instance_sees_balances_holds_and_rows() {
    let Some(pg) = Pg::new().await else { return };
    let clock = ManualClock::new(T0);
    let org = OrgId::new();
    let first = pg.instance(&clock, Duration::from_secs(300)).await;
    first.subscribe(org, Plan::Basic).await.unwrap();
    first.top_up(org, 50).await.unwrap();
    let charged = held(&*first, org, 30, "before-restart").await;
    first.commit(charged).await.unwrap();
    let open = held(&*first, org, 7, "in-flight").await;
    let before = first.entries(org).await.unwrap();
    drop(first);

    let second = pg.instance(&clock, Duration::from_secs(300)).await;
    assert_eq!(pots(&*second, org).await, (970, 50, 7));
    assert_eq!(second.open_holds(), 1, "counted from the database");
    assert_eq!(second.entries(org).await.unwrap(), before);
    // The hold taken before the restart is still good, once.
    assert_eq!(
        second.commit(open.clone()).await.unwrap(),
        CommitOutcome::Charged {
            charged: 7,
            balance: Some(1_013)
        }
    );
    assert_eq!(second.commit(open).await.unwrap(), CommitOutcome::Unknown);
    let rows = second.entries(org).await.unwrap();
    let last = rows.last().unwrap();
    assert_eq!(
        (last.kind, last.request_id.as_deref()),
        (EntryKind::Charge, Some("in-flight"))
    );
    assert_eq!(replay(&rows), (963, 50));
    pg.cleanup().await;
}

/// Sends `n` concurrent cost-1 requests, alternating between the replicas; the inner service
/// fails with a 500 when `fail(i)`. Returns (delivered balances, failed, refused).
async fn race_replicas(
    replicas: &[Arc<PostgresLedger>],
    org: OrgId,
    n: usize,
    fail: fn(usize) -> bool,
) -> (Vec<u64>, usize, usize) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let ledger = Arc::clone(&replicas[i % replicas.len()]);
        tasks.push(tokio::spawn(async move {
            let svc = ServiceBuilder::new()
                .layer(CreditMeterLayer::new(ledger))
                .service(service_fn(move |_req: Request<Full<Bytes>>| async move {
                    tokio::task::yield_now().await;
                    Ok::<_, Infallible>(if fail(i) {
                        status(StatusCode::INTERNAL_SERVER_ERROR, r#"{"error":"boom"}"#)
                    } else {
                        ok_json(r#"{"ok":true}"#)
                    })
                }));
            let res = svc
                .oneshot(request(&users_me(), org, &format!("r-{i}")))
                .await
                .unwrap();
            let status = res.status();
            let receipt = res.extensions().get::<CreditReceipt>().cloned();
            res.into_body().collect().await.unwrap();
            (status, receipt.and_then(|r| r.settlement()))
        }));
    }
    let (mut balances, mut failed, mut refused) = (Vec::new(), 0, 0);
    for t in tasks {
        match t.await.unwrap() {
            (StatusCode::OK, Some(CreditSettlement::Charged { used: 1, balance })) => {
                balances.push(balance.expect("a limited plan reports its balance"))
            }
            (StatusCode::INTERNAL_SERVER_ERROR, Some(CreditSettlement::Released)) => failed += 1,
            (StatusCode::PAYMENT_REQUIRED, None) => refused += 1,
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    (balances, failed, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_racing_charge_exactly_the_balance() {
    const BALANCE: u64 = 300;
    let Some(pg) = Pg::new().await else { return };
    let clock = ManualClock::new(T0);
    let a = pg.instance(&clock, Duration::from_secs(300)).await;
    let b = pg.instance(&clock, Duration::from_secs(300)).await;
    let org = OrgId::new();
    a.subscribe(org, Plan::Basic).await.unwrap();
    b.set_balance(org, BALANCE).await.unwrap();

    let (balances, failed, refused) =
        race_replicas(&[a.clone(), b.clone()], org, 1_000, |_| false).await;
    assert_eq!(balances.len() as u64, BALANCE);
    assert_eq!((failed, refused), (0, 700));
    // Charges were serialized across both replicas: every balance from 299 down to 0 was
    // reported exactly once.
    let seen: BTreeSet<u64> = balances.into_iter().collect();
    assert_eq!(seen, (0..BALANCE).collect());

    assert_eq!(pots(&*a, org).await, (0, 0, 0));
    assert_eq!(pots(&*b, org).await, (0, 0, 0));
    let rows = a.entries(org).await.unwrap();
    let charges: Vec<_> = rows
        .iter()
        .filter(|e| e.kind == EntryKind::Charge)
        .collect();
    assert_eq!(charges.len() as u64, BALANCE);
    assert!(charges
        .iter()
        .all(|e| e.delta_plan == -1 && e.delta_topup == 0));
    let ids: BTreeSet<_> = charges
        .iter()
        .filter_map(|e| e.request_id.clone())
        .collect();
    assert_eq!(ids.len() as u64, BALANCE, "one row per charged request");
    assert_eq!(replay(&rows), (0, 0));
    assert_eq!(a.refresh_open_holds().await.unwrap(), 0);
    pg.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_charge_only_delivered_responses() {
    const BALANCE: u64 = 500;
    let Some(pg) = Pg::new().await else { return };
    let clock = ManualClock::new(T0);
    let a = pg.instance(&clock, Duration::from_secs(300)).await;
    let b = pg.instance(&clock, Duration::from_secs(300)).await;
    let org = OrgId::new();
    a.subscribe(org, Plan::Basic).await.unwrap();
    a.set_balance(org, BALANCE).await.unwrap();

    // Every third request fails upstream: its hold is released, not charged.
    let (balances, failed, refused) =
        race_replicas(&[a.clone(), b.clone()], org, 1_000, |i| i % 3 == 0).await;
    let delivered = balances.len() as u64;
    assert!(delivered > 0 && failed > 0, "{delivered} {failed}");
    assert_eq!(delivered as usize + failed + refused, 1_000);
    let (plan, topup, held) = pots(&*b, org).await;
    assert_eq!(held, 0);
    assert_eq!(BALANCE - plan - topup, delivered, "charged = delivered 2xx");
    let rows = b.entries(org).await.unwrap();
    assert_eq!(
        rows.iter().filter(|e| e.kind == EntryKind::Charge).count() as u64,
        delivered
    );
    assert_eq!(replay(&rows), (plan, topup));
    pg.cleanup().await;
}

#[tokio::test]
async fn a_crashed_replicas_holds_are_released_by_another_after_the_ttl() {
    let Some(pg) = Pg::new().await else { return };
    let clock = ManualClock::new(T0);
    let ttl = Duration::from_secs(60);
    let org = OrgId::new();
    let crashed = pg.instance(&clock, ttl).await;
    crashed.subscribe(org, Plan::Free).await.unwrap();
    crashed.set_balance(org, 50).await.unwrap();
    for i in 0..5 {
        held(&*crashed, org, 10, &format!("lost-{i}")).await;
    }
    // The process dies with its requests in flight: nothing is settled.
    drop(crashed);

    let survivor = pg.instance(&clock, ttl).await;
    assert_eq!(survivor.open_holds(), 5);
    assert_eq!(
        survivor.hold(org, 1, None).await.unwrap(),
        HoldOutcome::Insufficient { available: 0 }
    );
    clock.advance(Duration::from_secs(59));
    assert_eq!(survivor.sweep_expired_holds().await.unwrap(), 0);
    clock.advance(Duration::from_secs(1));
    assert_eq!(survivor.sweep_expired_holds().await.unwrap(), 5);
    assert_eq!(survivor.open_holds(), 0);
    assert_eq!(
        pots(&*survivor, org).await,
        (50, 0, 0),
        "the balance is whole"
    );
    assert!(survivor
        .entries(org)
        .await
        .unwrap()
        .iter()
        .all(|e| e.kind != EntryKind::Charge));
    let all = held(&*survivor, org, 50, "after").await;
    assert_eq!(
        survivor.commit(all).await.unwrap(),
        CommitOutcome::Charged {
            charged: 50,
            balance: Some(0)
        }
    );
    pg.cleanup().await;
}

#[tokio::test]
async fn a_full_release_queue_leaves_holds_to_the_sweeper_and_counts_them() {
    let Some(pg) = Pg::new().await else { return };
    pg.migrated().await;
    let clock = ManualClock::new(T0);
    let pool = pg.db.new_pool();
    let ledger = PostgresLedger::new(pool.clone(), clock.clone())
        .with_hold_ttl(Duration::from_secs(60))
        .with_release_queue(1);
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    let mut holds = Vec::new();
    for i in 0..5 {
        holds.push(held(&ledger, org, 10, &format!("h{i}")).await);
    }
    // Every connection busy: the releaser cannot make progress while we queue.
    let mut busy = Vec::new();
    for _ in 0..pool.status().max_size {
        busy.push(pool.get().await.unwrap());
    }
    let started = std::time::Instant::now();
    for h in holds {
        ledger.release_detached(h);
    }
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "release_detached must not wait"
    );
    let dropped = ledger.detached_releases_dropped();
    assert!((3..=4).contains(&dropped), "{dropped} left to the sweeper");
    drop(busy);

    // The queued releases go through; the dropped ones stay held until the sweeper.
    eventually("the queued releases are done", || async {
        pots(&ledger, org).await.2 == 10 * dropped
    })
    .await;
    clock.advance(Duration::from_secs(60));
    assert_eq!(ledger.sweep_expired_holds().await.unwrap() as u64, dropped);
    assert_eq!(pots(&ledger, org).await, (100, 0, 0));
    pg.cleanup().await;
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_and_charges_nothing() {
    let pool = tollgate_postgres::connect(&unreachable_url()).unwrap();
    let ledger = Arc::new(PostgresLedger::new(pool, ManualClock::new(T0)));
    let org = OrgId::new();
    let err = ledger.hold(org, 1, None).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable);
    for err in [
        ledger.account(org).await.unwrap_err(),
        ledger.subscribe(org, Plan::Free).await.unwrap_err(),
        ledger.renew_due().await.unwrap_err(),
        ledger.sweep_expired_holds().await.unwrap_err(),
    ] {
        assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
    }
    assert!(matches!(
        PostgresLedger::connect(&unreachable_url(), ManualClock::new(T0)).await,
        Err(e) if e.kind() == BackendErrorKind::Unavailable
    ));

    // Through the layer: 503 SERVICE_UNAVAILABLE, and the service is never called.
    let svc = ServiceBuilder::new()
        .layer(CreditMeterLayer::new(ledger.clone()))
        .service(service_fn(|_req: Request<Full<Bytes>>| async {
            panic!("a request was forwarded without a hold");
            #[allow(unreachable_code)]
            Ok::<_, Infallible>(ok_json("{}"))
        }));
    let res = svc
        .oneshot(request(&users_me(), org, "down"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["code"], "SERVICE_UNAVAILABLE");
    assert_eq!(ledger.open_holds(), 0);
}

#[tokio::test]
async fn replicas_starting_at_once_migrate_once() {
    let Some(pg) = Pg::new().await else { return };
    let pools: Vec<_> = (0..3).map(|_| pg.db.new_pool()).collect();
    let results = futures_util::future::join_all(pools.iter().map(PostgresLedger::migrate)).await;
    for r in results {
        r.unwrap();
    }
    // And again at the next start: nothing to do.
    PostgresLedger::migrate(&pools[0]).await.unwrap();
    let client = pg.db.pool().get().await.unwrap();
    let applied: i64 = client
        .query_one("SELECT count(*) FROM tollgate_credits_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, 6, "V1 to V6, once each");
    drop(client);
    pg.cleanup().await;
}

/// The database's month arithmetic (renewals happen there) is the Rust one.
#[tokio::test]
async fn periods_end_where_the_rust_calendar_says() {
    let Some(pg) = Pg::new().await else { return };
    pg.migrated().await;
    let mut inputs: Vec<u64> = [
        "2023-01-31T07:35:02.748Z",
        "2024-01-31T23:59:59.999Z",
        "2024-02-29T12:00:00.000Z",
        "2023-03-31T00:00:00.000Z",
        "2023-12-31T10:00:00.001Z",
        "1970-01-01T00:00:00.000Z",
        "2099-08-31T08:00:00.500Z",
        "9999-12-31T23:59:59.999Z",
    ]
    .iter()
    .map(|t| ms_from_rfc3339(t).unwrap())
    .collect();
    // Every day of a leap year and of the year before, at an odd millisecond.
    let start = ms_from_rfc3339("2023-01-01T03:04:05.678Z").unwrap();
    inputs.extend((0..731).map(|d| start + d * 86_400_000));
    // The end of chrono's calendar: no next month there.
    inputs.extend([
        8_210_266_876_799_999,
        8_210_266_876_799_999 - 86_400_000 * 20,
    ]);
    let sql_inputs: Vec<i64> = inputs.iter().map(|&ms| ms as i64).collect();
    let client = pg.db.pool().get().await.unwrap();
    let rows = client
        .query(
            "SELECT tollgate_credit_add_month(ms) FROM unnest($1::bigint[]) WITH ORDINALITY AS t(ms, i) ORDER BY i",
            &[&sql_inputs],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), inputs.len());
    for (ms, row) in inputs.iter().zip(&rows) {
        let sql: i64 = row.get(0);
        assert_eq!(sql as u64, add_one_month_ms(*ms), "one month after {ms}");
    }
    drop(client);
    pg.cleanup().await;
}

/// Group commit: concurrent holds of several orgs share batches, and one org whose account
/// row is locked elsewhere does not hold up the others — their holds are answered while the
/// row is still locked; the locked org's holds wait for it and are decided exactly once it
/// is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_org_in_a_shared_batch_does_not_stall_the_others() {
    let Some(pg) = Pg::new().await else { return };
    pg.migrated().await;
    let clock = ManualClock::new(T0);
    let ledger = Arc::new(
        PostgresLedger::new(pg.db.new_pool(), clock.clone())
            .with_batch_lock_timeout(Duration::from_millis(100)),
    );
    let (locked, free) = (OrgId::new(), OrgId::new());
    for org in [locked, free] {
        ledger.subscribe(org, Plan::Basic).await.unwrap();
        ledger.set_balance(org, 10).await.unwrap();
    }
    let mut locker = pg.db.pool().get().await.unwrap();
    let tx = locker.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM tollgate_credit_accounts WHERE org = $1 FOR UPDATE",
        &[locked.as_uuid()],
    )
    .await
    .unwrap();

    // 15 holds of each org at once (interleaved, so they share batches): 10 fit.
    let mut tasks = Vec::new();
    for i in 0..30 {
        let ledger = Arc::clone(&ledger);
        let org = if i % 2 == 0 { locked } else { free };
        tasks.push((
            org,
            tokio::spawn(async move { ledger.hold(org, 1, None).await }),
        ));
    }
    let mut locked_tasks = Vec::new();
    let mut free_held = 0;
    for (org, task) in tasks {
        if org == locked {
            locked_tasks.push(task);
            continue;
        }
        let outcome = tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .expect("the free org's holds are answered while the other row is locked")
            .unwrap()
            .unwrap();
        match outcome {
            HoldOutcome::Held(_) => free_held += 1,
            HoldOutcome::Insufficient { available: 0 } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(free_held, 10);
    assert!(locked_tasks.iter().all(|t| !t.is_finished()));

    tx.rollback().await.unwrap();
    drop(locker);
    let mut locked_held = 0;
    for task in locked_tasks {
        match tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            HoldOutcome::Held(_) => locked_held += 1,
            HoldOutcome::Insufficient { available: 0 } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(locked_held, 10);
    assert_eq!(pots(&*ledger, locked).await.2, 10);
    assert_eq!(pots(&*ledger, free).await.2, 10);
    pg.cleanup().await;
}

/// A request that goes away while its hold is in a batch (a client hanging up under load)
/// must not leave the hold to the sweeper: nobody would settle it, and its credits would be
/// unavailable for a whole TTL (5 minutes by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_whose_request_went_away_during_its_batch_is_given_back() {
    let Some(pg) = Pg::new().await else { return };
    let clock = ManualClock::new(T0);
    let ledger = pg.instance(&clock, Duration::from_secs(300)).await;
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Basic).await.unwrap();
    ledger.set_balance(org, 10).await.unwrap();

    // The org's row is locked elsewhere, so the batch carrying these holds waits for it.
    let mut locker = pg.db.pool().get().await.unwrap();
    let tx = locker.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM tollgate_credit_accounts WHERE org = $1 FOR UPDATE",
        &[org.as_uuid()],
    )
    .await
    .unwrap();
    let mut gone = Vec::new();
    for _ in 0..4 {
        let ledger = Arc::clone(&ledger);
        gone.push(tokio::spawn(async move { ledger.hold(org, 2, None).await }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for task in &gone {
        assert!(!task.is_finished(), "the batch waits for the locked row");
        task.abort();
    }
    tx.rollback().await.unwrap();
    drop(locker);

    // The holds were placed after their callers had gone, then given back.
    eventually("the abandoned holds are released", || async {
        pots(&*ledger, org).await.2 == 0
    })
    .await;
    let open: i64 = pg
        .db
        .pool()
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM tollgate_credit_holds WHERE org = $1 AND forget_at_ms IS NULL",
            &[org.as_uuid()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 0);
    eventually("the open-holds gauge is back to zero", || async {
        ledger.open_holds() == 0
    })
    .await;
    // All ten credits can be held again at once.
    let again = held(&*ledger, org, 10, "0190a0a0-0000-7000-8000-000000000001").await;
    ledger.commit(again).await.unwrap();
    assert_eq!(pots(&*ledger, org).await, (0, 0, 0));
    pg.cleanup().await;
}

/// Operators upgrade in place: holds placed by a replica of the previous release (a database
/// at V4) are committed and released after V5 lands, by that replica (whose prepared
/// statements still name the V4 functions) and by a new one, and every credit is accounted
/// for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_placed_before_the_upgrade_to_v5_settle_after_it() {
    let Some(pg) = Pg::new().await else { return };
    let clock = ManualClock::new(T0);
    PostgresLedger::migrate_to_version(pg.db.pool(), 4)
        .await
        .unwrap();
    let old = Arc::new(PostgresLedger::new(pg.db.new_pool(), clock.clone()));
    let (a, b) = (OrgId::new(), OrgId::new());
    for org in [a, b] {
        old.subscribe(org, Plan::Basic).await.unwrap();
        old.set_balance(org, 100).await.unwrap();
    }
    let a1 = held(&*old, a, 10, "0190a0a0-0000-7000-8000-0000000000a1").await;
    let a2 = held(&*old, a, 20, "0190a0a0-0000-7000-8000-0000000000a2").await;
    let b1 = held(&*old, b, 30, "0190a0a0-0000-7000-8000-0000000000b1").await;
    let b2 = held(&*old, b, 40, "0190a0a0-0000-7000-8000-0000000000b2").await;

    PostgresLedger::migrate(pg.db.pool()).await.unwrap();
    let new = pg.instance(&clock, Duration::from_secs(300)).await;
    // The old replica commits one of each org, the new one the other commit and a release.
    old.commit(a1).await.unwrap();
    new.commit(b1).await.unwrap();
    new.release(a2).await.unwrap();
    old.commit(b2).await.unwrap();
    assert_eq!(pots(&*new, a).await, (90, 0, 0));
    assert_eq!(pots(&*new, b).await, (30, 0, 0));
    // Both replicas keep placing holds that stop exactly at the balance.
    for (i, ledger) in [&old, &new].into_iter().cycle().take(12).enumerate() {
        let id = format!("0190a0a0-0000-7000-8000-{:012x}", 0xc00 + i);
        match ledger
            .hold(b, 10, tollgate_core::RequestId::parse(&id))
            .await
            .unwrap()
        {
            HoldOutcome::Held(hold) => {
                ledger.commit(hold).await.unwrap();
            }
            HoldOutcome::Insufficient { available: 0 } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(pots(&*new, b).await, (0, 0, 0));
    let charges = new
        .entries(b)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EntryKind::Charge)
        .count();
    assert_eq!(charges, 2 + 3, "b1, b2, then three holds of 10");
    pg.cleanup().await;
}
