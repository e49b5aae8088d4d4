//! The request handler: verification, faults, endpoints.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde_json::{json, Value};

use super::account::parse_session_cookie;
use super::body::SandboxBody;
use super::data::Profile;
use super::fault::FaultMode;
use super::query::Query;
use super::record::RecordedRequest;
use super::{control, read, Shared, API_BASE, MAX_REQUEST_BODY, MISSING_ID_FROM};

const JSON: &str = "application/json; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";

/// The sandbox as a service: `tower::Service<http::Request<B>>` for any body `B`, answering
/// `http::Response<SandboxBody>`. It never fails; every problem is an HTTP answer.
#[derive(Clone)]
pub struct SandboxService {
    shared: Arc<Shared>,
}

impl fmt::Debug for SandboxService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxService").finish_non_exhaustive()
    }
}

type HandleFuture = Pin<Box<dyn Future<Output = Result<Response<SandboxBody>, Infallible>> + Send>>;

impl SandboxService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        SandboxService { shared }
    }

    /// Answers one request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<SandboxBody>
    where
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        handle(Arc::clone(&self.shared), req).await
    }
}

impl<B> tower_service::Service<Request<B>> for SandboxService
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<SandboxBody>;
    type Error = Infallible;
    type Future = HandleFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> HandleFuture {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move { Ok(handle(shared, req).await) })
    }
}

impl<B> hyper::service::Service<Request<B>> for SandboxService
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<SandboxBody>;
    type Error = Infallible;
    type Future = HandleFuture;

    fn call(&self, req: Request<B>) -> HandleFuture {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move { Ok(handle(shared, req).await) })
    }
}

/// The sandbox's answer before it becomes a response.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) content_type: &'static str,
    pub(crate) body: Bytes,
    retry_after: Option<u64>,
    cut: bool,
    stall: Option<Duration>,
}

impl Answer {
    pub(crate) fn json(status: StatusCode, value: &Value) -> Self {
        Answer {
            status,
            content_type: JSON,
            // Serializing a `Value` cannot fail.
            body: Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
            retry_after: None,
            cut: false,
            stall: None,
        }
    }

    /// The upstream's error body: `{"error": {"code": n, "message": "…"}}`.
    fn error(status: StatusCode, code: i64, message: &str) -> Self {
        Self::json(
            status,
            &json!({"error": {"code": code, "message": message}}),
        )
    }

    fn refresh() -> Self {
        Self::error(StatusCode::UNAUTHORIZED, 401, "Please refresh the page")
    }

    fn access_denied() -> Self {
        Self::error(StatusCode::UNAUTHORIZED, 401, "Access denied.")
    }

    fn wrong_user() -> Self {
        Self::error(StatusCode::BAD_REQUEST, 301, "Wrong user.")
    }

    fn not_found(message: &str) -> Self {
        Self::error(StatusCode::NOT_FOUND, 0, message)
    }

    fn bad_request(message: &str) -> Self {
        Self::error(StatusCode::BAD_REQUEST, 0, message)
    }

    pub(crate) fn into_response(self) -> Response<SandboxBody> {
        let body = if self.cut {
            SandboxBody::cut(self.body)
        } else {
            SandboxBody::whole(self.body)
        };
        let mut res = Response::new(body);
        *res.status_mut() = self.status;
        res.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

async fn handle<B>(shared: Arc<Shared>, req: Request<B>) -> Response<SandboxBody>
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    if path == "/_sandbox" || path.starts_with("/_sandbox/") {
        let body = match read_body(body).await {
            Ok(body) => body,
            Err(answer) => return answer.into_response(),
        };
        return control::handle(&shared, &parts, &body).into_response();
    }

    shared.stats.count(path);
    let (body, answer, fault) = match read_body(body).await {
        Ok(body) => {
            let (answer, fault) = answer(&shared, &parts, &body);
            (body, answer, fault)
        }
        Err(answer) => (Bytes::new(), answer, None),
    };
    tracing::debug!(
        method = %parts.method,
        path = %path,
        status = answer.status.as_u16(),
        fault = fault.unwrap_or("none"),
        "sandbox request"
    );
    shared.stats.record(RecordedRequest {
        method: parts.method.clone(),
        path_and_query: path_and_query(&parts).to_owned(),
        headers: parts.headers.clone(),
        body,
        status: answer.status,
        fault,
    });
    if let Some(stall) = answer.stall {
        tokio::time::sleep(stall).await;
    }
    answer.into_response()
}

async fn read_body<B>(body: B) -> Result<Bytes, Answer>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, MAX_REQUEST_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Answer::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            0,
            "Request body is too large.",
        )),
        Err(_) => Err(Answer::bad_request("Could not read the request body.")),
    }
}

