//! Helpers shared by the integration tests: a counting inner app, requests carrying a
//! `Principal` (as `ApiKeyAuthLayer` would set it), and a collected view of responses.

#![allow(dead_code)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tollgate_core::{ErrorCode, GateBody, KeyId, ModelId, OrgId, Plan, Principal, RateLimitInfo};
use tollgate_sliding_window::PerModelSlidingWindowLayer;
use tower::util::BoxCloneService;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

pub type Body = Full<Bytes>;
pub type Api = BoxCloneService<Request<Body>, Response<GateBody<Body>>, Infallible>;

/// The body the inner app answers with.
pub const INNER_BODY: &str = r#"{"ok":true}"#;

/// The exact 429 body of SPEC §2.
pub const RATE_LIMITED_BODY: &str =
    r#"{"error":"Rate limit exceeded. Slow down and try again.","code":"RATE_LIMIT_EXCEEDED"}"#;

/// The inner app: counts its calls and answers 200 `{"ok":true}` with an `x-inner` header.
pub fn stack<W>(layer: PerModelSlidingWindowLayer<W>, calls: Arc<AtomicUsize>) -> Api
where
    W: tollgate_sliding_window::WindowStore,
{
    let app = service_fn(move |_req: Request<Body>| {
        let calls = Arc::clone(&calls);
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let mut res = Response::new(Full::new(Bytes::from_static(INNER_BODY.as_bytes())));
            res.headers_mut().insert("x-inner", "yes".parse().unwrap());
            Ok::<_, Infallible>(res)
        }
    });
    BoxCloneService::new(ServiceBuilder::new().layer(layer).service(app))
}

/// An org on `plan` calling with a fresh key.
pub fn principal(plan: Plan) -> Principal {
    Principal {
        org: OrgId::new(),
        key: KeyId::new(),
        plan,
    }
}

/// `GET /api/models/{model}/users/me` from `who`.
pub fn get(model: ModelId, who: Principal) -> Request<Body> {
    let mut req = Request::get(format!("/api/models/{model}/users/me"))
        .body(Body::default())
        .unwrap();
    req.extensions_mut().insert(who);
    req
}

/// A response, collected.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub info: Option<RateLimitInfo>,
    pub code: Option<ErrorCode>,
    pub backend_failure: Option<tollgate_core::BackendFailure>,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// `(RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, Retry-After)`.
    pub fn limits(&self) -> (Option<&str>, Option<&str>, Option<&str>, Option<&str>) {
        (
            self.header("ratelimit-limit"),
            self.header("ratelimit-remaining"),
            self.header("ratelimit-reset"),
            self.header("retry-after"),
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

pub async fn send(api: &mut Api, req: Request<Body>) -> Reply {
    let res = api.ready().await.unwrap().call(req).await.unwrap();
    let (parts, body) = res.into_parts();
    Reply {
        status: parts.status,
        info: parts.extensions.get::<RateLimitInfo>().copied(),
        code: parts.extensions.get::<ErrorCode>().copied(),
        backend_failure: parts
            .extensions
            .get::<tollgate_core::BackendFailure>()
            .copied(),
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// Asserts an admitted request: the inner app's answer, with the window's headers.
#[track_caller]
pub fn assert_admitted(reply: &Reply, limit: u32, remaining: u32, reset_secs: u64) {
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body, INNER_BODY);
    assert_eq!(reply.header("x-inner"), Some("yes"));
    let (l, r, s) = (
        limit.to_string(),
        remaining.to_string(),
        reset_secs.to_string(),
    );
    assert_eq!(reply.limits(), (Some(&*l), Some(&*r), Some(&*s), None));
    assert_eq!(
        reply.info,
        Some(RateLimitInfo {
            limit,
            remaining,
            reset_secs,
            retry_after_secs: None
        })
    );
}

/// Asserts a 429 `RATE_LIMIT_EXCEEDED` with the exact body and headers.
#[track_caller]
pub fn assert_limited(reply: &Reply, limit: u32, remaining: u32, reset_secs: u64, retry: u64) {
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{reply:?}");
    assert_eq!(reply.body, RATE_LIMITED_BODY);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("x-inner"), None);
    assert_eq!(reply.code, Some(ErrorCode::RateLimitExceeded));
    let (l, r, s, a) = (
        limit.to_string(),
        remaining.to_string(),
        reset_secs.to_string(),
        retry.to_string(),
    );
    assert_eq!(reply.limits(), (Some(&*l), Some(&*r), Some(&*s), Some(&*a)));
    assert_eq!(
        reply.info,
        Some(RateLimitInfo {
            limit,
            remaining,
            reset_secs,
            retry_after_secs: Some(retry)
        })
    );
}
