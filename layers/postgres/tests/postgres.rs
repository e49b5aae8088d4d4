//! Against the real server (`DATABASE_URL`, default 127.0.0.1:5432), each test in a fresh
//! schema; skipped when the server is unreachable unless `TOLLGATE_REQUIRE_SERVICES=1`.

use std::time::Duration;

use refinery::{Migration, Runner};
use tollgate_core::BackendErrorKind;
use tollgate_postgres::testing::{unreachable_url, TestDb};
use tollgate_postgres::{connect, connect_with, run_migrations, to_backend_error, PoolOptions};

fn runner(sqls: &[(&str, &str)]) -> Runner {
    let migrations: Vec<Migration> = sqls
        .iter()
        .map(|(name, sql)| Migration::unapplied(name, sql).unwrap())
        .collect();
    Runner::new(&migrations)
}

/// Fails when applied twice: the table exists already and the row would be duplicated.
const V1: (&str, &str) = (
    "V1__create_widgets",
    "CREATE TABLE widgets (id int PRIMARY KEY); INSERT INTO widgets VALUES (1);",
);
const V2: (&str, &str) = ("V2__add_name", "ALTER TABLE widgets ADD COLUMN name text;");

async fn count(db: &TestDb, sql: &str) -> i64 {
    let client = db.pool().get().await.unwrap();
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn migrations_apply_once_into_the_schema_with_their_own_history_table() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    run_migrations(db.pool(), "widgets", runner(&[V1]))
        .await
        .unwrap();
    // A later version adds V2 only; V1 is not re-run (it would fail).
    run_migrations(db.pool(), "widgets", runner(&[V1, V2]))
        .await
        .unwrap();
    run_migrations(db.pool(), "widgets", runner(&[V1, V2]))
        .await
        .unwrap();

    assert_eq!(count(&db, "SELECT count(*) FROM widgets").await, 1);
    let client = db.pool().get().await.unwrap();
    let tables: Vec<String> = client
        .query(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = $1 ORDER BY 1",
            &[&db.schema()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tables, ["tollgate_widgets_migrations", "widgets"]);
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM tollgate_widgets_migrations ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1, 2]);
    // Nothing leaked into public.
    let leaked: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.tables \
             WHERE table_schema = 'public' AND table_name = 'tollgate_widgets_migrations'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0);
    drop(client);
    db.cleanup().await;
}

#[tokio::test]
async fn two_sets_keep_separate_histories() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    run_migrations(db.pool(), "widgets", runner(&[V1]))
        .await
        .unwrap();
    run_migrations(
        db.pool(),
        "gadgets",
        runner(&[("V1__create_gadgets", "CREATE TABLE gadgets (id int);")]),
    )
    .await
    .unwrap();
    assert_eq!(
        count(&db, "SELECT count(*) FROM tollgate_widgets_migrations").await,
        1
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM tollgate_gadgets_migrations").await,
        1
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_at_once_apply_each_migration_exactly_once() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    // Each "replica" has its own pool, as separate processes would.
    let runs: Vec<_> = (0..6)
        .map(|_| {
            let pool = db.new_pool();
            tokio::spawn(async move {
                let result = run_migrations(&pool, "widgets", runner(&[V1, V2])).await;
                pool.close();
                result
            })
        })
        .collect();
    for run in runs {
        run.await.unwrap().unwrap();
    }
    assert_eq!(count(&db, "SELECT count(*) FROM widgets").await, 1);
    assert_eq!(
        count(&db, "SELECT count(*) FROM tollgate_widgets_migrations").await,
        2
    );
    db.cleanup().await;
}

#[tokio::test]
async fn a_changed_migration_is_refused() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    run_migrations(db.pool(), "widgets", runner(&[V1]))
        .await
        .unwrap();
    let changed = ("V1__create_widgets", "CREATE TABLE widgets (id bigint);");
    let err = run_migrations(db.pool(), "widgets", runner(&[changed]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Other);
    db.cleanup().await;
}

#[tokio::test]
async fn a_failing_migration_is_rolled_back_and_reported() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let broken = (
        "V1__broken",
        "CREATE TABLE half (id int); SELECT * FROM no_such_table;",
    );
    let err = run_migrations(db.pool(), "widgets", runner(&[broken]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Other);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'half' \
             AND table_schema = current_schema()"
        )
        .await,
        0
    );
    // The lock was released: a fixed set applies afterwards.
    run_migrations(db.pool(), "widgets", runner(&[V1]))
        .await
        .unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn unreachable_server_is_unavailable() {
    let pool = connect(&unreachable_url()).unwrap();
    let err = pool
        .get()
        .await
        .map(drop)
        .map_err(to_backend_error)
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
    let err = run_migrations(&pool, "widgets", runner(&[V1]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
}

#[tokio::test]
async fn a_non_routable_server_times_out_as_unavailable() {
    // 10.255.255.1 drops packets on most networks; the connect timeout bounds the wait.
    let pool = connect_with(
        "postgres://postgres@10.255.255.1:5432/test",
        &PoolOptions::default().with_connect_timeout(Duration::from_millis(200)),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let err = pool
        .get()
        .await
        .map(drop)
        .map_err(to_backend_error)
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn statement_timeout_is_unavailable_and_constraint_violations_are_other() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let pool = connect_with(
        db.url(),
        &db.pool_options()
            .with_statement_timeout(Duration::from_millis(100)),
    )
    .unwrap();
    let client = pool.get().await.unwrap();
    let err = client
        .batch_execute("SELECT pg_sleep(2)")
        .await
        .map_err(to_backend_error)
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
    // The log line says what the server answered, not just "db error".
    assert_eq!(
        err.to_string(),
        "backend unavailable: db error 57014: canceling statement due to statement timeout"
    );

    client
        .batch_execute("CREATE TABLE u (id int PRIMARY KEY); INSERT INTO u VALUES (1)")
        .await
        .unwrap();
    let err = client
        .execute("INSERT INTO u VALUES (1)", &[])
        .await
        .map_err(to_backend_error)
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Other, "{err}");
    // The server's DETAIL (which quotes the row's values) stays out of the message.
    let message = err.to_string();
    assert!(
        message.starts_with("backend error: db error 23505: duplicate key"),
        "{message}"
    );
    assert!(!message.contains("(id)=(1)"), "{message}");
    let err = client
        .execute("SELECT * FROM no_such_table", &[])
        .await
        .map_err(to_backend_error)
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Other, "{err}");
    drop(client);
    pool.close();
    db.cleanup().await;
}

#[tokio::test]
async fn a_killed_connection_is_unavailable() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let client = db.pool().get().await.unwrap();
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let other = db.new_pool();
    other
        .get()
        .await
        .unwrap()
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let err = client
        .execute("SELECT 1", &[])
        .await
        .map_err(to_backend_error)
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
    drop(client);
    other.close();
    db.cleanup().await;
}

