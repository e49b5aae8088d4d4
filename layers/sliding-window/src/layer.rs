//! [`PerModelSlidingWindowLayer`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use tollgate_core::{CostTable, Plan, RouteMatch};
use tower_layer::Layer;

use crate::policy::WindowPolicy;
use crate::service::PerModelSlidingWindow;
use crate::store::{BucketKey, WindowStore};

/// Chooses the bucket of a request yourself (see
/// [`PerModelSlidingWindowLayer::with_bucket_fn`]).
pub type BucketFn =
    Arc<dyn Fn(&Parts, Option<&RouteMatch>) -> Option<(BucketKey, Plan)> + Send + Sync + 'static>;

/// Limits requests per (organization, model) with an exact sliding window and a per-second
/// burst (docs/contract.md §3), answering 429 `RATE_LIMIT_EXCEEDED` when either is full.
///
/// The organization and its plan come from the [`Principal`] request extension, so
/// `ApiKeyAuthLayer` must sit outside this layer; the model comes from the matched route
/// ([`CostTable::resolve`]). Routes without a model pass through unlimited. Every response
/// of a limited route, success or 429, carries [`RateLimitInfo`] in its extensions and the
/// `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` headers (429 adds
/// `Retry-After`). A store failure is answered with 503 `SERVICE_UNAVAILABLE` (unreachable)
/// or 500 `INTERNAL_ERROR`, never with an error that drops the connection.
///
/// [`Principal`]: tollgate_core::Principal
/// [`RateLimitInfo`]: tollgate_core::RateLimitInfo
pub struct PerModelSlidingWindowLayer<W = Arc<dyn WindowStore>> {
    config: Config<W>,
}

pub(crate) struct Config<W> {
    pub(crate) store: Arc<W>,
    pub(crate) policy: WindowPolicy,
    pub(crate) cost_table: CostTable,
    pub(crate) bucket_fn: Option<BucketFn>,
}

impl<W> Clone for Config<W> {
    fn clone(&self) -> Self {
        Config {
            store: Arc::clone(&self.store),
            policy: self.policy,
            cost_table: self.cost_table.clone(),
            bucket_fn: self.bucket_fn.clone(),
        }
    }
}

impl<W: WindowStore> PerModelSlidingWindowLayer<W> {
    /// A layer deciding with `store`, the default [`WindowPolicy`] and
    /// [`CostTable::onlyfans`].
    pub fn new(store: W) -> Self {
        PerModelSlidingWindowLayer {
            config: Config {
                store: Arc::new(store),
                policy: WindowPolicy::new(),
                cost_table: CostTable::onlyfans(),
                bucket_fn: None,
            },
        }
    }
}

impl<W> PerModelSlidingWindowLayer<W> {
    /// Replaces the whole policy (window length, limits and bursts per plan).
    pub fn with_policy(mut self, policy: WindowPolicy) -> Self {
        self.config.policy = policy;
        self
    }

    /// Sets the window length (default 60 s).
    pub fn with_window(mut self, window: Duration) -> Self {
        self.config.policy = self.config.policy.with_window(window);
        self
    }

    /// Sets the per-second burst of `plan`.
    pub fn with_burst(mut self, plan: Plan, burst: u32) -> Self {
        self.config.policy = self.config.policy.with_burst(plan, burst);
        self
    }

    /// Sets the requests per window of `plan`.
    pub fn with_limit(mut self, plan: Plan, limit: u32) -> Self {
        self.config.policy = self.config.policy.with_limit(plan, limit);
        self
    }

    /// Sets the routes (default [`CostTable::onlyfans`]). A [`RouteMatch`] an outer layer
    /// already put in the request extensions wins.
    pub fn with_cost_table(mut self, cost_table: CostTable) -> Self {
        self.config.cost_table = cost_table;
        self
    }

    /// Chooses buckets yourself, for stacks without `ApiKeyAuthLayer`: `f` gets the request
    /// head and its matched route (if any) and returns the bucket and the plan whose limits
    /// apply, or `None` to let the request through unlimited. It is called for every
    /// request, matched or not, and replaces the default keying on [`Principal`] and the
    /// route's model.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use tollgate_core::{ModelId, OrgId, Plan, SystemClock};
    /// use tollgate_sliding_window::{BucketKey, MemoryWindowStore, PerModelSlidingWindowLayer};
    ///
    /// // One shared bucket per tenant header, for every route of the app.
    /// let everything = ModelId::from_uuid(Default::default());
    /// let layer = PerModelSlidingWindowLayer::new(MemoryWindowStore::new(SystemClock::shared()))
    ///     .with_bucket_fn(move |head, _route| {
    ///         let tenant: OrgId = head.headers.get("x-tenant")?.to_str().ok()?.parse().ok()?;
    ///         Some((BucketKey::new(tenant, everything), Plan::Basic))
    ///     });
    /// # let _ = layer;
    /// ```
    ///
    /// [`Principal`]: tollgate_core::Principal
    pub fn with_bucket_fn<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts, Option<&RouteMatch>) -> Option<(BucketKey, Plan)> + Send + Sync + 'static,
    {
        self.config.bucket_fn = Some(Arc::new(f));
        self
    }

    /// The policy in force.
    pub fn policy(&self) -> &WindowPolicy {
        &self.config.policy
    }

    /// The store.
    pub fn store(&self) -> &W {
        &self.config.store
    }
}

impl<W> Clone for PerModelSlidingWindowLayer<W> {
    fn clone(&self) -> Self {
        PerModelSlidingWindowLayer {
            config: self.config.clone(),
        }
    }
}

impl<S, W> Layer<S> for PerModelSlidingWindowLayer<W> {
    type Service = PerModelSlidingWindow<S, W>;

    fn layer(&self, inner: S) -> Self::Service {
        PerModelSlidingWindow::from_config(inner, Arc::new(self.config.clone()))
    }
}

impl<W> fmt::Debug for PerModelSlidingWindowLayer<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.fmt(f)
    }
}

impl<W> fmt::Debug for Config<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerModelSlidingWindowLayer")
            .field("policy", &self.policy)
            .field("cost_table", &self.cost_table)
            .field("bucket_fn", &self.bucket_fn.is_some())
            .finish_non_exhaustive()
    }
}
