//! `PostgresSessionStore` on the real server (`DATABASE_URL`, default 127.0.0.1:5432), each
//! test in a fresh schema: the shared behaviour suite, then encryption at rest, restarts,
//! several replicas and an unreachable server. Skipped when the server is unreachable,
//! unless `TOLLGATE_REQUIRE_SERVICES=1`.

#![cfg(feature = "postgres")]

mod suite;

use std::sync::Arc;
use std::time::{Duration, Instant};

use suite::{disconnect, read, session, Env};
use tollgate_core::{BackendErrorKind, ModelId, OrgId};
use tollgate_postgres::testing::{unreachable_url, TestDb};
use tollgate_postgres::{pg_config, tokio_postgres, Pool, PoolOptions};
use tollgate_upstream_sign::{ModelStatus, PostgresSessionStore, Session, SessionStore};

const KEY: [u8; 32] = [7; 32];
const OTHER_KEY: [u8; 32] = [8; 32];

fn listen_config(db: &TestDb) -> tokio_postgres::Config {
    pg_config(db.url(), &db.pool_options()).unwrap()
}

/// A replica: its own pool and listener on the test schema.
async fn replica(db: &TestDb, pool: Pool, key: [u8; 32]) -> PostgresSessionStore {
    let store = PostgresSessionStore::builder(pool, key)
        .with_listener(listen_config(db))
        .build()
        .await
        .unwrap();
    assert!(store.cache_is_live(), "the listener starts within 2 s");
    store
}

async fn postgres() -> Option<Env<PostgresSessionStore>> {
    let db = TestDb::new().await?;
    let store = replica(&db, db.pool().clone(), KEY).await;
    Some(Env {
        store: Arc::new(store),
        db: Some(db),
    })
}

crate::session_store_suite!(postgres);

mod without_cache {
    //! The suite again on a store built with `new` (no listener: every read hits the table).
    use super::*;

    async fn postgres_uncached() -> Option<Env<PostgresSessionStore>> {
        let db = TestDb::new().await?;
        let store = PostgresSessionStore::new(db.pool().clone(), KEY)
            .await
            .unwrap();
        assert!(!store.cache_is_live());
        Some(Env {
            store: Arc::new(store),
            db: Some(db),
        })
    }

    crate::session_store_suite!(postgres_uncached);
}

