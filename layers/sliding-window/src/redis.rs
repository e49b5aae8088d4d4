//! [`RedisWindowStore`]: one exact sliding window per bucket, shared by every replica through
//! Redis (standalone or Cluster), decided by a server-side script in one round trip.

use std::fmt;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{
    Client, ConnectionInfo, ErrorKind, IntoConnectionInfo, RedisError, Script, ScriptInvocation,
    ServerErrorKind,
};
use tollgate_core::{BackendError, BoxFuture, SharedClock};

use crate::store::{BucketKey, Decision, WindowLimits, WindowStore};

/// The default bound on one decision: connecting, sending, and waiting for the answer.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// The default prefix of the keys: a bucket lives at `tollgate:{<org>:<model>}:w`.
pub const DEFAULT_KEY_PREFIX: &str = "tollgate";

/// The longest window (and burst horizon) the Redis log can hold: entries are stored as
/// milliseconds modulo 2³², so everything in one bucket must lie within 2³² − 1 ms
/// (about 49.7 days) of its newest admission.
pub const MAX_REDIS_WINDOW_MS: u64 = u32::MAX as u64;

/// Times given by [`RedisWindowStore::with_clock`] must fit the 6-byte header (year 10889).
const MAX_CLOCK_MS: u64 = 1 << 48;

/// The decision, run atomically inside Redis.
///
/// The log of a bucket is one string: a 6-byte header holding the newest admission time (ms
/// since the epoch, big-endian), then one 4-byte big-endian entry per admitted request,
/// oldest first, holding its admission time modulo 2³². Every entry lies within the horizon
/// (< 2³² ms) of the newest one when the log is written, so its exact age is recovered as
/// `(now − newest) + ((newest − entry) mod 2³²)`. A saturated enterprise bucket (9,999
/// requests) is therefore 40 KB instead of the ~1.3 MB of a sorted set. Each admission
/// rewrites the string without the entries that left the horizon and sets its expiry to the
/// horizon, so an idle bucket disappears on its own; a refusal writes nothing.
///
/// Whether the window or the burst is full is read from one entry each (the `limit`-th and
/// the `burst`-th newest), and the oldest entry still in the window is found by a galloping
/// search from the old end (usually one or two reads). A small log is read whole (`GET`);
/// a large one entry by entry (`GETRANGE`), because copying 40 KB into Lua costs far more
/// than a few reads — so refusing a saturated bucket, the flood case, stays cheap. Only an
/// admission reads a large log whole, to rewrite it.
///
/// The decision mirrors `MemoryWindowStore` exactly (same counts, `remaining`, `reset_ms`
/// and `retry_after_ms`); the tests compare the two on random traffic, small logs and large.
const WINDOW_SCRIPT: &str = r#"
-- tollgate sliding window: one decision for one (org, model) bucket.
-- KEYS[1] the bucket's log; ARGV: limit, burst, window ms, [now ms; default: server TIME]
-- Reply: {admitted (1|0), remaining, reset ms, retry-after ms (-1 when admitted)}
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local BURST = 1000
local WRAP = 4294967296
local HEAD = 6
-- Logs up to this many bytes are read whole; larger ones entry by entry.
local WHOLE = 1024
local horizon = math.max(window, BURST)

local size = redis.call('STRLEN', key)
local log = nil
local n = 0
local newest = 0
if size >= HEAD + 4 and (size - HEAD) % 4 == 0 then
  n = (size - HEAD) / 4
  local head
  if size <= WHOLE then
    log = redis.call('GET', key)
    head = log
  else
    head = redis.call('GETRANGE', key, 0, HEAD - 1)
  end
  local a, b, c, d, e, f = string.byte(head, 1, HEAD)
  newest = ((((a * 256 + b) * 256 + c) * 256 + d) * 256 + e) * 256 + f
  -- A clock that stepped back decides at the newest admission, keeping the log ordered.
  if now < newest then now = newest end
end
local lag = now - newest
local newest32 = newest % WRAP

