//! The behaviour every `IdempotencyStore` must have, run against each backend
//! (`tests/stores.rs`), so the stores cannot drift apart.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, StatusCode};
use tollgate_core::{ManualClock, OrgId};
use tollgate_idempotency::{Begin, Fingerprint, IdempotencyStore, Lease, StoredResponse};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(24 * 60 * 60);

fn fp(body: &str) -> Fingerprint {
    Fingerprint::new(
        &Method::POST,
        "/api/models/m/chats/c/messages",
        body.as_bytes(),
    )
}

fn scope() -> String {
    OrgId::new().to_string()
}

fn response(body: &'static [u8]) -> StoredResponse {
    StoredResponse {
        status: StatusCode::CREATED,
        headers: vec![
            (
                HeaderName::from_static("content-type"),
                HeaderValue::from_static("application/json"),
            ),
            (
                HeaderName::from_static("location"),
                HeaderValue::from_static("/api/messages/7?x=\"y\""),
            ),
        ],
        body: Bytes::from_static(body),
    }
}

async fn start(store: &impl IdempotencyStore, scope: &str, key: &str, f: Fingerprint) -> Lease {
    match store.begin(scope, key, f, LEASE).await.unwrap() {
        Begin::Started(lease) => {
            assert_eq!((lease.scope(), lease.key()), (scope, key));
            lease
        }
        other => panic!("expected Started, got {other:?}"),
    }
}

/// Runs every case on `store`, whose time is `clock`.
pub async fn run_all(store: &impl IdempotencyStore, clock: &ManualClock) {
    a_key_in_flight_is_busy_and_bound_to_its_request(store).await;
    a_completed_key_replays_exactly(store).await;
    a_released_key_runs_again(store).await;
    an_expired_lease_is_taken_over_and_the_old_run_cannot_write(store, clock).await;
    a_stored_response_is_forgotten_after_its_ttl(store, clock).await;
    racing_begins_start_once(store).await;
    purging_keeps_live_records(store, clock).await;
}

async fn a_key_in_flight_is_busy_and_bound_to_its_request(store: &impl IdempotencyStore) {
    let org = scope();
    let _lease = start(store, &org, "k1", fp("a")).await;
    assert_eq!(
        store.begin(&org, "k1", fp("a"), LEASE).await.unwrap(),
        Begin::InFlight
    );
    assert_eq!(
        store.begin(&org, "k1", fp("b"), LEASE).await.unwrap(),
        Begin::Mismatch
    );
    // Another key, and the same key of another org, are free.
    start(store, &org, "k2", fp("a")).await;
    start(store, &scope(), "k1", fp("a")).await;
}

async fn a_completed_key_replays_exactly(store: &impl IdempotencyStore) {
    let org = scope();
    let lease = start(store, &org, "order 42: ~\"x\"", fp("a")).await;
    // Bodies are bytes, not text.
    let stored = response(b"{\"id\":7}\x00\xff");
    assert!(store.complete(&lease, stored.clone(), TTL).await.unwrap());
    for _ in 0..2 {
        assert_eq!(
            store
                .begin(&org, "order 42: ~\"x\"", fp("a"), LEASE)
                .await
                .unwrap(),
            Begin::Replay(stored.clone())
        );
    }
    assert_eq!(
        store
            .begin(&org, "order 42: ~\"x\"", fp("b"), LEASE)
            .await
            .unwrap(),
        Begin::Mismatch
    );
    // A completed lease is spent: it cannot complete again or free the key.
    assert!(!store.complete(&lease, response(b"{}"), TTL).await.unwrap());
    assert!(!store.release(&lease).await.unwrap());

    // An empty body and no headers survive too.
    let lease = start(store, &org, "empty", fp("a")).await;
    let empty = StoredResponse {
        status: StatusCode::NO_CONTENT,
        headers: vec![],
        body: Bytes::new(),
    };
    assert!(store.complete(&lease, empty.clone(), TTL).await.unwrap());
    assert_eq!(
        store.begin(&org, "empty", fp("a"), LEASE).await.unwrap(),
        Begin::Replay(empty)
    );
}

