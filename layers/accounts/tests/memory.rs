//! The memory stores through the shared behaviour suites (`tests/suite`).

mod suite;

use std::sync::Arc;

use suite::{Env, START_MS};
use tollgate_accounts::{MemoryDashboardSessionStore, MemoryUsageStore, MemoryUserStore};
use tollgate_core::ManualClock;

async fn user_store() -> Option<Env<MemoryUserStore>> {
    let clock = ManualClock::new(START_MS);
    Some(Env {
        store: Arc::new(MemoryUserStore::new(Arc::new(clock.clone()))),
        clock,
        db: None,
    })
}

async fn session_store() -> Option<Env<MemoryDashboardSessionStore>> {
    let clock = ManualClock::new(START_MS);
    Some(Env {
        store: Arc::new(MemoryDashboardSessionStore::new(Arc::new(clock.clone()))),
        clock,
        db: None,
    })
}

async fn usage_store() -> Option<Env<MemoryUsageStore>> {
    let clock = ManualClock::new(START_MS);
    Some(Env {
        store: Arc::new(MemoryUsageStore::new(Arc::new(clock.clone()))),
        clock,
        db: None,
    })
}

crate::user_store_suite!(user_store);
crate::session_store_suite!(session_store);
crate::usage_store_suite!(usage_store);
