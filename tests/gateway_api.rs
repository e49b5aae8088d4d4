//! End to end, part A: the customer API of the turnkey gateway over real HTTP on a loopback
//! port, in front of the in-process sandbox upstream.
//!
//! Every error row of SPEC §2 the customer API can produce (exact status, exact JSON, headers,
//! nothing charged, and nothing sent upstream where the gateway decides alone), the success
//! envelope, every route's cost and upstream request, and bad input that must never yield a
//! 5xx or stop the gateway.

mod common;

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

use common::{Answer, TestGateway};
use tollgate::gateway::Config;
use tollgate::sandbox::{sandbox_rules, DynamicRules, Fault, Sandbox, SandboxAccount};

// The sentences a customer reads (SPEC §2 error table).
const INVALID_KEY: &str = "The API key is missing, unknown or revoked.";
const WRONG_HEADER: &str =
    "The API key must be sent in the X-API-Key header, not in the Authorization header.";
const NO_SUBSCRIPTION: &str =
    "The organization has no active subscription. Subscribe to a plan to use the API.";
const INSUFFICIENT: &str = "Not enough credits to complete this request.";
const RATE_LIMITED: &str = "Rate limit exceeded. Slow down and try again.";
const SESSION_EXPIRED: &str = "The model's session has expired. Reconnect the model to continue.";
const STALE_SIGNATURE: &str =
    "The upstream rejected the request signature. Retry in a few seconds.";
const THROTTLED: &str = "The upstream is throttling this account. Retry later.";
const UPSTREAM_FAILED: &str = "The upstream failed to answer correctly.";
const NOT_JSON: &str = "The upstream answered with a body that is not JSON.";
const TIMED_OUT: &str = "The upstream did not answer in time.";
const REJECTED: &str = "The upstream rejected the request.";
const NO_ROUTE: &str = "No such route.";
const TOO_LARGE: &str = "The request body is too large.";
const BODY_NOT_JSON: &str = "The request body must be JSON.";
const HEADERS_TOO_LARGE: &str = "The request headers are too large.";

// ---------------------------------------------------------------------------------------------
// Helpers

/// The test configuration with a burst large enough that a test sending a dozen requests in
/// a second is limited only by the per-minute window (60 on the demo's basic plan).
fn roomy_config() -> Config {
    let mut config = common::test_config();
    config.burst = [5, 1_000, 30, 200];
    config
}

async fn start_roomy() -> TestGateway {
    common::start(roomy_config()).await
}

fn sandbox(gw: &TestGateway) -> &Sandbox {
    gw.gw.sandbox().expect("in-process sandbox")
}

fn demo_org(gw: &TestGateway) -> String {
    gw.gw.demo().expect("demo mode").org.to_string()
}

/// The sandbox account behind the demo model (the only account a fresh demo gateway has).
fn demo_account(gw: &TestGateway) -> SandboxAccount {
    let accounts = sandbox(gw).accounts();
    assert_eq!(
        accounts.len(),
        1,
        "a fresh demo gateway has one sandbox account"
    );
    accounts.into_iter().next().unwrap()
}

fn error_body(code: &str, message: &str) -> Value {
    json!({"error": message, "code": code})
}

/// Status, `application/json`, the exact `{error, code}` body, and an `X-Request-Id`.
#[track_caller]
fn assert_error(answer: &Answer, status: u16, code: &str, message: &str) {
    assert_eq!(answer.status.as_u16(), status, "body: {}", answer.text());
    assert_eq!(
        answer.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/json"[..]),
        "errors are JSON"
    );
    assert_eq!(answer.json(), error_body(code, message));
    assert!(
        answer.headers.contains_key("x-request-id"),
        "every response carries X-Request-Id"
    );
}

/// The `RateLimit-*` headers of a response on a limited route.
#[track_caller]
fn rate_limit_headers(answer: &Answer) -> (u64, u64, u64) {
    let num = |name: &str| -> u64 {
        answer
            .headers
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing on a {} response", answer.status))
            .to_str()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("{name} is not a number"))
    };
    (
        num("ratelimit-limit"),
        num("ratelimit-remaining"),
        num("ratelimit-reset"),
    )
}

/// A request with the given extra headers (raw bytes allowed).
fn request_with(
    gw: &TestGateway,
    method: Method,
    path: &str,
    headers: &[(&str, &[u8])],
    body: Option<&str>,
) -> Request<Full<Bytes>> {
    let mut req = Request::builder().method(method).uri(gw.url(path));
    for (name, value) in headers {
        req = req.header(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value).unwrap(),
        );
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    req.body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
        .unwrap()
}

async fn send_with(
    gw: &TestGateway,
    method: Method,
    path: &str,
    headers: &[(&str, &[u8])],
    body: Option<&str>,
) -> Answer {
    gw.send(request_with(gw, method, path, headers, body)).await
}

/// A call with the demo key.
async fn call(gw: &TestGateway, method: Method, path: &str, body: Option<&str>) -> Answer {
    let key = gw.key();
    gw.send(gw.request(method, path, Some(&key), body)).await
}

async fn org_balance(gw: &TestGateway, org: &str) -> Option<u64> {
    let answer = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}"), None)
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    answer.json()["balance"].as_u64()
}

async fn model_status(gw: &TestGateway, org: &str, model: &str) -> String {
    let answer = gw
        .admin(Method::GET, &format!("/admin/orgs/{org}/models"), None)
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let models = answer.json();
    let found = models
        .as_array()
        .expect("a list of models")
        .iter()
        .find(|m| m["id"] == model)
        .unwrap_or_else(|| panic!("model {model} not listed: {models}"))
        .clone();
    found["status"].as_str().unwrap().to_owned()
}

/// A tenant made through the admin API.
struct Tenant {
    org: String,
    key_id: String,
    key: String,
    model: String,
}

async fn admin_ok(gw: &TestGateway, method: Method, path: &str, body: Value) -> Value {
    let answer = gw.admin(method, path, Some(body)).await;
    assert!(
        answer.status.is_success(),
        "{path}: {} {}",
        answer.status,
        answer.text()
    );
    answer.json()
}

async fn new_tenant(gw: &TestGateway, plan: &str, session: Value) -> Tenant {
    let org = admin_ok(gw, Method::POST, "/admin/orgs", json!({"name": "Tenant"})).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    admin_ok(
        gw,
        Method::PUT,
        &format!("/admin/orgs/{org}/subscription"),
        json!({"plan": plan}),
    )
    .await;
    let key = admin_ok(
        gw,
        Method::POST,
        &format!("/admin/orgs/{org}/keys"),
        json!({"name": "k"}),
    )
    .await;
    let model = admin_ok(
        gw,
        Method::POST,
        &format!("/admin/orgs/{org}/models"),
        json!({"name": "m", "session": session}),
    )
    .await;
    assert_eq!(model["status"], "connected");
    Tenant {
        org,
        key_id: key["id"].as_str().unwrap().to_owned(),
        key: key["key"].as_str().unwrap().to_owned(),
        model: model["id"].as_str().unwrap().to_owned(),
    }
}

/// What the sandbox itself answers for the demo account at `path_and_query` (a correctly
/// signed GET sent straight to it, in process): the bytes the envelope must carry as `data`.
async fn sandbox_direct(gw: &TestGateway, path_and_query: &str) -> Bytes {
    let sandbox = sandbox(gw);
    let account = demo_account(gw);
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(path_and_query)
        .body(Full::new(Bytes::new()))
        .unwrap();
    *req.headers_mut() = sandbox.signed_headers(&account, path_and_query);
    let res = sandbox.service().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "direct sandbox call");
    res.into_body().collect().await.unwrap().to_bytes()
}

/// A response read from a raw TCP exchange.
#[derive(Debug)]
struct RawAnswer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawAnswer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = find(data, b"\r\n") {
        let size_text = std::str::from_utf8(&data[..eol]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&data[start..start + size]);
        data = &data[start + size + 2..];
    }
    out
}