async fn a_released_key_runs_again(store: &impl IdempotencyStore) {
    let org = scope();
    let lease = start(store, &org, "k", fp("a")).await;
    assert!(store.release(&lease).await.unwrap());
    assert!(!store.release(&lease).await.unwrap(), "released once");
    // Free for any request now, even another one.
    let again = start(store, &org, "k", fp("b")).await;
    assert_ne!(again.token(), lease.token());
    // The spent lease cannot touch the new run.
    assert!(!store.release(&lease).await.unwrap());
    assert!(!store.complete(&lease, response(b"old"), TTL).await.unwrap());
    assert_eq!(
        store.begin(&org, "k", fp("b"), LEASE).await.unwrap(),
        Begin::InFlight
    );
}

async fn an_expired_lease_is_taken_over_and_the_old_run_cannot_write(
    store: &impl IdempotencyStore,
    clock: &ManualClock,
) {
    let org = scope();
    let crashed = start(store, &org, "k", fp("a")).await;
    clock.advance(LEASE - Duration::from_millis(1));
    assert_eq!(
        store.begin(&org, "k", fp("a"), LEASE).await.unwrap(),
        Begin::InFlight
    );
    clock.advance(Duration::from_millis(1));
    let retry = start(store, &org, "k", fp("a")).await;
    assert_ne!(retry.token(), crashed.token());
    // The first run comes back late: it cannot overwrite or free the retry's record.
    assert!(!store
        .complete(&crashed, response(b"late"), TTL)
        .await
        .unwrap());
    assert!(!store.release(&crashed).await.unwrap());
    assert_eq!(
        store.begin(&org, "k", fp("a"), LEASE).await.unwrap(),
        Begin::InFlight
    );
    assert!(store
        .complete(&retry, response(b"retry"), TTL)
        .await
        .unwrap());
    assert_eq!(
        store.begin(&org, "k", fp("a"), LEASE).await.unwrap(),
        Begin::Replay(response(b"retry"))
    );
}

async fn a_stored_response_is_forgotten_after_its_ttl(
    store: &impl IdempotencyStore,
    clock: &ManualClock,
) {
    let org = scope();
    let lease = start(store, &org, "k", fp("a")).await;
    let ttl = Duration::from_secs(60);
    assert!(store.complete(&lease, response(b"1"), ttl).await.unwrap());
    clock.advance(ttl - Duration::from_millis(1));
    assert_eq!(
        store.begin(&org, "k", fp("b"), LEASE).await.unwrap(),
        Begin::Mismatch
    );
    clock.advance(Duration::from_millis(1));
    // Gone: the key is free, for another request too.
    start(store, &org, "k", fp("b")).await;
}

async fn racing_begins_start_once(store: &impl IdempotencyStore) {
    let org = scope();
    let begins = (0..20).map(|_| store.begin(&org, "race", fp("a"), LEASE));
    let outcomes = futures_util::future::join_all(begins).await;
    let started = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(Begin::Started(_))))
        .count();
    let busy = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(Begin::InFlight)))
        .count();
    assert_eq!((started, busy), (1, 19), "{outcomes:?}");
}

async fn purging_keeps_live_records(store: &impl IdempotencyStore, clock: &ManualClock) {
    let org = scope();
    let old = start(store, &org, "old", fp("a")).await;
    assert!(store
        .complete(&old, response(b"old"), Duration::from_secs(1))
        .await
        .unwrap());
    let live = start(store, &org, "live", fp("a")).await;
    assert!(store.complete(&live, response(b"live"), TTL).await.unwrap());
    clock.advance(Duration::from_secs(2));
    store.purge_expired().await.unwrap();
    assert_eq!(
        store.begin(&org, "live", fp("a"), LEASE).await.unwrap(),
        Begin::Replay(response(b"live"))
    );
    start(store, &org, "old", fp("b")).await;
}
