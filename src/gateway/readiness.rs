//! `/readyz`: whether every backend the requests need answers, probed at most once per
//! [`READINESS_TTL`] however many callers ask.
//!
//! The endpoint needs no credentials, and one probe costs a query to each backend (the
//! ledger, the key store, the session store, the log sink and a rate-limit check). Callers
//! therefore share the last probe's result while it is younger than [`READINESS_TTL`], and
//! while a probe is running every caller waits for that one. The probe runs as its own task,
//! so a caller that hangs up neither cancels it nor makes the next caller start another; a
//! backend that goes down still shows within about [`READINESS_TTL`] plus the probe's
//! [`PROBE_TIMEOUT`].

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::future::{FutureExt, Shared};
use tollgate_core::BoxFuture;

use super::state::AppState;

/// How long one probe's result answers `/readyz`.
pub const READINESS_TTL: Duration = Duration::from_secs(1);

/// How long a probe waits for each backend before counting it as down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What one probe found: each backend's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Report {
    /// The credit ledger.
    pub ledger: bool,
    /// The key store.
    pub keys: bool,
    /// The model and session store.
    pub sessions: bool,
    /// The rate-limit window store.
    pub rate_limits: bool,
    /// The request log sink.
    pub logs: bool,
    /// The idempotency store (`Idempotency-Key` requests).
    pub idempotency: bool,
}

impl Report {
    /// Whether every backend answered.
    pub fn ready(&self) -> bool {
        self.ledger
            && self.keys
            && self.sessions
            && self.rate_limits
            && self.logs
            && self.idempotency
    }

    /// The `/readyz` body.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "status": if self.ready() { "ready" } else { "unavailable" },
            "backends": {
                "ledger": self.ledger, "keys": self.keys, "sessions": self.sessions,
                "rate_limits": self.rate_limits, "logs": self.logs,
                "idempotency": self.idempotency,
            },
        })
    }
}

type SharedProbe = Shared<BoxFuture<Report>>;

/// The readiness cache of a gateway (one per [`AppState`]).
#[derive(Default)]
pub struct Readiness {
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    last: Option<(Instant, Report)>,
    running: Option<SharedProbe>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let slot = self.lock();
        f.debug_struct("Readiness")
            .field("last", &slot.last)
            .field("running", &slot.running.is_some())
            .finish()
    }
}

impl Readiness {
    /// The backends' health: the last probe's when it is fresh, else the running probe's
    /// (starting one if none runs).
    pub async fn report(state: &Arc<AppState>) -> Report {
        let probe = {
            let mut slot = state.readiness.lock();
            match (&slot.last, &slot.running) {
                (Some((at, report)), _) if at.elapsed() < READINESS_TTL => return *report,
                (_, Some(running)) => running.clone(),
                (_, None) => {
                    let running = start_probe(Arc::clone(state));
                    slot.running = Some(running.clone());
                    running
                }
            }
        };
        probe.await
    }

    fn finish(&self, report: Report) {
        let mut slot = self.lock();
        slot.last = Some((Instant::now(), report));
        slot.running = None;
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Spawns one probe; it records its result in the cache itself, so it completes (and is
/// remembered) even when every caller waiting for it has gone.
fn start_probe(state: Arc<AppState>) -> SharedProbe {
    let task_state = Arc::clone(&state);
    let task = tokio::spawn(async move {
        let report = probe(&task_state).await;
        if !report.ready() {
            task_state.metrics.record_backend_error("readiness");
        }
        task_state.readiness.finish(report);
        report
    });
    let joined: BoxFuture<Report> = Box::pin(async move {
        match task.await {
            Ok(report) => report,
            Err(_) => {
                // The probe panicked: report everything down, and let the next caller retry.
                let report = Report::default();
                state.readiness.finish(report);
                report
            }
        }
    });
    joined.shared()
}

/// One cheap query to every backend, each bounded by [`PROBE_TIMEOUT`].
async fn probe(state: &AppState) -> Report {
    use tollgate_sliding_window::{BucketKey, WindowLimits};
    let within = |fut: BoxFuture<bool>| async move {
        tokio::time::timeout(PROBE_TIMEOUT, fut)
            .await
            .unwrap_or(false)
    };
    let probe = tollgate_core::OrgId::new();
    let ledger = state.ledger.account(probe);
    let keys = state.keys.list_keys(probe);
    let sessions = state.sessions.list(probe);
    let windows = state.windows.check(
        BucketKey::new(probe, tollgate_core::ModelId::new()),
        WindowLimits {
            limit: 1,
            burst: 1,
            window_ms: 1_000,
        },
    );
    let logs = state
        .logs
        .query(tollgate_request_logger::LogQuery::new(probe));
    // Freeing a lease nobody holds: a round trip that changes nothing.
    let lease = tollgate_idempotency::Lease::new(
        "readiness",
        &probe.to_string(),
        tollgate_idempotency::LeaseToken::generate(),
    );
    let idempotency = state.idempotency.release(&lease);
    let (ledger, keys, sessions, rate_limits, logs, idempotency) = tokio::join!(
        within(Box::pin(async move { ledger.await.is_ok() })),
        within(Box::pin(async move { keys.await.is_ok() })),
        within(Box::pin(async move { sessions.await.is_ok() })),
        within(Box::pin(async move { windows.await.is_ok() })),
        within(Box::pin(async move { logs.await.is_ok() })),
        within(Box::pin(async move { idempotency.await.is_ok() })),
    );
    Report {
        ledger,
        keys,
        sessions,
        rate_limits,
        logs,
        idempotency,
    }
}
