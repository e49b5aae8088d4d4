//! HTTP plumbing of the dashboard: form bodies, cookies, redirects, and the headers every
//! dashboard response carries.

use std::collections::HashMap;

use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, ACCEPT, CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION, RETRY_AFTER,
    SET_COOKIE,
};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};

use tollgate_core::{BoxError, ErrorCode, Rejection};

use crate::gateway::app::{boxed, GatewayBody};

/// The most a dashboard form may hold.
const FORM_LIMIT: usize = 64 * 1024;

/// The session cookie.
pub const SESSION_COOKIE: &str = "tollgate_session";

/// Nothing loads from elsewhere, nothing frames the dashboard, forms post only to it.
const CSP: &str = "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Sets the headers every dashboard answer carries. `same-origin` referrers keep invite
/// tokens in URLs from leaking to other sites, while same-origin form posts still send
/// their `Origin`.
pub fn secure_headers(headers: &mut HeaderMap) {
    let pairs: [(HeaderName, &'static str); 4] = [
        (HeaderName::from_static("content-security-policy"), CSP),
        (HeaderName::from_static("x-content-type-options"), "nosniff"),
        (HeaderName::from_static("referrer-policy"), "same-origin"),
        (HeaderName::from_static("x-frame-options"), "DENY"),
    ];
    for (name, value) in pairs {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers
        .entry(CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
}

/// An HTML page.
pub fn html(status: StatusCode, body: String) -> Response<GatewayBody> {
    let mut res = Response::new(boxed(Full::new(Bytes::from(body))));
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    res
}

/// `303 See Other` to `location` (a path of the dashboard).
pub fn redirect(location: &str) -> Response<GatewayBody> {
    let mut res = Response::new(boxed(Full::new(Bytes::new())));
    *res.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(location) {
        res.headers_mut().insert(LOCATION, v);
    }
    res
}

/// A JSON `{error, code}` answer (for clients that do not ask for HTML).
pub fn json_error(rejection: Rejection) -> Response<GatewayBody> {
    rejection.into_response::<Full<Bytes>>().map(boxed)
}

/// Adds `Retry-After` for a throttled answer.
pub fn with_retry_after(mut res: Response<GatewayBody>, secs: u64) -> Response<GatewayBody> {
    res.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(secs));
    res
}

/// Marks the response with its error code (for outer layers, as rejections do).
pub fn with_code(mut res: Response<GatewayBody>, code: ErrorCode) -> Response<GatewayBody> {
    res.extensions_mut().insert(code);
    res
}

/// Whether the client asked for HTML (a browser): errors are then pages, else JSON.
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"))
}

/// The value of one cookie of the request.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// The `Set-Cookie` of a new session: `HttpOnly; SameSite=Lax; Path=/`, `Secure` unless
/// `insecure`, kept by the browser as long as a session can live.
pub fn session_cookie(token: &str, max_age_secs: u64, insecure: bool) -> HeaderValue {
    let secure = if insecure { "" } else { "; Secure" };
    let text = format!(
        "{SESSION_COOKIE}={token}; HttpOnly; SameSite=Lax; Path=/; Max-Age={max_age_secs}{secure}"
    );
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The `Set-Cookie` that removes the session cookie.
pub fn clear_session_cookie(insecure: bool) -> HeaderValue {
    let secure = if insecure { "" } else { "; Secure" };
    let text = format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Lax; Path=/; Max-Age=0{secure}");
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Adds a `Set-Cookie`.
pub fn set_cookie(mut res: Response<GatewayBody>, value: HeaderValue) -> Response<GatewayBody> {
    res.headers_mut().append(SET_COOKIE, value);
    res
}

/// The fields of a form post (`application/x-www-form-urlencoded`); the first value of a
/// repeated field wins.
#[derive(Debug, Default)]
pub struct Form(HashMap<String, String>);

impl Form {
    /// A field, or `""`.
    pub fn get(&self, name: &str) -> &str {
        self.0.get(name).map_or("", String::as_str)
    }

    /// Whether the field was sent.
    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

/// Reads a form body of at most 64 KiB.
pub async fn read_form<B>(req: Request<B>) -> Result<Form, Rejection>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let bytes = Limited::new(req.into_body(), FORM_LIMIT)
        .collect()
        .await
        .map_err(|_| {
            Rejection::new(ErrorCode::PayloadTooLarge)
                .with_message("The form is too large or could not be read.")
        })?
        .to_bytes();
    let mut fields = HashMap::new();
    for (k, v) in form_urlencoded::parse(&bytes) {
        fields
            .entry(k.into_owned())
            .or_insert_with(|| v.into_owned());
    }
    Ok(Form(fields))
}
