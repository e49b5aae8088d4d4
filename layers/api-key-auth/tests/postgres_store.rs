//! `PostgresKeyStore` on the real server (`DATABASE_URL`, default 127.0.0.1:5432), each test
//! in a fresh schema: the shared behaviour suite, then what only a shared database has —
//! several replicas, restarts, the cache and its invalidation, an unreachable server.
//! Skipped when the server is unreachable, unless `TOLLGATE_REQUIRE_SERVICES=1`.

#![cfg(feature = "postgres")]

mod suite;

use std::sync::Arc;
use std::time::{Duration, Instant};

use suite::{Env, START_MS};
use tollgate_api_key_auth::{
    generate_key, key::is_well_formed, KeyHash, KeyStatus, KeyStore, PostgresKeyStore,
};
use tollgate_core::{BackendErrorKind, KeyId, ManualClock, ModelId, OrgId, Plan};
use tollgate_postgres::testing::{unreachable_url, TestDb};
use tollgate_postgres::{pg_config, tokio_postgres, Pool, PoolOptions};

fn listen_config(db: &TestDb, app: &str) -> tokio_postgres::Config {
    let mut config = pg_config(db.url(), &db.pool_options()).unwrap();
    config.application_name(app);
    config
}

/// A replica: its own pool and listener on the test schema.
async fn replica(db: &TestDb, pool: Pool, clock: &ManualClock) -> PostgresKeyStore {
    let store = PostgresKeyStore::builder(pool)
        .with_listener(listen_config(db, "tollgate-test"))
        .with_clock(Arc::new(clock.clone()))
        .build()
        .await
        .unwrap();
    assert!(store.cache_is_live(), "the listener starts within 2 s");
    store
}

async fn postgres() -> Option<Env<PostgresKeyStore>> {
    let db = TestDb::new().await?;
    let clock = ManualClock::new(START_MS);
    let store = replica(&db, db.pool().clone(), &clock).await;
    Some(Env {
        store: Arc::new(store),
        clock,
        db: Some(db),
    })
}

crate::key_store_suite!(postgres);

/// Polls `check` until it holds, for at most `within`; returns how long it took.
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

