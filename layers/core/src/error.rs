//! The `{error, code}` body every tollgate rejection is rendered as (docs/contract.md §2).

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use serde::Serialize;

/// Every error code of the customer and admin APIs, with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// 401: no, unknown or revoked key; key in the wrong header; model not the org's.
    InvalidApiKey,
    /// 402: the org has no active subscription.
    NoSubscription,
    /// 402: available balance below the endpoint's cost.
    InsufficientCredits,
    /// 429: the (org, model) window or burst is full.
    RateLimitExceeded,
    /// 502: the model's upstream session is dead.
    ModelSessionExpired,
    /// 502: the signer failed, or the upstream rejected the signature.
    SigningFailed,
    /// 429: the upstream throttled the account.
    UpstreamRateLimited,
    /// 502: upstream unreachable, 5xx, non-JSON 2xx, or a broken body.
    UpstreamError,
    /// 504: the upstream did not answer in time.
    UpstreamTimeout,
    /// 4xx (the upstream's own status): any other upstream 4xx.
    UpstreamRejected,
    /// 404: no such route, or (admin API) no such org, key or model.
    NotFound,
    /// 413: request body over the limit.
    PayloadTooLarge,
    /// 503: a backend the request needs is down.
    ServiceUnavailable,
    /// 500: anything else.
    InternalError,
    /// 401 (admin API): missing or wrong admin token.
    Unauthorized,
    /// 400 (admin API and malformed requests): broken JSON, missing fields, bad values.
    InvalidRequest,
    /// 403 (dashboard): the signed-in user may not do this (a viewer's change, a missing or
    /// wrong CSRF token).
    Forbidden,
    /// 422: an `Idempotency-Key` already used with a different method, route or body.
    IdempotencyKeyReused,
    /// 409: the first request with this `Idempotency-Key` is still in flight.
    IdempotencyInProgress,
    /// 403: the key's scopes or model list do not cover this request (docs/contract.md §13).
    KeyForbidden,
    /// 402: the request would take the key past its credit limit for the billing period.
    KeyCreditLimit,
}

impl ErrorCode {
    /// The `code` string of the body.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidApiKey => "INVALID_API_KEY",
            ErrorCode::NoSubscription => "NO_SUBSCRIPTION",
            ErrorCode::InsufficientCredits => "INSUFFICIENT_CREDITS",
            ErrorCode::RateLimitExceeded => "RATE_LIMIT_EXCEEDED",
            ErrorCode::ModelSessionExpired => "MODEL_SESSION_EXPIRED",
            ErrorCode::SigningFailed => "SIGNING_FAILED",
            ErrorCode::UpstreamRateLimited => "UPSTREAM_RATE_LIMITED",
            ErrorCode::UpstreamError => "UPSTREAM_ERROR",
            ErrorCode::UpstreamTimeout => "UPSTREAM_TIMEOUT",
            ErrorCode::UpstreamRejected => "UPSTREAM_REJECTED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::ServiceUnavailable => "SERVICE_UNAVAILABLE",
            ErrorCode::InternalError => "INTERNAL_ERROR",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            ErrorCode::IdempotencyInProgress => "IDEMPOTENCY_IN_PROGRESS",
            ErrorCode::KeyForbidden => "KEY_FORBIDDEN",
            ErrorCode::KeyCreditLimit => "KEY_CREDIT_LIMIT",
        }
    }

    /// The HTTP status the code is sent with. `UPSTREAM_REJECTED` defaults to 400; a
    /// [`Rejection`] can carry the upstream's own 4xx instead.
    pub const fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidApiKey | ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::NoSubscription
            | ErrorCode::InsufficientCredits
            | ErrorCode::KeyCreditLimit => StatusCode::PAYMENT_REQUIRED,
            ErrorCode::RateLimitExceeded | ErrorCode::UpstreamRateLimited => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ErrorCode::ModelSessionExpired
            | ErrorCode::SigningFailed
            | ErrorCode::UpstreamError => StatusCode::BAD_GATEWAY,
            ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::UpstreamRejected | ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Forbidden | ErrorCode::KeyForbidden => StatusCode::FORBIDDEN,
            ErrorCode::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::IdempotencyInProgress => StatusCode::CONFLICT,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The default human sentence for the code.
    pub const fn default_message(self) -> &'static str {
        match self {
            ErrorCode::InvalidApiKey => "The API key is missing, unknown or revoked.",
            ErrorCode::NoSubscription => {
                "The organization has no active subscription. Subscribe to a plan to use the API."
            }
            ErrorCode::InsufficientCredits => "Not enough credits to complete this request.",
            ErrorCode::RateLimitExceeded => "Rate limit exceeded. Slow down and try again.",
            ErrorCode::ModelSessionExpired => {
                "The model's session has expired. Reconnect the model to continue."
            }
            ErrorCode::SigningFailed => "The request could not be signed. Retry in a few seconds.",
            ErrorCode::UpstreamRateLimited => {
                "The upstream is throttling this account. Retry later."
            }
            ErrorCode::UpstreamError => "The upstream failed to answer correctly.",
            ErrorCode::UpstreamTimeout => "The upstream did not answer in time.",
            ErrorCode::UpstreamRejected => "The upstream rejected the request.",
            ErrorCode::NotFound => "No such route.",
            ErrorCode::PayloadTooLarge => "The request body is too large.",
            ErrorCode::ServiceUnavailable => {
                "A backend this request needs is unavailable. Retry shortly."
            }
            ErrorCode::InternalError => "An unexpected error occurred.",
            ErrorCode::Unauthorized => "Missing or invalid admin token.",
            ErrorCode::InvalidRequest => "The request is invalid.",
            ErrorCode::Forbidden => "You are not allowed to do this.",
            ErrorCode::IdempotencyKeyReused => {
                "This Idempotency-Key was already used with a different method, route or body."
            }
            ErrorCode::IdempotencyInProgress => {
                "A request with this Idempotency-Key is still in flight. Retry shortly."
            }
            ErrorCode::KeyForbidden => {
                "This API key may not make this request (its scopes or models do not allow it)."
            }
            ErrorCode::KeyCreditLimit => {
                "This API key has reached its credit limit for the billing period."
            }
        }
    }

    /// Every code, for tables and tests.
    pub const ALL: [ErrorCode; 21] = [
        ErrorCode::InvalidApiKey,
        ErrorCode::NoSubscription,
        ErrorCode::InsufficientCredits,
        ErrorCode::RateLimitExceeded,
        ErrorCode::ModelSessionExpired,
        ErrorCode::SigningFailed,
        ErrorCode::UpstreamRateLimited,
        ErrorCode::UpstreamError,
        ErrorCode::UpstreamTimeout,
        ErrorCode::UpstreamRejected,
        ErrorCode::NotFound,
        ErrorCode::PayloadTooLarge,
        ErrorCode::ServiceUnavailable,
        ErrorCode::InternalError,
        ErrorCode::Unauthorized,
        ErrorCode::InvalidRequest,
        ErrorCode::Forbidden,
        ErrorCode::IdempotencyKeyReused,
        ErrorCode::IdempotencyInProgress,
        ErrorCode::KeyForbidden,
        ErrorCode::KeyCreditLimit,
    ];
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A refusal, rendered as `{"error": "<sentence>", "code": "<CODE>"}` (plus `"details"` when
/// the upstream's body is passed on).
///
/// The rendered response carries the [`ErrorCode`] in its extensions so that outer layers
/// (the request logger) can record it without parsing the body.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    code: ErrorCode,
    status: StatusCode,
    message: Cow<'static, str>,
    details: Option<serde_json::Value>,
    retry_after_secs: Option<u64>,
    backend: Option<&'static str>,
}

