//! The `KeyStore` behaviour suite: every function takes a fresh, empty store (and the manual
//! clock it stamps times with) and checks what the admin API and the auth layer rely on.
//! `key_store_suite!` turns it into one test per behaviour for a backend, so every backend
//! runs exactly the same checks and the backends cannot drift apart.
#![allow(dead_code)]

use std::collections::HashSet;
use std::convert::Infallible;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tollgate_api_key_auth::{
    generate_key, ApiKeyAuthLayer, KeyGrant, KeyHash, KeyLimits, KeySpec, KeyStatus, KeyStore,
    Scopes,
};
use tollgate_core::{ErrorCode, KeyId, ManualClock, ModelId, OrgId, Plan, Principal};
use tollgate_postgres::testing::TestDb;
use tower::{ServiceBuilder, ServiceExt};

pub const START_MS: u64 = 1_700_000_000_000;

/// A store under test, the clock it was built with, and the database schema to drop after
/// (PostgreSQL backends).
pub struct Env<S> {
    pub store: Arc<S>,
    pub clock: ManualClock,
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

/// One `#[tokio::test]` per behaviour, each on a fresh store from `$backend()` (an async
/// fn returning `Option<Env<_>>`; `None` skips, e.g. when no PostgreSQL server is reachable).
#[macro_export]
macro_rules! key_store_suite {
    ($backend:path) => {
        $crate::key_store_suite!(@tests $backend;
            created_keys_look_up_by_hash_to_their_org,
            list_keys_shows_the_admin_view_oldest_first,
            revoke_and_rotate_report_unknown_keys,
            rotation_keeps_org_and_name_and_revokes_the_old_key,
            a_key_keeps_its_expiry_scopes_models_and_limit,
            a_rotation_with_grace_keeps_the_old_key_until_the_grace_ends,
            a_model_has_one_owner,
            subscriptions_apply_to_every_key_of_the_org,
            record_use_of_an_unknown_key_changes_nothing,
            the_secret_never_appears_in_debug_output_or_listings,
            names_are_kept_exactly,
            the_layer_admits_refuses_and_follows_revocation,
            concurrent_creates_and_lookups_stay_exact,
            concurrent_record_use_only_moves_forward,
            concurrent_claims_of_one_model_have_one_winner,
            concurrent_rotations_of_one_key_leave_it_revoked,
        );
    };
    (@tests $backend:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let Some(env) = $backend().await else { return };
                suite::$name(Arc::clone(&env.store), env.clock.clone()).await;
                env.cleanup().await;
            }
        )*
    };
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

