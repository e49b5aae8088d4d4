//! [`LoggedBody`] and the guard that writes the request's log row exactly once.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::Response;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tollgate_core::{
    CreditReceipt, ErrorCode, Identity, IdentitySlot, ModelId, Principal, RequestId,
};
use tracing::Span;

use crate::layer::Shared;
use crate::record::LogRecord;

/// Status recorded when the client went away before a response (nginx's convention).
pub const STATUS_CLIENT_CLOSED: u16 = 499;

/// The facts of one request; writes its log row when dropped, exactly once.
pub(crate) struct LogGuard {
    shared: Arc<Shared>,
    span: Span,
    start: Instant,
    time_ms: u64,
    request_id: RequestId,
    method: String,
    route: Option<String>,
    model: Option<ModelId>,
    status: u16,
    code: Option<ErrorCode>,
    // Who called: the auth layer's `Identity` (set even when the org was then refused for
    // lack of a subscription), else a `Principal` put there by someone else.
    identity: Option<Identity>,
    // Filled by the auth layer as soon as it knows the caller, so a request abandoned before
    // any response is still attributed.
    identity_slot: IdentitySlot,
    receipt: Option<CreditReceipt>,
}

impl LogGuard {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        shared: Arc<Shared>,
        span: Span,
        start: Instant,
        time_ms: u64,
        request_id: RequestId,
        method: String,
        route: Option<String>,
        model: Option<ModelId>,
        identity_slot: IdentitySlot,
    ) -> Self {
        LogGuard {
            shared,
            span,
            start,
            time_ms,
            request_id,
            method,
            route,
            model,
            // Until a response arrives, the request counts as abandoned by the client.
            status: STATUS_CLIENT_CLOSED,
            code: None,
            identity: None,
            identity_slot,
            receipt: None,
        }
    }

    pub(crate) fn request_id(&self) -> &RequestId {
        &self.request_id
    }

    /// Takes what the outer world learns from the response head: status, and the facts the
    /// inner layers left in the extensions.
    pub(crate) fn record_response<B>(&mut self, res: &Response<B>) {
        let ext = res.extensions();
        self.status = res.status().as_u16();
        self.code = ext.get::<ErrorCode>().copied();
        self.identity = ext
            .get::<Identity>()
            .copied()
            .or_else(|| ext.get::<Principal>().copied().map(Identity::from));
        self.receipt = ext.get::<CreditReceipt>().cloned();
    }

    /// The inner service failed without a response (the connection is dropped).
    pub(crate) fn record_service_error(&mut self) {
        self.status = 500;
        self.code = Some(ErrorCode::InternalError);
    }

    fn identity(&self) -> Option<Identity> {
        self.identity.or_else(|| self.identity_slot.get())
    }

    fn to_record(&self) -> LogRecord {
        LogRecord {
            time_ms: self.time_ms,
            request_id: self.request_id.as_str().to_owned(),
            org_id: self.identity().map(|p| p.org),
            key_id: self.identity().map(|p| p.key),
            model_id: self.model,
            method: self.method.clone(),
            route: self.route.clone(),
            status: self.status,
            code: self.code,
            // Read now: the meter settles its receipt at the end of its body.
            credits: self.receipt.as_ref().map_or(0, CreditReceipt::charged),
            latency_ms: u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let record = self.to_record();
        // DEBUG: the sink already keeps one row per request; at the default `info` level the
        // gateway should not also print a line per request.
        self.span.in_scope(|| {
            tracing::debug!(
                status = record.status,
                code = record.code.map(ErrorCode::as_str),
                org_id = record.org_id.map(tracing::field::display),
                key_id = record.key_id.map(tracing::field::display),
                model_id = record.model_id.map(tracing::field::display),
                credits = record.credits,
                latency_ms = record.latency_ms,
                "request finished"
            );
        });
        self.shared.submitter.submit(record);
    }
}

pin_project! {
    /// The response body of [`RequestLogger`](crate::RequestLogger): the inner body, unchanged;
    /// the request's log row is written when it ends, fails or is dropped.
    pub struct LoggedBody<B> {
        // Declared first so it is dropped before the guard: an inner body that settles credits
        // on drop has done so when the row is built.
        #[pin]
        inner: B,
        guard: Option<LogGuard>,
    }
}

impl<B> LoggedBody<B> {
    pub(crate) fn new(inner: B, guard: Option<LogGuard>) -> Self {
        LoggedBody { inner, guard }
    }
}

impl<B> Body for LoggedBody<B>
where
    B: Body,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(_)) => {}
            // End of stream or a broken body: the row is written now.
            None => drop(this.guard.take()),
            Some(Err(_)) => {
                if let Some(guard) = this.guard.take() {
                    guard.span.in_scope(|| {
                        tracing::warn!("response body failed mid-stream");
                    });
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> fmt::Debug for LoggedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoggedBody")
            .field("pending", &self.guard.is_some())
            .finish_non_exhaustive()
    }
}
