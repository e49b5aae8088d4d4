//! What every part of the gateway shares: configuration, backends, counters.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tollgate_api_key_auth::KeyStore;
use tollgate_credit_meter::Ledger;
use tollgate_idempotency::IdempotencyStore;
use tollgate_request_logger::{LogSink, LoggerHandle};
use tollgate_sliding_window::WindowStore;
use tollgate_upstream_sign::SessionStore;

use super::accounts::Accounts;
use super::admin::AdminLockout;
use super::billing::{BillingRequests, PaymentStep};
use super::config::Config;
use super::metrics::{Gauges, Metrics};
use super::orgs::OrgStore;
use super::readiness::Readiness;
use super::webhooks::{WebhookStore, Webhooks};

/// One upkeep task of a backend.
pub type Upkeep = Arc<dyn Fn() -> tollgate_core::BoxFuture<()> + Send + Sync>;

/// The backends a gateway runs on.
#[derive(Clone)]
pub struct Backends {
    /// Keys, subscriptions (for auth) and model ownership.
    pub keys: Arc<dyn KeyStore>,
    /// Credits: holds, balances, the ledger.
    pub ledger: Arc<dyn Ledger>,
    /// Sliding windows.
    pub windows: Arc<dyn WindowStore>,
    /// Models and their upstream sessions.
    pub sessions: Arc<dyn SessionStore>,
    /// Request logs.
    pub logs: Arc<dyn LogSink>,
    /// Organizations.
    pub orgs: Arc<dyn OrgStore>,
    /// Dashboard users and sessions, usage rollups.
    pub accounts: Accounts,
    /// `Idempotency-Key` records (in flight and stored responses).
    pub idempotency: Arc<dyn IdempotencyStore>,
    /// Webhook endpoints, the outbox and its deliveries.
    pub webhooks: Arc<dyn WebhookStore>,
    /// Plan changes and top-ups asked for in the dashboard.
    pub billing: Arc<dyn BillingRequests>,
    /// Periodic upkeep the backends need (evicting idle in-memory windows, writing buffered
    /// last-used times), run every minute and once more at graceful shutdown.
    pub upkeep: Vec<Upkeep>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends").finish_non_exhaustive()
    }
}

/// Shared state of a running gateway.
pub struct AppState {
    /// The configuration it was started with.
    pub config: Config,
    /// Keys, subscriptions and model ownership.
    pub keys: Arc<dyn KeyStore>,
    /// Credits.
    pub ledger: Arc<dyn Ledger>,
    /// Sliding windows.
    pub windows: Arc<dyn WindowStore>,
    /// Models and sessions.
    pub sessions: Arc<dyn SessionStore>,
    /// Request logs.
    pub logs: Arc<dyn LogSink>,
    /// Organizations.
    pub orgs: Arc<dyn OrgStore>,
    /// Dashboard users and sessions, usage rollups.
    pub accounts: Accounts,
    /// Webhooks: endpoints and the outbox.
    pub webhooks: Webhooks,
    /// Plan changes and top-ups asked for in the dashboard.
    pub billing: Arc<dyn BillingRequests>,
    /// `Idempotency-Key` records (for the readiness probe; the layer holds its own handle).
    pub idempotency: Arc<dyn IdempotencyStore>,
    /// What a new billing request goes through before it is applied.
    pub payments: Arc<dyn PaymentStep>,
    /// Request counters.
    pub metrics: Arc<Metrics>,
    /// The request logger's queue (dropped rows, flush).
    pub logger: LoggerHandle,
    /// Set when graceful shutdown begins (`/readyz` then answers 503).
    pub draining: AtomicBool,
    /// The last `/readyz` probe, shared by its callers.
    pub readiness: Readiness,
    /// Wrong admin tokens per client address.
    pub admin_lockout: AdminLockout,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// Whether graceful shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The layers' gauges, for `/metrics`.
    pub fn gauges(&self) -> Gauges {
        Gauges {
            open_holds: self.ledger.open_holds(),
            dropped_log_rows: self.logger.dropped_rows(),
            failed_log_rows: self.logger.stats().failed_rows,
        }
    }
}
