//! The ledger's behaviour: pots, renewal, admin operations, rows, holds and the sweeper.
//! Written against `dyn Ledger` so another backend can run the same checks.

mod common;

use std::sync::Arc;
use std::time::Duration;

use tollgate_core::time::{ms_from_rfc3339, rfc3339_from_ms};
use tollgate_core::{ManualClock, OrgId, Plan, RequestId};
use tollgate_credit_meter::{
    run_ledger_jobs, EntryKind, Hold, HoldOutcome, Ledger, MemoryLedger, DEFAULT_HOLD_TTL,
    MAX_CREDITS,
};

use common::{replay, T0};

fn memory() -> (ManualClock, Arc<dyn Ledger>) {
    let clock = ManualClock::new(T0);
    (clock.clone(), Arc::new(MemoryLedger::new(clock)))
}

async fn held(ledger: &dyn Ledger, org: OrgId, amount: u64, id: &str) -> Hold {
    match ledger
        .hold(org, amount, RequestId::parse(id))
        .await
        .unwrap()
    {
        HoldOutcome::Held(h) => h,
        other => panic!("expected a hold, got {other:?}"),
    }
}

async fn pots(ledger: &dyn Ledger, org: OrgId) -> (u64, u64, u64) {
    let a = ledger.account(org).await.unwrap().unwrap();
    (a.plan_credits, a.topup_credits, a.held)
}

#[tokio::test]
async fn subscribing_starts_a_period_with_the_plans_credits() {
    let (_clock, ledger) = memory();
    let org = OrgId::new();
    let a = ledger.subscribe(org, Plan::Pro).await.unwrap();
    assert_eq!(a.org, org);
    assert_eq!(a.plan, Some(Plan::Pro));
    assert_eq!((a.plan_credits, a.topup_credits, a.held), (5_000, 0, 0));
    assert_eq!(a.balance(), Some(5_000));
    assert_eq!(a.period_start_ms, T0);
    assert_eq!(rfc3339_from_ms(a.period_end_ms), "2023-02-28T07:35:02.748Z");
    let rows = ledger.entries(org).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].kind, EntryKind::PlanChange);
    assert_eq!(
        (
            rows[0].delta_plan,
            rows[0].delta_topup,
            rows[0].balance_after
        ),
        (5_000, 0, 5_000)
    );
    assert_eq!(rows[0].at_ms, T0);
}

#[tokio::test]
async fn changing_plan_starts_a_new_period_and_keeps_top_ups() {
    let (clock, ledger) = memory();
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Basic).await.unwrap();
    ledger.top_up(org, 30).await.unwrap().unwrap();
    let h = held(&*ledger, org, 100, "r").await;
    ledger.commit(h).await.unwrap();
    clock.advance(Duration::from_secs(86_400 * 10));
    let a = ledger.subscribe(org, Plan::Free).await.unwrap();
    assert_eq!((a.plan_credits, a.topup_credits), (100, 30));
    assert_eq!(a.period_start_ms, T0 + 86_400_000 * 10);
    assert_eq!(rfc3339_from_ms(a.period_end_ms), "2023-03-10T07:35:02.748Z");
    let last = ledger.entries(org).await.unwrap().pop().unwrap();
    assert_eq!(last.kind, EntryKind::PlanChange);
    assert_eq!((last.delta_plan, last.balance_after), (100 - 900, 130));
}

