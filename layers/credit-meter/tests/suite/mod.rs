//! The behaviour every [`Ledger`] must have, written once and run against each backend
//! (`tests/ledger.rs`: memory; `tests/postgres.rs`: PostgreSQL), so the backends cannot drift
//! apart. Each function takes a [`Backend`] that makes ledgers over one fresh store.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tollgate_core::time::{ms_from_rfc3339, rfc3339_from_ms};
use tollgate_core::{BackendErrorKind, KeyId, ManualClock, OrgId, Plan, RequestId};
use tollgate_credit_meter::{
    run_ledger_jobs, CommitOutcome, EntryKind, Hold, HoldId, HoldOutcome, KeyBudget, Ledger,
    ReleaseOutcome, MAX_CREDITS,
};

use crate::common::{replay, T0};

/// Makes ledgers over one store.
pub trait Backend: Send + Sync {
    /// A new ledger instance over the backend's store, reading time from `clock`. Calling
    /// it again gives another instance over the same store (another replica, or the same
    /// one after a restart) where the backend has one.
    fn ledger(
        &self,
        clock: &ManualClock,
        hold_ttl: Duration,
    ) -> impl Future<Output = Arc<dyn Ledger>> + Send;
}

/// A fresh ledger on a manual clock at [`T0`] with the default hold TTL.
async fn fresh(backend: &impl Backend) -> (ManualClock, Arc<dyn Ledger>) {
    let clock = ManualClock::new(T0);
    // Five minutes, the default of both ledgers.
    let ledger = backend.ledger(&clock, Duration::from_secs(300)).await;
    (clock, ledger)
}

/// A fresh ledger whose holds expire after one minute.
async fn with_short_ttl(backend: &impl Backend) -> (ManualClock, Arc<dyn Ledger>) {
    let clock = ManualClock::new(T0);
    let ledger = backend.ledger(&clock, Duration::from_secs(60)).await;
    (clock, ledger)
}

pub async fn held(ledger: &dyn Ledger, org: OrgId, amount: u64, id: &str) -> Hold {
    match ledger
        .hold(org, amount, RequestId::parse(id))
        .await
        .unwrap()
    {
        HoldOutcome::Held(h) => h,
        other => panic!("expected a hold, got {other:?}"),
    }
}

pub async fn pots(ledger: &dyn Ledger, org: OrgId) -> (u64, u64, u64) {
    let a = ledger.account(org).await.unwrap().unwrap();
    (a.plan_credits, a.topup_credits, a.held)
}

/// Polls `check` every 10 ms until it holds, for at most 5 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn subscribing_starts_a_period_with_the_plans_credits(backend: &impl Backend) {
    let (_clock, ledger) = fresh(backend).await;
    let org = OrgId::new();
    let a = ledger.subscribe(org, Plan::Pro).await.unwrap();
    assert_eq!(a.org, org);
    assert_eq!(a.plan, Some(Plan::Pro));
    assert_eq!((a.plan_credits, a.topup_credits, a.held), (5_000, 0, 0));
    assert_eq!(a.balance(), Some(5_000));
    assert_eq!(a.period_start_ms, T0);
    assert_eq!(rfc3339_from_ms(a.period_end_ms), "2023-02-28T07:35:02.748Z");
    assert_eq!(ledger.account(org).await.unwrap(), Some(a));
    let rows = ledger.entries(org).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].kind, EntryKind::PlanChange);
    assert_eq!(rows[0].org, org);
    assert_eq!(
        (
            rows[0].delta_plan,
            rows[0].delta_topup,
            rows[0].balance_after
        ),
        (5_000, 0, 5_000)
    );
    assert_eq!(rows[0].at_ms, T0);
    assert_eq!(rows[0].request_id, None);
}

