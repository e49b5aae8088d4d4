//! `RedisWindowStore` against a real Redis: identical to the memory store on random traffic,
//! exact when several replicas (stores with their own connections) race on one bucket,
//! sliding on the server's clock, compact, one round trip per decision.

#![cfg(all(feature = "redis", feature = "memory"))]

mod redis_common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Barrier;
use tollgate_core::{BackendErrorKind, ManualClock, ModelId, OrgId};
use tollgate_sliding_window::{
    BucketKey, Decision, MemoryWindowStore, RedisWindowStore, WindowLimits, WindowStore,
};

use redis_common::{admin, command_calls, redis_url, shared_store, PrivateRedis};

fn limits(limit: u32, burst: u32, window_ms: u64) -> WindowLimits {
    WindowLimits {
        limit,
        burst,
        window_ms,
    }
}

fn bucket() -> BucketKey {
    BucketKey::new(OrgId::new(), ModelId::new())
}

/// A small deterministic generator.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// The script decides exactly as the memory store (itself checked against the definition)
/// on dense random traffic with pauses, for several shapes of limits.
#[tokio::test]
async fn decides_exactly_as_the_memory_store_on_random_traffic() {
    let Some(store) = shared_store().await else {
        return;
    };
    let clock = ManualClock::new(1_700_000_000_000);
    let redis = store.with_clock(Arc::new(clock.clone()));
    let memory = MemoryWindowStore::new(Arc::new(clock.clone()));
    // (limits, steps, one long pause in how many steps, the largest short gap in ms)
    let cases = [
        (limits(10, 5, 60_000), 1_500, 20, 300),
        (limits(60, 10, 60_000), 1_500, 20, 300),
        (limits(7, 3, 2_500), 1_500, 20, 300),
        (limits(4, 3, 400), 1_500, 20, 300),
        (limits(3, 10, 1_000), 1_500, 20, 300),
        (limits(1, 1, 1), 1_500, 20, 300),
        // Logs over 1 KB, which the script reads entry by entry when refusing.
        (limits(600, 40, 60_000), 3_000, 1_000, 120),
        (limits(400, 400, 3_000), 3_000, 500, 10),
    ];
    let mut refusals = 0;
    let mut largest = 0;
    for (seed, (l, steps, pause_one_in, gap)) in cases.into_iter().enumerate() {
        let k = bucket();
        let mut rng = Lcg(seed as u64 + 1);
        for step in 0..steps {
            clock.advance(Duration::from_millis(match rng.below(pause_one_in) {
                0 => rng.below(l.window_ms * 2 + 1),
                r if r % 2 == 0 => rng.below(gap),
                _ => rng.below(3),
            }));
            let expected = memory.check(k, l).await.unwrap();
            let got = redis.check(k, l).await.unwrap();
            assert_eq!(got, expected, "limits {l:?}, step {step}");
            refusals += usize::from(!got.admitted);
            largest = largest.max(l.limit - got.remaining);
        }
    }
    assert!(
        refusals > 1_000,
        "the traffic must hit the limits: {refusals}"
    );
    // Some logs held far more than the 254 entries a script reads whole.
    assert!(largest >= 400, "{largest}");
}

async fn race(
    stores: &[Arc<RedisWindowStore>],
    key: BucketKey,
    limits: WindowLimits,
    requests: usize,
) -> Vec<Decision> {
    let barrier = Arc::new(Barrier::new(requests));
    let tasks: Vec<_> = (0..requests)
        .map(|i| {
            let store = Arc::clone(&stores[i % stores.len()]);
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                store.check(key, limits).await.unwrap()
            })
        })
        .collect();
    let mut out = Vec::with_capacity(requests);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Two replicas, each with its own connection, hammer one bucket with 1,000 requests at
