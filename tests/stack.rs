//! The five inbound layers stacked in the SPEC §9 order around a plain `service_fn`:
//! RequestLogger → ResponseEnvelope → ApiKeyAuth → PerModelSlidingWindow → CreditMeter → service.
//! Checks the exact JSON of a success and of every rejection, the headers, and the log rows.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tower::util::BoxCloneService;
use tower::{service_fn, ServiceBuilder, ServiceExt};

use tollgate::prelude::*;
use tollgate::request_logger::{LogQuery, LogRecord, LoggerHandle};
use tollgate_core::TokioClock;

type Svc =
    BoxCloneService<Request<Full<Bytes>>, Response<tollgate::gateway::GatewayBody>, Infallible>;

struct Stack {
    svc: Svc,
    keys: Arc<MemoryKeyStore>,
    ledger: Arc<MemoryLedger>,
    logs: Arc<MemoryLogSink>,
    log_handle: LoggerHandle,
    calls: Arc<AtomicUsize>,
    org: OrgId,
    model: ModelId,
    key: String,
}

async fn stack(plan: Plan) -> Stack {
    let clock: SharedClock = Arc::new(TokioClock::new());
    let keys = Arc::new(MemoryKeyStore::new(clock.clone()));
    let ledger = Arc::new(MemoryLedger::new(clock.clone()));
    let logs = Arc::new(MemoryLogSink::new(clock.clone()));
    let org = OrgId::new();
    let model = ModelId::new();
    keys.set_subscription(org, Some(plan)).await.unwrap();
    keys.add_model(org, model).await.unwrap();
    ledger.subscribe(org, plan).await.unwrap();
    let key = keys.create_key(org, "test".into()).await.unwrap().secret;

    let calls = Arc::new(AtomicUsize::new(0));
    let inner_calls = calls.clone();
    let logger = RequestLoggerLayer::new(logs.clone()).with_clock(clock.clone());
    let log_handle = logger.handle();
    let svc = ServiceBuilder::new()
        .map_response(tollgate::gateway::app::box_response)
        .layer(logger)
        .response_envelope()
        .api_key_auth(keys.clone())
        .per_model_sliding_window(MemoryWindowStore::new(clock.clone()))
        .credit_meter(ledger.clone())
        .service(service_fn(move |req: Request<Full<Bytes>>| {
            let calls = inner_calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                // The inner service sees who is calling.
                let who = req.extensions().get::<Principal>().copied().unwrap();
                let body = json!({"id": 523990756, "username": "mollyy2006", "plan": who.plan});
                let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
                res.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                Ok::<_, Infallible>(res)
            }
        }));
    Stack {
        svc: BoxCloneService::new(svc),
        keys,
        ledger,
        logs,
        log_handle,
        calls,
        org,
        model,
        key,
    }
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    json: Value,
}

impl Stack {
    fn req(&self, path: &str, key: Option<&str>) -> Request<Full<Bytes>> {
        let mut b = Request::get(path);
        if let Some(k) = key {
            b = b.header("x-api-key", k);
        }
        b.body(Full::default()).unwrap()
    }

    fn me(&self) -> String {
        format!("/api/models/{}/users/me", self.model)
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Answer {
        let res = self.svc.clone().oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            json: serde_json::from_slice(&bytes).unwrap(),
        }
    }

    async fn balance(&self) -> Option<u64> {
        self.ledger
            .account(self.org)
            .await
            .unwrap()
            .unwrap()
            .balance()
    }

    async fn rows(&self) -> Vec<LogRecord> {
        self.log_handle.flush().await;
        self.logs
            .query(LogQuery::new(self.org))
            .await
            .unwrap()
            .records
    }
}

fn error(message: &str, code: &str) -> Value {
    json!({"error": message, "code": code})
}

#[tokio::test(start_paused = true)]
async fn success_is_enveloped_with_credits_and_rate_limits() {
    let s = stack(Plan::Basic).await;
    let a = s
        .send(
            Request::get(s.me())
                .header("x-api-key", &s.key)
                .header("x-request-id", "req-42")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.json,
        json!({
            "data": {"id": 523990756, "username": "mollyy2006", "plan": "basic"},
            "_meta": {
                "_credits": {"used": 1, "balance": 999},
                "_rate_limits": {"limit_minute": 60, "remaining_minute": 59}
            }
        })
    );
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(a.headers["ratelimit-limit"], "60");
    assert_eq!(a.headers["ratelimit-remaining"], "59");
    assert_eq!(a.headers["ratelimit-reset"], "60");
    assert_eq!(a.headers["x-request-id"], "req-42");
    assert_eq!(s.balance().await, Some(999));

    let rows = s.rows().await;
    assert_eq!(rows.len(), 1);
    let row = serde_json::to_value(&rows[0]).unwrap();
    assert_eq!(row["request_id"], "req-42");
    assert_eq!(row["org_id"], json!(s.org));
    assert_eq!(row["model_id"], json!(s.model));
    assert_eq!(row["route"], "/api/models/:id/users/me");
    assert_eq!(row["status"], 200);
    assert_eq!(row["code"], Value::Null);
    assert_eq!(row["credits"], 1);
}