pub async fn changing_plan_starts_a_new_period_and_keeps_top_ups(backend: &impl Backend) {
    let (clock, ledger) = fresh(backend).await;
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

pub async fn cancelling_drops_plan_credits_keeps_top_ups_and_refuses_holds(backend: &impl Backend) {
    let (_clock, ledger) = fresh(backend).await;
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
    assert_eq!(a.credits_view().period_end, None);
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

pub async fn unknown_orgs(backend: &impl Backend) {
    let (_clock, ledger) = fresh(backend).await;
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
        id: HoldId(77),
        org,
        amount: 1,
    };
    assert_eq!(
        ledger.commit(fake.clone()).await.unwrap(),
        CommitOutcome::Unknown
    );
    assert_eq!(ledger.release(fake).await.unwrap(), ReleaseOutcome::Gone);
    let absurd = Hold {
        id: HoldId(u64::MAX),
        org,
        amount: u64::MAX,
    };
    assert_eq!(
        ledger.commit(absurd.clone()).await.unwrap(),
        CommitOutcome::Unknown
    );
    assert_eq!(ledger.release(absurd).await.unwrap(), ReleaseOutcome::Gone);
}

pub async fn a_hold_belongs_to_its_org(backend: &impl Backend) {
    let (_clock, ledger) = fresh(backend).await;
    let (a, b) = (OrgId::new(), OrgId::new());
    ledger.subscribe(a, Plan::Free).await.unwrap();
    ledger.subscribe(b, Plan::Free).await.unwrap();
    let h = held(&*ledger, a, 10, "mine").await;
    // The same hold id presented as another org's settles nothing of either.
    let forged = Hold {
        org: b,
        ..h.clone()
    };
    assert_eq!(
        ledger.commit(forged.clone()).await.unwrap(),
        CommitOutcome::Unknown
    );
    assert_eq!(ledger.release(forged).await.unwrap(), ReleaseOutcome::Gone);
    assert_eq!(pots(&*ledger, a).await, (100, 0, 10));
    assert_eq!(pots(&*ledger, b).await, (100, 0, 0));
    assert_eq!(
        ledger.commit(h).await.unwrap(),
        CommitOutcome::Charged {
            charged: 10,
            balance: Some(90)
        }
    );
}

pub async fn top_ups_and_adjustments(backend: &impl Backend) {
    let (_clock, ledger) = fresh(backend).await;
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    let a = ledger.top_up(org, 40).await.unwrap().unwrap();
    assert_eq!(
        (a.plan_credits, a.topup_credits, a.balance()),
        (100, 40, Some(140))
    );
    // A top-up of nothing changes nothing and writes no row.
    let a = ledger.top_up(org, 0).await.unwrap().unwrap();
    assert_eq!(a.balance(), Some(140));
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
    let err = ledger.top_up(org, MAX_CREDITS).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Other);
    assert!(err.to_string().contains("out of range"), "{err}");
    assert!(ledger.top_up(org, u64::MAX).await.is_err());
    assert!(ledger.set_balance(org, MAX_CREDITS + 1).await.is_err());
    assert_eq!(pots(&*ledger, org).await, (7, 0, 0));
    assert_eq!(ledger.entries(org).await.unwrap().len(), 3);
    let a = ledger.set_balance(org, MAX_CREDITS).await.unwrap().unwrap();
    assert_eq!(a.balance(), Some(MAX_CREDITS));
    // Exactly up to the limit is fine.
    ledger.set_balance(org, MAX_CREDITS - 5).await.unwrap();
    let a = ledger.top_up(org, 5).await.unwrap().unwrap();
    assert_eq!(a.balance(), Some(MAX_CREDITS));
    assert!(ledger.top_up(org, 1).await.is_err());
    // A hold of more than any balance is simply insufficient.
    assert_eq!(
        ledger.hold(org, u64::MAX, None).await.unwrap(),
        HoldOutcome::Insufficient {
            available: MAX_CREDITS
        }
    );
    let h = held(&*ledger, org, MAX_CREDITS, "all").await;
    assert_eq!(
        ledger.commit(h).await.unwrap(),
        CommitOutcome::Charged {
            charged: MAX_CREDITS,
            balance: Some(0)
        }
    );
    replay(&ledger.entries(org).await.unwrap());
}

pub async fn holds_count_against_the_available_balance(backend: &impl Backend) {
    let (_clock, ledger) = fresh(backend).await;
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
    assert_eq!((a.org, a.amount), (org, 3));
    assert_eq!(ledger.open_holds(), 2);
    assert_eq!(pots(&*ledger, org).await, (5, 0, 5));
    // Nothing left: even a hold of nothing is refused only if something is asked for.
    assert_eq!(
        ledger.hold(org, 1, None).await.unwrap(),
        HoldOutcome::Insufficient { available: 0 }
    );
    assert_eq!(ledger.release(a).await.unwrap(), ReleaseOutcome::Released);
    assert_eq!(
        ledger.commit(b).await.unwrap(),
        CommitOutcome::Charged {
            charged: 2,
            balance: Some(3)
        }
    );
    assert_eq!(pots(&*ledger, org).await, (3, 0, 0));
    assert_eq!(ledger.open_holds(), 0);
}

