//! [`RemoteSigner`]: asks a signing service over HTTP (docs/contract.md §8 `TOLLGATE_SIGNER_URL`).
//!
//! `POST <url>` with `{"path": "<path?query>", "user_id": "<id>"}` answers
//! `{"sign": "…", "time": "<ms>", "app_token": "…"}`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::Value;
use tollgate_core::BoxFuture;

use crate::rules::Signature;
use crate::signer::{SignError, Signer};

/// The remote signer's default timeout (docs/contract.md §8 `TOLLGATE_SIGNER_TIMEOUT_MS`).
pub const DEFAULT_SIGNER_TIMEOUT: Duration = Duration::from_millis(2000);

/// The largest answer read from the signing service.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The signing service URL is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid signer URL {url:?}: {reason}")]
pub struct InvalidSignerUrl {
    url: String,
    reason: &'static str,
}

/// The bearer token is not valid header text (its value is not shown).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid signer token: it must be visible ASCII without spaces at its ends")]
pub struct InvalidSignerToken;

/// Signs by asking a signing service over HTTP, with a timeout, over a pooled client.
///
/// `RemoteSigner::new` speaks plain HTTP; for HTTPS pass a TLS connector (e.g.
/// `hyper_rustls::HttpsConnector`) to [`RemoteSigner::with_connector`]. A service that wants
/// a credential gets one with [`RemoteSigner::with_bearer_token`]. Clones share the
/// connection pool.
pub struct RemoteSigner<C = HttpConnector> {
    inner: Arc<Inner<C>>,
}

#[derive(Clone)]
struct Inner<C> {
    client: Client<C, Full<Bytes>>,
    uri: Uri,
    timeout: Duration,
    /// `Bearer <token>`, marked sensitive.
    authorization: Option<HeaderValue>,
}

impl<C> Clone for RemoteSigner<C> {
    fn clone(&self) -> Self {
        RemoteSigner {
            inner: self.inner.clone(),
        }
    }
}

impl<C> fmt::Debug for RemoteSigner<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteSigner")
            .field("uri", &self.inner.uri)
            .field("timeout", &self.inner.timeout)
            .field("bearer_token", &self.inner.authorization.is_some())
            .finish()
    }
}

fn parse_url(url: &str, allow_https: bool) -> Result<Uri, InvalidSignerUrl> {
    let invalid = |reason| InvalidSignerUrl {
        url: url.to_owned(),
        reason,
    };
    let uri: Uri = url.parse().map_err(|_| invalid("not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") if allow_https => {}
        Some("https") => {
            return Err(invalid(
                "https needs a TLS connector (RemoteSigner::with_connector)",
            ))
        }
        _ => return Err(invalid("the scheme must be http or https")),
    }
    if uri.authority().is_none() {
        return Err(invalid("the URL has no host"));
    }
    Ok(uri)
}

impl RemoteSigner<HttpConnector> {
    /// A signer that POSTs to `url` (plain `http://`) and gives up after `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, InvalidSignerUrl> {
        let uri = parse_url(url, false)?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Ok(Self::build(uri, timeout, connector))
    }
}

impl<C> RemoteSigner<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    /// A signer over a custom connector (TLS, proxies, unix sockets…).
    pub fn with_connector(
        url: &str,
        timeout: Duration,
        connector: C,
    ) -> Result<Self, InvalidSignerUrl> {
        let uri = parse_url(url, true)?;
        Ok(Self::build(uri, timeout, connector))
    }

    fn build(uri: Uri, timeout: Duration, connector: C) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        RemoteSigner {
            inner: Arc::new(Inner {
                client,
                uri,
                timeout,
                authorization: None,
            }),
        }
    }

    /// Sends `Authorization: Bearer <token>` with every signing request.
    pub fn with_bearer_token(mut self, token: &str) -> Result<Self, InvalidSignerToken> {
        let mut value =
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| InvalidSignerToken)?;
        if token.is_empty() || token.trim() != token {
            return Err(InvalidSignerToken);
        }
        value.set_sensitive(true);
        Arc::make_mut(&mut self.inner).authorization = Some(value);
        Ok(self)
    }

    /// The signing service URL.
    pub fn url(&self) -> &Uri {
        &self.inner.uri
    }

    /// The timeout of one signing request.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    async fn ask(inner: Arc<Inner<C>>, body: Bytes) -> Result<Signature, SignError> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(inner.uri.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            .body(Full::new(body))
            .map_err(|e| SignError::Other(e.to_string()))?;
        if let Some(auth) = &inner.authorization {
            req.headers_mut().insert(AUTHORIZATION, auth.clone());
        }
        let res = inner
            .client
            .request(req)
            .await
            .map_err(|e| SignError::Unreachable(error_chain(&e)))?;
        let status = res.status();
        if !status.is_success() {
            return Err(SignError::Status(status));
        }
        let bytes = Limited::new(res.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| SignError::BadResponse(format!("reading the answer: {e}")))?
            .to_bytes();
        parse_answer(&bytes)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Validates the service's answer: three header-safe strings, `time` in decimal ms.
