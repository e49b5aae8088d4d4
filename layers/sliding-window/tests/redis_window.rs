//! The window behaviour suite, written once against any [`WindowStore`] and a clock to move,
//! and run against the memory store and against Redis (the script given the clock's time via
//! `RedisWindowStore::with_clock`, so every assertion stays exact to the millisecond).
//! Exact counts, headers and bodies a client sees through the layer, and exact decisions.

#![cfg(all(feature = "redis", feature = "memory"))]

mod common;
mod redis_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tollgate_core::{Clock, KeyId, ManualClock, ModelId, OrgId, Plan, Principal};
use tollgate_sliding_window::{
    BucketKey, Decision, MemoryWindowStore, PerModelSlidingWindowLayer, WindowLimits, WindowPolicy,
    WindowStore,
};

use common::*;

/// A store and the clock it decides by.
struct Backend {
    store: Arc<dyn WindowStore>,
    clock: ManualClock,
}

const START_MS: u64 = 1_700_000_000_000;

fn memory() -> Backend {
    let clock = ManualClock::new(START_MS);
    Backend {
        store: Arc::new(MemoryWindowStore::new(Arc::new(clock.clone()))),
        clock,
    }
}

async fn redis() -> Option<Backend> {
    let clock = ManualClock::new(START_MS);
    let store = redis_common::shared_store()
        .await?
        .with_clock(Arc::new(clock.clone()));
    Some(Backend {
        store: Arc::new(store),
        clock,
    })
}

impl Backend {
    fn advance(&self, ms: u64) {
        self.clock.advance(Duration::from_millis(ms));
    }

    fn api(
        &self,
        configure: impl FnOnce(
            PerModelSlidingWindowLayer<Arc<dyn WindowStore>>,
        ) -> PerModelSlidingWindowLayer<Arc<dyn WindowStore>>,
    ) -> (Api, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = configure(PerModelSlidingWindowLayer::new(Arc::clone(&self.store)));
        (stack(layer, Arc::clone(&calls)), calls)
    }

    async fn check(&self, key: BucketKey, limits: WindowLimits) -> Decision {
        self.store.check(key, limits).await.unwrap()
    }
}

/// Runs each case against both backends, as separate tests.
macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::memory()).await;
                }
            )*
        }
        mod redis_store {
            $(
                #[tokio::test]
                async fn $case() {
                    if let Some(backend) = super::redis().await {
                        super::$case(backend).await;
                    }
                }
            )*
        }
    };
}

suite!(
    free_plan_admits_ten_then_refuses_the_eleventh,
    capacity_comes_back_one_request_at_a_time,
    there_is_no_reset_at_the_top_of_the_minute,
    burst_refuses_the_sixth_within_a_second,
    refused_requests_take_no_capacity,
    other_models_are_independent,
    keys_of_one_org_share_a_bucket_other_orgs_do_not,
    limits_follow_the_plan_of_the_principal,
    limits_and_bursts_are_configurable,
    window_length_is_configurable,
    retry_after_waits_for_both_window_and_burst,
    windows_shorter_than_the_burst,
    a_lowered_limit_counts_what_is_already_in_the_window,
    zero_limits_never_admit,
    a_clock_stepping_back_keeps_counting,
);

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

/// Ten free-plan requests 250 ms apart (never more than 4 in a second), from now.
/// Leaves the clock at the tenth request (2 250 ms after the first).
async fn fill_free_window(b: &Backend, api: &mut Api, model: ModelId, who: Principal) {
    let resets = [60, 60, 60, 60, 59, 59, 59, 59, 58, 58];
    for (i, reset) in resets.into_iter().enumerate() {
        if i > 0 {
            b.advance(250);
        }
        let reply = send(api, get(model, who)).await;
        assert_admitted(&reply, 10, 9 - i as u32, reset);
    }
}

