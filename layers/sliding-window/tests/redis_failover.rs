//! Redis killed mid-load, behind `FailoverWindowStore`: fail-open keeps serving within the
//! local limit, fail-closed answers 503, no call waits more than ~300 ms on the dead server,
//! and once Redis is back the shared limit holds again without a restart.

#![cfg(all(feature = "redis", feature = "memory"))]

mod common;
mod redis_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use tollgate_core::{BackendErrorKind, ErrorCode, ModelId, OrgId, Plan};
use tollgate_sliding_window::{
    BucketKey, CircuitState, FailoverWindowStore, FailureMode, PerModelSlidingWindowLayer,
    RedisWindowStore, WindowLimits, WindowStore,
};

use common::{get, principal, send, stack};
use redis_common::{unique_prefix, PrivateRedis};

/// No decision may wait longer than this on a dead Redis.
const MAX_WAIT: Duration = Duration::from_millis(300);

const LIMITS: WindowLimits = WindowLimits {
    limit: 20,
    burst: 10_000,
    window_ms: 60_000,
};

fn bucket() -> BucketKey {
    BucketKey::new(OrgId::new(), ModelId::new())
}

/// A gateway replica (failover in front of Redis) and a second replica talking to the same
/// Redis directly.
fn replicas(
    server: &PrivateRedis,
    mode: FailureMode,
) -> (Arc<FailoverWindowStore<RedisWindowStore>>, RedisWindowStore) {
    let prefix = unique_prefix();
    let redis = RedisWindowStore::open(&server.url())
        .unwrap()
        .with_key_prefix(&prefix);
    let gateway = Arc::new(FailoverWindowStore::new(redis, mode));
    let other = RedisWindowStore::open(&server.url())
        .unwrap()
        .with_key_prefix(&prefix);
    (gateway, other)
}

/// What one call of the load saw.
#[derive(Debug, Clone, Copy)]
struct Call {
    at: Instant,
    took: Duration,
    /// `Some(admitted)`, or `None` for an error.
    admitted: Option<bool>,
    unavailable: bool,
}

/// Four tasks calling `store` for `key` every 2 ms until told to stop.
struct Load {
    stop: Arc<AtomicBool>,
    calls: Arc<Mutex<Vec<Call>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(store: Arc<FailoverWindowStore<RedisWindowStore>>, key: BucketKey) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..4)
            .map(|_| {
                let (store, stop, calls) =
                    (Arc::clone(&store), Arc::clone(&stop), Arc::clone(&calls));
                tokio::spawn(async move {
                    // Bounded: at most 10 s of load whatever happens.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                        let at = Instant::now();
                        let outcome = store.check(key, LIMITS).await;
                        let took = at.elapsed();
                        calls.lock().unwrap().push(Call {
                            at,
                            took,
                            admitted: outcome.as_ref().ok().map(|d| d.admitted),
                            unavailable: outcome
                                .as_ref()
                                .is_err_and(|e| e.kind() == BackendErrorKind::Unavailable),
                        });
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            })
            .collect();
        Load { stop, calls, tasks }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    async fn stop(self) -> Vec<Call> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let calls = self.calls.lock().unwrap().clone();
        calls
    }
}