#[derive(Serialize)]
struct RejectionBody<'a> {
    error: &'a str,
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a serde_json::Value>,
}

impl Rejection {
    /// 503 `SERVICE_UNAVAILABLE` for a successful response that is withheld because its
    /// charge could not be recorded: nothing was billed and the client should retry.
    pub fn charge_unrecorded() -> Self {
        Rejection::new(ErrorCode::ServiceUnavailable).with_message(
            "The charge for this request could not be recorded, so its response was withheld \
             and nothing was billed. Retry the request.",
        )
    }

    /// A rejection with the code's status and default message.
    pub fn new(code: ErrorCode) -> Self {
        Self {
            code,
            status: code.status(),
            message: Cow::Borrowed(code.default_message()),
            details: None,
            retry_after_secs: None,
            backend: None,
        }
    }

    /// Replaces the human sentence.
    pub fn with_message(mut self, message: impl Into<Cow<'static, str>>) -> Self {
        self.message = message.into();
        self
    }

    /// Replaces the status (used by `UPSTREAM_REJECTED` to keep the upstream's 4xx).
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// Attaches the upstream's JSON body under `"details"`.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// Adds a `Retry-After` header (seconds).
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// Marks the refusal as caused by the failure of `backend` (`"keys"`, `"ledger"`, …): the
    /// rendered response then carries a [`BackendFailure`] extension naming it.
    pub fn with_backend_failure(mut self, backend: &'static str) -> Self {
        self.backend = Some(backend);
        self
    }

    /// The backend whose failure caused the refusal, if any.
    pub fn backend_failure(&self) -> Option<&'static str> {
        self.backend
    }

    /// The error code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The human sentence.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The `"details"` value, if any.
    pub fn details(&self) -> Option<&serde_json::Value> {
        self.details.as_ref()
    }

    /// The `Retry-After` seconds, if any.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after_secs
    }

    /// The JSON body.
    pub fn to_json_bytes(&self) -> Bytes {
        let body = RejectionBody {
            error: &self.message,
            code: self.code.as_str(),
            details: self.details.as_ref(),
        };
        // Serializing strings and an already-valid `Value` cannot fail.
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    /// Renders the response: status, `content-type: application/json`, `Retry-After` when
    /// set, the body, and the [`ErrorCode`] (and the [`BackendFailure`], when there is one) in
    /// the response extensions.
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let bytes = self.to_json_bytes();
        let mut res = Response::new(B::from(bytes));
        *res.status_mut() = self.status;
        let headers = res.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after_secs {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        res.extensions_mut().insert(self.code);
        if let Some(backend) = self.backend {
            res.extensions_mut().insert(BackendFailure { backend });
        }
        res
    }
}