/// once: exactly `limit` are admitted between them, each `remaining` value exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_admit_exactly_the_limit_between_them() {
    let Some(first) = shared_store().await else {
        return;
    };
    let prefix = first.key(&bucket());
    let prefix = &prefix[..prefix.find(":{").unwrap()];
    // A second, independent store (its own connection manager) on the same keys.
    let second = RedisWindowStore::connect(&redis_url())
        .await
        .unwrap()
        .with_key_prefix(prefix);
    let stores = [Arc::new(first), Arc::new(second)];
    let key = bucket();
    let decisions = race(&stores, key, limits(100, 10_000, 60_000), 1_000).await;

    let mut remaining: Vec<u32> = decisions
        .iter()
        .filter(|d| d.admitted)
        .map(|d| d.remaining)
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, (0..100).collect::<Vec<_>>());
    for refused in decisions.iter().filter(|d| !d.admitted) {
        assert_eq!(refused.remaining, 0);
        let retry = refused.retry_after_ms.unwrap();
        assert!((59_000..=60_000).contains(&retry), "{retry}");
    }
    // Both replicas see the same full bucket afterwards.
    for store in &stores {
        assert!(
            !store
                .check(key, limits(100, 10_000, 60_000))
                .await
                .unwrap()
                .admitted
        );
    }
}

/// On the server's clock: the window slides with real time, and the key vanishes one
/// horizon after the last admission.
#[tokio::test]
async fn the_window_slides_on_the_server_clock_and_idle_buckets_vanish() {
    let Some(store) = shared_store().await else {
        return;
    };
    let l = limits(3, 10, 1_500);
    let k = bucket();
    let started = Instant::now();
    // One request, then two more 300 ms later.
    let d = store.check(k, l).await.unwrap();
    assert_eq!((d.admitted, d.remaining, d.reset_ms), (true, 2, 1_500));
    tokio::time::sleep(Duration::from_millis(300)).await;
    for remaining in [1, 0] {
        let d = store.check(k, l).await.unwrap();
        assert_eq!((d.admitted, d.remaining), (true, remaining));
    }
    let refused = store.check(k, l).await.unwrap();
    let elapsed = started.elapsed().as_millis() as u64;
    assert!(!refused.admitted);
    let retry = refused.retry_after_ms.unwrap();
    // The first admission leaves 1 500 ms after it was made, on the server's clock.
    assert!(
        retry <= 1_200 && retry + elapsed + 2 >= 1_500,
        "{retry} after {elapsed} ms"
    );
    assert_eq!(refused.reset_ms, retry);

    // Once it has left, exactly one request fits: the other two stay for 300 ms more.
    tokio::time::sleep(Duration::from_millis(retry + 50)).await;
    let d = store.check(k, l).await.unwrap();
    assert!(d.admitted, "{d:?}");
    assert_eq!(d.remaining, 0);
    assert!(!store.check(k, l).await.unwrap().admitted);

    let mut admin = admin(&redis_url()).await;
    let key = store.key(&k);
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!((1_000..=1_500).contains(&pttl), "{pttl}");
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(exists, 0, "an idle bucket must vanish on its own");
}

/// A saturated enterprise bucket (9,999 requests in the window) stays under 64 KB, where a
/// sorted set of the same requests takes far more.
#[tokio::test]
async fn a_saturated_enterprise_bucket_takes_under_64_kb() {
    let Some(store) = shared_store().await else {
        return;
    };
    let clock = ManualClock::new(1_700_000_000_000);
    let store = store.with_clock(Arc::new(clock.clone()));
    let enterprise = limits(9_999, 200, 60_000);
    let k = bucket();
    for i in 0..9_999u32 {
        let d = store.check(k, enterprise).await.unwrap();
        assert!(d.admitted, "request {i}");
        clock.advance(Duration::from_millis(5));
    }
    let full = store.check(k, enterprise).await.unwrap();
    assert!(!full.admitted);
    assert_eq!(full.remaining, 0);

    let mut admin = admin(&redis_url()).await;
    let key = store.key(&k);
    let bytes: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();
    let len: u64 = redis::cmd("STRLEN")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(len, 6 + 4 * 9_999);

    // The obvious alternative for comparison: a sorted set, one unique member per request.
    let zset = format!("{key}:zset-comparison");
    let mut zadd = redis::cmd("ZADD");
    zadd.arg(&zset);
    for i in 0..9_999u64 {
        let at = 1_700_000_000_000 + i * 5;
        zadd.arg(at).arg(format!("{at}-{i}"));
    }
    let _: i64 = zadd.query_async(&mut admin).await.unwrap();
    let zset_bytes: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(&zset)
        .arg("SAMPLES")
        .arg(0)
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(&zset)
        .query_async(&mut admin)
        .await
        .unwrap();
    eprintln!(
        "MEMORY USAGE of a saturated enterprise bucket: {bytes} bytes (sorted set: {zset_bytes})"
    );
    assert!(bytes <= 64 * 1024, "{bytes} bytes");
    assert!(zset_bytes > 4 * bytes, "{zset_bytes} vs {bytes}");
}

