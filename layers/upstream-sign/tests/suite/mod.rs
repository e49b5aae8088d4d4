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
            every_connect_and_reconnect_gives_a_new_version,
            a_stale_disconnect_leaves_the_reconnected_session,
            stale_disconnects_racing_reconnects_never_win,
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

/// The model's session and status, without the version.
pub async fn read<S: SessionStore + ?Sized>(
    store: &S,
    model: ModelId,
) -> Option<(Session, ModelStatus)> {
    store
        .session(model)
        .await
        .unwrap()
        .map(|m| (m.session, m.status))
}

/// Disconnects the model's current session, as a request signed with it would.
pub async fn disconnect<S: SessionStore + ?Sized>(store: &S, model: ModelId) {
    let version = store.session(model).await.unwrap().unwrap().version;
    assert!(store.mark_disconnected(model, version).await.unwrap());
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
        read(&*store, a.id).await,
        Some((session(1), ModelStatus::Connected))
    );
    // Again (from a cache, where there is one).
    assert_eq!(
        read(&*store, a.id).await,
        Some((session(1), ModelStatus::Connected))
    );
    assert_eq!(
        read(&*store, b.id).await,
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
    disconnect(&*store, b.id).await;
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
    read(&*store, a.id).await;
    assert_eq!(a.disconnected_at_ms, None);

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    disconnect(&*store, a.id).await;
    let at = store.model(a.id).await.unwrap().unwrap().disconnected_at_ms;
    let at = at.expect("the time of the disconnect");
    assert!(
        at + 1_000 >= before && at <= before + 5_000,
        "disconnected at {at}, around {before}"
    );
    assert_eq!(
        store.list(org).await.unwrap()[0].disconnected_at_ms,
        Some(at)
    );
    assert_eq!(
        store.model(b.id).await.unwrap().unwrap().disconnected_at_ms,
        None
    );
    assert_eq!(
        read(&*store, a.id).await,
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
    // Twice is harmless, and keeps the first time.
    disconnect(&*store, a.id).await;
    assert_eq!(
        store.model(a.id).await.unwrap().unwrap().disconnected_at_ms,
        Some(at)
    );

    let re = store.reconnect(a.id, session(9)).await.unwrap().unwrap();
    assert_eq!(re.status, ModelStatus::Connected);
    assert_eq!((re.id, re.org, re.name.as_str()), (a.id, org, "alice"));
    assert_eq!(re.disconnected_at_ms, Some(at), "kept after the reconnect");
    assert_eq!(
        read(&*store, a.id).await,
        Some((session(9), ModelStatus::Connected))
    );
    assert_eq!(store.model(a.id).await.unwrap(), Some(re));
}

pub async fn unknown_models_are_none_and_ignored<S: SessionStore>(store: Arc<S>) {
    let unknown = ModelId::new();
    assert_eq!(read(&*store, unknown).await, None);
    assert_eq!(store.model(unknown).await.unwrap(), None);
    assert!(!store.mark_disconnected(unknown, 1).await.unwrap());
    assert_eq!(store.reconnect(unknown, session(1)).await.unwrap(), None);
    // Reconnecting an unknown id does not create it.
    assert_eq!(store.model(unknown).await.unwrap(), None);
    assert_eq!(read(&*store, unknown).await, None);
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
        read(&*store, m.id).await,
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
    let (got, _) = read(&*store, m.id).await.unwrap();
    let outputs = [
        format!("{store:?}"),
        format!("{m:?}"),
        format!("{got:?}"),
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
                read(&*store, m.id).await,
                Some((session(i), ModelStatus::Connected))
            );
            if i % 2 == 0 {
                disconnect(&*store, m.id).await;
                assert_eq!(
                    read(&*store, m.id).await.map(|(_, s)| s),
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
        assert_eq!(read(&*store, id).await, Some((session(i), expected)));
    }
}

pub async fn concurrent_reconnects_leave_one_whole_session<S: SessionStore>(store: Arc<S>) {
    let org = OrgId::new();
    let m = store.connect(org, "m".into(), session(0)).await.unwrap();
    disconnect(&*store, m.id).await;
    let tasks: Vec<_> = (1..=16u32)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let record = store.reconnect(m.id, session(i)).await.unwrap().unwrap();
                assert_eq!(record.status, ModelStatus::Connected);
                // Every read sees one of the sessions written, never a mix.
                let (got, status) = read(&*store, m.id).await.unwrap();
                assert!((1..=16).any(|j| got == session(j)), "{got:?}");
                assert_eq!(status, ModelStatus::Connected);
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let (got, status) = read(&*store, m.id).await.unwrap();
    assert!((1..=16).any(|j| got == session(j)));
    assert_eq!(status, ModelStatus::Connected);
    assert_eq!(store.list(org).await.unwrap().len(), 1);
}

pub async fn every_connect_and_reconnect_gives_a_new_version<S: SessionStore>(store: Arc<S>) {
    let org = OrgId::new();
    let m = store.connect(org, "m".into(), session(1)).await.unwrap();
    let mut last = store.session(m.id).await.unwrap().unwrap().version;
    for i in 2..=5u32 {
        // A disconnect does not change the version; a reconnect does.
        disconnect(&*store, m.id).await;
        assert_eq!(store.session(m.id).await.unwrap().unwrap().version, last);
        store.reconnect(m.id, session(i)).await.unwrap().unwrap();
        let read = store.session(m.id).await.unwrap().unwrap();
        assert!(read.version > last, "{} after {last}", read.version);
        assert_eq!(
            (read.session, read.status),
            (session(i), ModelStatus::Connected)
        );
        last = read.version;
    }
    // Reconnecting with the very same material is a new session too.
    store.reconnect(m.id, session(5)).await.unwrap().unwrap();
    assert!(store.session(m.id).await.unwrap().unwrap().version > last);
}

pub async fn a_stale_disconnect_leaves_the_reconnected_session<S: SessionStore>(store: Arc<S>) {
    let org = OrgId::new();
    let m = store.connect(org, "m".into(), session(1)).await.unwrap();
    // A request reads (and signs with) the first session...
    let old = store.session(m.id).await.unwrap().unwrap().version;
    // ...the model is reconnected while it is out...
    store.reconnect(m.id, session(2)).await.unwrap().unwrap();
    let new = store.session(m.id).await.unwrap().unwrap().version;
    // ...and its late 401 must not disconnect the new session.
    assert!(!store.mark_disconnected(m.id, old).await.unwrap());
    assert_eq!(
        read(&*store, m.id).await,
        Some((session(2), ModelStatus::Connected))
    );
    assert_eq!(
        store.model(m.id).await.unwrap().unwrap().status,
        ModelStatus::Connected
    );
    assert_eq!(
        store.list(org).await.unwrap()[0].status,
        ModelStatus::Connected
    );

    // A 401 for the session in use does disconnect it, and says so again when repeated.
    assert!(store.mark_disconnected(m.id, new).await.unwrap());
    assert!(store.mark_disconnected(m.id, new).await.unwrap());
    assert_eq!(
        read(&*store, m.id).await,
        Some((session(2), ModelStatus::Disconnected))
    );
    // An older one still changes nothing, and after a reconnect neither does `new`.
    assert!(!store.mark_disconnected(m.id, old).await.unwrap());
    store.reconnect(m.id, session(3)).await.unwrap().unwrap();
    assert!(!store.mark_disconnected(m.id, new).await.unwrap());
    assert!(!store.mark_disconnected(m.id, old).await.unwrap());
    assert_eq!(
        read(&*store, m.id).await,
        Some((session(3), ModelStatus::Connected))
    );
}

pub async fn stale_disconnects_racing_reconnects_never_win<S: SessionStore>(store: Arc<S>) {
    let org = OrgId::new();
    let mut models = Vec::new();
    for i in 0..16u32 {
        models.push(
            store
                .connect(org, format!("m{i}"), session(i))
                .await
                .unwrap(),
        );
    }
    // For each model, a request that read the first session races a reconnect: whichever
    // lands first, the model ends connected with the new session.
    let tasks: Vec<_> = models
        .iter()
        .map(|m| {
            let (store, id) = (Arc::clone(&store), m.id);
            tokio::spawn(async move {
                let seen = store.session(id).await.unwrap().unwrap().version;
                let (s2, s3) = (Arc::clone(&store), Arc::clone(&store));
                let reconnect = tokio::spawn(async move { s2.reconnect(id, session(100)).await });
                let stale = tokio::spawn(async move { s3.mark_disconnected(id, seen).await });
                reconnect.await.unwrap().unwrap().unwrap();
                stale.await.unwrap().unwrap();
                id
            })
        })
        .collect();
    for task in tasks {
        let id = task.await.unwrap();
        assert_eq!(
            read(&*store, id).await,
            Some((session(100), ModelStatus::Connected))
        );
    }
    assert!(store
        .list(org)
        .await
        .unwrap()
        .iter()
        .all(|m| m.status == ModelStatus::Connected));
}
