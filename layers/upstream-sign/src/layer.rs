//! [`UpstreamSignLayer`].

use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use crate::service::UpstreamSign;
use crate::session::SessionStore;
use crate::signer::Signer;

/// The default cap on how much of an upstream error body is read to classify it.
pub const DEFAULT_ERROR_BODY_LIMIT: usize = 64 * 1024;

pub(crate) struct Shared {
    pub(crate) signer: Arc<dyn Signer>,
    pub(crate) sessions: Arc<dyn SessionStore>,
    pub(crate) error_body_limit: usize,
}

/// Wraps the upstream HTTP client: attaches the model's session and a fresh signature to
/// every request, and turns the upstream's refusals into tollgate error codes.
///
/// See the [crate docs](crate) for the full behaviour.
pub struct UpstreamSignLayer {
    shared: Arc<Shared>,
}

impl UpstreamSignLayer {
    /// A layer signing with `signer` and taking sessions from `sessions`.
    pub fn new<G: Signer, T: SessionStore>(signer: G, sessions: T) -> Self {
        UpstreamSignLayer {
            shared: Arc::new(Shared {
                signer: Arc::new(signer),
                sessions: Arc::new(sessions),
                error_body_limit: DEFAULT_ERROR_BODY_LIMIT,
            }),
        }
    }

    /// Caps how many bytes of an upstream 4xx body are read to classify it and to put under
    /// `details` (default 64 KiB). The rest of the body is not read.
    pub fn with_error_body_limit(mut self, bytes: usize) -> Self {
        self.shared = Arc::new(Shared {
            signer: self.shared.signer.clone(),
            sessions: self.shared.sessions.clone(),
            error_body_limit: bytes,
        });
        self
    }
}

impl Clone for UpstreamSignLayer {
    fn clone(&self) -> Self {
        UpstreamSignLayer {
            shared: self.shared.clone(),
        }
    }
}

impl fmt::Debug for UpstreamSignLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamSignLayer")
            .field("error_body_limit", &self.shared.error_body_limit)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for UpstreamSignLayer {
    type Service = UpstreamSign<S>;

    fn layer(&self, inner: S) -> Self::Service {
        UpstreamSign::from_shared(inner, self.shared.clone())
    }
}