/// Response extension of a refusal caused by a backend failure (503 `SERVICE_UNAVAILABLE`,
/// 500 `INTERNAL_ERROR`): which backend failed, by its role (`"keys"`, `"rate_limits"`,
/// `"ledger"`, `"sessions"`, `"logs"`), so that a server can count backend failures without
/// knowing which layer refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendFailure {
    /// The failed backend's role.
    pub backend: &'static str,
}

impl From<ErrorCode> for Rejection {
    fn from(code: ErrorCode) -> Self {
        Rejection::new(code)
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for Rejection {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_contract_body() {
        let res: Response<Bytes> = Rejection::new(ErrorCode::RateLimitExceeded)
            .with_retry_after(7)
            .into_response();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(res.headers()[RETRY_AFTER], "7");
        assert_eq!(
            res.extensions().get::<ErrorCode>(),
            Some(&ErrorCode::RateLimitExceeded)
        );
        let json: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "error": "Rate limit exceeded. Slow down and try again.",
                "code": "RATE_LIMIT_EXCEEDED"
            })
        );
    }

    #[test]
    fn keeps_upstream_status_and_details() {
        let res: Response<Bytes> = Rejection::new(ErrorCode::UpstreamRejected)
            .with_status(StatusCode::NOT_FOUND)
            .with_details(serde_json::json!({"error": {"code": 0, "message": "Message not found"}}))
            .into_response();
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        let body = std::str::from_utf8(res.body()).unwrap();
        assert!(body.starts_with(
            r#"{"error":"The upstream rejected the request.","code":"UPSTREAM_REJECTED","details":"#
        ));
    }

    #[test]
    fn a_backend_failure_names_the_backend_in_the_extensions() {
        let err = BackendError::unavailable("connection refused");
        let res: Response<Bytes> = err.rejection_from("ledger").into_response();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            res.extensions().get::<BackendFailure>(),
            Some(&BackendFailure { backend: "ledger" })
        );
        let plain: Response<Bytes> = err.rejection().into_response();
        assert_eq!(plain.extensions().get::<BackendFailure>(), None);
    }

    #[test]
    fn idempotency_codes_have_their_statuses() {
        assert_eq!(
            ErrorCode::IdempotencyKeyReused.as_str(),
            "IDEMPOTENCY_KEY_REUSED"
        );
        assert_eq!(
            ErrorCode::IdempotencyKeyReused.status(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            ErrorCode::IdempotencyInProgress.as_str(),
            "IDEMPOTENCY_IN_PROGRESS"
        );
        assert_eq!(
            ErrorCode::IdempotencyInProgress.status(),
            StatusCode::CONFLICT
        );
    }

    #[test]
    fn every_code_has_an_error_status_and_a_sentence() {
        for code in ErrorCode::ALL {
            assert!(code.status().is_client_error() || code.status().is_server_error());
            assert!(code.default_message().ends_with('.'), "{code}");
            assert_eq!(code.as_str().to_uppercase(), code.as_str());
        }
    }
}

/// A backend (store, ledger, log sink, window store) failed.
///
/// Layers turn [`BackendErrorKind::Unavailable`] into 503 `SERVICE_UNAVAILABLE` and
/// anything else into 500 `INTERNAL_ERROR`; neither is ever billed.
#[derive(Debug)]
pub struct BackendError {
    kind: BackendErrorKind,
    source: crate::BoxError,
}

/// What kind of backend failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendErrorKind {
    /// The backend cannot be reached (connection refused, pool exhausted, timed out).
    Unavailable,
    /// The backend answered, but with something unexpected.
    Other,
}

impl BackendError {
    /// The backend cannot be reached.
    pub fn unavailable(source: impl Into<crate::BoxError>) -> Self {
        BackendError {
            kind: BackendErrorKind::Unavailable,
            source: source.into(),
        }
    }

    /// Any other backend failure.
    pub fn other(source: impl Into<crate::BoxError>) -> Self {
        BackendError {
            kind: BackendErrorKind::Other,
            source: source.into(),
        }
    }

    /// The kind of failure.
    pub fn kind(&self) -> BackendErrorKind {
        self.kind
    }

    /// The rejection a client gets for it, marked as a failure of `backend` (see
    /// [`BackendFailure`]).
    pub fn rejection_from(&self, backend: &'static str) -> Rejection {
        self.rejection().with_backend_failure(backend)
    }

    /// The rejection a client gets for it.
    pub fn rejection(&self) -> Rejection {
        match self.kind {
            BackendErrorKind::Unavailable => Rejection::new(ErrorCode::ServiceUnavailable),
            BackendErrorKind::Other => Rejection::new(ErrorCode::InternalError),
        }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            BackendErrorKind::Unavailable => write!(f, "backend unavailable: {}", self.source),
            BackendErrorKind::Other => write!(f, "backend error: {}", self.source),
        }
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}