async fn free_plan_admits_ten_then_refuses_the_eleventh(b: Backend) {
    let (mut api, calls) = b.api(|l| l);
    let (model, who) = (ModelId::new(), principal(Plan::Free));
    fill_free_window(&b, &mut api, model, who).await;

    b.advance(250); // 2 500 ms after the first request
    let reply = send(&mut api, get(model, who)).await;
    // The first request leaves the window at 60 000 ms: 57.5 s away, rounded up.
    assert_limited(&reply, 10, 0, 58, 58);
    assert_eq!(
        reply.json(),
        serde_json::json!({
            "error": "Rate limit exceeded. Slow down and try again.",
            "code": "RATE_LIMIT_EXCEEDED"
        })
    );
    assert_eq!(calls.load(Ordering::SeqCst), 10);
}

async fn capacity_comes_back_one_request_at_a_time(b: Backend) {
    let (mut api, calls) = b.api(|l| l);
    let (model, who) = (ModelId::new(), principal(Plan::Free));
    fill_free_window(&b, &mut api, model, who).await;

    // 1 ms before the first request ages out: still full.
    b.advance(60_000 - 2_250 - 1);
    assert_limited(&send(&mut api, get(model, who)).await, 10, 0, 1, 1);

    // Exactly when it ages out: one request fits, not ten.
    b.advance(1);
    assert_admitted(&send(&mut api, get(model, who)).await, 10, 0, 1);
    // The second request (at 250 ms) leaves at 60 250 ms.
    assert_limited(&send(&mut api, get(model, who)).await, 10, 0, 1, 1);
    b.advance(249);
    assert_limited(&send(&mut api, get(model, who)).await, 10, 0, 1, 1);
    b.advance(1);
    assert_admitted(&send(&mut api, get(model, who)).await, 10, 0, 1);
    assert_limited(&send(&mut api, get(model, who)).await, 10, 0, 1, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 12);
}

async fn there_is_no_reset_at_the_top_of_the_minute(b: Backend) {
    let (mut api, _) = b.api(|l| l);
    let (model, who) = (ModelId::new(), principal(Plan::Free));
    // Five at the start, five 30 s later.
    for i in 0..5 {
        assert_admitted(&send(&mut api, get(model, who)).await, 10, 9 - i, 60);
    }
    b.advance(30_000);
    for i in 0..5 {
        assert_admitted(&send(&mut api, get(model, who)).await, 10, 4 - i, 30);
    }
    // At 60 s the first five leave together, the other five stay counted until 90 s.
    b.advance(30_000);
    for i in 0..5 {
        assert_admitted(&send(&mut api, get(model, who)).await, 10, 4 - i, 30);
    }
    assert_limited(&send(&mut api, get(model, who)).await, 10, 0, 30, 30);
}

async fn burst_refuses_the_sixth_within_a_second(b: Backend) {
    let (mut api, calls) = b.api(|l| l);
    let (model, who) = (ModelId::new(), principal(Plan::Free));
    for i in 0..5 {
        assert_admitted(&send(&mut api, get(model, who)).await, 10, 9 - i, 60);
    }
    // The window has room for 5 more, the second does not.
    assert_limited(&send(&mut api, get(model, who)).await, 10, 5, 60, 1);
    b.advance(999);
    assert_limited(&send(&mut api, get(model, who)).await, 10, 5, 60, 1);
    b.advance(1);
    assert_admitted(&send(&mut api, get(model, who)).await, 10, 4, 59);
    assert_eq!(calls.load(Ordering::SeqCst), 6);
}

async fn refused_requests_take_no_capacity(b: Backend) {
    let (mut api, calls) = b.api(|l| l);
    let (model, who) = (ModelId::new(), principal(Plan::Free));
    fill_free_window(&b, &mut api, model, who).await;

    // Hammer the full window until just before the first request ages out.
    let mut refused = 0;
    for _ in 0..115 {
        b.advance(500);
        for _ in 0..3 {
            let reply = send(&mut api, get(model, who)).await;
            assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
            refused += 1;
        }
    }
    assert_eq!(refused, 345);
    // Now 59 750 ms after the first request.
    b.advance(249);
    assert_limited(&send(&mut api, get(model, who)).await, 10, 0, 1, 1);
    b.advance(1);
    assert_admitted(&send(&mut api, get(model, who)).await, 10, 0, 1);
    assert_limited(&send(&mut api, get(model, who)).await, 10, 0, 1, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 11);
}

