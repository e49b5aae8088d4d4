//! The layer's HTTP behaviour, over the memory store.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use tollgate_core::{
    BackendError, BoxFuture, CreditReceipt, CreditSettlement, GateBody, KeyId, OrgId, Plan,
    Principal, TokioClock,
};
use tollgate_idempotency::{
    Begin, Fingerprint, IdempotencyBody, IdempotencyLayer, IdempotencyStore, Lease,
    MemoryIdempotencyStore, StoredResponse,
};
use tower::{service_fn, BoxError, Layer, Service, ServiceBuilder, ServiceExt};

/// Polls once: whether the future is still pending.
async fn pending<F: std::future::Future + Unpin>(fut: &mut F) -> bool {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::pin::Pin::new(&mut *fut).poll(cx).is_pending())
    })
    .await
}

const PATH: &str = "/api/models/0b6f7a52-8f0e-4d3f-9f57-5b1e2a7c9d10/chats/5/messages";

fn principal() -> Principal {
    Principal {
        org: OrgId::new(),
        key: KeyId::new(),
        plan: Plan::Basic,
    }
}

fn request(
    p: Principal,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    let mut req = builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    req.extensions_mut().insert(p);
    req
}

fn post(p: Principal, key: &str, body: &str) -> Request<Full<Bytes>> {
    request(p, Method::POST, PATH, Some(key), body)
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
}

impl Answer {
    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    fn code(&self) -> String {
        let json: serde_json::Value = serde_json::from_str(&self.body).unwrap();
        json["code"].as_str().unwrap().to_owned()
    }
}

async fn answer<B>(res: Response<IdempotencyBody<B>>) -> Answer
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

type Inner = Request<GateBody<Full<Bytes>>>;

/// A handler that counts its calls and answers `status` with `{"n": <call>}`, echoing the body.
fn counting(
    calls: Arc<AtomicUsize>,
    status: impl Fn(usize) -> StatusCode + Clone + Send + 'static,
) -> tower::util::BoxCloneService<Inner, Response<Full<Bytes>>, Infallible> {
    tower::util::BoxCloneService::new(service_fn(move |req: Inner| {
        let calls = calls.clone();
        let status = status.clone();
        async move {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let sent = req.into_body().collect().await.unwrap().to_bytes();
            let text = format!(
                "{{\"n\":{n},\"sent\":{:?}}}",
                String::from_utf8_lossy(&sent)
            );
            let mut res = Response::new(Full::new(Bytes::from(text)));
            *res.status_mut() = status(n);
            res.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            res.headers_mut()
                .insert("x-request-id", format!("req-{n}").parse().unwrap());
            Ok::<_, Infallible>(res)
        }
    }))
}

fn layer() -> IdempotencyLayer {
    IdempotencyLayer::new(MemoryIdempotencyStore::new(TokioClock::new()))
}

