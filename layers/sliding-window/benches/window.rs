//! One sliding-window decision: the memory store's `check_now` against `RedisWindowStore`
//! (one `EVALSHA` on `REDIS_URL`, default `redis://127.0.0.1:6379`), in the same run.
//!
//! `cargo bench -p tollgate-sliding-window --features redis --bench window`
//!
//! Criterion measures the mean cost of a decision; a report follows with decisions/s, p50
//! and p99 of sequential decisions, decisions/s with 64 in flight, the proof of one round
//! trip per decision (`INFO commandstats`: `evalsha` calls == decisions, and nothing else
//! from the client), and `MEMORY USAGE` of a saturated enterprise bucket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use tokio::runtime::Runtime;
use tollgate_core::{ManualClock, ModelId, OrgId};
use tollgate_sliding_window::{
    BucketKey, MemoryWindowStore, RedisWindowStore, WindowLimits, WindowStore,
};

/// The enterprise plan: 9,999 per minute, 200 per second.
const ENTERPRISE: WindowLimits = WindowLimits {
    limit: 9_999,
    burst: 200,
    window_ms: 60_000,
};

/// Decisions spread over this many buckets, so that none hits its burst.
const BUCKETS: usize = 1_000;

fn buckets() -> Vec<BucketKey> {
    (0..BUCKETS)
        .map(|_| BucketKey::new(OrgId::new(), ModelId::new()))
        .collect()
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A Redis store with its own key prefix, or `None` when Redis does not answer.
fn redis_store(rt: &Runtime) -> Option<Arc<RedisWindowStore>> {
    let url = redis_url();
    let prefix = format!("tollgate-bench-{}", OrgId::new());
    match rt.block_on(RedisWindowStore::connect(&url)) {
        Ok(store) => Some(Arc::new(store.with_key_prefix(prefix))),
        Err(e) => {
            eprintln!("Redis at {url} unreachable ({e}): only the memory store is measured");
            None
        }
    }
}

fn criterion_benches(c: &mut Criterion, rt: &Runtime, redis: Option<&RedisWindowStore>) {
    let mut group = c.benchmark_group("decision");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);

    let memory = MemoryWindowStore::new(Arc::new(ManualClock::new(0)));
    let keys = buckets();
    let now = AtomicU64::new(1_700_000_000_000);
    let mut i = 0;
    group.bench_function("memory_check_now", |b| {
        b.iter(|| {
            i = (i + 1) % BUCKETS;
            // 1 ms per decision: each bucket sees one a second, well under its limits.
            let at = now.fetch_add(1, Ordering::Relaxed);
            memory.check_now(keys[i], ENTERPRISE, at)
        })
    });

    if let Some(redis) = redis {
        let mut i = 0;
        group.bench_function("redis_check", |b| {
            b.to_async(rt).iter(|| {
                i = (i + 1) % BUCKETS;
                let decision = redis.check(keys[i], ENTERPRISE);
                async move { decision.await.unwrap() }
            })
        });

        // A full enterprise bucket: every decision reads the 40 KB log and refuses.
        let saturated = saturated_bucket(rt, redis);
        group.bench_function("redis_check_saturated_enterprise", |b| {
            b.to_async(rt).iter(|| {
                let decision = redis.check(saturated, ENTERPRISE);
                async move {
                    let decision = decision.await.unwrap();
                    assert!(!decision.admitted);
                    decision
                }
            })
        });
    }
    group.finish();
}

/// A bucket holding 9,999 admissions within the current minute of the server's clock:
/// filled with the script's clock argument, 5 ms apart, ending at the server's time now.
fn saturated_bucket(rt: &Runtime, redis: &RedisWindowStore) -> BucketKey {
    let key = BucketKey::new(OrgId::new(), ModelId::new());
    rt.block_on(async {
        let server_now = server_time_ms().await;
        let clock = ManualClock::new(server_now - 9_999 * 5);
        let filling = RedisWindowStore::open(&redis_url())
            .unwrap()
            .with_key_prefix(redis.key(&key).split(":{").next().unwrap())
            .with_clock(Arc::new(clock.clone()));
        for _ in 0..9_999 {
            assert!(filling.check(key, ENTERPRISE).await.unwrap().admitted);
            clock.advance(Duration::from_millis(5));
        }
    });
    key
}

async fn admin() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn server_time_ms() -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut admin().await)
        .await
        .unwrap();
    secs * 1_000 + micros / 1_000
}

