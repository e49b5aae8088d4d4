//! Behaviour of `ResponseEnvelopeLayer` as a client of the gateway sees it.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_test::{assert_pending, assert_ready_ok};
use tollgate_core::{
    BoxError, CreditReceipt, CreditSettlement, ErrorCode, GateBody, JsonBodyRequired, KeyId, OrgId,
    Plan, Principal, RateLimitInfo,
};
use tollgate_response_envelope::ResponseEnvelopeLayer;
use tower::{service_fn, ServiceBuilder, ServiceExt};

const UPSTREAM_ERROR_BODY: &str =
    r#"{"error":"The upstream failed to answer correctly.","code":"UPSTREAM_ERROR"}"#;

fn rate_limits(limit: u32, remaining: u32) -> RateLimitInfo {
    RateLimitInfo {
        limit,
        remaining,
        reset_secs: 42,
        retry_after_secs: None,
    }
}

fn charged(used: u64, balance: Option<u64>) -> CreditReceipt {
    let receipt = CreditReceipt::pending(used);
    receipt.settle(CreditSettlement::Charged { used, balance });
    receipt
}

/// What the inner service answers.
#[derive(Clone, Default)]
struct Upstream {
    status: u16,
    content_type: Option<&'static str>,
    receipt: Option<CreditReceipt>,
    rate_limits: Option<RateLimitInfo>,
}

fn json_ok() -> Upstream {
    Upstream {
        status: 200,
        content_type: Some("application/json"),
        ..Upstream::default()
    }
}

fn response<B>(spec: &Upstream, body: B) -> Response<B> {
    let mut res = Response::new(body);
    *res.status_mut() = StatusCode::from_u16(spec.status).unwrap();
    if let Some(ct) = spec.content_type {
        res.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    if let Some(receipt) = &spec.receipt {
        res.extensions_mut().insert(receipt.clone());
    }
    if let Some(info) = spec.rate_limits {
        info.apply_headers(res.headers_mut());
        res.extensions_mut().insert(info);
    }
    res
}

/// Runs one GET through the envelope in front of a service answering `body` per `spec`.
async fn run<B>(spec: Upstream, body: B) -> Response<GateBody<B>>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    run_with(ResponseEnvelopeLayer::new(), Method::GET, spec, body).await
}

async fn run_with<B>(
    layer: ResponseEnvelopeLayer,
    method: Method,
    spec: Upstream,
    body: B,
) -> Response<GateBody<B>>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut body = Some(body);
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |_req: Request<()>| {
            let res = response(&spec, body.take().expect("called once"));
            async move { Ok::<_, Infallible>(res) }
        }));
    let req = Request::builder()
        .method(method)
        .uri("/api/x")
        .body(())
        .unwrap();
    svc.oneshot(req).await.unwrap()
}

async fn bytes_of<B>(res: Response<GateBody<B>>) -> Bytes
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    res.into_body().collect().await.unwrap().to_bytes()
}

fn full(s: &'static str) -> Full<Bytes> {
    Full::new(Bytes::from_static(s.as_bytes()))
}

/// A body delivered in the given frames (an `Err` entry fails the body there).
fn chunks(
    parts: Vec<Result<&'static [u8], &'static str>>,
) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>>> {
    StreamBody::new(futures_util::stream::iter(parts.into_iter().map(|p| {
        p.map(|b| Frame::data(Bytes::from_static(b)))
            .map_err(BoxError::from)
    })))
}

/// A body that settles the credit receipt only when its end is reached, like the meter's.
struct SettleAtEnd {
    inner: Full<Bytes>,
    receipt: CreditReceipt,
    settlement: CreditSettlement,
}

impl Body for SettleAtEnd {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            let settlement = self.settlement;
            self.receipt.settle(settlement);
        }
        polled
    }
}

/// A body fed from a channel, for streaming.
struct ChannelBody(mpsc::Receiver<Result<Bytes, BoxError>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0
            .poll_recv(cx)
            .map(|item| item.map(|r| r.map(Frame::data)))
    }
}

