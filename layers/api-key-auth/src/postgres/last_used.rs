//! Last-used times, buffered in memory and written in batches off the request path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tollgate_core::{BackendError, KeyId};
use tollgate_postgres::deadpool_postgres::Pool;
use tollgate_postgres::to_backend_error;
use uuid::Uuid;

use super::timestamp;

/// Keys per last-used statement.
const LAST_USED_CHUNK: usize = 5_000;
const LAST_USED_SQL: &str = "UPDATE tollgate_api_keys AS k \
     SET last_used_at = GREATEST(k.last_used_at, u.used_at) \
     FROM unnest($1::uuid[], $2::timestamptz[]) AS u(id, used_at) \
     WHERE k.id = u.id";
const LAST_USED_SHARDS: usize = 16;

/// The latest use of each key not yet written, sharded so concurrent requests rarely
/// contend on one lock.
#[derive(Default)]
pub(super) struct LastUsed {
    shards: [Mutex<HashMap<KeyId, u64>>; LAST_USED_SHARDS],
}

impl LastUsed {
    fn shard(&self, key: KeyId) -> std::sync::MutexGuard<'_, HashMap<KeyId, u64>> {
        // Key ids are random UUIDs: any byte spreads them evenly.
        let index = usize::from(key.as_uuid().as_bytes()[15]) % LAST_USED_SHARDS;
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn record(&self, key: KeyId, at_ms: u64) {
        let mut shard = self.shard(key);
        let latest = shard.entry(key).or_insert(at_ms);
        if *latest < at_ms {
            *latest = at_ms;
        }
    }

    pub(super) fn pending(&self, key: KeyId) -> Option<u64> {
        self.shard(key).get(&key).copied()
    }

    pub(super) fn snapshot(&self) -> Vec<(KeyId, u64)> {
        let mut all = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            all.extend(shard.iter().map(|(k, t)| (*k, *t)));
        }
        all
    }

    /// Forgets what was written, unless a newer use arrived meanwhile.
    pub(super) fn written(&self, batch: &[(KeyId, u64)]) {
        for (key, at) in batch {
            let mut shard = self.shard(*key);
            if shard.get(key) == Some(at) {
                shard.remove(key);
            }
        }
    }
}

pub(super) async fn flush_last_used(pool: &Pool, last_used: &LastUsed) -> Result<(), BackendError> {
    let mut batch = last_used.snapshot();
    if batch.is_empty() {
        return Ok(());
    }
    // One lock order for every replica, so two writers cannot deadlock on each other.
    batch.sort_unstable();
    let client = pool.get().await.map_err(to_backend_error)?;
    let statement = client
        .prepare_cached(LAST_USED_SQL)
        .await
        .map_err(to_backend_error)?;
    for chunk in batch.chunks(LAST_USED_CHUNK) {
        let ids: Vec<Uuid> = chunk.iter().map(|(k, _)| *k.as_uuid()).collect();
        let times: Vec<DateTime<Utc>> = chunk.iter().map(|(_, t)| timestamp(*t)).collect();
        client
            .execute(&statement, &[&ids, &times])
            .await
            .map_err(to_backend_error)?;
        last_used.written(chunk);
    }
    Ok(())
}

pub(super) async fn write_last_used(
    pool: Pool,
    last_used: Arc<LastUsed>,
    interval: Duration,
    shutdown: Arc<Notify>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = ticker.tick() => false,
            _ = shutdown.notified() => true,
        };
        if let Err(err) = flush_last_used(&pool, &last_used).await {
            // Kept in the buffer: the next round retries.
            tracing::warn!(error = %err, "could not write key last-used times");
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_used_keeps_the_latest_and_forgets_only_what_was_written() {
        let buffer = LastUsed::default();
        let key = KeyId::new();
        buffer.record(key, 5_000);
        buffer.record(key, 3_000);
        assert_eq!(buffer.pending(key), Some(5_000));
        let batch = buffer.snapshot();
        buffer.record(key, 7_000);
        buffer.written(&batch);
        assert_eq!(buffer.pending(key), Some(7_000));
        let batch = buffer.snapshot();
        buffer.written(&batch);
        assert_eq!(buffer.pending(key), None);
    }
}
