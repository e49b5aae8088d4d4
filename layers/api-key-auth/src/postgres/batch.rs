//! Key lookups that miss the caches, sent to the database in batches: the lookups waiting at
//! one moment go as one statement (`WHERE key_hash = ANY($1)`), so a burst of unknown keys
//! (a spray of random ones) costs one round trip per batch instead of one per key.
//!
//! Nothing waits to fill a batch: the worker takes whatever is queued when it is free, so a
//! lone lookup goes at once, and batches grow only while the database is busy answering.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tollgate_core::{BackendError, BackendErrorKind, KeyId, OrgId, Plan};
use tollgate_postgres::deadpool_postgres::Pool;
use tollgate_postgres::to_backend_error;

use super::{limits_from_row, parse_plan, parse_status};
use crate::key::KeyHash;
use crate::store::{KeyLimits, KeyStatus};

/// The most lookups in one statement.
const MAX_BATCH: usize = 256;
/// Lookups that may wait for the worker; past that, callers wait to enqueue.
const QUEUE: usize = 4_096;

const LOOKUP_SQL: &str = "SELECT k.id, k.org_id, k.key_hash, k.status, p.plan, \
            k.expires_at, k.revoked_at, k.scopes, k.models, k.credit_limit \
     FROM tollgate_api_keys k LEFT JOIN tollgate_org_plans p ON p.org_id = k.org_id \
     WHERE k.key_hash = ANY($1::bytea[])";

/// A key row as a lookup needs it.
#[derive(Debug, Clone)]
pub(super) struct KeyRow {
    pub(super) key: KeyId,
    pub(super) org: OrgId,
    pub(super) status: KeyStatus,
    pub(super) plan: Option<Plan>,
    pub(super) limits: KeyLimits,
}

type Reply = oneshot::Sender<Result<Option<KeyRow>, BackendError>>;

/// The sending side; the worker ends when it is dropped.
pub(super) struct KeyLookups {
    queue: mpsc::Sender<(KeyHash, Reply)>,
    statements: Arc<AtomicU64>,
    keys: Arc<AtomicU64>,
}

impl KeyLookups {
    /// Starts the worker (within a tokio runtime).
    pub(super) fn start(pool: Pool) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let statements = Arc::new(AtomicU64::new(0));
        let keys = Arc::new(AtomicU64::new(0));
        tokio::spawn(work(pool, rx, Arc::clone(&statements), Arc::clone(&keys)));
        KeyLookups {
            queue,
            statements,
            keys,
        }
    }

    /// The row of `hash`, if there is one.
    pub(super) async fn lookup(&self, hash: KeyHash) -> Result<Option<KeyRow>, BackendError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || BackendError::other("the key lookup worker stopped");
        self.queue
            .send((hash, reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Statements sent, and keys looked up by them.
    pub(super) fn counts(&self) -> (u64, u64) {
        (
            self.statements.load(Ordering::Relaxed),
            self.keys.load(Ordering::Relaxed),
        )
    }
}

async fn work(
    pool: Pool,
    mut rx: mpsc::Receiver<(KeyHash, Reply)>,
    statements: Arc<AtomicU64>,
    keys: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // Callers that gave up (their request was dropped) need no answer.
        batch.retain(|(_, reply): &(KeyHash, Reply)| !reply.is_closed());
        if !batch.is_empty() {
            statements.fetch_add(1, Ordering::Relaxed);
            keys.fetch_add(batch.len() as u64, Ordering::Relaxed);
            let hashes: Vec<KeyHash> = batch.iter().map(|(hash, _)| *hash).collect();
            match query(&pool, &hashes).await {
                Ok(rows) => {
                    // `get`, not `remove`: two callers may have asked for the same hash.
                    for (hash, reply) in batch.drain(..) {
                        let _ = reply.send(Ok(rows.get(&hash).cloned()));
                    }
                }
                Err(err) => {
                    let kind = err.kind();
                    let cause = std::error::Error::source(&err)
                        .map_or_else(|| err.to_string(), ToString::to_string);
                    for (_, reply) in batch.drain(..) {
                        let _ = reply.send(Err(match kind {
                            BackendErrorKind::Unavailable => {
                                BackendError::unavailable(cause.clone())
                            }
                            BackendErrorKind::Other => BackendError::other(cause.clone()),
                        }));
                    }
                }
            }
        }
        batch.clear();
    }
}

async fn query(pool: &Pool, hashes: &[KeyHash]) -> Result<HashMap<KeyHash, KeyRow>, BackendError> {
    let client = pool.get().await.map_err(to_backend_error)?;
    let statement = client
        .prepare_cached(LOOKUP_SQL)
        .await
        .map_err(to_backend_error)?;
    let wanted: Vec<&[u8]> = hashes.iter().map(|h| h.as_bytes().as_slice()).collect();
    let rows = client
        .query(&statement, &[&wanted])
        .await
        .map_err(to_backend_error)?;
    let mut found = HashMap::with_capacity(rows.len());
    for row in rows {
        let stored: &[u8] = row.try_get(2).map_err(to_backend_error)?;
        let Ok(stored) = <[u8; 32]>::try_from(stored) else {
            continue;
        };
        // Matched to the callers by `KeyHash`'s constant-time equality.
        found.insert(
            KeyHash::from_bytes(stored),
            KeyRow {
                key: KeyId::from_uuid(row.try_get(0).map_err(to_backend_error)?),
                org: OrgId::from_uuid(row.try_get(1).map_err(to_backend_error)?),
                status: parse_status(row.try_get(3).map_err(to_backend_error)?)?,
                plan: parse_plan(row.try_get(4).map_err(to_backend_error)?)?,
                limits: limits_from_row(&row, 5)?,
            },
        );
    }
    Ok(found)
}
