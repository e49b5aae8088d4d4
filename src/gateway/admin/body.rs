//! The fields of the admin API's JSON bodies: each parser answers a clear 400
//! `INVALID_REQUEST` for a missing, mistyped or out-of-range value.

use http::header::HeaderValue;
use serde_json::Value;

use tollgate_core::{ErrorCode, Rejection};
use tollgate_upstream_sign::Session;

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
