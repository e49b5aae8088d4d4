//! The sandbox upstream over real sockets: a hyper client against `Sandbox::bind("127.0.0.1:0")`.
#![cfg(feature = "sandbox")]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tollgate::core::{Clock, ManualClock, SystemClock};
use tollgate::sandbox::{
    sandbox_rules, DynamicRules, Fault, FaultMode, FaultScope, Sandbox, SandboxAccount,
    SandboxServer,
};
use tower::ServiceExt;

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            )
        })
    }

    fn content_type(&self) -> &str {
        self.headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    #[track_caller]
    fn assert_upstream_error(&self, status: StatusCode, code: i64, message: &str) {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(
            self.json(),
            json!({"error": {"code": code, "message": message}})
        );
    }
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Conn { sender }
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> Answer {
        self.sender.ready().await.unwrap();
        let res = self.sender.send_request(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }
}

struct Setup {
    sandbox: Sandbox,
    account: SandboxAccount,
    server: SandboxServer,
}

impl Setup {
    async fn new() -> Setup {
        Self::with_sandbox(Sandbox::new(sandbox_rules())).await
    }

    async fn with_sandbox(sandbox: Sandbox) -> Setup {
        let account = sandbox.add_account();
        let server = sandbox.bind("127.0.0.1:0").await.unwrap();
        Setup {
            sandbox,
            account,
            server,
        }
    }

    async fn conn(&self) -> Conn {
        Conn::open(self.server.local_addr()).await
    }

    /// A correctly signed request for `account`.
    fn request_as(
        &self,
        account: &SandboxAccount,
        method: Method,
        path_and_query: &str,
        body: Option<Value>,
    ) -> Request<Full<Bytes>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header("host", self.server.local_addr().to_string());
        for (name, value) in &self.sandbox.signed_headers(account, path_and_query) {
            builder = builder.header(name, value);
        }
        let body = match body {
            Some(value) => {
                builder = builder.header(CONTENT_TYPE, "application/json");
                Bytes::from(value.to_string())
            }
            None => Bytes::new(),
        };
        builder.body(Full::new(body)).unwrap()
    }

    fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Value>,
    ) -> Request<Full<Bytes>> {
        self.request_as(&self.account, method, path_and_query, body)
    }

    fn get(&self, path_and_query: &str) -> Request<Full<Bytes>> {
        self.request(Method::GET, path_and_query, None)
    }

    /// One request on a fresh connection.
    async fn send(&self, req: Request<Full<Bytes>>) -> Answer {
        self.conn().await.send(req).await
    }
}

/// Re-signs a request for the `user-id` header it now carries (so a test can change
/// `user-id` and still pass the signature check).
fn resign(rules: &DynamicRules, req: &mut Request<Full<Bytes>>) {
    let pq = req.uri().path_and_query().unwrap().as_str().to_owned();
    let user = req.headers()["user-id"].to_str().unwrap().to_owned();
    let sig = rules.sign_at(&pq, &user, SystemClock.now_ms());
    let headers = req.headers_mut();
    headers.insert("sign", HeaderValue::from_str(&sig.sign).unwrap());
    headers.insert("time", HeaderValue::from_str(&sig.time).unwrap());
}

fn other_rules() -> DynamicRules {
    DynamicRules::new(
        "SandboxRotatedStaticParam0000001",
        "1234",
        "abcdef01",
        vec![
            1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 33, 35, 37, 39,
        ],
        -77,
        "rotated-app-token-000000000000000",
    )
    .unwrap()
}

