//! Operational edges: readiness covers every backend (probed once for many callers),
//! failures and abandoned requests show in `/metrics`, the free routes are rate-limited per
//! key, wrong admin tokens lock out their address only, revoked keys cannot be rotated back
//! to life, stalled request bodies time out.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use common::{TestGateway, ADMIN_TOKEN};
use tollgate::core::{BackendError, BoxFuture, SystemClock};
use tollgate::gateway::{self, memory_backends_with};
use tollgate::sandbox::Fault;
use tollgate::sliding_window::{BucketKey, Decision, MemoryWindowStore, WindowLimits, WindowStore};

/// A window store that counts its checks and can be switched off (then every check fails as
/// unreachable).
#[derive(Clone)]
struct SwitchableWindows {
    inner: Arc<MemoryWindowStore>,
    checks: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
}

impl WindowStore for SwitchableWindows {
    fn check(
        &self,
        key: BucketKey,
        limits: WindowLimits,
    ) -> BoxFuture<Result<Decision, BackendError>> {
        self.checks.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Box::pin(std::future::ready(Err(BackendError::unavailable(
                "window store switched off",
            ))));
        }
        self.inner.check(key, limits)
    }
}

/// A demo gateway whose rate-limit windows live in a [`SwitchableWindows`].
async fn start_with_switchable_windows() -> (TestGateway, SwitchableWindows) {
    let config = common::test_config();
    let mut backends = memory_backends_with(SystemClock::shared(), config.hold_ttl);
    let windows = SwitchableWindows {
        inner: Arc::new(MemoryWindowStore::new(SystemClock::shared())),
        checks: Arc::default(),
        down: Arc::default(),
    };
    backends.windows = Arc::new(windows.clone());
    let running = gateway::start_with(config, backends).await.unwrap();
    (TestGateway::new(running), windows)
}

async fn metrics_text(gw: &TestGateway) -> String {
    gw.send(gw.request(Method::GET, "/metrics", None, None))
        .await
        .text()
}

/// Polls `check` every 20 ms until it holds or `within` has passed.
async fn eventually<F: std::future::Future<Output = bool>>(
    within: Duration,
    mut check: impl FnMut() -> F,
) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn readiness_lists_every_backend() {
    let gw = common::start(common::test_config()).await;
    let answer = gw
        .send(gw.request(Method::GET, "/readyz", None, None))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.json(),
        json!({"status": "ready", "backends": {
            "ledger": true, "keys": true, "sessions": true, "rate_limits": true, "logs": true,
            "idempotency": true
        }})
    );
}

/// The idempotency store is a backend too: with it unreachable, keyed writes answer 503, and
/// `/readyz` says which store it is.
#[cfg(feature = "redis")]
#[tokio::test]
async fn readiness_shows_an_unreachable_idempotency_store() {
    let config = common::test_config();
    let mut backends = memory_backends_with(SystemClock::shared(), config.hold_ttl);
    // Nothing listens on port 1.
    backends.idempotency = Arc::new(
        tollgate_idempotency::RedisIdempotencyStore::open("redis://127.0.0.1:1")
            .unwrap()
            .with_timeout(Duration::from_millis(300)),
    );
    let gw = TestGateway::new(gateway::start_with(config, backends).await.unwrap());
    let answer = gw
        .send(gw.request(Method::GET, "/readyz", None, None))
        .await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.text()
    );
    assert_eq!(answer.json()["status"], "unavailable");
    assert_eq!(answer.json()["backends"]["idempotency"], false);
    assert_eq!(answer.json()["backends"]["ledger"], true);
}

#[tokio::test]
async fn upstream_failures_are_counted_as_backend_errors() {
    let gw = common::start(common::test_config()).await;
    let sandbox = gw.gw.sandbox().unwrap();
    sandbox.inject(Fault::fail(StatusCode::SERVICE_UNAVAILABLE).times(2));
    for _ in 0..2 {
        let a = gw.get(&gw.model_path("/users/me")).await;
        assert_eq!(a.status, StatusCode::BAD_GATEWAY);
        assert_eq!(a.code(), "UPSTREAM_ERROR");
    }
    let metrics = gw
        .send(gw.request(Method::GET, "/metrics", None, None))
        .await;
    assert!(
        metrics
            .text()
            .contains("tollgate_backend_errors_total{backend=\"upstream\"} 2\n"),
        "{}",
        metrics.text()
    );
}

