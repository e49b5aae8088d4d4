//! The gateway's top-level service: health, metrics and admin endpoints, and the customer API
//! behind the layers in the order of docs/contract.md §9.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;
use tower_service::Service;

use tollgate_core::ext::X_REQUEST_ID;
use tollgate_core::{
    BackendFailure, BoxError, BoxFuture, CostTable, ErrorCode, Rejection, RequestId,
};

use super::completion::{Completion, ResponseBody};
use super::readiness::Readiness;
use super::state::AppState;

/// The boxed body the gateway's services answer with.
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

/// Request extension: the address of the client at the other end of the connection (as
/// the listener accepted it; a proxy in front shows as the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub SocketAddr);

/// Requests whose headers add up to more than this get a 431 (hyper itself refuses far larger
/// ones before we see them).
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Requests whose URI (path and query) is longer than this get a 414.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// The public listener: `/api`, `/dashboard` (customers' sign-in only) and `/healthz`.
    Public,
    /// The internal listener: `/admin`, `/dashboard` (the operator's admin-token sign-in
    /// too), `/metrics`, `/readyz` and `/healthz`.
    Internal,
    /// Both on one listener (`TOLLGATE_ADMIN_BIND=public`).
    Both,
}

impl Surface {
    fn public(self) -> bool {
        matches!(self, Surface::Public | Surface::Both)
    }

    fn internal(self) -> bool {
        matches!(self, Surface::Internal | Surface::Both)
    }
}

/// Boxes any body into [`GatewayBody`].
pub fn boxed<B>(body: B) -> GatewayBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// Boxes a response's body into [`GatewayBody`].
pub fn box_response<B>(res: Response<B>) -> Response<GatewayBody>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    res.map(boxed)
}

fn full_response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<GatewayBody> {
    let mut res = Response::new(boxed(Full::new(body.into())));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

fn rejection(r: Rejection) -> Response<GatewayBody> {
    r.into_response::<Full<Bytes>>().map(boxed)
}

/// The top-level service, over the customer API stack `A`.
///
/// It implements hyper's `Service` (`call(&self)`), so serving a request clones only the
/// (unboxed, allocation-free to clone) customer stack, and tower's `Service` for tests.
pub struct App<A> {
    state: Arc<AppState>,
    api: A,
    table: CostTable,
    surface: Surface,
    peer: Option<SocketAddr>,
}

impl<A: Clone> Clone for App<A> {
    fn clone(&self) -> Self {
        App {
            state: Arc::clone(&self.state),
            api: self.api.clone(),
            table: self.table.clone(),
            surface: self.surface,
            peer: self.peer,
        }
    }
}

impl<A> std::fmt::Debug for App<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl<A> App<A> {
    /// The top-level service over the state and the customer API stack, serving every
    /// endpoint.
    pub fn new(state: Arc<AppState>, api: A) -> Self {
        App {
            state,
            api,
            table: CostTable::onlyfans(),
            surface: Surface::Both,
            peer: None,
        }
    }

    /// The service for one accepted connection from `peer`: every request on it carries a
    /// [`PeerAddr`] extension (the admin API's lockout is per client address).
    pub fn for_peer(&self, peer: SocketAddr) -> Self
    where
        A: Clone,
    {
        App {
            peer: Some(peer),
            ..self.clone()
        }
    }

    /// Serves only the endpoints of `surface` (the others answer 404 `NOT_FOUND`).
    pub fn with_surface(mut self, surface: Surface) -> Self {
        self.surface = surface;
        self
    }
}

impl<A, B> Service<Request<B>> for App<A>
where
    A: Service<Request<B>, Response = Response<GatewayBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    A::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ResponseBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.dispatch(req)
    }
}

impl<A, B> hyper::service::Service<Request<B>> for App<A>
where
    A: Service<Request<B>, Response = Response<GatewayBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    A::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ResponseBody>, Infallible>>;

    fn call(&self, req: Request<B>) -> Self::Future {
        self.dispatch(req)
    }
}

