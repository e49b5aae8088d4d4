//! The customer routes the gateway answers itself: `GET /api/credits`, `GET /api/logs` and
//! `GET /api/usage`.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{Full, StreamBody};
use serde_json::json;

use tollgate_core::time::{ms_from_rfc3339, rfc3339_from_ms};
use tollgate_core::{BoxError, ErrorCode, ModelId, Principal, Rejection, RouteMatch};
use tollgate_request_logger::{ExportFormat, LogCursor, LogQuery, LogRecord};

use super::app::{boxed, GatewayBody};
use super::state::AppState;

/// The most rows one paged export response (`limit=`) carries; `X-Next-Cursor` continues.
pub const MAX_EXPORT_LIMIT: usize = 10_000;
/// Rows fetched from the sink per page.
const PAGE: usize = 500;

/// The header carrying the cursor of the next export page.
pub static X_NEXT_CURSOR: HeaderName = HeaderName::from_static("x-next-cursor");

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
        .map_err(|e| e.rejection())?
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

fn bad(message: String) -> Rejection {
    Rejection::new(ErrorCode::InvalidRequest).with_message(message)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Parses `from`/`to` as RFC 3339 or as milliseconds since the epoch.
fn instant(name: &str, value: &str) -> Result<u64, Rejection> {
    value
        .parse::<u64>()
        .ok()
        .or_else(|| ms_from_rfc3339(value))
        .ok_or_else(|| {
            bad(format!(
                "`{name}` must be an RFC 3339 time or milliseconds since the epoch."
            ))
        })
}

async fn logs(
    state: &AppState,
    principal: Principal,
    query: &str,
) -> Result<Response<GatewayBody>, Rejection> {
    let mut params = HashMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k).ok_or_else(|| bad("The query string is not valid.".into()))?;
        let v = percent_decode(v).ok_or_else(|| bad("The query string is not valid.".into()))?;
        params.insert(k, v);
    }
    let mut q = LogQuery {
        org: principal.org,
        from_ms: None,
        to_ms: None,
        model: None,
        status: None,
        cursor: None,
        limit: PAGE,
    };
    let mut format = ExportFormat::Ndjson;
    let mut limit = None;
    for (k, v) in &params {
        match k.as_str() {
            "from" => q.from_ms = Some(instant("from", v)?),
            "to" => q.to_ms = Some(instant("to", v)?),
            "model" => {
                q.model = Some(
                    v.parse::<ModelId>()
                        .map_err(|_| bad("`model` must be a model id (UUID).".into()))?,
                )
            }
            "status" => {
                q.status = Some(
                    v.parse::<u16>()
                        .ok()
                        .filter(|s| (100..=599).contains(s))
                        .ok_or_else(|| bad("`status` must be an HTTP status code.".into()))?,
                )
            }
            "format" => {
                format = v
                    .parse::<ExportFormat>()
                    .map_err(|_| bad("`format` must be ndjson or csv.".into()))?
            }
            "cursor" => {
                LogCursor::decode(v)
                    .ok_or_else(|| bad("`cursor` is not a cursor this API gave out.".into()))?;
                q.cursor = Some(v.clone())
            }
            "limit" => {
                limit = Some(
                    v.parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_EXPORT_LIMIT).contains(n))
                        .ok_or_else(|| {
                            bad(format!("`limit` must be between 1 and {MAX_EXPORT_LIMIT}."))
                        })?,
                )
            }
            other => return Err(bad(format!("Unknown parameter `{other}`."))),
        }
    }

    let Some(limit) = limit else {
        return stream_all(state, q, format).await;
    };
    let mut rows: Vec<LogRecord> = Vec::new();
    let next = loop {
        q.limit = PAGE.min(limit - rows.len());
        let page = state
            .logs
            .query(q.clone())
            .await
            .map_err(|e| e.rejection())?;
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
        .map_err(|e| e.rejection())?;
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