pub async fn created_keys_look_up_by_hash_to_their_org<S: KeyStore>(
    store: Arc<S>,
    _clock: ManualClock,
) {
    let org = OrgId::new();
    store
        .set_subscription(org, Some(Plan::Basic))
        .await
        .unwrap();
    let key = store.create_key(org, "ci".to_owned()).await.unwrap();

    assert!(key.secret.starts_with("sk_live_"));
    assert_eq!(key.secret.len(), 72);
    assert!(key.secret[8..]
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_eq!(key.prefix, key.secret[..12]);

    let grant = store.lookup(KeyHash::of(&key.secret)).await.unwrap();
    assert_eq!(
        grant,
        Some(KeyGrant {
            key: key.id,
            org,
            plan: Some(Plan::Basic),
            limits: KeyLimits::default(),
        })
    );
    // A second lookup (from a cache, where there is one) agrees.
    assert_eq!(store.lookup(KeyHash::of(&key.secret)).await.unwrap(), grant);
    // Any other hash finds nothing.
    let stranger = generate_key().unwrap();
    assert_eq!(store.lookup(stranger.hash).await.unwrap(), None);
    assert_eq!(store.lookup(stranger.hash).await.unwrap(), None);
}

pub async fn list_keys_shows_the_admin_view_oldest_first<S: KeyStore>(
    store: Arc<S>,
    clock: ManualClock,
) {
    let org = OrgId::new();
    let a = store.create_key(org, "first".to_owned()).await.unwrap();
    clock.advance(millis(5_000));
    let b = store.create_key(org, "second".to_owned()).await.unwrap();
    // Another org's keys stay out of it.
    store
        .create_key(OrgId::new(), "elsewhere".to_owned())
        .await
        .unwrap();
    assert!(store.revoke_key(a.id).await.unwrap());
    store.record_use(b.id, START_MS + 6_000);

    let listed = store.list_keys(org).await.unwrap();
    let json = serde_json::to_value(&listed).unwrap();
    assert_eq!(
        json,
        serde_json::json!([
            {
                "id": a.id.to_string(),
                "name": "first",
                "prefix": a.prefix,
                "status": "revoked",
                "created_at": "2023-11-14T22:13:20.000Z",
                "last_used_at": null,
                "expires_at": null,
                "scopes": ["read", "write"],
                "models": null,
                "credit_limit": null,
            },
            {
                "id": b.id.to_string(),
                "name": "second",
                "prefix": b.prefix,
                "status": "active",
                "created_at": "2023-11-14T22:13:25.000Z",
                "last_used_at": "2023-11-14T22:13:26.000Z",
                "expires_at": null,
                "scopes": ["read", "write"],
                "models": null,
                "credit_limit": null,
            },
        ])
    );
    assert_eq!(listed[0].org, org);
    assert_eq!(
        store.key_info(b.id).await.unwrap().as_ref(),
        Some(&listed[1])
    );
    assert!(store.list_keys(OrgId::new()).await.unwrap().is_empty());
}

pub async fn a_key_keeps_its_expiry_scopes_models_and_limit<S: KeyStore>(
    store: Arc<S>,
    clock: ManualClock,
) {
    let org = OrgId::new();
    store.set_subscription(org, Some(Plan::Pro)).await.unwrap();
    let model = ModelId::new();
    assert!(store.add_model(org, model).await.unwrap());
    let expires = START_MS + 60_000;
    let spec = KeySpec {
        expires_at_ms: Some(expires),
        scopes: Scopes::READ,
        models: Some(vec![model]),
        credit_limit: Some(3),
    };
    let key = store
        .create_key_with(org, "reporting".to_owned(), spec.clone())
        .await
        .unwrap();
    let grant = store
        .lookup(KeyHash::of(&key.secret))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        grant.limits,
        KeyLimits {
            ends_at_ms: Some(expires),
            scopes: Scopes::READ,
            models: Some(Arc::from(vec![model])),
            credit_limit: Some(3),
        }
    );
    assert!(grant.limits.is_live_at(expires - 1));
    assert!(!grant.limits.is_live_at(expires));
    assert!(grant.limits.allows_model(model));
    assert!(!grant.limits.allows_model(ModelId::new()));

    let info = store.key_info(key.id).await.unwrap().unwrap();
    assert_eq!(info.status, KeyStatus::Active);
    assert_eq!(
        (
            info.expires_at_ms,
            info.scopes,
            info.models.clone(),
            info.credit_limit
        ),
        (Some(expires), Scopes::READ, Some(vec![model]), Some(3))
    );
    // Past its expiry it lists as expired (and the layer refuses it by the same time).
    clock.advance(millis(60_000));
    let listed = store.list_keys(org).await.unwrap();
    assert_eq!(listed[0].status, KeyStatus::Expired);
    let json = serde_json::to_value(&listed[0]).unwrap();
    assert_eq!(json["expires_at"], "2023-11-14T22:14:20.000Z");
    assert_eq!(json["scopes"], serde_json::json!(["read"]));
    assert_eq!(json["models"], serde_json::json!([model.to_string()]));
    assert_eq!(json["credit_limit"], 3);
    // A revoked key lists as revoked, expired or not.
    assert!(store.revoke_key(key.id).await.unwrap());
    assert_eq!(
        store.key_info(key.id).await.unwrap().unwrap().status,
        KeyStatus::Revoked
    );
}

