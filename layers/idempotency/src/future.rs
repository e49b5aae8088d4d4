//! [`ResponseFuture`], and the life of a guarded request: fingerprint, claim the key, run,
//! store (or release).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use pin_project_lite::pin_project;
use tollgate_core::{BoxError, BoxFuture, CreditReceipt, ErrorCode, GateBody, Rejection};
use tower_service::Service;

use crate::body::IdempotencyBody;
use crate::guard::{finish_detached, LeaseGuard};
use crate::layer::Config;
use crate::store::{Begin, Fingerprint, StoredResponse};

/// The backend name on a store failure's [`BackendFailure`](tollgate_core::BackendFailure).
pub const BACKEND: &str = "idempotency";

pin_project! {
    /// The response future of [`Idempotency`](crate::Idempotency): the inner future itself
    /// for requests the layer does not guard, a ready refusal, or the guarded run.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Passthrough { #[pin] future: F },
        Ready { response: Option<Response<IdempotencyBody<B>>> },
        Guarded { future: BoxFuture<Result<Response<IdempotencyBody<B>>, E>> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn passthrough(future: F) -> Self {
        ResponseFuture {
            kind: Kind::Passthrough { future },
        }
    }

    pub(crate) fn reject(rejection: Rejection) -> Self {
        ResponseFuture {
            kind: Kind::Ready {
                response: Some(rejection.into_response()),
            },
        }
    }

    pub(crate) fn guarded(future: BoxFuture<Result<Response<IdempotencyBody<B>>, E>>) -> Self {
        ResponseFuture {
            kind: Kind::Guarded { future },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<IdempotencyBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { future } => {
                let res = ready!(future.poll(cx))?;
                Poll::Ready(Ok(res.map(IdempotencyBody::inner)))
            }
            KindProj::Ready { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after completion"))),
            KindProj::Guarded { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Ready { .. } => "Ready",
            Kind::Guarded { .. } => "Guarded",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

fn refuse<B>(rejection: Rejection) -> Response<IdempotencyBody<B>> {
    rejection.into_response()
}

/// A guarded request from start to end.
pub(crate) async fn guarded<S, ReqBody, ResBody>(
    config: Arc<Config>,
    mut service: S,
    req: Request<ReqBody>,
    key: String,
) -> Result<Response<IdempotencyBody<ResBody>>, S::Error>
where
    S: Service<Request<GateBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body<Data = Bytes>,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    let Some(scope) = (config.scope)(&parts) else {
        tracing::error!(
            "IdempotencyLayer found no scope for a request with an Idempotency-Key: by \
             default it scopes keys to the org of tollgate_core::Principal, so it must run \
             inside the auth layer (or be given IdempotencyLayer::with_scope)"
        );
        return Ok(refuse(Rejection::new(ErrorCode::InternalError)));
    };

    // The whole body, bounded, to fingerprint it.
    let body = match Limited::new(body, config.max_request_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
            return Ok(refuse(Rejection::new(ErrorCode::PayloadTooLarge)));
        }
        Err(err) => {
            tracing::debug!(error = %err, "request body failed while buffering it");
            return Ok(refuse(
                Rejection::new(ErrorCode::InvalidRequest)
                    .with_message("The request body could not be read."),
            ));
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str());
    let fingerprint = Fingerprint::new(&parts.method, path, &body);

    let lease = match config
        .store
        .begin(&scope, &key, fingerprint, config.lease_ttl)
        .await
    {
        Ok(Begin::Started(lease)) => lease,
        Ok(Begin::Replay(stored)) => return Ok(stored.to_response()),
        Ok(Begin::InFlight) => {
            return Ok(refuse(
                Rejection::new(ErrorCode::IdempotencyInProgress).with_retry_after(1),
            ))
        }
        Ok(Begin::Mismatch) => return Ok(refuse(Rejection::new(ErrorCode::IdempotencyKeyReused))),
        Err(err) => {
            tracing::warn!(error = %err, "idempotency store failed; refusing the request unguarded");
            // Never run it without the guard: the client retries a 503.
            return Ok(refuse(
                Rejection::new(ErrorCode::ServiceUnavailable).with_backend_failure(BACKEND),
            ));
        }
    };
    // From here on, a drop (the client hung up) or an early return releases the key.
    let mut guard = LeaseGuard::new(lease, Arc::clone(&config.releaser));

    let req = Request::from_parts(parts, GateBody::full(body));
    let res = service.call(req).await?;

    let status = res.status();
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        // Not stored, so the client can retry: free the key before answering, so the retry
        // does not find it still in flight.
        release_now(&config, &mut guard).await;
        return Ok(res.map(IdempotencyBody::inner));
    }

    let (parts, body) = res.into_parts();
    let mut body = Box::pin(body);
    let max = config.max_response_body;
    let mut buf = BytesMut::new();
    let outcome: Result<(), Option<BoxError>> = loop {
        if buf.len() as u64 + body.size_hint().lower() > max as u64 {
            break Err(None);
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > max {
                        // Pass this chunk on after what was buffered.
                        buf.extend_from_slice(&data);
                        break Err(None);
                    }
                    buf.extend_from_slice(&data);
                }
                // Trailers are not stored or passed on.
            }
            Some(Err(err)) => break Err(Some(err.into())),
            None => break Ok(()),
        }
    };
    let buf = buf.freeze();
    match outcome {
        Err(None) => {
            tracing::debug!(max, "response too large to store for replay; key released");
            release_now(&config, &mut guard).await;
            return Ok(Response::from_parts(
                parts,
                IdempotencyBody::rest(buf, body),
            ));
        }
        Err(Some(err)) => {
            release_now(&config, &mut guard).await;
            return Ok(Response::from_parts(
                parts,
                IdempotencyBody::failed(buf, err),
            ));
        }
        Ok(()) => {}
    }
    drop(body);
    // A credit meter inside that could not record the charge withholds the response (an
    // outer envelope answers 503): that is not an answer to replay.
    let unrecorded = parts
        .extensions
        .get::<CreditReceipt>()
        .is_some_and(CreditReceipt::is_unrecorded);
    if unrecorded {
        release_now(&config, &mut guard).await;
        return Ok(Response::from_parts(parts, IdempotencyBody::full(buf)));
    }

    let stored = StoredResponse {
        status,
        headers: config
            .replayed_headers
            .iter()
            .flat_map(|name| {
                parts
                    .headers
                    .get_all(name)
                    .iter()
                    .map(|v: &HeaderValue| (name.clone(), v.clone()))
            })
            .collect(),
        body: buf.clone(),
    };
    if let Some(lease) = guard.disarm() {
        let store = Arc::clone(&config.store);
        let ttl = config.ttl;
        // On its own task: a client hanging up now does not lose the record of a request
        // that ran (and may have been billed).
        let done = finish_detached(async move { store.complete(&lease, stored, ttl).await }).await;
        match done {
            Some(Ok(true)) => {}
            Some(Ok(false)) => tracing::warn!(
                "idempotency lease expired and was taken over before the response was stored"
            ),
            Some(Err(err)) => tracing::warn!(
                error = %err,
                "could not store the response for replay; the key stays in flight until its lease TTL"
            ),
            None => tracing::warn!("storing the response for replay was cancelled"),
        }
    }
    Ok(Response::from_parts(parts, IdempotencyBody::full(buf)))
}

/// Frees the key and waits for it (on its own task, so a hang-up does not cut it short).
async fn release_now(config: &Config, guard: &mut LeaseGuard) {
    let Some(lease) = guard.disarm() else { return };
    let store = Arc::clone(&config.store);
    let done = finish_detached(async move { store.release(&lease).await }).await;
    if let Some(Err(err)) = done {
        tracing::warn!(error = %err, "could not release an idempotency lease; it is freed when its TTL passes");
    }
}