#[tokio::test]
async fn cancelling_drops_plan_credits_keeps_top_ups_and_refuses_holds() {
    let (_clock, ledger) = memory();
    let org = OrgId::new();
    assert!(!ledger.cancel(org).await.unwrap(), "unknown org");
    ledger.subscribe(org, Plan::Basic).await.unwrap();
    ledger.top_up(org, 25).await.unwrap().unwrap();
    assert!(ledger.cancel(org).await.unwrap());
    assert!(!ledger.cancel(org).await.unwrap(), "already cancelled");
    let a = ledger.account(org).await.unwrap().unwrap();
    assert_eq!(a.plan, None);
    assert_eq!(
        (a.plan_credits, a.topup_credits, a.balance()),
        (0, 25, Some(25))
    );
    assert_eq!(
        ledger.hold(org, 1, None).await.unwrap(),
        HoldOutcome::NoSubscription
    );
    let last = ledger.entries(org).await.unwrap().pop().unwrap();
    assert_eq!(last.kind, EntryKind::Cancel);
    assert_eq!(
        (last.delta_plan, last.delta_topup, last.balance_after),
        (-1_000, 0, 25)
    );

    // Subscribing again works and the top-ups are still there.
    let a = ledger.subscribe(org, Plan::Free).await.unwrap();
    assert_eq!(a.balance(), Some(125));
}

#[tokio::test]
async fn unknown_orgs() {
    let (_clock, ledger) = memory();
    let org = OrgId::new();
    assert_eq!(
        ledger.hold(org, 1, None).await.unwrap(),
        HoldOutcome::NoSubscription
    );
    assert_eq!(ledger.top_up(org, 5).await.unwrap(), None);
    assert_eq!(ledger.set_balance(org, 5).await.unwrap(), None);
    assert_eq!(ledger.account(org).await.unwrap(), None);
    assert!(ledger.entries(org).await.unwrap().is_empty());
    // A hold of an org the ledger never saw cannot be committed.
    let fake = Hold {
        id: tollgate_credit_meter::HoldId(77),
        org,
        amount: 1,
    };
    assert!(ledger.commit(fake.clone()).await.is_err());
    ledger.release(fake).await.unwrap();
}

#[tokio::test]
async fn top_ups_and_adjustments() {
    let (_clock, ledger) = memory();
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    let a = ledger.top_up(org, 40).await.unwrap().unwrap();
    assert_eq!(
        (a.plan_credits, a.topup_credits, a.balance()),
        (100, 40, Some(140))
    );
    let a = ledger.set_balance(org, 7).await.unwrap().unwrap();
    assert_eq!(
        (a.plan_credits, a.topup_credits, a.balance()),
        (7, 0, Some(7))
    );
    let rows = ledger.entries(org).await.unwrap();
    let kinds: Vec<_> = rows
        .iter()
        .map(|e| (e.kind, e.delta_plan, e.delta_topup, e.balance_after))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (EntryKind::PlanChange, 100, 0, 100),
            (EntryKind::TopUp, 0, 40, 140),
            (EntryKind::Adjustment, -93, -40, 7),
        ]
    );
    // Amounts past the range a ledger row can carry are refused and change nothing.
    assert!(ledger.top_up(org, MAX_CREDITS).await.is_err());
    assert!(ledger.set_balance(org, MAX_CREDITS + 1).await.is_err());
    assert_eq!(pots(&*ledger, org).await, (7, 0, 0));
    let a = ledger.set_balance(org, MAX_CREDITS).await.unwrap().unwrap();
    assert_eq!(a.balance(), Some(MAX_CREDITS));
    replay(&ledger.entries(org).await.unwrap());
}

#[tokio::test]
async fn holds_count_against_the_available_balance() {
    let (_clock, ledger) = memory();
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    ledger.set_balance(org, 5).await.unwrap();
    let a = held(&*ledger, org, 3, "a").await;
    assert_eq!(
        ledger.hold(org, 3, None).await.unwrap(),
        HoldOutcome::Insufficient { available: 2 }
    );
    let b = held(&*ledger, org, 2, "b").await;
    assert_ne!(a.id, b.id);
    assert_eq!(ledger.open_holds(), 2);
    assert_eq!(pots(&*ledger, org).await, (5, 0, 5));
    ledger.release(a).await.unwrap();
    assert_eq!(ledger.commit(b).await.unwrap(), Some(3));
    assert_eq!(pots(&*ledger, org).await, (3, 0, 0));
    assert_eq!(ledger.open_holds(), 0);
}