pub async fn a_hold_is_settled_once(backend: &impl Backend) {
    let (_clock, ledger) = fresh(backend).await;
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    let h = held(&*ledger, org, 4, "once").await;
    assert_eq!(
        ledger.commit(h.clone()).await.unwrap(),
        CommitOutcome::Charged {
            charged: 4,
            balance: Some(96)
        }
    );
    assert_eq!(
        ledger.commit(h.clone()).await.unwrap(),
        CommitOutcome::Unknown,
        "second commit"
    );
    // After a commit whose answer was lost, the release says it was applied, and changes
    // nothing.
    assert_eq!(
        ledger.release(h.clone()).await.unwrap(),
        ReleaseOutcome::Committed { charged: 4 }
    );
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
    assert_eq!(
        ledger.release(r.clone()).await.unwrap(),
        ReleaseOutcome::Released
    );
    assert_eq!(
        ledger.commit(r).await.unwrap(),
        CommitOutcome::Unknown,
        "commit after release"
    );
    assert_eq!(pots(&*ledger, org).await, (96, 0, 0));
    assert_eq!(ledger.open_holds(), 0);
}

pub async fn a_detached_release_gives_the_credits_back(backend: &impl Backend) {
    let (_clock, ledger) = fresh(backend).await;
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    let h = held(&*ledger, org, 60, "dropped").await;
    assert_eq!(pots(&*ledger, org).await, (100, 0, 60));
    ledger.release_detached(h.clone());
    eventually("the detached release is done", || async {
        pots(&*ledger, org).await == (100, 0, 0)
    })
    .await;
    assert_eq!(ledger.open_holds(), 0);
    assert_eq!(
        ledger.commit(h).await.unwrap(),
        CommitOutcome::Unknown,
        "released holds are gone"
    );
    assert!(ledger
        .entries(org)
        .await
        .unwrap()
        .iter()
        .all(|e| e.kind != EntryKind::Charge));
}

pub async fn renewal_resets_plan_credits_and_keeps_top_ups(backend: &impl Backend) {
    let (clock, ledger) = fresh(backend).await;
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
    assert_eq!(
        last.at_ms,
        ms_from_rfc3339("2023-02-28T07:35:02.748Z").unwrap()
    );
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

pub async fn renewal_happens_on_the_request_path(backend: &impl Backend) {
    let (clock, ledger) = fresh(backend).await;
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    ledger.set_balance(org, 0).await.unwrap();
    assert_eq!(
        ledger.hold(org, 1, None).await.unwrap(),
        HoldOutcome::Insufficient { available: 0 }
    );
    clock.set(ms_from_rfc3339("2023-02-28T07:35:02.748Z").unwrap());
    // No job ran: the hold itself renews first.
    let h = held(&*ledger, org, 1, "fresh-period").await;
    assert_eq!(
        ledger.commit(h).await.unwrap(),
        CommitOutcome::Charged {
            charged: 1,
            balance: Some(99)
        }
    );
    let kinds: Vec<_> = ledger
        .entries(org)
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind)
        .collect();
    use EntryKind::*;
    assert_eq!(kinds, [PlanChange, Adjustment, Renewal, Charge]);
    assert_eq!(ledger.renew_due().await.unwrap(), 0, "already renewed");
}

pub async fn an_idle_gap_renews_every_period_it_missed(backend: &impl Backend) {
    let (clock, ledger) = fresh(backend).await;
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    let h = held(&*ledger, org, 40, "before").await;
    ledger.commit(h).await.unwrap();
    // Jan 31 + months, each from the previous end: Feb 28, Mar 28, Apr 28, May 28.
    clock.set(ms_from_rfc3339("2023-05-28T07:35:02.748Z").unwrap());
    let a = ledger.account(org).await.unwrap().unwrap();
    assert_eq!(a.plan_credits, 100);
    assert_eq!(
        rfc3339_from_ms(a.period_start_ms),
        "2023-05-28T07:35:02.748Z"
    );
    assert_eq!(rfc3339_from_ms(a.period_end_ms), "2023-06-28T07:35:02.748Z");
    let renewals: Vec<_> = ledger
        .entries(org)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EntryKind::Renewal)
        .map(|e| (rfc3339_from_ms(e.at_ms), e.delta_plan, e.balance_after))
        .collect();
    assert_eq!(
        renewals,
        [
            ("2023-02-28T07:35:02.748Z".to_owned(), 40, 100),
            ("2023-03-28T07:35:02.748Z".to_owned(), 0, 100),
            ("2023-04-28T07:35:02.748Z".to_owned(), 0, 100),
            ("2023-05-28T07:35:02.748Z".to_owned(), 0, 100),
        ]
    );
    assert_eq!(ledger.renew_due().await.unwrap(), 0);
}

