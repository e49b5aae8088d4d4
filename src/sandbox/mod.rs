//! The sandbox upstream: a local fake of the OnlyFans web API (docs/contract.md §7, `docs/upstream.md`).
//!
//! It serves the endpoints the gateway proxies (`/api2/v2/users/me`, `chats`, messages,
//! `subscriptions/subscribers`, the `payouts/…` family) with realistic JSON that is the same
//! for the same account every time, and it checks every request the way the real upstream
//! does:
//!
//! 1. `sign`, `time` and `app-token` against the **current** signing rules, over the raw
//!    path and query exactly as received, with `time` no further than 5 minutes from now
//!    (else 401 `Please refresh the page`);
//! 2. the `cookie`'s `sess=` and `auth_id=` against a known, unexpired session (else 401
//!    `Access denied.`);
//! 3. `user-id`, `x-bc` and `user-agent` against that session (else 400 code 301
//!    `Wrong user.`);
//! 4. `content-type: application/json` on writes (else 415).
//!
//! Tests and demos steer it through a cheap, cloneable [`Sandbox`] handle (or the same
//! controls over HTTP under `/_sandbox/`): create accounts, expire sessions, rotate the
//! rules, and inject [`Fault`]s (5xx, stalls, throttling, non-JSON 2xx, bodies cut
//! mid-stream, two-factor checks) for the next *n* requests of one account or of everyone.
//! Every request that reaches it is counted and the most recent ones are recorded
//! ([`RecordedRequest`]) so a test can assert what the gateway sent, byte for byte.
//!
//! ```
//! use tollgate::sandbox::{sandbox_rules, Sandbox};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let sandbox = Sandbox::new(sandbox_rules());
//! let account = sandbox.add_account();
//! let server = sandbox.bind("127.0.0.1:0").await?;
//!
//! // A correctly signed request for the account, as the gateway would send it.
//! let headers = sandbox.signed_headers(&account, "/api2/v2/users/me");
//! assert!(headers.contains_key("sign"));
//! assert_eq!(headers["user-id"], account.user_id.as_str());
//! assert!(server.base_url().starts_with("http://127.0.0.1:"));
//! assert_eq!(sandbox.requests_received(), 0);
//! server.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod account;
mod body;
mod control;
mod data;
mod fault;
mod query;
mod record;
mod server;
mod service;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use tollgate_core::{Clock, SharedClock, SystemClock};

pub use account::SandboxAccount;
pub use body::{BodyCut, SandboxBody};
pub use fault::{Fault, FaultMode, FaultScope};
pub use record::RecordedRequest;
pub use server::SandboxServer;
pub use service::SandboxService;
pub use tollgate_upstream_sign::{sandbox_rules, DynamicRules, Signature};

use account::AccountRecord;
use fault::FaultQueue;
use record::Stats;

/// The base path of every upstream endpoint.
pub const API_BASE: &str = "/api2/v2/";

/// Message and user ids at or above this value do not exist in the sandbox: deleting such a
/// message (or reading or writing such a chat) answers 404 like the real upstream does for an
/// unknown id.
pub const MISSING_ID_FROM: u64 = 9_000_000_000;

/// How far a request's `time` may be from the sandbox's clock by default.
pub const DEFAULT_MAX_TIME_SKEW: Duration = Duration::from_secs(5 * 60);

/// How long a session lives by default (an OnlyFans session cookie lives about 10 days).
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(10 * 24 * 60 * 60);

/// How many requests are kept for [`Sandbox::recorded_requests`] by default.
pub const DEFAULT_RECORD_CAPACITY: usize = 256;

/// The largest request body the sandbox reads (larger ones get 413).
pub const MAX_REQUEST_BODY: usize = 1024 * 1024;

/// A handle on one sandbox upstream: its rules, sessions, faults and request records.
///
/// Clones share everything; the handle stays usable while servers built from it run.
#[derive(Clone)]
pub struct Sandbox {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    rules: RwLock<Arc<DynamicRules>>,
    accounts: RwLock<HashMap<String, AccountRecord>>,
    faults: FaultQueue,
    stats: Stats,
    clock: SharedClock,
    max_time_skew_ms: AtomicU64,
    session_ttl_ms: AtomicU64,
    next_message_id: AtomicU64,
}

