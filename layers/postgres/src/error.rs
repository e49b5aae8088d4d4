//! Mapping PostgreSQL and pool failures onto [`BackendError`].
//!
//! The layers answer 503 `SERVICE_UNAVAILABLE` for [`BackendErrorKind::Unavailable`] and
//! 500 `INTERNAL_ERROR` for anything else, so the one question that matters here is: could
//! the database not be reached (or not in time), or did it answer with an error?
//!
//! [`BackendErrorKind::Unavailable`]: tollgate_core::BackendErrorKind::Unavailable

use std::error::Error as StdError;

use deadpool_postgres::{CreatePoolError, HookError, PoolError};
use tokio_postgres::error::SqlState;
use tollgate_core::BackendError;

/// Turns a PostgreSQL, pool or migration failure into a [`BackendError`].
///
/// Connection refused, reset or closed, connect and pool timeouts, an exhausted pool, a
/// server shutting down or refusing connections, and statement timeouts are
/// [`unavailable`](BackendError::unavailable); everything else (constraint violations,
/// syntax errors, type mismatches, a bad configuration) is [`other`](BackendError::other).
///
/// ```
/// use tollgate_postgres::to_backend_error;
/// use tollgate_core::BackendErrorKind;
///
/// let err = to_backend_error(deadpool_postgres::PoolError::Closed);
/// assert_eq!(err.kind(), BackendErrorKind::Unavailable);
/// ```
pub fn to_backend_error<E: IntoBackendError>(err: E) -> BackendError {
    err.into_backend_error()
}

/// Failures [`to_backend_error`] knows how to classify.
pub trait IntoBackendError {
    /// Classifies and converts the failure.
    fn into_backend_error(self) -> BackendError;
}

impl IntoBackendError for tokio_postgres::Error {
    fn into_backend_error(self) -> BackendError {
        let unavailable = is_unavailable(&self);
        let err = PgError(self);
        if unavailable {
            BackendError::unavailable(err)
        } else {
            BackendError::other(err)
        }
    }
}

/// A tokio-postgres error whose message says what the server answered.
///
/// tokio-postgres displays a server error as just "db error"; an operator reading the log
/// needs the SQLSTATE and the server's message ("53300 sorry, too many clients already").
/// The server's DETAIL (which can quote row values) is left out. The original error stays
/// reachable through [`source`](StdError::source).
#[derive(Debug)]
struct PgError(tokio_postgres::Error);

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_db_error() {
            Some(db) => write!(f, "db error {}: {}", db.code().code(), db.message()),
            None => match self.0.source() {
                Some(cause) => write!(f, "{}: {cause}", self.0),
                None => write!(f, "{}", self.0),
            },
        }
    }
}

impl StdError for PgError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.0)
    }
}

impl IntoBackendError for PoolError {
    fn into_backend_error(self) -> BackendError {
        match self {
            PoolError::Backend(e) => e.into_backend_error(),
            PoolError::PostCreateHook(HookError::Backend(e)) => e.into_backend_error(),
            // Waiting for a free connection, creating or recycling one took too long, or the
            // pool was closed: the database cannot serve this request now.
            PoolError::Timeout(_) | PoolError::Closed => BackendError::unavailable(self),
            other => BackendError::other(other),
        }
    }
}

impl IntoBackendError for CreatePoolError {
    fn into_backend_error(self) -> BackendError {
        BackendError::other(self)
    }
}

impl IntoBackendError for refinery::Error {
    fn into_backend_error(self) -> BackendError {
        let unavailable = source_chain(&self)
            .find_map(|e| e.downcast_ref::<tokio_postgres::Error>())
            .is_some_and(is_unavailable);
        if unavailable {
            BackendError::unavailable(self)
        } else {
            BackendError::other(self)
        }
    }
}

impl IntoBackendError for BackendError {
    fn into_backend_error(self) -> BackendError {
        self
    }
}

fn source_chain<'a>(
    err: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(err), |&e| e.source())
}

/// Whether a tokio-postgres error means the server could not be reached or did not answer
/// in time.
pub fn is_unavailable(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    if let Some(code) = err.code() {
        return is_unavailable_state(code);
    }
    // Connect and read failures carry the io::Error that caused them.
    if source_chain(err).any(|e| e.is::<std::io::Error>()) {
        return true;
    }
    // The connect timeout has no source and no public kind; its message is all there is.
    err.to_string().contains("timeout")
}

fn is_unavailable_state(code: &SqlState) -> bool {
    let code = code.code();
    // Class 08: connection exception. Class 53: insufficient resources (too many
    // connections, out of memory or disk). Class 57P: the server is shutting down or not
    // yet accepting connections. 57014: statement timeout (or a cancel), the server is too
    // slow to answer.
    code.starts_with("08") || code.starts_with("53") || code.starts_with("57P") || code == "57014"
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::BackendErrorKind;

    #[test]
    fn sql_states() {
        assert!(is_unavailable_state(&SqlState::CONNECTION_FAILURE));
        assert!(is_unavailable_state(&SqlState::TOO_MANY_CONNECTIONS));
        assert!(is_unavailable_state(&SqlState::ADMIN_SHUTDOWN));
        assert!(is_unavailable_state(&SqlState::CANNOT_CONNECT_NOW));
        assert!(is_unavailable_state(&SqlState::QUERY_CANCELED));
        assert!(!is_unavailable_state(&SqlState::UNIQUE_VIOLATION));
        assert!(!is_unavailable_state(&SqlState::SYNTAX_ERROR));
        assert!(!is_unavailable_state(&SqlState::UNDEFINED_TABLE));
    }

    #[test]
    fn pool_errors() {
        assert_eq!(
            to_backend_error(PoolError::Closed).kind(),
            BackendErrorKind::Unavailable
        );
        assert_eq!(
            to_backend_error(PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)).kind(),
            BackendErrorKind::Unavailable
        );
        assert_eq!(
            to_backend_error(PoolError::NoRuntimeSpecified).kind(),
            BackendErrorKind::Other
        );
    }
}