-- The age in ms of entry i (1 = the oldest).
local function age(i)
  local p = HEAD + 4 * i - 3
  local s = log
  if not s then
    s = redis.call('GETRANGE', key, p - 1, p + 2)
    p = 1
  end
  local a, b, c, d = string.byte(s, p, p + 3)
  return lag + (newest32 - (((a * 256 + b) * 256 + c) * 256 + d)) % WRAP
end

-- The first entry younger than span (ages fall from the oldest entry to the newest), n + 1
-- when there is none: galloping from the oldest, since few entries are usually older.
local function first_younger(span)
  local lo, hi, step = 1, n + 1, 1
  while lo + step - 1 <= n do
    local i = lo + step - 1
    if age(i) < span then
      hi = i
      break
    end
    lo = i + 1
    step = step * 2
  end
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if age(mid) >= span then lo = mid + 1 else hi = mid end
  end
  return lo
end

local function bytes(v, count)
  local out = {}
  for i = count, 1, -1 do
    out[i] = v % 256
    v = math.floor(v / 256)
  end
  return string.char(unpack(out))
end

-- Full when the limit-th (burst-th) newest admission is still inside the window (second).
local window_wait = nil
if limit > 0 and n >= limit then
  local left = window - age(n - limit + 1)
  if left > 0 then window_wait = left end
end
local burst_wait = nil
if burst > 0 and n >= burst then
  local left = BURST - age(n - burst + 1)
  if left > 0 then burst_wait = left end
end

if limit > 0 and burst > 0 and not window_wait and not burst_wait then
  if not log and n > 0 then log = redis.call('GET', key) end
  local first_live = first_younger(horizon)
  local first_in_window = first_live
  if window < horizon then first_in_window = first_younger(window) end
  local in_window = n + 1 - first_in_window
  local reset = window
  if first_in_window <= n then reset = window - age(first_in_window) end
  local kept = ''
  if first_live <= n then kept = string.sub(log, HEAD + 4 * first_live - 3) end
  redis.call('SET', key, bytes(now, HEAD) .. kept .. bytes(now % WRAP, 4), 'PX', horizon)
  return {1, limit - in_window - 1, reset, -1}
end

local retry
if limit == 0 or burst == 0 then
  -- Never admits: come back after a window.
  retry = math.max(window, 1)
else
  retry = math.max(window_wait or 0, burst_wait or 0)
end
local first_in_window = first_younger(window)
local reset = 0
if first_in_window <= n then reset = window - age(first_in_window) end
return {0, math.max(limit - (n + 1 - first_in_window), 0), reset, retry}
"#;

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(WINDOW_SCRIPT));

/// A [`WindowStore`] in Redis: every gateway replica pointing at the same Redis (or Redis
/// Cluster) enforces one exact limit per (organization, model) together.
///
/// Each decision is one `EVALSHA` of a Lua script that reads the bucket's log, counts the
/// admissions in the window and in the past second, admits or refuses, and records the
/// admission — atomically, in one round trip. The script is loaded by its SHA-1 and
/// reloaded on `NOSCRIPT` (after a restart or `SCRIPT FLUSH`). Time comes from the Redis
/// server (`TIME`, allowed in scripts since Redis 5 with effects replication, the only
/// mode of Redis 7), so replicas with skewed clocks agree. The decision is exact to the
/// millisecond and identical to [`MemoryWindowStore`](crate::MemoryWindowStore)'s.
///
/// One key per bucket, `tollgate:{<org>:<model>}:w`: the hash tag keeps everything about a
/// bucket in one Cluster slot, so the script runs unchanged on Redis Cluster. The key
/// expires (millisecond `PX`) one horizon after its last admission, so idle buckets vanish.
/// The log is compact — 4 bytes per request in the window plus a 6-byte header — about
/// 40 KB for a saturated enterprise bucket.
///
/// URLs: `redis://[user:pass@]host:port[/db]`, `unix:///path.sock`, and
/// `redis+cluster://[user:pass@]host:port[,host:port…]` for a cluster (any reachable nodes
/// as seeds). The connection is made on first use through redis-rs's
/// [`ConnectionManager`] (standalone; reconnects on its own) or its cluster client (follows
/// slot moves); a connection found dead when used is retried once on a fresh one; every
/// decision is bounded by a timeout ([`DEFAULT_REDIS_TIMEOUT`]) and a
/// failure is a [`BackendError`] — unreachable, timed out or cluster down is
/// [`unavailable`](BackendError::unavailable). Wrap the store in a
/// [`FailoverWindowStore`](crate::FailoverWindowStore) to fail open or closed while Redis is
/// down.
///
/// Windows (and so the horizon) are limited to [`MAX_REDIS_WINDOW_MS`].
///
/// ```no_run
/// use tollgate_core::{ModelId, OrgId};
/// use tollgate_sliding_window::{BucketKey, RedisWindowStore, WindowLimits, WindowStore};
///
/// # async fn run() -> Result<(), tollgate_core::BackendError> {
/// let store = RedisWindowStore::open("redis://127.0.0.1:6379")?;
/// let key = BucketKey::new(OrgId::new(), ModelId::new());
/// let limits = WindowLimits { limit: 10, burst: 5, window_ms: 60_000 };
/// let decision = store.check(key, limits).await?;
/// assert!(decision.admitted);
/// assert_eq!(decision.remaining, 9);
/// # Ok(())
/// # }
/// ```
pub struct RedisWindowStore {
    target: Target,
    conn: OnceLock<Conn>,
    key_prefix: Arc<str>,
    timeout: Duration,
    clock: Option<SharedClock>,
}

