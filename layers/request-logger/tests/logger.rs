//! `RequestLoggerLayer` behaviour: one exact row per request, ids, channel limits, flushing.
#![cfg(feature = "memory")]

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready_ok};
use tollgate_core::{
    BackendError, BoxFuture, CreditReceipt, CreditSettlement, ErrorCode, KeyId, ManualClock,
    ModelId, OrgId, Plan, Principal, Rejection, RequestId, RouteMatch,
};
use tollgate_request_logger::{
    LogPage, LogQuery, LogRecord, LogSink, LoggedBody, LoggerStats, MemoryLogSink,
    RequestLoggerLayer,
};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

const T0: u64 = 1_675_150_502_748;
const MODEL: &str = "0b6f7a52-8f0e-4d3f-9f57-5b1e2a7c9d10";

fn model() -> ModelId {
    MODEL.parse().unwrap()
}

fn principal() -> Principal {
    Principal {
        org: "11111111-2222-4333-8444-555555555555".parse().unwrap(),
        key: "66666666-7777-4888-8999-aaaaaaaaaaaa".parse().unwrap(),
        plan: Plan::Basic,
    }
}

fn get(path: &str, request_id: Option<&str>) -> Request<Full<Bytes>> {
    let mut req = Request::builder().uri(path);
    if let Some(id) = request_id {
        req = req.header("x-request-id", id);
    }
    req.body(Full::default()).unwrap()
}

fn stats_path() -> String {
    format!("/api/models/{MODEL}/payouts/stats")
}

/// A response body like the credit meter's: it commits the hold once its whole body was
/// delivered (at the end of stream, or when dropped right after the last frame) and releases
/// it when dropped before that.
struct MeterBody {
    inner: Full<Bytes>,
    receipt: CreditReceipt,
    balance: Option<u64>,
}

impl MeterBody {
    fn new(data: &'static str, receipt: CreditReceipt, balance: Option<u64>) -> Self {
        MeterBody {
            inner: Full::new(Bytes::from_static(data.as_bytes())),
            receipt,
            balance,
        }
    }
}

impl Body for MeterBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            let used = self.receipt.cost();
            let balance = self.balance;
            self.receipt
                .settle(CreditSettlement::Charged { used, balance });
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

impl Drop for MeterBody {
    fn drop(&mut self) {
        let settlement = if self.inner.is_end_stream() {
            CreditSettlement::Charged {
                used: self.receipt.cost(),
                balance: self.balance,
            }
        } else {
            CreditSettlement::Released
        };
        self.receipt.settle(settlement);
    }
}

/// A body fed from a channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn rows_of(sink: &MemoryLogSink, request_id: &str) -> Vec<LogRecord> {
    sink.all()
        .into_iter()
        .filter(|r| r.request_id == request_id)
        .collect()
}

fn one_row(sink: &MemoryLogSink, request_id: &str) -> LogRecord {
    let rows = rows_of(sink, request_id);
    assert_eq!(rows.len(), 1, "rows of {request_id}: {rows:?}");
    rows.into_iter().next().unwrap()
}

