//! [`Idempotency`]: the service produced by [`IdempotencyLayer`](crate::IdempotencyLayer).

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response};
use http_body::Body;
use tollgate_core::{BoxError, ErrorCode, GateBody, Rejection};
use tower_service::Service;

use crate::body::IdempotencyBody;
use crate::future::{self, ResponseFuture};
use crate::layer::Config;
use crate::store::IDEMPOTENCY_KEY;

/// The longest `Idempotency-Key` accepted.
pub const MAX_KEY_LEN: usize = 255;

/// Guards the `POST` and `DELETE` requests with an `Idempotency-Key` that it forwards to
/// `S`. Built by [`IdempotencyLayer`](crate::IdempotencyLayer).
///
/// The inner service gets the request body as a [`GateBody`]: the original body for
/// requests the layer does not guard, the buffered bytes for those it does.
#[derive(Clone)]
pub struct Idempotency<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Idempotency<S> {
    pub(crate) fn from_config(inner: S, config: Arc<Config>) -> Self {
        Idempotency { inner, config }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// The request's `Idempotency-Key`: `Ok(None)` without one, `Err` for a malformed one (more
/// than one header, empty, longer than [`MAX_KEY_LEN`], anything but printable ASCII).
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, Rejection> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let invalid = |why: &'static str| {
        Rejection::new(ErrorCode::InvalidRequest).with_message(format!(
            "The Idempotency-Key header {why}: send one key of 1 to {MAX_KEY_LEN} printable \
             ASCII characters."
        ))
    };
    if values.next().is_some() {
        return Err(invalid("was sent more than once"));
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return Err(invalid("is empty"));
    }
    if bytes.len() > MAX_KEY_LEN {
        return Err(invalid("is too long"));
    }
    if !bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err(invalid("has characters that are not printable ASCII"));
    }
    // Printable ASCII is UTF-8.
    Ok(value.to_str().ok())
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S>
where
    S: Service<Request<GateBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<IdempotencyBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let guarded = matches!(*req.method(), Method::POST | Method::DELETE);
        let key = match idempotency_key(req.headers()) {
            _ if !guarded => None,
            Ok(key) => key.map(str::to_owned),
            Err(rejection) => return ResponseFuture::reject(rejection),
        };
        let Some(key) = key else {
            return ResponseFuture::passthrough(self.inner.call(req.map(GateBody::inner)));
        };
        // The ready service goes into the future; a fresh clone stays for the next call.
        let clone = self.inner.clone();
        let service = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::guarded(Box::pin(future::guarded(
            Arc::clone(&self.config),
            service,
            req,
            key,
        )))
    }
}

impl<S: fmt::Debug> fmt::Debug for Idempotency<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(value: &[u8]) -> Result<Option<String>, ErrorCode> {
        let mut headers = HeaderMap::new();
        headers.insert(
            &IDEMPOTENCY_KEY,
            http::HeaderValue::from_bytes(value).unwrap(),
        );
        idempotency_key(&headers)
            .map(|k| k.map(str::to_owned))
            .map_err(|r| r.code())
    }

    #[test]
    fn keys_are_one_to_255_printable_ascii() {
        assert_eq!(key_of(b"a").unwrap().as_deref(), Some("a"));
        let longest = "k".repeat(255);
        assert_eq!(key_of(longest.as_bytes()).unwrap(), Some(longest));
        assert_eq!(
            key_of(b"order 42: \"retry\" ~!").unwrap().as_deref(),
            Some("order 42: \"retry\" ~!")
        );
        for bad in [&b""[..], &[b'k'; 256], b"caf\xc3\xa9", b"tab\there"] {
            assert_eq!(key_of(bad), Err(ErrorCode::InvalidRequest), "{bad:?}");
        }
        let mut two = HeaderMap::new();
        two.append(&IDEMPOTENCY_KEY, http::HeaderValue::from_static("a"));
        two.append(&IDEMPOTENCY_KEY, http::HeaderValue::from_static("b"));
        assert_eq!(
            idempotency_key(&two).map_err(|r| r.code()),
            Err(ErrorCode::InvalidRequest)
        );
        assert_eq!(idempotency_key(&HeaderMap::new()).unwrap(), None);
    }
}
