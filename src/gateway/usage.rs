//! Usage: the rollups fed from the request logs ([`UsageTee`]) and the series of
//! `GET /api/usage` and `GET /admin/orgs/:org/usage`.
//!
//! # Parameters
//!
//! - `from`, `to`: RFC 3339; by default the org's current billing period (without one, the
//!   30 days up to now). `from` must be before `to`. At most 31 days apart at hour
//!   granularity, 400 days at day granularity.
//! - `granularity`: `hour` or `day` (default `day`). Buckets are whole UTC hours or days:
//!   `from` is rounded down and `to` up to bucket boundaries, and the answer's `from`/`to`
//!   are the rounded bounds, so it says exactly which time its numbers cover.
//! - `group_by`: absent (or empty) gives one row per bucket for the whole org; `model`
//!   adds `model_id` to each row (null for requests without a model, e.g. `/api/credits`)
//!   and one row per model and bucket; `route` adds `route` (the route template); both
//!   (`model,route`, in any order) give one row per model, route and bucket.
//!
//! Rows are ordered by `start`, then `model_id`, then `route`; buckets without requests are
//! left out. Every request the org made counts, the free routes included; `rate_limited`
//! counts every 429 (also counted in `client_errors`), and a client that hung up before the
//! answer counts as a client error (status 499). Anything else is 400 `INVALID_REQUEST`.

use std::sync::Arc;

use serde_json::{json, Map, Value};
use tollgate_accounts::{Granularity, GroupBy, UsageBatch, UsageQuery, UsageStore, DAY_MS};
use tollgate_core::time::{ms_from_rfc3339, rfc3339_from_ms};
use tollgate_core::{
    BackendError, BoxFuture, Clock as _, ErrorCode, OrgId, Rejection, SystemClock,
};
use tollgate_request_logger::{LogPage, LogQuery, LogRecord, LogSink};

use super::state::AppState;

/// The longest range at hour granularity.
pub const MAX_HOURLY_RANGE_MS: u64 = 31 * DAY_MS;
/// The longest range at day granularity.
pub const MAX_DAILY_RANGE_MS: u64 = 400 * DAY_MS;

/// A [`LogSink`] that also folds every batch into the usage rollups.
///
/// The request logger's background worker calls [`write_batch`](LogSink::write_batch), so the
/// rollups cost the request path nothing: the batch is aggregated per (org, model, route,
/// hour) on the worker and added to the [`UsageStore`] in one call, alongside the log write.
/// A failure of either is logged and does not affect the other.
pub struct UsageTee<S> {
    logs: S,
    usage: Option<Arc<dyn UsageStore>>,
    signals: Option<super::webhooks::watch::Signals>,
}

impl<S> UsageTee<S> {
    /// Writes logs to `logs` and rollups to `usage`.
    pub fn new(logs: S, usage: Arc<dyn UsageStore>) -> Self {
        UsageTee {
            logs,
            usage: Some(usage),
            signals: None,
        }
    }

    /// Writes logs to `logs` and no rollups (`Config::usage_rollups = false`).
    pub fn logs_only(logs: S) -> Self {
        UsageTee {
            logs,
            usage: None,
            signals: None,
        }
    }

    /// Also reports each batch to the webhook watcher (402s and charges).
    pub fn with_signals(mut self, signals: super::webhooks::watch::Signals) -> Self {
        self.signals = Some(signals);
        self
    }
}

impl<S> std::fmt::Debug for UsageTee<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageTee").finish_non_exhaustive()
    }
}

impl<S: LogSink> LogSink for UsageTee<S> {
    fn write_batch(&self, records: Vec<LogRecord>) -> BoxFuture<Result<(), BackendError>> {
        if let Some(signals) = &self.signals {
            signals.observe(&records);
        }
        let Some(usage) = self.usage.clone() else {
            return self.logs.write_batch(records);
        };
        let mut batch = UsageBatch::default();
        for r in &records {
            // Requests refused before authentication belong to no org.
            if let Some(org) = r.org_id {
                batch.record(
                    org,
                    r.time_ms,
                    r.model_id,
                    r.route.as_deref(),
                    r.status,
                    r.credits,
                );
            }
        }
        let logs = self.logs.write_batch(records);
        Box::pin(async move {
            let rows = batch.into_rows();
            let count = rows.len();
            let add = async move {
                if rows.is_empty() {
                    Ok(())
                } else {
                    usage.add(rows).await
                }
            };
            let (logs, usage) = tokio::join!(logs, add);
            if let Err(e) = usage {
                tracing::warn!(rows = count, error = %e, "usage rollups lost");
            }
            logs
        })
    }

    fn query(&self, query: LogQuery) -> BoxFuture<Result<LogPage, BackendError>> {
        self.logs.query(query)
    }

    fn purge_older_than(&self, cutoff_ms: u64) -> BoxFuture<Result<u64, BackendError>> {
        self.logs.purge_older_than(cutoff_ms)
    }
}

fn bad(message: impl Into<String>) -> Rejection {
    Rejection::new(ErrorCode::InvalidRequest).with_message(message.into())
}

