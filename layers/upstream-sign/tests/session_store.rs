//! The `SessionStore` behaviour suite, run against the memory backend (a generic function so
//! other backends can run the same suite).

use std::sync::Arc;

use tollgate_core::{ModelId, OrgId};
use tollgate_upstream_sign::{MemorySessionStore, ModelStatus, Session, SessionStore};

fn session(n: u32) -> Session {
    Session::new(
        format!("sess=s{n}; auth_id={n}"),
        n.to_string(),
        format!("xbc{n}"),
        "Mozilla/5.0",
    )
}

async fn behaviour_suite(store: impl SessionStore) {
    let org = OrgId::new();
    let other_org = OrgId::new();

    let a = store
        .connect(org, "alice".into(), session(1))
        .await
        .unwrap();
    assert_eq!(a.org, org);
    assert_eq!(a.name, "alice");
    assert_eq!(a.status, ModelStatus::Connected);
    let b = store.connect(org, "bob".into(), session(2)).await.unwrap();
    let c = store
        .connect(other_org, "carol".into(), session(3))
        .await
        .unwrap();
    assert_ne!(a.id, b.id);

    assert_eq!(
        store.session(a.id).await.unwrap(),
        Some((session(1), ModelStatus::Connected))
    );
    assert_eq!(store.model(b.id).await.unwrap(), Some(b.clone()));
    assert_eq!(store.session(ModelId::new()).await.unwrap(), None);
    assert_eq!(store.model(ModelId::new()).await.unwrap(), None);

    let listed = store.list(org).await.unwrap();
    assert_eq!(
        listed,
        vec![a.clone(), b.clone()],
        "own models only, oldest first"
    );
    assert_eq!(store.list(other_org).await.unwrap(), vec![c.clone()]);
    assert!(store.list(OrgId::new()).await.unwrap().is_empty());

    store.mark_disconnected(a.id).await.unwrap();
    assert_eq!(
        store.session(a.id).await.unwrap(),
        Some((session(1), ModelStatus::Disconnected))
    );
    assert_eq!(
        store.model(a.id).await.unwrap().unwrap().status,
        ModelStatus::Disconnected
    );
    assert_eq!(
        store.model(b.id).await.unwrap().unwrap().status,
        ModelStatus::Connected
    );
    // Unknown models are ignored.
    store.mark_disconnected(ModelId::new()).await.unwrap();

    let re = store.reconnect(a.id, session(9)).await.unwrap().unwrap();
    assert_eq!(re.status, ModelStatus::Connected);
    assert_eq!((re.id, re.org, re.name.as_str()), (a.id, org, "alice"));
    assert_eq!(
        store.session(a.id).await.unwrap(),
        Some((session(9), ModelStatus::Connected))
    );
    assert_eq!(
        store.reconnect(ModelId::new(), session(1)).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn memory_store_behaviour() {
    behaviour_suite(MemorySessionStore::new()).await;
    // Through the Arc and Box forwarding impls too.
    behaviour_suite(Arc::new(MemorySessionStore::new())).await;
    behaviour_suite(Box::new(MemorySessionStore::new()) as Box<dyn SessionStore>).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_and_disconnects_are_exact() {
    let store = Arc::new(MemorySessionStore::new());
    let org = OrgId::new();
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let m = store
                .connect(org, format!("m{i}"), session(i))
                .await
                .unwrap();
            if i % 2 == 0 {
                store.mark_disconnected(m.id).await.unwrap();
            }
            m.id
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    let listed = store.list(org).await.unwrap();
    assert_eq!(listed.len(), 64);
    assert_eq!(store.len(), 64);
    let disconnected = listed
        .iter()
        .filter(|m| m.status == ModelStatus::Disconnected)
        .count();
    assert_eq!(disconnected, 32);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 64);
}

#[test]
fn debug_never_shows_sessions() {
    let store = MemorySessionStore::new();
    store.insert(ModelId::new(), OrgId::new(), "m", session(77));
    let text = format!("{store:?}");
    assert!(!text.contains("sess=") && !text.contains("xbc77"), "{text}");
}
