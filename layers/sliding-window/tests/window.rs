//! The window's behaviour over HTTP, on paused tokio time (`TokioClock`): exact counts,
//! headers and bodies a client sees.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, StatusCode};
use tollgate_core::{
    BackendError, BoxFuture, CostTable, ErrorCode, KeyId, ModelId, OrgId, Plan, Principal,
    RouteSpec, TokioClock,
};
use tollgate_sliding_window::{
    BucketKey, Decision, MemoryWindowStore, PerModelSlidingWindowLayer, WindowLimits, WindowPolicy,
    WindowStore,
};

use common::*;

struct Setup {
    api: Api,
    calls: Arc<AtomicUsize>,
    store: Arc<MemoryWindowStore>,
}

fn setup(
    configure: impl FnOnce(
        PerModelSlidingWindowLayer<Arc<MemoryWindowStore>>,
    ) -> PerModelSlidingWindowLayer<Arc<MemoryWindowStore>>,
) -> Setup {
    let store = Arc::new(MemoryWindowStore::new(Arc::new(TokioClock::new())));
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = configure(PerModelSlidingWindowLayer::new(Arc::clone(&store)));
    Setup {
        api: stack(layer, Arc::clone(&calls)),
        calls,
        store,
    }
}

async fn advance(ms: u64) {
    tokio::time::advance(Duration::from_millis(ms)).await;
}

/// Ten free-plan requests 250 ms apart (never more than 4 in a second), from now.
/// Leaves the clock at the tenth request (2 250 ms after the first).
async fn fill_free_window(s: &mut Setup, model: ModelId, who: Principal) {
    let resets = [60, 60, 60, 60, 59, 59, 59, 59, 58, 58];
    for (i, reset) in resets.into_iter().enumerate() {
        if i > 0 {
            advance(250).await;
        }
        let reply = send(&mut s.api, get(model, who)).await;
        assert_admitted(&reply, 10, 9 - i as u32, reset);
    }
}

#[tokio::test(start_paused = true)]
async fn free_plan_admits_ten_then_refuses_the_eleventh() {
    let mut s = setup(|l| l);
    let (model, who) = (ModelId::new(), principal(Plan::Free));
    fill_free_window(&mut s, model, who).await;

    advance(250).await; // 2 500 ms after the first request
    let reply = send(&mut s.api, get(model, who)).await;
    // The first request leaves the window at 60 000 ms: 57.5 s away, rounded up.
    assert_limited(&reply, 10, 0, 58, 58);
    assert_eq!(
        reply.json(),
        serde_json::json!({
            "error": "Rate limit exceeded. Slow down and try again.",
            "code": "RATE_LIMIT_EXCEEDED"
        })
    );
    assert_eq!(s.calls.load(Ordering::SeqCst), 10);
}

#[tokio::test(start_paused = true)]
async fn capacity_comes_back_one_request_at_a_time() {
    let mut s = setup(|l| l);
    let (model, who) = (ModelId::new(), principal(Plan::Free));
    fill_free_window(&mut s, model, who).await;

    // 1 ms before the first request ages out: still full.
    advance(60_000 - 2_250 - 1).await;
    assert_limited(&send(&mut s.api, get(model, who)).await, 10, 0, 1, 1);

    // Exactly when it ages out: one request fits, not ten.
    advance(1).await;
    assert_admitted(&send(&mut s.api, get(model, who)).await, 10, 0, 1);
    // The second request (at 250 ms) leaves at 60 250 ms.
    assert_limited(&send(&mut s.api, get(model, who)).await, 10, 0, 1, 1);
    advance(249).await;
    assert_limited(&send(&mut s.api, get(model, who)).await, 10, 0, 1, 1);
    advance(1).await;
    assert_admitted(&send(&mut s.api, get(model, who)).await, 10, 0, 1);
    assert_limited(&send(&mut s.api, get(model, who)).await, 10, 0, 1, 1);
    assert_eq!(s.calls.load(Ordering::SeqCst), 12);
}