pub async fn renew_due_counts_accounts_and_skips_cancelled_ones(backend: &impl Backend) {
    let (clock, ledger) = fresh(backend).await;
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

pub async fn unlimited_plans_hold_nothing(backend: &impl Backend) {
    let (clock, ledger) = fresh(backend).await;
    let org = OrgId::new();
    let a = ledger.subscribe(org, Plan::Enterprise).await.unwrap();
    assert_eq!((a.balance(), a.plan_credits), (None, 0));
    for _ in 0..3 {
        assert_eq!(
            ledger.hold(org, 1_000_000, None).await.unwrap(),
            HoldOutcome::Unlimited
        );
    }
    assert_eq!(
        ledger.hold(org, u64::MAX, None).await.unwrap(),
        HoldOutcome::Unlimited
    );
    assert_eq!(ledger.open_holds(), 0);
    clock.advance(Duration::from_secs(86_400 * 40));
    assert_eq!(ledger.renew_due().await.unwrap(), 1);
    let a = ledger.account(org).await.unwrap().unwrap();
    assert_eq!(a.balance(), None);
    assert_eq!(a.credits_view().balance, None);
    assert_eq!(a.held, 0);
}

pub async fn a_hold_open_across_a_downgrade_never_goes_negative(backend: &impl Backend) {
    let (_clock, ledger) = fresh(backend).await;
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    let h = held(&*ledger, org, 80, "big").await;
    ledger.set_balance(org, 30).await.unwrap();
    // Support lowered the balance under the open hold: the commit takes what is left, and
    // says so (the receipt, the log and the usage figures report these 30, not 80).
    assert_eq!(
        ledger.commit(h).await.unwrap(),
        CommitOutcome::Charged {
            charged: 30,
            balance: Some(0)
        }
    );
    let rows = ledger.entries(org).await.unwrap();
    let last = rows.last().unwrap();
    assert_eq!(
        (last.kind, last.delta_plan, last.balance_after),
        (EntryKind::Charge, -30, 0)
    );
    assert_eq!(replay(&rows), (0, 0));
    assert_eq!(pots(&*ledger, org).await, (0, 0, 0));

    // A hold open while the org moves to an unlimited plan is not charged.
    ledger.set_balance(org, 100).await.unwrap();
    let h = held(&*ledger, org, 10, "up").await;
    ledger.subscribe(org, Plan::Enterprise).await.unwrap();
    assert_eq!(
        ledger.commit(h).await.unwrap(),
        CommitOutcome::Charged {
            charged: 0,
            balance: None
        }
    );
    assert_eq!(ledger.open_holds(), 0);
    assert_eq!(pots(&*ledger, org).await, (0, 0, 0));
}

pub async fn every_change_has_a_row_that_replays(backend: &impl Backend) {
    let (clock, ledger) = fresh(backend).await;
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
    assert!(rows.iter().all(|e| e.org == org));
    let a = ledger.account(org).await.unwrap().unwrap();
    assert_eq!(replay(&rows), (a.plan_credits, a.topup_credits));
    assert_eq!(rows.last().unwrap().balance_after, a.balance().unwrap());
}

pub async fn charges_take_plan_credits_first_then_top_ups(backend: &impl Backend) {
    let (_clock, ledger) = fresh(backend).await;
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    ledger.set_balance(org, 3).await.unwrap();
    ledger.top_up(org, 10).await.unwrap();
    let h = held(&*ledger, org, 5, "span").await;
    assert_eq!(
        ledger.commit(h).await.unwrap(),
        CommitOutcome::Charged {
            charged: 5,
            balance: Some(8)
        }
    );
    assert_eq!(pots(&*ledger, org).await, (0, 8, 0));
    let last = ledger.entries(org).await.unwrap().pop().unwrap();
    assert_eq!(
        (
            last.kind,
            last.delta_plan,
            last.delta_topup,
            last.balance_after
        ),
        (EntryKind::Charge, -3, -2, 8)
    );
    assert_eq!(last.request_id.as_deref(), Some("span"));
}

pub async fn the_sweeper_releases_expired_holds(backend: &impl Backend) {
    let (clock, ledger) = with_short_ttl(backend).await;
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
    assert_eq!(ledger.open_holds(), 0);

    // The swept hold's request succeeds late: the balance still covers it, so it is
    // charged — once.
    assert_eq!(
        ledger.commit(old.clone()).await.unwrap(),
        CommitOutcome::Charged {
            charged: 6,
            balance: Some(1)
        }
    );
    assert_eq!(ledger.commit(old).await.unwrap(), CommitOutcome::Unknown);
    assert_eq!(pots(&*ledger, org).await, (1, 0, 0));
    assert_eq!(ledger.open_holds(), 0);
    let rows = ledger.entries(org).await.unwrap();
    let charged: Vec<_> = rows
        .iter()
        .filter(|e| e.kind == EntryKind::Charge)
        .filter_map(|e| e.request_id.as_deref())
        .collect();
    assert_eq!(charged, ["young", "stuck"]);
    replay(&rows);
}

pub async fn a_late_commit_of_a_swept_hold_whose_credits_were_taken_charges_nothing(
    backend: &impl Backend,
) {
    let (clock, ledger) = with_short_ttl(backend).await;
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    ledger.set_balance(org, 5).await.unwrap();
    let old = held(&*ledger, org, 5, "stuck").await;
    clock.advance(Duration::from_secs(61));
    assert_eq!(ledger.sweep_expired_holds().await.unwrap(), 1);
    // The freed credits are held by another request.
    let other = held(&*ledger, org, 4, "other").await;
    assert_eq!(
        ledger.commit(old.clone()).await.unwrap(),
        CommitOutcome::Expired
    );
    assert_eq!(pots(&*ledger, org).await, (5, 0, 4));
    assert_eq!(
        ledger.commit(other).await.unwrap(),
        CommitOutcome::Charged {
            charged: 4,
            balance: Some(1)
        }
    );
    // Refused once, forgotten: it can never be charged later either.
    assert_eq!(ledger.commit(old).await.unwrap(), CommitOutcome::Unknown);
    assert_eq!(pots(&*ledger, org).await, (1, 0, 0));
    replay(&ledger.entries(org).await.unwrap());
}

pub async fn a_swept_hold_is_forgotten_after_another_ttl(backend: &impl Backend) {
    let (clock, ledger) = with_short_ttl(backend).await;
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    let old = held(&*ledger, org, 5, "stuck").await;
    clock.advance(Duration::from_secs(60));
    assert_eq!(ledger.sweep_expired_holds().await.unwrap(), 1);
    clock.advance(Duration::from_secs(60));
    ledger.sweep_expired_holds().await.unwrap();
    assert_eq!(ledger.commit(old).await.unwrap(), CommitOutcome::Unknown);
    assert_eq!(pots(&*ledger, org).await, (100, 0, 0));
}

pub async fn a_released_swept_hold_cannot_be_charged_later(backend: &impl Backend) {
    let (clock, ledger) = with_short_ttl(backend).await;
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    let old = held(&*ledger, org, 5, "stuck").await;
    clock.advance(Duration::from_secs(60));
    assert_eq!(ledger.sweep_expired_holds().await.unwrap(), 1);
    assert_eq!(
        ledger.release(old.clone()).await.unwrap(),
        ReleaseOutcome::Swept
    );
    assert_eq!(ledger.commit(old).await.unwrap(), CommitOutcome::Unknown);
    assert_eq!(pots(&*ledger, org).await, (100, 0, 0));
}

/// A subscription retried (or sent twice) changes nothing: no new period, no refill.
pub async fn subscribing_again_to_the_same_plan_changes_nothing(backend: &impl Backend) {
    let (clock, ledger) = fresh(backend).await;
    let org = OrgId::new();
    let first = ledger.subscribe(org, Plan::Pro).await.unwrap();
    let h = held(&*ledger, org, 40, "spent").await;
    ledger.commit(h).await.unwrap();
    clock.advance(Duration::from_secs(86_400));
    let again = ledger.subscribe(org, Plan::Pro).await.unwrap();
    assert_eq!(again.plan_credits, 4_960, "no refill");
    assert_eq!(
        (again.period_start_ms, again.period_end_ms),
        (first.period_start_ms, first.period_end_ms),
        "no new period"
    );
    let plan_changes = ledger
        .entries(org)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == EntryKind::PlanChange)
        .count();
    assert_eq!(plan_changes, 1);
    // A real change still starts a new period; so does subscribing after a cancellation.
    let basic = ledger.subscribe(org, Plan::Basic).await.unwrap();
    assert_eq!(basic.plan_credits, 1_000);
    ledger.cancel(org).await.unwrap();
    let back = ledger.subscribe(org, Plan::Basic).await.unwrap();
    assert_eq!(back.plan, Some(Plan::Basic));
    assert_eq!(back.plan_credits, 1_000);
}

