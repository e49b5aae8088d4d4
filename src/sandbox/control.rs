//! The HTTP control endpoints under `/_sandbox/`, for curl and for tests in other processes.
//!
//! | method | path | body → result |
//! |---|---|---|
//! | `POST` | `/_sandbox/accounts` | → 201 the new account's session material |
//! | `GET` | `/_sandbox/accounts` | → every account |
//! | `POST` | `/_sandbox/accounts/{user_id}/expire` | → `{user_id, expired: true}` |
//! | `POST` | `/_sandbox/accounts/{user_id}/refresh` | → the account with a new session |
//! | `POST` | `/_sandbox/fault` | `{mode, count?, user_id?, status?, stall_ms?, retry_after?}` → the queued fault |
//! | `GET` | `/_sandbox/faults` | → the pending faults |
//! | `DELETE` | `/_sandbox/faults` | → `{cleared: n}` |
//! | `GET` | `/_sandbox/stats` | → `{total, paths: {path: n}}` |
//! | `GET` | `/_sandbox/requests` | → the recorded requests, oldest first |
//! | `DELETE` | `/_sandbox/requests` | → zeroes the counters and forgets the records |
//! | `GET` | `/_sandbox/rules` | → the current rules document |
//! | `PUT` | `/_sandbox/rules` | a rules document → rotates the rules |
//!
//! `mode` is one of `fail` (with `status`, default 500), `stall` (with `stall_ms`, default
//! 5000), `throttle` (with `retry_after`, default 30), `non_json`, `cut_body`, `two_factor`.
//! Control requests are neither verified, counted nor recorded, and never consume faults.

use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Method, StatusCode};
use serde_json::{json, Map, Value};

use super::fault::{Fault, FaultMode, FaultScope};
use super::service::Answer;
use super::{DynamicRules, Sandbox, Shared};

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    Answer::json(status, &json!({"error": message.into()}))
}

fn ok(value: Value) -> Answer {
    Answer::json(StatusCode::OK, &value)
}

fn fault_json(fault: &Fault) -> Value {
    let mut obj = Map::new();
    obj.insert("mode".into(), fault.mode.name().into());
    obj.insert("count".into(), fault.count.into());
    obj.insert(
        "user_id".into(),
        match &fault.scope {
            FaultScope::Global => Value::Null,
            FaultScope::Account(id) => id.clone().into(),
        },
    );
    match &fault.mode {
        FaultMode::Fail(status) => {
            obj.insert("status".into(), status.as_u16().into());
        }
        FaultMode::Stall(d) => {
            obj.insert(
                "stall_ms".into(),
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX).into(),
            );
        }
        FaultMode::Throttle { retry_after_secs } => {
            obj.insert("retry_after".into(), (*retry_after_secs).into());
        }
        _ => {}
    }
    Value::Object(obj)
}

fn uint(obj: &Map<String, Value>, field: &str) -> Result<Option<u64>, Answer> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                format!("`{field}` must be a non-negative integer"),
            )
        }),
    }
}

fn parse_fault(body: &Bytes) -> Result<Fault, Answer> {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "expected a JSON object like {\"mode\": \"fail\", \"count\": 1}",
        ));
    };
    let mode = match obj.get("mode").and_then(Value::as_str) {
        Some("fail") => {
            let status = uint(&obj, "status")?.unwrap_or(500);
            match u16::try_from(status)
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
            {
                Some(status) if status.is_server_error() => FaultMode::Fail(status),
                _ => {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "`status` must be a 5xx status",
                    ))
                }
            }
        }
        Some("stall") => FaultMode::Stall(Duration::from_millis(
            uint(&obj, "stall_ms")?.unwrap_or(5_000),
        )),
        Some("throttle") => FaultMode::Throttle {
            retry_after_secs: uint(&obj, "retry_after")?.unwrap_or(30),
        },
        Some("non_json") => FaultMode::NonJson,
        Some("cut_body") => FaultMode::CutBody,
        Some("two_factor") => FaultMode::TwoFactor,
        _ => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "`mode` must be one of fail, stall, throttle, non_json, cut_body, two_factor",
            ))
        }
    };
    let count = match uint(&obj, "count")?.unwrap_or(1) {
        0 => return Err(error(StatusCode::BAD_REQUEST, "`count` must be at least 1")),
        n => u32::try_from(n).unwrap_or(u32::MAX),
    };
    let mut fault = Fault::new(mode).times(count);
    match obj.get("user_id") {
        None | Some(Value::Null) => {}
        Some(Value::String(id)) => fault = fault.for_account(id.clone()),
        Some(Value::Number(id)) => fault = fault.for_account(id.to_string()),
        Some(_) => return Err(error(StatusCode::BAD_REQUEST, "`user_id` must be a string")),
    }
    Ok(fault)
}