#[tokio::test(start_paused = true)]
async fn success_row_has_every_field_and_latency_to_end_of_body() {
    let clock = ManualClock::new(T0);
    let sink = Arc::new(MemoryLogSink::new(clock.clone()));
    let layer = RequestLoggerLayer::new(sink.clone()).with_clock(clock.clone());
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(service_fn(
        |req: Request<Full<Bytes>>| async move {
            // What the inner layers see.
            assert_eq!(
                req.extensions().get::<RequestId>().map(RequestId::as_str),
                Some("client-req-1")
            );
            let route = req.extensions().get::<RouteMatch>().unwrap();
            assert_eq!(route.model(), Some(model()));
            tokio::time::sleep(Duration::from_millis(250)).await;
            let receipt = CreditReceipt::pending(2);
            let mut res = Response::new(MeterBody::new("{\"ok\":1}", receipt.clone(), Some(998)));
            res.extensions_mut().insert(principal());
            res.extensions_mut().insert(receipt);
            Ok::<_, Infallible>(res)
        },
    ));

    let res = svc
        .oneshot(get(&stats_path(), Some("client-req-1")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-request-id"], "client-req-1");

    // The body has not ended: nothing is logged yet.
    handle.flush().await;
    assert!(sink.is_empty());

    // The client reads slowly; latency runs to the end of the body.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "{\"ok\":1}");
    handle.flush().await;

    let expected = LogRecord {
        time_ms: T0,
        request_id: "client-req-1".into(),
        org_id: Some(principal().org),
        key_id: Some(principal().key),
        model_id: Some(model()),
        method: "GET".into(),
        route: Some("/api/models/:id/payouts/stats".into()),
        status: 200,
        code: None,
        credits: 2,
        latency_ms: 350,
    };
    assert_eq!(sink.all(), vec![expected.clone()]);
    let page = sink.query(LogQuery::new(principal().org)).await.unwrap();
    assert_eq!(
        page,
        LogPage {
            records: vec![expected],
            next_cursor: None
        }
    );
    assert_eq!(
        handle.stats(),
        LoggerStats {
            written_rows: 1,
            ..LoggerStats::default()
        }
    );
}

/// The inner stack's answer, chosen by the `x-answer` request header.
async fn fake_stack(req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let answer = req
        .headers()
        .get("x-answer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("ok")
        .to_owned();
    let mut res: Response<Full<Bytes>> = match answer.as_str() {
        "no-key" => return Ok(Rejection::new(ErrorCode::InvalidApiKey).into_response()),
        "not-found" => return Ok(Rejection::new(ErrorCode::NotFound).into_response()),
        "rate-limited" => Rejection::new(ErrorCode::RateLimitExceeded)
            .with_retry_after(3)
            .into_response(),
        "poor" => {
            let receipt = CreditReceipt::pending(2);
            receipt.settle(CreditSettlement::Released);
            let mut res: Response<Full<Bytes>> =
                Rejection::new(ErrorCode::InsufficientCredits).into_response();
            res.extensions_mut().insert(receipt);
            res
        }
        _ => Response::new(Full::from("{}")),
    };
    res.extensions_mut().insert(principal());
    Ok(res)
}

#[tokio::test]
async fn rejections_are_logged_with_their_code_and_no_credits() {
    let clock = ManualClock::new(T0);
    let sink = Arc::new(MemoryLogSink::new(clock.clone()));
    let layer = RequestLoggerLayer::new(sink.clone()).with_clock(clock.clone());
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(fake_stack));

    let cases = [
        ("no-key", Method::GET, stats_path()),
        ("rate-limited", Method::GET, stats_path()),
        (
            "poor",
            Method::POST,
            format!("/api/models/{MODEL}/chats/7/messages"),
        ),
        (
            "not-found",
            Method::GET,
            "/api/models/not-a-uuid/users/me".to_owned(),
        ),
    ];
    for (answer, method, path) in cases {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("x-request-id", answer)
            .header("x-answer", answer)
            .header("x-api-key", "sk_live_do_not_log_me")
            .body(Full::default())
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        assert!(res.status().is_client_error());
        assert_eq!(res.headers()["x-request-id"], answer);
        res.into_body().collect().await.unwrap();
    }
    handle.flush().await;

    let base = LogRecord {
        time_ms: T0,
        request_id: String::new(),
        org_id: Some(principal().org),
        key_id: Some(principal().key),
        model_id: Some(model()),
        method: "GET".into(),
        route: Some("/api/models/:id/payouts/stats".into()),
        status: 0,
        code: None,
        credits: 0,
        latency_ms: 0,
    };
    assert_eq!(
        one_row(&sink, "no-key"),
        LogRecord {
            request_id: "no-key".into(),
            org_id: None,
            key_id: None,
            status: 401,
            code: Some(ErrorCode::InvalidApiKey),
            ..base.clone()
        }
    );
    assert_eq!(
        one_row(&sink, "rate-limited"),
        LogRecord {
            request_id: "rate-limited".into(),
            status: 429,
            code: Some(ErrorCode::RateLimitExceeded),
            ..base.clone()
        }
    );
    assert_eq!(
        one_row(&sink, "poor"),
        LogRecord {
            request_id: "poor".into(),
            method: "POST".into(),
            route: Some("/api/models/:id/chats/:user_id/messages".into()),
            status: 402,
            code: Some(ErrorCode::InsufficientCredits),
            ..base.clone()
        }
    );
    assert_eq!(
        one_row(&sink, "not-found"),
        LogRecord {
            request_id: "not-found".into(),
            org_id: None,
            key_id: None,
            model_id: None,
            route: None,
            status: 404,
            code: Some(ErrorCode::NotFound),
            ..base
        }
    );
    assert_eq!(sink.len(), 4);
    for row in sink.all() {
        assert!(!row.to_ndjson_line().contains("sk_live"));
    }
}

#[tokio::test]
async fn request_id_is_echoed_or_generated() {
    let sink = Arc::new(MemoryLogSink::new(ManualClock::new(T0)));
    let layer = RequestLoggerLayer::new(sink.clone()).with_clock(ManualClock::new(T0));
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(service_fn(
        |req: Request<Full<Bytes>>| async move {
            // The inner service reports the id it was given, and tries to set its own header.
            let id = req.extensions().get::<RequestId>().unwrap().clone();
            let mut res = Response::new(Full::<Bytes>::from(id.as_str().to_owned()));
            res.headers_mut()
                .insert("x-request-id", HeaderValue::from_static("upstream-id"));
            Ok::<_, Infallible>(res)
        },
    ));

    let mut generated = Vec::new();
    for sent in [None, Some("has space"), Some(&*"a".repeat(129)), Some("")] {
        let res = svc.clone().oneshot(get("/healthz", sent)).await.unwrap();
        let header = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(res.headers().get_all("x-request-id").iter().count(), 1);
        assert_eq!(header.len(), 36, "{sent:?} → {header}");
        assert!(uuid_like(&header), "{header}");
        assert_eq!(
            res.extensions().get::<RequestId>().map(RequestId::as_str),
            Some(header.as_str())
        );
        let seen_inside = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(seen_inside, header.as_bytes());
        generated.push(header);
    }
    generated.sort();
    generated.dedup();
    assert_eq!(generated.len(), 4, "generated ids are unique");

    let res = svc
        .clone()
        .oneshot(get("/healthz", Some("abc-123_x.y:z")))
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "abc-123_x.y:z");
    res.into_body().collect().await.unwrap();

    handle.flush().await;
    let mut logged: Vec<String> = sink.all().into_iter().map(|r| r.request_id).collect();
    logged.sort();
    let mut expected = generated.clone();
    expected.push("abc-123_x.y:z".into());
    expected.sort();
    assert_eq!(logged, expected);
}

fn uuid_like(s: &str) -> bool {
    s.split('-').map(str::len).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && s.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
}

/// A sink whose writes wait for a permit, and report that they started.
struct GatedSink {
    inner: Arc<MemoryLogSink>,
    gate: Arc<Semaphore>,
    started: mpsc::UnboundedSender<usize>,
}

impl LogSink for GatedSink {
    fn write_batch(&self, records: Vec<LogRecord>) -> BoxFuture<Result<(), BackendError>> {
        let inner = Arc::clone(&self.inner);
        let gate = Arc::clone(&self.gate);
        let _ = self.started.send(records.len());
        Box::pin(async move {
            gate.acquire().await.unwrap().forget();
            inner.write_batch(records).await
        })
    }

    fn query(&self, query: LogQuery) -> BoxFuture<Result<LogPage, BackendError>> {
        self.inner.query(query)
    }

    fn purge_older_than(&self, cutoff_ms: u64) -> BoxFuture<Result<u64, BackendError>> {
        self.inner.purge_older_than(cutoff_ms)
    }
}

#[tokio::test]
async fn a_full_channel_drops_rows_and_counts_them_without_blocking_requests() {
    let store = Arc::new(MemoryLogSink::new(ManualClock::new(T0)));
    let gate = Arc::new(Semaphore::new(0));
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let sink = GatedSink {
        inner: Arc::clone(&store),
        gate: Arc::clone(&gate),
        started: started_tx,
    };
    let layer = RequestLoggerLayer::builder(sink)
        .with_capacity(1)
        .with_batch_size(1)
        .build()
        .with_clock(ManualClock::new(T0));
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(fake_stack));

    let send = |id: &'static str| {
        let svc = svc.clone();
        async move {
            let res = svc.oneshot(get(&stats_path(), Some(id))).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            res.into_body().collect().await.unwrap();
        }
    };

    // r1 goes to the sink, which blocks; r2 waits in the channel (capacity 1).
    send("r1").await;
    assert_eq!(started.recv().await, Some(1));
    send("r2").await;
    assert_eq!(handle.dropped_rows(), 0);
    // Everything after that is dropped and counted; the requests themselves are unaffected.
    send("r3").await;
    assert_eq!(handle.dropped_rows(), 1);
    send("r4").await;
    send("r5").await;
    assert_eq!(handle.dropped_rows(), 3);

    gate.add_permits(100);
    handle.flush().await;
    let mut ids: Vec<String> = store.all().into_iter().map(|r| r.request_id).collect();
    ids.sort();
    assert_eq!(ids, ["r1", "r2"]);
    assert_eq!(
        handle.stats(),
        LoggerStats {
            dropped_rows: 3,
            written_rows: 2,
            failed_rows: 0,
            sink_errors: 0,
        }
    );
}

