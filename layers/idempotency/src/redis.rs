//! [`RedisIdempotencyStore`]: the keys in Redis, shared by every replica (feature `redis`).

use std::fmt;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ErrorKind, RedisError, Script, ScriptInvocation, ServerErrorKind};
use tollgate_core::{BackendError, BoxFuture, SharedClock};

use crate::store::{
    millis, Begin, Fingerprint, IdempotencyStore, Lease, LeaseToken, StoredResponse,
};

/// The default bound on one operation: connecting, sending, and waiting for the answer.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// The default prefix of the keys: a record lives at `tollgate:idem:<len>:<scope>:<key>`.
pub const DEFAULT_KEY_PREFIX: &str = "tollgate";

/// The current time in the scripts: ARGV[n] when given (a test clock), else the server's.
const NOW: &str = r#"
local function now_ms(arg)
  local now = tonumber(arg)
  if now then return now end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"#;

/// KEYS[1] the record (a hash: fp, exp, and lease while in flight or status, headers, body
/// once done); ARGV: fingerprint, lease token, lease ms, [now ms].
const BEGIN: &str = r#"
local key = KEYS[1]
local now = now_ms(ARGV[4])
local rec = redis.call('HMGET', key, 'fp', 'exp', 'lease', 'status', 'headers', 'body')
if rec[1] and tonumber(rec[2]) > now then
  if rec[1] ~= ARGV[1] then return {'mismatch'} end
  if rec[3] then return {'in_flight'} end
  return {'replay', rec[4], rec[5], rec[6]}
end
redis.call('DEL', key)
redis.call('HSET', key, 'fp', ARGV[1], 'lease', ARGV[2], 'exp', now + tonumber(ARGV[3]))
redis.call('PEXPIRE', key, ARGV[3])
return {'started'}
"#;

/// KEYS[1] the record; ARGV: lease token, status, headers, body, ttl ms, [now ms].
const COMPLETE: &str = r#"
local key = KEYS[1]
if redis.call('HGET', key, 'lease') ~= ARGV[1] then return 0 end
local now = now_ms(ARGV[6])
redis.call('HDEL', key, 'lease')
redis.call('HSET', key, 'status', ARGV[2], 'headers', ARGV[3], 'body', ARGV[4], 'exp', now + tonumber(ARGV[5]))
redis.call('PEXPIRE', key, ARGV[5])
return 1
"#;

/// KEYS[1] the record; ARGV: lease token.
const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'lease') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

static BEGIN_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(&format!("{NOW}{BEGIN}")));
static COMPLETE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{NOW}{COMPLETE}")));
static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE));

/// An [`IdempotencyStore`] in Redis (standalone): every replica on the same Redis shares the
/// keys.
///
/// Each record is one hash, `<prefix>:idem:<scope length>:<scope>:<key>`, and each operation
/// one Lua script run atomically (`EVALSHA`, reloaded on `NOSCRIPT`): `begin` decides and
/// claims in one step, `complete` and `release` act only while the hash still holds their
/// lease token. Redis expires the hash itself (`PEXPIRE` of the lease TTL while in flight,
/// of the response TTL once done), so nothing needs purging. Time is the Redis server's
/// (`TIME`), so replicas with skewed clocks agree.
///
/// A lease whose TTL passed is gone from Redis, so its late completion is refused even when
/// no other request took the key over (the PostgreSQL and memory stores accept it until
/// then): the response is then simply not stored.
///
/// ```no_run
/// use tollgate_idempotency::{IdempotencyLayer, RedisIdempotencyStore};
///
/// # fn demo() -> Result<(), tollgate_core::BackendError> {
/// let store = RedisIdempotencyStore::open("redis://127.0.0.1:6379")?;
/// let layer = IdempotencyLayer::new(store);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
pub struct RedisIdempotencyStore {
    client: Client,
    conn: OnceLock<ConnectionManager>,
    key_prefix: Arc<str>,
    timeout: Duration,
    clock: Option<SharedClock>,
}

impl RedisIdempotencyStore {
    /// A store for the Redis at `url` (`redis://[user:pass@]host:port[/db]`, `unix://…`).
    /// Only parses the URL: the connection is made on first use.
    pub fn open(url: &str) -> Result<Self, BackendError> {
        let client = Client::open(url)
            .map_err(|e| BackendError::other(format!("invalid Redis configuration: {e}")))?;
        Ok(RedisIdempotencyStore {
            client,
            conn: OnceLock::new(),
            key_prefix: Arc::from(DEFAULT_KEY_PREFIX),
            timeout: DEFAULT_REDIS_TIMEOUT,
            clock: None,
        })
    }

