//! [`MemoryLogSink`]: request logs kept in process memory, with retention, a row cap, filters
//! and cursor paging.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tollgate_core::{BackendError, BoxFuture, Clock, OrgId};

use crate::record::LogRecord;
use crate::sink::{InvalidCursor, LogCursor, LogPage, LogQuery, LogSink, RETENTION};

/// Rows kept by default per organization before its oldest are dropped.
pub const DEFAULT_MAX_ROWS: usize = 100_000;

/// Rows without an organization (unauthenticated requests) kept by default, newest first.
pub const DEFAULT_MAX_ANONYMOUS_ROWS: usize = 10_000;

/// (time, sequence): the order of rows, unique per row.
type RowKey = (u64, u64);

/// A [`LogSink`] in memory: a real implementation for tests, the demo gateway and single
/// replicas.
///
/// - Rows older than the retention (14 days by default) from their own timestamp are deleted
///   on every write and query, and are never returned.
/// - At most `max_rows` rows are kept **per organization**; beyond that the org's oldest go
///   first. Rows without an organization (401s, 404s: requests nobody was authenticated
///   for) have a separate, smaller cap, `max_anonymous_rows`, newest kept. So no amount of
///   traffic from outside (or from another organization) displaces an org's history.
/// - Queries see one organization's rows only, ordered by time and then by arrival, with a
///   cursor that stays valid while rows are added.
pub struct MemoryLogSink {
    clock: Arc<dyn Clock>,
    retention_ms: u64,
    max_rows: usize,
    max_anonymous_rows: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next_seq: u64,
    rows: BTreeMap<RowKey, LogRecord>,
    // Rows without an org (unauthenticated requests) are kept under `None`: an operator may
    // want them, but no org's query sees them.
    by_org: HashMap<Option<OrgId>, BTreeSet<RowKey>>,
}

impl MemoryLogSink {
    /// An empty sink reading the time from `clock` (for the retention).
    pub fn new(clock: impl Clock) -> Self {
        MemoryLogSink {
            clock: Arc::new(clock),
            retention_ms: RETENTION.as_millis() as u64,
            max_rows: DEFAULT_MAX_ROWS,
            max_anonymous_rows: DEFAULT_MAX_ANONYMOUS_ROWS,
            state: Mutex::new(State::default()),
        }
    }

    /// How long rows are kept (default [`RETENTION`], 14 days).
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// The most rows kept per organization (default [`DEFAULT_MAX_ROWS`]); at least 1.
    pub fn with_max_rows(mut self, max_rows: usize) -> Self {
        self.max_rows = max_rows.max(1);
        self
    }

    /// The most rows without an organization kept (default [`DEFAULT_MAX_ANONYMOUS_ROWS`]);
    /// 0 keeps none.
    pub fn with_max_anonymous_rows(mut self, max_rows: usize) -> Self {
        self.max_anonymous_rows = max_rows;
        self
    }

    /// Rows currently stored without an organization.
    pub fn anonymous_len(&self) -> usize {
        self.lock().by_org.get(&None).map_or(0, BTreeSet::len)
    }

    /// Rows currently stored (expired rows included until the next write, query or purge).
    pub fn len(&self) -> usize {
        self.lock().rows.len()
    }

    /// Whether no rows are stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Deletes rows older than the retention now; returns how many went.
    pub fn purge_expired(&self) -> u64 {
        let cutoff = self.cutoff_ms();
        self.lock().purge_before(cutoff)
    }

    /// Every stored row of every organization in order (unexpired ones), for operators and
    /// tests.
    pub fn all(&self) -> Vec<LogRecord> {
        let cutoff = self.cutoff_ms();
        let mut state = self.lock();
        state.purge_before(cutoff);
        state.rows.values().cloned().collect()
    }

    fn cutoff_ms(&self) -> u64 {
        self.clock.now_ms().saturating_sub(self.retention_ms)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way that
        // matters more than losing the logs, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, records: Vec<LogRecord>) {
        let cutoff = self.cutoff_ms();
        let mut state = self.lock();
        state.purge_before(cutoff);
        for record in records {
            if record.time_ms < cutoff {
                continue;
            }
            let cap = match record.org_id {
                Some(_) => self.max_rows,
                None => self.max_anonymous_rows,
            };
            let org = record.org_id;
            state.insert(record);
            state.trim(org, cap);
        }
    }