async fn other_models_are_independent(b: Backend) {
    let (mut api, _) = b.api(|l| l);
    let (a, other, who) = (ModelId::new(), ModelId::new(), principal(Plan::Free));
    fill_free_window(&b, &mut api, a, who).await;
    assert_limited(&send(&mut api, get(a, who)).await, 10, 0, 58, 58);
    assert_admitted(&send(&mut api, get(other, who)).await, 10, 9, 60);
    assert_limited(&send(&mut api, get(a, who)).await, 10, 0, 58, 58);
}

async fn keys_of_one_org_share_a_bucket_other_orgs_do_not(b: Backend) {
    let (mut api, _) = b.api(|l| l);
    let model = ModelId::new();
    let org = OrgId::new();
    let key = |k| Principal {
        org,
        key: k,
        plan: Plan::Free,
    };
    let keys = [KeyId::new(), KeyId::new()];
    for i in 0..10u32 {
        if i > 0 {
            b.advance(250);
        }
        let reply = send(&mut api, get(model, key(keys[i as usize % 2]))).await;
        assert_eq!(reply.info.unwrap().remaining, 9 - i);
    }
    // A third key of the same org finds the bucket full.
    let reply = send(&mut api, get(model, key(KeyId::new()))).await;
    assert_limited(&reply, 10, 0, 58, 58);
    // Another org on the same model has its own bucket.
    assert_admitted(
        &send(&mut api, get(model, principal(Plan::Free))).await,
        10,
        9,
        60,
    );
}

async fn limits_follow_the_plan_of_the_principal(b: Backend) {
    let (mut api, _) = b.api(|l| l);
    let model = ModelId::new();
    for (plan, limit) in [
        (Plan::Free, 10),
        (Plan::Basic, 60),
        (Plan::Pro, 300),
        (Plan::Enterprise, 9_999),
    ] {
        let who = principal(plan);
        assert_admitted(&send(&mut api, get(model, who)).await, limit, limit - 1, 60);
        // The burst of the plan is what stops a flood within one second.
        let mut admitted = 1;
        while send(&mut api, get(model, who)).await.status == StatusCode::OK {
            admitted += 1;
        }
        assert_eq!(admitted, plan.default_burst(), "{plan}");
    }
}

async fn limits_and_bursts_are_configurable(b: Backend) {
    let (mut api, _) = b.api(|l| l.with_limit(Plan::Free, 3).with_burst(Plan::Free, 2));
    let (model, who) = (ModelId::new(), principal(Plan::Free));
    assert_admitted(&send(&mut api, get(model, who)).await, 3, 2, 60);
    assert_admitted(&send(&mut api, get(model, who)).await, 3, 1, 60);
    assert_limited(&send(&mut api, get(model, who)).await, 3, 1, 60, 1);
    b.advance(1_000);
    assert_admitted(&send(&mut api, get(model, who)).await, 3, 0, 59);
    assert_limited(&send(&mut api, get(model, who)).await, 3, 0, 59, 59);

    // The TOLLGATE_BURST syntax.
    let policy = WindowPolicy::new()
        .with_bursts_config("free=1,basic=10,pro=30,enterprise=200")
        .unwrap();
    let (mut api, _) = b.api(|l| l.with_policy(policy));
    let who = principal(Plan::Free);
    assert_admitted(&send(&mut api, get(model, who)).await, 10, 9, 60);
    assert_limited(&send(&mut api, get(model, who)).await, 10, 9, 60, 1);
}

async fn window_length_is_configurable(b: Backend) {
    let (mut api, _) = b.api(|l| l.with_window(Duration::from_secs(10)));
    let (model, who) = (ModelId::new(), principal(Plan::Free));
    let resets = [10, 10, 10, 10, 9, 9, 9, 9, 8, 8];
    for (i, reset) in resets.into_iter().enumerate() {
        if i > 0 {
            b.advance(250);
        }
        assert_admitted(
            &send(&mut api, get(model, who)).await,
            10,
            9 - i as u32,
            reset,
        );
    }
    b.advance(250);
    assert_limited(&send(&mut api, get(model, who)).await, 10, 0, 8, 8);
    b.advance(10_000 - 2_500);
    assert_admitted(&send(&mut api, get(model, who)).await, 10, 0, 1);
}