impl<A> App<A> {
    fn dispatch<B>(
        &self,
        mut req: Request<B>,
    ) -> BoxFuture<Result<Response<ResponseBody>, Infallible>>
    where
        A: Service<Request<B>, Response = Response<GatewayBody>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        A::Future: Send,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if let Some(peer) = self.peer {
            req.extensions_mut().insert(PeerAddr(peer));
        }
        let header_bytes: usize = req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        let uri_bytes = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
        let too_large = if uri_bytes > MAX_URI_BYTES {
            Some((StatusCode::URI_TOO_LONG, "The request URI is too long."))
        } else if header_bytes > MAX_HEADER_BYTES {
            Some((
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "The request headers are too large.",
            ))
        } else {
            None
        };
        if let Some((status, message)) = too_large {
            let mut res = rejection(
                Rejection::new(ErrorCode::InvalidRequest)
                    .with_status(status)
                    .with_message(message),
            );
            let id = RequestId::from_headers_or_generate(req.headers());
            res.headers_mut()
                .insert(X_REQUEST_ID.clone(), id.to_header_value());
            return Box::pin(std::future::ready(Ok(res.map(ResponseBody::new))));
        }
        let path = req.uri().path();
        if self.surface.public() && (path == "/api" || path.starts_with("/api/")) {
            // The request logger gives customer API responses their X-Request-Id.
            let state = Arc::clone(&self.state);
            let started = Instant::now();
            let head_only = req.method() == Method::HEAD;
            // Resolved once here; every layer inside reuses the match from the extensions.
            let route = self.table.resolve(&mut req);
            // Counts the request as abandoned if this future, or later the body, is dropped
            // before the end.
            let mut completion = Completion::new(Arc::clone(&state.metrics), route);
            let api = self.api.clone();
            return Box::pin(async move {
                let res = api.oneshot(req).await?;
                let code = res
                    .extensions()
                    .get::<ErrorCode>()
                    .map_or("OK", |c| c.as_str());
                state
                    .metrics
                    .record_request(completion.template(), code, started.elapsed());
                if let Some(failure) = res.extensions().get::<BackendFailure>() {
                    state.metrics.record_backend_error(failure.backend);
                }
                if head_only {
                    // hyper sends no body for HEAD and drops it.
                    completion.disarm();
                }
                Ok(res.map(|body| ResponseBody::watched(body, completion)))
            });
        }
        // Everything else gets its X-Request-Id here: every response carries one.
        let id = RequestId::from_headers_or_generate(req.headers());
        let fut = self.local(req);
        Box::pin(async move {
            let mut res = fut.await?;
            res.headers_mut()
                .insert(X_REQUEST_ID.clone(), id.to_header_value());
            Ok(res.map(ResponseBody::new))
        })
    }

    /// Health, the dashboard, metrics and the admin API (these two where this listener
    /// serves them), and 404 for the rest.
    fn local<B>(&self, req: Request<B>) -> BoxFuture<Result<Response<GatewayBody>, Infallible>>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let state = Arc::clone(&self.state);
        let internal = self.surface.internal();
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => Box::pin(std::future::ready(Ok(full_response(
                StatusCode::OK,
                "application/json",
                r#"{"status":"ok"}"#,
            )))),
            // Draining: load balancers take this replica out while it finishes its requests.
            (&Method::GET, "/readyz") if internal && state.is_draining() => {
                Box::pin(std::future::ready(Ok(full_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "application/json",
                    r#"{"status":"draining"}"#,
                ))))
            }
            (&Method::GET, "/readyz") if internal => Box::pin(async move {
                let report = Readiness::report(&state).await;
                let status = if report.ready() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                Ok(full_response(
                    status,
                    "application/json",
                    report.to_json().to_string(),
                ))
            }),
            (&Method::GET, "/metrics") if internal => {
                let text = state.metrics.render(state.gauges());
                Box::pin(std::future::ready(Ok(full_response(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    text,
                ))))
            }
            (_, p) if p == "/dashboard" || p.starts_with("/dashboard/") => {
                Box::pin(async move { Ok(super::dashboard::handle(&state, req, internal).await) })
            }
            (_, p) if internal && (p == "/admin" || p.starts_with("/admin/")) => {
                Box::pin(async move { Ok(super::admin::handle(&state, req).await.map(boxed)) })
            }
            _ => Box::pin(std::future::ready(Ok(rejection(Rejection::new(
                ErrorCode::NotFound,
            ))))),
        }
    }
}
