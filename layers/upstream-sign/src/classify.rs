//! How the upstream says no (docs/upstream.md): from its status, headers and error body to the
//! tollgate answer.

use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::Value;
use tollgate_core::{ErrorCode, Rejection};

/// The longest non-JSON upstream error text put under `details`, in bytes.
pub(crate) const MAX_TEXT_DETAILS: usize = 1024;

/// What to do with an upstream answer.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// A good answer: pass it on.
    Pass,
    /// Answer with this rejection; `retry_after` is the upstream's own header when it is not
    /// plain seconds (an HTTP date), passed on as is.
    Reject {
        rejection: Rejection,
        retry_after: Option<HeaderValue>,
    },
    /// The session is dead: mark the model disconnected, then answer with this rejection.
    Disconnect(Rejection),
    /// The error body decides: read it (capped) and call [`classify_error_body`].
    ReadBody,
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The verdict from the status line and headers alone.
pub(crate) fn classify_head(status: StatusCode, headers: &HeaderMap) -> Verdict {
    if status.is_success() {
        return if is_json(headers) {
            Verdict::Pass
        } else {
            reject(
                Rejection::new(ErrorCode::UpstreamError)
                    .with_message("The upstream answered with a body that is not JSON."),
            )
        };
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        let mut rejection = Rejection::new(ErrorCode::UpstreamRateLimited);
        let mut retry_after = None;
        if let Some(value) = headers.get(RETRY_AFTER) {
            match value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
            {
                Some(secs) => rejection = rejection.with_retry_after(secs),
                None => retry_after = Some(value.clone()),
            }
        }
        return Verdict::Reject {
            rejection,
            retry_after,
        };
    }
    if status.is_client_error() {
        return Verdict::ReadBody;
    }
    // 5xx, and anything a JSON API should not send (1xx, 3xx redirects to a login page).
    reject(Rejection::new(ErrorCode::UpstreamError))
}

fn reject(rejection: Rejection) -> Verdict {
    Verdict::Reject {
        rejection,
        retry_after: None,
    }
}

/// `Access denied.` / `access denied` / ` Access denied. ` all mean the same.
fn normalize(message: &str) -> String {
    message
        .trim()
        .trim_end_matches('.')
        .trim()
        .to_ascii_lowercase()
}

/// The verdict for a 4xx (other than 429) from its error body (possibly truncated).
pub(crate) fn classify_error_body(status: StatusCode, body: &[u8]) -> Verdict {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    let error = json.as_ref().and_then(|v| v.get("error"));
    let message = error
        .and_then(|e| match e {
            Value::String(s) => Some(s.as_str()),
            other => other.get("message").and_then(Value::as_str),
        })
        .or_else(|| {
            json.as_ref()
                .and_then(|v| v.get("message"))
                .and_then(Value::as_str)
        })
        .map(normalize)
        .unwrap_or_default();
    let code = error.and_then(|e| e.get("code")).and_then(|c| match c {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    });

    let session_expired = || Verdict::Disconnect(Rejection::new(ErrorCode::ModelSessionExpired));
    match status {
        StatusCode::UNAUTHORIZED if message.contains("please refresh the page") => {
            reject(Rejection::new(ErrorCode::SigningFailed).with_message(
                "The upstream rejected the request signature. Retry in a few seconds.",
            ))
        }
        // SPEC §7: an upstream 401 means the session is dead.
        StatusCode::UNAUTHORIZED => session_expired(),
        StatusCode::FORBIDDEN if message == "access denied" => session_expired(),
        StatusCode::BAD_REQUEST if code == Some(301) || message == "wrong user" => {
            session_expired()
        }
        _ => {
            let mut rejection = Rejection::new(ErrorCode::UpstreamRejected).with_status(status);
            match json {
                Some(value) => rejection = rejection.with_details(value),
                None if !body.is_empty() => {
                    rejection = rejection.with_details(Value::String(truncated_text(body)))
                }
                None => {}
            }
            reject(rejection)
        }
    }
}

fn truncated_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    if text.len() <= MAX_TEXT_DETAILS {
        return text.into_owned();
    }
    let mut end = MAX_TEXT_DETAILS;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut cut = text[..end].to_owned();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ct: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        h
    }

    #[test]
    fn json_content_types() {
        for ct in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/problem+json",
        ] {
            assert!(
                matches!(classify_head(StatusCode::OK, &headers(ct)), Verdict::Pass),
                "{ct}"
            );
        }
        for ct in [
            "text/html",
            "text/plain; charset=utf-8",
            "application/jsonp",
        ] {
            assert!(
                matches!(
                    classify_head(StatusCode::OK, &headers(ct)),
                    Verdict::Reject { .. }
                ),
                "{ct}"
            );
        }
        assert!(matches!(
            classify_head(StatusCode::OK, &HeaderMap::new()),
            Verdict::Reject { .. }
        ));
    }

    #[test]
    fn messages_are_matched_loosely() {
        let v = classify_error_body(
            StatusCode::FORBIDDEN,
            br#"{"error":{"code":0,"message":"  access denied "}}"#,
        );
        assert!(matches!(v, Verdict::Disconnect(_)));
        let v = classify_error_body(StatusCode::BAD_REQUEST, br#"{"error":{"code":"301"}}"#);
        assert!(matches!(v, Verdict::Disconnect(_)));
        let v = classify_error_body(
            StatusCode::UNAUTHORIZED,
            br#"{"error":"Please refresh the page."}"#,
        );
        match v {
            Verdict::Reject { rejection, .. } => {
                assert_eq!(rejection.code(), ErrorCode::SigningFailed)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn long_text_is_truncated_on_a_char_boundary() {
        let body = "é".repeat(MAX_TEXT_DETAILS);
        let t = truncated_text(body.as_bytes());
        assert!(t.len() <= MAX_TEXT_DETAILS + '…'.len_utf8());
        assert!(t.ends_with('…'));
    }
}