async fn command_calls() -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut admin().await)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split(',').find_map(|s| s.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

struct Figures {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

impl Figures {
    fn from(mut took: Vec<Duration>, total: Duration) -> Figures {
        took.sort_unstable();
        let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
        Figures {
            per_sec: took.len() as f64 / total.as_secs_f64(),
            p50: at(0.50),
            p99: at(0.99),
        }
    }

    fn print(&self, what: &str) {
        println!(
            "{what:<44} {:>12.0} decisions/s   p50 {:>9.2?}   p99 {:>9.2?}",
            self.per_sec, self.p50, self.p99
        );
    }
}

const SEQUENTIAL: usize = 20_000;
const IN_FLIGHT: usize = 64;
const CONCURRENT: usize = 64_000;

fn report(rt: &Runtime, redis: Option<&Arc<RedisWindowStore>>) {
    println!("\n== sliding-window decisions (enterprise limits, {BUCKETS} buckets) ==");
    let memory = MemoryWindowStore::new(Arc::new(ManualClock::new(0)));
    let keys = buckets();
    let mut took = Vec::with_capacity(SEQUENTIAL * 10);
    let started = Instant::now();
    for i in 0..SEQUENTIAL * 10 {
        let t = Instant::now();
        let d = memory.check_now(keys[i % BUCKETS], ENTERPRISE, 1_700_000_000_000 + i as u64);
        took.push(t.elapsed());
        std::hint::black_box(d);
    }
    Figures::from(took, started.elapsed()).print("memory check_now, sequential");

    let Some(redis) = redis else {
        return;
    };
    rt.block_on(async {
        // Warm: the script is loaded and the connection made before counting.
        redis.check(keys[0], ENTERPRISE).await.unwrap();
        let before = command_calls().await;

        let mut took = Vec::with_capacity(SEQUENTIAL);
        let started = Instant::now();
        for i in 0..SEQUENTIAL {
            let t = Instant::now();
            redis.check(keys[i % BUCKETS], ENTERPRISE).await.unwrap();
            took.push(t.elapsed());
        }
        Figures::from(took, started.elapsed()).print("redis check, sequential");

        let redis = Arc::clone(redis);
        let keys = Arc::new(keys);
        let started = Instant::now();
        let tasks: Vec<_> = (0..IN_FLIGHT)
            .map(|t| {
                let (redis, keys) = (Arc::clone(&redis), Arc::clone(&keys));
                tokio::spawn(async move {
                    let mut took = Vec::with_capacity(CONCURRENT / IN_FLIGHT);
                    for i in 0..CONCURRENT / IN_FLIGHT {
                        let at = Instant::now();
                        let k = keys[(t * 997 + i) % BUCKETS];
                        redis.check(k, ENTERPRISE).await.unwrap();
                        took.push(at.elapsed());
                    }
                    took
                })
            })
            .collect();
        let mut took = Vec::with_capacity(CONCURRENT);
        for t in tasks {
            took.extend(t.await.unwrap());
        }
        Figures::from(took, started.elapsed())
            .print(&format!("redis check, {IN_FLIGHT} in flight (one connection)"));

        let after = command_calls().await;
        let decisions = (SEQUENTIAL + CONCURRENT) as u64;
        let delta = |name: &str| after.get(name).unwrap_or(&0) - before.get(name).unwrap_or(&0);
        // The script's own commands run inside the EVALSHA; INFO is this report's.
        let inside_script = ["time", "strlen", "get", "getrange", "set"];
        let others: Vec<(String, u64)> = after
            .keys()
            .filter(|name| name.as_str() != "evalsha" && name.as_str() != "info")
            .filter(|name| !inside_script.contains(&name.as_str()))
            .map(|name| (name.clone(), delta(name)))
            .filter(|(_, d)| *d > 0)
            .collect();
        println!(
            "round trips: {decisions} decisions -> evalsha calls +{} (run inside it: time +{}, strlen +{}, get +{}, set +{}); other client commands: {others:?}",
            delta("evalsha"),
            delta("time"),
            delta("strlen"),
            delta("get"),
            delta("set"),
        );
        println!(
            "one round trip per decision: {}",
            if delta("evalsha") == decisions && others.is_empty() {
                "yes"
            } else {
                "NO (or another client used this Redis meanwhile)"
            }
        );
    });

    let saturated = saturated_bucket(rt, redis);
    rt.block_on(async {
        let bytes: u64 = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(redis.key(&saturated))
            .query_async(&mut admin().await)
            .await
            .unwrap();
        println!("MEMORY USAGE of a saturated enterprise bucket (9,999 requests): {bytes} bytes");
    });
}

fn main() {
    let rt = runtime();
    let redis = redis_store(&rt);
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c, &rt, redis.as_deref());
    report(&rt, redis.as_ref());
    c.final_summary();
}
