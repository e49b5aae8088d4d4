//! The typed extensions the layers exchange.
//!
//! Request extensions flow inward (auth → window → meter → service); response extensions flow
//! outward (meter → envelope → logger). A layer that learns something an outer layer needs
//! (the principal, the model, the rate-limit state, the credit receipt, the error code) puts
//! it in the *response* extensions too, because an outer layer never sees the inner request.

use std::fmt;
use std::sync::{Arc, OnceLock};

use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use serde::Serialize;

use crate::ids::{KeyId, OrgId};
use crate::plan::Plan;

/// Who is calling: set by `ApiKeyAuthLayer` on the request (and copied onto the response).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Principal {
    /// The key's organization.
    pub org: OrgId,
    /// The key used.
    pub key: KeyId,
    /// The organization's active plan.
    pub plan: Plan,
}

/// The most credits the calling key may spend in the org's current billing period
/// (docs/contract.md §13): put on the request by the auth layer when the key has a limit, and
/// enforced by the credit meter together with the org's balance (402 `KEY_CREDIT_LIMIT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyCreditLimit(pub u64);

/// Which org and key a request was identified as, even when it was then refused for lack of
/// a subscription (a [`Principal`] needs a plan). The auth layer puts it on every response of
/// an identified key, so the request logger can attribute refused requests too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The key's organization.
    pub org: OrgId,
    /// The key used.
    pub key: KeyId,
}

impl From<Principal> for Identity {
    fn from(p: Principal) -> Self {
        Identity {
            org: p.org,
            key: p.key,
        }
    }
}

/// A place an outer layer (the request logger) puts in the request extensions so the auth
/// layer can say who is calling as soon as it knows, before any response exists: a request
/// the client abandons mid-flight is then still attributed to its org and key.
#[derive(Debug, Clone, Default)]
pub struct IdentitySlot(Arc<OnceLock<Identity>>);

impl IdentitySlot {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the caller; only the first call counts.
    pub fn set(&self, identity: Identity) {
        let _ = self.0.set(identity);
    }

    /// The caller, once known.
    pub fn get(&self) -> Option<Identity> {
        self.0.get().copied()
    }
}

/// The request's id: the client's `X-Request-Id` when it sent a usable one, else a new UUID.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RequestId(Arc<str>);

/// The header carrying the request id in both directions.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

impl RequestId {
    /// The longest client-supplied id that is echoed; longer ones are replaced.
    pub const MAX_LEN: usize = 128;

    /// A fresh random id.
    pub fn generate() -> Self {
        RequestId(Arc::from(uuid::Uuid::new_v4().hyphenated().to_string()))
    }

    /// Accepts a client-supplied id if it is 1–128 characters of `A–Z a–z 0–9 - _ . :`;
    /// anything else could smuggle text into logs and headers, so it is refused.
    pub fn parse(value: &str) -> Option<Self> {
        let ok = !value.is_empty()
            && value.len() <= Self::MAX_LEN
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        ok.then(|| RequestId(Arc::from(value)))
    }

