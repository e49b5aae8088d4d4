//! `UserStore` behaviours.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tollgate_accounts::{
    InviteOutcome, NewInvite, Role, SecretToken, SignInGate, TokenHash, User, UserStore,
    INVITE_TTL, MAX_SIGN_IN_FAILURES, SIGN_IN_WINDOW,
};
use tollgate_core::Clock as _;
use tollgate_core::{ManualClock, OrgId};

fn token() -> SecretToken {
    SecretToken::generate().unwrap()
}

async fn invite<S: UserStore>(
    store: &S,
    org: OrgId,
    email: &str,
    role: Role,
) -> (User, SecretToken) {
    let t = token();
    let outcome = store
        .invite(NewInvite {
            org,
            email: email.to_owned(),
            role,
            token: t.hash(),
        })
        .await
        .unwrap();
    match outcome {
        InviteOutcome::Invited(user) => (user, t),
        InviteOutcome::EmailTaken => panic!("{email} was taken"),
    }
}

pub async fn an_invite_creates_an_inactive_user_with_a_usable_invite<S: UserStore>(
    store: Arc<S>,
    clock: ManualClock,
) {
    let org = OrgId::new();
    let (user, t) = invite(&*store, org, "ana@example.com", Role::Owner).await;
    assert_eq!(user.org, org);
    assert_eq!(user.email, "ana@example.com");
    assert_eq!(user.role, Role::Owner);
    assert_eq!(user.created_at_ms, clock.now_ms());
    assert!(!user.active);
    assert_eq!(user.status(), "invited");
    assert_eq!(store.user(user.id).await.unwrap(), Some(user.clone()));
    assert_eq!(store.users(org).await.unwrap(), vec![user.clone()]);
    assert_eq!(
        store.pending_invite(t.hash()).await.unwrap(),
        Some(user.clone())
    );
    let creds = store
        .credentials("ana@example.com".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(creds.user, user);
    assert_eq!(
        creds.password_hash, None,
        "no password before the invite is used"
    );
    assert_eq!(
        store.credentials("bob@example.com".into()).await.unwrap(),
        None
    );
}

pub async fn emails_are_unique_across_the_installation<S: UserStore>(
    store: Arc<S>,
    _clock: ManualClock,
) {
    let (a, b) = (OrgId::new(), OrgId::new());
    invite(&*store, a, "ana@example.com", Role::Owner).await;
    for org in [a, b] {
        let again = store
            .invite(NewInvite {
                org,
                email: "ana@example.com".into(),
                role: Role::Viewer,
                token: token().hash(),
            })
            .await
            .unwrap();
        assert_eq!(again, InviteOutcome::EmailTaken);
    }
    assert!(store.users(b).await.unwrap().is_empty());
    invite(&*store, b, "bob@example.com", Role::Viewer).await;
}

pub async fn an_invite_is_single_use_and_sets_the_password<S: UserStore>(
    store: Arc<S>,
    _clock: ManualClock,
) {
    let org = OrgId::new();
    let (user, t) = invite(&*store, org, "ana@example.com", Role::Viewer).await;
    let accepted = store
        .accept_invite(t.hash(), "$argon2id$first".into())
        .await
        .unwrap()
        .expect("a fresh invite is accepted");
    assert_eq!(accepted.id, user.id);
    assert!(accepted.active);
    assert_eq!(
        store.user(user.id).await.unwrap().unwrap().status(),
        "active"
    );
    assert_eq!(store.pending_invite(t.hash()).await.unwrap(), None);
    assert_eq!(
        store
            .accept_invite(t.hash(), "$argon2id$second".into())
            .await
            .unwrap(),
        None,
        "an invite works once"
    );
    let creds = store
        .credentials("ana@example.com".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(creds.password_hash.as_deref(), Some("$argon2id$first"));
}

pub async fn an_invite_expires_after_72_hours<S: UserStore>(store: Arc<S>, clock: ManualClock) {
    let org = OrgId::new();
    let (user, t) = invite(&*store, org, "ana@example.com", Role::Owner).await;
    clock.advance(INVITE_TTL - Duration::from_millis(1));
    assert_eq!(
        store.pending_invite(t.hash()).await.unwrap().map(|u| u.id),
        Some(user.id)
    );
    clock.advance(Duration::from_millis(1));
    assert_eq!(store.pending_invite(t.hash()).await.unwrap(), None);
    assert_eq!(
        store.accept_invite(t.hash(), "h".into()).await.unwrap(),
        None
    );
    let still = store.user(user.id).await.unwrap().unwrap();
    assert!(!still.active, "an expired invite sets nothing");
}

pub async fn unknown_invite_tokens_are_refused<S: UserStore>(store: Arc<S>, _clock: ManualClock) {
    invite(&*store, OrgId::new(), "ana@example.com", Role::Owner).await;
    let stranger = token();
    assert_eq!(store.pending_invite(stranger.hash()).await.unwrap(), None);
    assert_eq!(
        store
            .accept_invite(stranger.hash(), "h".into())
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .pending_invite(TokenHash::from_bytes([0; 32]))
            .await
            .unwrap(),
        None
    );
}

pub async fn concurrent_accepts_of_one_invite_have_one_winner<S: UserStore>(
    store: Arc<S>,
    _clock: ManualClock,
) {
    let (_, t) = invite(&*store, OrgId::new(), "ana@example.com", Role::Owner).await;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = Arc::clone(&store);
            let hash = t.hash();
            tokio::spawn(async move {
                store
                    .accept_invite(hash, format!("hash-{i}"))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for task in tasks {
        winners += usize::from(task.await.unwrap().is_some());
    }
    assert_eq!(winners, 1);
}

pub async fn set_password_replaces_the_hash<S: UserStore>(store: Arc<S>, _clock: ManualClock) {
    let (user, t) = invite(&*store, OrgId::new(), "ana@example.com", Role::Owner).await;
    store
        .accept_invite(t.hash(), "old".into())
        .await
        .unwrap()
        .unwrap();
    assert!(store.set_password(user.id, "new".into()).await.unwrap());
    let creds = store
        .credentials("ana@example.com".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(creds.password_hash.as_deref(), Some("new"));
    assert!(!store
        .set_password(tollgate_accounts::UserId::new(), "x".into())
        .await
        .unwrap());
}

pub async fn deleting_a_user_removes_the_user_and_their_invites<S: UserStore>(
    store: Arc<S>,
    _clock: ManualClock,
) {
    let org = OrgId::new();
    let (user, t) = invite(&*store, org, "ana@example.com", Role::Owner).await;
    let (other, _) = invite(&*store, org, "bob@example.com", Role::Viewer).await;
    assert_eq!(
        store.delete_user(user.id).await.unwrap(),
        Some(user.clone())
    );
    assert_eq!(store.user(user.id).await.unwrap(), None);
    assert_eq!(store.users(org).await.unwrap(), vec![other]);
    assert_eq!(store.pending_invite(t.hash()).await.unwrap(), None);
    assert_eq!(
        store.accept_invite(t.hash(), "h".into()).await.unwrap(),
        None
    );
    assert_eq!(
        store.credentials("ana@example.com".into()).await.unwrap(),
        None
    );
    assert_eq!(store.delete_user(user.id).await.unwrap(), None);
    // The email is free again.
    invite(&*store, OrgId::new(), "ana@example.com", Role::Viewer).await;
}

pub async fn users_are_listed_per_org_oldest_first<S: UserStore>(
    store: Arc<S>,
    clock: ManualClock,
) {
    let (a, b) = (OrgId::new(), OrgId::new());
    let mut expected = Vec::new();
    for i in 0..4 {
        let (u, _) = invite(&*store, a, &format!("user{i}@a.example"), Role::Viewer).await;
        expected.push(u.id);
        invite(&*store, b, &format!("user{i}@b.example"), Role::Viewer).await;
        clock.advance(Duration::from_millis(10));
    }
    let listed: Vec<_> = store.users(a).await.unwrap().iter().map(|u| u.id).collect();
    assert_eq!(listed, expected);
    assert!(store.users(b).await.unwrap().iter().all(|u| u.org == b));
    assert!(store.users(OrgId::new()).await.unwrap().is_empty());
}

pub async fn five_attempts_then_throttled_until_the_window_ends<S: UserStore>(
    store: Arc<S>,
    clock: ManualClock,
) {
    let start = clock.now_ms();
    for i in 0..MAX_SIGN_IN_FAILURES {
        assert_eq!(
            store
                .sign_in_attempt("ana@example.com".into())
                .await
                .unwrap(),
            SignInGate::Allowed,
            "attempt {}",
            i + 1
        );
        clock.advance(Duration::from_secs(60));
    }
    let until = start + SIGN_IN_WINDOW.as_millis() as u64;
    assert_eq!(
        store
            .sign_in_attempt("ana@example.com".into())
            .await
            .unwrap(),
        SignInGate::Throttled { until_ms: until }
    );
    clock.set(until - 1);
    assert_eq!(
        store
            .sign_in_attempt("ana@example.com".into())
            .await
            .unwrap(),
        SignInGate::Throttled { until_ms: until },
        "refused for the rest of the window"
    );
    clock.set(until);
    assert_eq!(
        store
            .sign_in_attempt("ana@example.com".into())
            .await
            .unwrap(),
        SignInGate::Allowed,
        "a new window"
    );
}

pub async fn a_success_clears_the_attempts<S: UserStore>(store: Arc<S>, _clock: ManualClock) {
    for _ in 0..MAX_SIGN_IN_FAILURES - 1 {
        assert_eq!(
            store.sign_in_attempt("k".into()).await.unwrap(),
            SignInGate::Allowed
        );
    }
    store.sign_in_succeeded("k".into()).await.unwrap();
    for _ in 0..MAX_SIGN_IN_FAILURES {
        assert_eq!(
            store.sign_in_attempt("k".into()).await.unwrap(),
            SignInGate::Allowed
        );
    }
    assert!(matches!(
        store.sign_in_attempt("k".into()).await.unwrap(),
        SignInGate::Throttled { .. }
    ));
}

pub async fn throttle_keys_are_independent<S: UserStore>(store: Arc<S>, _clock: ManualClock) {
    for _ in 0..MAX_SIGN_IN_FAILURES {
        store.sign_in_attempt("a@example.com".into()).await.unwrap();
    }
    assert!(matches!(
        store.sign_in_attempt("a@example.com".into()).await.unwrap(),
        SignInGate::Throttled { .. }
    ));
    assert_eq!(
        store.sign_in_attempt("b@example.com".into()).await.unwrap(),
        SignInGate::Allowed
    );
}

pub async fn concurrent_attempts_never_pass_the_limit<S: UserStore>(
    store: Arc<S>,
    _clock: ManualClock,
) {
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .sign_in_attempt("ana@example.com".into())
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        allowed += u32::from(task.await.unwrap() == SignInGate::Allowed);
    }
    assert_eq!(allowed, MAX_SIGN_IN_FAILURES);
}

pub async fn purge_removes_used_and_expired_invites_and_ended_windows<S: UserStore>(
    store: Arc<S>,
    clock: ManualClock,
) {
    let org = OrgId::new();
    let (_, used) = invite(&*store, org, "used@example.com", Role::Owner).await;
    store
        .accept_invite(used.hash(), "h".into())
        .await
        .unwrap()
        .unwrap();
    let (_, old) = invite(&*store, org, "old@example.com", Role::Owner).await;
    store
        .sign_in_attempt("old@example.com".into())
        .await
        .unwrap();
    clock.advance(INVITE_TTL);
    let (_, fresh) = invite(&*store, org, "fresh@example.com", Role::Owner).await;
    store
        .sign_in_attempt("fresh@example.com".into())
        .await
        .unwrap();
    // The used invite, the expired one and the ended window.
    assert_eq!(store.purge_expired().await.unwrap(), 3);
    assert_eq!(store.pending_invite(old.hash()).await.unwrap(), None);
    assert!(store.pending_invite(fresh.hash()).await.unwrap().is_some());
    let emails: HashSet<String> = store
        .users(org)
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.email)
        .collect();
    assert_eq!(emails.len(), 3, "users stay: {emails:?}");
    assert_eq!(store.purge_expired().await.unwrap(), 0);
}