/// Reads a lock even if a thread panicked while holding it: the state behind the sandbox's
/// locks is always left consistent (single assignments), so a poisoned lock is still valid.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

impl Sandbox {
    /// A sandbox that verifies signatures with `rules` and reads the system clock.
    pub fn new(rules: DynamicRules) -> Self {
        Self::with_clock(rules, SystemClock)
    }

    /// A sandbox reading `clock` (for the `time` check and session expiry).
    pub fn with_clock(rules: DynamicRules, clock: impl Clock) -> Self {
        Sandbox {
            shared: Arc::new(Shared {
                rules: RwLock::new(Arc::new(rules)),
                accounts: RwLock::new(HashMap::new()),
                faults: FaultQueue::default(),
                stats: Stats::new(DEFAULT_RECORD_CAPACITY),
                clock: Arc::new(clock),
                max_time_skew_ms: AtomicU64::new(duration_ms(DEFAULT_MAX_TIME_SKEW)),
                session_ttl_ms: AtomicU64::new(duration_ms(DEFAULT_SESSION_TTL)),
                next_message_id: AtomicU64::new(7_000_000_000),
            }),
        }
    }

    /// The rules requests are currently verified against.
    pub fn rules(&self) -> DynamicRules {
        DynamicRules::clone(&self.shared.current_rules())
    }

    /// Replaces the rules: from now on only signatures made with `rules` are accepted, as when
    /// the real upstream rotates its rules.
    pub fn rotate_rules(&self, rules: DynamicRules) {
        *write(&self.shared.rules) = Arc::new(rules);
        tracing::info!("sandbox: signing rules rotated");
    }

    /// Creates an account with fresh random session material (a numeric `auth_id`, a `sess`
    /// cookie, an `x-bc` device token and a browser user agent).
    pub fn add_account(&self) -> SandboxAccount {
        let now = self.shared.clock.now_ms();
        let mut accounts = write(&self.shared.accounts);
        let record = loop {
            let candidate = AccountRecord::generate(now);
            if !accounts.contains_key(&candidate.account.user_id) {
                break candidate;
            }
        };
        let account = record.account.clone();
        accounts.insert(account.user_id.clone(), record);
        account
    }

    /// The account's current session material, if the account exists.
    pub fn account(&self, user_id: &str) -> Option<SandboxAccount> {
        read(&self.shared.accounts)
            .get(user_id)
            .map(|r| r.account.clone())
    }

    /// Every account, ordered by user id.
    pub fn accounts(&self) -> Vec<SandboxAccount> {
        let mut all: Vec<SandboxAccount> = read(&self.shared.accounts)
            .values()
            .map(|r| r.account.clone())
            .collect();
        all.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        all
    }

    /// Ends the account's session: every later request with it gets 401 `Access denied.`.
    /// Returns `false` for an unknown account.
    pub fn expire_session(&self, user_id: &str) -> bool {
        match write(&self.shared.accounts).get_mut(user_id) {
            Some(record) => {
                record.expired = true;
                true
            }
            None => false,
        }
    }

    /// Logs the account in again: a new `sess` cookie (the old one stops working), the same
    /// user id, device token and browser. Returns `None` for an unknown account.
    pub fn refresh_session(&self, user_id: &str) -> Option<SandboxAccount> {
        let now = self.shared.clock.now_ms();
        let mut accounts = write(&self.shared.accounts);
        let record = accounts.get_mut(user_id)?;
        record.renew(now);
        Some(record.account.clone())
    }

    /// Whether the account exists and its session is live.
    pub fn is_session_live(&self, user_id: &str) -> bool {
        let now = self.shared.clock.now_ms();
        let ttl = self.shared.session_ttl_ms.load(Ordering::Relaxed);
        read(&self.shared.accounts)
            .get(user_id)
            .is_some_and(|r| r.is_live(now, ttl))
    }

    /// How long a session lives after it was created (default 10 days).
    pub fn set_session_ttl(&self, ttl: Duration) {
        self.shared
            .session_ttl_ms
            .store(duration_ms(ttl), Ordering::Relaxed);
    }