enum Target {
    Standalone(Client),
    Cluster(Vec<ConnectionInfo>),
}

#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisWindowStore {
    /// A store for the Redis at `url` (see the type's docs for the forms). Only parses the
    /// URL: the connection is made on the first decision, so a gateway can start (and fail
    /// open) while Redis is down.
    pub fn open(url: &str) -> Result<Self, BackendError> {
        let target = match cluster_seeds(url) {
            Some(seeds) => {
                let seeds = seeds?;
                // Validates the seeds (and that they agree on credentials) without connecting.
                ClusterClient::new(seeds.clone()).map_err(config_error)?;
                Target::Cluster(seeds)
            }
            None => Target::Standalone(Client::open(url).map_err(config_error)?),
        };
        Ok(RedisWindowStore {
            target,
            conn: OnceLock::new(),
            key_prefix: Arc::from(DEFAULT_KEY_PREFIX),
            timeout: DEFAULT_REDIS_TIMEOUT,
            clock: None,
        })
    }

    /// [`open`](Self::open), then checks that Redis answers (`PING`).
    pub async fn connect(url: &str) -> Result<Self, BackendError> {
        let store = Self::open(url)?;
        store.ping().await?;
        Ok(store)
    }

    /// Sets the prefix of the keys (default [`DEFAULT_KEY_PREFIX`]), e.g. to keep two
    /// gateways that must not share limits apart in one Redis.
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = Arc::from(prefix.into());
        self
    }

    /// Sets the bound on one decision — connecting, sending and the answer (default
    /// [`DEFAULT_REDIS_TIMEOUT`]). Applies to connections made after the call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Takes time from `clock` instead of the Redis server's `TIME`, passing it to the
    /// script with each decision.
    ///
    /// For deterministic tests of window behaviour only: in production, replicas with skewed
    /// clocks would disagree about the window, which server time avoids. Keys still expire
    /// on the server's clock.
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The Redis key holding `bucket`'s log: `<prefix>:{<org>:<model>}:w`.
    pub fn key(&self, bucket: &BucketKey) -> String {
        format!("{}:{{{}:{}}}:w", self.key_prefix, bucket.org, bucket.model)
    }

    /// The SHA-1 the script is invoked by (`EVALSHA`).
    pub fn script_sha(&self) -> &'static str {
        SCRIPT.get_hash()
    }

    /// Whether Redis answers `PING` within the timeout (for readiness checks).
    pub async fn ping(&self) -> Result<(), BackendError> {
        let mut conn = self.conn()?;
        let timeout = self.timeout;
        let pong = tokio::time::timeout(timeout, async {
            match &mut conn {
                Conn::Standalone(c) => redis::cmd("PING").query_async::<String>(c).await,
                Conn::Cluster(c) => redis::cmd("PING").query_async::<String>(c).await,
            }
        })
        .await
        .map_err(|_| timed_out(timeout))?
        .map_err(backend_error)?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(BackendError::other(format!(
                "redis answered PING with {pong:?}"
            )))
        }
    }

    /// Connects, checks that Redis answers and loads the window script on every node (a
    /// cluster's primaries included), so the first burst of decisions after a start finds a
    /// warm connection and no `NOSCRIPT` round trip: hundreds of first calls reloading the
    /// script at once can take longer than a failover timeout and trip the breaker.
    pub async fn warm_up(&self) -> Result<(), BackendError> {
        self.ping().await?;
        let mut conn = self.conn()?;
        let timeout = self.timeout;
        tokio::time::timeout(timeout, async {
            match &mut conn {
                Conn::Standalone(c) => SCRIPT.load_async(c).await,
                Conn::Cluster(c) => SCRIPT.load_async(c).await,
            }
        })
        .await
        .map_err(|_| timed_out(timeout))?
        .map_err(backend_error)?;
        Ok(())
    }

    /// The connection, made on first use (this needs a Tokio runtime).
    fn conn(&self) -> Result<Conn, BackendError> {
        if let Some(conn) = self.conn.get() {
            return Ok(conn.clone());
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(BackendError::other(
                "the Redis window store must be used within a Tokio runtime",
            ));
        }
        let made = match &self.target {
            Target::Standalone(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    // One connection attempt per reconnect, no back-off series: while
                    // Redis is down a decision fails at once instead of waiting out the
                    // retries, and the next use tries again (a breaker in front,
                    // `FailoverWindowStore`, spaces those tries out).
                    .set_number_of_retries(0);
                Conn::Standalone(
                    ConnectionManager::new_lazy_with_config(client.clone(), config)
                        .map_err(config_error)?,
                )
            }
            Target::Cluster(seeds) => {
                let client = ClusterClient::builder(seeds.clone())
                    .connection_timeout(self.timeout)
                    .response_timeout(self.timeout)
                    .retries(2)
                    .min_retry_wait(10)
                    .max_retry_wait(200)
                    .build()
                    .map_err(config_error)?;
                let config = ClusterConfig::new()
                    .set_connection_timeout(self.timeout)
                    .set_response_timeout(self.timeout);
                Conn::Cluster(client.get_pending_async_connection_with_config(config))
            }
        };
        // Two first calls may race: one connection wins, the other is dropped unused.
        Ok(self.conn.get_or_init(|| made).clone())
    }
}