#[tokio::test]
async fn a_body_dropped_midway_logs_exactly_once() {
    let sink = Arc::new(MemoryLogSink::new(ManualClock::new(T0)));
    let layer = RequestLoggerLayer::new(sink.clone()).with_clock(ManualClock::new(T0));
    let handle = layer.handle();
    let (tx, rx) = mpsc::channel(4);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let svc =
        ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(move |req: Request<Full<Bytes>>| {
                let streamed = req.uri().path() == "/stream";
                let rx = rx.lock().unwrap().take();
                async move {
                    let receipt = CreditReceipt::pending(1);
                    let mut res = if streamed {
                        Response::new(http_body_util::Either::Left(ChannelBody(rx.unwrap())))
                    } else {
                        Response::new(http_body_util::Either::Right(MeterBody::new(
                            "[1]",
                            receipt.clone(),
                            Some(9),
                        )))
                    };
                    res.extensions_mut().insert(principal());
                    res.extensions_mut().insert(receipt);
                    Ok::<_, Infallible>(res)
                }
            }));

    // Client reads one frame of a stream, then goes away.
    let res = svc
        .clone()
        .oneshot(get("/stream", Some("mid")))
        .await
        .unwrap();
    let mut body = res.into_body();
    tx.send(Bytes::from_static(b"part")).await.unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "part");
    handle.flush().await;
    assert!(rows_of(&sink, "mid").is_empty(), "still streaming");
    drop(body);

    // Client drops the response without reading it (the meter releases the hold).
    let res = svc
        .clone()
        .oneshot(get("/x", Some("unread")))
        .await
        .unwrap();
    drop(res);

    // Client takes the last frame and drops the body without waiting for the end of stream
    // (as hyper does once `is_end_stream` is true): the meter commits on drop, and the row
    // must see that.
    let res = svc
        .clone()
        .oneshot(get("/x", Some("last-frame")))
        .await
        .unwrap();
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    assert!(body.is_end_stream());
    drop(body);

    // Client reads everything, then the body is dropped too: still one row.
    let res = svc.clone().oneshot(get("/x", Some("whole"))).await.unwrap();
    let mut body = res.into_body();
    while let Some(frame) = body.frame().await {
        frame.unwrap();
    }
    assert!(body.frame().await.is_none());
    drop(body);

    handle.flush().await;
    handle.flush().await;
    let mid = one_row(&sink, "mid");
    assert_eq!((mid.status, mid.credits, mid.code), (200, 0, None));
    let unread = one_row(&sink, "unread");
    assert_eq!((unread.status, unread.credits), (200, 0));
    let whole = one_row(&sink, "whole");
    assert_eq!((whole.status, whole.credits), (200, 1));
    let last_frame = one_row(&sink, "last-frame");
    assert_eq!((last_frame.status, last_frame.credits), (200, 1));
    assert_eq!(sink.len(), 4);
    drop(tx);
}