#[tokio::test]
async fn a_hold_is_settled_once() {
    let (_clock, ledger) = memory();
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    let h = held(&*ledger, org, 4, "once").await;
    assert_eq!(ledger.commit(h.clone()).await.unwrap(), Some(96));
    assert!(ledger.commit(h.clone()).await.is_err(), "second commit");
    ledger.release(h.clone()).await.unwrap();
    ledger.release_detached(h);
    assert_eq!(pots(&*ledger, org).await, (96, 0, 0));
    let charges = ledger
        .entries(org)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EntryKind::Charge)
        .count();
    assert_eq!(charges, 1);

    let r = held(&*ledger, org, 4, "released").await;
    ledger.release(r.clone()).await.unwrap();
    assert!(ledger.commit(r).await.is_err(), "commit after release");
    assert_eq!(pots(&*ledger, org).await, (96, 0, 0));
}

#[tokio::test]
async fn renewal_resets_plan_credits_and_keeps_top_ups() {
    let (clock, ledger) = memory();
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Basic).await.unwrap();
    ledger.top_up(org, 20).await.unwrap();
    let h = held(&*ledger, org, 300, "x").await;
    ledger.commit(h).await.unwrap();
    assert_eq!(pots(&*ledger, org).await, (700, 20, 0));

    clock.set(ms_from_rfc3339("2023-02-28T07:35:02.747Z").unwrap());
    assert_eq!(ledger.renew_due().await.unwrap(), 0);
    clock.set(ms_from_rfc3339("2023-02-28T07:35:02.748Z").unwrap());
    // The periodic job renews without any request.
    assert_eq!(ledger.renew_due().await.unwrap(), 1);
    assert_eq!(ledger.renew_due().await.unwrap(), 0, "renewed once");
    let rows = ledger.entries(org).await.unwrap();
    let last = rows.last().unwrap();
    assert_eq!(last.kind, EntryKind::Renewal);
    assert_eq!((last.delta_plan, last.balance_after), (300, 1_020));
    assert_eq!(pots(&*ledger, org).await, (1_000, 20, 0));
    let a = ledger.account(org).await.unwrap().unwrap();
    assert_eq!(
        rfc3339_from_ms(a.period_start_ms),
        "2023-02-28T07:35:02.748Z"
    );
    assert_eq!(rfc3339_from_ms(a.period_end_ms), "2023-03-28T07:35:02.748Z");
    // Unused plan credits do not roll over, even when more than the plan gives.
    ledger.set_balance(org, 5_000).await.unwrap();
    clock.set(a.period_end_ms);
    assert_eq!(ledger.renew_due().await.unwrap(), 1);
    assert_eq!(pots(&*ledger, org).await, (1_000, 0, 0));
    replay(&ledger.entries(org).await.unwrap());
}

#[tokio::test]
async fn renew_due_counts_accounts_and_skips_cancelled_ones() {
    let (clock, ledger) = memory();
    let a = OrgId::new();
    let b = OrgId::new();
    let c = OrgId::new();
    for org in [a, b, c] {
        ledger.subscribe(org, Plan::Free).await.unwrap();
    }
    ledger.cancel(c).await.unwrap();
    clock.advance(Duration::from_secs(86_400 * 62));
    assert_eq!(ledger.renew_due().await.unwrap(), 2);
    for org in [a, b] {
        let renewals = ledger
            .entries(org)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.kind == EntryKind::Renewal)
            .count();
        assert_eq!(renewals, 2, "Feb 28 and Mar 28");
    }
    assert!(ledger
        .entries(c)
        .await
        .unwrap()
        .iter()
        .all(|e| e.kind != EntryKind::Renewal));
}

