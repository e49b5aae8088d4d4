//! The Usage & Logs page (the §11 series as a chart and a table, recent requests with
//! filters, downloads of the §6 export) and what the Overview shows of the same numbers.

use std::collections::HashMap;

use http::{HeaderMap, Response, StatusCode};

use tollgate_accounts::{Granularity, GroupBy, UsageBucket, UsageCounts, UsageQuery, DAY_MS};
use tollgate_core::{Clock as _, ErrorCode, ModelId, OrgId, Rejection, SystemClock};
use tollgate_request_logger::{LogQuery, LogRecord};

use super::auth;
use super::http::redirect;
use super::pages::{nav, org_for};
use super::render;
use super::views::{
    date_time, thousands, Chart, Frame, OrgNav, RecentRow, SelectOption, Tab, TopRow, UsagePage,
    UsageRow,
};
use super::Site;
use crate::gateway::app::GatewayBody;
use crate::gateway::query::percent_decode;

type Answer = Result<Response<GatewayBody>, Rejection>;

/// Recent requests shown.
const RECENT: usize = 50;
/// The hourly view's range.
const HOURLY_RANGE_MS: u64 = 2 * DAY_MS;
const HOUR_MS: u64 = 3_600_000;

fn invalid(message: &str) -> Rejection {
    Rejection::new(ErrorCode::InvalidRequest).with_message(message.to_owned())
}

/// The page's query: `granularity` (`day`, `hour`), `model`, `status`.
#[derive(Debug, Default)]
struct Filters {
    hourly: bool,
    model: Option<ModelId>,
    status: Option<u16>,
    /// Only the requests of the last this many ms (`period`: 1h, 24h, 7d, 14d).
    period_ms: Option<u64>,
    /// The `period` as given.
    period: Option<&'static str>,
}

/// The periods the recent requests can be limited to: (value, label, ms).
const PERIODS: [(&str, &str, u64); 4] = [
    ("1h", "Last hour", HOUR_MS),
    ("24h", "Last 24 hours", DAY_MS),
    ("7d", "Last 7 days", 7 * DAY_MS),
    ("14d", "Last 14 days", 14 * DAY_MS),
];

impl Filters {
    fn parse(query: &str) -> Result<Filters, Rejection> {
        let mut f = Filters::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v).ok_or_else(|| invalid("The query string is not valid."))?;
            match k {
                "granularity" => {
                    f.hourly = match v.as_str() {
                        "hour" => true,
                        "day" | "" => false,
                        _ => return Err(invalid("`granularity` is day or hour.")),
                    }
                }
                "model" if v.is_empty() => f.model = None,
                "model" => {
                    f.model = Some(
                        v.parse()
                            .map_err(|_| invalid("Choose a model of the list."))?,
                    )
                }
                "period" if v.is_empty() => (f.period_ms, f.period) = (None, None),
                "period" => {
                    let p = PERIODS
                        .iter()
                        .find(|p| p.0 == v)
                        .ok_or_else(|| invalid("The period is 1h, 24h, 7d or 14d."))?;
                    (f.period_ms, f.period) = (Some(p.2), Some(p.0));
                }
                "status" if v.is_empty() => f.status = None,
                "status" => {
                    f.status = Some(
                        v.parse::<u16>()
                            .ok()
                            .filter(|s| (100..=599).contains(s))
                            .ok_or_else(|| invalid("The status is an HTTP status, 100 to 599."))?,
                    )
                }
                _ => {}
            }
        }
        Ok(f)
    }

    /// The page's own query for a download link (the period stays a period, so the export
    /// covers it up to the moment of the download).
    fn link_query(&self, format: &str) -> String {
        let mut q = format!("format={format}");
        if let Some(m) = self.model {
            q.push_str(&format!("&model={m}"));
        }
        if let Some(s) = self.status {
            q.push_str(&format!("&status={s}"));
        }
        if let Some(p) = self.period {
            q.push_str(&format!("&period={p}"));
        }
        q
    }

    /// The filters as a query of the log export.
    fn export_query(&self, format: &str) -> String {
        let mut q = format!("format={format}");
        if let Some(m) = self.model {
            q.push_str(&format!("&model={m}"));
        }
        if let Some(s) = self.status {
            q.push_str(&format!("&status={s}"));
        }
        if let Some(p) = self.period_ms {
            q.push_str(&format!("&from={}", SystemClock.now_ms().saturating_sub(p)));
        }
        q
    }
}

/// The org's usage buckets from `from` to `to`.
async fn buckets(
    state: &Site<'_>,
    org: OrgId,
    from: u64,
    to: u64,
    granularity: Granularity,
    group_by: GroupBy,
) -> Result<Vec<UsageBucket>, Rejection> {
    state
        .accounts
        .usage
        .query(UsageQuery {
            org,
            from_ms: granularity.floor(from),
            to_ms: granularity.ceil(to.max(from + 1)),
            granularity,
            group_by,
        })
        .await
        .map_err(|e| e.rejection())
}