#[tokio::test]
async fn inner_error_logs_500_and_a_client_gone_before_the_response_logs_499() {
    let sink = Arc::new(MemoryLogSink::new(ManualClock::new(T0)));
    let layer = RequestLoggerLayer::new(sink.clone()).with_clock(ManualClock::new(T0));
    let logger = layer.handle();
    let (mut svc, mut handle) =
        tower_test::mock::spawn_layer::<Request<Full<Bytes>>, Response<Full<Bytes>>, _>(layer);

    // Readiness is the inner service's.
    handle.allow(0);
    assert_pending!(svc.poll_ready());
    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());

    let fut = svc.call(get(&stats_path(), Some("err-1")));
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(
        req.extensions().get::<RequestId>().map(RequestId::as_str),
        Some("err-1")
    );
    send.send_error("connection pool closed");
    assert_eq!(fut.await.unwrap_err().to_string(), "connection pool closed");

    handle.allow(1);
    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(get(&stats_path(), Some("gone-1"))));
    let (_req, _send) = handle.next_request().await.unwrap();
    assert_pending!(fut.poll());
    drop(fut);

    logger.flush().await;
    let err = one_row(&sink, "err-1");
    assert_eq!(err.status, 500);
    assert_eq!(err.code, Some(ErrorCode::InternalError));
    assert_eq!(err.route.as_deref(), Some("/api/models/:id/payouts/stats"));
    assert_eq!(err.model_id, Some(model()));
    assert_eq!((err.org_id, err.credits), (None, 0));
    let gone = one_row(&sink, "gone-1");
    assert_eq!(gone.status, 499);
    assert_eq!(gone.code, None);
    assert_eq!(sink.len(), 2);
}