pub async fn a_rotation_with_grace_keeps_the_old_key_until_the_grace_ends<S: KeyStore>(
    store: Arc<S>,
    clock: ManualClock,
) {
    let org = OrgId::new();
    store
        .set_subscription(org, Some(Plan::Basic))
        .await
        .unwrap();
    let spec = KeySpec {
        expires_at_ms: Some(START_MS + 3_600_000),
        scopes: Scopes::WRITE,
        models: None,
        credit_limit: Some(10),
    };
    let old = store
        .create_key_with(org, "ci".to_owned(), spec)
        .await
        .unwrap();
    // Cached (where there is a cache) before the rotation.
    assert!(store
        .lookup(KeyHash::of(&old.secret))
        .await
        .unwrap()
        .is_some());
    let new = store
        .rotate_key_with_grace(old.id, 5_000)
        .await
        .unwrap()
        .unwrap();
    // The old key still authenticates, and says until when.
    let grant = store
        .lookup(KeyHash::of(&old.secret))
        .await
        .unwrap()
        .expect("the old key works during the grace period");
    assert_eq!(grant.limits.ends_at_ms, Some(START_MS + 5_000));
    assert_eq!(
        store.key_info(old.id).await.unwrap().unwrap().status,
        KeyStatus::Active
    );
    // The new key has the old one's limits.
    let fresh = store
        .lookup(KeyHash::of(&new.secret))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            fresh.limits.ends_at_ms,
            fresh.limits.scopes,
            fresh.limits.credit_limit
        ),
        (Some(START_MS + 3_600_000), Scopes::WRITE, Some(10))
    );
    clock.advance(millis(5_000));
    assert_eq!(
        store.key_info(old.id).await.unwrap().unwrap().status,
        KeyStatus::Revoked
    );
    let late = store.lookup(KeyHash::of(&old.secret)).await.unwrap();
    assert!(late.is_none_or(|g| !g.limits.is_live_at(START_MS + 5_000)));

    // A revocation during a grace period is immediate.
    let third = store
        .rotate_key_with_grace(new.id, 60_000)
        .await
        .unwrap()
        .unwrap();
    assert!(store.revoke_key(new.id).await.unwrap());
    assert_eq!(store.lookup(KeyHash::of(&new.secret)).await.unwrap(), None);
    assert!(store
        .lookup(KeyHash::of(&third.secret))
        .await
        .unwrap()
        .is_some());
}

pub async fn revoke_and_rotate_report_unknown_keys<S: KeyStore>(
    store: Arc<S>,
    _clock: ManualClock,
) {
    assert!(!store.revoke_key(KeyId::new()).await.unwrap());
    assert!(store.rotate_key(KeyId::new()).await.unwrap().is_none());
    assert!(store.key_info(KeyId::new()).await.unwrap().is_none());

    let org = OrgId::new();
    store.set_subscription(org, Some(Plan::Pro)).await.unwrap();
    let key = store.create_key(org, "k".to_owned()).await.unwrap();
    // Cached (where there is a cache) before the revocation.
    assert!(store
        .lookup(KeyHash::of(&key.secret))
        .await
        .unwrap()
        .is_some());
    assert!(store.revoke_key(key.id).await.unwrap());
    // Revoking twice is harmless.
    assert!(store.revoke_key(key.id).await.unwrap());
    assert_eq!(store.lookup(KeyHash::of(&key.secret)).await.unwrap(), None);
    assert_eq!(
        store.key_info(key.id).await.unwrap().unwrap().status,
        KeyStatus::Revoked
    );
}