fn recorded_json(sandbox: &Sandbox) -> Value {
    sandbox
        .recorded_requests()
        .iter()
        .map(|r| {
            let headers: Map<String, Value> = r
                .headers
                .keys()
                .map(|name| {
                    let values: Vec<Value> = r
                        .headers
                        .get_all(name)
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned().into())
                        .collect();
                    let value = if values.len() == 1 {
                        values.into_iter().next().unwrap_or(Value::Null)
                    } else {
                        Value::Array(values)
                    };
                    (name.as_str().to_owned(), value)
                })
                .collect();
            json!({
                "method": r.method.as_str(),
                "path_and_query": r.path_and_query,
                "headers": headers,
                "body": String::from_utf8_lossy(&r.body),
                "status": r.status.as_u16(),
                "fault": r.fault,
            })
        })
        .collect()
}

pub(crate) fn handle(shared: &std::sync::Arc<Shared>, parts: &Parts, body: &Bytes) -> Answer {
    let sandbox = Sandbox {
        shared: std::sync::Arc::clone(shared),
    };
    let route = parts
        .uri
        .path()
        .trim_start_matches("/_sandbox")
        .trim_matches('/');
    let segments: Vec<&str> = route.split('/').collect();
    match (&parts.method, segments.as_slice()) {
        (&Method::POST, ["accounts"]) => {
            let account = sandbox.add_account();
            Answer::json(StatusCode::CREATED, &json!(account))
        }
        (&Method::GET, ["accounts"]) => ok(json!(sandbox.accounts())),
        (&Method::POST, ["accounts", id, "expire"]) => {
            if sandbox.expire_session(id) {
                ok(json!({"user_id": id, "expired": true}))
            } else {
                error(StatusCode::NOT_FOUND, format!("no account {id}"))
            }
        }
        (&Method::POST, ["accounts", id, "refresh"]) => match sandbox.refresh_session(id) {
            Some(account) => ok(json!(account)),
            None => error(StatusCode::NOT_FOUND, format!("no account {id}")),
        },
        (&Method::POST, ["fault"] | ["faults"]) => match parse_fault(body) {
            Ok(fault) => {
                let shown = fault_json(&fault);
                sandbox.inject(fault);
                ok(shown)
            }
            Err(answer) => answer,
        },
        (&Method::GET, ["faults"]) => ok(sandbox.pending_faults().iter().map(fault_json).collect()),
        (&Method::DELETE, ["faults"]) => ok(json!({"cleared": sandbox.clear_faults()})),
        (&Method::GET, ["stats"]) => ok(json!({
            "total": sandbox.requests_received(),
            "paths": sandbox.path_counts(),
        })),
        (&Method::GET, ["requests"]) => ok(recorded_json(&sandbox)),
        (&Method::DELETE, ["requests"]) => {
            sandbox.reset_stats();
            ok(json!({"reset": true}))
        }
        (&Method::GET, ["rules"]) => {
            let rules =
                serde_json::from_str::<Value>(&sandbox.rules().to_json()).unwrap_or(Value::Null);
            ok(rules)
        }
        (&Method::PUT | &Method::POST, ["rules"]) => {
            match std::str::from_utf8(body)
                .map_err(|e| e.to_string())
                .and_then(|text| DynamicRules::from_json(text).map_err(|e| e.to_string()))
            {
                Ok(rules) => {
                    let app_token = rules.app_token().to_owned();
                    sandbox.rotate_rules(rules);
                    ok(json!({"rotated": true, "app_token": app_token}))
                }
                Err(e) => error(StatusCode::BAD_REQUEST, format!("invalid rules: {e}")),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "no such sandbox control"),
    }
}