/// A sink that reports each batch and when it arrived.
struct ReportingSink {
    inner: Arc<MemoryLogSink>,
    batches: mpsc::UnboundedSender<(usize, Instant)>,
}

impl LogSink for ReportingSink {
    fn write_batch(&self, records: Vec<LogRecord>) -> BoxFuture<Result<(), BackendError>> {
        let _ = self.batches.send((records.len(), Instant::now()));
        self.inner.write_batch(records)
    }

    fn query(&self, query: LogQuery) -> BoxFuture<Result<LogPage, BackendError>> {
        self.inner.query(query)
    }

    fn purge_older_than(&self, cutoff_ms: u64) -> BoxFuture<Result<u64, BackendError>> {
        self.inner.purge_older_than(cutoff_ms)
    }
}

async fn send_ok<S>(svc: &S, id: &str)
where
    S: Service<Request<Full<Bytes>>, Response = Response<LoggedBody<Full<Bytes>>>> + Clone,
    S::Error: std::fmt::Debug,
{
    let res = svc
        .clone()
        .oneshot(get("/api/credits", Some(id)))
        .await
        .unwrap();
    res.into_body().collect().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn rows_are_batched_by_size_and_by_time() {
    let store = Arc::new(MemoryLogSink::new(ManualClock::new(T0)));
    let (batches_tx, mut batches) = mpsc::unbounded_channel();
    let sink = ReportingSink {
        inner: Arc::clone(&store),
        batches: batches_tx,
    };
    let layer = RequestLoggerLayer::builder(sink)
        .with_batch_size(3)
        .with_flush_interval(Duration::from_millis(100))
        .build()
        .with_clock(ManualClock::new(T0));
    let svc = ServiceBuilder::new().layer(layer).service(service_fn(
        |_req: Request<Full<Bytes>>| async { Ok::<_, Infallible>(Response::new(Full::from("{}"))) },
    ));

    // A full batch is written at once.
    let start = Instant::now();
    for id in ["a", "b", "c"] {
        send_ok(&svc, id).await;
    }
    let (n, at) = batches.recv().await.unwrap();
    assert_eq!((n, at - start), (3, Duration::ZERO));

    // A partial batch waits for the interval, counted from its first row.
    let start = Instant::now();
    send_ok(&svc, "d").await;
    tokio::time::sleep(Duration::from_millis(40)).await;
    send_ok(&svc, "e").await;
    let (n, at) = batches.recv().await.unwrap();
    assert_eq!((n, at - start), (2, Duration::from_millis(100)));
    assert_eq!(store.len(), 5);
}

#[tokio::test]
async fn flush_drains_everything_queued_and_shutdown_drains_the_rest() {
    let sink = Arc::new(MemoryLogSink::new(ManualClock::new(T0)));
    let layer = RequestLoggerLayer::builder(sink.clone())
        .with_batch_size(1_000)
        .with_flush_interval(Duration::from_secs(3_600))
        .build()
        .with_clock(ManualClock::new(T0));
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(service_fn(|_req: Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(Response::new(Full::from("{}")))
        }));

    for i in 0..50 {
        send_ok(&svc, &format!("f{i}")).await;
    }
    assert!(sink.is_empty(), "the batch is neither full nor due");
    handle.flush().await;
    assert_eq!(sink.len(), 50);
    assert_eq!(handle.stats().written_rows, 50);

    // Graceful shutdown: the stack is dropped; flush waits for the worker to write the rest.
    for i in 0..7 {
        send_ok(&svc, &format!("s{i}")).await;
    }
    drop(svc);
    drop(layer);
    handle.flush().await;
    assert!(handle.is_stopped());
    assert_eq!(sink.len(), 57);
    assert_eq!(handle.stats().written_rows, 57);
}