#[tokio::test]
async fn every_endpoint_answers_a_signed_request_with_json_of_its_shape() {
    let s = Setup::new().await;
    let user_id: u64 = s.account.user_id.parse().unwrap();
    let mut conn = s.conn().await;

    let me = conn.send(s.get("/api2/v2/users/me")).await;
    assert_eq!(me.status, StatusCode::OK);
    assert!(me.content_type().starts_with("application/json"));
    let me = me.json();
    assert_eq!(me["id"], json!(user_id));
    assert_eq!(me["username"], json!(s.account.username));
    assert_eq!(me["isAuth"], json!(true));
    assert!(me["name"].is_string() && me["subscribersCount"].is_u64());

    let chats = conn
        .send(s.get("/api2/v2/chats?limit=5&offset=0&order=recent&skip_users=all"))
        .await;
    assert_eq!(chats.status, StatusCode::OK);
    let chats = chats.json();
    let list = chats["list"].as_array().unwrap();
    assert_eq!(list.len(), 5);
    assert!(chats["hasMore"].is_boolean());
    for chat in list {
        assert!(chat["withUser"]["id"].is_u64());
        assert!(chat["lastMessage"]["id"].is_u64());
        assert!(chat["lastMessage"]["text"].is_string());
        assert!(chat["unreadMessagesCount"].is_u64());
    }
    let chat_id = list[0]["withUser"]["id"].as_u64().unwrap();

    let messages = conn
        .send(s.get(&format!(
            "/api2/v2/chats/{chat_id}/messages?limit=3&order=desc"
        )))
        .await;
    assert_eq!(messages.status, StatusCode::OK);
    let messages = messages.json();
    let list = messages["list"].as_array().unwrap();
    assert_eq!(list.len(), 3);
    assert!(messages["hasMore"].is_boolean());
    assert!(
        list[0]["id"].as_u64() > list[1]["id"].as_u64(),
        "newest first"
    );
    assert!(list[0]["fromUser"]["id"].is_u64() && list[0]["createdAt"].is_string());

    let sent = conn
        .send(s.request(
            Method::POST,
            &format!("/api2/v2/chats/{chat_id}/messages"),
            Some(json!({"text": "hello from the gateway", "price": 0, "mediaFiles": [], "previews": [], "lockedText": false})),
        ))
        .await;
    assert_eq!(sent.status, StatusCode::OK);
    let sent = sent.json();
    assert_eq!(sent["text"], "hello from the gateway");
    assert_eq!(sent["fromUser"]["id"], json!(user_id));
    assert_eq!(sent["isFree"], true);
    assert!(sent["id"].is_u64());

    let deleted = conn
        .send(s.request(
            Method::DELETE,
            &format!("/api2/v2/messages/{}", sent["id"]),
            Some(json!({"withUserId": chat_id})),
        ))
        .await;
    assert_eq!(deleted.status, StatusCode::OK);
    assert_eq!(deleted.json(), json!({"success": true}));

    let fans = conn
        .send(s.get("/api2/v2/subscriptions/subscribers?type=active&limit=4&offset=0"))
        .await;
    assert_eq!(fans.status, StatusCode::OK);
    let fans = fans.json();
    let fans = fans.as_array().unwrap();
    assert_eq!(fans.len(), 4);
    for fan in fans {
        assert!(fan["id"].is_u64() && fan["username"].is_string());
        assert_eq!(fan["subscribedOn"], true);
        assert!(fan["subscribedOnData"]["subscribeAt"].is_string());
    }

    let balances = conn.send(s.get("/api2/v2/payouts/balances")).await;
    assert_eq!(balances.status, StatusCode::OK);
    let balances = balances.json();
    assert_eq!(balances["currency"], "USD");
    assert!(balances["minPayoutSumm"].is_number());
    assert!(balances["payoutAvailable"].is_boolean() && balances["payoutPending"].is_boolean());

    for pq in [
        "/api2/v2/payouts/requests",
        "/api2/v2/payouts/requests/referral?startDate=2020-01-01&endDate=2025-02-01&marker=",
    ] {
        let answer = conn.send(s.get(pq)).await;
        assert_eq!(answer.status, StatusCode::OK, "{pq}");
        let page = answer.json();
        assert!(page.get("marker").is_some(), "{pq}");
        for item in page["list"].as_array().unwrap() {
            for field in ["amount", "createdAt", "currency", "invoiceId", "state"] {
                assert!(item.get(field).is_some(), "{pq}: {field} missing in {item}");
            }
        }
    }

    let transactions = conn
        .send(s.get("/api2/v2/payouts/transactions?limit=5&startDate=2020-01-01"))
        .await;
    assert_eq!(transactions.status, StatusCode::OK);
    let transactions = transactions.json();
    let list = transactions["list"].as_array().unwrap();
    assert_eq!(list.len(), 5);
    for t in list {
        for field in ["id", "amount", "net", "fee", "status", "createdAt", "user"] {
            assert!(t.get(field).is_some(), "{field} missing in {t}");
        }
    }
    assert_eq!(transactions["hasMore"], true);
    assert!(transactions["nextMarker"].is_i64());

    let stats = conn
        .send(s.get("/api2/v2/payouts/stats?startDate=2024-01-01&endDate=2025-02-01"))
        .await;
    assert_eq!(stats.status, StatusCode::OK);
    let stats = stats.json();
    assert!(stats["total"]["gross"].is_number() && stats["total"]["net"].is_number());
    assert_eq!(stats["currency"], "USD");
}