fn path_and_query(parts: &Parts) -> &str {
    parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path(), |pq| pq.as_str())
}

fn header<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts.headers.get(name).and_then(|v| v.to_str().ok())
}

/// Verifies the request, applies a pending fault, then serves the endpoint.
fn answer(shared: &Shared, parts: &Parts, body: &Bytes) -> (Answer, Option<&'static str>) {
    let user_id = match verify(shared, parts) {
        Ok(user_id) => user_id,
        Err(answer) => return (answer, None),
    };
    let Some(fault) = shared.faults.take(&user_id) else {
        return (endpoint(shared, parts, body, &user_id), None);
    };
    let name = fault.name();
    let answer = match fault {
        FaultMode::Fail(status) => Answer::error(
            status,
            i64::from(status.as_u16()),
            status.canonical_reason().unwrap_or("Server error"),
        ),
        FaultMode::Stall(duration) => Answer {
            stall: Some(duration),
            ..endpoint(shared, parts, body, &user_id)
        },
        FaultMode::Throttle { retry_after_secs } => Answer {
            retry_after: Some(retry_after_secs),
            ..Answer::error(StatusCode::TOO_MANY_REQUESTS, 429, "Too many requests.")
        },
        FaultMode::NonJson => Answer {
            status: StatusCode::OK,
            content_type: HTML,
            body: Bytes::from_static(
                b"<!DOCTYPE html><html><head><title>OnlyFans</title></head>\
                  <body><div id=\"app\">Please wait while we check your browser...</div></body></html>",
            ),
            retry_after: None,
            cut: false,
            stall: None,
        },
        FaultMode::CutBody => Answer {
            cut: true,
            ..endpoint(shared, parts, body, &user_id)
        },
        FaultMode::TwoFactor => Answer::json(
            StatusCode::BAD_REQUEST,
            &json!({"error": {
                "code": 101,
                "message": "Please confirm your identity with the code we sent you.",
                "payload": {"otpState": {
                    "type": "sms",
                    "phoneLast4": "0427",
                    "canResend": true,
                    "resendIn": 60,
                }},
            }}),
        ),
    };
    (answer, Some(name))
}

/// The upstream's checks, in its order. Returns the verified account id.
fn verify(shared: &Shared, parts: &Parts) -> Result<String, Answer> {
    // 1. The signature, over the path and query exactly as received.
    let (Some(sign), Some(time), Some(app_token)) = (
        header(parts, "sign"),
        header(parts, "time"),
        header(parts, "app-token"),
    ) else {
        return Err(Answer::refresh());
    };
    let rules = shared.current_rules();
    if app_token != rules.app_token() {
        return Err(Answer::refresh());
    }
    let Ok(time_ms) = time.parse::<u64>() else {
        return Err(Answer::refresh());
    };
    let skew = shared.max_time_skew_ms.load(Ordering::Relaxed);
    if shared.clock.now_ms().abs_diff(time_ms) > skew {
        return Err(Answer::refresh());
    }
    let claimed_user = header(parts, "user-id").unwrap_or("0");
    if !rules.verify(path_and_query(parts), claimed_user, time, sign) {
        return Err(Answer::refresh());
    }

    // 2. The session cookie.
    let mut sess = None;
    let mut auth_id = None;
    for value in parts.headers.get_all(http::header::COOKIE) {
        if let Ok(value) = value.to_str() {
            let (s, a) = parse_session_cookie(value);
            sess = sess.or(s);
            auth_id = auth_id.or(a);
        }
    }
    let (Some(sess), Some(auth_id)) = (sess, auth_id) else {
        return Err(Answer::access_denied());
    };
    let accounts = read(&shared.accounts);
    let Some(record) = accounts.get(auth_id) else {
        return Err(Answer::access_denied());
    };
    let ttl = shared.session_ttl_ms.load(Ordering::Relaxed);
    if record.sess != sess || !record.is_live(shared.clock.now_ms(), ttl) {
        return Err(Answer::access_denied());
    }

    // 3. The rest of the session must belong to the same user and browser.
    if header(parts, "user-id") != Some(auth_id)
        || header(parts, "x-bc") != Some(record.account.x_bc.as_str())
        || header(parts, "user-agent") != Some(record.account.user_agent.as_str())
    {
        return Err(Answer::wrong_user());
    }

    // 4. Writes carry JSON.
    let write = !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    let json = header(parts, "content-type").is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    });
    if write && !json {
        return Err(Answer::error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            0,
            "Content-Type must be application/json.",
        ));
    }
    Ok(auth_id.to_owned())
}