    /// The client's id from `X-Request-Id` when usable, else a new one.
    pub fn from_headers_or_generate(headers: &HeaderMap) -> Self {
        headers
            .get(&X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .and_then(Self::parse)
            .unwrap_or_else(Self::generate)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as a header value.
    pub fn to_header_value(&self) -> HeaderValue {
        // Both constructors only admit visible ASCII.
        HeaderValue::from_str(&self.0).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({})", self.0)
    }
}

/// The state of the (org, model) window after a decision, on every response of a limited
/// route (success and 429) and rendered as `RateLimit-*` headers and `_meta._rate_limits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLimitInfo {
    /// Requests allowed per window.
    pub limit: u32,
    /// Requests left in the window after this one.
    pub remaining: u32,
    /// Seconds (rounded up) until capacity next comes back, i.e. until the oldest counted
    /// request leaves the window; 0 when the window is empty.
    pub reset_secs: u64,
    /// On a 429: seconds (rounded up, at least 1) until a request would be admitted.
    pub retry_after_secs: Option<u64>,
}

/// `RateLimit-Limit`.
pub static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
/// `RateLimit-Remaining`.
pub static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
/// `RateLimit-Reset`.
pub static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

impl RateLimitInfo {
    /// Sets `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`, and `Retry-After`
    /// when the request was refused.
    pub fn apply_headers(&self, headers: &mut HeaderMap) {
        headers.insert(RATELIMIT_LIMIT.clone(), HeaderValue::from(self.limit));
        headers.insert(
            RATELIMIT_REMAINING.clone(),
            HeaderValue::from(self.remaining),
        );
        headers.insert(RATELIMIT_RESET.clone(), HeaderValue::from(self.reset_secs));
        if let Some(secs) = self.retry_after_secs {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
    }
}

/// How a credit hold ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditSettlement {
    /// The response was a 2xx with a whole body: `used` credits were charged and the org's
    /// balance after the charge is `balance` (`None` on an unlimited plan).
    Charged {
        /// Credits charged.
        used: u64,
        /// Balance after the charge; `None` on an unlimited plan.
        balance: Option<u64>,
    },
    /// Nothing was charged (non-2xx, error, or the body did not complete).
    Released,
    /// The response was a 2xx, but its charge could not be recorded (the ledger failed or
    /// did not answer in time): nothing was charged, and the response must not reach the
    /// client either, because it would be delivered unbilled. A response envelope answers
    /// 503 `SERVICE_UNAVAILABLE` instead; a streamed body ends with an error in place of its
    /// last bytes.
    Unrecorded,
}

/// The credit meter's receipt, in the response extensions. It is settled once, when the hold
/// is committed (end of a 2xx body) or released; outer layers that buffer the body (the
/// envelope) or wait for its end (the logger) read the settlement afterwards.
#[derive(Clone)]
pub struct CreditReceipt(Arc<ReceiptInner>);

struct ReceiptInner {
    cost: u64,
    settled: OnceLock<CreditSettlement>,
    json_checked: std::sync::atomic::AtomicBool,
}

impl CreditReceipt {
    /// An unsettled receipt for a request of `cost` credits.
    pub fn pending(cost: u64) -> Self {
        CreditReceipt(Arc::new(ReceiptInner {
            cost,
            settled: OnceLock::new(),
            json_checked: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The route's cost.
    pub fn cost(&self) -> u64 {
        self.0.cost
    }

    /// Records how the hold ended; only the first settlement counts. Returns whether this
    /// call settled it.
    pub fn settle(&self, settlement: CreditSettlement) -> bool {
        self.0.settled.set(settlement).is_ok()
    }

    /// The settlement, once there is one.
    pub fn settlement(&self) -> Option<CreditSettlement> {
        self.0.settled.get().copied()
    }

    /// Records that the meter parsed the whole body as JSON before charging (it does when
    /// the request carried [`JsonBodyRequired`]), so an outer layer need not parse it again.
    pub fn mark_json_checked(&self) {
        self.0
            .json_checked
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether the meter already parsed the body as JSON.
    pub fn json_checked(&self) -> bool {
        self.0
            .json_checked
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Credits the ledger actually took from the balance: 0 until committed, when released
    /// or unrecorded, and on an unlimited plan (whose balance is never drawn on).
    pub fn charged(&self) -> u64 {
        match self.settlement() {
            Some(CreditSettlement::Charged {
                used,
                balance: Some(_),
            }) => used,
            _ => 0,
        }
    }

    /// Whether the response must be withheld because its charge could not be recorded
    /// ([`CreditSettlement::Unrecorded`]).
    pub fn is_unrecorded(&self) -> bool {
        self.settlement() == Some(CreditSettlement::Unrecorded)
    }
}

impl fmt::Debug for CreditReceipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreditReceipt")
            .field("cost", &self.0.cost)
            .field("settled", &self.settlement())
            .finish()
    }
}

/// Request marker set by a layer that will turn a 2xx response whose body is not JSON into an
/// error (the response envelope). A credit meter that sees it checks the body is JSON before
/// it charges, so a response the client receives as an error is never billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JsonBodyRequired;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_echoes_safe_values_only() {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc-123_x.y:z"));
        assert_eq!(
            RequestId::from_headers_or_generate(&h).as_str(),
            "abc-123_x.y:z"
        );
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("has space"));
        let generated = RequestId::from_headers_or_generate(&h);
        assert_ne!(generated.as_str(), "has space");
        assert_eq!(generated.as_str().len(), 36);
        assert!(RequestId::parse(&"a".repeat(129)).is_none());
        assert!(RequestId::parse(&"a".repeat(128)).is_some());
    }

    #[test]
    fn receipt_settles_once() {
        let r = CreditReceipt::pending(2);
        assert_eq!(r.charged(), 0);
        assert!(r.settle(CreditSettlement::Charged {
            used: 2,
            balance: Some(8)
        }));
        assert!(!r.clone().settle(CreditSettlement::Released));
        assert_eq!(r.charged(), 2);

        let unlimited = CreditReceipt::pending(2);
        unlimited.settle(CreditSettlement::Charged {
            used: 2,
            balance: None,
        });
        assert_eq!(
            unlimited.charged(),
            0,
            "an unlimited plan is never drawn on"
        );
        let unrecorded = CreditReceipt::pending(2);
        unrecorded.settle(CreditSettlement::Unrecorded);
        assert!(unrecorded.is_unrecorded());
        assert_eq!(unrecorded.charged(), 0);
    }

    #[test]
    fn rate_limit_headers() {
        let mut h = HeaderMap::new();
        RateLimitInfo {
            limit: 60,
            remaining: 0,
            reset_secs: 12,
            retry_after_secs: Some(3),
        }
        .apply_headers(&mut h);
        assert_eq!(h["ratelimit-limit"], "60");
        assert_eq!(h["ratelimit-remaining"], "0");
        assert_eq!(h["ratelimit-reset"], "12");
        assert_eq!(h["retry-after"], "3");
    }
}
