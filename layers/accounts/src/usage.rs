//! Usage rollups: per organization, model, route and UTC hour, the number of requests by
//! outcome and the credits charged, kept [`USAGE_RETENTION`]; the [`UsageStore`] extension
//! point and [`UsageBatch`], which folds request records into rollup rows.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tollgate_core::{BackendError, BoxFuture, ModelId, OrgId};

/// How long rollups are kept: 400 days from the start of their hour.
pub const USAGE_RETENTION: Duration = Duration::from_secs(400 * 24 * 60 * 60);

/// One hour in milliseconds.
pub const HOUR_MS: u64 = 60 * 60 * 1_000;

/// One UTC day in milliseconds.
pub const DAY_MS: u64 = 24 * HOUR_MS;

/// What a rollup row is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UsageKey {
    /// The organization.
    pub org: OrgId,
    /// The start of the UTC hour (ms since the epoch, a multiple of [`HOUR_MS`]).
    pub hour_ms: u64,
    /// The model the requests were about; `None` for routes without one.
    pub model: Option<ModelId>,
    /// The route template (`/api/models/:id/chats`); `None` when no route matched.
    pub route: Option<String>,
}

/// Counts of requests and credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsageCounts {
    /// Every request.
    pub requests: u64,
    /// 2xx answers.
    pub ok: u64,
    /// 4xx answers (including 429s and client hang-ups, recorded as 499).
    pub client_errors: u64,
    /// 5xx answers.
    pub server_errors: u64,
    /// 429 answers (the gateway's rate limit or the upstream's throttling).
    pub rate_limited: u64,
    /// Credits charged.
    pub credits: u64,
}

impl UsageCounts {
    /// One request answered with `status` that was charged `credits`.
    pub fn of_request(status: u16, credits: u64) -> Self {
        UsageCounts {
            requests: 1,
            ok: u64::from((200..300).contains(&status)),
            client_errors: u64::from((400..500).contains(&status)),
            server_errors: u64::from((500..600).contains(&status)),
            rate_limited: u64::from(status == 429),
            credits,
        }
    }

    /// Adds `other` into these counts (saturating).
    pub fn add(&mut self, other: &UsageCounts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.ok = self.ok.saturating_add(other.ok);
        self.client_errors = self.client_errors.saturating_add(other.client_errors);
        self.server_errors = self.server_errors.saturating_add(other.server_errors);
        self.rate_limited = self.rate_limited.saturating_add(other.rate_limited);
        self.credits = self.credits.saturating_add(other.credits);
    }
}

/// One rollup row: counts to add into the row of `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// Which row.
    pub key: UsageKey,
    /// What to add.
    pub counts: UsageCounts,
}

/// Folds requests into rollup rows, one per key, so a store gets each key once per batch.
///
/// ```
/// use tollgate_accounts::{UsageBatch, HOUR_MS};
/// use tollgate_core::{ModelId, OrgId};
///
/// let (org, model) = (OrgId::new(), ModelId::new());
/// let mut batch = UsageBatch::default();
/// batch.record(org, 10 * HOUR_MS + 5, Some(model), Some("/api/models/:id/chats"), 200, 1);
/// batch.record(org, 10 * HOUR_MS + 9, Some(model), Some("/api/models/:id/chats"), 429, 0);
/// let rows = batch.into_rows();
/// assert_eq!(rows.len(), 1);
/// assert_eq!(rows[0].key.hour_ms, 10 * HOUR_MS);
/// assert_eq!((rows[0].counts.requests, rows[0].counts.rate_limited, rows[0].counts.credits), (2, 1, 1));
/// ```
#[derive(Debug, Clone, Default)]
pub struct UsageBatch {
    rows: HashMap<UsageKey, UsageCounts>,
}

impl UsageBatch {
    /// Counts one request that arrived at `time_ms`.
    pub fn record(
        &mut self,
        org: OrgId,
        time_ms: u64,
        model: Option<ModelId>,
        route: Option<&str>,
        status: u16,
        credits: u64,
    ) {
        self.add(
            UsageKey {
                org,
                hour_ms: time_ms - time_ms % HOUR_MS,
                model,
                route: route.map(str::to_owned),
            },
            &UsageCounts::of_request(status, credits),
        );
    }

    /// Adds counts into the row of `key`.
    pub fn add(&mut self, key: UsageKey, counts: &UsageCounts) {
        self.rows.entry(key).or_default().add(counts);
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows, sorted by key (so concurrent writers lock rows in one order).
    pub fn into_rows(self) -> Vec<UsageRow> {
        let mut rows: Vec<UsageRow> = self
            .rows
            .into_iter()
            .map(|(key, counts)| UsageRow { key, counts })
            .collect();
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        rows
    }
}

/// The size of the time buckets of a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Granularity {
    /// UTC hours.
    Hour,
    /// UTC days.
    #[default]
    Day,
}