#[tokio::test]
async fn a_revoked_key_cannot_be_rotated_back_to_life() {
    let gw = common::start(common::test_config()).await;
    let key_id = gw.gw.demo().unwrap().key_id;
    let revoke = gw
        .admin(Method::POST, &format!("/admin/keys/{key_id}/revoke"), None)
        .await;
    assert_eq!(revoke.status, StatusCode::OK);
    let rotate = gw
        .admin(Method::POST, &format!("/admin/keys/{key_id}/rotate"), None)
        .await;
    assert_eq!(rotate.status, StatusCode::BAD_REQUEST, "{}", rotate.text());
    assert_eq!(rotate.code(), "INVALID_REQUEST");
    let a = gw.get(&gw.model_path("/users/me")).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_stalled_request_body_times_out_without_a_charge() {
    let mut config = common::test_config();
    config.upstream_timeout = Duration::from_millis(300);
    config.hold_ttl = Duration::from_secs(60);
    let gw = common::start(config).await;
    let before = gw.balance().await;
    // Declare 100 bytes, send 10, then stall.
    let addr = gw.gw.local_addr();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: x\r\nx-api-key: {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"text\":\"h",
        gw.model_path("/chats/7/messages"),
        gw.key()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("answered without waiting for the rest of the body")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"INVALID_REQUEST\""), "{text}");
    assert_eq!(gw.balance().await, before);
    assert_eq!(gw.gw.state().ledger.open_holds(), 0);
}

#[tokio::test]
async fn readiness_is_probed_once_for_many_callers_and_a_failure_still_shows_quickly() {
    let (gw, windows) = start_with_switchable_windows().await;
    let gw = Arc::new(gw);
    // 50 unauthenticated callers at once: one probe, not 50.
    let calls = (0..50).map(|_| {
        let gw = Arc::clone(&gw);
        tokio::spawn(async move {
            gw.send(gw.request(Method::GET, "/readyz", None, None))
                .await
                .status
        })
    });
    for status in futures_util::future::join_all(calls).await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    // Another 20 in a row, right after, answer from the same probe (or at most one more).
    for _ in 0..20 {
        let a = gw
            .send(gw.request(Method::GET, "/readyz", None, None))
            .await;
        assert_eq!(a.status, StatusCode::OK);
    }
    let probes = windows.checks.load(Ordering::SeqCst);
    assert!(
        (1..=3).contains(&probes),
        "70 /readyz calls probed the window store {probes} times"
    );

    // The store goes down: /readyz says so within about a second.
    windows.down.store(true, Ordering::SeqCst);
    let down_at = Instant::now();
    let shown = eventually(Duration::from_secs(4), || {
        let gw = Arc::clone(&gw);
        async move {
            let a = gw
                .send(gw.request(Method::GET, "/readyz", None, None))
                .await;
            a.status == StatusCode::SERVICE_UNAVAILABLE
                && a.json()["backends"]["rate_limits"] == false
                && a.json()["backends"]["ledger"] == true
        }
    })
    .await;
    assert!(shown, "the failing store never showed in /readyz");
    assert!(
        down_at.elapsed() < Duration::from_millis(2_500),
        "took {:?} to show",
        down_at.elapsed()
    );
    // And back up again as quickly.
    windows.down.store(false, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(4), || {
            let gw = Arc::clone(&gw);
            async move {
                gw.send(gw.request(Method::GET, "/readyz", None, None))
                    .await
                    .status
                    == StatusCode::OK
            }
        })
        .await
    );
}

#[tokio::test]
async fn request_path_backend_failures_are_counted_per_backend() {
    let (gw, windows) = start_with_switchable_windows().await;
    windows.down.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let a = gw.get(&gw.model_path("/users/me")).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
        assert_eq!(a.code(), "SERVICE_UNAVAILABLE");
    }
    // The free routes use the window store too.
    let a = gw.get("/api/credits").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
    let text = metrics_text(&gw).await;
    assert!(
        text.contains("tollgate_backend_errors_total{backend=\"rate_limits\"} 4\n"),
        "{text}"
    );
    assert_eq!(gw.gw.state().metrics.backend_errors("rate_limits"), 4);
}