/// The current period (or the last 30 days without one), up to now.
async fn period(state: &Site<'_>, org: OrgId) -> Result<(u64, u64), Rejection> {
    let now = SystemClock.now_ms();
    let account = state.ledger.account(org).await.map_err(|e| e.rejection())?;
    Ok(match account {
        Some(a) if a.plan.is_some() && a.period_start_ms < now => (a.period_start_ms, now),
        _ => (now.saturating_sub(30 * DAY_MS), now),
    })
}

/// Every bucket from `from` to `to`, empty ones included, for the chart and the table.
fn filled(
    series: &[UsageBucket],
    from: u64,
    to: u64,
    step: u64,
    label: impl Fn(u64) -> String,
) -> Vec<(u64, String, UsageCounts)> {
    let by_start: HashMap<u64, UsageCounts> =
        series.iter().map(|b| (b.start_ms, b.counts)).collect();
    let mut out = Vec::new();
    let mut t = from - from % step;
    while t < to {
        out.push((t, label(t), by_start.get(&t).copied().unwrap_or_default()));
        t += step;
    }
    out
}

/// The chart of the current period per day (the Overview's too).
pub async fn period_chart(state: &Site<'_>, org: OrgId) -> Result<(Chart, UsageCounts), Rejection> {
    let (from, to) = period(state, org).await?;
    let series = buckets(state, org, from, to, Granularity::Day, GroupBy::default()).await?;
    let days = filled(&series, from, to, DAY_MS, |t| {
        date_time(t)[5..10].to_owned()
    });
    let mut total = UsageCounts::default();
    for (_, _, c) in &days {
        total.add(c);
    }
    let points: Vec<_> = days
        .iter()
        .map(|(_, l, c)| (l.clone(), c.requests, c.credits))
        .collect();
    Ok((Chart::new(&points), total))
}

/// The busiest models and routes of the current period: (models, routes), five each.
pub async fn busiest(
    state: &Site<'_>,
    org: OrgId,
) -> Result<(Vec<TopRow>, Vec<TopRow>), Rejection> {
    let (from, to) = period(state, org).await?;
    let grouped = buckets(
        state,
        org,
        from,
        to,
        Granularity::Day,
        GroupBy {
            model: true,
            route: true,
        },
    )
    .await?;
    let names: HashMap<ModelId, String> = state
        .sessions
        .list(org)
        .await
        .map_err(|e| e.rejection())?
        .into_iter()
        .map(|m| (m.id, m.name))
        .collect();
    let mut models: HashMap<Option<ModelId>, UsageCounts> = HashMap::new();
    let mut routes: HashMap<String, UsageCounts> = HashMap::new();
    for b in &grouped {
        models.entry(b.model).or_default().add(&b.counts);
        routes
            .entry(b.route.clone().unwrap_or_default())
            .or_default()
            .add(&b.counts);
    }
    let top = |rows: Vec<(String, UsageCounts)>| {
        let mut rows = rows;
        rows.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then(a.0.cmp(&b.0)));
        rows.into_iter()
            .take(5)
            .map(|(name, c)| TopRow {
                name,
                requests: thousands(c.requests),
                credits: thousands(c.credits),
            })
            .collect::<Vec<_>>()
    };
    let models = top(models
        .into_iter()
        .filter_map(|(m, c)| {
            m.map(|m| (names.get(&m).cloned().unwrap_or_else(|| m.to_string()), c))
        })
        .collect());
    let routes = top(routes.into_iter().filter(|(r, _)| !r.is_empty()).collect());
    Ok((models, routes))
}

/// Log pages read at most for one window of the recent requests.
const RECENT_PAGES: usize = 5;

/// The newest matching log rows, newest first: in the chosen period, or else in the
/// smallest recent window that holds enough of them. The sinks page oldest first, so each
/// window is read through (at most [`RECENT_PAGES`] pages) keeping its newest rows.
async fn recent(state: &Site<'_>, org: OrgId, f: &Filters) -> Result<Vec<LogRecord>, Rejection> {
    let now = SystemClock.now_ms();
    let windows: Vec<u64> = match f.period_ms {
        Some(p) => vec![p],
        None => vec![10 * 60_000, HOUR_MS, DAY_MS, 14 * DAY_MS],
    };
    let mut newest: std::collections::VecDeque<LogRecord> = std::collections::VecDeque::new();
    for window in windows {
        newest.clear();
        let mut query = LogQuery {
            org,
            from_ms: Some(now.saturating_sub(window)),
            to_ms: None,
            model: f.model,
            status: f.status,
            cursor: None,
            limit: LogQuery::MAX_LIMIT,
        };
        let mut seen = 0;
        for _ in 0..RECENT_PAGES {
            let page = state
                .logs
                .query(query.clone())
                .await
                .map_err(|e| e.rejection())?;
            seen += page.records.len();
            for r in page.records {
                if newest.len() == RECENT {
                    newest.pop_front();
                }
                newest.push_back(r);
            }
            match page.next_cursor {
                Some(c) => query.cursor = Some(c),
                None => break,
            }
        }
        if seen >= RECENT {
            break;
        }
    }
    let mut rows: Vec<LogRecord> = newest.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.time_ms));
    Ok(rows)
}

