//! Per-request overhead of each tollgate layer alone and of the five stacked (SPEC §9 order)
//! around a trivial JSON service, against the bare service in the same run; and the cost of
//! one sliding-window decision.
//!
//! `cargo bench --bench stack`

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

use tollgate::prelude::*;
use tollgate::sliding_window::{BucketKey, WindowLimits};

const BODY: &str = r#"{"id":523990756,"username":"mollyy2006","subscribersCount":108}"#;

fn json_service() -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(|_req: Request<Full<Bytes>>| async {
        let mut res = Response::new(Full::new(Bytes::from_static(BODY.as_bytes())));
        res.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        Ok::<_, Infallible>(res)
    })
}

struct Tenant {
    keys: Arc<MemoryKeyStore>,
    ledger: Arc<MemoryLedger>,
    principal: Principal,
    model: ModelId,
    key: String,
}

async fn tenant(clock: SharedClock) -> Tenant {
    let keys = Arc::new(MemoryKeyStore::new(clock.clone()));
    let ledger = Arc::new(MemoryLedger::new(clock));
    let org = OrgId::new();
    let model = ModelId::new();
    keys.set_subscription(org, Some(Plan::Pro)).await.unwrap();
    keys.add_model(org, model).await.unwrap();
    ledger.subscribe(org, Plan::Pro).await.unwrap();
    ledger
        .set_balance(org, tollgate::credit_meter::MAX_CREDITS)
        .await
        .unwrap();
    let key = keys.create_key(org, "bench".into()).await.unwrap();
    Tenant {
        keys,
        ledger,
        principal: Principal {
            org,
            key: key.id,
            plan: Plan::Pro,
        },
        model,
        key: key.secret,
    }
}

/// A window that never refuses during the bench, so every iteration does the full work.
fn open_window(store: MemoryWindowStore) -> PerModelSlidingWindowLayer<MemoryWindowStore> {
    PerModelSlidingWindowLayer::new(store)
        .with_window(Duration::from_secs(1))
        .with_limit(Plan::Pro, u32::MAX)
        .with_burst(Plan::Pro, u32::MAX)
}

fn request(t: &Tenant, with_principal: bool) -> Request<Full<Bytes>> {
    let mut req = Request::get(format!("/api/models/{}/users/me", t.model))
        .header("x-api-key", &t.key)
        .body(Full::default())
        .unwrap();
    if with_principal {
        req.extensions_mut().insert(t.principal);
    }
    req
}

async fn drive<S, B>(svc: &mut S, req: Request<Full<Bytes>>)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    let body = res.into_body().collect().await.unwrap();
    std::hint::black_box(body);
}

fn layers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let clock = SystemClock::shared();
    let t = rt.block_on(tenant(clock.clone()));

    let mut group = c.benchmark_group("per_request");
    group.measurement_time(Duration::from_secs(4));

    let bare = json_service();
    group.bench_function("bare service", |b| {
        b.to_async(&rt).iter_batched(
            || request(&t, false),
            |req| {
                let mut s = bare.clone();
                async move { drive(&mut s, req).await }
            },
            BatchSize::SmallInput,
        )
    });

    let auth = ServiceBuilder::new()
        .api_key_auth(t.keys.clone())
        .service(json_service());
    group.bench_function("api_key_auth alone", |b| {
        b.to_async(&rt).iter_batched(
            || request(&t, false),
            |req| {
                let mut s = auth.clone();
                async move { drive(&mut s, req).await }
            },
            BatchSize::SmallInput,
        )
    });

    let window = ServiceBuilder::new()
        .layer(open_window(MemoryWindowStore::new(clock.clone())))
        .service(json_service());
    group.bench_function("sliding_window alone", |b| {
        b.to_async(&rt).iter_batched(
            || request(&t, true),
            |req| {
                let mut s = window.clone();
                async move { drive(&mut s, req).await }
            },
            BatchSize::SmallInput,
        )
    });

    let meter = ServiceBuilder::new()
        .credit_meter(t.ledger.clone())
        .service(json_service());
    group.bench_function("credit_meter alone", |b| {
        b.to_async(&rt).iter_batched(
            || request(&t, true),
            |req| {
                let mut s = meter.clone();
                async move { drive(&mut s, req).await }
            },
            BatchSize::SmallInput,
        )
    });

    let envelope = ServiceBuilder::new()
        .response_envelope()
        .service(json_service());
    group.bench_function("response_envelope alone", |b| {
        b.to_async(&rt).iter_batched(
            || request(&t, false),
            |req| {
                let mut s = envelope.clone();
                async move { drive(&mut s, req).await }
            },
            BatchSize::SmallInput,
        )
    });

    let logger_layer = rt.block_on(async {
        RequestLoggerLayer::new(MemoryLogSink::new(clock.clone()).with_max_rows(10_000))
    });
    let logger = ServiceBuilder::new()
        .layer(logger_layer.clone())
        .service(json_service());
    group.bench_function("request_logger alone", |b| {
        b.to_async(&rt).iter_batched(
            || request(&t, false),
            |req| {
                let mut s = logger.clone();
                async move { drive(&mut s, req).await }
            },
            BatchSize::SmallInput,
        )
    });

    let stacked = ServiceBuilder::new()
        .layer(logger_layer)
        .response_envelope()
        .api_key_auth(t.keys.clone())
        .layer(open_window(MemoryWindowStore::new(clock.clone())))
        .credit_meter(t.ledger.clone())
        .service(json_service());
    group.bench_function("five layers stacked", |b| {
        b.to_async(&rt).iter_batched(
            || request(&t, false),
            |req| {
                let mut s = stacked.clone();
                async move { drive(&mut s, req).await }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn window_decision(c: &mut Criterion) {
    let store = MemoryWindowStore::new(SystemClock::shared());
    let key = BucketKey::new(OrgId::new(), ModelId::new());
    // The enterprise plan's limits; the clock moves 7 ms per decision so the bucket stays in
    // a steady state of about 8,600 requests in the window (admitted and refused alike).
    let limits = WindowLimits {
        limit: 9_999,
        burst: 200,
        window_ms: 60_000,
    };
    let mut now = 1_700_000_000_000u64;
    c.bench_function("window decision (memory, enterprise bucket)", |b| {
        b.iter(|| {
            now += 7;
            std::hint::black_box(store.check_now(key, limits, now))
        })
    });
}

criterion_group!(benches, layers, window_decision);
criterion_main!(benches);
