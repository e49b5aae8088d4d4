//! [`ResponseFuture`]: waits for the inner response and, for a 2xx, buffers and wraps its body.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::response::Parts;
use http::{Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use serde::de::IgnoredAny;
use tollgate_core::ext::{RATELIMIT_LIMIT, RATELIMIT_REMAINING, RATELIMIT_RESET};
use tollgate_core::{
    BoxError, CreditReceipt, CreditSettlement, ErrorCode, GateBody, RateLimitInfo, Rejection,
};

/// What goes before the spliced body.
const DATA_PREFIX: &[u8] = b"{\"data\":";
/// Room reserved for `,"_meta":{...}}` so appending it does not reallocate.
const META_RESERVE: usize = 128;
/// Never reserve more than this up front, whatever the body's size hint claims.
const MAX_INITIAL_RESERVE: usize = 1024 * 1024;

pin_project! {
    /// The response future of [`ResponseEnvelope`](crate::ResponseEnvelope).
    pub struct ResponseFuture<F, B> {
        #[pin]
        state: State<F, B>,
        max_body_bytes: usize,
        is_head: bool,
    }
}

pin_project! {
    #[project = StateProj]
    #[project_replace = StateOwned]
    enum State<F, B> {
        // Waiting for the inner service's response.
        Inner { #[pin] future: F },
        // Buffering a 2xx body; `buf` already starts with `{"data":`.
        Collect { #[pin] body: B, parts: Parts, buf: Vec<u8> },
        Done,
    }
}

impl<F, B> ResponseFuture<F, B> {
    pub(crate) fn new(future: F, max_body_bytes: usize, is_head: bool) -> Self {
        ResponseFuture {
            state: State::Inner { future },
            max_body_bytes,
            is_head,
        }
    }
}

impl<F, B> fmt::Debug for ResponseFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Inner { .. } => "Inner",
            State::Collect { .. } => "Collect",
            State::Done => "Done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

/// Why a 2xx response could not be enveloped.
#[derive(Debug)]
enum Invalid {
    ContentType(Option<HeaderValue>),
    TooLarge(usize),
    Body(BoxError),
    NotUtf8,
    NotJson(serde_json::Error),
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Invalid::ContentType(Some(v)) => write!(f, "content-type {v:?} is not JSON"),
            Invalid::ContentType(None) => f.write_str("no content-type"),
            Invalid::TooLarge(max) => write!(f, "body larger than {max} bytes"),
            Invalid::Body(e) => write!(f, "body failed mid-stream: {e}"),
            Invalid::NotUtf8 => f.write_str("body is not UTF-8"),
            Invalid::NotJson(e) => write!(f, "body is not valid JSON: {e}"),
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<GateBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Inner { future } => {
                    let res = match ready!(future.poll(cx)) {
                        Ok(res) => res,
                        Err(err) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(err));
                        }
                    };
                    if !is_enveloped(res.status(), *this.is_head) {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(res.map(GateBody::inner)));
                    }
                    let (parts, body) = res.into_parts();
                    let max = *this.max_body_bytes;
                    let early = if !is_json_content_type(&parts.headers) {
                        Some(Invalid::ContentType(
                            parts.headers.get(CONTENT_TYPE).cloned(),
                        ))
                    } else if body.size_hint().lower() > max as u64 {
                        Some(Invalid::TooLarge(max))
                    } else {
                        None
                    };
                    if let Some(invalid) = early {
                        this.state.set(State::Done);
                        // The body is dropped unread: nothing of it reaches the client.
                        return Poll::Ready(Ok(upstream_error(parts, invalid)));
                    }
                    let hint = body.size_hint();
                    let expected = hint.upper().unwrap_or(hint.lower());
                    let reserve = usize::try_from(expected)
                        .unwrap_or(usize::MAX)
                        .min(max)
                        .min(MAX_INITIAL_RESERVE);
                    let mut buf = Vec::with_capacity(DATA_PREFIX.len() + reserve + META_RESERVE);
                    buf.extend_from_slice(DATA_PREFIX);
                    this.state.set(State::Collect { body, parts, buf });
                }
                StateProj::Collect { body, buf, .. } => {
                    let outcome = match ready!(body.poll_frame(cx)) {
                        Some(Ok(frame)) => {
                            // Trailers carry nothing the envelope keeps.
                            if let Ok(data) = frame.into_data() {
                                let max = *this.max_body_bytes;
                                if buf.len() - DATA_PREFIX.len() + data.len() > max {
                                    Err(Invalid::TooLarge(max))
                                } else {
                                    buf.extend_from_slice(&data);
                                    continue;
                                }
                            } else {
                                continue;
                            }
                        }
                        Some(Err(err)) => Err(Invalid::Body(err.into())),
                        None => Ok(()),
                    };
                    // Dropping the inner body here lets a credit meter inside settle before
                    // the receipt is read.
                    let (parts, buf) = match this.state.as_mut().project_replace(State::Done) {
                        StateOwned::Collect { parts, buf, .. } => (parts, buf),
                        _ => unreachable!("state was Collect"),
                    };
                    let unrecorded = parts
                        .extensions
                        .get::<CreditReceipt>()
                        .is_some_and(CreditReceipt::is_unrecorded);
                    let res = match outcome {
                        // The meter could not record the charge and withheld the body: not
                        // the upstream's fault, and nothing was billed.
                        _ if unrecorded => withheld(parts),
                        Ok(()) => envelope(parts, buf),
                        Err(invalid) => upstream_error(parts, invalid),
                    };
                    return Poll::Ready(Ok(res));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

/// 2xx responses with a body are enveloped; 204/205 and answers to HEAD have none.
fn is_enveloped(status: StatusCode, is_head: bool) -> bool {
    status.is_success()
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::RESET_CONTENT
        && !is_head
}

/// `application/json` or any `type/subtype+json`, parameters ignored.
fn is_json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((ty, subtype)) = essence.split_once('/') else {
        return false;
    };
    let ty = ty.trim();
    let subtype = subtype.trim();
    if ty.is_empty() || subtype.is_empty() {
        return false;
    }
    (ty.eq_ignore_ascii_case("application") && subtype.eq_ignore_ascii_case("json"))
        || (subtype.len() > 5
            && subtype.as_bytes()[subtype.len() - 5..].eq_ignore_ascii_case(b"+json"))
}

/// Validates the buffered body and completes `{"data":<body>,"_meta":{...}}` around it.
fn envelope<B>(mut parts: Parts, mut buf: Vec<u8>) -> Response<GateBody<B>> {
    let data = &buf[DATA_PREFIX.len()..];
    // serde_json's slice reader skips over string contents without checking UTF-8.
    if std::str::from_utf8(data).is_err() {
        return upstream_error(parts, Invalid::NotUtf8);
    }
    // A credit meter inside already parsed it before charging: don't parse it twice.
    let checked = parts
        .extensions
        .get::<CreditReceipt>()
        .is_some_and(CreditReceipt::json_checked);
    if !checked {
        if let Err(err) = serde_json::from_slice::<IgnoredAny>(data) {
            return upstream_error(parts, Invalid::NotJson(err));
        }
    }
    let credits =
        parts
            .extensions
            .get::<CreditReceipt>()
            .and_then(|receipt| match receipt.settlement() {
                Some(CreditSettlement::Charged { used, balance }) => Some((used, balance)),
                _ => None,
            });
    let rate_limits = parts.extensions.get::<RateLimitInfo>().copied();
    write_meta(&mut buf, credits, rate_limits);

    let headers = &mut parts.headers;
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(buf.len()));
    headers.remove(TRANSFER_ENCODING);
    Response::from_parts(parts, GateBody::full(Bytes::from(buf)))
}

