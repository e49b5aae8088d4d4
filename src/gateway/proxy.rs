//! The proxy service: the innermost service of the gateway's stack. It maps a priced route to
//! its upstream path (query passed on byte for byte), reads the client's body within the
//! configured limit, sends the request through the signed upstream client with the upstream
//! timeout, and reads the upstream's answer whole (the envelope needs it whole anyway), so a
//! stalled or broken body becomes a clean 504 or 502 that the credit meter never bills.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tower::ServiceExt;
use tower_service::Service;

use tollgate_core::{BoxError, BoxFuture, CostTable, ErrorCode, Rejection, RouteMatch};

/// The most the proxy reads of an upstream answer.
const MAX_UPSTREAM_BODY: usize = 32 * 1024 * 1024;

/// Forwards priced routes upstream through `client` (the signed upstream client).
pub struct Proxy<C> {
    client: C,
    shared: Arc<Shared>,
}

struct Shared {
    /// The upstream base plus the API prefix, e.g. `http://127.0.0.1:8081/api2/v2/`.
    api_base: String,
    body_limit: usize,
    timeout: Duration,
    table: CostTable,
    metrics: Option<Arc<super::metrics::Metrics>>,
}

impl<C: Clone> Clone for Proxy<C> {
    fn clone(&self) -> Self {
        Proxy {
            client: self.client.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<C> std::fmt::Debug for Proxy<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("api_base", &self.shared.api_base)
            .field("body_limit", &self.shared.body_limit)
            .field("timeout", &self.shared.timeout)
            .finish()
    }
}

impl<C> Proxy<C> {
    /// `upstream` is the upstream's base URL (`https://onlyfans.com`); paths go to
    /// `/api2/v2/…` under it.
    pub fn new(client: C, upstream: &str, body_limit: usize, timeout: Duration) -> Self {
        Proxy {
            client,
            shared: Arc::new(Shared {
                api_base: format!("{}/api2/v2/", upstream.trim_end_matches('/')),
                body_limit,
                timeout,
                table: CostTable::onlyfans(),
                metrics: None,
            }),
        }
    }

    /// Counts upstream and signer failures in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<super::metrics::Metrics>) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.metrics = Some(metrics);
        }
        self
    }

    /// Uses another cost table (for routes not in an outer `RouteMatch`).
    pub fn with_cost_table(mut self, table: CostTable) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.table = table;
        }
        self
    }
}

fn reject(code: ErrorCode) -> Response<Full<Bytes>> {
    Rejection::new(code).into_response()
}

impl<C, ReqBody, RB> Service<Request<ReqBody>> for Proxy<C>
where
    C: Service<Request<Full<Bytes>>, Response = Response<RB>> + Clone + Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Full<Bytes>>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The client is driven with `oneshot` per request; readiness is checked there.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let client = self.client.clone();
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            let Some(route) = shared.table.resolve(&mut req) else {
                return Ok(reject(ErrorCode::NotFound));
            };
            Ok(forward(client, &shared, route, req).await)
        })
    }
}

async fn forward<C, ReqBody, RB>(
    client: C,
    shared: &Shared,
    route: RouteMatch,
    req: Request<ReqBody>,
) -> Response<Full<Bytes>>
where
    C: Service<Request<Full<Bytes>>, Response = Response<RB>> + Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
{
    let Some(target) = route.route().upstream() else {
        return reject(ErrorCode::NotFound);
    };
    let Some(path_and_query) = route.upstream_path_and_query(req.uri().query()) else {
        return reject(ErrorCode::NotFound);
    };
    let uri = format!("{}{}", shared.api_base, path_and_query);
    let method = target.method().clone();

    // The client's body, within the limit; writes always carry JSON (`{}` when empty).
    let declared_too_large = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > shared.body_limit as u64);
    if declared_too_large {
        return reject(ErrorCode::PayloadTooLarge);
    }
    // A client that declares a body and then stalls must not hold a connection (and a credit
    // hold) forever.
    let read = Limited::new(req.into_body(), shared.body_limit).collect();
    let body = match tokio::time::timeout(shared.timeout, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<LengthLimitError>() => return reject(ErrorCode::PayloadTooLarge),
        Ok(Err(_)) => {
            return Rejection::new(ErrorCode::InvalidRequest)
                .with_message("The request body could not be read.")
                .into_response()
        }
        Err(_) => {
            return Rejection::new(ErrorCode::InvalidRequest)
                .with_status(StatusCode::REQUEST_TIMEOUT)
                .with_message("The request body was not received in time.")
                .into_response()
        }
    };
    let is_write = matches!(
        method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    let body = if body.is_empty() && is_write {
        Bytes::from_static(b"{}")
    } else {
        body
    };
    if !body.is_empty() && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
        return Rejection::new(ErrorCode::InvalidRequest)
            .with_message("The request body must be JSON.")
            .into_response();
    }

    let mut upstream_req = match Request::builder()
        .method(method)
        .uri(&uri)
        .body(Full::new(body))
    {
        Ok(r) => r,
        Err(_) => return reject(ErrorCode::NotFound),
    };
    if is_write {
        upstream_req
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    if let Some(model) = route.model() {
        upstream_req.extensions_mut().insert(model);
    }
    upstream_req.extensions_mut().insert(route);

    let exchange = async move {
        let res = client.oneshot(upstream_req).await.map_err(Into::into)?;
        let (parts, body) = res.into_parts();
        let bytes = Limited::new(body, MAX_UPSTREAM_BODY)
            .collect()
            .await?
            .to_bytes();
        Ok::<_, BoxError>((parts, bytes))
    };
    let count = |backend: &'static str| {
        if let Some(m) = &shared.metrics {
            m.record_backend_error(backend);
        }
    };
    match tokio::time::timeout(shared.timeout, exchange).await {
        Err(_) => {
            count("upstream");
            reject(ErrorCode::UpstreamTimeout)
        }
        Ok(Err(e)) => {
            count("upstream");
            tracing::warn!(error = %e, "upstream exchange failed");
            reject(ErrorCode::UpstreamError)
        }
        Ok(Ok((mut parts, bytes))) => {
            match parts.extensions.get::<ErrorCode>() {
                Some(ErrorCode::UpstreamError | ErrorCode::UpstreamTimeout) => count("upstream"),
                Some(ErrorCode::SigningFailed) => count("signer"),
                _ => {}
            }
            // Only what describes the body (and a rejection's Retry-After) goes back to the
            // customer: upstream cookies, hop-by-hop and server headers stay behind.
            let mut headers = http::HeaderMap::new();
            for name in [CONTENT_TYPE, http::header::RETRY_AFTER] {
                if let Some(v) = parts.headers.remove(&name) {
                    headers.insert(name, v);
                }
            }
            parts.headers = headers;
            let bytes = if parts.status == StatusCode::NO_CONTENT {
                Bytes::new()
            } else {
                bytes
            };
            Response::from_parts(parts, Full::new(bytes))
        }
    }
}
