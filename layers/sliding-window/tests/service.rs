//! The service's tower contract, driven step by step with `tower-test`: readiness is the
//! inner service's, the ready inner service is the one called, refusals never reach it, its
//! errors pass through, and nothing is counted before the store decides.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;
use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
use tollgate_core::{
    BackendError, BoxFuture, Clock, GateBody, KeyId, ManualClock, ModelId, OrgId, Plan, Principal,
    RateLimitInfo, RouteMatch,
};
use tollgate_sliding_window::{
    BucketKey, Decision, MemoryWindowStore, PerModelSlidingWindowLayer, WindowLimits, WindowStore,
};
use tower_test::mock;

type Body = Full<Bytes>;

fn principal() -> Principal {
    Principal {
        org: OrgId::new(),
        key: KeyId::new(),
        plan: Plan::Free,
    }
}

fn get(model: ModelId, who: Principal) -> Request<Body> {
    let mut req = Request::get(format!("/api/models/{model}/payouts/stats"))
        .body(Body::default())
        .unwrap();
    req.extensions_mut().insert(who);
    req
}

fn memory() -> MemoryWindowStore {
    MemoryWindowStore::new(Arc::new(ManualClock::new(1_700_000_000_000)))
}

async fn body_of(res: Response<GateBody<Body>>) -> Bytes {
    res.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test]
async fn readiness_is_the_inner_services() {
    let (mut svc, mut handle) = mock::spawn_layer::<Request<Body>, Response<Body>, _>(
        PerModelSlidingWindowLayer::new(memory()),
    );
    handle.allow(0);
    assert_pending!(svc.poll_ready());
    handle.allow(1);
    assert!(svc.is_woken());
    assert_ready_ok!(svc.poll_ready());
}

#[tokio::test]
async fn an_admitted_request_reaches_the_inner_service_and_its_answer_comes_back() {
    let (mut svc, mut handle) = mock::spawn_layer::<Request<Body>, Response<Body>, _>(
        PerModelSlidingWindowLayer::new(memory()),
    );
    let (model, who) = (ModelId::new(), principal());
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(get(model, who)));
    assert_pending!(fut.poll());

    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.extensions().get::<Principal>(), Some(&who));
    let route = req.extensions().get::<RouteMatch>().unwrap();
    assert_eq!(route.template(), "/api/models/:id/payouts/stats");
    assert_eq!(route.model(), Some(model));
    send.send_response(
        Response::builder()
            .status(StatusCode::CREATED)
            .header("x-upstream", "1")
            .body(Body::new(Bytes::from_static(b"[1,2]")))
            .unwrap(),
    );

    let res = assert_ready_ok!(fut.poll());
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["x-upstream"], "1");
    assert_eq!(res.headers()["ratelimit-limit"], "10");
    assert_eq!(res.headers()["ratelimit-remaining"], "9");
    assert_eq!(res.headers()["ratelimit-reset"], "60");
    assert!(res.headers().get("retry-after").is_none());
    assert_eq!(
        res.extensions().get::<RateLimitInfo>(),
        Some(&RateLimitInfo {
            limit: 10,
            remaining: 9,
            reset_secs: 60,
            retry_after_secs: None
        })
    );
    assert_eq!(body_of(res).await, "[1,2]");
}

#[tokio::test]
async fn a_refused_request_never_reaches_the_inner_service() {
    let layer = PerModelSlidingWindowLayer::new(memory()).with_limit(Plan::Free, 1);
    let (mut svc, mut handle) = mock::spawn_layer::<Request<Body>, Response<Body>, _>(layer);
    let (model, who) = (ModelId::new(), principal());

    handle.allow(2);
    assert_ready_ok!(svc.poll_ready());
    let mut first = tokio_test::task::spawn(svc.call(get(model, who)));
    assert_pending!(first.poll());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(Body::default()));
    assert_eq!(assert_ready_ok!(first.poll()).status(), StatusCode::OK);

    assert_ready_ok!(svc.poll_ready());
    let mut second = tokio_test::task::spawn(svc.call(get(model, who)));
    let res = assert_ready_ok!(second.poll());
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "60");
    assert!(handle.poll_request().is_pending());
}

#[tokio::test]
async fn inner_errors_pass_through_as_errors() {
    let (mut svc, mut handle) = mock::spawn_layer::<Request<Body>, Response<Body>, _>(
        PerModelSlidingWindowLayer::new(memory()),
    );
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(get(ModelId::new(), principal())));
    assert_pending!(fut.poll());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error("connection reset");
    let err = assert_ready!(fut.poll()).unwrap_err();
    assert_eq!(err.to_string(), "connection reset");
}

/// A memory store whose decisions wait for a permit, like a remote store's round trip.
struct SlowStore {
    memory: Arc<MemoryWindowStore>,
    clock: ManualClock,
    gate: Arc<Semaphore>,
}

impl WindowStore for SlowStore {
    fn check(
        &self,
        key: BucketKey,
        limits: WindowLimits,
    ) -> BoxFuture<Result<Decision, BackendError>> {
        let (memory, gate, clock) = (
            Arc::clone(&self.memory),
            Arc::clone(&self.gate),
            self.clock.clone(),
        );
        Box::pin(async move {
            gate.acquire().await.unwrap().forget();
            Ok(memory.check_now(key, limits, clock.now_ms()))
        })
    }
}

#[tokio::test]
async fn the_inner_service_waits_for_the_decision_and_a_dropped_request_counts_nothing() {
    let clock = ManualClock::new(1_700_000_000_000);
    let gate = Arc::new(Semaphore::new(0));
    let store = SlowStore {
        memory: Arc::new(MemoryWindowStore::new(Arc::new(clock.clone()))),
        clock,
        gate: Arc::clone(&gate),
    };
    let (mut svc, mut handle) = mock::spawn_layer::<Request<Body>, Response<Body>, _>(
        PerModelSlidingWindowLayer::new(store),
    );
    let (model, who) = (ModelId::new(), principal());

    // A request given up before the store answered takes no capacity.
    handle.allow(2);
    assert_ready_ok!(svc.poll_ready());
    let mut abandoned = tokio_test::task::spawn(svc.call(get(model, who)));
    assert_pending!(abandoned.poll());
    drop(abandoned);

    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(get(model, who)));
    assert_pending!(fut.poll());
    assert!(
        handle.poll_request().is_pending(),
        "called before the decision"
    );
    gate.add_permits(1);
    assert!(fut.is_woken());
    assert_pending!(fut.poll());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(Body::default()));
    let res = assert_ready_ok!(fut.poll());
    assert_eq!(res.headers()["ratelimit-remaining"], "9");
}
