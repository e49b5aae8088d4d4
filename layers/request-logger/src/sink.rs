//! The [`LogSink`] extension point: where request logs are stored and queried.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tollgate_core::{BackendError, BoxFuture, ModelId, OrgId};

use crate::record::LogRecord;

/// How long request logs are kept: 14 days from each request's own timestamp (docs/contract.md §6).
pub const RETENTION: Duration = Duration::from_secs(14 * 24 * 60 * 60);

/// Where request logs go. Object-safe: a gateway may hold an `Arc<dyn LogSink>`.
///
/// Implementations apply the retention ([`RETENTION`]): rows older than it are never
/// returned by [`query`](LogSink::query) and are deleted automatically.
pub trait LogSink: Send + Sync + 'static {
    /// Stores a batch of records.
    fn write_batch(&self, records: Vec<LogRecord>) -> BoxFuture<Result<(), BackendError>>;

    /// One page of the organization's records matching the query, ordered by time and then
    /// by a tiebreak that is stable across pages.
    fn query(&self, query: LogQuery) -> BoxFuture<Result<LogPage, BackendError>>;

    /// Deletes every record whose time is before `cutoff_ms`; returns how many went.
    fn purge_older_than(&self, cutoff_ms: u64) -> BoxFuture<Result<u64, BackendError>>;
}

impl<T: LogSink + ?Sized> LogSink for Arc<T> {
    fn write_batch(&self, records: Vec<LogRecord>) -> BoxFuture<Result<(), BackendError>> {
        (**self).write_batch(records)
    }

    fn query(&self, query: LogQuery) -> BoxFuture<Result<LogPage, BackendError>> {
        (**self).query(query)
    }

    fn purge_older_than(&self, cutoff_ms: u64) -> BoxFuture<Result<u64, BackendError>> {
        (**self).purge_older_than(cutoff_ms)
    }
}

/// A query over one organization's logs. Time bounds are half-open: `from_ms <= time <
/// to_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogQuery {
    /// The caller's organization: only its records are returned.
    pub org: OrgId,
    /// Earliest request time, inclusive.
    pub from_ms: Option<u64>,
    /// Latest request time, exclusive.
    pub to_ms: Option<u64>,
    /// Only this model's requests.
    pub model: Option<ModelId>,
    /// Only responses with this status.
    pub status: Option<u16>,
    /// Continue after the page that returned this cursor.
    pub cursor: Option<String>,
    /// Records per page; sinks clamp it to `1..=`[`LogQuery::MAX_LIMIT`].
    pub limit: usize,
}

impl LogQuery {
    /// The page size of [`LogQuery::new`].
    pub const DEFAULT_LIMIT: usize = 1_000;
    /// The largest page a sink returns.
    pub const MAX_LIMIT: usize = 10_000;

    /// Everything of `org`, first page, [`LogQuery::DEFAULT_LIMIT`] records.
    pub fn new(org: OrgId) -> Self {
        LogQuery {
            org,
            from_ms: None,
            to_ms: None,
            model: None,
            status: None,
            cursor: None,
            limit: Self::DEFAULT_LIMIT,
        }
    }

    /// The limit clamped to `1..=MAX_LIMIT`.
    pub fn effective_limit(&self) -> usize {
        self.limit.clamp(1, Self::MAX_LIMIT)
    }
}

/// One page of records.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogPage {
    /// The records, oldest first.
    pub records: Vec<LogRecord>,
    /// Pass as [`LogQuery::cursor`] to get the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// The position after a record, as carried by [`LogPage::next_cursor`]: the record's time and
/// the sink's tiebreak (a sequence number or row id). Clients see it as opaque text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogCursor {
    /// The record's time.
    pub time_ms: u64,
    /// The sink's tiebreak among records of the same time.
    pub tiebreak: u64,
}

impl LogCursor {
    /// The cursor as text (32 lowercase hex digits).
    pub fn encode(&self) -> String {
        format!("{:016x}{:016x}", self.time_ms, self.tiebreak)
    }

    /// Parses text made by [`encode`](LogCursor::encode); `None` for anything else (a handler
    /// answers that with 400 `INVALID_REQUEST` before querying).
    pub fn decode(text: &str) -> Option<Self> {
        if text.len() != 32 || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let time_ms = u64::from_str_radix(&text[..16], 16).ok()?;
        let tiebreak = u64::from_str_radix(&text[16..], 16).ok()?;
        Some(LogCursor { time_ms, tiebreak })
    }
}

impl fmt::Display for LogCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

/// The cursor of a query was not made by this sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidCursor;

impl fmt::Display for InvalidCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid log cursor")
    }
}

impl std::error::Error for InvalidCursor {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_junk() {
        let c = LogCursor {
            time_ms: 1_675_150_502_748,
            tiebreak: 42,
        };
        let text = c.encode();
        assert_eq!(text.len(), 32);
        assert_eq!(LogCursor::decode(&text), Some(c));
        for junk in [
            "",
            "abc",
            &text.to_uppercase(),
            &format!("{text}0"),
            "g0000000000000000000000000000000",
            "+000000000000000000000000000000f",
        ] {
            assert_eq!(LogCursor::decode(junk), None, "{junk}");
        }
    }

    #[test]
    fn limits_are_clamped() {
        let mut q = LogQuery::new(OrgId::new());
        assert_eq!(q.effective_limit(), 1_000);
        q.limit = 0;
        assert_eq!(q.effective_limit(), 1);
        q.limit = usize::MAX;
        assert_eq!(q.effective_limit(), LogQuery::MAX_LIMIT);
    }
}
