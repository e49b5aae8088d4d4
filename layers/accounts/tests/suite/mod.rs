//! The behaviour suites of the three stores. Each function takes a fresh, empty store and the
//! manual clock it was built with; the `*_suite!` macros turn them into one test per
//! behaviour for a backend, so memory and PostgreSQL run exactly the same checks.
#![allow(dead_code)]

pub mod sessions;
pub mod usage;
pub mod users;

use std::sync::Arc;

use tollgate_core::ManualClock;
use tollgate_postgres::testing::TestDb;

/// 2023-11-14T22:13:20Z: an arbitrary start, not on an hour boundary.
pub const START_MS: u64 = 1_700_000_000_000;

/// A store under test, its clock, and the schema to drop after (PostgreSQL).
pub struct Env<S> {
    pub store: Arc<S>,
    pub clock: ManualClock,
    pub db: Option<TestDb>,
}

impl<S> Env<S> {
    pub async fn cleanup(self) {
        drop(self.store);
        if let Some(db) = self.db {
            db.cleanup().await;
        }
    }
}

/// One `#[tokio::test]` per behaviour of `$module`, each on a fresh store from `$backend()`
/// (an async fn returning `Option<Env<_>>`; `None` skips).
#[macro_export]
macro_rules! suite_tests {
    ($module:ident, $backend:path; $($name:ident),* $(,)?) => {
        mod $module {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some(env) = $backend().await else { return };
                    suite::$module::$name(Arc::clone(&env.store), env.clock.clone()).await;
                    env.cleanup().await;
                }
            )*
        }
    };
}

/// The `UserStore` behaviours for a backend.
#[macro_export]
macro_rules! user_store_suite {
    ($backend:path) => {
        $crate::suite_tests!(users, $backend;
            an_invite_creates_an_inactive_user_with_a_usable_invite,
            emails_are_unique_across_the_installation,
            an_invite_is_single_use_and_sets_the_password,
            an_invite_expires_after_72_hours,
            unknown_invite_tokens_are_refused,
            concurrent_accepts_of_one_invite_have_one_winner,
            set_password_replaces_the_hash,
            deleting_a_user_removes_the_user_and_their_invites,
            users_are_listed_per_org_oldest_first,
            five_attempts_then_throttled_until_the_window_ends,
            a_success_clears_the_attempts,
            throttle_keys_are_independent,
            concurrent_attempts_never_pass_the_limit,
            purge_removes_used_and_expired_invites_and_ended_windows,
        );
    };
}

/// The `DashboardSessionStore` behaviours for a backend.
#[macro_export]
macro_rules! session_store_suite {
    ($backend:path) => {
        $crate::suite_tests!(sessions, $backend;
            a_session_is_found_by_its_token_and_touch_records_the_use,
            a_session_ends_after_12_hours_unused,
            a_session_ends_7_days_after_sign_in_however_used,
            revoke_ends_one_session,
            revoke_user_ends_every_session_of_that_user_only,
            purge_deletes_ended_sessions_only,
        );
    };
}

/// The `UsageStore` behaviours for a backend.
#[macro_export]
macro_rules! usage_store_suite {
    ($backend:path) => {
        $crate::suite_tests!(usage, $backend;
            rows_add_into_existing_rows,
            queries_group_by_time_model_and_route,
            day_buckets_sum_the_hours_of_utc_days,
            ranges_are_half_open_and_orgs_separate,
            rows_older_than_400_days_are_neither_returned_nor_kept,
            concurrent_adds_are_exact,
        );
    };
}
