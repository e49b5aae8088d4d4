//! The [`WindowStore`] extension point: one atomic sliding-window decision per request.

use std::sync::Arc;

use tollgate_core::{BackendError, BoxFuture, ModelId, OrgId, RateLimitInfo};

/// The length of the per-second burst window, in milliseconds.
pub const BURST_WINDOW_MS: u64 = 1_000;

/// One rate-limit bucket: every key of an organization shares it for one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey {
    /// The organization calling.
    pub org: OrgId,
    /// The model (connected account) the request is about.
    pub model: ModelId,
}

impl BucketKey {
    /// The bucket of `org` on `model`.
    pub const fn new(org: OrgId, model: ModelId) -> Self {
        BucketKey { org, model }
    }
}

/// The limits one decision is taken under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowLimits {
    /// Requests admitted per window.
    pub limit: u32,
    /// Requests admitted per [`BURST_WINDOW_MS`] (the per-second burst).
    pub burst: u32,
    /// The window length in milliseconds (60 000 in production).
    pub window_ms: u64,
}

impl WindowLimits {
    /// How far back a store must remember admissions to decide exactly: the longer of the
    /// window and the burst window.
    pub fn horizon_ms(&self) -> u64 {
        self.window_ms.max(BURST_WINDOW_MS)
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Decision {
    /// Whether the request was admitted (and recorded in the window).
    pub admitted: bool,
    /// The window's limit.
    pub limit: u32,
    /// `limit − requests in the window`, counting this request when it was admitted.
    pub remaining: u32,
    /// Milliseconds until the oldest request counted in the window leaves it; 0 when the
    /// window is empty.
    pub reset_ms: u64,
    /// When refused: milliseconds until a request would be admitted, considering both the
    /// window and the burst. `None` when admitted.
    pub retry_after_ms: Option<u64>,
}

impl Decision {
    /// The decision as the [`RateLimitInfo`] extension: milliseconds rounded up to whole
    /// seconds, `Retry-After` at least 1 second and only on a refusal.
    pub fn rate_limit_info(&self) -> RateLimitInfo {
        RateLimitInfo {
            limit: self.limit,
            remaining: self.remaining,
            reset_secs: ceil_secs(self.reset_ms),
            retry_after_secs: if self.admitted {
                None
            } else {
                Some(ceil_secs(self.retry_after_ms.unwrap_or(0)).max(1))
            },
        }
    }
}

impl From<Decision> for RateLimitInfo {
    fn from(decision: Decision) -> Self {
        decision.rate_limit_info()
    }
}

fn ceil_secs(ms: u64) -> u64 {
    ms.div_ceil(1_000)
}

/// Where the sliding windows live.
///
/// A store takes one decision per call, atomically: it counts the admissions in the past
/// `window_ms` and in the past second, admits the request only if both are under their
/// limits, and records only admitted requests. Implementations: [`MemoryWindowStore`]
/// (feature `memory`), and anything else that can do this atomically (a Redis script).
/// Because the trait is object-safe and takes owned arguments, a fail-open wrapper is just
/// another `WindowStore` holding a primary and a fallback store.
///
/// [`MemoryWindowStore`]: crate::MemoryWindowStore
pub trait WindowStore: Send + Sync + 'static {
    /// Decides whether one more request fits the bucket `key` under `limits`, recording it
    /// if so.
    fn check(
        &self,
        key: BucketKey,
        limits: WindowLimits,
    ) -> BoxFuture<Result<Decision, BackendError>>;
}

impl<T: WindowStore + ?Sized> WindowStore for Arc<T> {
    fn check(
        &self,
        key: BucketKey,
        limits: WindowLimits,
    ) -> BoxFuture<Result<Decision, BackendError>> {
        (**self).check(key, limits)
    }
}

impl<T: WindowStore + ?Sized> WindowStore for Box<T> {
    fn check(
        &self,
        key: BucketKey,
        limits: WindowLimits,
    ) -> BoxFuture<Result<Decision, BackendError>> {
        (**self).check(key, limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_rounds_up_to_whole_seconds() {
        let admitted = Decision {
            admitted: true,
            limit: 10,
            remaining: 3,
            reset_ms: 1_001,
            retry_after_ms: None,
        };
        assert_eq!(
            admitted.rate_limit_info(),
            RateLimitInfo {
                limit: 10,
                remaining: 3,
                reset_secs: 2,
                retry_after_secs: None
            }
        );
        let refused = Decision {
            admitted: false,
            remaining: 0,
            reset_ms: 60_000,
            retry_after_ms: Some(1),
            ..admitted
        };
        let info = RateLimitInfo::from(refused);
        assert_eq!(info.reset_secs, 60);
        assert_eq!(info.retry_after_secs, Some(1));
        // A store that reports a refusal without a wait still yields Retry-After ≥ 1.
        let refused_now = Decision {
            retry_after_ms: None,
            ..refused
        };
        assert_eq!(refused_now.rate_limit_info().retry_after_secs, Some(1));
    }

    #[test]
    fn horizon_covers_the_burst_window() {
        let l = WindowLimits {
            limit: 1,
            burst: 1,
            window_ms: 250,
        };
        assert_eq!(l.horizon_ms(), 1_000);
        assert_eq!(
            WindowLimits {
                window_ms: 60_000,
                ..l
            }
            .horizon_ms(),
            60_000
        );
    }
}