fn parse_answer(bytes: &[u8]) -> Result<Signature, SignError> {
    let bad = |what: &str| SignError::BadResponse(what.to_owned());
    let value: Value = serde_json::from_slice(bytes).map_err(|_| bad("not JSON"))?;
    let field = |name: &str| -> Result<String, SignError> {
        match value.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            // Some services send the time as a number.
            Some(Value::Number(n)) if name == "time" => Ok(n.to_string()),
            Some(_) => Err(SignError::BadResponse(format!("`{name}` is not a string"))),
            None => Err(SignError::BadResponse(format!("`{name}` is missing"))),
        }
    };
    let sign = field("sign")?;
    let time = field("time")?;
    let app_token = field("app_token")?;
    if time.is_empty() || time.len() > 20 || !time.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("`time` is not milliseconds as a decimal string"));
    }
    for (name, v) in [("sign", &sign), ("app_token", &app_token)] {
        if v.is_empty() || HeaderValue::from_str(v).is_err() {
            return Err(SignError::BadResponse(format!(
                "`{name}` is empty or not valid header text"
            )));
        }
    }
    Ok(Signature {
        sign,
        time,
        app_token,
    })
}

impl<C> Signer for RemoteSigner<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    fn sign(&self, path_and_query: &str, user_id: &str) -> BoxFuture<Result<Signature, SignError>> {
        let body = serde_json::json!({ "path": path_and_query, "user_id": user_id }).to_string();
        let inner = self.inner.clone();
        let timeout = inner.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, Self::ask(inner, Bytes::from(body))).await {
                Ok(result) => result,
                Err(_) => Err(SignError::Timeout(timeout)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_up_front() {
        assert!(parse_url("http://127.0.0.1:9/sign", false).is_ok());
        assert!(parse_url("https://signer.example/sign", false).is_err());
        assert!(parse_url("https://signer.example/sign", true).is_ok());
        assert!(parse_url("ftp://x/", true).is_err());
        assert!(parse_url("/sign", true).is_err());
        assert!(parse_url("not a url", true).is_err());
    }

    #[test]
    fn bearer_tokens_are_header_text_and_never_shown() {
        let signer = RemoteSigner::new("http://127.0.0.1:9/sign", DEFAULT_SIGNER_TIMEOUT).unwrap();
        let with = signer.clone().with_bearer_token("s3cret-token").unwrap();
        let auth = with.inner.authorization.as_ref().unwrap();
        assert_eq!(auth, "Bearer s3cret-token");
        assert!(auth.is_sensitive());
        assert!(!format!("{with:?}").contains("s3cret"));
        for bad in ["", " padded", "line\nbreak"] {
            assert_eq!(
                signer.clone().with_bearer_token(bad).unwrap_err(),
                InvalidSignerToken
            );
        }
        // The original is untouched: the token belongs to the new signer only.
        assert!(signer.inner.authorization.is_none());
    }

    #[test]
    fn answers_are_validated() {
        let ok =
            parse_answer(br#"{"sign":"1:ab:3:4","time":"1700000000000","app_token":"t"}"#).unwrap();
        assert_eq!(ok.time, "1700000000000");
        let numeric =
            parse_answer(br#"{"sign":"s","time":1700000000000,"app_token":"t"}"#).unwrap();
        assert_eq!(numeric.time, "1700000000000");
        for bad in [
            &br#"not json"#[..],
            br#"{"time":"1","app_token":"t"}"#,
            br#"{"sign":"s","time":"soon","app_token":"t"}"#,
            br#"{"sign":"s","time":"-1","app_token":"t"}"#,
            br#"{"sign":"a\nb","time":"1","app_token":"t"}"#,
            br#"{"sign":"s","time":"1","app_token":""}"#,
            br#"{"sign":5,"time":"1","app_token":"t"}"#,
        ] {
            assert!(
                matches!(parse_answer(bad), Err(SignError::BadResponse(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