async fn sql(db: &TestDb, statement: &str) -> u64 {
    db.pool()
        .get()
        .await
        .unwrap()
        .execute(statement, &[])
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revocation_on_one_replica_is_enforced_by_the_other_within_a_second() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let clock = ManualClock::new(START_MS);
    let a = replica(&db, db.pool().clone(), &clock).await;
    let b = replica(&db, db.new_pool(), &clock).await;
    let (org, model) = (OrgId::new(), ModelId::new());
    a.set_subscription(org, Some(Plan::Basic)).await.unwrap();
    let key = a.create_key(org, "shared".to_owned()).await.unwrap();
    let hash = KeyHash::of(&key.secret);

    // B knows the key (and caches it) and refuses the model until A adds it.
    assert_eq!(b.lookup(hash).await.unwrap().map(|g| g.key), Some(key.id));
    assert!(!b.owns_model(org, model).await.unwrap());
    a.add_model(org, model).await.unwrap();
    let took = eventually(Duration::from_secs(1), || async {
        b.owns_model(org, model).await.unwrap()
    })
    .await
    .expect("B sees the new model within 1 s");
    println!("model ownership reached B after {took:?}");

    assert!(a.revoke_key(key.id).await.unwrap());
    let took = eventually(Duration::from_secs(1), || async {
        b.lookup(hash).await.unwrap().is_none()
    })
    .await
    .expect("B refuses the revoked key within 1 s");
    println!("revocation reached B after {took:?}");
    // And it stays refused.
    for _ in 0..20 {
        assert_eq!(b.lookup(hash).await.unwrap(), None);
    }
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_and_plan_changes_reach_the_other_replica_within_a_second() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let clock = ManualClock::new(START_MS);
    let a = replica(&db, db.pool().clone(), &clock).await;
    let b = replica(&db, db.new_pool(), &clock).await;
    let org = OrgId::new();
    a.set_subscription(org, Some(Plan::Pro)).await.unwrap();
    let old = a.create_key(org, "deploy".to_owned()).await.unwrap();
    assert_eq!(
        b.lookup(KeyHash::of(&old.secret))
            .await
            .unwrap()
            .and_then(|g| g.plan),
        Some(Plan::Pro)
    );

    // The new key works on B at once; the old one stops within a second.
    let new = a.rotate_key(old.id).await.unwrap().unwrap();
    assert_eq!(
        b.lookup(KeyHash::of(&new.secret))
            .await
            .unwrap()
            .map(|g| g.key),
        Some(new.id)
    );
    eventually(Duration::from_secs(1), || async {
        b.lookup(KeyHash::of(&old.secret)).await.unwrap().is_none()
    })
    .await
    .expect("the rotated-away key is refused by B within 1 s");

    // Cancelling on A: B's grant loses its plan (→ 402) within a second.
    a.set_subscription(org, None).await.unwrap();
    eventually(Duration::from_secs(1), || async {
        b.lookup(KeyHash::of(&new.secret))
            .await
            .unwrap()
            .unwrap()
            .plan
            .is_none()
    })
    .await
    .expect("B sees the cancellation within 1 s");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn everything_survives_a_restart() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let clock = ManualClock::new(START_MS);
    let (org, model, other_model) = (OrgId::new(), ModelId::new(), ModelId::new());
    let (kept, revoked, rotated_to, used_late) = {
        let store = replica(&db, db.new_pool(), &clock).await;
        store
            .set_subscription(org, Some(Plan::Enterprise))
            .await
            .unwrap();
        store.add_model(org, model).await.unwrap();
        store.add_model(OrgId::new(), other_model).await.unwrap();
        let kept = store.create_key(org, "kept".to_owned()).await.unwrap();
        let revoked = store.create_key(org, "revoked".to_owned()).await.unwrap();
        store.revoke_key(revoked.id).await.unwrap();
        let rotating = store.create_key(org, "rotating".to_owned()).await.unwrap();
        let rotated_to = store.rotate_key(rotating.id).await.unwrap().unwrap();
        store.record_use(kept.id, START_MS + 42_000);
        store.flush_last_used().await.unwrap();
        // Buffered at shutdown: written by the background writer when the store goes.
        let used_late = store.create_key(org, "late".to_owned()).await.unwrap();
        store.record_use(used_late.id, START_MS + 43_000);
        drop(store);
        (kept, revoked, rotated_to, used_late)
    };
    // The first "process" had its own pool, gone with the store (after its last flush).
    let store = replica(&db, db.new_pool(), &clock).await;
    let grant = store
        .lookup(KeyHash::of(&kept.secret))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (grant.key, grant.org, grant.plan),
        (kept.id, org, Some(Plan::Enterprise))
    );
    assert_eq!(
        store.lookup(KeyHash::of(&revoked.secret)).await.unwrap(),
        None
    );
    assert!(store
        .lookup(KeyHash::of(&rotated_to.secret))
        .await
        .unwrap()
        .is_some());
    assert!(store.owns_model(org, model).await.unwrap());
    assert!(!store.owns_model(org, other_model).await.unwrap());
    let listed = store.list_keys(org).await.unwrap();
    let summary: Vec<_> = listed.iter().map(|k| (k.name.as_str(), k.status)).collect();
    assert_eq!(
        summary,
        [
            ("kept", KeyStatus::Active),
            ("revoked", KeyStatus::Revoked),
            ("rotating", KeyStatus::Revoked),
            ("rotating", KeyStatus::Active),
            ("late", KeyStatus::Active),
        ]
    );
    assert_eq!(listed[0].last_used_at_ms, Some(START_MS + 42_000));
    assert_eq!(listed[0].created_at_ms, START_MS);
    let late = eventually(Duration::from_secs(3), || async {
        store
            .key_info(used_late.id)
            .await
            .unwrap()
            .unwrap()
            .last_used_at_ms
            == Some(START_MS + 43_000)
    })
    .await;
    assert!(
        late.is_some(),
        "the buffer is flushed when the store is dropped"
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_stored_as_sha256_only() {
    let Some(env) = postgres().await else { return };
    let db = env.db.as_ref().unwrap();
    let org = OrgId::new();
    let key = env
        .store
        .create_key(org, "audited".to_owned())
        .await
        .unwrap();
    let client = db.pool().get().await.unwrap();
    let row = client
        .query_one(
            "SELECT key_hash, prefix, t::text FROM tollgate_api_keys t WHERE id = $1",
            &[key.id.as_uuid()],
        )
        .await
        .unwrap();
    let hash: Vec<u8> = row.get(0);
    let prefix: String = row.get(1);
    let whole_row: String = row.get(2);
    assert_eq!(hash, KeyHash::of(&key.secret).as_bytes());
    assert_eq!(prefix, key.secret[..12]);
    assert!(!whole_row.contains(&key.secret[12..]), "{whole_row}");
    // Nowhere else in the schema either.
    let dump: String = client
        .query_one(
            "SELECT string_agg(x::text, ' ') FROM (
                SELECT t::text AS x FROM tollgate_api_keys t
                UNION ALL SELECT t::text FROM tollgate_org_plans t
                UNION ALL SELECT t::text FROM tollgate_model_owners t) s",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!dump.contains(&key.secret[12..]));
    drop(client);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_lookups_do_not_read_the_table_and_the_ttl_is_a_backstop() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let clock = ManualClock::new(START_MS);
    let store = PostgresKeyStore::builder(db.pool().clone())
        .with_listener(listen_config(&db, "tollgate-test"))
        .with_clock(Arc::new(clock.clone()))
        .with_cache_ttl(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let org = OrgId::new();
    store
        .set_subscription(org, Some(Plan::Basic))
        .await
        .unwrap();
    let key = store.create_key(org, "k".to_owned()).await.unwrap();
    let hash = KeyHash::of(&key.secret);
    assert!(store.lookup(hash).await.unwrap().is_some());

    // Behind the store's back (no NOTIFY): cached answers don't see it...
    assert_eq!(
        sql(&db, "UPDATE tollgate_api_keys SET status = 'revoked'").await,
        1
    );
    for _ in 0..50 {
        assert!(
            store.lookup(hash).await.unwrap().is_some(),
            "served from the cache"
        );
    }
    // ... until the TTL runs out.
    eventually(Duration::from_secs(2), || async {
        store.lookup(hash).await.unwrap().is_none()
    })
    .await
    .expect("the TTL backstop expires the entry");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_listener_fails_closed_and_flushes_the_cache() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let clock = ManualClock::new(START_MS);
    let app = format!("keys-listener-{}", db.schema());
    let store = PostgresKeyStore::builder(db.pool().clone())
        .with_listener(listen_config(&db, &app))
        .with_clock(Arc::new(clock.clone()))
        .build()
        .await
        .unwrap();
    let org = OrgId::new();
    store
        .set_subscription(org, Some(Plan::Basic))
        .await
        .unwrap();
    let key = store.create_key(org, "k".to_owned()).await.unwrap();
    let hash = KeyHash::of(&key.secret);
    assert!(store.lookup(hash).await.unwrap().is_some());

    // A change whose notification this replica never gets (written behind its back), then
    // its listening connection dies.
    sql(&db, "UPDATE tollgate_api_keys SET status = 'revoked'").await;
    let killed = db
        .pool()
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(killed, 1);
    eventually(Duration::from_secs(2), || async {
        store.lookup(hash).await.unwrap().is_none()
    })
    .await
    .expect("without a listener the cache is not trusted");
    // The listener comes back and the cache is used again.
    eventually(Duration::from_secs(5), || async { store.cache_is_live() })
        .await
        .expect("the listener reconnects");
    db.cleanup().await;
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable() {
    let url = unreachable_url();
    let err = PostgresKeyStore::connect(&url).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");

    // A store whose database went away (migrations done earlier by someone else).
    let pool = tollgate_postgres::connect_with(&url, &PoolOptions::default()).unwrap();
    let store = PostgresKeyStore::builder(pool)
        .with_listener(pg_config(&url, &PoolOptions::default()).unwrap())
        .with_migrations(false)
        .build()
        .await
        .unwrap();
    assert!(!store.cache_is_live());
    let (org, key, model) = (OrgId::new(), KeyId::new(), ModelId::new());
    let kinds = [
        store.lookup(KeyHash::of("sk_live_x")).await.map(drop),
        store.owns_model(org, model).await.map(drop),
        store.set_subscription(org, Some(Plan::Free)).await,
        store.add_model(org, model).await.map(drop),
        store.create_key(org, "k".to_owned()).await.map(drop),
        store.revoke_key(key).await.map(drop),
        store.rotate_key(key).await.map(drop),
        store.list_keys(org).await.map(drop),
        store.key_info(key).await.map(drop),
    ];
    for result in kinds {
        assert_eq!(result.unwrap_err().kind(), BackendErrorKind::Unavailable);
    }
    // record_use never blocks or fails; the write is retried later.
    store.record_use(key, START_MS);
    assert_eq!(
        store.flush_last_used().await.unwrap_err().kind(),
        BackendErrorKind::Unavailable
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_at_once_migrate_once() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let clock = ManualClock::new(START_MS);
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let pool = db.new_pool();
            let clock = clock.clone();
            tokio::spawn(async move {
                PostgresKeyStore::builder(pool)
                    .with_clock(Arc::new(clock))
                    .build()
                    .await
            })
        })
        .collect();
    let mut stores = Vec::new();
    for start in starts {
        stores.push(start.await.unwrap().unwrap());
    }
    let applied: i64 = db
        .pool()
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM tollgate_api_key_auth_migrations", &[])
        .await
        .unwrap()
        .get(0);
    // Each migration once (V1 keys, V2 key lifecycle), however many replicas raced.
    assert_eq!(applied, 2);
    // Without a listener there is no cache: every replica reads the table and agrees.
    let org = OrgId::new();
    stores[0]
        .set_subscription(org, Some(Plan::Pro))
        .await
        .unwrap();
    let key = stores[1].create_key(org, "k".to_owned()).await.unwrap();
    for store in &stores {
        assert!(!store.cache_is_live());
        assert_eq!(
            store
                .lookup(KeyHash::of(&key.secret))
                .await
                .unwrap()
                .map(|g| g.plan),
            Some(Some(Plan::Pro))
        );
    }
    stores[2].revoke_key(key.id).await.unwrap();
    for store in &stores {
        assert_eq!(store.lookup(KeyHash::of(&key.secret)).await.unwrap(), None);
    }
    drop(stores);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_used_is_written_in_the_background() {
    let Some(env) = postgres().await else { return };
    let db = env.db.as_ref().unwrap();
    let org = OrgId::new();
    let keys: Vec<_> = {
        let mut keys = Vec::new();
        for i in 0..20 {
            keys.push(env.store.create_key(org, format!("k{i}")).await.unwrap());
        }
        keys
    };
    for round in 0..100u64 {
        for key in &keys {
            env.store.record_use(key.id, START_MS + round * 100);
        }
    }
    let written = eventually(Duration::from_secs(3), || async {
        let n: i64 = db
            .pool()
            .get()
            .await
            .unwrap()
            .query_one(
                "SELECT count(*) FROM tollgate_api_keys WHERE last_used_at = $1",
                &[&chrono_ms(START_MS + 9_900)],
            )
            .await
            .unwrap()
            .get(0);
        n == 20
    })
    .await;
    assert!(
        written.is_some(),
        "every key's latest use reaches the table"
    );
    env.cleanup().await;
}

fn chrono_ms(ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spray_of_random_keys_leaves_valid_keys_cached() {
    const VALID: usize = 50;
    const SPRAY: usize = 100_000;
    const NEGATIVE_CAPACITY: u64 = 10_000;
    // Requests of a spray arrive concurrently.
    const WORKERS: usize = 50;
    let Some(db) = TestDb::new().await else {
        return;
    };
    let store = PostgresKeyStore::builder(db.pool().clone())
        .with_listener(listen_config(&db, "tollgate-test"))
        // Long enough that no valid entry expires during the test, however slow the machine.
        .with_cache_ttl(Duration::from_secs(600))
        .build()
        .await
        .unwrap();
    assert!(store.cache_is_live());
    let org = OrgId::new();
    store.set_subscription(org, Some(Plan::Pro)).await.unwrap();
    let mut valid = Vec::new();
    for i in 0..VALID {
        let key = store.create_key(org, format!("k{i}")).await.unwrap();
        valid.push((KeyHash::of(&key.secret), key.id));
    }
    for (hash, id) in &valid {
        assert_eq!(store.lookup(*hash).await.unwrap().map(|g| g.key), Some(*id));
    }
    let warm = store.cache_stats();
    assert_eq!(warm.cached_keys, VALID);
    assert_eq!(warm.key_lookups, VALID as u64);
    assert_eq!(
        warm.lookup_statements, VALID as u64,
        "one at a time, one statement each"
    );

    // One bogus key asked for again and again costs one query.
    let bogus = KeyHash::of(&generate_key().unwrap().secret);
    for _ in 0..100 {
        assert_eq!(store.lookup(bogus).await.unwrap(), None);
    }
    let once = store.cache_stats();
    assert_eq!(
        (once.key_lookups, once.lookup_statements),
        (warm.key_lookups + 1, warm.lookup_statements + 1)
    );

    // The spray: random keys in the real format, each one new.
    let started = Instant::now();
    let tasks: Vec<_> = (0..WORKERS)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..SPRAY / WORKERS {
                    let key = generate_key().unwrap();
                    assert!(is_well_formed(key.secret.as_bytes()));
                    assert_eq!(store.lookup(key.hash).await.unwrap(), None);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let sprayed = store.cache_stats();
    println!(
        "{SPRAY} random keys in {:?}: {} looked up in {} statements, {} remembered as unknown",
        started.elapsed(),
        sprayed.key_lookups - warm.key_lookups - 1,
        sprayed.lookup_statements - warm.lookup_statements - 1,
        sprayed.unknown_keys
    );
    assert_eq!(
        sprayed.key_lookups,
        warm.key_lookups + 1 + SPRAY as u64,
        "each distinct unknown key is looked up once"
    );
    let statements = sprayed.lookup_statements - warm.lookup_statements - 1;
    assert!(
        statements * 4 <= SPRAY as u64,
        "concurrent lookups share statements: {statements} for {SPRAY} keys"
    );
    assert!(
        sprayed.unknown_keys <= NEGATIVE_CAPACITY,
        "the negative cache stays within its bound: {}",
        sprayed.unknown_keys
    );
    assert_eq!(sprayed.cached_keys, VALID, "no valid key was evicted");

    // Every valid key is still answered from the cache: no database lookup.
    for (hash, id) in &valid {
        assert_eq!(store.lookup(*hash).await.unwrap().map(|g| g.key), Some(*id));
    }
    assert_eq!(store.cache_stats().key_lookups, sprayed.key_lookups);

    // Revocation is still immediate for a cached key.
    assert!(store.revoke_key(valid[0].1).await.unwrap());
    assert_eq!(store.lookup(valid[0].0).await.unwrap(), None);
    db.cleanup().await;
}