#[tokio::test(start_paused = true)]
async fn there_is_no_reset_at_the_top_of_the_minute() {
    let mut s = setup(|l| l);
    let (model, who) = (ModelId::new(), principal(Plan::Free));
    // Five at the start, five 30 s later.
    for i in 0..5 {
        assert_admitted(&send(&mut s.api, get(model, who)).await, 10, 9 - i, 60);
    }
    advance(30_000).await;
    for i in 0..5 {
        assert_admitted(&send(&mut s.api, get(model, who)).await, 10, 4 - i, 30);
    }
    // At 60 s the first five leave together, the other five stay counted until 90 s.
    advance(30_000).await;
    for i in 0..5 {
        assert_admitted(&send(&mut s.api, get(model, who)).await, 10, 4 - i, 30);
    }
    assert_limited(&send(&mut s.api, get(model, who)).await, 10, 0, 30, 30);
}

#[tokio::test(start_paused = true)]
async fn burst_refuses_the_sixth_within_a_second() {
    let mut s = setup(|l| l);
    let (model, who) = (ModelId::new(), principal(Plan::Free));
    for i in 0..5 {
        assert_admitted(&send(&mut s.api, get(model, who)).await, 10, 9 - i, 60);
    }
    // The window has room for 5 more, the second does not.
    assert_limited(&send(&mut s.api, get(model, who)).await, 10, 5, 60, 1);
    advance(999).await;
    assert_limited(&send(&mut s.api, get(model, who)).await, 10, 5, 60, 1);
    advance(1).await;
    assert_admitted(&send(&mut s.api, get(model, who)).await, 10, 4, 59);
    assert_eq!(s.calls.load(Ordering::SeqCst), 6);
}

#[tokio::test(start_paused = true)]
async fn refused_requests_take_no_capacity() {
    let mut s = setup(|l| l);
    let (model, who) = (ModelId::new(), principal(Plan::Free));
    fill_free_window(&mut s, model, who).await;

    // Hammer the full window until just before the first request ages out.
    let mut refused = 0;
    for _ in 0..115 {
        advance(500).await;
        for _ in 0..3 {
            let reply = send(&mut s.api, get(model, who)).await;
            assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
            refused += 1;
        }
    }
    assert_eq!(refused, 345);
    // Now 59 750 ms after the first request.
    advance(249).await;
    assert_limited(&send(&mut s.api, get(model, who)).await, 10, 0, 1, 1);
    advance(1).await;
    assert_admitted(&send(&mut s.api, get(model, who)).await, 10, 0, 1);
    assert_limited(&send(&mut s.api, get(model, who)).await, 10, 0, 1, 1);
    assert_eq!(s.calls.load(Ordering::SeqCst), 11);
}

#[tokio::test(start_paused = true)]
async fn other_models_are_independent() {
    let mut s = setup(|l| l);
    let (a, b, who) = (ModelId::new(), ModelId::new(), principal(Plan::Free));
    fill_free_window(&mut s, a, who).await;
    assert_limited(&send(&mut s.api, get(a, who)).await, 10, 0, 58, 58);
    assert_admitted(&send(&mut s.api, get(b, who)).await, 10, 9, 60);
    assert_limited(&send(&mut s.api, get(a, who)).await, 10, 0, 58, 58);
}

#[tokio::test(start_paused = true)]
async fn keys_of_one_org_share_a_bucket_other_orgs_do_not() {
    let mut s = setup(|l| l);
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
            advance(250).await;
        }
        let reply = send(&mut s.api, get(model, key(keys[i as usize % 2]))).await;
        assert_eq!(reply.info.unwrap().remaining, 9 - i);
    }
    // A third key of the same org finds the bucket full.
    let reply = send(&mut s.api, get(model, key(KeyId::new()))).await;
    assert_limited(&reply, 10, 0, 58, 58);
    // Another org on the same model has its own bucket.
    assert_admitted(
        &send(&mut s.api, get(model, principal(Plan::Free))).await,
        10,
        9,
        60,
    );
}

#[tokio::test(start_paused = true)]
async fn limits_follow_the_plan_of_the_principal() {
    let mut s = setup(|l| l);
    let model = ModelId::new();
    for (plan, limit) in [
        (Plan::Free, 10),
        (Plan::Basic, 60),
        (Plan::Pro, 300),
        (Plan::Enterprise, 9_999),
    ] {
        let who = principal(plan);
        assert_admitted(
            &send(&mut s.api, get(model, who)).await,
            limit,
            limit - 1,
            60,
        );
        // The burst of the plan is what stops a flood within one second.
        let mut admitted = 1;
        while send(&mut s.api, get(model, who)).await.status == StatusCode::OK {
            admitted += 1;
        }
        assert_eq!(admitted, plan.default_burst(), "{plan}");
    }
}