#[tokio::test]
async fn unlimited_plans_hold_nothing() {
    let (clock, ledger) = memory();
    let org = OrgId::new();
    let a = ledger.subscribe(org, Plan::Enterprise).await.unwrap();
    assert_eq!((a.balance(), a.plan_credits), (None, 0));
    for _ in 0..3 {
        assert_eq!(
            ledger.hold(org, 1_000_000, None).await.unwrap(),
            HoldOutcome::Unlimited
        );
    }
    assert_eq!(ledger.open_holds(), 0);
    clock.advance(Duration::from_secs(86_400 * 40));
    assert_eq!(ledger.renew_due().await.unwrap(), 1);
    let a = ledger.account(org).await.unwrap().unwrap();
    assert_eq!(a.balance(), None);
    assert_eq!(a.credits_view().balance, None);
}

#[tokio::test]
async fn a_hold_open_across_a_downgrade_never_goes_negative() {
    let (_clock, ledger) = memory();
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    let h = held(&*ledger, org, 80, "big").await;
    ledger.set_balance(org, 30).await.unwrap();
    // Support lowered the balance under the open hold: the commit takes what is left.
    assert_eq!(ledger.commit(h).await.unwrap(), Some(0));
    let rows = ledger.entries(org).await.unwrap();
    let last = rows.last().unwrap();
    assert_eq!(
        (last.kind, last.delta_plan, last.balance_after),
        (EntryKind::Charge, -30, 0)
    );
    assert_eq!(replay(&rows), (0, 0));

    // A hold open while the org moves to an unlimited plan is not charged.
    ledger.subscribe(org, Plan::Free).await.unwrap();
    let h = held(&*ledger, org, 10, "up").await;
    ledger.subscribe(org, Plan::Enterprise).await.unwrap();
    assert_eq!(ledger.commit(h).await.unwrap(), None);
    assert_eq!(ledger.open_holds(), 0);
}

#[tokio::test]
async fn every_change_has_a_row_that_replays() {
    let (clock, ledger) = memory();
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Basic).await.unwrap();
    ledger.top_up(org, 15).await.unwrap();
    for i in 0..5u64 {
        let h = held(&*ledger, org, 1 + i % 2, &format!("r{i}")).await;
        if i == 3 {
            ledger.release(h).await.unwrap();
        } else {
            ledger.commit(h).await.unwrap();
        }
    }
    clock.advance(Duration::from_secs(86_400 * 29));
    let h = held(&*ledger, org, 2, "after-renewal").await;
    ledger.commit(h).await.unwrap();
    ledger.set_balance(org, 12).await.unwrap();
    ledger.top_up(org, 3).await.unwrap();
    ledger.subscribe(org, Plan::Pro).await.unwrap();
    ledger.cancel(org).await.unwrap();

    let rows = ledger.entries(org).await.unwrap();
    let kinds: Vec<_> = rows.iter().map(|e| e.kind).collect();
    use EntryKind::*;
    assert_eq!(
        kinds,
        vec![
            PlanChange, TopUp, Charge, Charge, Charge, Charge, Renewal, Charge, Adjustment, TopUp,
            PlanChange, Cancel
        ]
    );
    let ids: Vec<_> = rows
        .iter()
        .filter_map(|e| e.request_id.as_deref())
        .collect();
    assert_eq!(ids, vec!["r0", "r1", "r2", "r4", "after-renewal"]);
    assert!(rows.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    let a = ledger.account(org).await.unwrap().unwrap();
    assert_eq!(replay(&rows), (a.plan_credits, a.topup_credits));
    assert_eq!(rows.last().unwrap().balance_after, a.balance().unwrap());
}

