//! `DashboardSessionStore` behaviours.

use std::sync::Arc;
use std::time::Duration;

use tollgate_accounts::{
    DashboardSessionStore, SecretToken, SessionSubject, TokenHash, UserId, ABSOLUTE_TIMEOUT,
    IDLE_TIMEOUT,
};
use tollgate_core::Clock as _;
use tollgate_core::ManualClock;

fn hash() -> TokenHash {
    SecretToken::generate().unwrap().hash()
}

pub async fn a_session_is_found_by_its_token_and_touch_records_the_use<S: DashboardSessionStore>(
    store: Arc<S>,
    clock: ManualClock,
) {
    let user = UserId::new();
    let token = hash();
    let created = store
        .create(token, SessionSubject::User(user))
        .await
        .unwrap();
    assert_eq!(created.subject, SessionSubject::User(user));
    assert_eq!(created.created_at_ms, clock.now_ms());
    assert_eq!(created.last_seen_ms, clock.now_ms());
    clock.advance(Duration::from_secs(90));
    let touched = store.touch(token).await.unwrap().expect("live");
    assert_eq!(touched.created_at_ms, created.created_at_ms);
    assert_eq!(touched.last_seen_ms, clock.now_ms());
    assert_eq!(store.touch(hash()).await.unwrap(), None, "unknown token");

    let operator = hash();
    store
        .create(operator, SessionSubject::Operator)
        .await
        .unwrap();
    assert_eq!(
        store.touch(operator).await.unwrap().map(|s| s.subject),
        Some(SessionSubject::Operator)
    );
}

pub async fn a_session_ends_after_12_hours_unused<S: DashboardSessionStore>(
    store: Arc<S>,
    clock: ManualClock,
) {
    let token = hash();
    store.create(token, SessionSubject::Operator).await.unwrap();
    clock.advance(IDLE_TIMEOUT - Duration::from_millis(1));
    assert!(
        store.touch(token).await.unwrap().is_some(),
        "used just in time"
    );
    clock.advance(IDLE_TIMEOUT - Duration::from_millis(1));
    assert!(
        store.touch(token).await.unwrap().is_some(),
        "the use restarted the idle clock"
    );
    clock.advance(IDLE_TIMEOUT);
    assert_eq!(store.touch(token).await.unwrap(), None);
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        store.touch(token).await.unwrap(),
        None,
        "an ended session stays ended"
    );
}

pub async fn a_session_ends_7_days_after_sign_in_however_used<S: DashboardSessionStore>(
    store: Arc<S>,
    clock: ManualClock,
) {
    let token = hash();
    let start = clock.now_ms();
    store
        .create(token, SessionSubject::User(UserId::new()))
        .await
        .unwrap();
    let step = Duration::from_secs(6 * 60 * 60);
    while clock.now_ms() + (step.as_millis() as u64) < start + ABSOLUTE_TIMEOUT.as_millis() as u64 {
        clock.advance(step);
        assert!(store.touch(token).await.unwrap().is_some());
    }
    clock.set(start + ABSOLUTE_TIMEOUT.as_millis() as u64 - 1);
    assert!(store.touch(token).await.unwrap().is_some());
    clock.set(start + ABSOLUTE_TIMEOUT.as_millis() as u64);
    assert_eq!(store.touch(token).await.unwrap(), None);
}

pub async fn revoke_ends_one_session<S: DashboardSessionStore>(store: Arc<S>, _clock: ManualClock) {
    let user = UserId::new();
    let (a, b) = (hash(), hash());
    store.create(a, SessionSubject::User(user)).await.unwrap();
    store.create(b, SessionSubject::User(user)).await.unwrap();
    assert!(store.revoke(a).await.unwrap());
    assert_eq!(store.touch(a).await.unwrap(), None);
    assert!(store.touch(b).await.unwrap().is_some());
    assert!(!store.revoke(a).await.unwrap(), "already gone");
}

pub async fn revoke_user_ends_every_session_of_that_user_only<S: DashboardSessionStore>(
    store: Arc<S>,
    _clock: ManualClock,
) {
    let (ana, bob) = (UserId::new(), UserId::new());
    let anas = [hash(), hash(), hash()];
    for t in anas {
        store.create(t, SessionSubject::User(ana)).await.unwrap();
    }
    let bobs = hash();
    store.create(bobs, SessionSubject::User(bob)).await.unwrap();
    let operator = hash();
    store
        .create(operator, SessionSubject::Operator)
        .await
        .unwrap();
    assert_eq!(store.revoke_user(ana).await.unwrap(), 3);
    for t in anas {
        assert_eq!(store.touch(t).await.unwrap(), None);
    }
    assert!(store.touch(bobs).await.unwrap().is_some());
    assert!(store.touch(operator).await.unwrap().is_some());
    assert_eq!(store.revoke_user(ana).await.unwrap(), 0);
}

pub async fn purge_deletes_ended_sessions_only<S: DashboardSessionStore>(
    store: Arc<S>,
    clock: ManualClock,
) {
    let (old, fresh) = (hash(), hash());
    store.create(old, SessionSubject::Operator).await.unwrap();
    clock.advance(IDLE_TIMEOUT);
    store.create(fresh, SessionSubject::Operator).await.unwrap();
    assert_eq!(store.purge_expired().await.unwrap(), 1);
    assert!(store.touch(fresh).await.unwrap().is_some());
    assert_eq!(store.purge_expired().await.unwrap(), 0);
}