#[tokio::test(start_paused = true)]
async fn limits_and_bursts_are_configurable() {
    let mut s = setup(|l| l.with_limit(Plan::Free, 3).with_burst(Plan::Free, 2));
    let (model, who) = (ModelId::new(), principal(Plan::Free));
    assert_admitted(&send(&mut s.api, get(model, who)).await, 3, 2, 60);
    assert_admitted(&send(&mut s.api, get(model, who)).await, 3, 1, 60);
    assert_limited(&send(&mut s.api, get(model, who)).await, 3, 1, 60, 1);
    advance(1_000).await;
    assert_admitted(&send(&mut s.api, get(model, who)).await, 3, 0, 59);
    assert_limited(&send(&mut s.api, get(model, who)).await, 3, 0, 59, 59);

    // The TOLLGATE_BURST syntax.
    let policy = WindowPolicy::new()
        .with_bursts_config("free=1,basic=10,pro=30,enterprise=200")
        .unwrap();
    let mut s = setup(|l| l.with_policy(policy));
    assert_admitted(&send(&mut s.api, get(model, who)).await, 10, 9, 60);
    assert_limited(&send(&mut s.api, get(model, who)).await, 10, 9, 60, 1);
}

#[tokio::test(start_paused = true)]
async fn window_length_is_configurable() {
    let mut s = setup(|l| l.with_window(Duration::from_secs(10)));
    let (model, who) = (ModelId::new(), principal(Plan::Free));
    let resets = [10, 10, 10, 10, 9, 9, 9, 9, 8, 8];
    for (i, reset) in resets.into_iter().enumerate() {
        if i > 0 {
            advance(250).await;
        }
        assert_admitted(
            &send(&mut s.api, get(model, who)).await,
            10,
            9 - i as u32,
            reset,
        );
    }
    advance(250).await;
    assert_limited(&send(&mut s.api, get(model, who)).await, 10, 0, 8, 8);
    advance(10_000 - 2_500).await;
    assert_admitted(&send(&mut s.api, get(model, who)).await, 10, 0, 1);
}

