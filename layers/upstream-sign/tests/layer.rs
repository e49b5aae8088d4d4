//! `UpstreamSignLayer` around a mock upstream client: the headers it sends, and every row of
//! "how the upstream says no".

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER, SET_COOKIE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tollgate_core::{
    BackendError, BoxFuture, CostTable, ErrorCode, GateBody, ManualClock, ModelId, OrgId,
};
use tollgate_upstream_sign::{
    sandbox_rules, MemorySessionStore, ModelRecord, ModelSession, ModelStatus, RulesSigner,
    Session, SessionStore, SignError, Signature, Signer, UpstreamSignLayer,
};
use tower::{Layer, ServiceExt};
use tower_test::mock;

type UpReq = Request<Full<Bytes>>;
type UpRes = Response<Full<Bytes>>;

const NOW_MS: u64 = 1_700_000_000_000;
const COOKIE: &str = "sess=s3cr3t; auth_id=424242";
const X_BC: &str = "xbc-device-token";
const UA: &str = "Mozilla/5.0 (X11; Linux x86_64) Firefox/125.0";

fn session() -> Session {
    Session::new(COOKIE, "424242", X_BC, UA)
}

struct Fixture {
    store: Arc<MemorySessionStore>,
    model: ModelId,
    signer: RulesSigner,
}

impl Fixture {
    fn new() -> Self {
        let store = Arc::new(MemorySessionStore::new());
        let model = ModelId::new();
        store.insert(model, OrgId::new(), "demo", session());
        let signer =
            RulesSigner::new(sandbox_rules()).with_clock(Arc::new(ManualClock::new(NOW_MS)));
        Fixture {
            store,
            model,
            signer,
        }
    }

    fn layer(&self) -> UpstreamSignLayer {
        UpstreamSignLayer::new(self.signer.clone(), self.store.clone())
    }

    fn request(&self, method: Method, uri: &str) -> UpReq {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(Bytes::new()))
            .unwrap();
        req.extensions_mut().insert(self.model);
        req
    }

    async fn status(&self) -> ModelStatus {
        self.store.model(self.model).await.unwrap().unwrap().status
    }
}

/// Sends `req` through the layer; the mock upstream answers with `upstream` (or an error).
/// Returns what the upstream saw (None if it was never called) and the answer.
async fn exchange(
    layer: UpstreamSignLayer,
    req: UpReq,
    upstream: Result<UpRes, tollgate_core::BoxError>,
) -> (Option<UpReq>, Response<GateBody<Full<Bytes>>>) {
    let (mock, mut handle) = mock::pair::<UpReq, UpRes>();
    let svc = layer.layer(mock);
    let call = tokio::spawn(svc.oneshot(req));
    let seen = match handle.next_request().await {
        Some((seen, reply)) => {
            match upstream {
                Ok(res) => reply.send_response(res),
                Err(e) => reply.send_error(e),
            }
            Some(seen)
        }
        None => None,
    };
    let res = call.await.unwrap().expect("the layer answers, never fails");
    (seen, res)
}