#[tokio::test]
async fn an_identical_retry_replays_the_stored_response() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = layer().layer(counting(calls.clone(), |_| StatusCode::CREATED));
    let p = principal();
    let first = answer(
        svc.ready()
            .await
            .unwrap()
            .call(post(p, "k-1", "hi"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        first.body, r#"{"n":1,"sent":"hi"}"#,
        "the inner service got the body"
    );
    assert!(!first.replayed());
    assert_eq!(first.headers["x-request-id"], "req-1");

    for _ in 0..2 {
        let again = answer(
            svc.ready()
                .await
                .unwrap()
                .call(post(p, "k-1", "hi"))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(again.status, StatusCode::CREATED);
        assert_eq!(again.body, first.body);
        assert!(again.replayed());
        assert_eq!(again.headers["content-type"], "application/json");
        assert!(
            again.headers.get("x-request-id").is_none(),
            "per-request headers are not replayed"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Another org's key of the same name is its own.
    let other = answer(
        svc.ready()
            .await
            .unwrap()
            .call(post(principal(), "k-1", "hi"))
            .await
            .unwrap(),
    )
    .await;
    assert!(!other.replayed());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn client_errors_are_stored_too() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = layer().layer(counting(calls.clone(), |_| StatusCode::NOT_FOUND));
    let p = principal();
    svc.ready()
        .await
        .unwrap()
        .call(post(p, "k", "x"))
        .await
        .unwrap();
    let again = answer(
        svc.ready()
            .await
            .unwrap()
            .call(post(p, "k", "x"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert!(again.replayed());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_same_key_for_another_request_is_422() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = layer().layer(counting(calls.clone(), |_| StatusCode::OK));
    let p = principal();
    svc.ready()
        .await
        .unwrap()
        .call(post(p, "k", "one"))
        .await
        .unwrap();
    let other_path = PATH.replace("/chats/5/", "/chats/6/");
    for req in [
        post(p, "k", "two"),
        request(p, Method::POST, &other_path, Some("k"), "one"),
        request(p, Method::DELETE, PATH, Some("k"), "one"),
        request(p, Method::POST, &format!("{PATH}?x=1"), Some("k"), "one"),
    ] {
        let res = answer(svc.ready().await.unwrap().call(req).await.unwrap()).await;
        assert_eq!(res.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(res.code(), "IDEMPOTENCY_KEY_REUSED");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_same_key_while_in_flight_is_409_then_replays() {
    let (mock, mut handle) = tower_test::mock::pair::<Inner, Response<Full<Bytes>>>();
    let mut svc = layer().layer(mock);
    handle.allow(10);
    let p = principal();
    let first = tokio::spawn(svc.ready().await.unwrap().call(post(p, "k", "x")));
    let (_req, send) = handle.next_request().await.unwrap();

    let busy = answer(
        svc.ready()
            .await
            .unwrap()
            .call(post(p, "k", "x"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(busy.status, StatusCode::CONFLICT);
    assert_eq!(busy.code(), "IDEMPOTENCY_IN_PROGRESS");
    assert_eq!(busy.headers["retry-after"], "1");
    // A different request under the busy key is still a reuse.
    let reused = answer(
        svc.ready()
            .await
            .unwrap()
            .call(post(p, "k", "y"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);

    send.send_response(Response::new(Full::new(Bytes::from_static(
        b"{\"ok\":true}",
    ))));
    let first = answer(first.await.unwrap().unwrap()).await;
    assert_eq!(first.body, "{\"ok\":true}");
    let replay = answer(
        svc.ready()
            .await
            .unwrap()
            .call(post(p, "k", "x"))
            .await
            .unwrap(),
    )
    .await;
    assert!(replay.replayed());
    assert_eq!(replay.body, "{\"ok\":true}");
}

#[tokio::test]
async fn server_errors_and_429_are_not_stored_so_a_retry_runs() {
    for failure in [
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::BAD_GATEWAY,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut svc = layer().layer(counting(calls.clone(), move |n| {
            if n == 1 {
                failure
            } else {
                StatusCode::OK
            }
        }));
        let p = principal();
        let first = answer(
            svc.ready()
                .await
                .unwrap()
                .call(post(p, "k", "x"))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(first.status, failure);
        let retry = answer(
            svc.ready()
                .await
                .unwrap()
                .call(post(p, "k", "x"))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(retry.status, StatusCode::OK, "{failure}: the retry ran");
        assert!(!retry.replayed());
        let third = answer(
            svc.ready()
                .await
                .unwrap()
                .call(post(p, "k", "x"))
                .await
                .unwrap(),
        )
        .await;
        assert!(third.replayed(), "{failure}: the success is stored");
        assert_eq!(third.body, retry.body);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}

#[tokio::test(start_paused = true)]
async fn a_crashed_request_holds_its_key_until_the_lease_ttl() {
    let (mock, mut handle) = tower_test::mock::pair::<Inner, Response<Full<Bytes>>>();
    let lease_ttl = Duration::from_secs(30);
    let mut svc = layer().with_lease_ttl(lease_ttl).layer(mock);
    handle.allow(10);
    let p = principal();
    let mut crashed = Box::pin(svc.ready().await.unwrap().call(post(p, "k", "x")));
    assert!(pending(&mut crashed).await);
    let (_req, _send) = handle.next_request().await.unwrap();
    // The process dies: nothing of the request runs again, not even its drop guard.
    std::mem::forget(crashed);

    tokio::time::advance(lease_ttl - Duration::from_millis(1)).await;
    let busy = answer(
        svc.ready()
            .await
            .unwrap()
            .call(post(p, "k", "x"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(busy.status, StatusCode::CONFLICT);

    tokio::time::advance(Duration::from_millis(1)).await;
    let retry = tokio::spawn(svc.ready().await.unwrap().call(post(p, "k", "x")));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(Response::new(Full::new(Bytes::from_static(
        b"{\"retry\":1}",
    ))));
    assert_eq!(
        answer(retry.await.unwrap().unwrap()).await.body,
        "{\"retry\":1}"
    );
}

#[tokio::test]
async fn a_client_hanging_up_frees_the_key() {
    let (mock, mut handle) = tower_test::mock::pair::<Inner, Response<Full<Bytes>>>();
    let mut svc = layer().layer(mock);
    handle.allow(10);
    let p = principal();
    let mut first = Box::pin(svc.ready().await.unwrap().call(post(p, "k", "x")));
    assert!(pending(&mut first).await);
    let _ = handle.next_request().await.unwrap();
    drop(first);

    // The release runs on a background task: the retry soon finds the key free.
    let mut ran = false;
    for _ in 0..100 {
        let retry = tokio::spawn(svc.ready().await.unwrap().call(post(p, "k", "x")));
        tokio::task::yield_now().await;
        if let Ok(Some((_req, send))) =
            tokio::time::timeout(Duration::from_millis(20), handle.next_request()).await
        {
            send.send_response(Response::new(Full::new(Bytes::from_static(b"{}"))));
            assert_eq!(
                answer(retry.await.unwrap().unwrap()).await.status,
                StatusCode::OK
            );
            ran = true;
            break;
        }
        assert_eq!(
            answer(retry.await.unwrap().unwrap()).await.status,
            StatusCode::CONFLICT
        );
    }
    assert!(ran, "the retry never ran");
}

#[tokio::test]
async fn a_failing_response_body_frees_the_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let mut svc = layer().layer(service_fn(move |_req: Inner| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let frames: Vec<Result<http_body::Frame<Bytes>, BoxError>> = if n == 0 {
                vec![
                    Ok(http_body::Frame::data(Bytes::from_static(b"{\"par"))),
                    Err("upstream reset".into()),
                ]
            } else {
                vec![Ok(http_body::Frame::data(Bytes::from_static(
                    b"{\"whole\":1}",
                )))]
            };
            Ok::<_, Infallible>(Response::new(StreamBody::new(futures_util::stream::iter(
                frames,
            ))))
        }
    }));
    let p = principal();
    let first = svc
        .ready()
        .await
        .unwrap()
        .call(post(p, "k", "x"))
        .await
        .unwrap();
    assert!(
        first.into_body().collect().await.is_err(),
        "the client sees the failure"
    );
    let retry = svc
        .ready()
        .await
        .unwrap()
        .call(post(p, "k", "x"))
        .await
        .unwrap();
    assert!(retry.headers().get("idempotent-replayed").is_none());
    assert_eq!(
        retry.into_body().collect().await.unwrap().to_bytes(),
        "{\"whole\":1}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn fifty_identical_requests_at_once_run_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let svc = layer().layer(service_fn(move |_req: Inner| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                "{{\"n\":{n}}}"
            )))))
        }
    }));
    let p = principal();
    let all = (0..50).map(|_| {
        let svc = svc.clone();
        tokio::spawn(async move {
            answer(
                svc.oneshot(post(p, "same", "{\"text\":\"hi\"}"))
                    .await
                    .unwrap(),
            )
            .await
        })
    });
    let answers: Vec<Answer> = futures_util::future::join_all(all)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let originals = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK && !a.replayed())
        .count();
    let replays = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK && a.replayed())
        .count();
    let busy = answers
        .iter()
        .filter(|a| a.status == StatusCode::CONFLICT)
        .count();
    assert_eq!(originals, 1);
    assert_eq!(originals + replays + busy, 50);
    for a in answers.iter().filter(|a| a.status == StatusCode::OK) {
        assert_eq!(a.body, "{\"n\":1}");
    }
    let after = answer(
        svc.oneshot(post(p, "same", "{\"text\":\"hi\"}"))
            .await
            .unwrap(),
    )
    .await;
    assert!(after.replayed());
    assert_eq!(after.body, "{\"n\":1}");
}

#[tokio::test]
async fn bad_keys_are_400_and_other_requests_pass_through() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = layer().layer(counting(calls.clone(), |_| StatusCode::OK));
    let p = principal();
    let long = "k".repeat(256);
    for key in ["", long.as_str(), "tab\tkey"] {
        let res = answer(
            svc.ready()
                .await
                .unwrap()
                .call(post(p, key, "x"))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "{key:?}");
        assert_eq!(res.code(), "INVALID_REQUEST");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    // GET with a key, and POST without one, are not guarded.
    for _ in 0..2 {
        let get = answer(
            svc.ready()
                .await
                .unwrap()
                .call(request(p, Method::GET, PATH, Some("k"), ""))
                .await
                .unwrap(),
        )
        .await;
        assert!(!get.replayed());
        let plain = answer(
            svc.ready()
                .await
                .unwrap()
                .call(request(p, Method::POST, PATH, None, "x"))
                .await
                .unwrap(),
        )
        .await;
        assert!(!plain.replayed());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn without_a_principal_it_refuses_unless_given_a_scope() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut unscoped = layer().layer(counting(calls.clone(), |_| StatusCode::OK));
    let mut req = post(principal(), "k", "x");
    req.extensions_mut().remove::<Principal>();
    let res = answer(unscoped.ready().await.unwrap().call(req).await.unwrap()).await;
    assert_eq!(res.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    let mut alone = layer()
        .with_scope(|parts| {
            parts
                .headers
                .get("x-tenant")?
                .to_str()
                .ok()
                .map(str::to_owned)
        })
        .layer(counting(calls.clone(), |_| StatusCode::OK));
    let tenant = |t: &'static str| {
        Request::post(PATH)
            .header("idempotency-key", "k")
            .header("x-tenant", t)
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap()
    };
    alone
        .ready()
        .await
        .unwrap()
        .call(tenant("a"))
        .await
        .unwrap();
    assert!(answer(
        alone
            .ready()
            .await
            .unwrap()
            .call(tenant("a"))
            .await
            .unwrap()
    )
    .await
    .replayed());
    assert!(!answer(
        alone
            .ready()
            .await
            .unwrap()
            .call(tenant("b"))
            .await
            .unwrap()
    )
    .await
    .replayed());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn bodies_over_the_limits() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svc = layer()
        .with_max_request_body(8)
        .with_max_response_body(16)
        .layer(counting(calls.clone(), |_| StatusCode::OK));
    let p = principal();
    let res = answer(
        svc.ready()
            .await
            .unwrap()
            .call(post(p, "big", "123456789"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(res.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    // The response ({"n":1,"sent":"x"}) is larger than 16 bytes: passed on whole, not stored.
    let first = answer(
        svc.ready()
            .await
            .unwrap()
            .call(post(p, "k", "x"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(first.body, r#"{"n":1,"sent":"x"}"#);
    let second = answer(
        svc.ready()
            .await
            .unwrap()
            .call(post(p, "k", "x"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(second.body, r#"{"n":2,"sent":"x"}"#);
    assert!(!second.replayed());
}

#[tokio::test]
async fn an_unrecorded_charge_is_not_stored() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let mut svc = layer().layer(service_fn(move |_req: Inner| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut res = Response::new(Full::new(Bytes::from_static(b"{}")));
            let receipt = CreditReceipt::pending(2);
            receipt.settle(if n == 0 {
                CreditSettlement::Unrecorded
            } else {
                CreditSettlement::Charged {
                    used: 2,
                    balance: Some(8),
                }
            });
            res.extensions_mut().insert(receipt);
            Ok::<_, Infallible>(res)
        }
    }));
    let p = principal();
    svc.ready()
        .await
        .unwrap()
        .call(post(p, "k", "x"))
        .await
        .unwrap();
    let retry = answer(
        svc.ready()
            .await
            .unwrap()
            .call(post(p, "k", "x"))
            .await
            .unwrap(),
    )
    .await;
    assert!(!retry.replayed(), "a withheld response is not replayed");
    let third = answer(
        svc.ready()
            .await
            .unwrap()
            .call(post(p, "k", "x"))
            .await
            .unwrap(),
    )
    .await;
    assert!(third.replayed());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A store whose backend is down.
struct DownStore;

impl IdempotencyStore for DownStore {
    fn begin(
        &self,
        _: &str,
        _: &str,
        _: Fingerprint,
        _: Duration,
    ) -> BoxFuture<Result<Begin, BackendError>> {
        Box::pin(async { Err(BackendError::unavailable("connection refused")) })
    }
    fn complete(
        &self,
        _: &Lease,
        _: StoredResponse,
        _: Duration,
    ) -> BoxFuture<Result<bool, BackendError>> {
        Box::pin(async { Err(BackendError::unavailable("connection refused")) })
    }
    fn release(&self, _: &Lease) -> BoxFuture<Result<bool, BackendError>> {
        Box::pin(async { Err(BackendError::unavailable("connection refused")) })
    }
    fn purge_expired(&self) -> BoxFuture<Result<u64, BackendError>> {
        Box::pin(async { Err(BackendError::unavailable("connection refused")) })
    }
}

#[tokio::test]
async fn a_store_failure_is_503_and_the_request_does_not_run() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(DownStore))
        .service(counting(calls.clone(), |_| StatusCode::OK));
    let res = svc.oneshot(post(principal(), "k", "x")).await.unwrap();
    assert_eq!(
        res.extensions()
            .get::<tollgate_core::BackendFailure>()
            .map(|f| f.backend),
        Some("idempotency")
    );
    let res = answer(res).await;
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.code(), "SERVICE_UNAVAILABLE");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}
