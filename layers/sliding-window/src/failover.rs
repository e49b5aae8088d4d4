//! [`FailoverWindowStore`]: a shared store (Redis) with a circuit breaker and a local
//! fallback, failing open or closed while the shared store is down.

use std::error::Error;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tollgate_core::{BackendError, BackendErrorKind, BoxFuture};

use crate::memory::MemoryWindowStore;
use crate::store::{BucketKey, Decision, WindowLimits, WindowStore};

/// The default bound on one call to the primary store while the primary answers nobody.
///
/// A refused or reset connection fails at once; this bound only matters for a primary that
/// is frozen or cut off. It is a second, not a few hundred milliseconds, because deciding
/// locally while the shared store is merely slow admits more than the shared limit: on a
/// loaded host (a replica starved of CPU, a Redis working through a burst of a thousand
/// decisions) a healthy primary can go quiet for a few hundred milliseconds.
pub const DEFAULT_FAILOVER_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest a call waits while the primary keeps answering other calls: under a burst,
/// a healthy Redis can take longer than [`DEFAULT_FAILOVER_TIMEOUT`] to reach a call queued
/// behind hundreds of others, and deciding locally then would admit more than the shared
/// limit. A dead or frozen primary answers nobody, so calls to it still give up after one
/// timeout.
pub const MAX_QUEUED_WAIT: Duration = Duration::from_secs(3);

/// The default number of consecutive failures that opens the circuit.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;

/// The default time the circuit stays open before one request probes the primary again.
pub const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(1);

/// What to decide while the shared store is unreachable (`TOLLGATE_RATE_LIMIT_FAILURE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FailureMode {
    /// Decide with the local in-process limiter (each replica then enforces the limit on
    /// its own). The default.
    #[default]
    Open,
    /// Refuse with 503 `SERVICE_UNAVAILABLE`.
    Closed,
}

impl FailureMode {
    /// `"open"` or `"closed"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FailureMode::Open => "open",
            FailureMode::Closed => "closed",
        }
    }
}

impl fmt::Display for FailureMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FailureMode {
    type Err = FailureModeParseError;

    /// `open` or `closed`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("open") {
            Ok(FailureMode::Open)
        } else if s.eq_ignore_ascii_case("closed") {
            Ok(FailureMode::Closed)
        } else {
            Err(FailureModeParseError(s.to_owned()))
        }
    }
}

/// A failure mode other than `open` or `closed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureModeParseError(String);

impl fmt::Display for FailureModeParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate-limit failure mode must be open or closed, not {:?}",
            self.0
        )
    }
}

impl Error for FailureModeParseError {}

/// Where the circuit breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Decisions go to the primary store.
    Closed,
    /// The primary failed repeatedly: decisions are taken by the failure mode until the
    /// cool-down ends.
    Open,
    /// The cool-down ended and one request is probing the primary; the others still follow
    /// the failure mode.
    HalfOpen,
}

/// A [`WindowStore`] that asks a primary (shared) store and copes with its outages.
///
/// Every call to the primary is bounded by a timeout ([`DEFAULT_FAILOVER_TIMEOUT`]). After
/// [`DEFAULT_FAILURE_THRESHOLD`] consecutive failures (unreachable or timed out) the
/// circuit opens: requests stop waiting on the primary and are decided by the
/// [`FailureMode`] — [`Open`](FailureMode::Open) by a local [`MemoryWindowStore`] with the
/// same limits, [`Closed`](FailureMode::Closed) with
/// [`BackendError::unavailable`] (503 `SERVICE_UNAVAILABLE` from the layer). After a
/// cool-down ([`DEFAULT_COOL_DOWN`]) one request probes the primary; its success closes the
/// circuit and the shared limit holds again, without a restart. The failure mode is
/// applied to single failures too, before the circuit opens, so no request ever waits much
/// longer than the timeout. A trip is logged once at `warn`, the recovery at `info`.
///
/// The primary's other errors (it answered, but with something unexpected) are passed on
/// (500 `INTERNAL_ERROR`): they are a fault to fix, not an outage to ride out.
///
/// While failing open each replica counts only its own requests, and what it admitted
/// locally is not known to the primary afterwards.
///
/// ```
/// # #[cfg(feature = "redis")] {
/// use tollgate_sliding_window::{FailoverWindowStore, FailureMode, RedisWindowStore};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let mode: FailureMode = std::env::var("TOLLGATE_RATE_LIMIT_FAILURE")
///     .as_deref()
///     .unwrap_or("open")
///     .parse()?;
/// let store = FailoverWindowStore::new(RedisWindowStore::open("redis://127.0.0.1:6379")?, mode);
/// # let _ = store;
/// # Ok(())
/// # }
/// # }
/// ```
pub struct FailoverWindowStore<P = Arc<dyn WindowStore>> {
    primary: P,
    local: Arc<MemoryWindowStore>,
    breaker: Arc<Breaker>,
    mode: FailureMode,
    timeout: Duration,
}

