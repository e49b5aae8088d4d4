//! The store behaviour suite against the memory, PostgreSQL and Redis stores.
//!
//! PostgreSQL (`DATABASE_URL`) and Redis (`REDIS_URL`) tests skip when the server is
//! unreachable, unless `TOLLGATE_REQUIRE_SERVICES=1`, which makes that a failure.

mod suite;

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use tollgate_core::{BackendErrorKind, Clock, ManualClock, SystemClock};
use tollgate_idempotency::{
    Fingerprint, IdempotencyStore, MemoryIdempotencyStore, PostgresIdempotencyStore,
    RedisIdempotencyStore,
};
use tollgate_postgres::testing::{require_services, unreachable_url, TestDb};

fn clock() -> ManualClock {
    // Real time, so Redis's own expiry of the records lies after the clock's.
    ManualClock::new(SystemClock.now_ms())
}

#[tokio::test]
async fn memory_store() {
    let clock = clock();
    let store = MemoryIdempotencyStore::new(clock.clone());
    suite::run_all(&store, &clock).await;
}

#[tokio::test]
async fn memory_store_purges_what_expired() {
    let clock = clock();
    let store = MemoryIdempotencyStore::new(clock.clone());
    let fp = Fingerprint::new(&Method::POST, "/x", b"");
    store
        .begin("org", "a", fp, Duration::from_secs(1))
        .await
        .unwrap();
    store
        .begin("org", "b", fp, Duration::from_secs(5))
        .await
        .unwrap();
    clock.advance(Duration::from_secs(2));
    assert_eq!(store.purge_expired().await.unwrap(), 1);
    assert_eq!(store.len(), 1);
}

#[tokio::test]
async fn postgres_store() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    PostgresIdempotencyStore::migrate(db.pool()).await.unwrap();
    // Migrating again (another replica starting) changes nothing.
    PostgresIdempotencyStore::migrate(&db.new_pool())
        .await
        .unwrap();
    let clock = clock();
    let store = PostgresIdempotencyStore::new(db.pool().clone(), clock.clone());
    suite::run_all(&store, &clock).await;

    // Purging deletes the expired rows only.
    clock.advance(Duration::from_secs(25 * 60 * 60));
    let fp = Fingerprint::new(&Method::POST, "/x", b"");
    store
        .begin("org", "live", fp, Duration::from_secs(30))
        .await
        .unwrap();
    let purged = store.purge_expired().await.unwrap();
    assert!(purged > 0);
    let client = db.pool().get().await.unwrap();
    let left: i64 = client
        .query_one("SELECT count(*) FROM tollgate_idempotency_keys", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1);
    drop(client);
    db.cleanup().await;
}

#[tokio::test]
async fn postgres_replicas_share_keys() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    PostgresIdempotencyStore::migrate(db.pool()).await.unwrap();
    let clock = clock();
    let a = PostgresIdempotencyStore::new(db.pool().clone(), clock.clone());
    let b = PostgresIdempotencyStore::new(db.new_pool(), clock.clone());
    let fp = Fingerprint::new(&Method::POST, "/x", b"{}");
    let lease = match a
        .begin("org", "k", fp, Duration::from_secs(30))
        .await
        .unwrap()
    {
        tollgate_idempotency::Begin::Started(lease) => lease,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        b.begin("org", "k", fp, Duration::from_secs(30))
            .await
            .unwrap(),
        tollgate_idempotency::Begin::InFlight
    );
    assert!(
        b.release(&lease).await.unwrap(),
        "any replica can give a lease back"
    );
    db.cleanup().await;
}

#[tokio::test]
async fn postgres_unreachable_is_unavailable() {
    let pool = tollgate_postgres::connect(&unreachable_url()).unwrap();
    let store = PostgresIdempotencyStore::new(pool, SystemClock);
    let fp = Fingerprint::new(&Method::POST, "/x", b"");
    let err = store
        .begin("org", "k", fp, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable);
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn redis_store(clock: &ManualClock) -> Option<RedisIdempotencyStore> {
    let url = redis_url();
    let store = RedisIdempotencyStore::open(&url)
        .unwrap()
        .with_key_prefix(format!("tollgate-test-{}", tollgate_core::OrgId::new()))
        .with_clock(Arc::new(clock.clone()));
    match store.ping().await {
        Ok(()) => Some(store),
        Err(e) if require_services() => {
            panic!("TOLLGATE_REQUIRE_SERVICES=1 but Redis at {url} is unreachable: {e}")
        }
        Err(e) => {
            eprintln!("skipping: Redis at {url} is unreachable: {e}");
            None
        }
    }
}

#[tokio::test]
async fn redis_store_suite() {
    let clock = clock();
    let Some(store) = redis_store(&clock).await else {
        return;
    };
    suite::run_all(&store, &clock).await;
}

#[tokio::test]
async fn redis_records_expire_in_redis() {
    let clock = clock();
    let Some(store) = redis_store(&clock).await else {
        return;
    };
    let fp = Fingerprint::new(&Method::POST, "/x", b"");
    store
        .begin("org", "k", fp, Duration::from_secs(30))
        .await
        .unwrap();
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(store.key("org", "k"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((29_000..=30_000).contains(&ttl), "{ttl}");
}

#[tokio::test]
async fn redis_unreachable_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = RedisIdempotencyStore::open(&format!("redis://127.0.0.1:{port}")).unwrap();
    let fp = Fingerprint::new(&Method::POST, "/x", b"");
    let err = store
        .begin("org", "k", fp, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable);
}