#[tokio::test]
async fn success_with_credits_and_rate_limits_is_spliced_exactly() {
    let spec = Upstream {
        receipt: Some(charged(1, Some(999))),
        rate_limits: Some(rate_limits(60, 58)),
        ..json_ok()
    };
    let res = run(spec, full(r#"{"id":1,"name":"Ann"}"#)).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[CONTENT_TYPE], "application/json");
    // The window's headers and the extensions survive.
    assert_eq!(res.headers()["ratelimit-remaining"], "58");
    assert!(res.extensions().get::<CreditReceipt>().is_some());
    assert_eq!(
        res.extensions().get::<RateLimitInfo>(),
        Some(&rate_limits(60, 58))
    );
    let expected = r#"{"data":{"id":1,"name":"Ann"},"_meta":{"_credits":{"used":1,"balance":999},"_rate_limits":{"limit_minute":60,"remaining_minute":58}}}"#;
    assert_eq!(res.headers()[CONTENT_LENGTH], expected.len().to_string());
    let body = bytes_of(res).await;
    assert_eq!(body, expected);
    let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        parsed,
        json!({
            "data": {"id": 1, "name": "Ann"},
            "_meta": {
                "_credits": {"used": 1, "balance": 999},
                "_rate_limits": {"limit_minute": 60, "remaining_minute": 58}
            }
        })
    );
}

#[tokio::test]
async fn only_credits_only_rate_limits_or_no_meta() {
    let only_credits = Upstream {
        receipt: Some(charged(2, Some(10))),
        ..json_ok()
    };
    let body = bytes_of(run(only_credits, full("[1,2]")).await).await;
    assert_eq!(
        body,
        r#"{"data":[1,2],"_meta":{"_credits":{"used":2,"balance":10}}}"#
    );

    let only_limits = Upstream {
        rate_limits: Some(rate_limits(10, 0)),
        ..json_ok()
    };
    let body = bytes_of(run(only_limits, full("true")).await).await;
    assert_eq!(
        body,
        r#"{"data":true,"_meta":{"_rate_limits":{"limit_minute":10,"remaining_minute":0}}}"#
    );

    let body = bytes_of(run(json_ok(), full("null")).await).await;
    assert_eq!(body, r#"{"data":null,"_meta":{}}"#);
}

#[tokio::test]
async fn unlimited_plan_shows_a_null_balance() {
    let spec = Upstream {
        receipt: Some(charged(2, None)),
        rate_limits: Some(rate_limits(9_999, 9_998)),
        ..json_ok()
    };
    let body = bytes_of(run(spec, full("{}")).await).await;
    let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        parsed["_meta"]["_credits"],
        json!({"used": 2, "balance": null})
    );
    assert_eq!(
        body,
        r#"{"data":{},"_meta":{"_credits":{"used":2,"balance":null},"_rate_limits":{"limit_minute":9999,"remaining_minute":9998}}}"#
    );
}

#[tokio::test]
async fn receipt_is_read_after_the_body_is_collected() {
    // The meter settles at the end of its body: the envelope must see that settlement.
    let receipt = CreditReceipt::pending(2);
    let spec = Upstream {
        receipt: Some(receipt.clone()),
        ..json_ok()
    };
    let body = SettleAtEnd {
        inner: full(r#"{"ok":1}"#),
        receipt: receipt.clone(),
        settlement: CreditSettlement::Charged {
            used: 2,
            balance: Some(98),
        },
    };
    let body = bytes_of(run(spec, body).await).await;
    assert_eq!(
        body,
        r#"{"data":{"ok":1},"_meta":{"_credits":{"used":2,"balance":98}}}"#
    );

    // Released (or never settled) receipts show no credits part.
    for settle in [Some(CreditSettlement::Released), None] {
        let receipt = CreditReceipt::pending(1);
        if let Some(s) = settle {
            receipt.settle(s);
        }
        let spec = Upstream {
            receipt: Some(receipt),
            rate_limits: Some(rate_limits(60, 1)),
            ..json_ok()
        };
        let body = bytes_of(run(spec, full("1")).await).await;
        assert_eq!(
            body,
            r#"{"data":1,"_meta":{"_rate_limits":{"limit_minute":60,"remaining_minute":1}}}"#
        );
    }
}

#[tokio::test]
async fn data_is_kept_byte_for_byte_across_frames() {
    // Unicode (raw and escaped), nested arrays, odd whitespace, a number format serde would
    // rewrite; split so a frame boundary falls inside a multi-byte character.
    let data = "{ \"name\" : \"Zoë 🦀 \\u00e9\\n\",\n  \"deep\": [[1, [2.50, -0e0]], [], [{\"a\": [null]}]],\t\"big\": 12345678901234567890123 }\n";
    let bytes = data.as_bytes();
    let crab = data.find('🦀').unwrap();
    let (a, rest) = bytes.split_at(crab + 2);
    let (b, c) = rest.split_at(7);
    let spec = Upstream {
        receipt: Some(charged(1, Some(0))),
        ..json_ok()
    };
    let body = bytes_of(run(spec, chunks(vec![Ok(a), Ok(b), Ok(c)])).await).await;
    let expected = format!(r#"{{"data":{data},"_meta":{{"_credits":{{"used":1,"balance":0}}}}}}"#);
    assert_eq!(body, expected.as_bytes());
    let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(parsed["data"]["name"], "Zoë 🦀 é\n");
    assert_eq!(parsed["data"]["deep"][2][0]["a"], json!([null]));
}

#[tokio::test]
async fn json_suffix_content_types_are_accepted_and_normalized() {
    let spec = Upstream {
        content_type: Some("application/vnd.of+json; charset=utf-8"),
        ..json_ok()
    };
    let res = run(spec, full("[]")).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[CONTENT_TYPE], "application/json");
    assert_eq!(bytes_of(res).await, r#"{"data":[],"_meta":{}}"#);
}

#[tokio::test]
async fn non_json_2xx_is_a_502_upstream_error() {
    for content_type in [Some("text/html; charset=utf-8"), Some("text/plain"), None] {
        let spec = Upstream {
            content_type,
            receipt: Some(CreditReceipt::pending(1)),
            rate_limits: Some(rate_limits(60, 57)),
            ..json_ok()
        };
        let res = run(spec, full("<html>Please log in</html>")).await;
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY, "{content_type:?}");
        assert_eq!(res.headers()[CONTENT_TYPE], "application/json");
        // Rate-limit headers still go out; the logger still finds the receipt.
        assert_eq!(res.headers()["ratelimit-remaining"], "57");
        assert_eq!(
            res.extensions().get::<ErrorCode>(),
            Some(&ErrorCode::UpstreamError)
        );
        assert!(res.extensions().get::<CreditReceipt>().is_some());
        assert_eq!(bytes_of(res).await, UPSTREAM_ERROR_BODY);
    }
}

#[tokio::test]
async fn invalid_json_with_a_json_content_type_is_a_502() {
    let cases: [&'static [u8]; 7] = [
        b"",
        b"{\"a\":",
        b"{\"a\":1} trailing",
        b"{}{}",
        b"{'single': 1}",
        b"[1,2,]",
        // Valid structure, but a string that is not UTF-8.
        b"{\"a\":\"\xff\xfe\"}",
    ];
    for case in cases {
        let spec = Upstream {
            rate_limits: Some(rate_limits(60, 1)),
            ..json_ok()
        };
        let res = run(spec, Full::new(Bytes::from_static(case))).await;
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY, "{case:?}");
        assert_eq!(res.headers()["ratelimit-limit"], "60");
        assert!(res.headers().get(CONTENT_LENGTH).is_none());
        assert_eq!(bytes_of(res).await, UPSTREAM_ERROR_BODY, "{case:?}");
    }
}

#[tokio::test]
async fn error_responses_pass_through_untouched() {
    let upstream_body =
        r#"{"error":"Rate limit exceeded. Slow down and try again.","code":"RATE_LIMIT_EXCEEDED"}"#;
    let svc = ServiceBuilder::new()
        .layer(ResponseEnvelopeLayer::new())
        .service(service_fn(move |_req: Request<()>| async move {
            let mut res = Response::new(full(upstream_body));
            *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            let h = res.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert("retry-after", HeaderValue::from_static("3"));
            h.insert(CONTENT_LENGTH, HeaderValue::from(upstream_body.len()));
            res.extensions_mut().insert(ErrorCode::RateLimitExceeded);
            Ok::<_, Infallible>(res)
        }));
    let res = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "3");
    assert_eq!(
        res.headers()[CONTENT_LENGTH],
        upstream_body.len().to_string()
    );
    assert_eq!(
        res.extensions().get::<ErrorCode>(),
        Some(&ErrorCode::RateLimitExceeded)
    );
    assert!(matches!(res.body(), GateBody::Inner { .. }));
    assert_eq!(bytes_of(res).await, upstream_body);

    // A non-JSON error is not the envelope's business either.
    let spec = Upstream {
        status: 500,
        content_type: Some("text/plain"),
        ..Upstream::default()
    };
    let res = run(spec, full("boom")).await;
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(res.headers()[CONTENT_TYPE], "text/plain");
    assert_eq!(bytes_of(res).await, "boom");
}

