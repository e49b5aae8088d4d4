//! The `SessionStore` behaviour suite: every function takes a fresh, empty store.
//! `session_store_suite!` turns it into one test per behaviour for a backend, so every
//! backend runs exactly the same checks and the backends cannot drift apart.
#![allow(dead_code)]

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::Arc;

use tollgate_core::{ModelId, OrgId};
use tollgate_postgres::testing::TestDb;
use tollgate_upstream_sign::{ModelStatus, Session, SessionStore};

/// A store under test and the database schema to drop after (PostgreSQL backends).
pub struct Env<S> {
    pub store: Arc<S>,
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

/// One `#[tokio::test]` per behaviour, each on a fresh store from `$backend()` (an async fn
/// returning `Option<Env<_>>`; `None` skips, e.g. when no PostgreSQL server is reachable).
#[macro_export]
macro_rules! session_store_suite {
    ($backend:path) => {
        $crate::session_store_suite!(@tests $backend;
            connected_models_read_back_with_their_session,
            lists_are_per_org_oldest_first,
            disconnection_is_kept_until_reconnect,
            unknown_models_are_none_and_ignored,
            session_material_round_trips_exactly,
            sessions_never_show_in_debug_or_records,
            concurrent_connects_and_disconnects_are_exact,
            concurrent_reconnects_leave_one_whole_session,
        );
    };
    (@tests $backend:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let Some(env) = $backend().await else { return };
                suite::$name(Arc::clone(&env.store)).await;
                env.cleanup().await;
            }
        )*
    };
}

pub fn session(n: u32) -> Session {
    Session::new(
        format!("sess=s{n}; auth_id={n}"),
        n.to_string(),
        format!("xbc{n}"),
        "Mozilla/5.0",
    )
}

pub async fn connected_models_read_back_with_their_session<S: SessionStore>(store: Arc<S>) {
    let org = OrgId::new();
    let a = store
        .connect(org, "alice".into(), session(1))
        .await
        .unwrap();
    assert_eq!(a.org, org);
    assert_eq!(a.name, "alice");
    assert_eq!(a.status, ModelStatus::Connected);
    let b = store.connect(org, "bob".into(), session(2)).await.unwrap();
    assert_ne!(a.id, b.id);

    assert_eq!(
        store.session(a.id).await.unwrap(),
        Some((session(1), ModelStatus::Connected))
    );
    // Again (from a cache, where there is one).
    assert_eq!(
        store.session(a.id).await.unwrap(),
        Some((session(1), ModelStatus::Connected))
    );
    assert_eq!(
        store.session(b.id).await.unwrap(),
        Some((session(2), ModelStatus::Connected))
    );
    assert_eq!(store.model(b.id).await.unwrap(), Some(b.clone()));
}

pub async fn lists_are_per_org_oldest_first<S: SessionStore>(store: Arc<S>) {
    let (org, other_org) = (OrgId::new(), OrgId::new());
    let a = store
        .connect(org, "alice".into(), session(1))
        .await
        .unwrap();
    let c = store
        .connect(other_org, "carol".into(), session(3))
        .await
        .unwrap();
    let b = store.connect(org, "bob".into(), session(2)).await.unwrap();
    assert_eq!(
        store.list(org).await.unwrap(),
        vec![a.clone(), b.clone()],
        "own models only, oldest first"
    );
    assert_eq!(store.list(other_org).await.unwrap(), vec![c]);
    assert!(store.list(OrgId::new()).await.unwrap().is_empty());
    // A status change shows in the list.
    store.mark_disconnected(b.id).await.unwrap();
    let statuses: Vec<_> = store
        .list(org)
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.id, m.status))
        .collect();
    assert_eq!(
        statuses,
        [
            (a.id, ModelStatus::Connected),
            (b.id, ModelStatus::Disconnected)
        ]
    );
}

pub async fn disconnection_is_kept_until_reconnect<S: SessionStore>(store: Arc<S>) {
    let org = OrgId::new();
    let a = store
        .connect(org, "alice".into(), session(1))
        .await
        .unwrap();
    let b = store.connect(org, "bob".into(), session(2)).await.unwrap();
    // Read once (and cached, where there is a cache) before the change.
    store.session(a.id).await.unwrap();

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
    // Twice is harmless.
    store.mark_disconnected(a.id).await.unwrap();

    let re = store.reconnect(a.id, session(9)).await.unwrap().unwrap();
    assert_eq!(re.status, ModelStatus::Connected);
    assert_eq!((re.id, re.org, re.name.as_str()), (a.id, org, "alice"));
    assert_eq!(
        store.session(a.id).await.unwrap(),
        Some((session(9), ModelStatus::Connected))
    );
    assert_eq!(store.model(a.id).await.unwrap(), Some(re));
}