/// Extended holds outlive their TTL; the others are swept as before.
pub async fn extended_holds_are_not_swept(backend: &impl Backend) {
    let (clock, ledger) = with_short_ttl(backend).await;
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    let live = held(&*ledger, org, 5, "live").await;
    let dead = held(&*ledger, org, 3, "dead").await;
    for _ in 0..3 {
        clock.advance(Duration::from_secs(40));
        assert_eq!(ledger.extend_holds(vec![live.clone()]).await.unwrap(), 1);
        ledger.sweep_expired_holds().await.unwrap();
    }
    // 120 s later (two TTLs): the extended hold is open, the other one was swept.
    assert_eq!(pots(&*ledger, org).await, (100, 0, 5));
    assert_eq!(ledger.open_holds(), 1);
    assert_eq!(ledger.extend_holds(vec![dead.clone()]).await.unwrap(), 0);
    assert_eq!(ledger.release(dead).await.unwrap(), ReleaseOutcome::Swept);
    assert_eq!(
        ledger.commit(live.clone()).await.unwrap(),
        CommitOutcome::Charged {
            charged: 5,
            balance: Some(95)
        }
    );
    assert_eq!(ledger.extend_holds(vec![live]).await.unwrap(), 0, "settled");
    assert_eq!(ledger.extend_holds(Vec::new()).await.unwrap(), 0);
}