#[tokio::test(start_paused = true)]
async fn routes_without_a_model_pass_untouched() {
    let mut s = setup(|l| l);
    let who = principal(Plan::Free);
    for path in [
        "/api/logs",
        "/api/credits",
        "/healthz",
        "/api/models/not-a-uuid/chats",
    ] {
        for _ in 0..20 {
            let mut req = Request::get(path).body(Body::default()).unwrap();
            req.extensions_mut().insert(who);
            let reply = send(&mut s.api, req).await;
            assert_eq!(reply.status, StatusCode::OK);
            assert_eq!(reply.body, INNER_BODY);
            assert_eq!(reply.limits(), (None, None, None, None));
            assert_eq!(reply.info, None);
        }
    }
    // Without a principal too: nothing to limit, nothing to complain about.
    let reply = send(
        &mut s.api,
        Request::get("/api/logs").body(Body::default()).unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(s.calls.load(Ordering::SeqCst), 81);
    assert!(s.store.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_model_route_without_principal_is_an_internal_error() {
    let mut s = setup(|l| l);
    let req = Request::get(format!("/api/models/{}/chats", ModelId::new()))
        .body(Body::default())
        .unwrap();
    let reply = send(&mut s.api, req).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        reply.body,
        r#"{"error":"An unexpected error occurred.","code":"INTERNAL_ERROR"}"#
    );
    assert_eq!(reply.code, Some(ErrorCode::InternalError));
    assert_eq!(reply.limits(), (None, None, None, None));
    assert_eq!(s.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn the_cost_table_decides_which_routes_are_limited() {
    let table = CostTable::new([RouteSpec::new(Method::GET, "/v1/:id/search", 0)]);
    let mut s = setup(|l| l.with_cost_table(table).with_limit(Plan::Pro, 2));
    let (model, who) = (ModelId::new(), principal(Plan::Pro));
    let search = || {
        let mut req = Request::get(format!("/v1/{model}/search"))
            .body(Body::default())
            .unwrap();
        req.extensions_mut().insert(who);
        req
    };
    assert_admitted(&send(&mut s.api, search()).await, 2, 1, 60);
    assert_admitted(&send(&mut s.api, search()).await, 2, 0, 60);
    assert_limited(&send(&mut s.api, search()).await, 2, 0, 60, 60);
    // The OnlyFans routes are not in this table: unlimited.
    for _ in 0..5 {
        assert_eq!(send(&mut s.api, get(model, who)).await.info, None);
    }
}

#[tokio::test(start_paused = true)]
async fn buckets_can_be_chosen_without_an_auth_layer() {
    let everything = ModelId::new();
    let mut s = setup(|l| {
        l.with_bucket_fn(move |head, _route| {
            let tenant: OrgId = head.headers.get("x-tenant")?.to_str().ok()?.parse().ok()?;
            Some((BucketKey::new(tenant, everything), Plan::Free))
        })
        .with_burst(Plan::Free, 100)
    });
    let (a, b) = (OrgId::new(), OrgId::new());
    let req = |tenant: Option<OrgId>, path: &str| {
        let mut builder = Request::get(path);
        if let Some(t) = tenant {
            builder = builder.header("x-tenant", t.to_string());
        }
        builder.body(Body::default()).unwrap()
    };
    // Every route counts against the tenant's one bucket, matched or not.
    for (i, path) in ["/a", "/b", "/api/logs"]
        .into_iter()
        .cycle()
        .take(10)
        .enumerate()
    {
        assert_admitted(
            &send(&mut s.api, req(Some(a), path)).await,
            10,
            9 - i as u32,
            60,
        );
    }
    assert_limited(&send(&mut s.api, req(Some(a), "/c")).await, 10, 0, 60, 60);
    assert_admitted(&send(&mut s.api, req(Some(b), "/c")).await, 10, 9, 60);
    // No tenant: the function says "not limited".
    let reply = send(&mut s.api, req(None, "/c")).await;
    assert_eq!((reply.status, reply.info), (StatusCode::OK, None));
}

#[tokio::test(start_paused = true)]
async fn idle_buckets_are_evicted_after_the_window() {
    let mut s = setup(|l| l);
    let who = principal(Plan::Basic);
    for _ in 0..100 {
        send(&mut s.api, get(ModelId::new(), who)).await;
    }
    assert_eq!(s.store.len(), 100);
    advance(59_999).await;
    assert_eq!(s.store.sweep_now(), 0);
    assert_eq!(s.store.len(), 100);
    advance(1).await;
    assert_eq!(s.store.sweep_now(), 100);
    assert_eq!(s.store.len(), 0);
}

/// A store whose backend is down (or answers nonsense).
struct BrokenStore {
    unavailable: bool,
}

impl WindowStore for BrokenStore {
    fn check(&self, _: BucketKey, _: WindowLimits) -> BoxFuture<Result<Decision, BackendError>> {
        let err = if self.unavailable {
            BackendError::unavailable("connection refused")
        } else {
            BackendError::other("unexpected reply")
        };
        Box::pin(async move { Err(err) })
    }
}

#[tokio::test]
async fn a_failing_store_is_a_503_or_500_response() {
    for (unavailable, status, body) in [
        (
            true,
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":"A backend this request needs is unavailable. Retry shortly.","code":"SERVICE_UNAVAILABLE"}"#,
        ),
        (
            false,
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"error":"An unexpected error occurred.","code":"INTERNAL_ERROR"}"#,
        ),
    ] {
        let calls = Arc::new(AtomicUsize::new(0));
        // Through the object-safe trait, as a gateway picking backends at run time would.
        let store: Arc<dyn WindowStore> = Arc::new(BrokenStore { unavailable });
        let mut api = stack(PerModelSlidingWindowLayer::new(store), Arc::clone(&calls));
        let reply = send(&mut api, get(ModelId::new(), principal(Plan::Pro))).await;
        assert_eq!(reply.status, status);
        assert_eq!(reply.body, body);
        assert_eq!(reply.limits(), (None, None, None, None));
        assert_eq!(
            reply.backend_failure,
            Some(tollgate_core::BackendFailure {
                backend: "rate_limits"
            })
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
