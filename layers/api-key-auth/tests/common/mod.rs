//! Shared test fixtures: an org with a plan, a model and a key in a memory store; an inner
//! service that reports what it saw; stores that fail or wait on command.
#![allow(dead_code)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;
use tollgate_api_key_auth::{
    ApiKeyAuthLayer, KeyGrant, KeyHash, KeyInfo, KeySpec, KeyStore, MemoryKeyStore, NewKey,
};
use tollgate_core::{
    BackendError, BackendErrorKind, BoxFuture, ErrorCode, GateBody, KeyId, ManualClock, ModelId,
    OrgId, Plan, Principal, RouteMatch,
};
use tower::{Service, ServiceBuilder, ServiceExt};

pub const START_MS: u64 = 1_700_000_000_000;

pub const INVALID_KEY_BODY: &str =
    r#"{"error":"The API key is missing, unknown or revoked.","code":"INVALID_API_KEY"}"#;
pub const NO_SUBSCRIPTION_BODY: &str = r#"{"error":"The organization has no active subscription. Subscribe to a plan to use the API.","code":"NO_SUBSCRIPTION"}"#;

/// An org with a plan (or none), one model and one key.
pub struct Fixture {
    pub store: Arc<MemoryKeyStore>,
    pub clock: ManualClock,
    pub org: OrgId,
    pub model: ModelId,
    pub key: NewKey,
}

impl Fixture {
    pub async fn new(plan: Option<Plan>) -> Self {
        let clock = ManualClock::new(START_MS);
        let store = Arc::new(MemoryKeyStore::new(Arc::new(clock.clone())));
        let org = OrgId::new();
        let model = ModelId::new();
        store.set_subscription(org, plan).await.unwrap();
        assert!(store.add_model(org, model).await.unwrap());
        let key = store.create_key(org, "primary".to_owned()).await.unwrap();
        Fixture {
            store,
            clock,
            org,
            model,
            key,
        }
    }

    /// The layer over this fixture's store, on its clock.
    pub fn layer(&self) -> ApiKeyAuthLayer {
        ApiKeyAuthLayer::new(Arc::clone(&self.store)).with_clock(Arc::new(self.clock.clone()))
    }

    pub fn now(&self) -> u64 {
        tollgate_core::Clock::now_ms(&self.clock)
    }

    pub fn users_me(&self) -> String {
        model_path(self.model)
    }
}

pub fn model_path(model: ModelId) -> String {
    format!("/api/models/{model}/users/me")
}

pub fn get(path: &str) -> http::request::Builder {
    Request::get(path)
}

pub fn with_key(path: &str, key: &str) -> Request<Full<Bytes>> {
    get(path)
        .header("x-api-key", key)
        .body(Full::default())
        .unwrap()
}

pub fn empty(builder: http::request::Builder) -> Request<Full<Bytes>> {
    builder.body(Full::default()).unwrap()
}

/// What the inner service saw, as JSON: the principal, the route, and whether the key header
/// reached it. Counts its calls.
#[derive(Clone, Default)]
pub struct Echo {
    pub calls: Arc<AtomicUsize>,
}

impl Echo {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn service(
        &self,
    ) -> impl Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible>
           + Clone
           + Send
           + 'static {
        let calls = Arc::clone(&self.calls);
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let principal = req.extensions().get::<Principal>().copied();
            let route = req
                .extensions()
                .get::<RouteMatch>()
                .map(|m| m.template().to_owned());
            let body = serde_json::json!({
                "org": principal.map(|p| p.org.to_string()),
                "key": principal.map(|p| p.key.to_string()),
                "plan": principal.map(|p| p.plan.name()),
                "route": route,
                "x_api_key_forwarded": req.headers().contains_key("x-api-key"),
            });
            // Unmatched routes get a 404 from "the router", as in the gateway.
            let status = if route.is_some() {
                StatusCode::OK
            } else {
                StatusCode::NOT_FOUND
            };
            async move {
                let mut res = Response::new(Full::from(body.to_string()));
                *res.status_mut() = status;
                Ok::<_, Infallible>(res)
            }
        })
    }
}

/// A response, collected.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub extensions: http::Extensions,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }

    pub fn principal(&self) -> Option<Principal> {
        self.extensions.get::<Principal>().copied()
    }

    pub fn code(&self) -> Option<ErrorCode> {
        self.extensions.get::<ErrorCode>().copied()
    }
}

pub async fn collect<B>(res: Response<GateBody<B>>) -> Answer
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = res.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        extensions: parts.extensions,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// Sends one request through `layer` over the echo service.
pub async fn send(layer: &ApiKeyAuthLayer, echo: &Echo, req: Request<Full<Bytes>>) -> Answer {
    let mut svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(echo.service());
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    collect(res).await
}

/// A memory store whose methods can be made to fail.
pub struct FailingStore {
    pub inner: Arc<MemoryKeyStore>,
    pub lookup: Option<BackendErrorKind>,
    pub owns_model: Option<BackendErrorKind>,
}