#[tokio::test]
async fn error_responses_are_streamed_not_buffered() {
    let (tx, rx) = mpsc::channel(4);
    let spec = Upstream {
        status: 404,
        ..json_ok()
    };
    // The response arrives while its body is still open.
    let res = run(spec, ChannelBody(rx)).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let mut body = res.into_body();
    tx.send(Ok(Bytes::from_static(b"{\"error\":")))
        .await
        .unwrap();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "{\"error\":");
    tx.send(Ok(Bytes::from_static(b"1}"))).await.unwrap();
    drop(tx);
    assert_eq!(body.collect().await.unwrap().to_bytes(), "1}");
}

#[tokio::test]
async fn inner_body_error_while_collecting_is_a_502() {
    let spec = Upstream {
        receipt: Some(CreditReceipt::pending(1)),
        ..json_ok()
    };
    let res = run(
        spec,
        chunks(vec![Ok(b"{\"list\":[1,2,"), Err("connection reset")]),
    )
    .await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        res.extensions().get::<ErrorCode>(),
        Some(&ErrorCode::UpstreamError)
    );
    assert_eq!(bytes_of(res).await, UPSTREAM_ERROR_BODY);
}

#[tokio::test]
async fn marks_the_request_as_requiring_a_json_body() {
    let svc = ServiceBuilder::new()
        .layer(ResponseEnvelopeLayer::new())
        .service(service_fn(|req: Request<()>| async move {
            let seen = req.extensions().get::<JsonBodyRequired>().is_some();
            let mut res = Response::new(full(if seen { "\"marked\"" } else { "\"unmarked\"" }));
            res.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok::<_, Infallible>(res)
        }));
    let res = svc.oneshot(Request::new(())).await.unwrap();
    assert_eq!(bytes_of(res).await, r#"{"data":"marked","_meta":{}}"#);
}

#[tokio::test]
async fn content_length_is_replaced_and_other_headers_and_extensions_kept() {
    let principal = Principal {
        org: OrgId::new(),
        key: KeyId::new(),
        plan: Plan::Pro,
    };
    let svc = ServiceBuilder::new()
        .layer(ResponseEnvelopeLayer::new())
        .service(service_fn(move |_req: Request<()>| async move {
            let mut res = Response::new(chunks(vec![Ok(b"[\"a\","), Ok(b"\"b\"]")]));
            let h = res.headers_mut();
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
            h.insert(CONTENT_LENGTH, HeaderValue::from_static("9"));
            h.insert("x-upstream-trace", HeaderValue::from_static("t-1"));
            res.extensions_mut().insert(principal);
            Ok::<_, Infallible>(res)
        }));
    let res = svc.oneshot(Request::new(())).await.unwrap();
    let expected = r#"{"data":["a","b"],"_meta":{}}"#;
    assert_eq!(res.headers()[CONTENT_LENGTH], expected.len().to_string());
    assert_eq!(res.headers().get_all(CONTENT_LENGTH).iter().count(), 1);
    assert_eq!(res.headers()["x-upstream-trace"], "t-1");
    assert_eq!(res.extensions().get::<Principal>(), Some(&principal));
    assert_eq!(res.body().size_hint().exact(), Some(expected.len() as u64));
    assert_eq!(bytes_of(res).await, expected);
}

#[tokio::test]
async fn bodies_over_the_buffer_limit_are_a_502() {
    let layer = ResponseEnvelopeLayer::new().with_max_body_bytes(10);
    assert_eq!(layer.max_body_bytes(), 10);

    // Exactly at the limit is fine.
    let res = run_with(layer, Method::GET, json_ok(), full("[1,2,3,45]")).await;
    assert_eq!(bytes_of(res).await, r#"{"data":[1,2,3,45],"_meta":{}}"#);

    // Known to be too large from its size.
    let res = run_with(layer, Method::GET, json_ok(), full("[1,2,3,456]")).await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(bytes_of(res).await, UPSTREAM_ERROR_BODY);

    // Found to be too large while streaming.
    let body = chunks(vec![Ok(b"[1,2,"), Ok(b"3,4,"), Ok(b"5]")]);
    let res = run_with(layer, Method::GET, json_ok(), body).await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(bytes_of(res).await, UPSTREAM_ERROR_BODY);
}

#[tokio::test]
async fn no_content_and_head_pass_through_unchanged() {
    let spec = Upstream {
        status: 204,
        content_type: None,
        rate_limits: Some(rate_limits(60, 3)),
        ..Upstream::default()
    };
    let res = run(spec, Full::new(Bytes::new())).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert!(res.headers().get(CONTENT_TYPE).is_none());
    assert!(res.headers().get(CONTENT_LENGTH).is_none());
    assert_eq!(res.headers()["ratelimit-remaining"], "3");
    assert!(bytes_of(res).await.is_empty());

    let res = run_with(
        ResponseEnvelopeLayer::new(),
        Method::HEAD,
        json_ok(),
        Full::new(Bytes::new()),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(bytes_of(res).await.is_empty());
}

#[tokio::test]
async fn inner_errors_stay_errors_and_readiness_is_forwarded() {
    let (mut svc, mut handle) =
        tower_test::mock::spawn_layer::<Request<()>, Response<Full<Bytes>>, _>(
            ResponseEnvelopeLayer::new(),
        );

    handle.allow(0);
    assert_pending!(svc.poll_ready());
    handle.allow(2);
    assert_ready_ok!(svc.poll_ready());

    let fut = svc.call(Request::new(()));
    let (req, send) = handle.next_request().await.unwrap();
    assert!(req.extensions().get::<JsonBodyRequired>().is_some());
    send.send_error("upstream connection refused");
    let err = fut.await.unwrap_err();
    assert_eq!(err.to_string(), "upstream connection refused");

    assert_ready_ok!(svc.poll_ready());
    let mut fut = tokio_test::task::spawn(svc.call(Request::new(())));
    let (_req, send) = handle.next_request().await.unwrap();
    assert_pending!(fut.poll());
    send.send_response(response(&json_ok(), full("{\"n\":1}")));
    let res = fut.await.unwrap();
    assert_eq!(bytes_of(res).await, r#"{"data":{"n":1},"_meta":{}}"#);
}