impl<P: WindowStore> FailoverWindowStore<P> {
    /// Wraps `primary`, with a local store on the system clock for [`FailureMode::Open`].
    pub fn new(primary: P, mode: FailureMode) -> Self {
        FailoverWindowStore {
            primary,
            local: Arc::new(MemoryWindowStore::default()),
            breaker: Arc::new(Breaker::new(DEFAULT_FAILURE_THRESHOLD, DEFAULT_COOL_DOWN)),
            mode,
            timeout: DEFAULT_FAILOVER_TIMEOUT,
        }
    }
}

impl<P> FailoverWindowStore<P> {
    /// Replaces the local store deciding while failing open.
    pub fn with_local(mut self, local: MemoryWindowStore) -> Self {
        self.local = Arc::new(local);
        self
    }

    /// Sets the bound on one call to the primary (default [`DEFAULT_FAILOVER_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets how many consecutive failures open the circuit (default
    /// [`DEFAULT_FAILURE_THRESHOLD`]; at least 1).
    pub fn with_failure_threshold(mut self, failures: u32) -> Self {
        self.breaker = Arc::new(Breaker::new(failures.max(1), self.breaker.cool_down));
        self
    }

    /// Sets how long the circuit stays open before a probe (default [`DEFAULT_COOL_DOWN`]).
    pub fn with_cool_down(mut self, cool_down: Duration) -> Self {
        self.breaker = Arc::new(Breaker::new(self.breaker.threshold, cool_down));
        self
    }

    /// The failure mode.
    pub fn mode(&self) -> FailureMode {
        self.mode
    }

    /// Where the circuit breaker stands (for readiness checks and metrics).
    pub fn circuit(&self) -> CircuitState {
        match *self.breaker.state() {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { .. } => CircuitState::Open,
            State::HalfOpen => CircuitState::HalfOpen,
        }
    }

    /// The primary store.
    pub fn primary(&self) -> &P {
        &self.primary
    }

    /// The local store used while failing open.
    pub fn local(&self) -> &MemoryWindowStore {
        &self.local
    }
}

impl<P: WindowStore> WindowStore for FailoverWindowStore<P> {
    fn check(
        &self,
        key: BucketKey,
        limits: WindowLimits,
    ) -> BoxFuture<Result<Decision, BackendError>> {
        let Some(probe) = self.breaker.permit() else {
            return match self.mode {
                FailureMode::Open => self.local.check(key, limits),
                FailureMode::Closed => Box::pin(std::future::ready(Err(
                    BackendError::unavailable("the rate-limit store is unreachable (circuit open)"),
                ))),
            };
        };
        let call = self.primary.check(key, limits);
        let mut outcome = Outcome {
            breaker: Arc::clone(&self.breaker),
            probe,
            mode: self.mode,
            recorded: false,
        };
        let local = Arc::clone(&self.local);
        let breaker = Arc::clone(&self.breaker);
        let (mode, timeout) = (self.mode, self.timeout);
        Box::pin(async move {
            let mut call = call;
            let started = Instant::now();
            let mut slice_started = started;
            let failure = loop {
                match tokio::time::timeout(timeout, &mut call).await {
                    Ok(Ok(decision)) => {
                        outcome.reachable();
                        return Ok(decision);
                    }
                    Ok(Err(err)) if err.kind() == BackendErrorKind::Other => {
                        outcome.reachable();
                        return Err(err);
                    }
                    Ok(Err(err)) => break err,
                    Err(_) => {
                        // Slow, but alive: it answered other calls meanwhile, so this one is
                        // queued behind them. Keep waiting (bounded) rather than deciding
                        // alone.
                        if breaker.answered_since(slice_started)
                            && started.elapsed() + timeout <= MAX_QUEUED_WAIT
                        {
                            slice_started = Instant::now();
                            continue;
                        }
                        break BackendError::unavailable(format!(
                            "the rate-limit store did not answer within {:?}",
                            started.elapsed()
                        ));
                    }
                }
            };
            outcome.unreachable(&failure);
            match mode {
                FailureMode::Open => local.check(key, limits).await,
                FailureMode::Closed => Err(failure),
            }
        })
    }
}

