//! The [`Signer`] extension point: something that turns `(path, user id)` into the `sign`,
//! `time` and `app-token` headers of one upstream request.

use std::sync::Arc;
use std::time::Duration;

use tollgate_core::BoxFuture;

use crate::rules::Signature;

/// Signs upstream requests.
///
/// Implementations: [`RulesSigner`](crate::RulesSigner) (local rules, reloadable) and
/// [`RemoteSigner`](crate::RemoteSigner) (a signing service over HTTP). A signer that can
/// hang must bound its own time: the layer waits for it and turns any error into 502
/// `SIGNING_FAILED`.
pub trait Signer: Send + Sync + 'static {
    /// Signs a request for `path_and_query` (the path as sent on the wire plus `?` and the raw
    /// query, percent-encoding kept) on behalf of the account `user_id`.
    fn sign(&self, path_and_query: &str, user_id: &str) -> BoxFuture<Result<Signature, SignError>>;
}

impl<T: Signer + ?Sized> Signer for Arc<T> {
    fn sign(&self, path_and_query: &str, user_id: &str) -> BoxFuture<Result<Signature, SignError>> {
        (**self).sign(path_and_query, user_id)
    }
}

impl<T: Signer + ?Sized> Signer for Box<T> {
    fn sign(&self, path_and_query: &str, user_id: &str) -> BoxFuture<Result<Signature, SignError>> {
        (**self).sign(path_and_query, user_id)
    }
}

/// A signer could not produce a signature. The client sees 502 `SIGNING_FAILED`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignError {
    /// The signing service did not answer within the timeout.
    #[error("the signer did not answer within {0:?}")]
    Timeout(Duration),
    /// The signing service could not be reached, or the connection broke.
    #[error("the signer could not be reached: {0}")]
    Unreachable(String),
    /// The signing service answered with a non-2xx status.
    #[error("the signer answered with status {0}")]
    Status(http::StatusCode),
    /// The signing service answered 2xx with a body that is not a valid signature.
    #[error("the signer's answer is invalid: {0}")]
    BadResponse(String),
    /// Any other failure.
    #[error("signing failed: {0}")]
    Other(String),
}