/// After warm-up, every decision is exactly one command on the server: one `EVALSHA`.
#[tokio::test]
async fn one_round_trip_per_decision() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let store = RedisWindowStore::connect(&server.url()).await.unwrap();
    let mut admin = admin(&server.url()).await;
    let k = bucket();
    let l = limits(50, 1_000, 60_000);
    // Warm-up: the first decision finds no script (NOSCRIPT), loads it and retries.
    assert!(store.check(k, l).await.unwrap().admitted);
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut admin)
        .await
        .unwrap();

    let mut admitted = 0;
    for i in 0..200 {
        let key = if i % 2 == 0 { k } else { bucket() };
        admitted += usize::from(store.check(key, l).await.unwrap().admitted);
    }
    assert_eq!(admitted, 149); // 49 more in `k`, then 51 refusals; 100 fresh buckets

    let mut calls = command_calls(&mut admin).await;
    // What the inspection itself ran.
    calls.remove("config|resetstat");
    calls.remove("info");
    // The client sent one EVALSHA per decision and nothing else; the rest is what the
    // script ran inside that one atomic call: TIME and STRLEN each time, GET of the (small)
    // log when there is one, SET per admission.
    assert_eq!(
        calls.into_iter().collect::<BTreeMap<_, _>>(),
        BTreeMap::from([
            ("evalsha".to_owned(), 200),
            ("time".to_owned(), 200),
            ("strlen".to_owned(), 200),
            ("get".to_owned(), 100),
            ("set".to_owned(), 149),
        ])
    );
}

/// A flushed script cache (restart, failover, `SCRIPT FLUSH`) costs one reload, not errors.
#[tokio::test]
async fn the_script_is_reloaded_after_a_flush() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let store = RedisWindowStore::connect(&server.url()).await.unwrap();
    let mut admin = admin(&server.url()).await;
    let k = bucket();
    let l = limits(5, 5, 60_000);
    assert_eq!(store.check(k, l).await.unwrap().remaining, 4);
    let loaded_once = command_calls(&mut admin).await;
    assert_eq!(loaded_once.get("script|load"), Some(&1));
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(store.check(k, l).await.unwrap().remaining, 3);
    assert_eq!(store.check(k, l).await.unwrap().remaining, 2);
    let calls = command_calls(&mut admin).await;
    assert_eq!(calls.get("script|load"), Some(&2));
    let exists: Vec<bool> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(store.script_sha())
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(exists, [true]);
}

/// Nothing listening: an `unavailable` error (503 from the layer), quickly — no hang.
#[tokio::test]
async fn an_unreachable_redis_is_unavailable_fast() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = RedisWindowStore::open(&format!("redis://127.0.0.1:{port}")).unwrap();
    for _ in 0..3 {
        let started = Instant::now();
        let err = store
            .check(bucket(), limits(5, 5, 60_000))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
        assert!(
            started.elapsed() <= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        store.ping().await.unwrap_err().kind(),
        BackendErrorKind::Unavailable
    );
    assert!(
        RedisWindowStore::connect(&format!("redis://127.0.0.1:{port}"))
            .await
            .is_err()
    );
}