pub async fn rotation_keeps_org_and_name_and_revokes_the_old_key<S: KeyStore>(
    store: Arc<S>,
    _clock: ManualClock,
) {
    let org = OrgId::new();
    store.set_subscription(org, Some(Plan::Free)).await.unwrap();
    let old = store
        .create_key(org, "deploy bot".to_owned())
        .await
        .unwrap();
    assert!(store
        .lookup(KeyHash::of(&old.secret))
        .await
        .unwrap()
        .is_some());
    let new = store.rotate_key(old.id).await.unwrap().unwrap();
    assert_ne!(new.id, old.id);
    assert_ne!(new.secret, old.secret);

    assert_eq!(store.lookup(KeyHash::of(&old.secret)).await.unwrap(), None);
    let grant = store
        .lookup(KeyHash::of(&new.secret))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (grant.key, grant.org, grant.plan),
        (new.id, org, Some(Plan::Free))
    );

    let listed = store.list_keys(org).await.unwrap();
    let summary: Vec<_> = listed
        .iter()
        .map(|k| (k.id, k.name.as_str(), k.status))
        .collect();
    assert_eq!(
        summary,
        [
            (old.id, "deploy bot", KeyStatus::Revoked),
            (new.id, "deploy bot", KeyStatus::Active)
        ]
    );

    // Rotating the revoked key again issues another key; the old one stays revoked.
    let again = store.rotate_key(old.id).await.unwrap().unwrap();
    assert!(store
        .lookup(KeyHash::of(&again.secret))
        .await
        .unwrap()
        .is_some());
    assert_eq!(store.lookup(KeyHash::of(&old.secret)).await.unwrap(), None);
    assert_eq!(store.list_keys(org).await.unwrap().len(), 3);
}

pub async fn a_model_has_one_owner<S: KeyStore>(store: Arc<S>, _clock: ManualClock) {
    let (org, thief, model) = (OrgId::new(), OrgId::new(), ModelId::new());
    assert!(!store.owns_model(org, model).await.unwrap());
    assert!(store.add_model(org, model).await.unwrap());
    // Owned at once, even right after a "not owned" answer.
    assert!(store.owns_model(org, model).await.unwrap());
    assert!(store.add_model(org, model).await.unwrap());
    assert!(!store.add_model(thief, model).await.unwrap());
    assert!(store.owns_model(org, model).await.unwrap());
    assert!(!store.owns_model(thief, model).await.unwrap());
    assert!(!store.owns_model(org, ModelId::new()).await.unwrap());
}

pub async fn subscriptions_apply_to_every_key_of_the_org<S: KeyStore>(
    store: Arc<S>,
    _clock: ManualClock,
) {
    let org = OrgId::new();
    let other = OrgId::new();
    store
        .set_subscription(other, Some(Plan::Basic))
        .await
        .unwrap();
    let a = store.create_key(org, "a".to_owned()).await.unwrap();
    let b = store.create_key(org, "b".to_owned()).await.unwrap();
    let c = store.create_key(other, "c".to_owned()).await.unwrap();
    for plan in [
        None,
        Some(Plan::Pro),
        None,
        Some(Plan::Enterprise),
        Some(Plan::Free),
    ] {
        store.set_subscription(org, plan).await.unwrap();
        for key in [&a, &b] {
            let grant = store
                .lookup(KeyHash::of(&key.secret))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(grant.plan, plan);
            assert_eq!(grant.org, org);
        }
        // Other orgs keep theirs.
        let grant = store.lookup(KeyHash::of(&c.secret)).await.unwrap().unwrap();
        assert_eq!(grant.plan, Some(Plan::Basic));
    }
}

pub async fn record_use_of_an_unknown_key_changes_nothing<S: KeyStore>(
    store: Arc<S>,
    _clock: ManualClock,
) {
    store.record_use(KeyId::new(), START_MS);
    let org = OrgId::new();
    let key = store.create_key(org, "k".to_owned()).await.unwrap();
    assert_eq!(
        store
            .key_info(key.id)
            .await
            .unwrap()
            .unwrap()
            .last_used_at_ms,
        None
    );
}