impl Conn {
    async fn invoke(&mut self, invocation: &ScriptInvocation<'_>) -> Result<Vec<i64>, RedisError> {
        match self {
            Conn::Standalone(c) => invocation.invoke_async(c).await,
            Conn::Cluster(c) => invocation.invoke_async(c).await,
        }
    }
}

impl WindowStore for RedisWindowStore {
    fn check(
        &self,
        key: BucketKey,
        limits: WindowLimits,
    ) -> BoxFuture<Result<Decision, BackendError>> {
        let prepared = (|| {
            if limits.horizon_ms() > MAX_REDIS_WINDOW_MS {
                return Err(BackendError::other(format!(
                    "a window of {} ms is longer than the Redis store holds ({MAX_REDIS_WINDOW_MS} ms)",
                    limits.window_ms
                )));
            }
            let now = match &self.clock {
                Some(clock) => match clock.now_ms() {
                    ms if ms < MAX_CLOCK_MS => Some(ms),
                    ms => {
                        return Err(BackendError::other(format!(
                            "clock time {ms} ms is beyond what the Redis store holds"
                        )))
                    }
                },
                None => None,
            };
            Ok((self.conn()?, now))
        })();
        let (mut conn, now) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let redis_key = self.key(&key);
        let timeout = self.timeout;
        Box::pin(async move {
            let mut invocation = SCRIPT.key(redis_key);
            invocation
                .arg(limits.limit)
                .arg(limits.burst)
                .arg(limits.window_ms);
            if let Some(now) = now {
                invocation.arg(now);
            }
            let attempt = async {
                match conn.invoke(&invocation).await {
                    // A connection that died since its last use (a Redis restart, an idle
                    // timeout) is noticed only now; the manager is already reconnecting, so
                    // try once more within the same time budget. Should the first attempt
                    // have run before the connection died, the request is counted twice:
                    // stricter by one, never an admission too many.
                    Err(e) if e.is_connection_dropped() => conn.invoke(&invocation).await,
                    reply => reply,
                }
            };
            let reply = tokio::time::timeout(timeout, attempt)
                .await
                .map_err(|_| timed_out(timeout))?
                .map_err(backend_error)?;
            decision_from_reply(limits, &reply)
        })
    }
}