#[tokio::test]
async fn the_sweeper_releases_expired_holds() {
    let clock = ManualClock::new(T0);
    let ledger = Arc::new(MemoryLedger::new(clock.clone()).with_hold_ttl(Duration::from_secs(60)));
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    ledger.set_balance(org, 10).await.unwrap();
    let old = held(&*ledger, org, 6, "stuck").await;
    clock.advance(Duration::from_secs(30));
    let young = held(&*ledger, org, 3, "young").await;
    assert_eq!(ledger.sweep_expired_holds().await.unwrap(), 0);
    clock.advance(Duration::from_secs(30));
    assert_eq!(ledger.sweep_expired_holds().await.unwrap(), 1);
    assert_eq!(ledger.open_holds(), 1);
    assert_eq!(pots(&*ledger, org).await, (10, 0, 3));
    assert_eq!(ledger.sweep_expired_holds().await.unwrap(), 0);
    ledger.commit(young).await.unwrap();

    // The swept hold's request succeeds late: the balance still covers it, so it is
    // charged — once.
    assert_eq!(ledger.commit(old.clone()).await.unwrap(), Some(1));
    assert!(ledger.commit(old).await.is_err());
    assert_eq!(pots(&*ledger, org).await, (1, 0, 0));
    replay(&ledger.entries(org).await.unwrap());
}

#[tokio::test]
async fn a_late_commit_of_a_swept_hold_whose_credits_were_taken_charges_nothing() {
    let clock = ManualClock::new(T0);
    let ledger = Arc::new(MemoryLedger::new(clock.clone()).with_hold_ttl(Duration::from_secs(60)));
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    ledger.set_balance(org, 5).await.unwrap();
    let old = held(&*ledger, org, 5, "stuck").await;
    clock.advance(Duration::from_secs(61));
    assert_eq!(ledger.sweep_expired_holds().await.unwrap(), 1);
    // The freed credits are held by another request.
    let other = held(&*ledger, org, 4, "other").await;
    assert!(ledger.commit(old).await.is_err());
    assert_eq!(pots(&*ledger, org).await, (5, 0, 4));
    assert_eq!(ledger.commit(other).await.unwrap(), Some(1));
    replay(&ledger.entries(org).await.unwrap());
}

#[tokio::test]
async fn a_swept_hold_is_forgotten_after_another_ttl() {
    let clock = ManualClock::new(T0);
    let ledger = Arc::new(MemoryLedger::new(clock.clone()).with_hold_ttl(Duration::from_secs(60)));
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    let old = held(&*ledger, org, 5, "stuck").await;
    clock.advance(Duration::from_secs(60));
    assert_eq!(ledger.sweep_expired_holds().await.unwrap(), 1);
    clock.advance(Duration::from_secs(60));
    ledger.sweep_expired_holds().await.unwrap();
    assert!(ledger.commit(old).await.is_err());
    assert_eq!(pots(&*ledger, org).await, (100, 0, 0));
}

#[test]
fn the_default_hold_ttl_outlives_the_upstream_timeout() {
    let ledger = MemoryLedger::default();
    assert_eq!(ledger.hold_ttl(), DEFAULT_HOLD_TTL);
    assert!(DEFAULT_HOLD_TTL > Duration::from_millis(30_000));
}

#[tokio::test(start_paused = true)]
async fn the_periodic_job_renews_and_sweeps_without_requests() {
    let clock = tollgate_core::TokioClock::starting_at(T0);
    let ledger = Arc::new(MemoryLedger::new(clock).with_hold_ttl(Duration::from_secs(60)));
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    let _stuck = held(&*ledger, org, 5, "stuck").await;
    let job = tokio::spawn(run_ledger_jobs(ledger.clone(), Duration::from_secs(3_600)));

    // Ticks at 0 s (nothing expired yet) and 3600 s.
    tokio::time::sleep(Duration::from_secs(3_599)).await;
    assert_eq!(ledger.open_holds(), 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ledger.open_holds(), 0, "swept by the job");

    // `entries` does not renew by itself: a Renewal row proves the job did it.
    tokio::time::sleep(Duration::from_secs(28 * 86_400)).await;
    let renewals = ledger
        .entries(org)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EntryKind::Renewal)
        .count();
    assert_eq!(renewals, 1);
    job.abort();
}