pub async fn the_secret_never_appears_in_debug_output_or_listings<S: KeyStore + Debug>(
    store: Arc<S>,
    _clock: ManualClock,
) {
    let org = OrgId::new();
    store
        .set_subscription(org, Some(Plan::Basic))
        .await
        .unwrap();
    let key = store.create_key(org, "ci".to_owned()).await.unwrap();
    store.record_use(key.id, START_MS);
    let generated = generate_key().unwrap();
    let grant = store
        .lookup(KeyHash::of(&key.secret))
        .await
        .unwrap()
        .unwrap();
    let listed = store.list_keys(org).await.unwrap();
    let info = store.key_info(key.id).await.unwrap().unwrap();
    let layer = ApiKeyAuthLayer::new(Arc::clone(&store));

    // Everything a careless `{:?}` or `tracing` field could print.
    let outputs = [
        format!("{key:?}"),
        format!("{key:#?}"),
        format!("{generated:?}"),
        format!("{grant:?}"),
        format!("{listed:?}"),
        format!("{info:?}"),
        format!("{store:?}"),
        format!("{layer:?}"),
        format!("{:?}", KeyHash::of(&key.secret)),
        serde_json::to_string(&listed).unwrap(),
    ];
    // Only the 12-character display prefix may show; no part of the random tail past it.
    let tail_of = |secret: &str| secret[12..].to_owned();
    for out in &outputs {
        assert!(!out.contains(&key.secret), "{out}");
        assert!(!out.contains(&tail_of(&key.secret)), "{out}");
        assert!(!out.contains(&generated.secret), "{out}");
        assert!(!out.contains(&tail_of(&generated.secret)), "{out}");
        // Not even the full hash, which would let anyone holding logs test guesses.
        assert!(!out.contains(&KeyHash::of(&key.secret).to_hex()), "{out}");
    }
    assert!(outputs[0].contains("<redacted>"));
    assert!(outputs[2].contains("<redacted>"));
    assert_eq!(info.prefix, key.prefix);
}

pub async fn names_are_kept_exactly<S: KeyStore>(store: Arc<S>, _clock: ManualClock) {
    let org = OrgId::new();
    let names = [
        "",
        "ünïcødé ✓ 🔑",
        "quote ' double \" backslash \\ percent % underscore _",
        "'; DROP TABLE tollgate_api_keys; --",
    ];
    let mut ids = Vec::new();
    for name in names {
        ids.push(store.create_key(org, name.to_owned()).await.unwrap().id);
    }
    let listed: Vec<(KeyId, String)> = store
        .list_keys(org)
        .await
        .unwrap()
        .into_iter()
        .map(|k| (k.id, k.name))
        .collect();
    let expected: Vec<(KeyId, String)> = ids
        .into_iter()
        .zip(names.iter().map(|n| n.to_string()))
        .collect();
    assert_eq!(listed, expected);
}

/// What a client of a service behind `ApiKeyAuthLayer` sees: status and error code.
async fn call(
    layer: &ApiKeyAuthLayer,
    model: ModelId,
    key: &str,
) -> (StatusCode, Option<ErrorCode>, Option<Principal>) {
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(tower::service_fn(|req: Request<Full<Bytes>>| async move {
            let who = req.extensions().get::<Principal>().copied();
            assert!(who.is_some(), "the inner service runs only for a principal");
            Ok::<_, Infallible>(Response::new(Full::from("ok")))
        }));
    let req = Request::get(format!("/api/models/{model}/users/me"))
        .header("x-api-key", key)
        .body(Full::<Bytes>::default())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let code = res.extensions().get::<ErrorCode>().copied();
    let principal = res.extensions().get::<Principal>().copied();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    if status == StatusCode::OK {
        assert_eq!(body, "ok");
    }
    (status, code, principal)
}

