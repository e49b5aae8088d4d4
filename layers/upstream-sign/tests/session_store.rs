//! The memory `SessionStore` through the shared behaviour suite (`tests/suite`), plus what is
//! particular to it.

#![cfg(feature = "memory")]

mod suite;

use std::sync::Arc;

use suite::{disconnect, read, session, Env};
use tollgate_core::{ModelId, OrgId};
use tollgate_upstream_sign::{MemorySessionStore, ModelStatus, SessionStore};

async fn memory() -> Option<Env<MemorySessionStore>> {
    Some(Env {
        store: Arc::new(MemorySessionStore::new()),
        db: None,
    })
}

crate::session_store_suite!(memory);

#[tokio::test]
async fn the_suite_runs_through_the_box_forwarding_impl() {
    // `Arc<S>` is what the suite uses; `Box<dyn SessionStore>` forwards the same way.
    let store: Box<dyn SessionStore> = Box::new(MemorySessionStore::new());
    let org = OrgId::new();
    let m = store.connect(org, "m".into(), session(1)).await.unwrap();
    disconnect(&*store, m.id).await;
    assert_eq!(
        read(&*store, m.id).await,
        Some((session(1), ModelStatus::Disconnected))
    );
    assert_eq!(store.list(org).await.unwrap().len(), 1);
}

#[test]
fn insert_seeds_a_chosen_id_and_debug_never_shows_sessions() {
    let store = MemorySessionStore::new();
    let id = ModelId::new();
    let record = store.insert(id, OrgId::new(), "m", session(77));
    assert_eq!((record.id, record.status), (id, ModelStatus::Connected));
    assert_eq!(store.len(), 1);
    assert!(!store.is_empty());
    let text = format!("{store:?}");
    assert!(!text.contains("sess=") && !text.contains("xbc77"), "{text}");
}