#[tokio::test]
async fn a_request_whose_client_left_is_counted_as_abandoned() {
    let gw = common::start(common::test_config()).await;
    let account = gw.gw.sandbox().unwrap().accounts()[0].user_id.clone();
    gw.gw
        .sandbox()
        .unwrap()
        .inject(Fault::stall(Duration::from_secs(2)).for_account(&account));
    let mut stream = tokio::net::TcpStream::connect(gw.gw.local_addr())
        .await
        .unwrap();
    let request = format!(
        "GET {} HTTP/1.1\r\nhost: x\r\nx-api-key: {}\r\n\r\n",
        gw.model_path("/users/me"),
        gw.key()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let sandbox = gw.gw.sandbox().unwrap().clone();
    assert!(
        eventually(Duration::from_secs(2), || {
            let n = sandbox.requests_to("/api2/v2/users/me");
            async move { n == 1 }
        })
        .await,
        "the request reaches the upstream"
    );
    drop(stream);
    let metrics = Arc::clone(&gw.gw.state().metrics);
    assert!(
        eventually(Duration::from_secs(2), || {
            let n = metrics.abandoned("/api/models/:id/users/me");
            async move { n == 1 }
        })
        .await,
        "the abandoned request was not counted"
    );
    let text = metrics_text(&gw).await;
    assert!(
        text.contains("tollgate_requests_abandoned_total{route=\"/api/models/:id/users/me\"} 1\n"),
        "{text}"
    );
    // Answered requests are not counted as abandoned.
    gw.gw.sandbox().unwrap().clear_faults();
    let a = gw.get(&gw.model_path("/users/me")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(metrics.abandoned("/api/models/:id/users/me"), 1);
}

#[tokio::test]
async fn the_free_routes_are_rate_limited_per_key() {
    let gw = Arc::new(common::start(common::test_config()).await);
    let org = gw.gw.demo().unwrap().org;
    let other_key = gw
        .admin(
            Method::POST,
            &format!("/admin/orgs/{org}/keys"),
            Some(json!({"name": "second"})),
        )
        .await;
    assert_eq!(other_key.status, StatusCode::CREATED);
    let other_key = other_key.json()["key"].as_str().unwrap().to_owned();

    // 200 requests at once to the two free routes, with one key: they share one bucket of
    // 120 per minute (20 per second), so at least 80 are refused.
    let calls = (0..200).map(|i| {
        let gw = Arc::clone(&gw);
        tokio::spawn(async move {
            let path = if i % 2 == 0 {
                "/api/credits"
            } else {
                "/api/logs?limit=1"
            };
            gw.get(path).await
        })
    });
    let answers: Vec<_> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let ok = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .count();
    let refused: Vec<_> = answers
        .iter()
        .filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(ok + refused.len(), 200, "only 200s and 429s");
    assert!((1..=120).contains(&ok), "{ok} admitted");
    for a in &refused {
        assert_eq!(a.code(), "RATE_LIMIT_EXCEEDED");
        assert_eq!(a.headers["ratelimit-limit"], "120");
        assert!(a.headers.contains_key("ratelimit-remaining"));
        assert!(a.headers.contains_key("ratelimit-reset"));
        let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "Retry-After {retry}");
    }
    let admitted = answers.iter().find(|a| a.status == StatusCode::OK).unwrap();
    assert_eq!(admitted.headers["ratelimit-limit"], "120");

    // Another key of the same org has its own bucket, and the paid routes their own.
    let key = other_key.clone();
    let a = gw
        .send(gw.request(Method::GET, "/api/credits", Some(&key), None))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let a = gw.get(&gw.model_path("/users/me")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
}

/// An HTTP client whose connections come from `source` (any 127.0.0.0/8 address reaches a
/// gateway on 127.0.0.1).
fn client_from(source: &str) -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(source.parse::<IpAddr>().unwrap()));
    Client::builder(TokioExecutor::new()).build(connector)
}

async fn admin_from(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    token: &str,
) -> (StatusCode, http::HeaderMap, serde_json::Value) {
    let req = Request::get(format!("http://{addr}/admin/orgs/{}", uuid::Uuid::new_v4()))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::default())
        .unwrap();
    let res = client.request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        serde_json::from_slice(&body).unwrap(),
    )
}

#[tokio::test]
async fn wrong_admin_tokens_lock_out_their_address_only() {
    let gw = common::start(common::test_config()).await;
    let addr = gw.gw.local_addr();
    let attacker = client_from("127.0.0.1");
    let operator = client_from("127.0.0.2");

    // Ten wrong tokens: ten 401s (a shorter and a longer token than the real one too).
    for i in 0..10 {
        let token = "x".repeat(1 + i * 7);
        let (status, _, body) = admin_from(&attacker, addr, &token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["code"], "UNAUTHORIZED");
    }
    // Then the address is locked out, even with the right token.
    let (status, headers, body) = admin_from(&attacker, addr, ADMIN_TOKEN).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["code"], "RATE_LIMIT_EXCEEDED");
    assert!(
        body["error"].as_str().unwrap().contains("admin token"),
        "{body}"
    );
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");

    // The operator on another address is not locked out (the org is unknown: 404).
    let (status, _, body) = admin_from(&operator, addr, ADMIN_TOKEN).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _, _) = admin_from(&operator, addr, "wrong").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = admin_from(&operator, addr, ADMIN_TOKEN).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

async fn operator_login_from(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    token: &str,
) -> StatusCode {
    let body = format!("token={token}");
    let req = Request::post(format!("http://{addr}/dashboard/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("accept", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    client.request(req).await.unwrap().status()
}

/// Wrong admin tokens on the dashboard's sign-in slow down the address that sends them, not
/// the operator signing in from elsewhere.
#[tokio::test]
async fn wrong_operator_sign_ins_throttle_their_address_only() {
    let gw = common::start(common::test_config()).await;
    let addr = gw.gw.local_addr();
    let attacker = client_from("127.0.0.1");
    let operator = client_from("127.0.0.2");
    for _ in 0..5 {
        let status = operator_login_from(&attacker, addr, "not-the-token").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    // The attacker's address is throttled, even with the right token.
    let status = operator_login_from(&attacker, addr, ADMIN_TOKEN).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // The operator elsewhere signs in.
    let status = operator_login_from(&operator, addr, ADMIN_TOKEN).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
}