/// A sink that always fails, or never answers.
struct BrokenSink {
    hang: bool,
}

impl LogSink for BrokenSink {
    fn write_batch(&self, _records: Vec<LogRecord>) -> BoxFuture<Result<(), BackendError>> {
        if self.hang {
            Box::pin(std::future::pending())
        } else {
            Box::pin(std::future::ready(Err(BackendError::unavailable(
                "connection refused",
            ))))
        }
    }

    fn query(&self, _query: LogQuery) -> BoxFuture<Result<LogPage, BackendError>> {
        Box::pin(std::future::ready(Err(BackendError::unavailable("down"))))
    }

    fn purge_older_than(&self, _cutoff_ms: u64) -> BoxFuture<Result<u64, BackendError>> {
        Box::pin(std::future::ready(Err(BackendError::unavailable("down"))))
    }
}

#[tokio::test(start_paused = true)]
async fn sink_failures_and_timeouts_are_counted_not_retried() {
    for hang in [false, true] {
        let layer = RequestLoggerLayer::builder(BrokenSink { hang })
            .with_batch_size(2)
            .with_write_timeout(Duration::from_secs(5))
            .build();
        let handle = layer.handle();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(fake_stack));
        for id in ["x1", "x2", "x3"] {
            send_ok(&svc, id).await;
        }
        let start = Instant::now();
        handle.flush().await;
        let waited = start.elapsed();
        assert_eq!(
            handle.stats(),
            LoggerStats {
                dropped_rows: 0,
                written_rows: 0,
                failed_rows: 3,
                sink_errors: 2,
            },
            "hang: {hang}"
        );
        // A hung sink costs at most the write timeout per batch, never a request.
        let expected = if hang {
            Duration::from_secs(10)
        } else {
            Duration::ZERO
        };
        assert_eq!(waited, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_each_log_exactly_once() {
    let sink = Arc::new(MemoryLogSink::new(ManualClock::new(T0)));
    let layer = RequestLoggerLayer::builder(sink.clone())
        .with_batch_size(16)
        .build()
        .with_clock(ManualClock::new(T0));
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(fake_stack));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..400 {
        let svc = svc.clone();
        tasks.spawn(async move {
            let res = svc
                .oneshot(get(&stats_path(), Some(&format!("c{i}"))))
                .await
                .unwrap();
            if i % 3 == 0 {
                drop(res); // some clients go away before reading
            } else {
                res.into_body().collect().await.unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    handle.flush().await;
    let mut ids: Vec<String> = sink.all().into_iter().map(|r| r.request_id).collect();
    ids.sort();
    let mut expected: Vec<String> = (0..400).map(|i| format!("c{i}")).collect();
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!(handle.stats().dropped_rows, 0);
    assert_eq!(handle.stats().written_rows, 400);
}

#[test]
fn a_worker_can_be_spawned_by_the_caller() {
    // No runtime here: build the layer, then run the worker on a runtime of our choosing.
    let sink = Arc::new(MemoryLogSink::new(ManualClock::new(T0)));
    let (layer, worker) = RequestLoggerLayer::builder(sink.clone()).build_with_worker();
    let layer = layer.with_clock(ManualClock::new(T0));
    let handle = layer.handle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let worker = tokio::spawn(worker);
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(fake_stack));
        send_ok(&svc, "own-worker").await;
        drop(svc);
        handle.flush().await;
        worker.await.unwrap();
    });
    assert_eq!(one_row(&sink, "own-worker").status, 200);
    let org: OrgId = principal().org;
    let key: KeyId = principal().key;
    let row = one_row(&sink, "own-worker");
    assert_eq!((row.org_id, row.key_id), (Some(org), Some(key)));
}

#[tokio::test(start_paused = true)]
async fn a_refused_but_identified_caller_is_attributed_through_identity() {
    let clock = ManualClock::new(T0);
    let sink = Arc::new(MemoryLogSink::new(clock.clone()));
    let layer = RequestLoggerLayer::new(sink.clone()).with_clock(clock.clone());
    let handle = layer.handle();
    // The auth layer refuses an org without a subscription: no `Principal` (no plan), but
    // the `Identity` of the key it recognised.
    let svc = ServiceBuilder::new().layer(layer).service(service_fn(
        |_req: Request<Full<Bytes>>| async move {
            let mut res: Response<Full<Bytes>> =
                Rejection::new(ErrorCode::NoSubscription).into_response();
            res.extensions_mut().insert(tollgate_core::Identity {
                org: principal().org,
                key: principal().key,
            });
            Ok::<_, Infallible>(res)
        },
    ));
    let res = svc
        .oneshot(get(&stats_path(), Some("no-sub-1")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYMENT_REQUIRED);
    let _ = res.into_body().collect().await.unwrap();
    handle.flush().await;
    let row = one_row(&sink, "no-sub-1");
    assert_eq!(row.org_id, Some(principal().org));
    assert_eq!(row.key_id, Some(principal().key));
    assert_eq!(row.code, Some(ErrorCode::NoSubscription));
    assert_eq!(row.credits, 0);
}