    /// How far a request's `time` header may be from the sandbox's clock (default 5 minutes).
    pub fn set_max_time_skew(&self, skew: Duration) {
        self.shared
            .max_time_skew_ms
            .store(duration_ms(skew), Ordering::Relaxed);
    }

    /// Queues a fault: the next `fault.count` requests in its scope that pass verification
    /// get it instead of (or, for a stall or a cut body, on top of) the normal answer.
    /// Faults are used in the order they were injected.
    pub fn inject(&self, fault: Fault) {
        self.shared.faults.push(fault);
    }

    /// Drops every queued fault; returns how many were pending.
    pub fn clear_faults(&self) -> usize {
        self.shared.faults.clear()
    }

    /// The queued faults with the number of requests each still applies to.
    pub fn pending_faults(&self) -> Vec<Fault> {
        self.shared.faults.snapshot()
    }

    /// How many requests reached the sandbox (control requests under `/_sandbox/` excluded).
    pub fn requests_received(&self) -> u64 {
        self.shared.stats.total()
    }

    /// How many requests reached `path` (the path alone, without the query).
    pub fn requests_to(&self, path: &str) -> u64 {
        self.shared.stats.count_for(path)
    }

    /// Requests received per path (without the query).
    pub fn path_counts(&self) -> BTreeMap<String, u64> {
        self.shared.stats.per_path()
    }

    /// The most recent requests, oldest first (at most the record capacity).
    pub fn recorded_requests(&self) -> Vec<RecordedRequest> {
        self.shared.stats.recorded()
    }

    /// The most recent request, if any.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.shared.stats.last()
    }

    /// How many requests are kept for [`recorded_requests`](Self::recorded_requests)
    /// (default 256; 0 turns recording off).
    pub fn set_record_capacity(&self, capacity: usize) {
        self.shared.stats.set_capacity(capacity);
    }

    /// Zeroes the counters and forgets the recorded requests.
    pub fn reset_stats(&self) {
        self.shared.stats.reset();
    }

    /// The headers a correct client sends for `path_and_query` on behalf of `account`,
    /// signed now with the current rules: `sign`, `time`, `app-token`, `user-id`, `cookie`,
    /// `x-bc`, `user-agent` and `accept`.
    pub fn signed_headers(&self, account: &SandboxAccount, path_and_query: &str) -> HeaderMap {
        let rules = self.shared.current_rules();
        let signature = rules.sign_at(path_and_query, &account.user_id, self.shared.clock.now_ms());
        let mut headers = HeaderMap::new();
        let pairs = [
            ("sign", signature.sign.as_str()),
            ("time", signature.time.as_str()),
            ("app-token", signature.app_token.as_str()),
            ("user-id", account.user_id.as_str()),
            ("cookie", account.cookie.as_str()),
            ("x-bc", account.x_bc.as_str()),
            ("user-agent", account.user_agent.as_str()),
            ("accept", "application/json, text/plain, */*"),
        ];
        for (name, value) in pairs {
            // Session material that is not a valid header value is skipped; the sandbox then
            // answers as the upstream would for the missing header.
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
        headers
    }

    /// The sandbox as a `tower::Service` (and hyper service), for in-process use without a
    /// socket.
    pub fn service(&self) -> SandboxService {
        SandboxService::new(self.shared.clone())
    }

    /// Serves HTTP/1.1 (keep-alive) on `listener` in a background task until the returned
    /// server is shut down or dropped. Must be called within a tokio runtime.
    pub fn serve(&self, listener: tokio::net::TcpListener) -> io::Result<SandboxServer> {
        SandboxServer::start(self.service(), listener)
    }

    /// Binds `addr` (e.g. `"127.0.0.1:0"` for a free port) and [`serve`](Self::serve)s on it.
    pub async fn bind(&self, addr: impl tokio::net::ToSocketAddrs) -> io::Result<SandboxServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        self.serve(listener)
    }
}

impl Shared {
    fn current_rules(&self) -> Arc<DynamicRules> {
        Arc::clone(&read(&self.rules))
    }
}

impl fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Session material stays out of debug output.
        f.debug_struct("Sandbox")
            .field("accounts", &read(&self.shared.accounts).len())
            .field("pending_faults", &self.shared.faults.len())
            .field("requests_received", &self.shared.stats.total())
            .finish_non_exhaustive()
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
