//! The fields of the admin API's JSON bodies: each parser answers a clear 400
//! `INVALID_REQUEST` for a missing, mistyped or out-of-range value.

use http::header::HeaderValue;
use serde_json::Value;

use tollgate_api_key_auth::{KeySpec, Scopes};
use tollgate_core::time::ms_from_rfc3339;
use tollgate_core::{ErrorCode, ModelId, Rejection};
use tollgate_upstream_sign::Session;

/// The longest grace period of a rotation (docs/contract.md §13): seven days.
pub const MAX_GRACE_SECONDS: u64 = 604_800;

/// A 400 `INVALID_REQUEST` with `message`.
pub fn invalid(message: impl Into<String>) -> Rejection {
    Rejection::new(ErrorCode::InvalidRequest).with_message(message.into())
}

/// A required, non-blank string field.
pub fn string_field(body: &Value, field: &str) -> Result<String, Rejection> {
    match body.get(field) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(invalid(format!("`{field}` must not be empty."))),
        Some(_) => Err(invalid(format!("`{field}` must be a string."))),
        None => Err(invalid(format!("`{field}` is required."))),
    }
}

/// A required whole number of at least 0.
pub fn count_field(body: &Value, field: &str) -> Result<u64, Rejection> {
    match body.get(field) {
        Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
            (Some(v), _) => Ok(v),
            (None, Some(_)) => Err(invalid(format!("`{field}` must not be negative."))),
            _ => Err(invalid(format!("`{field}` must be a whole number."))),
        },
        Some(_) => Err(invalid(format!("`{field}` must be a number."))),
        None => Err(invalid(format!("`{field}` is required."))),
    }
}

/// A credit amount: a whole number from 0 to the ledger's maximum.
pub fn credits_field(body: &Value, field: &str) -> Result<u64, Rejection> {
    let n = count_field(body, field)?;
    if n > tollgate_credit_meter::MAX_CREDITS {
        return Err(invalid(format!(
            "`{field}` must be at most {}.",
            tollgate_credit_meter::MAX_CREDITS
        )));
    }
    Ok(n)
}

/// The `session` object of the contract's model bodies (docs/contract.md §5): four non-empty
/// strings, each sendable as an HTTP header value.
pub fn session_field(body: &Value) -> Result<Session, Rejection> {
    let session = body
        .get("session")
        .ok_or_else(|| invalid("`session` is required."))?;
    if !session.is_object() {
        return Err(invalid(
            "`session` must be an object {cookie, user_id, x_bc, user_agent}.",
        ));
    }
    let field = |name: &str| {
        string_field(session, name).map_err(|_| {
            invalid(format!(
                "`session.{name}` is required and must be a non-empty string."
            ))
        })
    };
    let session = Session {
        cookie: field("cookie")?,
        user_id: field("user_id")?,
        x_bc: field("x_bc")?,
        user_agent: field("user_agent")?,
    };
    // Session material ends up in upstream headers: refuse what could never be sent.
    for (name, value) in [
        ("cookie", &session.cookie),
        ("user_id", &session.user_id),
        ("x_bc", &session.x_bc),
        ("user_agent", &session.user_agent),
    ] {
        if HeaderValue::from_str(value).is_err() {
            return Err(invalid(format!(
                "`session.{name}` contains characters not allowed in an HTTP header."
            )));
        }
    }
    Ok(session)
}

/// The optional `expires_at`, `scopes`, `models` and `credit_limit` of a new key
/// (docs/contract.md §13); `null` or absent means the default. The models are returned as
/// given: the caller checks they are the org's.
pub fn key_spec(body: &Value, now_ms: u64) -> Result<KeySpec, Rejection> {
    let present = |field: &str| body.get(field).filter(|v| !v.is_null());
    let expires_at_ms = match present("expires_at") {
        None => None,
        Some(Value::String(text)) => {
            let at = ms_from_rfc3339(text).ok_or_else(|| {
                invalid("`expires_at` must be an RFC 3339 time, e.g. 2030-01-31T12:00:00Z.")
            })?;
            if at <= now_ms {
                return Err(invalid("`expires_at` must be in the future."));
            }
            Some(at)
        }
        Some(_) => return Err(invalid("`expires_at` must be an RFC 3339 time string.")),
    };
    let scopes = match present("scopes") {
        None => Scopes::ALL,
        Some(Value::Array(items)) => {
            let names: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
            names.and_then(Scopes::from_names).ok_or_else(|| {
                invalid("`scopes` must be a non-empty list of \"read\" and \"write\".")
            })?
        }
        Some(_) => {
            return Err(invalid(
                "`scopes` must be a non-empty list of \"read\" and \"write\".",
            ))
        }
    };
    let models = match present("models") {
        None => None,
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(invalid(
                "`models` must list at least one model id (leave it out for every model).",
            ))
        }
        Some(Value::Array(items)) => {
            let mut ids = Vec::with_capacity(items.len());
            for item in items {
                let id = item
                    .as_str()
                    .and_then(|t| t.parse::<ModelId>().ok())
                    .ok_or_else(|| invalid("`models` must be a list of model ids (UUIDs)."))?;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            Some(ids)
        }
        Some(_) => return Err(invalid("`models` must be a list of model ids (UUIDs).")),
    };
    let credit_limit = match present("credit_limit") {
        None => None,
        Some(_) => Some(credits_field(body, "credit_limit")?),
    };
    Ok(KeySpec {
        expires_at_ms,
        scopes,
        models,
        credit_limit,
    })
}

/// The optional `grace_seconds` of a rotation: 0 (the default) to [`MAX_GRACE_SECONDS`].
pub fn grace_seconds(body: &Value) -> Result<u64, Rejection> {
    if body.get("grace_seconds").is_none_or(Value::is_null) {
        return Ok(0);
    }
    let grace = count_field(body, "grace_seconds")?;
    if grace > MAX_GRACE_SECONDS {
        return Err(invalid(format!(
            "`grace_seconds` must be at most {MAX_GRACE_SECONDS} (7 days)."
        )));
    }
    Ok(grace)
}