impl Granularity {
    /// `hour` or `day`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    /// The bucket length in milliseconds.
    pub const fn bucket_ms(self) -> u64 {
        match self {
            Granularity::Hour => HOUR_MS,
            Granularity::Day => DAY_MS,
        }
    }

    /// The start of the bucket holding `ms`.
    pub const fn floor(self, ms: u64) -> u64 {
        ms - ms % self.bucket_ms()
    }

    /// The end of the bucket holding `ms - 1`: `ms` itself on a boundary.
    pub const fn ceil(self, ms: u64) -> u64 {
        let b = self.bucket_ms();
        match ms % b {
            0 => ms,
            r => ms.saturating_add(b - r),
        }
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Granularity {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "hour" => Ok(Granularity::Hour),
            "day" => Ok(Granularity::Day),
            _ => Err(()),
        }
    }
}

/// Which dimensions split the series besides time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GroupBy {
    /// One row per model.
    pub model: bool,
    /// One row per route.
    pub route: bool,
}

/// A usage query over one organization. Rows whose hour starts in `[from_ms, to_ms)` are
/// summed into buckets of the granularity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    /// The organization: only its rows count.
    pub org: OrgId,
    /// First hour, inclusive.
    pub from_ms: u64,
    /// End, exclusive.
    pub to_ms: u64,
    /// Bucket size.
    pub granularity: Granularity,
    /// Splits besides time.
    pub group_by: GroupBy,
}

/// One bucket of a usage series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageBucket {
    /// The bucket's start (ms since the epoch).
    pub start_ms: u64,
    /// The model, when grouped by model (`None`: requests without a model, or not grouped).
    pub model: Option<ModelId>,
    /// The route, when grouped by route.
    pub route: Option<String>,
    /// The summed counts.
    pub counts: UsageCounts,
}

/// Where rollups live. Object-safe (`Arc<dyn UsageStore>`).
///
/// [`add`](UsageStore::add) adds into existing rows, so several writers (gateway replicas)
/// can share one store.
pub trait UsageStore: Send + Sync + 'static {
    /// Adds each row's counts into the stored row of its key (creating it).
    fn add(&self, rows: Vec<UsageRow>) -> BoxFuture<Result<(), BackendError>>;

    /// The buckets with at least one request, ordered by start, then model, then route.
    /// Rows older than [`USAGE_RETENTION`] are never returned.
    fn query(&self, query: UsageQuery) -> BoxFuture<Result<Vec<UsageBucket>, BackendError>>;

    /// Deletes rows whose hour starts before `cutoff_ms`; returns how many went.
    fn purge_older_than(&self, cutoff_ms: u64) -> BoxFuture<Result<u64, BackendError>>;
}

impl<T: UsageStore + ?Sized> UsageStore for Arc<T> {
    fn add(&self, rows: Vec<UsageRow>) -> BoxFuture<Result<(), BackendError>> {
        (**self).add(rows)
    }
    fn query(&self, query: UsageQuery) -> BoxFuture<Result<Vec<UsageBucket>, BackendError>> {
        (**self).query(query)
    }
    fn purge_older_than(&self, cutoff_ms: u64) -> BoxFuture<Result<u64, BackendError>> {
        (**self).purge_older_than(cutoff_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_classified_by_status() {
        let c = |s| UsageCounts::of_request(s, 0);
        assert_eq!(c(200).ok, 1);
        assert_eq!((c(429).client_errors, c(429).rate_limited), (1, 1));
        assert_eq!((c(402).client_errors, c(402).rate_limited), (1, 0));
        assert_eq!(c(499).client_errors, 1);
        assert_eq!(c(502).server_errors, 1);
        assert_eq!(c(304).requests, 1);
        assert_eq!(c(304).ok + c(304).client_errors + c(304).server_errors, 0);
    }

    #[test]
    fn buckets_round_to_utc_hours_and_days() {
        let t = 3 * DAY_MS + 5 * HOUR_MS + 7;
        assert_eq!(Granularity::Hour.floor(t), 3 * DAY_MS + 5 * HOUR_MS);
        assert_eq!(Granularity::Hour.ceil(t), 3 * DAY_MS + 6 * HOUR_MS);
        assert_eq!(Granularity::Day.floor(t), 3 * DAY_MS);
        assert_eq!(Granularity::Day.ceil(t), 4 * DAY_MS);
        assert_eq!(Granularity::Day.ceil(4 * DAY_MS), 4 * DAY_MS);
    }
}