/// A request whose response was withheld gives its hold back with `release_detached`: a hold
/// whose commit was applied after all (its answer lost) is refunded, once.
pub async fn a_withheld_committed_hold_is_refunded_once(backend: &impl Backend) {
    let (_clock, ledger) = fresh(backend).await;
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    ledger.set_balance(org, 3).await.unwrap();
    ledger.top_up(org, 10).await.unwrap();
    let h = held(&*ledger, org, 5, "withheld").await;
    assert_eq!(
        ledger.commit(h.clone()).await.unwrap(),
        CommitOutcome::Charged {
            charged: 5,
            balance: Some(8)
        }
    );
    ledger.release_detached(h.clone());
    eventually("the refund is in", || async {
        pots(&*ledger, org).await == (3, 10, 0)
    })
    .await;
    ledger.release_detached(h.clone());
    assert_eq!(
        ledger.release(h.clone()).await.unwrap(),
        ReleaseOutcome::Gone
    );
    assert_eq!(ledger.commit(h).await.unwrap(), CommitOutcome::Unknown);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(pots(&*ledger, org).await, (3, 10, 0), "refunded once");
    let rows = ledger.entries(org).await.unwrap();
    let last = rows.last().unwrap();
    assert_eq!(
        (
            last.kind,
            last.delta_plan,
            last.delta_topup,
            last.balance_after
        ),
        (EntryKind::Refund, 3, 2, 13)
    );
    assert_eq!(last.request_id.as_deref(), Some("withheld"));
    assert_eq!(replay(&rows), (3, 10));
    assert_eq!(ledger.open_holds(), 0);
}

/// The periodic job, in real time over a manual clock.
pub async fn the_periodic_job_renews_and_sweeps_without_requests(backend: &impl Backend) {
    let (clock, ledger) = with_short_ttl(backend).await;
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Free).await.unwrap();
    let _stuck = held(&*ledger, org, 5, "stuck").await;
    let job = tokio::spawn(run_ledger_jobs(ledger.clone(), Duration::from_millis(20)));

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(ledger.open_holds(), 1, "not expired yet");
    clock.advance(Duration::from_secs(60));
    eventually("the job swept the hold", || async {
        ledger.open_holds() == 0 && pots(&*ledger, org).await == (100, 0, 0)
    })
    .await;

    // `entries` does not renew by itself: a Renewal row proves the job did it.
    clock.advance(Duration::from_secs(28 * 86_400));
    eventually("the job renewed the period", || async {
        ledger
            .entries(org)
            .await
            .unwrap()
            .iter()
            .any(|e| e.kind == EntryKind::Renewal)
    })
    .await;
    job.abort();
}