/// Appends `,"_meta":{"_credits":{...},"_rate_limits":{...}}}`.
fn write_meta(
    buf: &mut Vec<u8>,
    credits: Option<(u64, Option<u64>)>,
    rate_limits: Option<RateLimitInfo>,
) {
    buf.extend_from_slice(b",\"_meta\":{");
    if let Some((used, balance)) = credits {
        buf.extend_from_slice(b"\"_credits\":{\"used\":");
        push_u64(buf, used);
        buf.extend_from_slice(b",\"balance\":");
        match balance {
            Some(balance) => push_u64(buf, balance),
            None => buf.extend_from_slice(b"null"),
        }
        buf.push(b'}');
    }
    if let Some(info) = rate_limits {
        if credits.is_some() {
            buf.push(b',');
        }
        buf.extend_from_slice(b"\"_rate_limits\":{\"limit_minute\":");
        push_u64(buf, u64::from(info.limit));
        buf.extend_from_slice(b",\"remaining_minute\":");
        push_u64(buf, u64::from(info.remaining));
        buf.push(b'}');
    }
    buf.extend_from_slice(b"}}");
}

fn push_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// 503 `SERVICE_UNAVAILABLE` in place of a 2xx whose charge could not be recorded, keeping
/// the rate-limit headers and every response extension.
fn withheld<B>(parts: Parts) -> Response<GateBody<B>> {
    replace_with(parts, Rejection::charge_unrecorded())
}

/// 502 `UPSTREAM_ERROR`, keeping the rate-limit headers and every response extension (the
/// principal and receipt the logger reads).
fn upstream_error<B>(parts: Parts, invalid: Invalid) -> Response<GateBody<B>> {
    tracing::warn!(
        status = parts.status.as_u16(),
        reason = %invalid,
        "2xx response is not a JSON body; answering 502 UPSTREAM_ERROR"
    );
    replace_with(parts, Rejection::new(ErrorCode::UpstreamError))
}

/// `rejection` in place of the response of `parts`, keeping its rate-limit headers and every
/// response extension (the principal and receipt the logger reads).
fn replace_with<B>(parts: Parts, rejection: Rejection) -> Response<GateBody<B>> {
    let code = rejection.code();
    let mut res: Response<GateBody<B>> = rejection.into_response();
    for name in [&RATELIMIT_LIMIT, &RATELIMIT_REMAINING, &RATELIMIT_RESET] {
        if let Some(value) = parts.headers.get(name) {
            res.headers_mut().insert(name.clone(), value.clone());
        }
    }
    let mut extensions = parts.extensions;
    extensions.insert(code);
    res.extensions_mut().extend(extensions);
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        h
    }

    #[test]
    fn json_content_types() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/problem+json",
            "application/vnd.api+JSON ; x=1",
        ] {
            assert!(is_json_content_type(&headers(ok)), "{ok}");
        }
        for bad in [
            "text/plain",
            "text/html; charset=utf-8",
            "application/jsonp",
            "application/x-json-stream",
            "+json",
            "application/+json",
            "json",
            "",
        ] {
            assert!(!is_json_content_type(&headers(bad)), "{bad}");
        }
        assert!(!is_json_content_type(&HeaderMap::new()));
    }

    #[test]
    fn numbers_and_meta() {
        let mut buf = Vec::new();
        push_u64(&mut buf, 0);
        buf.push(b' ');
        push_u64(&mut buf, u64::MAX);
        assert_eq!(buf, b"0 18446744073709551615");

        let mut buf = Vec::new();
        write_meta(&mut buf, None, None);
        assert_eq!(buf, b",\"_meta\":{}}");
    }
}