    fn page(&self, query: &LogQuery) -> Result<LogPage, InvalidCursor> {
        let cursor = match query.cursor.as_deref() {
            Some(text) => Some(LogCursor::decode(text).ok_or(InvalidCursor)?),
            None => None,
        };
        let limit = query.effective_limit();
        let cutoff = self.cutoff_ms();
        let mut state = self.lock();
        state.purge_before(cutoff);
        let Some(keys) = state.by_org.get(&Some(query.org)) else {
            return Ok(LogPage::default());
        };

        let from = query.from_ms.unwrap_or(0).max(cutoff);
        let mut start_key = (from, 0);
        let mut start = Bound::Included(start_key);
        if let Some(c) = cursor {
            let after = (c.time_ms, c.tiebreak);
            if after >= start_key {
                start_key = after;
                start = Bound::Excluded(after);
            }
        }
        let end = match query.to_ms {
            Some(to) => {
                if (to, 0) <= start_key {
                    return Ok(LogPage::default());
                }
                Bound::Excluded((to, 0))
            }
            None => Bound::Unbounded,
        };

        let mut records = Vec::with_capacity(limit.min(keys.len()));
        let mut last = None;
        let mut more = false;
        for key in keys.range((start, end)) {
            let Some(row) = state.rows.get(key) else {
                continue;
            };
            if query.model.is_some_and(|m| row.model_id != Some(m))
                || query.status.is_some_and(|s| row.status != s)
            {
                continue;
            }
            if records.len() == limit {
                more = true;
                break;
            }
            records.push(row.clone());
            last = Some(*key);
        }
        let next_cursor = match (more, last) {
            (true, Some((time_ms, tiebreak))) => Some(LogCursor { time_ms, tiebreak }.encode()),
            _ => None,
        };
        Ok(LogPage {
            records,
            next_cursor,
        })
    }
}

impl State {
    fn insert(&mut self, record: LogRecord) {
        self.next_seq += 1;
        let key = (record.time_ms, self.next_seq);
        self.by_org.entry(record.org_id).or_default().insert(key);
        self.rows.insert(key, record);
    }

    /// Drops the oldest rows of `org` (or of the anonymous rows) beyond `cap`.
    fn trim(&mut self, org: Option<OrgId>, cap: usize) {
        let Some(keys) = self.by_org.get_mut(&org) else {
            return;
        };
        while keys.len() > cap {
            if let Some(key) = keys.pop_first() {
                self.rows.remove(&key);
            }
        }
        if keys.is_empty() {
            self.by_org.remove(&org);
        }
    }

    fn purge_before(&mut self, cutoff_ms: u64) -> u64 {
        let first = (cutoff_ms, 0);
        if self.rows.first_key_value().is_none_or(|(k, _)| *k >= first) {
            return 0;
        }
        let kept = self.rows.split_off(&first);
        let removed = std::mem::replace(&mut self.rows, kept).len() as u64;
        self.by_org.retain(|_, keys| {
            *keys = keys.split_off(&first);
            !keys.is_empty()
        });
        removed
    }
}

impl LogSink for MemoryLogSink {
    fn write_batch(&self, records: Vec<LogRecord>) -> BoxFuture<Result<(), BackendError>> {
        self.write(records);
        Box::pin(std::future::ready(Ok(())))
    }

    fn query(&self, query: LogQuery) -> BoxFuture<Result<LogPage, BackendError>> {
        let page = self.page(&query).map_err(BackendError::other);
        Box::pin(std::future::ready(page))
    }

    fn purge_older_than(&self, cutoff_ms: u64) -> BoxFuture<Result<u64, BackendError>> {
        let removed = self.lock().purge_before(cutoff_ms);
        Box::pin(std::future::ready(Ok(removed)))
    }
}

impl fmt::Debug for MemoryLogSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLogSink")
            .field("rows", &self.len())
            .field("retention_ms", &self.retention_ms)
            .field("max_rows", &self.max_rows)
            .field("max_anonymous_rows", &self.max_anonymous_rows)
            .finish()
    }
}