/// The parsed parameters, before defaults.
#[derive(Debug, Default)]
struct Params {
    from: Option<u64>,
    to: Option<u64>,
    granularity: Granularity,
    group_by: GroupBy,
}

fn instant(name: &str, value: &str) -> Result<u64, Rejection> {
    // A `+` of an offset arrives as a space when the client did not percent-encode it.
    ms_from_rfc3339(value)
        .or_else(|| ms_from_rfc3339(&value.replace(' ', "+")))
        .ok_or_else(|| {
            bad(format!(
                "`{name}` must be an RFC 3339 time, e.g. 2024-05-01T00:00:00Z."
            ))
        })
}

fn parse(query: &str) -> Result<Params, Rejection> {
    let mut p = Params::default();
    let mut seen: Vec<String> = Vec::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if seen.iter().any(|k| *k == key) {
            return Err(bad(format!("`{key}` is given more than once.")));
        }
        seen.push(key.to_string());
        match key.as_ref() {
            "from" => p.from = Some(instant("from", &value)?),
            "to" => p.to = Some(instant("to", &value)?),
            "granularity" => {
                p.granularity = value
                    .parse()
                    .map_err(|_| bad("`granularity` must be hour or day."))?
            }
            "group_by" => {
                for part in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    match part {
                        "model" => p.group_by.model = true,
                        "route" => p.group_by.route = true,
                        other => {
                            return Err(bad(format!(
                                "`group_by` takes model and/or route, not `{other}`."
                            )))
                        }
                    }
                }
            }
            other => return Err(bad(format!("Unknown parameter `{other}`."))),
        }
    }
    Ok(p)
}

/// The usage series of `org` for the query string `query`, as the JSON body of
/// `GET /api/usage` (see the [module docs](self)).
pub async fn series(state: &AppState, org: OrgId, query: &str) -> Result<Value, Rejection> {
    let p = parse(query)?;
    let (default_from, default_to) = if p.from.is_some() && p.to.is_some() {
        (0, 0)
    } else {
        match state.ledger.account(org).await.map_err(|e| e.rejection())? {
            Some(a) if a.period_end_ms > a.period_start_ms => (a.period_start_ms, a.period_end_ms),
            _ => {
                let now = SystemClock.now_ms();
                (now.saturating_sub(30 * DAY_MS), now)
            }
        }
    };
    let from = p.from.unwrap_or(default_from);
    let to = p.to.unwrap_or(default_to);
    if from >= to {
        return Err(bad("`from` must be before `to`."));
    }
    let (max, limit) = match p.granularity {
        Granularity::Hour => (MAX_HOURLY_RANGE_MS, "31 days at hour granularity"),
        Granularity::Day => (MAX_DAILY_RANGE_MS, "400 days at day granularity"),
    };
    if to - from > max {
        return Err(bad(format!("The range may span at most {limit}.")));
    }
    let from = p.granularity.floor(from);
    let to = p.granularity.ceil(to);
    let buckets = state
        .accounts
        .usage
        .query(UsageQuery {
            org,
            from_ms: from,
            to_ms: to,
            granularity: p.granularity,
            group_by: p.group_by,
        })
        .await
        .map_err(|e| e.rejection())?;
    let series: Vec<Value> = buckets
        .into_iter()
        .map(|b| {
            let mut row = Map::new();
            row.insert("start".into(), rfc3339_from_ms(b.start_ms).into());
            if p.group_by.model {
                row.insert("model_id".into(), json!(b.model));
            }
            if p.group_by.route {
                row.insert("route".into(), json!(b.route));
            }
            let c = b.counts;
            for (name, value) in [
                ("requests", c.requests),
                ("ok", c.ok),
                ("client_errors", c.client_errors),
                ("server_errors", c.server_errors),
                ("rate_limited", c.rate_limited),
                ("credits", c.credits),
            ] {
                row.insert(name.into(), value.into());
            }
            Value::Object(row)
        })
        .collect();
    Ok(json!({
        "from": rfc3339_from_ms(from),
        "to": rfc3339_from_ms(to),
        "granularity": p.granularity.as_str(),
        "series": series,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters() {
        let p = parse("from=2024-05-01T00:00:00Z&to=2024-05-02T00:00:00%2B01:00&granularity=hour&group_by=route,model").unwrap();
        assert_eq!(p.from, ms_from_rfc3339("2024-05-01T00:00:00Z"));
        assert_eq!(p.to, ms_from_rfc3339("2024-05-01T23:00:00Z"));
        assert_eq!(p.granularity, Granularity::Hour);
        assert_eq!(
            p.group_by,
            GroupBy {
                model: true,
                route: true
            }
        );
        // An unencoded `+` offset still parses.
        assert_eq!(parse("to=2024-05-02T00:00:00+01:00").unwrap().to, p.to);
        assert_eq!(parse("group_by=").unwrap().group_by, GroupBy::default());
        for junk in [
            "from=yesterday",
            "from=1714521600000",
            "granularity=week",
            "group_by=key",
            "limit=3",
            "from=2024-05-01T00:00:00Z&from=2024-05-01T00:00:00Z",
        ] {
            let err = parse(junk).unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidRequest, "{junk}");
        }
    }
}