async fn retry_after_waits_for_both_window_and_burst(b: Backend) {
    let l = limits(10, 5, 60_000);
    // Window full at 10 with the 5 newest inside the last second: the window frees when
    // the first admission ages out, by when the burst is long free.
    let k = bucket();
    let start = b.clock.now_ms();
    for at in [
        0, 100, 200, 300, 400, 50_000, 50_100, 50_200, 50_300, 50_400,
    ] {
        b.clock.set(start + at);
        assert!(b.check(k, l).await.admitted, "{at}");
    }
    b.clock.set(start + 50_500);
    assert_eq!(
        b.check(k, l).await,
        Decision {
            admitted: false,
            limit: 10,
            remaining: 0,
            reset_ms: 60_000 - 50_500,
            retry_after_ms: Some(60_000 - 50_500),
        }
    );
    // Burst full, window not: wait for the oldest of the last second.
    let k2 = bucket();
    for at in [51_000, 51_200, 51_400, 51_600, 51_800] {
        b.clock.set(start + at);
        assert!(b.check(k2, l).await.admitted);
    }
    b.clock.set(start + 51_900);
    assert_eq!(
        b.check(k2, l).await,
        Decision {
            admitted: false,
            limit: 10,
            remaining: 5,
            reset_ms: 59_100,
            retry_after_ms: Some(100),
        }
    );
    b.clock.set(start + 52_000);
    assert_eq!(b.check(k2, l).await.remaining, 4);
}

async fn windows_shorter_than_the_burst(b: Backend) {
    // A 250 ms window with room for 4, and at most 3 per second.
    let l = limits(4, 3, 250);
    let k = bucket();
    let d = b.check(k, l).await;
    assert_eq!((d.admitted, d.remaining, d.reset_ms), (true, 3, 250));
    b.advance(100);
    assert_eq!(b.check(k, l).await.remaining, 2);
    b.advance(100);
    assert_eq!(b.check(k, l).await.remaining, 1);
    // Three in the past second: the burst refuses although the window has room.
    b.advance(100);
    assert_eq!(
        b.check(k, l).await,
        Decision {
            admitted: false,
            limit: 4,
            remaining: 2, // the first request already left the 250 ms window
            reset_ms: 50,
            retry_after_ms: Some(700),
        }
    );
    b.advance(700);
    let d = b.check(k, l).await;
    assert_eq!((d.admitted, d.remaining, d.reset_ms), (true, 3, 250));
}

async fn a_lowered_limit_counts_what_is_already_in_the_window(b: Backend) {
    let k = bucket();
    for _ in 0..6 {
        assert!(b.check(k, limits(10, 100, 60_000)).await.admitted);
        b.advance(10);
    }
    // Downgraded to 4 per window with 6 already counted.
    assert_eq!(
        b.check(k, limits(4, 100, 60_000)).await,
        Decision {
            admitted: false,
            limit: 4,
            remaining: 0,
            reset_ms: 60_000 - 60,
            // Until only 3 are left: the third admission (at 20 ms) ages out.
            retry_after_ms: Some(60_000 - 60 + 20),
        }
    );
}

async fn zero_limits_never_admit(b: Backend) {
    let k = bucket();
    for (l, retry) in [
        (limits(0, 5, 60_000), 60_000),
        (limits(5, 0, 60_000), 60_000),
        (limits(0, 0, 0), 1),
    ] {
        assert_eq!(
            b.check(k, l).await,
            Decision {
                admitted: false,
                limit: l.limit,
                remaining: l.limit,
                reset_ms: 0,
                retry_after_ms: Some(retry),
            }
        );
    }
}

async fn a_clock_stepping_back_keeps_counting(b: Backend) {
    let k = bucket();
    let l = limits(2, 5, 60_000);
    let start = b.clock.now_ms();
    b.clock.set(start + 100_000);
    assert!(b.check(k, l).await.admitted);
    // Earlier than the newest admission: decided as at that admission.
    b.clock.set(start + 50_000);
    let d = b.check(k, l).await;
    assert_eq!((d.admitted, d.remaining, d.reset_ms), (true, 0, 60_000));
    b.clock.set(start + 40_000);
    assert_eq!(b.check(k, l).await.retry_after_ms, Some(60_000));
    b.clock.set(start + 160_000);
    assert!(b.check(k, l).await.admitted);
}

