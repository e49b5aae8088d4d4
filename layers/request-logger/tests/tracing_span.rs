//! The `tracing` side of `RequestLoggerLayer`: a span per request, one event at its end, no
//! secrets. Alone in its test binary: `tracing` caches per call site whether anyone listens,
//! so tests without a subscriber running in parallel would hide these call sites.
#![cfg(feature = "memory")]

use std::convert::Infallible;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tollgate_core::{KeyId, ManualClock, OrgId, Plan, Principal};
use tollgate_request_logger::{MemoryLogSink, RequestLoggerLayer};
use tower::{service_fn, ServiceBuilder, ServiceExt};

const MODEL: &str = "0b6f7a52-8f0e-4d3f-9f57-5b1e2a7c9d10";

fn principal() -> Principal {
    Principal {
        org: "11111111-2222-4333-8444-555555555555"
            .parse::<OrgId>()
            .unwrap(),
        key: "66666666-7777-4888-8999-aaaaaaaaaaaa"
            .parse::<KeyId>()
            .unwrap(),
        plan: Plan::Basic,
    }
}

async fn fake_stack(_req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut res = Response::new(Full::from("{}"));
    res.extensions_mut().insert(principal());
    Ok(res)
}

/// Collects what a `tracing` subscriber prints.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn each_request_runs_in_a_span_and_ends_with_an_event() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .without_time()
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);

    let sink = Arc::new(MemoryLogSink::new(ManualClock::new(1_675_150_502_748)));
    let layer =
        RequestLoggerLayer::new(sink.clone()).with_clock(ManualClock::new(1_675_150_502_748));
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(service_fn(
        |req: Request<Full<Bytes>>| async move {
            tracing::info!("inner work");
            fake_stack(req).await
        },
    ));
    let req = Request::builder()
        .uri(format!("/api/models/{MODEL}/users/me"))
        .header("x-request-id", "span-1")
        .header("x-api-key", "sk_live_secret_value")
        .header("cookie", "sess=secret-session")
        .body(Full::default())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    res.into_body().collect().await.unwrap();
    handle.flush().await;

    let out = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let span = "request{request_id=span-1 method=GET route=\"/api/models/:id/users/me\"}";
    assert!(out.contains(&format!("{span}: ")), "{out}");
    let inner = out.lines().find(|l| l.contains("inner work")).unwrap();
    assert!(inner.contains(span), "{inner}");
    let finished = out
        .lines()
        .find(|l| l.contains("request finished"))
        .unwrap();
    assert!(finished.contains(span), "{finished}");
    assert!(finished.contains("status=200"), "{finished}");
    assert!(
        finished.contains(&format!("org_id={}", principal().org)),
        "{finished}"
    );
    assert!(!out.contains("secret"), "{out}");
}
