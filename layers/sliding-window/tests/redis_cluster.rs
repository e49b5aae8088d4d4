//! `RedisWindowStore` on a three-node Redis Cluster that the test starts on loopback ports:
//! the same script, unchanged, through `redis+cluster://`, exact across replicas, with each
//! bucket's key on the node that owns its hash tag's slot.

#![cfg(feature = "redis")]

mod redis_common;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Barrier;
use tollgate_core::{ModelId, OrgId};
use tollgate_sliding_window::{BucketKey, Decision, RedisWindowStore, WindowLimits, WindowStore};

use redis_common::{admin, unique_prefix, Cluster};

const LIMITS: WindowLimits = WindowLimits {
    limit: 40,
    burst: 10_000,
    window_ms: 60_000,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_a_cluster_admit_exactly_the_limit_per_bucket() {
    let Some(cluster) = Cluster::start().await else {
        return;
    };
    let prefix = unique_prefix();
    // Two replicas, each knowing a different node only: the rest is discovered.
    let first = RedisWindowStore::connect(&cluster.url(&[0]))
        .await
        .unwrap()
        .with_key_prefix(&prefix)
        // This test is about exactness, not latency: 900 checks land at once on a small
        // machine that may be busy, so the 250 ms default must not turn them into errors.
        .with_timeout(Duration::from_secs(5));
    let second = RedisWindowStore::connect(&cluster.url(&[2, 1]))
        .await
        .unwrap()
        .with_key_prefix(&prefix)
        // This test is about exactness, not latency: 900 checks land at once on a small
        // machine that may be busy, so the 250 ms default must not turn them into errors.
        .with_timeout(Duration::from_secs(5));

    first.warm_up().await.unwrap();
    second.warm_up().await.unwrap();

    // Two buckets on each node, chosen by asking the cluster which node owns their slot.
    let mut buckets: Vec<(BucketKey, usize)> = Vec::new();
    let mut per_node = [0; 3];
    while per_node.iter().any(|&n| n < 2) {
        let k = BucketKey::new(OrgId::new(), ModelId::new());
        let node = cluster.node_of(&first.key(&k)).await;
        if per_node[node] < 2 {
            per_node[node] += 1;
            buckets.push((k, node));
        }
    }

    let stores = [Arc::new(first), Arc::new(second)];
    let requests_per_bucket = 150;
    let barrier = Arc::new(Barrier::new(buckets.len() * requests_per_bucket));
    let mut tasks = Vec::new();
    for &(k, _) in &buckets {
        for i in 0..requests_per_bucket {
            let store = Arc::clone(&stores[i % 2]);
            let barrier = Arc::clone(&barrier);
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                (k, store.check(k, LIMITS).await.unwrap())
            }));
        }
    }
    let mut decisions: Vec<(BucketKey, Decision)> = Vec::new();
    for t in tasks {
        decisions.push(t.await.unwrap());
    }

    for &(k, _) in &buckets {
        let mut remaining: Vec<u32> = decisions
            .iter()
            .filter(|(key, d)| *key == k && d.admitted)
            .map(|(_, d)| d.remaining)
            .collect();
        remaining.sort_unstable();
        assert_eq!(remaining, (0..40).collect::<Vec<_>>(), "bucket {k:?}");
        assert_eq!(
            decisions
                .iter()
                .filter(|(key, d)| *key == k && !d.admitted)
                .count(),
            110
        );
    }

    // Each bucket's log is on the node owning its slot, and only there.
    for (i, node) in cluster.nodes.iter().enumerate() {
        let mut conn = admin(&node.url()).await;
        let keys: i64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
        assert_eq!(keys, 2, "node {i}");
        for &(k, owner) in buckets.iter().filter(|(_, owner)| *owner == i) {
            let exists: i64 = redis::cmd("EXISTS")
                .arg(stores[0].key(&k))
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!((exists, owner), (1, i), "bucket {k:?}");
        }
    }
}