async fn eventually<F, Fut>(within: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() <= within {
        if check().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

fn cookie_session() -> Session {
    Session::new(
        "sess=VERYSECRETCOOKIE0123; auth_id=4242",
        "4242",
        "DEVICETOKENabcdef",
        "Mozilla/5.0",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_encrypted_at_rest_with_a_fresh_nonce_per_write() {
    let Some(env) = postgres().await else { return };
    let db = env.db.as_ref().unwrap();
    let m = env
        .store
        .connect(OrgId::new(), "m".into(), cookie_session())
        .await
        .unwrap();
    let (ciphertext, nonce, whole_row) = stored(db, m.id).await;
    assert_eq!(nonce.len(), 24);
    let plaintext = serde_json::to_vec(&cookie_session()).unwrap();
    // Poly1305 tag: 16 bytes more than the JSON; nothing of it readable.
    assert_eq!(ciphertext.len(), plaintext.len() + 16);
    for needle in ["VERYSECRETCOOKIE0123", "DEVICETOKENabcdef", "sess="] {
        assert!(!whole_row.contains(needle), "{whole_row}");
        assert!(
            !ciphertext
                .windows(needle.len())
                .any(|w| w == needle.as_bytes()),
            "{needle} in the ciphertext"
        );
    }
    // Writing the same session again uses a new nonce, so the ciphertext changes too.
    env.store.reconnect(m.id, cookie_session()).await.unwrap();
    let (ciphertext2, nonce2, _) = stored(db, m.id).await;
    assert_ne!(nonce2, nonce);
    assert_ne!(ciphertext2, ciphertext);
    assert_eq!(
        read(&*env.store, m.id).await,
        Some((cookie_session(), ModelStatus::Connected))
    );
    env.cleanup().await;
}

/// The stored ciphertext, nonce and the whole row as text.
async fn stored(db: &TestDb, model: ModelId) -> (Vec<u8>, Vec<u8>, String) {
    let row = db
        .pool()
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT session_ciphertext, session_nonce, t::text FROM tollgate_models t WHERE id = $1",
            &[model.as_uuid()],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_or_a_moved_ciphertext_fails_cleanly() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let right = replica(&db, db.pool().clone(), KEY).await;
    let wrong = replica(&db, db.new_pool(), OTHER_KEY).await;
    let org = OrgId::new();
    let m = right
        .connect(org, "m".into(), cookie_session())
        .await
        .unwrap();
    let other = right
        .connect(org, "other".into(), session(2))
        .await
        .unwrap();

    let err = wrong.session(m.id).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Other);
    let text = err.to_string();
    assert!(text.contains("cannot be decrypted"), "{text}");
    assert!(!text.contains("VERYSECRET"), "{text}");
    // Records need no decryption.
    assert_eq!(wrong.model(m.id).await.unwrap(), Some(m.clone()));
    assert_eq!(wrong.list(org).await.unwrap().len(), 2);

    // A ciphertext copied onto another model's row does not open (the id is authenticated).
    db.pool()
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE tollgate_models SET (session_ciphertext, session_nonce) = \
             (SELECT session_ciphertext, session_nonce FROM tollgate_models WHERE id = $1) \
             WHERE id = $2",
            &[m.id.as_uuid(), other.id.as_uuid()],
        )
        .await
        .unwrap();
    let fresh = PostgresSessionStore::new(db.new_pool(), KEY).await.unwrap();
    assert_eq!(
        fresh.session(other.id).await.unwrap_err().kind(),
        BackendErrorKind::Other
    );
    assert!(fresh.session(m.id).await.unwrap().is_some());

    // Reconnecting re-encrypts under the reconnecting store's key.
    wrong.reconnect(m.id, session(5)).await.unwrap().unwrap();
    assert_eq!(
        read(&wrong, m.id).await,
        Some((session(5), ModelStatus::Connected))
    );
    eventually(Duration::from_secs(1), || async {
        right.session(m.id).await.is_err()
    })
    .await
    .expect("the old key no longer opens it");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_on_one_replica_reach_the_other_within_a_second() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let a = replica(&db, db.pool().clone(), KEY).await;
    let b = replica(&db, db.new_pool(), KEY).await;
    let m = a
        .connect(OrgId::new(), "m".into(), session(1))
        .await
        .unwrap();
    // B caches the session.
    assert_eq!(
        read(&b, m.id).await,
        Some((session(1), ModelStatus::Connected))
    );

    disconnect(&a, m.id).await;
    let took = eventually(Duration::from_secs(1), || async {
        read(&b, m.id).await == Some((session(1), ModelStatus::Disconnected))
    })
    .await
    .expect("B sees the disconnection within 1 s");
    println!("disconnection reached B after {took:?}");

    a.reconnect(m.id, session(2)).await.unwrap();
    let took = eventually(Duration::from_secs(1), || async {
        read(&b, m.id).await == Some((session(2), ModelStatus::Connected))
    })
    .await
    .expect("B uses the new session within 1 s");
    println!("reconnection reached B after {took:?}");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_sessions_and_statuses_survive_a_restart() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let org = OrgId::new();
    let (kept, dropped, renewed) = {
        let store = replica(&db, db.new_pool(), KEY).await;
        let kept = store.connect(org, "kept".into(), session(1)).await.unwrap();
        let dropped = store
            .connect(org, "dropped".into(), session(2))
            .await
            .unwrap();
        disconnect(&store, dropped.id).await;
        let renewed = store
            .connect(org, "renewed".into(), session(3))
            .await
            .unwrap();
        disconnect(&store, renewed.id).await;
        store.reconnect(renewed.id, session(33)).await.unwrap();
        (kept, dropped, renewed)
    };
    let store = replica(&db, db.new_pool(), KEY).await;
    assert_eq!(
        read(&store, kept.id).await,
        Some((session(1), ModelStatus::Connected))
    );
    assert_eq!(
        read(&store, dropped.id).await,
        Some((session(2), ModelStatus::Disconnected))
    );
    assert_eq!(
        read(&store, renewed.id).await,
        Some((session(33), ModelStatus::Connected))
    );
    let names: Vec<_> = store
        .list(org)
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.name, m.status))
        .collect();
    assert_eq!(
        names,
        [
            ("kept".to_owned(), ModelStatus::Connected),
            ("dropped".to_owned(), ModelStatus::Disconnected),
            ("renewed".to_owned(), ModelStatus::Connected),
        ]
    );
    db.cleanup().await;
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable() {
    let url = unreachable_url();
    let err = PostgresSessionStore::connect(&url, KEY).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");

    let pool = tollgate_postgres::connect_with(&url, &PoolOptions::default()).unwrap();
    let store = PostgresSessionStore::builder(pool, KEY)
        .with_listener(pg_config(&url, &PoolOptions::default()).unwrap())
        .with_migrations(false)
        .build()
        .await
        .unwrap();
    let (org, model) = (OrgId::new(), ModelId::new());
    let results = [
        store.session(model).await.map(drop),
        store.mark_disconnected(model, 1).await.map(drop),
        store.connect(org, "m".into(), session(1)).await.map(drop),
        store.reconnect(model, session(1)).await.map(drop),
        store.model(model).await.map(drop),
        store.list(org).await.map(drop),
    ];
    for result in results {
        assert_eq!(result.unwrap_err().kind(), BackendErrorKind::Unavailable);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_listener_falls_back_to_the_table() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let app = format!("sessions-listener-{}", db.schema());
    let mut config = listen_config(&db);
    config.application_name(&app);
    let store = PostgresSessionStore::builder(db.pool().clone(), KEY)
        .with_listener(config)
        .build()
        .await
        .unwrap();
    let m = store
        .connect(OrgId::new(), "m".into(), session(1))
        .await
        .unwrap();
    assert!(read(&store, m.id).await.is_some());
    // Changed behind the store's back (no NOTIFY), then the listener's connection dies.
    let client = db.pool().get().await.unwrap();
    client
        .execute("UPDATE tollgate_models SET status = 'disconnected'", &[])
        .await
        .unwrap();
    let killed: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    drop(client);
    eventually(Duration::from_secs(2), || async {
        read(&store, m.id).await.map(|(_, s)| s) == Some(ModelStatus::Disconnected)
    })
    .await
    .expect("without a live listener the table is read");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_disconnect_on_another_replica_leaves_the_new_session() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let a = replica(&db, db.pool().clone(), KEY).await;
    let b = replica(&db, db.new_pool(), KEY).await;
    let m = a
        .connect(OrgId::new(), "m".into(), session(1))
        .await
        .unwrap();
    // B serves a request with the first session (and caches it)...
    let old = b.session(m.id).await.unwrap().unwrap().version;
    // ...A reconnects the model, and B's late 401 arrives, maybe before the notification.
    a.reconnect(m.id, session(2)).await.unwrap().unwrap();
    assert!(!b.mark_disconnected(m.id, old).await.unwrap());
    for store in [&a, &b] {
        assert_eq!(
            read(store, m.id).await,
            Some((session(2), ModelStatus::Connected)),
            "B reads the table after a stale disconnect, A has the new session"
        );
    }
    // Nothing changed, so nothing was announced: the replicas still agree a second later.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for store in [&a, &b] {
        assert_eq!(
            read(store, m.id).await,
            Some((session(2), ModelStatus::Connected))
        );
        assert_eq!(
            store.model(m.id).await.unwrap().unwrap().status,
            ModelStatus::Connected
        );
    }
    // A 401 of the current session on B reaches A within a second.
    let current = b.session(m.id).await.unwrap().unwrap().version;
    assert!(current > old);
    assert!(b.mark_disconnected(m.id, current).await.unwrap());
    eventually(Duration::from_secs(1), || async {
        read(&a, m.id).await == Some((session(2), ModelStatus::Disconnected))
    })
    .await
    .expect("A sees the disconnection within 1 s");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_made_before_session_versions_keeps_working() {
    use tollgate_postgres::refinery::{Migration, Runner};
    use tollgate_upstream_sign::postgres::MIGRATION_SET;

    let Some(db) = TestDb::new().await else {
        return;
    };
    // The schema as the first release left it, with a model in it.
    let v1 =
        Migration::unapplied("V1__models", include_str!("../migrations/V1__models.sql")).unwrap();
    tollgate_postgres::run_migrations(db.pool(), MIGRATION_SET, Runner::new(&[v1]))
        .await
        .unwrap();
    let (org, id) = (OrgId::new(), ModelId::new());
    db.pool()
        .get()
        .await
        .unwrap()
        .execute(
            "INSERT INTO tollgate_models \
             (id, org_id, name, status, session_ciphertext, session_nonce) \
             VALUES ($1, $2, 'old', 'connected', '\\x00', $3)",
            &[id.as_uuid(), org.as_uuid(), &[0u8; 24].as_slice()],
        )
        .await
        .unwrap();

    // The current store migrates it on start; the old row is at version 1.
    let store = replica(&db, db.new_pool(), KEY).await;
    assert_eq!(
        store.list(org).await.unwrap()[0].status,
        ModelStatus::Connected
    );
    assert!(store.mark_disconnected(id, 1).await.unwrap());
    assert_eq!(
        store.model(id).await.unwrap().unwrap().status,
        ModelStatus::Disconnected
    );
    store.reconnect(id, session(7)).await.unwrap().unwrap();
    let read_back = store.session(id).await.unwrap().unwrap();
    assert_eq!(
        (read_back.session, read_back.status, read_back.version),
        (session(7), ModelStatus::Connected, 2)
    );
    assert!(!store.mark_disconnected(id, 1).await.unwrap());
    db.cleanup().await;
}
