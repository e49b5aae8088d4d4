//! [`IdempotencyStore`]: where the layer records which keys are in flight and which
//! responses to replay, and the values it exchanges with it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use sha2::{Digest, Sha256};
use tollgate_core::{BackendError, BoxFuture};

/// The response header marking a replayed response: `Idempotent-Replayed: true`.
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The request header carrying the client's key.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// What identifies "the same request" under one key: SHA-256 over the method, the path
/// (with its query) and the SHA-256 of the body.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a request.
    ///
    /// ```
    /// use http::Method;
    /// use tollgate_idempotency::Fingerprint;
    ///
    /// let a = Fingerprint::new(&Method::POST, "/api/messages", b"{\"text\":\"hi\"}");
    /// assert_eq!(a, Fingerprint::new(&Method::POST, "/api/messages", b"{\"text\":\"hi\"}"));
    /// assert_ne!(a, Fingerprint::new(&Method::POST, "/api/messages", b"{\"text\":\"ho\"}"));
    /// assert_ne!(a, Fingerprint::new(&Method::DELETE, "/api/messages", b"{\"text\":\"hi\"}"));
    /// ```
    pub fn new(method: &Method, path_and_query: &str, body: &[u8]) -> Self {
        let body_hash = Sha256::digest(body);
        let mut h = Sha256::new();
        // Length-prefixed, so no two (method, path) pairs can run together into one text.
        for part in [method.as_str().as_bytes(), path_and_query.as_bytes()] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.update(body_hash);
        Fingerprint(h.finalize().into())
    }

    /// A fingerprint read back from a store.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Fingerprint(bytes)
    }

    /// A fingerprint read back from a store as a slice; `None` unless it is 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Fingerprint)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", hex::encode(&self.0[..8]))
    }
}

/// A random token naming one run of a request under a key. A store accepts the completion or
/// release of a key only with the token of its current lease, so a replica that finishes
/// after its lease expired (and another request took the key over) cannot overwrite the
/// newer run's record.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken(uuid::Uuid);

impl LeaseToken {
    /// A fresh random token.
    pub fn generate() -> Self {
        LeaseToken(uuid::Uuid::new_v4())
    }

    /// A token read back from a store.
    pub fn from_uuid(id: uuid::Uuid) -> Self {
        LeaseToken(id)
    }

    /// The token as a UUID.
    pub fn as_uuid(&self) -> uuid::Uuid {
        self.0
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseToken({})", self.0)
    }
}

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The right to run the request of one (scope, key): given by
/// [`IdempotencyStore::begin`], given back by [`complete`](IdempotencyStore::complete) or
/// [`release`](IdempotencyStore::release), or lost when its TTL passes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    scope: Arc<str>,
    key: Arc<str>,
    token: LeaseToken,
}

impl Lease {
    /// A lease of (scope, key) under `token` (stores build these in `begin`).
    pub fn new(scope: &str, key: &str, token: LeaseToken) -> Self {
        Lease {
            scope: Arc::from(scope),
            key: Arc::from(key),
            token,
        }
    }

    /// Whose keys these are (by default, the org).
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The client's `Idempotency-Key`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The run's token.
    pub fn token(&self) -> LeaseToken {
        self.token
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("scope", &self.scope)
            .field("key", &self.key)
            .field("token", &self.token)
            .finish()
    }
}

/// A final response as stored for replay: status, the headers worth replaying, body.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// The status.
    pub status: StatusCode,
    /// The replayed headers (by default `content-type` and a few others that describe the
    /// body; never rate-limit or per-request headers).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The whole body.
    pub body: Bytes,
}

impl StoredResponse {
    /// The replay: the stored status, headers and body, plus `Idempotent-Replayed: true`.
    pub fn to_response<B: From<Bytes>>(&self) -> Response<B> {
        let mut res = Response::new(B::from(self.body.clone()));
        *res.status_mut() = self.status;
        let headers = res.headers_mut();
        for (name, value) in &self.headers {
            headers.append(name.clone(), value.clone());
        }
        headers.insert(
            IDEMPOTENT_REPLAYED.clone(),
            HeaderValue::from_static("true"),
        );
        res
    }

    /// The headers as JSON text (`[["content-type","application/json"], …]`), how the
    /// PostgreSQL and Redis stores keep them. Values that are not visible ASCII are left out.
    pub fn headers_json(&self) -> String {
        let pairs: Vec<(&str, &str)> = self
            .headers
            .iter()
            .filter_map(|(n, v)| Some((n.as_str(), v.to_str().ok()?)))
            .collect();
        // Serializing pairs of strings cannot fail.
        serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".to_owned())
    }