/// Reads the script's `{admitted, remaining, reset_ms, retry_after_ms}`.
fn decision_from_reply(limits: WindowLimits, reply: &[i64]) -> Result<Decision, BackendError> {
    let unexpected = || {
        BackendError::other(format!(
            "unexpected reply from the window script: {reply:?}"
        ))
    };
    let &[admitted, remaining, reset_ms, retry_after_ms] = reply else {
        return Err(unexpected());
    };
    let remaining = u32::try_from(remaining)
        .ok()
        .filter(|&r| r <= limits.limit)
        .ok_or_else(unexpected)?;
    let reset_ms = u64::try_from(reset_ms).map_err(|_| unexpected())?;
    let (admitted, retry_after_ms) = match (admitted, retry_after_ms) {
        (1, -1) => (true, None),
        (0, wait) => (false, Some(u64::try_from(wait).map_err(|_| unexpected())?)),
        _ => return Err(unexpected()),
    };
    Ok(Decision {
        admitted,
        limit: limits.limit,
        remaining,
        reset_ms,
        retry_after_ms,
    })
}

/// `redis+cluster://[user:pass@]host:port[,host:port…][/0]` → one `redis://` seed per node;
/// `None` when `url` is not a cluster URL.
fn cluster_seeds(url: &str) -> Option<Result<Vec<ConnectionInfo>, BackendError>> {
    let scheme_end = url.find("://")?;
    if !url[..scheme_end].eq_ignore_ascii_case("redis+cluster") {
        return None;
    }
    let rest = &url[scheme_end + 3..];
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    Some((|| {
        if !path.is_empty() && path != "0" {
            return Err(BackendError::other(
                "a Redis Cluster URL names no database other than 0",
            ));
        }
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let seeds = hosts
            .split(',')
            .map(|host| {
                let host = host.trim();
                if host.is_empty() {
                    return Err(BackendError::other(
                        "a Redis Cluster URL lists an empty node",
                    ));
                }
                let seed = match userinfo {
                    Some(userinfo) => format!("redis://{userinfo}@{host}"),
                    None => format!("redis://{host}"),
                };
                seed.into_connection_info().map_err(config_error)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(seeds)
    })())
}

fn config_error(err: RedisError) -> BackendError {
    // redis-rs's URL errors never include the password.
    BackendError::other(format!("invalid Redis configuration: {err}"))
}

fn timed_out(timeout: Duration) -> BackendError {
    BackendError::unavailable(format!("redis did not answer within {timeout:?}"))
}

/// Unreachable, dropped, timed out, loading, cluster down or out of memory: unavailable (503
/// or fail-open). Anything else (a script or type error) is an internal error.
fn backend_error(err: RedisError) -> BackendError {
    let unavailable = err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || matches!(
            err.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                )
        )
        || matches!(err.code(), Some("OOM" | "BUSY"));
    if unavailable {
        BackendError::unavailable(err)
    } else {
        BackendError::other(err)
    }
}

impl fmt::Debug for RedisWindowStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL: it may hold a password.
        let target = match &self.target {
            Target::Standalone(_) => "standalone".to_owned(),
            Target::Cluster(seeds) => format!("cluster ({} seeds)", seeds.len()),
        };
        f.debug_struct("RedisWindowStore")
            .field("target", &target)
            .field("connected", &self.conn.get().is_some())
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field(
                "time",
                &if self.clock.is_some() {
                    "clock"
                } else {
                    "server"
                },
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::{ModelId, OrgId};

    fn limits() -> WindowLimits {
        WindowLimits {
            limit: 10,
            burst: 5,
            window_ms: 60_000,
        }
    }

    #[test]
    fn replies_become_decisions() {
        assert_eq!(
            decision_from_reply(limits(), &[1, 9, 60_000, -1]).unwrap(),
            Decision {
                admitted: true,
                limit: 10,
                remaining: 9,
                reset_ms: 60_000,
                retry_after_ms: None
            }
        );
        assert_eq!(
            decision_from_reply(limits(), &[0, 0, 1_500, 1_500]).unwrap(),
            Decision {
                admitted: false,
                limit: 10,
                remaining: 0,
                reset_ms: 1_500,
                retry_after_ms: Some(1_500)
            }
        );
        for bad in [
            &[][..],
            &[1, 9, 60_000],
            &[1, 9, 60_000, -1, 0],
            &[2, 9, 60_000, -1],
            &[1, 9, 60_000, 5],
            &[0, 9, 60_000, -1],
            &[1, 11, 60_000, -1],
            &[1, -1, 60_000, -1],
            &[1, 9, -5, -1],
        ] {
            assert!(decision_from_reply(limits(), bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_are_hash_tagged_per_bucket() {
        let store = RedisWindowStore::open("redis://127.0.0.1:6379").unwrap();
        let org: OrgId = "0b3f6c1e-8d4a-4f7e-9a2b-1c5d7e9f0a1b".parse().unwrap();
        let model: ModelId = "7a1e2b3c-4d5e-4f60-8172-93a4b5c6d7e8".parse().unwrap();
        let key = BucketKey::new(org, model);
        assert_eq!(
            store.key(&key),
            "tollgate:{0b3f6c1e-8d4a-4f7e-9a2b-1c5d7e9f0a1b:7a1e2b3c-4d5e-4f60-8172-93a4b5c6d7e8}:w"
        );
        let store = store.with_key_prefix("test-1");
        assert!(store.key(&key).starts_with("test-1:{0b3f6c1e"));
    }

    #[test]
    fn cluster_urls_name_every_seed() {
        assert!(cluster_seeds("redis://127.0.0.1:6379").is_none());
        let seeds = cluster_seeds("redis+cluster://127.0.0.1:7101,127.0.0.1:7102/")
            .unwrap()
            .unwrap();
        assert_eq!(seeds.len(), 2);
        let seeds = cluster_seeds("REDIS+CLUSTER://user:secret@10.0.0.1:7000")
            .unwrap()
            .unwrap();
        assert_eq!(seeds.len(), 1);
        assert!(
            cluster_seeds("redis+cluster://127.0.0.1:7101,,127.0.0.1:7102")
                .unwrap()
                .is_err()
        );
        assert!(cluster_seeds("redis+cluster://127.0.0.1:7101/3")
            .unwrap()
            .is_err());
        assert!(RedisWindowStore::open("redis+cluster://127.0.0.1:7101,127.0.0.1:7102").is_ok());
        assert!(RedisWindowStore::open("http://127.0.0.1:6379").is_err());
    }

    #[test]
    fn debug_never_shows_the_url() {
        let store = RedisWindowStore::open("redis://user:hunter2@127.0.0.1:6379/0").unwrap();
        let shown = format!("{store:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("standalone"));
    }

    #[test]
    fn out_of_range_windows_are_refused_before_any_round_trip() {
        // No runtime and no server needed: the store refuses before connecting.
        let store = RedisWindowStore::open("redis://127.0.0.1:1").unwrap();
        let fut = store.check(
            BucketKey::new(OrgId::new(), ModelId::new()),
            WindowLimits {
                window_ms: MAX_REDIS_WINDOW_MS + 1,
                ..limits()
            },
        );
        let err = futures_util::FutureExt::now_or_never(fut)
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), tollgate_core::BackendErrorKind::Other);
        // Outside a runtime, a decision is an error, not a panic.
        let fut = store.check(BucketKey::new(OrgId::new(), ModelId::new()), limits());
        assert!(futures_util::FutureExt::now_or_never(fut).unwrap().is_err());
    }
}