    /// Sets the prefix of the keys (default [`DEFAULT_KEY_PREFIX`]).
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = Arc::from(prefix.into());
        self
    }

    /// Sets the bound on one operation (default [`DEFAULT_REDIS_TIMEOUT`]). Applies to
    /// connections made after the call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Takes time from `clock` instead of the Redis server's `TIME`. For tests that move time
    /// by hand; Redis still expires the hashes on its own clock.
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The Redis key of (scope, key).
    pub fn key(&self, scope: &str, key: &str) -> String {
        format!("{}:idem:{}:{scope}:{key}", self.key_prefix, scope.len())
    }

    /// Whether Redis answers `PING` within the timeout.
    pub async fn ping(&self) -> Result<(), BackendError> {
        let mut conn = self.conn()?;
        let pong: String =
            tokio::time::timeout(self.timeout, redis::cmd("PING").query_async(&mut conn))
                .await
                .map_err(|_| timed_out(self.timeout))?
                .map_err(backend_error)?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(BackendError::other(format!(
                "redis answered PING with {pong:?}"
            )))
        }
    }

    fn conn(&self) -> Result<ConnectionManager, BackendError> {
        if let Some(conn) = self.conn.get() {
            return Ok(conn.clone());
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(BackendError::other(
                "the Redis idempotency store must be used within a Tokio runtime",
            ));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(0);
        let made = ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(|e| BackendError::other(format!("invalid Redis configuration: {e}")))?;
        Ok(self.conn.get_or_init(|| made).clone())
    }

    fn now_arg(&self) -> Option<u64> {
        self.clock.as_ref().map(|c| c.now_ms())
    }

    /// Runs a prepared script invocation within the timeout, retrying once on a connection
    /// that turned out dead.
    fn run<T: redis::FromRedisValue + Send + 'static>(
        &self,
        invocation: ScriptInvocation<'static>,
    ) -> BoxFuture<Result<T, BackendError>> {
        let conn = self.conn();
        let timeout = self.timeout;
        Box::pin(async move {
            let mut conn = conn?;
            let attempt = async {
                match invocation.invoke_async::<T>(&mut conn).await {
                    Err(e) if e.is_connection_dropped() => invocation.invoke_async(&mut conn).await,
                    reply => reply,
                }
            };
            tokio::time::timeout(timeout, attempt)
                .await
                .map_err(|_| timed_out(timeout))?
                .map_err(backend_error)
        })
    }
}

impl IdempotencyStore for RedisIdempotencyStore {
    fn begin(
        &self,
        scope: &str,
        key: &str,
        fingerprint: Fingerprint,
        lease_ttl: Duration,
    ) -> BoxFuture<Result<Begin, BackendError>> {
        let token = LeaseToken::generate();
        let mut invocation = BEGIN_SCRIPT.key(self.key(scope, key));
        invocation
            .arg(fingerprint.as_bytes().as_slice())
            .arg(token.to_string())
            .arg(millis(lease_ttl).max(1));
        if let Some(now) = self.now_arg() {
            invocation.arg(now);
        }
        let reply = self.run::<Vec<Vec<u8>>>(invocation);
        let lease = Lease::new(scope, key, token);
        Box::pin(async move {
            let reply = reply.await?;
            let unexpected = || BackendError::other("unexpected reply from the idempotency script");
            match reply.first().map(Vec::as_slice) {
                Some(b"started") => Ok(Begin::Started(lease)),
                Some(b"in_flight") => Ok(Begin::InFlight),
                Some(b"mismatch") => Ok(Begin::Mismatch),
                Some(b"replay") => {
                    let [_, status, headers, body] =
                        <[Vec<u8>; 4]>::try_from(reply).map_err(|_| unexpected())?;
                    let status = std::str::from_utf8(&status)
                        .ok()
                        .and_then(|s| s.parse::<u16>().ok())
                        .ok_or_else(unexpected)?;
                    let headers = String::from_utf8(headers).map_err(|_| unexpected())?;
                    Ok(Begin::Replay(StoredResponse::from_stored(
                        status,
                        &headers,
                        Bytes::from(body),
                    )?))
                }
                _ => Err(unexpected()),
            }
        })
    }

    fn complete(
        &self,
        lease: &Lease,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<bool, BackendError>> {
        let mut invocation = COMPLETE_SCRIPT.key(self.key(lease.scope(), lease.key()));
        invocation
            .arg(lease.token().to_string())
            .arg(response.status.as_u16())
            .arg(response.headers_json())
            .arg(response.body.as_ref())
            .arg(millis(ttl).max(1));
        if let Some(now) = self.now_arg() {
            invocation.arg(now);
        }
        let reply = self.run::<i64>(invocation);
        Box::pin(async move { Ok(reply.await? == 1) })
    }

    fn release(&self, lease: &Lease) -> BoxFuture<Result<bool, BackendError>> {
        let mut invocation = RELEASE_SCRIPT.key(self.key(lease.scope(), lease.key()));
        invocation.arg(lease.token().to_string());
        let reply = self.run::<i64>(invocation);
        Box::pin(async move { Ok(reply.await? == 1) })
    }

    fn purge_expired(&self) -> BoxFuture<Result<u64, BackendError>> {
        // Redis expires the records itself.
        Box::pin(std::future::ready(Ok(0)))
    }
}

fn timed_out(timeout: Duration) -> BackendError {
    BackendError::unavailable(format!("redis did not answer within {timeout:?}"))
}

/// Unreachable, dropped, timed out, loading or out of memory: unavailable. Anything else is
/// an internal error.
fn backend_error(err: RedisError) -> BackendError {
    let unavailable = err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || matches!(
            err.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
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

impl fmt::Debug for RedisIdempotencyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("RedisIdempotencyStore")
            .field("connected", &self.conn.get().is_some())
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_run_together() {
        let store = RedisIdempotencyStore::open("redis://127.0.0.1:6379").unwrap();
        assert_eq!(store.key("org", "k"), "tollgate:idem:3:org:k");
        assert_ne!(store.key("a:b", "c"), store.key("a", "b:c"));
        let shown = format!(
            "{:?}",
            RedisIdempotencyStore::open("redis://u:hunter2@127.0.0.1:6379").unwrap()
        );
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