/// Many holds and commits of one org at once (call on a multi-threaded runtime): exactly
/// the balance is charged, never more.
pub async fn racing_holds_charge_exactly_the_balance(backend: &impl Backend) {
    const BALANCE: u64 = 100;
    const REQUESTS: u64 = 400;
    let (_clock, ledger) = fresh(backend).await;
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Basic).await.unwrap();
    ledger.set_balance(org, BALANCE).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..REQUESTS {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            match ledger
                .hold(org, 1, RequestId::parse(&format!("r{i}")))
                .await
                .unwrap()
            {
                HoldOutcome::Held(h) => {
                    let CommitOutcome::Charged {
                        charged: 1,
                        balance: Some(balance),
                    } = ledger.commit(h).await.unwrap()
                    else {
                        panic!("not charged");
                    };
                    assert!(balance < BALANCE);
                    true
                }
                HoldOutcome::Insufficient { .. } => false,
                other => panic!("{other:?}"),
            }
        }));
    }
    let mut served = 0;
    for t in tasks {
        served += u64::from(t.await.unwrap());
    }
    assert_eq!(served, BALANCE);
    assert_eq!(pots(&*ledger, org).await, (0, 0, 0));
    assert_eq!(ledger.open_holds(), 0);
    let rows = ledger.entries(org).await.unwrap();
    assert_eq!(
        rows.iter().filter(|e| e.kind == EntryKind::Charge).count() as u64,
        BALANCE
    );
    assert_eq!(replay(&rows), (0, 0));
}

async fn key_hold(
    ledger: &dyn Ledger,
    org: OrgId,
    key: KeyId,
    limit: Option<u64>,
    amount: u64,
) -> HoldOutcome {
    ledger
        .hold_for_key(org, amount, None, Some(KeyBudget { key, limit }))
        .await
        .unwrap()
}

pub async fn a_key_limit_counts_spend_and_open_holds_per_period(backend: &impl Backend) {
    let (clock, ledger) = fresh(backend).await;
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Basic).await.unwrap();
    let (a, b, idle) = (KeyId::new(), KeyId::new(), KeyId::new());
    let lim = Some(3);

    let HoldOutcome::Held(h1) = key_hold(&*ledger, org, a, lim, 2).await else {
        panic!("the first hold fits the limit");
    };
    // Open holds count: 2 held, 1 left.
    assert_eq!(
        key_hold(&*ledger, org, a, lim, 2).await,
        HoldOutcome::KeyLimit { available: 1 }
    );
    ledger.commit(h1).await.unwrap();
    let HoldOutcome::Held(h2) = key_hold(&*ledger, org, a, lim, 1).await else {
        panic!("2 spent + 1 fits a limit of 3");
    };
    assert_eq!(
        key_hold(&*ledger, org, a, lim, 1).await,
        HoldOutcome::KeyLimit { available: 0 }
    );
    // A released hold gives the key its room back.
    assert_eq!(ledger.release(h2).await.unwrap(), ReleaseOutcome::Released);
    let HoldOutcome::Held(h3) = key_hold(&*ledger, org, a, lim, 1).await else {
        panic!("the release made room");
    };
    ledger.commit(h3).await.unwrap();
    assert_eq!(
        key_hold(&*ledger, org, a, lim, 1).await,
        HoldOutcome::KeyLimit { available: 0 }
    );
    // Another key of the org is not limited by it, and its spend is its own.
    let HoldOutcome::Held(hb) = key_hold(&*ledger, org, b, None, 5).await else {
        panic!("a key without a limit holds from the org's balance");
    };
    ledger.commit(hb).await.unwrap();
    let spend = ledger.key_spend(org, vec![a, b, idle]).await.unwrap();
    assert_eq!(spend.get(&a), Some(&3));
    assert_eq!(spend.get(&b), Some(&5));
    assert_eq!(spend.get(&idle), None);
    // The org paid for all of it, once.
    assert_eq!(pots(&*ledger, org).await, (1_000 - 8, 0, 0));
    // A refunded charge is given back to the key too.
    let HoldOutcome::Held(hb2) = key_hold(&*ledger, org, b, None, 4).await else {
        panic!("hold");
    };
    ledger.commit(hb2.clone()).await.unwrap();
    ledger.release_detached(hb2);
    eventually("the refund is counted", || {
        let ledger = ledger.clone();
        async move { ledger.key_spend(org, vec![b]).await.unwrap().get(&b) == Some(&5) }
    })
    .await;

    // A new period starts every key from zero.
    clock.advance(Duration::from_secs(32 * 86_400));
    assert!(ledger.key_spend(org, vec![a, b]).await.unwrap().is_empty());
    assert!(matches!(
        key_hold(&*ledger, org, a, lim, 3).await,
        HoldOutcome::Held(_)
    ));
}