impl<P: fmt::Debug> fmt::Debug for FailoverWindowStore<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailoverWindowStore")
            .field("primary", &self.primary)
            .field("local", &self.local)
            .field("mode", &self.mode)
            .field("timeout", &self.timeout)
            .field("threshold", &self.breaker.threshold)
            .field("cool_down", &self.breaker.cool_down)
            .field("circuit", &self.circuit())
            .finish()
    }
}

struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cool_down: Duration,
    /// When the primary last answered a call.
    last_answer: Mutex<Option<Instant>>,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

impl Breaker {
    fn new(threshold: u32, cool_down: Duration) -> Self {
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold,
            cool_down,
            last_answer: Mutex::new(None),
        }
    }

    /// Whether the primary answered any call after `since`.
    fn answered_since(&self, since: Instant) -> bool {
        self.last_answer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|at| at > since)
    }

    /// Nothing in a critical section can leave the state half-updated.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this request may call the primary (`Some(true)`: as the probe).
    fn permit(&self) -> Option<bool> {
        let mut state = self.state();
        match *state {
            State::Closed { .. } => Some(false),
            State::Open { until } if Instant::now() >= until => {
                *state = State::HalfOpen;
                Some(true)
            }
            State::Open { .. } | State::HalfOpen => None,
        }
    }
}

/// Records what became of one call to the primary, exactly once; a probe dropped before
/// its answer lets the next request probe instead.
struct Outcome {
    breaker: Arc<Breaker>,
    probe: bool,
    mode: FailureMode,
    recorded: bool,
}

impl Outcome {
    fn reachable(&mut self) {
        self.recorded = true;
        *self
            .breaker
            .last_answer
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        let mut state = self.breaker.state();
        let was_open = !matches!(*state, State::Closed { .. });
        *state = State::Closed { failures: 0 };
        drop(state);
        if was_open {
            tracing::info!("rate-limit store reachable again; the shared limit applies");
        }
    }

