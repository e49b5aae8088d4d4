//! The customer routes the gateway answers itself: `GET /api/credits`, `GET /api/logs` and
//! `GET /api/usage`, and the rate limit of every free route.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{Full, StreamBody};
use serde_json::json;

use tollgate_core::time::rfc3339_from_ms;
use tollgate_core::{BoxError, ErrorCode, ModelId, Plan, Principal, Rejection, RouteMatch};
use tollgate_request_logger::{ExportFormat, LogQuery, LogRecord};
use tollgate_sliding_window::{BucketKey, PerModelSlidingWindowLayer, WindowPolicy, WindowStore};

use super::app::{boxed, GatewayBody};
use super::query::ExportParams;
use super::state::AppState;

pub use super::query::MAX_EXPORT_LIMIT;
/// Rows fetched from the sink per page.
const PAGE: usize = 500;

/// The header carrying the cursor of the next export page.
pub static X_NEXT_CURSOR: HeaderName = HeaderName::from_static("x-next-cursor");

/// Requests per window (`TOLLGATE_WINDOW_MS`, a minute by default) one API key may make to
/// the free routes, whatever the plan.
pub const FREE_ROUTE_LIMIT: u32 = 120;
/// Requests per second one API key may make to the free routes.
pub const FREE_ROUTE_BURST: u32 = 20;

/// The rate limit of the free routes (every route of the cost table that costs 0 credits:
/// `/api/credits`, `/api/logs`, …): [`FREE_ROUTE_LIMIT`] per `window` and
/// [`FREE_ROUTE_BURST`] per second, per API key, in the same window store as the paid
/// routes (so replicas sharing Redis share it). A refusal is the usual 429
/// `RATE_LIMIT_EXCEEDED` with the `RateLimit-*` headers and `Retry-After`. Paid routes are
/// limited per (org, model) by the plan instead, and pass through this layer.
///
/// Sits inside `ApiKeyAuthLayer`: the key comes from the [`Principal`].
pub fn free_route_limit(
    windows: Arc<dyn WindowStore>,
    window: Duration,
) -> PerModelSlidingWindowLayer<Arc<dyn WindowStore>> {
    let mut policy = WindowPolicy::new().with_window(window);
    for plan in Plan::ALL {
        policy = policy
            .with_limit(plan, FREE_ROUTE_LIMIT)
            .with_burst(plan, FREE_ROUTE_BURST);
    }
    PerModelSlidingWindowLayer::new(windows)
        .with_policy(policy)
        .with_bucket_fn(|head, route| {
            route.filter(|r| r.cost() == 0)?;
            let principal = head.extensions.get::<Principal>()?;
            // One bucket per key. The store buckets by (org, model); a key id is a UUID no
            // model has, so the key's bucket never meets a model's.
            let key = ModelId::from_uuid(*principal.key.as_uuid());
            Some((BucketKey::new(principal.org, key), principal.plan))
        })
}

/// Answers `/api/credits` or `/api/logs` for the authenticated caller.
pub async fn handle<B>(state: Arc<AppState>, req: Request<B>) -> Response<GatewayBody> {
    let Some(principal) = req.extensions().get::<Principal>().copied() else {
        return Rejection::new(ErrorCode::InvalidApiKey)
            .into_response::<Full<Bytes>>()
            .map(boxed);
    };
    let template = req
        .extensions()
        .get::<RouteMatch>()
        .map(|m| m.template().to_owned())
        .unwrap_or_default();
    let result = match template.as_str() {
        "/api/credits" => credits(&state, principal).await,
        "/api/logs" => logs(&state, principal, req.uri().query().unwrap_or("")).await,
        "/api/usage" => {
            super::usage::series(&state, principal.org, req.uri().query().unwrap_or(""))
                .await
                .map(|body| json_body(&body))
        }
        _ => Err(Rejection::new(ErrorCode::NotFound)),
    };
    result.unwrap_or_else(|r| r.into_response::<Full<Bytes>>().map(boxed))
}

async fn credits(
    state: &AppState,
    principal: Principal,
) -> Result<Response<GatewayBody>, Rejection> {
    let account = state
        .ledger
        .account(principal.org)
        .await
        .map_err(|e| e.rejection_from("ledger"))?
        .ok_or_else(|| Rejection::new(ErrorCode::NoSubscription))?;
    let body = json!({
        "plan": account.plan,
        "balance": account.balance(),
        "plan_credits": account.plan_credits,
        "topup_credits": account.topup_credits,
        "period_end": rfc3339_from_ms(account.period_end_ms),
    });
    let mut res = Response::new(boxed(Full::new(Bytes::from(body.to_string()))));
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(res)
}