pub async fn the_layer_admits_refuses_and_follows_revocation<S: KeyStore>(
    store: Arc<S>,
    _clock: ManualClock,
) {
    let (org, model) = (OrgId::new(), ModelId::new());
    store.set_subscription(org, Some(Plan::Pro)).await.unwrap();
    assert!(store.add_model(org, model).await.unwrap());
    let key = store.create_key(org, "svc".to_owned()).await.unwrap();
    let layer = ApiKeyAuthLayer::new(Arc::clone(&store));

    let (status, code, principal) = call(&layer, model, &key.secret).await;
    assert_eq!((status, code), (StatusCode::OK, None));
    assert_eq!(
        principal,
        Some(Principal {
            org,
            key: key.id,
            plan: Plan::Pro
        })
    );
    // Someone else's model: the same 401 as an unknown key.
    let (status, code, _) = call(&layer, ModelId::new(), &key.secret).await;
    assert_eq!(
        (status, code),
        (StatusCode::UNAUTHORIZED, Some(ErrorCode::InvalidApiKey))
    );

    store.set_subscription(org, None).await.unwrap();
    let (status, code, _) = call(&layer, model, &key.secret).await;
    assert_eq!(
        (status, code),
        (
            StatusCode::PAYMENT_REQUIRED,
            Some(ErrorCode::NoSubscription)
        )
    );
    store
        .set_subscription(org, Some(Plan::Basic))
        .await
        .unwrap();
    let (status, _, principal) = call(&layer, model, &key.secret).await;
    assert_eq!(
        (status, principal.map(|p| p.plan)),
        (StatusCode::OK, Some(Plan::Basic))
    );

    let rotated = store.rotate_key(key.id).await.unwrap().unwrap();
    let (status, code, _) = call(&layer, model, &key.secret).await;
    assert_eq!(
        (status, code),
        (StatusCode::UNAUTHORIZED, Some(ErrorCode::InvalidApiKey))
    );
    let (status, _, principal) = call(&layer, model, &rotated.secret).await;
    assert_eq!(
        (status, principal.map(|p| p.key)),
        (StatusCode::OK, Some(rotated.id))
    );
    assert!(store.revoke_key(rotated.id).await.unwrap());
    let (status, code, _) = call(&layer, model, &rotated.secret).await;
    assert_eq!(
        (status, code),
        (StatusCode::UNAUTHORIZED, Some(ErrorCode::InvalidApiKey))
    );
}

