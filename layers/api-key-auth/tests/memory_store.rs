//! The memory `KeyStore`: key administration as the admin API uses it, secrecy, and
//! correctness under concurrent use.

#![cfg(feature = "memory")]

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::*;
use tollgate_api_key_auth::{
    generate_key, ApiKeyAuthLayer, KeyGrant, KeyHash, KeyStatus, KeyStore, MemoryKeyStore,
};
use tollgate_core::{KeyId, ManualClock, ModelId, OrgId, Plan};

fn store_at(ms: u64) -> (Arc<MemoryKeyStore>, ManualClock) {
    let clock = ManualClock::new(ms);
    (
        Arc::new(MemoryKeyStore::new(Arc::new(clock.clone()))),
        clock,
    )
}

#[tokio::test]
async fn created_keys_look_up_by_hash_to_their_org() {
    let (store, _clock) = store_at(START_MS);
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
            plan: Some(Plan::Basic)
        })
    );
    // Any other hash finds nothing.
    let stranger = generate_key().unwrap();
    assert_eq!(store.lookup(stranger.hash).await.unwrap(), None);
}

#[tokio::test]
async fn list_keys_shows_the_admin_view_oldest_first() {
    let (store, clock) = store_at(START_MS);
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
            },
            {
                "id": b.id.to_string(),
                "name": "second",
                "prefix": b.prefix,
                "status": "active",
                "created_at": "2023-11-14T22:13:25.000Z",
                "last_used_at": "2023-11-14T22:13:26.000Z",
            },
        ])
    );
    assert_eq!(listed[0].org, org);
    assert!(store.list_keys(OrgId::new()).await.unwrap().is_empty());
}

#[tokio::test]
async fn revoke_and_rotate_report_unknown_keys() {
    let (store, _clock) = store_at(START_MS);
    assert!(!store.revoke_key(KeyId::new()).await.unwrap());
    assert!(store.rotate_key(KeyId::new()).await.unwrap().is_none());
    assert!(store.key_info(KeyId::new()).await.unwrap().is_none());

    let org = OrgId::new();
    let key = store.create_key(org, "k".to_owned()).await.unwrap();
    assert!(store.revoke_key(key.id).await.unwrap());
    // Revoking twice is harmless.
    assert!(store.revoke_key(key.id).await.unwrap());
    assert_eq!(store.lookup(KeyHash::of(&key.secret)).await.unwrap(), None);
    assert_eq!(
        store.key_info(key.id).await.unwrap().unwrap().status,
        KeyStatus::Revoked
    );
}

#[tokio::test]
async fn rotation_keeps_org_and_name_and_revokes_the_old_key() {
    let (store, _clock) = store_at(START_MS);
    let org = OrgId::new();
    store.set_subscription(org, Some(Plan::Free)).await.unwrap();
    let old = store
        .create_key(org, "deploy bot".to_owned())
        .await
        .unwrap();
    let new = store.rotate_key(old.id).await.unwrap().unwrap();

    assert_eq!(store.lookup(KeyHash::of(&old.secret)).await.unwrap(), None);
    let grant = store
        .lookup(KeyHash::of(&new.secret))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((grant.key, grant.org), (new.id, org));

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
}

#[tokio::test]
async fn a_model_has_one_owner() {
    let (store, _clock) = store_at(START_MS);
    let (org, thief, model) = (OrgId::new(), OrgId::new(), ModelId::new());
    assert!(!store.owns_model(org, model).await.unwrap());
    assert!(store.add_model(org, model).await.unwrap());
    assert!(store.add_model(org, model).await.unwrap());
    assert!(!store.add_model(thief, model).await.unwrap());
    assert!(store.owns_model(org, model).await.unwrap());
    assert!(!store.owns_model(thief, model).await.unwrap());
}

#[tokio::test]
async fn subscriptions_apply_to_every_key_of_the_org() {
    let (store, _clock) = store_at(START_MS);
    let org = OrgId::new();
    let a = store.create_key(org, "a".to_owned()).await.unwrap();
    let b = store.create_key(org, "b".to_owned()).await.unwrap();
    for plan in [None, Some(Plan::Pro), None, Some(Plan::Enterprise)] {
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
    }
}

#[tokio::test]
async fn record_use_of_an_unknown_key_changes_nothing() {
    let (store, _clock) = store_at(START_MS);
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

#[tokio::test]
async fn the_secret_never_appears_in_debug_output_or_listings() {
    let (store, _clock) = store_at(START_MS);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_and_lookups_stay_exact() {
    const TASKS: usize = 32;
    const KEYS_PER_TASK: usize = 25;
    let (store, _clock) = store_at(START_MS);
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
        listed += keys.len();
    }
    assert_eq!(listed, all.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_record_use_only_moves_forward() {
    let (store, _clock) = store_at(START_MS);
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