pub async fn unknown_models_are_none_and_ignored<S: SessionStore>(store: Arc<S>) {
    let unknown = ModelId::new();
    assert_eq!(store.session(unknown).await.unwrap(), None);
    assert_eq!(store.model(unknown).await.unwrap(), None);
    store.mark_disconnected(unknown).await.unwrap();
    assert_eq!(store.reconnect(unknown, session(1)).await.unwrap(), None);
    // Reconnecting an unknown id does not create it.
    assert_eq!(store.model(unknown).await.unwrap(), None);
    assert_eq!(store.session(unknown).await.unwrap(), None);
}

pub async fn session_material_round_trips_exactly<S: SessionStore>(store: Arc<S>) {
    let org = OrgId::new();
    let odd = Session::new(
        format!(
            "sess={}; auth_id=12345; fp=\"quoted\\value\"; ünï=✓",
            "x".repeat(8 * 1024)
        ),
        "12345",
        "0123456789abcdef0123456789abcdef",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) 🦀",
    );
    let m = store
        .connect(
            org,
            "name with 'quotes' ; -- and ünïcode".into(),
            odd.clone(),
        )
        .await
        .unwrap();
    assert_eq!(
        store.session(m.id).await.unwrap(),
        Some((odd, ModelStatus::Connected))
    );
    assert_eq!(
        store.model(m.id).await.unwrap().unwrap().name,
        "name with 'quotes' ; -- and ünïcode"
    );
}

pub async fn sessions_never_show_in_debug_or_records<S: SessionStore + Debug>(store: Arc<S>) {
    let org = OrgId::new();
    let secret = Session::new(
        "sess=TOPSECRETCOOKIE; auth_id=7",
        "7",
        "SECRETDEVICETOKEN",
        "Mozilla/5.0",
    );
    let m = store.connect(org, "m".into(), secret).await.unwrap();
    let (read, _) = store.session(m.id).await.unwrap().unwrap();
    let outputs = [
        format!("{store:?}"),
        format!("{m:?}"),
        format!("{read:?}"),
        format!("{:?}", store.list(org).await.unwrap()),
        format!("{:?}", store.model(m.id).await.unwrap()),
        serde_json::to_string(&store.list(org).await.unwrap()).unwrap(),
    ];
    for out in &outputs {
        assert!(!out.contains("TOPSECRETCOOKIE"), "{out}");
        assert!(!out.contains("SECRETDEVICETOKEN"), "{out}");
    }
}

pub async fn concurrent_connects_and_disconnects_are_exact<S: SessionStore>(store: Arc<S>) {
    let org = OrgId::new();
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let m = store
                .connect(org, format!("m{i}"), session(i))
                .await
                .unwrap();
            // Read (and cache) it, then change it, racing everyone else.
            assert_eq!(
                store.session(m.id).await.unwrap(),
                Some((session(i), ModelStatus::Connected))
            );
            if i % 2 == 0 {
                store.mark_disconnected(m.id).await.unwrap();
                assert_eq!(
                    store.session(m.id).await.unwrap().map(|(_, s)| s),
                    Some(ModelStatus::Disconnected)
                );
            }
            (i, m.id)
        }));
    }
    let mut made = Vec::new();
    for t in tasks {
        made.push(t.await.unwrap());
    }
    let listed = store.list(org).await.unwrap();
    assert_eq!(listed.len(), 64);
    let disconnected = listed
        .iter()
        .filter(|m| m.status == ModelStatus::Disconnected)
        .count();
    assert_eq!(disconnected, 32);
    let ids: HashSet<ModelId> = made.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids.len(), 64);
    for (i, id) in made {
        let expected = if i % 2 == 0 {
            ModelStatus::Disconnected
        } else {
            ModelStatus::Connected
        };
        assert_eq!(
            store.session(id).await.unwrap(),
            Some((session(i), expected))
        );
    }
}

pub async fn concurrent_reconnects_leave_one_whole_session<S: SessionStore>(store: Arc<S>) {
    let org = OrgId::new();
    let m = store.connect(org, "m".into(), session(0)).await.unwrap();
    store.mark_disconnected(m.id).await.unwrap();
    let tasks: Vec<_> = (1..=16u32)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let record = store.reconnect(m.id, session(i)).await.unwrap().unwrap();
                assert_eq!(record.status, ModelStatus::Connected);
                // Every read sees one of the sessions written, never a mix.
                let (read, status) = store.session(m.id).await.unwrap().unwrap();
                assert!((1..=16).any(|j| read == session(j)), "{read:?}");
                assert_eq!(status, ModelStatus::Connected);
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let (read, status) = store.session(m.id).await.unwrap().unwrap();
    assert!((1..=16).any(|j| read == session(j)));
    assert_eq!(status, ModelStatus::Connected);
    assert_eq!(store.list(org).await.unwrap().len(), 1);
}