pub async fn concurrent_creates_and_lookups_stay_exact<S: KeyStore>(
    store: Arc<S>,
    _clock: ManualClock,
) {
    const TASKS: usize = 32;
    const KEYS_PER_TASK: usize = 25;
    let orgs: Vec<OrgId> = (0..4).map(|_| OrgId::new()).collect();
    for org in &orgs {
        store.set_subscription(*org, Some(Plan::Pro)).await.unwrap();
    }

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = Arc::clone(&store);
        let org = orgs[t % orgs.len()];
        tasks.push(tokio::spawn(async move {
            let mut made = Vec::new();
            for i in 0..KEYS_PER_TASK {
                let key = store.create_key(org, format!("t{t}-k{i}")).await.unwrap();
                // Visible to a lookup the moment create returns.
                let grant = store
                    .lookup(KeyHash::of(&key.secret))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!((grant.key, grant.org), (key.id, org));
                store.record_use(key.id, START_MS + i as u64 * 1_000);
                // Revoke every third key right away, racing everyone else's lookups.
                if i % 3 == 0 {
                    assert!(store.revoke_key(key.id).await.unwrap());
                    assert_eq!(store.lookup(KeyHash::of(&key.secret)).await.unwrap(), None);
                }
                made.push((org, key, i % 3 != 0));
            }
            made
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }

    assert_eq!(all.len(), TASKS * KEYS_PER_TASK);
    let ids: HashSet<KeyId> = all.iter().map(|(_, k, _)| k.id).collect();
    let secrets: HashSet<&str> = all.iter().map(|(_, k, _)| k.secret.as_str()).collect();
    assert_eq!(ids.len(), all.len());
    assert_eq!(secrets.len(), all.len());

    for (org, key, active) in &all {
        let grant = store.lookup(KeyHash::of(&key.secret)).await.unwrap();
        match active {
            true => assert_eq!(grant.map(|g| (g.key, g.org)), Some((key.id, *org))),
            false => assert_eq!(grant, None),
        }
    }
    let mut listed = 0;
    for org in &orgs {
        let keys = store.list_keys(*org).await.unwrap();
        assert_eq!(keys.len(), TASKS / orgs.len() * KEYS_PER_TASK);
        assert!(keys.iter().all(|k| k.org == *org));
        let active = keys
            .iter()
            .filter(|k| k.status == KeyStatus::Active)
            .count();
        assert_eq!(
            active,
            TASKS / orgs.len() * (KEYS_PER_TASK - KEYS_PER_TASK.div_ceil(3))
        );
        listed += keys.len();
    }
    assert_eq!(listed, all.len());
}

pub async fn concurrent_record_use_only_moves_forward<S: KeyStore>(
    store: Arc<S>,
    _clock: ManualClock,
) {
    let org = OrgId::new();
    let key = store.create_key(org, "busy".to_owned()).await.unwrap();
    // Each task reports a shuffled sequence of times over ten seconds.
    let report = |t: u64, i: u64| START_MS + (i * 7_919 + t * 104_729) % 10_000;
    let latest = (0..8u64)
        .flat_map(|t| (0..2_000u64).map(move |i| report(t, i)))
        .max()
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            for i in 0..2_000u64 {
                store.record_use(key.id, report(t, i));
                if i % 500 == 0 {
                    // Let other tasks (and a background writer) interleave.
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let last = store
        .key_info(key.id)
        .await
        .unwrap()
        .unwrap()
        .last_used_at_ms
        .unwrap();
    // Within one second of the latest report, never past it.
    assert!(
        last + 1_000 > latest && last <= latest,
        "{last} vs {latest}"
    );
}

pub async fn concurrent_claims_of_one_model_have_one_winner<S: KeyStore>(
    store: Arc<S>,
    _clock: ManualClock,
) {
    for _ in 0..5 {
        let model = ModelId::new();
        let orgs: Vec<OrgId> = (0..16).map(|_| OrgId::new()).collect();
        let claims: Vec<_> = orgs
            .iter()
            .map(|org| {
                let (store, org) = (Arc::clone(&store), *org);
                tokio::spawn(async move { (org, store.add_model(org, model).await.unwrap()) })
            })
            .collect();
        let mut winners = Vec::new();
        for claim in claims {
            let (org, won) = claim.await.unwrap();
            if won {
                winners.push(org);
            }
        }
        assert_eq!(winners.len(), 1, "exactly one org owns the model");
        for org in &orgs {
            assert_eq!(
                store.owns_model(*org, model).await.unwrap(),
                *org == winners[0]
            );
        }
    }
}

pub async fn concurrent_rotations_of_one_key_leave_it_revoked<S: KeyStore>(
    store: Arc<S>,
    _clock: ManualClock,
) {
    let org = OrgId::new();
    store
        .set_subscription(org, Some(Plan::Basic))
        .await
        .unwrap();
    let key = store.create_key(org, "shared".to_owned()).await.unwrap();
    let rotations: Vec<_> = (0..8)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.rotate_key(key.id).await.unwrap().unwrap() })
        })
        .collect();
    let mut issued = Vec::new();
    for rotation in rotations {
        issued.push(rotation.await.unwrap());
    }
    assert_eq!(store.lookup(KeyHash::of(&key.secret)).await.unwrap(), None);
    // Every rotation issued a distinct, working key with the same name.
    let ids: HashSet<KeyId> = issued.iter().map(|k| k.id).collect();
    assert_eq!(ids.len(), 8);
    for new in &issued {
        let grant = store
            .lookup(KeyHash::of(&new.secret))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((grant.key, grant.org), (new.id, org));
    }
    let listed = store.list_keys(org).await.unwrap();
    assert_eq!(listed.len(), 9);
    assert!(listed.iter().all(|k| k.name == "shared"));
    assert_eq!(
        listed
            .iter()
            .filter(|k| k.status == KeyStatus::Revoked)
            .count(),
        1
    );
}