#[tokio::test(start_paused = true)]
async fn every_rejection_has_its_exact_body_and_costs_nothing() {
    let s = stack(Plan::Free).await;

    // 401: no key.
    let a = s.send(s.req(&s.me(), None)).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        a.json,
        error(
            "The API key is missing, unknown or revoked.",
            "INVALID_API_KEY"
        )
    );
    assert!(a.headers.contains_key("x-request-id"));

    // 401: key sent as Authorization; the message says where it belongs.
    let a = s
        .send(
            Request::get(s.me())
                .header("authorization", format!("Bearer {}", s.key))
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json["code"], "INVALID_API_KEY");
    assert!(a.json["error"].as_str().unwrap().contains("X-API-Key"));

    // 401: another org's model and a model that does not exist are indistinguishable.
    let other_org = OrgId::new();
    let other_model = ModelId::new();
    s.keys
        .set_subscription(other_org, Some(Plan::Pro))
        .await
        .unwrap();
    s.keys.add_model(other_org, other_model).await.unwrap();
    let theirs = s
        .send(s.req(&format!("/api/models/{other_model}/chats"), Some(&s.key)))
        .await;
    let nobody = s
        .send(s.req(
            &format!("/api/models/{}/chats", ModelId::new()),
            Some(&s.key),
        ))
        .await;
    assert_eq!(theirs.status, StatusCode::UNAUTHORIZED);
    assert_eq!(theirs.json, nobody.json);
    assert_eq!(
        theirs.json,
        error(
            "The API key is missing, unknown or revoked.",
            "INVALID_API_KEY"
        )
    );

    // 429: the free plan's burst (5 per second) then the window (10 per minute).
    for i in 0..5 {
        let a = s.send(s.req(&s.me(), Some(&s.key))).await;
        assert_eq!(a.status, StatusCode::OK, "request {i}");
    }
    let a = s.send(s.req(&s.me(), Some(&s.key))).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        a.json,
        error(
            "Rate limit exceeded. Slow down and try again.",
            "RATE_LIMIT_EXCEEDED"
        )
    );
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(a.headers["ratelimit-limit"], "10");
    assert_eq!(a.headers["ratelimit-remaining"], "5");
    tokio::time::advance(Duration::from_millis(1_000)).await;
    for _ in 0..5 {
        assert_eq!(
            s.send(s.req(&s.me(), Some(&s.key))).await.status,
            StatusCode::OK
        );
    }
    tokio::time::advance(Duration::from_millis(1_000)).await;
    let a = s.send(s.req(&s.me(), Some(&s.key))).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a.headers["ratelimit-remaining"], "0");
    assert_eq!(a.headers["retry-after"], "58");
    assert_eq!(
        s.balance().await,
        Some(90),
        "ten successes, nothing for refusals"
    );

    // 402: available balance below the cost (payouts/stats costs 2).
    s.ledger.set_balance(s.org, 1).await.unwrap();
    tokio::time::advance(Duration::from_secs(61)).await;
    let a = s
        .send(s.req(
            &format!("/api/models/{}/payouts/stats", s.model),
            Some(&s.key),
        ))
        .await;
    assert_eq!(a.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(
        a.json,
        error(
            "Not enough credits to complete this request.",
            "INSUFFICIENT_CREDITS"
        )
    );
    assert_eq!(s.balance().await, Some(1));

    // 402: no subscription (checked before the model and the window).
    s.keys.set_subscription(s.org, None).await.unwrap();
    let a = s.send(s.req(&s.me(), Some(&s.key))).await;
    assert_eq!(a.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(
        a.json,
        error(
            "The organization has no active subscription. Subscribe to a plan to use the API.",
            "NO_SUBSCRIPTION"
        )
    );

    assert_eq!(
        s.calls.load(Ordering::SeqCst),
        10,
        "only admitted, paid requests got through"
    );

    // The logs saw every request of the org, refusals with their code and 0 credits.
    let rows = s.rows().await;
    let codes: Vec<Option<String>> = rows
        .iter()
        .map(|r| {
            serde_json::to_value(r).unwrap()["code"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    // The keyless requests belong to no org; the 16 others are this org's.
    assert_eq!(rows.len(), 16, "{codes:?}");
    assert_eq!(rows.iter().map(|r| r.credits).sum::<u64>(), 10);
    for code in [
        "RATE_LIMIT_EXCEEDED",
        "INSUFFICIENT_CREDITS",
        "NO_SUBSCRIPTION",
        "INVALID_API_KEY",
    ] {
        assert!(
            codes.contains(&Some(code.to_owned())),
            "{code} in {codes:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn unlimited_plans_show_a_null_balance() {
    let s = stack(Plan::Enterprise).await;
    let a = s.send(s.req(&s.me(), Some(&s.key))).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.json["_meta"],
        json!({
            "_credits": {"used": 1, "balance": null},
            "_rate_limits": {"limit_minute": 9999, "remaining_minute": 9998}
        })
    );
}