    /// Reads back what [`headers_json`](Self::headers_json) wrote.
    pub fn from_stored(status: u16, headers_json: &str, body: Bytes) -> Result<Self, BackendError> {
        let bad = |what: String| BackendError::other(format!("stored response: {what}"));
        let status = StatusCode::from_u16(status).map_err(|e| bad(e.to_string()))?;
        let pairs: Vec<(String, String)> =
            serde_json::from_str(headers_json).map_err(|e| bad(e.to_string()))?;
        let headers = pairs
            .into_iter()
            .map(|(n, v)| {
                Ok((
                    HeaderName::try_from(n).map_err(|e| bad(e.to_string()))?,
                    HeaderValue::try_from(v).map_err(|e| bad(e.to_string()))?,
                ))
            })
            .collect::<Result<_, BackendError>>()?;
        Ok(StoredResponse {
            status,
            headers,
            body,
        })
    }
}

impl fmt::Debug for StoredResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// What [`IdempotencyStore::begin`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The key was free (never used, released, or expired): the caller runs the request
    /// under this lease.
    Started(Lease),
    /// The key's first request, with the same fingerprint, is still running (its lease has
    /// not expired).
    InFlight,
    /// The key was used with another fingerprint (in flight or finished).
    Mismatch,
    /// The key's request finished with this response, with the same fingerprint.
    Replay(StoredResponse),
}

/// Where the idempotency layer keeps its keys. Every operation is atomic: two `begin`s of
/// one (scope, key) racing from any number of replicas give one `Started`.
///
/// A record has a fingerprint and is either *in flight* (a lease token with an expiry) or
/// *done* (a response with an expiry). An expired record counts as absent.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims (scope, key) for a request with `fingerprint`: `Started` with a lease valid for
    /// `lease_ttl` when the key is free, otherwise what holds it.
    fn begin(
        &self,
        scope: &str,
        key: &str,
        fingerprint: Fingerprint,
        lease_ttl: Duration,
    ) -> BoxFuture<Result<Begin, BackendError>>;

    /// Stores `response` for (scope, key) for `ttl`, if `lease` is still the key's current
    /// lease (expired or not, as long as no other request took the key over). Returns
    /// whether it was stored.
    fn complete(
        &self,
        lease: &Lease,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<bool, BackendError>>;

    /// Frees (scope, key) if `lease` is still its current lease, so a retry runs. Returns
    /// whether it was freed.
    fn release(&self, lease: &Lease) -> BoxFuture<Result<bool, BackendError>>;

    /// Forgets the records that have expired; returns how many. (Expired records are ignored
    /// anyway; this only bounds the store's size. The Redis store lets Redis expire them.)
    fn purge_expired(&self) -> BoxFuture<Result<u64, BackendError>>;
}

impl<T: IdempotencyStore + ?Sized> IdempotencyStore for Arc<T> {
    fn begin(
        &self,
        scope: &str,
        key: &str,
        fingerprint: Fingerprint,
        lease_ttl: Duration,
    ) -> BoxFuture<Result<Begin, BackendError>> {
        (**self).begin(scope, key, fingerprint, lease_ttl)
    }

    fn complete(
        &self,
        lease: &Lease,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<bool, BackendError>> {
        (**self).complete(lease, response, ttl)
    }

    fn release(&self, lease: &Lease) -> BoxFuture<Result<bool, BackendError>> {
        (**self).release(lease)
    }

    fn purge_expired(&self) -> BoxFuture<Result<u64, BackendError>> {
        (**self).purge_expired()
    }
}

/// Milliseconds of a duration, saturating.
#[cfg(any(feature = "memory", feature = "postgres", feature = "redis"))]
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_headers_round_trip() {
        let stored = StoredResponse {
            status: StatusCode::CREATED,
            headers: vec![
                (
                    HeaderName::from_static("content-type"),
                    HeaderValue::from_static("application/json"),
                ),
                (
                    HeaderName::from_static("location"),
                    HeaderValue::from_static("/a/\"b\""),
                ),
            ],
            body: Bytes::from_static(b"{}"),
        };
        let back =
            StoredResponse::from_stored(201, &stored.headers_json(), Bytes::from_static(b"{}"))
                .unwrap();
        assert_eq!(back, stored);
        assert!(StoredResponse::from_stored(99, "[]", Bytes::new()).is_err());
        assert!(StoredResponse::from_stored(200, "{", Bytes::new()).is_err());
    }

    #[test]
    fn a_replay_says_so() {
        let stored = StoredResponse {
            status: StatusCode::ACCEPTED,
            headers: vec![],
            body: Bytes::from_static(b"x"),
        };
        let res: Response<Bytes> = stored.to_response();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        assert_eq!(res.headers()["idempotent-replayed"], "true");
        assert_eq!(res.body(), "x");
    }

    #[test]
    fn the_path_and_the_method_cannot_run_together() {
        // "POST" + "X/x" and "POSTX" + "/x" read the same when run together.
        let a = Fingerprint::new(&Method::POST, "X/x", b"");
        let b = Fingerprint::new(&Method::from_bytes(b"POSTX").unwrap(), "/x", b"");
        assert_ne!(a, b);
    }
}