fn json_body(body: &serde_json::Value) -> Response<GatewayBody> {
    let mut res = Response::new(boxed(Full::new(Bytes::from(body.to_string()))));
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

async fn logs(
    state: &AppState,
    principal: Principal,
    query: &str,
) -> Result<Response<GatewayBody>, Rejection> {
    export_logs(state, principal.org, query).await
}

/// The export of `GET /api/logs` for `org` with its query (also the dashboard's download).
pub(crate) async fn export_logs(
    state: &AppState,
    org: tollgate_core::OrgId,
    query: &str,
) -> Result<Response<GatewayBody>, Rejection> {
    let params = ExportParams::parse(query)?;
    let mut q = params.log_query(org, PAGE);
    let format = params.format;

    let Some(limit) = params.limit else {
        return stream_all(state, q, format).await;
    };
    let mut rows: Vec<LogRecord> = Vec::new();
    let next = loop {
        q.limit = PAGE.min(limit - rows.len());
        let page = state
            .logs
            .query(q.clone())
            .await
            .map_err(|e| e.rejection_from("logs"))?;
        rows.extend(page.records);
        if rows.len() >= limit || page.next_cursor.is_none() {
            break page.next_cursor;
        }
        q.cursor = page.next_cursor;
    };

    let mut out = Vec::with_capacity(rows.len() * 256);
    if format == ExportFormat::Csv {
        out.extend_from_slice(tollgate_request_logger::CSV_HEADER.as_bytes());
    }
    out.extend_from_slice(&render(format, &rows));
    let mut res = Response::new(boxed(Full::new(Bytes::from(out))));
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    if let Some(cursor) = next.filter(|_| rows.len() >= limit) {
        if let Ok(v) = HeaderValue::from_str(&cursor) {
            res.headers_mut().insert(X_NEXT_CURSOR.clone(), v);
        }
    }
    Ok(res)
}

fn render(format: ExportFormat, rows: &[LogRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows.len() * 256);
    for r in rows {
        out.extend_from_slice(format.render(r).as_bytes());
    }
    out
}

/// Without `limit`: every matching row, streamed page by page from the sink as the client
/// reads (memory stays one page however long the export). The first page is fetched before
/// answering, so a sink that is down still gets a clean 503; a failure later ends the body
/// with an error.
async fn stream_all(
    state: &AppState,
    mut q: LogQuery,
    format: ExportFormat,
) -> Result<Response<GatewayBody>, Rejection> {
    q.limit = PAGE;
    let first = state
        .logs
        .query(q.clone())
        .await
        .map_err(|e| e.rejection_from("logs"))?;
    let mut head = Vec::new();
    if format == ExportFormat::Csv {
        head.extend_from_slice(tollgate_request_logger::CSV_HEADER.as_bytes());
    }
    head.extend_from_slice(&render(format, &first.records));
    q.cursor = first.next_cursor;
    let sink = Arc::clone(&state.logs);
    let rest = futures_util::stream::unfold(Some(q), move |next| {
        let sink = Arc::clone(&sink);
        async move {
            let q = next?;
            q.cursor.as_ref()?;
            match sink.query(q.clone()).await {
                Ok(page) => {
                    let chunk = Bytes::from(render(format, &page.records));
                    let next = LogQuery {
                        cursor: page.next_cursor,
                        ..q
                    };
                    Some((Ok::<_, BoxError>(Frame::data(chunk)), Some(next)))
                }
                Err(e) => Some((Err(BoxError::from(e)), None)),
            }
        }
    });
    let head = futures_util::stream::once(std::future::ready(Ok::<_, BoxError>(Frame::data(
        Bytes::from(head),
    ))));
    let body = StreamBody::new(futures_util::StreamExt::chain(head, rest));
    let mut res = Response::new(boxed(body));
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    Ok(res)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::{Method, StatusCode};
    use tollgate_core::{CostTable, KeyId, OrgId, RouteSpec, SystemClock};
    use tollgate_sliding_window::MemoryWindowStore;
    use tower::{Layer, ServiceExt};

    use super::*;

    #[tokio::test]
    async fn every_free_route_of_the_table_is_limited_and_paid_ones_pass() {
        // A table with a free route the gateway does not have yet.
        let table = CostTable::new([
            RouteSpec::new(Method::GET, "/api/usage", 0),
            RouteSpec::new(Method::GET, "/api/paid", 1),
        ]);
        let windows: Arc<dyn WindowStore> = Arc::new(MemoryWindowStore::new(SystemClock::shared()));
        let svc = free_route_limit(windows, Duration::from_secs(60)).layer(tower::service_fn(
            |_req: Request<Full<Bytes>>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
            },
        ));
        let principal = Principal {
            org: OrgId::new(),
            key: KeyId::new(),
            plan: Plan::Enterprise,
        };
        let call = |path: &'static str, principal: Principal| {
            let mut req = Request::get(path).body(Full::default()).unwrap();
            table.resolve(&mut req);
            req.extensions_mut().insert(principal);
            svc.clone().oneshot(req)
        };
        for _ in 0..FREE_ROUTE_BURST {
            let res = call("/api/usage", principal).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
        }
        let res = call("/api/usage", principal).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            res.headers()["ratelimit-limit"],
            FREE_ROUTE_LIMIT.to_string()
        );
        assert!(res.headers().contains_key("retry-after"));
        // Another key has its own bucket.
        let other = Principal {
            key: KeyId::new(),
            ..principal
        };
        assert_eq!(
            call("/api/usage", other).await.unwrap().status(),
            StatusCode::OK
        );
        // Paid routes are not this layer's business.
        for _ in 0..2 * FREE_ROUTE_BURST {
            let res = call("/api/paid", principal).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert!(!res.headers().contains_key("ratelimit-limit"));
        }
    }
}