fn upstream(status: u16, content_type: &str, body: &str) -> UpRes {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

fn upstream_error(status: u16, code: i64, message: &str) -> UpRes {
    upstream(
        status,
        "application/json; charset=utf-8",
        &json!({"error": {"code": code, "message": message}}).to_string(),
    )
}

async fn json_of(res: Response<GateBody<Full<Bytes>>>) -> Value {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

fn error_json(code: &str) -> Value {
    let code_enum = ErrorCode::ALL
        .into_iter()
        .find(|c| c.as_str() == code)
        .unwrap();
    json!({"error": code_enum.default_message(), "code": code})
}

#[tokio::test]
async fn sends_signed_request_with_session_headers() {
    let f = Fixture::new();
    let uri = "http://127.0.0.1:9/api2/v2/chats?a=%20b&c=d";
    let mut req = f.request(Method::GET, uri);
    // Whatever the caller put there is replaced.
    req.headers_mut()
        .insert("cookie", "stale=1".parse().unwrap());
    let (seen, res) = exchange(
        f.layer(),
        req,
        Ok(upstream(
            200,
            "application/json",
            r#"{"list":[],"hasMore":false}"#,
        )),
    )
    .await;
    let seen = seen.expect("the upstream was called");
    let h = seen.headers();
    assert_eq!(seen.uri(), uri);
    assert_eq!(h["time"], NOW_MS.to_string().as_str());
    assert_eq!(h["app-token"], "33d57ade8c02dbc5a333db99ff9ae26a");
    assert_eq!(h["user-id"], "424242");
    assert_eq!(h["cookie"], COOKIE);
    assert_eq!(h.get_all("cookie").iter().count(), 1);
    assert_eq!(h["x-bc"], X_BC);
    assert_eq!(h["user-agent"], UA);
    assert_eq!(h["accept"], "application/json, text/plain, */*");
    assert!(h.get(CONTENT_TYPE).is_none(), "no content-type on a GET");
    assert!(h["cookie"].is_sensitive() && h["x-bc"].is_sensitive());
    let sign = h["sign"].to_str().unwrap();
    let rules = sandbox_rules();
    // Signed over the raw query, percent-encoding kept.
    assert!(rules.verify(
        "/api2/v2/chats?a=%20b&c=d",
        "424242",
        &NOW_MS.to_string(),
        sign
    ));
    assert!(!rules.verify(
        "/api2/v2/chats?a= b&c=d",
        "424242",
        &NOW_MS.to_string(),
        sign
    ));
    assert!(!rules.verify("/api2/v2/chats", "424242", &NOW_MS.to_string(), sign));
    assert_eq!(h.len(), 8);

    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        matches!(res.body(), GateBody::Inner { .. }),
        "streamed through"
    );
    assert_eq!(json_of(res).await, json!({"list": [], "hasMore": false}));
    assert_eq!(f.status().await, ModelStatus::Connected);
}

#[tokio::test]
async fn writes_are_sent_as_json() {
    let f = Fixture::new();
    for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
        let mut req = f.request(method.clone(), "http://127.0.0.1:9/api2/v2/messages/7");
        req.headers_mut()
            .insert(CONTENT_TYPE, "text/plain".parse().unwrap());
        let (seen, res) = exchange(
            f.layer(),
            req,
            Ok(upstream(200, "application/json", r#"{"success":true}"#)),
        )
        .await;
        let seen = seen.unwrap();
        assert_eq!(seen.headers()[CONTENT_TYPE], "application/json", "{method}");
        assert!(sandbox_rules().verify(
            "/api2/v2/messages/7",
            "424242",
            seen.headers()["time"].to_str().unwrap(),
            seen.headers()["sign"].to_str().unwrap()
        ));
        assert_eq!(res.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn model_found_through_the_route_match() {
    let f = Fixture::new();
    let route = CostTable::onlyfans()
        .lookup(&Method::GET, &format!("/api/models/{}/users/me", f.model))
        .unwrap();
    let mut req = Request::builder()
        .uri("http://127.0.0.1:9/api2/v2/users/me")
        .body(Full::new(Bytes::new()))
        .unwrap();
    req.extensions_mut().insert(route);
    let (seen, res) = exchange(
        f.layer(),
        req,
        Ok(upstream(
            200,
            "application/json",
            r#"{"id":1,"isAuth":true}"#,
        )),
    )
    .await;
    assert_eq!(seen.unwrap().headers()["user-id"], "424242");
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn request_without_a_model_is_an_internal_error() {
    let f = Fixture::new();
    let req = Request::builder()
        .uri("http://127.0.0.1:9/api2/v2/users/me")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (seen, res) = exchange(f.layer(), req, Ok(upstream(200, "application/json", "{}"))).await;
    assert!(seen.is_none());
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        json_of(res).await,
        json!({"error": "The upstream request names no model.", "code": "INTERNAL_ERROR"})
    );
}

#[tokio::test]
async fn success_drops_upstream_cookies() {
    let f = Fixture::new();
    let mut up = upstream(200, "application/json", "{}");
    up.headers_mut()
        .insert(SET_COOKIE, "sess=rotated; Path=/".parse().unwrap());
    up.headers_mut()
        .insert("x-upstream", "kept".parse().unwrap());
    let (_, res) = exchange(
        f.layer(),
        f.request(Method::GET, "http://h/api2/v2/users/me"),
        Ok(up),
    )
    .await;
    assert!(res.headers().get(SET_COOKIE).is_none());
    assert_eq!(res.headers()["x-upstream"], "kept");
}

/// One classification row: upstream answer → client status, JSON and the model's status.
async fn row(up: UpRes, status: u16, body: Value, after: ModelStatus) {
    let f = Fixture::new();
    let (seen, res) = exchange(
        f.layer(),
        f.request(Method::GET, "http://h/api2/v2/chats?limit=1"),
        Ok(up),
    )
    .await;
    assert!(seen.is_some());
    assert_eq!(res.status().as_u16(), status, "{body}");
    assert_eq!(res.headers()[CONTENT_TYPE], "application/json");
    let code = res.extensions().get::<ErrorCode>().copied();
    let json = json_of(res).await;
    assert_eq!(json, body);
    assert_eq!(code.map(|c| c.as_str()), json["code"].as_str());
    assert_eq!(f.status().await, after, "{body}");
}

#[tokio::test]
async fn access_denied_disconnects_the_model() {
    for status in [401, 403] {
        row(
            upstream_error(status, 0, "Access denied."),
            502,
            error_json("MODEL_SESSION_EXPIRED"),
            ModelStatus::Disconnected,
        )
        .await;
    }
}

#[tokio::test]
async fn stale_signature_is_a_signing_failure_and_keeps_the_model() {
    row(
        upstream_error(401, 0, "Please refresh the page"),
        502,
        json!({"error": "The upstream rejected the request signature. Retry in a few seconds.",
               "code": "SIGNING_FAILED"}),
        ModelStatus::Connected,
    )
    .await;
}

#[tokio::test]
async fn wrong_user_disconnects_the_model() {
    row(
        upstream_error(400, 301, "Wrong user."),
        502,
        error_json("MODEL_SESSION_EXPIRED"),
        ModelStatus::Disconnected,
    )
    .await;
}

#[tokio::test]
async fn two_factor_and_not_found_are_rejected_with_details() {
    let otp = json!({"error": {"code": 101, "message": "Two-factor check", "otpState": {"phone": "***12"}}});
    row(
        upstream(400, "application/json", &otp.to_string()),
        400,
        json!({"error": "The upstream rejected the request.", "code": "UPSTREAM_REJECTED",
               "details": otp}),
        ModelStatus::Connected,
    )
    .await;
    row(
        upstream_error(404, 0, "Message not found"),
        404,
        json!({"error": "The upstream rejected the request.", "code": "UPSTREAM_REJECTED",
               "details": {"error": {"code": 0, "message": "Message not found"}}}),
        ModelStatus::Connected,
    )
    .await;
}

#[tokio::test]
async fn non_json_rejection_keeps_the_text() {
    row(
        upstream(418, "text/plain", "short and stout"),
        418,
        json!({"error": "The upstream rejected the request.", "code": "UPSTREAM_REJECTED",
               "details": "short and stout"}),
        ModelStatus::Connected,
    )
    .await;
    row(
        upstream(409, "text/plain", ""),
        409,
        json!({"error": "The upstream rejected the request.", "code": "UPSTREAM_REJECTED"}),
        ModelStatus::Connected,
    )
    .await;
}

#[tokio::test]
async fn error_body_is_read_up_to_the_limit() {
    let f = Fixture::new();
    let (_, res) = exchange(
        f.layer().with_error_body_limit(10),
        f.request(Method::GET, "http://h/api2/v2/chats"),
        Ok(upstream(422, "text/plain", "0123456789abcdefghij")),
    )
    .await;
    assert_eq!(res.status().as_u16(), 422);
    assert_eq!(json_of(res).await["details"], "0123456789");

    // A JSON body cut by the cap is no longer JSON: it is passed on as text, and a cut
    // `Wrong user.` is not mistaken for a dead session.
    let body = json!({"error": {"code": 301, "message": "Wrong user."}}).to_string();
    let (_, res) = exchange(
        f.layer().with_error_body_limit(12),
        f.request(Method::GET, "http://h/api2/v2/chats"),
        Ok(upstream(400, "application/json", &body)),
    )
    .await;
    assert_eq!(res.status().as_u16(), 400);
    assert_eq!(json_of(res).await["details"], body[..12]);
    assert_eq!(f.status().await, ModelStatus::Connected);
}

#[tokio::test]
async fn throttling_passes_retry_after_on() {
    let mut up = upstream(429, "application/json", "{}");
    up.headers_mut().insert(RETRY_AFTER, "30".parse().unwrap());
    let f = Fixture::new();
    let (_, res) = exchange(
        f.layer(),
        f.request(Method::GET, "http://h/api2/v2/chats"),
        Ok(up),
    )
    .await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()[RETRY_AFTER], "30");
    assert_eq!(json_of(res).await, error_json("UPSTREAM_RATE_LIMITED"));

    let date = "Wed, 21 Oct 2015 07:28:00 GMT";
    let mut up = upstream(429, "application/json", "{}");
    up.headers_mut().insert(RETRY_AFTER, date.parse().unwrap());
    let (_, res) = exchange(
        f.layer(),
        f.request(Method::GET, "http://h/api2/v2/chats"),
        Ok(up),
    )
    .await;
    assert_eq!(res.headers()[RETRY_AFTER], date);

    row(
        upstream(429, "text/html", "slow down"),
        429,
        error_json("UPSTREAM_RATE_LIMITED"),
        ModelStatus::Connected,
    )
    .await;
    let f = Fixture::new();
    let (_, res) = exchange(
        f.layer(),
        f.request(Method::GET, "http://h/api2/v2/chats"),
        Ok(upstream(429, "text/html", "")),
    )
    .await;
    assert!(res.headers().get(RETRY_AFTER).is_none());
}

#[tokio::test]
async fn upstream_failures_are_upstream_errors() {
    for status in [500, 502, 503, 504, 302] {
        row(
            upstream(status, "application/json", r#"{"error":"boom"}"#),
            502,
            error_json("UPSTREAM_ERROR"),
            ModelStatus::Connected,
        )
        .await;
    }
    row(
        upstream(200, "text/html; charset=utf-8", "<html>login</html>"),
        502,
        json!({"error": "The upstream answered with a body that is not JSON.", "code": "UPSTREAM_ERROR"}),
        ModelStatus::Connected,
    )
    .await;
}

#[tokio::test]
async fn transport_errors_become_responses() {
    let f = Fixture::new();
    let (_, res) = exchange(
        f.layer(),
        f.request(Method::GET, "http://h/api2/v2/chats"),
        Err("connection refused".into()),
    )
    .await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(json_of(res).await, error_json("UPSTREAM_ERROR"));

    let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, "read timed out");
    let (_, res) = exchange(
        f.layer(),
        f.request(Method::GET, "http://h/api2/v2/chats"),
        Err(timed_out.into()),
    )
    .await;
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(json_of(res).await, error_json("UPSTREAM_TIMEOUT"));
    assert_eq!(f.status().await, ModelStatus::Connected);
}

#[tokio::test]
async fn disconnected_model_short_circuits_until_reconnected() {
    let f = Fixture::new();
    let (seen, res) = exchange(
        f.layer(),
        f.request(Method::GET, "http://h/api2/v2/chats"),
        Ok(upstream_error(401, 0, "Access denied.")),
    )
    .await;
    assert!(seen.is_some());
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);

    for _ in 0..3 {
        let (seen, res) = exchange(
            f.layer(),
            f.request(Method::GET, "http://h/api2/v2/chats"),
            Ok(upstream(200, "application/json", "{}")),
        )
        .await;
        assert!(seen.is_none(), "nothing is sent for a disconnected model");
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(json_of(res).await, error_json("MODEL_SESSION_EXPIRED"));
    }

    let record = f
        .store
        .reconnect(f.model, session())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.status, ModelStatus::Connected);
    let (seen, res) = exchange(
        f.layer(),
        f.request(Method::GET, "http://h/api2/v2/chats"),
        Ok(upstream(200, "application/json", "{}")),
    )
    .await;
    assert!(seen.is_some());
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn unknown_model_is_a_dead_session() {
    let f = Fixture::new();
    let mut req = f.request(Method::GET, "http://h/api2/v2/chats");
    req.extensions_mut().insert(ModelId::new());
    let (seen, res) = exchange(f.layer(), req, Ok(upstream(200, "application/json", "{}"))).await;
    assert!(seen.is_none());
    assert_eq!(json_of(res).await, error_json("MODEL_SESSION_EXPIRED"));
}

#[tokio::test]
async fn session_that_cannot_be_a_header_disconnects_the_model() {
    let f = Fixture::new();
    f.store
        .reconnect(f.model, Session::new("sess=a\nb", "424242", X_BC, UA))
        .await
        .unwrap();
    let (seen, res) = exchange(
        f.layer(),
        f.request(Method::GET, "http://h/api2/v2/chats"),
        Ok(upstream(200, "application/json", "{}")),
    )
    .await;
    assert!(seen.is_none());
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(json_of(res).await, error_json("MODEL_SESSION_EXPIRED"));
    assert_eq!(f.status().await, ModelStatus::Disconnected);
}

#[tokio::test]
async fn a_stale_401_does_not_disconnect_the_reconnected_model() {
    let f = Fixture::new();
    let old = session();
    let new = Session::new("sess=fresh; auth_id=424242", "424242", X_BC, UA);
    let (mock, mut handle) = mock::pair::<UpReq, UpRes>();
    let svc = f.layer().layer(mock);

    // A request goes out signed with the old session...
    let in_flight = tokio::spawn(
        svc.clone()
            .oneshot(f.request(Method::GET, "http://h/api2/v2/chats")),
    );
    let (seen, reply) = handle.next_request().await.unwrap();
    assert_eq!(seen.headers()["cookie"], old.cookie.as_str());

    // ...the admin reconnects the model while it is out...
    f.store.reconnect(f.model, new.clone()).await.unwrap();

    // ...and the upstream then refuses the old session.
    reply.send_response(upstream_error(401, 0, "Access denied."));
    let res = in_flight.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        json_of(res).await,
        json!({
            "error": "The model was reconnected while this request was in flight. Retry the request.",
            "code": "MODEL_SESSION_EXPIRED",
        })
    );
    assert_eq!(
        f.status().await,
        ModelStatus::Connected,
        "the new session stays"
    );

    // The next request goes out with the new session and works.
    let next = tokio::spawn(svc.oneshot(f.request(Method::GET, "http://h/api2/v2/chats")));
    let (seen, reply) = handle.next_request().await.unwrap();
    assert_eq!(seen.headers()["cookie"], new.cookie.as_str());
    reply.send_response(upstream(200, "application/json", r#"{"list":[]}"#));
    let res = next.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(json_of(res).await, json!({"list": []}));

    // A 401 for the session in use still disconnects the model, as before.
    let (_, res) = exchange(
        f.layer(),
        f.request(Method::GET, "http://h/api2/v2/chats"),
        Ok(upstream_error(401, 0, "Access denied.")),
    )
    .await;
    assert_eq!(json_of(res).await, error_json("MODEL_SESSION_EXPIRED"));
    assert_eq!(f.status().await, ModelStatus::Disconnected);
}

/// A signer that fails, or answers garbage, counting its calls.
struct BrokenSigner {
    calls: AtomicUsize,
    garbage: bool,
}

impl Signer for BrokenSigner {
    fn sign(&self, _: &str, _: &str) -> BoxFuture<Result<Signature, SignError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let out = if self.garbage {
            Ok(Signature {
                sign: "a\r\nb".into(),
                time: "1".into(),
                app_token: "t".into(),
            })
        } else {
            Err(SignError::Unreachable("connection refused".into()))
        };
        Box::pin(std::future::ready(out))
    }
}

#[tokio::test]
async fn signer_failure_is_signing_failed_and_sends_nothing() {
    for garbage in [false, true] {
        let f = Fixture::new();
        let signer = Arc::new(BrokenSigner {
            calls: AtomicUsize::new(0),
            garbage,
        });
        let layer = UpstreamSignLayer::new(signer.clone(), f.store.clone());
        let (seen, res) = exchange(
            layer,
            f.request(Method::GET, "http://h/api2/v2/chats"),
            Ok(upstream(200, "application/json", "{}")),
        )
        .await;
        assert_eq!(signer.calls.load(Ordering::SeqCst), 1);
        assert!(seen.is_none());
        assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(json_of(res).await, error_json("SIGNING_FAILED"));
        assert_eq!(f.status().await, ModelStatus::Connected);
    }
}

/// A store whose backend is down, or that cannot persist a disconnect.
struct FailingStore {
    inner: MemorySessionStore,
    lookups_fail: bool,
}

impl SessionStore for FailingStore {
    fn session(&self, model: ModelId) -> BoxFuture<Result<Option<ModelSession>, BackendError>> {
        if self.lookups_fail {
            return Box::pin(std::future::ready(Err(BackendError::unavailable(
                "db down",
            ))));
        }
        self.inner.session(model)
    }
    fn mark_disconnected(&self, _: ModelId, _: u64) -> BoxFuture<Result<bool, BackendError>> {
        Box::pin(std::future::ready(Err(BackendError::other("write failed"))))
    }
    fn connect(
        &self,
        org: OrgId,
        name: String,
        s: Session,
    ) -> BoxFuture<Result<ModelRecord, BackendError>> {
        self.inner.connect(org, name, s)
    }
    fn reconnect(
        &self,
        m: ModelId,
        s: Session,
    ) -> BoxFuture<Result<Option<ModelRecord>, BackendError>> {
        self.inner.reconnect(m, s)
    }
    fn model(&self, m: ModelId) -> BoxFuture<Result<Option<ModelRecord>, BackendError>> {
        self.inner.model(m)
    }
    fn list(&self, org: OrgId) -> BoxFuture<Result<Vec<ModelRecord>, BackendError>> {
        self.inner.list(org)
    }
}

#[tokio::test]
async fn store_failures() {
    let f = Fixture::new();
    let store = FailingStore {
        inner: MemorySessionStore::new(),
        lookups_fail: true,
    };
    let layer = UpstreamSignLayer::new(f.signer.clone(), store);
    let (seen, res) = exchange(
        layer,
        f.request(Method::GET, "http://h/api2/v2/chats"),
        Ok(upstream(200, "application/json", "{}")),
    )
    .await;
    assert!(seen.is_none());
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        res.extensions().get::<tollgate_core::BackendFailure>(),
        Some(&tollgate_core::BackendFailure {
            backend: "sessions"
        })
    );
    assert_eq!(json_of(res).await, error_json("SERVICE_UNAVAILABLE"));

    // The disconnect cannot be persisted: the client still learns the session is dead.
    let store = FailingStore {
        inner: MemorySessionStore::new(),
        lookups_fail: false,
    };
    store.inner.insert(f.model, OrgId::new(), "m", session());
    let layer = UpstreamSignLayer::new(f.signer.clone(), store);
    let (_, res) = exchange(
        layer,
        f.request(Method::GET, "http://h/api2/v2/chats"),
        Ok(upstream_error(401, 0, "Access denied.")),
    )
    .await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(json_of(res).await, error_json("MODEL_SESSION_EXPIRED"));
}

#[tokio::test]
async fn rules_rotation_does_not_touch_requests_in_flight() {
    let f = Fixture::new();
    let old = sandbox_rules();
    let new = tollgate_upstream_sign::DynamicRules::from_json(include_str!(
        "fixtures/rules-prefix-style.json"
    ))
    .unwrap();

    let (mock, mut handle) = mock::pair::<UpReq, UpRes>();
    let svc = f.layer().layer(mock);
    let in_flight = tokio::spawn(
        svc.clone()
            .oneshot(f.request(Method::GET, "http://h/api2/v2/chats")),
    );
    let (seen, reply) = handle.next_request().await.unwrap();

    f.signer.replace(new.clone());
    let after = tokio::spawn(svc.oneshot(f.request(Method::GET, "http://h/api2/v2/chats")));
    let (seen_after, reply_after) = handle.next_request().await.unwrap();

    reply.send_response(upstream(200, "application/json", r#"{"n":1}"#));
    reply_after.send_response(upstream(200, "application/json", r#"{"n":2}"#));
    let res = in_flight.await.unwrap().unwrap();
    assert_eq!(json_of(res).await, json!({"n": 1}));
    let res = after.await.unwrap().unwrap();
    assert_eq!(json_of(res).await, json!({"n": 2}));

    let verify = |rules: &tollgate_upstream_sign::DynamicRules, req: &UpReq| {
        let h = req.headers();
        rules.verify(
            "/api2/v2/chats",
            "424242",
            h["time"].to_str().unwrap(),
            h["sign"].to_str().unwrap(),
        )
    };
    assert!(verify(&old, &seen) && !verify(&new, &seen));
    assert!(verify(&new, &seen_after) && !verify(&old, &seen_after));
}

#[tokio::test]
async fn readiness_is_the_clients() {
    let f = Fixture::new();
    let (mut svc, mut handle) = mock::spawn_layer::<UpReq, UpRes, _>(f.layer());
    handle.allow(0);
    tokio_test::assert_pending!(svc.poll_ready());
    handle.allow(1);
    tokio_test::assert_ready_ok!(svc.poll_ready());
    let fut = svc.call(f.request(Method::GET, "http://h/api2/v2/users/me"));
    let call = tokio::spawn(fut);
    let (seen, reply) = handle.next_request().await.unwrap();
    assert!(seen.headers().contains_key("sign"));
    reply.send_response(upstream(200, "application/json", "{}"));
    assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);

    // An error from the client's `poll_ready` is passed on as it is.
    handle.send_error("pool closed");
    let err = tokio_test::assert_ready_err!(svc.poll_ready());
    assert_eq!(err.to_string(), "pool closed");
}