/// A decimal id as the upstream accepts it in a path.
fn parse_id(segment: &str) -> Option<u64> {
    if segment.is_empty() || !segment.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    segment.parse().ok()
}

fn endpoint(shared: &Shared, parts: &Parts, body: &Bytes, user_id: &str) -> Answer {
    let Some(route) = parts.uri.path().strip_prefix(API_BASE) else {
        return Answer::not_found("Not found.");
    };
    let segments: Vec<&str> = route.split('/').collect();
    let query = Query::parse(parts.uri.query());
    let method = &parts.method;
    let profile = || Profile::new(user_id);
    let ok = |value: Value| Answer::json(StatusCode::OK, &value);

    match (method, segments.as_slice()) {
        (&Method::GET, ["users", "me"]) => ok(profile().me()),
        (&Method::GET, ["chats"]) => ok(profile().chats(&query)),
        (&Method::GET, ["chats", id, "messages"]) => match parse_id(id) {
            Some(id) if id < MISSING_ID_FROM => ok(profile().messages(id, &query)),
            Some(_) => Answer::not_found("User not found"),
            None => Answer::not_found("Not found."),
        },
        (&Method::POST, ["chats", id, "messages"]) => match parse_id(id) {
            Some(id) if id < MISSING_ID_FROM => send_message(shared, body, user_id),
            Some(_) => Answer::not_found("User not found"),
            None => Answer::not_found("Not found."),
        },
        (&Method::DELETE, ["messages", id]) => match parse_id(id) {
            Some(id) if id < MISSING_ID_FROM => match optional_json(body) {
                Some(Value::Object(_)) | None => ok(json!({"success": true})),
                Some(_) => Answer::bad_request("Invalid request body."),
            },
            Some(_) => Answer::not_found("Message not found"),
            None => Answer::not_found("Not found."),
        },
        (&Method::GET, ["subscriptions", "subscribers"]) => match profile().subscribers(&query) {
            Some(list) => ok(list),
            None => Answer::bad_request("Wrong subscribers type."),
        },
        (&Method::GET, ["payouts", "balances"]) => ok(profile().balances()),
        (&Method::GET, ["payouts", "requests"]) => {
            ok(profile().payout_requests_page(false, &query))
        }
        (&Method::GET, ["payouts", "requests", "referral"]) => {
            ok(profile().payout_requests_page(true, &query))
        }
        (&Method::GET, ["payouts", "transactions"]) => ok(profile().transactions_page(&query)),
        (&Method::GET, ["payouts", "stats"]) => ok(profile().stats(&query)),
        _ => Answer::not_found("Not found."),
    }
}

/// `None` for an empty body, else the parsed JSON (`Some(Null)` when it is not JSON).
fn optional_json(body: &Bytes) -> Option<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    Some(serde_json::from_slice(body).unwrap_or(Value::Null))
}

fn send_message(shared: &Shared, body: &Bytes, user_id: &str) -> Answer {
    let Some(Value::Object(request)) = optional_json(body) else {
        return Answer::bad_request("Invalid request body.");
    };
    let text = match request.get("text") {
        None | Some(Value::Null) => "",
        Some(Value::String(text)) => text.as_str(),
        Some(_) => return Answer::bad_request("Text must be a string."),
    };
    let media = match request.get("mediaFiles") {
        None | Some(Value::Null) => 0,
        Some(Value::Array(items)) => items.len(),
        Some(_) => return Answer::bad_request("mediaFiles must be a list."),
    };
    match request.get("price") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) if n.as_f64().is_some_and(|p| p >= 0.0) => {}
        Some(_) => return Answer::bad_request("Wrong price."),
    }
    if text.trim().is_empty() && media == 0 {
        return Answer::bad_request("Message text is required.");
    }
    let id = shared.next_message_id.fetch_add(1, Ordering::Relaxed);
    let now_secs = i64::try_from(shared.clock.now_ms() / 1000).unwrap_or(i64::MAX);
    Answer::json(
        StatusCode::OK,
        &Profile::new(user_id).sent_message(id, &request, now_secs),
    )
}