#[tokio::test]
async fn test_schemas_are_fresh_and_dropped() {
    let Some(a) = TestDb::new().await else { return };
    let b = TestDb::new().await.unwrap();
    assert_ne!(a.schema(), b.schema());
    let client = a.pool().get().await.unwrap();
    let current: String = client
        .query_one("SELECT current_schema()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(current, a.schema());
    client
        .batch_execute("CREATE TABLE only_in_a (x int)")
        .await
        .unwrap();
    let seen_from_b: i64 = b
        .pool()
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM information_schema.tables \
             WHERE table_name = 'only_in_a' AND table_schema = current_schema()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen_from_b, 0);
    drop(client);

    let (a_name, b_name) = (a.schema().to_owned(), b.schema().to_owned());
    a.cleanup().await;
    drop(b); // best-effort drop path
    let checker = TestDb::new().await.unwrap();
    let left: i64 = checker
        .pool()
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1 OR nspname = $2",
            &[&a_name, &b_name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    checker.cleanup().await;
}

mod listener {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tollgate_postgres::testing::{unreachable_url, TestDb};
    use tollgate_postgres::{
        pg_config, Listener, ListenerOptions, NotificationHandler, PoolOptions,
    };

    #[derive(Default)]
    struct Recorder {
        events: Mutex<Vec<String>>,
    }

    impl NotificationHandler for Recorder {
        fn notification(&self, payload: &str) {
            self.events.lock().unwrap().push(payload.to_owned());
        }
        fn reset(&self) {
            self.events.lock().unwrap().push("<reset>".to_owned());
        }
    }

    impl Recorder {
        fn events(&self) -> Vec<String> {
            self.events.lock().unwrap().clone()
        }

        async fn wait_for(&self, event: &str, within: Duration) -> bool {
            let deadline = tokio::time::Instant::now() + within;
            while tokio::time::Instant::now() < deadline {
                if self.events().iter().any(|e| e == event) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        }
    }

    fn config(db: &TestDb, app: &str) -> tokio_postgres::Config {
        let mut config = pg_config(db.url(), &db.pool_options()).unwrap();
        config.application_name(app);
        config
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn notifications_arrive_and_a_lost_connection_resets_and_reconnects() {
        let Some(db) = TestDb::new().await else {
            return;
        };
        let app = format!("listener_{}", db.schema());
        let recorder = Arc::new(Recorder::default());
        // Channels are database-wide: name it after the schema so parallel tests don't mix.
        let channel = format!("chan_{}", db.schema());
        let listener = Listener::spawn(
            config(&db, &app),
            &channel,
            recorder.clone(),
            ListenerOptions::default(),
        )
        .unwrap();
        assert!(listener.wait_live(Duration::from_secs(5)).await);
        assert_eq!(recorder.events(), ["<reset>"]);

        let client = db.pool().get().await.unwrap();
        client
            .execute("SELECT pg_notify($1, 'key:1')", &[&channel])
            .await
            .unwrap();
        assert!(recorder.wait_for("key:1", Duration::from_secs(1)).await);

        // Kill the listening backend: the listener notices, resets, reconnects, listens again.
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
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while listener.sessions() < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(listener.sessions(), 2);
        assert!(listener.wait_live(Duration::from_secs(5)).await);
        let resets = recorder.events().iter().filter(|e| *e == "<reset>").count();
        assert!(resets >= 2, "{:?}", recorder.events());
        client
            .execute("SELECT pg_notify($1, 'key:2')", &[&channel])
            .await
            .unwrap();
        assert!(recorder.wait_for("key:2", Duration::from_secs(1)).await);

        drop(listener);
        drop(client);
        db.cleanup().await;
    }

    #[tokio::test]
    async fn an_unreachable_server_is_never_live() {
        let config = pg_config(&unreachable_url(), &PoolOptions::default()).unwrap();
        let recorder = Arc::new(Recorder::default());
        let listener = Listener::spawn(
            config,
            "tollgate_keys",
            recorder,
            ListenerOptions::default(),
        )
        .unwrap();
        assert!(!listener.wait_live(Duration::from_millis(300)).await);
        assert!(!listener.is_connected());
    }

    #[tokio::test]
    async fn channel_names_must_be_identifiers() {
        let config = pg_config("postgres://u@127.0.0.1/db", &PoolOptions::default()).unwrap();
        let recorder = Arc::new(Recorder::default());
        assert!(
            Listener::spawn(config, "a; NOTIFY x", recorder, ListenerOptions::default()).is_err()
        );
    }
}