fn failure(kind: BackendErrorKind) -> BackendError {
    match kind {
        BackendErrorKind::Unavailable => BackendError::unavailable("connection refused"),
        BackendErrorKind::Other => BackendError::other("unexpected row"),
    }
}

impl KeyStore for FailingStore {
    fn lookup(&self, hash: KeyHash) -> BoxFuture<Result<Option<KeyGrant>, BackendError>> {
        match self.lookup {
            Some(kind) => Box::pin(std::future::ready(Err(failure(kind)))),
            None => self.inner.lookup(hash),
        }
    }
    fn owns_model(&self, org: OrgId, model: ModelId) -> BoxFuture<Result<bool, BackendError>> {
        match self.owns_model {
            Some(kind) => Box::pin(std::future::ready(Err(failure(kind)))),
            None => self.inner.owns_model(org, model),
        }
    }
    fn record_use(&self, key: KeyId, at_ms: u64) {
        self.inner.record_use(key, at_ms)
    }
    fn set_subscription(
        &self,
        org: OrgId,
        plan: Option<Plan>,
    ) -> BoxFuture<Result<(), BackendError>> {
        self.inner.set_subscription(org, plan)
    }
    fn add_model(&self, org: OrgId, model: ModelId) -> BoxFuture<Result<bool, BackendError>> {
        self.inner.add_model(org, model)
    }
    fn create_key_with(
        &self,
        org: OrgId,
        name: String,
        spec: KeySpec,
    ) -> BoxFuture<Result<NewKey, BackendError>> {
        self.inner.create_key_with(org, name, spec)
    }
    fn revoke_key(&self, key: KeyId) -> BoxFuture<Result<bool, BackendError>> {
        self.inner.revoke_key(key)
    }
    fn rotate_key_with_grace(
        &self,
        key: KeyId,
        grace_ms: u64,
    ) -> BoxFuture<Result<Option<NewKey>, BackendError>> {
        self.inner.rotate_key_with_grace(key, grace_ms)
    }
    fn list_keys(&self, org: OrgId) -> BoxFuture<Result<Vec<KeyInfo>, BackendError>> {
        self.inner.list_keys(org)
    }
    fn key_info(&self, key: KeyId) -> BoxFuture<Result<Option<KeyInfo>, BackendError>> {
        self.inner.key_info(key)
    }
}

/// A memory store whose lookups and ownership checks wait for a permit, like a slow
/// database, so tests can observe the layer while the store has not answered.
pub struct GatedStore {
    pub inner: Arc<MemoryKeyStore>,
    pub gate: Arc<Semaphore>,
}

impl GatedStore {
    pub fn new(inner: Arc<MemoryKeyStore>) -> Self {
        GatedStore {
            inner,
            gate: Arc::new(Semaphore::new(0)),
        }
    }

    async fn pass(gate: &Semaphore) {
        gate.acquire().await.unwrap().forget();
    }
}

impl KeyStore for GatedStore {
    fn lookup(&self, hash: KeyHash) -> BoxFuture<Result<Option<KeyGrant>, BackendError>> {
        let (gate, inner) = (Arc::clone(&self.gate), Arc::clone(&self.inner));
        Box::pin(async move {
            Self::pass(&gate).await;
            inner.lookup(hash).await
        })
    }
    fn owns_model(&self, org: OrgId, model: ModelId) -> BoxFuture<Result<bool, BackendError>> {
        let (gate, inner) = (Arc::clone(&self.gate), Arc::clone(&self.inner));
        Box::pin(async move {
            Self::pass(&gate).await;
            inner.owns_model(org, model).await
        })
    }
    fn record_use(&self, key: KeyId, at_ms: u64) {
        self.inner.record_use(key, at_ms)
    }
    fn set_subscription(
        &self,
        org: OrgId,
        plan: Option<Plan>,
    ) -> BoxFuture<Result<(), BackendError>> {
        self.inner.set_subscription(org, plan)
    }
    fn add_model(&self, org: OrgId, model: ModelId) -> BoxFuture<Result<bool, BackendError>> {
        self.inner.add_model(org, model)
    }
    fn create_key_with(
        &self,
        org: OrgId,
        name: String,
        spec: KeySpec,
    ) -> BoxFuture<Result<NewKey, BackendError>> {
        self.inner.create_key_with(org, name, spec)
    }
    fn revoke_key(&self, key: KeyId) -> BoxFuture<Result<bool, BackendError>> {
        self.inner.revoke_key(key)
    }
    fn rotate_key_with_grace(
        &self,
        key: KeyId,
        grace_ms: u64,
    ) -> BoxFuture<Result<Option<NewKey>, BackendError>> {
        self.inner.rotate_key_with_grace(key, grace_ms)
    }
    fn list_keys(&self, org: OrgId) -> BoxFuture<Result<Vec<KeyInfo>, BackendError>> {
        self.inner.list_keys(org)
    }
    fn key_info(&self, key: KeyId) -> BoxFuture<Result<Option<KeyInfo>, BackendError>> {
        self.inner.key_info(key)
    }
}

pub fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}