/// The layer over Redis answers exactly as over memory when both see the same traffic.
#[tokio::test]
async fn the_layer_answers_the_same_over_memory_and_redis() {
    let Some(redis) = redis().await else { return };
    let memory = memory();
    let (mut over_memory, _) = memory.api(|l| l.with_window(Duration::from_secs(5)));
    let (mut over_redis, _) = redis.api(|l| l.with_window(Duration::from_secs(5)));
    let (model, who) = (ModelId::new(), principal(Plan::Basic));
    let mut seen = [0usize; 2];
    for step in 0..400u64 {
        // 2–26 ms apart: bursts of 10/s bite, the 60-per-5-s window bites.
        let gap = 2 + (step * 7919) % 25;
        memory.advance(gap);
        redis.advance(gap);
        let a = send(&mut over_memory, get(model, who)).await;
        let b = send(&mut over_redis, get(model, who)).await;
        assert_eq!(a.status, b.status, "step {step}");
        assert_eq!(a.limits(), b.limits(), "step {step}");
        assert_eq!(a.body, b.body, "step {step}");
        seen[usize::from(a.status == StatusCode::OK)] += 1;
    }
    // Both outcomes happened, so the comparison meant something.
    assert!(seen[0] > 50 && seen[1] > 50, "{seen:?}");
}

/// What the script leaves in Redis: one hash-tagged key per bucket, 6 + 4 bytes per request
/// in the window, expiring one horizon after the last admission.
#[tokio::test]
async fn the_log_is_one_compact_expiring_key_per_bucket() {
    let Some(store) = redis_common::shared_store().await else {
        return;
    };
    let clock = ManualClock::new(START_MS);
    let store = store.with_clock(Arc::new(clock.clone()));
    let k = bucket();
    let l = limits(10, 10, 60_000);
    for _ in 0..7 {
        assert!(store.check(k, l).await.unwrap().admitted);
        clock.advance(Duration::from_millis(3));
    }
    let mut admin = redis_common::admin(&redis_common::redis_url()).await;
    let key = store.key(&k);
    assert!(key.ends_with(&format!(":{{{}:{}}}:w", k.org, k.model)));
    let log: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(log.len(), 6 + 7 * 4);
    let newest = START_MS + 6 * 3;
    assert_eq!(log[..6], newest.to_be_bytes()[2..]);
    assert_eq!(log[6..10], ((START_MS % (1 << 32)) as u32).to_be_bytes());
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!((55_000..=60_000).contains(&pttl), "{pttl}");
    // A refusal writes nothing (the expiry is not pushed back).
    let refusing = limits(7, 10, 60_000);
    assert!(!store.check(k, refusing).await.unwrap().admitted);
    let after: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(after, log);

    // An admission drops what left the horizon: 61 s later only the new entry is left.
    clock.advance(Duration::from_millis(61_000));
    assert_eq!(store.check(k, l).await.unwrap().remaining, 9);
    let log: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(log.len(), 6 + 4);
}

/// A value that is not a log (written by something else) is replaced, not trusted.
#[tokio::test]
async fn a_malformed_log_is_replaced() {
    let Some(store) = redis_common::shared_store().await else {
        return;
    };
    let k = bucket();
    let mut admin = redis_common::admin(&redis_common::redis_url()).await;
    let key = store.key(&k);
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("garbage!")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut admin)
        .await
        .unwrap();
    let d = store.check(k, limits(3, 3, 60_000)).await.unwrap();
    assert_eq!((d.admitted, d.remaining), (true, 2));
    // A key of another type is an internal error, not a panic or a wrong admission.
    let other = bucket();
    let _: () = redis::cmd("LPUSH")
        .arg(store.key(&other))
        .arg("x")
        .query_async(&mut admin)
        .await
        .unwrap();
    let err = store.check(other, limits(3, 3, 60_000)).await.unwrap_err();
    assert_eq!(err.kind(), tollgate_core::BackendErrorKind::Other);
    let _: () = redis::cmd("DEL")
        .arg(store.key(&other))
        .query_async(&mut admin)
        .await
        .unwrap();
}