pub async fn usage(state: &Site<'_>, headers: &HeaderMap, segment: &str, query: &str) -> Answer {
    let Some(viewer) = auth::viewer(state, headers).await? else {
        return Ok(redirect("/dashboard/login"));
    };
    let (org, name, _) = org_for(state, &viewer, segment).await?;
    let filters = Filters::parse(query)?;
    let (chart, rows) = if filters.hourly {
        let to = SystemClock.now_ms();
        let from = to.saturating_sub(HOURLY_RANGE_MS);
        let series = buckets(state, org, from, to, Granularity::Hour, GroupBy::default()).await?;
        let hours = filled(&series, from, to, HOUR_MS, |t| {
            date_time(t)[11..16].to_owned()
        });
        let points: Vec<_> = hours
            .iter()
            .map(|(_, l, c)| (l.clone(), c.requests, c.credits))
            .collect();
        (Chart::new(&points), hours)
    } else {
        let (from, to) = period(state, org).await?;
        let series = buckets(state, org, from, to, Granularity::Day, GroupBy::default()).await?;
        let days = filled(&series, from, to, DAY_MS, |t| date_time(t)[..10].to_owned());
        let points: Vec<_> = days
            .iter()
            .map(|(t, _, c)| (date_time(*t)[5..10].to_owned(), c.requests, c.credits))
            .collect();
        (Chart::new(&points), days)
    };
    let table = rows
        .iter()
        .rev()
        .filter(|(_, _, c)| c.requests > 0)
        .map(|(t, _, c)| UsageRow {
            start: if filters.hourly {
                date_time(*t)
            } else {
                date_time(*t)[..10].to_owned()
            },
            requests: thousands(c.requests),
            ok: thousands(c.ok),
            errors: thousands(c.client_errors + c.server_errors),
            rate_limited: thousands(c.rate_limited),
            credits: thousands(c.credits),
        })
        .collect();
    let models = state.sessions.list(org).await.map_err(|e| e.rejection())?;
    let names: HashMap<ModelId, String> = models.iter().map(|m| (m.id, m.name.clone())).collect();
    let recent_rows = recent(state, org, &filters)
        .await?
        .into_iter()
        .map(|r| RecentRow {
            time: date_time(r.time_ms),
            method: r.method.clone(),
            route: r.route.clone().unwrap_or_else(|| "—".to_owned()),
            model: r.model_id.map_or("—".to_owned(), |m| {
                names.get(&m).cloned().unwrap_or_else(|| m.to_string())
            }),
            status: r.status,
            status_class: match r.status {
                200..=299 => "badge-2xx",
                400..=499 => "badge-4xx",
                _ => "badge-5xx",
            },
            credits: r.credits,
            latency: format!("{} ms", r.latency_ms),
            request_id: r.request_id.clone(),
        })
        .collect();
    let base = format!("/dashboard/orgs/{org}/usage");
    let org_nav = OrgNav::new(org.to_string(), name.clone(), Some(Tab::Usage));
    Ok(render(
        StatusCode::OK,
        &UsagePage {
            frame: Frame::with_nav("Usage & Logs", nav(&viewer, Some(org_nav))),
            org_name: name,
            chart,
            hourly: filters.hourly,
            day_href: base.clone(),
            hour_href: format!("{base}?granularity=hour"),
            rows: table,
            recent: recent_rows,
            models: models
                .iter()
                .map(|m| SelectOption {
                    value: m.id.to_string(),
                    label: m.name.clone(),
                    selected: filters.model == Some(m.id),
                })
                .collect(),
            status_filter: filters.status.map_or(String::new(), |s| s.to_string()),
            filter_action: base,
            ndjson_href: format!(
                "/dashboard/orgs/{org}/logs?{}",
                filters.link_query("ndjson")
            ),
            csv_href: format!("/dashboard/orgs/{org}/logs?{}", filters.link_query("csv")),
            periods: PERIODS
                .iter()
                .map(|(value, label, _)| SelectOption {
                    value: (*value).to_owned(),
                    label: (*label).to_owned(),
                    selected: filters.period == Some(*value),
                })
                .collect(),
            recent_note: "Newest first. The downloads hold every matching request of the period \
                          (without one, of the last 14 days)."
                .to_owned(),
        },
    ))
}

/// `GET /dashboard/orgs/:org/logs?format=…`: the org's log export, as `GET /api/logs` gives
/// it, as a download.
pub async fn download(state: &Site<'_>, headers: &HeaderMap, segment: &str, query: &str) -> Answer {
    let Some(viewer) = auth::viewer(state, headers).await? else {
        return Ok(redirect("/dashboard/login"));
    };
    let (org, _, _) = org_for(state, &viewer, segment).await?;
    let filters = Filters::parse(query)?;
    let format = if query.split('&').any(|p| p == "format=csv") {
        "csv"
    } else {
        "ndjson"
    };
    let mut res =
        crate::gateway::local::export_logs(state, org, &filters.export_query(format)).await?;
    let file = format!("attachment; filename=\"requests.{format}\"");
    if let Ok(v) = http::HeaderValue::from_str(&file) {
        res.headers_mut()
            .insert(http::header::CONTENT_DISPOSITION, v);
    }
    Ok(res)
}
