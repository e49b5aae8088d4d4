//! The tollgate layers on an ordinary axum `Router`: your own handlers, priced by your own
//! cost table, behind API keys, per-model sliding windows and credits, with `{data, _meta}`
//! envelopes and request logs.
//!
//! `cargo run --example axum` serves on 127.0.0.1:3000 and prints a key and curl lines;
//! `cargo run --example axum -- --self-test` serves on a free port, calls itself and exits.

use std::sync::Arc;

use axum::extract::Path;
use axum::routing::get;
use axum::{Extension, Json, Router};
use http::Method;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tower::ServiceBuilder;

use tollgate::prelude::*;
use tollgate::request_logger::LogQuery;

/// The app's own price list: profile reads cost 1, reports 5, the ping is free.
fn cost_table() -> CostTable {
    CostTable::new([
        RouteSpec::new(Method::GET, "/api/models/:id/profile", 1),
        RouteSpec::new(Method::GET, "/api/models/:id/report", 5),
        RouteSpec::new(Method::GET, "/api/ping", 0),
    ])
}

async fn profile(Path(model): Path<String>, Extension(who): Extension<Principal>) -> Json<Value> {
    Json(json!({"model": model, "org": who.org, "plan": who.plan}))
}

async fn report(Path(model): Path<String>) -> Json<Value> {
    Json(json!({"model": model, "rows": [1, 2, 3]}))
}

async fn ping() -> Json<Value> {
    Json(json!({"pong": true}))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let self_test = std::env::args().any(|a| a == "--self-test");

    // Backends: the in-memory ones (swap in PostgreSQL/Redis implementations of the same traits).
    let clock = SystemClock::shared();
    let keys = Arc::new(MemoryKeyStore::new(clock.clone()));
    let ledger = Arc::new(MemoryLedger::new(clock.clone()));
    let windows = MemoryWindowStore::new(clock.clone());
    let logs = Arc::new(MemoryLogSink::new(clock));

    // One org on the free plan (10 requests/minute per model, 100 credits), one model, one key.
    let org = OrgId::new();
    let model = ModelId::new();
    keys.set_subscription(org, Some(Plan::Free)).await?;
    keys.add_model(org, model).await?;
    ledger.subscribe(org, Plan::Free).await?;
    let key = keys.create_key(org, "example".into()).await?;

    let table = cost_table();
    let logger = RequestLoggerLayer::new(logs.clone());
    let log_handle = logger.handle();
    let app = Router::new()
        .route("/api/models/{id}/profile", get(profile))
        .route("/api/models/{id}/report", get(report))
        .route("/api/ping", get(ping))
        .layer(
            ServiceBuilder::new()
                .layer(logger.with_cost_table(table.clone()))
                .response_envelope()
                .layer(ApiKeyAuthLayer::new(keys.clone()).with_cost_table(table.clone()))
                .layer(PerModelSlidingWindowLayer::new(windows).with_cost_table(table.clone()))
                .layer(CreditMeterLayer::new(ledger.clone()).with_cost_table(table)),
        );

    let addr = if self_test {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:3000"
    };
    let listener = TcpListener::bind(addr).await?;
    let base = format!("http://{}", listener.local_addr()?);
    println!("axum + tollgate on {base}");
    println!("key: {}", key.secret);
    println!(
        "curl -s {base}/api/models/{model}/profile -H 'X-API-Key: {}'",
        key.secret
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    if !self_test {
        server.await??;
        return Ok(());
    }

    // Self-test: a priced call, a free call, a refused call; then the balance and the logs.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let get = |path: String, with_key: bool| {
        let mut req = http::Request::get(format!("{base}{path}"));
        if with_key {
            req = req.header("x-api-key", &key.secret);
        }
        client.request(req.body(http_body_util::Empty::new()).unwrap())
    };
    use http_body_util::BodyExt;
    let res = get(format!("/api/models/{model}/report"), true).await?;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["ratelimit-remaining"], "9");
    let body: Value = serde_json::from_slice(&res.into_body().collect().await?.to_bytes())?;
    assert_eq!(body["data"]["rows"], json!([1, 2, 3]));
    assert_eq!(body["_meta"]["_credits"], json!({"used": 5, "balance": 95}));
    println!("report: {body}");

    let res = get("/api/ping".into(), true).await?;
    assert_eq!(res.status(), 200);
    let res = get(format!("/api/models/{}/profile", ModelId::new()), true).await?;
    assert_eq!(res.status(), 401, "another org's model is refused");
    let res = get(format!("/api/models/{model}/profile"), false).await?;
    assert_eq!(res.status(), 401, "no key");

    log_handle.flush().await;
    let page = logs
        .query(LogQuery {
            org,
            from_ms: None,
            to_ms: None,
            model: None,
            status: None,
            cursor: None,
            limit: 100,
        })
        .await?;
    let account = ledger.account(org).await?.expect("subscribed");
    println!(
        "self-test ok: balance {:?}, {} log rows for the org",
        account.balance(),
        page.records.len()
    );
    assert_eq!(account.balance(), Some(95));
    assert_eq!(page.records.len(), 3, "the keyless request has no org");
    Ok(())
}