/// Writes `request` as is on a fresh connection (reading concurrently, so an early answer
/// is seen even if the gateway stops reading) and parses the first response.
async fn raw_exchange(gw: &TestGateway, request: Vec<u8>) -> Option<RawAnswer> {
    let stream = tokio::net::TcpStream::connect(gw.gw.local_addr())
        .await
        .unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let write = tokio::spawn(async move {
        // The gateway may answer and close before reading everything: not an error here.
        let _ = writer.write_all(&request).await;
        let _ = writer.flush().await;
        writer
    });
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the gateway closes a Connection: close exchange"
    );
    drop(write.await);
    let head_end = find(&received, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let rest = &received[head_end + 4..];
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        match headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        {
            Some((_, len)) => rest[..len.parse::<usize>().unwrap().min(rest.len())].to_vec(),
            None => rest.to_vec(),
        }
    };
    Some(RawAnswer {
        status,
        headers,
        body,
    })
}

/// `users/me` still works with the demo key: the gateway survived whatever came before.
async fn assert_still_serving(gw: &TestGateway) {
    let answer = gw.get(&gw.model_path("/users/me")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
}

// ---------------------------------------------------------------------------------------------
// 401 INVALID_API_KEY

#[tokio::test]
async fn missing_unknown_malformed_and_revoked_keys_get_401_and_cost_nothing() {
    let gw = start_roomy().await;
    let path = gw.model_path("/users/me");
    let before = gw.balance().await;

    // No key at all.
    let none = gw.send(gw.request(Method::GET, &path, None, None)).await;
    assert_error(&none, 401, "INVALID_API_KEY", INVALID_KEY);
    // No window applies to a caller without a valid key: no quota, nothing to wait for.
    assert_eq!(rate_limit_headers(&none), (0, 0, 0));
    assert!(!none.headers.contains_key("retry-after"));

    // A well-formed key nobody issued.
    let key = gw.key();
    let last = key.chars().last().unwrap();
    let unknown = format!(
        "{}{}",
        &key[..key.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    let answer = gw
        .send(gw.request(Method::GET, &path, Some(&unknown), None))
        .await;
    assert_error(&answer, 401, "INVALID_API_KEY", INVALID_KEY);

    // Malformed keys: wrong prefix, upper case, too short, empty, whitespace around.
    for bad in [
        key.replace("sk_live_", "sk_test_"),
        key.to_uppercase(),
        key[..20].to_owned(),
        String::new(),
        format!("{key}0"),
        "sk_live_".to_owned(),
    ] {
        let answer = send_with(
            &gw,
            Method::GET,
            &path,
            &[("x-api-key", bad.as_bytes())],
            None,
        )
        .await;
        assert_error(&answer, 401, "INVALID_API_KEY", INVALID_KEY);
    }

    // The key sent twice: ambiguous, refused.
    let answer = send_with(
        &gw,
        Method::GET,
        &path,
        &[("x-api-key", key.as_bytes()), ("x-api-key", key.as_bytes())],
        None,
    )
    .await;
    assert_error(&answer, 401, "INVALID_API_KEY", INVALID_KEY);

    assert_eq!(
        sandbox(&gw).requests_received(),
        0,
        "401s never reach upstream"
    );
    assert_eq!(gw.balance().await, before, "401s are not billed");

    // A revoked key: works, then is revoked, then gets the same 401 as an unknown key.
    let org = demo_org(&gw);
    let issued = admin_ok(
        &gw,
        Method::POST,
        &format!("/admin/orgs/{org}/keys"),
        json!({"name": "soon revoked"}),
    )
    .await;
    let second_key = issued["key"].as_str().unwrap();
    let ok = gw
        .send(gw.request(Method::GET, &path, Some(second_key), None))
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let after_use = gw.balance().await;
    assert_eq!(after_use, before.map(|b| b - 1));
    let upstream_before = sandbox(&gw).requests_received();

    let key_id = issued["id"].as_str().unwrap();
    let revoked = admin_ok(
        &gw,
        Method::POST,
        &format!("/admin/keys/{key_id}/revoke"),
        json!({}),
    )
    .await;
    assert_eq!(revoked["status"], "revoked");
    let answer = gw
        .send(gw.request(Method::GET, &path, Some(second_key), None))
        .await;
    assert_error(&answer, 401, "INVALID_API_KEY", INVALID_KEY);
    assert_eq!(
        answer.body, none.body,
        "revoked and missing keys look the same"
    );
    assert_eq!(sandbox(&gw).requests_received(), upstream_before);
    assert_eq!(gw.balance().await, after_use);

    // The demo key is unaffected.
    assert_still_serving(&gw).await;
}

#[tokio::test]
async fn key_sent_as_authorization_gets_401_naming_x_api_key() {
    let gw = start_roomy().await;
    let path = gw.model_path("/users/me");
    let key = gw.key();
    let before = gw.balance().await;
    for value in [format!("Bearer {key}"), key.clone(), format!("Basic {key}")] {
        let answer = send_with(
            &gw,
            Method::GET,
            &path,
            &[("authorization", value.as_bytes())],
            None,
        )
        .await;
        assert_error(&answer, 401, "INVALID_API_KEY", WRONG_HEADER);
    }
    // Also on the gateway's own routes.
    let answer = send_with(
        &gw,
        Method::GET,
        "/api/credits",
        &[("authorization", format!("Bearer {key}").as_bytes())],
        None,
    )
    .await;
    assert_error(&answer, 401, "INVALID_API_KEY", WRONG_HEADER);
    assert_eq!(sandbox(&gw).requests_received(), 0);
    assert_eq!(gw.balance().await, before);
}

#[tokio::test]
async fn another_orgs_model_and_a_nonexistent_model_are_indistinguishable() {
    let gw = start_roomy().await;
    let other_account = sandbox(&gw).add_account();
    let other = new_tenant(&gw, "basic", other_account.session_json()).await;
    let demo_before = gw.balance().await;
    let other_before = org_balance(&gw, &other.org).await;
    assert_eq!(other_before, Some(1_000));

    // The other org's key works on its own model (so the 401s below are about ownership).
    let own = gw
        .send(gw.request(
            Method::GET,
            &format!("/api/models/{}/users/me", other.model),
            Some(&other.key),
            None,
        ))
        .await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.text());
    let other_after_use = org_balance(&gw, &other.org).await;
    assert_eq!(other_after_use, Some(999));
    let upstream = sandbox(&gw).requests_received();

    let foreign = call(
        &gw,
        Method::GET,
        &format!("/api/models/{}/users/me", other.model),
        None,
    )
    .await;
    let missing = call(
        &gw,
        Method::GET,
        &format!("/api/models/{}/users/me", uuid::Uuid::new_v4()),
        None,
    )
    .await;
    assert_error(&foreign, 401, "INVALID_API_KEY", INVALID_KEY);
    assert_error(&missing, 401, "INVALID_API_KEY", INVALID_KEY);
    assert_eq!(foreign.body, missing.body, "no existence oracle");
    let visible = |a: &Answer| {
        let mut names: Vec<(String, Vec<u8>)> = a
            .headers
            .iter()
            .filter(|(n, _)| n.as_str() != "x-request-id" && n.as_str() != "date")
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        names.sort();
        names
    };
    assert_eq!(visible(&foreign), visible(&missing), "same headers too");

    // The other way round, and with a write.
    let answer = gw
        .send(gw.request(
            Method::POST,
            &gw.model_path("/chats/1/messages"),
            Some(&other.key),
            Some(r#"{"text":"hi"}"#),
        ))
        .await;
    assert_error(&answer, 401, "INVALID_API_KEY", INVALID_KEY);

    assert_eq!(sandbox(&gw).requests_received(), upstream);
    assert_eq!(gw.balance().await, demo_before);
    assert_eq!(org_balance(&gw, &other.org).await, other_after_use);
}

// ---------------------------------------------------------------------------------------------
// 402

#[tokio::test]
async fn cancelled_subscription_gets_402_no_subscription() {
    let gw = start_roomy().await;
    let org = demo_org(&gw);
    let cancelled = gw
        .admin(
            Method::DELETE,
            &format!("/admin/orgs/{org}/subscription"),
            None,
        )
        .await;
    assert!(cancelled.status.is_success(), "{}", cancelled.text());
    let before = gw.balance().await;

    for (method, path, body) in [
        (Method::GET, gw.model_path("/users/me"), None),
        (
            Method::POST,
            gw.model_path("/chats/5/messages"),
            Some(r#"{"text":"hi"}"#),
        ),
        (Method::GET, "/api/credits".to_owned(), None),
    ] {
        let answer = call(&gw, method, &path, body).await;
        assert_error(&answer, 402, "NO_SUBSCRIPTION", NO_SUBSCRIPTION);
        assert_eq!(
            rate_limit_headers(&answer),
            (0, 0, 0),
            "no quota without a plan"
        );
    }
    assert_eq!(sandbox(&gw).requests_received(), 0);
    assert_eq!(gw.balance().await, before);

    // Subscribing again restores access with the plan's credits.
    admin_ok(
        &gw,
        Method::PUT,
        &format!("/admin/orgs/{org}/subscription"),
        json!({"plan": "basic"}),
    )
    .await;
    let answer = gw.get(&gw.model_path("/users/me")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["_meta"]["_credits"]["balance"], 999);
}

#[tokio::test]
async fn balance_below_the_cost_gets_402_insufficient_credits() {
    let gw = start_roomy().await;
    let org = demo_org(&gw);
    let set = admin_ok(
        &gw,
        Method::PUT,
        &format!("/admin/orgs/{org}/credits"),
        json!({"balance": 1}),
    )
    .await;
    assert_eq!(set["balance"], 1);

    // Cost-2 routes with 1 credit left.
    let post = call(
        &gw,
        Method::POST,
        &gw.model_path("/chats/5/messages"),
        Some(r#"{"text":"hi"}"#),
    )
    .await;
    assert_error(&post, 402, "INSUFFICIENT_CREDITS", INSUFFICIENT);
    let (limit, _, _) = rate_limit_headers(&post);
    assert_eq!(limit, 60, "rate-limit headers on errors past the window");
    let stats = call(&gw, Method::GET, &gw.model_path("/payouts/stats"), None).await;
    assert_error(&stats, 402, "INSUFFICIENT_CREDITS", INSUFFICIENT);
    assert_eq!(
        sandbox(&gw).requests_received(),
        0,
        "refused before upstream"
    );
    assert_eq!(gw.balance().await, Some(1));

    // A cost-1 route still fits, exactly once.
    let me = gw.get(&gw.model_path("/users/me")).await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.text());
    assert_eq!(
        me.json()["_meta"]["_credits"],
        json!({"used": 1, "balance": 0})
    );
    let again = gw.get(&gw.model_path("/users/me")).await;
    assert_error(&again, 402, "INSUFFICIENT_CREDITS", INSUFFICIENT);
    assert_eq!(sandbox(&gw).requests_received(), 1);
    assert_eq!(gw.balance().await, Some(0), "never below zero");
}

// ---------------------------------------------------------------------------------------------
// 429 RATE_LIMIT_EXCEEDED

#[tokio::test]
async fn eleven_quick_requests_hit_the_burst_of_ten() {
    let mut config = common::test_config();
    config.window = Duration::from_millis(2_000);
    let gw = common::start(config).await;
    let path = gw.model_path("/users/me");

    let answers = join_all((0..11).map(|_| gw.get(&path))).await;
    let ok: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .collect();
    let limited: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(
        (ok.len(), limited.len()),
        (10, 1),
        "statuses: {:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    let refused = limited[0];
    assert_error(refused, 429, "RATE_LIMIT_EXCEEDED", RATE_LIMITED);
    let retry_after: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    let (limit, remaining, _) = rate_limit_headers(refused);
    assert_eq!(limit, 60);
    assert_eq!(
        remaining, 50,
        "ten admitted in the window; the 429 takes nothing"
    );

    // Only admitted requests were forwarded and billed.
    assert_eq!(sandbox(&gw).requests_received(), 10);
    assert_eq!(gw.balance().await, Some(990));
}

#[tokio::test]
async fn the_per_minute_window_refuses_the_61st_and_slides() {
    let mut config = roomy_config();
    config.window = Duration::from_millis(3_000);
    let gw = common::start(config).await;
    let path = gw.model_path("/users/me");

    let mut remaining_seen = Vec::new();
    for _ in 0..6 {
        let batch = join_all((0..10).map(|_| gw.get(&path))).await;
        for answer in &batch {
            assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
            let meta = &answer.json()["_meta"]["_rate_limits"];
            assert_eq!(meta["limit_minute"], 60);
            let remaining = meta["remaining_minute"].as_u64().unwrap();
            assert_eq!(rate_limit_headers(answer).1, remaining);
            remaining_seen.push(remaining);
        }
    }
    remaining_seen.sort_unstable();
    assert_eq!(remaining_seen, (0..60).collect::<Vec<u64>>());

    let refused = gw.get(&path).await;
    assert_error(&refused, 429, "RATE_LIMIT_EXCEEDED", RATE_LIMITED);
    let (limit, remaining, reset) = rate_limit_headers(&refused);
    assert_eq!((limit, remaining), (60, 0));
    assert!(reset <= 3, "RateLimit-Reset {reset}");
    let retry_after: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(sandbox(&gw).requests_received(), 60);
    assert_eq!(gw.balance().await, Some(940));

    // Capacity comes back once the oldest requests leave the window.
    tokio::time::sleep(Duration::from_secs(retry_after) + Duration::from_millis(100)).await;
    let again = gw.get(&path).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    assert_eq!(gw.balance().await, Some(939));
}

// ---------------------------------------------------------------------------------------------
// 502 MODEL_SESSION_EXPIRED and SIGNING_FAILED

#[tokio::test]
async fn expired_session_disconnects_the_model_until_reconnect() {
    let gw = start_roomy().await;
    let org = demo_org(&gw);
    let model = gw.model();
    let account = demo_account(&gw);
    let path = gw.model_path("/users/me");
    let before = gw.balance().await;

    assert!(sandbox(&gw).expire_session(&account.user_id));
    let first = gw.get(&path).await;
    assert_error(&first, 502, "MODEL_SESSION_EXPIRED", SESSION_EXPIRED);
    assert_eq!(
        sandbox(&gw).requests_received(),
        1,
        "the first call asked upstream"
    );
    assert_eq!(model_status(&gw, &org, &model).await, "disconnected");

    // Later calls short-circuit: nothing reaches the upstream.
    let second = gw.get(&gw.model_path("/chats")).await;
    assert_error(&second, 502, "MODEL_SESSION_EXPIRED", SESSION_EXPIRED);
    assert_eq!(sandbox(&gw).requests_received(), 1);
    assert_eq!(gw.balance().await, before, "not billed");

    // Reconnecting with fresh session material restores it.
    let fresh = sandbox(&gw).refresh_session(&account.user_id).unwrap();
    let reconnected = admin_ok(
        &gw,
        Method::POST,
        &format!("/admin/models/{model}/reconnect"),
        json!({"session": fresh.session_json()}),
    )
    .await;
    assert_eq!(
        reconnected,
        json!({"id": model, "name": "Demo Model", "status": "connected"})
    );
    assert_eq!(model_status(&gw, &org, &model).await, "connected");
    let ok = gw.get(&path).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(gw.balance().await, before.map(|b| b - 1));
}

#[tokio::test]
async fn stale_rules_are_a_signing_failure_not_an_expired_session() {
    let gw = start_roomy().await;
    let org = demo_org(&gw);
    let model = gw.model();
    let before = gw.balance().await;

    let current = sandbox_rules();
    let rotated = DynamicRules::new(
        format!("{}-rotated", current.static_param()),
        current.prefix(),
        current.suffix(),
        current.checksum_indexes().iter().rev().copied().collect(),
        current.checksum_constant() + 7,
        current.app_token(),
    )
    .unwrap();
    sandbox(&gw).rotate_rules(rotated);

    for path in ["/users/me", "/payouts/balances"] {
        let answer = gw.get(&gw.model_path(path)).await;
        assert_error(&answer, 502, "SIGNING_FAILED", STALE_SIGNATURE);
    }
    assert_eq!(sandbox(&gw).requests_received(), 2);
    let seen = sandbox(&gw).last_request().unwrap();
    assert_eq!(
        seen.status,
        StatusCode::UNAUTHORIZED,
        "the upstream refused it"
    );
    assert_eq!(model_status(&gw, &org, &model).await, "connected");
    assert_eq!(gw.balance().await, before);

    // Once the gateway's rules match again (here: the upstream rotates back), it works.
    sandbox(&gw).rotate_rules(sandbox_rules());
    assert_still_serving(&gw).await;
}

// ---------------------------------------------------------------------------------------------
// Upstream failures

#[tokio::test]
async fn upstream_throttling_is_429_upstream_rate_limited_with_retry_after() {
    let gw = start_roomy().await;
    let before = gw.balance().await;
    sandbox(&gw).inject(Fault::throttle());
    let answer = gw.get(&gw.model_path("/chats")).await;
    assert_error(&answer, 429, "UPSTREAM_RATE_LIMITED", THROTTLED);
    assert_eq!(
        answer.headers["retry-after"], "30",
        "passed on from upstream"
    );
    assert_eq!(rate_limit_headers(&answer).0, 60);
    assert_eq!(sandbox(&gw).requests_received(), 1);
    assert_eq!(gw.balance().await, before);
}

#[tokio::test]
async fn upstream_5xx_non_json_and_cut_bodies_are_502_upstream_error() {
    let gw = start_roomy().await;
    let before = gw.balance().await;
    let cases = [
        (
            Fault::fail(StatusCode::INTERNAL_SERVER_ERROR),
            UPSTREAM_FAILED,
        ),
        (
            Fault::fail(StatusCode::SERVICE_UNAVAILABLE),
            UPSTREAM_FAILED,
        ),
        (Fault::non_json(), NOT_JSON),
        (Fault::cut_body(), UPSTREAM_FAILED),
    ];
    for (n, (fault, message)) in cases.into_iter().enumerate() {
        let name = format!("{:?}", fault.mode);
        sandbox(&gw).inject(fault);
        let answer = gw.get(&gw.model_path("/payouts/transactions")).await;
        assert_eq!(answer.status.as_u16(), 502, "{name}: {}", answer.text());
        assert_error(&answer, 502, "UPSTREAM_ERROR", message);
        assert_eq!(rate_limit_headers(&answer).0, 60, "{name}");
        assert_eq!(sandbox(&gw).requests_received(), n as u64 + 1, "{name}");
        assert_eq!(gw.balance().await, before, "{name} is not billed");
    }
    assert!(sandbox(&gw).pending_faults().is_empty());
    assert_still_serving(&gw).await;
}

#[tokio::test]
async fn unreachable_upstream_is_502_upstream_error() {
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut config = common::test_config();
    config.upstream = Some(format!("http://127.0.0.1:{closed_port}"));
    // Demo mode needs the in-process sandbox; the tenant comes from the admin API instead.
    config.demo = false;
    let gw = common::start(config).await;
    assert!(gw.gw.sandbox().is_none());
    let tenant = new_tenant(
        &gw,
        "basic",
        json!({
            "cookie": "sess=0123abcd; auth_id=4242",
            "user_id": "4242",
            "x_bc": "device-token",
            "user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
        }),
    )
    .await;
    assert!(!tenant.key_id.is_empty());

    let answer = gw
        .send(gw.request(
            Method::GET,
            &format!("/api/models/{}/users/me", tenant.model),
            Some(&tenant.key),
            None,
        ))
        .await;
    assert_error(&answer, 502, "UPSTREAM_ERROR", UPSTREAM_FAILED);
    assert_eq!(org_balance(&gw, &tenant.org).await, Some(1_000));
    // An unreachable upstream says nothing about the session.
    assert_eq!(
        model_status(&gw, &tenant.org, &tenant.model).await,
        "connected"
    );
}

#[tokio::test]
async fn stalled_upstream_is_504_upstream_timeout() {
    let mut config = roomy_config();
    config.upstream_timeout = Duration::from_millis(300);
    let gw = common::start(config).await;
    let before = gw.balance().await;
    sandbox(&gw).inject(Fault::stall(Duration::from_secs(3)));
    let answer = gw.get(&gw.model_path("/chats")).await;
    assert_error(&answer, 504, "UPSTREAM_TIMEOUT", TIMED_OUT);
    assert_eq!(rate_limit_headers(&answer).0, 60);
    assert_eq!(sandbox(&gw).requests_received(), 1);
    assert_eq!(gw.balance().await, before);
    // The next request (no stall) goes through.
    assert_still_serving(&gw).await;
    assert_eq!(gw.balance().await, before.map(|b| b - 1));
}

#[tokio::test]
async fn other_upstream_4xx_are_upstream_rejected_with_details() {
    let gw = start_roomy().await;
    let before = gw.balance().await;

    let missing = call(
        &gw,
        Method::DELETE,
        &gw.model_path("/messages/9000000001"),
        None,
    )
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND, "{}", missing.text());
    assert_eq!(
        missing.json(),
        json!({
            "error": REJECTED,
            "code": "UPSTREAM_REJECTED",
            "details": {"error": {"code": 0, "message": "Message not found"}},
        })
    );
    assert!(missing.headers.contains_key("x-request-id"));
    assert_eq!(
        sandbox(&gw).last_request().unwrap().path_and_query,
        "/api2/v2/messages/9000000001"
    );

    let chat = gw.get(&gw.model_path("/chats/9000000000/messages")).await;
    assert_eq!(chat.status, StatusCode::NOT_FOUND, "{}", chat.text());
    assert_eq!(
        chat.json(),
        json!({
            "error": REJECTED,
            "code": "UPSTREAM_REJECTED",
            "details": {"error": {"code": 0, "message": "User not found"}},
        })
    );

    sandbox(&gw).inject(Fault::two_factor());
    let otp = gw.get(&gw.model_path("/users/me")).await;
    assert_eq!(otp.status, StatusCode::BAD_REQUEST, "{}", otp.text());
    assert_eq!(
        otp.json(),
        json!({
            "error": REJECTED,
            "code": "UPSTREAM_REJECTED",
            "details": {"error": {
                "code": 101,
                "message": "Please confirm your identity with the code we sent you.",
                "payload": {"otpState": {
                    "type": "sms",
                    "phoneLast4": "0427",
                    "canResend": true,
                    "resendIn": 60,
                }},
            }},
        })
    );
    assert_eq!(otp.headers["content-type"], "application/json");

    assert_eq!(sandbox(&gw).requests_received(), 3);
    assert_eq!(gw.balance().await, before, "upstream 4xx are not billed");
    // A two-factor check is not a dead session.
    assert_eq!(
        model_status(&gw, &demo_org(&gw), &gw.model()).await,
        "connected"
    );
}

// ---------------------------------------------------------------------------------------------
// 404 NOT_FOUND and 413 PAYLOAD_TOO_LARGE

#[tokio::test]
async fn unknown_routes_bad_ids_and_other_methods_are_404_before_auth() {
    let gw = start_roomy().await;
    let before = gw.balance().await;
    let model = gw.model();
    let m = |rest: &str| format!("/api/models/{model}{rest}");
    let cases: Vec<(Method, String)> = vec![
        (Method::GET, "/api/nope".into()),
        (Method::GET, "/api".into()),
        (Method::GET, "/api/".into()),
        (Method::GET, "/nope".into()),
        (Method::GET, "/".into()),
        (Method::GET, m("")),
        (Method::GET, m("/")),
        (Method::GET, m("/users/me/")),
        (Method::GET, m("/users")),
        (Method::GET, m("/unknown")),
        (Method::GET, "/api/models/not-a-uuid/users/me".into()),
        (Method::GET, "/api/models//users/me".into()),
        (Method::GET, m("/chats/abc/messages")),
        (Method::GET, m("/chats/-1/messages")),
        (Method::GET, m("/chats/+1/messages")),
        (Method::GET, m("/chats/1.5/messages")),
        (Method::GET, m("/chats/0x10/messages")),
        (Method::GET, m("/chats/99999999999999999999999/messages")),
        (Method::GET, m("/chats/../messages")),
        (Method::GET, m("/chats/%2e%2e/messages")),
        (Method::GET, m("/chats/%2E%2E/messages")),
        (Method::GET, m("/chats/1%2F2/messages")),
        (Method::GET, m("/chats/1%2f..%2f2/messages")),
        (Method::DELETE, m("/messages/..")),
        (Method::DELETE, m("/messages/%2e%2e%2fusers%2fme")),
        (Method::POST, m("/chats/abc/messages")),
        (Method::POST, m("/users/me")),
        (Method::DELETE, m("/users/me")),
        (Method::PUT, m("/users/me")),
        (Method::PATCH, m("/users/me")),
        (Method::OPTIONS, m("/users/me")),
        (Method::HEAD, m("/chats/abc/messages")),
        (Method::GET, m("/messages/1")),
        (Method::PUT, m("/chats/1/messages")),
        (Method::PATCH, m("/messages/1")),
        (Method::POST, "/api/credits".into()),
        (Method::DELETE, "/api/logs".into()),
        (Method::from_bytes(b"FROB").unwrap(), m("/users/me")),
    ];
    let key = gw.key();
    for (method, path) in cases {
        for with_key in [false, true] {
            let key = with_key.then_some(key.as_str());
            let answer = gw.send(gw.request(method.clone(), &path, key, None)).await;
            if method == Method::HEAD {
                // A HEAD answer has no body; the status and headers still say 404.
                assert_eq!(answer.status, StatusCode::NOT_FOUND, "HEAD {path}");
                assert_eq!(answer.headers["content-type"], "application/json");
                continue;
            }
            assert_eq!(
                answer.status,
                StatusCode::NOT_FOUND,
                "{method} {path} (key: {with_key}): {}",
                answer.text()
            );
            assert_error(&answer, 404, "NOT_FOUND", NO_ROUTE);
        }
    }
    assert_eq!(
        sandbox(&gw).requests_received(),
        0,
        "nothing reached upstream"
    );
    assert_eq!(gw.balance().await, before);
    assert_still_serving(&gw).await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_413_declared_or_chunked() {
    let mut config = roomy_config();
    config.body_limit = 64;
    let gw = common::start(config).await;
    let before = gw.balance().await;
    let path = gw.model_path("/chats/12/messages");

    let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(200));
    let answer = call(&gw, Method::POST, &path, Some(&big)).await;
    assert_error(&answer, 413, "PAYLOAD_TOO_LARGE", TOO_LARGE);

    // One byte over the limit is over.
    let over = format!(r#"{{"text":"{}"}}"#, "y".repeat(65 - 11));
    assert_eq!(over.len(), 65);
    let answer = call(&gw, Method::POST, &path, Some(&over)).await;
    assert_error(&answer, 413, "PAYLOAD_TOO_LARGE", TOO_LARGE);

    // Chunked, without Content-Length: the limit holds while reading.
    let key = gw.key();
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    let pieces = [
        r#"{"text":""#.to_owned(),
        "z".repeat(40),
        "z".repeat(40),
        "\"}".into(),
    ];
    for piece in &pieces {
        raw.extend_from_slice(format!("{:x}\r\n{piece}\r\n", piece.len()).as_bytes());
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(&gw, raw).await.expect("an HTTP answer");
    assert_eq!(
        answer.status,
        413,
        "{:?}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json(), error_body("PAYLOAD_TOO_LARGE", TOO_LARGE));
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert!(answer.header("x-request-id").is_some());

    assert_eq!(sandbox(&gw).requests_received(), 0);
    assert_eq!(gw.balance().await, before);

    // Exactly at the limit is fine, chunked or not.
    let fits = format!(r#"{{"text":"{}"}}"#, "w".repeat(64 - 11));
    assert_eq!(fits.len(), 64);
    let answer = call(&gw, Method::POST, &path, Some(&fits)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(sandbox(&gw).last_request().unwrap().body, fits.as_bytes());
    assert_eq!(gw.balance().await, before.map(|b| b - 2));

    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for piece in [&fits[..30], &fits[30..]] {
        raw.extend_from_slice(format!("{:x}\r\n{piece}\r\n", piece.len()).as_bytes());
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(&gw, raw).await.expect("an HTTP answer");
    assert_eq!(
        answer.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["_meta"]["_credits"]["used"], 2);
    assert_eq!(sandbox(&gw).last_request().unwrap().body, fits.as_bytes());
    assert_eq!(gw.balance().await, before.map(|b| b - 4));
}

// ---------------------------------------------------------------------------------------------
// The envelope and the request id

#[tokio::test]
async fn success_is_the_upstream_body_in_the_envelope_with_headers() {
    let gw = start_roomy().await;
    let path = gw.model_path("/users/me");
    let key = gw.key();
    let answer = send_with(
        &gw,
        Method::GET,
        &path,
        &[
            ("x-api-key", key.as_bytes()),
            ("x-request-id", b"client-req-42"),
        ],
        None,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.headers["content-type"], "application/json");
    assert_eq!(answer.headers["x-request-id"], "client-req-42");
    let (limit, remaining, reset) = rate_limit_headers(&answer);
    assert_eq!((limit, remaining), (60, 59));
    assert!((1..=60).contains(&reset), "RateLimit-Reset {reset}");
    assert!(!answer.headers.contains_key("retry-after"));
    assert!(
        !answer.headers.contains_key("set-cookie"),
        "upstream cookies stay behind"
    );

    let upstream = sandbox_direct(&gw, "/api2/v2/users/me").await;
    let data: Value = serde_json::from_slice(&upstream).unwrap();
    assert_eq!(
        answer.json(),
        json!({
            "data": data,
            "_meta": {
                "_credits": {"used": 1, "balance": 999},
                "_rate_limits": {"limit_minute": 60, "remaining_minute": 59},
            },
        })
    );
    assert!(
        find(&answer.body, &upstream).is_some(),
        "the upstream body is carried byte for byte"
    );

    // Without a client id, or with one that is not usable, a fresh one each time.
    let mut ids = Vec::new();
    for header in [None, Some(&b"has space"[..]), Some(&b""[..])] {
        let mut headers: Vec<(&str, &[u8])> = vec![("x-api-key", key.as_bytes())];
        if let Some(value) = header {
            headers.push(("x-request-id", value));
        }
        let answer = send_with(&gw, Method::GET, &path, &headers, None).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
        let id = answer.headers["x-request-id"].to_str().unwrap().to_owned();
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "generated id {id:?}");
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "ids are unique");
    assert_eq!(gw.balance().await, Some(996));
}

#[tokio::test]
async fn errors_echo_the_request_id_and_carry_rate_limit_headers_past_the_window() {
    let gw = start_roomy().await;
    let key = gw.key();

    // 404 (before auth) and 401.
    let h: &[(&str, &[u8])] = &[("x-request-id", b"id-404")];
    let answer = send_with(&gw, Method::GET, "/api/nope", h, None).await;
    assert_error(&answer, 404, "NOT_FOUND", NO_ROUTE);
    assert_eq!(answer.headers["x-request-id"], "id-404");

    let h: &[(&str, &[u8])] = &[("x-request-id", b"id-401")];
    let answer = send_with(&gw, Method::GET, &gw.model_path("/users/me"), h, None).await;
    assert_error(&answer, 401, "INVALID_API_KEY", INVALID_KEY);
    assert_eq!(answer.headers["x-request-id"], "id-401");

    // An upstream failure: id echoed, rate-limit headers set, the request took capacity.
    sandbox(&gw).inject(Fault::fail(StatusCode::BAD_GATEWAY));
    let answer = send_with(
        &gw,
        Method::GET,
        &gw.model_path("/chats"),
        &[("x-api-key", key.as_bytes()), ("x-request-id", b"id-502")],
        None,
    )
    .await;
    assert_error(&answer, 502, "UPSTREAM_ERROR", UPSTREAM_FAILED);
    assert_eq!(answer.headers["x-request-id"], "id-502");
    let (limit, remaining, reset) = rate_limit_headers(&answer);
    assert_eq!((limit, remaining), (60, 59));
    assert!((1..=60).contains(&reset));

    // A 413 from the proxy, past the window too.
    let mut config = roomy_config();
    config.body_limit = 8;
    let small = common::start(config).await;
    let small_key = small.key();
    let answer = send_with(
        &small,
        Method::POST,
        &small.model_path("/chats/1/messages"),
        &[
            ("x-api-key", small_key.as_bytes()),
            ("x-request-id", b"id-413"),
        ],
        Some(r#"{"text":"too long"}"#),
    )
    .await;
    assert_error(&answer, 413, "PAYLOAD_TOO_LARGE", TOO_LARGE);
    assert_eq!(answer.headers["x-request-id"], "id-413");
    assert_eq!(rate_limit_headers(&answer).0, 60);
}

// ---------------------------------------------------------------------------------------------
// Each route: cost, upstream method, path and query, body

struct RouteCase {
    method: Method,
    /// After `/api/models/<id>`.
    path: &'static str,
    body: Option<&'static str>,
    cost: u64,
    upstream_method: Method,
    /// After `/api2/v2/`.
    upstream: &'static str,
    upstream_body: &'static [u8],
}

#[tokio::test]
async fn every_route_costs_its_price_and_reaches_its_upstream_exactly() {
    let gw = start_roomy().await;
    let key = gw.key();
    let account = demo_account(&gw);
    let g = |path, cost, upstream| RouteCase {
        method: Method::GET,
        path,
        body: None,
        cost,
        upstream_method: Method::GET,
        upstream,
        upstream_body: b"",
    };
    let cases = [
        g("/users/me", 1, "users/me"),
        g("/chats", 1, "chats"),
        g(
            "/chats?limit=2&offset=%20x&b=a%2Fb",
            1,
            "chats?limit=2&offset=%20x&b=a%2Fb",
        ),
        g(
            "/chats/123/messages?limit=5&order=desc&id=77",
            1,
            "chats/123/messages?limit=5&order=desc&id=77",
        ),
        g("/chats/0/messages", 1, "chats/0/messages"),
        RouteCase {
            method: Method::POST,
            path: "/chats/456/messages",
            body: Some(r#"{"text":"hello \u00e9 there","price":0,"mediaFiles":[]}"#),
            cost: 2,
            upstream_method: Method::POST,
            upstream: "chats/456/messages",
            upstream_body: br#"{"text":"hello \u00e9 there","price":0,"mediaFiles":[]}"#,
        },
        RouteCase {
            method: Method::DELETE,
            path: "/messages/789",
            body: None,
            cost: 1,
            upstream_method: Method::DELETE,
            upstream: "messages/789",
            upstream_body: b"{}",
        },
        RouteCase {
            method: Method::DELETE,
            path: "/messages/790",
            body: Some(r#"{"withUserId": 5}"#),
            cost: 1,
            upstream_method: Method::DELETE,
            upstream: "messages/790",
            upstream_body: br#"{"withUserId": 5}"#,
        },
        g("/fans/info", 1, "subscriptions/subscribers?type=active"),
        g(
            "/fans/info?limit=3&offset=%2B1",
            1,
            "subscriptions/subscribers?type=active&limit=3&offset=%2B1",
        ),
        g("/payouts/balances", 1, "payouts/balances"),
        g("/payouts/requests", 1, "payouts/requests"),
        g(
            "/payouts/requests/referral?startDate=2024-01-01&endDate=2024-12-31&marker=",
            1,
            "payouts/requests/referral?startDate=2024-01-01&endDate=2024-12-31&marker=",
        ),
        g(
            "/payouts/transactions?limit=2&marker=abc&startDate=2024-01-01%2000%3A00%3A00",
            1,
            "payouts/transactions?limit=2&marker=abc&startDate=2024-01-01%2000%3A00%3A00",
        ),
        g(
            "/payouts/stats?startDate=2024-01-01&endDate=2024-02-01",
            2,
            "payouts/stats?startDate=2024-01-01&endDate=2024-02-01",
        ),
    ];

    let mut balance = gw.balance().await.unwrap();
    for case in cases {
        let path = gw.model_path(case.path);
        let label = format!("{} {}", case.method, case.path);
        let received_before = sandbox(&gw).requests_received();
        let answer = call(&gw, case.method.clone(), &path, case.body).await;
        assert_eq!(answer.status, StatusCode::OK, "{label}: {}", answer.text());

        // Exactly one upstream request, as the table says.
        assert_eq!(
            sandbox(&gw).requests_received(),
            received_before + 1,
            "{label}"
        );
        let seen = sandbox(&gw).last_request().unwrap();
        assert_eq!(seen.method, case.upstream_method, "{label}");
        assert_eq!(
            seen.path_and_query,
            format!("/api2/v2/{}", case.upstream),
            "{label}"
        );
        assert_eq!(seen.body, case.upstream_body, "{label}: body forwarded");
        assert_eq!(seen.status, StatusCode::OK, "{label}");
        assert!(
            seen.header("x-api-key").is_none(),
            "{label}: the key stays here"
        );
        assert!(
            !seen
                .headers
                .values()
                .any(|v| v.as_bytes() == key.as_bytes()),
            "{label}: the key is nowhere upstream"
        );
        assert_eq!(
            seen.header("user-id"),
            Some(account.user_id.as_str()),
            "{label}"
        );
        for name in ["sign", "time", "app-token", "cookie", "x-bc", "user-agent"] {
            assert!(seen.header(name).is_some(), "{label}: {name} sent");
        }
        if case.upstream_method != Method::GET {
            assert_eq!(
                seen.header("content-type"),
                Some("application/json"),
                "{label}"
            );
        }

        // Its cost, and the envelope reports it.
        balance -= case.cost;
        assert_eq!(
            gw.balance().await,
            Some(balance),
            "{label}: cost {}",
            case.cost
        );
        let json = answer.json();
        assert_eq!(
            json["_meta"]["_credits"],
            json!({"used": case.cost, "balance": balance}),
            "{label}"
        );
        if case.upstream_method == Method::GET {
            let direct = sandbox_direct(&gw, &seen.path_and_query).await;
            let direct: Value = serde_json::from_slice(&direct).unwrap();
            assert_eq!(json["data"], direct, "{label}: data is the upstream body");
        } else if case.method == Method::POST {
            assert_eq!(json["data"]["text"], "hello \u{e9} there", "{label}");
        } else {
            assert_eq!(json["data"], json!({"success": true}), "{label}");
        }
    }

    // The gateway's own routes cost nothing and never go upstream.
    let received = sandbox(&gw).requests_received();
    let credits = gw.get("/api/credits").await;
    assert_eq!(credits.status, StatusCode::OK, "{}", credits.text());
    let credits = credits.json();
    assert_eq!(credits["plan"], "basic");
    assert_eq!(credits["balance"], balance);
    assert_eq!(credits["plan_credits"], balance);
    assert_eq!(credits["topup_credits"], 0);
    assert!(credits["period_end"].is_string());
    let logs = gw.get("/api/logs").await;
    assert_eq!(logs.status, StatusCode::OK, "{}", logs.text());
    assert_eq!(sandbox(&gw).requests_received(), received);
    assert_eq!(gw.balance().await, Some(balance));
}

// ---------------------------------------------------------------------------------------------
// Bad input

#[tokio::test]
async fn oversized_headers_are_refused_with_4xx_and_the_gateway_keeps_serving() {
    let gw = start_roomy().await;
    let key = gw.key();
    let path = gw.model_path("/users/me");

    // 40 KB: over the gateway's own header budget, under hyper's buffer: a JSON 4xx.
    let junk = "a".repeat(40 * 1024);
    let answer = send_with(
        &gw,
        Method::GET,
        &path,
        &[("x-api-key", key.as_bytes()), ("x-junk", junk.as_bytes())],
        None,
    )
    .await;
    assert_eq!(answer.status.as_u16(), 431, "{}", answer.text());
    assert_eq!(
        answer.json(),
        error_body("INVALID_REQUEST", HEADERS_TOO_LARGE)
    );

    // ~300 KB: hyper refuses it itself.
    let huge = "b".repeat(300 * 1024);
    let raw = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nX-Junk: {huge}\r\n\
         Connection: close\r\n\r\n"
    );
    let answer = raw_exchange(&gw, raw.into_bytes())
        .await
        .expect("an HTTP answer, not a dropped connection");
    assert!(
        (400..500).contains(&answer.status),
        "status {}",
        answer.status
    );

    // 10 KB key and non-UTF-8 key bytes: plain 401s.
    let long_key = format!("sk_live_{}", "a".repeat(10 * 1024));
    let answer = send_with(
        &gw,
        Method::GET,
        &path,
        &[("x-api-key", long_key.as_bytes())],
        None,
    )
    .await;
    assert_error(&answer, 401, "INVALID_API_KEY", INVALID_KEY);
    let mut binary = b"sk_live_".to_vec();
    binary.extend_from_slice(&[0xff, 0xfe, 0x80, 0xc3, 0x28]);
    binary.extend_from_slice(&key.as_bytes()[13..]);
    let answer = send_with(&gw, Method::GET, &path, &[("x-api-key", &binary)], None).await;
    assert_error(&answer, 401, "INVALID_API_KEY", INVALID_KEY);
    let answer = send_with(&gw, Method::GET, &path, &[("authorization", &binary)], None).await;
    assert_error(&answer, 401, "INVALID_API_KEY", WRONG_HEADER);

    assert_eq!(sandbox(&gw).requests_received(), 0);
    assert_eq!(gw.balance().await, Some(1_000));
    assert_still_serving(&gw).await;
}

#[tokio::test]
async fn a_40_kb_header_gets_a_json_431_with_a_request_id() {
    let gw = start_roomy().await;
    let key = gw.key();
    let junk = "a".repeat(40 * 1024);
    for path in ["/healthz".to_owned(), gw.model_path("/users/me")] {
        let answer = send_with(
            &gw,
            Method::GET,
            &path,
            &[
                ("x-api-key", key.as_bytes()),
                ("x-request-id", b"big-headers-1"),
                ("x-junk", junk.as_bytes()),
            ],
            None,
        )
        .await;
        assert_eq!(answer.status.as_u16(), 431, "{path}: {}", answer.text());
        assert_eq!(
            answer.json(),
            error_body("INVALID_REQUEST", HEADERS_TOO_LARGE),
            "{path}"
        );
        assert_eq!(
            answer.headers.get("x-request-id").map(|v| v.as_bytes()),
            Some(&b"big-headers-1"[..]),
            "{path}: every response carries X-Request-Id"
        );
    }
    assert_eq!(sandbox(&gw).requests_received(), 0);
    assert_eq!(gw.balance().await, Some(1_000));
}

#[tokio::test]
async fn raw_paths_with_dot_segments_and_encoded_slashes_match_nothing() {
    let gw = start_roomy().await;
    let key = gw.key();
    let model = gw.model();
    for path in [
        format!("/api/models/{model}/chats/../messages"),
        format!("/api/models/{model}/chats/1/../../users/me"),
        format!("/api/models/{model}/chats/%2e%2e/messages"),
        format!("/api/models/{model}/chats/.%2e/messages"),
        format!("/api/models/{model}/chats/12%2F34/messages"),
        format!("/api/models/{model}/users%2Fme"),
        format!("/api/models/{model}/./users/me"),
        format!("/api/models/{model}//users/me"),
        format!("/api/models/{model}/users/me%00"),
    ] {
        let raw = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n"
        );
        let answer = raw_exchange(&gw, raw.into_bytes())
            .await
            .unwrap_or_else(|| panic!("{path}: no answer"));
        assert_eq!(
            answer.status,
            404,
            "{path}: {:?}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.json(), error_body("NOT_FOUND", NO_ROUTE), "{path}");
    }
    assert_eq!(sandbox(&gw).requests_received(), 0);
    assert_eq!(gw.balance().await, Some(1_000));
    assert_still_serving(&gw).await;
}

#[tokio::test]
async fn invalid_json_bodies_are_400_invalid_request_and_not_billed() {
    let gw = start_roomy().await;
    let path = gw.model_path("/chats/7/messages");
    for body in [
        "{not json",
        r#"{"text": "unterminated"#,
        "text=hello",
        "\u{feff}garbage",
        r#"{"text":"hi"} trailing"#,
    ] {
        let answer = call(&gw, Method::POST, &path, Some(body)).await;
        assert_error(&answer, 400, "INVALID_REQUEST", BODY_NOT_JSON);
    }
    let answer = call(
        &gw,
        Method::DELETE,
        &gw.model_path("/messages/5"),
        Some("{{{"),
    )
    .await;
    assert_error(&answer, 400, "INVALID_REQUEST", BODY_NOT_JSON);
    assert_eq!(sandbox(&gw).requests_received(), 0);
    assert_eq!(gw.balance().await, Some(1_000));
}

#[tokio::test]
async fn bad_log_export_parameters_are_400() {
    let gw = start_roomy().await;
    let cases = [
        (
            "from=yesterday",
            "`from` must be an RFC 3339 time or milliseconds since the epoch.",
        ),
        (
            "to=-5",
            "`to` must be an RFC 3339 time or milliseconds since the epoch.",
        ),
        ("model=nope", "`model` must be a model id (UUID)."),
        ("status=abc", "`status` must be an HTTP status code."),
        ("status=999", "`status` must be an HTTP status code."),
        ("format=xml", "`format` must be ndjson or csv."),
        (
            "cursor=garbage",
            "`cursor` is not a cursor this API gave out.",
        ),
        ("limit=0", "`limit` must be between 1 and 10000."),
        ("limit=10001", "`limit` must be between 1 and 10000."),
        ("unknown=1", "Unknown parameter `unknown`."),
        ("from=%zz", "The query string is not valid."),
        ("from=%ff%fe", "The query string is not valid."),
    ];
    for (query, message) in cases {
        let answer = gw.get(&format!("/api/logs?{query}")).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{query}: {}",
            answer.text()
        );
        assert_error(&answer, 400, "INVALID_REQUEST", message);
    }
    // Good parameters still work, and none of this cost anything.
    let ok = gw
        .get(&format!(
            "/api/logs?format=csv&status=400&model={}",
            gw.model()
        ))
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(sandbox(&gw).requests_received(), 0);
    assert_eq!(gw.balance().await, Some(1_000));
}

// ---------------------------------------------------------------------------------------------
// More of the contract: unlimited plans, exact credits under concurrency, `Wrong user.`, and
// what a scripted upstream can say that the sandbox cannot.

#[tokio::test]
async fn unlimited_plans_report_a_null_balance() {
    let gw = start_roomy().await;
    let org = demo_org(&gw);
    admin_ok(
        &gw,
        Method::PUT,
        &format!("/admin/orgs/{org}/subscription"),
        json!({"plan": "enterprise"}),
    )
    .await;
    let answer = gw.get(&gw.model_path("/payouts/stats")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(
        answer.json()["_meta"],
        json!({
            "_credits": {"used": 2, "balance": null},
            "_rate_limits": {"limit_minute": 9_999, "remaining_minute": 9_998},
        })
    );
    assert_eq!(rate_limit_headers(&answer).0, 9_999);
    assert_eq!(gw.balance().await, None, "unlimited");
}

#[tokio::test]
async fn concurrent_requests_never_spend_more_than_the_balance() {
    let gw = start_roomy().await;
    let org = demo_org(&gw);
    admin_ok(
        &gw,
        Method::PUT,
        &format!("/admin/orgs/{org}/credits"),
        json!({"balance": 5}),
    )
    .await;
    let path = gw.model_path("/payouts/balances");
    let answers = join_all((0..20).map(|_| gw.get(&path))).await;
    let ok = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .count();
    for refused in answers.iter().filter(|a| a.status != StatusCode::OK) {
        assert_error(refused, 402, "INSUFFICIENT_CREDITS", INSUFFICIENT);
    }
    assert_eq!(ok, 5, "exactly the balance's worth is served");
    let mut balances: Vec<u64> = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .map(|a| a.json()["_meta"]["_credits"]["balance"].as_u64().unwrap())
        .collect();
    balances.sort_unstable();
    assert_eq!(balances, [0, 1, 2, 3, 4]);
    assert_eq!(sandbox(&gw).requests_received(), 5);
    assert_eq!(gw.balance().await, Some(0));
}

#[tokio::test]
async fn wrong_user_from_upstream_disconnects_the_model() {
    let gw = start_roomy().await;
    let org = demo_org(&gw);
    let model = gw.model();
    let account = demo_account(&gw);
    let before = gw.balance().await;

    // Session material from another device: the upstream answers 400 code 301 `Wrong user.`.
    let mut session = account.session_json();
    session["x_bc"] = json!("a-different-device-token");
    admin_ok(
        &gw,
        Method::POST,
        &format!("/admin/models/{model}/reconnect"),
        json!({ "session": session }),
    )
    .await;
    let answer = gw.get(&gw.model_path("/users/me")).await;
    assert_error(&answer, 502, "MODEL_SESSION_EXPIRED", SESSION_EXPIRED);
    let seen = sandbox(&gw).last_request().unwrap();
    assert_eq!(seen.status, StatusCode::BAD_REQUEST);
    assert_eq!(model_status(&gw, &org, &model).await, "disconnected");
    assert_eq!(gw.balance().await, before);
}

#[tokio::test]
async fn headers_of_the_client_are_not_forwarded_upstream() {
    let gw = start_roomy().await;
    let key = gw.key();
    let account = demo_account(&gw);
    let answer = send_with(
        &gw,
        Method::POST,
        &gw.model_path("/chats/3/messages"),
        &[
            ("x-api-key", key.as_bytes()),
            ("authorization", b"Bearer client-secret"),
            ("cookie", b"sess=client-cookie"),
            ("user-agent", b"curl/8.0"),
            ("x-custom", b"client-value"),
            ("content-type", b"text/plain"),
        ],
        Some(r#"{"text":"hi"}"#),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let seen = sandbox(&gw).last_request().unwrap();
    assert_eq!(seen.header("cookie"), Some(account.cookie.as_str()));
    assert_eq!(seen.header("user-agent"), Some(account.user_agent.as_str()));
    assert_eq!(seen.header("content-type"), Some("application/json"));
    for name in ["x-api-key", "authorization", "x-custom"] {
        assert!(seen.header(name).is_none(), "{name} forwarded");
    }
    assert_eq!(seen.body, br#"{"text":"hi"}"#.as_slice());
}

/// A scripted upstream: answers requests with the queued responses, in order.
struct ScriptedUpstream {
    base_url: String,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _server: tokio::task::JoinHandle<()>,
}

type Scripted = (u16, Vec<(&'static str, &'static str)>, &'static str);

async fn scripted_upstream(script: Vec<Scripted>) -> ScriptedUpstream {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}", listener.local_addr().unwrap());
    let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script)));
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let script = Arc::clone(&script);
            let counter = Arc::clone(&counter);
            let service =
                hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let next = script.lock().unwrap().pop_front();
                    let (status, headers, body) =
                        next.unwrap_or((500, vec![], r#"{"error":"script exhausted"}"#));
                    let mut res =
                        http::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    *res.status_mut() = StatusCode::from_u16(status).unwrap();
                    for (name, value) in headers {
                        res.headers_mut()
                            .insert(name, HeaderValue::from_static(value));
                    }
                    async move { Ok::<_, std::convert::Infallible>(res) }
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    ScriptedUpstream {
        base_url,
        hits,
        _server: server,
    }
}

#[tokio::test]
async fn scripted_upstream_answers_map_to_the_contract() {
    const JSON: (&str, &str) = ("content-type", "application/json");
    let upstream = scripted_upstream(vec![
        (
            200,
            vec![("content-type", "application/json; charset=utf-8")],
            r#"{"id":1,"name":"ok"}"#,
        ),
        (
            429,
            vec![JSON],
            r#"{"error":{"code":429,"message":"Slow down"}}"#,
        ),
        (
            422,
            vec![("content-type", "text/plain")],
            "unprocessable, says the upstream",
        ),
        (302, vec![("location", "/login")], ""),
        (
            403,
            vec![JSON],
            r#"{"error":{"code":0,"message":"Access denied."}}"#,
        ),
    ])
    .await;
    let mut config = roomy_config();
    config.upstream = Some(upstream.base_url.clone());
    config.demo = false;
    let gw = common::start(config).await;
    let tenant = new_tenant(
        &gw,
        "basic",
        json!({
            "cookie": "sess=abc; auth_id=77",
            "user_id": "77",
            "x_bc": "device",
            "user_agent": "Mozilla/5.0",
        }),
    )
    .await;
    let path = format!("/api/models/{}/users/me", tenant.model);
    let get = || gw.send(gw.request(Method::GET, &path, Some(&tenant.key), None));

    // JSON with parameters in its content type is JSON.
    let answer = get().await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["data"], json!({"id": 1, "name": "ok"}));
    assert_eq!(org_balance(&gw, &tenant.org).await, Some(999));

    // Throttled without a Retry-After: none is made up.
    let answer = get().await;
    assert_error(&answer, 429, "UPSTREAM_RATE_LIMITED", THROTTLED);
    assert!(!answer.headers.contains_key("retry-after"));

    // Another 4xx with a text body: the status is kept, the text is the details.
    let answer = get().await;
    assert_eq!(answer.status.as_u16(), 422, "{}", answer.text());
    assert_eq!(
        answer.json(),
        json!({
            "error": REJECTED,
            "code": "UPSTREAM_REJECTED",
            "details": "unprocessable, says the upstream",
        })
    );

    // A redirect (to a login page) is not an answer.
    let answer = get().await;
    assert_error(&answer, 502, "UPSTREAM_ERROR", UPSTREAM_FAILED);

    // 403 `Access denied.`: the session is dead.
    let answer = get().await;
    assert_error(&answer, 502, "MODEL_SESSION_EXPIRED", SESSION_EXPIRED);
    assert_eq!(
        model_status(&gw, &tenant.org, &tenant.model).await,
        "disconnected"
    );
    let answer = get().await;
    assert_error(&answer, 502, "MODEL_SESSION_EXPIRED", SESSION_EXPIRED);
    assert_eq!(
        upstream.hits.load(std::sync::atomic::Ordering::SeqCst),
        5,
        "the last call short-circuited"
    );
    assert_eq!(
        org_balance(&gw, &tenant.org).await,
        Some(999),
        "only the 200 was billed"
    );
}

#[tokio::test]
async fn an_upstream_retry_after_date_is_passed_on() {
    let upstream = scripted_upstream(vec![(
        429,
        vec![
            ("content-type", "application/json"),
            ("retry-after", "Wed, 21 Oct 2037 07:28:00 GMT"),
        ],
        r#"{"error":{"code":429,"message":"Too many requests."}}"#,
    )])
    .await;
    let mut config = roomy_config();
    config.upstream = Some(upstream.base_url.clone());
    config.demo = false;
    let gw = common::start(config).await;
    let tenant = new_tenant(
        &gw,
        "basic",
        json!({
            "cookie": "sess=abc; auth_id=77",
            "user_id": "77",
            "x_bc": "device",
            "user_agent": "Mozilla/5.0",
        }),
    )
    .await;
    let answer = gw
        .send(gw.request(
            Method::GET,
            &format!("/api/models/{}/chats", tenant.model),
            Some(&tenant.key),
            None,
        ))
        .await;
    assert_error(&answer, 429, "UPSTREAM_RATE_LIMITED", THROTTLED);
    assert_eq!(
        answer.headers.get("retry-after").map(|v| v.as_bytes()),
        Some(&b"Wed, 21 Oct 2037 07:28:00 GMT"[..]),
        "SPEC §2: Retry-After passed on when known"
    );
    assert_eq!(org_balance(&gw, &tenant.org).await, Some(1_000));
}