    fn unreachable(&mut self, error: &BackendError) {
        self.recorded = true;
        let mut state = self.breaker.state();
        let cool_down_ends = Instant::now() + self.breaker.cool_down;
        match *state {
            State::Closed { failures } => {
                let failures = failures + 1;
                if failures < self.breaker.threshold {
                    *state = State::Closed { failures };
                    return;
                }
                *state = State::Open {
                    until: cool_down_ends,
                };
                drop(state);
                let mode = self.mode.as_str();
                tracing::warn!(
                    %error,
                    failures,
                    failure_mode = mode,
                    "rate-limit store unreachable; circuit open, deciding by the failure mode"
                );
            }
            // A failed probe waits another cool-down (the trip is logged already); a late
            // failure of a call made before the trip changes nothing.
            State::HalfOpen | State::Open { .. } => {
                if self.probe {
                    *state = State::Open {
                        until: cool_down_ends,
                    };
                }
            }
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            let mut state = self.breaker.state();
            if matches!(*state, State::HalfOpen) {
                *state = State::Open {
                    until: Instant::now(),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use tollgate_core::{ManualClock, ModelId, OrgId};

    /// A primary that can be taken down, made to hang, or made to answer nonsense; when up
    /// it decides with its own memory store.
    #[derive(Default)]
    struct Primary {
        down: AtomicBool,
        hang: AtomicBool,
        broken: AtomicBool,
        calls: AtomicUsize,
        store: MemoryWindowStore,
    }

    impl WindowStore for Primary {
        fn check(
            &self,
            key: BucketKey,
            limits: WindowLimits,
        ) -> BoxFuture<Result<Decision, BackendError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.hang.load(Ordering::SeqCst) {
                return Box::pin(std::future::pending());
            }
            if self.down.load(Ordering::SeqCst) {
                return Box::pin(std::future::ready(Err(BackendError::unavailable(
                    "connection refused",
                ))));
            }
            if self.broken.load(Ordering::SeqCst) {
                return Box::pin(std::future::ready(Err(BackendError::other("WRONGTYPE"))));
            }
            self.store.check(key, limits)
        }
    }

    const LIMITS: WindowLimits = WindowLimits {
        limit: 5,
        burst: 100,
        window_ms: 60_000,
    };

    fn failover(mode: FailureMode) -> (FailoverWindowStore<Arc<Primary>>, Arc<Primary>) {
        let primary = Arc::new(Primary::default());
        let local = MemoryWindowStore::new(Arc::new(ManualClock::new(1_000_000)));
        let store = FailoverWindowStore::new(Arc::clone(&primary), mode).with_local(local);
        (store, primary)
    }

    fn bucket() -> BucketKey {
        BucketKey::new(OrgId::new(), ModelId::new())
    }

    fn calls(primary: &Primary) -> usize {
        primary.calls.load(Ordering::SeqCst)
    }

    /// Fills `key` in the primary so that the primary refuses where the local store admits:
    /// tells who decided.
    async fn fill_in_primary(primary: &Primary, key: BucketKey) {
        for _ in 0..LIMITS.limit {
            assert!(primary.store.check(key, LIMITS).await.unwrap().admitted);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fail_open_decides_locally_within_the_local_limit() {
        let (store, primary) = failover(FailureMode::Open);
        primary.down.store(true, Ordering::SeqCst);
        let key = bucket();
        let mut admitted = 0;
        for i in 0..12 {
            let d = store.check(key, LIMITS).await.unwrap();
            admitted += usize::from(d.admitted);
            assert_eq!(d.remaining, 4u32.saturating_sub(i), "{i}");
        }
        assert_eq!(admitted, 5);
        // Three failures opened the circuit; the other nine never waited on the primary.
        assert_eq!(calls(&primary), 3);
        assert_eq!(store.circuit(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn fail_closed_is_unavailable() {
        let (store, primary) = failover(FailureMode::Closed);
        primary.down.store(true, Ordering::SeqCst);
        for _ in 0..10 {
            let err = store.check(bucket(), LIMITS).await.unwrap_err();
            assert_eq!(err.kind(), BackendErrorKind::Unavailable);
            assert_eq!(
                err.rejection().status(),
                http::StatusCode::SERVICE_UNAVAILABLE
            );
        }
        assert_eq!(calls(&primary), 3);
        assert!(store.local().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_failure_follows_the_mode_without_opening_the_circuit() {
        let (store, primary) = failover(FailureMode::Open);
        let key = bucket();
        fill_in_primary(&primary, key).await;
        primary.down.store(true, Ordering::SeqCst);
        assert!(store.check(key, LIMITS).await.unwrap().admitted); // local
        primary.down.store(false, Ordering::SeqCst);
        assert!(!store.check(key, LIMITS).await.unwrap().admitted); // primary again
        assert_eq!(store.circuit(), CircuitState::Closed);
        // A success resets the count: two more failures do not open it.
        primary.down.store(true, Ordering::SeqCst);
        store.check(key, LIMITS).await.unwrap();
        store.check(key, LIMITS).await.unwrap();
        assert_eq!(store.circuit(), CircuitState::Closed);
        store.check(key, LIMITS).await.unwrap();
        assert_eq!(store.circuit(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_cool_down_one_probe_closes_the_circuit() {
        let (store, primary) = failover(FailureMode::Open);
        let key = bucket();
        fill_in_primary(&primary, key).await;
        primary.down.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            store.check(key, LIMITS).await.unwrap();
        }
        assert_eq!(store.circuit(), CircuitState::Open);
        primary.down.store(false, Ordering::SeqCst);

        // Still cooling down: decided locally, the primary is not asked.
        tokio::time::advance(DEFAULT_COOL_DOWN - Duration::from_millis(1)).await;
        assert!(store.check(key, LIMITS).await.unwrap().admitted);
        assert_eq!(calls(&primary), 3);

        // Cool-down over: the next request probes, finds the primary back, and its
        // decision (the shared bucket is full) is the answer.
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!store.check(key, LIMITS).await.unwrap().admitted);
        assert_eq!(calls(&primary), 4);
        assert_eq!(store.circuit(), CircuitState::Closed);
        assert!(!store.check(key, LIMITS).await.unwrap().admitted);
        assert_eq!(calls(&primary), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_waits_another_cool_down() {
        let (store, primary) = failover(FailureMode::Closed);
        primary.down.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            store.check(bucket(), LIMITS).await.unwrap_err();
        }
        tokio::time::advance(DEFAULT_COOL_DOWN).await;
        store.check(bucket(), LIMITS).await.unwrap_err(); // the probe
        assert_eq!(calls(&primary), 4);
        assert_eq!(store.circuit(), CircuitState::Open);
        tokio::time::advance(DEFAULT_COOL_DOWN - Duration::from_millis(1)).await;
        store.check(bucket(), LIMITS).await.unwrap_err();
        assert_eq!(calls(&primary), 4);
        tokio::time::advance(Duration::from_millis(1)).await;
        primary.down.store(false, Ordering::SeqCst);
        assert!(store.check(bucket(), LIMITS).await.unwrap().admitted);
        assert_eq!(store.circuit(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_primary_costs_at_most_the_timeout() {
        let (store, primary) = failover(FailureMode::Open);
        primary.hang.store(true, Ordering::SeqCst);
        let key = bucket();
        for _ in 0..3 {
            let started = Instant::now();
            assert!(store.check(key, LIMITS).await.unwrap().admitted);
            assert_eq!(started.elapsed(), DEFAULT_FAILOVER_TIMEOUT);
        }
        // The circuit is open: no more waiting.
        let started = Instant::now();
        assert!(store.check(key, LIMITS).await.unwrap().admitted);
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(calls(&primary), 3);

        // A shorter timeout is honoured too.
        let (store, primary) = failover(FailureMode::Closed);
        let store = store.with_timeout(Duration::from_millis(40));
        primary.hang.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let err = store.check(key, LIMITS).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_millis(40));
        assert_eq!(err.kind(), BackendErrorKind::Unavailable);
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_at_a_time_and_a_dropped_probe_frees_the_slot() {
        let (store, primary) = failover(FailureMode::Open);
        primary.down.store(true, Ordering::SeqCst);
        let key = bucket();
        for _ in 0..3 {
            store.check(key, LIMITS).await.unwrap();
        }
        primary.down.store(false, Ordering::SeqCst);
        primary.hang.store(true, Ordering::SeqCst);
        tokio::time::advance(DEFAULT_COOL_DOWN).await;

        let probe = store.check(key, LIMITS);
        assert_eq!(calls(&primary), 4);
        assert_eq!(store.circuit(), CircuitState::HalfOpen);
        // While the probe is out, others are decided by the mode, not sent to the primary.
        for _ in 0..3 {
            store.check(key, LIMITS).await.unwrap();
        }
        assert_eq!(calls(&primary), 4);
        // The probe's caller goes away: the next request probes instead.
        drop(probe);
        assert_eq!(store.circuit(), CircuitState::Open);
        primary.hang.store(false, Ordering::SeqCst);
        store.check(key, LIMITS).await.unwrap();
        assert_eq!(calls(&primary), 5);
        assert_eq!(store.circuit(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn answers_that_are_not_outages_pass_through_and_keep_the_circuit_closed() {
        for mode in [FailureMode::Open, FailureMode::Closed] {
            let (store, primary) = failover(mode);
            primary.broken.store(true, Ordering::SeqCst);
            for _ in 0..5 {
                let err = store.check(bucket(), LIMITS).await.unwrap_err();
                assert_eq!(err.kind(), BackendErrorKind::Other);
            }
            assert_eq!(calls(&primary), 5);
            assert_eq!(store.circuit(), CircuitState::Closed);
            assert!(store.local().is_empty());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn threshold_and_cool_down_are_configurable() {
        let (store, primary) = failover(FailureMode::Closed);
        let store = store
            .with_failure_threshold(1)
            .with_cool_down(Duration::from_millis(100));
        primary.down.store(true, Ordering::SeqCst);
        store.check(bucket(), LIMITS).await.unwrap_err();
        assert_eq!(store.circuit(), CircuitState::Open);
        tokio::time::advance(Duration::from_millis(100)).await;
        primary.down.store(false, Ordering::SeqCst);
        assert!(store.check(bucket(), LIMITS).await.unwrap().admitted);
        assert_eq!(calls(&primary), 2);
    }

    #[test]
    fn failure_modes_parse_from_the_environment_syntax() {
        assert_eq!("open".parse(), Ok(FailureMode::Open));
        assert_eq!(" Closed ".parse(), Ok(FailureMode::Closed));
        let err = "maybe".parse::<FailureMode>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "rate-limit failure mode must be open or closed, not \"maybe\""
        );
        assert_eq!(FailureMode::default(), FailureMode::Open);
        assert_eq!(FailureMode::Closed.to_string(), "closed");
    }
}
