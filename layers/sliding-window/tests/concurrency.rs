//! Exactness under contention: many tasks on a multi-threaded runtime, released together by
//! a barrier, never admit more (or fewer) requests than the limit.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::sync::Barrier;
use tollgate_core::{ManualClock, ModelId, OrgId, Plan};
use tollgate_sliding_window::{
    BucketKey, Decision, MemoryWindowStore, PerModelSlidingWindowLayer, WindowLimits, WindowStore,
};

use common::*;

const TASKS: usize = 1_000;

async fn race(
    store: Arc<dyn WindowStore>,
    keys: Vec<BucketKey>,
    limits: WindowLimits,
) -> Vec<(BucketKey, Decision)> {
    let barrier = Arc::new(Barrier::new(keys.len()));
    let tasks: Vec<_> = keys
        .into_iter()
        .map(|key| {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            tokio::spawn(async move {
                barrier.wait().await;
                (key, store.check(key, limits).await.unwrap())
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn store(clock: &ManualClock) -> Arc<MemoryWindowStore> {
    Arc::new(MemoryWindowStore::new(Arc::new(clock.clone())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_tasks_on_one_bucket_admit_exactly_the_limit() {
    let clock = ManualClock::new(1_700_000_000_000);
    let memory = store(&clock);
    let key = BucketKey::new(OrgId::new(), ModelId::new());
    let limits = WindowLimits {
        limit: 100,
        burst: 10_000,
        window_ms: 60_000,
    };
    let decisions = race(memory.clone(), vec![key; TASKS], limits).await;

    let mut remaining: Vec<u32> = decisions
        .iter()
        .filter(|(_, d)| d.admitted)
        .map(|(_, d)| d.remaining)
        .collect();
    remaining.sort_unstable();
    // Exactly 100 admitted, each seeing a distinct count: no two decisions overlapped.
    assert_eq!(remaining, (0..100).collect::<Vec<u32>>());
    for (_, d) in decisions.iter().filter(|(_, d)| !d.admitted) {
        assert_eq!((d.remaining, d.retry_after_ms), (0, Some(60_000)));
    }

    // After the window, the bucket is idle and evicted.
    clock.advance(Duration::from_millis(60_000));
    assert_eq!(memory.sweep_now(), 1);
    assert!(memory.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_burst_is_exact_under_contention_too() {
    let clock = ManualClock::new(1_700_000_000_000);
    let key = BucketKey::new(OrgId::new(), ModelId::new());
    let limits = WindowLimits {
        limit: 10_000,
        burst: 250,
        window_ms: 60_000,
    };
    let decisions = race(store(&clock), vec![key; TASKS], limits).await;
    let admitted = decisions.iter().filter(|(_, d)| d.admitted).count();
    assert_eq!(admitted, 250);
    for (_, d) in decisions.iter().filter(|(_, d)| !d.admitted) {
        assert_eq!((d.remaining, d.retry_after_ms), (10_000 - 250, Some(1_000)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_buckets_at_once_each_admit_exactly_their_limit() {
    let clock = ManualClock::new(1_700_000_000_000);
    let buckets: Vec<BucketKey> = (0..40)
        .map(|_| BucketKey::new(OrgId::new(), ModelId::new()))
        .collect();
    let keys: Vec<BucketKey> = (0..2_000).map(|i| buckets[i % buckets.len()]).collect();
    let limits = WindowLimits {
        limit: 30,
        burst: 1_000,
        window_ms: 60_000,
    };
    let memory = store(&clock);
    let decisions = race(memory.clone(), keys, limits).await;
    for bucket in &buckets {
        let admitted = decisions
            .iter()
            .filter(|(k, d)| k == bucket && d.admitted)
            .count();
        assert_eq!(admitted, 30);
    }
    assert_eq!(memory.len(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_requests_through_the_layer() {
    let clock = ManualClock::new(1_700_000_000_000);
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = PerModelSlidingWindowLayer::new(store(&clock))
        .with_limit(Plan::Pro, 100)
        .with_burst(Plan::Pro, 10_000);
    let api = stack(layer, Arc::clone(&calls));
    let (model, org) = (ModelId::new(), OrgId::new());
    let barrier = Arc::new(Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (mut api, barrier) = (api.clone(), Arc::clone(&barrier));
            // Every task its own key of the same org: they all share the bucket.
            let who = tollgate_core::Principal {
                org,
                ..principal(Plan::Pro)
            };
            tokio::spawn(async move {
                barrier.wait().await;
                send(&mut api, get(model, who)).await
            })
        })
        .collect();
    let mut remaining = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let reply = t.await.unwrap();
        match reply.status {
            StatusCode::OK => remaining.push(reply.info.unwrap().remaining),
            StatusCode::TOO_MANY_REQUESTS => {
                assert_limited(&reply, 100, 0, 60, 60);
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    remaining.sort_unstable();
    assert_eq!(remaining, (0..100).collect::<Vec<u32>>());
    assert_eq!(refused, 900);
    assert_eq!(calls.load(Ordering::SeqCst), 100);
}
