//! The ledger's behaviour on the memory backend: the shared suite (`tests/suite`, also run
//! against PostgreSQL by `tests/postgres.rs`) plus what only the memory ledger has.

mod common;
mod suite;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tollgate_core::{ManualClock, OrgId, Plan};
use tollgate_credit_meter::{run_ledger_jobs, EntryKind, Ledger, MemoryLedger, DEFAULT_HOLD_TTL};

use common::T0;
use suite::{held, Backend};

/// Each ledger is its own store: memory has no restart.
struct Memory;

impl Backend for Memory {
    fn ledger(
        &self,
        clock: &ManualClock,
        hold_ttl: Duration,
    ) -> impl Future<Output = Arc<dyn Ledger>> + Send {
        let ledger: Arc<dyn Ledger> =
            Arc::new(MemoryLedger::new(clock.clone()).with_hold_ttl(hold_ttl));
        std::future::ready(ledger)
    }
}

macro_rules! memory_suite {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                suite::$name(&Memory).await;
            }
        )*
    };
}

memory_suite!(
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
    suite::racing_holds_charge_exactly_the_balance(&Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_holds_of_a_limited_key_stop_at_its_limit() {
    suite::racing_holds_of_a_limited_key_stop_at_its_limit(&Memory).await;
}

#[test]
fn the_default_hold_ttl_outlives_the_upstream_timeout() {
    let ledger = MemoryLedger::default();
    assert_eq!(ledger.hold_ttl(), DEFAULT_HOLD_TTL);
    assert!(DEFAULT_HOLD_TTL > Duration::from_millis(30_000));
}

#[tokio::test(start_paused = true)]
async fn the_periodic_job_runs_on_its_interval() {
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