#[tokio::test]
async fn answers_are_deterministic_per_account_and_pages_follow_limit_and_offset() {
    let s = Setup::new().await;
    let other = s.sandbox.add_account();
    let mut conn = s.conn().await;
    let a1 = conn.send(s.get("/api2/v2/payouts/balances")).await.json();
    let a2 = conn.send(s.get("/api2/v2/payouts/balances")).await.json();
    assert_eq!(a1, a2);
    let b = conn
        .send(s.request_as(&other, Method::GET, "/api2/v2/users/me", None))
        .await
        .json();
    assert_eq!(b["id"], json!(other.user_id.parse::<u64>().unwrap()));

    let all = conn
        .send(s.get("/api2/v2/subscriptions/subscribers?type=active&limit=6"))
        .await
        .json();
    let second = conn
        .send(s.get("/api2/v2/subscriptions/subscribers?type=active&limit=3&offset=3"))
        .await
        .json();
    assert_eq!(all.as_array().unwrap()[3..], second.as_array().unwrap()[..]);

    let missing_type = conn
        .send(s.get("/api2/v2/subscriptions/subscribers?limit=3"))
        .await;
    assert_eq!(missing_type.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn unknown_paths_and_ids_get_upstream_style_404s() {
    let s = Setup::new().await;
    let mut conn = s.conn().await;
    conn.send(s.get("/api2/v2/nope"))
        .await
        .assert_upstream_error(StatusCode::NOT_FOUND, 0, "Not found.");
    conn.send(s.get("/api2/v2/chats/abc/messages"))
        .await
        .assert_upstream_error(StatusCode::NOT_FOUND, 0, "Not found.");
    conn.send(s.request(
        Method::DELETE,
        "/api2/v2/messages/9000000000",
        Some(json!({})),
    ))
    .await
    .assert_upstream_error(StatusCode::NOT_FOUND, 0, "Message not found");
    let ok = conn
        .send(s.request(
            Method::DELETE,
            "/api2/v2/messages/8999999999",
            Some(json!({})),
        ))
        .await;
    assert_eq!(ok.status, StatusCode::OK);
}

#[tokio::test]
async fn bad_or_stale_signatures_get_please_refresh_the_page() {
    let s = Setup::new().await;
    let rules = sandbox_rules();
    let mut conn = s.conn().await;

    let mut wrong = s.get("/api2/v2/users/me");
    wrong
        .headers_mut()
        .insert("sign", HeaderValue::from_static("40089:0000:1:68013327"));
    conn.send(wrong).await.assert_upstream_error(
        StatusCode::UNAUTHORIZED,
        401,
        "Please refresh the page",
    );

    for header in ["sign", "time", "app-token"] {
        let mut missing = s.get("/api2/v2/users/me");
        missing.headers_mut().remove(header);
        conn.send(missing).await.assert_upstream_error(
            StatusCode::UNAUTHORIZED,
            401,
            "Please refresh the page",
        );
    }

    let mut token = s.get("/api2/v2/users/me");
    token
        .headers_mut()
        .insert("app-token", HeaderValue::from_static("not-the-token"));
    assert_eq!(conn.send(token).await.status, StatusCode::UNAUTHORIZED);

    // Signed for another query than the one sent.
    let mut other_query = s.get("/api2/v2/chats?limit=10");
    *other_query.uri_mut() = "/api2/v2/chats?limit=11".parse().unwrap();
    assert_eq!(
        conn.send(other_query).await.status,
        StatusCode::UNAUTHORIZED
    );

    // The raw query is signed, percent-encoding kept: a signature over the decoded form fails.
    let raw = "/api2/v2/payouts/stats?startDate=2024-01-01%2000%3A00%3A00";
    assert_eq!(conn.send(s.get(raw)).await.status, StatusCode::OK);
    let over_decoded = rules.sign_at(
        "/api2/v2/payouts/stats?startDate=2024-01-01 00:00:00",
        &s.account.user_id,
        SystemClock.now_ms(),
    );
    let mut decoded = s.get(raw);
    decoded
        .headers_mut()
        .insert("sign", HeaderValue::from_str(&over_decoded.sign).unwrap());
    decoded
        .headers_mut()
        .insert("time", HeaderValue::from_str(&over_decoded.time).unwrap());
    assert_eq!(conn.send(decoded).await.status, StatusCode::UNAUTHORIZED);

    // A correct signature made 10 minutes ago is stale.
    let pq = "/api2/v2/users/me";
    let old = rules.sign_at(pq, &s.account.user_id, SystemClock.now_ms() - 600_000);
    let mut stale = s.get(pq);
    stale
        .headers_mut()
        .insert("time", HeaderValue::from_str(&old.time).unwrap());
    stale
        .headers_mut()
        .insert("sign", HeaderValue::from_str(&old.sign).unwrap());
    conn.send(stale).await.assert_upstream_error(
        StatusCode::UNAUTHORIZED,
        401,
        "Please refresh the page",
    );
    // Nothing above consumed a fault or produced data, but every request was counted.
    assert_eq!(s.sandbox.requests_to("/api2/v2/users/me"), 6);
}

#[tokio::test]
async fn expired_or_unknown_sessions_get_access_denied() {
    let s = Setup::new().await;
    let mut conn = s.conn().await;
    assert_eq!(
        conn.send(s.get("/api2/v2/users/me")).await.status,
        StatusCode::OK
    );

    assert!(s.sandbox.expire_session(&s.account.user_id));
    assert!(!s.sandbox.is_session_live(&s.account.user_id));
    conn.send(s.get("/api2/v2/users/me"))
        .await
        .assert_upstream_error(StatusCode::UNAUTHORIZED, 401, "Access denied.");
    assert!(!s.sandbox.expire_session("1"));

    // Logging in again issues a new cookie; the old one stays dead.
    let renewed = s.sandbox.refresh_session(&s.account.user_id).unwrap();
    assert_ne!(renewed.cookie, s.account.cookie);
    assert_eq!(renewed.x_bc, s.account.x_bc);
    assert_eq!(
        conn.send(s.request_as(&renewed, Method::GET, "/api2/v2/users/me", None))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        conn.send(s.get("/api2/v2/users/me")).await.status,
        StatusCode::UNAUTHORIZED
    );

    // A cookie without `sess`, or an account the upstream never saw.
    let mut no_sess = s.request_as(&renewed, Method::GET, "/api2/v2/users/me", None);
    let auth_only = format!("auth_id={}", renewed.user_id);
    no_sess
        .headers_mut()
        .insert("cookie", HeaderValue::from_str(&auth_only).unwrap());
    conn.send(no_sess)
        .await
        .assert_upstream_error(StatusCode::UNAUTHORIZED, 401, "Access denied.");
    let stranger = SandboxAccount {
        user_id: "123".into(),
        username: "u123".into(),
        cookie: "sess=abc; auth_id=123".into(),
        ..renewed.clone()
    };
    conn.send(s.request_as(&stranger, Method::GET, "/api2/v2/users/me", None))
        .await
        .assert_upstream_error(StatusCode::UNAUTHORIZED, 401, "Access denied.");
}

#[tokio::test]
async fn sessions_end_after_their_lifetime() {
    let clock = ManualClock::new(SystemClock.now_ms());
    let sandbox = Sandbox::with_clock(sandbox_rules(), clock.clone());
    sandbox.set_session_ttl(Duration::from_secs(3_600));
    let s = Setup::with_sandbox(sandbox).await;
    let mut conn = s.conn().await;
    clock.advance(Duration::from_secs(3_599));
    assert_eq!(
        conn.send(s.get("/api2/v2/users/me")).await.status,
        StatusCode::OK
    );
    clock.advance(Duration::from_secs(1));
    conn.send(s.get("/api2/v2/users/me"))
        .await
        .assert_upstream_error(StatusCode::UNAUTHORIZED, 401, "Access denied.");
}

#[tokio::test]
async fn mismatched_user_device_or_browser_gets_wrong_user() {
    let s = Setup::new().await;
    let rules = sandbox_rules();
    let mut conn = s.conn().await;
    let cases: [(&str, &str); 3] = [
        ("x-bc", "0000000000000000000000000000000000000000"),
        ("user-agent", "curl/8.0"),
        ("user-id", "999999999"),
    ];
    for (header, value) in cases {
        let mut req = s.get("/api2/v2/users/me");
        req.headers_mut()
            .insert(header, HeaderValue::from_static(value));
        // Signed for the user id actually sent, so only the session check can fail.
        resign(&rules, &mut req);
        conn.send(req)
            .await
            .assert_upstream_error(StatusCode::BAD_REQUEST, 301, "Wrong user.");
    }
    let mut missing = s.get("/api2/v2/users/me");
    missing.headers_mut().remove("x-bc");
    conn.send(missing)
        .await
        .assert_upstream_error(StatusCode::BAD_REQUEST, 301, "Wrong user.");
}

#[tokio::test]
async fn writes_need_a_json_content_type_and_a_valid_body() {
    let s = Setup::new().await;
    let mut conn = s.conn().await;
    let mut plain = s.request(
        Method::POST,
        "/api2/v2/chats/123/messages",
        Some(json!({"text": "hi"})),
    );
    plain
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    assert_eq!(
        conn.send(plain).await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );

    let broken = Request::from_parts(
        s.request(Method::POST, "/api2/v2/chats/123/messages", Some(json!({})))
            .into_parts()
            .0,
        Full::new(Bytes::from_static(b"{not json")),
    );
    conn.send(broken).await.assert_upstream_error(
        StatusCode::BAD_REQUEST,
        0,
        "Invalid request body.",
    );
    conn.send(s.request(
        Method::POST,
        "/api2/v2/chats/123/messages",
        Some(json!({"text": "x", "price": -1})),
    ))
    .await
    .assert_upstream_error(StatusCode::BAD_REQUEST, 0, "Wrong price.");

    let paid = conn
        .send(s.request(
            Method::POST,
            "/api2/v2/chats/123/messages",
            Some(json!({"text": "unlock me", "price": 9.99, "lockedText": true, "mediaFiles": [1, 2]})),
        ))
        .await
        .json();
    assert_eq!(paid["price"], json!(9.99));
    assert_eq!(paid["isFree"], false);
    assert_eq!(paid["lockedText"], true);
    assert_eq!(paid["mediaCount"], 2);

    let huge = s.request(
        Method::POST,
        "/api2/v2/chats/123/messages",
        Some(json!({"text": "a".repeat(1024 * 1024 + 1)})),
    );
    assert_eq!(conn.send(huge).await.status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn fail_and_throttle_faults_answer_the_next_n_requests() {
    let s = Setup::new().await;
    let mut conn = s.conn().await;
    s.sandbox
        .inject(Fault::fail(StatusCode::SERVICE_UNAVAILABLE).times(2));
    s.sandbox.inject(Fault::throttle());
    for _ in 0..2 {
        let answer = conn.send(s.get("/api2/v2/users/me")).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let throttled = conn.send(s.get("/api2/v2/users/me")).await;
    assert_eq!(throttled.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(throttled.headers[RETRY_AFTER], "30");
    assert_eq!(
        conn.send(s.get("/api2/v2/users/me")).await.status,
        StatusCode::OK
    );

    s.sandbox
        .inject(Fault::fail(StatusCode::INTERNAL_SERVER_ERROR));
    assert_eq!(
        conn.send(s.get("/api2/v2/chats")).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let faults: Vec<Option<&str>> = s
        .sandbox
        .recorded_requests()
        .iter()
        .map(|r| r.fault)
        .collect();
    assert_eq!(
        faults,
        [
            Some("fail"),
            Some("fail"),
            Some("throttle"),
            None,
            Some("fail")
        ]
    );
}

#[tokio::test]
async fn faults_are_not_consumed_by_requests_that_fail_verification() {
    let s = Setup::new().await;
    let mut conn = s.conn().await;
    s.sandbox.inject(Fault::non_json());
    let mut unsigned = s.get("/api2/v2/users/me");
    unsigned.headers_mut().remove("sign");
    assert_eq!(conn.send(unsigned).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(s.sandbox.pending_faults().len(), 1);
    let html = conn.send(s.get("/api2/v2/users/me")).await;
    assert_eq!(html.status, StatusCode::OK);
    assert!(html.content_type().starts_with("text/html"));
    assert!(serde_json::from_slice::<Value>(&html.body).is_err());
    assert!(s.sandbox.pending_faults().is_empty());
}

#[tokio::test]
async fn account_scoped_faults_leave_other_accounts_alone() {
    let s = Setup::new().await;
    let other = s.sandbox.add_account();
    let mut conn = s.conn().await;
    s.sandbox
        .inject(Fault::two_factor().for_account(s.account.user_id.clone()));
    assert_eq!(
        s.sandbox.pending_faults()[0].scope,
        FaultScope::Account(s.account.user_id.clone())
    );
    let theirs = conn
        .send(s.request_as(&other, Method::GET, "/api2/v2/users/me", None))
        .await;
    assert_eq!(theirs.status, StatusCode::OK);
    let ours = conn.send(s.get("/api2/v2/users/me")).await;
    assert_eq!(ours.status, StatusCode::BAD_REQUEST);
    let body = ours.json();
    assert_eq!(body["error"]["code"], 101);
    assert!(body["error"]["payload"]["otpState"].is_object());
    assert_eq!(
        conn.send(s.get("/api2/v2/users/me")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_cut_body_breaks_mid_stream_for_the_client() {
    let s = Setup::new().await;
    s.sandbox.inject(Fault::cut_body());
    let mut conn = s.conn().await;
    conn.sender.ready().await.unwrap();
    let res = conn
        .sender
        .send_request(s.get("/api2/v2/chats?limit=20"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let announced: usize = res.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut body = res.into_body();
    let mut received = 0;
    let error = loop {
        match body.frame().await {
            Some(Ok(frame)) => received += frame.into_data().map_or(0, |d| d.len()),
            Some(Err(e)) => break e,
            None => panic!("the body ended normally after {received} bytes"),
        }
    };
    assert!(
        received > 0 && received < announced,
        "{received}/{announced}"
    );
    // hyper reports the connection closing before the announced length as an unexpected EOF.
    let cause = std::error::Error::source(&error)
        .and_then(|e| e.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind);
    assert_eq!(cause, Some(std::io::ErrorKind::UnexpectedEof), "{error:?}");

    // The next request (new connection: the broken one is gone) is whole again.
    let whole = s.send(s.get("/api2/v2/chats?limit=20")).await;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.body.len(), announced);
    whole.json();
}

#[tokio::test]
async fn a_stall_delays_the_answer_which_then_arrives_normally() {
    let s = Setup::new().await;
    let stall = Duration::from_millis(300);
    s.sandbox.inject(Fault::stall(stall));
    assert_eq!(s.sandbox.pending_faults()[0].mode, FaultMode::Stall(stall));
    let mut conn = s.conn().await;
    let started = Instant::now();
    let answer = conn.send(s.get("/api2/v2/users/me")).await;
    assert!(
        started.elapsed() >= stall,
        "answered after {:?}",
        started.elapsed()
    );
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.json()["id"],
        json!(s.account.user_id.parse::<u64>().unwrap())
    );

    // A longer stall keeps the client waiting.
    s.sandbox.inject(Fault::stall(Duration::from_secs(30)));
    let waiting = tokio::time::timeout(
        Duration::from_millis(200),
        conn.send(s.get("/api2/v2/users/me")),
    )
    .await;
    assert!(waiting.is_err(), "a stalled request was answered");
}

#[tokio::test]
async fn rotated_rules_reject_old_signatures() {
    let s = Setup::new().await;
    let mut conn = s.conn().await;
    let signed_before = s.get("/api2/v2/users/me");
    s.sandbox.rotate_rules(other_rules());
    assert_eq!(s.sandbox.rules(), other_rules());
    conn.send(signed_before).await.assert_upstream_error(
        StatusCode::UNAUTHORIZED,
        401,
        "Please refresh the page",
    );
    // `signed_headers` signs with the current (new) rules.
    let fresh = conn.send(s.get("/api2/v2/users/me")).await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert_eq!(
        s.sandbox.last_request().unwrap().header("app-token"),
        Some("rotated-app-token-000000000000000")
    );
}

#[tokio::test]
async fn requests_are_counted_and_recorded_exactly_as_received() {
    let s = Setup::new().await;
    let mut conn = s.conn().await;
    assert_eq!(s.sandbox.requests_received(), 0);
    let pq = "/api2/v2/chats?limit=2&offset=0&order=recent&skip_users=all&q=a%2Fb+c&flag";
    conn.send(s.get(pq)).await;
    conn.send(s.request(
        Method::POST,
        "/api2/v2/chats/55/messages",
        Some(json!({"text": "recorded", "price": 0})),
    ))
    .await;
    conn.send(s.get("/api2/v2/chats?limit=1")).await;

    assert_eq!(s.sandbox.requests_received(), 3);
    assert_eq!(s.sandbox.requests_to("/api2/v2/chats"), 2);
    assert_eq!(s.sandbox.requests_to("/api2/v2/chats/55/messages"), 1);
    assert_eq!(s.sandbox.requests_to("/api2/v2/users/me"), 0);

    let recorded = s.sandbox.recorded_requests();
    assert_eq!(recorded.len(), 3);
    assert_eq!(recorded[0].method, Method::GET);
    assert_eq!(recorded[0].path_and_query, pq);
    assert_eq!(recorded[0].header("x-bc"), Some(s.account.x_bc.as_str()));
    assert_eq!(
        recorded[0].header("user-id"),
        Some(s.account.user_id.as_str())
    );
    assert_eq!(recorded[0].status, StatusCode::OK);
    assert_eq!(recorded[1].method, Method::POST);
    assert_eq!(recorded[1].path(), "/api2/v2/chats/55/messages");
    assert_eq!(
        recorded[1].json(),
        Some(json!({"text": "recorded", "price": 0}))
    );
    assert_eq!(recorded[1].header("content-type"), Some("application/json"));

    s.sandbox.set_record_capacity(1);
    assert_eq!(s.sandbox.recorded_requests().len(), 1);
    s.sandbox.reset_stats();
    assert_eq!(s.sandbox.requests_received(), 0);
    assert!(s.sandbox.last_request().is_none());
}

#[tokio::test]
async fn one_keep_alive_connection_serves_a_hundred_requests() {
    let s = Setup::new().await;
    let mut conn = s.conn().await;
    for i in 0..100 {
        let pq = format!("/api2/v2/chats?limit=1&offset={i}");
        let answer = conn.send(s.get(&pq)).await;
        assert_eq!(answer.status, StatusCode::OK, "request {i}");
        assert!(answer.json()["list"].is_array());
    }
    assert_eq!(s.sandbox.requests_received(), 100);
    // The same connection is still usable: the server never closed it.
    assert!(!conn.sender.is_closed());
}

#[tokio::test]
async fn http_controls_drive_the_same_state() {
    let s = Setup::new().await;
    let mut conn = s.conn().await;
    let control = |method: Method, path: &str, body: Option<Value>| {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", "sandbox")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .unwrap()
    };

    let created = conn
        .send(control(Method::POST, "/_sandbox/accounts", None))
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let account: SandboxAccount = serde_json::from_slice(&created.body).unwrap();
    assert_eq!(s.sandbox.account(&account.user_id), Some(account.clone()));

    let fault = conn
        .send(control(
            Method::POST,
            "/_sandbox/fault",
            Some(json!({"mode": "fail", "status": 503, "count": 2, "user_id": account.user_id})),
        ))
        .await;
    assert_eq!(fault.status, StatusCode::OK);
    assert_eq!(
        s.sandbox.pending_faults(),
        vec![Fault::fail(StatusCode::SERVICE_UNAVAILABLE)
            .times(2)
            .for_account(account.user_id.clone())]
    );
    let bad = conn
        .send(control(
            Method::POST,
            "/_sandbox/fault",
            Some(json!({"mode": "explode"})),
        ))
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let cleared = conn
        .send(control(Method::DELETE, "/_sandbox/faults", None))
        .await;
    assert_eq!(cleared.json(), json!({"cleared": 1}));

    let expired = conn
        .send(control(
            Method::POST,
            &format!("/_sandbox/accounts/{}/expire", account.user_id),
            None,
        ))
        .await;
    assert_eq!(expired.status, StatusCode::OK);
    assert!(!s.sandbox.is_session_live(&account.user_id));
    let unknown = conn
        .send(control(Method::POST, "/_sandbox/accounts/1/expire", None))
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    conn.send(s.get("/api2/v2/users/me")).await;
    let stats = conn
        .send(control(Method::GET, "/_sandbox/stats", None))
        .await
        .json();
    // Control requests are not counted: only the one upstream request is.
    assert_eq!(
        stats,
        json!({"total": 1, "paths": {"/api2/v2/users/me": 1}})
    );
    let recorded = conn
        .send(control(Method::GET, "/_sandbox/requests", None))
        .await
        .json();
    assert_eq!(recorded[0]["path_and_query"], "/api2/v2/users/me");
    assert_eq!(recorded[0]["headers"]["user-id"], json!(s.account.user_id));

    let rotated = conn
        .send(control(
            Method::PUT,
            "/_sandbox/rules",
            Some(serde_json::from_str(&other_rules().to_json()).unwrap()),
        ))
        .await;
    assert_eq!(rotated.status, StatusCode::OK);
    assert_eq!(s.sandbox.rules(), other_rules());
    let invalid = conn
        .send(control(
            Method::PUT,
            "/_sandbox/rules",
            Some(json!({"app_token": "x"})),
        ))
        .await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
    assert_eq!(s.sandbox.rules(), other_rules());
}

#[tokio::test]
async fn in_process_service_answers_without_a_socket() {
    let sandbox = Sandbox::new(sandbox_rules());
    let account = sandbox.add_account();
    let mut builder = Request::builder().uri("/api2/v2/payouts/balances");
    for (name, value) in &sandbox.signed_headers(&account, "/api2/v2/payouts/balances") {
        builder = builder.header(name, value);
    }
    let res = sandbox
        .service()
        .oneshot(builder.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["currency"], "USD");
    assert_eq!(sandbox.requests_received(), 1);
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let s = Setup::new().await;
    let addr = s.server.local_addr();
    assert_eq!(
        s.send(s.get("/api2/v2/users/me")).await.status,
        StatusCode::OK
    );
    s.server.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_faults_are_exact_under_concurrent_connections() {
    let s = std::sync::Arc::new(Setup::new().await);
    s.sandbox
        .inject(Fault::fail(StatusCode::SERVICE_UNAVAILABLE).times(37));
    let tasks: Vec<_> = (0..8)
        .map(|c| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut conn = s.conn().await;
                let mut failed = 0;
                for i in 0..25 {
                    let pq = format!("/api2/v2/chats/{}/messages?limit=2", c * 100 + i);
                    match conn.send(s.get(&pq)).await.status {
                        StatusCode::OK => {}
                        StatusCode::SERVICE_UNAVAILABLE => failed += 1,
                        other => panic!("unexpected {other}"),
                    }
                }
                failed
            })
        })
        .collect();
    let mut failed = 0;
    for task in tasks {
        failed += task.await.unwrap();
    }
    assert_eq!(failed, 37);
    assert!(s.sandbox.pending_faults().is_empty());
    assert_eq!(s.sandbox.requests_received(), 200);
    assert_eq!(s.sandbox.path_counts().len(), 200);
    let recorded = s.sandbox.recorded_requests();
    assert_eq!(recorded.len(), 200);
    assert_eq!(
        recorded.iter().filter(|r| r.fault == Some("fail")).count(),
        37
    );
}