/// Waits (bounded) until the gateway's circuit is closed again and a call went to Redis.
async fn wait_for_recovery(gateway: &FailoverWindowStore<RedisWindowStore>, load: &Load) {
    let deadline = Instant::now() + Duration::from_secs(8);
    let since = Instant::now();
    loop {
        let recovered = gateway.circuit() == CircuitState::Closed
            && load
                .calls()
                .iter()
                .any(|c| c.at > since && c.admitted.is_some());
        if recovered {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never went back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The shared limit holds between the two replicas: what one admits, the other counts.
async fn assert_shared(gateway: &FailoverWindowStore<RedisWindowStore>, other: &RedisWindowStore) {
    let k = bucket();
    for remaining in (10..20).rev() {
        assert_eq!(gateway.check(k, LIMITS).await.unwrap().remaining, remaining);
    }
    for remaining in (0..10).rev() {
        assert_eq!(other.check(k, LIMITS).await.unwrap().remaining, remaining);
    }
    // Full for both; the gateway's local limiter alone would still admit here.
    assert!(!gateway.check(k, LIMITS).await.unwrap().admitted);
    assert!(!other.check(k, LIMITS).await.unwrap().admitted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_open_serves_within_the_local_limit_and_the_shared_limit_returns() {
    let Some(mut server) = PrivateRedis::start().await else {
        return;
    };
    let (gateway, other) = replicas(&server, FailureMode::Open);
    assert_shared(&gateway, &other).await;

    let k = bucket();
    let load = Load::start(Arc::clone(&gateway), k);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed = Instant::now();
    server.kill().await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let restarted = Instant::now();
    server.restart().await;
    wait_for_recovery(&gateway, &load).await;
    let recovered = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let calls = load.stop().await;

    let slowest = calls.iter().map(|c| c.took).max().unwrap();
    eprintln!(
        "fail-open: {} calls, slowest {slowest:?}, back on Redis {:?} after the restart",
        calls.len(),
        recovered - restarted
    );
    assert!(slowest <= MAX_WAIT, "a call waited {slowest:?}");
    assert!(
        calls.iter().all(|c| c.admitted.is_some()),
        "fail-open never errs"
    );
    let admitted = |from: Instant, to: Instant| {
        calls
            .iter()
            .filter(|c| c.at >= from && c.at < to && c.admitted == Some(true))
            .count()
    };
    let outage_calls = calls
        .iter()
        .filter(|c| c.at >= killed && c.at < restarted)
        .count();
    assert!(outage_calls > 100, "{outage_calls} calls during the outage");
    // Before the kill Redis admitted the limit; during the outage the local limiter
    // admitted the limit once more (it knows nothing of Redis's count), not more.
    let far = restarted + Duration::from_secs(3_600);
    let early = killed - Duration::from_secs(3_600);
    assert_eq!(admitted(early, killed), 20);
    assert_eq!(admitted(killed, restarted), 20);
    // The restarted Redis is empty: once the circuit closed, it admitted the limit again
    // (the local limiter, full, would have refused everything).
    assert_eq!(admitted(restarted, far), 20);

    // And the two replicas share one limit again.
    assert_shared(&gateway, &other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_closed_answers_503_during_the_outage_and_the_shared_limit_returns() {
    let Some(mut server) = PrivateRedis::start().await else {
        return;
    };
    let (gateway, other) = replicas(&server, FailureMode::Closed);
    assert_shared(&gateway, &other).await;

    let k = bucket();
    let load = Load::start(Arc::clone(&gateway), k);
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.kill().await;
    let dead = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Through the layer, as a client sees it.
    let calls_made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut api = stack(
        PerModelSlidingWindowLayer::new(Arc::clone(&gateway)),
        Arc::clone(&calls_made),
    );
    let started = Instant::now();
    let reply = send(&mut api, get(ModelId::new(), principal(Plan::Pro))).await;
    assert!(started.elapsed() <= MAX_WAIT);
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        reply.body,
        r#"{"error":"A backend this request needs is unavailable. Retry shortly.","code":"SERVICE_UNAVAILABLE"}"#
    );
    assert_eq!(reply.code, Some(ErrorCode::ServiceUnavailable));
    assert_eq!(calls_made.load(Ordering::SeqCst), 0);

    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = Instant::now();
    server.restart().await;
    wait_for_recovery(&gateway, &load).await;
    let recovered = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let calls = load.stop().await;

    let slowest = calls.iter().map(|c| c.took).max().unwrap();
    eprintln!(
        "fail-closed: {} calls, slowest {slowest:?}, back on Redis {:?} after the restart",
        calls.len(),
        recovered - restarted
    );
    assert!(slowest <= MAX_WAIT, "a call waited {slowest:?}");
    let outage: Vec<&Call> = calls
        .iter()
        .filter(|c| c.at >= dead && c.at < restarted)
        .collect();
    assert!(
        outage.len() > 100,
        "{} calls during the outage",
        outage.len()
    );
    assert!(
        outage.iter().all(|c| c.unavailable),
        "every decision during the outage is unavailable"
    );
    assert!(calls.iter().all(|c| c.admitted.is_some() || c.unavailable));
    let admitted = calls.iter().filter(|c| c.admitted == Some(true)).count();
    // The limit before the kill, the limit again from the restarted (empty) Redis: nothing
    // admitted in between.
    assert_eq!(admitted, 40);
    assert!(gateway.local().is_empty());

    assert_shared(&gateway, &other).await;
    let reply = send(&mut api, get(ModelId::new(), principal(Plan::Pro))).await;
    assert_eq!(reply.status, StatusCode::OK);
}

/// A hung Redis (frozen: connections open, nothing answered): each call gives up after the
/// timeout, the circuit opens, and nobody waits on it after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_redis_costs_at_most_the_timeout() {
    let Some(server) = PrivateRedis::start().await else {
        return;
    };
    let (gateway, other) = replicas(&server, FailureMode::Open);
    assert_shared(&gateway, &other).await;

    let k = bucket();
    let load = Load::start(Arc::clone(&gateway), k);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let frozen = Instant::now();
    server.freeze();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let thawed = Instant::now();
    server.thaw();
    wait_for_recovery(&gateway, &load).await;
    let recovered = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let calls = load.stop().await;

    let slowest = calls.iter().map(|c| c.took).max().unwrap();
    let timed_out = calls
        .iter()
        .filter(|c| c.took >= Duration::from_millis(240))
        .count();
    eprintln!(
        "hung: {} calls, {timed_out} timed out, slowest {slowest:?}, back on Redis {:?} after the thaw",
        calls.len(),
        recovered - thawed
    );
    assert!(slowest <= MAX_WAIT, "a call waited {slowest:?}");
    // Some calls did wait for the timeout (the hang was real), but the breaker stopped
    // that after a few: four loaders, three failures to open, one probe per cool-down.
    assert!((1..=10).contains(&timed_out), "{timed_out} calls timed out");
    let admitted = |from: Instant, to: Instant| {
        calls
            .iter()
            .filter(|c| c.at >= from && c.at < to && c.admitted == Some(true))
            .count()
    };
    assert_eq!(admitted(frozen - Duration::from_secs(3_600), frozen), 20);
    // Locally, during the hang: the local limit.
    assert_eq!(admitted(frozen, thawed), 20);
    // Redis kept its count through the hang: full, so nothing more after it.
    assert_eq!(admitted(thawed, thawed + Duration::from_secs(3_600)), 0);
    assert_shared(&gateway, &other).await;
}
