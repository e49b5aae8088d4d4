//! The memory `KeyStore` through the shared behaviour suite (`tests/suite`): key
//! administration as the admin API uses it, secrecy, and correctness under concurrent use.

#![cfg(feature = "memory")]

mod suite;

use std::sync::Arc;

use suite::{Env, START_MS};
use tollgate_api_key_auth::MemoryKeyStore;
use tollgate_core::ManualClock;

async fn memory() -> Option<Env<MemoryKeyStore>> {
    let clock = ManualClock::new(START_MS);
    Some(Env {
        store: Arc::new(MemoryKeyStore::new(Arc::new(clock.clone()))),
        clock,
        db: None,
    })
}

crate::key_store_suite!(memory);