pub async fn racing_holds_of_a_limited_key_stop_at_its_limit(backend: &impl Backend) {
    const LIMIT: u64 = 10;
    const REQUESTS: u64 = 120;
    let (_clock, ledger) = fresh(backend).await;
    let org = OrgId::new();
    ledger.subscribe(org, Plan::Basic).await.unwrap();
    let key = KeyId::new();
    let mut tasks = Vec::new();
    for _ in 0..REQUESTS {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            match key_hold(&*ledger, org, key, Some(LIMIT), 1).await {
                HoldOutcome::Held(h) => {
                    assert!(matches!(
                        ledger.commit(h).await.unwrap(),
                        CommitOutcome::Charged { charged: 1, .. }
                    ));
                    true
                }
                HoldOutcome::KeyLimit { .. } => false,
                other => panic!("{other:?}"),
            }
        }));
    }
    let mut served = 0;
    for t in tasks {
        served += u64::from(t.await.unwrap());
    }
    assert_eq!(served, LIMIT);
    assert_eq!(
        ledger.key_spend(org, vec![key]).await.unwrap().get(&key),
        Some(&LIMIT)
    );
    assert_eq!(pots(&*ledger, org).await, (1_000 - LIMIT, 0, 0));
    // The org's other keys still work.
    assert!(matches!(
        key_hold(&*ledger, org, KeyId::new(), Some(LIMIT), 1).await,
        HoldOutcome::Held(_)
    ));
}

/// A top-up applied once per reference: retried after a lost answer (or approved twice), it
/// adds its credits once; another reference, or the same one for another org, is its own.
pub async fn a_top_up_with_a_reference_is_applied_once(backend: &impl Backend) {
    let (_clock, ledger) = fresh(backend).await;
    let (org, other) = (OrgId::new(), OrgId::new());
    ledger.subscribe(org, Plan::Free).await.unwrap();
    ledger.subscribe(other, Plan::Free).await.unwrap();
    let first = RequestId::parse("5f0c1a52-1b1e-4a57-9a3e-6c1f2b9d0a11").unwrap();
    let second = RequestId::parse("5f0c1a52-1b1e-4a57-9a3e-6c1f2b9d0a12").unwrap();

    let a = ledger
        .top_up_once(org, 40, first.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((a.plan_credits, a.topup_credits), (100, 40));
    // The same reference again, even with another amount: nothing changes.
    for amount in [40, 500] {
        let a = ledger
            .top_up_once(org, amount, first.clone())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((a.plan_credits, a.topup_credits), (100, 40));
    }
    let a = ledger.top_up_once(org, 5, second).await.unwrap().unwrap();
    assert_eq!(a.topup_credits, 45);
    // References are per org.
    let b = ledger
        .top_up_once(other, 7, first.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.topup_credits, 7);
    // Unknown orgs: nothing, and the reference is not used up.
    assert!(ledger
        .top_up_once(OrgId::new(), 1, first.clone())
        .await
        .unwrap()
        .is_none());

    let rows: Vec<_> = ledger
        .entries(org)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EntryKind::TopUp)
        .map(|e| (e.delta_topup, e.balance_after, e.request_id))
        .collect();
    assert_eq!(
        rows,
        vec![
            (40, 140, Some(first.as_str().to_owned())),
            (
                5,
                145,
                Some("5f0c1a52-1b1e-4a57-9a3e-6c1f2b9d0a12".to_owned())
            ),
        ]
    );

    // Concurrent repeats of one reference: applied once.
    let third = RequestId::parse("5f0c1a52-1b1e-4a57-9a3e-6c1f2b9d0a13").unwrap();
    let tries = (0..16).map(|_| ledger.top_up_once(org, 100, third.clone()));
    for outcome in futures_util::future::join_all(tries).await {
        outcome.unwrap().unwrap();
    }
    assert_eq!(pots(&*ledger, org).await, (100, 145, 0));
}
