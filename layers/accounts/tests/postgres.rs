//! The PostgreSQL stores on the real server (`DATABASE_URL`, default 127.0.0.1:5432), each
//! test in a fresh schema: the shared behaviour suites, then what only a shared database
//! has — several replicas, restarts, an unreachable server. Skipped when the server is
//! unreachable, unless `TOLLGATE_REQUIRE_SERVICES=1`.

#![cfg(feature = "postgres")]

mod suite;

use std::sync::Arc;

use suite::{Env, START_MS};
use tollgate_accounts::{
    DashboardSessionStore, Granularity, GroupBy, NewInvite, PostgresDashboardSessionStore,
    PostgresUsageStore, PostgresUserStore, Role, SecretToken, SessionSubject, SignInGate,
    UsageBatch, UsageQuery, UsageStore, UserStore, HOUR_MS, MAX_SIGN_IN_FAILURES,
};
use tollgate_core::{BackendErrorKind, ManualClock, OrgId, SharedClock};
use tollgate_postgres::testing::{unreachable_url, TestDb};

fn shared(clock: &ManualClock) -> SharedClock {
    Arc::new(clock.clone())
}

async fn user_store() -> Option<Env<PostgresUserStore>> {
    let db = TestDb::new().await?;
    let clock = ManualClock::new(START_MS);
    let store = PostgresUserStore::new(db.pool().clone(), shared(&clock))
        .await
        .unwrap();
    Some(Env {
        store: Arc::new(store),
        clock,
        db: Some(db),
    })
}

async fn session_store() -> Option<Env<PostgresDashboardSessionStore>> {
    let db = TestDb::new().await?;
    let clock = ManualClock::new(START_MS);
    let store = PostgresDashboardSessionStore::new(db.pool().clone(), shared(&clock))
        .await
        .unwrap();
    Some(Env {
        store: Arc::new(store),
        clock,
        db: Some(db),
    })
}

async fn usage_store() -> Option<Env<PostgresUsageStore>> {
    let db = TestDb::new().await?;
    let clock = ManualClock::new(START_MS);
    let store = PostgresUsageStore::new(db.pool().clone(), shared(&clock))
        .await
        .unwrap();
    Some(Env {
        store: Arc::new(store),
        clock,
        db: Some(db),
    })
}

crate::user_store_suite!(user_store);
crate::session_store_suite!(session_store);
crate::usage_store_suite!(usage_store);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_users_sessions_throttle_and_rollups_and_restarts_keep_them() {
    let Some(db) = TestDb::new().await else {
        return;
    };
    let clock = ManualClock::new(START_MS);
    let (users_a, users_b) = (
        PostgresUserStore::new(db.pool().clone(), shared(&clock))
            .await
            .unwrap(),
        PostgresUserStore::new(db.new_pool(), shared(&clock))
            .await
            .unwrap(),
    );
    let org = OrgId::new();
    let invite = SecretToken::generate().unwrap();
    users_a
        .invite(NewInvite {
            org,
            email: "ana@example.com".into(),
            role: Role::Owner,
            token: invite.hash(),
        })
        .await
        .unwrap();
    assert!(users_b
        .accept_invite(invite.hash(), "h".into())
        .await
        .unwrap()
        .is_some());
    assert!(users_a
        .accept_invite(invite.hash(), "h".into())
        .await
        .unwrap()
        .is_none());

    // The throttle is one count across replicas.
    for i in 0..MAX_SIGN_IN_FAILURES {
        let store = if i % 2 == 0 { &users_a } else { &users_b };
        assert_eq!(
            store
                .sign_in_attempt("ana@example.com".into())
                .await
                .unwrap(),
            SignInGate::Allowed
        );
    }
    assert!(matches!(
        users_a
            .sign_in_attempt("ana@example.com".into())
            .await
            .unwrap(),
        SignInGate::Throttled { .. }
    ));

    let sessions_a = PostgresDashboardSessionStore::new(db.pool().clone(), shared(&clock))
        .await
        .unwrap();
    let session = SecretToken::generate().unwrap();
    sessions_a
        .create(session.hash(), SessionSubject::Operator)
        .await
        .unwrap();

    let usage_a = PostgresUsageStore::new(db.pool().clone(), shared(&clock))
        .await
        .unwrap();
    let usage_b = PostgresUsageStore::new(db.new_pool(), shared(&clock))
        .await
        .unwrap();
    let h = START_MS - START_MS % HOUR_MS;
    for store in [&usage_a, &usage_b] {
        let mut batch = UsageBatch::default();
        batch.record(org, h, None, Some("/api/credits"), 200, 0);
        store.add(batch.into_rows()).await.unwrap();
    }
    drop((users_a, users_b, sessions_a, usage_a, usage_b));

    // "Restarted": new stores on new pools find everything.
    let users = PostgresUserStore::new(db.new_pool(), shared(&clock))
        .await
        .unwrap();
    assert!(
        users
            .credentials("ana@example.com".into())
            .await
            .unwrap()
            .unwrap()
            .user
            .active
    );
    let sessions = PostgresDashboardSessionStore::new(db.new_pool(), shared(&clock))
        .await
        .unwrap();
    assert!(sessions.touch(session.hash()).await.unwrap().is_some());
    let usage = PostgresUsageStore::new(db.new_pool(), shared(&clock))
        .await
        .unwrap();
    let got = usage
        .query(UsageQuery {
            org,
            from_ms: h,
            to_ms: h + HOUR_MS,
            granularity: Granularity::Hour,
            group_by: GroupBy::default(),
        })
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].counts.requests, 2,
        "both replicas added into one row"
    );
    db.cleanup().await;
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable() {
    let pool = tollgate_postgres::connect(&unreachable_url()).unwrap();
    let clock: SharedClock = Arc::new(ManualClock::new(START_MS));
    let err = PostgresUserStore::new(pool, clock).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable);
}
